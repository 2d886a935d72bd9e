//! The driver version a view is pinned to.
//!
//! The loaded kernel module is the one thing user space must match, so the
//! pin comes from the module itself (`/sys/module/nvidia/version`, then
//! `/proc/driver/nvidia/version`), never from whatever libraries happen to be
//! on disk: after a package upgrade the disk is ahead of the module until a
//! reboot, and that is exactly when users hit "Driver/library version
//! mismatch".

use std::fmt;
use std::path::{Path, PathBuf};

pub const SYSFS_VERSION: &str = "/sys/module/nvidia/version";
pub const PROCFS_VERSION: &str = "/proc/driver/nvidia/version";

/// A driver version as NVIDIA writes it: dot-separated decimal numbers,
/// e.g. `580.159.04`. Kept as text because components are zero-padded and
/// file names carry them verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct DriverVersion(String);

impl DriverVersion {
    /// Accepts 2 to 4 numeric components; a single number is a SONAME major
    /// (`libcuda.so.1`), not a driver version.
    ///
    /// ```
    /// use nvlibfs::pin::DriverVersion;
    ///
    /// let v = DriverVersion::parse("580.159.04").unwrap();
    /// assert_eq!(v.as_str(), "580.159.04");
    /// assert_eq!(v.components(), [580, 159, 4]);
    /// // Newer by its numbers, not its text.
    /// assert!(DriverVersion::parse("1000.1").unwrap().components() > v.components());
    /// // A SONAME's major and what is not a version at all.
    /// assert_eq!(DriverVersion::parse("1"), None);
    /// assert_eq!(DriverVersion::parse("580.x"), None);
    /// ```
    pub fn parse(text: &str) -> Option<DriverVersion> {
        let parts: Vec<&str> = text.split('.').collect();
        let numeric = |p: &&str| !p.is_empty() && p.len() <= 6 && p.bytes().all(|b| b.is_ascii_digit());
        if (2..=4).contains(&parts.len()) && parts.iter().all(numeric) {
            Some(DriverVersion(text.to_owned()))
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The numbers, for ordering (`1000.1` is newer than `999.9`).
    pub fn components(&self) -> Vec<u32> {
        self.0.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
}

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the pin came from; printed with it so a user can see why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionSource {
    /// A module version file: sysfs, procfs, or `--module-version-file`.
    ModuleFile(PathBuf),
    /// `--driver-version`.
    Override,
}

impl fmt::Display for VersionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionSource::ModuleFile(p) => write!(f, "{}", p.display()),
            VersionSource::Override => f.write_str("--driver-version"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedVersion {
    pub version: DriverVersion,
    pub source: VersionSource,
}

/// How the caller wants the version found.
#[derive(Clone, Debug, Default)]
pub enum PinRequest {
    /// The loaded module, via sysfs then procfs.
    #[default]
    LoadedModule,
    /// A file in either the sysfs or the procfs format.
    ModuleFile(PathBuf),
    /// A version given on the command line.
    Version(String),
}

#[derive(Debug)]
pub enum PinError {
    NoModule { tried: Vec<PathBuf> },
    Unreadable { path: PathBuf, error: std::io::Error },
    Malformed { path: PathBuf, content: String },
    BadOverride { given: String },
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinError::NoModule { tried } => {
                let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "no NVIDIA kernel module is loaded (neither {} exists). \
                     Load the driver (`modprobe nvidia`), or say which version to serve with \
                     --driver-version VERSION or --module-version-file FILE",
                    tried.join(" nor ")
                )
            }
            PinError::Unreadable { path, error } => {
                write!(f, "cannot read the module version file {}: {error}", path.display())
            }
            PinError::Malformed { path, content } => write!(
                f,
                "{} does not hold an NVIDIA driver version (expected e.g. `580.159.04` or an \
                 `NVRM version:` line); it says: {content:?}",
                path.display()
            ),
            PinError::BadOverride { given } => write!(
                f,
                "--driver-version {given:?} is not a driver version (expected numbers separated \
                 by dots, e.g. 580.159.04)"
            ),
        }
    }
}

impl std::error::Error for PinError {}

impl PinRequest {
    pub fn resolve(&self) -> Result<PinnedVersion, PinError> {
        match self {
            PinRequest::Version(text) => DriverVersion::parse(text.trim())
                .map(|version| PinnedVersion {
                    version,
                    source: VersionSource::Override,
                })
                .ok_or_else(|| PinError::BadOverride { given: text.clone() }),
            PinRequest::ModuleFile(path) => read_module_file(path),
            PinRequest::LoadedModule => {
                let candidates = [Path::new(SYSFS_VERSION), Path::new(PROCFS_VERSION)];
                for path in candidates {
                    match read_module_file(path) {
                        Err(PinError::Unreadable { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                            continue
                        }
                        other => return other,
                    }
                }
                Err(PinError::NoModule {
                    tried: candidates.iter().map(|p| p.to_path_buf()).collect(),
                })
            }
        }
    }
}

fn read_module_file(path: &Path) -> Result<PinnedVersion, PinError> {
    let bytes = std::fs::read(path).map_err(|error| PinError::Unreadable {
        path: path.to_owned(),
        error,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    parse_module_version(&text)
        .map(|version| PinnedVersion {
            version,
            source: VersionSource::ModuleFile(path.to_owned()),
        })
        .ok_or_else(|| PinError::Malformed {
            path: path.to_owned(),
            content: quote_start(&text),
        })
}

/// Reads either format: sysfs's single version line, or procfs's
/// `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build ...`.
pub fn parse_module_version(text: &str) -> Option<DriverVersion> {
    let first = text.lines().next()?;
    match first.strip_prefix("NVRM version:") {
        Some(rest) => rest.split_whitespace().find_map(DriverVersion::parse),
        None if text.lines().skip(1).all(|l| l.trim().is_empty()) => DriverVersion::parse(first.trim()),
        None => None,
    }
}

/// Enough of a bad file to recognise it in an error message.
fn quote_start(text: &str) -> String {
    const MAX: usize = 120;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_and_procfs() {
        let v = |s| parse_module_version(s).map(|v| v.0);
        assert_eq!(v("580.159.04\n").as_deref(), Some("580.159.04"));
        assert_eq!(
            v(
                "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  \
               (dvs-builder@U16)  Thu Jul 10 2025\nGCC version:  gcc 13\n"
            )
            .as_deref(),
            Some("580.159.04")
        );
        assert_eq!(
            v("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n").as_deref(),
            Some("535.104.05")
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "\n",
            "hello\n",
            "580\n",
            "580.159.04 extra\n",
            "580..04\n",
            "1.2\nmore\n",
            "NVRM version: none\n",
        ] {
            assert!(parse_module_version(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_file_and_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("version");
        std::fs::write(&file, "garbage in here\n").unwrap();
        let err = PinRequest::ModuleFile(file.clone()).resolve().unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("garbage in here"), "{err}");
        let err = PinRequest::Version("latest".into()).resolve().unwrap_err().to_string();
        assert!(err.contains("--driver-version") && err.contains("latest"), "{err}");
    }
}
