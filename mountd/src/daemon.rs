//! The daemon's life: take the mount point's lock, check everything that
//! can be checked before mounting, mount, choose the data path, say "ready"
//! only once the mount answers, serve `status`, and unmount cleanly.
//!
//! Signals: SIGTERM and SIGINT unmount (detaching a busy mount) and exit 0;
//! SIGHUP checks the kernel module's version at once instead of at the next
//! poll; SIGUSR1, SIGUSR2 and SIGPIPE are ignored. An unmount from outside
//! ends the daemon too (exit 0).

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
use std::sync::{mpsc, Arc};

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

impl DaemonError {
    pub fn new(msg: impl Into<String>) -> DaemonError {
        DaemonError(msg.into())
    }
}

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

/// One event the main thread waits for.
enum Event {
    /// SIGTERM or SIGINT: unmount and exit.
    Stop(Signal),
    /// The FUSE session ended: the mount was unmounted (or aborted) from
    /// outside.
    SessionEnded,
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

/// Held for as long as this daemon serves its mount point: one daemon per
/// mount point, decided before anything else is looked at or created.
struct MountLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl MountLock {
    fn take(mountpoint: &Path) -> Result<MountLock, DaemonError> {
        let path = control::lock_path(mountpoint);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| DaemonError(format!("creating lock directory {}: {e}", dir.display())))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| DaemonError(format!("lock file {}: {e}", path.display())))?;
        let file =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    drop(file);
                    let holder = holder.trim();
                    return fail(format!(
                    "{} is already served by nvlibfs{}; `nvlibfs status {0}` shows it, `nvlibfs umount {0}` stops it",
                    mountpoint.display(),
                    if holder.is_empty() { String::new() } else { format!(" (daemon pid {holder})") }
                ));
                }
                Err((_, e)) => return fail(format!("locking {}: {e}", path.display())),
            };
        // The pid, for the message a refused daemon prints.
        let _ = file.set_len(0);
        let _ = write!(&*file, "{}", std::process::id());
        Ok(MountLock { _file: file })
    }
}

fn serve_until_stopped(
    driver: &DriverArgs,
    serve: &ServeArgs,
    mountpoint: &Path,
    ready: &mut Readiness,
) -> Result<(), DaemonError> {
    crate::privileges::check_can_mount()?;
    let mountpoint = layout::absolute(mountpoint).map_err(DaemonError)?;
    let _lock = MountLock::take(&mountpoint)?;
    std::fs::create_dir_all(&serve.state_dir)
        .map_err(|e| DaemonError(format!("creating state directory {}: {e}", serve.state_dir.display())))?;
    raise_file_limit();
    let plan = driver.plan().map_err(|e| DaemonError(e.to_string()))?;
    let manifest = plan.view.manifest();
    if let Some(message) = plan.no_driver_message() {
        return fail(format!(
            "no driver found: {message} (`nvlibfs scan` lists every candidate with the reason it was left out)"
        ));
    }
    tracing::info!(
        version = %manifest.driver_version,
        files = manifest.files.len(),
        rejected = plan.rejected.len(),
        "view built in {:.1} ms",
        plan.elapsed.as_secs_f64() * 1e3
    );

    let mountpoint = layout::mount_point(&mountpoint).map_err(DaemonError)?;
    if !Path::new("/dev/fuse").exists() {
        return fail("no /dev/fuse: load the fuse module (`modprobe fuse`) or pass the device into this container");
    }
    let socket = control::socket_path(&serve.state_dir, &mountpoint);
    let listener = bind_control_socket(&socket)?;
    let fresh = !layout::is_ours(&mountpoint);
    let live = layout::prepare(&mountpoint).map_err(|e| {
        let _ = std::fs::remove_file(&socket);
        DaemonError(e)
    })?;
    // A mount point set up just now is taken down again if serving fails
    // before it is ready; one a previous daemon left stays for the next.
    let mut setup = FreshSetup(fresh.then(|| mountpoint.clone()));

    // Stop signals are taken by one thread (sigwait), so they are blocked
    // before any thread starts and every thread inherits the mask. Signals
    // nothing should act on are ignored: an outside SIGUSR1 must not end
    // the daemon or be taken for an unmount.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| DaemonError(format!("blocking signals: {e}")))?;
    for s in [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGPIPE] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) }
            .map_err(|e| DaemonError(format!("ignoring {s}: {e}")))?;
    }

    let served = Arc::new(Served::new(mountpoint.clone(), !serve.no_passthrough));
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
    served.start(plan.view, Some(&session));
    // Mounted and every file held: from here on, only what is still used.
    match crate::privileges::drop_to_kept() {
        Ok(()) => {
            let kept: Vec<&str> = crate::privileges::KEPT.iter().map(|(_, why)| *why).collect();
            tracing::info!(
                "dropped all other capabilities and set no_new_privs; keeping {}",
                kept.join(", ")
            );
        }
        Err(e) if serve.keep_privileges => {
            tracing::warn!("could not drop capabilities ({e}); --keep-privileges: continuing with all of them")
        }
        Err(e) => {
            let _ = session.unmount_callable().unmount();
            let _ = std::fs::remove_file(&socket);
            return fail(format!(
                "could not drop the capabilities the daemon does not need ({e}); refusing to serve with all \
                 of them (--keep-privileges overrides)"
            ));
        }
    }
    let notifier = session.notifier();
    let mut unmounter = session.unmount_callable();
    let (events, event) = mpsc::channel();
    let loop_thread = {
        let events = events.clone();
        std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                let result = session.run();
                let _ = events.send(Event::SessionEnded);
                result
            })
            .map_err(|e| DaemonError(format!("starting the session thread: {e}")))?
    };
    let status_served = served.clone();
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || answer_status(listener, &status_served))
        .map_err(|e| DaemonError(format!("starting the status thread: {e}")))?;
    let (recheck, recheck_requests) = mpsc::channel();
    {
        let (driver, served) = (driver.clone(), served.clone());
        std::thread::Builder::new()
            .name("repin".into())
            .spawn(move || crate::repin::watch(driver, served, notifier, recheck_requests))
            .map_err(|e| DaemonError(format!("starting the module watcher: {e}")))?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(Signal::SIGHUP) => {
                    let _ = recheck.send(());
                }
                Ok(signal) => {
                    let _ = events.send(Event::Stop(signal));
                }
                Err(e) => tracing::error!("waiting for signals: {e}"),
            }
        })
        .map_err(|e| DaemonError(format!("starting the signal thread: {e}")))?;

    wait_until_answering(&live)?;
    crate::logging::open_file().map_err(DaemonError)?;
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
    setup.keep();
    notify_systemd(&format!(
        "READY=1\nSTATUS=serving NVIDIA driver {} at {}",
        status.driver_version,
        mountpoint.display()
    ));

    match event.recv() {
        Ok(Event::SessionEnded) | Err(_) => {
            tracing::info!("{} was unmounted; exiting", mountpoint.display());
        }
        Ok(Event::Stop(signal)) => {
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
    }
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
    match loop_thread.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => fail(format!("FUSE session ended with an error: {e}")),
        Err(_) => fail("the FUSE session thread panicked"),
    }
}

/// Removes a mount point's fresh tmpfs when dropped before `keep`.
struct FreshSetup(Option<std::path::PathBuf>);

impl FreshSetup {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for FreshSetup {
    fn drop(&mut self) {
        if let Some(top) = self.0.take() {
            let _ = nix::mount::umount2(&top.join(layout::LIVE), nix::mount::MntFlags::MNT_DETACH);
            if let Err(e) = layout::remove(&top) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Binds the status socket. The caller holds the mount point's lock, so a
/// socket already there was left by a daemon that died.
fn bind_control_socket(socket: &Path) -> Result<UnixListener, DaemonError> {
    let _ = std::fs::remove_file(socket);
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
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising the open file limit to {hard}: {e}");
            }
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
