//! The kernel's lookup counts, shared with successors through a memfd so
//! that a server taking over knows what the kernel still holds.

use super::*;

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
pub(super) const COUNT_SLOTS: usize = 1024;

/// The kernel's references, one counter per live generation, in a memfd
/// that is handed to the server that takes over: it maps the same
/// counters, so counts survive a server's death exactly, or one too high
/// (a reference is counted before the answer that gives it leaves), never
/// too low. Each slot is two words: its owner (generation number + 1, 0
/// for free) and the count, so a checkpoint that names a slot a later
/// generation has taken since is seen as stale, not trusted. Sealed
/// against resizing; mapped once per process and never unmapped.
pub(super) struct Counts {
    pub(super) fd: OwnedFd,
    pub(super) cells: &'static [AtomicU64],
}

pub(super) const COUNTS_BYTES: usize = COUNT_SLOTS * 16;

impl Counts {
    pub(super) fn new() -> std::io::Result<Counts> {
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
    pub(super) fn map(fd: OwnedFd) -> std::io::Result<Counts> {
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

    pub(super) fn owner(&self, slot: usize) -> &AtomicU64 {
        &self.cells[2 * slot]
    }

    pub(super) fn count(&self, slot: usize) -> &AtomicU64 {
        &self.cells[2 * slot + 1]
    }
}
