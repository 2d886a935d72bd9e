//! systemd's file-descriptor store: everything the supervisor holds (the
//! FUSE connection, the newest checkpoint and its files) is kept by systemd
//! too, so that when the whole daemon dies (`systemctl kill`, a crash of
//! the supervisor itself) the supervisor that systemd starts next takes the
//! connection over like any new server does, instead of mounting afresh.
//!
//! Names: `nvlibfs-fuse` for the connection; for checkpoint number SEQ,
//! `nvlibfs-SEQ-state` (a sealed memfd: the INIT record and the checkpoint
//! as they came from the server, each length-prefixed, then the file count)
//! and `nvlibfs-SEQ-file-I` for its files. A new set is stored whole before
//! the previous one is removed, so a crash in between leaves a whole set.

use crate::daemon::notify_systemd_with_fds;
use crate::handover::{self, Message};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

const FUSE: &str = "nvlibfs-fuse";
/// Descriptors systemd passes start here (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: i32 = 3;
/// Files per checkpoint message the supervisor replays to a server.
const FDS_PER_MESSAGE: usize = 200;

/// What the supervisor has stored, so the next set can replace it.
#[derive(Default)]
pub struct Store {
    seq: u64,
    stored: Vec<String>,
    has_fuse: bool,
}

fn store(name: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<bool> {
    notify_systemd_with_fds(&format!("FDSTORE=1\nFDNAME={name}"), fds)
}

fn remove(name: &str) -> std::io::Result<bool> {
    notify_systemd_with_fds(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

impl Store {
    /// Keeps `connection` and the checkpoint (FILES messages, then one
    /// CHECKPOINT) with systemd; nothing happens without systemd.
    pub fn save(&mut self, connection: &Message, checkpoint: &[Message]) -> std::io::Result<()> {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Ok(());
        }
        if !self.has_fuse {
            let Some(fuse) = connection.fds.first() else {
                return Ok(());
            };
            store(FUSE, &[fuse.as_fd()])?;
            self.has_fuse = true;
        }
        let Some(last) = checkpoint.last().filter(|m| m.tag == handover::CHECKPOINT) else {
            return Ok(());
        };
        let files: Vec<&OwnedFd> = checkpoint
            .iter()
            .filter(|m| m.tag == handover::FILES)
            .flat_map(|m| &m.fds)
            .collect();
        self.seq += 1;
        let seq = self.seq;
        let mut names = Vec::new();
        for (i, fd) in files.iter().enumerate() {
            let name = format!("nvlibfs-{seq}-file-{i}");
            store(&name, &[fd.as_fd()])?;
            names.push(name);
        }
        let state = state_memfd(&connection.body, &last.body, files.len())?;
        let name = format!("nvlibfs-{seq}-state");
        store(&name, &[state.as_fd()])?;
        names.push(name);
        for old in std::mem::replace(&mut self.stored, names) {
            remove(&old)?;
        }
        Ok(())
    }
}

fn state_memfd(init: &[u8], checkpoint: &[u8], files: usize) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let mut file = std::fs::File::from(memfd_create(
        c"nvlibfs-state",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?);
    for part in [init, checkpoint] {
        file.write_all(&(part.len() as u64).to_le_bytes())?;
        file.write_all(part)?;
    }
    file.write_all(&(files as u64).to_le_bytes())?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(OwnedFd::from(file))
}

/// What systemd handed back at start: the connection and the newest whole
/// checkpoint, as messages to replay to a server, and the store as it is.
pub struct Restored {
    pub connection: Message,
    pub checkpoint: Vec<Message>,
    pub store: Store,
}

/// The descriptors systemd passed (`LISTEN_FDS`, for this process), by name.
fn passed() -> Vec<(String, OwnedFd)> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || count <= 0 {
        return Vec::new();
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    (0..count)
        .map(|i| {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: systemd passed descriptors LISTEN_FDS_START.. for us.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            (names.get(i as usize).unwrap_or(&"").to_string(), owned)
        })
        .collect()
}

/// The connection and checkpoint systemd kept, if it kept a whole set.
pub fn restore() -> std::io::Result<Option<Restored>> {
    let mut fds = passed();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(fuse_at) = fds.iter().position(|(n, _)| n == FUSE) else {
        return Ok(None);
    };
    let (_, fuse) = fds.remove(fuse_at);
    let seq_of = |name: &str| {
        name.strip_prefix("nvlibfs-")?
            .strip_suffix("-state")?
            .parse::<u64>()
            .ok()
    };
    let Some(seq) = fds.iter().filter_map(|(n, _)| seq_of(n)).max() else {
        return Ok(None);
    };
    let state_at = fds
        .iter()
        .position(|(n, _)| *n == format!("nvlibfs-{seq}-state"))
        .expect("found above");
    let (_, state) = fds.remove(state_at);
    let mut state = std::fs::File::from(state);
    state.rewind()?;
    let mut read_part = || -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 8];
        state.read_exact(&mut len)?;
        let mut part = vec![0u8; u64::from_le_bytes(len) as usize];
        state.read_exact(&mut part)?;
        Ok(part)
    };
    let init = read_part()?;
    let checkpoint_json = read_part()?;
    let mut count = [0u8; 8];
    state.read_exact(&mut count)?;
    let count = u64::from_le_bytes(count) as usize;
    let prefix = format!("nvlibfs-{seq}-file-");
    let mut files: Vec<Option<OwnedFd>> = (0..count).map(|_| None).collect();
    let mut stored = vec![format!("nvlibfs-{seq}-state")];
    for (name, fd) in fds {
        if let Some(i) = name.strip_prefix(&prefix).and_then(|i| i.parse::<usize>().ok()) {
            if let Some(slot) = files.get_mut(i) {
                *slot = Some(fd);
                stored.push(name);
                continue;
            }
        }
        // An older, superseded set: systemd may keep it; ask it not to.
        let _ = remove(&name);
    }
    let files: Option<Vec<OwnedFd>> = files.into_iter().collect();
    let Some(files) = files else {
        return Err(std::io::Error::other(format!(
            "systemd kept checkpoint {seq} without all of its {count} files"
        )));
    };
    let mut checkpoint = Vec::new();
    let mut files = files.into_iter().peekable();
    while files.peek().is_some() {
        checkpoint.push(Message {
            tag: handover::FILES,
            body: Vec::new(),
            fds: files.by_ref().take(FDS_PER_MESSAGE).collect(),
        });
    }
    checkpoint.push(Message {
        tag: handover::CHECKPOINT,
        body: checkpoint_json,
        fds: Vec::new(),
    });
    Ok(Some(Restored {
        connection: Message {
            tag: handover::CONNECTION,
            body: init,
            fds: vec![fuse],
        },
        checkpoint,
        store: Store {
            seq,
            stored,
            has_fuse: true,
        },
    }))
}
