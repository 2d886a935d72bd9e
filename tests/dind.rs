//! Docker-in-Docker end to end, with a real dockerd: the host mounts a
//! fixture driver with `nvlibfs mount`, an outer container runs its own
//! dockerd with the mount as a volume, and containers started by that inner
//! dockerd load the driver from the view, as root and as an unprivileged
//! user, and see the host's bytes. Needs root, /dev/fuse, a running host
//! dockerd, debootstrap and the Debian archive for the first (cached) build
//! of the images; `.ci/run` provides all of them.

mod common;

use common::images::{cache_dir, inner_rootfs, run, IMAGE_KEY};
use common::{nvlibfs, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STALE: &str = "570.86.15";
fn docker() -> Command {
    Command::new("docker")
}

/// One named step: says how long it took, or fails the test naming it.
fn step<T>(name: &str, f: impl FnOnce() -> Result<T, String>) -> T {
    let start = Instant::now();
    match f() {
        Ok(v) => {
            eprintln!("dind: {name}: ok ({:.1} s)", start.elapsed().as_secs_f64());
            v
        }
        Err(why) => panic!("dind: step '{name}' failed: {why}"),
    }
}

/// The outer image: the same Debian with Debian's docker.io, imported into
/// the host's dockerd once.
fn outer_image(inner: &Path) -> Result<String, String> {
    common::images::debian_image(&format!("nvlibfs-test-outer:{IMAGE_KEY}"), inner, &["docker.io"], "")
}

/// The outer Docker-in-Docker container, removed with its storage on drop.
struct Outer {
    name: String,
    volume: String,
}

impl Outer {
    /// As FACTS §6 says this machine needs: no --privileged (the bounding
    /// set lacks CAP_SYS_RESOURCE), /sys and cgroups remounted read-write,
    /// /var/lib/docker on a volume (overlay on overlay fails).
    fn start(image: &str, view: &Path, work: &Path, cache: &Path) -> Result<Outer, String> {
        let outer = Outer {
            name: format!("nvlibfs-test-outer-{}", std::process::id()),
            volume: format!("nvlibfs-test-docker-{}", std::process::id()),
        };
        let entry = "mount -o remount,rw /sys; \
            for d in /sys/fs/cgroup/*; do mount -o remount,bind,rw \"$d\"; done; \
            exec dockerd --iptables=false --ip-masq=false --bridge=none";
        run(docker()
            .args(["run", "-d", "--name", &outer.name])
            .args(common::images::all_but_privileged())
            .arg(format!("--volume={}:/var/lib/docker", outer.volume))
            // rslave: a wholly new daemon's mount reaches this container.
            .arg(format!("--volume={}:/nvlibs:ro,rslave", view.display()))
            .arg(format!("--volume={}:/work:ro", work.display()))
            .arg(format!("--volume={}:/cache:ro", cache.display()))
            .args([image, "sh", "-c", entry]))?;
        Ok(outer)
    }

    fn exec(&self) -> Command {
        let mut c = docker();
        c.args(["exec", &self.name]);
        c
    }

    fn wait_for_dockerd(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match run(self.exec().args(["docker", "info"])) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let logs = run(docker().args(["logs", "--tail", "20", &self.name])).unwrap_or_default();
                    let err = docker()
                        .args(["logs", "--tail", "20", &self.name])
                        .output()
                        .map(|o| o.stderr);
                    return Err(format!(
                        "inner dockerd not up after 60 s: {e}\nouter logs:\n{logs}{}",
                        String::from_utf8_lossy(&err.unwrap_or_default())
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// `docker run` inside the outer container.
    fn docker_run(&self, flags: &[String], image: &str, script: &str) -> Result<String, String> {
        run(self
            .exec()
            .args(["docker", "run", "--rm", "--network", "none"])
            .args(flags)
            .args([image, "sh", "-c", script]))
    }
}

impl Drop for Outer {
    fn drop(&mut self) {
        let _ = docker().args(["rm", "-f", &self.name]).output();
        let _ = docker().args(["volume", "rm", "-f", &self.volume]).output();
    }
}

/// `sha256sum` output as path -> digest.
fn digests(output: &str, strip: &Path) -> BTreeMap<PathBuf, String> {
    output
        .lines()
        .filter_map(|l| l.split_once("  "))
        .filter(|(d, _)| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(d, p)| {
            (
                Path::new(p).strip_prefix(strip).unwrap_or(Path::new(p)).to_owned(),
                d.to_owned(),
            )
        })
        .collect()
}

#[test]
fn inner_containers_load_the_hosts_driver_through_docker_in_docker() {
    common::require_docker_engine();
    common::require_fixture_tools();
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    step("host dockerd is up", || {
        run(docker().args(["info", "--format", "{{.ServerVersion}}"]))
            .map_err(|e| format!("{e}\n(start it: `dockerd &`, or run contrib/test.sh, which does)"))
    });
    let inner_tar = step("inner image root file system (debootstrap, cached)", inner_rootfs);
    let outer_image = step("outer image with dockerd (cached)", || outer_image(&inner_tar));
    let m = step("nvlibfs mount of a fixture driver", || {
        Ok(Mounted::new(
            FixtureSpec {
                stale: Some(STALE.into()),
                ..FixtureSpec::new(VERSION)
            },
            &[],
        ))
    });
    let outer = step("outer container start", || {
        Outer::start(&outer_image, &m.mountpoint, m.dir.path(), &cache_dir())
    });
    step("inner dockerd answers", || outer.wait_for_dockerd());
    let inner_image = "nvlibfs-test-inner";
    step("inner image import into the inner dockerd", || {
        run(outer.exec().args([
            "docker",
            "import",
            &format!("/cache/{}", inner_tar.file_name().unwrap().to_string_lossy()),
            inner_image,
        ]))
    });

    // What the inner container must see: every served file with the
    // host's bytes, every library at the pinned version.
    let view = Path::new("/usr/local/nvidia");
    let mut served: Vec<(PathBuf, PathBuf)> = m
        .fixture
        .libraries
        .iter()
        .map(|l| (l.host_path.clone(), l.view_path.clone()))
        .collect();
    served.extend(m.fixture.others.iter().cloned());
    let host_digests = step("host digests", || {
        let mut cmd = Command::new("sha256sum");
        cmd.args(served.iter().map(|(host, _)| m.fixture.root.join(host)));
        let by_host = digests(&run(&mut cmd)?, &m.fixture.root);
        Ok(served
            .iter()
            .map(|(host, view)| (view.clone(), by_host[host].clone()))
            .collect::<BTreeMap<_, _>>())
    });
    let libs: Vec<String> = m
        .lib64()
        .iter()
        .map(|(p, _)| view.join(p.strip_prefix(&m.mountpoint).unwrap()).display().to_string())
        .collect();
    let files: Vec<String> = served.iter().map(|(_, v)| view.join(v).display().to_string()).collect();
    let script = format!(
        "set -e; id -u; /work/nvlibfs-load {}; /usr/local/nvidia/bin/nvidia-smi; sha256sum {}",
        libs.join(" "),
        files.join(" ")
    );
    let volume = vec![
        "--volume=/nvlibs:/usr/local/nvidia:ro,rslave".to_owned(),
        "--volume=/work:/work:ro".to_owned(),
        "--env=LD_LIBRARY_PATH=/usr/local/nvidia/lib64".to_owned(),
    ];

    for (who, user) in [("root", None), ("uid 65534", Some("--user=65534:65534"))] {
        let mut flags = volume.clone();
        flags.extend(user.map(str::to_owned));
        let out = step(&format!("inner container as {who}: load, nvidia-smi, digests"), || {
            outer.docker_run(&flags, inner_image, &script)
        });
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(if user.is_some() { "65534" } else { "0" }), "{out}");
        for (lib, (_, version)) in libs.iter().zip(m.lib64()) {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{lib} ")))
                .unwrap_or_else(|| panic!("{lib} not loaded:\n{out}"));
            assert_eq!(line, format!("{lib} {version}"), "as {who}");
        }
        assert!(
            out.contains(&format!("Driver Version: {VERSION}")),
            "nvidia-smi as {who}:\n{out}"
        );
        let seen = digests(&out, view);
        assert_eq!(
            seen, host_digests,
            "bytes seen by the inner container as {who} differ from the host's"
        );
    }

    // An image that carries its own, stale libcuda: the documented flags
    // (`nvlibfs docker-flags`) still make the process load the host's.
    let stale_image = "nvlibfs-test-stale";
    let stale_lib = m.fixture.stale_libraries.iter().find(|l| l.name == "libcuda").unwrap();
    step("inner image with a stale libcuda.so.1 baked in", || {
        let bake = format!(
            "cp /work/host/{} /usr/lib/x86_64-linux-gnu/ && \
             ln -s {} /usr/lib/x86_64-linux-gnu/libcuda.so.1 && ldconfig",
            stale_lib.host_path.display(),
            stale_lib.host_path.file_name().unwrap().to_string_lossy()
        );
        let name = "nvlibfs-test-bake";
        run(outer.exec().args([
            "docker",
            "run",
            "--name",
            name,
            "--network",
            "none",
            "--volume=/work:/work:ro",
            inner_image,
            "sh",
            "-c",
            &bake,
        ]))?;
        run(outer.exec().args(["docker", "commit", name, stale_image]))?;
        run(outer.exec().args(["docker", "rm", name]))
    });
    let own = step("stale image on its own loads its own libcuda", || {
        outer.docker_run(
            &["--volume=/work:/work:ro".to_owned()],
            stale_image,
            "/work/nvlibfs-load libcuda.so.1",
        )
    });
    assert_eq!(
        own.trim(),
        format!("libcuda.so.1 {STALE}"),
        "the image should carry the stale library"
    );
    let documented = step("nvlibfs docker-flags", || {
        run(nvlibfs().args(["docker-flags", "--mountpoint", "/nvlibs"]))
    });
    let mut flags: Vec<String> = documented.lines().map(str::to_owned).collect();
    flags.push("--volume=/work:/work:ro".to_owned());
    let with_view = step("stale image with the documented flags", || {
        outer.docker_run(&flags, stale_image, "/work/nvlibfs-load libcuda.so.1 && nvidia-smi")
    });
    assert!(
        with_view.starts_with(&format!("libcuda.so.1 {VERSION}\n")),
        "the view must win:\n{with_view}"
    );
    assert!(
        with_view.contains(&format!("Driver Version: {VERSION}")),
        "nvidia-smi on PATH from the view:\n{with_view}"
    );

    eprintln!("dind: all steps passed in {:.1} s", started.elapsed().as_secs_f64());
    drop(outer);
}
