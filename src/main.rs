//! The `nvlibfs` command.

mod check;
mod mount;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use nvlibfs::args::DriverArgs;
use nvlibfs::reason::Reason;
use nvlibfs::view::Manifest;
use nvlibfs::Plan;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::ExitCode;

/// How to turn on more logging, in the same words in every help text and
/// in the README.
const LOGGING_HELP: &str = "Logging: -v, -vv or -vvv, or NVLIBFS_LOG with a tracing filter \
    (e.g. NVLIBFS_LOG=nvlibfs=debug,nvlibfs_mountd=debug,fuser=info).";

#[derive(Parser)]
#[command(
    name = "nvlibfs",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NVLIBFS_GIT_REV"), ")"),
    about = "Serve the host's NVIDIA driver files to containers, pinned to the loaded kernel module's version",
    long_about = "Serve the host's NVIDIA driver files to containers, pinned to the loaded kernel module's version.\n\n\
        Containers (Docker-in-Docker included) bind-mount the view at /usr/local/nvidia and always load \
        libraries that match the host's kernel module.\n\n\
        Start with `nvlibfs scan` to see what would be served and why anything was left out.",
    after_help = LOGGING_HELP
)]
struct Cli {
    /// More log output on stderr (repeat for more)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a mount would serve: the pinned version, the view's files and
    /// links, and every candidate left out with the reason
    #[command(after_help = "Examples:\n  \
        nvlibfs scan\n  \
        nvlibfs scan --json | jq '.files[].path'\n  \
        nvlibfs scan --driver-root /host --module-version-file /host/sys/module/nvidia/version")]
    Scan(ScanArgs),

    /// Mount the view at MOUNTPOINT (e.g. /run/nvlibs) and serve it
    #[command(after_help = "Examples:\n  \
        nvlibfs mount /run/nvlibs\n  \
        nvlibfs mount --foreground /run/nvlibs        # under systemd or in a container\n  \
        docker run -v /run/nvlibs:/usr/local/nvidia:ro,rslave IMAGE ...   # then, in containers\n  \
        docker run --device nvidia.com/gpu=all IMAGE ...   # or with CDI, its spec dir /run/nvlibs/etc/cdi\n\n\
        rslave lets the mount of a wholly new daemon (its supervisor gone too) reach running containers.\n\
        Without --foreground it returns once the mount answers (exit 0) or has failed (exit 1, with the reason).")]
    Mount(mount::MountArgs),

    /// Unmount a view mounted by `nvlibfs mount`; its daemon then exits
    Umount(mount::UmountArgs),

    /// Diagnose this host: the loaded module's version, the driver versions
    /// on disk, what nvlibfs serves and holds, and what to do (exit 1 when
    /// something needs doing)
    #[command(after_help = "With no driver flags it checks the driver that the daemon serving \
        --mountpoint serves (its driver root and version pin), or else the defaults.\n\n\
        Examples:\n  nvlibfs check\n  nvlibfs check --mountpoint /srv/nvlibs --state-dir /srv/state")]
    Check(check::CheckArgs),

    /// Print the `docker run` flags that give a container the view and this
    /// host's NVIDIA devices, one per line
    #[command(
        after_help = "Example:\n  docker run $(nvlibfs docker-flags) nvidia/cuda:12.8.0-base-ubuntu24.04 nvidia-smi\n\n\
        LD_LIBRARY_PATH puts the view before the image's own library directories, so a libcuda baked \
        into the image never shadows the host's."
    )]
    DockerFlags(mount::DockerFlagsArgs),

    /// CDI specs for CDI-aware runtimes (podman, containerd, CRI-O, docker 25+)
    #[command(subcommand)]
    Cdi(CdiCommand),

    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(after_help = "Example:\n  nvlibfs completions bash > /etc/bash_completion.d/nvlibfs")]
    Completions {
        /// The shell to write the script for
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff)
    #[command(after_help = "Example:\n  nvlibfs manpage > /usr/local/share/man/man1/nvlibfs.1")]
    Manpage,

    /// Show what the daemon serving MOUNTPOINT serves and how (pinned version,
    /// data path, request counters, memory)
    Status(mount::StatusArgs),

    /// Hand the mount to a new serving process started from the nvlibfs
    /// binary now installed (after an upgrade), with no failed request
    #[command(after_help = "Example:\n  nvlibfs restart /run/nvlibs\n\n\
        The supervisor (see `nvlibfs status`) starts the new server, which restores what the old one \
        serves; only when it is ready is the old one stopped, and requests wait in the kernel for the \
        few milliseconds in between. If the new server cannot start, the old one goes on serving.")]
    Restart(mount::RestartArgs),
}

#[derive(Subcommand)]
enum CdiCommand {
    /// Write a CDI spec (kind nvidia.com/gpu: a device per GPU, and all)
    /// that mounts the view read-only at /usr/local/nvidia, sets PATH and
    /// LD_LIBRARY_PATH and adds the NVIDIA device nodes
    #[command(after_help = "Example:\n  nvlibfs cdi generate --output /etc/cdi/nvlibfs.json\n  \
        podman run --device nvidia.com/gpu=all IMAGE nvidia-smi")]
    Generate(CdiArgs),
}

#[derive(Args)]
struct CdiArgs {
    /// Where the view is mounted on this host
    #[arg(long, value_name = "DIR", default_value = "/run/nvlibs")]
    mountpoint: PathBuf,

    /// Where to look for the NVIDIA device nodes
    #[arg(long, value_name = "DIR", default_value = "/dev")]
    dev: PathBuf,

    /// Write the spec here (JSON, which CDI runtimes read from /etc/cdi or
    /// /var/run/cdi) instead of standard output
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,

    /// The devices' kind (VENDOR/CLASS): another than nvidia.com/gpu lets
    /// the spec sit beside the NVIDIA Container Toolkit's
    #[arg(long, value_name = "VENDOR/CLASS", default_value = nvlibfs::cdi::KIND)]
    kind: String,

    /// The CDI spec directories the runtimes read, in the order they
    /// apply them, where another spec of the same kind is looked for
    #[arg(long, value_name = "DIR", value_delimiter = ',', default_values = nvlibfs::cdi::DEFAULT_SPEC_DIRS)]
    spec_dirs: Vec<PathBuf>,
}

fn cdi_generate(args: CdiArgs) -> Result<(), Box<dyn std::error::Error>> {
    // The spec's paths are the host's, read by a runtime in another working
    // directory: never relative.
    let absolute = |path: &std::path::Path, flag: &str| {
        std::path::absolute(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    nvlibfs::cdi::check_kind(&args.kind)?;
    // Another spec of this kind (the NVIDIA Container Toolkit's) where the
    // runtimes look: one of them would break the other's devices.
    let output = args.output.as_deref();
    let others = nvlibfs::cdi::conflicts(&args.kind, &args.spec_dirs, output);
    if !others.is_empty() {
        let message = nvlibfs::cdi::conflict_message(&args.kind, &others, output);
        // Into one of the runtimes' directories, by any of its names.
        let into_spec_dir = output.filter(|o| {
            let dir = nvlibfs::cdi::resolved(o).parent().map(std::path::Path::to_owned);
            args.spec_dirs
                .iter()
                .any(|d| std::fs::canonicalize(d).ok().or_else(|| std::path::absolute(d).ok()) == dir)
        });
        if let Some(o) = into_spec_dir {
            return Err(format!("not writing {}:\n{message}", o.display()).into());
        }
        eprintln!("nvlibfs: warning: {message}");
    }
    let spec = nvlibfs::cdi::generate_kind(
        &absolute(&args.mountpoint, "--mountpoint")?,
        &absolute(&args.dev, "--dev")?,
        &args.kind,
    );
    // Only `all` and no GPU: a spec that gives files but no GPU would look
    // fine until a container finds no device.
    if spec.devices.len() < 2 {
        eprintln!(
            "nvlibfs: warning: no NVIDIA GPU device nodes (nvidia0, nvidia1, ...) under {}: the spec gives \
             containers the driver's files but no GPU. Load the NVIDIA driver (its nodes appear under /dev), \
             or pass --dev DIR where the nodes are",
            args.dev.display()
        );
    }
    let json = serde_json::to_string_pretty(&spec)? + "\n";
    match &args.output {
        Some(path) => {
            std::fs::write(path, json).map_err(|e| format!("--output {}: {e}", path.display()))?;
            eprintln!(
                "nvlibfs: wrote a CDI spec with {} device(s) to {}",
                spec.devices.len(),
                path.display()
            );
        }
        None => print!("{json}"),
    }
    Ok(())
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    driver: DriverArgs,

    /// Print one JSON object (driver_version, files, symlinks, rejected, ...)
    #[arg(long, help_heading = "Output")]
    json: bool,

    /// Also list each duplicate (another name for a file already served)
    #[arg(long, help_heading = "Output")]
    all: bool,
}

fn main() -> ExitCode {
    // Die quietly of SIGPIPE when whoever reads our output stops reading
    // (`nvlibfs scan | head`), as coreutils do, instead of Rust's default of
    // ignoring it, which turns every later print into a panic or a "Broken
    // pipe" error. Children get the default disposition back anyway.
    // SAFETY: before any thread starts; SIG_DFL is always a valid disposition.
    let _ =
        unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    nvlibfs::args::init_logging(cli.verbose);
    let result = match cli.command {
        Command::Scan(args) => scan(args),
        Command::Mount(args) => mount::mount(args, cli.verbose),
        Command::Umount(args) => mount::umount(args),
        Command::Status(args) => mount::status(args),
        Command::Restart(args) => mount::restart(args),
        Command::DockerFlags(args) => mount::docker_flags(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "nvlibfs", &mut std::io::stdout());
            Ok(())
        }
        Command::Cdi(CdiCommand::Generate(args)) => cdi_generate(args),
        Command::Manpage => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
        Command::Check(args) => match check::check(args, driver_flags_given(&matches, "check")) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvlibfs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether subcommand `sub` was given any driver flag on its command line.
fn driver_flags_given(matches: &clap::ArgMatches, sub: &str) -> bool {
    matches.subcommand_matches(sub).is_some_and(|m| {
        ["driver_root", "module_version_file", "driver_version"]
            .iter()
            .any(|id| m.value_source(id) == Some(ValueSource::CommandLine))
    })
}

/// How a user runs this program: `nvlibfs` when that is what their PATH
/// finds, else the full path of this binary, so suggested commands work when
/// copied as they are.
pub(crate) fn program_name() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "nvlibfs".to_owned();
    };
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nvlibfs"))
        .find(|p| p.is_file());
    match on_path.and_then(|p| std::fs::canonicalize(p).ok()) {
        Some(found) if std::fs::canonicalize(&exe).is_ok_and(|exe| exe == found) => "nvlibfs".to_owned(),
        _ => shell_word(exe.as_os_str()),
    }
}

/// A shell command line running this program with `words`.
pub(crate) fn command_line<I: IntoIterator<Item = T>, T: Into<OsString>>(words: I) -> String {
    let words = shell_words(words);
    if words.is_empty() {
        program_name()
    } else {
        format!("{} {words}", program_name())
    }
}

/// `words` quoted for a POSIX shell, space-separated.
pub(crate) fn shell_words<I: IntoIterator<Item = T>, T: Into<OsString>>(words: I) -> String {
    let quoted: Vec<String> = words.into_iter().map(|w| shell_word(&w.into())).collect();
    quoted.join(" ")
}

fn shell_word(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// `nvlibfs scan --json`: the manifest plus what was left out.
#[derive(serde::Serialize)]
struct ScanReport<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    rejected: &'a [nvlibfs::reason::Rejected],
    /// View path -> what shows a file whose name carries no version to be
    /// of the pinned version.
    version_shown_by: std::collections::BTreeMap<String, String>,
    scan_ms: f64,
}

fn scan(args: ScanArgs) -> Result<(), Box<dyn std::error::Error>> {
    let plan = args.driver.plan()?;
    let manifest = plan.view.manifest();
    let scan_ms = plan.elapsed.as_secs_f64() * 1e3;
    if args.json {
        let report = ScanReport {
            manifest: &manifest,
            rejected: &plan.rejected,
            version_shown_by: plan
                .provenance
                .iter()
                .map(|(path, p)| (path.display().to_string(), p.to_string()))
                .collect(),
            scan_ms,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_plan(&manifest, &plan, args.all);
    }
    // What `nvlibfs mount` would refuse to serve is a failure here too, in
    // the same words, so a script can trust `scan` before it mounts.
    match plan.no_driver_message() {
        None => Ok(()),
        Some(message) if args.json || plan.rejected.is_empty() => Err(message.into()),
        Some(message) => Err(format!("{message} (the list above says why each candidate was left out)").into()),
    }
}

fn print_plan(m: &Manifest, plan: &Plan, all: bool) {
    println!("Driver version {} (pinned from {})", m.driver_version, m.version_source);
    println!("Driver root    {}", m.driver_root);
    let bytes: u64 = m.files.iter().map(|f| f.size).sum();
    println!("\nFiles ({}, {}):", m.files.len(), human(bytes));
    let width = m.files.iter().map(|f| f.path.len()).max().unwrap_or(0);
    let shown_by: std::collections::HashMap<String, String> = plan
        .provenance
        .iter()
        .map(|(path, p)| (path.display().to_string(), p.to_string()))
        .collect();
    for f in &m.files {
        match shown_by.get(&f.path) {
            // A name without a version: say why this file is the pinned one.
            Some(why) => println!("  {:width$}  {:>9}  {}  ({why})", f.path, human(f.size), f.source),
            None => println!("  {:width$}  {:>9}  {}", f.path, human(f.size), f.source),
        }
    }
    println!("\nSymlinks ({}):", m.symlinks.len());
    let width = m.symlinks.iter().map(|l| l.path.len()).max().unwrap_or(0);
    for l in &m.symlinks {
        println!("  {:width$} -> {}", l.path, l.target);
    }
    let (duplicates, others): (Vec<_>, Vec<_>) = plan
        .rejected
        .iter()
        .partition(|r| matches!(r.reason, Reason::Duplicate { .. }));
    println!("\nRejected ({}):", others.len());
    for r in &others {
        println!("  {}: {}", r.source, r.reason);
    }
    if all {
        println!("\nDuplicates ({}):", duplicates.len());
        for r in &duplicates {
            println!("  {}: {}", r.source, r.reason);
        }
    } else if !duplicates.is_empty() {
        println!(
            "  (and {} duplicates: other names for files above; --all lists them)",
            duplicates.len()
        );
    }
    println!("\nScanned in {:.1} ms.", plan.elapsed.as_secs_f64() * 1e3);
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
