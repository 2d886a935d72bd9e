//! NVIDIA's real driver as Debian packages it, installed by the real
//! `dpkg` (maintainer scripts, update-alternatives, ldconfig) into a Debian
//! root, then served: Debian 12's 535, upgraded in place by Debian 13's 550
//! while mounted, then the datacenter flavor (525, "tesla") installed
//! beside it while the alternatives keep pointing at 550. At each step the
//! module's version decides, and dpkg itself is asked which package (and so
//! which version) each served file came from.
//!
//! Run as root: NVIDIA's programs are run in a mount namespace with a
//! /dev of their own, because as root they create /dev/nvidiactl where it
//! is missing, and one left on the host would be listed by
//! `nvlibfs docker-flags` for containers that do not have it.

mod common;

use common::packages::{self, RELEASES};
use common::{nvidia_nodes, nvlibfs, ok, wait_for, walk_files, SERIAL};
use nvlibfs::catalog;
use nvlibfs::provenance::upstream;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What `cuDriverGetVersion` says for each driver branch (CUDA 12.0, 12.2,
/// 12.4), as NVIDIA's release notes pair them.
const DRIVER_API: &[(&str, &str)] = &[("525", "12.0"), ("535", "12.2"), ("550", "12.4")];

struct Host {
    root: PathBuf,
    mountpoint: PathBuf,
    state_dir: PathBuf,
    tools: PathBuf,
    _dir: tempfile::TempDir,
}

#[test]
fn debian_packages_are_served_by_the_modules_version() {
    common::require("dpkg", "dpkg");
    common::require("apt-get", "apt");
    common::require("chroot", "coreutils");
    common::require("unshare", "util-linux");
    common::require("python3", "python3");
    common::images::require_image_tools();
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let debs = packages::fetch().expect("fetching Debian's NVIDIA packages");
    let version_of = |release: &str, deb_prefix: &str| -> String {
        let deb = std::fs::read_dir(debs.join(release))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(deb_prefix))
            .unwrap_or_else(|| panic!("no {deb_prefix} package among {release}'s"));
        let version = packages::deb_version(&deb).unwrap();
        upstream(&version).to_owned()
    };
    let bookworm = version_of("bookworm", "libcuda1_");
    let trixie = version_of("trixie", "libcuda1_");
    let tesla = version_of("tesla", "libnvidia-tesla-cuda1_");
    assert_eq!(RELEASES.len(), 3);
    let nodes_before = nvidia_nodes();

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = Host {
        root: dir.path().join("root"),
        mountpoint: dir.path().join("mnt"),
        state_dir: dir.path().join("state"),
        tools: dir.path().to_owned(),
        _dir: dir,
    };
    packages::debian_root(&host.root).unwrap();
    let cuda_check = common::build_cuda_check(&host.tools);

    // Debian 12's driver, as `apt install nvidia-smi libcuda1 ...` leaves it.
    packages::dpkg_install(&host.root, &debs.join("bookworm")).unwrap();
    host.set_module(&bookworm);
    let first = host.check_scan(&bookworm, &["bookworm"]);
    ok(
        common::mount_root_command(&host.root, &host.state_dir)
            .arg(&host.mountpoint)
            .output()
            .unwrap(),
        "nvlibfs mount",
    );
    host.check_view(&first, &bookworm, &cuda_check);

    // Debian 13's driver installed over it while mounted, as an upgrade
    // does before the reboot: the pinned files stay exactly as they were,
    // though dpkg has deleted them on the host.
    let before = host.contents();
    packages::dpkg_install(&host.root, &debs.join("trixie")).unwrap();
    let old_libcuda = first.sources[&format!("lib64/libcuda.so.{bookworm}")].clone();
    assert!(
        !host.root.join(old_libcuda.trim_start_matches('/')).exists(),
        "dpkg should have removed {old_libcuda}"
    );
    assert!(
        before == host.contents(),
        "the pinned view changed under a dpkg upgrade"
    );

    // The module "reloads" at the new version: the view re-pins.
    host.set_module(&trixie);
    let second = host.check_scan(&trixie, &["trixie"]);
    host.wait_for_pin(&trixie);
    host.check_view(&second, &trixie, &cuda_check);

    // The datacenter flavor beside it, and the module loaded from that
    // flavor: every well-known name (alternatives) still leads to 550.
    packages::dpkg_install(&host.root, &debs.join("tesla")).unwrap();
    host.set_module(&tesla);
    let third = host.check_scan(&tesla, &["tesla"]);
    assert_eq!(third.sources["bin/nvidia-smi"], "/usr/lib/nvidia/tesla/nvidia-smi");
    assert!(
        third
            .rejected
            .get("/usr/bin/nvidia-smi")
            .is_some_and(|r| r.contains(&format!("other version {trixie}"))),
        "the alternatives' nvidia-smi should be rejected as {trixie}'s: {:?}",
        third.rejected.get("/usr/bin/nvidia-smi")
    );
    host.wait_for_pin(&tesla);
    host.check_view(&third, &tesla, &cuda_check);

    common::umount(&host.mountpoint, &host.state_dir);
    assert_eq!(nvidia_nodes(), nodes_before, "a test left /dev/nvidia* nodes behind");
}

/// What `nvlibfs scan --json` says: view path -> source, and the rejected.
struct Scan {
    sources: BTreeMap<String, String>,
    rejected: BTreeMap<String, String>,
}

impl Host {
    fn version_file(&self) -> PathBuf {
        self.root.join("sys/module/nvidia/version")
    }

    fn set_module(&self, version: &str) {
        std::fs::create_dir_all(self.version_file().parent().unwrap()).unwrap();
        std::fs::write(self.version_file(), format!("{version}\n")).unwrap();
    }

    /// Scans with only the root and the module's version, and checks the
    /// result against dpkg's own records: every served file was installed
    /// by a package of `version`, and every driver file that `releases`'
    /// packages of that version installed is served.
    fn check_scan(&self, version: &str, releases: &[&str]) -> Scan {
        let out = nvlibfs()
            .args(["scan", "--json", "--driver-root"])
            .arg(&self.root)
            .arg("--module-version-file")
            .arg(self.version_file())
            .output()
            .unwrap();
        let report: Value = serde_json::from_str(&ok(out, "nvlibfs scan --json")).unwrap();
        assert_eq!(report["driver_version"], version);
        let mut sources = BTreeMap::new();
        for file in report["files"].as_array().unwrap() {
            let (path, source) = (file["path"].as_str().unwrap(), file["source"].as_str().unwrap());
            if file["kind"] == "generated" {
                continue;
            }
            let (package, package_version) = packages::owner(&self.root, source)
                .unwrap_or_else(|| panic!("{path}: dpkg knows of no package that installed {source}"));
            assert_eq!(
                upstream(&package_version),
                version,
                "{path} is {source}, from {package} {package_version}"
            );
            sources.insert(path.to_owned(), source.to_owned());
        }
        let rejected = report["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["source"].as_str().unwrap().to_owned(),
                    r["detail"].as_str().unwrap().to_owned(),
                )
            })
            .collect();

        let served: BTreeSet<&String> = sources.values().collect();
        for file in self.installed_driver_files(version, releases) {
            assert!(
                served.contains(&file),
                "{file} (installed for {version}) is not served; rejected: {:?}",
                report["rejected"]
            );
        }
        Scan { sources, rejected }
    }

    /// The files a view of `version` must hold, from dpkg's lists of the
    /// installed packages of that version: the versioned libraries, the
    /// programs, firmware and vendor configs, at their real paths.
    fn installed_driver_files(&self, version: &str, releases: &[&str]) -> Vec<String> {
        let listed = chroot(&self.root, &["dpkg-query", "-W", "-f=${Package} ${Version}\\n"]);
        let wanted: BTreeSet<&str> = RELEASES
            .iter()
            .filter(|r| releases.contains(&r.name))
            .flat_map(|r| r.packages.iter().copied())
            .collect();
        let mut files = Vec::new();
        for line in listed.lines() {
            let Some((package, package_version)) = line.split_once(' ') else {
                continue;
            };
            if !wanted.contains(package) || upstream(package_version) != version {
                continue;
            }
            for path in chroot(&self.root, &["dpkg", "-L", package]).lines() {
                let name = path.rsplit('/').next().unwrap_or_default();
                let driver_file = catalog::parse_library_name(name).is_some_and(|n| n.suffix == version)
                    || (catalog::BINARIES.contains(&name) && !path.starts_with("/usr/share/"))
                    || (catalog::is_firmware_name(name) && path.contains(&format!("/nvidia/{version}/")))
                    || catalog::CONFIGS.iter().any(|c| path.ends_with(c.path));
                let host = self.root.join(path.trim_start_matches('/'));
                if driver_file && std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_file()) {
                    let real = std::fs::canonicalize(&host).unwrap();
                    files.push(format!("/{}", real.strip_prefix(&self.root).unwrap().display()));
                }
            }
        }
        assert!(files.len() >= 7, "too few driver files listed for {version}: {files:?}");
        files
    }

    fn wait_for_pin(&self, version: &str) {
        let libcuda = self.mountpoint.join(format!("lib64/libcuda.so.{version}"));
        wait_for(&format!("the view to re-pin at {version}"), || libcuda.exists());
    }

    /// Through the mount: the view holds what the scan chose, every
    /// library loads, libcuda reports the version's CUDA API, and
    /// nvidia-smi runs from the view against the view's NVML.
    fn check_view(&self, scan: &Scan, version: &str, cuda_check: &Path) {
        let mnt = &self.mountpoint;
        // The generation being served; the mount's top level links into it.
        let live = mnt.join(".live");
        let in_view: BTreeSet<String> = walk_files(&live)
            .iter()
            .map(|p| p.strip_prefix(&live).unwrap().display().to_string())
            // nvlibfs's own: the loader cache and the CDI spec.
            .filter(|p| !p.starts_with("etc/ld.so.cache") && !p.starts_with("etc/cdi/"))
            .collect();
        let expected: BTreeSet<String> = scan.sources.keys().cloned().collect();
        assert_eq!(in_view, expected, "the mounted view is not what scan chose");
        for (path, source) in &scan.sources {
            let served = std::fs::read(mnt.join(path)).unwrap();
            let host = std::fs::read(self.root.join(source.trim_start_matches('/'))).unwrap();
            assert!(served == host, "{path} differs from {source}");
        }

        let libs: Vec<String> = scan
            .sources
            .keys()
            .filter(|p| p.starts_with("lib64/"))
            .map(|p| mnt.join(p).display().to_string())
            .collect();
        assert!(libs.len() >= 4, "{libs:?}");
        let load = Command::new("python3")
            .args([
                "-c",
                "import ctypes, sys\nfor p in sys.argv[1:]: ctypes.CDLL(p, mode=2)",
            ])
            .args(&libs)
            .output()
            .unwrap();
        ok(load, &format!("loading {libs:?}"));

        let lib64 = mnt.join("lib64");
        let out = with_own_dev(Command::new(cuda_check).env("LD_LIBRARY_PATH", &lib64));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let branch = version.split('.').next().unwrap();
        let api = DRIVER_API
            .iter()
            .find(|(b, _)| *b == branch)
            .unwrap_or_else(|| panic!("no CUDA API known for driver branch {branch}: add it to DRIVER_API"))
            .1;
        assert!(
            stdout.contains(&format!(
                "libcuda {}",
                live.join(format!("lib64/libcuda.so.{version}")).display()
            )) && stdout.contains(&format!("driver API {api}\n")),
            "cuda-check through the view ({version}):\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let smi = mnt.join("bin/nvidia-smi");
        let bytes = std::fs::read(&smi).unwrap();
        assert!(
            bytes.windows(version.len()).any(|w| w == version.as_bytes()),
            "the view's nvidia-smi does not carry {version}"
        );
        let out = with_own_dev(
            Command::new(&smi)
                .env("LD_LIBRARY_PATH", &lib64)
                .env("LD_DEBUG", "libs"),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // No GPU here: it stops after loading NVML, for want of a device.
        assert_eq!(out.status.code(), Some(9), "{text}");
        assert!(text.contains("couldn't communicate with the NVIDIA driver"), "{text}");
        let nvml = lib64.join("libnvidia-ml.so.1");
        assert!(
            text.contains(&format!("calling init: {}", nvml.display())),
            "nvidia-smi did not load {}:\n{text}",
            nvml.display()
        );
    }

    /// Every byte the view serves, by path.
    fn contents(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        walk_files(&self.mountpoint.join(".live"))
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect()
    }
}

/// Runs `cmd` in a mount namespace whose /dev is a fresh tmpfs with only
/// null, zero and urandom: what NVIDIA's libraries create there (they make
/// /dev/nvidiactl when run as root) goes away with it.
fn with_own_dev(cmd: &mut Command) -> Output {
    let mut wrapped = Command::new("unshare");
    wrapped.args(["--mount", "--propagation", "private", "sh", "-ec"]).arg(
        "mount -t tmpfs -o mode=755 nvlibfs-test-dev /dev
         mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/urandom c 1 9
         exec \"$@\"",
    );
    wrapped.arg("sh").arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped.output().unwrap()
}

fn chroot(root: &Path, args: &[&str]) -> String {
    ok(
        Command::new("chroot").arg(root).args(args).output().unwrap(),
        &format!("chroot {} {args:?}", root.display()),
    )
}
