//! The serving core: what one mount serves and every answer it gives, in
//! plain types. `fs.rs` only translates these to and from FUSE; the tests
//! in `tests/core_model.rs` drive this core directly from many threads.
//!
//! A mount serves a sequence of immutable generations (one per pinned
//! driver version). A driver change installs a new generation; the old one
//! is swapped out whole, never edited. Each generation owns a range of
//! kernel inode numbers (the root is always 1, the current generation's
//! root), so names looked up or files opened before a swap keep resolving
//! to the old generation's held files for as long as the kernel refers to
//! them. The kernel's references (lookup counts, open files) are counted
//! per generation under the same lock that retires generations, and taken
//! before the answer that hands them to the kernel leaves the core: a
//! retired generation is freed exactly when the kernel lets go of its last
//! inode, never earlier.

mod answers;
mod checkpoint;
mod counts;
mod generation;
mod spec;

pub use checkpoint::{Checkpoint, DataState, GenerationState, Snapshot};
pub use counts::AtomicCounters;
use counts::*;
use generation::*;
pub use generation::{Backing, Generation};
pub use spec::SpecState;
use spec::*;

use crate::backing::Registry;
use crate::protocol::InitRecord;
use nvlibfs::control::{Counters, GenerationStatus, Status};
use nvlibfs::select::FileKind;
use nvlibfs::view::ViewSnapshot;
use nvlibfs::view::{Attr, Ino, NodeKind, View, ROOT_INO};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// FUSE's root inode: always the current generation's root.
pub const FUSE_ROOT: u64 = 1;
/// Longest name in the view, as statfs reports it. The kernel lets FUSE
/// names reach 1024 bytes, so the core says ENAMETOOLONG itself.
pub const NAME_MAX: usize = 255;
/// The kernel inode of the mount's CDI spec (see `Spec`), the last number
/// below 2^32: kernel inode numbers stay below 2^32, so a 32-bit `stat`
/// without large file support never meets EOVERFLOW.
pub const SPEC_INO: u64 = (1 << 32) - 1;
/// Generations' inode numbers stay below the spec's.
const INO_LIMIT: u64 = SPEC_INO;
/// The first inode number given to a generation's non-root inodes.
const FIRST_INO: u64 = FUSE_ROOT + 1;

/// An errno, as the kernel wants it.
pub type Errno = i32;

/// What `lookup`, `getattr` and `readdirplus` give the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `attr.ino` is the kernel inode number.
    pub attr: Attr,
    /// FUSE's per-inode generation: the view generation, so an inode number
    /// reused after 2^32 allocations still names a new inode.
    pub generation: u64,
}

/// How to answer an OPEN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// With ENOSYS: from then on the kernel opens this connection's files
    /// without asking (FUSE's no_open), keeping their page cache, and
    /// sends no RELEASE. An open file holds its inode, so the lookups the
    /// kernel counts keep its generation alive.
    ByKernel,
    /// With a handle, counted until its RELEASE.
    Handle {
        fh: u64,
        /// The backing id to reply with; `None` means the kernel sends
        /// READ and may keep the page cache across opens.
        backing_id: Option<u32>,
    },
}

/// One directory entry as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    /// The offset of the entry after this one.
    pub next_offset: u64,
    pub entry: Entry,
}

/// statfs's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStats {
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// What the kernel must be told at a swap so that new lookups reach the
/// new generation: every name in the root (FUSE's root inode is every
/// generation's root), the old generation's and those it lacked (the
/// kernel may cache their absence). Only invalidated, not deleted: a path
/// walk that passed the old `lib64` a moment ago must still find its
/// names there; deleting them (which marks a directory dead) would fail
/// that walk with ENOENT. The names below are deleted later, once the
/// generation has been retired for `RETIRED_GRACE` (`retired_names`).
#[derive(Debug, Default)]
pub struct Forgetting {
    pub root_names: Vec<OsString>,
}

/// How long a retired generation's names stay as they are in the kernel
/// before they are deleted: far longer than any path walk takes between
/// two components.
pub const RETIRED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// One cached name to drop: `name` in directory `parent` names `child`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub parent: u64,
    pub child: u64,
    pub name: OsString,
}

/// A generation `Served::stage` made live but not yet current.
#[must_use = "a staged generation serves nothing until it is committed"]
pub struct Staged {
    base: u64,
    pin_problem: Option<String>,
}

pub struct Served {
    pub mountpoint: PathBuf,
    pub counters: AtomicCounters,
    /// Set by FUSE INIT: whether the kernel agreed to passthrough.
    pub passthrough_offered: AtomicBool,
    /// Set by FUSE INIT: whether the kernel takes ENOSYS for an OPEN as
    /// "open it yourself" (Linux 4.19+).
    pub no_open_offered: AtomicBool,
    /// The connection can never serve by passthrough, so nothing needs an
    /// OPEN (each costs a round trip to this server on every `open`), and
    /// the kernel knows how to do without them.
    no_open: AtomicBool,
    wants_passthrough: bool,
    /// The connection's backing ids, for registering files; the reason
    /// instead when the cached path serves.
    passthrough_dev: Mutex<Result<Arc<Backing>, String>>,
    generations: Mutex<Generations>,
    /// Why the current generation is not the loaded module's full driver.
    pin_problem: Mutex<Option<String>>,
    /// The connection's FUSE_INIT, for a server that takes it over.
    pub init_record: Mutex<Option<InitRecord>>,
    /// Shown by `status`: who supervises this server, and the handovers.
    pub supervisor_pid: Mutex<Option<u32>>,
    pub handovers: Mutex<Vec<nvlibfs::control::Handover>>,
    /// Since when re-pins are frozen for a restart or takeover, for `status`.
    pub frozen_since: Mutex<Option<std::time::Instant>>,
    /// The serving token (statedir.rs), while this server serves alone.
    pub serving_token: Mutex<Option<std::fs::File>>,
    /// The beside token (statedir.rs), while it serves beside another.
    pub beside_token: Mutex<Option<std::fs::File>>,
    /// The session ended with the mount still there: the kernel aborted
    /// the connection (fs.rs, `destroy`).
    pub aborted: std::sync::atomic::AtomicBool,
    /// Set while draining (see drain.rs): told when fuser's threads have
    /// all ended.
    pub drained: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    spec: Mutex<Option<Arc<Spec>>>,
    /// How many specs have been served: part of `etc/cdi`'s FUSE generation.
    spec_version: AtomicU64,
    started: Instant,
}

impl Served {
    /// A core with no generation yet; fails only if no memfd can be made
    /// for the reference counters a successor must share.
    pub fn new(mountpoint: PathBuf, wants_passthrough: bool) -> std::io::Result<Served> {
        Ok(Served::with_counts(mountpoint, wants_passthrough, Counts::new()?))
    }

    fn with_counts(mountpoint: PathBuf, wants_passthrough: bool, counts: Counts) -> Served {
        Served {
            mountpoint,
            counters: AtomicCounters::default(),
            passthrough_offered: AtomicBool::new(false),
            no_open_offered: AtomicBool::new(false),
            no_open: AtomicBool::new(false),
            wants_passthrough,
            passthrough_dev: Mutex::new(Err("not started".into())),
            generations: Mutex::new(Generations::new(counts)),
            pin_problem: Mutex::new(None),
            init_record: Mutex::new(None),
            supervisor_pid: Mutex::new(None),
            handovers: Mutex::new(Vec::new()),
            frozen_since: Mutex::new(None),
            serving_token: Mutex::new(None),
            beside_token: Mutex::new(None),
            aborted: std::sync::atomic::AtomicBool::new(false),
            drained: Mutex::new(None),
            spec: Mutex::new(None),
            spec_version: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn wants_passthrough(&self) -> bool {
        self.wants_passthrough
    }

    /// Whether OPENs are answered ENOSYS (see `Opened::ByKernel`).
    pub fn no_open(&self) -> bool {
        self.no_open.load(Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Generations> {
        // A panic while counting would leave the counts unknown; nothing
        // in the locked sections panics, so poisoning cannot happen.
        self.generations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses how file data is served, given where backing files are
    /// registered (the connection; `None` in tests without one), and
    /// installs the first view.
    pub fn start(&self, view: View, registry: Option<Arc<dyn Registry>>) {
        let connected = registry.is_some();
        let device = if !self.wants_passthrough {
            Err("--no-passthrough was given".to_owned())
        } else if !self.passthrough_offered.load(Relaxed) {
            Err("the kernel did not offer FUSE passthrough (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)".into())
        } else {
            registry
                .map(|r| Backing::new(r, true))
                .ok_or_else(|| "no FUSE connection".to_owned())
        };
        // Without a connection (tests of the core) opens are counted as
        // they are with passthrough.
        let no_open = device.is_err() && connected && self.no_open_offered.load(Relaxed);
        self.no_open.store(no_open, Relaxed);
        *self.passthrough_dev.lock().unwrap_or_else(|e| e.into_inner()) = device;
        self.install(view, None);
    }

    /// Registers a view's files as passthrough backing files, or says why
    /// this generation is served through the cache. All or nothing within a
    /// generation: each inode has one mode for every open.
    fn data_path(&self, view: &View) -> DataPath {
        let backing_ids = match &*self.passthrough_dev.lock().unwrap_or_else(|e| e.into_inner()) {
            Ok(backing) => backing.clone(),
            Err(reason) => return DataPath::Cached { reason: reason.clone() },
        };
        let mut ids = HashMap::new();
        for (ino, file) in view.files() {
            match backing_ids.registry.open(file.file.as_fd()) {
                Ok(id) => {
                    ids.insert(ino, id);
                }
                Err(e) => {
                    for id in ids.into_values() {
                        backing_ids.registry.close(id);
                    }
                    let hint = if e.raw_os_error() == Some(libc::EPERM) {
                        " (passthrough needs CAP_SYS_ADMIN in the initial user namespace)"
                    } else {
                        ""
                    };
                    return DataPath::Cached {
                        reason: format!(
                            "registering {} as a passthrough backing file failed: {e}{hint}",
                            file.source
                        ),
                    };
                }
            }
        }
        DataPath::Passthrough {
            ids,
            backing: backing_ids,
        }
    }

    /// Swaps in a new view as the next generation. Returns what the kernel
    /// must be told to forget the one it replaced (nothing for the first).
    pub fn install(&self, view: View, pin_problem: Option<String>) -> Forgetting {
        match self.swap_in(view, pin_problem, |_| Ok::<(), std::convert::Infallible>(())) {
            Ok(forgetting) => forgetting,
            Err(never) => match never {},
        }
    }

    /// `install`, telling the supervisor at each step: `checkpoint` runs
    /// once the new generation is live but nothing can reach it (so a
    /// server that takes over after the commit knows every inode the
    /// kernel may have been given), and again once it is current. If the
    /// first checkpoint fails, nothing is committed: the new generation is
    /// dropped and the error returned, and the caller tries again later.
    pub fn swap_in<E>(
        &self,
        view: View,
        pin_problem: Option<String>,
        mut checkpoint: impl FnMut(&Served) -> Result<(), E>,
    ) -> Result<Forgetting, E> {
        let Some(staged) = self.stage(view, pin_problem) else {
            return Ok(Forgetting::default());
        };
        if let Err(e) = checkpoint(self) {
            self.unstage(staged);
            return Err(e);
        }
        let forgetting = self.commit(staged);
        // The staged checkpoint already names every inode the kernel can
        // now be given; this one only moves `current` on, so a failure
        // here costs a successor nothing but a re-pin of its own.
        let _ = checkpoint(self);
        Ok(forgetting)
    }

    /// Drops a staged generation that was never committed: nothing can
    /// have reached it.
    pub fn unstage(&self, staged: Staged) {
        let removed = self.lock().live.remove(&staged.base);
        drop(removed);
    }

    /// Makes a new view a live generation that nothing can reach yet:
    /// a checkpoint taken now carries it, so a server that takes over
    /// after `commit` knows every inode the kernel may have been given.
    pub fn stage(&self, view: View, pin_problem: Option<String>) -> Option<Staged> {
        let data = self.data_path(&view);
        match &data {
            DataPath::Passthrough { .. } => tracing::info!("serving file data by FUSE passthrough"),
            DataPath::Cached { reason } => {
                tracing::warn!("serving file data through the daemon and the page cache: {reason}")
            }
        }
        let stats = stats_of(&view);
        let span = view.walk().len() as u64;
        let mut generations = self.lock();
        let number = generations.next_number;
        let Some(slot) = generations.free_slot(number) else {
            tracing::error!("{COUNT_SLOTS} generations live at once; keeping the current one");
            return None;
        };
        let Some(base) = generations.allocate(span) else {
            // 2^32 inode numbers all held by the kernel at once: not a
            // state a real kernel reaches. Keep serving what we have.
            tracing::error!("no free range of {span} inode numbers; keeping the current generation");
            return None;
        };
        let new = Arc::new(Generation {
            number,
            base,
            span,
            spec_dir: spec_dir(&view),
            view,
            data,
            stats,
        });
        generations.next_number += 1;
        generations.next_base = base + span;
        generations.live.insert(
            base,
            Live {
                generation: new,
                slot,
                retired: None,
            },
        );
        Some(Staged { base, pin_problem })
    }

    /// Makes a staged generation the current one.
    pub fn commit(&self, staged: Staged) -> Forgetting {
        let mut generations = self.lock();
        let Some(new) = generations.live.get(&staged.base).map(|l| l.generation.clone()) else {
            return Forgetting::default();
        };
        tracing::info!(generation = new.number, version = %new.view.pin().version, "installed a new generation");
        let old = generations.current.replace(staged.base);
        let mut forgetting = Forgetting::default();
        if let Some(old_base) = old {
            let refs = generations.live.get(&old_base).map(|l| generations.refs(l));
            let old_gen = match refs {
                Some(0) => generations.live.remove(&old_base).map(|l| l.generation),
                Some(_) => generations.live.get_mut(&old_base).map(|l| {
                    l.retired = Some(Instant::now());
                    l.generation.clone()
                }),
                None => None,
            };
            if let Some(old_gen) = old_gen {
                let names = root_names(&old_gen.view)
                    .union(&root_names(&new.view))
                    .cloned()
                    .collect();
                forgetting.root_names = names;
            }
        }
        drop(generations);
        *self.pin_problem.lock().unwrap_or_else(|e| e.into_inner()) = staged.pin_problem;
        forgetting
    }

    /// This server alone serves the connection from now on: it frees
    /// retired generations nothing refers to, and closes the backing ids
    /// of those it freed meanwhile if `close_deferred` (a restart: they
    /// were never closed), or forgets them (a crash: the server that died
    /// may have closed them, and the kernel may have given the numbers to
    /// other files since).
    pub fn own_backing(&self, close_deferred: bool) {
        let unused: Vec<Live> = {
            let mut generations = self.lock();
            let current = generations.current;
            let bases: Vec<u64> = (generations.live.iter())
                .filter(|(&base, live)| Some(base) != current && generations.refs(live) == 0)
                .map(|(&base, _)| base)
                .collect();
            bases.iter().filter_map(|b| generations.live.remove(b)).collect()
        };
        drop(unused);
        if let Ok(backing_ids) = &*self.passthrough_dev.lock().unwrap_or_else(|e| e.into_inner()) {
            let mut deferred = backing_ids.deferred.lock().unwrap_or_else(|e| e.into_inner());
            let ids = std::mem::take(&mut *deferred);
            if close_deferred {
                for id in ids {
                    backing_ids.registry.close(id);
                }
            }
            backing_ids.owner.store(true, Relaxed);
        }
    }

    /// Another server may serve the same generations from now on (a
    /// restart): close no backing id until `own_backing`.
    pub fn disown_backing(&self) {
        if let Ok(backing_ids) = &*self.passthrough_dev.lock().unwrap_or_else(|e| e.into_inner()) {
            let _deferred = backing_ids.deferred.lock().unwrap_or_else(|e| e.into_inner());
            backing_ids.owner.store(false, Relaxed);
        }
    }

    /// The names below the root of every generation retired at least
    /// `RETIRED_GRACE` ago, children before their directories
    /// (FUSE_NOTIFY_DELETE refuses a directory that still has names), to
    /// delete in the kernel: deleted, an inode is evicted (and forgotten)
    /// as soon as nothing uses it, instead of staying cached until memory
    /// runs short and keeping its generation alive. Sent again and again:
    /// a name looked up in an old directory after the swap (a process
    /// whose working directory it is) is cached anew. The root's own names
    /// are the current generation's now, and are left alone.
    pub fn retired_names(&self) -> Vec<Deletion> {
        let generations = self.lock();
        let mut out = Vec::new();
        for live in generations.live.values() {
            if live.retired.is_some_and(|t| t.elapsed() >= RETIRED_GRACE) {
                live.generation.deletions_below(ROOT_INO, &mut out);
            }
        }
        out.retain(|d| d.parent != FUSE_ROOT);
        out
    }

    pub fn current(&self) -> Option<Arc<Generation>> {
        self.lock().current().map(|l| l.generation.clone())
    }

    /// Numbers of the generations held (current and retired), oldest first.
    pub fn live_generations(&self) -> Vec<u32> {
        let mut numbers: Vec<u32> = self.lock().live.values().map(|l| l.generation.number).collect();
        numbers.sort_unstable();
        numbers
    }

    pub fn pin_problem(&self) -> Option<String> {
        self.pin_problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn refuse_write(&self, op: &str) {
        self.counters.write_attempts.fetch_add(1, Relaxed);
        tracing::debug!("refused {op}: read-only file system");
    }

    pub fn status(&self) -> Status {
        let (current, generations) = {
            let g = self.lock();
            let list: Vec<(Arc<Generation>, u64)> =
                g.live.values().map(|l| (l.generation.clone(), g.refs(l))).collect();
            (g.current().map(|l| l.generation.clone()), list)
        };
        let Some(current) = current else {
            return Status::starting(self.mountpoint.clone());
        };
        let manifest = current.view.manifest();
        let c = &self.counters;
        let mut generations: Vec<GenerationStatus> = generations
            .iter()
            .map(|(g, refs)| GenerationStatus {
                number: g.number,
                driver_version: g.view.pin().version.to_string(),
                data_path: g.data_path().to_owned(),
                kernel_refs: *refs,
            })
            .collect();
        generations.sort_by_key(|g| g.number);
        Status {
            mountpoint: self.mountpoint.clone(),
            pid: std::process::id(),
            supervisor_pid: *self.supervisor_pid.lock().unwrap_or_else(|e| e.into_inner()),
            version: crate::version(),
            pid_namespace: nvlibfs::control::own_pid_namespace(),
            handovers: self.handovers.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            frozen_s: (self.frozen_since.lock().unwrap_or_else(|e| e.into_inner())).map(|t| t.elapsed().as_secs_f64()),
            driver_version: manifest.driver_version,
            version_source: manifest.version_source,
            driver_root: manifest.driver_root.clone().into(),
            data_path: current.data_path().to_owned(),
            fallback_reason: match &current.data {
                DataPath::Cached { reason } => Some(reason.clone()),
                DataPath::Passthrough { .. } => None,
            },
            files: manifest.files.len() as u64,
            bytes: manifest.files.iter().map(|f| f.size).sum(),
            symlinks: manifest.symlinks.len() as u64,
            uptime_s: self.started.elapsed().as_secs_f64(),
            rss_bytes: rss_bytes(),
            generation: current.number,
            retired_generations: generations.len() as u64 - 1,
            held_files_replaced_on_disk: replaced_on_disk(&current, &manifest.driver_root),
            pin_problem: self.pin_problem(),
            generations,
            counters: Counters {
                lookups: c.lookups.load(Relaxed),
                getattrs: c.getattrs.load(Relaxed),
                readlinks: c.readlinks.load(Relaxed),
                opens: c.opens.load(Relaxed),
                readdirs: c.readdirs.load(Relaxed),
                reads: c.reads.load(Relaxed),
                bytes_read: c.bytes_read.load(Relaxed),
                warmed_bytes: c.warmed_bytes.load(Relaxed),
                write_attempts: c.write_attempts.load(Relaxed),
            },
        }
    }
}

fn root_names(view: &View) -> BTreeSet<OsString> {
    match view.node(ROOT_INO).map(|n| &n.kind) {
        Some(NodeKind::Dir(entries)) => entries.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// Held files whose host path now names another file, or nothing: what a
/// package upgrade does while the old module stays loaded.
fn replaced_on_disk(generation: &Generation, driver_root: &str) -> u64 {
    let root = std::path::Path::new(driver_root);
    generation
        .view
        .files()
        .filter(|(_, f)| {
            if f.kind == FileKind::Generated {
                return false;
            }
            let held = f.file.metadata().map(|m| (m.dev(), m.ino())).ok();
            let on_disk = std::fs::metadata(root.join(f.source.relative()))
                .map(|m| (m.dev(), m.ino()))
                .ok();
            held != on_disk
        })
        .count() as u64
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

#[cfg(test)]
mod tests {
    use super::*;
    use nvlibfs::discover::KernelInfo;
    use nvlibfs::pin::PinRequest;

    /// Once the counter would pass 2^32, a new generation takes the first
    /// gap between live ones, and held inodes keep their generation.
    #[test]
    fn allocation_wraps_into_a_gap_below_2_pow_32() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("host");
        nvlibfs_fixture::build(&nvlibfs_fixture::FixtureSpec::new("580.159.04"), &root).unwrap();
        let view = || {
            nvlibfs::plan(&root, &PinRequest::Version("580.159.04".into()), &KernelInfo::running())
                .unwrap()
                .view
        };
        let served = Served::new("/t".into(), false).unwrap();
        served.start(view(), None);
        let held = served.lookup(FUSE_ROOT, OsStr::new("lib64")).unwrap().unwrap();
        let span = served.current().unwrap().span;
        // Generations 1 and 2 are never held: each is freed when the next
        // one is installed, and 1 leaves a gap right after generation 0.
        served.install(view(), None);
        served.install(view(), None);
        served.lock().next_base = INO_LIMIT - 5;
        served.install(view(), None);
        let newest = served.current().unwrap();
        assert_eq!(
            newest.base,
            FIRST_INO + span,
            "the first gap: generation 1's freed range"
        );
        assert!(newest.base + newest.span <= INO_LIMIT);
        assert_eq!(served.getattr(held.attr.ino).unwrap().generation, 0);
        assert_eq!(served.live_generations(), vec![0, 3]);
    }
}
