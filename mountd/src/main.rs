//! `nvlibfs-mountd`: mounts and serves one view until stopped. Normally
//! started by `nvlibfs mount`, which waits for it to be ready; run it
//! directly (it always stays in the foreground) under systemd. This
//! process is the supervisor that holds the FUSE connection; it runs
//! itself again, with `--supervisor-socket`, as the serving process.

use clap::Parser;
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs_mountd::daemon::{self, Readiness};
use nvlibfs_mountd::supervisor;
use std::os::fd::FromRawFd;
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

    /// Take MOUNTPOINT over from the nvlibfs daemon serving it (same
    /// --state-dir), in whatever process tree that one runs (another
    /// container, another pod), or mount it if none does: it hands over the
    /// connection and its state, this daemon restores it exactly or
    /// refuses, and the other stops without unmounting. No request fails
    #[arg(long)]
    take_over: bool,

    /// Descriptor to write "ready" or "error: ..." to (used by `nvlibfs mount`)
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,

    /// Run as the serving process of the supervisor at the other end of
    /// this socket (set by the supervisor)
    #[arg(long, hide = true, value_name = "FD")]
    supervisor_socket: Option<i32>,

    /// Print every failpoint (mountd/src/failpoint.rs) and what reaches it,
    /// then exit: for tests/failpoints.rs
    #[arg(long, hide = true)]
    list_failpoints: bool,

    /// With --supervisor-socket: the status socket's listener, which the
    /// supervisor holds for the mount (set by the supervisor)
    #[arg(long, hide = true, value_name = "FD", requires = "supervisor_socket")]
    status_fd: Option<i32>,

    /// With --supervisor-socket: take over the connection and state the
    /// supervisor holds instead of mounting
    #[arg(long, hide = true, requires = "supervisor_socket")]
    takeover: bool,

    /// Where to mount the view (created if missing)
    mountpoint: PathBuf,
}

/// This binary, run again as the server with the same flags: held open
/// for crashes; `nvlibfs restart` starts the one the path names then.
fn supervise(args: &Args, ready: Readiness) -> Result<(), daemon::DaemonError> {
    let exe = std::env::current_exe().map_err(|e| daemon::DaemonError::new(format!("finding this binary: {e}")))?;
    let mut server_args = args.driver.to_args();
    server_args.extend(args.serve.to_args());
    if args.verbose > 0 {
        server_args.push(format!("-{}", "v".repeat(args.verbose as usize)).into());
    }
    if let Some(log) = &args.log_file {
        server_args.extend(["--log-file".into(), log.clone().into_os_string()]);
    }
    let command = supervisor::ServerCommand {
        exe,
        args: server_args,
        mountpoint: args.mountpoint.clone(),
        no_resend: args.serve.no_resend,
        state_dir: args.serve.state_dir.clone(),
        take_over: args.take_over,
        // `nvlibfs mount` waits on a pipe only for a background daemon.
        foreground: args.ready_fd.is_none(),
    };
    supervisor::run(command, ready)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list_failpoints {
        for (name, trigger) in nvlibfs_mountd::failpoint::STEPS {
            println!("{name} {trigger:?}");
        }
        return ExitCode::SUCCESS;
    }
    nvlibfs_mountd::logging::init(args.verbose, args.log_file.as_deref());
    // SAFETY: the descriptor was passed to us by `nvlibfs mount` for this purpose.
    let mut ready = unsafe { Readiness::from_fd(args.ready_fd) };
    let result = match args.supervisor_socket {
        Some(fd) => {
            // SAFETY: the supervisor passed this socket for this purpose.
            let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // The supervisor learns that this server is gone when the
            // socket closes: no process this one starts may keep it open.
            let _ = nix::fcntl::fcntl(&sock, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            let link = nvlibfs_mountd::link::Link::new(sock);
            let start = if args.takeover {
                daemon::Start::Takeover
            } else {
                daemon::Start::Mount
            };
            // SAFETY: the supervisor passed this listener for this purpose.
            let status = args
                .status_fd
                .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            if let Some(status) = &status {
                let _ = nix::fcntl::fcntl(status, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            }
            daemon::run(
                &args.driver,
                &args.serve,
                &args.mountpoint,
                &mut ready,
                link,
                start,
                status,
            )
        }
        None => supervise(&args, ready),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: to the log (stderr in the foreground); `nvlibfs mount`
            // has it from the ready pipe.
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
