//! Container start with Docker 26: the NVIDIA Container Toolkit's spec
//! (its hooks run by nvidia-cdi-hook), nvlibfs's spec, and the driver
//! baked into the image, on the fixture driver (100 MB libcuda, two GPUs'
//! device nodes). Builds what benches/toolkit-start.sh needs (Debian 13
//! with Docker 26, the image's Debian root, the toolkit, the fixture),
//! cached as the tests cache them, and runs it; its report is printed and
//! left in target/toolkit-start/toolkit-start.md. Needs root.
//!
//!   cargo bench --bench toolkit_start

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use nvlibfs_fixture::{gpus, FixtureSpec};
use std::path::Path;
use std::process::Command;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    common::require_fixture_tools();
    common::require("unshare", "util-linux");
    common::images::require_image_tools();
    let docker26 = common::images::docker26_rootfs().unwrap_or_else(|e| panic!("Debian 13 with Docker 26: {e}"));
    let image = common::images::inner_rootfs().unwrap_or_else(|e| panic!("the image's root: {e}"));
    let toolkit = common::toolkit::toolkit().unwrap_or_else(|e| panic!("the NVIDIA Container Toolkit: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        libcuda_bytes: 100 << 20,
        gpus: gpus(2, false),
        device_nodes: true,
        ..FixtureSpec::new(common::VERSION)
    };
    let fixture = nvlibfs_fixture::build(&spec, &dir.path().join("host")).expect("fixture builds");
    let bin = common::builds::binaries(dir.path());
    nvlibfs_fixture::build_loader(&bin).expect("the loader builds");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("toolkit-start");
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/toolkit-start.sh"))
        .arg(&docker26)
        .arg(&image)
        .arg(&bin)
        .arg(&toolkit)
        .arg(&fixture.root)
        .arg(&out)
        .arg("--driver-root")
        .arg(&fixture.root)
        .arg("--module-version-file")
        .arg(fixture.module_version_file())
        .status()
        .unwrap();
    assert!(status.success(), "benches/toolkit-start.sh failed");
    eprintln!("report: {}", out.join("toolkit-start.md").display());
}
