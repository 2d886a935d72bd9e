//! The FUSE adapter: one method per FUSE operation, each a lookup in the
//! immutable `View` plus logging, counting and errno mapping. Everything
//! that decides what exists lives in the view and is tested without FUSE.

use crate::served::{DataPath, Served};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use nvlibfs::view::{Attr, NodeKind, NodeType};
use std::ffi::OsStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The view never changes under a mount, so the kernel may cache names and
/// attributes for long; a new driver generation will invalidate explicitly.
const TTL: Duration = Duration::from_secs(24 * 3600);
const GENERATION: Generation = Generation(0);

/// Nothing is ever written, so a close needs no FLUSH round trip: one
/// request fewer per dlopen.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Passthrough backing files may sit on a stacked filesystem (overlayfs in
/// containers); the kernel allows at most 2.
const MAX_STACK_DEPTH: u32 = 2;

pub struct NvlibFs {
    served: Arc<Served>,
}

impl NvlibFs {
    pub fn new(served: Arc<Served>) -> NvlibFs {
        NvlibFs { served }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        self.served.view.attr(ino.0).map(to_fuse)
    }
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
        kind: match a.node_type {
            NodeType::Dir => FileType::Directory,
            NodeType::File => FileType::RegularFile,
            NodeType::Symlink => FileType::Symlink,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

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
        if self.served.wants_passthrough() {
            let offered = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(MAX_STACK_DEPTH).is_ok();
            self.served.passthrough_offered.store(offered, Relaxed);
        }
        tracing::debug!(abi = ?config.kernel_abi(), "FUSE connection initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.served.counters.lookups.fetch_add(1, Relaxed);
        match self
            .served
            .view
            .lookup(parent.0, name)
            .and_then(|ino| self.attr(INodeNo(ino)))
        {
            Some(attr) => reply.entry(&TTL, &attr, GENERATION),
            // The loader probes many names that do not exist (glibc-hwcaps
            // subdirectories, every LD_LIBRARY_PATH entry). Node id 0 with a
            // TTL tells the kernel to cache the miss, so each is asked once.
            None => reply.entry(&TTL, &negative_entry(), GENERATION),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.served.counters.getattrs.fetch_add(1, Relaxed);
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.served.counters.readlinks.fetch_add(1, Relaxed);
        match self.served.view.node(ino.0).map(|n| &n.kind) {
            Some(NodeKind::Symlink(target)) => reply.data(target.as_os_str().as_encoded_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.served.counters.opens.fetch_add(1, Relaxed);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & (libc::O_TRUNC | libc::O_CREAT) != 0 {
            self.served.counters.write_attempts.fetch_add(1, Relaxed);
            return reply.error(Errno::EROFS);
        }
        match self.served.view.node(ino.0).map(|n| &n.kind) {
            Some(NodeKind::File(_)) => {}
            Some(NodeKind::Dir(_)) => return reply.error(Errno::EISDIR),
            Some(NodeKind::Symlink(_)) => return reply.error(Errno::ELOOP),
            None => return reply.error(Errno::ENOENT),
        }
        match self.served.data_path() {
            DataPath::Passthrough(ids) => match ids.get(&ino.0) {
                Some(&id) => {
                    // SAFETY: `id` came from this session's BACKING_OPEN and
                    // stays open for the session's life; into_raw() below
                    // keeps this wrapper from closing it.
                    let backing = unsafe { reply.wrap_backing(id) };
                    reply.opened_passthrough(FileHandle(ino.0), OPEN_FLAGS, &backing);
                    backing.into_raw();
                }
                None => reply.error(Errno::EIO),
            },
            // The view never changes, so the page cache stays valid across opens.
            DataPath::Cached { .. } => reply.opened(FileHandle(ino.0), OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE),
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
        match self.served.read(ino.0, offset, size) {
            Ok(bytes) => {
                self.served.counters.reads.fetch_add(1, Relaxed);
                self.served.counters.bytes_read.fetch_add(bytes.len() as u64, Relaxed);
                reply.data(&bytes)
            }
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
    }

    /// Opens say FOPEN_NOFLUSH, so this only answers kernels that ignore it;
    /// ENOSYS makes them stop asking.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.served.counters.readdirs.fetch_add(1, Relaxed);
        let Some(entries) = self.served.dir_entries(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (name, child)) in entries.iter().enumerate().skip(offset as usize) {
            let kind = self.attr(INodeNo(*child)).map_or(FileType::RegularFile, |a| a.kind);
            if reply.add(INodeNo(*child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.served.counters.readdirs.fetch_add(1, Relaxed);
        let Some(entries) = self.served.dir_entries(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (name, child)) in entries.iter().enumerate().skip(offset as usize) {
            let Some(attr) = self.attr(INodeNo(*child)) else {
                continue;
            };
            if reply.add(INodeNo(*child), i as u64 + 1, name, &TTL, &attr, GENERATION) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (nodes, bytes) = self.served.totals();
        reply.statfs(bytes.div_ceil(4096), 0, 0, nodes, 0, 4096, 255, 4096)
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
