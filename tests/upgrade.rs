//! Driver upgrades under a running mount: the package manager replaces the
//! files on disk while the old module stays loaded, then the module is
//! reloaded. New loads must always get the files that match the loaded
//! module; processes that mapped the old ones keep working.

mod common;

use common::{drop_caches, ok, wait_for, walk_files, Holder, Mounted, SERIAL, VERSION};
use nvlibfs::control::Status;
use nvlibfs_fixture::{build, Fixture, FixtureSpec};
use std::path::{Path, PathBuf};
use std::process::Command;

const NEW: &str = "590.48.01";
const MISSING: &str = "595.10.02";

/// What dpkg does: each new file is written beside its target and renamed
/// into place, the old version's files are unlinked, and ldconfig repoints
/// the SONAME links. The module version files (sys/, proc/) are the
/// kernel's and stay as they are.
fn dpkg_upgrade(root: &Path, old: &Fixture, new: &Fixture) {
    unpack(root, new, |_| true);
    // `old` describes the previous version's files by their paths under any root.
    for lib in old.libraries.iter().filter(|l| l.version == old.version) {
        std::fs::remove_file(root.join(&lib.host_path)).unwrap();
    }
    std::fs::remove_dir_all(root.join("lib/firmware/nvidia").join(&old.version)).unwrap();
    ok(
        Command::new("ldconfig").arg("-r").arg(root).output().unwrap(),
        "ldconfig -r",
    );
}

/// Unpacks those of `new`'s files under `root` that `only` takes (by
/// their path below the root), each as dpkg does: written beside, then
/// renamed over.
fn unpack(root: &Path, new: &Fixture, only: impl Fn(&Path) -> bool) {
    for file in walk_files(&new.root) {
        let rel = file.strip_prefix(&new.root).unwrap();
        if rel.starts_with("sys") || rel.starts_with("proc") || rel.starts_with("etc/ld.so.cache") || !only(rel) {
            continue;
        }
        let target = root.join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let staged = target.with_extension("dpkg-new");
        std::fs::copy(&file, &staged).unwrap();
        std::fs::rename(&staged, &target).unwrap();
    }
}

/// The version a fresh process gets for `libcuda.so.1` through the mount.
fn loaded_version(m: &Mounted) -> Option<String> {
    let out = Command::new(&m.loader)
        .env("LD_LIBRARY_PATH", m.mountpoint.join("lib64"))
        .arg("libcuda.so.1")
        .output()
        .unwrap();
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    })
}

/// `nvlibfs check` against the mount: (exit 0, what it printed).
fn check(m: &Mounted) -> (bool, String) {
    let out = common::nvlibfs()
        .args(["check", "--driver-root"])
        .arg(&m.fixture.root)
        .arg("--module-version-file")
        .arg(m.fixture.module_version_file())
        .arg("--state-dir")
        .arg(&m.state_dir)
        .arg("--mountpoint")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_module_version(m: &Mounted, version: &str) {
    std::fs::write(m.fixture.module_version_file(), format!("{version}\n")).unwrap();
}

#[test]
fn upgrades_keep_the_pinned_files_then_follow_the_module() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let work = tempfile::tempdir().unwrap();
    let new = build(&FixtureSpec::new(NEW), &work.path().join("new")).unwrap();
    let pinned_libcuda = std::fs::read(m.libcuda().0).unwrap();
    assert_eq!(loaded_version(&m).as_deref(), Some(VERSION));

    // A process that maps every library before anything changes.
    let expected = m.lib64();
    let libs: Vec<PathBuf> = expected.iter().map(|(p, _)| p.clone()).collect();
    let (holder, loaded) = Holder::start(&m.loader, &libs);
    for ((_, version), line) in expected.iter().zip(loaded.lines()) {
        assert!(line.ends_with(&format!(" {version}")), "{line}");
    }

    // The package manager installs NEW; the old module is still loaded.
    dpkg_upgrade(&m.fixture.root, &m.fixture, &new);
    assert_eq!(
        loaded_version(&m).as_deref(),
        Some(VERSION),
        "new loads must keep the pinned version"
    );
    for (path, version) in m.lib64() {
        assert!(version == VERSION || version == "1.1.13");
        assert!(path.exists(), "{path:?} vanished from the view");
    }
    let served = std::fs::read(m.mountpoint.join(format!("lib64/libcuda.so.{VERSION}"))).unwrap();
    assert!(served == pinned_libcuda, "the held libcuda differs from the pinned one");
    let status = m.status();
    assert_eq!(status.driver_version, VERSION);
    assert!(status.held_files_replaced_on_disk >= 30, "{status:?}");
    let (healthy, report) = check(&m);
    assert!(healthy, "{report}");
    assert!(report.contains(&format!("newer on disk ({NEW})")), "{report}");
    assert!(report.contains("served files were replaced on disk"), "{report}");

    // The module is reloaded at the new version: the view follows.
    set_module_version(&m, NEW);
    let took = wait_for("the re-pin to the new version", || {
        loaded_version(&m).as_deref() == Some(NEW)
    });
    eprintln!(
        "re-pinned to {NEW} {:.0} ms after the module version changed",
        took.as_secs_f64() * 1e3
    );
    let status: Status = m.status();
    assert_eq!((status.driver_version.as_str(), status.generation), (NEW, 1));
    assert_eq!(status.held_files_replaced_on_disk, 0);
    assert!(status.pin_problem.is_none());
    let smi = ok(
        Command::new(m.mountpoint.join("bin/nvidia-smi")).output().unwrap(),
        "nvidia-smi after the re-pin",
    );
    assert!(smi.contains(&format!("Driver Version: {NEW}")), "{smi}");
    assert!(m
        .mountpoint
        .join(format!("firmware/nvidia/{NEW}/gsp_ga10x.bin"))
        .exists());
    assert!(!m.mountpoint.join(format!("firmware/nvidia/{VERSION}")).exists());

    // The process that mapped the old files keeps working, even with the
    // page cache dropped: its mappings are of the held old files.
    drop_caches();
    let rest = holder.release();
    for ((path, version), line) in expected.iter().zip(rest.lines()) {
        let words: Vec<&str> = line.split(' ').take(3).collect();
        assert_eq!(words, ["after", path.to_str().unwrap(), version.as_str()], "{rest}");
    }

    // Once nothing uses the old generation, its held files are released.
    drop_caches();
    wait_for("the old generation's release", || m.status().retired_generations == 0);

    // A module whose files are not on disk: nothing is served rather than
    // the wrong version, and status says why; the files' arrival re-pins.
    set_module_version(&m, MISSING);
    wait_for("the view to empty", || loaded_version(&m).is_none());
    let status = m.status();
    assert!(
        status.pin_problem.as_deref().is_some_and(|p| p.contains(MISSING)),
        "{status:?}"
    );
    assert_eq!(status.files, 0, "nothing of the driver: {status:?}");
    assert!(
        m.mountpoint.join("etc/cdi/nvlibfs.json").is_file(),
        "the CDI spec, beside the generations, is still there"
    );
    // They arrive as apt unpacks them, package by package: libcuda's
    // last, after the daemon has pinned what came first. What it pinned
    // then must grow by libcuda, not stay without it until the module
    // changes again.
    let missing = build(&FixtureSpec::new(MISSING), &work.path().join("missing")).unwrap();
    let libcuda = |rel: &Path| {
        rel.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libcuda."))
    };
    unpack(&m.fixture.root, &missing, |rel| !libcuda(rel));
    wait_for("the re-pin once the first files appear", || {
        m.status().pin_problem.is_none()
    });
    assert_eq!(loaded_version(&m), None, "libcuda is not there yet");
    dpkg_upgrade(&m.fixture.root, &new, &missing);
    wait_for("libcuda, which came later, to be served", || {
        loaded_version(&m).as_deref() == Some(MISSING)
    });
    assert_eq!(m.status().driver_version, MISSING);
}
