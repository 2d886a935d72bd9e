//! What a successor needs to answer for every inode the kernel may hold:
//! the checkpoint taken, and restored exactly or refused.

use super::*;

impl Served {
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
