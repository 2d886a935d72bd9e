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

/// The connection's passthrough backing ids, and who may close them. Ids
/// belong to the connection, which outlives servers: while two servers
/// hold the same generations (a restart), only one may close an id, or
/// the second close could hit an id the kernel has given to another file
/// since. A server that does not own them keeps the ids its freed
/// generations had, to close once it owns them (`Served::own_backing`).
pub struct Backing {
    registry: Arc<dyn Registry>,
    owner: AtomicBool,
    deferred: Mutex<Vec<u32>>,
}

impl Backing {
    fn new(registry: Arc<dyn Registry>, owner: bool) -> Arc<Backing> {
        Arc::new(Backing {
            registry,
            owner: AtomicBool::new(owner),
            deferred: Mutex::new(Vec::new()),
        })
    }

    fn close(&self, ids: impl IntoIterator<Item = u32>) {
        let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        if self.owner.load(Relaxed) {
            for id in ids {
                self.registry.close(id);
            }
        } else {
            deferred.extend(ids);
        }
    }
}

/// How a generation's file contents reach readers.
enum DataPath {
    /// The kernel reads the held host files directly: one backing id per
    /// file, registered with the connection, used for every open.
    Passthrough {
        ids: HashMap<Ino, u32>,
        backing: Arc<Backing>,
    },
    /// READ requests answered from the held files; opens keep the page
    /// cache, so each page is read through the daemon once.
    Cached { reason: String },
}

/// The mount's CDI spec, beside the generations rather than in them: it
/// follows the device nodes, which come and go without a driver change
/// (`nvidia-uvm` appears at the first CUDA use after boot), so a new spec
/// is no new generation: no files registered again, no cached names
/// dropped, no warmed page cache lost. Every generation's `etc/cdi` names
/// it, at `SPEC_INO`; its lookups are not counted (it belongs to no
/// generation), and a new one makes the kernel drop what it cached of
/// that inode. Always read through the daemon and the page cache, never
/// passed through: the kernel ties one backing file to an inode for as
/// long as any of its opens lasts, and a new spec is another file.
struct Spec {
    /// A sealed memfd.
    file: nvlibfs::select::Selected,
    contents: Vec<u8>,
}

/// What a checkpoint says of the spec; its memfd travels beside it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecState {
    /// Its time, as `stat` shows it (seconds, nanoseconds since the epoch).
    pub mtime: (u64, u32),
    /// How many specs have been served (see `Generation::entry`).
    pub version: u64,
}

/// A generation `Served::stage` made live but not yet current.
#[must_use = "a staged generation serves nothing until it is committed"]
pub struct Staged {
    base: u64,
    pin_problem: Option<String>,
}

/// Everything a server that takes over needs to answer exactly as this one
/// does, for every inode number the kernel may hold. Travels as JSON in a
/// sealed memfd (see protocol.rs, whose version covers this form);
/// fields a build does not know are refused, never ignored.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub generations: Vec<GenerationState>,
    pub current: u32,
    pub next_number: u32,
    pub next_base: u64,
    /// Whether the mount serves by passthrough, or why not.
    pub passthrough: Result<(), String>,
    pub pin_problem: Option<String>,
    pub init: InitRecord,
    /// Whether OPENs are answered ENOSYS (see `Opened::ByKernel`); once
    /// one is, the kernel sends none again on this connection.
    pub no_open: bool,
    /// The CDI spec, if the mount serves one.
    pub spec: Option<SpecState>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationState {
    pub number: u32,
    /// Its kernel inode numbers: `base .. base + span`.
    pub base: u64,
    pub span: u64,
    pub view: ViewSnapshot,
    pub data: DataState,
    /// Its counter among the shared ones.
    pub slot: usize,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DataState {
    /// Backing ids by view inode: registered with the connection, which
    /// keeps them across servers.
    Passthrough {
        ids: Vec<(Ino, u32)>,
    },
    Cached {
        reason: String,
    },
}

/// A checkpoint with what travels beside it.
pub struct Snapshot {
    pub state: Checkpoint,
    /// Each live generation's number and how many files it holds.
    pub generations: Vec<(u32, u32)>,
    /// The held files of the generations the caller has not sent yet.
    pub new_files: Vec<(u32, Vec<std::fs::File>)>,
    /// The shared reference counters.
    pub counts: OwnedFd,
    /// The CDI spec's memfd, with `state.spec`.
    pub spec: Option<std::fs::File>,
}

/// One immutable view as served.
pub struct Generation {
    pub number: u32,
    /// Kernel inode of the view's inode 2; the view's inode `n` is
    /// `base + n - 2`.
    base: u64,
    /// How many kernel inode numbers it owns: one per node past the root.
    span: u64,
    pub view: View,
    data: DataPath,
    stats: FsStats,
    /// Its `etc/cdi`, where the spec is named.
    spec_dir: Option<Ino>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let DataPath::Passthrough { ids, backing } = &self.data {
            backing.close(ids.values().copied());
        }
        tracing::info!(generation = self.number, version = %self.view.pin().version, "released a generation's files");
    }
}

impl Generation {
    pub fn kernel_ino(&self, local: Ino) -> u64 {
        if local == ROOT_INO {
            FUSE_ROOT
        } else {
            self.base + local - FIRST_INO
        }
    }

    /// What the kernel is told of view inode `local`. FUSE's per-inode
    /// generation is the view generation, and for `etc/cdi` also the
    /// spec's version: a new spec deletes that directory in the kernel
    /// (which is what a runtime watching it with inotify sees) and the
    /// next lookup of the same inode number, with another generation,
    /// gets a new inode rather than the deleted one.
    fn entry(&self, local: Ino, spec_version: u64) -> Option<Entry> {
        let mut attr = self.view.attr(local)?;
        attr.ino = self.kernel_ino(local);
        // The kernel keeps 32 bits of it (`i_generation`): the spec's
        // version goes into the high half of those.
        let spec = if Some(local) == self.spec_dir {
            (spec_version as u32).rotate_left(16)
        } else {
            0
        };
        Some(Entry {
            attr,
            generation: u64::from(self.number ^ spec),
        })
    }

    pub fn data_path(&self) -> &'static str {
        match self.data {
            DataPath::Passthrough { .. } => "passthrough",
            DataPath::Cached { .. } => "cached",
        }
    }

    /// `.`, `..` and the entries of directory `local`.
    fn listing(&self, local: Ino) -> Option<Vec<(OsString, Ino)>> {
        let node = self.view.node(local)?;
        let NodeKind::Dir(entries) = &node.kind else {
            return None;
        };
        let parent = if local == ROOT_INO { ROOT_INO } else { node.parent };
        let mut out = vec![(OsString::from("."), local), (OsString::from(".."), parent)];
        out.extend(entries.iter().map(|(n, &i)| (n.clone(), i)));
        Some(out)
    }

    /// Every name of this generation below `dir`, children first.
    fn deletions_below(&self, dir: Ino, out: &mut Vec<Deletion>) {
        if let Some(NodeKind::Dir(entries)) = self.view.node(dir).map(|n| &n.kind) {
            for (name, &child) in entries {
                self.deletions_below(child, out);
                out.push(Deletion {
                    parent: self.kernel_ino(dir),
                    child: self.kernel_ino(child),
                    name: name.clone(),
                });
            }
        }
    }
}

/// Counts `n` more kernel references to `live` (under the lock).
fn generations_add(cells: &[AtomicU64], live: &Live, n: u64) {
    cells[2 * live.slot + 1].fetch_add(n, Relaxed);
}

fn spec_dir(view: &View) -> Option<Ino> {
    view.lookup_path(std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR))
}

fn stats_of(view: &View) -> FsStats {
    let bytes: u64 = view.files().map(|(_, f)| f.size).sum();
    FsStats {
        blocks: bytes.div_ceil(4096),
        files: view.walk().len() as u64 + 1,
        block_size: 4096,
        name_max: NAME_MAX as u32,
    }
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
    pub warmed_bytes: AtomicU64,
    pub write_attempts: AtomicU64,
}

/// How many generations can live at once (each needs a count slot).
const COUNT_SLOTS: usize = 1024;

/// The kernel's references, one counter per live generation, in a memfd
/// that is handed to the server that takes over: it maps the same
/// counters, so counts survive a server's death exactly, or one too high
/// (a reference is counted before the answer that gives it leaves), never
/// too low. Each slot is two words: its owner (generation number + 1, 0
/// for free) and the count, so a checkpoint that names a slot a later
/// generation has taken since is seen as stale, not trusted. Sealed
/// against resizing; mapped once per process and never unmapped.
struct Counts {
    fd: OwnedFd,
    cells: &'static [AtomicU64],
}

const COUNTS_BYTES: usize = COUNT_SLOTS * 16;

impl Counts {
    fn new() -> std::io::Result<Counts> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        // Not nix's memfd_create: glibc 2.17 has none (nvlibfs::select says more).
        let fd = nvlibfs::select::memfd_create(c"nvlibfs-counts")?;
        nix::unistd::ftruncate(&fd, COUNTS_BYTES as i64)?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
        )?;
        Counts::map(fd)
    }

    /// The counters a previous server kept in `fd`: exactly the size, and
    /// sealed so that nobody can shrink them under the mapping.
    fn map(fd: OwnedFd) -> std::io::Result<Counts> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let seals = SealFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GET_SEALS)?);
        if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
            return Err(std::io::Error::other(
                "the counters' memfd is not sealed against resizing",
            ));
        }
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if size != COUNTS_BYTES as i64 {
            return Err(std::io::Error::other(format!(
                "the counters' memfd has {size} bytes, not {COUNTS_BYTES}"
            )));
        }
        let len = std::num::NonZeroUsize::new(COUNTS_BYTES).expect("non-zero");
        // SAFETY: a shared mapping of a memfd of exactly `len` bytes that
        // cannot shrink, never unmapped, so the 'static slice stays valid;
        // the counters are only ever accessed atomically.
        let cells = unsafe {
            let ptr = mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?;
            std::slice::from_raw_parts(ptr.as_ptr() as *const AtomicU64, COUNT_SLOTS * 2)
        };
        Ok(Counts { fd, cells })
    }

    fn owner(&self, slot: usize) -> &AtomicU64 {
        &self.cells[2 * slot]
    }

    fn count(&self, slot: usize) -> &AtomicU64 {
        &self.cells[2 * slot + 1]
    }
}

/// A generation with the kernel's references into it.
struct Live {
    generation: Arc<Generation>,
    /// Its counter in `Counts`.
    slot: usize,
    /// When it stopped being current.
    retired: Option<Instant>,
}

struct Generations {
    /// By base inode number.
    live: BTreeMap<u64, Live>,
    /// Base of the current generation; `None` until the first install.
    current: Option<u64>,
    next_number: u32,
    next_base: u64,
    counts: Counts,
}

impl Generations {
    fn new(counts: Counts) -> Generations {
        Generations {
            live: BTreeMap::new(),
            current: None,
            next_number: 0,
            next_base: 0,
            counts,
        }
    }

    fn refs(&self, live: &Live) -> u64 {
        self.counts.count(live.slot).load(Relaxed)
    }

    /// A counter no live generation uses, made generation `number`'s and
    /// set to zero.
    fn free_slot(&self, number: u32) -> Option<usize> {
        let used: BTreeSet<usize> = self.live.values().map(|l| l.slot).collect();
        let slot = (0..COUNT_SLOTS).find(|s| !used.contains(s))?;
        self.counts.count(slot).store(0, Relaxed);
        self.counts.owner(slot).store(u64::from(number) + 1, Relaxed);
        Some(slot)
    }

    fn current(&self) -> Option<&Live> {
        self.live.get(&self.current?)
    }

    /// The live generation owning kernel inode `ino`, and the view inode.
    fn resolve(&mut self, ino: u64) -> Option<(&mut Live, Ino)> {
        if ino == FUSE_ROOT {
            return Some((self.live.get_mut(&self.current?)?, ROOT_INO));
        }
        let (_, live) = self.live.range_mut(..=ino).next_back()?;
        let local = ino - live.generation.base + FIRST_INO;
        (ino - live.generation.base < live.generation.span).then_some((live, local))
    }

    /// A run of `span` inode numbers no live generation uses: after the
    /// last one handed out, or, once that would pass 2^32, the first gap.
    fn allocate(&self, span: u64) -> Option<u64> {
        let start = self.next_base.max(FIRST_INO);
        if start + span <= INO_LIMIT {
            return Some(start);
        }
        let mut candidate = FIRST_INO;
        for live in self.live.values() {
            if candidate + span <= live.generation.base {
                return Some(candidate);
            }
            candidate = live.generation.base + live.generation.span;
        }
        (candidate + span <= INO_LIMIT).then_some(candidate)
    }

    /// Drops `n` kernel references to the generation holding `ino`; frees a
    /// retired generation with none left.
    fn release(&mut self, ino: u64, n: u64) {
        if ino == FUSE_ROOT {
            return;
        }
        let current = self.current;
        let Some((live, _)) = self.resolve(ino) else {
            tracing::warn!("the kernel released inode {ino}, which no generation holds");
            return;
        };
        let (slot, number, base) = (live.slot, live.generation.number, live.generation.base);
        // One atomic step: during a restart another server counts in the
        // same cell.
        let refs = self
            .counts
            .count(slot)
            .fetch_update(Relaxed, Relaxed, |r| Some(r.saturating_sub(n)))
            .unwrap_or_else(|r| r);
        if refs < n {
            tracing::error!(
                generation = number,
                "the kernel released {n} references to inode {ino} but only {refs} were counted"
            );
        }
        if refs <= n && Some(base) != current {
            self.live.remove(&base);
        }
    }
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

    /// Everything a server that takes over needs to answer exactly as this
    /// one does: each live generation's nodes, inode range, data path
    /// (passthrough ids stay registered with the connection) and counter
    /// slot, with the held files of those generations `sent` says the
    /// supervisor does not have yet.
    pub fn checkpoint(&self, sent: &dyn Fn(u32) -> bool) -> std::io::Result<Snapshot> {
        let generations = self.lock();
        let current = generations
            .current()
            .map(|l| l.generation.number)
            .ok_or_else(|| std::io::Error::other("nothing is served yet"))?;
        let init = (*self.init_record.lock().unwrap_or_else(|e| e.into_inner()))
            .ok_or_else(|| std::io::Error::other("the connection's FUSE INIT was not recorded"))?;
        let mut states = Vec::new();
        let mut numbers = Vec::new();
        let mut new_files = Vec::new();
        for live in generations.live.values() {
            let g = &live.generation;
            let (view, held) = g.view.snapshot()?;
            numbers.push((g.number, held.len() as u32));
            if !sent(g.number) {
                // Copies: a generation may be freed while they travel.
                let copies = held
                    .iter()
                    .map(|f| f.try_clone())
                    .collect::<std::io::Result<Vec<_>>>()?;
                new_files.push((g.number, copies));
            }
            states.push(GenerationState {
                number: g.number,
                base: g.base,
                span: g.span,
                view,
                data: match &g.data {
                    DataPath::Passthrough { ids, .. } => DataState::Passthrough {
                        ids: ids.iter().map(|(&ino, &id)| (ino, id)).collect(),
                    },
                    DataPath::Cached { reason } => DataState::Cached { reason: reason.clone() },
                },
                slot: live.slot,
            });
        }
        let state = Checkpoint {
            generations: states,
            current,
            next_number: generations.next_number,
            next_base: generations.next_base,
            passthrough: self
                .passthrough_dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|_| ())
                .map_err(Clone::clone),
            pin_problem: self.pin_problem(),
            init,
            no_open: self.no_open.load(Relaxed),
            spec: None,
        };
        let spec = self.spec();
        let spec_file = spec.as_ref().map(|s| s.file.file.try_clone()).transpose()?;
        let state = Checkpoint {
            spec: spec.map(|s| SpecState {
                mtime: {
                    let d = s.file.mtime.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    (d.as_secs(), d.subsec_nanos())
                },
                version: self.spec_version.load(Relaxed),
            }),
            ..state
        };
        Ok(Snapshot {
            state,
            generations: numbers,
            new_files,
            counts: generations.counts.fd.try_clone()?,
            spec: spec_file,
        })
    }

    /// A server continuing exactly from `checkpoint` on the connection
    /// (`registry` registers its backing files): `files` holds each
    /// generation's files (by number, in the order its snapshot lists
    /// them) and `counts` the shared counters.
    /// Nothing is rebuilt by this build's rules; a checkpoint this build
    /// cannot honour exactly is refused with the reason.
    ///
    /// The new server does not own the connection's backing ids until it
    /// is told that it alone serves (`own_backing`); a generation whose
    /// counter slot a later generation has taken since the checkpoint was
    /// freed by the previous server and is not restored.
    pub fn restore(
        mountpoint: PathBuf,
        wants_passthrough: bool,
        checkpoint: Checkpoint,
        mut files: HashMap<u32, Vec<std::fs::File>>,
        counts: OwnedFd,
        spec: Option<std::fs::File>,
        registry: Arc<dyn Registry>,
    ) -> Result<Served, String> {
        let counts = Counts::map(counts).map_err(|e| format!("the shared reference counters: {e}"))?;
        let served = Served::with_counts(mountpoint, wants_passthrough, counts);
        match (&checkpoint.spec, spec) {
            (Some(state), Some(file)) => {
                let spec = restore_spec(state, file).map_err(|e| format!("the CDI spec: {e}"))?;
                *served.spec.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(spec));
                served.spec_version.store(state.version, Relaxed);
            }
            (None, None) => {}
            _ => return Err("the CDI spec and its memfd do not come together".into()),
        }
        let backing_ids = Backing::new(registry, false);
        *served.passthrough_dev.lock().unwrap_or_else(|e| e.into_inner()) =
            checkpoint.passthrough.clone().map(|()| backing_ids.clone());
        served.no_open.store(checkpoint.no_open, Relaxed);
        *served.pin_problem.lock().unwrap_or_else(|e| e.into_inner()) = checkpoint.pin_problem;
        *served.init_record.lock().unwrap_or_else(|e| e.into_inner()) = Some(checkpoint.init);
        let mut generations = served.lock();
        generations.next_number = checkpoint.next_number;
        generations.next_base = checkpoint.next_base;
        let mut slots = BTreeSet::new();
        for state in checkpoint.generations {
            let number = state.number;
            let held = files
                .remove(&number)
                .ok_or_else(|| format!("generation {number}'s files did not arrive"))?;
            let view = View::restore(state.view, held).map_err(|e| format!("generation {number}: {e}"))?;
            let span = view.walk().len() as u64;
            let end = state.base.saturating_add(span);
            if span != state.span || state.base < FIRST_INO || end > INO_LIMIT || end > checkpoint.next_base {
                return Err(format!(
                    "generation {number}'s {} nodes do not fit its inode range {}..{}+{}",
                    span, state.base, state.base, state.span
                ));
            }
            if number >= checkpoint.next_number {
                return Err(format!(
                    "generation {number} is not below the next number {}",
                    checkpoint.next_number
                ));
            }
            if generations
                .live
                .range(..end)
                .next_back()
                .is_some_and(|(_, l)| l.generation.base + l.generation.span > state.base)
                || generations
                    .live
                    .range(state.base..)
                    .next()
                    .is_some_and(|(&b, _)| b < end)
            {
                return Err(format!("generation {number}'s inode range overlaps another's"));
            }
            if state.slot >= COUNT_SLOTS || !slots.insert(state.slot) {
                return Err(format!("generation {number} has counter slot {}", state.slot));
            }
            if generations.counts.owner(state.slot).load(Relaxed) != u64::from(number) + 1 {
                // Freed by the previous server after this checkpoint, its
                // slot taken since: the kernel holds none of it.
                if checkpoint.current == number {
                    return Err(format!(
                        "the current generation {number}'s counter slot belongs to another"
                    ));
                }
                tracing::info!(generation = number, "freed after the checkpoint; not restored");
                continue;
            }
            let data = match state.data {
                DataState::Passthrough { ids } => {
                    let ids: HashMap<Ino, u32> = ids.into_iter().collect();
                    if let Some((ino, _)) = view.files().find(|(ino, _)| !ids.contains_key(ino)) {
                        return Err(format!("generation {number}'s inode {ino} has no backing id"));
                    }
                    DataPath::Passthrough {
                        ids,
                        backing: backing_ids.clone(),
                    }
                }
                DataState::Cached { reason } => DataPath::Cached { reason },
            };
            if checkpoint.current == number {
                generations.current = Some(state.base);
            }
            let generation = Arc::new(Generation {
                number,
                base: state.base,
                span,
                stats: stats_of(&view),
                spec_dir: spec_dir(&view),
                view,
                data,
            });
            generations.live.insert(
                state.base,
                Live {
                    generation,
                    slot: state.slot,
                    retired: (checkpoint.current != number).then(Instant::now),
                },
            );
        }
        if generations.current.is_none() {
            return Err(format!(
                "the checkpoint's current generation {} is not among its generations",
                checkpoint.current
            ));
        }
        drop(generations);
        Ok(served)
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

    fn resolve(&self, ino: u64) -> Result<(Arc<Generation>, Ino), Errno> {
        self.lock()
            .resolve(ino)
            .map(|(live, local)| (live.generation.clone(), local))
            .ok_or(libc::ENOENT)
    }

    /// Looks `name` up in directory `parent`. `Ok(None)`: no such name (the
    /// kernel may cache that). A found entry counts one kernel reference.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Option<Entry>, Errno> {
        self.counters.lookups.fetch_add(1, Relaxed);
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut generations = self.lock();
        let cells = generations.counts.cells;
        let (live, local) = generations.resolve(parent).ok_or(libc::ENOENT)?;
        let generation = &live.generation;
        if !matches!(generation.view.node(local).map(|n| &n.kind), Some(NodeKind::Dir(_))) {
            return Err(libc::ENOTDIR);
        }
        if Some(local) == generation.spec_dir && name == nvlibfs::cdi::VIEW_SPEC_NAME {
            return Ok(self.spec_entry());
        }
        let version = self.spec_version.load(Relaxed);
        let Some(entry) = generation
            .view
            .lookup(local, name)
            .and_then(|c| generation.entry(c, version))
        else {
            return Ok(None);
        };
        generations_add(cells, live, 1);
        Ok(Some(entry))
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino != SPEC_INO {
            self.lock().release(ino, n);
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Entry, Errno> {
        self.counters.getattrs.fetch_add(1, Relaxed);
        if ino == SPEC_INO {
            return self.spec_entry().ok_or(libc::ENOENT);
        }
        let (generation, local) = self.resolve(ino)?;
        generation
            .entry(local, self.spec_version.load(Relaxed))
            .ok_or(libc::ENOENT)
    }

    pub fn readlink(&self, ino: u64) -> Result<OsString, Errno> {
        self.counters.readlinks.fetch_add(1, Relaxed);
        if ino == SPEC_INO {
            return Err(libc::EINVAL);
        }
        let (generation, local) = self.resolve(ino)?;
        match generation.view.node(local).map(|n| &n.kind) {
            Some(NodeKind::Symlink(target)) => Ok(target.as_os_str().to_owned()),
            Some(_) => Err(libc::EINVAL),
            None => Err(libc::ENOENT),
        }
    }

    /// Opens a file for reading; the open counts one kernel reference until
    /// its RELEASE.
    pub fn open(&self, ino: u64, flags: i32) -> Result<Opened, Errno> {
        self.counters.opens.fetch_add(1, Relaxed);
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0 {
            self.refuse_write("open for writing");
            return Err(libc::EROFS);
        }
        if ino == SPEC_INO {
            self.spec().ok_or(libc::ENOENT)?;
            return Ok(match self.no_open() {
                true => Opened::ByKernel,
                false => Opened::Handle {
                    fh: ino,
                    backing_id: None,
                },
            });
        }
        let mut generations = self.lock();
        let cells = generations.counts.cells;
        let (live, local) = generations.resolve(ino).ok_or(libc::ENOENT)?;
        match live.generation.view.node(local).map(|n| &n.kind) {
            Some(NodeKind::File(_)) => {}
            Some(NodeKind::Dir(_)) => return Err(libc::EISDIR),
            Some(NodeKind::Symlink(_)) => return Err(libc::ELOOP),
            None => return Err(libc::ENOENT),
        }
        if self.no_open.load(Relaxed) {
            return Ok(Opened::ByKernel);
        }
        let backing_id = match &live.generation.data {
            DataPath::Passthrough { ids, .. } => Some(*ids.get(&local).ok_or(libc::EIO)?),
            DataPath::Cached { .. } => None,
        };
        generations_add(cells, live, 1);
        Ok(Opened::Handle { fh: ino, backing_id })
    }

    /// The kernel closed an open file of `ino`.
    pub fn release(&self, ino: u64) {
        if ino != SPEC_INO {
            self.lock().release(ino, 1);
        }
    }

    fn spec(&self) -> Option<Arc<Spec>> {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn spec_entry(&self) -> Option<Entry> {
        let spec = self.spec()?;
        Some(Entry {
            attr: Attr {
                ino: SPEC_INO,
                node_type: nvlibfs::view::NodeType::File,
                size: spec.file.size,
                perm: FileKind::Generated.perm(),
                nlink: 1,
                mtime: spec.file.mtime,
            },
            generation: 0,
        })
    }

    /// Every live generation's `etc/cdi` in the kernel: its name in
    /// `etc` (parent, itself, "cdi"), where the spec is named.
    pub fn spec_dirs(&self) -> Vec<Deletion> {
        let generations = self.lock();
        (generations.live.values())
            .filter_map(|l| {
                let g = &l.generation;
                let dir = g.spec_dir?;
                Some(Deletion {
                    parent: g.kernel_ino(g.view.node(dir)?.parent),
                    child: g.kernel_ino(dir),
                    name: std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR)
                        .file_name()?
                        .to_owned(),
                })
            })
            .collect()
    }

    /// The spec served now, for comparing with a new one.
    pub fn spec_contents(&self) -> Option<Vec<u8>> {
        self.spec().map(|s| s.contents.clone())
    }

    /// Serves `contents` as the CDI spec from now on. The caller then has
    /// the kernel drop what it cached of `SPEC_INO`.
    pub fn set_spec(&self, contents: &[u8]) -> std::io::Result<()> {
        let path = std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR).join(nvlibfs::cdi::VIEW_SPEC_NAME);
        let file = nvlibfs::select::Selected::generated(path, contents)?;
        let new = Arc::new(Spec {
            file,
            contents: contents.to_vec(),
        });
        *self.spec.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
        self.spec_version.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf`; the byte count.
    /// A file that shrank on disk since it was pinned is no longer the file
    /// that was checked: its reads fail rather than serve something else.
    pub fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let done = self.read_file(ino, offset, buf)?;
        self.counters.reads.fetch_add(1, Relaxed);
        self.counters.bytes_read.fetch_add(done as u64, Relaxed);
        Ok(done)
    }

    /// The size of file `ino` if the warm-up can push its contents into
    /// the kernel's page cache: a file of a generation on the cached path.
    pub fn warm_size(&self, ino: u64) -> Option<u64> {
        let (generation, local) = self.resolve(ino).ok()?;
        if !matches!(generation.data, DataPath::Cached { .. }) {
            return None;
        }
        match &generation.view.node(local)?.kind {
            NodeKind::File(file) => Some(file.size),
            _ => None,
        }
    }

    /// `read` for the warm-up: counted apart from the kernel's READs.
    pub fn warm_read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let done = self.read_file(ino, offset, buf)?;
        self.counters.warmed_bytes.fetch_add(done as u64, Relaxed);
        Ok(done)
    }

    fn read_file(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if ino == SPEC_INO {
            let spec = self.spec().ok_or(libc::ENOENT)?;
            return read_held(&spec.file, offset, buf);
        }
        let (generation, local) = self.resolve(ino)?;
        let NodeKind::File(file) = &generation.view.node(local).ok_or(libc::ENOENT)?.kind else {
            return Err(libc::EISDIR);
        };
        read_held(file, offset, buf)
    }

    pub fn opendir(&self, ino: u64) -> Result<(), Errno> {
        if ino == SPEC_INO {
            return Err(libc::ENOTDIR);
        }
        let (generation, local) = self.resolve(ino)?;
        match generation.view.node(local).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => Ok(()),
            Some(_) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    /// Lists directory `ino` from `offset`, handing each entry to `add`
    /// until it says the reply is full. With `counted` (READDIRPLUS) each
    /// entry handed over, but `.` and `..`, counts one kernel reference,
    /// like a lookup.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        counted: bool,
        mut add: impl FnMut(&DirEntry) -> bool,
    ) -> Result<(), Errno> {
        self.counters.readdirs.fetch_add(1, Relaxed);
        // Under the lock throughout: a counted entry's generation must not
        // be retired between listing it and counting it.
        let mut generations = self.lock();
        let cells = generations.counts.cells;
        let (live, local) = generations.resolve(ino).ok_or(libc::ENOENT)?;
        let listing = live.generation.listing(local).ok_or(libc::ENOTDIR)?;
        let version = self.spec_version.load(Relaxed);
        let spec = (Some(local) == live.generation.spec_dir)
            .then(|| self.spec_entry())
            .flatten()
            .map(|e| (OsString::from(nvlibfs::cdi::VIEW_SPEC_NAME), e));
        let entries = listing
            .into_iter()
            .filter_map(|(name, child)| Some((name, live.generation.entry(child, version)?)))
            .chain(spec);
        for (i, (name, entry)) in entries.enumerate().skip(offset as usize) {
            let dir_entry = DirEntry {
                name,
                next_offset: i as u64 + 1,
                entry,
            };
            if add(&dir_entry) {
                break;
            }
            if counted && i >= 2 && entry.attr.ino != SPEC_INO {
                generations_add(cells, live, 1);
            }
        }
        Ok(())
    }

    pub fn statfs(&self) -> FsStats {
        self.current().map_or(
            FsStats {
                blocks: 0,
                files: 1,
                block_size: 4096,
                name_max: NAME_MAX as u32,
            },
            |g| g.stats,
        )
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

/// The spec a checkpoint names, over the memfd that came with it: sealed,
/// so its contents are what was served.
fn restore_spec(state: &SpecState, file: std::fs::File) -> std::io::Result<Spec> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GET_SEALS)?);
    if !seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
        return Err(std::io::Error::other("its memfd is not sealed"));
    }
    let size = file.metadata()?.len();
    if size > 1 << 20 {
        return Err(std::io::Error::other(format!("a spec of {size} bytes")));
    }
    // At its start: the memfd's offset is shared with whoever wrote it.
    let mut contents = vec![0u8; size as usize];
    file.read_exact_at(&mut contents, 0)?;
    let (secs, nanos) = state.mtime;
    let mtime = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::new(secs, nanos.min(999_999_999)))
        .ok_or_else(|| std::io::Error::other("its time is out of range"))?;
    let path = std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR).join(nvlibfs::cdi::VIEW_SPEC_NAME);
    Ok(Spec {
        file: nvlibfs::select::Selected {
            view_path: path,
            source: nvlibfs::hostroot::RootPath::root(),
            file,
            size,
            mtime,
            kind: FileKind::Generated,
            library: None,
            soname: None,
        },
        contents,
    })
}

/// Reads up to `buf.len()` bytes of `file` at `offset`. A file that shrank
/// on disk since it was pinned is no longer the file that was checked:
/// its reads fail rather than serve something else.
fn read_held(file: &nvlibfs::select::Selected, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let want = (buf.len() as u64).min(file.size.saturating_sub(offset)) as usize;
    let mut done = 0;
    while done < want {
        match file.file.read_at(&mut buf[done..want], offset + done as u64) {
            Ok(0) => {
                tracing::error!(
                    "{} is shorter on disk than the {} bytes pinned; refusing its reads",
                    file.source,
                    file.size
                );
                return Err(libc::EIO);
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    Ok(done)
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
