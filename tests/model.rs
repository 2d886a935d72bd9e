//! Reference-model test: random driver trees (names, versions, aliases,
//! traps, strays) against a simple model of what scan must select and of
//! what readdir, readlink and stat must show through a real mount.

mod common;

use common::{mount_root_command, umount, SERIAL};
use nvlibfs::catalog::{Versioning, LIBRARIES};
use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use nvlibfs_fixture::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::symlink;
use std::path::Path;

const PINNED: &str = "580.159.04";
const OTHER: &str = "570.86.15";
const SHARED: &str = "usr/lib/x86_64-linux-gnu";
const TREE: &str = "usr/local/nvidia/lib64";
const TREES: u64 = 24;

/// How one library appears on the random host.
#[derive(Clone, Copy, Debug)]
enum Shape {
    PinnedShared,
    PinnedTree,
    /// In the driver tree, plus an absolute alias link in the shared dir.
    PinnedTreeWithAlias,
    OtherOnly,
    PinnedAndOther,
    LinkToSecret,
    TextFile,
    LinkOutOfRoot,
    Loop,
}

const SHAPES: [Shape; 9] = [
    Shape::PinnedShared,
    Shape::PinnedTree,
    Shape::PinnedTreeWithAlias,
    Shape::OtherOnly,
    Shape::PinnedAndOther,
    Shape::LinkToSecret,
    Shape::TextFile,
    Shape::LinkOutOfRoot,
    Shape::Loop,
];

/// What the model says the view holds: files (path -> size) and links.
#[derive(Debug, Default, PartialEq)]
struct Model {
    files: BTreeMap<String, u64>,
    links: BTreeMap<String, String>,
    rejected: BTreeSet<(String, &'static str)>,
}

/// Prebuilt libraries: (name, version) -> (file, SONAME, bytes).
type Pool = BTreeMap<(&'static str, &'static str), (String, String, Vec<u8>)>;

fn pool(dir: &Path) -> Pool {
    let mut pool = Pool::new();
    for spec in LIBRARIES
        .iter()
        .filter(|s| s.versioning == Versioning::Driver && s.subdir.is_none())
    {
        for version in [PINNED, OTHER] {
            let (file, soname) = nvlibfs_fixture::write_library(dir, spec, version).unwrap();
            let bytes = std::fs::read(dir.join(&file)).unwrap();
            pool.insert((spec.name, version), (file, soname, bytes));
        }
    }
    pool
}

/// Builds a random host under `root` and the model of its view.
fn random_host(rng: &mut Rng, root: &Path, pool: &Pool) -> Model {
    let mut model = Model::default();
    for dir in [SHARED, TREE, "etc", "sys/module/nvidia"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("etc/secret"), "not a library\n").unwrap();
    std::fs::write(root.join("sys/module/nvidia/version"), format!("{PINNED}\n")).unwrap();
    let put = |dir: &str, name: &str, version: &'static str| -> String {
        let (file, _, bytes) = &pool[&(name, version)];
        std::fs::write(root.join(dir).join(file), bytes).unwrap();
        file.clone()
    };
    for spec in LIBRARIES
        .iter()
        .filter(|s| s.versioning == Versioning::Driver && s.subdir.is_none())
    {
        // About a third of the catalog is absent on any given host.
        if rng.below(3) == 0 {
            continue;
        }
        let shape = SHAPES[rng.below(SHAPES.len() as u64) as usize];
        let (pinned_file, soname, bytes) = &pool[&(spec.name, PINNED)];
        let served = match shape {
            Shape::PinnedShared => {
                put(SHARED, spec.name, PINNED);
                true
            }
            Shape::PinnedTree => {
                put(TREE, spec.name, PINNED);
                true
            }
            Shape::PinnedTreeWithAlias => {
                put(TREE, spec.name, PINNED);
                let alias = format!("{SHARED}/{soname}");
                symlink(format!("/{TREE}/{pinned_file}"), root.join(&alias)).unwrap();
                model.rejected.insert((format!("/{alias}"), "duplicate"));
                true
            }
            Shape::OtherOnly | Shape::PinnedAndOther => {
                let other = put(SHARED, spec.name, OTHER);
                model.rejected.insert((format!("/{SHARED}/{other}"), "other_version"));
                if matches!(shape, Shape::PinnedAndOther) {
                    put(TREE, spec.name, PINNED);
                }
                matches!(shape, Shape::PinnedAndOther)
            }
            Shape::LinkToSecret | Shape::TextFile | Shape::LinkOutOfRoot | Shape::Loop => {
                let at = root.join(SHARED).join(pinned_file);
                let code = match shape {
                    Shape::LinkToSecret => {
                        symlink("../../../etc/secret", &at).unwrap();
                        "unknown_name"
                    }
                    Shape::TextFile => {
                        std::fs::write(&at, "text\n").unwrap();
                        "not_elf"
                    }
                    Shape::LinkOutOfRoot => {
                        symlink("../../../../../../../../etc/passwd", &at).unwrap();
                        "leaves_root"
                    }
                    _ => {
                        let partner = format!(".loop-{}", spec.name);
                        symlink(pinned_file, root.join(SHARED).join(&partner)).unwrap();
                        symlink(&partner, &at).unwrap();
                        "symlink_loop"
                    }
                };
                model.rejected.insert((format!("/{SHARED}/{pinned_file}"), code));
                false
            }
        };
        if served {
            model.files.insert(format!("lib64/{pinned_file}"), bytes.len() as u64);
            if soname != pinned_file {
                model.links.insert(format!("lib64/{soname}"), pinned_file.clone());
            }
            let dev = format!("{}.so", spec.name);
            if &dev != soname {
                model.links.insert(format!("lib64/{dev}"), soname.clone());
            }
            if spec.name == "libGLX_nvidia" {
                model
                    .links
                    .insert("lib64/libGLX_indirect.so.0".into(), pinned_file.clone());
            }
            if spec.name == "libnvidia-allocator" {
                model
                    .links
                    .insert("lib64/gbm/nvidia-drm_gbm.so".into(), format!("../{soname}"));
            }
        }
    }
    // The host-style mirror every view carries, for tools that take a driver root.
    for (path, target) in [
        ("usr/lib/x86_64-linux-gnu", "../../lib64"),
        ("usr/lib/i386-linux-gnu", "../../lib"),
        ("usr/lib64", "../lib64"),
        ("usr/bin", "../bin"),
        ("usr/share", "../share"),
        ("lib/firmware", "../firmware"),
    ] {
        model.links.insert(path.into(), target.into());
    }
    // Strays: ignored among the distribution's libraries, reported in the driver tree.
    let stray = rng.below(1000);
    std::fs::write(root.join(SHARED).join(format!("libfoo{stray}.so.1")), "x").unwrap();
    std::fs::write(root.join(TREE).join(format!("libstray{stray}.so")), "x").unwrap();
    model
        .rejected
        .insert((format!("/{TREE}/libstray{stray}.so"), "unknown_name"));
    model
}

/// The view as scan plans it, in the model's terms.
fn planned(root: &Path) -> Model {
    let pin = PinRequest::ModuleFile(root.join("sys/module/nvidia/version"));
    let plan = nvlibfs::plan(root, &pin, &KernelInfo::default()).unwrap();
    let m = plan.view.manifest();
    Model {
        files: m.files.into_iter().map(|f| (f.path, f.size)).collect(),
        links: m.symlinks.into_iter().map(|l| (l.path, l.target)).collect(),
        rejected: plan
            .rejected
            .iter()
            .map(|r| (r.source.clone(), r.reason.code()))
            .collect(),
    }
}

/// The view as a mount shows it, walked with readdir, readlink and stat.
fn walked(live: &Path) -> Model {
    let mut model = Model::default();
    let mut stack = vec![live.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(live).unwrap().to_str().unwrap().to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                model
                    .links
                    .insert(rel, std::fs::read_link(&path).unwrap().to_str().unwrap().to_owned());
            } else {
                model.files.insert(rel, meta.len());
            }
        }
    }
    model
}

#[test]
fn random_driver_trees_match_the_model_in_scan_and_through_a_mount() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let pool = pool(&work.path().join("pool"));
    for seed in 1..=TREES {
        let mut rng = Rng(0x9E37_79B9 ^ seed.wrapping_mul(0x1234_5678_9ABC));
        let root = work.path().join(format!("host-{seed}"));
        let expected = random_host(&mut rng, &root, &pool);

        let mut plan = planned(&root);
        // The view's generated loader cache: there exactly when libraries are.
        assert_eq!(
            plan.files.remove("etc/ld.so.cache").is_some(),
            !expected.files.is_empty(),
            "seed {seed}"
        );
        assert_eq!(plan.files, expected.files, "seed {seed}: served files");
        assert_eq!(plan.links, expected.links, "seed {seed}: symlinks");
        let missing: Vec<_> = expected.rejected.difference(&plan.rejected).collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: not rejected as expected: {missing:?}\ngot {:?}",
            plan.rejected
        );

        let mountpoint = work.path().join(format!("mnt-{seed}"));
        let state = work.path().join("state");
        let out = mount_root_command(&root, &state).arg(&mountpoint).output().unwrap();
        let mounted = out.status.success();
        let seen = mounted.then(|| walked(&mountpoint.join(".live")));
        // Each file the host has but the view must not serve (another
        // version, a stray, a link to a secret...), looked up by its own
        // name in the view: not readdir's list, the lookup itself.
        let found: Vec<String> = expected
            .rejected
            .iter()
            .map(|(source, _)| format!("lib64/{}", source.rsplit('/').next().unwrap()))
            .filter(|rel| !expected.files.contains_key(rel) && !expected.links.contains_key(rel))
            .filter(|rel| match std::fs::symlink_metadata(mountpoint.join(rel)) {
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
                Ok(_) => true,
            })
            .collect();
        if mounted {
            umount(&mountpoint, &state);
        }
        if expected.files.is_empty() {
            // Nothing of the pinned version: the daemon refuses to mount.
            assert!(!mounted, "seed {seed}: mounted an empty driver");
            continue;
        }
        assert!(
            mounted,
            "seed {seed}: mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut seen = seen.unwrap();
        assert!(
            seen.files.remove("etc/ld.so.cache").is_some(),
            "seed {seed}: no loader cache through the mount"
        );
        assert!(
            seen.files.remove("etc/cdi/nvlibfs.json").is_some(),
            "seed {seed}: no CDI spec through the mount"
        );
        assert_eq!(seen.files, expected.files, "seed {seed}: files through the mount");
        assert_eq!(seen.links, expected.links, "seed {seed}: links through the mount");
        assert!(
            found.is_empty(),
            "seed {seed}: rejected files found by name in the view: {found:?}"
        );
    }
}
