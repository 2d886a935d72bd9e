//! Every installation layout GPU hosts use (tests/fixture/src/layout.rs
//! names each one's source), built with NVIDIA's real names, SONAMEs and
//! links, then scanned with nothing but the driver root and the module's
//! version, and mounted: the view holds exactly the pinned version's files
//! and every library loads through it.

mod common;

use common::{nvlibfs, ok, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::{build, Fixture, FixtureSpec, Layout};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

const OTHER: &str = "570.86.15";

/// `nvlibfs scan --json` of the fixture's root, pinned by its module
/// version file.
fn scan(f: &Fixture) -> Value {
    let out = nvlibfs()
        .args(["scan", "--json", "--driver-root"])
        .arg(&f.root)
        .arg("--module-version-file")
        .arg(f.module_version_file())
        .output()
        .unwrap();
    serde_json::from_str(&ok(out, "nvlibfs scan --json")).unwrap()
}

/// View path -> host path, for what the scan serves.
fn served(report: &Value) -> BTreeMap<PathBuf, PathBuf> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] != "generated")
        .map(|f| {
            (
                PathBuf::from(f["path"].as_str().unwrap()),
                PathBuf::from(f["source"].as_str().unwrap().trim_start_matches('/')),
            )
        })
        .collect()
}

/// Scans a layout and checks the view is exactly the fixture's pinned
/// files, each from where the layout installed it (links followed).
fn scans_exactly(layout: Layout, spec: FixtureSpec) -> (Fixture, Value) {
    let dir = tempfile::tempdir().unwrap();
    let f = build(&spec, &dir.path().join("host")).expect("fixture builds");
    let report = scan(&f);
    let served = served(&report);
    let expected: BTreeMap<PathBuf, PathBuf> = f
        .libraries
        .iter()
        .map(|l| (l.view_path.clone(), l.host_path.clone()))
        .chain(f.others.iter().map(|(host, view)| (view.clone(), host.clone())))
        .map(|(view, host)| {
            let real = std::fs::canonicalize(f.root.join(&host)).unwrap();
            (view, real.strip_prefix(&f.root).unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        served, expected,
        "{layout:?}: the view is not the pinned version's files; rejected: {}",
        report["rejected"]
    );
    // Keep the fixture's directory for the caller's further checks.
    std::mem::forget(dir);
    (f, report)
}

fn each_layout_scans_and_mounts(layout: Layout) {
    common::require_fixture_tools();
    let spec = FixtureSpec {
        layout,
        lib32: true,
        ..FixtureSpec::new(VERSION)
    };
    let (f, report) = scans_exactly(layout, spec);
    let kinds: BTreeSet<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    let expected_kinds = ["bin", "config", "firmware", "generated", "lib32", "lib64"];
    assert_eq!(kinds, BTreeSet::from(expected_kinds), "{layout:?}");
    let _ = std::fs::remove_dir_all(f.root.parent().unwrap());

    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(
        FixtureSpec {
            layout,
            ..FixtureSpec::new(VERSION)
        },
        &[],
    );
    m.assert_loads_everything(&[]);
    let smi = std::process::Command::new(m.mountpoint.join("bin/nvidia-smi"))
        .env("LD_LIBRARY_PATH", m.mountpoint.join("lib64"))
        .output()
        .unwrap();
    let smi = ok(smi, "the view's nvidia-smi");
    assert!(smi.contains(&format!("Driver Version: {VERSION}")), "{smi}");
}

#[test]
fn debian_and_ubuntu_packages() {
    each_layout_scans_and_mounts(Layout::Distro);
}

#[test]
fn a_flat_tree_at_usr_local_nvidia() {
    each_layout_scans_and_mounts(Layout::DriverTree);
}

#[test]
fn rhel_with_nvidias_cuda_repository() {
    each_layout_scans_and_mounts(Layout::RhelCudaRepo);
}

#[test]
fn nvidias_run_installer() {
    each_layout_scans_and_mounts(Layout::RunInstaller);
}

#[test]
fn the_gpu_operators_driver_container() {
    each_layout_scans_and_mounts(Layout::GpuOperator);
}

#[test]
fn nixos() {
    each_layout_scans_and_mounts(Layout::NixOs);
}

/// COS and GKE keep no EGL or OpenCL configs (their installers write them
/// inside the installer's container); GKE keeps the Vulkan ICD.
fn tree_layout(layout: Layout, configs: &[&str]) {
    common::require_fixture_tools();
    let spec = FixtureSpec {
        layout,
        ..FixtureSpec::new(VERSION)
    };
    let (f, report) = scans_exactly(layout, spec);
    let found: Vec<String> = served(&report)
        .keys()
        .filter(|p| p.starts_with("etc") || p.starts_with("share"))
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(found, configs, "{layout:?}");
    let _ = std::fs::remove_dir_all(f.root.parent().unwrap());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Mounted::new(
        FixtureSpec {
            layout,
            ..FixtureSpec::new(VERSION)
        },
        &[],
    )
    .assert_loads_everything(&[]);
}

#[test]
fn container_optimized_os() {
    tree_layout(Layout::Cos, &[]);
}

#[test]
fn gke() {
    tree_layout(Layout::Gke, &["etc/vulkan/icd.d/nvidia_icd.json"]);
}

/// A host with two drivers and nothing that says which a config belongs
/// to (RHEL: the rpm database is not read): the libraries and the
/// programs, which carry their version, are served; the configs are not,
/// and scan says why.
#[test]
fn configs_nothing_vouches_for_are_left_out_when_two_drivers_are_on_disk() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        layout: Layout::RhelCudaRepo,
        stale: Some(OTHER.into()),
        ..FixtureSpec::new(VERSION)
    };
    let f = build(&spec, &dir.path().join("host")).expect("fixture builds");
    let report = scan(&f);
    let served = served(&report);
    assert!(served.contains_key(&PathBuf::from(format!("lib64/libcuda.so.{VERSION}"))));
    assert!(served.contains_key(&PathBuf::from("bin/nvidia-smi")));
    assert_eq!(
        report["version_shown_by"]["bin/nvidia-smi"], "its contents name the version",
        "{report}"
    );
    let rejected: BTreeMap<&str, (&str, &str)> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap(),
                (r["reason"].as_str().unwrap(), r["detail"].as_str().unwrap()),
            )
        })
        .collect();
    for config in [
        "/usr/share/glvnd/egl_vendor.d/10_nvidia.json",
        "/etc/OpenCL/vendors/nvidia.icd",
    ] {
        let (code, detail) = rejected
            .get(config)
            .unwrap_or_else(|| panic!("{config} not rejected: {report}"));
        assert_eq!(*code, "version_unproven");
        assert!(detail.contains(&format!("{OTHER}, {VERSION}")), "{detail}");
    }
    // The Vulkan ICD names its version in its contents (the fixture's does).
    assert!(served.contains_key(&PathBuf::from("share/vulkan/icd.d/nvidia_icd.x86_64.json")));
}
