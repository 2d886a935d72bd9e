//! Finds every host path that might be part of the driver.
//!
//! Discovery only looks: it lists names where NVIDIA's files live (the ld.so
//! cache, library directories, flat driver trees, bin directories, firmware
//! search paths, vendor config paths) and keeps the ones the catalog knows.
//! Whether a candidate is the right version, a real ELF file, or a duplicate
//! is for `select` to judge. Candidates come out in priority order: when two
//! different files claim the same place in the view, the earlier one wins.

use crate::catalog::{self, ConfigSpec, TRIPLETS};
use crate::hostroot::{HostRoot, ResolveError, RootPath};
use crate::ldcache;
use crate::pin::DriverVersion;
use crate::reason::{Reason, Rejected};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Directories that hold nothing but the driver: every entry in them is
/// reported, so a stray file there does not go unnoticed.
fn driver_tree_lib_dirs() -> Vec<String> {
    vec![
        "usr/local/nvidia/lib64".into(),
        "usr/local/nvidia/lib".into(),
        format!("usr/lib/{}/nvidia/current", TRIPLETS[0]),
        "usr/lib64/nvidia".into(),
    ]
}

/// The distribution's library directories: only NVIDIA-looking names in them
/// are considered.
fn shared_lib_dirs() -> Vec<String> {
    vec![
        format!("usr/lib/{}", TRIPLETS[0]),
        format!("lib/{}", TRIPLETS[0]),
        "usr/lib64".into(),
        "lib64".into(),
        "usr/lib".into(),
        format!("usr/lib/{}", TRIPLETS[1]),
        "usr/lib32".into(),
    ]
}

const DRIVER_TREE: &str = "usr/local/nvidia";
const BIN_DIRS: &[&str] = &[
    "usr/local/nvidia/bin",
    "usr/bin",
    "usr/sbin",
    "bin",
    "sbin",
    "usr/local/bin",
];
const LD_CACHE: &str = "etc/ld.so.cache";
const FIRMWARE_CLASS_PATH: &str = "/sys/module/firmware_class/parameters/path";

#[derive(Clone, Debug)]
pub enum Role {
    Library,
    Binary,
    Firmware,
    Config(&'static ConfigSpec),
}

/// A host path that may be served, as found (links not yet followed).
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Relative to the driver root.
    pub path: PathBuf,
    pub role: Role,
}

impl Candidate {
    /// As the host names it.
    pub fn source(&self) -> String {
        format!("/{}", self.path.display())
    }
}

/// What discovery found: candidates in priority order, and what it could
/// already tell is not NVIDIA's (or not usable).
#[derive(Debug, Default)]
pub struct DriverScan {
    pub candidates: Vec<Candidate>,
    pub rejected: Vec<Rejected>,
    /// The ld.so cache and directory listings name the same paths.
    listed: HashSet<PathBuf>,
}

/// What discovery needs to know about the running kernel; taken as data so
/// tests can give their own.
#[derive(Clone, Debug, Default)]
pub struct KernelInfo {
    /// `uname -r`, for `/lib/firmware/<release>`.
    pub release: Option<String>,
    /// The firmware loader's custom search path, if set.
    pub firmware_path: Option<PathBuf>,
}

impl KernelInfo {
    pub fn running() -> KernelInfo {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        KernelInfo {
            release: read("/proc/sys/kernel/osrelease"),
            firmware_path: read(FIRMWARE_CLASS_PATH).map(PathBuf::from),
        }
    }
}

impl DriverScan {
    pub fn run(root: &HostRoot, version: &DriverVersion, kernel: &KernelInfo) -> DriverScan {
        let mut scan = DriverScan::default();
        let mut seen_dirs = HashSet::new();
        scan.ld_cache(root);
        for dir in driver_tree_lib_dirs() {
            scan.library_dir(root, &mut seen_dirs, Path::new(&dir), true);
        }
        for dir in shared_lib_dirs() {
            scan.library_dir(root, &mut seen_dirs, Path::new(&dir), false);
        }
        scan.binaries(root);
        scan.firmware(root, version, kernel);
        scan.configs(root);
        scan
    }

    fn push(&mut self, path: PathBuf, role: Role) {
        if self.listed.insert(path.clone()) {
            self.candidates.push(Candidate { path, role });
        }
    }

    fn reject(&mut self, path: &Path, reason: Reason) {
        if self.listed.insert(path.to_owned()) {
            self.rejected.push(Rejected {
                source: format!("/{}", path.display()),
                reason,
            });
        }
    }

    fn ld_cache(&mut self, root: &HostRoot) {
        let path = Path::new(LD_CACHE);
        let Ok(resolved) = root.resolve(path) else {
            tracing::debug!("no {LD_CACHE} under the driver root");
            return;
        };
        let parsed = root
            .open_file(&resolved.path)
            .and_then(|f| {
                use std::io::Read;
                let mut bytes = Vec::new();
                // A real cache is well under a megabyte; a bigger one is not worth trusting.
                f.take(64 << 20).read_to_end(&mut bytes).map(|_| bytes)
            })
            .map_err(|e| e.to_string())
            .and_then(|bytes| ldcache::parse(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(entries) => {
                tracing::debug!(entries = entries.len(), "read {LD_CACHE}");
                for entry in entries {
                    if catalog::parse_library_name(&entry.soname).is_some() || catalog::looks_like_nvidia(&entry.soname)
                    {
                        let rel = entry.path.strip_prefix("/").unwrap_or(&entry.path).to_owned();
                        self.library_entry(rel, false);
                    }
                }
            }
            Err(why) => {
                tracing::warn!("ignoring /{LD_CACHE}: {why}");
                self.reject(path, Reason::BadLdCache(why));
            }
        }
    }

    fn library_dir(&mut self, root: &HostRoot, seen: &mut HashSet<RootPath>, dir: &Path, driver_tree: bool) {
        let Some((dir, names)) = list_dir(root, seen, dir) else {
            return;
        };
        for name in names {
            let rel = dir.join(&name);
            if name == "vdpau" {
                self.library_dir(root, seen, &rel, driver_tree);
            } else {
                self.library_entry(rel, driver_tree);
            }
        }
    }

    /// `driver_tree`: whether unknown names are worth a report.
    fn library_entry(&mut self, rel: PathBuf, driver_tree: bool) {
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if catalog::parse_library_name(&name).is_some() {
            self.push(rel, Role::Library);
        } else if driver_tree || (catalog::looks_like_nvidia(&name) && is_library_like(&name)) {
            self.reject(&rel, Reason::UnknownName);
        }
    }

    fn binaries(&mut self, root: &HostRoot) {
        let mut seen = HashSet::new();
        for dir in BIN_DIRS {
            let Some((dir, names)) = list_dir(root, &mut seen, Path::new(dir)) else {
                continue;
            };
            for name in catalog::BINARIES {
                if names.iter().any(|n| n == *name) {
                    self.push(dir.join(name), Role::Binary);
                }
            }
        }
    }

    /// The kernel's firmware search order (drivers/base/firmware_loader).
    fn firmware(&mut self, root: &HostRoot, version: &DriverVersion, kernel: &KernelInfo) {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(custom) = &kernel.firmware_path {
            dirs.push(custom.strip_prefix("/").unwrap_or(custom).to_owned());
        }
        let release = kernel.release.as_deref();
        dirs.extend(release.map(|r| Path::new("lib/firmware/updates").join(r)));
        dirs.push("lib/firmware/updates".into());
        dirs.extend(release.map(|r| Path::new("lib/firmware").join(r)));
        dirs.push("lib/firmware".into());

        let mut seen = HashSet::new();
        for dir in dirs {
            let Some((nvidia, names)) = list_dir(root, &mut seen, &dir.join("nvidia")) else {
                continue;
            };
            for name in names {
                let sub = nvidia.join(&name);
                let name = name.to_string_lossy();
                if name == version.as_str() {
                    let Some((sub, files)) = list_dir(root, &mut seen, &sub) else {
                        continue;
                    };
                    for file in files {
                        let path = sub.join(&file);
                        if catalog::is_firmware_name(&file.to_string_lossy()) {
                            self.push(path, Role::Firmware);
                        } else {
                            self.reject(&path, Reason::UnknownName);
                        }
                    }
                } else if DriverVersion::parse(&name).is_some() {
                    self.reject(
                        &sub,
                        Reason::OtherVersion {
                            found: name.into_owned(),
                        },
                    );
                }
            }
        }
    }

    fn configs(&mut self, root: &HostRoot) {
        for spec in catalog::CONFIGS {
            let tree = Path::new(DRIVER_TREE).join(spec.base.view_dir()).join(spec.path);
            let host = Path::new(spec.base.host_dir()).join(spec.path);
            for path in [tree, host] {
                // Most hosts lack most of these; only what exists is a candidate.
                if !matches!(root.resolve(&path), Err(ResolveError::Missing { .. })) {
                    self.push(path, Role::Config(spec));
                }
            }
        }
    }
}

/// `lib*.so*` names: what a stray library in a shared directory looks like.
fn is_library_like(name: &str) -> bool {
    name.starts_with("lib") && name.contains(".so")
}

/// Lists a directory once, however many names lead to it; returns where it
/// really is and its entries.
fn list_dir(root: &HostRoot, seen: &mut HashSet<RootPath>, dir: &Path) -> Option<(PathBuf, Vec<OsString>)> {
    let resolved = root.resolve(dir).ok()?;
    if !resolved.metadata.is_dir() || !seen.insert(resolved.path.clone()) {
        return None;
    }
    match root.read_dir(&resolved.path) {
        Ok(names) => Some((resolved.path.relative().to_owned(), names)),
        Err(e) => {
            tracing::warn!("cannot list /{}: {e}", dir.display());
            None
        }
    }
}
