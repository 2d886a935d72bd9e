//! Taking over a FUSE connection that another process initialised.
//!
//! The kernel sends FUSE_INIT once per connection, but fuser 0.18's
//! `Session::from_fd` always reads an INIT first and answers it. fuser
//! takes no changes and must not be forked, so a new server gets its
//! handshake from a stand-in: `from_fd` is handed one end of a
//! SOCK_SEQPACKET socket pair whose other end already holds an INIT request
//! made from the connection's real INIT (the kernel's ABI version, flags
//! and readahead, recorded by the first server); fuser reads it, calls our
//! `init`, and writes its answer into the socket pair, where nobody reads
//! it. Then `dup2` puts the real `/dev/fuse` descriptor at the socket's
//! descriptor number, so every read and write fuser makes from then on
//! (and every notification) goes to the connection. All through fuser's
//! public API.
//!
//! Requests the dead server had read but not answered sit in the
//! connection's processing queue; FUSE_NOTIFY_RESEND (Linux 6.9+, announced
//! by the INIT flag FUSE_HAS_RESEND) puts them back in the queue for the
//! new server. That needs the descriptor they were read through to stay
//! open, which is why every serving thread reads the one shared descriptor
//! (no `clone_fd`): a cloned descriptor closed with a dying server ends its
//! requests with ECONNABORTED.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

pub use crate::protocol::InitRecord;

const FUSE_INIT: u32 = 26;
const FUSE_INIT_EXT: u64 = 1 << 30;
/// INIT flag: the kernel takes FUSE_NOTIFY_RESEND.
const FUSE_HAS_RESEND: u64 = 1 << 39;
/// `fuse_notify_code`: FUSE_NOTIFY_RESEND.
const FUSE_NOTIFY_RESEND: i32 = 7;

impl InitRecord {
    /// A FUSE_INIT request carrying this record: a `fuse_in_header` and a
    /// `fuse_init_in` (ABI 7.36+ layout; older kernels read only the head).
    fn request(&self) -> Vec<u8> {
        let flags = self.flags | FUSE_INIT_EXT;
        let mut out = Vec::with_capacity(104);
        let body_len = 64u32;
        out.extend_from_slice(&(40 + body_len).to_ne_bytes()); // len
        out.extend_from_slice(&FUSE_INIT.to_ne_bytes()); // opcode
        out.extend_from_slice(&1u64.to_ne_bytes()); // unique
        out.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
        out.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
        out.extend_from_slice(&self.major.to_ne_bytes());
        out.extend_from_slice(&self.minor.to_ne_bytes());
        out.extend_from_slice(&self.max_readahead.to_ne_bytes());
        out.extend_from_slice(&(flags as u32).to_ne_bytes());
        out.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
        out.extend_from_slice(&[0u8; 44]); // unused[11]
        out
    }

    pub fn has_resend(&self) -> bool {
        self.flags & FUSE_HAS_RESEND != 0
    }
}

/// A session whose handshake was answered by the stand-in, waiting for the
/// real connection.
pub struct Resumed<FS: fuser::Filesystem> {
    pub session: fuser::Session<FS>,
    /// The descriptor number fuser reads from: the socket until `attach`.
    stand_in: RawFd,
    /// The other end, which took fuser's INIT answer.
    _peer: OwnedFd,
}

/// Runs fuser's handshake against a stand-in INIT made from `init`.
pub fn resume<FS: fuser::Filesystem>(
    fs: FS,
    init: &InitRecord,
    acl: fuser::SessionACL,
    config: fuser::Config,
) -> std::io::Result<Resumed<FS>> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, peer) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    (&std::fs::File::from(peer.try_clone()?)).write_all(&init.request())?;
    let stand_in = ours.as_raw_fd();
    let session = fuser::Session::from_fd(fs, ours, acl, config)?;
    Ok(Resumed {
        session,
        stand_in,
        _peer: peer,
    })
}

impl<FS: fuser::Filesystem> Resumed<FS> {
    /// Puts the real connection where fuser reads; from here on the
    /// session serves it.
    pub fn attach(self, fuse: &OwnedFd) -> std::io::Result<fuser::Session<FS>> {
        // SAFETY: dup2 onto a descriptor number the session owns (its
        // stand-in socket, replaced atomically); `fuse` stays ours.
        if unsafe { libc::dup2(fuse.as_raw_fd(), self.stand_in) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // dup2 clears close-on-exec on the new descriptor.
        nix::fcntl::fcntl(
            self.session.as_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Ok(self.session)
    }
}

/// Asks the kernel to queue again every request a dead server had read but
/// not answered. Kernels without FUSE_HAS_RESEND cannot: those requests
/// wait until their callers are killed.
pub fn resend(fuse: &impl AsFd, init: &InitRecord) -> std::io::Result<bool> {
    if !init.has_resend() {
        return Ok(false);
    }
    // struct fuse_out_header { len: u32, error: i32, unique: u64 }: a
    // notification has unique 0 and its code in `error`.
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&16u32.to_ne_bytes());
    header.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    header.extend_from_slice(&0u64.to_ne_bytes());
    nix::unistd::write(fuse, &header)?;
    Ok(true)
}
