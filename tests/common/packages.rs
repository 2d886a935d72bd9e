//! NVIDIA's real driver packages, as Debian ships them in its non-free
//! components, fetched once and cached beside the test images.
//!
//! The archive is the one the cached Debian root was bootstrapped from
//! (its own `etc/apt/sources.list` names it), read with the host's apt
//! but none of the host's sources, so nothing on the host changes.

use super::images::{cache_dir, inner_rootfs, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump to fetch the packages again.
const PACKAGES_KEY: &str = "debian-nvidia-1";

/// One driver release's packages, from one suite.
pub struct Release {
    /// A directory name in the cache.
    pub name: &'static str,
    pub suite: &'static str,
    pub packages: &'static [&'static str],
}

/// Debian 12's driver (535), Debian 13's (550), and Debian 12's
/// datacenter flavor ("tesla", 525), which installs beside the others into
/// `nvidia/tesla` directories: each the packages of a compute install
/// (library, management library, JIT compiler, nvidia-smi, MPS, GSP
/// firmware, the vendor configs and the alternatives that point the
/// well-known names at a flavor).
pub const RELEASES: [Release; 3] = [
    Release {
        name: "bookworm",
        suite: "bookworm",
        packages: CURRENT,
    },
    Release {
        name: "trixie",
        suite: "trixie",
        packages: CURRENT,
    },
    Release {
        name: "tesla",
        suite: "bookworm",
        packages: &[
            "libnvidia-tesla-cuda1",
            "libnvidia-tesla-ml1",
            "libnvidia-tesla-cfg1",
            "libnvidia-tesla-ptxjitcompiler1",
            "nvidia-tesla-smi",
            "nvidia-tesla-alternative",
            "firmware-nvidia-tesla-gsp",
        ],
    },
];

const CURRENT: &[&str] = &[
    "libcuda1",
    "libnvidia-ml1",
    "libnvidia-cfg1",
    "libnvidia-ptxjitcompiler1",
    "nvidia-smi",
    "nvidia-cuda-mps",
    "nvidia-alternative",
    "firmware-nvidia-gsp",
    "nvidia-egl-common",
    "nvidia-vulkan-common",
    "nvidia-opencl-common",
];

/// Debian 13's graphics, video and Vulkan packages of the same driver
/// (550): GL/EGL/GLX/GLES, the cores they load, NVENC, NVDEC (cuvid),
/// VDPAU, OptiX, NGX, NvAPI and the ICD packages, with OpenCL, the CUDA
/// debugger and PKCS#11, for the catalog's oracle.
pub const GRAPHICS: Release = Release {
    name: "trixie-graphics",
    suite: "trixie",
    packages: &[
        "libegl-nvidia0",
        "libgles-nvidia1",
        "libgles-nvidia2",
        "libglx-nvidia0",
        "libnvcuvid1",
        "libnvidia-allocator1",
        "libnvidia-api1",
        "libnvidia-eglcore",
        "libnvidia-encode1",
        "libnvidia-fbc1",
        "libnvidia-glcore",
        "libnvidia-glvkspirv",
        "libnvidia-gpucomp",
        "libnvidia-ngx1",
        "libnvidia-nvvm4",
        "libnvidia-opticalflow1",
        "libnvidia-rtcore",
        "libnvoptix1",
        "nvidia-egl-icd",
        "nvidia-vulkan-icd",
        "nvidia-vdpau-driver",
        // Compute pieces the compute install above leaves out.
        "nvidia-opencl-icd",
        "libcudadebugger1",
        "libnvidia-pkcs11-openssl3",
    ],
};

/// Bump to fetch the graphics packages again.
const GRAPHICS_KEY: &str = "debian-nvidia-graphics-2";

/// The cached `.deb` files of each release, fetched on first use:
/// `dir/<release name>/*.deb`.
pub fn fetch() -> Result<PathBuf, String> {
    fetch_releases(PACKAGES_KEY, &RELEASES)
}

/// `fetch`, for GRAPHICS: `dir/trixie-graphics/*.deb`.
pub fn fetch_graphics() -> Result<PathBuf, String> {
    fetch_releases(GRAPHICS_KEY, std::slice::from_ref(&GRAPHICS))
}

fn fetch_releases(key: &str, releases: &[Release]) -> Result<PathBuf, String> {
    let dir = cache_dir().join(key);
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    let _fetching = super::images::cache_lock(key)?;
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    let partial = cache_dir().join(format!("{key}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let apt = PrivateApt::new(&partial.join("apt"), "bookworm trixie", "non-free non-free-firmware")?;
    for release in releases {
        let into = partial.join(release.name);
        let wanted: Vec<String> = release
            .packages
            .iter()
            .map(|p| format!("{p}/{}", release.suite))
            .collect();
        apt.download(&into, &wanted)?;
    }
    apt.remove()?;
    std::fs::write(partial.join("complete"), "").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// The Debian archive the cached root came from, as its sources.list
/// names it (`deb URI SUITE COMPONENTS`).
pub fn archive_uri() -> Result<String, String> {
    let tar = inner_rootfs()?;
    let list = run(Command::new("tar").arg("-xOf").arg(&tar).arg("./etc/apt/sources.list"))?;
    list.lines()
        .find_map(|l| l.strip_prefix("deb ").and_then(|rest| rest.split_whitespace().next()))
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: its etc/apt/sources.list names no archive:\n{list}", tar.display()))
}

/// An apt tree of its own (lists, cache, one sources file for the archive
/// `archive_uri` names), read with the host's apt but none of the host's
/// sources or state, so nothing on the host changes.
pub struct PrivateApt {
    pub dir: PathBuf,
    options: Vec<String>,
}

impl PrivateApt {
    /// Makes the tree at `dir` for `suites` and `components` (each
    /// space-separated) and reads the archive's lists.
    pub fn new(dir: &Path, suites: &str, components: &str) -> Result<PrivateApt, String> {
        for sub in ["lists/partial", "cache/archives/partial", "sources.d"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
        }
        std::fs::write(
            dir.join("sources.d/archive.sources"),
            format!(
                "Types: deb\nURIs: {}\nSuites: {suites}\nComponents: {components}\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                archive_uri()?
            ),
        )
        .map_err(|e| e.to_string())?;
        let options = [
            "Dir::Etc::sourcelist=/dev/null".to_owned(),
            format!("Dir::Etc::sourceparts={}", dir.join("sources.d").display()),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            // The download lands in a directory root owns.
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect();
        let apt = PrivateApt {
            dir: dir.to_owned(),
            options,
        };
        run(Command::new("apt-get").args(&apt.options).args(["-q", "update"]))?;
        Ok(apt)
    }

    /// Downloads the `.deb` of each of `packages` (`name/suite`) into `into`.
    pub fn download(&self, into: &Path, packages: &[impl AsRef<std::ffi::OsStr>]) -> Result<(), String> {
        std::fs::create_dir_all(into).map_err(|e| e.to_string())?;
        run(Command::new("apt-get")
            .current_dir(into)
            .args(&self.options)
            .args(["-q", "download"])
            .args(packages))
        .map(|_| ())
    }

    pub fn remove(self) -> Result<(), String> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| e.to_string())
    }
}

/// A Debian 12 root (the cached minbase) unpacked into `root`.
pub fn debian_root(root: &Path) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(|e| e.to_string())?;
    run(Command::new("tar").arg("-C").arg(root).arg("-xf").arg(inner_rootfs()?)).map(|_| ())
}

/// `dpkg -i` of `debs` inside `root`, maintainer scripts and triggers
/// included (update-alternatives, ldconfig); the kernel module packages
/// and desktop pieces these depend on are not installed, so dependencies
/// are not enforced.
pub fn dpkg_install(root: &Path, debs: &Path) -> Result<String, String> {
    let inside = root.join("tmp/nvlibfs-debs");
    let _ = std::fs::remove_dir_all(&inside);
    std::fs::create_dir_all(&inside).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(debs).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(&path, inside.join(&name)).map_err(|e| e.to_string())?;
        names.push(format!("/tmp/nvlibfs-debs/{name}"));
    }
    let out = run(Command::new("chroot")
        .arg(root)
        .args(["dpkg", "--force-depends", "-i"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    let _ = std::fs::remove_dir_all(&inside);
    out
}

/// The package that installed `path` inside `root` and its version, as
/// dpkg itself says (`dpkg -S`, then `dpkg-query`). On a merged-/usr root
/// a package's `/lib/firmware/...` is found at `/usr/lib/firmware/...`.
pub fn owner(root: &Path, path: &str) -> Option<(String, String)> {
    let search = |path: &str| {
        Command::new("chroot")
            .arg(root)
            .args(["dpkg", "-S", path])
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let out = search(path).or_else(|| search(path.strip_prefix("/usr")?))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let package = text.split(':').next()?.trim().to_owned();
    let version = Command::new("chroot")
        .arg(root)
        .args(["dpkg-query", "-W", "-f=${Version}", &package])
        .output()
        .ok()?;
    Some((package, String::from_utf8_lossy(&version.stdout).trim().to_owned()))
}

/// The version of a `.deb` file.
pub fn deb_version(deb: &Path) -> Result<String, String> {
    run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version")).map(|v| v.trim().to_owned())
}

/// `packages` of Debian's `suite` (main), fetched once with `apt-get
/// download` from the archive the cached root names (none of the host's
/// sources change) and unpacked with `dpkg -x` into `cache_dir()/KEY`,
/// which is returned.
pub fn unpacked(key: &str, suite: &str, packages: &[&str]) -> Result<PathBuf, String> {
    let dir = cache_dir().join(key);
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    let _fetching = super::images::cache_lock(key)?;
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    let partial = cache_dir().join(format!("{key}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let apt = PrivateApt::new(&partial.join("apt"), suite, "main")?;
    let debs = apt.dir.join("debs");
    let wanted: Vec<String> = packages.iter().map(|p| format!("{p}/{suite}")).collect();
    apt.download(&debs, &wanted)?;
    for deb in std::fs::read_dir(&debs).map_err(|e| e.to_string())? {
        let deb = deb.map_err(|e| e.to_string())?.path();
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    }
    apt.remove()?;
    std::fs::write(partial.join("complete"), "").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(|e| e.to_string())?;
    Ok(dir)
}
