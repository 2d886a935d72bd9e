//! Container images for the tests, built from a debootstrapped Debian
//! (no registry is reachable) and cached between runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump to rebuild the cached images.
pub const IMAGE_KEY: &str = "bookworm-minbase-1";

/// Where the slow parts (debootstrap, the outer image's dockerd install)
/// are kept between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NVLIBFS_TEST_CACHE").map_or_else(|| PathBuf::from("/var/cache/nvlibfs-test"), PathBuf::from)
}

/// Held while the cache entry `name` is made: test binaries run side by
/// side (contrib/test.sh) and would otherwise build the same entry in the
/// same temporary directory at once. The lock files stay, empty.
pub fn cache_lock(name: &str) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let path = cache.join(format!("{}.lock", name.replace([':', '/'], "-")));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("locking {}: {e}", path.display()))
}

/// Runs `cmd`; its stdout, or why it failed with the end of its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!("{cmd:?} exited with {}:\n{}", out.status, tail.join("\n")))
    }
}

/// What building the images needs, unless they are cached already:
/// debootstrap (the image's root file system comes from the Debian archive).
#[track_caller]
pub fn require_image_tools() {
    if !cache_dir().join(format!("inner-{IMAGE_KEY}.tar")).exists() {
        super::require("debootstrap", "debootstrap");
    }
}

/// A Debian minbase root file system as a tarball, built once.
pub fn inner_rootfs() -> Result<PathBuf, String> {
    debootstrap_tar(&format!("inner-{IMAGE_KEY}"), "bookworm", &[])
}

/// Debian 13 with Debian's Docker 26 (dockerd, containerd, runc, the
/// CLI) and what runs it rootless (RootlessKit, newuidmap), for
/// tests/dind26/run.sh: what the apt caches, documentation and
/// locales take is left out, and so is what Docker's daemon never runs
/// here, to keep the tarball small enough to carry to the GPU machine.
pub fn docker26_rootfs() -> Result<PathBuf, String> {
    debootstrap_tar_without(
        "dind26-trixie-2",
        "trixie",
        &["docker.io", "docker-cli", "rootlesskit", "uidmap"],
        &[
            "var/cache/apt",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/locale",
            "usr/share/man",
            "usr/bin/ctr",
            "usr/bin/containerd-shim",
            "usr/bin/containerd-shim-runc-v1",
        ],
    )
}

/// `debootstrap --variant=minbase SUITE` with `include`d packages, as a
/// tarball cached as `cache_dir()/NAME.tar`.
pub fn debootstrap_tar(name: &str, suite: &str, include: &[&str]) -> Result<PathBuf, String> {
    debootstrap_tar_without(name, suite, include, &[])
}

/// `debootstrap_tar` without the paths in `remove` (relative to its root).
fn debootstrap_tar_without(name: &str, suite: &str, include: &[&str], remove: &[&str]) -> Result<PathBuf, String> {
    let cache = cache_dir();
    let tar = cache.join(format!("{name}.tar"));
    if tar.exists() {
        return Ok(tar);
    }
    let _building = cache_lock(name)?;
    if tar.exists() {
        return Ok(tar);
    }
    let rootfs = cache.join(format!("rootfs-{name}.tmp"));
    let _ = std::fs::remove_dir_all(&rootfs);
    let mut debootstrap = Command::new("debootstrap");
    debootstrap.arg("--variant=minbase");
    if !include.is_empty() {
        debootstrap.arg(format!("--include={}", include.join(",")));
    }
    run(debootstrap.arg(suite).arg(&rootfs))?;
    for path in remove {
        let path = rootfs.join(path);
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let partial = tar.with_extension("partial");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&partial)
        .arg("."))?;
    std::fs::rename(&partial, &tar).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&rootfs);
    Ok(tar)
}

/// A docker image `tag` (imported into the host's dockerd once): the Debian
/// root `inner` with `packages` installed from its archive and `setup` (a
/// shell command) run in it.
pub fn debian_image(tag: &str, inner: &Path, packages: &[&str], setup: &str) -> Result<String, String> {
    let exists = || run(Command::new("docker").args(["image", "inspect", tag])).is_ok();
    if exists() {
        return Ok(tag.to_owned());
    }
    let _building = cache_lock(tag)?;
    if exists() {
        return Ok(tag.to_owned());
    }
    let rootfs = cache_dir().join(format!("{}.tmp", tag.replace([':', '/'], "-")));
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs).map_err(|e| e.to_string())?;
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-xf").arg(inner))?;
    // No services start inside a chroot; name resolution as on the host.
    std::fs::write(rootfs.join("usr/sbin/policy-rc.d"), "#!/bin/sh\nexit 101\n").map_err(|e| e.to_string())?;
    run(Command::new("chmod").arg("+x").arg(rootfs.join("usr/sbin/policy-rc.d")))?;
    std::fs::copy("/etc/resolv.conf", rootfs.join("etc/resolv.conf")).map_err(|e| e.to_string())?;
    run(Command::new("chroot").arg(&rootfs).args([
        "sh",
        "-c",
        &format!(
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {} \
             && rm -rf /var/lib/apt/lists/* {}",
            packages.join(" "),
            if setup.is_empty() {
                String::new()
            } else {
                format!("&& {setup}")
            }
        ),
    ]))?;
    let import = format!("tar -C '{}' -c . | docker import - {tag}", rootfs.display());
    run(Command::new("sh").args(["-c", &import]))?;
    let _ = std::fs::remove_dir_all(&rootfs);
    Ok(tag.to_owned())
}

/// `docker run` flags for a container that runs a dockerd or a systemd of
/// its own on this machine (FACTS §6): everything --privileged gives but
/// CAP_SYS_RESOURCE, which the machine's bounding set lacks.
pub fn all_but_privileged() -> [&'static str; 12] {
    [
        "--cap-add",
        "ALL",
        "--cap-drop",
        "SYS_RESOURCE",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--security-opt",
        "systempaths=unconfined",
        "--device-cgroup-rule",
        "a *:* rwm",
    ]
}
