//! The supervisor-server protocol, whole: every message, its framing, the
//! version, and the limits it relies on.
//!
//! Messages travel over a SOCK_SEQPACKET socket pair (one datagram each,
//! descriptors riding along by SCM_RIGHTS). A datagram can be no larger
//! than the sender's socket buffer (`net.core.wmem_default`, 208 KiB on
//! common kernels), so no message body may grow with the state: the
//! served state travels as a sealed memfd (`State`), of any size, and the
//! held files in batches well below the kernel's SCM_MAX_FD (253).
//!
//! What the supervisor reads of a message is a tag and small fixed binary
//! bodies (`Manifest`, sequence numbers); the served state itself it only
//! holds and passes on.
//!
//! The order of things:
//! - A server sends the connection once (`Connection`), each generation's
//!   held files once (`Generation`), and a checkpoint (`Checkpoint`:
//!   manifest, state memfd, counters memfd) before every change that can
//!   hand the kernel a new inode. The supervisor answers `Ack` once it
//!   holds all of it, or `Nak` with the reason; a server commits nothing
//!   that was not acknowledged. Checkpoints carry sequence numbers that
//!   only grow: a stale one is refused.
//! - A new server gets the same messages replayed, restores the state
//!   exactly or answers `Refused` with why, then `Prepared`; it starts
//!   reading requests only after `Go`.
//! - A restart: `Freeze` stops the running server's re-pins and its
//!   freeing of passthrough ids, and it answers `Frozen` after its final
//!   checkpoint. Once the new server serves, `Drain` makes the old one
//!   answer every request it holds and stop reading (`Drained`); then
//!   `Sole` tells the new one that nobody else serves. `Thaw` undoes a
//!   freeze when the new server refused.
//! - A takeover (another daemon, `--take-over`): its supervisor connects to
//!   the running one's takeover socket and sends `Offer`; the running one
//!   freezes its server as for a restart, then sends `Lock` (the mount
//!   point's lock), `History` (the handovers so far) and replays what it
//!   keeps; the new supervisor's server
//!   prepares on it, and the new supervisor says `Prepared` (or `Refused`),
//!   then `Ready` once its server answers; the old server drains, and the
//!   old supervisor says `Drained` and is done.

use std::io::{IoSlice, IoSliceMut, Read, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The protocol's version, written into every state memfd. Any change to a
/// message, to the state's JSON or to how it is restored bumps it: a
/// server refuses a state of another version rather than guess.
pub const VERSION: u32 = match option_env!("NVLIBFS_TEST_PROTOCOL") {
    // A build for tests only (tests/handover_exact.rs): another version.
    Some(_) => 1000,
    None => 3,
};

/// Descriptors per message: below the kernel's SCM_MAX_FD (253).
pub const FDS_PER_MESSAGE: usize = 200;
/// The largest message body: far below any socket buffer a kernel
/// defaults to, so a datagram can always be sent.
pub const MAX_MESSAGE: usize = 64 << 10;
/// The largest state memfd a server will read.
pub const MAX_STATE: u64 = 256 << 20;
/// `Go`'s body: the new server serves alone at once (the old one died);
/// otherwise it waits for `Sole` before it re-pins or frees anything.
pub const GO_ALONE: u8 = 1;
pub const GO_BESIDE: u8 = 0;

/// A `Go` message's body: whether the new server serves alone, then the
/// highest checkpoint number any server of the mount sent (u64), which
/// the new server's own numbers must stay above.
pub fn go_body(alone: bool, highest: u64) -> Vec<u8> {
    let mut body = vec![if alone { GO_ALONE } else { GO_BESIDE }];
    body.extend(highest.to_le_bytes());
    body
}

/// How long each step of a restart or takeover may take before it is
/// given up: a server that neither freezes, prepares nor drains by then is
/// stuck. A server left without its supervisor waits as long for the
/// other server of a handover to end.
pub const STEP_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long one send to a server or another daemon may block: a peer
/// that stops reading (a paused container) must not wedge the sender.
pub const SEND_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends on `sock` fail (EAGAIN) once they have blocked for `SEND_LIMIT`.
pub fn send_deadline(sock: &impl AsFd) {
    let limit = nix::sys::time::TimeVal::new(SEND_LIMIT.as_secs() as i64, 0);
    if let Err(e) = nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::SendTimeout, &limit) {
        tracing::warn!("a send deadline: {e}");
    }
}

/// `(alone, highest)` from a `Go` body; a body without the number (an
/// older supervisor) says 0.
pub fn decode_go(body: &[u8]) -> (bool, u64) {
    let highest = body
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    (body.first() == Some(&GO_ALONE), highest)
}
/// How many handovers the history keeps (oldest dropped first).
pub const MAX_HISTORY: usize = 64;

const STATE_MAGIC: &[u8; 8] = b"NVLIBFS\0";
/// magic, version, reserved, sequence number, JSON length.
const STATE_HEADER: usize = 8 + 4 + 4 + 8 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// server -> supervisor, and replayed to a new server: the FUSE
    /// connection (one descriptor) and its INIT record (JSON).
    Connection = b'C',
    /// A generation's held files: `GenerationBatch` and descriptors.
    Generation = b'F',
    /// A checkpoint: `Manifest`; descriptors: the state memfd, the
    /// counters memfd, and the CDI spec's memfd if the state names one.
    Checkpoint = b'K',
    /// supervisor -> server: the checkpoint with this sequence number
    /// (u64) is held.
    Ack = b'A',
    /// supervisor -> server: it is not (u64, then the reason as text).
    Nak = b'N',
    /// new server -> supervisor: restored; ready to take the connection.
    Prepared = b'P',
    /// new server -> supervisor: cannot honour this state (the reason).
    Refused = b'X',
    /// supervisor -> new server: take the connection and serve.
    Go = b'G',
    /// server -> supervisor: serving (`Ready`, JSON).
    Ready = b'R',
    /// supervisor -> server, and to the daemon taking over: the handovers
    /// so far (JSON), for `status`.
    History = b'H',
    /// supervisor -> server: stop re-pinning and freeing; checkpoint.
    Freeze = b'Z',
    /// server -> supervisor: frozen; the final checkpoint's number (u64).
    Frozen = b'z',
    /// supervisor -> server: the restart did not happen; go on as before.
    Thaw = b'T',
    /// supervisor -> old server: answer what you hold, stop reading.
    Drain = b'D',
    /// old server -> supervisor: no request is held any more.
    Drained = b'd',
    /// supervisor -> new server: nobody else serves the connection now.
    Sole = b'S',
    /// new supervisor -> running supervisor: take this daemon as your
    /// successor (`Offer`, JSON).
    Offer = b'O',
    /// running supervisor -> new supervisor: the mount point's lock (one
    /// descriptor), first of what it hands over.
    Lock = b'L',
    /// running supervisor -> a peer it cannot see (another PID namespace):
    /// prove CAP_SYS_ADMIN (the file's name in the state directory, a
    /// newline, the nonce to set as its `trusted.` attribute).
    Challenge = b'Q',
    /// peer -> running supervisor: set.
    Proved = b'q',
}

impl Tag {
    fn from_byte(b: u8) -> Option<Tag> {
        use Tag::*;
        [
            Connection, Generation, Checkpoint, Ack, Nak, Prepared, Refused, Go, Ready, History, Freeze, Frozen, Thaw,
            Drain, Drained, Sole, Offer, Lock, Challenge, Proved,
        ]
        .into_iter()
        .find(|t| *t as u8 == b)
    }
}

/// What the kernel said in the connection's one FUSE_INIT: recorded by the
/// first server, it travels with the connection so that every later one
/// can resume it (see takeover.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitRecord {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32`.
    pub flags: u64,
}

/// What a daemon that would take over says of itself: the protocol it
/// speaks (the running one refuses another), its version and pid, for the
/// logs and `status`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Offer {
    pub protocol: u32,
    pub version: String,
    pub pid: u32,
}

/// What a server says when it serves: its version, and a line for
/// systemd's STATUS.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub version: String,
    pub status: String,
}

#[derive(Debug)]
pub struct Message {
    pub tag: Tag,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn new(tag: Tag, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        Message { tag, body, fds }
    }

    /// The body as a u64 (Ack, Nak, Frozen), and the rest.
    pub fn number(&self) -> Result<(u64, &[u8]), ProtocolError> {
        let (head, rest) = self
            .body
            .split_first_chunk::<8>()
            .ok_or_else(|| ProtocolError(format!("a {:?} message of {} bytes", self.tag, self.body.len())))?;
        Ok((u64::from_le_bytes(*head), rest))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Something the other side sent that does not fit the protocol, or a
/// socket error; always says what.
#[derive(Debug)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> ProtocolError {
        ProtocolError(e.to_string())
    }
}

impl From<nix::errno::Errno> for ProtocolError {
    fn from(e: nix::errno::Errno) -> ProtocolError {
        ProtocolError(e.desc().to_owned())
    }
}

/// A socket pair: one end for each side.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

pub fn send(sock: &impl AsFd, tag: Tag, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ProtocolError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    if body.len() > MAX_MESSAGE {
        return Err(ProtocolError(format!(
            "a {tag:?} message of {} bytes is over the protocol's {MAX_MESSAGE}",
            body.len()
        )));
    }
    if fds.len() > FDS_PER_MESSAGE {
        return Err(ProtocolError(format!(
            "{} descriptors in one {tag:?} message",
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let tag_byte = [tag as u8];
    let iov = [IoSlice::new(&tag_byte), IoSlice::new(body)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ProtocolError(format!("sending {tag:?}: {}", e.desc()))),
            Ok(_) => return Ok(()),
        }
    }
}

pub fn send_message(sock: &impl AsFd, m: &Message) -> Result<(), ProtocolError> {
    let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(|f| f.as_fd()).collect();
    send(sock, m.tag, &m.body, &fds)
}

/// The next message; `Ok(None)` once the other side has closed. A message
/// that breaks the protocol (too large, an unknown tag, descriptors the
/// kernel had to drop because this process is at its open-file limit) is
/// consumed and returned as an error that says so; the socket stays usable.
pub fn recv(sock: &impl AsFd) -> Result<Option<Message>, ProtocolError> {
    use nix::sys::socket::{recv as peek, recvmsg, ControlMessageOwned, MsgFlags};
    let fd = sock.as_fd().as_raw_fd();
    let size = loop {
        match peek(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
            Err(nix::errno::Errno::EINTR) => continue,
            // The other side died with messages unread: it is gone.
            Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
            other => break other?,
        }
    };
    // Never more than the protocol allows: what is past it is cut off
    // (MSG_TRUNC) and refused below.
    let mut buf = vec![0u8; size.clamp(1, MAX_MESSAGE + 1)];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (len, truncated, fds, fds_cut) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other?,
            }
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: descriptors the kernel just installed for us.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (
            msg.bytes,
            msg.flags.contains(MsgFlags::MSG_TRUNC),
            fds,
            msg.flags.contains(MsgFlags::MSG_CTRUNC),
        )
    };
    if len == 0 && !truncated {
        return Ok(None);
    }
    if truncated || size > MAX_MESSAGE + 1 {
        return Err(ProtocolError(format!(
            "a message of {size} bytes is over the protocol's {MAX_MESSAGE}; dropped"
        )));
    }
    buf.truncate(len);
    let tag = Tag::from_byte(buf[0]).ok_or_else(|| ProtocolError(format!("an unknown message tag {:#04x}", buf[0])))?;
    if fds_cut {
        return Err(ProtocolError(format!(
            "the descriptors of a {tag:?} message were dropped by the kernel (MSG_CTRUNC): this process is at its \
             open-file limit (RLIMIT_NOFILE)"
        )));
    }
    buf.remove(0);
    Ok(Some(Message { tag, body: buf, fds }))
}

/// A `Generation` message's body: which generation, where this batch
/// starts among its files, and how many files it has in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationBatch {
    pub number: u32,
    pub first: u32,
    pub total: u32,
}

impl GenerationBatch {
    pub fn encode(&self) -> Vec<u8> {
        [self.number, self.first, self.total]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    pub fn decode(body: &[u8]) -> Result<GenerationBatch, ProtocolError> {
        let words: Vec<u32> = body
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        match words[..] {
            [number, first, total] if body.len() == 12 => Ok(GenerationBatch { number, first, total }),
            _ => Err(ProtocolError(format!("a generation batch of {} bytes", body.len()))),
        }
    }
}

/// Sends a generation's held files in batches.
pub fn send_generation(sock: &impl AsFd, number: u32, files: &[BorrowedFd<'_>]) -> Result<(), ProtocolError> {
    let total = u32::try_from(files.len()).map_err(|_| ProtocolError("too many files".into()))?;
    if files.is_empty() {
        let batch = GenerationBatch {
            number,
            first: 0,
            total,
        };
        return send(sock, Tag::Generation, &batch.encode(), &[]);
    }
    for (i, chunk) in files.chunks(FDS_PER_MESSAGE).enumerate() {
        let batch = GenerationBatch {
            number,
            first: (i * FDS_PER_MESSAGE) as u32,
            total,
        };
        send(sock, Tag::Generation, &batch.encode(), chunk)?;
    }
    Ok(())
}

/// A `Checkpoint` message's body: its sequence number and the generations
/// it needs, with how many files each has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub seq: u64,
    pub generations: Vec<(u32, u32)>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 8 * self.generations.len());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(self.generations.len() as u32).to_le_bytes());
        for (number, files) in &self.generations {
            out.extend_from_slice(&number.to_le_bytes());
            out.extend_from_slice(&files.to_le_bytes());
        }
        out
    }

    pub fn decode(body: &[u8]) -> Result<Manifest, ProtocolError> {
        let bad = || ProtocolError(format!("a checkpoint manifest of {} bytes", body.len()));
        let (seq, rest) = body.split_first_chunk::<8>().ok_or_else(bad)?;
        let (count, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let count = u32::from_le_bytes(*count) as usize;
        if rest.len() != count * 8 {
            return Err(bad());
        }
        let generations = rest
            .chunks_exact(8)
            .map(|c| {
                (
                    u32::from_le_bytes(c[..4].try_into().expect("4 bytes")),
                    u32::from_le_bytes(c[4..].try_into().expect("4 bytes")),
                )
            })
            .collect();
        Ok(Manifest {
            seq: u64::from_le_bytes(*seq),
            generations,
        })
    }
}

/// The served state as a sealed memfd: magic, protocol version, sequence
/// number, then the JSON. Sealed, it can be neither changed nor resized
/// by anyone who holds it, so a reader may trust its length.
pub fn seal_state(seq: u64, json: &[u8]) -> std::io::Result<OwnedFd> {
    let mut header = Vec::with_capacity(STATE_HEADER);
    header.extend_from_slice(STATE_MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&seq.to_le_bytes());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    Ok(nvlibfs::select::sealed_memfd(c"nvlibfs-state", &[&header, json])?.into())
}

/// Reads a state memfd: its sequence number and JSON. Refuses one that is
/// not sealed, not ours, of another protocol version, or whose length
/// does not add up.
pub fn open_state(fd: &OwnedFd) -> Result<(u64, Vec<u8>), ProtocolError> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GET_SEALS)?);
    let needed = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
    if !seals.contains(needed) {
        return Err(ProtocolError("the state memfd is not sealed".into()));
    }
    let mut file = std::fs::File::from(fd.try_clone()?);
    let size = file.metadata()?.len();
    let mut header = [0u8; STATE_HEADER];
    file.rewind()?;
    file.read_exact(&mut header)
        .map_err(|_| ProtocolError(format!("a state memfd of {size} bytes")))?;
    if &header[..8] != STATE_MAGIC {
        return Err(ProtocolError("the state memfd is not nvlibfs state".into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(ProtocolError(format!(
            "the state was written by protocol version {version}; this server speaks version {VERSION}"
        )));
    }
    let seq = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
    if len > MAX_STATE || STATE_HEADER as u64 + len != size {
        return Err(ProtocolError(format!(
            "the state memfd says {len} bytes of state but holds {size} bytes in all"
        )));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)?;
    Ok((seq, json))
}

/// A u64 body (Ack, Frozen), with optional text after it (Nak).
pub fn number_body(n: u64, text: &str) -> Vec<u8> {
    let mut body = n.to_le_bytes().to_vec();
    let room = MAX_MESSAGE - body.len();
    let text = text.as_bytes();
    body.extend_from_slice(&text[..text.len().min(room)]);
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn manifests_and_batches_round_trip_and_refuse_bad_lengths() {
        let m = Manifest {
            seq: 7,
            generations: vec![(0, 47), (3, 48)],
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let mut long = m.encode();
        long.push(0);
        assert!(Manifest::decode(&long).is_err());
        assert!(Manifest::decode(&m.encode()[..10]).is_err());
        let b = GenerationBatch {
            number: 4,
            first: 200,
            total: 401,
        };
        assert_eq!(GenerationBatch::decode(&b.encode()).unwrap(), b);
        assert!(GenerationBatch::decode(&b.encode()[..8]).is_err());
    }

    #[test]
    fn state_memfds_are_checked_before_they_are_read() {
        let fd = seal_state(9, b"{\"a\":1}").unwrap();
        assert_eq!(open_state(&fd).unwrap(), (9, b"{\"a\":1}".to_vec()));

        // Another version: refused, naming both.
        let other = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let mut f = std::fs::File::from(other.try_clone().unwrap());
        let mut header = STATE_MAGIC.to_vec();
        header.extend_from_slice(&(VERSION + 1).to_le_bytes());
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&1u64.to_le_bytes());
        header.extend_from_slice(&0u64.to_le_bytes());
        f.write_all(&header).unwrap();
        // Unsealed first.
        let err = open_state(&other).unwrap_err().0;
        assert!(err.contains("not sealed"), "{err}");
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        fcntl(
            &other,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE),
        )
        .unwrap();
        let err = open_state(&other).unwrap_err().0;
        assert!(err.contains(&format!("version {}", VERSION + 1)), "{err}");
    }

    #[test]
    fn a_message_over_the_limit_is_refused_and_the_socket_goes_on() {
        let (a, b) = pair().unwrap();
        assert!(send(&a, Tag::History, &vec![0; MAX_MESSAGE + 1], &[]).is_err());
        // One sent around `send`'s check, as a broken peer could.
        let big = vec![b'H'; MAX_MESSAGE + 100];
        nix::sys::socket::send(a.as_raw_fd(), &big, nix::sys::socket::MsgFlags::empty()).unwrap();
        send(&a, Tag::Ack, &5u64.to_le_bytes(), &[]).unwrap();
        let err = recv(&b).unwrap_err().0;
        assert!(err.contains("over the protocol"), "{err}");
        let next = recv(&b).unwrap().unwrap();
        assert_eq!((next.tag, next.number().unwrap().0), (Tag::Ack, 5));
        drop(a);
        assert!(recv(&b).unwrap().is_none());
    }
}
