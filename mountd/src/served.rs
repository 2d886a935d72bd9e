//! What one mount serves: a sequence of immutable generations (one per
//! pinned driver version), how file data reaches readers, and counters.
//!
//! A driver change installs a new generation; the old one is swapped out
//! whole, never edited. Kernel inode numbers carry the generation in their
//! high 32 bits (the root is always 1), so files opened or looked up before
//! a swap keep resolving to the old generation's held files until the
//! kernel forgets them; then the old generation is dropped and its files
//! and backing ids are released.

use fuser::BackingId;
use memmap2::Mmap;
use nvlibfs::control::{Counters, Status};
use nvlibfs::view::{Ino, NodeKind, View, ROOT_INO};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

/// FUSE's root inode: always the current generation's root.
pub const FUSE_ROOT: u64 = 1;

/// The kernel inode number of a view inode of generation `number`.
pub fn fuse_ino(number: u32, local: Ino) -> u64 {
    if local == ROOT_INO {
        FUSE_ROOT
    } else {
        ((number as u64) << 32) | local
    }
}

/// A directory listing: names with kernel inode numbers.
pub type DirEntries = Vec<(OsString, u64)>;

/// How file contents reach a reader; chosen once per mount.
enum Mode {
    /// The kernel reads the held host files directly: no READ request
    /// reaches the daemon, and pages live in the host file's own page cache.
    /// `dev` is the FUSE connection, for registering backing files.
    Passthrough { dev: Arc<OwnedFd> },
    /// The daemon answers READ from mappings of the held files; opens keep
    /// the page cache, so each page is read through the daemon once.
    Cached { reason: String },
}

/// Per-file data access of one generation.
enum FileData {
    /// One backing id per file, used for every open of it.
    Backing(HashMap<Ino, u32>, Arc<OwnedFd>),
    Maps(HashMap<Ino, Mmap>),
}

/// One immutable view as served.
pub struct Generation {
    pub number: u32,
    pub view: View,
    data: FileData,
    /// Kernel references into this generation: lookup counts not yet
    /// forgotten, plus open files.
    refs: AtomicU64,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let FileData::Backing(ids, dev) = &self.data {
            for &id in ids.values() {
                close_backing(dev, id);
            }
        }
        tracing::info!(generation = self.number, version = %self.view.pin().version, "released a generation's files");
    }
}

impl Generation {
    pub fn hold(&self, n: u64) {
        self.refs.fetch_add(n, Relaxed);
    }

    /// Backing id of a file, on the passthrough path.
    pub fn backing_id(&self, local: Ino) -> Option<Option<u32>> {
        match &self.data {
            FileData::Backing(ids, _) => Some(ids.get(&local).copied()),
            FileData::Maps(_) => None,
        }
    }

    /// Bytes for a READ; only the cached path gets these.
    pub fn read(&self, local: Ino, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let NodeKind::File(file) = &self.view.node(local).ok_or(libc::ENOENT)?.kind else {
            return Err(libc::EISDIR);
        };
        match &self.data {
            FileData::Maps(maps) => {
                let Some(map) = maps.get(&local) else {
                    return Ok(Vec::new());
                };
                let start = (offset as usize).min(map.len());
                let end = start.saturating_add(size as usize).min(map.len());
                // Touching mapped pages past the file's end would kill the
                // daemon with SIGBUS, and a file whose size changed on disk
                // is not the one that was checked: refuse it loudly.
                let now = file
                    .file
                    .metadata()
                    .map(|m| m.len())
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                if now != file.size {
                    tracing::error!(
                        "{} changed size on disk ({} -> {now} bytes) while served; refusing its reads",
                        file.source,
                        file.size
                    );
                    return Err(libc::EIO);
                }
                Ok(map[start..end].to_vec())
            }
            // A read that reached us anyway: answer from the file.
            FileData::Backing(..) => {
                let mut buf = vec![0; (size as u64).min(file.size.saturating_sub(offset)) as usize];
                let n = std::os::unix::fs::FileExt::read_at(&file.file, &mut buf, offset)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }

    /// `.`, `..` and the directory's entries, as kernel inode numbers.
    pub fn dir_entries(&self, local: Ino) -> Option<DirEntries> {
        let node = self.view.node(local)?;
        let NodeKind::Dir(entries) = &node.kind else {
            return None;
        };
        let parent = if local == ROOT_INO { ROOT_INO } else { node.parent };
        let mut out = vec![
            (OsString::from("."), fuse_ino(self.number, local)),
            (OsString::from(".."), fuse_ino(self.number, parent)),
        ];
        out.extend(entries.iter().map(|(n, &i)| (n.clone(), fuse_ino(self.number, i))));
        Some(out)
    }

    fn files(&self) -> Vec<(Ino, &std::fs::File)> {
        files_of(&self.view)
    }
}

fn files_of(view: &View) -> Vec<(Ino, &std::fs::File)> {
    view.walk()
        .into_iter()
        .filter_map(|(_, ino)| match &view.node(ino)?.kind {
            NodeKind::File(f) => Some((ino, &f.file)),
            _ => None,
        })
        .collect()
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
    pub mountpoint: PathBuf,
    pub counters: AtomicCounters,
    /// Set by FUSE INIT: whether the kernel agreed to passthrough.
    pub passthrough_offered: AtomicBool,
    wants_passthrough: bool,
    /// The first view, until the data path is chosen and it becomes
    /// generation 0.
    first: Mutex<Option<View>>,
    mode: OnceLock<Mode>,
    current: RwLock<Option<Arc<Generation>>>,
    /// Swapped-out generations the kernel still refers to.
    retired: Mutex<Vec<Arc<Generation>>>,
    /// Why the current generation is not the loaded module's full driver.
    pin_problem: Mutex<Option<String>>,
    started: Instant,
}

impl Served {
    pub fn new(view: View, mountpoint: PathBuf, wants_passthrough: bool) -> Served {
        Served {
            mountpoint,
            counters: AtomicCounters::default(),
            passthrough_offered: AtomicBool::new(false),
            wants_passthrough,
            first: Mutex::new(Some(view)),
            mode: OnceLock::new(),
            current: RwLock::new(None),
            retired: Mutex::new(Vec::new()),
            pin_problem: Mutex::new(None),
            started: Instant::now(),
        }
    }

    pub fn wants_passthrough(&self) -> bool {
        self.wants_passthrough
    }

    /// Chooses how file data is served and installs the first view as
    /// generation 0. Passthrough registers every file as a backing file with
    /// the FUSE connection `dev`; if the kernel or our privileges refuse
    /// any, the whole mount maps the files instead. All or nothing: an inode
    /// must never be open in both modes (the kernel answers EIO).
    pub fn start(&self, dev: impl AsFd) {
        let view = self.first.lock().unwrap().take().expect("started once");
        let mode = if !self.wants_passthrough {
            Mode::Cached {
                reason: "--no-passthrough was given".into(),
            }
        } else if !self.passthrough_offered.load(Relaxed) {
            Mode::Cached {
                reason: "the kernel did not offer FUSE passthrough (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"
                    .into(),
            }
        } else {
            match dev.as_fd().try_clone_to_owned() {
                Ok(dev) => Mode::Passthrough { dev: Arc::new(dev) },
                Err(e) => Mode::Cached {
                    reason: format!("cannot keep the FUSE connection for passthrough: {e}"),
                },
            }
        };
        let (mode, data) = match self.file_data(&view, &mode) {
            Ok(data) => (mode, data),
            Err(reason) => {
                let cached = Mode::Cached { reason };
                let data = self.file_data(&view, &cached).expect("the cached path always works");
                (cached, data)
            }
        };
        match &mode {
            Mode::Passthrough { .. } => tracing::info!("serving file data by FUSE passthrough"),
            Mode::Cached { reason } => {
                tracing::warn!("serving file data through the daemon and the page cache: {reason}")
            }
        }
        if self.mode.set(mode).is_err() {
            tracing::error!("data path chosen twice; keeping the first");
        }
        *self.current.write().unwrap() = Some(Arc::new(Generation {
            number: 0,
            view,
            data,
            refs: AtomicU64::new(0),
        }));
    }

    /// Registers (passthrough) or maps (cached) a view's files.
    fn file_data(&self, view: &View, mode: &Mode) -> Result<FileData, String> {
        match mode {
            Mode::Passthrough { dev } => {
                let mut ids = HashMap::new();
                for (ino, file) in files_of(view) {
                    match BackingId::create_raw(dev.as_fd(), file) {
                        Ok(id) => {
                            ids.insert(ino, id);
                        }
                        Err(e) => {
                            for id in ids.into_values() {
                                close_backing(dev, id);
                            }
                            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                                " (passthrough needs CAP_SYS_ADMIN in the initial user namespace)"
                            } else {
                                ""
                            };
                            return Err(format!(
                                "registering {} as a passthrough backing file failed: {e}{hint}",
                                source_of(view, ino)
                            ));
                        }
                    }
                }
                Ok(FileData::Backing(ids, dev.clone()))
            }
            Mode::Cached { .. } => {
                let mut maps = HashMap::new();
                for (ino, file) in files_of(view) {
                    // Empty files cannot be mapped; they are served as empty.
                    if file.metadata().is_ok_and(|m| m.len() > 0) {
                        // SAFETY: a private read-only mapping of a file we
                        // hold open; pages are read lazily.
                        match unsafe { Mmap::map(file) } {
                            Ok(map) => {
                                maps.insert(ino, map);
                            }
                            Err(e) => {
                                tracing::error!("cannot map {}: {e}; reads of it will fail", source_of(view, ino))
                            }
                        }
                    }
                }
                Ok(FileData::Maps(maps))
            }
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.read().unwrap().clone().expect("started before serving")
    }

    /// The generation a kernel inode belongs to, and its inode in that view.
    pub fn resolve(&self, ino: u64) -> Option<(Arc<Generation>, Ino)> {
        let current = self.current();
        if ino == FUSE_ROOT {
            return Some((current, ROOT_INO));
        }
        let (number, local) = ((ino >> 32) as u32, ino & 0xffff_ffff);
        if number == current.number {
            return Some((current, local));
        }
        let retired = self.retired.lock().unwrap();
        retired.iter().find(|g| g.number == number).map(|g| (g.clone(), local))
    }

    /// The kernel dropped `n` references to an inode of `generation`.
    pub fn release(&self, generation: &Generation, n: u64) {
        let before = generation
            .refs
            .fetch_update(Relaxed, Relaxed, |r| Some(r.saturating_sub(n)))
            .unwrap_or_default();
        if before <= n && generation.number != self.current().number {
            self.retired.lock().unwrap().retain(|g| g.number != generation.number);
        }
    }

    /// Swaps in a new view; returns the generation it replaced, whose root
    /// entries the caller invalidates in the kernel.
    pub fn install(&self, view: View, pin_problem: Option<String>) -> Arc<Generation> {
        let mode = self.mode.get().expect("started before installing");
        let data = match self.file_data(&view, mode) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!("{e}; serving this generation through the cache instead");
                self.file_data(&view, &Mode::Cached { reason: e.clone() })
                    .expect("the cached path always works")
            }
        };
        let mut current = self.current.write().unwrap();
        let old = current.clone().expect("started before installing");
        let new = Arc::new(Generation {
            number: old.number + 1,
            view,
            data,
            refs: AtomicU64::new(0),
        });
        tracing::info!(
            generation = new.number,
            version = %new.view.pin().version,
            "installed a new generation"
        );
        *current = Some(new);
        drop(current);
        *self.pin_problem.lock().unwrap() = pin_problem;
        if old.refs.load(Relaxed) > 0 {
            self.retired.lock().unwrap().push(old.clone());
        }
        old
    }

    pub fn pin_problem(&self) -> Option<String> {
        self.pin_problem.lock().unwrap().clone()
    }

    pub fn refuse_write(&self, op: &str) {
        self.counters.write_attempts.fetch_add(1, Relaxed);
        tracing::debug!("refused {op}: read-only file system");
    }

    pub fn status(&self) -> Status {
        let current = self.current.read().unwrap().clone();
        let Some(generation) = current else {
            return Status::starting(self.mountpoint.clone());
        };
        let manifest = generation.view.manifest();
        let c = &self.counters;
        let (data_path, fallback_reason) = match self.mode.get() {
            Some(Mode::Passthrough { .. }) => ("passthrough", None),
            Some(Mode::Cached { reason }) => ("cached", Some(reason.clone())),
            None => ("starting", None),
        };
        let retired = self.retired.lock().unwrap();
        Status {
            mountpoint: self.mountpoint.clone(),
            pid: std::process::id(),
            driver_version: manifest.driver_version,
            version_source: manifest.version_source,
            driver_root: manifest.driver_root.clone().into(),
            data_path: data_path.to_owned(),
            fallback_reason,
            files: manifest.files.len() as u64,
            bytes: manifest.files.iter().map(|f| f.size).sum(),
            symlinks: manifest.symlinks.len() as u64,
            uptime_s: self.started.elapsed().as_secs_f64(),
            rss_bytes: rss_bytes(),
            generation: generation.number,
            retired_generations: retired.len() as u64,
            held_files_replaced_on_disk: replaced_on_disk(&generation, &manifest.driver_root),
            pin_problem: self.pin_problem(),
            generations: Vec::new(),
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

/// Held files whose host path now names another file, or nothing: what a
/// package upgrade does while the old module stays loaded.
fn replaced_on_disk(generation: &Generation, driver_root: &str) -> u64 {
    let root = std::path::Path::new(driver_root);
    generation
        .files()
        .into_iter()
        .filter(|(ino, file)| {
            let Some(NodeKind::File(f)) = generation.view.node(*ino).map(|n| &n.kind) else {
                return false;
            };
            if f.kind == nvlibfs::select::FileKind::Generated {
                return false;
            }
            let held = file.metadata().map(|m| (m.dev(), m.ino())).ok();
            let on_disk = std::fs::metadata(root.join(f.source.relative()))
                .map(|m| (m.dev(), m.ino()))
                .ok();
            held != on_disk
        })
        .count() as u64
}

fn source_of(view: &View, ino: Ino) -> String {
    match view.node(ino).map(|n| &n.kind) {
        Some(NodeKind::File(f)) => f.source.to_string(),
        _ => format!("inode {ino}"),
    }
}

/// FUSE_DEV_IOC_BACKING_CLOSE: `_IOW(229, 2, uint32_t)`.
fn close_backing(dev: &OwnedFd, id: u32) {
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
