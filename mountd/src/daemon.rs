//! The daemon's life: check everything that can be checked before mounting,
//! mount, choose the data path, say "ready" only once the mount answers,
//! serve `status`, and unmount cleanly on SIGTERM/SIGINT.

use crate::fs::NvlibFs;
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
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

    let mountpoint = prepare_mountpoint(mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return fail("no /dev/fuse: load the fuse module (`modprobe fuse`) or pass the device into this container");
    }
    let socket = control::socket_path(&serve.state_dir, &mountpoint);
    let listener = bind_control_socket(&serve.state_dir, &socket, &mountpoint)?;

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
    let mut session = fuser::Session::new(NvlibFs::new(served.clone()), &mountpoint, &config).map_err(|e| {
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

    wait_until_answering(&mountpoint)?;
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
            if let Err(e) = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                tracing::error!("lazy unmount of {} failed: {e}", mountpoint.display());
            }
        }
    }
    stop_watching.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = loop_thread.join();
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => fail(format!("FUSE session ended with an error: {e}")),
        Err(_) => fail("the FUSE session thread panicked"),
    }
}

/// Creates a missing mount point (like `mount --mkdir`); refuses one that is
/// not an empty directory or already has something mounted on it.
fn prepare_mountpoint(path: &Path) -> Result<PathBuf, DaemonError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path)
                .map_err(|e| DaemonError(format!("creating mount point {}: {e}", path.display())))?;
            tracing::info!("created mount point {}", path.display());
        }
        Err(e) => return fail(format!("mount point {}: {e}", path.display())),
        Ok(_) => {}
    }
    let path = std::fs::canonicalize(path).map_err(|e| DaemonError(format!("mount point {}: {e}", path.display())))?;
    if !path.is_dir() {
        return fail(format!("mount point {} is not a directory", path.display()));
    }
    if is_mountpoint(&path) {
        return fail(format!(
            "{} is already a mount point (`nvlibfs umount {0}` or `umount {0}` first)",
            path.display()
        ));
    }
    let mut entries =
        std::fs::read_dir(&path).map_err(|e| DaemonError(format!("mount point {}: {e}", path.display())))?;
    if entries.next().is_some() {
        return fail(format!(
            "mount point {} is not empty; nvlibfs would hide its contents",
            path.display()
        ));
    }
    Ok(path)
}

/// Whether something is mounted exactly at `path`, per this namespace's mountinfo.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|line| {
        line.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(path.as_os_str().to_string_lossy().as_ref())
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
