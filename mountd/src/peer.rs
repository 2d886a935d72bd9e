//! Another daemon taking over this one: what a platform's own upgrade
//! needs (a DaemonSet's new pod, a replacement container), where the new
//! daemon is not this supervisor's child.
//!
//! The running supervisor listens on a socket in the state directory
//! (`<state dir>/<mount point>.takeover`, root's alone). A supervisor
//! started with `--take-over` connects, and the two speak the protocol's
//! takeover messages (protocol.rs) over it: the same freeze, exact
//! restore, overlap and drain as `nvlibfs restart`, with the new server
//! the other supervisor's child.

use crate::error::DaemonError;
use crate::protocol::{self, Message, Offer, Tag};
use nix::sys::socket::{
    accept, bind, connect, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a takeover may wait for each answer of the running supervisor.
pub const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// Listens at `path` for a daemon that would take over. The mount point's
/// lock is held, so no other supervisor of this mount point listens there:
/// a socket file left by one that died is replaced.
pub fn listen_at(path: &Path) -> Result<OwnedFd, DaemonError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| DaemonError::new(format!("{what} {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail("creating the directory of", &e))?;
    }
    let _ = std::fs::remove_file(path);
    let sock = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| fail("a socket for", &e))?;
    let addr = UnixAddr::new(path).map_err(|e| fail("the address", &e))?;
    // Root's alone from the moment it exists: what comes through it is the
    // whole mount.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr);
    nix::sys::stat::umask(old);
    bound.map_err(|e| fail("binding", &e))?;
    listen(&sock, Backlog::new(4).expect("a small backlog is valid")).map_err(|e| fail("listening on", &e))?;
    Ok(sock)
}

/// Accepts daemons that would take over, for ever: each that is
/// `privileged` and offers is passed to `offered` with its offer; one that
/// cannot be seen from here proves CAP_SYS_ADMIN first, on a thread of its
/// own; any other is refused at once, before anything is read or frozen.
/// No peer but a privileged one holds the accepting thread: connections
/// that say nothing cost a refusal each, not a wait.
pub fn accept_loop(listener: OwnedFd, state_dir: PathBuf, offered: impl Fn(OwnedFd, Offer) + Send + Sync + 'static) {
    let offered = std::sync::Arc::new(offered);
    let spawned = std::thread::Builder::new().name("takeover".into()).spawn(move || loop {
        let sock = match accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) {
            // SAFETY: accept returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            Err(e) => {
                tracing::error!("accepting a takeover: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = nix::fcntl::fcntl(&sock, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        match check(&sock) {
            Verdict::Privileged => match read_offer(&sock, std::time::Instant::now() + PROOF_LIMIT) {
                Ok(offer) => offered(sock, offer),
                Err(e) => tracing::warn!("a takeover that did not offer: {e}"),
            },
            Verdict::Refused(why) => refuse(&sock, &why),
            Verdict::Unseen(_) => {
                // Kept to refuse with where no thread takes the peer.
                let kept = sock.try_clone();
                let (offered, state_dir) = (offered.clone(), state_dir.clone());
                let proving = off_the_accepting_thread("takeover-proof", move || {
                    let deadline = std::time::Instant::now() + PROOF_LIMIT;
                    match read_offer(&sock, deadline) {
                        Ok(offer) => match challenge_over_protocol(&sock, &state_dir, deadline) {
                            Verdict::Privileged => offered(sock, offer),
                            Verdict::Refused(why) | Verdict::Unseen(why) => refuse(&sock, &why),
                        },
                        Err(e) => tracing::warn!("a takeover that did not offer: {e}"),
                    }
                });
                match (proving, kept) {
                    (Err(why), Ok(sock)) => refuse(&sock, &why),
                    (Err(why), Err(e)) => tracing::warn!("refused a takeover: {why} (and could not tell it: {e})"),
                    (Ok(()), _) => {}
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the takeover thread: {e}; this daemon cannot be taken over");
    }
}

/// Tells a peer it is refused, without waiting for anything from it.
fn refuse(sock: &OwnedFd, why: &str) {
    tracing::warn!("refused a takeover: {why}");
    protocol::send_deadline(sock);
    let _ = protocol::send(sock, Tag::Refused, format!("refused: {why}").as_bytes(), &[]);
    // What it already sent is read, so that closing does not reset the
    // connection before it reads the refusal.
    let mut buf = [0u8; 4096];
    while nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
        .is_ok_and(|n| n > 0)
    {}
}

/// How many peers that cannot be seen from here may be proving
/// CAP_SYS_ADMIN at once, in this process (the supervisor's takeover
/// socket, the server's status socket: each has its own); each takes at
/// most PROOF_LIMIT, whatever it sends.
const PROVING_AT_ONCE: usize = 8;
/// How long a peer that must prove itself has for all of it: its offer or
/// question and its answer to the challenge.
pub const PROOF_LIMIT: Duration = Duration::from_secs(5);

static PROVING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the PROVING_AT_ONCE, given back however its thread ends.
struct ProofSlot;

impl Drop for ProofSlot {
    fn drop(&mut self) {
        PROVING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Runs `prove` (a challenge, which waits on the peer) on a thread of its
/// own, so that a peer that does not answer holds up nobody else; while
/// PROVING_AT_ONCE are under way it is not run, and `Err` says why (the
/// caller tells the peer).
pub fn off_the_accepting_thread<F: FnOnce() + Send + 'static>(name: &str, prove: F) -> Result<(), String> {
    if PROVING.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= PROVING_AT_ONCE {
        drop(ProofSlot);
        return Err(format!(
            "{PROVING_AT_ONCE} peers this daemon cannot see are already proving CAP_SYS_ADMIN; try again"
        ));
    }
    let slot = ProofSlot;
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let _slot = slot;
        prove();
    });
    spawned
        .map(drop)
        .map_err(|e| format!("starting a thread for its challenge: {e}"))
}

/// What is left of `deadline`, as a receive timeout (at least 1 ms: zero
/// would mean none).
pub fn time_left(deadline: std::time::Instant) -> Duration {
    deadline
        .saturating_duration_since(std::time::Instant::now())
        .max(Duration::from_millis(1))
}

fn receive_until(sock: &OwnedFd, deadline: std::time::Instant) -> Result<(), String> {
    let d = time_left(deadline);
    let left = nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
    setsockopt(sock, sockopt::ReceiveTimeout, &left).map_err(|e| e.to_string())
}

/// The first message of a daemon that would take over: its `Offer`.
fn read_offer(sock: &OwnedFd, deadline: std::time::Instant) -> Result<Offer, String> {
    receive_until(sock, deadline)?;
    let m = match protocol::recv(sock) {
        Ok(Some(m)) if m.tag == Tag::Offer => m,
        Ok(Some(m)) => return Err(format!("it sent {:?}", m.tag)),
        Ok(None) => return Err("it closed the socket".into()),
        Err(e) => return Err(e.0),
    };
    serde_json::from_slice(&m.body).map_err(|e| format!("its offer: {e}"))
}

/// A takeover's challenge, over the protocol: `Challenge`, then `Proved`
/// within PROOF_LIMIT, then the attribute checked.
fn challenge_over_protocol(sock: &OwnedFd, state_dir: &Path, deadline: std::time::Instant) -> Verdict {
    let challenge = match Challenge::new(state_dir) {
        Ok(c) => c,
        Err(why) => return Verdict::Refused(why),
    };
    let body = format!("{}\n{}", challenge.name, challenge.nonce);
    if let Err(e) = protocol::send(sock, Tag::Challenge, body.as_bytes(), &[]) {
        return Verdict::Refused(e.0);
    }
    if let Err(e) = receive_until(sock, deadline) {
        return Verdict::Refused(e);
    }
    match protocol::recv(sock) {
        Ok(Some(m)) if m.tag == Tag::Proved => challenge.verdict(),
        Ok(Some(m)) => Verdict::Refused(format!("it answered the challenge with {:?}", m.tag)),
        Ok(None) => Verdict::Refused("it closed the socket".into()),
        Err(e) => Verdict::Refused(e.0),
    }
}

/// Connects to the daemon serving the mount point and offers to take over;
/// `None` when no daemon listens there (nothing serves the mount point, or
/// only a daemon that died left its socket).
pub fn offer(path: &Path) -> Result<Option<OwnedFd>, DaemonError> {
    let not_served = |e: &dyn std::fmt::Display| {
        DaemonError::new(format!(
            "--take-over: the daemon serving this mount point does not answer at {} ({e})",
            path.display()
        ))
    };
    let sock =
        socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(|e| not_served(&e))?;
    let addr = UnixAddr::new(path).map_err(|e| not_served(&e))?;
    // A connect waits while the listener's queue is full (connections
    // nobody answers): no longer than a send may.
    protocol::send_deadline(&sock);
    match connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(not_served(&format!(
                "its queue of takeovers stayed full for {} s",
                protocol::SEND_LIMIT.as_secs()
            )))
        }
        Err(e) => return Err(not_served(&e)),
    }
    let timeout = nix::sys::time::TimeVal::new(ANSWER_LIMIT.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(&sock, sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| DaemonError::new(format!("a timeout on {}: {e}", path.display())))?;
    let offer = Offer {
        protocol: protocol::VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    };
    let body = serde_json::to_vec(&offer).expect("an offer encodes");
    crate::failpoint::hit("join-offer").map_err(|e| not_served(&e))?;
    match protocol::send(&sock, Tag::Offer, &body, &[]) {
        Ok(()) => {}
        // Refused before it read the offer: the refusal waits to be read.
        Err(_) if answered(&sock) => {}
        Err(e) => return Err(not_served(&e)),
    }
    Ok(Some(sock))
}

/// Whether a message waits to be read on `sock`.
fn answered(sock: &OwnedFd) -> bool {
    use nix::sys::socket::MsgFlags;
    let mut byte = [0u8; 1];
    nix::sys::socket::recv(sock.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
        .is_ok_and(|n| n > 0)
}

/// The next message from the running supervisor, within ANSWER_LIMIT.
pub fn answer(sock: &impl AsFd, what: &str) -> Result<Message, DaemonError> {
    match protocol::recv(sock) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(DaemonError::new(format!(
            "the running daemon ended the takeover while {what}"
        ))),
        Err(e) => Err(DaemonError::new(format!(
            "the running daemon's answer while {what}: {e}"
        ))),
    }
}

/// Where the supervisor of `mountpoint` takes offers.
pub fn path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    nvlibfs::control::takeover_path(state_dir, mountpoint)
}

/// `SO_PEERPIDFD` (Linux 6.5+): a pidfd of the process that connected,
/// taken by the kernel at connect time, so that what is read about it
/// cannot belong to another process that reused its pid.
const SO_PEERPIDFD: libc::c_int = 77;
const CAP_SYS_ADMIN: u32 = 21;

/// What may be handed to a peer.
pub enum Verdict {
    Privileged,
    /// It cannot be seen from here (another PID namespace: the host, to a
    /// daemon in a pod; or the daemon of another pod); it must prove
    /// CAP_SYS_ADMIN (`Challenge`). Why it cannot be seen.
    Unseen(String),
    Refused(String),
}

enum Why {
    Unseen(String),
    Refused(String),
}

impl From<String> for Why {
    fn from(why: String) -> Why {
        Why::Refused(why)
    }
}

/// Whether the process at the other end of `sock` may be handed what this
/// daemon holds: it runs as this daemon's user, in this daemon's user
/// namespace (the initial one, where a daemon that mounts runs), with
/// CAP_SYS_ADMIN in its effective set. A root without capabilities (the
/// root of a container that was not given CAP_SYS_ADMIN) is refused, as is
/// a root of a user namespace of its own. `Err` says why.
pub fn check(sock: &impl AsFd) -> Verdict {
    match privileged(sock) {
        Ok(()) => Verdict::Privileged,
        Err(Why::Unseen(why)) => Verdict::Unseen(why),
        Err(Why::Refused(why)) => Verdict::Refused(why),
    }
}

fn privileged(sock: &impl AsFd) -> Result<(), Why> {
    let cred = getsockopt(sock, sockopt::PeerCredentials).map_err(|e| format!("its credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me {
        return Err(format!("pid {} runs as uid {}, not uid {me}", cred.pid(), cred.uid()).into());
    }
    let (pidfd, pid) = peer_pidfd(sock, cred.pid())?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("pid {pid}: {e}"))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| format!("pid {pid}: no CapEff in its status"))?;
    let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let (theirs, ours) = (ns(&format!("/proc/{pid}/ns/user")), ns("/proc/self/ns/user"));
    // Read, then checked still alive: what was read was that process's.
    // SAFETY: a plain syscall on a descriptor this function owns.
    let alive = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, 0usize, 0) } == 0;
    if !alive {
        return Err(format!("pid {pid} ended before it could be checked").into());
    }
    match (theirs, ours) {
        (Ok(t), Ok(o)) if t == o => {}
        (Ok(_), Ok(_)) => return Err(format!("pid {pid} runs in a user namespace of its own").into()),
        // The kernel lets a process of this uid read the namespace of any
        // process in a user namespace it created, and of one in its own
        // namespace holding no capability it lacks (ptrace's read check).
        // Refused, the peer is of this namespace and holds more than this
        // daemon kept after dropping its own: what the check is about.
        (Err(e), Ok(_)) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        (Err(e), _) | (_, Err(e)) => return Err(format!("pid {pid}'s user namespace: {e}").into()),
    }
    if effective & (1 << CAP_SYS_ADMIN) == 0 {
        return Err(format!(
            "pid {pid} lacks CAP_SYS_ADMIN (effective capabilities {effective:x}): only a daemon that may \
             mount may take the mount over or read its state"
        )
        .into());
    }
    Ok(())
}

/// The peer's pidfd and its pid in this PID namespace: from SO_PEERPIDFD,
/// or before Linux 6.5 from pidfd_open of the pid SO_PEERCRED gave (the
/// peer holds its end open, so its pid is in use by it unless it passed
/// the socket on and exited; that window, and a reuse of the pid within
/// it, is what SO_PEERPIDFD closes).
fn peer_pidfd(sock: &impl AsFd, cred_pid: i32) -> Result<(OwnedFd, i32), Why> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let got = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let pidfd = if got == 0 && fd >= 0 {
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    } else {
        // SAFETY: a plain syscall; a non-negative result is a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, cred_pid, 0) };
        if fd < 0 {
            return Err(format!("pid {cred_pid}: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: as above.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
    };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| format!("its pidfd: {e}"))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| "its pidfd names no pid".to_owned())?;
    // -1: the process that connected has ended (the socket was passed on,
    // or is held by a child): nothing can be read about it, and it is
    // not one of another PID namespace, so it is refused, not challenged
    // (a challenge holds the one thread that answers for 5 s).
    if pid < 0 {
        return Err(format!("pid {cred_pid}, which connected, has ended").into());
    }
    if pid == 0 {
        return Err(Why::Unseen(
            "it runs in a PID namespace this daemon cannot see into".into(),
        ));
    }
    Ok((pidfd, pid))
}

/// A file made in the state directory for a peer to prove CAP_SYS_ADMIN
/// by setting its `trusted.` attribute (which only CAP_SYS_ADMIN in the
/// initial user namespace may set or read); removed when dropped.
pub struct Challenge {
    dir: crate::statedir::StateDir,
    file: OwnedFd,
    pub name: String,
    pub nonce: String,
}

impl Challenge {
    pub fn new(state_dir: &Path) -> Result<Challenge, String> {
        let mut bytes = [0u8; 16];
        // SAFETY: getrandom writes at most the buffer's length.
        if unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) } != bytes.len() as isize {
            return Err(format!("a challenge: {}", std::io::Error::last_os_error()));
        }
        let nonce: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!(".challenge-{}", &nonce[..12]);
        let dir = crate::statedir::StateDir::open(state_dir).map_err(|e| e.to_string())?;
        let file = dir
            .open_file(
                &name,
                nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_EXCL,
            )
            .map_err(|e| e.to_string())?;
        Ok(Challenge { dir, file, name, nonce })
    }

    /// Whether the peer set the attribute to the nonce.
    pub fn verdict(&self) -> Verdict {
        let mut value = [0u8; 64];
        let attr = std::ffi::CString::new(nvlibfs::control::PROOF_XATTR).expect("no NUL");
        // SAFETY: a NUL-terminated name and a buffer of the given length.
        let got = unsafe {
            libc::fgetxattr(
                self.file.as_raw_fd(),
                attr.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if got >= 0 && value[..got as usize] == *self.nonce.as_bytes() {
            return Verdict::Privileged;
        }
        Verdict::Refused(format!(
            "it did not prove CAP_SYS_ADMIN: {} on {} is not the nonce it was given ({})",
            nvlibfs::control::PROOF_XATTR,
            self.dir.path().join(&self.name).display(),
            if got < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                "another value".into()
            }
        ))
    }
}

impl Drop for Challenge {
    fn drop(&mut self) {
        if let Some(ours) = crate::statedir::identity_of(&self.file) {
            self.dir.remove_if(&self.name, ours);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Past PROVING_AT_ONCE a peer is turned away (and its caller tells
    /// it); a slot comes back however its thread ends, a panic included.
    #[test]
    fn proofs_under_way_are_bounded_and_their_slots_come_back() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Takes every slot with a proof that waits; each slot is retried
        // until the deadline, as ended proofs give theirs back.
        let occupy = || {
            let (release, released) = mpsc::channel::<()>();
            let released = std::sync::Arc::new(std::sync::Mutex::new(released));
            let (done, finished) = mpsc::channel();
            for _ in 0..PROVING_AT_ONCE {
                let started = || {
                    let (released, done) = (released.clone(), done.clone());
                    off_the_accepting_thread("test-proof", move || {
                        let _ = released.lock().unwrap().recv();
                        done.send(()).unwrap();
                    })
                };
                while started().is_err() {
                    assert!(std::time::Instant::now() < deadline, "a slot never came back");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            assert!(off_the_accepting_thread("test-proof", || {}).is_err_and(|why| why.contains("try again")));
            for _ in 0..PROVING_AT_ONCE {
                release.send(()).unwrap();
                finished.recv().unwrap();
            }
        };
        occupy();
        while off_the_accepting_thread("test-proof", || panic!("a proof that panics")).is_err() {
            assert!(std::time::Instant::now() < deadline, "the slots never came back");
            std::thread::sleep(Duration::from_millis(10));
        }
        occupy();
    }
}
