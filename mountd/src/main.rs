//! `nvlibfs-mountd`: mounts and serves one view until stopped. Normally
//! started by `nvlibfs mount`, which waits for it to be ready; run it
//! directly (it always stays in the foreground) under a supervisor.

use clap::Parser;
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs_mountd::daemon::{self, Readiness};
use std::path::PathBuf;
use std::process::ExitCode;

/// Mount a read-only, version-pinned view of the host's NVIDIA driver at
/// MOUNTPOINT and serve it until SIGTERM/SIGINT or unmount.
#[derive(Parser)]
#[command(
    name = "nvlibfs-mountd",
    version,
    after_help = "Usually started by `nvlibfs mount`; see `nvlibfs mount --help`."
)]
struct Args {
    /// More log output on stderr (repeat for more); NVLIBFS_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(flatten)]
    driver: DriverArgs,

    #[command(flatten)]
    serve: ServeArgs,

    /// Log to FILE (appending) once the mount is ready, instead of stderr; a
    /// daemon that fails before that reports only on stderr and the ready pipe
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,

    /// Descriptor to write "ready" or "error: ..." to (used by `nvlibfs mount`)
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,

    /// Where to mount the view (created if missing)
    mountpoint: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    nvlibfs_mountd::logging::init(args.verbose, args.log_file.as_deref());
    // SAFETY: the descriptor was passed to us by `nvlibfs mount` for this purpose.
    let mut ready = unsafe { Readiness::from_fd(args.ready_fd) };
    match daemon::run(&args.driver, &args.serve, &args.mountpoint, &mut ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: to the log (stderr in the foreground); `nvlibfs mount`
            // has it from the ready pipe.
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
