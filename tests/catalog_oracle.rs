//! The catalog held against something it did not write: Debian's own
//! packages of NVIDIA's 550 driver, graphics, video and Vulkan included
//! (GL/EGL/GLX/GLES and their cores, NVENC, NVDEC, VDPAU, OptiX, NGX, the
//! ICD packages), installed by the real dpkg into a Debian root. Every
//! shared object and config file those packages install, by dpkg's own
//! file lists, must be served by `nvlibfs scan`, or be one of the few the
//! test names with why it is not; a served library must be where Debian's
//! well-known links put it (e.g. VDPAU drivers in `vdpau/`), a config where
//! Debian puts it under `/usr/share` or `/etc`. The fixture and the other
//! tests come from `catalog::LIBRARIES`; this one does not, so an NVIDIA
//! library the catalog lacks, or files in the wrong place, fail here.
//!
//! Mutations tried: dropping `libnvidia-encode` from `LIBRARIES` fails
//! ("libnvidia-encode.so.550.163.01 is not served: unknown_name"); dropping
//! VDPAU's `subdir` fails ("served at lib64/libvdpau_nvidia.so.550.163.01,
//! Debian links it from lib64/vdpau"). Entries Debian does not package for
//! 550 (libnvidia-cbl, -compiler, -fatbinaryloader, -ifr, -nscq, -pkcs11,
//! -tileiras, -vulkan-producer) are not held to anything here.

mod common;

use common::packages::{self, GRAPHICS};
use common::{nvlibfs, ok, SERIAL};
use nvlibfs::provenance::upstream;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

/// Files Debian installs that the view does not serve, and why. Each is a
/// finding about the catalog as it stands, kept visible here: any other
/// file not served fails the test.
const NOT_SERVED: &[(&str, &str)] = &[
    // NvAPI (used by DXVK-NVAPI under wine/Proton): not in the catalog;
    // scan rejects it as an unknown name.
    ("libnvidia-api.so.1", "unknown_name"),
    // NGX's Windows DLLs for wine, in nvidia/wine/: not shared objects of
    // this system, and in no directory scan walks.
    ("_nvngx.dll", "not walked"),
    ("nvngx.dll", "not walked"),
];

/// Whether a dpkg-listed file is a driver file: a shared object, a
/// vendor config, a data blob the libraries load, or a DLL.
fn driver_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    !path.starts_with("/usr/share/doc/")
        && !path.starts_with("/usr/share/lintian/")
        && !path.starts_with("/usr/share/bug/")
        && (name.contains(".so") || [".json", ".icd", ".bin", ".dll"].iter().any(|e| name.ends_with(e)))
}

/// `path` inside `root` with every symbolic link followed inside `root`.
fn resolve(root: &Path, path: &str) -> Option<String> {
    let mut at = PathBuf::from(path);
    for _ in 0..40 {
        let host = root.join(at.strip_prefix("/").ok()?);
        match std::fs::read_link(&host) {
            Ok(target) => {
                at = if target.is_absolute() {
                    target
                } else {
                    at.parent()?.join(target)
                };
                // Normalise `..` lexically, as the kernel would inside root.
                let mut clean = PathBuf::from("/");
                for c in at.components() {
                    match c {
                        std::path::Component::ParentDir => {
                            clean.pop();
                        }
                        std::path::Component::Normal(n) => clean.push(n),
                        _ => {}
                    }
                }
                at = clean;
            }
            Err(_) => {
                // A directory on the way may be a link itself.
                let real = std::fs::canonicalize(&host).ok()?;
                let inside = real.strip_prefix(std::fs::canonicalize(root).ok()?).ok()?;
                return Some(format!("/{}", inside.display()));
            }
        }
    }
    None
}

fn dpkg_files(root: &Path, package: &str) -> Vec<String> {
    let out = Command::new("chroot")
        .arg(root)
        .args(["dpkg", "-L", package])
        .output()
        .unwrap();
    let text = ok(out, &format!("dpkg -L {package}"));
    text.lines().map(str::to_owned).collect()
}

#[test]
fn every_driver_file_of_debians_graphics_video_and_vulkan_packages_is_served() {
    common::require("dpkg", "dpkg");
    common::require("apt-get", "apt");
    common::require("chroot", "coreutils");
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let compute = packages::fetch().expect("fetching Debian's NVIDIA packages");
    let graphics = packages::fetch_graphics().expect("fetching Debian's NVIDIA graphics packages");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    packages::debian_root(&root).unwrap();
    // The compute install (libcuda, nvidia-alternative, the -common
    // configs) and the graphics packages of the same version, in one dpkg
    // run as `apt install` would (their triggers then run once).
    let debs = dir.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    for from in [compute.join("trixie"), graphics.join(GRAPHICS.name)] {
        for deb in std::fs::read_dir(from).unwrap() {
            let deb = deb.unwrap().path();
            std::os::unix::fs::symlink(&deb, debs.join(deb.file_name().unwrap())).unwrap();
        }
    }
    packages::dpkg_install(&root, &debs).unwrap();
    let deb = std::fs::read_dir(graphics.join(GRAPHICS.name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("libglx-nvidia0_"))
        .expect("libglx-nvidia0 fetched");
    let version = upstream(&packages::deb_version(&deb).unwrap()).to_owned();
    let version_file = root.join("sys/module/nvidia/version");
    std::fs::create_dir_all(version_file.parent().unwrap()).unwrap();
    std::fs::write(&version_file, format!("{version}\n")).unwrap();

    let out = nvlibfs()
        .args(["scan", "--json", "--driver-root"])
        .arg(&root)
        .arg("--module-version-file")
        .arg(&version_file)
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(&ok(out, "nvlibfs scan --json")).unwrap();
    assert_eq!(report["driver_version"], version.as_str());
    // Source (the host file) -> view path.
    let served: BTreeMap<String, String> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] != "generated")
        .map(|f| {
            (
                f["source"].as_str().unwrap().to_owned(),
                f["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let rejected: BTreeMap<String, String> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();

    // Where Debian's well-known links (outside its nvidia/ trees) lead:
    // real file -> the directories, relative to LIBDIR, of the links.
    let mut linked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in walkdir(&root.join(LIBDIR.trim_start_matches('/')), 2) {
        let rel = entry
            .strip_prefix(root.join(LIBDIR.trim_start_matches('/')))
            .unwrap()
            .to_owned();
        if rel.starts_with("nvidia") || !entry.symlink_metadata().unwrap().file_type().is_symlink() {
            continue;
        }
        let path = format!("{LIBDIR}/{}", rel.display());
        if let Some(real) = resolve(&root, &path) {
            let dir = rel.parent().map(|p| p.display().to_string()).unwrap_or_default();
            linked.entry(real).or_default().insert(dir);
        }
    }

    let mut problems = Vec::new();
    let mut checked = 0;
    let compute_packages = packages::RELEASES.iter().find(|r| r.name == "trixie").unwrap().packages;
    let packages_checked: Vec<&str> = GRAPHICS.packages.iter().chain(compute_packages).copied().collect();
    for package in &packages_checked {
        for path in dpkg_files(&root, package).into_iter().filter(|p| driver_file(p)) {
            let Some(real) = resolve(&root, &path) else { continue };
            if !root.join(real.trim_start_matches('/')).is_file() {
                continue;
            }
            checked += 1;
            let name = real.rsplit('/').next().unwrap().to_owned();
            let excused = NOT_SERVED.iter().find(|(n, _)| *n == name);
            match (served.get(&real), excused) {
                (Some(view), None) => {
                    if let Some(dirs) = linked.get(&real) {
                        let view_dir = Path::new(view).parent().unwrap().to_str().unwrap().to_owned();
                        let expected: Vec<String> = dirs
                            .iter()
                            .map(|d| {
                                if d.is_empty() {
                                    "lib64".to_owned()
                                } else {
                                    format!("lib64/{d}")
                                }
                            })
                            .collect();
                        if !expected.contains(&view_dir) {
                            problems.push(format!(
                                "{package}: {real} is served at {view}, Debian links it from {expected:?}"
                            ));
                        }
                    } else if let Some(rest) = path.strip_prefix("/usr/share/").or_else(|| path.strip_prefix("/etc/")) {
                        let top = if path.starts_with("/etc/") { "etc" } else { "share" };
                        if view != &format!("{top}/{rest}") {
                            problems.push(format!("{package}: {path} is served at {view}, not {top}/{rest}"));
                        }
                    }
                }
                (Some(view), Some(_)) => {
                    problems.push(format!(
                        "{package}: {real} is served at {view}: drop it from NOT_SERVED"
                    ));
                }
                (None, Some((_, why))) => {
                    let reason = rejected.get(&real).map(String::as_str).unwrap_or("not walked");
                    if reason != *why {
                        problems.push(format!("{package}: {real}: expected {why}, scan says {reason}"));
                    }
                }
                (None, None) => problems.push(format!(
                    "{package}: {real} ({path}) is not served: {}",
                    rejected.get(&real).map(String::as_str).unwrap_or("scan never saw it")
                )),
            }
        }
    }
    eprintln!(
        "catalog oracle: {checked} driver files of {} packages ({version}), {} served in all",
        packages_checked.len(),
        served.len()
    );
    assert!(checked >= 25, "only {checked} driver files in Debian's file lists");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every entry below `dir`, `depth` levels deep, without following links.
fn walkdir(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        out.push(path.clone());
        if is_dir && depth > 1 {
            out.extend(walkdir(&path, depth - 1));
        }
    }
    out
}
