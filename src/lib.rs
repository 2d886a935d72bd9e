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

/// Pins the version, then finds and checks the driver's files under
/// `driver_root`.
pub fn plan(driver_root: &Path, pin: &pin::PinRequest, kernel: &discover::KernelInfo) -> Result<Plan, PlanError> {
    let start = Instant::now();
    let pinned = pin.resolve().map_err(PlanError::Pin)?;
    let root = hostroot::HostRoot::open(driver_root).map_err(|error| PlanError::DriverRoot {
        path: driver_root.to_owned(),
        error,
    })?;
    let scan = discover::DriverScan::run(&root, &pinned.version, kernel);
    let select::Selection { files, rejected } = select::select(&root, &pinned, scan);
    if let Some(r) = rejected.iter().find(|r| r.reason == reason::Reason::TooManyOpenFiles) {
        return Err(PlanError::TooManyOpenFiles { at: r.source.clone() });
    }
    let view = view::View::build(pinned, root.path().to_owned(), files);
    Ok(Plan {
        view,
        rejected,
        elapsed: start.elapsed(),
    })
}
