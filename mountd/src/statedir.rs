//! The state directory (`--state-dir`, `/run/nvlibfs` by default) and its
//! `locks/`: where the lock, the status and takeover sockets and the log
//! of each mount point live. What comes through them is the whole mount,
//! so both must be root's and writable by nobody else: checked when the
//! daemon starts, refused otherwise. Files in them are opened relative to
//! the directory's descriptor with O_NOFOLLOW, so a symbolic link planted
//! there (by whoever could) is never followed, and a file is removed only
//! when it is still the one this daemon created.

use crate::daemon::DaemonError;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub struct StateDir {
    path: PathBuf,
    dir: OwnedFd,
}

/// A file's identity, to tell later whether a path still names it.
pub type Identity = (u64, u64);

impl StateDir {
    /// Opens `path`, creating it (mode 0755) if missing, and checks that it
    /// is a directory of this daemon's user that no one else may write.
    pub fn open(path: &Path) -> Result<StateDir, DaemonError> {
        let fail = |e: &dyn std::fmt::Display| DaemonError::new(format!("state directory {}: {e}", path.display()));
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o755).create(path) {
            return Err(fail(&e));
        }
        let dir = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| fail(&e))?;
        let st = fstat(&dir).map_err(|e| fail(&e))?;
        let me = nix::unistd::geteuid().as_raw();
        if st.st_uid != me {
            return Err(fail(&format!(
                "it belongs to uid {}, not to this daemon's uid {me}; whoever owns it could replace the daemon's \
                 sockets and lock: give it to uid {me} (chown) or name another --state-dir",
                st.st_uid
            )));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(fail(&format!(
                "others may write in it (mode {:o}); whoever can could replace the daemon's sockets and lock: \
                 chmod go-w it or name another --state-dir",
                st.st_mode & 0o7777
            )));
        }
        Ok(StateDir {
            path: path.to_owned(),
            dir,
        })
    }

    /// `locks/` below it, held to the same rules.
    pub fn locks(&self) -> Result<StateDir, DaemonError> {
        StateDir::open(&self.path.join("locks"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (or creates, mode 0600) the regular file `name` in this
    /// directory without following a symbolic link, and refuses a file
    /// with other names (a hard link to a file elsewhere).
    pub fn open_file(&self, name: &str, flags: OFlag) -> Result<OwnedFd, DaemonError> {
        let fail = |e: &dyn std::fmt::Display| DaemonError::new(format!("{}: {e}", self.path.join(name).display()));
        let fd = nix::fcntl::openat(
            &self.dir,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ELOOP => fail(&"a symbolic link where the daemon's file belongs; refusing to follow it"),
            e => fail(&e),
        })?;
        let st = fstat(&fd).map_err(|e| fail(&e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 {
            return Err(fail(&"not a regular file of one name; refusing to use it"));
        }
        Ok(fd)
    }

    /// What `name` names now, if anything.
    pub fn identity(&self, name: &str) -> Option<Identity> {
        fstatat(&self.dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    }

    /// Removes `name` if it is still `ours`; anything else stays.
    pub fn remove_if(&self, name: &str, ours: Identity) {
        if self.identity(name) == Some(ours) {
            let _ = nix::unistd::unlinkat(&self.dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }

    /// Removes `name` if nobody holds an flock on it.
    pub fn remove_unheld(&self, name: &str) {
        let Ok(fd) = self.open_file(name, OFlag::O_RDWR) else {
            return;
        };
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            if let Some(ours) = identity_of(&fd) {
                self.remove_if(name, ours);
            }
        }
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// The identity of an open file.
pub fn identity_of(fd: &impl AsFd) -> Option<Identity> {
    fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

/// The serving token: an flock on `locks/<mount point>.serving`, held by
/// the one server that serves the mount on its own (the first, a crash's
/// successor, a restart's or takeover's once told it is sole), never by a
/// server serving beside another. When the supervisor dies mid-handover,
/// the servers left decide by it, with no word between them, which one
/// goes on: the holder, or, once the holder has drained and ended, the
/// one beside it. `None` if it is not free within `wait`.
pub fn serving_token(state_dir: &Path, mountpoint: &Path, wait: std::time::Duration) -> Option<std::fs::File> {
    let name = nvlibfs::control::lock_path(state_dir, mountpoint).with_extension("serving");
    let name = name.file_name()?.to_str()?.to_owned();
    let file = match StateDir::open(state_dir).and_then(|d| d.locks()?.open_file(&name, OFlag::O_RDWR | OFlag::O_CREAT))
    {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            tracing::error!("the serving token: {e}");
            return None;
        }
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(file);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
