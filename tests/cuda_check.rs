//! The project's CUDA check program (contrib/cuda-check), in the part that
//! needs no GPU: it builds, fails as it should where no driver is (the
//! control a container without the view is), and through a real mount
//! loads the view's libcuda.so.1 (here the fixture's, which it refuses by
//! name because it has no driver API). On a GPU it runs a kernel:
//! benches/gpu-cuda-check.sh.

mod common;

use common::{Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::process::Command;

#[test]
fn the_cuda_check_builds_and_tells_no_driver_from_the_views() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let check = common::build_cuda_check(m.dir.path());

    // No libcuda.so.1 anywhere the loader looks.
    let out = Command::new(&check).env_remove("LD_LIBRARY_PATH").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no CUDA driver"), "{err}");

    // The view's: the fixture libcuda, which has no driver API.
    let out = Command::new(&check)
        .env("LD_LIBRARY_PATH", m.mountpoint.join("lib64"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&m.mountpoint.join("lib64/libcuda.so.1").display().to_string()),
        "{err}"
    );
    assert!(err.contains("has no cuInit"), "{err}");
}
