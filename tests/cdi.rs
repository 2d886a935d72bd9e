//! `nvlibfs cdi generate`: the spec checked against the CDI specification's
//! rules, then used by a real CDI consumer (Debian's podman) to run a local
//! image that loads the fixture libraries through the view.

mod common;

use common::images::{inner_rootfs, run};
use common::{nvlibfs, ok, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A /dev stand-in: two GPUs, control nodes and a MIG capability, all
/// character devices (1:3, like /dev/null) so containers can open them.
fn fake_dev(dir: &Path) -> PathBuf {
    let dev = dir.join("dev");
    std::fs::create_dir_all(dev.join("nvidia-caps")).unwrap();
    for name in [
        "nvidia0",
        "nvidia1",
        "nvidiactl",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia-caps/nvidia-cap1",
    ] {
        let out = Command::new("mknod")
            .arg(dev.join(name))
            .args(["c", "1", "3"])
            .output()
            .unwrap();
        ok(out, "mknod");
    }
    std::fs::write(dev.join("nvidia-not-a-device"), "").unwrap();
    dev
}

fn generate(mountpoint: &Path, dev: &Path) -> Value {
    let out = nvlibfs()
        .args(["cdi", "generate", "--mountpoint"])
        .arg(mountpoint)
        .arg("--dev")
        .arg(dev)
        .output()
        .unwrap();
    serde_json::from_str(&ok(out, "cdi generate")).expect("the spec is JSON")
}

fn is_abs(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.starts_with('/'))
}

/// The specification's rules for container edits (CDI SPEC.md).
fn check_edits(edits: &Value, what: &str) {
    let obj = edits
        .as_object()
        .unwrap_or_else(|| panic!("{what}: containerEdits must be an object"));
    for key in obj.keys() {
        assert!(
            ["env", "deviceNodes", "mounts", "hooks"].contains(&key.as_str()),
            "{what}: unknown field {key}"
        );
    }
    for e in edits["env"].as_array().into_iter().flatten() {
        let e = e.as_str().expect("env entries are strings");
        assert!(
            e.split_once('=').is_some_and(|(k, _)| !k.is_empty()),
            "{what}: env {e:?} is not KEY=VALUE"
        );
    }
    for n in edits["deviceNodes"].as_array().into_iter().flatten() {
        assert!(is_abs(&n["path"]), "{what}: deviceNodes[].path must be absolute: {n}");
        assert!(
            n.get("hostPath").is_none_or(is_abs),
            "{what}: hostPath must be absolute: {n}"
        );
    }
    for m in edits["mounts"].as_array().into_iter().flatten() {
        assert!(
            is_abs(&m["hostPath"]) && is_abs(&m["containerPath"]),
            "{what}: mount paths: {m}"
        );
        let options = m["options"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: mount options must be a list: {m}"));
        assert!(options.iter().all(Value::is_string), "{what}: options are strings: {m}");
    }
}

#[test]
fn the_spec_follows_the_cdi_specification() {
    let dir = tempfile::tempdir().unwrap();
    let dev = fake_dev(dir.path());
    let spec = generate(Path::new("/run/nvlibs"), &dev);

    let version: Vec<u32> = spec["cdiVersion"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(version.len() == 3 && version >= vec![0, 5, 0], "cdiVersion {version:?}");
    assert_eq!(spec["kind"], "nvidia.com/gpu");
    let devices = spec["devices"].as_array().expect("devices is a list");
    let names: Vec<&str> = devices.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["0", "1", "all"]);
    for d in devices {
        let name = d["name"].as_str().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)),
            "device name {name}"
        );
        check_edits(&d["containerEdits"], name);
        assert!(
            d["containerEdits"].as_object().is_some_and(|o| !o.is_empty()),
            "{name}: empty edits"
        );
    }
    let all: Vec<&str> = devices[2]["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert_eq!(all, ["/dev/nvidia0", "/dev/nvidia1"]);
    assert_eq!(
        devices[0]["containerEdits"]["deviceNodes"][0]["hostPath"],
        dev.join("nvidia0").to_str().unwrap()
    );

    let common = &spec["containerEdits"];
    check_edits(common, "spec-wide");
    let control: Vec<&str> = common["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        control,
        [
            "/dev/nvidia-caps/nvidia-cap1",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidiactl"
        ]
    );
    let mount = &common["mounts"][0];
    assert_eq!(
        (mount["hostPath"].as_str(), mount["containerPath"].as_str()),
        (Some("/run/nvlibs"), Some("/usr/local/nvidia"))
    );
    let options: Vec<&str> = mount["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(
        options.contains(&"ro") && options.contains(&"rbind") && options.contains(&"rslave"),
        "{options:?}"
    );
    let env: Vec<&str> = common["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        env.iter()
            .any(|e| e.starts_with("LD_LIBRARY_PATH=/usr/local/nvidia/lib64")),
        "{env:?}"
    );
    assert!(
        env.iter().any(|e| e.starts_with("PATH=/usr/local/nvidia/bin:")),
        "{env:?}"
    );
}

/// Removes the spec from the runtime's directory whatever happens.
struct InstalledSpec(PathBuf);

impl Drop for InstalledSpec {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn podman_runs_a_container_from_the_spec() {
    common::require("podman", "podman");
    common::require_fixture_tools();
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let dev = fake_dev(m.dir.path());
    let spec_dir = Path::new("/var/run/cdi");
    std::fs::create_dir_all(spec_dir).unwrap();
    let spec = InstalledSpec(spec_dir.join(format!("nvlibfs-test-{}.json", std::process::id())));
    let out = nvlibfs()
        .args(["cdi", "generate", "--mountpoint"])
        .arg(&m.mountpoint)
        .arg("--dev")
        .arg(&dev)
        .arg("--output")
        .arg(&spec.0)
        .output()
        .unwrap();
    ok(out, "cdi generate --output");

    let image = "nvlibfs-cdi-test";
    let podman = || {
        let mut c = Command::new("podman");
        // No systemd here: cgroupfs and file events; no network needed.
        c.args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        c
    };
    if run(podman().args(["image", "exists", image])).is_err() {
        let tar = inner_rootfs().unwrap_or_else(|e| panic!("building the image's root file system: {e}"));
        run(podman().args(["import", "--quiet"]).arg(&tar).arg(image)).unwrap_or_else(|e| panic!("podman import: {e}"));
    }
    let libs: Vec<String> = m
        .lib64()
        .iter()
        .map(|(p, _)| {
            Path::new("/usr/local/nvidia")
                .join(p.strip_prefix(&m.mountpoint).unwrap())
                .display()
                .to_string()
        })
        .collect();
    for device in ["nvidia.com/gpu=all", "nvidia.com/gpu=1"] {
        let script = format!(
            "set -e; ls /dev/nvidia1 /dev/nvidiactl /dev/nvidia-caps/nvidia-cap1; /work/nvlibfs-load {} libcuda.so.1; nvidia-smi",
            libs.join(" ")
        );
        let out = run(podman()
            .args(["run", "--rm", "--network", "none"])
            // This machine's limits: podman's defaults for root exceed them.
            .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"])
            .arg(format!("--device={device}"))
            .arg(format!("--volume={}:/work:ro", m.dir.path().display()))
            .args([image, "sh", "-c", &script]))
        .unwrap_or_else(|e| panic!("podman run --device {device}: {e}"));
        for ((_, version), lib) in m.lib64().iter().zip(&libs) {
            assert!(
                out.contains(&format!("{lib} {version}\n")),
                "{lib} not loaded at {version} with {device}:\n{out}"
            );
        }
        assert!(
            out.contains(&format!("libcuda.so.1 {VERSION}\n")),
            "LD_LIBRARY_PATH from the spec:\n{out}"
        );
        assert!(
            out.contains(&format!("Driver Version: {VERSION}")),
            "PATH from the spec:\n{out}"
        );
    }
}

/// The spec a mount carries in its view is the generated one for that
/// mount point, with the nodes as a container given them at /dev sees
/// them (no host path), and it follows the nodes as they come and go.
#[test]
fn a_mount_carries_its_own_spec_and_keeps_it_in_step_with_the_nodes() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let dev = fake_dev(dir.path());
    let dev_flag = dev.to_str().unwrap().to_owned();
    let m = Mounted::new(FixtureSpec::new(VERSION), &["--dev", &dev_flag]);
    let path = m.mountpoint.join("etc/cdi/nvlibfs.json");
    let read = || -> Value { serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap() };
    let carried = read();
    let mut generated = generate(&m.mountpoint, &dev);
    let strip = |edits: &mut Value| {
        for node in edits["deviceNodes"].as_array_mut().into_iter().flatten() {
            node.as_object_mut().unwrap().remove("hostPath");
        }
    };
    for device in generated["devices"].as_array_mut().unwrap() {
        strip(&mut device["containerEdits"]);
    }
    strip(&mut generated["containerEdits"]);
    assert_eq!(carried, generated);
    check_edits(&carried["containerEdits"], "carried spec");

    let names = |spec: &Value| -> Vec<String> {
        spec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // A process working in lib64, and one holding the spec open, as
    // nodes come and go.
    let lib64 = std::fs::File::open(m.mountpoint.join("lib64")).unwrap();
    let held = std::fs::File::open(&path).unwrap();
    let before = m.status();
    std::fs::remove_file(dev.join("nvidia1")).unwrap();
    // While the spec changes, a reader halfway through etc/cdi may find it
    // gone once (the directory is deleted in the kernel, which is what
    // tells docker to read the spec again); the next read finds the new one.
    common::wait_for("the spec to drop GPU 1", || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .is_some_and(|spec: Value| names(&spec) == ["0", "all"])
    });
    let after = m.status();
    assert_eq!(after.driver_version, VERSION, "the pin stays");
    // The spec changed; nothing else did: the same generation, its names
    // still there for a process inside it.
    assert_eq!(
        after.generation, before.generation,
        "a node that goes is no new generation"
    );
    assert_eq!(after.generations.len(), 1);
    let in_lib64 = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&lib64)));
    assert!(
        in_lib64.join("libcuda.so.1").exists(),
        "names in lib64 after the spec changed"
    );
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &held, &mut text).unwrap();
    assert!(text.starts_with('{'), "the spec held open reads whole: {text}");
}

/// A runtime watching the spec's directory with inotify (docker's CDI
/// cache) hears that the spec changed even after the kernel dropped the
/// names it had cached (memory pressure; here drop_caches): the directory
/// it watches goes, as it does when the names are cached. A deletion the
/// kernel is told of reaches watchers only through a cached name, and
/// inotify holds the directory's inode, not its name.
#[test]
fn a_watcher_of_the_spec_hears_it_change_after_the_kernel_dropped_its_names() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let dev = fake_dev(dir.path());
    let m = Mounted::new(FixtureSpec::new(VERSION), &["--dev", dev.to_str().unwrap()]);
    let spec_dir = m.mountpoint.join("etc/cdi");
    let spec = spec_dir.join("nvlibfs.json");
    // The GPUs the spec lists, by name.
    let gpus = |json: &str| -> Vec<String> {
        let spec: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}:\n{json}"));
        spec["devices"]
            .as_array()
            .expect("devices is a list")
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = gpus(&std::fs::read_to_string(&spec).unwrap());
    assert!(
        before.iter().any(|n| n == "1"),
        "GPU 1 is not listed to begin with: {before:?}"
    );
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    inotify.add_watch(&spec_dir, AddWatchFlags::IN_ALL_EVENTS).unwrap();
    common::drop_caches();
    std::fs::remove_file(dev.join("nvidia1")).unwrap();
    let supervisor = m.status().supervisor_pid.expect("a supervisor");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor as i32), nix::sys::signal::SIGHUP).unwrap();
    // Nothing here looks anything up in the mount until the watcher has
    // heard (a lookup would cache the names again).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut heard = Vec::new();
    let gone = |heard: &[AddWatchFlags]| heard.iter().any(|m| m.contains(AddWatchFlags::IN_DELETE_SELF));
    while !gone(&heard) && std::time::Instant::now() < deadline {
        heard.extend(inotify.read_events().unwrap_or_default().into_iter().map(|e| e.mask));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(gone(&heard), "the watcher heard only {heard:?}");
    let now = std::fs::read_to_string(&spec).unwrap();
    let after = gpus(&now);
    assert!(!after.iter().any(|n| n == "1"), "the spec still lists GPU 1:\n{now}");
    assert!(after.iter().any(|n| n == "0"), "GPU 0 went too:\n{now}");
}

/// A runtime reads the spec from its own working directory: every host
/// path in it is absolute, whatever `cdi generate` was given.
#[test]
fn a_generated_spec_names_host_paths_absolutely() {
    let dir = tempfile::tempdir().unwrap();
    let dev = fake_dev(dir.path());
    assert!(dev.starts_with(dir.path()));
    let out = nvlibfs()
        .current_dir(dir.path())
        .args(["cdi", "generate", "--mountpoint", "view", "--dev", "dev"])
        .output()
        .unwrap();
    let spec: Value = serde_json::from_str(&ok(out, "cdi generate with relative paths")).unwrap();
    let text = spec.to_string();
    let mut host_paths = 0;
    for part in text.split("\"hostPath\":\"").skip(1) {
        let path = &part[..part.find('"').unwrap()];
        assert!(path.starts_with('/'), "a relative host path in the spec: {path}");
        host_paths += 1;
    }
    assert!(host_paths >= 3, "{text}");
    assert!(
        text.contains(&format!("\"{}\"", dir.path().join("view").display())),
        "{text}"
    );
}

/// Another spec of kind nvidia.com/gpu where the runtimes look (the
/// toolkit's, as YAML): `cdi generate` refuses to write beside it, names
/// it and the flag that avoids it, writes nothing; elsewhere it warns;
/// with `--kind` it writes, and writes again over its own spec, also
/// through another name of the directory; a malformed kind is refused.
#[test]
fn cdi_generate_will_not_clash_with_another_spec_of_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let dev = fake_dev(dir.path());
    let (etc, run) = (dir.path().join("etc-cdi"), dir.path().join("run-cdi"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::os::unix::fs::symlink(&run, dir.path().join("var-run-cdi")).unwrap();
    std::fs::write(
        etc.join("nvidia.yaml"),
        "---\ncdiVersion: 0.5.0\nkind: nvidia.com/gpu\ncontainerEdits:\n  hooks:\n  - hookName: createContainer\n    \
         path: /usr/bin/nvidia-cdi-hook\n    args: [nvidia-cdi-hook, update-ldcache]\ndevices:\n- name: all\n",
    )
    .unwrap();
    let dirs = format!("{},{}", etc.display(), dir.path().join("var-run-cdi").display());
    let generate = |output: &Path, kind: Option<&str>| {
        let mut c = nvlibfs();
        c.args(["cdi", "generate", "--mountpoint", "/run/nvlibs", "--dev"])
            .arg(&dev)
            .args(["--spec-dirs", &dirs, "--output"])
            .arg(output);
        if let Some(kind) = kind {
            c.args(["--kind", kind]);
        }
        c.output().unwrap()
    };
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    for output in [etc.join("nvlibfs.json"), run.join("nvlibfs.json")] {
        let refused = generate(&output, None);
        let said = text(&refused);
        assert!(
            !refused.status.success(),
            "wrote {} beside the toolkit's spec",
            output.display()
        );
        assert!(
            said.contains(&format!(
                "{} is the NVIDIA Container Toolkit's spec of kind nvidia.com/gpu",
                etc.join("nvidia.yaml").display()
            )) && said.contains("--kind nvlibfs.io/gpu"),
            "{said}"
        );
        assert!(!output.exists(), "{} written all the same", output.display());
    }
    let elsewhere = dir.path().join("nvlibfs.json");
    let warned = generate(&elsewhere, None);
    assert!(
        warned.status.success() && text(&warned).contains("warning"),
        "{}",
        text(&warned)
    );

    // Its own kind: written, and written again over its own spec, also
    // by the directory's other name.
    let own = dir.path().join("var-run-cdi/nvlibfs.json");
    for _ in 0..2 {
        let wrote = generate(&own, Some("nvlibfs.io/gpu"));
        assert!(wrote.status.success(), "{}", text(&wrote));
        assert!(!text(&wrote).contains("warning"), "{}", text(&wrote));
    }
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(run.join("nvlibfs.json")).unwrap()).unwrap();
    assert_eq!(spec["kind"], "nvlibfs.io/gpu");
    let again = generate(&run.join("nvlibfs.json"), Some("nvlibfs.io/gpu"));
    assert!(again.status.success(), "{}", text(&again));

    let bad = generate(&elsewhere, Some("nvlibfs"));
    assert!(
        !bad.status.success() && text(&bad).contains("--kind \"nvlibfs\""),
        "{}",
        text(&bad)
    );
}
