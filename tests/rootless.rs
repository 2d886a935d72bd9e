//! Rootless Docker on the host: Debian's `rootlesskit` and the
//! `dockerd-rootless.sh` docker.io ships, run by an unprivileged user, with
//! the view (mounted by root before that daemon started) as a volume. Its
//! containers load every library and run `nvidia-smi` from the view as the
//! container's root and as uid 1000, though the view's files show as owned
//! by the overflow user there; and a view mounted again after a whole
//! daemon's stop reaches both a running container bound `rslave` and new
//! ones, because the mount point's tmpfs (shared) outlived the daemon.
//!
//! The rootless daemon runs with RootlessKit's host network (no
//! /dev/net/tun, no slirp4netns: the containers need no network).

mod common;

use common::images::{cache_dir, inner_rootfs};
use common::{mount_command, ok, umount, SERIAL, VERSION};
use nvlibfs_fixture::{build, build_loader, FixtureSpec};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "nvlibfs-rootless";
/// Its subordinate ids (`/etc/subuid`, `/etc/subgid`): far above any a
/// distribution hands out.
const SUBORDINATE: &str = "1500000:65536";
const IMAGE: &str = "nvlibfs-test-inner";

/// The unprivileged user the rootless daemon runs as, created once.
fn user() -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        ok(
            Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/sh", USER])
                .output()
                .unwrap(),
            "useradd",
        );
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let have = std::fs::read_to_string(file).unwrap_or_default();
        if !have.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
            std::fs::write(file, format!("{have}{USER}:{SUBORDINATE}\n")).unwrap();
        }
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// `program` run as the rootless user, with its runtime directory and
/// daemon socket, and `vars` besides.
fn as_user(uid: u32, vars: &[&str], program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", USER, "--", "env"])
        .arg(format!("XDG_RUNTIME_DIR=/run/user/{uid}"))
        .arg(format!("DOCKER_HOST=unix:///run/user/{uid}/docker.sock"))
        // Debian keeps dockerd-rootless.sh with docker.io's contrib.
        .arg("PATH=/usr/share/docker.io/contrib:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .args(vars)
        .arg(program);
    c
}

/// A fixture driver mounted by root, with the fixture's loader beside it,
/// all in a directory every user may enter.
struct View {
    fixture: nvlibfs_fixture::Fixture,
    path: PathBuf,
    state: PathBuf,
    dir: tempfile::TempDir,
}

impl View {
    fn mount() -> View {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
        build_loader(dir.path()).unwrap();
        let (path, state) = (dir.path().join("view"), dir.path().join("state"));
        ok(
            mount_command(&fixture, &state).arg(&path).output().unwrap(),
            "nvlibfs mount",
        );
        View {
            fixture,
            path,
            state,
            dir,
        }
    }

    fn umount(self) {
        umount(&self.path, &self.state);
    }
}

/// A rootless dockerd of `USER`, stopped (with its RootlessKit) when dropped.
struct RootlessDocker {
    uid: u32,
    child: Child,
}

impl RootlessDocker {
    fn start(uid: u32, gid: u32, log: &Path) -> RootlessDocker {
        let runtime = PathBuf::from(format!("/run/user/{uid}"));
        std::fs::create_dir_all(&runtime).unwrap();
        std::os::unix::fs::chown(&runtime, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Kept between runs, like the other test images.
        let data_root = cache_dir().join("rootless-docker");
        std::fs::create_dir_all(&data_root).unwrap();
        std::os::unix::fs::chown(&data_root, Some(uid), Some(gid)).unwrap();
        let vars = [
            "DOCKERD_ROOTLESS_ROOTLESSKIT_NET=host",
            "DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=none",
            "DOCKERD_ROOTLESS_ROOTLESSKIT_MTU=65520",
        ];
        let mut cmd = as_user(uid, &vars, "dockerd-rootless.sh");
        cmd.args(["--bridge=none", "--iptables=false", "--data-root"])
            .arg(&data_root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            // Its own process group, so that all of it can be stopped.
            .process_group(0);
        let child = cmd.spawn().unwrap();
        let daemon = RootlessDocker { uid, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !daemon.docker(&["info"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "the rootless dockerd did not answer:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        daemon
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        as_user(self.uid, &[], "docker").args(args).output().unwrap()
    }

    fn run_ok(&self, args: &[&str], what: &str) -> String {
        ok(self.docker(args), what)
    }
}

impl Drop for RootlessDocker {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test started.
        unsafe { libc::killpg(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::killpg(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

#[test]
fn rootless_docker_containers_load_the_view_as_root_and_as_a_user() {
    common::require_fixture_tools();
    common::require("rootlesskit", "rootlesskit");
    common::require("newuidmap", "uidmap");
    common::require("runuser", "util-linux");
    common::require("docker", "docker.io");
    common::images::require_image_tools();
    assert!(
        Path::new("/usr/share/docker.io/contrib/dockerd-rootless.sh").exists()
            || common::find_program("dockerd-rootless.sh").is_some(),
        "dockerd-rootless.sh is not installed: run {}, or apt-get install docker.io",
        common::TEST_SCRIPT
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (uid, gid) = user();
    // The view first, then the rootless daemon: RootlessKit gives it a
    // mount namespace of its own, copied at its start.
    let v = View::mount();
    let (fixture, view, state, dir) = (&v.fixture, &v.path, &v.state, &v.dir);
    let daemon = RootlessDocker::start(uid, gid, &dir.path().join("dockerd-rootless.log"));
    if !daemon.docker(&["image", "inspect", IMAGE]).status.success() {
        let tar = inner_rootfs().expect("the cached Debian root");
        daemon.run_ok(&["import", tar.to_str().unwrap(), IMAGE], "docker import (rootless)");
    }
    let view_volume = format!("{}:/usr/local/nvidia:ro", view.display());
    let loader = format!("{}:/loader:ro", dir.path().join("nvlibfs-load").display());
    // Each library as the container names it, and the version it reports.
    let expected: Vec<String> = fixture
        .libraries
        .iter()
        .filter(|l| l.view_path.starts_with("lib64"))
        .map(|l| {
            format!(
                "{} {}",
                Path::new("/usr/local/nvidia").join(&l.view_path).display(),
                l.version
            )
        })
        .collect();
    let libs: Vec<String> = expected
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert!(libs.len() >= 30, "{libs:?}");

    for user in [None, Some("1000:1000")] {
        let mut args = vec!["run", "--rm", "--network", "none", "-v", &view_volume, "-v", &loader];
        if let Some(user) = user {
            args.extend(["--user", user]);
        }
        args.push(IMAGE);
        let mut load = args.clone();
        load.push("/loader");
        load.extend(libs.iter().map(String::as_str));
        let loaded = daemon.run_ok(&load, &format!("loading the view (user {user:?})"));
        assert_eq!(loaded.lines().collect::<Vec<_>>(), expected, "user {user:?}");
        let mut smi = args.clone();
        smi.push("/usr/local/nvidia/bin/nvidia-smi");
        let said = daemon.run_ok(&smi, &format!("nvidia-smi from the view (user {user:?})"));
        assert!(said.contains(&format!("Driver Version: {VERSION}")), "{said}");
    }
    // Owned by nobody there: nothing above depended on owners.
    let mut ls = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &view_volume,
        IMAGE,
        "stat",
        "-c",
        "%u",
    ];
    let libcuda = format!("/usr/local/nvidia/lib64/libcuda.so.{VERSION}");
    ls.push(&libcuda);
    let owner = daemon.run_ok(&ls, "stat in a rootless container");
    assert_eq!(owner.trim(), "65534", "the view's owner as the container sees it");

    // The whole daemon stopped and mounted again: the tmpfs it keeps at
    // the mount point is shared and predates the rootless daemon, so the
    // new mount reaches it, in a running container bound rslave and in
    // new ones.
    let held = daemon.run_ok(
        &[
            "run",
            "-d",
            "--network",
            "none",
            "-v",
            &format!("{}:/usr/local/nvidia:ro,rslave", view.display()),
            "-v",
            &loader,
            IMAGE,
            "sleep",
            "120",
        ],
        "a long-running rootless container",
    );
    let held = held.trim().to_owned();
    let status = nvlibfs::control::query(state, view).unwrap();
    // SAFETY: signals the daemon this test started.
    assert_eq!(
        unsafe { libc::kill(status.supervisor_pid.unwrap() as i32, libc::SIGTERM) },
        0
    );
    common::wait_for("the daemon to stop", || nvlibfs::control::query(state, view).is_err());
    ok(
        mount_command(fixture, state).arg(view).output().unwrap(),
        "nvlibfs mount again",
    );
    let libcuda1 = "/usr/local/nvidia/lib64/libcuda.so.1";
    let again = daemon.run_ok(
        &["exec", &held, "/loader", libcuda1],
        "loading in the running container",
    );
    assert!(again.trim().ends_with(VERSION), "{again}");
    let fresh = daemon.run_ok(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &view_volume,
            "-v",
            &loader,
            IMAGE,
            "/loader",
            libcuda1,
        ],
        "loading in a new container",
    );
    assert!(fresh.trim().ends_with(VERSION), "{fresh}");
    let _ = daemon.docker(&["rm", "-f", &held]);
    drop(daemon);
    v.umount();
}

/// Rootless podman with CDI: the spec the view's mount point gets from
/// `nvlibfs cdi generate`, `--device nvidia.com/gpu=all`, as the
/// container's root and as uid 1000. This machine has no NVIDIA device
/// nodes: the whole run happens in a mount namespace whose /dev carries
/// stand-ins (and the few nodes podman itself needs), so nothing is left
/// on the host's /dev; the user's podman processes (its pause process
/// holds the namespaces it made) are ended before and after, so that the
/// run's podman is made in that namespace.
#[test]
fn rootless_podman_runs_the_view_from_its_cdi_spec() {
    common::require_fixture_tools();
    common::require("podman", "podman");
    common::require("newuidmap", "uidmap");
    common::require("runuser", "util-linux");
    common::require("unshare", "util-linux");
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (uid, _) = user();
    let nodes_before = common::nvidia_nodes();
    let end_users_processes = || {
        let _ = Command::new("pkill").args(["-9", "-u", USER]).output();
        std::thread::sleep(Duration::from_millis(300));
    };
    end_users_processes();
    let v = View::mount();
    let (view, dir) = (&v.path, &v.dir);
    let spec = PathBuf::from(format!(
        "/var/run/cdi/nvlibfs-rootless-test-{}.json",
        std::process::id()
    ));
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _spec = Remove(&spec);
    std::fs::create_dir_all("/var/run/cdi").unwrap();
    let tar = inner_rootfs().expect("the cached Debian root");
    let podman = format!(
        "runuser -u {USER} -- env XDG_RUNTIME_DIR=/run/user/{uid} podman --cgroup-manager cgroupfs --events-backend file"
    );
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    std::fs::create_dir_all(&runtime).unwrap();
    std::os::unix::fs::chown(&runtime, Some(uid), None).unwrap();
    let libcuda = "/usr/local/nvidia/lib64/libcuda.so.1";
    let script = format!(
        r#"set -e
nd=$(mktemp -d)
mount -t tmpfs -o mode=755 nvlibfs-test-dev "$nd"
for n in null zero full random urandom tty; do touch "$nd/$n"; mount --bind "/dev/$n" "$nd/$n"; done
mkdir "$nd/shm" "$nd/pts" "$nd/nvidia-caps"
mount -t tmpfs -o mode=1777 shm "$nd/shm"
for n in nvidia0 nvidiactl nvidia-uvm nvidia-uvm-tools; do mknod -m 666 "$nd/$n" c 1 3; done
mount --move "$nd" /dev
'{nvlibfs}' cdi generate --mountpoint '{view}' --output '{spec}'
{podman} image exists {IMAGE} || {podman} import --quiet '{tar}' {IMAGE} >/dev/null
for user in 0:0 1000:1000; do
    echo "as $user"
    {podman} run --rm --network none --user $user --device nvidia.com/gpu=all -v '{work}:/work:ro' {IMAGE} \
        sh -c 'id -u; ls /dev/nvidia0 /dev/nvidiactl /dev/nvidia-uvm; /work/nvlibfs-load {libcuda}; nvidia-smi'
done"#,
        nvlibfs = env!("CARGO_BIN_EXE_nvlibfs"),
        view = view.display(),
        spec = spec.display(),
        tar = tar.display(),
        work = dir.path().display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "sh", "-c", &script])
        .output()
        .unwrap();
    end_users_processes();
    let text = ok(out, "rootless podman with the view's CDI spec");
    for (user, id) in [("0:0", "0"), ("1000:1000", "1000")] {
        let part = text
            .split(&format!("as {user}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("{text}"));
        let part = part.split("as ").next().unwrap();
        assert!(part.starts_with(&format!("{id}\n")), "not uid {id}:\n{part}");
        assert!(part.contains(&format!("{libcuda} {VERSION}")), "{part}");
        assert!(part.contains(&format!("Driver Version: {VERSION}")), "{part}");
        assert!(part.contains("/dev/nvidia-uvm"), "{part}");
    }
    v.umount();
    assert_eq!(
        common::nvidia_nodes(),
        nodes_before,
        "/dev/nvidia* nodes changed on the host"
    );
}

/// A dockerd with `userns-remap` (a second one, beside the host's, with
/// its own socket, data root, containerd and network namespace): its containers' root is an
/// unprivileged user on the host (dockerd's own `dockremap` range), and
/// they load every library and run `nvidia-smi` from the view, as root and
/// as uid 1000 there, the files owned by the overflow user.
#[test]
fn a_userns_remap_dockerd_runs_the_view() {
    common::require_fixture_tools();
    common::require("dockerd", "docker.io");
    common::require("docker", "docker.io");
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let v = View::mount();
    let (view, dir) = (&v.path, &v.dir);

    let bridge = Path::new("/sys/class/net/docker0");
    let had_bridge = bridge.exists();
    let run_dir = PathBuf::from(format!("/run/nvlibfs-test-userns-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).unwrap();
    let socket = format!("unix://{}/docker.sock", run_dir.display());
    let data_root = cache_dir().join("userns-docker");
    let log = dir.path().join("dockerd-userns.log");
    // In a network namespace of its own: a dockerd without a bridge
    // deletes docker0 where it runs, which is the host's dockerd's.
    let dockerd = Command::new("unshare")
        .args(["--net", "--", "dockerd"])
        .arg("--userns-remap=default")
        .arg("--data-root")
        .arg(&data_root)
        .arg("--exec-root")
        .arg(run_dir.join("exec"))
        .arg("--pidfile")
        .arg(run_dir.join("docker.pid"))
        .args([
            "--host",
            &socket,
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    struct Stop(Child, PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: signals the dockerd this test started.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: the process group this test started (its containerd).
            unsafe { libc::killpg(self.0.id() as i32, libc::SIGKILL) };
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _dockerd = Stop(dockerd, run_dir.clone());
    let docker = |args: &[&str]| {
        Command::new("docker")
            .args(["-H", &socket])
            .args(args)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker(&["info"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the userns-remap dockerd did not answer:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = ok(
        docker(&["info", "--format", "{{json .SecurityOptions}}"]),
        "docker info",
    );
    assert!(info.contains("userns"), "{info}");
    if !docker(&["image", "inspect", IMAGE]).status.success() {
        let tar = inner_rootfs().expect("the cached Debian root");
        ok(
            docker(&["import", tar.to_str().unwrap(), IMAGE]),
            "docker import (userns-remap)",
        );
    }
    let view_volume = format!("{}:/usr/local/nvidia:ro,rslave", view.display());
    let loader = format!("{}:/loader:ro", dir.path().join("nvlibfs-load").display());
    let libcuda = "/usr/local/nvidia/lib64/libcuda.so.1";
    let script = format!("cat /proc/self/uid_map; /loader {libcuda}; nvidia-smi; stat -c %u {libcuda}");
    for user in ["0:0", "1000:1000"] {
        let said = ok(
            docker(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--user",
                user,
                "-v",
                &view_volume,
                "-v",
                &loader,
                "-e",
                "PATH=/usr/local/nvidia/bin:/usr/bin:/bin",
                IMAGE,
                "sh",
                "-c",
                &script,
            ]),
            &format!("a userns-remap container as {user}"),
        );
        let mapping: Vec<&str> = said.lines().next().unwrap_or_default().split_whitespace().collect();
        assert!(
            mapping.first() == Some(&"0") && mapping.get(1) != Some(&"0"),
            "not remapped: {said}"
        );
        assert!(said.contains(&format!("{libcuda} {VERSION}")), "{said}");
        assert!(said.contains(&format!("Driver Version: {VERSION}")), "{said}");
        assert!(said.trim_end().ends_with("65534"), "{said}");
    }
    drop(_dockerd);
    v.umount();
    assert_eq!(bridge.exists(), had_bridge, "the host dockerd's bridge came or went");
}

/// Rootless Docker-in-Docker, the shape of `docker:dind-rootless`: an
/// outer container whose dockerd runs rootless, as its uid 1000, given
/// the view; its inner containers load the driver from it, as root and as
/// uid 1000. Like the usual examples, the outer container needs
/// privileges (here all but CAP_SYS_RESOURCE, which this machine lacks)
/// for RootlessKit to make its namespaces.
#[test]
fn rootless_docker_in_docker_runs_the_view() {
    common::require_fixture_tools();
    common::require_docker_engine();
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let inner = inner_rootfs().expect("the cached Debian root");
    let outer = common::images::debian_image(
        &format!("nvlibfs-test-outer-rootless:{}", common::images::IMAGE_KEY),
        &inner,
        &["docker.io", "rootlesskit", "uidmap"],
        // useradd gives the user its subordinate ids.
        "useradd -m -u 1000 rootless && grep -q '^rootless:' /etc/subuid",
    )
    .expect("the rootless outer image");
    let v = View::mount();
    let (view, dir) = (&v.path, &v.dir);

    let name = format!("nvlibfs-test-rootless-dind-{}", std::process::id());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }
    let entry = "mount -o remount,rw /sys; mkdir -p /run/user/1000 && chown rootless /run/user/1000; \
        exec runuser -u rootless -- env XDG_RUNTIME_DIR=/run/user/1000 HOME=/home/rootless \
        PATH=/usr/share/docker.io/contrib:/usr/bin:/bin:/usr/sbin:/sbin \
        DOCKERD_ROOTLESS_ROOTLESSKIT_NET=host DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=none \
        DOCKERD_ROOTLESS_ROOTLESSKIT_MTU=65520 \
        dockerd-rootless.sh --bridge=none --iptables=false --storage-driver vfs";
    ok(
        Command::new("docker")
            .args(["run", "-d", "--name", &name, "--network", "none"])
            .args(common::images::all_but_privileged())
            .arg(format!("--volume={}:/nvlibs:ro,rslave", view.display()))
            .arg(format!("--volume={}:/work:ro", dir.path().display()))
            .arg(format!("--volume={}:/cache:ro", cache_dir().display()))
            .args([&outer, "sh", "-c", entry])
            .output()
            .unwrap(),
        "the rootless outer container",
    );
    let _outer = Remove(name.clone());
    let inner_docker = |args: &[&str]| {
        Command::new("docker")
            .args(["exec", &name, "runuser", "-u", "rootless", "--", "env"])
            .arg("DOCKER_HOST=unix:///run/user/1000/docker.sock")
            .arg("docker")
            .args(args)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !inner_docker(&["info"]).status.success() {
        if Instant::now() > deadline {
            let logs = Command::new("docker").args(["logs", &name]).output().unwrap();
            panic!(
                "the rootless dockerd in the outer container did not answer:\n{}",
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = ok(
        inner_docker(&["info", "--format", "{{json .SecurityOptions}}"]),
        "inner docker info",
    );
    assert!(info.contains("rootless"), "the inner dockerd is not rootless: {info}");
    let tar = format!("/cache/{}", inner.file_name().unwrap().to_string_lossy());
    ok(
        inner_docker(&["import", &tar, IMAGE]),
        "docker import (rootless, inside)",
    );
    let libcuda = "/usr/local/nvidia/lib64/libcuda.so.1";
    let script = format!("id -u; /work/nvlibfs-load {libcuda}; /usr/local/nvidia/bin/nvidia-smi; stat -c %u {libcuda}");
    for (user, id) in [("0:0", "0"), ("1000:1000", "1000")] {
        let said = ok(
            inner_docker(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--user",
                user,
                "-v",
                "/nvlibs:/usr/local/nvidia:ro,rslave",
                "-v",
                "/work:/work:ro",
                IMAGE,
                "sh",
                "-c",
                &script,
            ]),
            &format!("an inner container as {user}"),
        );
        assert!(said.starts_with(&format!("{id}\n")), "{said}");
        assert!(said.contains(&format!("{libcuda} {VERSION}")), "{said}");
        assert!(said.contains(&format!("Driver Version: {VERSION}")), "{said}");
        assert!(said.trim_end().ends_with("65534"), "{said}");
    }
    drop(_outer);
    v.umount();
}
