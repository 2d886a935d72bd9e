//! Finds every host path that might be part of the driver.
//!
//! Discovery only looks: it lists names where NVIDIA's files live (the ld.so
//! cache, library directories, flat driver trees, bin directories, firmware
//! search paths, vendor config paths) and keeps the ones the catalog knows.
//! Whether a candidate is the right version, a real ELF file, or a duplicate
//! is for `select` to judge. Candidates come out in priority order: when two
//! different files claim the same place in the view, the earlier one wins.
//!
//! The places are those the installers of GPU hosts use, each taken from
//! the installer's own source or package file lists (docs/scan.md's "Where
//! drivers are found" lists them with their sources, and tests/layouts.rs
//! builds each): Debian's and Ubuntu's packages with their flavor
//! directories, RHEL's and NVIDIA's CUDA repository packages, NVIDIA's
//! `.run` installer (also what the GPU Operator's driver container runs),
//! Container-Optimized OS and GKE, NixOS, and flat `/usr/local/nvidia`
//! trees.

use crate::catalog::{self, ConfigBase, ConfigSpec, TRIPLETS};
use crate::hostroot::{HostRoot, ResolveError, RootPath};
use crate::ldcache;
use crate::pin::DriverVersion;
use crate::reason::{Reason, Rejected};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Flat driver trees: one directory holding a whole driver, with `lib64`,
/// `lib`, `bin`, `firmware`, `share` and `etc` below it. Every entry of
/// their library directories is reported, so a stray file there does not
/// go unnoticed, and a file below one belongs with the libraries in it.
/// `/usr/local/nvidia` is where CUDA images and GKE's containers expect a
/// driver (and where the GPU machines have theirs); Container-Optimized OS
/// installs into `/var/lib/nvidia`, GKE's installer into
/// `/home/kubernetes/bin/nvidia`.
const FLAT_TREES: &[&str] = &["usr/local/nvidia", "var/lib/nvidia", "home/kubernetes/bin/nvidia"];

/// NixOS: the driver's libraries, configs (`share/`, `etc/`) and
/// `nvoptix.bin` are linked from here into the Nix store, for 64- and
/// 32-bit programs; its programs are in the system's profile, and its
/// firmware is linked from the booted system.
const NIXOS_DRIVER_LINKS: &[&str] = &["run/opengl-driver", "run/opengl-driver-32"];
const NIXOS_PROGRAMS: &str = "run/current-system/sw/bin";
const NIXOS_FIRMWARE: &str = "run/current-system/firmware";
/// Every Nix store path is a tree of its own.
const NIX_STORE: &str = "nix/store";

/// Directories holding one directory per installed driver flavor: Debian
/// installs each flavor (`current`, `tesla`, `tesla-535`, ...) into
/// `<libdir>/nvidia/<flavor>/` and its programs into
/// `/usr/lib/nvidia/<flavor>/`, and points the well-known names at one of
/// them through alternatives, whichever module is loaded.
fn flavor_lib_parents() -> Vec<String> {
    vec![
        format!("usr/lib/{}/nvidia", TRIPLETS[0]),
        format!("usr/lib/{}/nvidia", TRIPLETS[1]),
    ]
}
const FLAVOR_PROGRAM_PARENT: &str = "usr/lib/nvidia";

/// Library directories that hold nothing but the driver (every entry is
/// reported), besides the flat trees' and the flavors'.
const DRIVER_LIB_DIRS: &[&str] = &["usr/lib64/nvidia"];

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

const BIN_DIRS: &[&str] = &["usr/bin", "usr/sbin", "bin", "sbin", "usr/local/bin"];
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
    /// Where discovery looked (the ld.so cache, each directory it listed),
    /// as the host names them: what a "no driver" message names.
    pub looked_in: Vec<String>,
    /// The ld.so cache and directory listings name the same paths.
    listed: HashSet<PathBuf>,
    /// Each directory is listed once, however many names lead to it.
    seen_dirs: HashSet<RootPath>,
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
        scan.ld_cache(root);
        for tree in FLAT_TREES {
            for lib in ["lib64", "lib"] {
                scan.library_dir(root, &Path::new(tree).join(lib), true);
            }
        }
        for parent in flavor_lib_parents() {
            for flavor in scan.subdirs(root, Path::new(&parent)) {
                scan.library_dir(root, &flavor, true);
            }
        }
        for dir in DRIVER_LIB_DIRS {
            scan.library_dir(root, Path::new(dir), true);
        }
        for dir in shared_lib_dirs() {
            scan.library_dir(root, Path::new(&dir), false);
        }
        for link in NIXOS_DRIVER_LINKS {
            // A profile of several packages' links: only NVIDIA's matter.
            scan.library_dir(root, &Path::new(link).join("lib"), false);
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
                self.looked_in.push(format!("/{LD_CACHE}"));
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

    fn library_dir(&mut self, root: &HostRoot, dir: &Path, driver_tree: bool) {
        let Some((dir, names)) = self.list_dir(root, dir) else {
            return;
        };
        for name in names {
            let rel = dir.join(&name);
            if name == "vdpau" {
                self.library_dir(root, &rel, driver_tree);
            } else if let Some(spec) = catalog::config_named(&name.to_string_lossy()) {
                // Debian and NixOS keep nvoptix.bin with the libraries.
                self.push(rel, Role::Config(spec));
            } else {
                self.library_entry(rel, driver_tree);
            }
        }
    }

    /// The directories in `dir` (links to directories included).
    fn subdirs(&mut self, root: &HostRoot, dir: &Path) -> Vec<PathBuf> {
        let Some((dir, names)) = self.list_dir(root, dir) else {
            return Vec::new();
        };
        names
            .into_iter()
            .map(|name| dir.join(name))
            .filter(|path| root.resolve(path).is_ok_and(|r| r.metadata.is_dir()))
            .collect()
    }

    /// Lists a directory once, however many names lead to it; returns
    /// where it really is and its entries.
    fn list_dir(&mut self, root: &HostRoot, dir: &Path) -> Option<(PathBuf, Vec<OsString>)> {
        let resolved = root.resolve(dir).ok()?;
        if !resolved.metadata.is_dir() || !self.seen_dirs.insert(resolved.path.clone()) {
            return None;
        }
        match root.read_dir(&resolved.path) {
            Ok(names) => {
                self.looked_in.push(resolved.path.to_string());
                Some((resolved.path.relative().to_owned(), names))
            }
            Err(e) => {
                tracing::warn!("cannot list /{}: {e}", dir.display());
                None
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

    /// The flat trees' `bin`, then the system's, then Debian's flavors'
    /// program directories: a name in an earlier one is served first, and
    /// a later one's is served only when the earlier is of another version.
    fn binaries(&mut self, root: &HostRoot) {
        let mut dirs: Vec<PathBuf> = FLAT_TREES.iter().map(|t| Path::new(t).join("bin")).collect();
        dirs.extend(BIN_DIRS.iter().map(PathBuf::from));
        dirs.push(NIXOS_PROGRAMS.into());
        dirs.extend(self.subdirs(root, Path::new(FLAVOR_PROGRAM_PARENT)));
        for dir in dirs {
            let Some((dir, names)) = self.list_dir(root, &dir) else {
                continue;
            };
            for name in catalog::BINARIES {
                if names.iter().any(|n| n == *name) {
                    self.push(dir.join(name), Role::Binary);
                }
            }
        }
    }

    /// The kernel's firmware search order (drivers/base/firmware_loader),
    /// then the firmware directories the layouts above keep with their
    /// driver, which their hosts point the kernel at (the GPU machines'
    /// `/usr/local/nvidia/firmware`, COS's `firmware_class.path`, NixOS's
    /// booted system).
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
        dirs.extend(FLAT_TREES.iter().map(|t| Path::new(t).join("firmware")));
        dirs.push(NIXOS_FIRMWARE.into());

        for dir in dirs {
            let Some((nvidia, names)) = self.list_dir(root, &dir.join("nvidia")) else {
                continue;
            };
            for name in names {
                let sub = nvidia.join(&name);
                let name = name.to_string_lossy();
                if name == version.as_str() {
                    let Some((sub, files)) = self.list_dir(root, &sub) else {
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

    /// Below each flat tree and NixOS's driver links (`share/...`,
    /// `etc/...`, and GKE's `vulkan/icd.d`, the installer's `/etc` one), then
    /// the host's own `/usr/share` and `/etc`.
    fn configs(&mut self, root: &HostRoot) {
        for spec in catalog::CONFIGS {
            let trees = FLAT_TREES.iter().chain(NIXOS_DRIVER_LINKS).flat_map(|tree| {
                let tree = Path::new(tree);
                let below_etc = (spec.base == ConfigBase::Etc).then(|| tree.join(spec.path));
                [Some(tree.join(spec.base.view_dir()).join(spec.path)), below_etc]
                    .into_iter()
                    .flatten()
            });
            let host = Path::new(spec.base.host_dir()).join(spec.path);
            for path in trees.chain([host]) {
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

/// The driver tree a path (relative to the root, links followed) lies in,
/// as the directories that make it up: a flat tree, a Nix store path, or a
/// Debian flavor (its library directories and its program directory). Its
/// files belong with the libraries in it.
pub fn tree_of(path: &Path) -> Option<Vec<PathBuf>> {
    if let Some(tree) = FLAT_TREES.iter().find(|t| path.starts_with(t)) {
        return Some(vec![PathBuf::from(tree)]);
    }
    if let Ok(rest) = path.strip_prefix(NIX_STORE) {
        let store_path = rest.components().next()?;
        return Some(vec![Path::new(NIX_STORE).join(store_path)]);
    }
    let mut parents = flavor_lib_parents();
    parents.push(FLAVOR_PROGRAM_PARENT.into());
    let flavor = parents.iter().find_map(|parent| {
        let rest = path.strip_prefix(parent).ok()?;
        let mut parts = rest.components();
        // The flavor directory itself, and something inside it.
        let flavor = parts.next()?;
        parts.next().map(|_| flavor.as_os_str().to_owned())
    })?;
    Some(parents.iter().map(|parent| Path::new(parent).join(&flavor)).collect())
}
