//! Which host files make up NVIDIA's driver user space.
//!
//! One table, kept as data: the names NVIDIA's own container stack matches
//! (libnvidia-container `nvc_info.c`, nvidia-container-toolkit `nvcdi`), so
//! that nvlibfs serves the same set a `--gpus` container would get. Anything
//! not named here is never served.

/// The `--gpus` capability a library belongs to; shown in scan output so a
/// user can tell why a file is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Utility,
    Compute,
    Video,
    Graphics,
    Ngx,
}

/// How a library's file name carries its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versioning {
    /// `libcuda.so.580.159.04`: must equal the pinned driver version.
    Driver,
    /// `libnvidia-egl-wayland.so.1.1.13`: released on its own schedule, so
    /// the driver pin says nothing about it.
    Own,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LibrarySpec {
    /// File name up to `.so`, e.g. `libcuda`.
    pub name: &'static str,
    pub capability: Capability,
    pub versioning: Versioning,
    /// Directory below the library directory that loaders search, e.g.
    /// libvdpau looks in `<libdir>/vdpau/`.
    pub subdir: Option<&'static str>,
}

const fn lib(name: &'static str, capability: Capability) -> LibrarySpec {
    LibrarySpec {
        name,
        capability,
        versioning: Versioning::Driver,
        subdir: None,
    }
}

const fn own(name: &'static str) -> LibrarySpec {
    LibrarySpec {
        name,
        capability: Capability::Graphics,
        versioning: Versioning::Own,
        subdir: None,
    }
}

use Capability::*;

pub const LIBRARIES: &[LibrarySpec] = &[
    lib("libnvidia-ml", Utility),
    lib("libnvidia-cfg", Utility),
    lib("libnvidia-nscq", Utility),
    lib("libcuda", Compute),
    lib("libcudadebugger", Compute),
    lib("libnvidia-opencl", Compute),
    lib("libnvidia-gpucomp", Compute),
    lib("libnvidia-ptxjitcompiler", Compute),
    lib("libnvidia-fatbinaryloader", Compute),
    lib("libnvidia-allocator", Compute),
    lib("libnvidia-compiler", Compute),
    lib("libnvidia-pkcs11", Compute),
    lib("libnvidia-pkcs11-openssl3", Compute),
    lib("libnvidia-nvvm", Compute),
    lib("libnvidia-tileiras", Compute),
    LibrarySpec {
        subdir: Some("vdpau"),
        ..lib("libvdpau_nvidia", Video)
    },
    lib("libnvidia-encode", Video),
    lib("libnvidia-opticalflow", Video),
    lib("libnvcuvid", Video),
    lib("libnvidia-eglcore", Graphics),
    lib("libnvidia-glcore", Graphics),
    lib("libnvidia-tls", Graphics),
    lib("libnvidia-glsi", Graphics),
    lib("libnvidia-fbc", Graphics),
    lib("libnvidia-ifr", Graphics),
    lib("libnvidia-rtcore", Graphics),
    lib("libnvoptix", Graphics),
    lib("libGLX_nvidia", Graphics),
    lib("libEGL_nvidia", Graphics),
    lib("libGLESv2_nvidia", Graphics),
    lib("libGLESv1_CM_nvidia", Graphics),
    lib("libnvidia-glvkspirv", Graphics),
    lib("libnvidia-cbl", Graphics),
    lib("libnvidia-vulkan-producer", Graphics),
    lib("libnvidia-ngx", Ngx),
    own("libnvidia-egl-gbm"),
    own("libnvidia-egl-wayland"),
    own("libnvidia-egl-wayland2"),
    own("libnvidia-egl-xcb"),
    own("libnvidia-egl-xlib"),
];

/// Debian's multiarch directory names for this host's 64- and 32-bit
/// libraries (`/usr/lib/<triplet>`): where distributions install the driver.
#[cfg(target_arch = "x86_64")]
pub const TRIPLETS: [&str; 2] = ["x86_64-linux-gnu", "i386-linux-gnu"];
#[cfg(target_arch = "aarch64")]
pub const TRIPLETS: [&str; 2] = ["aarch64-linux-gnu", "arm-linux-gnueabihf"];

/// Name a GLVND-based client loads for indirect GLX; NVIDIA's stack links it
/// to the GLX vendor library, and so does the view.
pub const GLX_INDIRECT: (&str, &str) = ("libGLX_indirect.so.0", "libGLX_nvidia");

/// The GBM backend Mesa's libgbm loads for the NVIDIA DRM driver
/// (`gbm/nvidia-drm_gbm.so`, beside the libraries); NVIDIA's installer
/// links it to the allocator library's SONAME, and so does the view.
pub const GBM_BACKEND: (&str, &str) = ("gbm/nvidia-drm_gbm.so", "libnvidia-allocator");

pub const BINARIES: &[&str] = &[
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nv-fabricmanager",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    "nvidia-imex",
    "nvidia-imex-ctl",
];

/// Firmware lives in `<search dir>/nvidia/<driver version>/` under these names.
pub fn is_firmware_name(name: &str) -> bool {
    name.starts_with("gsp") && name.ends_with(".bin")
}

/// Where a vendor config file sits: below `/usr/share` or `/etc` on the host,
/// and below `share/` or `etc/` in the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigBase {
    Share,
    Etc,
}

impl ConfigBase {
    /// The host directory, relative to the driver root.
    pub fn host_dir(self) -> &'static str {
        match self {
            ConfigBase::Share => "usr/share",
            ConfigBase::Etc => "etc",
        }
    }

    /// The view directory; also the directory below a flat driver tree.
    pub fn view_dir(self) -> &'static str {
        match self {
            ConfigBase::Share => "share",
            ConfigBase::Etc => "etc",
        }
    }
}

#[derive(Debug)]
pub struct ConfigSpec {
    pub base: ConfigBase,
    pub path: &'static str,
    /// Whether it comes with the driver (and must be of its version) or
    /// with a library released on its own schedule.
    pub versioning: Versioning,
}

const fn share(path: &'static str) -> ConfigSpec {
    ConfigSpec {
        base: ConfigBase::Share,
        path,
        versioning: Versioning::Driver,
    }
}

/// An EGL external platform's config: it names one of the
/// `libnvidia-egl-*` libraries, which have their own versions.
const fn egl_platform(path: &'static str) -> ConfigSpec {
    ConfigSpec {
        versioning: Versioning::Own,
        ..share(path)
    }
}

const fn etc(path: &'static str) -> ConfigSpec {
    ConfigSpec {
        base: ConfigBase::Etc,
        path,
        versioning: Versioning::Driver,
    }
}

/// Vendor configs. They name libraries by SONAME, so they are served as they
/// are, with no rewriting.
pub const CONFIGS: &[ConfigSpec] = &[
    share("glvnd/egl_vendor.d/10_nvidia.json"),
    egl_platform("egl/egl_external_platform.d/15_nvidia_gbm.json"),
    egl_platform("egl/egl_external_platform.d/10_nvidia_wayland.json"),
    egl_platform("egl/egl_external_platform.d/09_nvidia_wayland2.json"),
    egl_platform("egl/egl_external_platform.d/20_nvidia_xcb.json"),
    egl_platform("egl/egl_external_platform.d/20_nvidia_xlib.json"),
    share("nvidia/nvoptix.bin"),
    share("vulkan/icd.d/nvidia_icd.json"),
    share("vulkan/icd.d/nvidia_icd.x86_64.json"),
    share("vulkan/implicit_layer.d/nvidia_layers.json"),
    etc("vulkan/icd.d/nvidia_icd.json"),
    etc("vulkan/implicit_layer.d/nvidia_layers.json"),
    etc("OpenCL/vendors/nvidia.icd"),
];

/// The vendor config a file in a driver tree is, by its name (the first
/// of the same name, as the view has one place for each).
pub fn config_named(file_name: &str) -> Option<&'static ConfigSpec> {
    CONFIGS
        .iter()
        .find(|spec| spec.path.rsplit('/').next() == Some(file_name))
}

/// A library file name split at `.so`: `libcuda.so.580.159.04` is
/// (`libcuda`, `580.159.04`); `libcuda.so` is (`libcuda`, ``).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibraryName<'a> {
    pub spec: &'static LibrarySpec,
    /// What follows `.so.`, empty for the bare development name.
    pub suffix: &'a str,
}

/// ```
/// use nvlibfs::catalog::{parse_library_name, Versioning};
///
/// let cuda = parse_library_name("libcuda.so.580.159.04").unwrap();
/// assert_eq!((cuda.spec.name, cuda.suffix), ("libcuda", "580.159.04"));
/// assert_eq!(cuda.spec.versioning, Versioning::Driver);
/// // The development name, and names not NVIDIA's driver.
/// assert_eq!(parse_library_name("libcuda.so").unwrap().suffix, "");
/// assert!(parse_library_name("libfoo.so.1").is_none());
/// assert!(parse_library_name("libcuda.sofa").is_none());
/// ```
pub fn parse_library_name(file_name: &str) -> Option<LibraryName<'_>> {
    let (stem, suffix) = match file_name.find(".so") {
        Some(i) => {
            let rest = &file_name[i + 3..];
            match rest.strip_prefix('.') {
                Some(s) if !s.is_empty() => (&file_name[..i], s),
                _ if rest.is_empty() => (&file_name[..i], ""),
                _ => return None,
            }
        }
        None => return None,
    };
    LIBRARIES
        .iter()
        .find(|spec| spec.name == stem)
        .map(|spec| LibraryName { spec, suffix })
}

/// Names that look like NVIDIA's but are not in the table: worth reporting
/// when found in shared library directories, where everything else is the
/// distribution's business and silently skipped.
pub fn looks_like_nvidia(file_name: &str) -> bool {
    file_name.to_ascii_lowercase().contains("nvidia")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_library_names() {
        let n = parse_library_name("libcuda.so.580.159.04").unwrap();
        assert_eq!((n.spec.name, n.suffix), ("libcuda", "580.159.04"));
        let n = parse_library_name("libnvidia-pkcs11-openssl3.so.1").unwrap();
        assert_eq!((n.spec.name, n.suffix), ("libnvidia-pkcs11-openssl3", "1"));
        assert_eq!(parse_library_name("libcuda.so").unwrap().suffix, "");
        assert!(parse_library_name("libcudart.so.12").is_none());
        assert!(parse_library_name("libcuda.so.").is_none());
        assert!(parse_library_name("libcuda.sox").is_none());
        assert!(parse_library_name("libcuda").is_none());
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in LIBRARIES.iter().enumerate() {
            assert!(LIBRARIES[i + 1..].iter().all(|b| b.name != a.name), "{}", a.name);
        }
    }
}
