//! What sits at the mount point, so that a daemon restart never strands
//! running containers.
//!
//! A FUSE mount whose server dies answers "Transport endpoint is not
//! connected" for good in every container that bound it. So the mount point
//! users bind (`/run/nvlibs`) is a small read-only tmpfs of our own, made a
//! shared mount, holding relative links (`lib64 -> .live/lib64`, ...) to the
//! FUSE mount one level below at `.live`. A restarted daemon detaches the
//! dead `.live` and mounts afresh there; both events propagate into every
//! container that bound the mount point with `rslave`, and the paths users
//! see (`/run/nvlibs/lib64`, `/usr/local/nvidia/lib64`) never change.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// Where the FUSE mount sits inside the mount point.
pub use nvlibfs::control::LIVE_DIR as LIVE;
/// Marks a mount point as nvlibfs's own, so a restart knows it may take over.
use nvlibfs::control::MARKER;
/// Where the kernel's fusectl filesystem lists FUSE connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";
/// The view's top-level directories, linked from the mount point. A link
/// to a directory the current view lacks (`lib` without 32-bit libraries)
/// dangles, which loaders and PATH lookups treat as absent.
const ENTRIES: &[&str] = &["bin", "etc", "firmware", "lib", "lib64", "share", "usr"];

/// `path` made absolute and, where it exists, canonical, without creating
/// anything: the name the lock and the control socket are keyed by.
pub fn absolute(path: &Path) -> Result<PathBuf, String> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(_) => std::path::absolute(path).map_err(|e| format!("mount point {}: {e}", path.display())),
    }
}

/// Creates a missing mount point (like `mount --mkdir`) and returns it,
/// canonical.
pub fn mount_point(path: &Path) -> Result<PathBuf, String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| format!("creating mount point {}: {e}", path.display()))?;
            tracing::info!("created mount point {}", path.display());
        }
        Err(e) => return Err(format!("mount point {}: {e}", path.display())),
        Ok(_) => {}
    }
    let path = std::fs::canonicalize(path).map_err(|e| format!("mount point {}: {e}", path.display()))?;
    if !path.is_dir() {
        return Err(format!("mount point {} is not a directory", path.display()));
    }
    Ok(path)
}

/// Whether the FUSE mount at `live` answers a statfs within `limit` (asked
/// from a thread of its own, left behind if the server hangs: aborting the
/// connection then ends its wait).
fn answers_within(live: &Path, limit: std::time::Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let live = live.to_owned();
    let asked = std::thread::Builder::new().name("statfs".into()).spawn(move || {
        let _ = tx.send(nix::sys::statfs::statfs(&live).is_ok());
    });
    asked.is_ok() && rx.recv_timeout(limit).unwrap_or(false)
}

/// Whether `top` is a mount point set up by nvlibfs.
pub fn is_ours(top: &Path) -> bool {
    is_mountpoint(top) && top.join(MARKER).exists()
}

/// Makes `top` ready for a FUSE mount at `top/.live`: sets up the shared
/// tmpfs with its links, or takes over one a previous daemon left. The
/// caller holds the mount point's lock, so no live daemon of its state
/// directory serves `.live`; one of another state directory (whose lock is
/// elsewhere) would answer a statfs, and is refused. A FUSE mount that
/// does not answer within a second belongs to a daemon that died or hangs:
/// its connection is aborted (requests waiting on a hung server fail
/// instead of waiting forever) and the mount detached.
pub fn prepare(top: &Path) -> Result<PathBuf, String> {
    let live = top.join(LIVE);
    if is_ours(top) {
        if let Some(old) = nvlibfs::mountinfo::at(&live).filter(|m| m.fs_type.starts_with("fuse")) {
            if answers_within(&live, std::time::Duration::from_secs(1)) {
                return Err(format!(
                    "{} is already served by nvlibfs, by a daemon of another --state-dir (`nvlibfs status \
                     --state-dir DIR {0}` with its directory shows it)",
                    top.display()
                ));
            }
            abort_connection(old.device.1);
            umount2(&live, MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old {}: {e}", live.display()))?;
            tracing::warn!("took over {} from a daemon that is gone", top.display());
        }
        return Ok(live);
    }
    // An empty mount point may be a mount itself: a container's volume
    // (a DaemonSet's hostPath, bound Bidirectional) is; the tmpfs goes on
    // top of it, and reaches the host through it. Anything with contents
    // is someone else's.
    if std::fs::read_dir(top)
        .map_err(|e| format!("mount point {}: {e}", top.display()))?
        .next()
        .is_some()
    {
        return Err(format!(
            "mount point {} is not empty{}; nvlibfs would hide its contents",
            top.display(),
            if is_mountpoint(top) {
                format!(" (it is a mount: `umount {}` first if it is not needed)", top.display())
            } else {
                String::new()
            }
        ));
    }
    let step = |what: &str, r: nix::Result<()>| r.map_err(|e| format!("{what} at {}: {e}", top.display()));
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    step(
        "mounting a tmpfs",
        mount(Some("nvlibfs"), top, Some("tmpfs"), flags, Some("mode=0755,size=64k")),
    )?;
    let populate = || -> std::io::Result<()> {
        std::fs::write(
            top.join(MARKER),
            "nvlibfs: the view is below .live; see `nvlibfs status`\n",
        )?;
        std::fs::create_dir(&live)?;
        for name in ENTRIES {
            std::os::unix::fs::symlink(Path::new(LIVE).join(name), top.join(name))?;
        }
        Ok(())
    };
    if let Err(e) = populate() {
        let _ = umount2(top, MntFlags::MNT_DETACH);
        return Err(format!("setting up {}: {e}", top.display()));
    }
    step(
        "making the mount read-only",
        mount(
            None::<&str>,
            top,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
            None::<&str>,
        ),
    )?;
    step(
        "making the mount shared",
        mount(None::<&str>, top, None::<&str>, MsFlags::MS_SHARED, None::<&str>),
    )?;
    Ok(live)
}

/// Aborts FUSE connection `number` (the minor device number of its mount)
/// through the fusectl filesystem, mounting it where systemd has not.
fn abort_connection(number: u32) {
    let connections = Path::new(FUSECTL);
    if !connections.join(number.to_string()).exists() && nvlibfs::mountinfo::at(connections).is_none() {
        if let Err(e) = mount(
            Some("fusectl"),
            connections,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            tracing::debug!("mounting fusectl at {FUSECTL}: {e}; detaching without aborting");
        }
    }
    let abort = connections.join(number.to_string()).join("abort");
    match std::fs::write(&abort, "1") {
        Ok(()) => tracing::info!("aborted the previous daemon's FUSE connection {number}"),
        Err(e) => tracing::debug!("{}: {e}; detaching without aborting", abort.display()),
    }
}

/// Removes the mount point's own tmpfs after the FUSE mount below it is gone.
pub fn remove(top: &Path) -> Result<(), String> {
    umount2(top, MntFlags::empty()).map_err(|e| format!("unmounting {}: {e}", top.display()))
}

/// Whether something is mounted exactly at `path`, in this mount namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    nvlibfs::mountinfo::at(path).is_some()
}
