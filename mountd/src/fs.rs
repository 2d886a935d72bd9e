//! The FUSE adapter: one method per FUSE operation, each a lookup in the
//! immutable `View` plus logging, counting and errno mapping. Everything
//! that decides what exists lives in the view and is tested without FUSE.

use crate::served::{fuse_ino, DirEntries, Generation, Served, FUSE_ROOT};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use nvlibfs::view::{Attr, Ino, NodeKind, NodeType, ROOT_INO};
use std::ffi::OsStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The view never changes under a mount, so the kernel may cache names and
/// attributes for long; a new driver generation will invalidate explicitly.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// FUSE's inode generation: inode numbers are never reused (a view
/// generation's number is part of each), so it can stay 0.
const GENERATION: fuser::Generation = fuser::Generation(0);

/// Nothing is ever written, so a close needs no FLUSH round trip: one
/// request fewer per dlopen.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Longest name in the view, as statfs reports it.
const NAME_MAX: usize = 255;

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
}

/// The kernel's attributes of inode `local` of `generation`.
fn attr_of(generation: &Generation, local: Ino) -> Option<FileAttr> {
    let mut attr = to_fuse(generation.view.attr(local)?);
    attr.ino = INodeNo(fuse_ino(generation.number, local));
    Some(attr)
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

impl NvlibFs {
    /// A directory's entries as kernel inode numbers, with its generation.
    fn entries(&self, ino: INodeNo) -> Option<(Arc<Generation>, DirEntries)> {
        let (generation, local) = self.served.resolve(ino.0)?;
        let entries = generation.dir_entries(local)?;
        Some((generation, entries))
    }
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
        // The kernel lets FUSE names reach 1024 bytes; statfs says 255.
        if name.len() > NAME_MAX {
            return reply.error(Errno::ENAMETOOLONG);
        }
        let Some((generation, local)) = self.served.resolve(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        match generation
            .view
            .lookup(local, name)
            .and_then(|child| attr_of(&generation, child))
        {
            Some(attr) => {
                // The kernel now holds one more lookup of this inode.
                generation.hold(1);
                reply.entry(&TTL, &attr, GENERATION)
            }
            // The loader probes many names that do not exist (glibc-hwcaps
            // subdirectories, every LD_LIBRARY_PATH entry). Node id 0 with a
            // TTL tells the kernel to cache the miss, so each is asked once.
            None => reply.entry(&TTL, &negative_entry(), GENERATION),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Some((generation, _)) = self.served.resolve(ino.0) {
            self.served.release(&generation, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.served.counters.getattrs.fetch_add(1, Relaxed);
        match self.served.resolve(ino.0).and_then(|(g, local)| attr_of(&g, local)) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.served.counters.readlinks.fetch_add(1, Relaxed);
        let Some((generation, local)) = self.served.resolve(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match generation.view.node(local).map(|n| &n.kind) {
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
        let Some((generation, local)) = self.served.resolve(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match generation.view.node(local).map(|n| &n.kind) {
            Some(NodeKind::File(_)) => {}
            Some(NodeKind::Dir(_)) => return reply.error(Errno::EISDIR),
            Some(NodeKind::Symlink(_)) => return reply.error(Errno::ELOOP),
            None => return reply.error(Errno::ENOENT),
        }
        match generation.backing_id(local) {
            Some(Some(id)) => {
                // SAFETY: `id` came from this connection's BACKING_OPEN and
                // stays open while its generation lives, which this open
                // keeps alive; into_raw() keeps the wrapper from closing it.
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(ino.0), OPEN_FLAGS, &backing);
                backing.into_raw();
            }
            Some(None) => return reply.error(Errno::EIO),
            // A generation never changes, so its page cache stays valid across opens.
            None => reply.opened(FileHandle(ino.0), OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE),
        }
        generation.hold(1);
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
        let Some((generation, local)) = self.served.resolve(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match generation.read(local, offset, size) {
            Ok(bytes) => {
                self.served.counters.reads.fetch_add(1, Relaxed);
                self.served.counters.bytes_read.fetch_add(bytes.len() as u64, Relaxed);
                reply.data(&bytes)
            }
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
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
        if let Some((generation, _)) = self.served.resolve(ino.0) {
            self.served.release(&generation, 1);
        }
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
        match self
            .served
            .resolve(ino.0)
            .map(|(g, local)| g.view.node(local).map(|n| matches!(n.kind, NodeKind::Dir(_))))
        {
            Some(Some(true)) => reply.opened(
                FileHandle(ino.0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Some(Some(false)) => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.served.counters.readdirs.fetch_add(1, Relaxed);
        let Some((generation, entries)) = self.entries(ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (name, child)) in entries.iter().enumerate().skip(offset as usize) {
            let kind = generation
                .view
                .attr(*child & 0xffff_ffff)
                .map_or(FileType::RegularFile, |a| to_fuse(a).kind);
            if reply.add(INodeNo(*child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.served.counters.readdirs.fetch_add(1, Relaxed);
        let Some((generation, entries)) = self.entries(ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (name, child)) in entries.iter().enumerate().skip(offset as usize) {
            let local = if *child == FUSE_ROOT {
                ROOT_INO
            } else {
                *child & 0xffff_ffff
            };
            let Some(attr) = attr_of(&generation, local) else {
                continue;
            };
            if reply.add(INodeNo(*child), i as u64 + 1, name, &TTL, &attr, GENERATION) {
                break;
            }
            // Like a lookup, except for "." and "..", which the kernel does not count.
            if i >= 2 {
                generation.hold(1);
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let current = self.served.current();
        let walk = current.view.walk();
        let bytes: u64 = walk
            .iter()
            .filter_map(|(_, ino)| match &current.view.node(*ino)?.kind {
                NodeKind::File(f) => Some(f.size),
                _ => None,
            })
            .sum();
        let nodes = walk.len() as u64 + 1;
        reply.statfs(bytes.div_ceil(4096), 0, 0, nodes, 0, 4096, NAME_MAX as u32, 4096)
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
