//! The daemon's life: take the mount point's lock, check everything that
//! can be checked before mounting, mount, choose the data path, say "ready"
//! only once the mount answers, serve `status`, and unmount cleanly.
//!
//! Signals: SIGTERM and SIGINT unmount (detaching a busy mount) and exit 0;
//! SIGHUP checks the kernel module's version at once instead of at the next
//! poll; SIGUSR1, SIGUSR2 and SIGPIPE are ignored. An unmount from outside
//! ends the daemon too (exit 0).

use crate::backing::{Connection, Registry};
use crate::fs::NvlibFs;
use crate::layout;
use crate::link::{self, Answer, Link};
use crate::protocol::{self, Tag};
use crate::served::Served;
use crate::takeover;
use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs::control;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{mpsc, Arc};

/// How long a stopping daemon waits for a detached mount's session to end.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

pub use crate::error::DaemonError;

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
        let pipe = fd.map(|fd| std::fs::File::from(OwnedFd::from_raw_fd(fd)));
        // Passed on only where it is meant to be (the first server): a
        // process that inherited it by accident would keep `nvlibfs mount`
        // waiting for as long as it lives.
        if let Some(pipe) = &pipe {
            let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        }
        Readiness(pipe)
    }

    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.0.as_ref().map(|f| f.as_fd())
    }

    /// Lets go of the pipe, so the waiting side sees the end of it once
    /// whoever else holds it is done.
    pub fn close(&mut self) {
        self.0 = None;
    }

    pub fn send(&mut self, line: &str) {
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
    /// The FUSE session ended: the mount was unmounted from outside, or
    /// (the mount still there) the kernel aborted the connection.
    SessionEnded { aborted: bool },
}

/// How this server comes by its connection.
#[derive(Clone, Copy)]
pub enum Start {
    /// The first server of a mount: scans, mounts, and gives the
    /// supervisor the connection and everything it holds.
    Mount,
    /// A later one: continues the connection and the state the supervisor
    /// kept, without a scan or a new FUSE INIT.
    Takeover,
}

pub fn run(
    driver: &DriverArgs,
    serve: &ServeArgs,
    mountpoint: &Path,
    ready: &mut Readiness,
    link: Link,
    start: Start,
    status: Option<OwnedFd>,
) -> Result<(), DaemonError> {
    // The supervisor asked the OOM killer to spare it, and its children
    // inherit that; a server is as killable as any process (a new one takes
    // its place).
    if std::fs::read_to_string("/proc/self/oom_score_adj").is_ok_and(|v| v.trim().parse::<i32>().is_ok_and(|v| v < 0)) {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "0") {
            tracing::warn!("setting this server's OOM score adjustment back to 0: {e}");
        }
    }
    // A successor's failure before it serves goes to the supervisor's log:
    // it has no log of its own yet.
    let supervisor = link.socket().try_clone_to_owned().ok();
    let serving = match start {
        // The status socket is the supervisor's, bound once for the mount.
        _ if status.is_none() => fail("no status socket: a server is started by its supervisor (nvlibfs-mountd)"),
        Start::Mount => mount(driver, serve, mountpoint, link, status.expect("checked").into()),
        Start::Takeover => take_over(driver, serve, mountpoint, link, status.expect("checked").into()),
    };
    let result = serving.and_then(|serving| serve_session(serving, ready));
    if let Err(e) = &result {
        ready.send(&format!("error: {e}"));
        if let (Start::Takeover, Some(sock)) = (start, supervisor) {
            let _ = protocol::send(&sock, Tag::Refused, e.to_string().as_bytes(), &[]);
        }
    }
    result
}

/// Signals: blocked everywhere and taken by one thread (so every thread
/// inherits the mask, set before any starts); the ones nothing should act
/// on are ignored, so an outside SIGUSR1 cannot end the server or pass for
/// an unmount.
fn block_signals() -> Result<SigSet, DaemonError> {
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
    Ok(signals)
}

fn fuse_config(serve: &ServeArgs) -> Config {
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
    config.n_threads = Some(serve.threads().into());
    // Every thread reads the one descriptor the supervisor also holds: a
    // cloned one would die with this process and fail the requests it had
    // read (see takeover.rs).
    config.clone_fd = false;
    config
}

/// The first server: scans, mounts, and hands the connection and a
/// checkpoint to the supervisor.
fn mount<'a>(
    driver: &'a DriverArgs,
    serve: &'a ServeArgs,
    mountpoint: &Path,
    link: Link,
    listener: UnixListener,
) -> Result<Serving<'a>, DaemonError> {
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

    let mountpoint = layout::mount_point(mountpoint).map_err(DaemonError)?;
    if !Path::new("/dev/fuse").exists() {
        return fail("no /dev/fuse: load the fuse module (`modprobe fuse`) or pass the device into this container");
    }
    let fresh = !layout::is_ours(&mountpoint);
    let live = layout::prepare(&mountpoint).map_err(DaemonError)?;
    // A mount point set up just now is taken down again if serving fails
    // before it is ready; one a previous daemon left stays for the next.
    let setup = FreshSetup(fresh.then(|| mountpoint.clone()));
    let signals = block_signals()?;

    let served = Arc::new(
        Served::new(mountpoint.clone(), !serve.no_passthrough)
            .map_err(|e| DaemonError(format!("shared reference counters: {e}")))?,
    );
    let session = fuser::Session::new(NvlibFs::new(served.clone()), &live, &fuse_config(serve)).map_err(|e| {
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
    let connection = std::os::fd::AsFd::as_fd(&session)
        .try_clone_to_owned()
        .map_err(|e| DaemonError(format!("keeping the FUSE connection: {e}")))?;
    let registry: Arc<dyn Registry> = Arc::new(Connection(connection));
    served.start(crate::repin::with_spec_dir(plan.view), Some(registry));
    let token =
        crate::statedir::serving_token(&serve.state_dir, &mountpoint, std::time::Duration::ZERO).ok_or_else(|| {
            DaemonError("another server of this mount point still serves: its serving token is held".into())
        })?;
    *served.serving_token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
    crate::repin::follow_devices(&served, &serve.dev, None, None);
    set_readahead(&live, serve.readahead_kb);
    // The supervisor keeps the connection and everything held from now on.
    let init = served
        .init_record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or_else(|| DaemonError("the FUSE INIT was not recorded".into()))?;
    {
        use std::os::fd::AsFd;
        let json = serde_json::to_vec(&init).map_err(|e| DaemonError(e.to_string()))?;
        link.send(Tag::Connection, &json, &[session.as_fd()])
            .map_err(|e| DaemonError(format!("telling the supervisor: {e}")))?;
    }
    // Unacknowledged, nothing may be served: a successor could not know it.
    link.checkpoint(&served)
        .map_err(|e| DaemonError(format!("the first checkpoint: {e}")))?;
    if let Err(e) = drop_privileges(serve) {
        let _ = nix::mount::umount2(&live, nix::mount::MntFlags::MNT_DETACH);
        return Err(e);
    }
    let device = std::os::fd::AsFd::as_fd(&session)
        .try_clone_to_owned()
        .map_err(|e| DaemonError(format!("keeping the FUSE connection: {e}")))?;
    Ok(Serving {
        driver,
        serve,
        served,
        session,
        listener,
        live,
        signals,
        device,
        link,
        took_over: None,
        setup,
    })
}

/// The kernel's readahead for the mount at `live` lives in its backing
/// device info, which FUSE INIT can only lower (from the kernel's 128
/// KiB): set it in sysfs once INIT is done. A server that takes the
/// connection over keeps it.
fn set_readahead(live: &Path, kb: u32) {
    // From mountinfo: a stat of the mount would wait for this server,
    // which does not answer yet.
    let Some(mount) = nvlibfs::mountinfo::at(live) else {
        return tracing::warn!("readahead left as it is: {} is not in mountinfo", live.display());
    };
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", mount.device.0, mount.device.1);
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!("readahead {kb} KiB ({path})"),
        Err(e) => tracing::warn!("readahead left as it is: writing {path}: {e}"),
    }
}

/// A later server: restores the supervisor's checkpoint and takes its
/// connection over, without a scan or a mount.
fn take_over<'a>(
    driver: &'a DriverArgs,
    serve: &'a ServeArgs,
    mountpoint: &Path,
    link: Link,
    listener: UnixListener,
) -> Result<Serving<'a>, DaemonError> {
    raise_file_limit();
    let mountpoint = layout::absolute(mountpoint).map_err(DaemonError)?;
    // Exactly what the last acknowledged checkpoint says, or nothing: a
    // server that cannot honour it says why (see `run`), and the old one
    // goes on.
    let refuse = |why: String| DaemonError(format!("refusing to take over: {why}"));
    let received = link::receive(&link).map_err(|e| refuse(e.0))?;
    let generations = received.checkpoint.generations.iter().map(|g| g.number).collect();
    let (init, fuse, seq) = (received.init, received.fuse, received.seq);
    let served = Arc::new(
        Served::restore(
            mountpoint.clone(),
            !serve.no_passthrough,
            received.checkpoint,
            received.files,
            received.counts,
            received.spec,
            Arc::new(Connection(
                fuse.try_clone()
                    .map_err(|e| refuse(format!("keeping the connection: {e}")))?,
            )),
        )
        .map_err(refuse)?,
    );
    link.continue_from(seq, generations);
    let mut config = fuse_config(serve);
    config.mount_options.clear();
    let resumed = takeover::resume(NvlibFs::new(served.clone()), &init, SessionACL::All, config)
        .map_err(|e| refuse(format!("resuming the FUSE session: {e}")))?;
    let signals = block_signals()?;
    tracing::info!(
        generations = ?served.live_generations(),
        checkpoint = seq,
        "restored the served state exactly; waiting for the connection"
    );
    crate::failpoint::hit("server-restore").map_err(refuse)?;
    link.send(Tag::Prepared, &[], &[])
        .map_err(|e| DaemonError(format!("telling the supervisor: {e}")))?;
    let go = link
        .recv()
        .map_err(|e| DaemonError(format!("waiting for the connection: {e}")))?;
    if go.tag != Tag::Go {
        return fail(format!("the supervisor sent {:?} instead of the connection", go.tag));
    }
    // The supervisor has asked the kernel to resend what a dead server
    // held before this; nobody reads the connection until now.
    let (alone, highest) = protocol::decode_go(&go.body);
    link.number_above(highest);
    if alone {
        take_token(&served, &serve.state_dir);
    } else {
        *served.beside_token.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::statedir::beside_token(&serve.state_dir, &mountpoint);
    }
    let session = resumed
        .attach(&fuse)
        .map_err(|e| DaemonError(format!("taking the FUSE connection: {e}")))?;
    let live = mountpoint.join(layout::LIVE);
    drop_privileges(serve)?;
    Ok(Serving {
        driver,
        serve,
        served,
        session,
        listener,
        live,
        signals,
        link,
        device: fuse,
        took_over: Some(alone),
        setup: FreshSetup(None),
    })
}

fn drop_privileges(serve: &ServeArgs) -> Result<(), DaemonError> {
    // Mounted and every file held: from here on, only what is still used.
    match crate::privileges::drop_to_kept() {
        Ok(()) => {
            let kept: Vec<&str> = crate::privileges::KEPT.iter().map(|(_, why)| *why).collect();
            tracing::info!(
                "dropped all other capabilities and set no_new_privs; keeping {}",
                kept.join(", ")
            );
            Ok(())
        }
        Err(e) if serve.keep_privileges => {
            tracing::warn!("could not drop capabilities ({e}); --keep-privileges: continuing with all of them");
            Ok(())
        }
        Err(e) => fail(format!(
            "could not drop the capabilities the daemon does not need ({e}); refusing to serve with all \
             of them (--keep-privileges overrides)"
        )),
    }
}

/// A server with its connection, about to answer.
struct Serving<'a> {
    driver: &'a DriverArgs,
    serve: &'a ServeArgs,
    served: Arc<Served>,
    session: fuser::Session<NvlibFs>,
    listener: UnixListener,
    live: std::path::PathBuf,
    signals: SigSet,
    link: Link,
    /// The connection itself (fuser's threads read it through a
    /// descriptor number that draining replaces).
    device: OwnedFd,
    /// After a takeover: whether this server serves alone from the start
    /// (after a crash) or beside the old one until `Sole` (a restart).
    took_over: Option<bool>,
    /// A mount point this server set up, taken down if it never serves.
    setup: FreshSetup,
}

/// Serves until stopped: the session, status, the module watcher, signals,
/// and the supervisor's word.
fn serve_session(s: Serving<'_>, ready: &mut Readiness) -> Result<(), DaemonError> {
    let Serving {
        driver,
        serve,
        served,
        session,
        listener,
        live,
        signals,
        link,
        device,
        took_over,
        mut setup,
    } = s;
    let mountpoint = served.mountpoint.clone();
    *served.supervisor_pid.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(nix::unistd::getppid().as_raw() as u32).filter(|&p| p != 1);
    let link = Arc::new(link);
    // A successor during a restart must not change what the old server
    // also serves: no re-pin, no backing id closed, until it is told that
    // it serves alone.
    match took_over {
        Some(true) => served.own_backing(false),
        Some(false) => drop(link.freeze(link.freeze_ticket())),
        None => {}
    }
    let notifier = session.notifier();
    if took_over.is_some() {
        // The previous server may have served a newer spec than its last
        // checkpoint says: the kernel asks again.
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(crate::served::SPEC_INO), 0, 0) {
            tracing::debug!("invalidating the CDI spec: {e}");
        }
    }
    let warm_notifier = session.notifier();
    let drain = crate::drain::Drain::new(
        std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&session)),
        device,
    );
    let (events, event) = mpsc::channel();
    let loop_thread = {
        let (events, served) = (events.clone(), served.clone());
        std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                let result = session.run();
                let aborted = served.aborted.load(std::sync::atomic::Ordering::SeqCst);
                let _ = events.send(Event::SessionEnded { aborted });
                result
            })
            .map_err(|e| DaemonError(format!("starting the session thread: {e}")))?
    };
    let (status_served, status_dir) = (served.clone(), serve.state_dir.clone());
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || answer_status(listener, &status_served, &status_dir))
        .map_err(|e| DaemonError(format!("starting the status thread: {e}")))?;
    let (recheck, recheck_requests) = mpsc::channel();
    {
        let (driver, serve, served, link, live) = (
            driver.clone(),
            serve.clone(),
            served.clone(),
            link.clone(),
            live.clone(),
        );
        std::thread::Builder::new()
            .name("repin".into())
            .spawn(move || crate::repin::watch(driver, serve, live, served, notifier, recheck_requests, &link))
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
    let drain = Arc::new(std::sync::Mutex::new(Some(drain)));
    {
        let (served, link, state_dir, drain) = (served.clone(), link.clone(), serve.state_dir.clone(), drain.clone());
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || hear_supervisor(link, served, drain, state_dir))
            .map_err(|e| DaemonError(format!("starting the supervisor thread: {e}")))?;
    }
    if took_over == Some(false) {
        beside_deadline(served.clone(), link.clone(), drain);
    }

    wait_until_answering(&live)?;
    // A server that took the connection over finds the kernel's page
    // cache as its predecessor left it.
    if took_over.is_none() {
        crate::warm::warm(&served, &warm_notifier, &live, serve);
        if served.no_open() {
            spend_the_first_open(&served, &live);
        }
    }
    crate::logging::open_file().map_err(DaemonError)?;
    let status = served.status();
    tracing::info!(
        mountpoint = %mountpoint.display(),
        version = %status.driver_version,
        data_path = %status.data_path,
        server = %crate::version(),
        "serving {} files ({} bytes)",
        status.files,
        status.bytes
    );
    let said = protocol::Ready {
        version: crate::version(),
        status: format!(
            "serving NVIDIA driver {} at {} (nvlibfs {})",
            status.driver_version,
            mountpoint.display(),
            crate::version()
        ),
    };
    let json = serde_json::to_vec(&said).map_err(|e| DaemonError(e.to_string()))?;
    crate::failpoint::hit("server-ready").map_err(DaemonError)?;
    link.send(Tag::Ready, &json, &[])
        .map_err(|e| DaemonError(format!("telling the supervisor: {e}")))?;
    setup.keep();
    ready.send("ready");

    match event.recv() {
        Ok(Event::SessionEnded { aborted: true }) => {
            return fail(format!(
                "the kernel ended the FUSE connection of {} while it is still mounted (aborted through \
                 /sys/fs/fuse/connections, or forced)",
                mountpoint.display()
            ));
        }
        Ok(Event::SessionEnded { aborted: false }) | Err(_) => {
            tracing::info!("{} was unmounted; exiting", mountpoint.display());
        }
        Ok(Event::Stop(signal)) => {
            tracing::info!("{signal}: unmounting {}", mountpoint.display());
            if let Err(e) = nix::mount::umount2(&live, nix::mount::MntFlags::empty()) {
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

/// Without passthrough the connection's first OPEN is answered ENOSYS,
/// and the kernel sends none after it (`Opened::ByKernel`). Spent here,
/// before the mount is ready, it is no user's first open that waits for it;
/// so is the first FLUSH, at the close (a file opened without an OPEN is
/// not FOPEN_NOFLUSH, and `flush` answers ENOSYS, which ends FLUSHes too).
fn spend_the_first_open(served: &Served, live: &Path) {
    let Some(generation) = served.current() else { return };
    let first = generation.view.files().next();
    if let Some((_, file)) = first {
        if let Err(e) = std::fs::File::open(live.join(&file.view_path)) {
            tracing::debug!("opening {} before the mount is ready: {e}", file.view_path.display());
        }
    }
}

/// Everything the supervisor tells a running server: answers to its
/// checkpoints, the handovers so far, and a restart's steps. When it goes
/// away, the server goes on alone (a crash from then on ends the mount,
/// as before there was a supervisor), or, where it served beside another
/// that goes on, ends (`orphaned`).
fn hear_supervisor(link: Arc<Link>, served: Arc<Served>, drain: SharedDrain, state_dir: std::path::PathBuf) {
    let answers = link.answers();
    loop {
        let m = match protocol::recv(&link.socket()) {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::warn!("the supervisor is gone; serving on without one");
                *served.supervisor_pid.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let _ = answers.send(Answer::Gone);
                let drain = drain.lock().unwrap_or_else(|e| e.into_inner()).take();
                orphaned(served, link, drain, state_dir);
                return;
            }
            Err(e) => {
                tracing::error!("a message from the supervisor: {e}");
                continue;
            }
        };
        match m.tag {
            Tag::Ack | Tag::Nak => match m.number() {
                Ok((seq, _)) if m.tag == Tag::Ack => {
                    let _ = answers.send(Answer::Ack(seq));
                }
                Ok((seq, why)) => {
                    let _ = answers.send(Answer::Nak(seq, String::from_utf8_lossy(why).into_owned()));
                }
                Err(e) => tracing::error!("{e}"),
            },
            Tag::History => match serde_json::from_slice(&m.body) {
                Ok(history) => *served.handovers.lock().unwrap_or_else(|e| e.into_inner()) = history,
                Err(e) => tracing::warn!("the supervisor's handover history: {e}"),
            },
            Tag::Freeze => {
                // The checkpoint waits for its answer, which this thread
                // reads: take it on a thread of its own.
                let (served, link) = (served.clone(), link.clone());
                let ticket = link.freeze_ticket();
                let spawned = std::thread::Builder::new()
                    .name("freeze".into())
                    .spawn(move || freeze(&served, &link, ticket));
                if let Err(e) = spawned {
                    tracing::error!("starting the freeze thread: {e}");
                }
            }
            Tag::Thaw => {
                tracing::info!("the restart did not happen; re-pinning and freeing as before");
                crate::failpoint::hit("server-thaw").unwrap_or_else(|e| tracing::error!("{e}"));
                serve_alone(&served, &link);
            }
            Tag::Sole => {
                tracing::info!("the previous server has stopped; this one serves alone");
                link.sole.store(true, std::sync::atomic::Ordering::SeqCst);
                *served.beside_token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                serve_alone(&served, &link);
                // It holds the token once the one before has ended.
                let (served, state_dir) = (served.clone(), state_dir.clone());
                let spawned = std::thread::Builder::new()
                    .name("token".into())
                    .spawn(move || take_token(&served, &state_dir));
                if let Err(e) = spawned {
                    tracing::error!("starting the token thread: {e}");
                }
            }
            Tag::Drain => {
                let Some(drain) = drain.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                    continue;
                };
                drain_and_exit(drain, served.clone(), link.clone());
            }
            other => tracing::warn!("unexpected message {other:?} from the supervisor"),
        }
    }
}

/// The drain, taken by whichever asks first: the supervisor, or a
/// server's own deadline.
type SharedDrain = Arc<std::sync::Mutex<Option<crate::drain::Drain>>>;

/// A server serving beside another (a restart's or takeover's new one)
/// that is told neither that it serves alone nor to drain within three
/// times the step limit (a joiner waits twice it for the other daemon's
/// drain) has a supervisor that stalled: its side of the handover is
/// given up by then (the other daemon thaws its own server only after this
/// deadline), so it drains and exits rather than read beside a server
/// that may re-pin.
fn beside_deadline(served: Arc<Served>, link: Arc<Link>, drain: SharedDrain) {
    let limit = 3 * crate::failpoint::step_limit(protocol::STEP_LIMIT);
    let spawned = std::thread::Builder::new().name("beside".into()).spawn(move || {
        std::thread::sleep(limit);
        if link.sole.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(drain) = drain.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        tracing::error!(
            "not told to serve alone or to drain within {} s of serving beside another server: its supervisor \
             is stuck; draining and exiting",
            limit.as_secs_f64()
        );
        drain_and_exit(drain, served, link);
    });
    if let Err(e) = spawned {
        tracing::error!("starting the beside deadline: {e}");
    }
}

/// Re-pins and frees as a server on its own does.
fn serve_alone(served: &Served, link: &Link) {
    served.own_backing(true);
    link.thaw();
    *served.frozen_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Takes the serving token (statedir.rs) for a server that serves alone,
/// waiting up to the step limit for the server before it to end.
fn take_token(served: &Served, state_dir: &Path) {
    let limit = crate::failpoint::step_limit(protocol::STEP_LIMIT);
    match crate::statedir::serving_token(state_dir, &served.mountpoint, limit) {
        Some(token) => *served.serving_token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token),
        None => tracing::error!(
            "the serving token is still held {} s on: a server before this one has not ended",
            limit.as_secs_f64()
        ),
    }
}

/// Answers every request this server holds, stops reading, tells the
/// supervisor, and exits.
fn drain_and_exit(drain: crate::drain::Drain, served: Arc<Served>, link: Arc<Link>) {
    let spawned = std::thread::Builder::new().name("drain".into()).spawn(move || {
        let drained = crate::failpoint::hit("server-drain").and_then(|()| drain.run(&served));
        match drained {
            Ok(()) => {
                tracing::info!("every request this server held is answered; handing over");
                match crate::failpoint::hit("server-drained") {
                    Ok(()) => drop(link.send(Tag::Drained, &[], &[])),
                    Err(e) => tracing::error!("{e}: the supervisor is not told"),
                }
                std::process::exit(0);
            }
            // The supervisor stops this server all the same when its
            // wait runs out.
            Err(e) => tracing::error!("draining: {e}"),
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the drain thread: {e}");
    }
}

/// The supervisor died (killed: nothing saves that but systemd's store),
/// perhaps mid-handover with two servers reading. Exactly one goes on,
/// decided by the serving token with no word between them: the holder,
/// thawed once a server beside it has had the step limit to end; or the
/// one beside it, if the holder ends within half of that (it was
/// draining); else the one beside it drains and exits. A server already
/// draining ends as it would have.
fn orphaned(served: Arc<Served>, link: Arc<Link>, drain: Option<crate::drain::Drain>, state_dir: std::path::PathBuf) {
    let Some(drain) = drain else { return };
    let limit = crate::failpoint::step_limit(protocol::STEP_LIMIT);
    let holds = served.serving_token.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    let spawned = std::thread::Builder::new().name("orphaned".into()).spawn(move || {
        if holds {
            if link.is_frozen() {
                tracing::warn!("frozen with no supervisor: thawing in {} s", limit.as_secs_f64());
                std::thread::sleep(limit);
                serve_alone(&served, &link);
            }
            return;
        }
        match crate::statedir::serving_token(&state_dir, &served.mountpoint, limit / 2) {
            Some(token) => {
                tracing::warn!("the server this one served beside has ended; serving alone");
                *served.serving_token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
                serve_alone(&served, &link);
            }
            None => {
                tracing::warn!("the server this one served beside serves on; draining and exiting");
                drain_and_exit(drain, served, link);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the orphaned thread: {e}");
    }
}

/// A restart's first step: no re-pin from now on (one under way ends
/// first), no backing id closed, and a final checkpoint, so that the new
/// server starts from exactly what this one serves. If that checkpoint
/// fails, the restart cannot happen: say why and go on as before.
fn freeze(served: &Served, link: &Link, ticket: u64) {
    let Some(frozen) = link.freeze(ticket) else {
        tracing::warn!("the restart was given up while a re-pin held this server; not freezing");
        return;
    };
    *served.frozen_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    served.disown_backing();
    let checkpoint = crate::failpoint::hit("server-freeze")
        .map_err(protocol::ProtocolError)
        .and_then(|()| link.checkpoint(served));
    match checkpoint {
        Ok(()) => {
            let seq = link.seq();
            tracing::info!(checkpoint = seq, "frozen for a restart");
            if let Err(e) = link.send(Tag::Frozen, &protocol::number_body(seq, ""), &[]) {
                tracing::error!("telling the supervisor: {e}");
            }
        }
        Err(e) => {
            link.thaw();
            served.own_backing(true);
            *served.frozen_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let why = format!("the running server's final checkpoint failed: {e}");
            tracing::error!("{why}");
            let _ = link.send(Tag::Refused, why.as_bytes(), &[]);
        }
    }
    drop(frozen);
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

/// Answers `nvlibfs status` on the listener the supervisor holds for the
/// mount (every server of it answers on the same one): only to a peer
/// that could mount, since status names host paths and files. A client
/// this server cannot see proves CAP_SYS_ADMIN on a thread of its own, so
/// that one that does not answer its challenge holds up nobody else.
fn answer_status(listener: UnixListener, served: &Arc<Served>, state_dir: &Path) {
    use crate::peer::Verdict;
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("status socket: {e}");
                continue;
            }
        };
        // No client may hold an answer up for longer than a send may.
        let _ = stream.set_write_timeout(Some(protocol::SEND_LIMIT));
        match crate::peer::check(&stream) {
            Verdict::Privileged => tell_status(&mut stream, served),
            Verdict::Refused(why) => refuse_status(&mut stream, &why),
            Verdict::Unseen(_) => {
                let (served, state_dir) = (served.clone(), state_dir.to_owned());
                let mut client = match stream.try_clone() {
                    Ok(client) => client,
                    Err(e) => {
                        tracing::warn!("status client: {e}");
                        continue;
                    }
                };
                let deadline = std::time::Instant::now() + crate::peer::PROOF_LIMIT;
                let proving = crate::peer::off_the_accepting_thread("status-proof", move || {
                    match prove_for_status(&mut client, &state_dir, deadline) {
                        Ok(()) => tell_status(&mut client, &served),
                        Err(why) => refuse_status(&mut client, &why),
                    }
                });
                if let Err(why) = proving {
                    refuse_status(&mut stream, &why);
                }
            }
        }
    }
}

fn tell_status(stream: &mut std::os::unix::net::UnixStream, served: &Served) {
    match serde_json::to_vec(&served.status()) {
        Ok(bytes) => {
            if let Err(e) = stream.write_all(&bytes) {
                tracing::debug!("status client went away: {e}");
            }
        }
        Err(e) => tracing::error!("encoding status: {e}"),
    }
}

fn refuse_status(stream: &mut std::os::unix::net::UnixStream, why: &str) {
    tracing::info!("refused a status request: {why}");
    let _ = write!(stream, "{}{why}", control::REFUSED);
}

/// A status client this server cannot see proves CAP_SYS_ADMIN: a line
/// with the challenge, `proved` back by `deadline`. Nothing more than a
/// short line is read, and no later than that, however it is sent.
fn prove_for_status(
    stream: &mut std::os::unix::net::UnixStream,
    state_dir: &Path,
    deadline: std::time::Instant,
) -> Result<(), String> {
    use crate::peer::{Challenge, Verdict};
    const LONGEST: usize = 16;
    let challenge = Challenge::new(state_dir)?;
    let said = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "it did not answer the challenge within {} s",
            crate::peer::PROOF_LIMIT.as_secs()
        ),
        _ => format!("answering the challenge: {e}"),
    };
    writeln!(stream, "{}{} {}", control::CHALLENGE, challenge.name, challenge.nonce).map_err(said)?;
    let mut said_back = Vec::new();
    let mut buf = [0u8; LONGEST];
    while !said_back.contains(&b'\n') && said_back.len() <= LONGEST {
        stream
            .set_read_timeout(Some(crate::peer::time_left(deadline)))
            .map_err(said)?;
        match std::io::Read::read(stream, &mut buf).map_err(said)? {
            0 => break,
            n => said_back.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&said_back);
    match challenge.verdict() {
        Verdict::Privileged if line.trim_end() == "proved" => Ok(()),
        Verdict::Refused(why) => Err(why),
        _ => Err(format!("it answered the challenge with {:?}", line.trim_end())),
    }
}

/// Every served file is held open (two generations' worth during a
/// re-pin): take the hard limit rather than the usual 1024 soft one.
pub fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising the open file limit to {hard}: {e}");
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A status client this server cannot see, answering the challenge
    /// with what `answer` writes until the server lets go; what
    /// `prove_for_status` said, or `None` if it had not returned within
    /// 20 s (it used to read a line of any length, each byte allowed 5 s).
    fn challenged(deadline: Instant, answer: impl FnOnce(&mut UnixStream) + Send + 'static) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, mut client) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut challenge = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&client), &mut challenge).unwrap();
            assert!(challenge.starts_with(control::CHALLENGE), "{challenge}");
            answer(&mut client);
        });
        let (said, heard) = mpsc::channel();
        let state_dir = dir.path().to_owned();
        std::thread::spawn(move || {
            let _ = said.send(prove_for_status(&mut server, &state_dir, deadline).unwrap_err());
        });
        let verdict = heard.recv_timeout(Duration::from_secs(20)).ok();
        if verdict.is_some() {
            peer.join().unwrap(); // else it would answer for ever
        }
        verdict
    }

    #[test]
    fn a_challenge_answered_without_end_is_read_no_further_than_a_line() {
        let flood = |client: &mut UnixStream| while client.write_all(&[b'a'; 65536]).is_ok() {};
        let said = challenged(Instant::now() + Duration::from_secs(60), flood);
        assert!(said.is_some(), "still reading the flood");
    }

    #[test]
    fn a_challenge_answered_a_byte_at_a_time_ends_at_the_deadline() {
        let drip = |client: &mut UnixStream| {
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until && client.write_all(b"p").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let said = challenged(Instant::now() + Duration::from_secs(1), drip);
        assert!(said.is_some_and(|s| s.contains("did not answer the challenge")));
    }
}
