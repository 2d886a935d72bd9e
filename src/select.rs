//! Judges each discovered candidate against the pin: the right version, a
//! real file inside the root that this host can load, not already served.
//! Whatever fails is kept with its reason, so `nvlibfs scan` can say why a
//! file a user expected is missing.

use crate::catalog::{self, LibrarySpec, Versioning};
use crate::discover::{Candidate, DriverScan, Role};
use crate::elf::{self, ElfClass, ElfProblem, ObjectType};
use crate::hostroot::{HostRoot, ResolveError, Resolved, RootPath};
use crate::pin::{DriverVersion, PinnedVersion};
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::time::SystemTime;

/// Vendor JSON configs are a few hundred bytes; refuse to parse anything huge.
const MAX_JSON: u64 = 1 << 20;

/// Why a candidate is not served. `code()` is the stable, machine-readable
/// part of `nvlibfs scan --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not in NVIDIA's table of driver files.
    UnknownName,
    /// A link with a driver file's name that leads to something else.
    TargetNotDriverFile {
        target: String,
    },
    OtherVersion {
        found: String,
    },
    /// A driver-versioned library whose file name carries no version.
    NoVersion,
    NotElf,
    Truncated(String),
    WrongMachine(String),
    BadElf(String),
    NotSharedObject,
    NotExecutable,
    NoSoname,
    SymlinkLoop,
    LeavesRoot {
        via: String,
    },
    Missing {
        at: String,
    },
    NotRegularFile {
        kind: &'static str,
    },
    Unreadable(String),
    /// The process ran out of file descriptors: says nothing about the
    /// file, and fails the whole scan.
    TooManyOpenFiles,
    Duplicate {
        of: String,
    },
    BadConfig(String),
    BadLdCache(String),
}

impl Reason {
    pub fn code(&self) -> &'static str {
        match self {
            Reason::UnknownName | Reason::TargetNotDriverFile { .. } => "unknown_name",
            Reason::OtherVersion { .. } => "other_version",
            Reason::NoVersion => "no_version",
            Reason::NotElf => "not_elf",
            Reason::Truncated(_) => "truncated",
            Reason::WrongMachine(_) => "wrong_machine",
            Reason::BadElf(_) => "bad_elf",
            Reason::NotSharedObject => "not_shared_object",
            Reason::NotExecutable => "not_executable",
            Reason::NoSoname => "no_soname",
            Reason::SymlinkLoop => "symlink_loop",
            Reason::LeavesRoot { .. } => "leaves_root",
            Reason::Missing { .. } => "missing",
            Reason::NotRegularFile { .. } => "not_regular_file",
            Reason::Unreadable(_) => "unreadable",
            Reason::TooManyOpenFiles => "too_many_open_files",
            Reason::Duplicate { .. } => "duplicate",
            Reason::BadConfig(_) => "bad_config",
            Reason::BadLdCache(_) => "bad_ld_cache",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::UnknownName => f.write_str("not a known NVIDIA driver file"),
            Reason::TargetNotDriverFile { target } => {
                write!(f, "links to {target}, which is not an NVIDIA driver file")
            }
            Reason::OtherVersion { found } => write!(f, "other version {found}"),
            Reason::NoVersion => f.write_str("file name carries no driver version"),
            Reason::NotElf => f.write_str("not an ELF file"),
            Reason::Truncated(d) | Reason::WrongMachine(d) | Reason::BadElf(d) => f.write_str(d),
            Reason::NotSharedObject => f.write_str("ELF file is not a shared object"),
            Reason::NotExecutable => f.write_str("ELF file is not an executable"),
            Reason::NoSoname => f.write_str("shared object has no DT_SONAME"),
            Reason::SymlinkLoop => f.write_str("symlink loop"),
            Reason::LeavesRoot { via } => write!(f, "leaves the driver root (through {via})"),
            Reason::Missing { at } => write!(f, "dangling: {at} does not exist inside the driver root"),
            Reason::NotRegularFile { kind } => write!(f, "not a regular file ({kind})"),
            Reason::Unreadable(e) => write!(f, "unreadable: {e}"),
            Reason::TooManyOpenFiles => f.write_str("out of file descriptors"),
            Reason::Duplicate { of } => write!(f, "duplicate of {of}"),
            Reason::BadConfig(e) => write!(f, "invalid config: {e}"),
            Reason::BadLdCache(e) => write!(f, "unusable ld.so cache: {e}"),
        }
    }
}

impl From<ResolveError> for Reason {
    fn from(e: ResolveError) -> Reason {
        match e {
            ResolveError::Loop => Reason::SymlinkLoop,
            ResolveError::LeavesRoot { via } => Reason::LeavesRoot { via: via.to_string() },
            ResolveError::Missing { at } => Reason::Missing { at: at.to_string() },
            ResolveError::Io { at, error } => Reason::Unreadable(format!("{at}: {error}")),
        }
    }
}

impl From<ElfProblem> for Reason {
    fn from(p: ElfProblem) -> Reason {
        match p {
            ElfProblem::NotElf => Reason::NotElf,
            ElfProblem::Truncated { .. } => Reason::Truncated(p.to_string()),
            ElfProblem::ForeignMachine { .. } => Reason::WrongMachine(p.to_string()),
            ElfProblem::Malformed(_) => Reason::BadElf(p.to_string()),
            ElfProblem::Io(e) => Reason::Unreadable(e.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The path as discovery found it, as the host names it.
    pub source: String,
    pub reason: Reason,
}

impl serde::Serialize for Rejected {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Rejected", 3)?;
        st.serialize_field("source", &self.source)?;
        st.serialize_field("reason", self.reason.code())?;
        st.serialize_field("detail", &self.reason.to_string())?;
        st.end()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Lib64,
    Lib32,
    Bin,
    Firmware,
    Config,
    /// Made by nvlibfs rather than found on the host: the view's own
    /// `etc/ld.so.cache`, for tools that take the view as a driver root.
    Generated,
}

impl FileKind {
    /// Permission bits in the view: read-only for everyone, executable
    /// where the host file is meant to be run.
    pub fn perm(self) -> u16 {
        match self {
            FileKind::Bin => 0o555,
            _ => 0o444,
        }
    }
}

/// A host file chosen for the view, held open from the moment it was
/// checked, so what is served is what was checked.
#[derive(Debug)]
pub struct Selected {
    /// Relative path in the view, e.g. `lib64/libcuda.so.580.159.04`.
    pub view_path: PathBuf,
    pub source: RootPath,
    pub file: File,
    pub size: u64,
    pub mtime: SystemTime,
    pub kind: FileKind,
    pub library: Option<&'static LibrarySpec>,
    pub soname: Option<String>,
}

impl Selected {
    /// A file nvlibfs makes: held in a sealed memfd, so it is served (and
    /// passed through) like any host file and can never change.
    pub fn generated(view_path: PathBuf, bytes: &[u8]) -> std::io::Result<Selected> {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; we own the result.
        let fd = unsafe {
            libc::memfd_create(
                c"nvlibfs-generated".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(bytes)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our descriptor.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Selected {
            view_path,
            source: RootPath::root(),
            file,
            size: bytes.len() as u64,
            mtime: SystemTime::now(),
            kind: FileKind::Generated,
            library: None,
            soname: None,
        })
    }
}

#[derive(Debug)]
pub struct Selection {
    pub files: Vec<Selected>,
    pub rejected: Vec<Rejected>,
}

/// What became of a resolved host file, so each alias that leads to it again
/// is reported without judging the file twice.
enum Outcome {
    Served(usize),
    Rejected(Reason),
}

struct Selector<'a> {
    root: &'a HostRoot,
    version: &'a DriverVersion,
    selection: Selection,
    by_path: HashMap<RootPath, Outcome>,
    by_inode: HashMap<(u64, u64), usize>,
    by_view_path: HashMap<PathBuf, usize>,
}

pub fn select(root: &HostRoot, pin: &PinnedVersion, scan: DriverScan) -> Selection {
    let mut selector = Selector {
        root,
        version: &pin.version,
        selection: Selection {
            files: Vec::new(),
            rejected: scan.rejected,
        },
        by_path: HashMap::new(),
        by_inode: HashMap::new(),
        by_view_path: HashMap::new(),
    };
    // Real files first, links after: a file is then reported under its own
    // name, and a link to it is only an alias.
    let (files, links): (Vec<Candidate>, Vec<Candidate>) = scan
        .candidates
        .into_iter()
        .partition(|c| !std::fs::symlink_metadata(root.path().join(&c.path)).is_ok_and(|m| m.is_symlink()));
    for candidate in files.into_iter().chain(links) {
        selector.consider(candidate);
    }
    selector.selection
}

impl Selector<'_> {
    fn consider(&mut self, candidate: Candidate) {
        let source = candidate.source();
        let resolved = match self.root.resolve(&candidate.path) {
            Ok(r) => r,
            Err(e) => return self.reject(source, e.into()),
        };
        match self.by_path.get(&resolved.path) {
            Some(Outcome::Served(i)) => {
                let of = self.selection.files[*i].source.to_string();
                return self.reject(source, Reason::Duplicate { of });
            }
            // An alias of a rejected file: a link to a stale library, say.
            Some(Outcome::Rejected(reason)) => return self.reject(source, reason.clone()),
            None => {}
        }
        let path = resolved.path.clone();
        let outcome = match self.judge(&candidate, resolved) {
            Ok(selected) => {
                let i = self.selection.files.len();
                self.by_inode.insert(inode(&selected.file), i);
                self.by_view_path.insert(selected.view_path.clone(), i);
                tracing::debug!(view = %selected.view_path.display(), %source, "selected");
                self.selection.files.push(selected);
                Outcome::Served(i)
            }
            Err(reason) => {
                self.reject(source, reason.clone());
                Outcome::Rejected(reason)
            }
        };
        self.by_path.insert(path, outcome);
    }

    fn reject(&mut self, source: String, reason: Reason) {
        tracing::debug!(%source, %reason, "rejected");
        self.selection.rejected.push(Rejected { source, reason });
    }

    fn judge(&self, candidate: &Candidate, resolved: Resolved) -> Result<Selected, Reason> {
        let meta = &resolved.metadata;
        if !meta.is_file() {
            return Err(Reason::NotRegularFile {
                kind: describe(&meta.file_type()),
            });
        }
        let name = resolved
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let mut library = None;
        let view_dir = match &candidate.role {
            Role::Library => {
                let lib = catalog::parse_library_name(&name).ok_or_else(|| Reason::TargetNotDriverFile {
                    target: resolved.path.to_string(),
                })?;
                if lib.spec.versioning == Versioning::Driver {
                    match DriverVersion::parse(lib.suffix) {
                        Some(v) if &v == self.version => {}
                        Some(v) => return Err(Reason::OtherVersion { found: v.to_string() }),
                        None => return Err(Reason::NoVersion),
                    }
                }
                library = Some(lib.spec);
                None
            }
            Role::Binary => Some(PathBuf::from("bin")),
            Role::Firmware => Some(PathBuf::from("firmware/nvidia").join(self.version.as_str())),
            Role::Config(spec) => {
                let path = PathBuf::from(spec.base.view_dir()).join(spec.path);
                Some(path.parent().map(PathBuf::from).unwrap_or_default())
            }
        };

        let file = self
            .root
            .open_file(&resolved.path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EMFILE) | Some(libc::ENFILE) => Reason::TooManyOpenFiles,
                _ => Reason::Unreadable(e.to_string()),
            })?;
        let meta = file.metadata().map_err(|e| Reason::Unreadable(e.to_string()))?;
        // The view is readable by everyone; a file the host keeps from others
        // must not become readable through it.
        if meta.mode() & 0o004 == 0 {
            return Err(Reason::Unreadable(format!(
                "mode {:04o} is not world-readable, and the view would make it so",
                meta.mode() & 0o7777
            )));
        }
        if let Some(&i) = self.by_inode.get(&(meta.dev(), meta.ino())) {
            return Err(Reason::Duplicate {
                of: self.selection.files[i].source.to_string(),
            });
        }

        let (kind, soname, view_dir) = match &candidate.role {
            Role::Library => {
                let info = elf::inspect(&file)?;
                if info.object_type != ObjectType::Dynamic {
                    return Err(Reason::NotSharedObject);
                }
                let soname = info.soname.ok_or(Reason::NoSoname)?;
                let (kind, dir) = match info.class {
                    ElfClass::Elf64 => (FileKind::Lib64, "lib64"),
                    ElfClass::Elf32 => (FileKind::Lib32, "lib"),
                };
                let subdir = library.and_then(|l| l.subdir).unwrap_or("");
                (kind, Some(soname), PathBuf::from(dir).join(subdir))
            }
            Role::Binary => {
                let info = elf::inspect(&file)?;
                if !matches!(info.object_type, ObjectType::Executable | ObjectType::Dynamic) {
                    return Err(Reason::NotExecutable);
                }
                (FileKind::Bin, None, view_dir.unwrap_or_default())
            }
            Role::Firmware => (FileKind::Firmware, None, view_dir.unwrap_or_default()),
            Role::Config(_) => {
                if name.ends_with(".json") {
                    check_json(&file, meta.len())?;
                }
                (FileKind::Config, None, view_dir.unwrap_or_default())
            }
        };
        // A binary keeps the name it is run by, whatever its file is called.
        let view_name = match candidate.role {
            Role::Binary | Role::Config(_) => candidate.path.file_name().map(PathBuf::from).unwrap_or_default(),
            _ => PathBuf::from(&name),
        };
        let view_path = view_dir.join(view_name);
        if let Some(&i) = self.by_view_path.get(&view_path) {
            return Err(Reason::Duplicate {
                of: self.selection.files[i].source.to_string(),
            });
        }
        Ok(Selected {
            view_path,
            source: resolved.path,
            size: meta.len(),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            file,
            kind,
            library,
            soname,
        })
    }
}

fn inode(file: &File) -> (u64, u64) {
    file.metadata().map(|m| (m.dev(), m.ino())).unwrap_or((0, 0))
}

fn describe(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

fn check_json(file: &File, len: u64) -> Result<(), Reason> {
    if len > MAX_JSON {
        return Err(Reason::BadConfig(format!(
            "{len} bytes is too large for a vendor config"
        )));
    }
    // Positioned, so the descriptor's offset stays where serving expects it.
    let mut text = vec![0; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut text, 0).map_err(|e| Reason::Unreadable(e.to_string()))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&text)
        .map(|_| ())
        .map_err(|e| Reason::BadConfig(e.to_string()))
}
