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

/// Whether systemd is restarting this unit, not stopping it, and keeps its
/// fd store across the restart (`FileDescriptorStorePreserve=`, systemd
/// 254+): then the connection can wait in the store for the next daemon
/// instead of being unmounted. systemd's SIGTERM does not say which it
/// is; the unit's running job does (`systemctl list-jobs`).
pub fn restarting_with_store() -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    let Some(unit) = own_unit() else { return false };
    let preserve = systemctl(&["show", "--property=FileDescriptorStorePreserve", "--value", &unit]);
    if !matches!(preserve.as_deref().map(str::trim), Some("restart" | "yes")) {
        tracing::info!(
            "{unit} does not keep its fd store across a restart (FileDescriptorStorePreserve={}, systemd 254+): a \
             restart is a stop",
            preserve.as_deref().map_or("?", str::trim)
        );
        return false;
    }
    let jobs = systemctl(&["list-jobs", "--no-legend", "--plain", "--full"]).unwrap_or_default();
    jobs.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.get(1) == Some(&unit.as_str()) && words.get(2).is_some_and(|job| job.contains("restart"))
    })
}

/// The unit this process runs in, from its cgroup (`.../nvlibfs.service`).
fn own_unit() -> Option<String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroups.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        let last = path.rsplit('/').next()?;
        last.ends_with(".service").then(|| last.to_owned())
    })
}

/// `systemctl ARGS`' output, or `None` if it fails or takes over 2 s.
fn systemctl(args: &[&str]) -> Option<String> {
    let mut child = std::process::Command::new("systemctl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("systemctl {args:?} took over 2 s");
                return None;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    Some(out)
}
