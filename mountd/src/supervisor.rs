//! The supervisor: the process that holds what must outlive any one
//! server, and starts the next server the moment one ends.
//!
//! It takes the mount point's lock, starts the first server (which scans,
//! mounts and hands back the FUSE connection and a checkpoint of what it
//! serves, held files included), and from then on keeps the newest of each
//! as it came, parsing nothing but a one-byte tag: no host input, no FUSE
//! request, nothing to crash on. While it holds the connection the kernel
//! keeps the mount alive, and requests wait in the kernel instead of
//! failing. When the server dies it starts another at once from the
//! binary on disk, which restores the checkpoint and takes the connection
//! over (see takeover.rs); SIGUSR2 (`nvlibfs restart`) does the same with
//! the old server still running until the new one is ready, so an upgrade
//! of nvlibfs is a handover too.
//!
//! Signals: SIGTERM and SIGINT stop the server (which unmounts) and then
//! the supervisor; SIGHUP is passed to the server (re-check the module);
//! SIGUSR2 hands over to a new server; SIGUSR1 and SIGPIPE are ignored.

use crate::daemon::{notify_systemd, DaemonError, MountLock, Readiness};
use crate::fdstore;
use crate::handover::{self, Message};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nvlibfs::control::Handover;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

/// More early deaths than this within `CRASH_WINDOW` and the supervisor
/// gives up: a server that cannot start, or one that a request kills as
/// soon as it answers (the kernel resends it to every new server), would
/// otherwise be restarted for ever. A server that had served for
/// `EARLY_DEATH` or longer before it died does not count.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(30);
const EARLY_DEATH: Duration = Duration::from_millis(500);

/// How long a dead server's socket may stay open (held by a process it
/// left behind) before its death is acted on anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// Starts a server: taking over or not, with `nvlibfs mount`'s ready pipe.
type StartServer<'a> = dyn Fn(bool, Option<BorrowedFd<'_>>) -> Result<Server, DaemonError> + 'a;

enum Event {
    Signal(Signal),
    Message(Pid, Message),
    /// The server's socket reached end of file: every message it sent
    /// has come before this.
    Closed(Pid),
}

/// A server process and the supervisor's end of its socket.
struct Server {
    pid: Pid,
    sock: OwnedFd,
    /// When it started answering.
    serving_since: Option<Instant>,
}

/// A handover under way: the new server, why, and since when requests
/// have had nobody to answer them (set once the old server is gone).
struct Incoming {
    server: Server,
    reason: &'static str,
    old_pid: u32,
    since: Option<(Instant, SystemTime)>,
}

/// How to start a server: this binary as it is on disk now (after an
/// upgrade, the new one), with the flags the supervisor was given.
pub struct ServerCommand {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub mountpoint: PathBuf,
}

pub fn run(command: ServerCommand, mut ready: Readiness) -> Result<(), DaemonError> {
    match supervise(command, &mut ready) {
        Ok(code) => {
            if code == 0 {
                Ok(())
            } else {
                Err(DaemonError::new(format!("the server exited with status {code}")))
            }
        }
        Err(e) => {
            ready.send(&format!("error: {e}"));
            Err(e)
        }
    }
}

fn supervise(command: ServerCommand, ready: &mut Readiness) -> Result<i32, DaemonError> {
    crate::privileges::check_can_mount()?;
    let mountpoint = crate::layout::absolute(&command.mountpoint).map_err(DaemonError::new)?;
    let lock = MountLock::take(&mountpoint)?;
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| DaemonError::new(format!("blocking signals: {e}")))?;
    for s in [Signal::SIGUSR1, Signal::SIGPIPE] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) }
            .map_err(|e| DaemonError::new(format!("ignoring {s}: {e}")))?;
    }
    let (events, event) = mpsc::channel();
    {
        let events = events.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match signals.wait() {
                    Ok(signal) => {
                        if events.send(Event::Signal(signal)).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::error!("waiting for signals: {e}"),
                }
            })
            .map_err(|e| DaemonError::new(format!("starting the signal thread: {e}")))?;
    }
    let start = |takeover: bool, ready: Option<BorrowedFd<'_>>| {
        spawn(&command, &mountpoint, lock.as_fd(), takeover, ready, events.clone())
    };

    let mut connection: Option<Message> = None;
    let mut checkpoint: Vec<Message> = Vec::new();
    let mut store = fdstore::Store::default();
    let mut current = None;
    let mut incoming: Option<Incoming> = None;
    match fdstore::restore() {
        // The whole daemon died; systemd kept the connection: take it over.
        Ok(Some(kept)) => {
            tracing::warn!("systemd kept the FUSE connection of a supervisor that is gone; taking it over");
            connection = Some(kept.connection);
            checkpoint = kept.checkpoint;
            store = kept.store;
            incoming = Some(Incoming {
                server: start_takeover(&start, &connection, &checkpoint)?,
                reason: "supervisor restart",
                old_pid: 0,
                since: Some((Instant::now(), SystemTime::now())),
            });
        }
        Ok(None) => current = Some(start(false, ready.fd())?),
        Err(e) => {
            tracing::error!("what systemd kept cannot be used ({e}); mounting afresh");
            current = Some(start(false, ready.fd())?);
        }
    }
    // The first server answers `nvlibfs mount` itself.
    ready.close();
    let mut partial: HashMap<Pid, Vec<Message>> = HashMap::new();
    let mut history: Vec<Handover> = Vec::new();
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut serving = false;
    let mut stopping = false;
    let mut exited: Vec<(Pid, WaitStatus, Instant)> = Vec::new();
    let mut closed: HashSet<Pid> = HashSet::new();

    loop {
        let event = if exited.is_empty() {
            event.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            event.recv_timeout(DRAIN_LIMIT / 10)
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => Event::Signal(Signal::SIGCHLD),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(DaemonError::new("the supervisor's event channel closed"));
            }
        };
        match event {
            Event::Message(pid, m) => match m.tag {
                handover::CONNECTION => connection = Some(m),
                handover::FILES => partial.entry(pid).or_default().push(m),
                handover::CHECKPOINT => {
                    let mut parts = partial.remove(&pid).unwrap_or_default();
                    parts.push(m);
                    checkpoint = parts;
                    if let Some(connection) = &connection {
                        if let Err(e) = store.save(connection, &checkpoint) {
                            tracing::warn!("keeping the connection in systemd's fd store: {e}");
                        }
                    }
                }
                handover::PREPARED => {
                    let Some(inc) = incoming.as_mut().filter(|i| i.server.pid == pid) else {
                        continue;
                    };
                    // The old server, if any, goes now: from here until the
                    // new one answers, requests wait in the kernel.
                    if let Some(old) = current.take() {
                        let _ = kill(old.pid, Signal::SIGKILL);
                        let _ = waitpid(old.pid, None);
                    }
                    inc.since.get_or_insert((Instant::now(), SystemTime::now()));
                    if let Err(e) = handover::send(&inc.server.sock, handover::GO, &[], &[]) {
                        tracing::error!("handing the connection to pid {pid}: {e}");
                    }
                }
                handover::READY => {
                    let said: handover::Ready = serde_json::from_slice(&m.body).unwrap_or(handover::Ready {
                        version: "unknown".into(),
                        status: format!("serving at {}", mountpoint.display()),
                    });
                    let version = said.version;
                    if let Some(inc) = incoming.take_if(|i| i.server.pid == pid) {
                        let (since, at) = inc.since.unwrap_or((Instant::now(), SystemTime::now()));
                        let record = Handover {
                            reason: inc.reason.into(),
                            old_pid: inc.old_pid,
                            new_pid: pid.as_raw() as u32,
                            new_version: version.clone(),
                            at: at
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .unwrap_or_default()
                                .as_secs_f64(),
                            waited_ms: since.elapsed().as_secs_f64() * 1e3,
                        };
                        tracing::info!(
                            reason = %record.reason,
                            old = record.old_pid,
                            new = record.new_pid,
                            %version,
                            "handed the connection over; requests waited at most {:.1} ms",
                            record.waited_ms
                        );
                        history.push(record);
                        current = Some(Server {
                            serving_since: Some(Instant::now()),
                            ..inc.server
                        });
                    }
                    if !serving {
                        if let Err(e) = crate::logging::open_file() {
                            tracing::warn!("{e}");
                        }
                        notify_systemd(&format!("READY=1\nSTATUS={}", said.status));
                    } else {
                        notify_systemd(&format!("STATUS={}", said.status));
                    }
                    serving = true;
                    if let Some(server) = current.as_mut().filter(|s| s.pid == pid) {
                        server.serving_since.get_or_insert_with(Instant::now);
                        let json = serde_json::to_vec(&history).unwrap_or_default();
                        if let Err(e) = handover::send(&server.sock, handover::HISTORY, &json, &[]) {
                            tracing::warn!("telling pid {pid} the handovers: {e}");
                        }
                    }
                }
                other => tracing::warn!("unexpected message {:?} from pid {pid}", other as char),
            },
            Event::Signal(Signal::SIGTERM) | Event::Signal(Signal::SIGINT) => {
                stopping = true;
                notify_systemd("STOPPING=1");
                if let Some(inc) = incoming.take() {
                    let _ = kill(inc.server.pid, Signal::SIGKILL);
                    let _ = waitpid(inc.server.pid, None);
                }
                match &current {
                    Some(s) => {
                        let _ = kill(s.pid, Signal::SIGTERM);
                    }
                    None => return Ok(0),
                }
            }
            Event::Signal(Signal::SIGHUP) => {
                if let Some(s) = &current {
                    let _ = kill(s.pid, Signal::SIGHUP);
                }
            }
            Event::Signal(Signal::SIGUSR2) => {
                if incoming.is_some() || current.is_none() || !serving {
                    tracing::warn!("SIGUSR2: a handover is already under way, or nothing serves yet");
                    continue;
                }
                match start_takeover(&start, &connection, &checkpoint) {
                    Ok(server) => {
                        tracing::info!(
                            pid = server.pid.as_raw(),
                            "restart: starting a new server from {}",
                            command.exe.display()
                        );
                        incoming = Some(Incoming {
                            server,
                            reason: "restart",
                            old_pid: current.as_ref().map_or(0, |s| s.pid.as_raw() as u32),
                            since: None,
                        });
                    }
                    Err(e) => tracing::error!("restart: {e}; the running server goes on"),
                }
            }
            Event::Signal(Signal::SIGCHLD) => loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => {
                        if let Some(pid) = status.pid() {
                            exited.push((pid, status, Instant::now()));
                        }
                    }
                }
            },
            Event::Closed(pid) => {
                closed.insert(pid);
            }
            Event::Signal(other) => tracing::debug!("ignored {other}"),
        }
        // A server's death is acted on only once every message it sent
        // has been read (its socket reached end of file): a checkpoint it
        // sent just before it died must not be lost to the race between
        // SIGCHLD and the reader thread.
        while let Some(i) = exited
            .iter()
            .position(|(pid, _, at)| closed.contains(pid) || at.elapsed() >= DRAIN_LIMIT)
        {
            let (pid, status, _) = exited.swap_remove(i);
            if !closed.remove(&pid) {
                tracing::warn!("pid {pid}'s socket is still open after it died; going on without its last messages");
            }
            let code = match status {
                WaitStatus::Exited(_, code) => code,
                _ => 128 + 9,
            };
            if let Some(inc) = incoming.take_if(|i| i.server.pid == pid) {
                tracing::error!("the new server (pid {pid}) ended before it was ready: {status:?}");
                if current.is_some() {
                    tracing::error!("restart failed; the running server goes on");
                    continue;
                }
                // A crash handover whose new server failed too: try
                // again; requests have been waiting since the crash.
                crashes.push_back(Instant::now());
                let mut again = respawn(&start, &connection, &checkpoint, &mut crashes, inc.old_pid)?;
                again.since = inc.since;
                incoming = Some(again);
                continue;
            }
            if let Some(dead) = current.take_if(|s| s.pid == pid) {
                if stopping || !serving || matches!(status, WaitStatus::Exited(_, 0)) {
                    // Stopped, unmounted from outside, or never got going
                    // (it told `nvlibfs mount` why).
                    return Ok(code);
                }
                tracing::error!("the server (pid {pid}) died: {status:?}; starting another to take over");
                if dead.serving_since.is_none_or(|t| t.elapsed() < EARLY_DEATH) {
                    crashes.push_back(Instant::now());
                }
                let mut inc = respawn(&start, &connection, &checkpoint, &mut crashes, pid.as_raw() as u32)?;
                inc.since = Some((Instant::now(), SystemTime::now()));
                incoming = Some(inc);
            }
        }
    }
}

fn respawn(
    start: &StartServer<'_>,
    connection: &Option<Message>,
    checkpoint: &[Message],
    crashes: &mut VecDeque<Instant>,
    old_pid: u32,
) -> Result<Incoming, DaemonError> {
    while crashes.front().is_some_and(|t| t.elapsed() > CRASH_WINDOW) {
        crashes.pop_front();
    }
    if crashes.len() > MAX_CRASHES {
        return Err(DaemonError::new(format!(
            "the server died {} times within {} s; giving up (the mount ends with this process)",
            crashes.len(),
            CRASH_WINDOW.as_secs()
        )));
    }
    Ok(Incoming {
        server: start_takeover(start, connection, checkpoint)?,
        reason: "crash",
        old_pid,
        since: None,
    })
}

/// Starts a server that takes over: it gets the connection and the newest
/// checkpoint as they came.
fn start_takeover(
    start: &StartServer<'_>,
    connection: &Option<Message>,
    checkpoint: &[Message],
) -> Result<Server, DaemonError> {
    let (Some(connection), false) = (connection, checkpoint.is_empty()) else {
        return Err(DaemonError::new("no connection and checkpoint to hand over yet"));
    };
    let server = start(true, None)?;
    for m in std::iter::once(connection).chain(checkpoint) {
        let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(|f| f.as_fd()).collect();
        handover::send(&server.sock, m.tag, &m.body, &fds)
            .map_err(|e| DaemonError::new(format!("handing the state to pid {}: {e}", server.pid)))?;
    }
    Ok(server)
}

fn spawn(
    command: &ServerCommand,
    mountpoint: &Path,
    lock: BorrowedFd<'_>,
    takeover: bool,
    ready: Option<BorrowedFd<'_>>,
    events: mpsc::Sender<Event>,
) -> Result<Server, DaemonError> {
    let (ours, theirs) = handover::pair().map_err(|e| DaemonError::new(format!("a socket for the server: {e}")))?;
    let mut cmd = std::process::Command::new(&command.exe);
    cmd.args(&command.args)
        .arg("--supervisor-socket")
        .arg(theirs.as_raw_fd().to_string());
    if takeover {
        cmd.arg("--takeover");
    }
    if let Some(fd) = ready {
        cmd.arg("--ready-fd").arg(fd.as_raw_fd().to_string());
    }
    cmd.arg(mountpoint);
    // The supervisor tells systemd; a server's word would be refused.
    cmd.env_remove("NOTIFY_SOCKET");
    let inherit: Vec<i32> = [
        Some(theirs.as_raw_fd()),
        Some(lock.as_raw_fd()),
        ready.map(|f| f.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    .collect();
    // SAFETY: only async-signal-safe calls between fork and exec. The
    // signal mask is inherited: the server sets its own.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                let fd = BorrowedFd::borrow_raw(fd);
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            }
            nix::sys::signal::SigSet::all().thread_unblock()?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| DaemonError::new(format!("starting {}: {e}", command.exe.display())))?;
    drop(theirs);
    let pid = Pid::from_raw(child.id() as i32);
    let reader = ours
        .try_clone()
        .map_err(|e| DaemonError::new(format!("a socket for the server: {e}")))?;
    std::thread::Builder::new()
        .name(format!("server-{pid}"))
        .spawn(move || {
            while let Ok(Some(m)) = handover::recv(&reader) {
                if events.send(Event::Message(pid, m)).is_err() {
                    return;
                }
            }
            let _ = events.send(Event::Closed(pid));
        })
        .map_err(|e| DaemonError::new(format!("starting a reader thread: {e}")))?;
    Ok(Server {
        pid,
        sock: ours,
        serving_since: None,
    })
}
