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

/// The spec for the view mounted at `mountpoint` and the NVIDIA device
/// nodes under `dev`: one device per GPU (`/dev/nvidiaN`, named `N`) and
/// `all`; the control nodes, the view and the environment come with any.
pub fn generate(mountpoint: &Path, dev: &Path) -> Spec {
    let nodes = crate::devices::nvidia_device_nodes(dev);
    let gpu_index = |p: &PathBuf| {
        let name = p.file_name()?.to_str()?;
        let n = name.strip_prefix("nvidia")?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.to_owned())
    };
    let (gpus, control): (Vec<&PathBuf>, Vec<&PathBuf>) = nodes.iter().partition(|p| gpu_index(p).is_some());
    let mut devices: Vec<Device> = gpus
        .iter()
        .map(|p| {
            let index = gpu_index(p).expect("partitioned on it");
            Device {
                name: index.clone(),
                container_edits: ContainerEdits {
                    env: vec![format!("NVIDIA_VISIBLE_DEVICES={index}")],
                    device_nodes: vec![node(dev, p)],
                    ..ContainerEdits::default()
                },
            }
        })
        .collect();
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
