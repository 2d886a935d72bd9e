//! `nvlibfs mount`, `umount` and `status`: the CLI side of the daemon.
//! The daemon itself is the `nvlibfs-mountd` binary installed beside this
//! one; `mount` starts it and waits until the mount answers.

use crate::human;
use clap::Args;
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs::control::{self, Status};
use std::error::Error;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

    /// Where the background daemon logs [default: STATE_DIR/<mount point>.log]
    #[arg(long, value_name = "FILE", conflicts_with = "foreground", help_heading = "Daemon")]
    log_file: Option<PathBuf>,

    /// Where to mount the view; created if missing
    mountpoint: PathBuf,
}

#[derive(Args)]
pub struct UmountArgs {
    /// Detach now even if processes still use the mount; it goes away when the last one is done
    #[arg(long)]
    lazy: bool,

    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

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

    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

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
    /// Where the view is mounted where `docker run` runs
    #[arg(long, value_name = "DIR", default_value = "/run/nvlibs")]
    mountpoint: PathBuf,

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

pub fn mount(args: MountArgs, verbose: u8) -> Result<()> {
    let daemon = daemon_binary()?;
    let mut daemon_args: Vec<OsString> = args.driver.to_args();
    daemon_args.extend(args.serve.to_args());
    if verbose > 0 {
        daemon_args.push(format!("-{}", "v".repeat(verbose as usize)).into());
    }
    if args.foreground {
        daemon_args.push(args.mountpoint.into());
        // Become the daemon, so supervisors see and signal it directly.
        let e = Command::new(&daemon).args(&daemon_args).exec();
        return Err(format!("starting {}: {e}", daemon.display()).into());
    }

    let mountpoint = absolute(&args.mountpoint)?;
    let log = args
        .log_file
        .unwrap_or_else(|| control::socket_path(&args.serve.state_dir, &mountpoint).with_extension("log"));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("log file {}: {e}", log.display()))?;

    let (read_end, write_end) = pipe()?;
    let write_fd = write_end.as_raw_fd();
    daemon_args.extend([
        "--ready-fd".into(),
        write_fd.to_string().into(),
        mountpoint.clone().into(),
    ]);
    let mut cmd = Command::new(&daemon);
    cmd.args(&daemon_args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own: the daemon outlives this terminal.
            libc::setsid();
            // Keep the readiness pipe open across exec.
            if libc::fcntl(write_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
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
                "nvlibfs: serving NVIDIA driver {} at {} ({} files, {}, {}; daemon pid {}, log {})",
                status.driver_version,
                mountpoint.display(),
                status.files,
                human(status.bytes),
                status.data_path,
                status.pid,
                log.display()
            );
            if let Some(reason) = status.fallback_reason {
                println!("nvlibfs: not using passthrough: {reason}");
            }
            Ok(())
        }
        other => {
            let _ = child.wait();
            let why = other.strip_prefix("error: ").unwrap_or(other);
            if why.is_empty() {
                Err(format!("the daemon exited before the mount was ready; see {}", log.display()).into())
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
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
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
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fresh descriptors from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn absolute(path: &Path) -> Result<PathBuf> {
    // The daemon creates missing mount points; name them as it will.
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(_) => Ok(std::path::absolute(path)?),
    }
}

pub fn umount(args: UmountArgs) -> Result<()> {
    let mountpoint =
        std::fs::canonicalize(&args.mountpoint).map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    let daemon = control::query(&args.state_dir, &mountpoint).ok().map(|s| s.pid);
    // nvlibfs's own mount points hold the FUSE mount one level below.
    let ours = mountpoint.join(control::MARKER).exists();
    let fuse = if ours {
        mountpoint.join(control::LIVE_DIR)
    } else {
        mountpoint.clone()
    };
    let lazy = if args.lazy { libc::MNT_DETACH } else { 0 };
    if !ours || is_mounted(&fuse) {
        unmount(&fuse, lazy).map_err(|e| explain(&mountpoint, e))?;
    }
    // The daemon exits once the kernel ends the session; wait briefly so a
    // mount right after this one does not meet the old daemon.
    if let Some(pid) = daemon {
        let deadline = Instant::now() + Duration::from_secs(10);
        while control::process_running(pid) && Instant::now() < deadline && !args.lazy {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if ours {
        unmount(&mountpoint, lazy).map_err(|e| explain(&mountpoint, e))?;
    }
    println!("nvlibfs: unmounted {}", mountpoint.display());
    Ok(())
}

fn unmount(path: &Path, flags: i32) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path and flags.
    if unsafe { libc::umount2(c.as_ptr(), flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let path = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path.as_ref()))
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

pub fn status(args: StatusArgs) -> Result<()> {
    let mountpoint =
        std::fs::canonicalize(&args.mountpoint).map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    let status = control::query(&args.state_dir, &mountpoint)?;
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
        "Mount point  {} (daemon pid {}, up {})",
        s.mountpoint.display(),
        s.pid,
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
    println!(
        "Requests     {} lookups, {} getattrs, {} readlinks, {} opens, {} readdirs, {} reads ({}), {} refused writes",
        c.lookups,
        c.getattrs,
        c.readlinks,
        c.opens,
        c.readdirs,
        c.reads,
        human(c.bytes_read),
        c.write_attempts
    );
    if let Some(rss) = s.rss_bytes {
        println!("Daemon RSS   {}", human(rss));
    }
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
    for node in nvlibfs::devices::nvidia_device_nodes(Path::new("/dev")) {
        println!("--device={}", node.display());
    }
    let t = args.target.display();
    // rslave: a restarted daemon's new mount reaches running containers.
    println!("--volume={}:{t}:ro,rslave", args.mountpoint.display());
    // Searched before the image's ld.so.cache and default directories.
    println!("--env=LD_LIBRARY_PATH={t}/lib64:{t}/lib");
    println!("--env=PATH={t}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    Ok(())
}
