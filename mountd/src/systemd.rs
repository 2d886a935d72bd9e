//! Talking to systemd: sd_notify, with descriptors for its fd store.

use std::path::Path;

/// Tells systemd (a `Type=notify` unit) how we are doing, if it asked.
pub fn notify(state: &str) {
    if let Err(e) = notify_with_fds(state, &[]) {
        tracing::warn!("telling systemd {state:?} failed: {e}");
    }
}

/// `notify` with descriptors alongside (FDSTORE=1). Ok(false)
/// when no systemd asked.
pub fn notify_with_fds(state: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> std::io::Result<bool> {
    use nix::sys::socket::{sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(Path::new(&path))?,
    };
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [std::io::IoSlice::new(state.as_bytes())];
    sendmsg(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), Some(&addr))?;
    Ok(true)
}
