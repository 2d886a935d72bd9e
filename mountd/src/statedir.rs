//! The state directory (`--state-dir`, `/run/nvlibfs` by default) and its
//! `locks/`: where the lock, the status and takeover sockets and the log
//! of each mount point live. What comes through them is the whole mount,
//! so both must be root's and writable by nobody else: checked when the
//! daemon starts, refused otherwise. Files in them are opened relative to
//! the directory's descriptor with O_NOFOLLOW, so a symbolic link planted
//! there (by whoever could) is never followed, and a file is removed only
//! when it is still the one this daemon created.

use crate::error::DaemonError;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
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
    token(state_dir, mountpoint, "serving", libc::LOCK_EX, wait)
}

/// The beside token: a shared flock on `locks/<mount point>.beside`, held
/// by every server serving beside another, until it is told it serves
/// alone or ends. The daemon that gave a takeover up thaws its own server
/// as soon as none holds it (no other server can read then).
pub fn beside_token(state_dir: &Path, mountpoint: &Path) -> Option<std::fs::File> {
    token(
        state_dir,
        mountpoint,
        "beside",
        libc::LOCK_SH,
        std::time::Duration::ZERO,
    )
}

/// Whether no server holds the beside token.
pub fn nobody_beside(state_dir: &Path, mountpoint: &Path) -> bool {
    token(
        state_dir,
        mountpoint,
        "beside",
        libc::LOCK_EX,
        std::time::Duration::ZERO,
    )
    .is_some()
}

fn token(
    state_dir: &Path,
    mountpoint: &Path,
    extension: &str,
    kind: libc::c_int,
    wait: std::time::Duration,
) -> Option<std::fs::File> {
    let name = nvlibfs::control::lock_path(state_dir, mountpoint).with_extension(extension);
    let name = name.file_name()?.to_str()?.to_owned();
    let file = match StateDir::open(state_dir).and_then(|d| d.locks()?.open_file(&name, OFlag::O_RDWR | OFlag::O_CREAT))
    {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            tracing::error!("the {extension} token: {e}");
            return None;
        }
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), kind | libc::LOCK_NB) } == 0 {
            return Some(file);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, DaemonError> {
    Err(DaemonError::new(msg))
}

/// Held for as long as a mount point is served: one daemon per mount
/// point, decided before anything else is looked at or created. The
/// supervisor takes it; its servers inherit the descriptor, so the lock
/// holds while any of them lives. The lock belongs to the open file, and
/// nothing here ever unlocks it: it ends when the last descriptor of that
/// file closes, in whichever process (a takeover hands the same open file
/// on, so a daemon that gives one up cannot unlock the other's).
pub struct MountLock {
    file: std::fs::File,
    locks: StateDir,
    name: String,
    identity: Identity,
    /// Handed on by a daemon that serves until the takeover is done (the
    /// lock is one open file, theirs as much as ours): its file is not
    /// ours to remove until then.
    shared: bool,
}

impl MountLock {
    pub fn take(state_dir: &Path, mountpoint: &Path) -> Result<MountLock, DaemonError> {
        let (locks, name) = lock_file(state_dir, mountpoint)?;
        // A daemon that ends removes its lock file (`remove`): one opened
        // just before that, and locked just after, is a file nobody else
        // will meet. Locked, the path must still name it; else again.
        loop {
            let file = std::fs::File::from(locks.open_file(&name, OFlag::O_RDWR | OFlag::O_CREAT)?);
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return fail(format!("locking {}: {e}", locks.path().join(&name).display()));
                }
                let mut holder = String::new();
                let _ = (&file).read_to_string(&mut holder);
                let holder = holder.trim();
                return fail(format!(
                    "{} is already served by nvlibfs{}; `nvlibfs status {0}` shows it, `nvlibfs umount {0}` stops it",
                    mountpoint.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (supervisor pid {holder})")
                    }
                ));
            }
            let identity = identity_of(&file);
            if identity.is_none() || locks.identity(&name) != identity {
                continue;
            }
            let lock = MountLock {
                file,
                locks,
                name,
                identity: identity.expect("checked"),
                shared: false,
            };
            lock.write_pid();
            return Ok(lock);
        }
    }

    /// The pid, for the message a refused daemon prints: written only by
    /// the daemon that holds the lock alone, into the file it locked
    /// (opened without following links, one name, in root's directory).
    fn write_pid(&self) {
        let _ = self.file.set_len(0);
        let _ = self.file.write_all_at(std::process::id().to_string().as_bytes(), 0);
    }

    /// Ends the lock and removes its file, so that a mount that failed or
    /// ended leaves nothing in the lock directory; where a child of this
    /// process lives (a server inherits the lock), the lock still holds
    /// through it and the file stays, and so it does while the daemon that
    /// handed it on may still serve (a takeover not done).
    pub fn remove(self) {
        if self.shared {
            return;
        }
        let alone = matches!(
            nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Err(nix::errno::Errno::ECHILD)
        );
        if alone {
            self.locks.remove_if(&self.name, self.identity);
            for extension in ["serving", "beside"] {
                let token = std::path::Path::new(&self.name).with_extension(extension);
                self.locks.remove_unheld(&token.to_string_lossy());
            }
        }
    }

    /// The lock a daemon taken over handed on: the same open file, so
    /// the lock held since that daemon took it is this one's now. It must
    /// be the file this daemon's own lock path names.
    pub fn handed_on(fd: OwnedFd, state_dir: &Path, mountpoint: &Path) -> Result<MountLock, DaemonError> {
        let (locks, name) = lock_file(state_dir, mountpoint)?;
        let file = std::fs::File::from(fd);
        let identity = identity_of(&file).ok_or_else(|| DaemonError::new("the lock handed on cannot be read"))?;
        if locks.identity(&name) != Some(identity) {
            return fail(format!(
                "the lock handed on is not {}: the daemon taken over keeps its locks elsewhere (another --state-dir?)",
                locks.path().join(&name).display()
            ));
        }
        // SAFETY: flock on a descriptor this function owns; the open file
        // is locked already, by the daemon that handed it on.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return fail(format!(
                "the mount point's lock, as handed on: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(MountLock {
            file,
            locks,
            name,
            identity,
            shared: true,
        })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    /// Handed on by a daemon that may still serve (a takeover not done).
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// The takeover that handed this lock on is done: this daemon serves,
    /// and the one taken over never will again.
    pub fn take_sole(&mut self) {
        self.shared = false;
        self.write_pid();
    }
}

/// The state directory's `locks/` (checked) and the lock file's name there.
fn lock_file(state_dir: &Path, mountpoint: &Path) -> Result<(StateDir, String), DaemonError> {
    let locks = StateDir::open(state_dir)?.locks()?;
    let path = nvlibfs::control::lock_path(state_dir, mountpoint);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| DaemonError::new(format!("a lock file name for {}", mountpoint.display())))?
        .to_owned();
    Ok((locks, name))
}
