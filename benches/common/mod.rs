//! What the benches share: finding the nvlibfs they measure and mounting a
//! fixture driver with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The `nvlibfs` cargo built beside this bench.
pub fn nvlibfs_near_bench() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("nvlibfs"))
        .find(|p| p.is_file())
}

/// `nvlibfs mount` of a fixture driver at `mnt`, pinned by its own module
/// version file; panics with the reason if it fails.
pub fn mount_fixture(nvlibfs: &Path, fixture: &nvlibfs_fixture::Fixture, state: &Path, mnt: &Path, extra: &[&str]) {
    let status = Command::new(nvlibfs)
        .args(["mount", "--driver-root"])
        .arg(&fixture.root)
        .arg("--module-version-file")
        .arg(fixture.module_version_file())
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .arg(mnt)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "nvlibfs mount failed");
}
