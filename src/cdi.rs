//! A CDI (Container Device Interface) spec for the view, so CDI-aware
//! runtimes (podman, containerd, CRI-O, docker 25+) give a container the
//! view and the GPU with `--device nvidia.com/gpu=all`.

use serde::Serialize;
use std::path::{Path, PathBuf};

/// The oldest version with every field used here (device hostPath), so
/// that older runtimes (podman 4.3 in Debian 12) accept the spec.
pub const CDI_VERSION: &str = "0.5.0";
pub const KIND: &str = "nvidia.com/gpu";

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<Device>,
    /// Applied once whenever any device of this spec is requested.
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub name: String,
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    /// In the container.
    pub path: PathBuf,
    /// On the host, where it is not the same path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_path: Option<PathBuf>,
}

/// The node at `host` (under `dev`) as the container sees it, under /dev.
fn node(dev: &Path, host: &Path) -> DeviceNode {
    let path = Path::new("/dev").join(host.strip_prefix(dev).unwrap_or(host));
    let host_path = (path != host).then(|| host.to_owned());
    DeviceNode { path, host_path }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub options: Vec<String>,
}

/// What the driver says of one GPU in `/proc/driver/nvidia/gpus/<pci>/information`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML's index, which nvidia-smi and the NVIDIA Container Toolkit
    /// name it by: its place in PCI bus order.
    pub index: usize,
    /// `GPU-<uuid>`.
    pub uuid: String,
    /// The minor of its `/dev/nvidia<minor>`.
    pub minor: u32,
    /// `dddd:bb:dd.f`.
    pub bus_id: String,
}

/// Where the driver's per-GPU files are for device nodes under `dev`:
/// `<dev>/../proc/driver/nvidia/gpus`, as the toolkit's `--dev-root` reads
/// them (`/proc/driver/nvidia/gpus` for `/dev`).
pub fn gpus_dir(dev: &Path) -> PathBuf {
    dev.parent().unwrap_or(Path::new("/")).join("proc/driver/nvidia/gpus")
}

/// The GPUs the driver lists in `dir` (`/proc/driver/nvidia/gpus`), with
/// NVML's indices: NVML enumerates GPUs in PCI bus order. Files that do
/// not say a UUID, a bus location and a minor are left out (and logged).
pub fn gpu_info(dir: &Path) -> Vec<GpuInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, GpuInfo)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join("information");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_owned())
        };
        let (Some(uuid), Some(bus_id), Some(minor)) = (
            field("GPU UUID"),
            field("Bus Location"),
            field("Device Minor").and_then(|m| m.parse().ok()),
        ) else {
            tracing::warn!("{}: no GPU UUID, Bus Location or Device Minor", path.display());
            continue;
        };
        // dddd:bb:dd.f, compared as numbers.
        let key: Vec<u32> = bus_id
            .split([':', '.'])
            .map(|p| u32::from_str_radix(p, 16).unwrap_or(u32::MAX))
            .collect();
        found.push((
            key,
            GpuInfo {
                index: 0,
                uuid,
                minor,
                bus_id,
            },
        ));
    }
    found.sort_by_key(|(key, _)| key.clone());
    found
        .into_iter()
        .enumerate()
        .map(|(index, (_, gpu))| GpuInfo { index, ..gpu })
        .collect()
}

/// The spec for the view mounted at `mountpoint` and the NVIDIA device
/// nodes under `dev`. Each GPU gets the names the NVIDIA Container
/// Toolkit gives it, for the same node: NVML's index (PCI bus order, as
/// nvidia-smi numbers them, which need not be the node's minor) and
/// `GPU-<uuid>`, both from the driver's `/proc/driver/nvidia/gpus` (see
/// [`gpus_dir`]); a node the driver does not list there is named by its
/// minor. Then `all`. The control nodes, the view and the environment
/// come with any.
pub fn generate(mountpoint: &Path, dev: &Path) -> Spec {
    generate_with(mountpoint, dev, &gpu_info(&gpus_dir(dev)))
}

/// [`generate`] with devices of `kind` (`vendor/class`) instead of
/// [`KIND`], so that it can sit beside another spec of that kind.
pub fn generate_kind(mountpoint: &Path, dev: &Path, kind: &str) -> Spec {
    Spec {
        kind: kind.to_owned(),
        ..generate(mountpoint, dev)
    }
}

/// [`generate`] with the GPUs as the driver lists them.
pub fn generate_with(mountpoint: &Path, dev: &Path, info: &[GpuInfo]) -> Spec {
    let nodes = crate::devices::nvidia_device_nodes(dev);
    let gpu_minor = |p: &PathBuf| {
        let name = p.file_name()?.to_str()?;
        let n = name.strip_prefix("nvidia")?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| n.parse::<u32>().ok())
            .flatten()
    };
    let (gpus, control): (Vec<&PathBuf>, Vec<&PathBuf>) = nodes.iter().partition(|p| gpu_minor(p).is_some());
    let device = |name: String, path: &PathBuf| Device {
        container_edits: ContainerEdits {
            env: vec![format!("NVIDIA_VISIBLE_DEVICES={name}")],
            device_nodes: vec![node(dev, path)],
            ..ContainerEdits::default()
        },
        name,
    };
    let node_of = |minor: u32| gpus.iter().find(|p| gpu_minor(p) == Some(minor));
    let mut devices: Vec<Device> = Vec::new();
    // By index, then by UUID, as the toolkit lists them.
    for gpu in info {
        if let Some(path) = node_of(gpu.minor) {
            devices.push(device(gpu.index.to_string(), path));
        }
    }
    for gpu in info {
        if let Some(path) = node_of(gpu.minor) {
            devices.push(device(gpu.uuid.clone(), path));
        }
    }
    // Nodes the driver does not list (no /proc/driver/nvidia here): by minor,
    // unless that name is an index already.
    for path in &gpus {
        let minor = gpu_minor(path).expect("partitioned on it");
        let listed = info.iter().any(|g| g.minor == minor);
        if !listed && !devices.iter().any(|d| d.name == minor.to_string()) {
            devices.push(device(minor.to_string(), path));
        }
    }
    devices.push(Device {
        name: "all".into(),
        container_edits: ContainerEdits {
            env: vec!["NVIDIA_VISIBLE_DEVICES=all".into()],
            device_nodes: gpus.iter().map(|p| node(dev, p)).collect(),
            ..ContainerEdits::default()
        },
    });
    let target = Path::new("/usr/local/nvidia");
    Spec {
        cdi_version: CDI_VERSION.into(),
        kind: KIND.into(),
        devices,
        container_edits: ContainerEdits {
            env: vec![
                format!(
                    "PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    target.join("bin").display()
                ),
                format!(
                    "LD_LIBRARY_PATH={}:{}",
                    target.join("lib64").display(),
                    target.join("lib").display()
                ),
            ],
            device_nodes: control.iter().map(|p| node(dev, p)).collect(),
            mounts: vec![Mount {
                host_path: mountpoint.to_owned(),
                container_path: target.to_owned(),
                // rslave: a wholly new daemon's mount (its supervisor gone too)
                // reaches running containers; a restarted serving process needs nothing.
                // noexec: the mount point's own tmpfs has it (it holds only
                // links), and in a user namespace (rootless podman) a
                // runtime's read-only remount must repeat it or fail with
                // EPERM; the programs themselves are on the FUSE mount below
                // it, which rbind brings along with its own flags.
                options: ["ro", "nosuid", "nodev", "noexec", "rbind", "rslave"]
                    .map(String::from)
                    .to_vec(),
            }],
        },
    }
}

/// Where a mount's own spec sits in its view: a runtime given
/// `<mountpoint>/etc/cdi` as a spec directory (`cdi-spec-dirs` in docker's
/// `daemon.json`) reads the spec of the very view it mounts.
pub const VIEW_SPEC_DIR: &str = "etc/cdi";
pub const VIEW_SPEC_NAME: &str = "nvlibfs.json";

/// The spec a view carries, for runtimes that see the view at `mountpoint`
/// and the device nodes found under `dev` at `/dev` (an outer DIND
/// container given both at the host's paths): no node has a host path
/// of its own. Fails only for paths that are not UTF-8.
pub fn view_spec(mountpoint: &Path, dev: &Path) -> Result<String, String> {
    let mut spec = generate(mountpoint, dev);
    for edits in spec.devices.iter_mut().map(|d| &mut d.container_edits) {
        edits.device_nodes.iter_mut().for_each(|n| n.host_path = None);
    }
    spec.container_edits
        .device_nodes
        .iter_mut()
        .for_each(|n| n.host_path = None);
    let json = serde_json::to_string_pretty(&spec)
        .map_err(|e| format!("the CDI spec for {} cannot be written: {e}", mountpoint.display()))?;
    Ok(json + "\n")
}

/// The directories CDI runtimes read specs from by default, in the order
/// they apply them: a spec in a later one overrides an earlier one's
/// device of the same name.
pub const DEFAULT_SPEC_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// A kind offered where `nvidia.com/gpu` is taken by another spec.
pub const OTHER_KIND: &str = "nvlibfs.io/gpu";

/// Checks a `vendor/class` kind as CDI does (vendor: letters, digits, `-`,
/// `_`, `.`, starting with a letter and ending with a letter or digit;
/// class: letters, digits, `-`, `_`, the same ends).
pub fn check_kind(kind: &str) -> Result<(), String> {
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| format!("--kind {kind:?}: a CDI kind is VENDOR/CLASS, for example {OTHER_KIND}"))?;
    let name_ok = |name: &str, extra: &str| {
        name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    };
    if !name_ok(vendor, "-_.") || !name_ok(class, "-_") {
        return Err(format!(
            "--kind {kind:?}: CDI allows a vendor of letters, digits, '-', '_' and '.', and a class of letters, \
             digits, '-' and '_', each starting with a letter and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Another spec that defines devices of the same kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub path: PathBuf,
    /// Written by the NVIDIA Container Toolkit (`nvidia-ctk cdi generate`):
    /// it names the toolkit's hooks.
    pub toolkit: bool,
}

/// The kind a spec file declares: `"kind"` of a JSON spec, or the
/// top-level `kind:` line of a YAML one.
fn declared_kind(text: &str) -> Option<String> {
    if let Ok(serde_json::Value::Object(spec)) = serde_json::from_str::<serde_json::Value>(text) {
        return spec.get("kind")?.as_str().map(str::to_owned);
    }
    text.lines().find_map(|line| {
        let value = line.strip_prefix("kind:")?.trim();
        Some(value.trim_matches(|c| c == '"' || c == '\'').to_owned())
    })
}

/// The spec files in `dirs` (`.json`, `.yaml`, `.yml`, as CDI reads them)
/// that declare `kind`, but `except` (the file about to be written).
pub fn conflicts(kind: &str, dirs: &[PathBuf], except: Option<&Path>) -> Vec<Conflict> {
    let except = except.map(resolved);
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let spec_like = path
                .extension()
                .is_some_and(|e| e == "json" || e == "yaml" || e == "yml");
            if !spec_like || Some(resolved(&path)) == except {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if declared_kind(&text).as_deref() == Some(kind) {
                found.push(Conflict {
                    toolkit: text.contains("nvidia-cdi-hook") || text.contains("nvidia-ctk"),
                    path,
                });
            }
        }
    }
    found
}

/// What to tell a user whose spec of `kind` would sit beside `others`,
/// as written to `output` (or printed).
pub fn conflict_message(kind: &str, others: &[Conflict], output: Option<&Path>) -> String {
    let mut text = String::new();
    for other in others {
        let whose = if other.toolkit {
            "the NVIDIA Container Toolkit's spec"
        } else {
            "another spec"
        };
        text += &format!("{} is {whose} of kind {kind}\n", other.path.display());
    }
    let same_dir = output.and_then(Path::parent).is_some_and(|dir| {
        others
            .iter()
            .any(|o| o.path.parent().is_some_and(|p| same_path(p, dir)))
    });
    let one_dir = format!(
        "In one directory, two specs of one kind make every device name they share (0, 1, all, GPU-...) \
         unusable: `--device {kind}=all` would fail in every runtime."
    );
    let two_dirs = "In different directories, the one in the later directory (/var/run/cdi after /etc/cdi) silently \
                    takes every device name they share (0, 1, all, GPU-...).";
    text += &match output {
        Some(_) if same_dir => one_dir,
        Some(_) => two_dirs.to_owned(),
        None => format!("{one_dir}\n{two_dirs}"),
    };
    text += &format!(
        "\nGive nvlibfs's spec a kind of its own, `--kind {OTHER_KIND}`, and ask for `--device {OTHER_KIND}=all`; \
         or remove the other spec."
    );
    text
}

fn same_path(a: &Path, b: &Path) -> bool {
    resolved(a) == resolved(b)
}

/// `path` with its directory's links resolved (`/var/run` is `/run`), so
/// that two names of one file compare equal; the file itself need not
/// exist yet.
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map_or(absolute.clone(), |d| d.join(name)),
        _ => absolute,
    }
}
