//! One generation: an immutable view, its held files and data path
//! (passthrough backing ids or the cached path), and the set of live
//! generations with the kernel's references to each.

use super::*;

/// The connection's passthrough backing ids, and who may close them. Ids
/// belong to the connection, which outlives servers: while two servers
/// hold the same generations (a restart), only one may close an id, or
/// the second close could hit an id the kernel has given to another file
/// since. A server that does not own them keeps the ids its freed
/// generations had, to close once it owns them (`Served::own_backing`).
pub struct Backing {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) owner: AtomicBool,
    pub(super) deferred: Mutex<Vec<u32>>,
}

impl Backing {
    pub(super) fn new(registry: Arc<dyn Registry>, owner: bool) -> Arc<Backing> {
        Arc::new(Backing {
            registry,
            owner: AtomicBool::new(owner),
            deferred: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn close(&self, ids: impl IntoIterator<Item = u32>) {
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
pub(super) enum DataPath {
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

/// One immutable view as served.
pub struct Generation {
    pub number: u32,
    /// Kernel inode of the view's inode 2; the view's inode `n` is
    /// `base + n - 2`.
    pub(super) base: u64,
    /// How many kernel inode numbers it owns: one per node past the root.
    pub(super) span: u64,
    pub view: View,
    pub(super) data: DataPath,
    pub(super) stats: FsStats,
    /// Its `etc/cdi`, where the spec is named.
    pub(super) spec_dir: Option<Ino>,
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
    pub(super) fn entry(&self, local: Ino, spec_version: u64) -> Option<Entry> {
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
    pub(super) fn listing(&self, local: Ino) -> Option<Vec<(OsString, Ino)>> {
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
    pub(super) fn deletions_below(&self, dir: Ino, out: &mut Vec<Deletion>) {
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
pub(super) fn generations_add(cells: &[AtomicU64], live: &Live, n: u64) {
    cells[2 * live.slot + 1].fetch_add(n, Relaxed);
}

pub(super) fn spec_dir(view: &View) -> Option<Ino> {
    view.lookup_path(std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR))
}

pub(super) fn stats_of(view: &View) -> FsStats {
    let bytes: u64 = view.files().map(|(_, f)| f.size).sum();
    FsStats {
        blocks: bytes.div_ceil(4096),
        files: view.walk().len() as u64 + 1,
        block_size: 4096,
        name_max: NAME_MAX as u32,
    }
}

/// A generation with the kernel's references into it.
pub(super) struct Live {
    pub(super) generation: Arc<Generation>,
    /// Its counter in `Counts`.
    pub(super) slot: usize,
    /// When it stopped being current.
    pub(super) retired: Option<Instant>,
}

pub(super) struct Generations {
    /// By base inode number.
    pub(super) live: BTreeMap<u64, Live>,
    /// Base of the current generation; `None` until the first install.
    pub(super) current: Option<u64>,
    pub(super) next_number: u32,
    pub(super) next_base: u64,
    pub(super) counts: Counts,
}

impl Generations {
    pub(super) fn new(counts: Counts) -> Generations {
        Generations {
            live: BTreeMap::new(),
            current: None,
            next_number: 0,
            next_base: 0,
            counts,
        }
    }

    pub(super) fn refs(&self, live: &Live) -> u64 {
        self.counts.count(live.slot).load(Relaxed)
    }

    /// A counter no live generation uses, made generation `number`'s and
    /// set to zero.
    pub(super) fn free_slot(&self, number: u32) -> Option<usize> {
        let used: BTreeSet<usize> = self.live.values().map(|l| l.slot).collect();
        let slot = (0..COUNT_SLOTS).find(|s| !used.contains(s))?;
        self.counts.count(slot).store(0, Relaxed);
        self.counts.owner(slot).store(u64::from(number) + 1, Relaxed);
        Some(slot)
    }

    pub(super) fn current(&self) -> Option<&Live> {
        self.live.get(&self.current?)
    }

    /// The live generation owning kernel inode `ino`, and the view inode.
    pub(super) fn resolve(&mut self, ino: u64) -> Option<(&mut Live, Ino)> {
        if ino == FUSE_ROOT {
            return Some((self.live.get_mut(&self.current?)?, ROOT_INO));
        }
        let (_, live) = self.live.range_mut(..=ino).next_back()?;
        let local = ino - live.generation.base + FIRST_INO;
        (ino - live.generation.base < live.generation.span).then_some((live, local))
    }

    /// A run of `span` inode numbers no live generation uses: after the
    /// last one handed out, or, once that would pass 2^32, the first gap.
    pub(super) fn allocate(&self, span: u64) -> Option<u64> {
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
    pub(super) fn release(&mut self, ino: u64, n: u64) {
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
