//! The answers to the kernel's requests (fs.rs is the FUSE adapter over
//! them): lookups, attributes, links, opens, reads and directories.

use super::*;

impl Served {
    pub(super) fn resolve(&self, ino: u64) -> Result<(Arc<Generation>, Ino), Errno> {
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

    pub(super) fn read_file(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
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
}

/// Reads up to `buf.len()` bytes of `file` at `offset`. A file that shrank
/// on disk since it was pinned is no longer the file that was checked:
/// its reads fail rather than serve something else.
pub(super) fn read_held(file: &nvlibfs::select::Selected, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
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
