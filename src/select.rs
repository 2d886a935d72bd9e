//! Judges each discovered candidate against the pin: the right version, a
//! real file inside the root that this host can load, not already served.
//! Whatever fails is kept with its reason, so `nvlibfs scan` can say why a
//! file a user expected is missing.

use crate::catalog::{self, LibrarySpec, Versioning};
use crate::discover::{Candidate, DriverScan, Role};
use crate::elf::{self, ElfClass, ObjectType};
use crate::hostroot::{HostRoot, Resolved, RootPath};
use crate::pin::{DriverVersion, PinnedVersion};
use crate::provenance::{Evidence, Provenance};
use crate::reason::{Reason, Rejected};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::time::SystemTime;

/// Vendor JSON configs are a few hundred bytes; refuse to parse anything huge.
const MAX_JSON: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        let file = sealed_memfd(c"nvlibfs-generated", &[bytes])?;
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

/// A new memfd (close-on-exec, sealable), made by the system call itself,
/// not by nix's (glibc's) wrapper: glibc has `memfd_create` only from 2.27,
/// and the release binaries run on glibc 2.17 (RHEL 7, Amazon Linux 2);
/// the kernel has had the call since 3.17.
pub fn memfd_create(name: &std::ffi::CStr) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_memfd_create,
            name.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) })
}

/// A memfd holding `parts` one after another, sealed against every change:
/// whoever holds it can trust its contents and length.
pub fn sealed_memfd(name: &std::ffi::CStr, parts: &[&[u8]]) -> std::io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use std::io::Write;
    let mut file = File::from(memfd_create(name)?);
    for part in parts {
        file.write_all(part)?;
    }
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file)
}

/// Opens a path that was checked to be a regular file, and checks again
/// what was opened: between the check and the open, a FIFO, socket or
/// directory may have been renamed into its place, and serving one would
/// cost the whole mount its passthrough path (the kernel refuses it as a
/// backing file).
pub fn open_regular(root: &HostRoot, path: &RootPath) -> Result<(File, std::fs::Metadata), Reason> {
    let file = root.open_file(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => Reason::TooManyOpenFiles,
        // Opening a socket.
        Some(libc::ENXIO) => Reason::NotRegularFile { kind: "socket" },
        _ => Reason::Unreadable(e.to_string()),
    })?;
    let meta = file.metadata().map_err(|e| Reason::Unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(Reason::NotRegularFile {
            kind: describe(&meta.file_type()),
        });
    }
    Ok((file, meta))
}

#[derive(Debug)]
pub struct Selection {
    pub files: Vec<Selected>,
    pub rejected: Vec<Rejected>,
    /// For each served file whose name carries no version (by view path),
    /// what shows it is of the pinned version.
    pub provenance: Vec<(PathBuf, Provenance)>,
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
    /// Known once every library is judged; versionless files need it.
    evidence: Option<Evidence<'a>>,
    selection: Selection,
    by_path: HashMap<RootPath, Outcome>,
    by_inode: HashMap<(u64, u64), usize>,
    by_view_path: HashMap<PathBuf, usize>,
}

pub fn select(root: &HostRoot, pin: &PinnedVersion, scan: DriverScan) -> Selection {
    let mut selector = Selector {
        root,
        version: &pin.version,
        evidence: None,
        selection: Selection {
            files: Vec::new(),
            rejected: scan.rejected,
            provenance: Vec::new(),
        },
        by_path: HashMap::new(),
        by_inode: HashMap::new(),
        by_view_path: HashMap::new(),
    };
    // Files whose names carry their version first: what they show about
    // the drivers on disk is the evidence the others are judged by.
    let (versioned, versionless): (Vec<Candidate>, Vec<Candidate>) = scan
        .candidates
        .into_iter()
        .partition(|c| matches!(c.role, Role::Library | Role::Firmware));
    selector.consider_all(versioned);
    selector.evidence = Some(selector.evidence());
    selector.consider_all(versionless);
    selector.selection
}

impl<'a> Selector<'a> {
    fn consider_all(&mut self, candidates: Vec<Candidate>) {
        // Real files first, links after: a file is then reported under its
        // own name, and a link to it is only an alias.
        let (files, links): (Vec<Candidate>, Vec<Candidate>) = candidates
            .into_iter()
            .partition(|c| !std::fs::symlink_metadata(self.root.path().join(&c.path)).is_ok_and(|m| m.is_symlink()));
        for candidate in files.into_iter().chain(links) {
            self.consider(candidate);
        }
    }

    /// The driver versions on disk as the libraries and firmware show them.
    fn evidence(&self) -> Evidence<'a> {
        let libraries = self.by_path.iter().filter_map(|(path, outcome)| {
            let name = path.file_name()?.to_str()?;
            let spec = catalog::parse_library_name(name)?.spec;
            match outcome {
                Outcome::Served(_) if spec.versioning == Versioning::Driver => {
                    Some((path.clone(), self.version.clone()))
                }
                Outcome::Rejected(Reason::OtherVersion { found }) => Some((path.clone(), DriverVersion::parse(found)?)),
                _ => None,
            }
        });
        let firmware = self.selection.rejected.iter().filter_map(|r| match &r.reason {
            Reason::OtherVersion { found } if catalog::parse_library_name(r.source.rsplit('/').next()?).is_none() => {
                DriverVersion::parse(found)
            }
            _ => None,
        });
        Evidence::new(self.root, self.version, libraries, firmware)
    }

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
            Ok((selected, provenance)) => {
                if let Some(provenance) = provenance {
                    tracing::debug!(view = %selected.view_path.display(), %provenance, "version shown");
                    self.selection.provenance.push((selected.view_path.clone(), provenance));
                }
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

    /// The file to serve, and for a file whose name carries no version,
    /// what shows it is of the pinned one.
    fn judge(&self, candidate: &Candidate, resolved: Resolved) -> Result<(Selected, Option<Provenance>), Reason> {
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

        let (file, meta) = open_regular(self.root, &resolved.path)?;
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
        let provenance = match (&candidate.role, &self.evidence) {
            (Role::Config(spec), _) if spec.versioning == Versioning::Own => None,
            (Role::Binary | Role::Config(_), Some(evidence)) => {
                Some(evidence.judge(&candidate.path, &resolved.path, &file)?)
            }
            _ => None,
        };

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
        let selected = Selected {
            view_path,
            source: resolved.path,
            size: meta.len(),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            file,
            kind,
            library,
            soname,
        };
        Ok((selected, provenance))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// What a racing rename could put where a checked file was: each is
    /// refused by what the open itself finds, without hanging on a FIFO.
    #[test]
    fn open_regular_refuses_what_was_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let root_dir = dir.path();
        std::fs::write(root_dir.join("libcuda.so.1"), b"\x7fELF").unwrap();
        nix::unistd::mkfifo(&root_dir.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(root_dir.join("socket")).unwrap();
        std::fs::create_dir(root_dir.join("dir")).unwrap();
        let root = HostRoot::open(root_dir).unwrap();
        let open = |name: &str| {
            let resolved = root.resolve(Path::new(name)).unwrap();
            open_regular(&root, &resolved.path).map(|_| ())
        };
        assert_eq!(open("libcuda.so.1"), Ok(()));
        assert_eq!(open("fifo"), Err(Reason::NotRegularFile { kind: "FIFO" }));
        assert_eq!(open("socket"), Err(Reason::NotRegularFile { kind: "socket" }));
        assert_eq!(open("dir"), Err(Reason::NotRegularFile { kind: "directory" }));
    }
}
