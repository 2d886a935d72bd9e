//! Messages between the supervisor and a serving process, over a
//! SOCK_SEQPACKET socket pair, with descriptors riding along (SCM_RIGHTS).
//! The supervisor parses none of them beyond the one-byte tag: it keeps
//! the latest connection and checkpoint as they came, and hands them to
//! the next server.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// server -> supervisor: the FUSE connection (one descriptor) and its INIT.
pub const CONNECTION: u8 = b'C';
/// server -> supervisor: some of a checkpoint's files (descriptors only).
pub const FILES: u8 = b'F';
/// server -> supervisor: a checkpoint (JSON), completing the FILES before it.
pub const CHECKPOINT: u8 = b'K';
/// new server -> supervisor: state restored, ready to take the connection.
pub const PREPARED: u8 = b'P';
/// supervisor -> new server: the old server is gone; take it.
pub const GO: u8 = b'G';
/// server -> supervisor: serving (a `Ready`, JSON).
pub const READY: u8 = b'R';
/// supervisor -> server: the handovers so far (JSON), for `status`.
pub const HISTORY: u8 = b'H';

/// Descriptors per message, below the kernel's SCM_MAX_FD (253).
const FDS_PER_MESSAGE: usize = 200;
/// The largest message: a checkpoint of a few generations is tens of KiB.
const MAX_MESSAGE: usize = 4 << 20;

/// What a server says when it serves: its version, and a line for
/// systemd's STATUS.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub version: String,
    pub status: String,
}

pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
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

pub fn send(sock: &impl AsFd, tag: u8, body: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let tag = [tag];
    let iov = [IoSlice::new(&tag), IoSlice::new(body)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// The next message; `None` when the other side has closed.
pub fn recv(sock: &impl AsFd) -> std::io::Result<Option<Message>> {
    use nix::sys::socket::{recv as peek, recvmsg, ControlMessageOwned, MsgFlags};
    // The message's size first, so the buffer is only as big as it: a
    // buffer of the largest size would stay in the process's memory.
    let size = loop {
        match peek(
            sock.as_fd().as_raw_fd(),
            &mut [],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    if size == 0 {
        return Ok(None);
    }
    if size > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a message of {size} bytes is too large")));
    }
    let mut buf = vec![0u8; size];
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match recvmsg::<()>(
                sock.as_fd().as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
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
        (msg.bytes, fds)
    };
    if len == 0 {
        return Ok(None);
    }
    buf.truncate(len);
    let tag = buf.remove(0);
    Ok(Some(Message { tag, body: buf, fds }))
}

/// Sends a checkpoint: its files in batches, then its JSON.
pub fn send_checkpoint(sock: &impl AsFd, json: &[u8], files: &[std::fs::File]) -> std::io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        send(sock, FILES, &[], batch)?;
    }
    send(sock, CHECKPOINT, json, &[])
}

/// Receives until a checkpoint is complete: its JSON and its files.
pub fn recv_checkpoint(first: Message, sock: &impl AsFd) -> std::io::Result<(Vec<u8>, Vec<std::fs::File>)> {
    let mut files = Vec::new();
    let mut message = first;
    loop {
        match message.tag {
            FILES => files.extend(message.fds.into_iter().map(std::fs::File::from)),
            CHECKPOINT => return Ok((message.body, files)),
            other => {
                return Err(std::io::Error::other(format!(
                    "expected a checkpoint, got message {:?}",
                    other as char
                )))
            }
        }
        message = recv(sock)?.ok_or_else(|| std::io::Error::other("the supervisor went away mid-checkpoint"))?;
    }
}
