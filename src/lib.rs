//! nvlibfs: a read-only, version-pinned view of the host's NVIDIA driver
//! files, for containers (Docker-in-Docker included) to bind-mount.
//!
//! The pipeline, one module a step, data flowing one way:
//! [`pin`] reads the loaded kernel module's version; [`discover`] finds the
//! host paths that may belong to the driver; [`select`] keeps the ones of the
//! pinned version that are real, loadable files inside the driver root, and
//! says why it dropped the rest; [`view`] lays them out as an immutable tree
//! that a mount serves.

#[cfg(feature = "cli")]
pub mod args;
pub mod catalog;
pub mod cdi;
pub mod control;
pub mod devices;
pub mod discover;
pub mod elf;
pub mod hostroot;
pub mod ldcache;
pub mod mountinfo;
pub mod pin;
pub mod provenance;
pub mod reason;
pub mod select;
pub mod view;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A view and how it came about.
#[derive(Debug)]
pub struct Plan {
    pub view: view::View,
    pub rejected: Vec<reason::Rejected>,
    /// What shows each served file whose name carries no version to be of
    /// the pinned version, by view path.
    pub provenance: Vec<(PathBuf, provenance::Provenance)>,
    /// Where discovery looked, as the host names it.
    pub looked_in: Vec<String>,
    /// How long pinning, discovery and selection took.
    pub elapsed: Duration,
}

#[derive(Debug)]
pub enum PlanError {
    Pin(pin::PinError),
    DriverRoot {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Holding every served file open needs a descriptor each.
    TooManyOpenFiles {
        at: String,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Pin(e) => e.fmt(f),
            PlanError::DriverRoot { path, error } => {
                write!(f, "--driver-root {}: {error}", path.display())
            }
            PlanError::TooManyOpenFiles { at } => write!(
                f,
                "ran out of file descriptors opening {at}: nvlibfs holds every served file open; raise the \
                 limit (ulimit -n, or LimitNOFILE= in the unit)"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

impl Plan {
    /// The driver versions whose libraries are on disk under the driver
    /// root, newest first: the pinned one when the view holds its libraries,
    /// and every version a library was rejected for as another version.
    pub fn versions_on_disk(&self) -> Vec<pin::DriverVersion> {
        let mut versions: Vec<pin::DriverVersion> = self
            .rejected
            .iter()
            .filter_map(|r| match &r.reason {
                reason::Reason::OtherVersion { found } if is_library(&r.source) => pin::DriverVersion::parse(found),
                _ => None,
            })
            .collect();
        if self.view.has_driver_libraries() {
            versions.push(self.view.pin().version.clone());
        }
        versions.sort_by(|a, b| b.components().cmp(&a.components()).then_with(|| a.cmp(b)));
        versions.dedup();
        versions
    }

    /// Why this plan has nothing to serve, naming where discovery looked
    /// and what it found there instead: `None` when the view holds the
    /// pinned version's libraries. `nvlibfs scan` and the daemon (so
    /// `nvlibfs mount`) both say it in these words.
    pub fn no_driver_message(&self) -> Option<String> {
        if self.view.has_driver_libraries() {
            return None;
        }
        let found: Vec<String> = self
            .versions_on_disk()
            .iter()
            .map(|v| format!("{v} in {}", self.library_dirs_of(v).join(", ")))
            .collect();
        Some(format!(
            "no driver library of version {} under {}; looked in {}; found {}",
            self.view.pin().version,
            self.view.manifest().driver_root,
            if self.looked_in.is_empty() {
                "nothing: none of the places where drivers are installed exists".to_owned()
            } else {
                self.looked_in.join(", ")
            },
            if found.is_empty() {
                "no NVIDIA driver libraries of any version".to_owned()
            } else {
                found.join("; ")
            }
        ))
    }

    /// The directories where libraries of `version` were found (as found,
    /// before links were followed).
    fn library_dirs_of(&self, version: &pin::DriverVersion) -> Vec<String> {
        let mut dirs: Vec<String> = self
            .rejected
            .iter()
            .filter(|r| {
                is_library(&r.source)
                    && matches!(&r.reason, reason::Reason::OtherVersion { found } if found == version.as_str())
            })
            .filter_map(|r| {
                r.source
                    .rsplit_once('/')
                    .map(|(dir, _)| if dir.is_empty() { "/" } else { dir }.to_owned())
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// Whether a rejected host path names a library (`.../libcuda.so.570.86.15`),
/// as opposed to firmware or a program of another version.
fn is_library(source: &str) -> bool {
    source.rsplit('/').next().is_some_and(|name| name.starts_with("lib"))
}

/// Pins the version, then finds and checks the driver's files under
/// `driver_root`.
pub fn plan(driver_root: &Path, pin: &pin::PinRequest, kernel: &discover::KernelInfo) -> Result<Plan, PlanError> {
    let start = Instant::now();
    let pinned = pin.resolve().map_err(PlanError::Pin)?;
    let root = hostroot::HostRoot::open(driver_root).map_err(|error| PlanError::DriverRoot {
        path: driver_root.to_owned(),
        error,
    })?;
    let mut scan = discover::DriverScan::run(&root, &pinned.version, kernel);
    let looked_in = std::mem::take(&mut scan.looked_in);
    let select::Selection {
        files,
        rejected,
        provenance,
    } = select::select(&root, &pinned, scan);
    if let Some(r) = rejected.iter().find(|r| r.reason == reason::Reason::TooManyOpenFiles) {
        return Err(PlanError::TooManyOpenFiles { at: r.source.clone() });
    }
    let view = view::View::build(pinned, root.path().to_owned(), files);
    Ok(Plan {
        view,
        rejected,
        provenance,
        looked_in,
        elapsed: start.elapsed(),
    })
}
