//! The supervisor: the process that holds what must outlive any one
//! server, and hands the connection from one server to the next.
//!
//! It takes the mount point's lock, starts the first server (which scans,
//! mounts and hands back the FUSE connection and a checkpoint), and from
//! then on keeps what the last acknowledged checkpoint needs (kept.rs).
//! While it holds the connection the kernel keeps the mount alive, and
//! requests wait in the kernel instead of failing.
//!
//! Its life is one state machine, `Phase`:
//!
//! | phase | what happens | next |
//! |---|---|---|
//! | `Mounting` | the first server scans and mounts | `Serving` when it is ready; exit if it fails |
//! | `Serving` | one server serves | `Restarting` on SIGUSR2, `Recovering` when the server dies, `Stopping` on SIGTERM |
//! | `Restarting(Freezing)` | the old server stops re-pinning and sends its final checkpoint | `Preparing` when frozen; `Serving` (old) if it cannot; `Recovering` if it dies |
//! | `Restarting(Preparing)` | the new binary restores that checkpoint exactly, or refuses | `Overlap` when prepared; `Serving` (old, thawed) if refused |
//! | `Restarting(Overlap)` | both serve the same frozen state | `Draining` once the new one answers |
//! | `Restarting(Draining)` | the old server answers what it holds and stops reading | `Serving` (new) when drained |
//! | `Recovering` | the server died: a new one from the binary that wrote the checkpoint restores it; the kernel resends what the dead one held, then the new one serves | `Serving` when it answers |
//! | `HandingOver` | another daemon (`--take-over`) takes over: freeze, hand it the lock and what is kept, both servers serve, ours drains (the same steps as a restart, the new server the other daemon's) | `HandedOver` when drained; `Serving` (thawed) if it refuses or goes away before its server reads |
//! | `Joining` | this daemon takes over (`--take-over`): its server restores what the other handed over, serves beside the other's, then alone | `Serving` when the other's has drained; exit 1 if refused |
//! | `HandedOver` | nothing here serves; the lock is the other daemon's | exit 0 (in the foreground: once stopped), never unmounting |
//! | `Stopping` | the server unmounts | exit |
//!
//! A crash restarts the binary that wrote the checkpoint, held open since
//! it was started, whatever the path names since (a package upgrade puts
//! a new binary there); only `nvlibfs restart` moves to the binary on
//! disk, and only if it takes the checkpoint exactly.
//!
//! Signals: SIGTERM and SIGINT stop the server (which unmounts) and then
//! the supervisor, unless another daemon has taken over (then nothing is
//! unmounted); SIGHUP is passed to the server (re-check the module);
//! SIGUSR2 restarts; SIGUSR1 and SIGPIPE are ignored.

use crate::daemon::{DaemonError, MountLock, Readiness};
use crate::fdstore;
use crate::kept::{Kept, Taken};
use crate::protocol::{self, Message, ProtocolError, Tag};
use crate::systemd;
use crate::takeover::{self, InitRecord};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nvlibfs::control::Handover;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
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
const CLOSE_LIMIT: Duration = Duration::from_secs(1);
/// How long each step of a restart may take before it is given up: a
/// server that neither freezes, prepares nor drains by then is stuck.
const STEP_LIMIT: Duration = Duration::from_secs(20);

enum Event {
    Signal(Signal),
    Message(Pid, Message),
    /// A server sent something that breaks the protocol.
    Broken(Pid, String),
    /// The server's socket reached end of file: every message it sent
    /// has come before this.
    Closed(Pid),
    /// Another daemon offers to take over (peer.rs).
    Offered(OwnedFd, protocol::Offer),
    /// The other supervisor of a takeover said something (by peer number).
    Peer(u64, Message),
    /// ... or went away.
    PeerGone(u64, String),
}

/// The other supervisor of a takeover: the one taking over, or the one
/// taken over.
struct Peer {
    id: u64,
    sock: OwnedFd,
    pid: u32,
}

impl Peer {
    fn send(&self, tag: Tag, body: &[u8]) {
        if let Err(e) = protocol::send(&self.sock, tag, body, &[]) {
            tracing::error!("telling the other daemon (pid {}): {e}", self.pid);
        }
    }
}

/// Where a takeover is, on either side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handing {
    /// Taken over: our server takes its final checkpoint.
    Freezing,
    /// The other side's server restores it.
    Preparing,
    /// Both servers serve the frozen state.
    Overlap,
    /// The old server answers what it holds and stops reading.
    Draining,
}

/// A binary servers are started from, held open.
struct Binary {
    file: std::fs::File,
    path: PathBuf,
}

impl Binary {
    fn open(path: &Path) -> std::io::Result<Binary> {
        Ok(Binary {
            file: std::fs::File::open(path)?,
            path: path.to_owned(),
        })
    }

    /// The supervisor's own binary, as it runs (not as the path names it now).
    fn running(path: &Path) -> std::io::Result<Binary> {
        Ok(Binary {
            file: std::fs::File::open("/proc/self/exe")?,
            path: path.to_owned(),
        })
    }
}

/// A server process and the supervisor's end of its socket.
struct Server {
    pid: Pid,
    sock: OwnedFd,
    binary: Rc<Binary>,
    /// When it started answering.
    serving_since: Option<Instant>,
    /// Its version, as it said when ready.
    version: Option<String>,
}

impl Server {
    fn send(&self, tag: Tag, body: &[u8]) {
        if let Err(e) = protocol::send(&self.sock, tag, body, &[]) {
            tracing::error!("telling pid {}: {e}", self.pid);
        }
    }

    fn kill(&self, signal: Signal) {
        let _ = kill(self.pid, signal);
    }
}

enum Step {
    Freezing,
    Preparing(Server),
    Overlap(Server),
    Draining(Server),
}

enum Phase {
    Mounting(Server),
    Serving(Server),
    Restarting {
        old: Server,
        step: Step,
        binary: Rc<Binary>,
        since: Instant,
    },
    Recovering {
        new: Server,
        reason: &'static str,
        old_pid: u32,
        since: (Instant, SystemTime),
    },
    /// Another daemon takes over from this one.
    HandingOver {
        old: Server,
        peer: Peer,
        step: Handing,
        since: Instant,
    },
    /// This daemon takes over from another (`--take-over`).
    Joining {
        new: Server,
        peer: Peer,
        step: Handing,
        since: Instant,
    },
    /// `systemctl restart` where systemd keeps the fd store across it: the
    /// server takes its final checkpoint into the store and drains, and
    /// this daemon exits without unmounting; the one systemd starts next
    /// takes the connection over from the store.
    Leaving {
        old: Server,
        step: Handing,
        since: Instant,
    },
    /// Handed over: the old server, drained, is ending; nothing here
    /// serves or unmounts any more.
    HandedOver(Option<Server>),
    Stopping(Option<Server>),
    /// Transient, while a transition moves servers out of the phase.
    Moving,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Mounting(_) => "mounting",
            Phase::Serving(_) => "serving",
            Phase::Restarting { step, .. } => match step {
                Step::Freezing => "restarting (freezing)",
                Step::Preparing(_) => "restarting (preparing)",
                Step::Overlap(_) => "restarting (overlap)",
                Step::Draining(_) => "restarting (draining)",
            },
            Phase::Recovering { .. } => "recovering",
            Phase::HandingOver { .. } => "handing over",
            Phase::Joining { .. } => "taking over",
            Phase::Leaving { .. } => "leaving for systemd's restart",
            Phase::HandedOver(_) => "handed over",
            Phase::Stopping(_) => "stopping",
            Phase::Moving => "moving",
        }
    }
}

/// How to start a server: the flags the supervisor was given.
pub struct ServerCommand {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub mountpoint: PathBuf,
    /// Act as on a kernel without FUSE_NOTIFY_RESEND.
    pub no_resend: bool,
    /// Where the takeover socket is (the servers' --state-dir).
    pub state_dir: PathBuf,
    /// Take the mount point over from the daemon serving it.
    pub take_over: bool,
    /// Run in the foreground (systemd, a container): once taken over, wait
    /// to be stopped instead of exiting, so that a platform that restarts
    /// what exits (a DaemonSet's pod) does not start this daemon again.
    pub foreground: bool,
}

pub fn run(command: ServerCommand, mut ready: Readiness) -> Result<(), DaemonError> {
    match Supervisor::start(command, &mut ready).and_then(|s| s.run(&mut ready)) {
        Ok(0) => Ok(()),
        Ok(code) => Err(DaemonError::new(format!("the server exited with status {code}"))),
        Err(e) => {
            ready.send(&format!("error: {e}"));
            Err(e)
        }
    }
}

struct Supervisor {
    command: ServerCommand,
    mountpoint: PathBuf,
    /// Left to the successor, not unlocked, once handed over.
    lock: Option<MountLock>,
    /// Numbers the peers of takeovers, so a gone one's messages are told apart.
    peers: u64,
    events: mpsc::Sender<Event>,
    event: mpsc::Receiver<Event>,
    kept: Kept,
    store: fdstore::Store,
    /// The binary that wrote the checkpoint: what a crash restarts.
    binary: Rc<Binary>,
    phase: Phase,
    history: Vec<Handover>,
    crashes: VecDeque<Instant>,
    /// Whether any server has served yet (systemd's READY=1 once).
    served: bool,
    /// A takeover this daemon made is done: `nvlibfs mount` hears "ready".
    joined: bool,
    /// Stopped while handing over: exit once handed over, whatever
    /// `foreground` says.
    stop_requested: bool,
    exited: Vec<(Pid, WaitStatus, Instant)>,
    closed: HashSet<Pid>,
    /// Where this supervisor listens for a takeover, and that file's inode:
    /// removed when it ends, unless a successor listens there now.
    takeover_socket: Option<(PathBuf, u64)>,
}

impl Supervisor {
    fn start(command: ServerCommand, ready: &mut Readiness) -> Result<Supervisor, DaemonError> {
        crate::privileges::check_can_mount()?;
        let mountpoint = crate::layout::absolute(&command.mountpoint).map_err(DaemonError::new)?;
        let takeover_path = crate::peer::path(&command.state_dir, &mountpoint);
        // Every generation's files are held here too, and a takeover
        // receives them all at once: a limit too low would truncate them.
        crate::daemon::raise_file_limit();
        // Taking over: the running daemon hands the lock on with the rest.
        // With nothing to take over, --take-over mounts: what every pod of a
        // DaemonSet can run, the first on a node as well as the next.
        let offered = match command.take_over {
            true => crate::peer::offer(&takeover_path)?,
            false => None,
        };
        if command.take_over && offered.is_none() {
            tracing::info!(
                "--take-over: no daemon answers for {}; mounting it",
                mountpoint.display()
            );
        }
        let (lock, joining) = match offered {
            Some(sock) => {
                let handed = join(sock, &mountpoint)?;
                (
                    handed.lock,
                    Some((handed.sock, handed.pid, handed.kept, handed.history)),
                )
            }
            None => (MountLock::take(&mountpoint)?, None),
        };
        lower_oom_score();
        let events = signal_thread()?;
        let (events, event) = events;
        let binary = Rc::new(
            Binary::running(&command.exe)
                .map_err(|e| DaemonError::new(format!("holding this binary ({}): {e}", command.exe.display())))?,
        );
        let mut supervisor = Supervisor {
            command,
            mountpoint,
            lock: Some(lock),
            peers: 0,
            events,
            event,
            kept: Kept::default(),
            store: fdstore::Store::default(),
            binary,
            phase: Phase::Moving,
            history: Vec::new(),
            crashes: VecDeque::new(),
            served: false,
            joined: false,
            stop_requested: false,
            exited: Vec::new(),
            closed: HashSet::new(),
            takeover_socket: None,
        };
        supervisor.phase = match (joining, fdstore::restore()) {
            (Some((sock, pid, kept, history)), _) => {
                supervisor.kept = kept;
                supervisor.history = history;
                let peer = supervisor.peer(sock, pid);
                let new = supervisor.start_successor(&supervisor.binary.clone())?;
                tracing::info!(
                    old = peer.pid,
                    new = new.pid.as_raw(),
                    "take-over: starting a server on the running daemon's final checkpoint"
                );
                Phase::Joining {
                    new,
                    peer,
                    step: Handing::Preparing,
                    since: Instant::now(),
                }
            }
            // The whole daemon died; systemd kept the connection: take it over.
            (None, Ok(Some((kept, store)))) => {
                tracing::warn!("systemd kept the FUSE connection of a supervisor that is gone; taking it over");
                supervisor.kept = kept;
                supervisor.store = store;
                let new = supervisor.start_successor(&supervisor.binary.clone())?;
                Phase::Recovering {
                    new,
                    reason: "supervisor restart",
                    old_pid: 0,
                    since: (Instant::now(), SystemTime::now()),
                }
            }
            (None, Ok(None)) => Phase::Mounting(supervisor.spawn(&supervisor.binary.clone(), false, ready.fd())?),
            (None, Err(e)) => {
                tracing::error!("what systemd kept cannot be used ({e}); mounting afresh");
                Phase::Mounting(supervisor.spawn(&supervisor.binary.clone(), false, ready.fd())?)
            }
        };
        // The first server answers `nvlibfs mount` itself; a takeover is
        // answered once it is done.
        if !matches!(supervisor.phase, Phase::Joining { .. }) {
            supervisor.listen_for_takeovers()?;
            ready.close();
        }
        Ok(supervisor)
    }

    /// Listens for a daemon that would take this one over. A daemon that is
    /// taking another over listens only once that is done: until then the
    /// other may go on serving (a takeover given up), and its socket, which
    /// this one's would replace, must stay where the next daemon looks.
    fn listen_for_takeovers(&mut self) -> Result<(), DaemonError> {
        let path = crate::peer::path(&self.command.state_dir, &self.mountpoint);
        let listener = crate::peer::listen_at(&path)?;
        self.takeover_socket = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (path.clone(), std::os::unix::fs::MetadataExt::ino(&m)));
        let events = self.events.clone();
        crate::peer::accept_loop(listener, move |sock| match read_offer(&sock) {
            Ok(offer) => {
                let _ = events.send(Event::Offered(sock, offer));
            }
            Err(e) => tracing::warn!("a takeover that did not offer: {e}"),
        });
        Ok(())
    }

    /// A peer of a takeover, read by a thread of its own.
    fn peer(&mut self, sock: OwnedFd, pid: u32) -> Peer {
        self.peers += 1;
        let id = self.peers;
        match sock.try_clone() {
            Ok(reader) => {
                let events = self.events.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("peer-{pid}"))
                    .spawn(move || read_peer(id, &reader, &events));
                if let Err(e) = spawned {
                    tracing::error!("starting a reader for pid {pid}: {e}");
                }
            }
            Err(e) => tracing::error!("a reader for pid {pid}: {e}"),
        }
        Peer { id, sock, pid }
    }

    fn run(mut self, ready: &mut Readiness) -> Result<i32, DaemonError> {
        let ended = self.serve(ready);
        // Not handed on: nothing of this daemon holds the mount point once
        // its servers are gone, and the lock file goes with it, and the
        // takeover socket (a successor's would be another file).
        if let Some(lock) = self.lock.take() {
            lock.remove();
            if let Some((path, ino)) = self.takeover_socket.take() {
                let ours =
                    std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino);
                if ours {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        ended
    }

    fn serve(&mut self, ready: &mut Readiness) -> Result<i32, DaemonError> {
        loop {
            let timeout = if self.exited.is_empty() {
                Duration::from_millis(500)
            } else {
                CLOSE_LIMIT / 10
            };
            let event = match self.event.recv_timeout(timeout) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(DaemonError::new("the supervisor's event channel closed"));
                }
            };
            match event {
                Some(Event::Signal(Signal::SIGCHLD)) => self.reap(),
                Some(Event::Closed(pid)) => {
                    self.closed.insert(pid);
                }
                Some(Event::Broken(pid, why)) => {
                    tracing::error!("pid {pid}: {why}");
                    // Only a server this supervisor still runs can be
                    // sending a checkpoint it would spoil.
                    if self.server(pid).is_some() {
                        self.kept.broken(why);
                    }
                }
                Some(Event::Message(pid, m)) => self.message(pid, m)?,
                Some(Event::Signal(signal)) => {
                    if let Some(code) = self.signal(signal)? {
                        return Ok(code);
                    }
                }
                Some(Event::Offered(sock, offer)) => self.offered(sock, offer),
                Some(Event::Peer(id, m)) => {
                    if let Some(code) = self.peer_said(id, m)? {
                        return Ok(code);
                    }
                }
                Some(Event::PeerGone(id, why)) => {
                    if let Some(code) = self.peer_gone(id, why)? {
                        return Ok(code);
                    }
                }
                None => {
                    if let Some(code) = self.check_step_limit()? {
                        return Ok(code);
                    }
                }
            }
            if std::mem::take(&mut self.joined) {
                ready.send("ready");
            }
            // A server's death is acted on only once every message it sent
            // has been read (its socket reached end of file): a checkpoint it
            // sent just before it died must not be lost to the race between
            // SIGCHLD and the reader thread.
            while let Some(i) =
                (self.exited.iter()).position(|(pid, _, at)| self.closed.contains(pid) || at.elapsed() >= CLOSE_LIMIT)
            {
                let (pid, status, _) = self.exited.swap_remove(i);
                if !self.closed.remove(&pid) {
                    tracing::warn!(
                        "pid {pid}'s socket is still open after it died; going on without its last messages"
                    );
                }
                if let Some(code) = self.exit(pid, status)? {
                    return Ok(code);
                }
            }
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        self.exited.push((pid, status, Instant::now()));
                    }
                }
            }
        }
    }

    /// The server whose checkpoints are kept: the one serving, or the
    /// new one after a crash.
    fn message(&mut self, pid: Pid, m: Message) -> Result<(), DaemonError> {
        match m.tag {
            Tag::Connection | Tag::Generation | Tag::Checkpoint => {
                if self.server(pid).is_none() {
                    tracing::warn!("a checkpoint from pid {pid}, which this supervisor does not run");
                    return Ok(());
                }
                let answer = match self.kept.take(m) {
                    Ok(Taken::Nothing) => return Ok(()),
                    Ok(Taken::Answer(answer)) => answer,
                    Err(e) => {
                        tracing::error!("pid {pid}: {e}");
                        return Ok(());
                    }
                };
                let server = self.server(pid).expect("checked above");
                if let Err(e) = protocol::send_message(&server.sock, &answer) {
                    tracing::error!("answering pid {pid}'s checkpoint: {e}");
                }
                if answer.tag == Tag::Ack {
                    if let Err(e) = self.store.save(&self.kept) {
                        tracing::error!("keeping the state in systemd's fd store: {e}");
                    }
                    tracing::debug!(descriptors = self.kept.descriptors(), "checkpoint kept");
                }
                Ok(())
            }
            Tag::Ready => self.ready(pid, m),
            Tag::Frozen => self.frozen(pid),
            Tag::Prepared => self.prepared(pid),
            Tag::Refused => self.refused(pid, m.text()),
            Tag::Drained => {
                self.drained(pid);
                Ok(())
            }
            other => {
                tracing::warn!("unexpected message {other:?} from pid {pid}");
                Ok(())
            }
        }
    }

    fn server(&self, pid: Pid) -> Option<&Server> {
        let candidates: [Option<&Server>; 2] = match &self.phase {
            Phase::Mounting(s) | Phase::Serving(s) => [Some(s), None],
            Phase::Restarting { old, step, .. } => [Some(old), step_server(step)],
            Phase::Recovering { new, .. } => [Some(new), None],
            Phase::HandingOver { old, .. } | Phase::Leaving { old, .. } => [Some(old), None],
            Phase::Joining { new, .. } => [Some(new), None],
            Phase::HandedOver(s) | Phase::Stopping(s) => [s.as_ref(), None],
            Phase::Moving => [None, None],
        };
        candidates.into_iter().flatten().find(|s| s.pid == pid)
    }

    fn ready(&mut self, pid: Pid, m: Message) -> Result<(), DaemonError> {
        let said: protocol::Ready = serde_json::from_slice(&m.body).unwrap_or(protocol::Ready {
            version: "unknown".into(),
            status: format!("serving at {}", self.mountpoint.display()),
        });
        if !self.served {
            if let Err(e) = crate::logging::open_file() {
                tracing::warn!("{e}");
            }
            systemd::notify(&format!("READY=1\nSTATUS={}", said.status));
            self.served = true;
        } else {
            systemd::notify(&format!("STATUS={}", said.status));
        }
        self.phase = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Mounting(mut server) if server.pid == pid => {
                server.ready(said.version);
                // Only takeovers are started from here on: what a mount
                // needs beyond them is dropped.
                crate::privileges::drop_for_supervisor();
                Phase::Serving(server)
            }
            Phase::Recovering {
                mut new,
                reason,
                old_pid,
                since,
            } if new.pid == pid => {
                new.ready(said.version);
                self.record(reason, old_pid, &new, since.1, since.0.elapsed(), None);
                self.binary = new.binary.clone();
                Phase::Serving(new)
            }
            Phase::Restarting {
                old,
                step: Step::Overlap(mut new),
                binary,
                ..
            } if new.pid == pid => {
                // Both serve the same state now: the old one stops reading
                // and answers what it holds.
                new.ready(said.version);
                tracing::info!(
                    old = old.pid.as_raw(),
                    new = pid.as_raw(),
                    "restart: the new server answers; draining the old one"
                );
                old.send(Tag::Drain, &[]);
                Phase::Restarting {
                    old,
                    step: Step::Draining(new),
                    binary,
                    since: Instant::now(),
                }
            }
            Phase::Joining {
                mut new,
                peer,
                step: Handing::Overlap,
                ..
            } if new.pid == pid => {
                new.ready(said.version);
                tracing::info!(
                    old = peer.pid,
                    new = pid.as_raw(),
                    "take-over: this daemon's server answers; the other daemon drains its own"
                );
                peer.send(Tag::Ready, &[]);
                Phase::Joining {
                    new,
                    peer,
                    step: Handing::Draining,
                    since: Instant::now(),
                }
            }
            other => other,
        };
        self.send_history();
        Ok(())
    }

    /// The old server's final checkpoint is kept: start the new binary on it.
    fn frozen(&mut self, pid: Pid) -> Result<(), DaemonError> {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Restarting {
                old,
                step: Step::Freezing,
                binary,
                ..
            } if old.pid == pid => match self.start_successor(&binary) {
                Ok(new) => {
                    tracing::info!(
                        pid = new.pid.as_raw(),
                        checkpoint = self.kept.checkpoint().map_or(0, |(m, _)| m.seq),
                        "restart: starting {} on the old server's final checkpoint",
                        binary.path.display()
                    );
                    Phase::Restarting {
                        old,
                        step: Step::Preparing(new),
                        binary,
                        since: Instant::now(),
                    }
                }
                Err(e) => {
                    self.give_up_restart(old, New::None, false, e.to_string());
                    return Ok(());
                }
            },
            Phase::Leaving {
                old,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => {
                // The final checkpoint is acknowledged, so it is in the
                // store: what the next daemon takes over.
                old.send(Tag::Drain, &[]);
                Phase::Leaving {
                    old,
                    step: Handing::Draining,
                    since: Instant::now(),
                }
            }
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => match self.hand_over(&peer) {
                Ok(()) => Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Preparing,
                    since: Instant::now(),
                },
                Err(e) => {
                    let why = format!("handing over: {e}");
                    peer.send(Tag::Refused, why.as_bytes());
                    self.give_up_takeover(old, &peer, false, why);
                    return Ok(());
                }
            },
            other => other,
        };
        Ok(())
    }

    /// What a takeover hands on: the mount point's lock, then everything
    /// kept, as a new server of this daemon's own would get it.
    fn hand_over(&self, peer: &Peer) -> Result<(), ProtocolError> {
        let lock = self
            .lock
            .as_ref()
            .ok_or_else(|| ProtocolError("the mount point's lock was handed on already".into()))?;
        protocol::send(&peer.sock, Tag::Lock, &[], &[lock.as_fd()])?;
        // The mount's handovers so far, so that `status` goes on listing them.
        let history = serde_json::to_vec(&self.history).map_err(|e| ProtocolError(e.to_string()))?;
        protocol::send(&peer.sock, Tag::History, &history, &[])?;
        self.kept.replay(&peer.sock)?;
        tracing::info!(
            pid = peer.pid,
            checkpoint = self.kept.checkpoint().map_or(0, |(m, _)| m.seq),
            descriptors = self.kept.descriptors(),
            "take-over: handed the connection and the final checkpoint over"
        );
        Ok(())
    }

    /// A new server restored the state exactly: let it read the connection.
    fn prepared(&mut self, pid: Pid) -> Result<(), DaemonError> {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Restarting {
                old,
                step: Step::Preparing(new),
                binary,
                ..
            } if new.pid == pid => {
                // The old server answers until the new one does: no request
                // waits, none is resent.
                new.send(Tag::Go, &[protocol::GO_BESIDE]);
                Phase::Restarting {
                    old,
                    step: Step::Overlap(new),
                    binary,
                    since: Instant::now(),
                }
            }
            other => other,
        };
        if let Phase::Recovering { new, .. } = &self.phase {
            if new.pid == pid {
                // The dead server's unanswered requests go back in the
                // queue before anybody reads it again.
                self.resend();
                new.send(Tag::Go, &[protocol::GO_ALONE]);
            }
        }
        if let Phase::Joining { new, peer, step, since } = &mut self.phase {
            if new.pid == pid && *step == Handing::Preparing {
                // As in a restart: the old server answers until ours does.
                peer.send(Tag::Prepared, &[]);
                new.send(Tag::Go, &[protocol::GO_BESIDE]);
                *step = Handing::Overlap;
                *since = Instant::now();
            }
        }
        Ok(())
    }

    /// A server cannot do what a restart asked of it.
    fn refused(&mut self, pid: Pid, why: String) -> Result<(), DaemonError> {
        tracing::error!("pid {pid} refused: {why}");
        // After a crash there is nobody to go back to: the server that
        // refused dies, and `exit` starts another or gives up.
        if let Phase::Recovering { new, .. } = &self.phase {
            if new.pid == pid {
                new.kill(Signal::SIGKILL);
            }
            return Ok(());
        }
        // A takeover this daemon cannot make exactly is not made: the
        // other daemon thaws and serves on.
        if let Phase::Joining { new, peer, .. } = &self.phase {
            if new.pid == pid {
                peer.send(Tag::Refused, why.as_bytes());
                new.kill(Signal::SIGKILL);
                return Err(DaemonError::new(format!(
                    "--take-over refused: {why}; the running daemon (pid {}) serves on",
                    peer.pid
                )));
            }
        }
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            // The old server could not take its final checkpoint; it has
            // thawed itself.
            Phase::Restarting {
                old,
                step: Step::Freezing,
                ..
            } if old.pid == pid => {
                self.phase = Phase::Serving(old);
                self.refusal(pid, 0, why);
            }
            Phase::Restarting {
                old,
                step: Step::Preparing(new),
                ..
            } if new.pid == pid => self.give_up_restart(old, New::Running(&new), false, why),
            // No final checkpoint, so nothing to leave in the store: the
            // restart is a stop after all, which unmounts.
            Phase::Leaving {
                old,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => {
                tracing::error!("cannot leave the connection to systemd's restart ({why}); unmounting");
                old.kill(Signal::SIGTERM);
                self.phase = Phase::Stopping(Some(old));
            }
            // Our server could not take its final checkpoint; it has
            // thawed itself.
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Freezing,
                ..
            } if old.pid == pid => {
                peer.send(Tag::Refused, why.as_bytes());
                self.give_up_takeover(old, &peer, false, why);
            }
            other => self.phase = other,
        }
        Ok(())
    }

    /// The old server answered everything it held and reads no more: the
    /// new one serves alone.
    fn drained(&mut self, pid: Pid) {
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Restarting {
                old,
                step: Step::Draining(new),
                binary,
                ..
            } if old.pid == pid => self.restarted(old, new, binary),
            Phase::Leaving {
                old,
                step: Handing::Draining,
                ..
            } if old.pid == pid => {
                tracing::info!("drained; the connection waits in systemd's fd store for the next daemon");
                self.stop_requested = true;
                self.phase = Phase::HandedOver(Some(old));
            }
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Draining,
                ..
            } if old.pid == pid => {
                tracing::info!(
                    pid = peer.pid,
                    "take-over: drained; the other daemon serves this mount point now"
                );
                peer.send(Tag::Drained, &(old.pid.as_raw() as u64).to_le_bytes());
                self.phase = Phase::HandedOver(Some(old));
            }
            other => self.phase = other,
        }
    }

    /// Another daemon offers to take over: only from one server serving,
    /// with everything kept, and a daemon of this protocol.
    fn offered(&mut self, sock: OwnedFd, offer: protocol::Offer) {
        let refuse = |why: String| {
            tracing::warn!(
                "refused a takeover by pid {} (nvlibfs {}): {why}",
                offer.pid,
                offer.version
            );
            let _ = protocol::send(&sock, Tag::Refused, why.as_bytes(), &[]);
        };
        if offer.protocol != protocol::VERSION {
            return refuse(format!(
                "it speaks handover protocol {} and this daemon {}: a takeover must restore the state exactly, \
                 so it is refused; stop this daemon and mount afresh",
                offer.protocol,
                protocol::VERSION
            ));
        }
        let server = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Serving(server) if self.kept.complete() => server,
            other => {
                let why = format!("this daemon is {}; a takeover needs one server serving", other.name());
                self.phase = other;
                return refuse(why);
            }
        };
        tracing::info!(
            pid = offer.pid,
            version = %offer.version,
            "take-over: another daemon takes over; freezing pid {}",
            server.pid
        );
        server.send(Tag::Freeze, &[]);
        let peer = self.peer(sock, offer.pid);
        self.phase = Phase::HandingOver {
            old: server,
            peer,
            step: Handing::Freezing,
            since: Instant::now(),
        };
    }

    /// A message from the other daemon of a takeover.
    fn peer_said(&mut self, id: u64, m: Message) -> Result<Option<i32>, DaemonError> {
        let current = match &self.phase {
            Phase::HandingOver { peer, .. } | Phase::Joining { peer, .. } => peer.id == id,
            _ => false,
        };
        if !current {
            tracing::debug!("{:?} from a takeover that is over", m.tag);
            return Ok(None);
        }
        self.phase = match (std::mem::replace(&mut self.phase, Phase::Moving), m.tag) {
            (
                Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Preparing,
                    ..
                },
                Tag::Prepared,
            ) => Phase::HandingOver {
                old,
                peer,
                step: Handing::Overlap,
                since: Instant::now(),
            },
            (
                Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Overlap,
                    ..
                },
                Tag::Ready,
            ) => {
                tracing::info!(
                    pid = peer.pid,
                    "take-over: the other daemon's server answers; draining ours"
                );
                old.send(Tag::Drain, &[]);
                Phase::HandingOver {
                    old,
                    peer,
                    step: Handing::Draining,
                    since: Instant::now(),
                }
            }
            (Phase::HandingOver { old, peer, step, .. }, Tag::Refused) if step != Handing::Draining => {
                let why = format!("the daemon taking over (pid {}) refused: {}", peer.pid, m.text());
                self.give_up_takeover(old, &peer, step == Handing::Overlap, why);
                return Ok(None);
            }
            (
                Phase::Joining {
                    new,
                    peer,
                    step: Handing::Draining,
                    ..
                },
                Tag::Drained,
            ) => {
                let (old_server, _) = m.number().unwrap_or((0, &[]));
                self.joined(new, &peer, old_server as u32);
                return Ok(None);
            }
            (Phase::Joining { new, peer, .. }, Tag::Refused) => {
                new.kill(Signal::SIGKILL);
                return Err(DaemonError::new(format!(
                    "the daemon taken over (pid {}) gave up: {}",
                    peer.pid,
                    m.text()
                )));
            }
            (phase, tag) => {
                tracing::warn!("{tag:?} from the other daemon while {}", phase.name());
                phase
            }
        };
        Ok(None)
    }

    /// The other daemon of a takeover went away.
    fn peer_gone(&mut self, id: u64, why: String) -> Result<Option<i32>, DaemonError> {
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::HandingOver { old, peer, step, .. } if peer.id == id && step != Handing::Draining => {
                let why = format!("the daemon taking over (pid {}) went away: {why}", peer.pid);
                // If its server had begun to read, what it read goes back
                // in the queue for ours.
                self.give_up_takeover(old, &peer, step == Handing::Overlap, why);
            }
            Phase::Joining { new, peer, step, .. } if peer.id == id => {
                if step == Handing::Preparing {
                    new.kill(Signal::SIGKILL);
                    return Err(DaemonError::new(format!(
                        "the daemon taken over (pid {}) went away before this one was ready: {why}",
                        peer.pid
                    )));
                }
                // Ours serves already: what the other's server held (if it
                // died with it) goes back in the queue, and ours goes on.
                tracing::error!(
                    "the daemon taken over (pid {}) went away during the takeover: {why}; serving on",
                    peer.pid
                );
                self.resend();
                self.joined(new, &peer, 0);
            }
            other => {
                if let Phase::HandingOver { peer, .. } = &other {
                    tracing::error!(
                        "the daemon taking over (pid {}) went away while ours drained: {why}",
                        peer.pid
                    );
                }
                self.phase = other;
            }
        }
        Ok(None)
    }

    /// This daemon's takeover is done: its server serves alone.
    fn joined(&mut self, new: Server, peer: &Peer, old_server: u32) {
        new.send(Tag::Sole, &[]);
        self.record(
            "take-over",
            if old_server != 0 { old_server } else { peer.pid },
            &new,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        self.binary = new.binary.clone();
        crate::privileges::drop_for_supervisor();
        self.phase = Phase::Serving(new);
        if let Some(lock) = &mut self.lock {
            lock.take_sole();
        }
        if let Err(e) = self.listen_for_takeovers() {
            tracing::error!("{e}; a later --take-over will not find this daemon");
        }
        self.joined = true;
        self.send_history();
    }

    /// A takeover that cannot go on: our server thaws and serves on; what
    /// the other's read, if it had begun to read, goes back in the queue.
    fn give_up_takeover(&mut self, old: Server, peer: &Peer, other_read: bool, why: String) {
        if other_read {
            self.resend();
        }
        old.send(Tag::Thaw, &[]);
        let pid = old.pid;
        self.phase = Phase::Serving(old);
        self.refusal(pid, peer.pid, why);
    }

    /// Handed over and the old server gone: this daemon is done. In the
    /// foreground it waits to be stopped (a platform restarts what exits);
    /// either way the lock stays with the daemon that took over.
    fn handed_over(&mut self) -> Option<i32> {
        if self.command.foreground && !self.stop_requested {
            tracing::info!("handed over; nothing left to do here until this daemon is stopped");
            self.phase = Phase::HandedOver(None);
            return None;
        }
        if let Some(lock) = self.lock.take() {
            lock.leave_to_successor();
        }
        Some(0)
    }

    /// A restart is done: `new` serves alone, from `binary`.
    fn restarted(&mut self, old: Server, new: Server, binary: Rc<Binary>) {
        new.send(Tag::Sole, &[]);
        self.record(
            "restart",
            old.pid.as_raw() as u32,
            &new,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        self.binary = binary;
        self.phase = Phase::Serving(new);
        self.send_history();
    }

    fn signal(&mut self, signal: Signal) -> Result<Option<i32>, DaemonError> {
        match signal {
            Signal::SIGTERM | Signal::SIGINT => {
                systemd::notify("STOPPING=1");
                match std::mem::replace(&mut self.phase, Phase::Moving) {
                    // Another daemon serves: stopping this one unmounts nothing.
                    Phase::HandedOver(None) => {
                        self.stop_requested = true;
                        return Ok(self.handed_over());
                    }
                    Phase::HandedOver(Some(old)) => {
                        self.stop_requested = true;
                        self.phase = Phase::HandedOver(Some(old));
                        return Ok(None);
                    }
                    // Both servers serve or ours drains: too late to go
                    // back; this daemon goes once it has handed over.
                    Phase::HandingOver {
                        old,
                        peer,
                        step: step @ (Handing::Overlap | Handing::Draining),
                        since,
                    } => {
                        tracing::info!("{signal} while handing over: stopping once the other daemon serves");
                        self.stop_requested = true;
                        self.phase = Phase::HandingOver { old, peer, step, since };
                        return Ok(None);
                    }
                    // Not yet: the takeover is given up, and stopping means
                    // unmounting as ever.
                    Phase::HandingOver { old, peer, .. } => {
                        peer.send(Tag::Refused, format!("the daemon taken over got {signal}").as_bytes());
                        self.give_up_takeover(old, &peer, false, format!("{signal} before the handover"));
                    }
                    Phase::Joining { new, peer, .. } => {
                        new.kill(Signal::SIGKILL);
                        let _ = waitpid(new.pid, None);
                        peer.send(Tag::Refused, format!("the daemon taking over got {signal}").as_bytes());
                        return Err(DaemonError::new(format!("{signal} before the takeover was done")));
                    }
                    // A restart, not a stop, and systemd keeps the store
                    // across it: leave the connection to the next daemon.
                    Phase::Serving(server) if self.kept.complete() && systemd::restarting_with_store() => {
                        tracing::info!(
                            "systemd restarts this unit and keeps its fd store: handing the connection to the next \
                             daemon through it, without unmounting"
                        );
                        server.send(Tag::Freeze, &[]);
                        self.phase = Phase::Leaving {
                            old: server,
                            step: Handing::Freezing,
                            since: Instant::now(),
                        };
                        return Ok(None);
                    }
                    Phase::Leaving { old, step, since } => {
                        self.phase = Phase::Leaving { old, step, since };
                        return Ok(None);
                    }
                    other => self.phase = other,
                }
                let (serving, extra) = match std::mem::replace(&mut self.phase, Phase::Moving) {
                    Phase::Mounting(s) | Phase::Serving(s) => (Some(s), None),
                    Phase::Restarting { old, step, .. } => (
                        Some(old),
                        match step {
                            Step::Freezing => None,
                            Step::Preparing(s) | Step::Overlap(s) | Step::Draining(s) => Some(s),
                        },
                    ),
                    Phase::Recovering { new, .. } => (None, Some(new)),
                    Phase::Stopping(s) => (s, None),
                    Phase::HandingOver { .. }
                    | Phase::Joining { .. }
                    | Phase::Leaving { .. }
                    | Phase::HandedOver(_)
                    | Phase::Moving => (None, None),
                };
                // Stopping means unmounting: a server that was not yet
                // the one serving goes at once.
                if let Some(extra) = extra {
                    extra.kill(Signal::SIGKILL);
                    let _ = waitpid(extra.pid, None);
                }
                let Some(server) = serving else { return Ok(Some(0)) };
                server.kill(signal);
                self.phase = Phase::Stopping(Some(server));
            }
            Signal::SIGHUP => {
                if let Phase::Serving(s) = &self.phase {
                    s.kill(Signal::SIGHUP);
                }
            }
            Signal::SIGUSR2 => self.restart(),
            other => tracing::debug!("ignored {other}"),
        }
        Ok(None)
    }

    /// `nvlibfs restart`: the binary on disk now, on the running server's
    /// final checkpoint.
    fn restart(&mut self) {
        let server = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Serving(server) if self.kept.complete() => server,
            other => {
                tracing::warn!("SIGUSR2 while {}: a restart needs one server serving", other.name());
                self.phase = other;
                return;
            }
        };
        match Binary::open(&self.command.exe) {
            Ok(binary) => {
                tracing::info!(
                    pid = server.pid.as_raw(),
                    "restart: freezing the running server for {}",
                    self.command.exe.display()
                );
                server.send(Tag::Freeze, &[]);
                self.phase = Phase::Restarting {
                    old: server,
                    step: Step::Freezing,
                    binary: Rc::new(binary),
                    since: Instant::now(),
                };
            }
            Err(e) => {
                let pid = server.pid;
                self.phase = Phase::Serving(server);
                self.refusal(pid, 0, format!("opening {}: {e}", self.command.exe.display()));
            }
        }
    }

    /// A step of a restart or a takeover that takes too long is given up.
    fn check_step_limit(&mut self) -> Result<Option<i32>, DaemonError> {
        match &self.phase {
            Phase::HandingOver { since, .. } | Phase::Joining { since, .. } if since.elapsed() >= STEP_LIMIT => {
                return self.takeover_too_slow();
            }
            Phase::Leaving { since, .. } if since.elapsed() >= STEP_LIMIT => {
                // Stuck: what it holds is resent to the next daemon.
                let Phase::Leaving { old, .. } = std::mem::replace(&mut self.phase, Phase::Moving) else {
                    unreachable!("matched above")
                };
                tracing::error!("leaving for the restart took over {} s", STEP_LIMIT.as_secs());
                old.kill(Signal::SIGKILL);
                self.stop_requested = true;
                self.phase = Phase::HandedOver(Some(old));
                return Ok(None);
            }
            _ => {}
        }
        let Phase::Restarting { since, .. } = &self.phase else {
            return Ok(None);
        };
        if since.elapsed() < STEP_LIMIT {
            return Ok(None);
        }
        let Phase::Restarting { old, step, binary, .. } = std::mem::replace(&mut self.phase, Phase::Moving) else {
            unreachable!("matched above")
        };
        let why = format!(
            "the restart's {} step took over {} s",
            step_name(&step),
            STEP_LIMIT.as_secs()
        );
        tracing::error!("{why}");
        match step {
            Step::Freezing => {
                self.phase = Phase::Serving(old);
            }
            Step::Preparing(new) => self.give_up_restart(old, New::Running(&new), false, why),
            Step::Overlap(new) => self.give_up_restart(old, New::Running(&new), true, why),
            Step::Draining(new) => {
                // A thread of the old server stuck in a request: it goes,
                // and what it held goes back in the queue for the new one.
                old.kill(Signal::SIGKILL);
                self.resend();
                self.restarted(old, new, binary);
            }
        }
        Ok(None)
    }

    fn takeover_too_slow(&mut self) -> Result<Option<i32>, DaemonError> {
        let why = format!("a step of the takeover took over {} s", STEP_LIMIT.as_secs());
        tracing::error!("{why}");
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::HandingOver {
                old,
                peer,
                step: Handing::Draining,
                ..
            } => {
                // A thread of our server stuck in a request: it goes, and
                // what it held goes back in the queue for the other's.
                old.kill(Signal::SIGKILL);
                self.resend();
                peer.send(Tag::Drained, &(old.pid.as_raw() as u64).to_le_bytes());
                self.phase = Phase::HandedOver(Some(old));
            }
            Phase::HandingOver { old, peer, step, .. } => {
                peer.send(Tag::Refused, why.as_bytes());
                self.give_up_takeover(old, &peer, step == Handing::Overlap, why);
            }
            Phase::Joining { new, peer, .. } => {
                new.kill(Signal::SIGKILL);
                peer.send(Tag::Refused, why.as_bytes());
                return Err(DaemonError::new(format!("--take-over failed: {why}")));
            }
            other => self.phase = other,
        }
        Ok(None)
    }

    /// A restart that cannot go on: the new server, if still running,
    /// goes; what it read, if it had begun to read, goes back in the queue
    /// for the old one, which thaws and serves on.
    fn give_up_restart(&mut self, old: Server, new: New<'_>, new_read: bool, why: String) {
        let new_pid = match new {
            New::Running(new) => {
                new.kill(Signal::SIGKILL);
                new.pid.as_raw() as u32
            }
            New::Reaped(pid) => pid.as_raw() as u32,
            New::None => 0,
        };
        if new_read {
            self.resend();
        }
        old.send(Tag::Thaw, &[]);
        let old_pid = old.pid;
        self.phase = Phase::Serving(old);
        self.refusal(old_pid, new_pid, why);
    }

    /// A server process ended.
    fn exit(&mut self, pid: Pid, status: WaitStatus) -> Result<Option<i32>, DaemonError> {
        let code = match status {
            WaitStatus::Exited(_, code) => code,
            _ => 128 + 9,
        };
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            // Never got going (it told `nvlibfs mount` why), or stopped.
            Phase::Mounting(s) if s.pid == pid => return Ok(Some(code)),
            Phase::Stopping(Some(s)) if s.pid == pid => return Ok(Some(code)),
            Phase::Serving(s) if s.pid == pid => {
                if code == 0 && matches!(status, WaitStatus::Exited(..)) {
                    // Unmounted from outside.
                    return Ok(Some(0));
                }
                tracing::error!("the server (pid {pid}) died: {status:?}; starting another to take over");
                if s.serving_since.is_none_or(|t| t.elapsed() < EARLY_DEATH) {
                    self.crashes.push_back(Instant::now());
                }
                self.recover("crash", pid)?;
            }
            Phase::Restarting { old, step, binary, .. } if old.pid == pid => match step {
                // It died before its final checkpoint was kept: the last
                // acknowledged one is what there is, for the binary that
                // wrote it.
                Step::Freezing => {
                    tracing::error!("the server (pid {pid}) died during a restart, before it froze: {status:?}");
                    self.crashes.push_back(Instant::now());
                    self.recover("crash", pid)?;
                }
                // The new server has the final checkpoint: it goes on as a
                // crash's successor (resent requests, alone).
                Step::Preparing(new) => {
                    tracing::error!("the old server (pid {pid}) died while the new one prepared: {status:?}");
                    self.phase = Phase::Recovering {
                        new,
                        reason: "crash",
                        old_pid: pid.as_raw() as u32,
                        since: (Instant::now(), SystemTime::now()),
                    };
                }
                Step::Overlap(new) | Step::Draining(new) => {
                    if !(code == 0 && matches!(status, WaitStatus::Exited(..))) {
                        tracing::error!("the old server (pid {pid}) died while the new one served: {status:?}");
                        self.resend();
                    }
                    self.restarted(old, new, binary);
                }
            },
            Phase::Restarting {
                old,
                step: step @ (Step::Preparing(_) | Step::Overlap(_)),
                ..
            } if step_server(&step).is_some_and(|s| s.pid == pid) => {
                tracing::error!("the new server (pid {pid}) ended during the restart: {status:?}");
                // Reaped: nothing to stop; what it read, if it read,
                // goes back in the queue for the old one.
                let read = matches!(step, Step::Overlap(_));
                let why = format!("it ended before it served: {status:?}");
                self.give_up_restart(old, New::Reaped(pid), read, why);
            }
            // The old server has stopped reading: this is a crash.
            Phase::Restarting {
                step: Step::Draining(new),
                ..
            } if new.pid == pid => {
                tracing::error!("the new server (pid {pid}) died while the old one drained: {status:?}");
                self.crashes.push_back(Instant::now());
                self.recover("crash", pid)?;
            }
            Phase::HandedOver(Some(s)) if s.pid == pid => return Ok(self.handed_over()),
            // The store holds the last acknowledged checkpoint: the next
            // daemon recovers from it as after any crash.
            Phase::Leaving { old, .. } if old.pid == pid => {
                tracing::error!("the server (pid {pid}) died while leaving for the restart: {status:?}");
                self.stop_requested = true;
                return Ok(self.handed_over());
            }
            Phase::HandingOver { old, peer, step, .. } if old.pid == pid => match step {
                // Before the other daemon's server read anything: a crash
                // like any other, and the takeover ends with it.
                Handing::Freezing | Handing::Preparing => {
                    tracing::error!("the server (pid {pid}) died while handing over: {status:?}");
                    peer.send(Tag::Refused, b"the server taken over died");
                    self.crashes.push_back(Instant::now());
                    self.recover("crash", pid)?;
                }
                Handing::Overlap | Handing::Draining => {
                    if !(code == 0 && matches!(status, WaitStatus::Exited(..))) {
                        tracing::error!("our server (pid {pid}) died while the other daemon's served: {status:?}");
                        self.resend();
                    }
                    peer.send(Tag::Drained, &(pid.as_raw() as u64).to_le_bytes());
                    self.phase = Phase::HandedOver(None);
                    return Ok(self.handed_over());
                }
            },
            Phase::Joining { new, peer, .. } if new.pid == pid => {
                let why = format!("this daemon's new server (pid {pid}) ended: {status:?}");
                // If it had begun to read, the other daemon resends.
                peer.send(Tag::Refused, why.as_bytes());
                return Err(DaemonError::new(format!("--take-over failed: {why}")));
            }
            Phase::Recovering {
                new,
                reason,
                old_pid,
                since,
            } if new.pid == pid => {
                tracing::error!("the new server (pid {pid}) ended before it was ready: {status:?}");
                self.crashes.push_back(Instant::now());
                self.recover(reason, Pid::from_raw(old_pid as i32))?;
                if let Phase::Recovering { since: s, .. } = &mut self.phase {
                    *s = since;
                }
            }
            other => {
                tracing::debug!("pid {pid} ended: {status:?}");
                self.phase = other;
            }
        }
        Ok(None)
    }

    /// The server died: a successor from the binary that wrote the
    /// checkpoint, unless servers keep dying at once.
    fn recover(&mut self, reason: &'static str, old: Pid) -> Result<(), DaemonError> {
        while self.crashes.front().is_some_and(|t| t.elapsed() > CRASH_WINDOW) {
            self.crashes.pop_front();
        }
        if self.crashes.len() > MAX_CRASHES {
            return Err(DaemonError::new(format!(
                "the server died {} times within {} s; giving up (the mount ends with this process)",
                self.crashes.len(),
                CRASH_WINDOW.as_secs()
            )));
        }
        let new = self.start_successor(&self.binary.clone())?;
        self.phase = Phase::Recovering {
            new,
            reason,
            old_pid: old.as_raw() as u32,
            since: (Instant::now(), SystemTime::now()),
        };
        Ok(())
    }

    /// FUSE_NOTIFY_RESEND: every request a server read and did not answer
    /// goes back in the queue.
    fn resend(&self) {
        let Some(connection) = &self.kept.connection else {
            return;
        };
        let init: Option<InitRecord> = serde_json::from_slice(&connection.body).ok();
        let Some(init) = init.filter(|_| !self.command.no_resend) else {
            return tracing::warn!(
                "requests the server had read and not answered cannot be resent (--no-resend): they wait until \
                 their callers are killed"
            );
        };
        match takeover::resend(&connection.fds[0], &init) {
            Ok(true) => tracing::info!("asked the kernel to resend what the server had not answered"),
            Ok(false) => tracing::warn!(
                "this kernel cannot resend requests a dead server had read (FUSE_NOTIFY_RESEND is Linux 6.9+): \
                 they wait until their callers are killed"
            ),
            Err(e) => tracing::error!("FUSE_NOTIFY_RESEND: {e}"),
        }
    }

    fn record(
        &mut self,
        reason: &str,
        old_pid: u32,
        new: &Server,
        at: SystemTime,
        waited: Duration,
        refused: Option<String>,
    ) {
        let record = Handover {
            reason: reason.into(),
            old_pid,
            new_pid: new.pid.as_raw() as u32,
            new_version: new.version.clone().unwrap_or_default(),
            at: at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            waited_ms: waited.as_secs_f64() * 1e3,
            refused,
        };
        tracing::info!(
            reason = %record.reason,
            old = record.old_pid,
            new = record.new_pid,
            version = %record.new_version,
            "handed the connection over; requests waited at most {:.1} ms",
            record.waited_ms
        );
        self.history.push(record);
        if self.history.len() > protocol::MAX_HISTORY {
            self.history.remove(0);
        }
    }

    /// A restart that did not happen: the old server goes on.
    fn refusal(&mut self, old: Pid, new_pid: u32, why: String) {
        tracing::error!("restart refused: {why}; pid {old} goes on serving");
        self.history.push(Handover {
            reason: "restart".into(),
            old_pid: old.as_raw() as u32,
            new_pid,
            new_version: String::new(),
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            waited_ms: 0.0,
            refused: Some(why),
        });
        if self.history.len() > protocol::MAX_HISTORY {
            self.history.remove(0);
        }
        self.send_history();
    }

    fn send_history(&self) {
        let Phase::Serving(server) = &self.phase else { return };
        match serde_json::to_vec(&self.history) {
            Ok(json) => server.send(Tag::History, &json),
            Err(e) => tracing::error!("encoding the handovers: {e}"),
        }
    }

    /// A server that takes over, from `binary`, given everything kept.
    fn start_successor(&self, binary: &Rc<Binary>) -> Result<Server, DaemonError> {
        let server = self.spawn(binary, true, None)?;
        self.kept
            .replay(&server.sock)
            .map_err(|e| DaemonError::new(format!("handing the state to pid {}: {e}", server.pid)))?;
        Ok(server)
    }

    fn spawn(&self, binary: &Rc<Binary>, takeover: bool, ready: Option<BorrowedFd<'_>>) -> Result<Server, DaemonError> {
        let (ours, theirs) = protocol::pair().map_err(|e| DaemonError::new(format!("a socket for the server: {e}")))?;
        // The binary as held, not as the path names it now.
        let mut cmd = std::process::Command::new(format!("/proc/self/fd/{}", binary.file.as_raw_fd()));
        cmd.arg0(&binary.path)
            .args(&self.command.args)
            .arg("--supervisor-socket")
            .arg(theirs.as_raw_fd().to_string());
        if takeover {
            cmd.arg("--takeover");
        }
        if let Some(fd) = ready {
            cmd.arg("--ready-fd").arg(fd.as_raw_fd().to_string());
        }
        cmd.arg(&self.mountpoint);
        // The supervisor tells systemd; a server's word would be refused.
        cmd.env_remove("NOTIFY_SOCKET");
        let inherit: Vec<i32> = [
            Some(theirs.as_raw_fd()),
            self.lock.as_ref().map(|l| l.as_fd().as_raw_fd()),
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
            .map_err(|e| DaemonError::new(format!("starting {}: {e}", binary.path.display())))?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        let reader = ours
            .try_clone()
            .map_err(|e| DaemonError::new(format!("a socket for the server: {e}")))?;
        let events = self.events.clone();
        std::thread::Builder::new()
            .name(format!("server-{pid}"))
            .spawn(move || read_server(pid, &reader, &events))
            .map_err(|e| DaemonError::new(format!("starting a reader thread: {e}")))?;
        Ok(Server {
            pid,
            sock: ours,
            binary: binary.clone(),
            serving_since: None,
            version: None,
        })
    }
}

/// The new server of a restart that is given up.
enum New<'a> {
    Running(&'a Server),
    /// Already ended and reaped: its pid may be another process's now.
    Reaped(Pid),
    None,
}

fn step_server(step: &Step) -> Option<&Server> {
    match step {
        Step::Freezing => None,
        Step::Preparing(s) | Step::Overlap(s) | Step::Draining(s) => Some(s),
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Freezing => "freeze",
        Step::Preparing(_) => "prepare",
        Step::Overlap(_) => "first answer",
        Step::Draining(_) => "drain",
    }
}

/// Passes a server's messages on as events; names every error, and goes
/// on reading after one that leaves the socket usable.
fn read_server(pid: Pid, sock: &OwnedFd, events: &mpsc::Sender<Event>) {
    loop {
        let event = match protocol::recv(sock) {
            Ok(Some(m)) => Event::Message(pid, m),
            Ok(None) => break,
            Err(e) => Event::Broken(pid, e.0),
        };
        if events.send(event).is_err() {
            return;
        }
    }
    let _ = events.send(Event::Closed(pid));
}

/// The supervisor holds the connection: if it died with its server, every
/// container's view would end (nothing can save that), so it asks the
/// OOM killer to pass it over, as far as this process may (below 0 takes
/// CAP_SYS_RESOURCE, which containers often lack). It holds little memory
/// to begin with; its servers set their own score back (daemon.rs).
fn lower_oom_score() {
    const PATH: &str = "/proc/self/oom_score_adj";
    match std::fs::write(PATH, "-1000") {
        Ok(()) => tracing::debug!("OOM score adjustment -1000"),
        Err(e) => tracing::info!(
            "could not lower the supervisor's OOM score ({e}; needs CAP_SYS_RESOURCE): it stays at {}",
            std::fs::read_to_string(PATH).unwrap_or_default().trim()
        ),
    }
}

/// What a daemon taken over handed on.
struct HandedOn {
    lock: MountLock,
    sock: OwnedFd,
    pid: u32,
    kept: Kept,
    history: Vec<Handover>,
}

/// `--take-over`: having offered over `sock`, receives in order the mount
/// point's lock, the handovers so far and everything the daemon taken over
/// keeps, checked as any checkpoint is.
fn join(sock: OwnedFd, mountpoint: &Path) -> Result<HandedOn, DaemonError> {
    let first = crate::peer::answer(&sock, "handing over its lock")?;
    let pid = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.pid() as u32)
        .unwrap_or(0);
    let lock = match first.tag {
        Tag::Lock if first.fds.len() == 1 => {
            MountLock::handed_on(first.fds.into_iter().next().expect("one descriptor"), mountpoint)?
        }
        Tag::Refused => {
            return Err(DaemonError::new(format!(
                "the daemon serving this mount point (pid {pid}) refused the takeover: {}",
                first.text()
            )))
        }
        other => {
            return Err(DaemonError::new(format!(
                "the daemon taken over (pid {pid}) sent {other:?} with {} descriptors where its lock belongs",
                first.fds.len()
            )))
        }
    };
    let mut kept = Kept::default();
    let mut history = Vec::new();
    loop {
        let m = crate::peer::answer(&sock, "handing over what it keeps")?;
        let checkpoint = m.tag == Tag::Checkpoint;
        match m.tag {
            Tag::Refused => {
                return Err(DaemonError::new(format!(
                    "the daemon taken over (pid {pid}) gave up: {}",
                    m.text()
                )))
            }
            Tag::History => {
                // Only for `status`: a history it cannot read is dropped.
                history = serde_json::from_slice(&m.body).unwrap_or_else(|e| {
                    tracing::warn!("the handovers of the daemon taken over: {e}");
                    Vec::new()
                });
                continue;
            }
            _ => {}
        }
        match kept.take(m) {
            Ok(Taken::Answer(answer)) if answer.tag == Tag::Nak => {
                return Err(DaemonError::new(format!(
                    "what the daemon taken over (pid {pid}) handed over is not whole: {}",
                    answer.text()
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(DaemonError::new(format!("what pid {pid} handed over: {e}"))),
        }
        if checkpoint {
            break;
        }
    }
    if !kept.complete() {
        return Err(DaemonError::new(format!(
            "pid {pid} handed over a checkpoint without its connection"
        )));
    }
    // From here on a reader thread waits as long as it takes.
    let forever = nix::sys::time::TimeVal::new(0, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &forever)
        .map_err(|e| DaemonError::new(format!("the takeover socket: {e}")))?;
    Ok(HandedOn {
        lock,
        sock,
        pid,
        kept,
        history,
    })
}

/// The first message of a daemon that would take over: its `Offer`.
fn read_offer(sock: &OwnedFd) -> Result<protocol::Offer, String> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    setsockopt(sock, ReceiveTimeout, &nix::sys::time::TimeVal::new(5, 0)).map_err(|e| e.to_string())?;
    let m = match protocol::recv(sock) {
        Ok(Some(m)) if m.tag == Tag::Offer => m,
        Ok(Some(m)) => return Err(format!("it sent {:?}", m.tag)),
        Ok(None) => return Err("it closed the socket".into()),
        Err(e) => return Err(e.0),
    };
    setsockopt(sock, ReceiveTimeout, &nix::sys::time::TimeVal::new(0, 0)).map_err(|e| e.to_string())?;
    serde_json::from_slice(&m.body).map_err(|e| format!("its offer: {e}"))
}

/// Passes a peer's messages on as events, then its going.
fn read_peer(id: u64, sock: &OwnedFd, events: &mpsc::Sender<Event>) {
    let why = loop {
        match protocol::recv(sock) {
            Ok(Some(m)) => {
                if events.send(Event::Peer(id, m)).is_err() {
                    return;
                }
            }
            Ok(None) => break "it closed the socket".to_owned(),
            Err(e) => break e.0,
        }
    };
    let _ = events.send(Event::PeerGone(id, why));
}

/// Signals become events; the ones nothing acts on are ignored.
fn signal_thread() -> Result<(mpsc::Sender<Event>, mpsc::Receiver<Event>), DaemonError> {
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
    let sender = events.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(signal) => {
                    if sender.send(Event::Signal(signal)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("waiting for signals: {e}"),
            }
        })
        .map_err(|e| DaemonError::new(format!("starting the signal thread: {e}")))?;
    Ok((events, event))
}

impl Server {
    fn ready(&mut self, version: String) {
        self.serving_since = Some(Instant::now());
        self.version = Some(version);
    }
}
