//! A view as one mount serves it: the view, how file data reaches readers
//! (passthrough or the page cache), and request counters.

use fuser::BackingId;
use memmap2::Mmap;
use nvlibfs::control::{Counters, Status};
use nvlibfs::view::{Ino, NodeKind, View, ROOT_INO};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// How file contents reach a reader.
pub enum DataPath {
    /// The kernel reads the held host files directly: no READ request ever
    /// reaches the daemon, and pages live in the host file's own page cache.
    /// One backing id per file, used for every open of it.
    Passthrough(HashMap<Ino, u32>),
    /// The daemon answers READ from a mapping of the held file; opens keep
    /// the page cache, so each page is read through the daemon once.
    Cached { maps: HashMap<Ino, Mmap>, reason: String },
}

#[derive(Default)]
pub struct AtomicCounters {
    pub lookups: AtomicU64,
    pub getattrs: AtomicU64,
    pub readlinks: AtomicU64,
    pub opens: AtomicU64,
    pub readdirs: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub write_attempts: AtomicU64,
}

pub struct Served {
    pub view: View,
    pub mountpoint: PathBuf,
    pub counters: AtomicCounters,
    /// Set by FUSE INIT: whether the kernel agreed to passthrough.
    pub passthrough_offered: AtomicBool,
    wants_passthrough: bool,
    /// Decided once, after INIT and before the first request is read.
    data: OnceLock<DataPath>,
    started: Instant,
}

impl Served {
    pub fn new(view: View, mountpoint: PathBuf, wants_passthrough: bool) -> Served {
        Served {
            view,
            mountpoint,
            counters: AtomicCounters::default(),
            passthrough_offered: AtomicBool::new(false),
            wants_passthrough,
            data: OnceLock::new(),
            started: Instant::now(),
        }
    }

    pub fn wants_passthrough(&self) -> bool {
        self.wants_passthrough
    }

    fn files(&self) -> impl Iterator<Item = (Ino, &std::fs::File)> {
        self.view
            .walk()
            .into_iter()
            .filter_map(|(_, ino)| match &self.view.node(ino)?.kind {
                NodeKind::File(f) => Some((ino, &f.file)),
                _ => None,
            })
    }

    /// Registers every file as a passthrough backing file with the FUSE
    /// connection `dev`, or, if the kernel or our privileges refuse, maps them
    /// for the cached path. All or nothing: an inode must never be open in
    /// both modes (the kernel answers EIO).
    pub fn choose_data_path(&self, dev: impl AsFd) {
        let path = if !self.wants_passthrough {
            self.cached("--no-passthrough was given".into())
        } else if !self.passthrough_offered.load(Relaxed) {
            self.cached(
                "the kernel did not offer FUSE passthrough (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)".into(),
            )
        } else {
            let mut ids = HashMap::new();
            let mut failure = None;
            for (ino, file) in self.files() {
                match BackingId::create_raw(dev.as_fd(), file) {
                    Ok(id) => {
                        ids.insert(ino, id);
                    }
                    Err(e) => {
                        failure = Some(format!(
                            "registering {} as a passthrough backing file failed: {e}{}",
                            self.source_of(ino),
                            if e.raw_os_error() == Some(libc::EPERM) {
                                " (passthrough needs CAP_SYS_ADMIN in the initial user namespace)"
                            } else {
                                ""
                            }
                        ));
                        break;
                    }
                }
            }
            match failure {
                None => DataPath::Passthrough(ids),
                Some(reason) => {
                    for id in ids.into_values() {
                        close_backing(dev.as_fd(), id);
                    }
                    self.cached(reason)
                }
            }
        };
        match &path {
            DataPath::Passthrough(ids) => tracing::info!(files = ids.len(), "serving file data by FUSE passthrough"),
            DataPath::Cached { reason, .. } => {
                tracing::warn!("serving file data through the daemon and the page cache: {reason}")
            }
        }
        if self.data.set(path).is_err() {
            tracing::error!("data path chosen twice; keeping the first");
        }
    }

    fn cached(&self, reason: String) -> DataPath {
        let mut maps = HashMap::new();
        for (ino, file) in self.files() {
            // Empty files cannot be mapped; they are served as empty.
            if file.metadata().is_ok_and(|m| m.len() > 0) {
                // SAFETY: a private read-only mapping of a file we hold open.
                // Pages are read lazily; the view serves immutable driver
                // files, so a concurrent writer is an operator error.
                match unsafe { Mmap::map(file) } {
                    Ok(map) => {
                        maps.insert(ino, map);
                    }
                    Err(e) => tracing::error!("cannot map {}: {e}; reads of it will fail", self.source_of(ino)),
                }
            }
        }
        DataPath::Cached { maps, reason }
    }

    fn source_of(&self, ino: Ino) -> String {
        match self.view.node(ino).map(|n| &n.kind) {
            Some(NodeKind::File(f)) => f.source.to_string(),
            _ => format!("inode {ino}"),
        }
    }

    pub fn data_path(&self) -> &DataPath {
        // Set before the session starts reading requests.
        self.data.get().expect("data path chosen before serving")
    }

    /// Bytes for a READ; only the cached path gets these.
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let NodeKind::File(file) = &self.view.node(ino).ok_or(libc::ENOENT)?.kind else {
            return Err(libc::EISDIR);
        };
        match self.data_path() {
            DataPath::Cached { maps, .. } => {
                let Some(map) = maps.get(&ino) else {
                    return Ok(Vec::new());
                };
                let start = (offset as usize).min(map.len());
                let end = start.saturating_add(size as usize).min(map.len());
                Ok(map[start..end].to_vec())
            }
            // A read that reached us anyway: answer from the file.
            DataPath::Passthrough(_) => {
                let mut buf = vec![0; (size as u64).min(file.size.saturating_sub(offset)) as usize];
                let n = std::os::unix::fs::FileExt::read_at(&file.file, &mut buf, offset)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }

    /// `.`, `..` and the directory's entries, in a stable order.
    pub fn dir_entries(&self, ino: Ino) -> Option<Vec<(OsString, Ino)>> {
        let node = self.view.node(ino)?;
        let NodeKind::Dir(entries) = &node.kind else {
            return None;
        };
        let parent = if ino == ROOT_INO { ROOT_INO } else { node.parent };
        let mut out = vec![(OsString::from("."), ino), (OsString::from(".."), parent)];
        out.extend(entries.iter().map(|(n, &i)| (n.clone(), i)));
        Some(out)
    }

    /// (nodes, bytes of file data) in the view.
    pub fn totals(&self) -> (u64, u64) {
        let walk = self.view.walk();
        let bytes = walk
            .iter()
            .filter_map(|(_, ino)| match &self.view.node(*ino)?.kind {
                NodeKind::File(f) => Some(f.size),
                _ => None,
            })
            .sum();
        (walk.len() as u64 + 1, bytes)
    }

    pub fn refuse_write(&self, op: &str) {
        self.counters.write_attempts.fetch_add(1, Relaxed);
        tracing::debug!("refused {op}: read-only file system");
    }

    pub fn status(&self) -> Status {
        let manifest = self.view.manifest();
        let c = &self.counters;
        let (data_path, fallback_reason) = match self.data.get() {
            Some(DataPath::Passthrough(_)) => ("passthrough", None),
            Some(DataPath::Cached { reason, .. }) => ("cached", Some(reason.clone())),
            None => ("starting", None),
        };
        Status {
            mountpoint: self.mountpoint.clone(),
            pid: std::process::id(),
            driver_version: manifest.driver_version,
            version_source: manifest.version_source,
            driver_root: manifest.driver_root.into(),
            data_path: data_path.to_owned(),
            fallback_reason,
            files: manifest.files.len() as u64,
            bytes: manifest.files.iter().map(|f| f.size).sum(),
            symlinks: manifest.symlinks.len() as u64,
            uptime_s: self.started.elapsed().as_secs_f64(),
            rss_bytes: rss_bytes(),
            counters: Counters {
                lookups: c.lookups.load(Relaxed),
                getattrs: c.getattrs.load(Relaxed),
                readlinks: c.readlinks.load(Relaxed),
                opens: c.opens.load(Relaxed),
                readdirs: c.readdirs.load(Relaxed),
                reads: c.reads.load(Relaxed),
                bytes_read: c.bytes_read.load(Relaxed),
                write_attempts: c.write_attempts.load(Relaxed),
            },
        }
    }
}

/// FUSE_DEV_IOC_BACKING_CLOSE: `_IOW(229, 2, uint32_t)`.
fn close_backing(dev: std::os::fd::BorrowedFd<'_>, id: u32) {
    const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
    // SAFETY: the ioctl reads one u32 from the pointer we pass.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &id as *const u32) };
    if rc < 0 {
        tracing::warn!("closing backing id {id}: {}", std::io::Error::last_os_error());
    }
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
