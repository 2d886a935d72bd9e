//! Host paths, resolved strictly inside the driver root.
//!
//! nvlibfs runs as root and hands host files to containers, so a symlink in a
//! driver directory must never lead it out of `--driver-root`: an absolute
//! target means ROOT/target, and `..` may not climb above ROOT. Resolution is
//! done here component by component, so a rejection can say which link was at
//! fault; the final open then goes through `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` so a link swapped in after resolution cannot redirect
//! it either.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Linux gives up after 40 links in one lookup; so do we.
const MAX_LINKS: usize = 40;

#[derive(Debug)]
pub struct HostRoot {
    path: PathBuf,
    dir: OwnedFd,
}

/// A path inside the root with every symlink followed: relative to the root,
/// no `.`/`..`, no link in it (at the time it was resolved).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootPath(PathBuf);

impl RootPath {
    pub fn root() -> RootPath {
        RootPath(PathBuf::new())
    }

    /// A path that was resolved inside the root before (as a view snapshot
    /// records it); nothing is resolved or opened.
    pub fn from_relative(path: &Path) -> RootPath {
        RootPath(path.to_owned())
    }

    pub fn relative(&self) -> &Path {
        &self.0
    }

    pub fn file_name(&self) -> Option<&OsStr> {
        self.0.file_name()
    }

    /// A child of this path. `name` must be a single normal component (a
    /// directory entry's name).
    pub fn child(&self, name: &OsStr) -> RootPath {
        RootPath(self.0.join(name))
    }
}

/// As the host names it: `/usr/lib/...`, whatever the root.
impl fmt::Display for RootPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0.display())
    }
}

#[derive(Debug)]
pub enum ResolveError {
    /// More than 40 links, as the kernel counts them.
    Loop,
    /// A `..` that would climb above the root; names the link that led there
    /// (or the path itself).
    LeavesRoot {
        via: RootPath,
    },
    /// A component does not exist (a dangling link, usually).
    Missing {
        at: RootPath,
    },
    Io {
        at: RootPath,
        error: io::Error,
    },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Loop => write!(f, "symlink loop (more than {MAX_LINKS} links)"),
            ResolveError::LeavesRoot { via } => write!(f, "{via} points above the driver root"),
            ResolveError::Missing { at } => write!(f, "{at} does not exist"),
            ResolveError::Io { at, error } => write!(f, "{at}: {error}"),
        }
    }
}

pub struct Resolved {
    pub path: RootPath,
    /// lstat of the final component (never a symlink).
    pub metadata: Metadata,
}

impl HostRoot {
    pub fn open(path: &Path) -> io::Result<HostRoot> {
        let path = std::fs::canonicalize(path)?;
        let dir = File::open(&path)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory"));
        }
        Ok(HostRoot { path, dir: dir.into() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the daemon itself finds a resolved path.
    pub fn real_path(&self, path: &RootPath) -> PathBuf {
        self.path.join(&path.0)
    }

    /// Follows `logical` (relative to the root, or absolute meaning the same)
    /// to the file it names.
    pub fn resolve(&self, logical: &Path) -> Result<Resolved, ResolveError> {
        let mut done: Vec<OsString> = Vec::new();
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, logical);
        let mut links = 0;
        let mut last_link: Option<RootPath> = None;
        let at = |done: &[OsString]| RootPath(done.iter().collect());

        while let Some(part) = todo.pop() {
            match part.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    if done.pop().is_none() {
                        let via = last_link.clone().unwrap_or_else(|| RootPath(logical.to_owned()));
                        return Err(ResolveError::LeavesRoot { via });
                    }
                    continue;
                }
                _ => {}
            }
            done.push(part);
            let here = at(&done);
            let metadata = match std::fs::symlink_metadata(self.real_path(&here)) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ResolveError::Missing { at: here }),
                Err(error) => return Err(ResolveError::Io { at: here, error }),
            };
            if metadata.file_type().is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Err(ResolveError::Loop);
                }
                let target = std::fs::read_link(self.real_path(&here)).map_err(|error| ResolveError::Io {
                    at: here.clone(),
                    error,
                })?;
                done.pop();
                if target.is_absolute() {
                    done.clear();
                }
                push_components(&mut todo, &target);
                last_link = Some(here);
            } else if todo.is_empty() {
                return Ok(Resolved { path: here, metadata });
            } else if !metadata.is_dir() {
                return Err(ResolveError::Io {
                    at: here,
                    error: io::Error::from_raw_os_error(libc::ENOTDIR),
                });
            }
        }
        // Only the root itself (or a path that climbs back to it) gets here.
        let metadata = std::fs::metadata(&self.path).map_err(|error| ResolveError::Io {
            at: RootPath::root(),
            error,
        })?;
        Ok(Resolved {
            path: RootPath::root(),
            metadata,
        })
    }

    /// Opens a resolved path read-only. The kernel refuses any symlink on the
    /// way and anything outside the root, so what was checked is what opens.
    pub fn open_file(&self, path: &RootPath) -> io::Result<File> {
        use nix::fcntl::{fcntl, openat2, FcntlArg, OFlag, OpenHow, ResolveFlag};
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let file = File::from(openat2(&self.dir, path.0.as_os_str(), how)?);
        // O_NONBLOCK only kept a FIFO named like a library from hanging the open.
        fcntl(&file, FcntlArg::F_SETFL(OFlag::empty()))?;
        Ok(file)
    }

    /// Reads a directory's entry names; the directory must be resolved.
    pub fn read_dir(&self, dir: &RootPath) -> io::Result<Vec<OsString>> {
        let mut names: Vec<OsString> = std::fs::read_dir(self.real_path(dir))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Pushes `path`'s components onto `todo` so that popping yields them in order.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("root");
        std::fs::create_dir_all(r.join("usr/lib/deep")).unwrap();
        std::fs::write(r.join("usr/lib/real"), b"x").unwrap();
        std::fs::write(dir.path().join("outside"), b"secret").unwrap();
        symlink("real", r.join("usr/lib/rel")).unwrap();
        symlink("/usr/lib/real", r.join("usr/lib/abs")).unwrap();
        symlink("../../../outside", r.join("usr/lib/climb")).unwrap();
        symlink(dir.path().join("outside"), r.join("usr/lib/host-abs")).unwrap();
        symlink("b", r.join("usr/lib/a")).unwrap();
        symlink("a", r.join("usr/lib/b")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        symlink("../real", r.join("usr/lib/deep/up")).unwrap();
        let root = HostRoot::open(&r).unwrap();
        (dir, root)
    }

    fn resolve(root: &HostRoot, p: &str) -> Result<String, String> {
        root.resolve(Path::new(p))
            .map(|r| r.path.to_string())
            .map_err(|e| match e {
                ResolveError::Loop => "loop".into(),
                ResolveError::LeavesRoot { via } => format!("leaves via {via}"),
                ResolveError::Missing { at } => format!("missing {at}"),
                ResolveError::Io { at, error } => format!("io {at} {error}"),
            })
    }

    #[test]
    fn stays_inside_the_root() {
        let (_d, root) = tree();
        assert_eq!(resolve(&root, "usr/lib/rel").unwrap(), "/usr/lib/real");
        assert_eq!(resolve(&root, "/usr/lib/abs").unwrap(), "/usr/lib/real");
        assert_eq!(resolve(&root, "lib/deep/up").unwrap(), "/usr/lib/real");
        assert_eq!(resolve(&root, "lib/../lib/rel").unwrap(), "/usr/lib/real");
        assert_eq!(
            resolve(&root, "usr/lib/climb").unwrap_err(),
            "leaves via /usr/lib/climb"
        );
        assert!(resolve(&root, "usr/lib/host-abs").unwrap_err().starts_with("missing /"));
        assert_eq!(resolve(&root, "usr/lib/a").unwrap_err(), "loop");
        assert_eq!(resolve(&root, "../etc").unwrap_err(), "leaves via /../etc");
        assert!(resolve(&root, "usr/lib/real/x")
            .unwrap_err()
            .starts_with("io /usr/lib/real"));
    }

    #[test]
    fn open_refuses_links_and_escapes() {
        let (_d, root) = tree();
        let real = root.resolve(Path::new("lib/rel")).unwrap().path;
        assert!(root.open_file(&real).is_ok());
        for sneaky in ["usr/lib/rel", "lib/real", "usr/lib/climb", "../outside"] {
            let p = RootPath(PathBuf::from(sneaky));
            assert!(root.open_file(&p).is_err(), "{sneaky} opened");
        }
    }
}
