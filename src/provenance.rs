//! Which driver version a file belongs to when its name does not say.
//!
//! `nvidia-smi`, the MPS programs and the vendor configs carry no version
//! in their names, and a host can hold several drivers at once: Debian's
//! flavors side by side, a leftover install beside a new one. The
//! well-known names (`/usr/bin/nvidia-smi`, `/usr/share/vulkan/icd.d/...`)
//! lead to whichever driver the package manager chose, not to the one the
//! loaded module is. Serving such a file of another version is the very
//! mismatch the view exists to prevent, so one is served only on evidence,
//! strongest first:
//!
//! 1. its bytes name the version (NVIDIA's programs carry their version):
//!    what is served is those bytes, whatever any record says of them;
//! 2. what installed it says which version it is: a package of dpkg's
//!    database, or NVIDIA's own installer's record of the files it wrote;
//! 3. its real path names the version (NixOS's store paths do);
//! 4. it sits in a driver tree (a Debian flavor, a flat tree such as
//!    `/usr/local/nvidia`) whose libraries are all of that version;
//! 5. the pinned version is the only driver version on disk.
//!
//! The first four can as well show that a file is of another version, and
//! then it is rejected. A file none of them speaks for, on a host with
//! several driver versions, is rejected too: a view without `nvidia-smi` is
//! better than one with the wrong one.

use crate::discover;
use crate::hostroot::{HostRoot, RootPath};
use crate::pin::DriverVersion;
use crate::reason::Reason;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// dpkg's database, relative to the driver root.
const DPKG_STATUS: &str = "var/lib/dpkg/status";
const DPKG_INFO: &str = "var/lib/dpkg/info";
/// NVIDIA's `.run` installer's record of what it installed (its "backup
/// log", nvidia-installer's backup.c): written on every install, also
/// inside the GPU Operator's driver container.
const RUN_INSTALLER_LOG: &str = "var/lib/nvidia/log";
/// A real status file is a few MB; refuse to read anything absurd.
const MAX_RECORD: u64 = 64 << 20;
/// Files searched for a version string: NVIDIA's programs are a few MB,
/// configs a few hundred bytes. A bigger file is not searched (and then
/// needs other evidence).
const MAX_SEARCHED: u64 = 64 << 20;

/// How a file whose name carries no version was shown to be of the pinned
/// version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// What installed it: a package, or NVIDIA's installer.
    Installed {
        by: String,
    },
    Path,
    Tree {
        dir: String,
    },
    Contents,
    OnlyVersion,
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provenance::Installed { by } => write!(f, "installed by {by}"),
            Provenance::Path => f.write_str("its path names the version"),
            Provenance::Tree { dir } => write!(f, "{dir} holds only this version's libraries"),
            Provenance::Contents => f.write_str("its contents name the version"),
            Provenance::OnlyVersion => f.write_str("the only driver version on disk"),
        }
    }
}

/// What is known about the drivers on disk once every library has been
/// judged: the evidence each versionless file is checked against.
pub struct Evidence<'a> {
    root: &'a HostRoot,
    pinned: DriverVersion,
    /// Every driver version whose libraries or firmware are on disk.
    on_disk: BTreeSet<DriverVersion>,
    /// The directory of each driver library on disk, with its version.
    library_dirs: Vec<(PathBuf, DriverVersion)>,
    installs: OnceLock<Installs>,
}

impl<'a> Evidence<'a> {
    pub fn new(
        root: &'a HostRoot,
        pinned: &DriverVersion,
        libraries: impl IntoIterator<Item = (RootPath, DriverVersion)>,
        firmware_versions: impl IntoIterator<Item = DriverVersion>,
    ) -> Evidence<'a> {
        let library_dirs: Vec<(PathBuf, DriverVersion)> = libraries
            .into_iter()
            .map(|(path, v)| (path.relative().parent().map(Path::to_owned).unwrap_or_default(), v))
            .collect();
        let on_disk = library_dirs
            .iter()
            .map(|(_, v)| v.clone())
            .chain(firmware_versions)
            .collect();
        Evidence {
            root,
            pinned: pinned.clone(),
            on_disk,
            library_dirs,
            installs: OnceLock::new(),
        }
    }

    /// The driver versions on disk, oldest first.
    pub fn on_disk(&self) -> Vec<&DriverVersion> {
        let mut v: Vec<&DriverVersion> = self.on_disk.iter().collect();
        v.sort_by_key(|v| v.components());
        v
    }

    /// Whether `file` (found as `found`, really at `real`) belongs to the
    /// pinned version: how that is known, or why it is not served.
    pub fn judge(&self, found: &Path, real: &RootPath, file: &File) -> Result<Provenance, Reason> {
        let other = |found: &DriverVersion, shown_by: String| Reason::OtherVersionShown {
            found: found.to_string(),
            shown_by,
        };
        if let Some(v) = searchable(file).and_then(|bytes| self.named_in(&bytes)) {
            return if v == &self.pinned {
                Ok(Provenance::Contents)
            } else {
                Err(other(v, "its contents name it".into()))
            };
        }
        let installs = self.installs.get_or_init(|| Installs::read(self.root));
        if let Some(install) = installs.of(found).or_else(|| installs.of(real.relative())) {
            let by = install.by.clone();
            // A package not versioned like the driver says nothing.
            if let Some(v) = DriverVersion::parse(&install.version) {
                return if v == self.pinned {
                    Ok(Provenance::Installed { by })
                } else {
                    Err(other(&v, format!("installed by {by}")))
                };
            }
        }
        if let Some(v) = self.named_in(real.relative().as_os_str().as_encoded_bytes()) {
            return if v == &self.pinned {
                Ok(Provenance::Path)
            } else {
                Err(other(v, "its path names it".into()))
            };
        }
        if let Some(tree) = discover::tree_of(real.relative()) {
            let versions: BTreeSet<&DriverVersion> = self
                .library_dirs
                .iter()
                .filter(|(dir, _)| tree.iter().any(|t| dir.starts_with(t)))
                .map(|(_, v)| v)
                .collect();
            if let [v] = versions.into_iter().collect::<Vec<_>>()[..] {
                let dir = format!("/{}", tree[0].display());
                return if v == &self.pinned {
                    Ok(Provenance::Tree { dir })
                } else {
                    Err(other(v, format!("{dir} holds only its libraries")))
                };
            }
        }
        match self.on_disk() {
            on_disk if on_disk == [&self.pinned] => Ok(Provenance::OnlyVersion),
            on_disk => Err(Reason::VersionUnproven {
                on_disk: on_disk.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// The version `bytes` name, the pinned one first: only versions known
    /// to be on disk count, so a kernel release (`6.12.41`) in a NixOS
    /// store path or a Vulkan API version in a config is never taken for
    /// one.
    fn named_in(&self, bytes: &[u8]) -> Option<&DriverVersion> {
        std::iter::once(&self.pinned)
            .chain(self.on_disk.iter().filter(|v| **v != self.pinned))
            .find(|v| contains_version(bytes, v.as_str().as_bytes()))
    }
}

/// `needle` in `haystack` as a whole version: `535.261.03` is not in
/// `1535.261.031`.
fn contains_version(haystack: &[u8], needle: &[u8]) -> bool {
    let part_of_number = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_digit() || *b == b'.');
    let Some(&first) = needle.first() else { return false };
    let mut at = 0;
    while let Some(i) = haystack[at..].iter().position(|&b| b == first) {
        let start = at + i;
        if haystack[start..].starts_with(needle)
            && !part_of_number(start.checked_sub(1).and_then(|p| haystack.get(p)))
            && !part_of_number(haystack.get(start + needle.len()))
        {
            return true;
        }
        at = start + 1;
    }
    false
}

/// A file's bytes, if it is small enough to search.
fn searchable(file: &File) -> Option<Vec<u8>> {
    let len = file.metadata().ok()?.len();
    if len > MAX_SEARCHED {
        return None;
    }
    let mut bytes = vec![0; len as usize];
    // Positioned, so the descriptor's offset stays where serving expects it.
    file.read_exact_at(&mut bytes, 0).ok()?;
    Some(bytes)
}

/// A Debian version's upstream part: `1:535.261.03-1~deb12u1` is
/// `535.261.03`.
///
/// ```
/// assert_eq!(nvlibfs::provenance::upstream("1:535.261.03-1~deb12u1"), "535.261.03");
/// assert_eq!(nvlibfs::provenance::upstream("550.163.01-2"), "550.163.01");
/// ```
pub fn upstream(version: &str) -> &str {
    let version = version.split_once(':').map_or(version, |(_, v)| v);
    version.rsplit_once('-').map_or(version, |(v, _)| v)
}

/// What installed a set of files, at which version.
#[derive(Debug)]
struct Install {
    /// As a user would name it: `package nvidia-smi 535.261.03-1`.
    by: String,
    /// The driver version it says (a Debian version's upstream part).
    version: String,
}

/// Which install each path (relative to the root) came from, as the host's
/// own records say.
#[derive(Debug, Default)]
struct Installs {
    installs: Vec<Install>,
    owners: HashMap<PathBuf, usize>,
}

impl Installs {
    fn read(root: &HostRoot) -> Installs {
        let mut installs = Installs::default();
        installs.read_dpkg(root);
        installs.read_run_installer(root);
        tracing::debug!(installs = installs.installs.len(), "read the host's install records");
        installs
    }

    fn add(&mut self, install: Install, paths: impl IntoIterator<Item = PathBuf>) {
        let index = self.installs.len();
        self.installs.push(install);
        for path in paths {
            self.owners.insert(path, index);
        }
    }

    /// dpkg's status file names the installed packages and their versions;
    /// `info/<package>[:<arch>].list` the paths each installed. Only the
    /// lists of packages with NVIDIA's or CUDA's name are read: every
    /// distribution's driver packages are named so, and a host has
    /// thousands of others.
    fn read_dpkg(&mut self, root: &HostRoot) {
        let Some(status) = read_inside(root, Path::new(DPKG_STATUS)) else {
            return;
        };
        for paragraph in String::from_utf8_lossy(&status).split("\n\n") {
            let field = |name: &str| {
                paragraph
                    .lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                    .map(str::trim)
            };
            let (Some(name), Some(version), Some(state)) = (field("Package"), field("Version"), field("Status")) else {
                continue;
            };
            if !state.ends_with(" installed") || !(name.contains("nvidia") || name.contains("cuda")) {
                continue;
            }
            let arch = field("Architecture").unwrap_or_default();
            let list = [format!("{name}:{arch}.list"), format!("{name}.list")]
                .into_iter()
                .find_map(|file| read_inside(root, &Path::new(DPKG_INFO).join(file)));
            let Some(list) = list else { continue };
            let install = Install {
                by: format!("package {name} {version}"),
                version: upstream(version).to_owned(),
            };
            let paths: Vec<PathBuf> = String::from_utf8_lossy(&list)
                .lines()
                .map(|line| PathBuf::from(line.trim_start_matches('/')))
                .filter(|p| !p.as_os_str().is_empty())
                .collect();
            self.add(install, paths);
        }
    }

    /// nvidia-installer's log: the first line ends with the version in
    /// parentheses (`1.0-5904801 (590.48.01)`), then each installed file
    /// is an entry `1: <path>` (followed by a line with its checksum).
    fn read_run_installer(&mut self, root: &HostRoot) {
        let Some(log) = read_inside(root, Path::new(RUN_INSTALLER_LOG)) else {
            return;
        };
        let log = String::from_utf8_lossy(&log);
        let mut lines = log.lines();
        let version = lines
            .next()
            .and_then(|first| first.rsplit_once('(')?.1.strip_suffix(')'))
            .map(str::to_owned);
        let Some(version) = version else {
            tracing::warn!("/{RUN_INSTALLER_LOG}: no version on its first line; not used");
            return;
        };
        let paths: Vec<PathBuf> = lines
            .filter_map(|line| line.strip_prefix("1: "))
            .map(|path| PathBuf::from(path.trim_start_matches('/')))
            .collect();
        let install = Install {
            by: format!("NVIDIA's installer {version} (/{RUN_INSTALLER_LOG})"),
            version,
        };
        self.add(install, paths);
    }

    fn of(&self, path: &Path) -> Option<&Install> {
        self.owners.get(path).map(|&i| &self.installs[i])
    }
}

/// A file of the host's own bookkeeping, read only from inside the root.
fn read_inside(root: &HostRoot, path: &Path) -> Option<Vec<u8>> {
    let resolved = root.resolve(path).ok()?;
    let file = root.open_file(&resolved.path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_whole() {
        assert!(contains_version(b"NVIDIA-SMI 535.261.03 ", b"535.261.03"));
        assert!(contains_version(b"535.261.03", b"535.261.03"));
        assert!(contains_version(b"x-nvidia-x11-550.163.01-6.12.41/bin", b"550.163.01"));
        assert!(!contains_version(b"1535.261.03", b"535.261.03"));
        assert!(!contains_version(b"535.261.031", b"535.261.03"));
        assert!(!contains_version(b"535.261.03.1", b"535.261.03"));
        assert!(!contains_version(b"535.261", b"535.261.03"));
        assert!(contains_version(b"5535.261.03 535.261.03", b"535.261.03"));
    }

    /// A root with a dpkg record saying `usr/bin/nvidia-smi` is 535's.
    fn host(smi: &[u8]) -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, bytes: &[u8]| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        };
        write(
            DPKG_STATUS,
            b"Package: nvidia-smi\nStatus: install ok installed\nArchitecture: amd64\nVersion: 535.261.03-1\n\n",
        );
        write("var/lib/dpkg/info/nvidia-smi:amd64.list", b"/usr/bin/nvidia-smi\n");
        write("usr/bin/nvidia-smi", smi);
        write("etc/OpenCL/vendors/nvidia.icd", b"libnvidia-opencl.so.1\n");
        let root = HostRoot::open(dir.path()).unwrap();
        (dir, root)
    }

    fn judge(root: &HostRoot, on_disk: &[&str], path: &str) -> Result<Provenance, Reason> {
        let v = |s: &str| DriverVersion::parse(s).unwrap();
        let libraries = on_disk.iter().map(|s| {
            (
                RootPath::from_relative(Path::new(&format!("usr/lib/libcuda.so.{s}"))),
                v(s),
            )
        });
        let evidence = Evidence::new(root, &v("535.261.03"), libraries, []);
        let resolved = root.resolve(Path::new(path)).unwrap();
        let file = root.open_file(&resolved.path).unwrap();
        evidence.judge(Path::new(path), &resolved.path, &file)
    }

    #[test]
    fn evidence_decides_in_order() {
        let (_dir, root) = host(b"NVIDIA-SMI 535.261.03");
        assert_eq!(
            judge(&root, &["535.261.03", "550.163.01"], "usr/bin/nvidia-smi"),
            Ok(Provenance::Contents)
        );
        // The record says 535, the bytes say 550: the bytes are what is served.
        let (_dir, root) = host(b"NVIDIA-SMI 550.163.01");
        assert!(matches!(
            judge(&root, &["535.261.03", "550.163.01"], "usr/bin/nvidia-smi"),
            Err(Reason::OtherVersionShown { found, .. }) if found == "550.163.01"
        ));
        // Bytes that name no version: the record decides.
        let (_dir, root) = host(b"no version here");
        assert_eq!(
            judge(&root, &["535.261.03", "550.163.01"], "usr/bin/nvidia-smi"),
            Ok(Provenance::Installed {
                by: "package nvidia-smi 535.261.03-1".into()
            })
        );
        // Nothing speaks for the config: served only if 535 is all there is.
        assert_eq!(
            judge(&root, &["535.261.03"], "etc/OpenCL/vendors/nvidia.icd"),
            Ok(Provenance::OnlyVersion)
        );
        assert_eq!(
            judge(&root, &["535.261.03", "550.163.01"], "etc/OpenCL/vendors/nvidia.icd"),
            Err(Reason::VersionUnproven {
                on_disk: "535.261.03, 550.163.01".into()
            })
        );
    }

    #[test]
    fn upstream_versions() {
        assert_eq!(upstream("535.261.03-1"), "535.261.03");
        assert_eq!(upstream("525.147.05-15~deb12u1"), "525.147.05");
        assert_eq!(upstream("1:550.163.01-2"), "550.163.01");
        assert_eq!(upstream("535.183.01-0ubuntu0.22.04.1"), "535.183.01");
        assert_eq!(upstream("3.0"), "3.0");
    }
}
