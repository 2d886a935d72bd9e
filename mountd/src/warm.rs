//! Puts the `--warm` libraries into the kernel's page cache (FUSE
//! NOTIFY_STORE) on the cached path, before the mount is ready and after
//! each re-pin, so that the first process to load one after a mount finds
//! its pages there instead of waiting for a READ per readahead window.
//! `Served::warm_size` says which files can be warmed; this only moves
//! the bytes.

use crate::served::Served;
use fuser::{INodeNo, Notifier};
use nvlibfs::args::ServeArgs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// One NOTIFY_STORE: the size of the kernel's largest READ.
const CHUNK: u64 = 1 << 20;

struct Chunk {
    ino: u64,
    offset: u64,
    len: usize,
}

/// Pushes the files of the current generation that belong to the
/// `--warm` libraries into the kernel's page cache, from one thread per
/// server thread, and returns once they are there (about 30 ms for a
/// 92 MiB libcuda in the host's page cache). `live` is the FUSE mount: each file is looked up through it
/// first (from a child process: see `own_mount`), as the kernel keeps
/// pages only for inodes it knows. Nothing on
/// the passthrough path, where the host's page cache serves.
pub fn warm(served: &Served, notifier: &Notifier, live: &Path, serve: &ServeArgs) {
    let libraries = serve.warm_libraries();
    let start = Instant::now();
    let Some(generation) = served.current() else { return };
    let wanted: Vec<_> = (generation.view.files())
        .filter(|(_, file)| file.library.is_some_and(|l| libraries.contains(&l.name)))
        .map(|(_, file)| (live.join(&file.view_path), &file.view_path))
        .collect();
    let paths: Vec<&Path> = wanted.iter().map(|(path, _)| path.as_path()).collect();
    let mut files = Vec::new();
    for (looked, (_, view_path)) in crate::own_mount::inodes(&paths, true).into_iter().zip(&wanted) {
        match looked {
            Ok(ino) => files.extend(served.warm_size(ino).map(|size| (ino, size))),
            Err(e) => tracing::warn!("not warming {}: {e}", view_path.display()),
        }
    }
    let chunks: Vec<Chunk> = files
        .iter()
        .flat_map(|&(ino, size)| {
            (0..size).step_by(CHUNK as usize).map(move |offset| Chunk {
                ino,
                offset,
                len: CHUNK.min(size - offset) as usize,
            })
        })
        .collect();
    if chunks.is_empty() {
        return;
    }
    let threads = usize::from(serve.threads()).clamp(1, chunks.len());
    // Mapped for the warm-up alone and unmapped after it, so the daemon's
    // memory is what it was before (from the heap, 4 MiB stayed).
    let mut buffers = match memmap2::MmapMut::map_anon(threads * CHUNK as usize) {
        Ok(buffers) => buffers,
        Err(e) => return tracing::warn!("not warming {}: buffers: {e}", libraries.join(", ")),
    };
    let (next, unread) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for buf in buffers.chunks_mut(CHUNK as usize) {
            let (chunks, next, unread) = (&chunks, &next, &unread);
            scope.spawn(move || {
                while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if !push(served, notifier, chunk, buf) {
                        unread.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let unread = unread.into_inner();
    if unread > 0 {
        // A file cut short on disk, say: its READs will fail in turn.
        tracing::warn!(
            "warm-up: {unread} of {} chunks (1 MiB) could not be read from the host",
            chunks.len()
        );
    }
    let bytes: u64 = files.iter().map(|&(_, size)| size).sum();
    tracing::info!(
        generation = generation.number,
        "warmed {} files of {} ({:.1} MiB) into the kernel's page cache in {:.0} ms",
        files.len(),
        libraries.join(", "),
        bytes as f64 / (1u64 << 20) as f64,
        start.elapsed().as_secs_f64() * 1e3
    );
}

/// Pushes one chunk; false if it could not be read from the host.
fn push(served: &Served, notifier: &Notifier, chunk: &Chunk, buf: &mut [u8]) -> bool {
    let data = &mut buf[..chunk.len];
    let n = match served.warm_read(chunk.ino, chunk.offset, data) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(ino = chunk.ino, offset = chunk.offset, "warm-up read: errno {e}");
            return false;
        }
    };
    // ENOENT: the kernel let the inode go already; its loads read through
    // READs as ever.
    if let Err(e) = notifier.store(INodeNo(chunk.ino), chunk.offset, &data[..n]) {
        tracing::debug!(ino = chunk.ino, "warm-up store: {e}");
    }
    true
}
