//! systemd's file-descriptor store: everything the supervisor keeps (the
//! FUSE connection, each generation's held files, the last acknowledged
//! checkpoint) is kept by systemd too, so that when the whole daemon dies
//! (`systemctl kill`, a crash of the supervisor itself) the supervisor
//! that systemd starts next takes the connection over like any new server
//! does, instead of mounting afresh.
//!
//! Names: `nvlibfs-fuse`, `nvlibfs-init` (a sealed memfd of the
//! connection's INIT record) and `nvlibfs-counts` (the shared reference
//! counters) once; `nvlibfs-g<N>-<I>` for generation N's files, stored
//! once each; `nvlibfs-spec-<N>` for the Nth CDI spec memfd; for
//! checkpoint SEQ, `nvlibfs-k<SEQ>-manifest` (a sealed memfd of its
//! manifest) and `-state`. systemd keeps a descriptor it already holds
//! under its first name only, so what does not change between
//! checkpoints (the counters, a spec) is stored once, not per checkpoint. A new
//! checkpoint is stored whole before the previous one and the generations
//! it no longer names are removed, so a crash in between leaves a whole
//! set, and a set is checked like any checkpoint before it is used.

use crate::kept::Kept;
use crate::protocol::{Manifest, Message, Tag};
use crate::systemd::notify_with_fds;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

const FUSE: &str = "nvlibfs-fuse";
const INIT: &str = "nvlibfs-init";
const COUNTS: &str = "nvlibfs-counts";
const SPEC: &str = "nvlibfs-spec-";
/// Descriptors systemd passes start here (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: i32 = 3;
/// The largest memfd read back (an INIT record, a manifest).
const MAX_SMALL: u64 = 1 << 20;

/// What the supervisor has stored, so the next set can replace it.
#[derive(Default)]
pub struct Store {
    has_connection: bool,
    /// Generations stored, with how many files each.
    generations: BTreeMap<u32, usize>,
    checkpoint: Option<u64>,
    /// The spec stored: its number and the memfd's device and inode.
    spec: Option<(u64, (u64, u64))>,
}

fn store(name: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<bool> {
    notify_with_fds(&format!("FDSTORE=1\nFDNAME={name}"), fds)
}

fn remove(name: &str) -> std::io::Result<bool> {
    notify_with_fds(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

fn sealed(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    Ok(nvlibfs::select::sealed_memfd(c"nvlibfs-fdstore", &[bytes])?.into())
}

fn read_small(fd: OwnedFd, what: &str) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    let len = file.metadata()?.len();
    if len > MAX_SMALL {
        return Err(std::io::Error::other(format!("systemd kept a {what} of {len} bytes")));
    }
    file.rewind()?;
    let mut out = Vec::with_capacity(len as usize);
    file.read_to_end(&mut out)?;
    Ok(out)
}

impl Store {
    /// Keeps what `kept` holds with systemd; nothing happens without
    /// systemd.
    pub fn save(&mut self, kept: &Kept) -> std::io::Result<()> {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Ok(());
        }
        let (Some(connection), Some((manifest, checkpoint))) = (&kept.connection, kept.checkpoint()) else {
            return Ok(());
        };
        if !self.has_connection {
            let init = sealed(&connection.body)?;
            store(FUSE, &[connection.fds[0].as_fd()])?;
            store(INIT, &[init.as_fd()])?;
            store(COUNTS, &[checkpoint.fds[1].as_fd()])?;
            self.has_connection = true;
        }
        if let Some(spec) = checkpoint.fds.get(2) {
            let stat = nix::sys::stat::fstat(spec)?;
            let identity = (stat.st_dev, stat.st_ino);
            if self.spec.is_none_or(|(_, stored)| stored != identity) {
                let n = self.spec.map_or(0, |(n, _)| n + 1);
                store(&format!("{SPEC}{n}"), &[spec.as_fd()])?;
                if let Some((old, _)) = self.spec.replace((n, identity)) {
                    remove(&format!("{SPEC}{old}"))?;
                }
            }
        }
        let mut now = BTreeSet::new();
        for (number, files) in kept.generations() {
            now.insert(number);
            if self.generations.contains_key(&number) {
                continue;
            }
            for (i, f) in files.iter().enumerate() {
                store(&format!("nvlibfs-g{number}-{i}"), &[f.as_fd()])?;
            }
            self.generations.insert(number, files.len());
        }
        let seq = manifest.seq;
        store(
            &format!("nvlibfs-k{seq}-manifest"),
            &[sealed(&checkpoint.body)?.as_fd()],
        )?;
        store(&format!("nvlibfs-k{seq}-state"), &[checkpoint.fds[0].as_fd()])?;
        if let Some(old) = self.checkpoint.replace(seq) {
            for part in ["manifest", "state"] {
                remove(&format!("nvlibfs-k{old}-{part}"))?;
            }
        }
        let gone: Vec<(u32, usize)> = (self.generations.iter())
            .filter(|(n, _)| !now.contains(n))
            .map(|(&n, &c)| (n, c))
            .collect();
        for (number, count) in gone {
            for i in 0..count {
                remove(&format!("nvlibfs-g{number}-{i}"))?;
            }
            self.generations.remove(&number);
        }
        Ok(())
    }
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

/// What systemd kept, checked like any checkpoint, and the store as it
/// is; `None` if it kept no whole set.
pub fn restore() -> std::io::Result<Option<(Kept, Store)>> {
    let fds = passed();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let mut by_name: BTreeMap<String, OwnedFd> = fds.into_iter().collect();
    let (Some(fuse), Some(init), Some(counts)) = (by_name.remove(FUSE), by_name.remove(INIT), by_name.remove(COUNTS))
    else {
        return Ok(None);
    };
    let spec_of = |name: &str| name.strip_prefix(SPEC)?.parse::<u64>().ok();
    let spec = by_name.keys().filter_map(|n| spec_of(n)).max();
    let spec = spec.and_then(|n| Some((n, by_name.remove(&format!("{SPEC}{n}"))?)));
    let seq_of = |name: &str| {
        name.strip_prefix("nvlibfs-k")?
            .strip_suffix("-manifest")?
            .parse::<u64>()
            .ok()
    };
    let Some(seq) = by_name.keys().filter_map(|n| seq_of(n)).max() else {
        return Ok(None);
    };
    let part = |by_name: &mut BTreeMap<String, OwnedFd>, what: &str| {
        by_name
            .remove(&format!("nvlibfs-k{seq}-{what}"))
            .ok_or_else(|| std::io::Error::other(format!("systemd kept checkpoint {seq} without its {what}")))
    };
    let manifest_body = read_small(part(&mut by_name, "manifest")?, "manifest")?;
    let state = part(&mut by_name, "state")?;
    let manifest = Manifest::decode(&manifest_body).map_err(|e| std::io::Error::other(e.0))?;
    let mut generations: BTreeMap<u32, Vec<OwnedFd>> = BTreeMap::new();
    let spec_identity = match &spec {
        Some((n, fd)) => {
            let stat = nix::sys::stat::fstat(fd)?;
            Some((*n, (stat.st_dev, stat.st_ino)))
        }
        None => None,
    };
    let mut store = Store {
        has_connection: true,
        generations: BTreeMap::new(),
        checkpoint: Some(seq),
        spec: spec_identity,
    };
    for &(number, count) in &manifest.generations {
        let mut files = Vec::with_capacity(count as usize);
        for i in 0..count {
            let name = format!("nvlibfs-g{number}-{i}");
            let fd = by_name
                .remove(&name)
                .ok_or_else(|| std::io::Error::other(format!("systemd kept checkpoint {seq} without {name}")))?;
            files.push(fd);
        }
        generations.insert(number, files);
        store.generations.insert(number, count as usize);
    }
    // Older, superseded descriptors: systemd may keep them; ask it not to.
    for name in by_name.keys() {
        let _ = remove(name);
    }
    let connection = Message::new(Tag::Connection, read_small(init, "INIT record")?, vec![fuse]);
    let checkpoint = Message::new(
        Tag::Checkpoint,
        manifest_body,
        [state, counts].into_iter().chain(spec.map(|(_, fd)| fd)).collect(),
    );
    let kept = Kept::from_parts(connection, generations, checkpoint).map_err(|e| std::io::Error::other(e.0))?;
    Ok(Some((kept, store)))
}
