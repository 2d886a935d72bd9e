//! Passthrough backing files: registering a held host file with the FUSE
//! connection gives an id that OPEN replies name, so the kernel reads the
//! file itself. Ids belong to the connection (the `/dev/fuse` descriptor),
//! not to this process.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// `struct fuse_backing_map` of the kernel's FUSE ABI (7.40).
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

const FUSE_DEV_IOC_MAGIC: u8 = 229;
nix::ioctl_write_ptr!(backing_open_ioctl, FUSE_DEV_IOC_MAGIC, 1, BackingMap);
nix::ioctl_write_ptr!(backing_close_ioctl, FUSE_DEV_IOC_MAGIC, 2, u32);

/// Registers `file` as a backing file of the connection `dev`; the id.
pub fn open(dev: BorrowedFd<'_>, file: &impl AsFd) -> std::io::Result<u32> {
    let map = BackingMap {
        fd: file.as_fd().as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads one fuse_backing_map from a struct we own.
    let id = unsafe { backing_open_ioctl(dev.as_raw_fd(), &map) }?;
    u32::try_from(id).map_err(|_| std::io::Error::other(format!("the kernel returned backing id {id}")))
}

/// Drops the connection's reference to backing id `id`; files already
/// open through it keep their own.
pub fn close(dev: BorrowedFd<'_>, id: u32) {
    // SAFETY: the ioctl reads one u32 from a value we own.
    if let Err(e) = unsafe { backing_close_ioctl(dev.as_raw_fd(), &id) } {
        tracing::warn!("closing backing id {id}: {e}");
    }
}

/// Where the serving core registers passthrough backing files. A trait,
/// so that the core (`served.rs`) knows nothing of the kernel's interface
/// and its tests can stand in for the connection.
pub trait Registry: Send + Sync {
    /// Registers `file`; the id OPEN replies name.
    fn open(&self, file: BorrowedFd<'_>) -> std::io::Result<u32>;
    /// Drops the registration; files already open keep their backing.
    fn close(&self, id: u32);
}

/// The FUSE connection itself, through the kernel's ioctls.
pub struct Connection(pub std::os::fd::OwnedFd);

impl Registry for Connection {
    fn open(&self, file: BorrowedFd<'_>) -> std::io::Result<u32> {
        open(self.0.as_fd(), &file)
    }

    fn close(&self, id: u32) {
        close(self.0.as_fd(), id)
    }
}
