//! The NVIDIA Container Toolkit (`nvidia-ctk`, `nvidia-cdi-hook`), built
//! from its source in the peers directory and cached beside the test
//! images: the real thing nvlibfs is held against.
//!
//! Its Go (1.24, which Debian 12 lacks) is Debian 13's `golang-1.24-go`
//! and `golang-1.24-src`, fetched with `apt-get download` from the archive
//! the cached Debian root came from (see `packages::archive_uri`), through
//! a source list of its own, so nothing on the host changes; unpacked with
//! `dpkg -x` and removed once the toolkit is built.

use super::images::{cache_dir, cache_lock, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolkit's release, as its source tarball is named.
pub const TOOLKIT_VERSION: &str = "1.18.0";
/// Bump to build it again.
const TOOLKIT_KEY: &str = "nvidia-container-toolkit-1.18.0-1";
const GO_PACKAGES: [&str; 2] = ["golang-1.24-go/trixie", "golang-1.24-src/trixie"];

/// The toolkit's source: `NVLIBFS_TOOLKIT_SOURCE`, or the peers directory
/// beside the checkout (`../shared/peers`).
pub fn source() -> PathBuf {
    std::env::var_os("NVLIBFS_TOOLKIT_SOURCE").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/peers")
                .join(format!("nvidia-container-toolkit-{TOOLKIT_VERSION}.tar.gz"))
        },
        PathBuf::from,
    )
}

/// The directory holding `nvidia-ctk` and `nvidia-cdi-hook`, built once
/// (about a minute on 2 cores) under a lock that test binaries running
/// side by side share.
pub fn toolkit() -> Result<PathBuf, String> {
    let dir = cache_dir().join(TOOLKIT_KEY);
    let done = |dir: &Path| dir.join("nvidia-ctk").exists() && dir.join("nvidia-cdi-hook").exists();
    if done(&dir) {
        return Ok(dir);
    }
    let _building = cache_lock(TOOLKIT_KEY)?;
    if done(&dir) {
        return Ok(dir);
    }
    let tarball = source();
    if !tarball.exists() {
        return Err(format!(
            "the NVIDIA Container Toolkit's source is not at {}: set NVLIBFS_TOOLKIT_SOURCE to its tarball \
             (the v{TOOLKIT_VERSION} tag with its Go dependencies vendored)",
            tarball.display()
        ));
    }
    let work = cache_dir().join(format!("{TOOLKIT_KEY}.partial"));
    let _ = std::fs::remove_dir_all(&work);
    let apt = super::packages::PrivateApt::new(&work.join("apt"), "trixie", "main")?;
    let debs = apt.dir.join("debs");
    apt.download(&debs, &GO_PACKAGES)?;
    let go = work.join("go");
    for deb in std::fs::read_dir(&debs).map_err(|e| e.to_string())? {
        let deb = deb.map_err(|e| e.to_string())?.path();
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&go))?;
    }
    let goroot = go.join("usr/lib/go-1.24");
    run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&work))?;
    let tree = work.join(format!("nvidia-container-toolkit-{TOOLKIT_VERSION}"));
    let bin = work.join("bin");
    let path = format!(
        "{}:{}",
        goroot.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new(goroot.join("bin/go"))
        .current_dir(&tree)
        .args(["build", "-trimpath", "-o"])
        .arg(format!("{}/", bin.display()))
        .args(["./cmd/nvidia-ctk", "./cmd/nvidia-cdi-hook"])
        .env("GOROOT", &goroot)
        .env("PATH", path)
        .env("GOCACHE", work.join("gocache"))
        .env("GOPATH", work.join("gopath"))
        .env("GOFLAGS", "-mod=vendor")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "1"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&bin, &dir).map_err(|e| e.to_string())?;
    // Go's module cache is read-only; what stays is the two binaries.
    let _ = run(Command::new("chmod").arg("-R").arg("u+w").arg(&work));
    let _ = std::fs::remove_dir_all(&work);
    Ok(dir)
}

/// `nvidia-ctk cdi generate` for the driver under `driver_root` and the
/// device nodes (and `/proc/driver/nvidia/gpus`) under `dev_root`: the
/// toolkit's spec, as JSON, its hooks run by the cached `nvidia-cdi-hook`.
pub fn generate(driver_root: &Path, dev_root: &Path) -> Result<serde_json::Value, String> {
    generate_with(driver_root, dev_root, &[])
}

/// [`generate`] with more flags (`--mode management`: no NVML, for a
/// driver with no GPU to answer it).
pub fn generate_with(driver_root: &Path, dev_root: &Path, flags: &[&str]) -> Result<serde_json::Value, String> {
    let bin = toolkit()?;
    // It names the format by the file's extension (and adds one if missing).
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = dir.path().join("spec.json");
    // In a mount namespace whose /dev is a fresh tmpfs: run as root, a real
    // libnvidia-ml (Debian's, in the management mode) creates
    // /dev/nvidiactl where there is none, which would reach the host's /dev
    // and every other test (docker-flags would name it).
    let fresh_dev = "mount -t tmpfs -o mode=755 nvlibfs-test-dev /dev && mknod -m 666 /dev/null c 1 3 && \
                     mknod -m 666 /dev/zero c 1 5 && mknod -m 666 /dev/urandom c 1 9 && exec \"$0\" \"$@\"";
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", fresh_dev])
        .arg(bin.join("nvidia-ctk"))
        .args(["cdi", "generate", "--format", "json", "--nvidia-cdi-hook-path"])
        .arg(bin.join("nvidia-cdi-hook"))
        .arg("--driver-root")
        .arg(driver_root)
        .arg("--dev-root")
        .arg(dev_root)
        .arg("--output")
        .arg(&out)
        .args(flags))?;
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("nvidia-ctk's spec is not JSON: {e}\n{text}"))
}
