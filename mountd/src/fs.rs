//! The FUSE adapter: one method per FUSE operation, each a call into the
//! serving core (`served.rs`) plus translation to and from fuser's types.
//! Everything that decides what exists, and every reference count, lives
//! in the core and is tested without FUSE.

use crate::protocol::InitRecord;
use crate::served::{DirEntry, Entry, Errno as CoreErrno, Opened, Served};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use nvlibfs::view::{Attr, NodeType};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The view never changes under a mount, so the kernel may cache names and
/// attributes for long; a new driver generation will invalidate explicitly.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Nothing is ever written, so a close needs no FLUSH round trip: one
/// request fewer per dlopen.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Passthrough backing files may sit on a stacked filesystem (overlayfs in
/// containers); the kernel allows at most 2.
const MAX_STACK_DEPTH: u32 = 2;

/// The largest READ the kernel sends with fuser's defaults.
const MAX_READ: usize = 128 * 1024;

thread_local! {
    /// Each serving thread's read buffer, allocated once: the only copy of
    /// file data in the daemon is the one into this buffer.
    static READ_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_READ]);
}

pub struct NvlibFs {
    served: Arc<Served>,
}

impl NvlibFs {
    pub fn new(served: Arc<Served>) -> NvlibFs {
        NvlibFs { served }
    }
}

fn errno(e: CoreErrno) -> Errno {
    Errno::from_i32(e)
}

fn to_fuse(a: Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.node_type),
        perm: a.perm,
        nlink: a.nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(t: NodeType) -> FileType {
    match t {
        NodeType::Dir => FileType::Directory,
        NodeType::File => FileType::RegularFile,
        NodeType::Symlink => FileType::Symlink,
    }
}

fn reply_entry(reply: ReplyEntry, entry: &Entry) {
    reply.entry(&TTL, &to_fuse(entry.attr), fuser::Generation(entry.generation))
}

/// Node id 0 with a TTL: the kernel caches the miss, so each of the many
/// names the loader probes (glibc-hwcaps, every LD_LIBRARY_PATH entry) is
/// asked once.
fn negative_entry() -> FileAttr {
    to_fuse(Attr {
        ino: 0,
        node_type: NodeType::File,
        size: 0,
        perm: 0,
        nlink: 0,
        mtime: SystemTime::UNIX_EPOCH,
    })
}

impl fuser::Filesystem for NvlibFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for (flag, why) in [
            (InitFlags::FUSE_CACHE_SYMLINKS, "symlink caching"),
            (InitFlags::FUSE_PARALLEL_DIROPS, "parallel lookups"),
            (InitFlags::FUSE_DO_READDIRPLUS, "readdirplus"),
            (InitFlags::FUSE_READDIRPLUS_AUTO, "adaptive readdirplus"),
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::info!("kernel does not offer {why}");
            }
        }
        // Only asked, not requested: before Linux 4.19 an OPEN answered
        // ENOSYS fails the open, so `Opened::ByKernel` needs the kernel to
        // say it knows zero-message opens.
        let no_open = config.capabilities().contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.served.no_open_offered.store(no_open, Relaxed);
        if self.served.wants_passthrough() {
            let offered = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(MAX_STACK_DEPTH).is_ok();
            self.served.passthrough_offered.store(offered, Relaxed);
        }
        // Recorded for a server that takes this connection over: it must
        // see the INIT the kernel sent, once, to this one.
        let abi = config.kernel_abi();
        let record = InitRecord {
            major: abi.0,
            minor: abi.1,
            max_readahead: config.set_max_readahead(u32::MAX).unwrap_or_else(|max| max),
            flags: config.capabilities().bits(),
        };
        self.served
            .init_record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(record);
        tracing::debug!(?abi, "FUSE connection initialised");
        Ok(())
    }

    /// fuser calls this once its threads have ended, then unmounts. When
    /// they ended because this server drains for a restart (drain.rs),
    /// the mount is the new server's: say so and never return. Otherwise a
    /// mount still there means the kernel aborted the connection under it.
    fn destroy(&mut self) {
        let drained = self.served.drained.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(done) = drained {
            let _ = done.send(());
            loop {
                std::thread::park();
            }
        }
        let live = self.served.mountpoint.join(nvlibfs::control::LIVE_DIR);
        let mounted = nvlibfs::mountinfo::at(&live).is_some_and(|m| nvlibfs::mountinfo::is_nvlibfs_fuse(&m));
        self.served.aborted.store(mounted, std::sync::atomic::Ordering::SeqCst);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.served.lookup(parent.0, name) {
            Ok(Some(entry)) => reply_entry(reply, &entry),
            Ok(None) => reply.entry(&TTL, &negative_entry(), fuser::Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    // BATCH_FORGET arrives here too, a node at a time: fuser 0.18 keeps the
    // type of its batch private, so its default method is what runs.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.served.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.served.getattr(ino.0) {
            Ok(entry) => reply.attr(&TTL, &to_fuse(entry.attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.served.readlink(ino.0) {
            Ok(target) => reply.data(target.as_encoded_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.served.open(ino.0, flags.0) {
            Ok(Opened::ByKernel) => reply.error(Errno::ENOSYS),
            Ok(Opened::Handle {
                fh,
                backing_id: Some(id),
            }) => {
                // SAFETY: `id` came from this connection's BACKING_OPEN and
                // stays registered while its generation lives, which this
                // open (counted by the core) keeps alive; into_raw() keeps
                // the wrapper from closing it.
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(fh), OPEN_FLAGS, &backing);
                backing.into_raw();
            }
            // A generation never changes, so its page cache stays valid
            // across opens; a new CDI spec makes the kernel drop its own.
            Ok(Opened::Handle { fh, backing_id: None }) => {
                reply.opened(FileHandle(fh), OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUFFER.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            match self.served.read(ino.0, offset, &mut buf[..size as usize]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    /// Files here are always ready to read, as on a disk file system. Go
    /// programs register every file they open with epoll (dockerd reading
    /// the view's CDI spec): unanswered, each logs a warning.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.poll(events & (PollEvents::POLLIN | PollEvents::POLLRDNORM));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.served.release(ino.0);
        reply.ok()
    }

    /// Opens say FOPEN_NOFLUSH, so this only answers kernels that ignore it;
    /// ENOSYS makes them stop asking.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    /// A generation's directories never change (a new generation has new
    /// inode numbers, and the root is invalidated on a swap), so the kernel
    /// may keep their listings.
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.served.opendir(ino.0) {
            Ok(()) => reply.opened(
                FileHandle(ino.0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let listed = self.served.readdir(ino.0, offset, false, |e: &DirEntry| {
            reply.add(
                INodeNo(e.entry.attr.ino),
                e.next_offset,
                file_type(e.entry.attr.node_type),
                &e.name,
            )
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let listed = self.served.readdir(ino.0, offset, true, |e: &DirEntry| {
            reply.add(
                INodeNo(e.entry.attr.ino),
                e.next_offset,
                &e.name,
                &TTL,
                &to_fuse(e.entry.attr),
                fuser::Generation(e.entry.generation),
            )
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.served.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.block_size, s.name_max, s.block_size)
    }

    // Extended attributes: none. ENOSYS makes the kernel stop asking.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    // Everything that would change the view: read-only file system.
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.served.refuse_write("setattr");
        reply.error(Errno::EROFS)
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.served.refuse_write("mknod");
        reply.error(Errno::EROFS)
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        self.served.refuse_write("mkdir");
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.served.refuse_write("unlink");
        reply.error(Errno::EROFS)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.served.refuse_write("rmdir");
        reply.error(Errno::EROFS)
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _link: &OsStr, _target: &std::path::Path, reply: ReplyEntry) {
        self.served.refuse_write("symlink");
        reply.error(Errno::EROFS)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.served.refuse_write("rename");
        reply.error(Errno::EROFS)
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        self.served.refuse_write("link");
        reply.error(Errno::EROFS)
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.served.refuse_write("write");
        reply.error(Errno::EROFS)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.served.refuse_write("create");
        reply.error(Errno::EROFS)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.served.refuse_write("setxattr");
        reply.error(Errno::EROFS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.served.refuse_write("removexattr");
        reply.error(Errno::EROFS)
    }
}
