//! A Kubernetes GPU node as the kubelet drives it, with no kubelet: Debian
//! 13's containerd 1.7 (CDI on) and the host's runc, driven over the CRI
//! socket by tests/cri/kubelet.py, a client generated from the CRI's
//! api.proto (../shared/peers) with grpcio-tools, making the kubelet's
//! calls. GPU pods get the driver through the CDI field
//! (`nvidia.com/gpu=all`, from the spec the view carries) and as a hostPath
//! volume (HostToContainer), as root and as uid 1000; the DaemonSet's own
//! pod (contrib/Dockerfile's image of this build, the manifest's command,
//! volumes and privileges) serves the node; a rolling update with maxSurge
//! (a second pod takes over and passes the manifest's readiness probe, then
//! the first is deleted) fails no load in a GPU pod.
//!
//! What differs from a real node: the node's paths (/run/nvlibs,
//! /run/nvlibfs, /) are directories of the test, made shared mounts as
//! systemd makes `/`; the fixture driver is pinned by its module version
//! file (one flag added to the manifest's command); pods use the host's
//! network (no CNI here); images come in through `docker save | ctr import`.

mod common;

use common::images::{cache_dir, cache_lock, inner_rootfs, run};
use common::VERSION;
use nvlibfs_fixture::{build, build_loader, FixtureSpec};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const CONTAINERD_KEY: &str = "cri-containerd-trixie-1";
const VENV_KEY: &str = "cri-venv-1";
const BASE_IMAGE: &str = "nvlibfs-test-cri-base:1";
const NVLIBFS_IMAGE: &str = "nvlibfs-test-cri-nvlibfs:0.1.0";
const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/k8s/nvlibfs-daemonset.yaml");
const KUBELET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cri/kubelet.py");

/// A Python venv in the test cache with grpcio and the client generated
/// from the CRI's api.proto; returns (python, directory of the generated code).
fn cri_client() -> (PathBuf, PathBuf) {
    let dir = cache_dir().join(VENV_KEY);
    let python = dir.join("bin/python");
    let generated = dir.join("cri");
    if !dir.join("complete").exists() {
        let _lock = cache_lock(VENV_KEY).unwrap();
        if !dir.join("complete").exists() {
            let proto = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/peers"))
                .expect("../shared/peers holds the CRI's api.proto")
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with("-api.proto") && p.to_string_lossy().contains("cri-api"))
                .expect("../shared/peers/cri-api-*-api.proto");
            let _ = std::fs::remove_dir_all(&dir);
            run(Command::new("python3").args(["-m", "venv"]).arg(&dir)).unwrap();
            run(Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "grpcio",
                "grpcio-tools",
                "pyyaml",
            ]))
            .unwrap();
            std::fs::create_dir_all(&generated).unwrap();
            std::fs::copy(&proto, generated.join("api.proto")).unwrap();
            run(Command::new(&python)
                .args(["-m", "grpc_tools.protoc", "-I."])
                .args(["--python_out=.", "--grpc_python_out=.", "api.proto"])
                .current_dir(&generated))
            .unwrap();
            std::fs::write(dir.join("complete"), "").unwrap();
        }
    }
    (python, generated)
}

/// containerd, its own root, state and socket, CDI specs read from `cdi`.
struct Containerd {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    python: PathBuf,
    generated: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, cdi: &Path) -> Containerd {
        let unpacked = common::packages::unpacked(CONTAINERD_KEY, "trixie", &["containerd"]).unwrap();
        let bin = unpacked.join("usr/bin");
        let runc = common::find_program("runc").expect("runc is installed (docker.io brings it)");
        let config = dir.join("config.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  enable_cdi = true
  cdi_spec_dirs = ["{cdi}"]
  # This machine's bounding set lacks CAP_SYS_RESOURCE: the sandbox's
  # oom_score_adj of -998 would fail runc.
  restrict_oom_score_adj = true
  sandbox_image = "docker.io/library/{BASE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
"#,
                cdi = cdi.display(),
                runc = runc.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let child = Command::new(bin.join("containerd"))
            .arg("--config")
            .arg(&config)
            .env("PATH", &path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let (python, generated) = cri_client();
        let c = Containerd {
            child,
            dir: dir.to_owned(),
            bin,
            python,
            generated,
        };
        let sock = dir.join("containerd.sock");
        common::wait_for("containerd's socket", || sock.exists());
        c
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new(self.bin.join("ctr"));
        c.arg("-a").arg(self.dir.join("containerd.sock")).args(["-n", "k8s.io"]);
        c
    }

    /// A docker image into containerd's k8s.io namespace.
    fn import(&self, image: &str) {
        let save = format!(
            "docker save {image} | {} -a {} -n k8s.io images import -",
            self.bin.join("ctr").display(),
            self.dir.join("containerd.sock").display()
        );
        run(Command::new("sh").args(["-euc", &save])).unwrap();
    }

    /// A kubelet call (tests/cri/kubelet.py); its JSON answer.
    fn kubelet(&self, args: &[&str]) -> Value {
        let out = run(Command::new(&self.python)
            .arg(KUBELET)
            .arg(self.dir.join("containerd.sock"))
            .args(args)
            .env("PYTHONPATH", &self.generated)
            .env("NVLIBFS_CRI_LOGS", self.dir.join("logs")))
        .unwrap_or_else(|e| panic!("kubelet.py {args:?}: {e}"));
        serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{out}: {e}"))
    }

    fn exec(&self, container: &str, cmd: &[&str]) -> Value {
        let mut args = vec!["exec", container, "30", "--"];
        args.extend(cmd);
        self.kubelet(&args)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Every pod goes first (their shims outlive containerd otherwise).
        let _ = Command::new(&self.python)
            .arg(KUBELET)
            .arg(self.dir.join("containerd.sock"))
            .arg("remove-all")
            .env("PYTHONPATH", &self.generated)
            .env("NVLIBFS_CRI_LOGS", self.dir.join("logs"))
            .output();
        let _ = self
            .ctr()
            .args(["images", "rm", &format!("docker.io/library/{NVLIBFS_IMAGE}")])
            .output();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // Whatever containerd left mounted under its root.
        let _ = Command::new("umount").arg("-R").arg(self.dir.join("root")).output();
    }
}

/// Binds `dir` onto itself and makes it a shared mount, as `/` is on a
/// systemd node: Bidirectional and HostToContainer volumes need it.
struct SharedMount(PathBuf);

impl SharedMount {
    fn new(dir: &Path) -> SharedMount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").arg("--bind").arg(dir).arg(dir)).unwrap();
        run(Command::new("mount").arg("--make-rshared").arg(dir)).unwrap();
        SharedMount(dir.to_owned())
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.0).output();
    }
}

/// The docker image the DaemonSet names, built by contrib/Dockerfile from a
/// release-style tarball of this build's binaries (install.sh's tree), on
/// the cached Debian 12 root (this build needs its glibc).
fn nvlibfs_image(dir: &Path) {
    let bin = Path::new(env!("CARGO_BIN_EXE_nvlibfs")).parent().unwrap();
    if let Ok(cargo) = std::env::var("CARGO") {
        run(Command::new(cargo).args(["build", "--quiet", "-p", "nvlibfs-mountd"])).unwrap();
    }
    let stage = dir.join("stage");
    run(Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/install.sh"))
        .arg("--bin-dir")
        .arg(bin)
        .env("DESTDIR", &stage)
        .env("PREFIX", "/usr/local")
        .env("UNIT_DIR", stage.join("usr/local/lib/systemd/system")))
    .unwrap();
    let name = format!("nvlibfs-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    std::fs::rename(stage.join("usr/local"), stage.join(&name)).unwrap();
    let context = dir.join("context");
    std::fs::create_dir_all(&context).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&stage)
        .arg("-czf")
        .arg(context.join(format!("{name}.tar.gz")))
        .arg(&name))
    .unwrap();
    run(Command::new("docker")
        .args([
            "build",
            "-q",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/Dockerfile"),
        ])
        .args(["--build-arg", &format!("BASE={BASE_IMAGE}")])
        .args(["-t", NVLIBFS_IMAGE])
        .arg(&context))
    .unwrap();
}

/// The pods' base (and sandbox) image: the cached Debian 12 root, whose
/// default command sleeps.
fn base_image() {
    let exists = || run(Command::new("docker").args(["image", "inspect", BASE_IMAGE])).is_ok();
    if exists() {
        return;
    }
    let _lock = cache_lock(BASE_IMAGE).unwrap();
    if !exists() {
        run(Command::new("docker")
            .arg("import")
            .args(["--change", r#"CMD ["sleep", "infinity"]"#])
            .args([
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ])
            .arg(inner_rootfs().unwrap())
            .arg(BASE_IMAGE))
        .unwrap();
    }
}

fn exit_code(v: &Value) -> i64 {
    v["exit_code"].as_i64().unwrap_or(-1)
}

/// Waits (up to a minute) for the manifest's readiness probe to pass in
/// `container`; how long it took.
fn wait_ready(node: &Containerd, container: &str, probe: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let r = node.exec(container, probe);
        if exit_code(&r) == 0 {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never ready: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn gpu_pods_and_the_daemonset_pod_through_the_cri() {
    common::require_docker_engine();
    common::require_fixture_tools();
    common::require("python3", "python3");
    common::require("runc", "runc");
    common::images::require_image_tools();
    base_image();

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path();
    // The node: its driver (the fixture, as its `/`), a view nvlibfs
    // serves from the host for the CDI and hostPath pods, and the paths
    // the DaemonSet's volumes name.
    let host = SharedMount::new(&d.join("node-root"));
    build(
        &FixtureSpec {
            libcuda_bytes: 8 << 20,
            ..FixtureSpec::new(VERSION)
        },
        &host.0,
    )
    .unwrap();
    let loader_dir = d.join("loader");
    std::fs::create_dir_all(&loader_dir).unwrap();
    build_loader(&loader_dir).unwrap();
    let view = d.join("view");
    let state = d.join("state");
    common::ok(
        common::mount_root_command(&host.0, &state).arg(&view).output().unwrap(),
        "nvlibfs mount",
    );
    let _view = common::UnmountOnDrop(view.clone(), state.clone());
    let node_view = SharedMount::new(&d.join("node-run-nvlibs"));
    let node_state = d.join("node-run-nvlibfs");
    std::fs::create_dir_all(&node_state).unwrap();

    nvlibfs_image(d);
    let cri = d.join("containerd");
    std::fs::create_dir_all(&cri).unwrap();
    let node = Containerd::start(&cri, &view.join("etc/cdi"));
    node.import(BASE_IMAGE);
    node.import(NVLIBFS_IMAGE);
    let base = format!("docker.io/library/{BASE_IMAGE}");
    let image = format!("docker.io/library/{NVLIBFS_IMAGE}");

    // GPU pods: the CDI field, and the view as a hostPath volume; as root
    // and as uid 1000. nvidia-smi (the fixture's) loads libnvidia-ml.
    let smi = "id -u; /usr/local/nvidia/bin/nvidia-smi";
    let view_s = view.to_str().unwrap();
    for (name, uid, how) in [
        ("gpu-cdi-root", "0", vec!["cdi"]),
        ("gpu-cdi-user", "1000", vec!["cdi"]),
        ("gpu-hostpath-root", "0", vec!["hostpath", view_s]),
        ("gpu-hostpath-user", "1000", vec!["hostpath", view_s]),
    ] {
        let mut args = vec!["gpu-pod", name, &base, uid];
        args.extend(how);
        args.extend(["--", "sh", "-c", smi]);
        let r = node.kubelet(&args);
        let stdout = r["stdout"].as_str().unwrap_or("");
        assert_eq!(exit_code(&r), 0, "{name}: {r}");
        assert!(stdout.starts_with(&format!("{uid}\n")), "{name} runs as {uid}: {r}");
        assert!(stdout.contains(&format!("Driver Version: {VERSION}")), "{name}: {r}");
        if name.starts_with("gpu-cdi") {
            // The spec's env: nvidia-smi on PATH, as CUDA images expect.
            let r = node.exec(r["container"].as_str().unwrap(), &["sh", "-c", "nvidia-smi"]);
            assert_eq!(exit_code(&r), 0, "{name}: nvidia-smi on PATH: {r}");
        }
        eprintln!("{name}: {}", stdout.lines().nth(1).unwrap_or(""));
        node.kubelet(&["remove-pod", r["pod"].as_str().unwrap()]);
    }

    // The DaemonSet's pod serves the node.
    let host_paths = serde_json::json!({
        "/run/nvlibs": node_view.0,
        "/run/nvlibfs": node_state,
        "/": host.0,
    })
    .to_string();
    let extra = r#"["--module-version-file", "/host/sys/module/nvidia/version"]"#;
    let first = node.kubelet(&["daemon-pod", "nvlibfs-a", &image, MANIFEST, &host_paths, extra]);
    let probe: Vec<String> = serde_json::from_value(first["readiness"].clone()).unwrap();
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();
    let first_container = first["container"].as_str().unwrap().to_owned();
    let took = wait_ready(&node, &first_container, &probe);
    eprintln!("first DaemonSet pod ready after {took:?}");
    let libcuda = node_view.0.join("lib64/libcuda.so.1");
    assert!(libcuda.exists(), "the pod's mount reaches the node");

    // A GPU pod loads the driver through the node's view all through a
    // rolling update.
    let loop_ms = 20_000;
    let load = node.kubelet(&[
        "load-pod",
        "gpu-loads",
        &base,
        node_view.0.to_str().unwrap(),
        loader_dir.to_str().unwrap(),
        "--",
        "/loader/nvlibfs-load",
        "--loop",
        &loop_ms.to_string(),
        "--expect",
        common::VERSION,
        "/usr/local/nvidia/lib64/libcuda.so.1",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    // maxSurge: the new pod starts beside the old one and takes over ...
    let second = node.kubelet(&["daemon-pod", "nvlibfs-b", &image, MANIFEST, &host_paths, extra]);
    let second_container = second["container"].as_str().unwrap().to_owned();
    let took = wait_ready(&node, &second_container, &probe);
    eprintln!("second DaemonSet pod ready (took the mount over) after {took:?}");
    // What a liveness probe running `nvlibfs status` (the manifest had one)
    // would see in the old pod now, between the takeover and its deletion.
    let old_status = node.exec(&first_container, &["nvlibfs", "status", "/run/nvlibs"]);
    let old_here = node.exec(&first_container, &probe);
    eprintln!(
        "old pod after the takeover: `nvlibfs status` exit {} ({} ms), its readiness probe exit {} ({} ms): {}{}",
        exit_code(&old_status),
        old_status["ms"],
        exit_code(&old_here),
        old_here["ms"],
        old_here["stdout"].as_str().unwrap_or("").lines().next().unwrap_or(""),
        old_here["stderr"].as_str().unwrap_or("").trim()
    );
    // ... and the old one is deleted once the new one is ready.
    node.kubelet(&["remove-pod", first["pod"].as_str().unwrap()]);
    let status = node.exec(&second_container, &["nvlibfs", "status", "/run/nvlibs"]);
    assert_eq!(exit_code(&status), 0, "{status}");
    eprintln!("after the update:\n{}", status["stdout"].as_str().unwrap_or(""));

    let log = PathBuf::from(load["log"].as_str().unwrap());
    let started = Instant::now();
    let count = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(" count ")) {
            break line.split_once(" count ").unwrap().1.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_millis(loop_ms + 60_000),
            "the loader never finished:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let numbers: Vec<u64> = count.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("loads in the GPU pod through the update: {count} (ok failed slowest_ns wrong)");
    assert!(numbers.len() == 4 && numbers[0] > 0, "{text}");
    assert_eq!(numbers[1], 0, "loads failed during the rolling update:\n{text}");
    assert_eq!(
        numbers[3], 0,
        "loads of another version during the rolling update:\n{text}"
    );
    assert!(libcuda.exists(), "the view still serves after the old pod went");

    // Deleting the last pod stops it: that unmounts.
    node.kubelet(&["remove-pod", second["pod"].as_str().unwrap()]);
    common::wait_for("the DaemonSet pod's unmount", || !libcuda.exists());
}
