//! The daemon's life: check everything that can be checked before mounting,
//! mount, choose the data path, say "ready" only once the mount answers,
//! serve `status`, and unmount cleanly on SIGTERM/SIGINT.

use crate::fs::NvlibFs;
use crate::layout;
use crate::served::Served;
use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs::control;
use std::fmt;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

/// How long a stopping daemon waits for a detached mount's session to end.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug)]
pub struct DaemonError(String);

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DaemonError {}

fn fail<T>(msg: impl Into<String>) -> Result<T, DaemonError> {
    Err(DaemonError(msg.into()))
}

/// Where the daemon reports "ready" or why it failed, for `nvlibfs mount`
/// waiting on the other end of a pipe.
pub struct Readiness(Option<std::fs::File>);

impl Readiness {
    /// # Safety
    /// `fd` must be an open descriptor this process owns (inherited for us).
    pub unsafe fn from_fd(fd: Option<i32>) -> Readiness {
        Readiness(fd.map(|fd| std::fs::File::from(OwnedFd::from_raw_fd(fd))))
    }

    fn send(&mut self, line: &str) {
        if let Some(mut pipe) = self.0.take() {
            // The waiting side may be gone; the log has the message too.
            let _ = writeln!(pipe, "{line}");
        }
    }
}

pub fn run(
    driver: &DriverArgs,
    serve: &ServeArgs,
    mountpoint: &Path,
    ready: &mut Readiness,
) -> Result<(), DaemonError> {
    match serve_until_stopped(driver, serve, mountpoint, ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            ready.send(&format!("error: {e}"));
            Err(e)
        }
    }
}

fn serve_until_stopped(
    driver: &DriverArgs,
    serve: &ServeArgs,
    mountpoint: &Path,
    ready: &mut Readiness,
) -> Result<(), DaemonError> {
    raise_file_limit();
    let plan = driver.plan().map_err(|e| DaemonError(e.to_string()))?;
    let manifest = plan.view.manifest();
    if !plan.view.has_driver_libraries() {
        return fail(format!(
            "no driver found: no NVIDIA library of version {} under {} ({} candidates rejected; \
             `nvlibfs scan` lists them with reasons)",
            manifest.driver_version,
            manifest.driver_root,
            plan.rejected.len()
        ));
    }
    tracing::info!(
        version = %manifest.driver_version,
        files = manifest.files.len(),
        rejected = plan.rejected.len(),
        "view built in {:.1} ms",
        plan.elapsed.as_secs_f64() * 1e3
    );

    let mountpoint = layout::mount_point(mountpoint).map_err(DaemonError)?;
    if !Path::new("/dev/fuse").exists() {
        return fail("no /dev/fuse: load the fuse module (`modprobe fuse`) or pass the device into this container");
    }
    // First, so a live daemon here is reported as such, not as a busy mount point.
    let socket = control::socket_path(&serve.state_dir, &mountpoint);
    let listener = bind_control_socket(&serve.state_dir, &socket, &mountpoint)?;
    let live = layout::prepare(&mountpoint).map_err(|e| {
        let _ = std::fs::remove_file(&socket);
        DaemonError(e)
    })?;

    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only the main thread's sigwait sees them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| DaemonError(format!("blocking signals: {e}")))?;

    let served = Arc::new(Served::new(plan.view, mountpoint.clone(), !serve.no_passthrough));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::DefaultPermissions,
        MountOption::FSName("nvlibfs".into()),
        MountOption::Subtype("nvlibfs".into()),
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(serve.threads.into());
    config.clone_fd = true;
    let mut session = fuser::Session::new(NvlibFs::new(served.clone()), &live, &config).map_err(|e| {
        let _ = std::fs::remove_file(&socket);
        DaemonError(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                format!(
                    "mounting {} is not permitted: {e} (run as root, or with CAP_SYS_ADMIN)",
                    mountpoint.display()
                )
            }
            _ => format!("mounting {}: {e}", mountpoint.display()),
        })
    })?;
    served.start(&session);
    // Mounted and every file held: from here on, only what is still used.
    match crate::privileges::drop_to_kept() {
        Ok(()) => {
            let kept: Vec<&str> = crate::privileges::KEPT.iter().map(|(_, why)| *why).collect();
            tracing::info!(
                "dropped all other capabilities and set no_new_privs; keeping {}",
                kept.join(", ")
            );
        }
        Err(e) => tracing::warn!("could not drop capabilities ({e}); continuing with what we have"),
    }
    let notifier = session.notifier();
    let mut unmounter = session.unmount_callable();
    let main_thread = nix::unistd::Pid::this();
    let loop_thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let result = session.run();
            // Wake the main thread: the mount is gone (unmounted from outside).
            let _ = nix::sys::signal::kill(main_thread, Signal::SIGUSR1);
            result
        })
        .map_err(|e| DaemonError(format!("starting the session thread: {e}")))?;
    let status_served = served.clone();
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || answer_status(listener, &status_served))
        .map_err(|e| DaemonError(format!("starting the status thread: {e}")))?;

    let stop_watching = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (driver, served, stop) = (driver.clone(), served.clone(), stop_watching.clone());
        std::thread::Builder::new()
            .name("repin".into())
            .spawn(move || crate::repin::watch(driver, served, notifier, stop))
            .map_err(|e| DaemonError(format!("starting the module watcher: {e}")))?;
    }

    wait_until_answering(&live)?;
    let status = served.status();
    tracing::info!(
        mountpoint = %mountpoint.display(),
        version = %status.driver_version,
        data_path = %status.data_path,
        "ready: serving {} files ({} bytes)",
        status.files,
        status.bytes
    );
    ready.send("ready");
    notify_systemd(&format!(
        "READY=1\nSTATUS=serving NVIDIA driver {} at {}",
        status.driver_version,
        mountpoint.display()
    ));

    let signal = signals
        .wait()
        .map_err(|e| DaemonError(format!("waiting for signals: {e}")))?;
    if signal == Signal::SIGUSR1 {
        tracing::info!("{} was unmounted; exiting", mountpoint.display());
    } else {
        notify_systemd("STOPPING=1");
        tracing::info!("{signal}: unmounting {}", mountpoint.display());
        if let Err(e) = unmounter.unmount() {
            // Still in use: detach now; the kernel ends the session when the
            // last user is gone, and until then we keep answering.
            tracing::warn!("unmount failed ({e}); detaching lazily and serving until the last user closes it");
            if let Err(e) = nix::mount::umount2(&live, nix::mount::MntFlags::MNT_DETACH) {
                tracing::error!("lazy unmount of {} failed: {e}", live.display());
            }
        }
    }
    stop_watching.store(true, std::sync::atomic::Ordering::Relaxed);
    // A detached mount ends only when its last user lets go, which can take
    // a while under load. Nothing needs us for that: the mount is gone from
    // every namespace, and files opened by passthrough keep their mappings
    // when the connection closes. So a restart (an upgrade of nvlibfs) is
    // not held up by it.
    let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
    while !loop_thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&socket);
    if !loop_thread.is_finished() {
        tracing::info!("exiting with the detached mount still in use; its users keep their open files");
        return Ok(());
    }
    let result = loop_thread.join();
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => fail(format!("FUSE session ended with an error: {e}")),
        Err(_) => fail("the FUSE session thread panicked"),
    }
}

fn bind_control_socket(state_dir: &Path, socket: &Path, mountpoint: &Path) -> Result<UnixListener, DaemonError> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| DaemonError(format!("creating state directory {}: {e}", state_dir.display())))?;
    if socket.exists() {
        if let Ok(status) = control::query(state_dir, mountpoint) {
            return fail(format!(
                "{} is already served by nvlibfs (pid {}); `nvlibfs umount {}` first",
                mountpoint.display(),
                status.pid,
                mountpoint.display()
            ));
        }
        // Left behind by a daemon that died.
        let _ = std::fs::remove_file(socket);
    }
    let listener =
        UnixListener::bind(socket).map_err(|e| DaemonError(format!("control socket {}: {e}", socket.display())))?;
    // Status names host paths: root only.
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}

fn answer_status(listener: UnixListener, served: &Served) {
    for stream in listener.incoming() {
        match stream {
            Ok(mut stream) => {
                let status = served.status();
                match serde_json::to_vec(&status) {
                    Ok(bytes) => {
                        if let Err(e) = stream.write_all(&bytes) {
                            tracing::debug!("status client went away: {e}");
                        }
                    }
                    Err(e) => tracing::error!("encoding status: {e}"),
                }
            }
            Err(e) => tracing::warn!("status socket: {e}"),
        }
    }
}

/// Every served file is held open (two generations' worth during a
/// re-pin): take the hard limit rather than the usual 1024 soft one.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Tells systemd (a `Type=notify` unit) how we are doing, if it asked.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!("telling systemd {state:?} failed: {e}");
    }
}

/// Polls the mount point from this process until the kernel shows our FUSE
/// mount there and it answers a request.
fn wait_until_answering(mountpoint: &Path) -> Result<(), DaemonError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(fs) = nix::sys::statfs::statfs(mountpoint) {
            if fs.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC && std::fs::read_dir(mountpoint).is_ok() {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return fail(format!(
                "{} did not answer within 30 s of mounting",
                mountpoint.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
