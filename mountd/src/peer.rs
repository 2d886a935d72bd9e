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

use crate::daemon::DaemonError;
use crate::protocol::{self, Message, Offer, Tag};
use nix::sys::socket::{
    accept, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use std::os::fd::{AsFd, OwnedFd};
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

/// Accepts daemons that would take over, one at a time, for ever: each
/// whose user is this process's is passed to `offered`.
pub fn accept_loop(listener: OwnedFd, offered: impl Fn(OwnedFd) + Send + 'static) {
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
        match getsockopt(&sock, sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == nix::unistd::geteuid().as_raw() => offered(sock),
            Ok(cred) => tracing::warn!(
                "refused a takeover from pid {} (uid {}): only the daemon's own user may take it over",
                cred.pid(),
                cred.uid()
            ),
            Err(e) => tracing::warn!("refused a takeover: its credentials: {e}"),
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the takeover thread: {e}; this daemon cannot be taken over");
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
    match connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
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
    protocol::send(&sock, Tag::Offer, &body, &[]).map_err(|e| not_served(&e))?;
    Ok(Some(sock))
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
