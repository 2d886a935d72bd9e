//! `nvlibfs scan` against fake host drivers built by the fixture generator:
//! what is served, what is rejected and why, and that nothing outside the
//! driver root ever enters the view.

mod common;

use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use nvlibfs::view::{NodeKind, View};
use nvlibfs_fixture::{build, Fixture, FixtureSpec, Layout};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const PINNED: &str = "580.159.04";
const STALE: &str = "570.86.15";

fn fixture(dir: &tempfile::TempDir, spec: FixtureSpec) -> Fixture {
    build(&spec, &dir.path().join("host")).expect("fixture builds")
}

fn plan(f: &Fixture) -> nvlibfs::Plan {
    let pin = PinRequest::ModuleFile(f.module_version_file());
    nvlibfs::plan(&f.root, &pin, &KernelInfo::default()).expect("scan succeeds")
}

/// Runs the real CLI; returns (exit code, stdout, stderr).
fn nvlibfs(args: &[&str]) -> (i32, String, String) {
    nvlibfs_as(&mut Command::new(env!("CARGO_BIN_EXE_nvlibfs")), args)
}

fn nvlibfs_as(cmd: &mut Command, args: &[&str]) -> (i32, String, String) {
    let out = cmd.args(args).env_remove("NVLIBFS_LOG").output().expect("nvlibfs runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nvlibfs scan --json` on the fixture, run under `wrapper` (a command
/// prefix) if given.
fn scan_json(f: &Fixture, wrapper: &[&str]) -> Value {
    let bin = env!("CARGO_BIN_EXE_nvlibfs");
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let version_file = f.module_version_file();
    let (code, stdout, stderr) = nvlibfs_as(
        &mut cmd,
        &[
            "scan",
            "--json",
            "--driver-root",
            f.root.to_str().unwrap(),
            "--module-version-file",
            version_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "scan failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    serde_json::from_str(&stdout).expect("scan --json prints JSON")
}

fn rejected_reason<'a>(report: &'a Value, source: &str) -> Option<&'a str> {
    report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == source)
        .and_then(|r| r["reason"].as_str())
}

fn host(rel: &Path) -> String {
    format!("/{}", rel.display())
}

fn view_files(view: &View) -> BTreeSet<PathBuf> {
    view.walk()
        .into_iter()
        .filter(|(_, ino)| matches!(view.node(*ino).unwrap().kind, NodeKind::File(_)))
        .map(|(p, _)| p)
        .collect()
}

fn link_target(view: &View, path: &str) -> Option<PathBuf> {
    match &view.node(view.lookup_path(Path::new(path))?)?.kind {
        NodeKind::Symlink(t) => Some(t.clone()),
        _ => None,
    }
}

/// Pinned and stale versions side by side, plus a stray library: the view
/// holds exactly the pinned version's files, with the loader's links.
fn pinned_among_stale(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(
        &dir,
        FixtureSpec {
            layout,
            stale: Some(STALE.into()),
            lib32: true,
            stray: true,
            ..FixtureSpec::new(PINNED)
        },
    );
    let plan = plan(&f);
    let view = &plan.view;
    assert_eq!(view.pin().version.as_str(), PINNED);

    let expected: BTreeSet<PathBuf> = f
        .libraries
        .iter()
        .map(|l| l.view_path.clone())
        .chain(f.others.iter().map(|(_, v)| v.clone()))
        // The view's own loader cache, for tools that take it as a driver root.
        .chain([PathBuf::from("etc/ld.so.cache")])
        .collect();
    assert_eq!(view_files(view), expected);

    for lib in &f.libraries {
        let dir = lib.view_path.parent().unwrap();
        let file = lib.view_path.file_name().unwrap();
        if lib.soname != file.to_str().unwrap() {
            let soname = dir.join(&lib.soname);
            assert_eq!(
                link_target(view, soname.to_str().unwrap()).as_deref(),
                Some(Path::new(file)),
                "{soname:?}"
            );
        }
        let dev = dir.join(format!("{}.so", lib.name));
        assert!(link_target(view, dev.to_str().unwrap()).is_some(), "{dev:?} missing");
    }
    assert_eq!(
        link_target(view, "lib64/libGLX_indirect.so.0").as_deref(),
        Some(Path::new("libGLX_nvidia.so.580.159.04"))
    );
    for (path, ino) in view.walk() {
        if let NodeKind::Symlink(target) = &view.node(ino).unwrap().kind {
            assert!(target.is_relative(), "{path:?} -> {target:?}");
            assert!(follow(view, ino, &path).is_some(), "{path:?} -> {target:?} dangles");
        }
    }

    let rejected: Vec<(String, &str)> = plan
        .rejected
        .iter()
        .map(|r| (r.source.clone(), r.reason.code()))
        .collect();
    for lib in &f.stale_libraries {
        let source = host(&lib.host_path);
        assert!(
            rejected.contains(&(source.clone(), "other_version")),
            "{source} not rejected as other_version"
        );
    }
    let stray = host(f.stray.as_ref().unwrap());
    assert!(
        rejected.contains(&(stray.clone(), "unknown_name")),
        "{stray} not rejected: {rejected:?}"
    );
    let stale_firmware = format!("/lib/firmware/nvidia/{STALE}");
    assert!(rejected.contains(&(stale_firmware, "other_version")));
}

/// Follows a view node at `path` through links to a non-link; None if it dangles.
fn follow(view: &View, mut ino: u64, path: &Path) -> Option<u64> {
    let mut path = path.to_owned();
    for _ in 0..8 {
        match &view.node(ino)?.kind {
            NodeKind::Symlink(t) => {
                // Resolve `..` lexically: the view's links never lead through another link.
                let mut resolved = PathBuf::new();
                for part in path.parent()?.join(t).components() {
                    match part {
                        std::path::Component::ParentDir => {
                            resolved.pop();
                        }
                        other => resolved.push(other),
                    }
                }
                path = resolved;
                ino = view.lookup_path(&path)?;
            }
            _ => return Some(ino),
        }
    }
    None
}

#[test]
fn distro_layout_serves_exactly_the_pinned_version() {
    common::require_fixture_tools();
    pinned_among_stale(Layout::Distro);
}

#[test]
fn driver_tree_layout_serves_exactly_the_pinned_version() {
    common::require_fixture_tools();
    pinned_among_stale(Layout::DriverTree);
}

#[test]
fn hostile_driver_directories_are_rejected_with_reasons() {
    common::require_fixture_tools();
    common::require("setpriv", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(
        &dir,
        FixtureSpec {
            hostile: true,
            ..FixtureSpec::new(PINNED)
        },
    );
    assert!(f.hostile.len() >= 9);

    // As root without the capabilities that bypass file permissions, so the
    // mode-000 trap really is unreadable.
    let report = scan_json(
        &f,
        &[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-dac_override,-dac_read_search",
        ],
    );
    for trap in &f.hostile {
        let source = host(&trap.host_path);
        assert_eq!(
            rejected_reason(&report, &source),
            Some(trap.reason),
            "{} ({source})",
            trap.what
        );
    }
    let served: Vec<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for trap in &f.hostile {
        let name = trap.host_path.file_name().unwrap().to_str().unwrap();
        assert!(!served.iter().any(|p| p.ends_with(name)), "{name} served");
    }

    // The files a view holds open: none is the secret or the library outside the root.
    let plan = plan(&f);
    let identity = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).unwrap();
    let forbidden = [
        identity(&f.root.join("etc/shadow")),
        identity(
            &f.outside
                .as_ref()
                .unwrap()
                .join(format!("libnvidia-pkcs11.so.{PINNED}")),
        ),
    ];
    let mut count = 0;
    for (path, ino) in plan.view.walk() {
        if let NodeKind::File(file) = &plan.view.node(ino).unwrap().kind {
            let meta = file.file.metadata().unwrap();
            assert!(
                !forbidden.contains(&(meta.dev(), meta.ino())),
                "{path:?} serves a forbidden file"
            );
            let real = std::fs::canonicalize(f.root.join(file.source.relative())).unwrap();
            assert!(real.starts_with(&f.root), "{path:?} comes from {real:?}");
            count += 1;
        }
    }
    assert_eq!(
        count,
        f.libraries.len() + f.others.len() + 1,
        "every untouched file is still served"
    );
}

#[test]
fn scan_json_is_the_documented_interface() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(
        &dir,
        FixtureSpec {
            stale: Some(STALE.into()),
            ..FixtureSpec::new(PINNED)
        },
    );
    let report = scan_json(&f, &[]);
    assert_eq!(report["driver_version"], PINNED);
    let files = report["files"].as_array().unwrap();
    let cuda = files
        .iter()
        .find(|f| f["path"] == format!("lib64/libcuda.so.{PINNED}"))
        .expect("libcuda served");
    assert_eq!(cuda["source"], format!("/usr/lib/x86_64-linux-gnu/libcuda.so.{PINNED}"));
    assert_eq!(cuda["kind"], "lib64");
    assert_eq!(cuda["soname"], "libcuda.so.1");
    assert!(cuda["size"].as_u64().unwrap() > 0);
    let links = report["symlinks"].as_array().unwrap();
    assert!(links
        .iter()
        .any(|l| l["path"] == "lib64/libcuda.so.1" && l["target"] == format!("libcuda.so.{PINNED}")));
    let stale = format!("/usr/lib/x86_64-linux-gnu/libcuda.so.{STALE}");
    assert_eq!(rejected_reason(&report, &stale), Some("other_version"));
    let entry = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == stale)
        .unwrap();
    assert!(entry["detail"].as_str().unwrap().contains(STALE));
}

#[test]
fn human_output_names_the_pin_and_the_reasons() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(
        &dir,
        FixtureSpec {
            stale: Some(STALE.into()),
            ..FixtureSpec::new(PINNED)
        },
    );
    let vf = f.module_version_file();
    let (code, out, _) = nvlibfs(&[
        "scan",
        "--driver-root",
        f.root.to_str().unwrap(),
        "--module-version-file",
        vf.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("Driver version {PINNED} (pinned from {})", vf.display())),
        "{out}"
    );
    assert!(out.contains(&format!("lib64/libcuda.so.{PINNED}")), "{out}");
    assert!(
        out.contains(&format!("libcuda.so.{STALE}: other version {STALE}")),
        "{out}"
    );
}

#[test]
fn the_procfs_format_pins_too() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(
        &dir,
        FixtureSpec {
            stale: Some(STALE.into()),
            ..FixtureSpec::new(PINNED)
        },
    );
    let pin = PinRequest::ModuleFile(f.root.join("proc/driver/nvidia/version"));
    let plan = nvlibfs::plan(&f.root, &pin, &KernelInfo::default()).unwrap();
    assert_eq!(plan.view.pin().version.as_str(), PINNED);
    // --driver-version overrides whatever is on disk: here nothing matches,
    // neither the version the module file names nor the stale one.
    let pin = PinRequest::Version("999.1.1".into());
    let plan = nvlibfs::plan(&f.root, &pin, &KernelInfo::default()).unwrap();
    let served: Vec<String> = plan.view.manifest().files.into_iter().map(|f| f.path).collect();
    assert!(
        served
            .iter()
            .all(|p| !p.contains(PINNED) && !p.contains(STALE) && !p.contains("libcuda")),
        "served with nothing of version 999.1.1 on disk: {served:?}"
    );
    // Both versions' libcuda were found, and each refused for its version.
    for version in [PINNED, STALE] {
        let name = format!("libcuda.so.{version}");
        assert!(
            plan.rejected
                .iter()
                .any(|r| r.source.ends_with(&name) && r.reason.code() == "other_version"),
            "{name} not rejected as another version: {:?}",
            plan.rejected
        );
    }
}

#[test]
fn bad_pins_and_roots_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("version");
    std::fs::write(&bad, "not-a-version\n").unwrap();
    let (code, _, err) = nvlibfs(&["scan", "--module-version-file", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(bad.to_str().unwrap()) && err.contains("not-a-version"),
        "{err}"
    );

    let missing = dir.path().join("absent");
    let (code, _, err) = nvlibfs(&["scan", "--module-version-file", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    let (code, _, err) = nvlibfs(&[
        "scan",
        "--driver-version",
        "1.2.3",
        "--driver-root",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--driver-root") && err.contains(missing.to_str().unwrap()),
        "{err}"
    );

    let (code, _, err) = nvlibfs(&[
        "scan",
        "--driver-version",
        "1.2.3",
        "--module-version-file",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "the two pins conflict: {err}");

    if !Path::new("/sys/module/nvidia").exists() && !Path::new("/proc/driver/nvidia").exists() {
        let (code, _, err) = nvlibfs(&["scan"]);
        assert_eq!(code, 1);
        assert!(
            err.contains("no NVIDIA kernel module") && err.contains("--driver-version"),
            "{err}"
        );
    }
}

/// Our parser against glibc's own reader of the same cache.
#[test]
fn ld_cache_parser_agrees_with_ldconfig() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(
        &dir,
        FixtureSpec {
            lib32: true,
            ..FixtureSpec::new(PINNED)
        },
    );
    for cache in [f.root.join("etc/ld.so.cache"), PathBuf::from("/etc/ld.so.cache")] {
        if !cache.exists() {
            continue;
        }
        let ours: BTreeSet<(String, String)> = nvlibfs::ldcache::parse(&std::fs::read(&cache).unwrap())
            .unwrap()
            .into_iter()
            .map(|e| (e.soname, e.path.display().to_string()))
            .collect();
        let out = Command::new("ldconfig")
            .arg("-p")
            .arg("-C")
            .arg(&cache)
            .output()
            .unwrap();
        let theirs: BTreeSet<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (left, path) = l.split_once(" => ")?;
                let soname = left.trim().split(' ').next()?;
                Some((soname.to_owned(), path.trim().to_owned()))
            })
            .collect();
        assert!(!theirs.is_empty(), "ldconfig -p printed nothing for {cache:?}");
        assert_eq!(ours, theirs, "{cache:?}");
    }
    let ours = nvlibfs::ldcache::parse(&std::fs::read(f.root.join("etc/ld.so.cache")).unwrap()).unwrap();
    // ldconfig writes entries in the order ld.so's binary search needs;
    // our comparator must agree, since the view writes its own cache with it.
    for pair in ours.windows(2) {
        assert_ne!(
            nvlibfs::ldcache::libcmp(&pair[0].soname, &pair[1].soname),
            std::cmp::Ordering::Less,
            "{} before {}",
            pair[0].soname,
            pair[1].soname
        );
    }
    assert!(ours.iter().any(|e| e.soname == "libcuda.so.1"));
}
