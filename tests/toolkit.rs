//! nvlibfs held against the NVIDIA Container Toolkit (v1.18.0, built from
//! its source, see tests/common/toolkit.rs) on the same fixture host: the
//! toolkit's own `nvidia-ctk cdi generate` reads the fixture's NVML and
//! device nodes, and its spec is what nvlibfs's view and spec must cover.

mod common;

use common::toolkit;
use common::{nvlibfs, ok, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::{gpus, FixtureSpec};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What the toolkit's spec does that nvlibfs's does not, each with the
/// reason; docs/toolkit.md ("Beside the NVIDIA Container Toolkit") lists the
/// same. Anything else the toolkit's spec holds and nvlibfs lacks fails
/// the completeness test.
const ALLOWED: &[(&str, &str)] = &[
    (
        "env NVIDIA_CTK_LIBCUDA_DIR",
        "read only by the toolkit's own hooks (enable-cuda-compat) to find where it mounted libcuda; \
         nvlibfs's libcuda is always at /usr/local/nvidia/lib64",
    ),
    (
        "env NVIDIA_VISIBLE_DEVICES=void",
        "tells the toolkit's legacy runtime hook to inject nothing more; nvlibfs sets NVIDIA_VISIBLE_DEVICES \
         per device to the device's name instead",
    ),
    (
        "hook update-ldcache",
        "runs the image's ldconfig in every container; nvlibfs's spec sets LD_LIBRARY_PATH to the view, \
         which needs no ldconfig and works in images without one",
    ),
    (
        "hook enable-cuda-compat",
        "puts an image's /usr/local/cuda/compat libraries ahead of the host's when they are newer; \
         nvlibfs does not (README: forward compatibility)",
    ),
    (
        "hook disable-device-node-modification",
        "hides /proc/driver/nvidia/params behind a copy with ModifyDeviceFiles: 0 so NVML inside does \
         not create device nodes; nvlibfs's spec gives the nodes and leaves params as the host has it",
    ),
];

fn allowed(what: &str) -> bool {
    ALLOWED.iter().any(|(a, _)| *a == what)
}

/// A fixture host with device nodes, whose libnvidia-ml answers NVML for
/// `n` GPUs numbered by the driver in the opposite order to PCI's.
fn host_spec(n: u32) -> FixtureSpec {
    FixtureSpec {
        gpus: gpus(n, true),
        device_nodes: true,
        ..FixtureSpec::new(VERSION)
    }
}

fn toolkit_spec(driver_root: &Path, dev_root: &Path) -> Value {
    toolkit::generate(driver_root, dev_root).unwrap_or_else(|e| panic!("nvidia-ctk cdi generate: {e}"))
}

fn nvlibfs_spec(mountpoint: &Path, dev: &Path) -> Value {
    let out = nvlibfs()
        .args(["cdi", "generate", "--mountpoint"])
        .arg(mountpoint)
        .arg("--dev")
        .arg(dev)
        .output()
        .unwrap();
    serde_json::from_str(&ok(out, "nvlibfs cdi generate")).expect("the spec is JSON")
}

fn list<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v[key].as_array().into_iter().flatten()
}

/// (container path, host path) of each device node in `edits`.
fn nodes(edits: &Value) -> BTreeSet<(String, String)> {
    list(edits, "deviceNodes")
        .map(|n| {
            let path = n["path"].as_str().unwrap().to_owned();
            let host = n["hostPath"].as_str().map_or_else(|| path.clone(), str::to_owned);
            (path, host)
        })
        .collect()
}

/// Device name -> its device nodes.
fn devices(spec: &Value) -> BTreeMap<String, BTreeSet<(String, String)>> {
    list(spec, "devices")
        .map(|d| (d["name"].as_str().unwrap().to_owned(), nodes(&d["containerEdits"])))
        .collect()
}

/// The names users write for the toolkit's GPUs (NVML's index, `GPU-<uuid>`,
/// `all`) give the same device nodes in nvlibfs's spec, where the driver's
/// minors run against the PCI order NVML numbers by.
#[test]
fn every_device_name_of_the_toolkit_gives_the_same_nodes() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&host_spec(3), &dir.path().join("host")).expect("fixture builds");
    let root = &fixture.root;
    let theirs = devices(&toolkit_spec(root, root));
    let ours = devices(&nvlibfs_spec(Path::new("/run/nvlibs"), &root.join("dev")));

    let mut expected: BTreeSet<String> = ["all".to_owned()].into();
    for g in &fixture.gpus {
        expected.insert(g.index.to_string());
        expected.insert(g.uuid.clone());
    }
    assert_eq!(
        theirs.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the toolkit's names"
    );
    // The test means something only where the numberings differ: NVML's
    // index 0 is the driver's last minor.
    let node = |minor: u32| {
        let path = format!("/dev/nvidia{minor}");
        (path, root.join(format!("dev/nvidia{minor}")).display().to_string())
    };
    assert_eq!(theirs["0"], [node(2)].into(), "the toolkit names GPU 0 by NVML's index");
    assert_eq!(ours, theirs, "nvlibfs's names and nodes against the toolkit's");
}

/// Everything the toolkit's spec gives a container is in nvlibfs's view
/// (at the same path below the view as in the toolkit's container, with
/// the same bytes) or nvlibfs's spec, or is listed in ALLOWED with why.
#[test]
fn everything_the_toolkits_spec_gives_is_in_the_view_or_allowed() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(host_spec(2), &[]);
    let root = &m.fixture.root;
    let theirs = toolkit_spec(root, root);
    let ours = nvlibfs_spec(&m.mountpoint, &root.join("dev"));
    let mut missing = Vec::new();

    // Files: each at its container path in the view, the same bytes.
    let edits = &theirs["containerEdits"];
    let mut files = 0;
    for mount in list(edits, "mounts") {
        let host = Path::new(mount["hostPath"].as_str().unwrap());
        let inside = mount["containerPath"].as_str().unwrap();
        let in_view = m.mountpoint.join(inside.trim_start_matches('/'));
        match std::fs::read(&in_view) {
            Ok(bytes) if bytes == std::fs::read(host).unwrap() => files += 1,
            Ok(_) => missing.push(format!(
                "file {inside}: other bytes in the view than {}",
                host.display()
            )),
            Err(e) => missing.push(format!("file {inside} ({}): {e}", host.display())),
        }
    }
    assert!(files >= 40, "the toolkit mounted only {files} files:\n{theirs:#}");

    // Links its create-symlinks hook makes in every container: the view
    // has each, leading to the same file.
    let mut links = 0;
    for hook in list(edits, "hooks") {
        let args: Vec<&str> = list(hook, "args").map(|a| a.as_str().unwrap()).collect();
        let command = args.get(1).copied().unwrap_or_default();
        if command != "create-symlinks" {
            if !allowed(&format!("hook {command}")) {
                missing.push(format!("hook {args:?}"));
            }
            continue;
        }
        for pair in args.windows(2).filter(|w| w[0] == "--link").map(|w| w[1]) {
            let (target, link) = pair.split_once("::").unwrap();
            let link = link.trim_start_matches('/');
            // Lexically: the link's directory need not exist on the host.
            let wanted = std::fs::read(lexical(&root.join(Path::new(link).parent().unwrap()).join(target)));
            let in_view = std::fs::read(m.mountpoint.join(link));
            match (wanted, in_view) {
                (Ok(a), Ok(b)) if a == b => links += 1,
                (wanted, in_view) => missing.push(format!(
                    "link /{link} -> {target}: host {:?}, view {:?}",
                    wanted.map(|b| b.len()),
                    in_view.map(|b| b.len())
                )),
            }
        }
    }
    assert!(links >= 25, "only {links} links checked");

    // Device nodes: the toolkit's `all` and spec-wide ones, in nvlibfs's.
    let our_all = &devices(&ours)["all"];
    let our_nodes: BTreeSet<_> = nodes(&ours["containerEdits"]).union(our_all).cloned().collect();
    let their_all = &devices(&theirs)["all"];
    for node in nodes(edits).union(their_all) {
        if !our_nodes.contains(node) {
            missing.push(format!("device node {node:?}"));
        }
    }

    // Environment: the toolkit's values, in nvlibfs's spec (any device's
    // or spec-wide), or allowed by name (or name=value).
    let our_env: BTreeSet<&str> = list(&ours["containerEdits"], "env")
        .chain(list(&ours, "devices").flat_map(|d| list(&d["containerEdits"], "env")))
        .map(|e| e.as_str().unwrap())
        .collect();
    for env in list(edits, "env").map(|e| e.as_str().unwrap()) {
        let name = env.split('=').next().unwrap();
        if !our_env.contains(env) && !allowed(&format!("env {name}")) && !allowed(&format!("env {env}")) {
            missing.push(format!("env {env}"));
        }
    }
    assert!(
        missing.is_empty(),
        "what the toolkit's spec gives and nvlibfs's view and spec do not (add it, or list it in ALLOWED and \
         README.md with why):\n  {}",
        missing.join("\n  ")
    );
}

/// `path` with its `..` taken away by name, as a link's target resolves
/// in a directory the host does not have.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// docs/toolkit.md lists each allowed difference, with its reason.
#[test]
fn the_readme_lists_every_allowed_difference() {
    let section = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/toolkit.md")).unwrap();
    assert!(section.starts_with("# Beside the NVIDIA Container Toolkit"));
    for (what, _) in ALLOWED {
        let (kind, name) = what.split_once(' ').unwrap();
        assert!(
            section.contains(&format!("`{name}`")),
            "docs/toolkit.md does not list the {kind} `{name}`"
        );
    }
}

/// `nvidia-ctk cdi generate --driver-root <mounted view>` finds every
/// file it finds on the host, with the same bytes; where it puts them in
/// a container is another matter (README: the view as the toolkit's
/// driver root).
#[test]
fn the_toolkit_finds_every_pinned_file_in_the_view() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(host_spec(2), &[]);
    let root = &m.fixture.root;
    let by_name = |spec: &Value| -> BTreeMap<String, PathBuf> {
        list(&spec["containerEdits"], "mounts")
            .map(|mount| {
                let host = PathBuf::from(mount["hostPath"].as_str().unwrap());
                (host.file_name().unwrap().to_string_lossy().into_owned(), host)
            })
            .collect()
    };
    let on_host = by_name(&toolkit_spec(root, root));
    let view_spec = toolkit_spec(&m.mountpoint, root);
    let in_view = by_name(&view_spec);
    assert_eq!(
        in_view.keys().collect::<Vec<_>>(),
        on_host.keys().collect::<Vec<_>>(),
        "the files the toolkit finds in the view and on the host"
    );
    for (name, host) in &on_host {
        let view = &in_view[name];
        assert!(view.starts_with(&m.mountpoint), "{} is not in the view", view.display());
        assert_eq!(std::fs::read(view).unwrap(), std::fs::read(host).unwrap(), "{name}");
    }
    // It resolves the view's top-level links into the live generation:
    // containers would get the libraries at /.live/lib64 (README says why).
    let libcuda = list(&view_spec["containerEdits"], "mounts")
        .find(|m| {
            m["hostPath"]
                .as_str()
                .unwrap()
                .ends_with(&format!("libcuda.so.{VERSION}"))
        })
        .unwrap();
    assert_eq!(
        libcuda["containerPath"].as_str().unwrap(),
        format!("/.live/lib64/libcuda.so.{VERSION}")
    );
}

/// A host with the toolkit's spec (kind nvidia.com/gpu) in /etc/cdi:
/// `nvlibfs cdi generate` refuses to write a spec of the same kind beside
/// it, saying why and what to pass; with `--kind nvlibfs.io/gpu` both
/// work in podman, each giving its own files. And the refusal is right:
/// two specs of one kind in one directory make podman refuse the device.
/// Runs in a mount namespace of its own whose /etc/cdi and /var/run/cdi
/// are empty, so that nothing on the shared host sees these specs.
#[test]
fn beside_the_toolkits_spec_in_podman() {
    common::require("podman", "podman");
    common::require("unshare", "util-linux");
    common::require_fixture_tools();
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(host_spec(2), &[]);
    let root = &m.fixture.root;
    let work = m.dir.path();
    let theirs = toolkit_spec(root, root);
    std::fs::write(work.join("toolkit.json"), theirs.to_string()).unwrap();
    let image = "nvlibfs-cdi-test";
    let podman = "podman --cgroup-manager cgroupfs --events-backend file";
    if common::images::run(std::process::Command::new("sh").args(["-c", &format!("{podman} image exists {image}")]))
        .is_err()
    {
        let tar = common::images::inner_rootfs().unwrap_or_else(|e| panic!("building the image's root: {e}"));
        common::images::run(
            std::process::Command::new("sh")
                .args(["-c", &format!("{podman} import --quiet {} {image}", tar.display())]),
        )
        .unwrap_or_else(|e| panic!("podman import: {e}"));
    }
    let nvlibfs_bin = env!("CARGO_BIN_EXE_nvlibfs");
    let run_with = |device: &str, script: &str| {
        format!(
            "{podman} run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
             --device={device} --volume={}:/work:ro {image} sh -c '{script}'",
            work.display()
        )
    };
    let load = "/work/nvlibfs-load libcuda.so.1 libnvidia-ml.so.1";
    let script = format!(
        r#"set -u
exec 2>&1
for d in /etc/cdi /var/run/cdi; do mkdir -p $d; mount -t tmpfs nvlibfs-test $d; done
cp {work}/toolkit.json /etc/cdi/nvidia.json
echo "== refused"
{nvlibfs_bin} cdi generate --mountpoint {mnt} --dev {root}/dev --output /etc/cdi/nvlibfs.json; echo "exit $?"
ls /etc/cdi
echo "== own kind"
{nvlibfs_bin} cdi generate --kind nvlibfs.io/gpu --mountpoint {mnt} --dev {root}/dev --output /etc/cdi/nvlibfs.json || exit 1
echo "== nvlibfs"
{ours} || exit 1
echo "== toolkit"
{toolkit} || exit 1
echo "== same kind"
{nvlibfs_bin} cdi generate --mountpoint {mnt} --dev {root}/dev > /etc/cdi/nvlibfs.json
{same}; echo "exit $?"
"#,
        work = work.display(),
        mnt = m.mountpoint.display(),
        root = root.display(),
        ours = run_with(
            "nvlibfs.io/gpu=all",
            &format!("ls /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl && {load} && echo LD_LIBRARY_PATH=$LD_LIBRARY_PATH")
        ),
        toolkit = run_with(
            "nvidia.com/gpu=0",
            &format!("ls /dev/nvidia1 && {load} && ls -l /usr/lib/x86_64-linux-gnu/libcuda.so.1")
        ),
        same = run_with("nvidia.com/gpu=all", "true"),
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let part = |name: &str| -> &str {
        let start = text
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no {name}:\n{text}"));
        let rest = &text[start + name.len() + 4..];
        &rest[..rest.find("\n== ").unwrap_or(rest.len())]
    };
    let refused = part("refused");
    assert!(
        refused.contains("exit 1")
            && refused.contains("/etc/cdi/nvidia.json is the NVIDIA Container Toolkit's spec of kind nvidia.com/gpu")
            && refused.contains("--kind nvlibfs.io/gpu")
            // and wrote nothing: /etc/cdi holds the toolkit's spec alone.
            && refused.trim_end().ends_with("exit 1\nnvidia.json"),
        "nvlibfs wrote a spec that breaks the toolkit's, or said not why:\n{text}"
    );
    let ours = part("nvlibfs");
    assert!(ours.contains(&format!("libcuda.so.1 {VERSION}")), "{text}");
    assert!(ours.contains("LD_LIBRARY_PATH=/usr/local/nvidia/lib64"), "{text}");
    let toolkit = part("toolkit");
    assert!(toolkit.contains(&format!("libcuda.so.1 {VERSION}")), "{text}");
    assert!(
        toolkit.contains(&format!("libcuda.so.1 -> libcuda.so.{VERSION}")),
        "the toolkit's create-symlinks hook ran:\n{text}"
    );
    let same = part("same kind");
    assert!(
        !same.contains("exit 0") && same.contains("nvidia.com/gpu=all"),
        "podman took a device two specs of one directory define:\n{text}"
    );
}

/// Forward compatibility: an image with a newer `libcuda` in
/// /usr/local/cuda/compat (590 against the host's 580). Under the
/// toolkit's spec its enable-cuda-compat hook puts the compat library
/// first; under nvlibfs's spec the view's `LD_LIBRARY_PATH` comes first,
/// so the host's loads; `--env LD_LIBRARY_PATH=...` does not change that
/// (the runtime applies the spec's variables over the user's); the
/// compat directory put ahead in the container's own command does
/// (README: forward compatibility). What happens, asserted.
#[test]
fn an_image_with_newer_cuda_compat_libraries_under_each_spec() {
    common::require("podman", "podman");
    common::require("unshare", "util-linux");
    common::require_fixture_tools();
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(host_spec(1), &[]);
    let root = &m.fixture.root;
    let work = m.dir.path();
    std::fs::write(work.join("toolkit.json"), toolkit_spec(root, root).to_string()).unwrap();
    let compat_version = "590.10.01";
    // What a user's entrypoint would do: the compat directory first.
    let first = work.join("compat-first");
    std::fs::write(
        &first,
        "#!/bin/sh\nLD_LIBRARY_PATH=/usr/local/cuda/compat:$LD_LIBRARY_PATH exec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&first, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image = compat_image(compat_version);
    let podman = "podman --cgroup-manager cgroupfs --events-backend file";
    let nvlibfs_bin = env!("CARGO_BIN_EXE_nvlibfs");
    let run_with = |flags: &str| {
        format!(
            "{podman} run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 {flags} \
             --volume={}:/work:ro {image} /work/nvlibfs-load libcuda.so.1",
            work.display()
        )
    };
    let script = format!(
        r#"set -u
exec 2>&1
for d in /etc/cdi /var/run/cdi; do mkdir -p $d; mount -t tmpfs nvlibfs-test $d; done
cp {work}/toolkit.json /etc/cdi/nvidia.json
{nvlibfs_bin} cdi generate --kind nvlibfs.io/gpu --mountpoint {mnt} --dev {root}/dev --output /etc/cdi/nvlibfs.json || exit 1
echo "== toolkit"
{toolkit} || exit 1
echo "== nvlibfs"
{ours} || exit 1
echo "== nvlibfs, --env"
{env} || exit 1
echo "== nvlibfs, compat first"
{first} || exit 1
echo "== end"
"#,
        work = work.display(),
        mnt = m.mountpoint.display(),
        root = root.display(),
        toolkit = run_with("--device=nvidia.com/gpu=all"),
        ours = run_with("--device=nvlibfs.io/gpu=all"),
        env = run_with(
            "--device=nvlibfs.io/gpu=all \
             --env=LD_LIBRARY_PATH=/usr/local/cuda/compat:/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
        ),
        first = run_with("--device=nvlibfs.io/gpu=all --entrypoint=/work/compat-first"),
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let part = |name: &str| -> &str {
        let start = text
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no {name}:\n{text}"));
        let rest = &text[start + name.len() + 4..];
        &rest[..rest.find("\n== ").unwrap_or(rest.len())]
    };
    let loads = |name: &str, version: &str| {
        assert!(
            part(name).contains(&format!("libcuda.so.1 {version}")),
            "{name}: libcuda {version} expected:\n{text}"
        );
    };
    loads("toolkit", compat_version);
    loads("nvlibfs", VERSION);
    loads("nvlibfs, --env", VERSION);
    loads("nvlibfs, compat first", compat_version);
}

/// A podman image of the cached Debian root with a CUDA forward
/// compatibility library of `version` in /usr/local/cuda/compat (and its
/// SONAME link), as CUDA images that ship `cuda-compat` have it.
fn compat_image(version: &str) -> String {
    let tag = format!("nvlibfs-test-28-compat-{version}");
    let podman = || {
        let mut c = std::process::Command::new("podman");
        c.args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        c
    };
    if common::images::run(podman().args(["image", "exists", &tag])).is_ok() {
        return tag;
    }
    let _building = common::images::cache_lock(&tag).unwrap();
    if common::images::run(podman().args(["image", "exists", &tag])).is_ok() {
        return tag;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("root");
    std::fs::create_dir_all(&rootfs).unwrap();
    let tar = common::images::inner_rootfs().unwrap_or_else(|e| panic!("building the image's root: {e}"));
    common::images::run(
        std::process::Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-xf")
            .arg(&tar),
    )
    .unwrap();
    let compat = rootfs.join("usr/local/cuda/compat");
    let libcuda = nvlibfs::catalog::LIBRARIES
        .iter()
        .find(|l| l.name == "libcuda")
        .unwrap();
    let (file, soname) = nvlibfs_fixture::write_library(&compat, libcuda, version).unwrap();
    std::os::unix::fs::symlink(&file, compat.join(&soname)).unwrap();
    let import = format!(
        "tar -C '{}' -c . | podman --cgroup-manager cgroupfs --events-backend file import - {tag}",
        rootfs.display()
    );
    common::images::run(std::process::Command::new("sh").args(["-c", &import]))
        .unwrap_or_else(|e| panic!("podman import: {e}"));
    tag
}

/// Debian 13's real driver packages (550), installed by dpkg into a
/// Debian root: the toolkit (in its management mode, which needs no GPU
/// to answer NVML) finds its files through Debian's alternatives and
/// `nvidia/current` directory; every file it would mount is in the view
/// with the same bytes, and every library link its hook makes is in the
/// view's lib64.
#[test]
fn on_debians_packages_every_file_the_toolkit_finds_is_in_the_view() {
    common::require("dpkg", "dpkg");
    common::require("apt-get", "apt");
    common::require("chroot", "coreutils");
    common::images::require_image_tools();
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let debs = common::packages::fetch().expect("fetching Debian's NVIDIA packages");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    common::packages::debian_root(&root).unwrap();
    common::packages::dpkg_install(&root, &debs.join("trixie")).unwrap();
    let current = root.join("usr/lib/x86_64-linux-gnu/nvidia/current");
    let version = std::fs::read_dir(&current)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("libcuda.so.")
                .filter(|v| v.contains('.'))
                .map(str::to_owned)
        })
        .expect("Debian's libcuda.so.<version>");
    std::fs::create_dir_all(root.join("sys/module/nvidia")).unwrap();
    std::fs::write(root.join("sys/module/nvidia/version"), format!("{version}\n")).unwrap();
    // Stand-in nodes: the toolkit wants some under its --dev-root.
    std::fs::create_dir_all(root.join("dev")).unwrap();
    for (name, minor) in [("nvidia0", "0"), ("nvidiactl", "255")] {
        ok(
            std::process::Command::new("mknod")
                .arg(root.join("dev").join(name))
                .args(["c", "195", minor])
                .output()
                .unwrap(),
            "mknod",
        );
    }
    let theirs = toolkit::generate_with(&root, &root, &["--mode", "management"])
        .unwrap_or_else(|e| panic!("nvidia-ctk cdi generate --mode management: {e}"));
    let mnt = dir.path().join("mnt");
    let state = dir.path().join("state");
    ok(
        common::mount_root_command(&root, &state).arg(&mnt).output().unwrap(),
        "nvlibfs mount",
    );
    let _unmount = common::UnmountOnDrop(mnt.clone(), state.clone());
    let scan = nvlibfs()
        .args(["scan", "--json", "--driver-root"])
        .arg(&root)
        .arg("--module-version-file")
        .arg(root.join("sys/module/nvidia/version"))
        .output()
        .unwrap();
    let scan: Value = serde_json::from_str(&ok(scan, "nvlibfs scan --json")).unwrap();
    // Host file (resolved) -> its path in the view.
    let served: BTreeMap<PathBuf, String> = list(&scan, "files")
        .filter_map(|f| {
            let source = root.join(f["source"].as_str()?.trim_start_matches('/'));
            Some((std::fs::canonicalize(source).ok()?, f["path"].as_str()?.to_owned()))
        })
        .collect();
    let edits = &theirs["containerEdits"];
    let mut missing = Vec::new();
    let mut files = 0;
    for mount in list(edits, "mounts") {
        let host = std::fs::canonicalize(mount["hostPath"].as_str().unwrap()).unwrap();
        match served.get(&host) {
            Some(path) if std::fs::read(mnt.join(path)).unwrap() == std::fs::read(&host).unwrap() => files += 1,
            Some(path) => missing.push(format!("{}: other bytes at {path}", host.display())),
            None => missing.push(format!("{} is not served", host.display())),
        }
    }
    assert!(files >= 6, "the toolkit found only {files} files:\n{theirs:#}");
    let mut links = 0;
    for hook in list(edits, "hooks") {
        let args: Vec<&str> = list(hook, "args").map(|a| a.as_str().unwrap()).collect();
        if args.get(1) != Some(&"create-symlinks") {
            continue;
        }
        for pair in args.windows(2).filter(|w| w[0] == "--link").map(|w| w[1]) {
            let (_, link) = pair.split_once("::").unwrap();
            let name = Path::new(link).file_name().unwrap();
            if mnt.join("lib64").join(name).exists() {
                links += 1;
            } else {
                missing.push(format!("link {link}"));
            }
        }
    }
    assert!(links >= 4, "only {links} links checked:\n{theirs:#}");
    assert!(
        missing.is_empty(),
        "what the toolkit finds in Debian's {version} packages and the view lacks:\n  {}",
        missing.join("\n  ")
    );
}
