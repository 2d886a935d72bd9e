//! `nvlibfs mount`, `umount` and `status`: the CLI side of the daemon.
//! The daemon itself is the `nvlibfs-mountd` binary installed beside this
//! one; `mount` starts it and waits until the mount answers.

use crate::{command_line, human};
use clap::Args;
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs::control::{self, Status};
use nvlibfs::mountinfo::{self, is_nvlibfs_fuse, is_nvlibfs_top, mount_at, MountEntry};
use std::error::Error;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = "nvlibfs-mountd";
/// Longer than any scan plus mount; the daemon reports failures at once.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Args)]
pub struct MountArgs {
    #[command(flatten)]
    driver: DriverArgs,

    #[command(flatten)]
    serve: ServeArgs,

    /// Stay in the foreground and log to stderr (for systemd and containers)
    #[arg(long, help_heading = "Daemon")]
    foreground: bool,

    /// Take MOUNTPOINT over from the nvlibfs daemon serving it with the same
    /// --state-dir, wherever it runs (another container, another pod), or
    /// mount it if none does: the connection and the state are handed over
    /// and restored exactly (or refused, and the running daemon serves on),
    /// and the old daemon stops without unmounting (in the foreground: once
    /// it is stopped); no request fails. How a DaemonSet's rolling update
    /// or a replaced container upgrades nvlibfs
    #[arg(long, help_heading = "Daemon")]
    take_over: bool,

    /// Where the background daemon logs, from the moment the mount is ready
    /// (until then it reports to this command) [default: STATE_DIR/<mount
    /// point>.log]
    #[arg(long, value_name = "FILE", conflicts_with = "foreground", help_heading = "Daemon")]
    log_file: Option<PathBuf>,

    /// Where to mount the view (e.g. /run/nvlibs); created if missing. It
    /// must be empty: nvlibfs mounts a small tmpfs of its own there
    mountpoint: PathBuf,
}

#[derive(Args)]
pub struct UmountArgs {
    /// Detach now even if processes still use the mount; it goes away when the last one is done
    #[arg(long)]
    lazy: bool,

    /// Where the daemon keeps its control socket: the --state-dir given to
    /// `nvlibfs mount` (used to wait for the daemon to exit)
    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// The mount point given to `nvlibfs mount` (e.g. /run/nvlibs); not its
    /// .live directory nor anything else inside it
    mountpoint: PathBuf,
}

#[derive(Args)]
pub struct StatusArgs {
    /// How to print it
    #[arg(long, value_enum, default_value_t = StatusFormat::Text)]
    format: StatusFormat,

    /// Same as --format json
    #[arg(long, conflicts_with = "format")]
    json: bool,

    /// Fail (exit 1) unless the daemon serving it runs in this process's
    /// PID namespace: a container's readiness probe, ready once its own
    /// daemon serves (after a --take-over), not while another pod's does
    #[arg(long)]
    here: bool,

    /// Where the daemon keeps its control socket: the --state-dir given to
    /// `nvlibfs mount`
    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// The mount point given to `nvlibfs mount` (e.g. /run/nvlibs)
    mountpoint: PathBuf,
}

#[derive(Args)]
pub struct RestartArgs {
    /// Where the daemon keeps its control socket: the --state-dir given to
    /// `nvlibfs mount`
    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// The mount point given to `nvlibfs mount` (e.g. /run/nvlibs)
    mountpoint: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    /// For people
    Text,
    /// One JSON object (fields of nvlibfs::control::Status)
    Json,
    /// Prometheus text exposition format, for a node exporter's textfile
    /// collector or a scrape wrapper
    Prometheus,
}

#[derive(Args)]
pub struct DockerFlagsArgs {
    /// Where the view is mounted where `docker run` runs [default:
    /// /run/nvlibs, which must then be served here]
    #[arg(long, value_name = "DIR")]
    mountpoint: Option<PathBuf>,

    /// Where containers see it: /usr/local/nvidia is what CUDA images expect
    #[arg(long, value_name = "DIR", default_value = "/usr/local/nvidia")]
    target: PathBuf,
}

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn daemon_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name(DAEMON);
    if beside.exists() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(DAEMON))
        .find(|p| p.exists())
        .ok_or_else(|| format!("{DAEMON} is not installed beside {} nor on PATH", exe.display()).into())
}

/// Whether this process may mount file systems: CAP_SYS_ADMIN in its
/// effective set (root has it). Where /proc cannot say, assume so and let
/// the daemon report what the kernel says.
fn may_mount() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

pub fn mount(args: MountArgs, verbose: u8) -> Result<()> {
    // Before anything is created (mount point, state directory, log): a
    // mount that cannot happen leaves nothing behind.
    if !may_mount() {
        return Err(format!(
            "mounting needs root (or CAP_SYS_ADMIN): run it as root, e.g. sudo {}",
            command_line(std::env::args_os().skip(1))
        )
        .into());
    }
    let daemon = daemon_binary()?;
    let mut daemon_args: Vec<OsString> = args.driver.to_args();
    daemon_args.extend(args.serve.to_args());
    if verbose > 0 {
        daemon_args.push(format!("-{}", "v".repeat(verbose as usize)).into());
    }
    if args.take_over {
        daemon_args.push("--take-over".into());
    }
    if args.foreground {
        daemon_args.push(args.mountpoint.into());
        // Become the daemon, so supervisors see and signal it directly.
        let e = Command::new(&daemon).args(&daemon_args).exec();
        return Err(format!("starting {}: {e}", daemon.display()).into());
    }

    let mountpoint = absolute(&args.mountpoint)?;
    // The daemon opens its log itself, once it holds the mount point's lock
    // and the mount is ready: a refused or failed mount leaves no log file,
    // and never writes into a running daemon's. Until then it reports over
    // the ready pipe, which is what the user sees.
    let log = match args.log_file {
        Some(file) => std::path::absolute(&file).map_err(|e| format!("--log-file {}: {e}", file.display()))?,
        None => control::log_path(&std::path::absolute(&args.serve.state_dir)?, &mountpoint),
    };

    let (read_end, write_end) = pipe()?;
    let write_fd = write_end.as_raw_fd();
    daemon_args.extend([
        "--log-file".into(),
        log.clone().into(),
        "--ready-fd".into(),
        write_fd.to_string().into(),
        mountpoint.clone().into(),
    ]);
    let mut cmd = Command::new(&daemon);
    // Nothing of this terminal: the daemon outlives it, and logs to its file.
    cmd.args(&daemon_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own: the daemon outlives this terminal.
            nix::unistd::setsid()?;
            // Keep the readiness pipe open across exec.
            let pipe = std::os::fd::BorrowedFd::borrow_raw(write_fd);
            nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting {}: {e}", daemon.display()))?;
    drop(write_end);

    let answer = read_answer(read_end)?;
    match answer.trim() {
        "ready" => {
            let status = control::query(&args.serve.state_dir, &mountpoint)?;
            println!(
                "nvlibfs: serving NVIDIA driver {} at {} ({} files, {}, {}; {}, log {})",
                status.driver_version,
                mountpoint.display(),
                status.files,
                human(status.bytes),
                status.data_path,
                status.pids(),
                log.display()
            );
            if let Some(reason) = status.fallback_reason {
                println!("nvlibfs: not using passthrough: {reason}");
            }
            Ok(())
        }
        other => {
            let exit = child.wait();
            let why = other.strip_prefix("error: ").unwrap_or(other);
            if why.is_empty() {
                let exit = exit.map_or_else(|e| e.to_string(), |status| status.to_string());
                Err(format!(
                    "the daemon exited before the mount was ready without saying why ({exit}); run the same \
                     command with --foreground to see its output"
                )
                .into())
            } else {
                Err(why.to_owned().into())
            }
        }
    }
}

/// Reads the daemon's one-line answer; EOF (it died) reads as empty.
fn read_answer(read_end: OwnedFd) -> Result<String> {
    let mut pipe = std::fs::File::from(read_end);
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut answer = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let ready = match poll(&mut [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)], timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if ready == 0 {
            return Err(format!("the daemon was not ready within {} s", READY_TIMEOUT.as_secs()).into());
        }
        match pipe.read(&mut buf) {
            Ok(0) => return Ok(answer),
            Ok(n) => {
                answer.push_str(&String::from_utf8_lossy(&buf[..n]));
                if answer.ends_with('\n') {
                    return Ok(answer);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    // The daemon creates missing mount points; name them as it will.
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(_) => Ok(std::path::absolute(path)?),
    }
}

pub fn umount(args: UmountArgs) -> Result<()> {
    let mountpoint = std::fs::canonicalize(&args.mountpoint)
        // A dead FUSE mount (its daemon killed) cannot be resolved; name it
        // as given, so the checks below still recognise it.
        .or_else(|_| std::path::absolute(&args.mountpoint))
        .map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    let mounts = mountinfo::read().map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let fuse = nvlibfs_mount_point(&mounts, &mountpoint).map_err(|what| match what {
        NotOurs::Inside { top, what } => {
            let mut words: Vec<OsString> = vec!["umount".into()];
            if args.state_dir != Path::new(control::DEFAULT_STATE_DIR) {
                words.extend(["--state-dir".into(), args.state_dir.clone().into()]);
            }
            words.push(top.into());
            let resolved = if mountpoint != args.mountpoint {
                format!(" (that is, {})", mountpoint.display())
            } else {
                String::new()
            };
            format!(
                "{}{resolved} is {what}: pass the mount point itself: {}",
                args.mountpoint.display(),
                command_line(words)
            )
        }
        NotOurs::Other(message) => message,
    })?;
    // A pid is this namespace's only where the daemon runs in it (not in
    // a container or pod); elsewhere it would name another process.
    let daemon = control::query(&args.state_dir, &mountpoint)
        .ok()
        .filter(|s| s.pid_namespace == control::own_pid_namespace())
        .map(|s| s.pid);
    let lazy = if args.lazy {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    if let Some(live) = &fuse {
        unmount(live, lazy).map_err(|e| explain(&mountpoint, e))?;
    }
    // The daemon exits once the kernel ends the session; wait briefly so a
    // mount right after this one does not meet the old daemon.
    if let Some(pid) = daemon {
        let deadline = Instant::now() + Duration::from_secs(10);
        while control::process_running(pid) && Instant::now() < deadline && !args.lazy {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    unmount(&mountpoint, lazy).map_err(|e| explain(&mountpoint, e))?;
    remove_unheld_lock(&args.state_dir, &mountpoint);
    println!("nvlibfs: unmounted {}", mountpoint.display());
    Ok(())
}

/// The lock file of a daemon that did not end by itself (killed): removed
/// where nobody holds it. A daemon that opened it just now finds, once it
/// holds it, that the path names another file, and takes the lock again.
fn remove_unheld_lock(state_dir: &Path, mountpoint: &Path) {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    let path = control::lock_path(state_dir, mountpoint);
    let opened = (std::fs::OpenOptions::new().read(true).write(true))
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    let Ok(file) = opened else {
        return;
    };
    if let Ok(_unheld) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        let _ = std::fs::remove_file(&path);
    }
}

/// Why `nvlibfs umount` leaves a path alone.
enum NotOurs {
    /// The path is in the nvlibfs mount point `top`: `what` it is there.
    Inside {
        top: PathBuf,
        what: String,
    },
    Other(String),
}

/// Checks that `path` is a mount point `nvlibfs mount` set up, and nothing
/// else: returns its FUSE mount at `.live` if one is there (none after the
/// daemon was stopped), or says what the path is instead.
fn nvlibfs_mount_point(mounts: &[MountEntry], path: &Path) -> std::result::Result<Option<PathBuf>, NotOurs> {
    // Inside one (its .live, a link into the view, ...): name the one to pass.
    if let Some(top) = path.ancestors().skip(1).find(|a| is_nvlibfs_top(mounts, a)) {
        let what = if path == top.join(control::LIVE_DIR) {
            format!(
                "the FUSE mount inside the nvlibfs mount point {}; unmounting it alone would leave that \
                 mount point's links dangling",
                top.display()
            )
        } else {
            format!("inside the nvlibfs mount point {}", top.display())
        };
        return Err(NotOurs::Inside {
            top: top.to_owned(),
            what,
        });
    }
    match mount_at(mounts, path) {
        None => Err(NotOurs::Other(format!("{} is not a mount point", path.display()))),
        Some(_) if is_nvlibfs_top(mounts, path) => {
            let live = path.join(control::LIVE_DIR);
            match mount_at(mounts, &live) {
                None => Ok(None),
                Some(m) if is_nvlibfs_fuse(m) => Ok(Some(live)),
                Some(m) => Err(NotOurs::Other(format!(
                    "{} holds a {} mount from {} that nvlibfs did not make; leaving both alone",
                    live.display(),
                    m.fs_type,
                    m.source
                ))),
            }
        }
        Some(m) => Err(NotOurs::Other(format!(
            "{} is not an nvlibfs mount point (a {} mount from {} is there); `nvlibfs umount` only \
             removes what `nvlibfs mount` set up: use umount(8) for anything else",
            path.display(),
            m.fs_type,
            m.source
        ))),
    }
}

fn unmount(path: &Path, flags: nix::mount::MntFlags) -> std::io::Result<()> {
    Ok(nix::mount::umount2(path, flags)?)
}

fn explain(mountpoint: &Path, e: std::io::Error) -> Box<dyn Error> {
    match e.raw_os_error() {
        Some(libc::EINVAL) => format!("{} is not a mount point", mountpoint.display()),
        Some(libc::EBUSY) => format!(
            "{} is in use ({e}); stop the processes using it, or `nvlibfs umount --lazy` to detach it now",
            mountpoint.display()
        ),
        Some(libc::EPERM) => format!(
            "unmounting {} is not permitted ({e}); run as root",
            mountpoint.display()
        ),
        _ => format!("unmounting {}: {e}", mountpoint.display()),
    }
    .into()
}

/// How long a new server may take to restore and take over.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

pub fn restart(args: RestartArgs) -> Result<()> {
    // The supervisor is root's: only root may signal it (or ask it).
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "restarting needs root: it signals the daemon's supervisor, which runs as root; run it as root, e.g. \
             sudo {}",
            command_line(std::env::args_os().skip(1))
        )
        .into());
    }
    let mountpoint =
        std::fs::canonicalize(&args.mountpoint).map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    let before = control::query(&args.state_dir, &mountpoint)?;
    if before.pid_namespace != control::own_pid_namespace() {
        return Err(format!(
            "the daemon serving {} runs in another PID namespace (a container or a pod): its pids are not this \
             namespace's, and a signal sent from here would reach another process; run `nvlibfs restart` in its \
             container, or start the new daemon with `nvlibfs mount --take-over` (a DaemonSet's rolling update \
             does)",
            mountpoint.display()
        )
        .into());
    }
    let supervisor = before.supervisor_pid.ok_or_else(|| {
        format!(
            "the daemon serving {} (pid {}) has no supervisor to hand over with; `nvlibfs umount` and \
             `nvlibfs mount` it instead",
            mountpoint.display(),
            before.pid
        )
    })?;
    // Handovers recorded from now on answer this restart.
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        - 0.001;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .map_err(|e| format!("asking the supervisor (pid {supervisor}) to restart: {e}"))?;
    let deadline = Instant::now() + RESTART_TIMEOUT;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = control::query(&args.state_dir, &mountpoint).ok();
        let answer = now
            .as_ref()
            .and_then(|s| s.handovers.iter().find(|h| h.old_pid == before.pid && h.at >= asked));
        match answer {
            Some(h) if h.reason == "restart" && h.refused.is_none() => {
                println!(
                    "nvlibfs: {} is now served by pid {} (nvlibfs {}), was pid {} (nvlibfs {}); no request waited: \
                     the old server answered until the new one did",
                    mountpoint.display(),
                    h.new_pid,
                    h.new_version,
                    before.pid,
                    before.version,
                );
                return Ok(());
            }
            Some(h) if h.reason == "restart" => {
                return Err(format!(
                    "the restart did not happen: {}; pid {} (nvlibfs {}) goes on serving {}",
                    h.refused.as_deref().unwrap_or_default(),
                    before.pid,
                    before.version,
                    mountpoint.display()
                )
                .into())
            }
            Some(h) => {
                return Err(format!(
                    "the server (pid {}) died during the restart; pid {} (nvlibfs {}) took over from its last \
                     checkpoint with the binary it ran; run `nvlibfs restart` again",
                    before.pid, h.new_pid, h.new_version
                )
                .into())
            }
            None => {}
        }
        if !control::process_running(supervisor) {
            let serving = now.map_or("nothing answers".to_owned(), |s| {
                format!("pid {} serves on without a supervisor", s.pid)
            });
            return Err(format!(
                "the supervisor (pid {supervisor}) ended during the restart; {serving}: a crash of this server \
                 now ends the mount (its log says why the supervisor ended; `nvlibfs umount` and `nvlibfs mount` \
                 start a supervised daemon again)"
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no new server took over within {} s; pid {} goes on serving (its log says why)",
                RESTART_TIMEOUT.as_secs(),
                now.map_or(before.pid, |s| s.pid)
            )
            .into());
        }
    }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let mountpoint =
        std::fs::canonicalize(&args.mountpoint).map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    let status = control::query(&args.state_dir, &mountpoint)?;
    if args.here && status.pid_namespace != control::own_pid_namespace() {
        return Err(format!(
            "{} is served by a daemon of another PID namespace (another container or pod: server pid {} there)",
            mountpoint.display(),
            status.pid
        )
        .into());
    }
    match if args.json { StatusFormat::Json } else { args.format } {
        StatusFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        StatusFormat::Prometheus => print!("{}", prometheus(&status)),
        StatusFormat::Text => print_status(&status),
    }
    Ok(())
}

/// The status as Prometheus metrics, labelled by mount point.
fn prometheus(s: &Status) -> String {
    let mp = escape_label(&s.mountpoint.to_string_lossy());
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        out.push_str(&format!("# HELP nvlibfs_{name} {help}\n# TYPE nvlibfs_{name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("nvlibfs_{name}{{mountpoint=\"{mp}\"{labels}}} {value}\n"));
        }
    };
    let info = format!(
        ",driver_version=\"{}\",data_path=\"{}\"",
        escape_label(&s.driver_version),
        escape_label(&s.data_path)
    );
    metric(
        "info",
        "gauge",
        "The pinned driver version and data path (always 1).",
        &[(info, 1.0)],
    );
    metric(
        "up",
        "gauge",
        "1 when the view holds the loaded module's driver.",
        &[(String::new(), f64::from(u8::from(s.pin_problem.is_none())))],
    );
    metric(
        "generation",
        "gauge",
        "Generation of the served view; each re-pin adds one.",
        &[(String::new(), s.generation as f64)],
    );
    metric(
        "retired_generations",
        "gauge",
        "Earlier generations still held for open files.",
        &[(String::new(), s.retired_generations as f64)],
    );
    metric(
        "files",
        "gauge",
        "Files in the view.",
        &[(String::new(), s.files as f64)],
    );
    metric(
        "bytes",
        "gauge",
        "Bytes of file data in the view.",
        &[(String::new(), s.bytes as f64)],
    );
    metric(
        "held_files_replaced_on_disk",
        "gauge",
        "Served files replaced or removed on disk since they were pinned.",
        &[(String::new(), s.held_files_replaced_on_disk as f64)],
    );
    let c = &s.counters;
    let ops = [
        ("lookup", c.lookups),
        ("getattr", c.getattrs),
        ("readlink", c.readlinks),
        ("open", c.opens),
        ("readdir", c.readdirs),
        ("read", c.reads),
        ("refused_write", c.write_attempts),
    ];
    let samples: Vec<(String, f64)> = ops.iter().map(|(op, n)| (format!(",op=\"{op}\""), *n as f64)).collect();
    metric(
        "requests_total",
        "counter",
        "FUSE requests answered, by operation.",
        &samples,
    );
    metric(
        "read_bytes_total",
        "counter",
        "Bytes served through READ (0 with passthrough).",
        &[(String::new(), c.bytes_read as f64)],
    );
    metric(
        "warmed_bytes_total",
        "counter",
        "Bytes put into the kernel's page cache ahead of READs (--warm).",
        &[(String::new(), c.warmed_bytes as f64)],
    );
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        &[(String::new(), s.uptime_s)],
    );
    if let Some(rss) = s.rss_bytes {
        metric(
            "resident_memory_bytes",
            "gauge",
            "Daemon resident set size.",
            &[(String::new(), rss as f64)],
        );
    }
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn print_status(s: &Status) {
    let c = &s.counters;
    println!(
        "Mount point  {} ({}, nvlibfs {}, server up {})",
        s.mountpoint.display(),
        s.pids(),
        s.version,
        uptime(s.uptime_s)
    );
    println!(
        "Driver       {} (pinned from {}), driver root {}",
        s.driver_version,
        s.version_source,
        s.driver_root.display()
    );
    match &s.fallback_reason {
        None => println!("Data path    {}", s.data_path),
        Some(why) => println!("Data path    {} ({why})", s.data_path),
    }
    println!(
        "View         generation {}: {} files, {}, {} symlinks{}",
        s.generation,
        s.files,
        human(s.bytes),
        s.symlinks,
        match s.retired_generations {
            0 => String::new(),
            n => format!(" ({n} earlier generation(s) still held for open files)"),
        }
    );
    if s.held_files_replaced_on_disk > 0 {
        println!(
            "On disk      {} served file(s) were replaced or removed on disk since they were pinned (a driver \
             upgrade?); the pinned copies are held and still served until the module changes",
            s.held_files_replaced_on_disk
        );
    }
    if let Some(problem) = &s.pin_problem {
        println!("Problem      {problem}");
    }
    if let Some(frozen) = s.frozen_s {
        println!(
            "Frozen       re-pins held for a restart or takeover for {} (the supervisor thaws it if the step \
             fails; a freeze that lasts says that step is stuck)",
            uptime(frozen)
        );
    }
    let (done, refused): (Vec<_>, Vec<_>) = s.handovers.iter().partition(|h| h.refused.is_none());
    println!(
        "Requests     {} lookups, {} getattrs, {} readlinks, {} opens, {} readdirs, {} reads ({}), {} refused writes{}",
        c.lookups,
        c.getattrs,
        c.readlinks,
        c.opens,
        c.readdirs,
        c.reads,
        human(c.bytes_read),
        c.write_attempts,
        // Each server counts its own.
        if done.is_empty() {
            ""
        } else {
            ", since the last handover"
        }
    );
    if c.warmed_bytes > 0 {
        println!("Warmed       {} into the kernel's page cache", human(c.warmed_bytes));
    }
    if let Some(rss) = s.rss_bytes {
        println!("Daemon RSS   {}", human(rss));
    }
    if let Some(last) = done.last() {
        let worst = done.iter().map(|h| h.waited_ms).fold(0.0, f64::max);
        println!(
            "Handovers    {} (requests waited at most {worst:.1} ms); last: {} of pid {} to pid {} (nvlibfs {})",
            done.len(),
            last.reason,
            last.old_pid,
            last.new_pid,
            last.new_version,
        );
    }
    if let Some(last) = refused.last() {
        println!(
            "Refused      {} restart(s); last: {}",
            refused.len(),
            last.refused.as_deref().unwrap_or_default()
        );
    }
}

/// Whether a daemon serves the nvlibfs mount point `path` in this mount
/// namespace.
fn served_here(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    mountinfo::read().is_ok_and(|mounts| mountinfo::is_served(&mounts, &path))
}

fn uptime(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

pub fn docker_flags(args: DockerFlagsArgs) -> Result<()> {
    let mountpoint = match &args.mountpoint {
        Some(given) => {
            // Maybe served where docker runs (an outer container), not here.
            if !served_here(given) {
                eprintln!(
                    "nvlibfs: note: nvlibfs serves nothing at {} in this mount namespace; these flags are for \
                     a docker that sees the view there (an outer container's, say)",
                    given.display()
                );
            }
            given.clone()
        }
        None => {
            let default = PathBuf::from(control::DEFAULT_MOUNTPOINT);
            if !served_here(&default) {
                return Err(format!(
                    "nothing is served at {} (the default --mountpoint): {}; for a view mounted where \
                     this machine does not see it, pass --mountpoint DIR",
                    default.display(),
                    control::unserved_advice(&default)
                )
                .into());
            }
            default
        }
    };
    let nodes = nvlibfs::devices::nvidia_device_nodes(Path::new("/dev"));
    if nodes.is_empty() {
        eprintln!(
            "nvlibfs: no /dev/nvidia* device node on this machine: these flags give the container the driver's \
             files but no GPU (on a GPU host, load the nvidia module; in a container, pass its /dev/nvidia* in)"
        );
    }
    for node in nodes {
        println!("--device={}", node.display());
    }
    let t = args.target.display();
    // rslave: a wholly new daemon's mount (its supervisor gone too) reaches
    // running containers; a restarted serving process needs nothing.
    println!("--volume={}:{t}:ro,rslave", mountpoint.display());
    // Searched before the image's ld.so.cache and default directories.
    println!("--env=LD_LIBRARY_PATH={t}/lib64:{t}/lib");
    println!("--env=PATH={t}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    Ok(())
}
