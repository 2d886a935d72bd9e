//! tests/dind26/run.sh, the Docker 26 harness that runs on the GPU
//! machine with the real driver, run here against the fixture driver and
//! stand-in device nodes, in both its forms (Debian 13's dockerd,
//! containerd, runc and RootlessKit):
//!
//! - Docker-in-Docker: a dockerd on the host and one in the outer
//!   container, whose daemon.json has one line pointing CDI at the spec
//!   the view carries;
//! - rootless Docker: `dockerd-rootless.sh` run by uid 1000, that same
//!   line in its own `~/.config/docker/daemon.json`.
//!
//! Inner containers get the driver with `--device nvidia.com/gpu=all`
//! alone, as root and as uid 1000, and with plain flags; a control gets
//! nothing; and a device node added on the host reaches the CDI of the
//! dockerd running them with nothing restarted. The script checks each;
//! these tests also read its report as a user would.

mod common;

use common::images::{docker26_rootfs, require_image_tools};
use common::{require, require_fixture_tools, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::path::Path;
use std::process::Command;

#[test]
fn one_flag_gpus_inside_docker_in_docker_with_docker_26() {
    let report = run_harness("dind");
    assert!(report.contains("outer daemon.json"), "{report}");
}

#[test]
fn one_flag_gpus_in_rootless_docker_26_from_its_own_daemon_json() {
    let report = run_harness("rootless");
    assert!(
        report.contains("run by uid 1000 through `dockerd-rootless.sh`"),
        "{report}"
    );
    assert!(
        report.contains("name=rootless"),
        "the dockerd is not rootless:\n{report}"
    );
}

/// Runs tests/dind26/run.sh in `form` and checks what both forms report;
/// returns the report.
fn run_harness(form: &str) -> String {
    require_fixture_tools();
    require_image_tools();
    require("unshare", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = docker26_rootfs().unwrap_or_else(|e| panic!("debootstrapping Debian 13 with docker.io: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    // Stand-in device nodes: character devices 1:3, like /dev/null.
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    for name in ["nvidia0", "nvidiactl", "nvidia-uvm"] {
        common::ok(
            Command::new("mknod")
                .arg(dev.join(name))
                .args(["c", "1", "3"])
                .output()
                .unwrap(),
            "mknod",
        );
    }
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    common::nvlibfs(); // builds nvlibfs-mountd
    let built = Path::new(env!("CARGO_BIN_EXE_nvlibfs")).parent().unwrap();
    for name in ["nvlibfs", "nvlibfs-mountd"] {
        std::fs::copy(built.join(name), bin.join(name)).unwrap();
    }
    common::build_cuda_check(&bin);
    let mountpoint = format!("/run/nvlibfs-test-{form}26-{}", std::process::id());
    // run.sh unmounts whatever happens; the directory `nvlibfs mount` made
    // goes too, even when the test fails.
    struct RemoveDir(String);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _made = RemoveDir(mountpoint.clone());
    let out = dir.path().join("out");
    let run = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dind26/run.sh"))
        .arg(&rootfs)
        .arg(&bin)
        .arg(&out)
        .arg("--driver-root")
        .arg(&fixture.root)
        .arg("--module-version-file")
        .arg(fixture.module_version_file())
        .env("NVLIBFS_DIND_MOUNTPOINT", &mountpoint)
        .env("NVLIBFS_DIND_DEV", &dev)
        .env("NVLIBFS_DIND_EXPECT", "fixture")
        .env("NVLIBFS_DIND_FORM", form)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    let name = if form == "dind" { "dind26.md" } else { "rootless26.md" };
    let report = std::fs::read_to_string(out.join(name)).unwrap_or_default();
    assert!(run.status.success(), "run.sh failed ({}):\n{log}\n{report}", run.status);
    assert!(report.contains("All checks passed."), "{report}");
    let section = |title: &str| {
        let start = report
            .find(&format!("### {title}"))
            .unwrap_or_else(|| panic!("no section {title:?}:\n{report}"));
        let rest = &report[start..];
        rest[..rest[4..].find("###").map_or(rest.len(), |i| i + 4)].to_owned()
    };
    for title in ["CDI, root", "CDI, uid 1000"] {
        let s = section(title);
        assert!(s.contains("--device nvidia.com/gpu=all"), "{s}");
        assert!(s.contains(&format!("Driver Version: {VERSION}")), "{s}");
    }
    assert!(section("control").contains("no CUDA driver"), "{report}");
    assert!(report.contains(&format!("\"hostPath\": \"{mountpoint}\"")), "{report}");
    let logs = std::fs::read_dir(&out).unwrap().flatten();
    assert!(
        logs.into_iter()
            .any(|e| e.path().extension().is_some_and(|x| x == "log")),
        "no daemon log in {}",
        out.display()
    );
    // Unmounted: only the empty directory `nvlibfs mount` made is left.
    std::fs::remove_dir(&mountpoint).unwrap_or_else(|e| panic!("run.sh left {mountpoint} behind: {e}"));
    report
}
