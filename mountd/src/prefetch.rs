//! Pushes a file's contents into the kernel's page cache (FUSE
//! NOTIFY_STORE) the first time it is opened on the cached path, from a
//! few threads at once, so that a process walking a library finds its
//! pages there instead of waiting for a READ per readahead window.
//! `Served::prefetch` decides which files; this only moves the bytes.

use crate::served::Served;
use fuser::{INodeNo, Notifier};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

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
        let Some(notifier) = notifier.get() else { continue };
        let data = &mut buf[..chunk.len];
        let n = match served.prefetch_read(chunk.ino, chunk.offset, data) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(ino = chunk.ino, "prefetch read: errno {e}");
                continue;
            }
        };
        // ENOENT: the kernel no longer has the inode (closed and evicted);
        // its later opens read through READs as ever.
        if let Err(e) = notifier.store(INodeNo(chunk.ino), chunk.offset, &data[..n]) {
            tracing::debug!(ino = chunk.ino, "prefetch store: {e}");
        }
    }
}
