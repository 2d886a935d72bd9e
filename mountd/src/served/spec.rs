//! The CDI spec served at `etc/cdi`: its state, and the answers about it.

use super::*;

impl Served {
    pub(super) fn spec(&self) -> Option<Arc<Spec>> {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn spec_entry(&self) -> Option<Entry> {
        let spec = self.spec()?;
        Some(Entry {
            attr: Attr {
                ino: SPEC_INO,
                node_type: nvlibfs::view::NodeType::File,
                size: spec.file.size,
                perm: FileKind::Generated.perm(),
                nlink: 1,
                mtime: spec.file.mtime,
            },
            generation: 0,
        })
    }

    /// Every live generation's `etc/cdi` in the kernel: its name in
    /// `etc` (parent, itself, "cdi"), where the spec is named.
    pub fn spec_dirs(&self) -> Vec<Deletion> {
        let generations = self.lock();
        (generations.live.values())
            .filter_map(|l| {
                let g = &l.generation;
                let dir = g.spec_dir?;
                Some(Deletion {
                    parent: g.kernel_ino(g.view.node(dir)?.parent),
                    child: g.kernel_ino(dir),
                    name: std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR)
                        .file_name()?
                        .to_owned(),
                })
            })
            .collect()
    }

    /// The spec served now, for comparing with a new one.
    pub fn spec_contents(&self) -> Option<Vec<u8>> {
        self.spec().map(|s| s.contents.clone())
    }

    /// Serves `contents` as the CDI spec from now on. The caller then has
    /// the kernel drop what it cached of `SPEC_INO`.
    pub fn set_spec(&self, contents: &[u8]) -> std::io::Result<()> {
        let path = std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR).join(nvlibfs::cdi::VIEW_SPEC_NAME);
        let file = nvlibfs::select::Selected::generated(path, contents)?;
        let new = Arc::new(Spec {
            file,
            contents: contents.to_vec(),
        });
        *self.spec.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
        self.spec_version.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// The mount's CDI spec, beside the generations rather than in them: it
/// follows the device nodes, which come and go without a driver change
/// (`nvidia-uvm` appears at the first CUDA use after boot), so a new spec
/// is no new generation: no files registered again, no cached names
/// dropped, no warmed page cache lost. Every generation's `etc/cdi` names
/// it, at `SPEC_INO`; its lookups are not counted (it belongs to no
/// generation), and a new one makes the kernel drop what it cached of
/// that inode. Always read through the daemon and the page cache, never
/// passed through: the kernel ties one backing file to an inode for as
/// long as any of its opens lasts, and a new spec is another file.
pub(super) struct Spec {
    /// A sealed memfd.
    pub(super) file: nvlibfs::select::Selected,
    pub(super) contents: Vec<u8>,
}

/// What a checkpoint says of the spec; its memfd travels beside it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecState {
    /// Its time, as `stat` shows it (seconds, nanoseconds since the epoch).
    pub mtime: (u64, u32),
    /// How many specs have been served (see `Generation::entry`).
    pub version: u64,
}

/// The spec a checkpoint names, over the memfd that came with it: sealed,
/// so its contents are what was served.
pub(super) fn restore_spec(state: &SpecState, file: std::fs::File) -> std::io::Result<Spec> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GET_SEALS)?);
    if !seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
        return Err(std::io::Error::other("its memfd is not sealed"));
    }
    let size = file.metadata()?.len();
    if size > 1 << 20 {
        return Err(std::io::Error::other(format!("a spec of {size} bytes")));
    }
    // At its start: the memfd's offset is shared with whoever wrote it.
    let mut contents = vec![0u8; size as usize];
    file.read_exact_at(&mut contents, 0)?;
    let (secs, nanos) = state.mtime;
    let mtime = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::new(secs, nanos.min(999_999_999)))
        .ok_or_else(|| std::io::Error::other("its time is out of range"))?;
    let path = std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR).join(nvlibfs::cdi::VIEW_SPEC_NAME);
    Ok(Spec {
        file: nvlibfs::select::Selected {
            view_path: path,
            source: nvlibfs::hostroot::RootPath::root(),
            file,
            size,
            mtime,
            kind: FileKind::Generated,
            library: None,
            soname: None,
        },
        contents,
    })
}
