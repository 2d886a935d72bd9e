//! The `nvlibfs` command.

mod check;
mod mount;

use clap::{Args, CommandFactory, Parser, Subcommand};
use nvlibfs::args::DriverArgs;
use nvlibfs::reason::Reason;
use nvlibfs::view::Manifest;
use nvlibfs::Plan;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nvlibfs",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NVLIBFS_GIT_REV"), ")"),
    about = "Serve the host's NVIDIA driver files to containers, pinned to the loaded kernel module's version",
    long_about = "Serve the host's NVIDIA driver files to containers, pinned to the loaded kernel module's version.\n\n\
        Containers (Docker-in-Docker included) bind-mount the view at /usr/local/nvidia and always load \
        libraries that match the host's kernel module.\n\n\
        Start with `nvlibfs scan` to see what would be served and why anything was left out.",
    after_help = "Logging: -v, -vv, -vvv, or NVLIBFS_LOG (e.g. NVLIBFS_LOG=nvlibfs=debug)."
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
        docker run -v /run/nvlibs:/usr/local/nvidia:ro ... # then, in containers\n\n\
        Without --foreground it returns once the mount answers (exit 0) or has failed (exit 1, with the reason).")]
    Mount(mount::MountArgs),

    /// Unmount a view mounted by `nvlibfs mount`; its daemon then exits
    Umount(mount::UmountArgs),

    /// Diagnose this host: the loaded module's version, the driver versions
    /// on disk, what nvlibfs serves and holds, and what to do (exit 1 when
    /// something needs doing)
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
    Completions { shell: clap_complete::Shell },

    /// Print the man page (roff)
    #[command(after_help = "Example:\n  nvlibfs manpage > /usr/local/share/man/man1/nvlibfs.1")]
    Manpage,

    /// Show what the daemon serving MOUNTPOINT serves and how (pinned version,
    /// data path, request counters, memory)
    Status(mount::StatusArgs),
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
}

fn cdi_generate(args: CdiArgs) -> Result<(), Box<dyn std::error::Error>> {
    let spec = nvlibfs::cdi::generate(&args.mountpoint, &args.dev);
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
    let cli = Cli::parse();
    nvlibfs::args::init_logging(cli.verbose);
    let result = match cli.command {
        Command::Scan(args) => scan(args),
        Command::Mount(args) => mount::mount(args, cli.verbose),
        Command::Umount(args) => mount::umount(args),
        Command::Status(args) => mount::status(args),
        Command::DockerFlags(args) => mount::docker_flags(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "nvlibfs", &mut std::io::stdout());
            Ok(())
        }
        Command::Cdi(CdiCommand::Generate(args)) => cdi_generate(args),
        Command::Manpage => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
        Command::Check(args) => match check::check(args) {
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

/// `nvlibfs scan --json`: the manifest plus what was left out.
#[derive(serde::Serialize)]
struct ScanReport<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    rejected: &'a [nvlibfs::reason::Rejected],
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
            scan_ms,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_plan(&manifest, &plan, args.all);
    }
    if !plan.view.has_driver_libraries() {
        eprintln!(
            "nvlibfs: warning: no driver library of version {} under {}; see the rejected list above, \
             or pin another version with --driver-version",
            manifest.driver_version, manifest.driver_root
        );
    }
    Ok(())
}

fn print_plan(m: &Manifest, plan: &Plan, all: bool) {
    println!("Driver version {} (pinned from {})", m.driver_version, m.version_source);
    println!("Driver root    {}", m.driver_root);
    let bytes: u64 = m.files.iter().map(|f| f.size).sum();
    println!("\nFiles ({}, {}):", m.files.len(), human(bytes));
    let width = m.files.iter().map(|f| f.path.len()).max().unwrap_or(0);
    for f in &m.files {
        println!("  {:width$}  {:>9}  {}", f.path, human(f.size), f.source);
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
