//! The `nvlibfs` command.

use clap::{Args, Parser, Subcommand};
use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use nvlibfs::select::Reason;
use nvlibfs::view::Manifest;
use nvlibfs::Plan;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nvlibfs",
    version,
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
}

/// Which driver to serve: shared by every command that builds a view.
#[derive(Args)]
struct DriverArgs {
    /// Look for the driver's files under DIR instead of /. Links are
    /// followed inside DIR only; nothing outside it is ever served
    #[arg(long, value_name = "DIR", default_value = "/", help_heading = "Driver")]
    driver_root: PathBuf,

    /// Read the kernel module's version from FILE (sysfs or
    /// /proc/driver/nvidia/version format) instead of the running kernel's
    #[arg(
        long,
        value_name = "FILE",
        group = "pin",
        help_heading = "Version pin (default: the loaded module's)"
    )]
    module_version_file: Option<PathBuf>,

    /// Serve this driver version, whatever module is loaded
    #[arg(
        long,
        value_name = "VERSION",
        group = "pin",
        help_heading = "Version pin (default: the loaded module's)"
    )]
    driver_version: Option<String>,
}

impl DriverArgs {
    fn plan(&self) -> Result<Plan, nvlibfs::PlanError> {
        let pin = match (&self.module_version_file, &self.driver_version) {
            (Some(file), _) => PinRequest::ModuleFile(file.clone()),
            (None, Some(version)) => PinRequest::Version(version.clone()),
            (None, None) => PinRequest::LoadedModule,
        };
        nvlibfs::plan(&self.driver_root, &pin, &KernelInfo::running())
    }
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
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Scan(args) => scan(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvlibfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("NVLIBFS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `nvlibfs scan --json`: the manifest plus what was left out.
#[derive(serde::Serialize)]
struct ScanReport<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    rejected: &'a [nvlibfs::select::Rejected],
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
    if !manifest.files.iter().any(|f| f.path.starts_with("lib")) {
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

fn human(bytes: u64) -> String {
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
