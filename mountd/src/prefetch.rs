//! Pushes files' contents into the kernel's page cache (FUSE
//! NOTIFY_STORE) on the cached path, so that a process loading a library
//! finds its pages there instead of waiting for a READ per readahead
//! window: the `--warm` libraries before the mount is ready and after a
//! re-pin (`warm`), and with `--prefetch` every file at its first open
//! (`Prefetcher`). `Served::prefetch` decides which files are still to
//! push; this only moves the bytes.

use crate::served::Served;
use fuser::{INodeNo, Notifier};
use nvlibfs::view::NodeKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// One NOTIFY_STORE: the size of the kernel's largest READ, so a chunk
/// costs what a request would, without the round trip.
const CHUNK: u64 = 1 << 20;

struct Chunk {
    ino: u64,
    offset: u64,
    len: usize,
}

pub struct Prefetcher {
    jobs: Sender<Chunk>,
    /// Set once the session exists; chunks queued before are dropped.
    notifier: Arc<OnceLock<Notifier>>,
}

impl Prefetcher {
    /// `threads` workers, idle until a file is queued.
    pub fn start(served: Arc<Served>, threads: usize) -> std::io::Result<Prefetcher> {
        let (jobs, queue) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let notifier = Arc::new(OnceLock::new());
        for n in 0..threads {
            let (served, queue, notifier) = (served.clone(), queue.clone(), notifier.clone());
            std::thread::Builder::new()
                .name(format!("prefetch-{n}"))
                .spawn(move || work(&served, &queue, &notifier))?;
        }
        Ok(Prefetcher { jobs, notifier })
    }

    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Queues file `ino` of `size` bytes, front to back, if
    /// `Served::prefetch` says so.
    pub fn opened(&self, served: &Served, ino: u64) {
        let Some(size) = served.prefetch(ino) else { return };
        for offset in (0..size).step_by(CHUNK as usize) {
            let len = CHUNK.min(size - offset) as usize;
            if self.jobs.send(Chunk { ino, offset, len }).is_err() {
                return;
            }
        }
    }
}

fn work(served: &Served, queue: &Mutex<Receiver<Chunk>>, notifier: &OnceLock<Notifier>) {
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let chunk = match queue.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(chunk) => chunk,
            Err(_) => return,
        };
        if let Some(notifier) = notifier.get() {
            push(served, notifier, &chunk, &mut buf);
        }
    }
}

fn push(served: &Served, notifier: &Notifier, chunk: &Chunk, buf: &mut [u8]) {
    let data = &mut buf[..chunk.len];
    let n = match served.prefetch_read(chunk.ino, chunk.offset, data) {
        Ok(n) => n,
        Err(e) => return tracing::debug!(ino = chunk.ino, "prefetch read: errno {e}"),
    };
    // ENOENT: the kernel no longer has the inode (closed and evicted);
    // its later opens read through READs as ever.
    if let Err(e) = notifier.store(INodeNo(chunk.ino), chunk.offset, &data[..n]) {
        tracing::debug!(ino = chunk.ino, "prefetch store: {e}");
    }
}

/// Pushes the files of the current generation that belong to `libraries`
/// into the kernel's page cache, from `threads` threads, and returns once
/// they are there (about 50 ms for a libcuda in the host's page cache). `live` is the FUSE mount: each file is looked up
/// through it first, as the kernel keeps pages only for inodes it knows.
/// Nothing on the passthrough path, where the host's page cache serves.
pub fn warm(served: &Served, notifier: &Notifier, live: &Path, libraries: &[&str], threads: usize) {
    let start = Instant::now();
    let Some(generation) = served.current() else { return };
    let mut files = Vec::new();
    for (path, ino) in generation.view.walk() {
        let Some(NodeKind::File(file)) = generation.view.node(ino).map(|n| &n.kind) else {
            continue;
        };
        if !file.library.is_some_and(|l| libraries.contains(&l.name)) {
            continue;
        }
        match std::fs::metadata(live.join(&path)) {
            Ok(meta) => files.extend(served.prefetch(meta.ino()).map(|size| (meta.ino(), size))),
            Err(e) => tracing::warn!("not warming {}: {e}", path.display()),
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
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, chunks.len().max(1)) {
            scope.spawn(|| {
                let mut buf = vec![0u8; CHUNK as usize];
                while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    push(served, notifier, chunk, &mut buf);
                }
            });
        }
    });
    if !files.is_empty() {
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
}
