//! The immutable tree a mount serves.
//!
//! Built once from a selection and never changed: a driver change produces a
//! new `View` that is swapped in whole. Laid out like the `/usr/local/nvidia`
//! convention that CUDA images and GKE expect (`bin/`, `lib64/`, `lib/` for
//! 32-bit), plus firmware and vendor configs, with the symlinks a container's
//! loader needs already in place, so nothing has to run `ldconfig` inside it.
//! Inode numbers are indexes into one vector: lookups are a map probe.

use crate::catalog::{Versioning, GBM_BACKEND, GLX_INDIRECT, TRIPLETS};
use crate::elf::ElfClass;
use crate::pin::PinnedVersion;
use crate::select::{FileKind, Selected};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

pub type Ino = u64;
/// FUSE's root inode.
pub const ROOT_INO: Ino = 1;

#[derive(Debug)]
pub struct View {
    pin: PinnedVersion,
    driver_root: PathBuf,
    nodes: Vec<Node>,
    /// When the view was built: the time shown for directories and links.
    built: SystemTime,
}

#[derive(Debug)]
pub struct Node {
    pub parent: Ino,
    pub kind: NodeKind,
}

#[derive(Debug)]
pub enum NodeKind {
    /// Entries sorted by name, so listings are stable.
    Dir(BTreeMap<OsString, Ino>),
    File(Selected),
    /// Relative, and never leaves the view.
    Symlink(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeType {
    Dir,
    File,
    Symlink,
}

/// What `stat` shows; FUSE-independent so the core is tested without a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub node_type: NodeType,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
}

impl View {
    pub fn build(pin: PinnedVersion, driver_root: PathBuf, files: Vec<Selected>) -> View {
        View::build_at(pin, driver_root, files, SystemTime::now())
    }

    /// `build`, with `built` as the time shown for directories, links and
    /// generated files.
    fn build_at(pin: PinnedVersion, driver_root: PathBuf, files: Vec<Selected>, built: SystemTime) -> View {
        let mut view = View {
            pin,
            driver_root,
            nodes: vec![Node {
                parent: ROOT_INO,
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
            built,
        };
        // A build for tests only (tests/handover_exact.rs): one directory
        // more, numbered first, as a release that changes the layout does,
        // so that every other node gets another inode number.
        if option_env!("NVLIBFS_TEST_VIEW_LAYOUT").is_some() {
            view.make_dirs(Path::new("layout-variant"));
        }
        // Present even when empty, so `PATH`/`LD_LIBRARY_PATH` entries never dangle.
        view.make_dirs(Path::new("bin"));
        view.make_dirs(Path::new("lib64"));
        let mut files = files;
        if let Some(cache) = loader_cache(&files) {
            match Selected::generated(PathBuf::from("etc/ld.so.cache"), &cache) {
                Ok(mut file) => {
                    file.mtime = built;
                    files.push(file)
                }
                Err(e) => tracing::warn!("cannot make the view's ld.so.cache: {e}"),
            }
        }
        let mut links = Vec::new();
        for file in files {
            links.extend(loader_links(&file));
            view.insert(&file.view_path.clone(), NodeKind::File(file));
        }
        for (path, target) in links {
            view.insert(&path, NodeKind::Symlink(target));
        }
        for (path, target) in driver_root_mirror() {
            view.insert(Path::new(&path), NodeKind::Symlink(PathBuf::from(target)));
        }
        view
    }

    /// Adds a node unless its name is taken: the first file or link to claim
    /// a name keeps it.
    fn insert(&mut self, path: &Path, kind: NodeKind) {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let dir = self.make_dirs(parent);
        let ino = self.nodes.len() as Ino + 1;
        if let NodeKind::Dir(entries) = &mut self.nodes[(dir - 1) as usize].kind {
            if entries.contains_key(name) {
                tracing::debug!(path = %path.display(), "name already taken in the view");
                return;
            }
            entries.insert(name.to_owned(), ino);
        }
        self.nodes.push(Node { parent: dir, kind });
    }

    fn make_dirs(&mut self, path: &Path) -> Ino {
        let mut dir = ROOT_INO;
        for part in path.components() {
            let Component::Normal(name) = part else { continue };
            dir = match self.lookup(dir, name) {
                Some(ino) => ino,
                None => {
                    let ino = self.nodes.len() as Ino + 1;
                    if let NodeKind::Dir(entries) = &mut self.nodes[(dir - 1) as usize].kind {
                        entries.insert(name.to_owned(), ino);
                    }
                    self.nodes.push(Node {
                        parent: dir,
                        kind: NodeKind::Dir(BTreeMap::new()),
                    });
                    ino
                }
            };
        }
        dir
    }

    /// Adds a directory (and those above it) to a view not yet served,
    /// numbered after every other node so that the rest keep their inode
    /// numbers: where a mount serves files of its own beside the
    /// generations (the CDI spec in `etc/cdi`). Its inode.
    pub fn add_dir(&mut self, path: &Path) -> Ino {
        self.make_dirs(path)
    }

    /// Whether any library versioned with the driver is served: without
    /// one, there is no driver here to speak of.
    pub fn has_driver_libraries(&self) -> bool {
        self.nodes.iter().any(|n| match &n.kind {
            NodeKind::File(f) => f.library.is_some_and(|l| l.versioning == Versioning::Driver),
            _ => false,
        })
    }

    pub fn pin(&self) -> &PinnedVersion {
        &self.pin
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        match &self.node(parent)?.kind {
            NodeKind::Dir(entries) => entries.get(name).copied(),
            _ => None,
        }
    }

    /// Follows a relative path from the root, without following links.
    pub fn lookup_path(&self, path: &Path) -> Option<Ino> {
        path.components().try_fold(ROOT_INO, |dir, part| match part {
            Component::Normal(name) => self.lookup(dir, name),
            Component::CurDir | Component::RootDir => Some(dir),
            _ => None,
        })
    }

    pub fn attr(&self, ino: Ino) -> Option<Attr> {
        let node = self.node(ino)?;
        let (node_type, size, perm, nlink, mtime) = match &node.kind {
            NodeKind::Dir(entries) => {
                let subdirs = entries
                    .values()
                    .filter(|&&i| matches!(self.node(i).map(|n| &n.kind), Some(NodeKind::Dir(_))))
                    .count();
                (NodeType::Dir, 0, 0o555, 2 + subdirs as u32, self.built)
            }
            NodeKind::File(f) => (NodeType::File, f.size, f.kind.perm(), 1, f.mtime),
            NodeKind::Symlink(target) => (NodeType::Symlink, target.as_os_str().len() as u64, 0o777, 1, self.built),
        };
        Some(Attr {
            ino,
            node_type,
            size,
            perm,
            nlink,
            mtime,
        })
    }

    /// Every node below the root, depth first in name order, with its path.
    pub fn walk(&self) -> Vec<(PathBuf, Ino)> {
        let mut out = Vec::new();
        let mut stack = vec![(PathBuf::new(), ROOT_INO)];
        while let Some((path, ino)) = stack.pop() {
            if let Some(NodeKind::Dir(entries)) = self.node(ino).map(|n| &n.kind) {
                for (name, &child) in entries.iter().rev() {
                    stack.push((path.join(name), child));
                }
            }
            if ino != ROOT_INO {
                out.push((path, ino));
            }
        }
        out
    }

    /// The view's files (not its directories or links), in `walk` order.
    pub fn files(&self) -> impl Iterator<Item = (Ino, &Selected)> {
        self.walk()
            .into_iter()
            .filter_map(|(_, ino)| match &self.node(ino)?.kind {
                NodeKind::File(f) => Some((ino, f)),
                _ => None,
            })
    }

    pub fn manifest(&self) -> Manifest {
        let mut files = Vec::new();
        let mut symlinks = Vec::new();
        for (path, ino) in self.walk() {
            match &self.nodes[(ino - 1) as usize].kind {
                NodeKind::File(f) => files.push(ManifestFile {
                    path: path.display().to_string(),
                    source: match f.kind {
                        FileKind::Generated => "(generated by nvlibfs)".into(),
                        _ => f.source.to_string(),
                    },
                    size: f.size,
                    kind: f.kind,
                    soname: f.soname.clone(),
                }),
                NodeKind::Symlink(target) => symlinks.push(ManifestLink {
                    path: path.display().to_string(),
                    target: target.display().to_string(),
                }),
                NodeKind::Dir(_) => {}
            }
        }
        Manifest {
            driver_version: self.pin.version.to_string(),
            version_source: self.pin.source.to_string(),
            driver_root: self.driver_root.display().to_string(),
            files,
            symlinks,
        }
    }
}

/// Host-style paths into the view, so tools that take a driver root
/// (`nvidia-ctk --driver-root`, `nvidia-container-cli --root`, nvlibfs
/// itself) find every file where a distribution would put it:
/// `usr/lib/x86_64-linux-gnu/libcuda.so.1`, `lib/firmware/nvidia/<v>/`,
/// `usr/bin/nvidia-smi`, `usr/share/glvnd/...`. `lib/firmware` sits in the
/// 32-bit library directory, where loaders ignore it.
fn driver_root_mirror() -> [(String, &'static str); 6] {
    [
        (lib_dir(ElfClass::Elf64), "../../lib64"),
        (lib_dir(ElfClass::Elf32), "../../lib"),
        ("usr/lib64".into(), "../lib64"),
        ("usr/bin".into(), "../bin"),
        ("usr/share".into(), "../share"),
        ("lib/firmware".into(), "../firmware"),
    ]
}

/// `usr/lib/<triplet>` for this host's 64- or 32-bit libraries.
fn lib_dir(class: ElfClass) -> String {
    let triplet = match class {
        ElfClass::Elf64 => TRIPLETS[0],
        ElfClass::Elf32 => TRIPLETS[1],
    };
    format!("usr/lib/{triplet}")
}

/// The view's own `etc/ld.so.cache`, listing its libraries at their
/// host-style paths (`/usr/lib/<triplet>/...`): tools given the view as a
/// driver root read it to find libraries (libnvidia-container does).
/// Libraries in a subdirectory (VDPAU) are found by path, not by the cache.
fn loader_cache(files: &[Selected]) -> Option<Vec<u8>> {
    use crate::ldcache::{self, CacheEntry};
    // glibc's FLAG_ELF_LIBC6, plus FLAG_X8664_LIB64 / FLAG_AARCH64_LIB64
    // for the 64-bit libraries (32-bit ARM's hard-float flag is 0x0900).
    #[cfg(target_arch = "x86_64")]
    const LIB64_FLAGS: i32 = 0x0303;
    #[cfg(target_arch = "x86_64")]
    const LIB32_FLAGS: i32 = 0x0003;
    #[cfg(target_arch = "aarch64")]
    const LIB64_FLAGS: i32 = 0x0a03;
    #[cfg(target_arch = "aarch64")]
    const LIB32_FLAGS: i32 = 0x0903;
    let mut entries = Vec::new();
    for f in files {
        let (dir, flags) = match f.kind {
            FileKind::Lib64 => (lib_dir(ElfClass::Elf64), LIB64_FLAGS),
            FileKind::Lib32 => (lib_dir(ElfClass::Elf32), LIB32_FLAGS),
            _ => continue,
        };
        if f.library.is_some_and(|l| l.subdir.is_some()) {
            continue;
        }
        let name = f.view_path.file_name()?.to_string_lossy().into_owned();
        let mut names = vec![name.clone()];
        names.extend(f.soname.clone().filter(|s| *s != name));
        for n in names {
            entries.push(CacheEntry {
                path: Path::new("/").join(&dir).join(&n),
                soname: n,
                flags,
            });
        }
    }
    (!entries.is_empty()).then(|| ldcache::write(&entries))
}

/// The names a container's loader asks for, pointing at the real file in the
/// same directory: SONAME -> file, `lib*.so` -> SONAME, and GLVND's indirect
/// GLX name.
fn loader_links(file: &Selected) -> Vec<(PathBuf, PathBuf)> {
    let (Some(spec), Some(soname), Some(dir), Some(name)) = (
        file.library,
        &file.soname,
        file.view_path.parent(),
        file.view_path.file_name(),
    ) else {
        return Vec::new();
    };
    if !matches!(file.kind, FileKind::Lib64 | FileKind::Lib32) {
        return Vec::new();
    }
    let mut links = Vec::new();
    if soname.as_str() != name {
        links.push((dir.join(soname), PathBuf::from(name)));
    }
    let dev = format!("{}.so", spec.name);
    if dev != *soname {
        links.push((dir.join(&dev), PathBuf::from(soname)));
    }
    if spec.name == GLX_INDIRECT.1 {
        links.push((dir.join(GLX_INDIRECT.0), PathBuf::from(name)));
    }
    // A library the view keeps in a subdirectory (VDPAU's, where libvdpau
    // looks for it) is also named in the library directory itself, as
    // hosts that install it there have it (the GPU machines; the
    // toolkit's create-symlinks hook makes these links there): found by
    // `LD_LIBRARY_PATH` or `VDPAU_DRIVER_PATH` naming the directory.
    if let (Some(subdir), Some(lib_dir)) = (spec.subdir, dir.parent()) {
        let subdir = Path::new(subdir.trim_end_matches('/'));
        links.push((lib_dir.join(soname), subdir.join(name)));
        if dev != *soname {
            links.push((lib_dir.join(&dev), PathBuf::from(soname)));
        }
    }
    // Mesa's GBM loads `gbm/<drm driver>_gbm.so` beside its own library;
    // NVIDIA's installer (and the toolkit's create-symlinks hook) make it.
    if spec.name == GBM_BACKEND.1 {
        links.push((dir.join(GBM_BACKEND.0), Path::new("..").join(soname)));
    }
    links
}

/// What a view serves: `nvlibfs scan --json` prints it (with the rejected
/// candidates), and its field names are a stable interface.
#[derive(Debug, serde::Serialize)]
pub struct Manifest {
    pub driver_version: String,
    pub version_source: String,
    pub driver_root: String,
    pub files: Vec<ManifestFile>,
    pub symlinks: Vec<ManifestLink>,
}

#[derive(Debug, serde::Serialize)]
pub struct ManifestFile {
    pub path: String,
    pub source: String,
    pub size: u64,
    pub kind: FileKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soname: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct ManifestLink {
    pub path: String,
    pub target: String,
}

/// A view exactly as served, node by node, so that another process (a
/// server that takes the connection over, possibly a newer or older
/// build) serves the very same nodes at the very same inode numbers
/// without building anything with its own code: the kernel holds inode
/// numbers, and an inode number that named `bin/nvidia-smi` must go on
/// naming it. The held files travel separately, as descriptors, in the
/// order of the file nodes; each is checked against the identity recorded
/// here. Unknown fields are refused: a snapshot a build cannot read
/// exactly is not read at all.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewSnapshot {
    pub version: String,
    /// A module version file, or `None` for `--driver-version`.
    pub version_file: Option<PathBuf>,
    pub driver_root: PathBuf,
    /// When the view was first built (seconds, nanoseconds since the epoch).
    pub built: (u64, u32),
    /// Every node but the root, in inode order: `nodes[i]` is inode `i + 2`.
    pub nodes: Vec<NodeSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSnapshot {
    /// The directory this node is named in; always a lower inode number.
    pub parent: Ino,
    pub name: String,
    pub kind: NodeSnapshotKind,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum NodeSnapshotKind {
    Dir,
    Symlink(PathBuf),
    /// The next of the held files.
    File(FileSnapshot),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSnapshot {
    pub view_path: PathBuf,
    /// The host path inside the driver root, as discovery found it.
    pub source: PathBuf,
    pub size: u64,
    pub mtime: (u64, u32),
    pub kind: FileKind,
    pub soname: Option<String>,
    /// `(st_dev, st_ino)` of the held file: the descriptor that arrives
    /// for this node must be that file.
    pub identity: (u64, u64),
}

fn since_epoch(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn from_epoch((secs, nanos): (u64, u32)) -> Result<SystemTime, String> {
    SystemTime::UNIX_EPOCH
        .checked_add(std::time::Duration::new(secs, nanos.min(999_999_999)))
        .ok_or_else(|| format!("a time of {secs} s since the epoch"))
}

fn identity(file: &std::fs::File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl View {
    /// The view's nodes as served, and its held files (generated ones
    /// included: they are sealed memfds) in the order of its file nodes.
    pub fn snapshot(&self) -> std::io::Result<(ViewSnapshot, Vec<&std::fs::File>)> {
        let mut nodes = Vec::with_capacity(self.nodes.len().saturating_sub(1));
        let mut held = Vec::new();
        let mut names: BTreeMap<Ino, &OsStr> = BTreeMap::new();
        for node in &self.nodes {
            if let NodeKind::Dir(entries) = &node.kind {
                for (name, &ino) in entries {
                    names.insert(ino, name);
                }
            }
        }
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            let ino = i as Ino + 1;
            let name = names
                .get(&ino)
                .and_then(|n| n.to_str())
                .ok_or_else(|| std::io::Error::other(format!("inode {ino} has no UTF-8 name in the view")))?;
            let kind = match &node.kind {
                NodeKind::Dir(_) => NodeSnapshotKind::Dir,
                NodeKind::Symlink(target) => NodeSnapshotKind::Symlink(target.clone()),
                NodeKind::File(f) => {
                    held.push(&f.file);
                    NodeSnapshotKind::File(FileSnapshot {
                        view_path: f.view_path.clone(),
                        source: f.source.relative().to_owned(),
                        size: f.size,
                        mtime: since_epoch(f.mtime),
                        kind: f.kind,
                        soname: f.soname.clone(),
                        identity: identity(&f.file)?,
                    })
                }
            };
            nodes.push(NodeSnapshot {
                parent: node.parent,
                name: name.to_owned(),
                kind,
            });
        }
        let snapshot = ViewSnapshot {
            version: self.pin.version.to_string(),
            version_file: match &self.pin.source {
                crate::pin::VersionSource::ModuleFile(p) => Some(p.clone()),
                crate::pin::VersionSource::Override => None,
            },
            driver_root: self.driver_root.clone(),
            built: since_epoch(self.built),
            nodes,
        };
        Ok((snapshot, held))
    }

    /// The view a snapshot describes, node for node, over `files` (the
    /// descriptors `snapshot` gave, in order). Nothing is built by this
    /// build's rules; anything that does not fit (a parent that is not an
    /// earlier directory, a name taken twice, a descriptor that is not the
    /// recorded file) refuses the whole snapshot.
    pub fn restore(snapshot: ViewSnapshot, files: Vec<std::fs::File>) -> Result<View, String> {
        let wanted = snapshot
            .nodes
            .iter()
            .filter(|n| matches!(n.kind, NodeSnapshotKind::File(_)))
            .count();
        if wanted != files.len() {
            return Err(format!(
                "the snapshot lists {wanted} files but {} descriptors came with it",
                files.len()
            ));
        }
        let version = crate::pin::DriverVersion::parse(&snapshot.version)
            .ok_or_else(|| format!("the snapshot's version {:?} is not a driver version", snapshot.version))?;
        let pin = PinnedVersion {
            version,
            source: match snapshot.version_file {
                Some(p) => crate::pin::VersionSource::ModuleFile(p),
                None => crate::pin::VersionSource::Override,
            },
        };
        let mut view = View {
            pin,
            driver_root: snapshot.driver_root,
            nodes: vec![Node {
                parent: ROOT_INO,
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
            built: from_epoch(snapshot.built)?,
        };
        let mut files = files.into_iter();
        for (i, n) in snapshot.nodes.into_iter().enumerate() {
            let ino = i as Ino + 2;
            let name = OsString::from(&n.name);
            if n.name.is_empty() || n.name == "." || n.name == ".." || n.name.contains('/') {
                return Err(format!("inode {ino} has the name {:?}", n.name));
            }
            let kind = match n.kind {
                NodeSnapshotKind::Dir => NodeKind::Dir(BTreeMap::new()),
                NodeSnapshotKind::Symlink(target) => {
                    if target.is_absolute() {
                        return Err(format!("inode {ino} links to an absolute path"));
                    }
                    NodeKind::Symlink(target)
                }
                NodeSnapshotKind::File(f) => {
                    let file = files.next().ok_or("fewer descriptors than files")?;
                    let held = identity(&file).map_err(|e| format!("{}: {e}", f.view_path.display()))?;
                    if held != f.identity {
                        return Err(format!(
                            "the descriptor for {} is not the file that was held (device and inode {held:?}, \
                             recorded {:?})",
                            f.view_path.display(),
                            f.identity
                        ));
                    }
                    let library = match f.kind {
                        FileKind::Lib64 | FileKind::Lib32 => f
                            .view_path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .and_then(crate::catalog::parse_library_name)
                            .map(|l| l.spec),
                        _ => None,
                    };
                    NodeKind::File(Selected {
                        source: match f.kind {
                            FileKind::Generated => crate::hostroot::RootPath::root(),
                            _ => crate::hostroot::RootPath::from_relative(&f.source),
                        },
                        view_path: f.view_path,
                        file,
                        size: f.size,
                        mtime: from_epoch(f.mtime)?,
                        kind: f.kind,
                        library,
                        soname: f.soname,
                    })
                }
            };
            let parent = n.parent;
            let Some(Node {
                kind: NodeKind::Dir(entries),
                ..
            }) = (parent < ino)
                .then(|| view.nodes.get_mut((parent - 1) as usize))
                .flatten()
            else {
                return Err(format!("inode {ino}'s parent {parent} is not an earlier directory"));
            };
            if entries.insert(name, ino).is_some() {
                return Err(format!("inode {ino}: the name {:?} is taken twice in {parent}", n.name));
            }
            view.nodes.push(Node { parent, kind });
        }
        Ok(view)
    }
}
