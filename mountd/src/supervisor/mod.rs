//! The supervisor: the process that holds what must outlive any one
//! server, and hands the connection from one server to the next.
//!
//! It takes the mount point's lock, starts the first server (which scans,
//! mounts and hands back the FUSE connection and a checkpoint), and from
//! then on keeps what the last acknowledged checkpoint needs (kept.rs).
//! While it holds the connection the kernel keeps the mount alive, and
//! requests wait in the kernel instead of failing.
//!
//! Its life is one state machine, `Phase`, whose table is here; each phase
//! group lives in a file of its own, with its failure handling beside each
//! step: restart.rs (the shared steps), handover.rs (takeovers between
//! daemons), recovery.rs (a server that ends), stop.rs (signals).
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

mod handover;
mod recovery;
mod restart;
mod stop;

use handover::join;
use restart::{step_server, New};

use crate::daemon::Readiness;
use crate::error::DaemonError;
use crate::fdstore;
use crate::kept::{Kept, Taken};
use crate::protocol::{self, Message, ProtocolError, Tag};
use crate::statedir::MountLock;
use crate::systemd;
use crate::takeover::{self, InitRecord};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nvlibfs::control::Handover;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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

    /// Killed and reaped: nothing of it reads the connection any more
    /// (what the other daemon resends must not meet it).
    fn stop(&self) {
        self.kill(Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
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
    /// The status socket, bound once for the mount and held here: every
    /// server answers on this one listener, so none binds (or removes)
    /// the file another serves, whatever fails; a takeover hands it on.
    status: Option<StatusSocket>,
    /// How long a step of a restart or takeover may take.
    step_limit: Duration,
    /// The daemon taking over went away while our server drained: once
    /// it has, this daemon takes the mount back instead of handing over.
    take_back: bool,
    /// This daemon's server died while the other daemon's drained: once
    /// that is done, a successor recovers as after any crash.
    join_server_died: Option<Pid>,
    /// Why this daemon ends with an error once its server has stopped.
    gave_up: Option<String>,
    /// When the daemon taken over went away, mid-takeover.
    peer_left: Option<Instant>,
    /// When a server kept frozen after a given-up takeover is thawed.
    pending_thaw: Option<Instant>,
}

/// The status socket's listener, and the file's identity where this
/// daemon bound it or holds it alone (what it may remove at its end).
struct StatusSocket {
    listener: OwnedFd,
    identity: Option<crate::statedir::Identity>,
}

impl StatusSocket {
    /// Binds the status socket. The caller holds the mount point's lock, so
    /// a socket already there was left by a daemon that died. Status names
    /// host paths: root's alone from the first moment anyone can connect:
    /// bound under a name of its own, made root's, then renamed into place.
    fn bind(state_dir: &Path, mountpoint: &Path) -> Result<StatusSocket, DaemonError> {
        let dir = crate::statedir::StateDir::open(state_dir)?;
        let socket = nvlibfs::control::socket_path(state_dir, mountpoint);
        let fail = |e: std::io::Error| DaemonError::new(format!("status socket {}: {e}", socket.display()));
        // A short name, so that it fits a socket address wherever the real one does.
        let staged = socket.with_file_name(format!(".{}", std::process::id()));
        let _ = std::fs::remove_file(&staged);
        let listener = std::os::unix::net::UnixListener::bind(&staged).map_err(fail)?;
        let placed = std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .and_then(|()| std::fs::rename(&staged, &socket));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&staged);
            return Err(fail(e));
        }
        let identity = socket.file_name().and_then(|n| dir.identity(&n.to_string_lossy()));
        Ok(StatusSocket {
            listener: listener.into(),
            identity,
        })
    }

    /// Removes the file if it is still the one this daemon bound.
    fn remove(&self, state_dir: &Path, mountpoint: &Path) {
        let (Some(identity), Ok(dir)) = (self.identity, crate::statedir::StateDir::open(state_dir)) else {
            return;
        };
        let socket = nvlibfs::control::socket_path(state_dir, mountpoint);
        if let Some(name) = socket.file_name() {
            dir.remove_if(&name.to_string_lossy(), identity);
        }
    }
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
        let (lock, status, joining) = match offered {
            Some(sock) => {
                let handed = join(sock, &command.state_dir, &mountpoint)?;
                let status = handed.status.map(|listener| StatusSocket {
                    listener,
                    identity: None,
                });
                (
                    handed.lock,
                    status,
                    Some((handed.sock, handed.pid, handed.kept, handed.history)),
                )
            }
            None => {
                let lock = MountLock::take(&command.state_dir, &mountpoint)?;
                let status = StatusSocket::bind(&command.state_dir, &mountpoint)?;
                (lock, Some(status), None)
            }
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
            status,
            step_limit: crate::failpoint::step_limit(protocol::STEP_LIMIT),
            take_back: false,
            join_server_died: None,
            gave_up: None,
            peer_left: None,
            pending_thaw: None,
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

    fn run(mut self, ready: &mut Readiness) -> Result<i32, DaemonError> {
        let ended = self.serve(ready).and_then(|code| match self.gave_up.take() {
            Some(why) => Err(DaemonError::new(why)),
            None => Ok(code),
        });
        // Not handed on: nothing of this daemon holds the mount point once
        // its servers are gone, and the lock file goes with it, and the
        // status and takeover sockets (a successor's would be other files).
        // A lock still shared (a takeover given up) is the other daemon's.
        if let Some(lock) = self.lock.take().filter(|l| !l.shared()) {
            lock.remove();
            if let Some(status) = self.status.take() {
                status.remove(&self.command.state_dir, &self.mountpoint);
            }
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
                let checkpoint = m.tag == Tag::Checkpoint;
                let answer = match self.kept.take(m) {
                    Ok(Taken::Nothing) => return Ok(()),
                    Ok(Taken::Answer(answer)) => answer,
                    Err(e) => {
                        tracing::error!("pid {pid}: {e}");
                        return Ok(());
                    }
                };
                if let (true, Err(e)) = (checkpoint, crate::failpoint::hit("supervisor-checkpoint-ack")) {
                    tracing::error!(
                        "{e}: checkpoint {} is not answered",
                        answer.number().map_or(0, |(n, _)| n)
                    );
                    return Ok(());
                }
                let server = self.server(pid).expect("checked above");
                if let Err(e) = protocol::send_message(&server.sock, &answer) {
                    tracing::error!("answering pid {pid}'s checkpoint: {e}");
                }
                if answer.tag == Tag::Ack {
                    let saved = crate::failpoint::hit("fdstore-save")
                        .map_err(std::io::Error::other)
                        .and_then(|()| self.store.save(&self.kept));
                    if let Err(e) = saved {
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
            Tag::Drained => self.drained(pid),
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
                if let Err(e) = crate::failpoint::hit("restart-drain") {
                    self.give_up_restart(old, New::Running(&new), true, e);
                    self.send_history();
                    return Ok(());
                }
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
                if let Err(e) = crate::failpoint::hit("join-ready") {
                    new.stop();
                    peer.send(Tag::Refused, e.as_bytes());
                    return Err(DaemonError::new(format!("--take-over failed: {e}")));
                }
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
        if let Some(status) = &self.status {
            cmd.arg("--status-fd").arg(status.listener.as_raw_fd().to_string());
        }
        cmd.arg(&self.mountpoint);
        // The supervisor tells systemd; a server's word would be refused.
        cmd.env_remove("NOTIFY_SOCKET");
        let inherit: Vec<i32> = [
            Some(theirs.as_raw_fd()),
            self.status.as_ref().map(|s| s.listener.as_raw_fd()),
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
        protocol::send_deadline(&ours);
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
