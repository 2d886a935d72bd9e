//! Stopping a server without losing a request, on any kernel.
//!
//! A request a server has read from the connection is answered by it or
//! by nobody: killed, it leaves the request waiting (for ever before Linux
//! 6.9, which has no FUSE_NOTIFY_RESEND). So at a restart the old server
//! is not killed; it is drained: it stops reading and answers what it
//! holds, while the new server already reads the same connection.
//!
//! fuser's threads read and reply through one descriptor number, and a
//! thread ends its loop, quietly, when it reads FUSE_DESTROY. Draining
//! puts a socket at that number (`dup2`) holding one FUSE_DESTROY for each
//! thread, and passes whatever the threads write to it (the answers to
//! requests taken before) on to the connection. A thread blocked in
//! `read` on the connection itself is woken by a signal (EINTR; fuser
//! then reads again, now the socket, and ends); one that got a request
//! answers it through the socket first. When every thread has ended, fuser calls `destroy`
//! (see fs.rs), which parks for good instead of letting fuser unmount:
//! the supervisor and the new server keep the mount.

use crate::served::Served;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long the threads get to end; they end in microseconds unless a
/// request takes long to answer.
const LIMIT: Duration = Duration::from_secs(10);
/// The forwarder's buffer: larger than any answer fuser writes (a READ of
/// at most 128 KiB, a notification).
const LARGEST: usize = 2 << 20;
/// Not a FUSE message (those are 16 bytes or more): tells the forwarder
/// that nothing more will come.
const END: &[u8] = b"end";
/// The `unique` of the FUSE_DESTROY requests made here; the kernel's are
/// never this, and their answers are not forwarded.
const OURS: u64 = u64::MAX - 1;
const FUSE_DESTROY: u32 = 38;

/// A FUSE_DESTROY request: a `fuse_in_header` alone.
fn destroy_request() -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&40u32.to_ne_bytes()); // len
    out.extend_from_slice(&FUSE_DESTROY.to_ne_bytes()); // opcode
    out.extend_from_slice(&OURS.to_ne_bytes()); // unique
    out.extend_from_slice(&[0u8; 24]); // nodeid, uid, gid, pid, extlen, padding
    out
}

pub struct Drain {
    /// The descriptor number fuser's threads read and write.
    number: RawFd,
    /// The connection, for the answers forwarded.
    device: OwnedFd,
}

extern "C" fn wake(_: libc::c_int) {}

impl Drain {
    /// For the server whose fuser threads use descriptor `number` for
    /// the connection `device`.
    pub fn new(number: RawFd, device: OwnedFd) -> Drain {
        Drain { number, device }
    }

    /// Returns once no thread of this process reads the connection and
    /// every answer written has reached it.
    pub fn run(self, served: &Served) -> Result<(), String> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
        let (ended_tx, ended) = std::sync::mpsc::channel();
        *served.drained.lock().unwrap_or_else(|e| e.into_inner()) = Some(ended_tx);
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| format!("a socket pair: {e}"))?;
        // Room for a few answers in flight; root may pass the default cap.
        let _ = setsockopt(&theirs, sockopt::SndBufForce, &(8 << 20));
        let _ = setsockopt(&ours, sockopt::RcvBufForce, &(8 << 20));
        // One for each serving thread: each reads one and ends.
        let threads = fuser_threads().len().max(1);
        for _ in 0..threads {
            nix::sys::socket::send(
                ours.as_raw_fd(),
                &destroy_request(),
                nix::sys::socket::MsgFlags::empty(),
            )
            .map_err(|e| format!("queueing the threads' end: {e}"))?;
        }
        let device = self.device;
        let forwarder = std::thread::Builder::new()
            .name("drain-forward".into())
            .spawn(move || forward(&ours, &device))
            .map_err(|e| format!("starting the forwarder: {e}"))?;
        let action = SigAction::new(SigHandler::Handler(wake), SaFlags::empty(), SigSet::empty());
        // SAFETY: the handler does nothing, which is async-signal-safe.
        unsafe { sigaction(Signal::SIGURG, &action) }.map_err(|e| format!("a SIGURG handler: {e}"))?;
        // SAFETY: replaces the descriptor fuser reads with one we own;
        // `theirs` stays open as well, and nothing else uses the number.
        if unsafe { libc::dup2(theirs.as_raw_fd(), self.number) } < 0 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
        let deadline = Instant::now() + LIMIT;
        loop {
            let readers = fuser_threads();
            for &tid in &readers {
                // SAFETY: a signal to a thread of this process.
                unsafe { libc::syscall(libc::SYS_tgkill, std::process::id(), tid, libc::SIGURG) };
            }
            match ended.recv_timeout(Duration::from_millis(5)) {
                Ok(()) => break,
                Err(_) if Instant::now() > deadline => {
                    return Err(format!(
                        "{} serving threads still read after {} s",
                        readers.len(),
                        LIMIT.as_secs()
                    ))
                }
                Err(_) => {}
            }
        }
        nix::sys::socket::send(theirs.as_raw_fd(), END, nix::sys::socket::MsgFlags::empty())
            .map_err(|e| format!("ending the forwarder: {e}"))?;
        forwarder
            .join()
            .map_err(|_| "the forwarder panicked".to_owned())?
            .map_err(|e| format!("forwarding answers: {e}"))
    }
}

/// Threads fuser started to serve requests (named `fuser-N`).
fn fuser_threads() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("fuser-")
                .then(|| t.file_name().to_str()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Passes each answer written to the socket on to the connection, until
/// `END`.
fn forward(from: &OwnedFd, device: &OwnedFd) -> std::io::Result<()> {
    let mut buf = vec![0u8; LARGEST];
    let mut forwarded = 0u64;
    loop {
        let n = match nix::sys::socket::recv(from.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => other?,
        };
        if &buf[..n] == END || n == 0 {
            if forwarded > 0 {
                tracing::info!("forwarded {forwarded} answers written while draining");
            }
            return Ok(());
        }
        // struct fuse_out_header { len: u32, error: i32, unique: u64 }
        if buf[..n].get(8..16) == Some(&OURS.to_ne_bytes()[..]) {
            continue;
        }
        // The kernel refuses an answer to a request it no longer waits
        // for (interrupted): nothing to do about that one.
        if let Err(e) = nix::unistd::write(device.as_fd(), &buf[..n]) {
            tracing::debug!("forwarding an answer of {n} bytes: {e}");
        }
        forwarded += 1;
    }
}
