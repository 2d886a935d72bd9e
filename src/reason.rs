//! Why a discovered path is not served: shared by discovery (which rejects
//! what it cannot even resolve) and selection (which judges the rest), so
//! neither has to import the other.

use crate::elf::ElfProblem;
use crate::hostroot::ResolveError;
use std::fmt;

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
    /// A file whose name carries no version, shown to be of another.
    OtherVersionShown {
        found: String,
        shown_by: String,
    },
    /// A file whose name carries no version, on a host with several
    /// drivers, and nothing shows which it belongs to.
    VersionUnproven {
        on_disk: String,
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
            Reason::OtherVersion { .. } | Reason::OtherVersionShown { .. } => "other_version",
            Reason::VersionUnproven { .. } => "version_unproven",
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
            Reason::OtherVersionShown { found, shown_by } => write!(f, "other version {found} ({shown_by})"),
            Reason::VersionUnproven { on_disk } => write!(
                f,
                "its name carries no version and nothing shows which driver it belongs to (on disk: {on_disk})"
            ),
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
