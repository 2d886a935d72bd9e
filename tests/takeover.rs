//! A new daemon takes over from the running one (`--take-over`), as a
//! DaemonSet's new pod or a replacement container does: no parent in
//! common, one state directory and one mount point. Loaders looping in
//! mount namespaces bound as containers bind the view (rslave and
//! docker's default private) see no failed load through three takeovers
//! in a row, on both data paths; each old daemon, stopped afterwards,
//! exits 0 without unmounting. A daemon that cannot restore the state
//! exactly is refused and the running one serves on.

mod common;

use common::loaders::{self, Bind};
use common::{builds, mount_command, nvlibfs, wait_for, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `nvlibfs mount --foreground --take-over` of `m`'s mount point, as a
/// container's entrypoint runs it: a child of this test, logging to `log`.
fn foreground_takeover(bin: &Path, m: &Mounted, extra: &[&str], log: &Path) -> Child {
    let template = mount_command(&m.fixture, &m.state_dir);
    let mut cmd = Command::new(bin.join("nvlibfs"));
    cmd.args(template.get_args())
        .args(extra)
        .args(["--foreground", "--take-over"])
        .arg(&m.mountpoint)
        .env_remove("NVLIBFS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().unwrap()
}

fn supervisor(m: &Mounted) -> Option<u32> {
    nvlibfs::control::query(&m.state_dir, &m.mountpoint)
        .ok()
        .and_then(|s| s.supervisor_pid)
}

/// Waits for `child` (a daemon this test started) to exit; its status.
fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let mut status = None;
    wait_for(what, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

fn three_takeovers_in_a_row(extra: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bins = tempfile::tempdir().unwrap();
    let bin = builds::binaries(bins.path());
    let m = Mounted::with_binaries(FixtureSpec::new(VERSION), extra, Some(&bin));
    let first = m.status();
    let data_path = first.data_path.clone();
    // The data path each variant is named for, not a quiet fallback.
    let named = if extra.contains(&"--no-passthrough") {
        "cached"
    } else {
        "passthrough"
    };
    assert_eq!(data_path, named, "{:?}", first.fallback_reason);
    // The supervisor holds the connection: the OOM killer is asked to pass
    // it over, as far as this machine lets a process ask (CAP_SYS_RESOURCE);
    // its server is as killable as any process.
    let adj = |pid: u32| -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(adj(first.pid), 0, "the server's OOM score adjustment");
    match adj(first.supervisor_pid.unwrap()) {
        -1000 => {}
        0 => {
            // The supervisor writes what it logged before the mount was
            // ready once its server says it serves, which `nvlibfs mount`
            // may hear first.
            let log = nvlibfs::control::log_path(&m.state_dir, &m.mountpoint);
            wait_for("the supervisor's first lines in the log", || {
                std::fs::read_to_string(&log).is_ok_and(|l| l.contains("could not lower the supervisor's OOM score"))
            });
        }
        other => panic!("the supervisor's OOM score adjustment is {other}"),
    }
    let loaders: Vec<Child> = (0..4)
        .map(|i| {
            let bind = if i % 2 == 0 { Bind::Rslave } else { Bind::Private };
            loaders::start_expecting(&m, i, bind, 6000, &[VERSION])
        })
        .collect();

    let mut previous: Option<Child> = None;
    let mut previous_pid = first.supervisor_pid.expect("a supervisor");
    for round in 1..=3 {
        std::thread::sleep(Duration::from_millis(400));
        let log = m.dir.path().join(format!("takeover-{round}.log"));
        let mut daemon = foreground_takeover(&bin, &m, extra, &log);
        let pid = daemon.id();
        // Done once the new daemon's server serves alone: the takeover is
        // in its record (the handovers before it came along).
        wait_for(&format!("takeover {round}"), || {
            nvlibfs::control::query(&m.state_dir, &m.mountpoint).is_ok_and(|s| {
                s.supervisor_pid == Some(pid) && s.handovers.iter().filter(|h| h.reason == "take-over").count() == round
            })
        });
        let status = m.status();
        assert_eq!(status.data_path, data_path, "the data path changed");
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the new daemon exited:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        // The daemon taken over is done. The first was a background
        // daemon: it exits by itself. The others ran in the foreground, as
        // a container's entrypoint does: they wait to be stopped, and
        // stopping one unmounts nothing.
        match previous.take() {
            None => {
                wait_for("the first daemon to exit", || {
                    !nvlibfs::control::process_running(previous_pid)
                });
            }
            Some(mut old) => {
                assert!(
                    old.try_wait().unwrap().is_none(),
                    "a foreground daemon exited once taken over"
                );
                // SAFETY: signals a daemon this test started.
                assert_eq!(unsafe { libc::kill(old.id() as i32, libc::SIGTERM) }, 0);
                let exit = wait_exit(&mut old, "the old daemon to exit on SIGTERM");
                assert!(
                    exit.success(),
                    "the old daemon exited with {exit:?} (signal {:?})",
                    exit.signal()
                );
            }
        }
        assert!(
            nvlibfs::mountinfo::at(&m.mountpoint).is_some(),
            "stopping the daemon taken over unmounted"
        );
        assert_eq!(supervisor(&m), Some(pid), "after the old daemon went");
        previous = Some(daemon);
        previous_pid = pid;
    }
    let last_event = loaders::now_ns();

    let outcomes: Vec<_> = loaders.into_iter().map(loaders::finish).collect();
    let (loads, failed, slowest) = loaders::totals(&outcomes);
    let texts: Vec<&str> = outcomes.iter().map(|o| o.text.as_str()).collect();
    assert_eq!(failed, 0, "{failed} of {loads} loads failed:\n{texts:#?}");
    assert!(loads > 400, "only {loads} loads");
    // Serving the pinned version all along (a stale libcuda would be a
    // wrong load, refused by finish) and still after the last takeover.
    loaders::loaded_after(&outcomes, last_event, VERSION);
    eprintln!("{data_path}: 3 takeovers, {loads} loads, none failed, slowest {slowest:.1} ms");

    // Stopping the daemon that serves still means unmounting.
    let mut last = previous.unwrap();
    // SAFETY: signals a daemon this test started.
    assert_eq!(unsafe { libc::kill(last.id() as i32, libc::SIGTERM) }, 0);
    let exit = wait_exit(&mut last, "the serving daemon to stop");
    assert!(exit.success(), "{exit:?}");
    let fuse = format!("{} fuse", m.mountpoint.join(".live").display());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&fuse),
        "still mounted after the serving daemon stopped:\n{mounts}"
    );
}

#[test]
fn three_takeovers_lose_no_load_with_passthrough() {
    common::require_fixture_tools();
    three_takeovers_in_a_row(&[]);
}

#[test]
fn three_takeovers_lose_no_load_on_the_cached_path() {
    common::require_fixture_tools();
    three_takeovers_in_a_row(&["--no-passthrough"]);
}

/// A daemon of another handover protocol cannot restore the state exactly:
/// refused, with the reason, and the running daemon serves on. Without
/// `--take-over` a second daemon fails at once, as ever; with it and
/// nothing served, it says what it found.
#[test]
fn a_takeover_that_cannot_be_exact_is_refused() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bins = tempfile::tempdir().unwrap();
    let bin = builds::binaries(bins.path());
    let m = Mounted::with_binaries(FixtureSpec::new(VERSION), &[], Some(&bin));
    let before = m.status();
    let other = tempfile::tempdir().unwrap();
    let other_bin = builds::binaries(other.path());
    builds::install(&builds::protocol_variant(), &other_bin);
    let loader = loaders::start_expecting(&m, 0, Bind::Private, 3000, &[VERSION]);
    let template = mount_command(&m.fixture, &m.state_dir);
    let out = Command::new(other_bin.join("nvlibfs"))
        .args(template.get_args())
        .arg("--take-over")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refused the takeover") && err.contains("protocol"),
        "{err}"
    );
    let refused_at = loaders::now_ns();
    let after = m.status();
    assert_eq!(after.supervisor_pid, before.supervisor_pid, "{after:?}");
    assert_eq!(after.pid, before.pid, "the running server changed");
    let outcome = loaders::finish(loader);
    assert_eq!(outcome.report.failed, 0, "{}", outcome.text);
    loaders::loaded_after(std::slice::from_ref(&outcome), refused_at, VERSION);

    // The running daemon still listens: a daemon of this build takes it over.
    common::ok(
        Command::new(bin.join("nvlibfs"))
            .args(template.get_args())
            .arg("--take-over")
            .arg(&m.mountpoint)
            .output()
            .unwrap(),
        "a takeover after a refused one",
    );
    assert_ne!(m.status().supervisor_pid, before.supervisor_pid);

    // No --take-over: refused at once, naming the daemon.
    let out = mount_command(&m.fixture, &m.state_dir)
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already served"), "{err}");

    // --take-over of a mount point nobody serves mounts it: what the first
    // pod of a DaemonSet on a node runs, like every later one.
    let fresh = m.dir.path().join("fresh");
    let said = common::ok(
        nvlibfs()
            .args(mount_command(&m.fixture, &m.state_dir).get_args())
            .arg("--take-over")
            .arg(&fresh)
            .output()
            .unwrap(),
        "nvlibfs mount --take-over with nothing to take over",
    );
    assert!(said.contains("serving NVIDIA driver"), "{said}");
    common::umount(&fresh, &m.state_dir);
}

/// A root without capabilities opens more connections to the takeover
/// socket than its queue holds, and says nothing on any: each is refused
/// at once, not read for seconds, and while it holds them all open a real
/// `--take-over` goes through. The running daemon used to read each for
/// its offer, 5 s apiece on its one accepting thread, before it looked at
/// who had connected, so a few idle connections held every takeover up.
#[test]
fn connections_that_say_nothing_hold_up_no_takeover() {
    common::require_fixture_tools();
    common::require("setpriv", "util-linux");
    common::require("python3", "python3");
    const IDLE: &str = r#"
import signal, socket, sys, time
signal.alarm(60)
held, said = [], []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Blocking, so that past the queue's 4 the connect waits for the
    # daemon to accept (with a timeout it would be EAGAIN at once).
    s.connect(sys.argv[1])
    s.settimeout(10)
    held.append(s)
for s in held:
    try:
        msg = s.recv(65536)
        said.append(chr(msg[0]) if msg else "EOF")
    except Exception as e:
        said.append(type(e).__name__)
print(" ".join(said), flush=True)
time.sleep(120)
"#;
    const CONNECTIONS: usize = 12;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bins = tempfile::tempdir().unwrap();
    let bin = builds::binaries(bins.path());
    let m = Mounted::with_binaries(FixtureSpec::new(VERSION), &[], Some(&bin));
    let before = m.status();
    let takeover = nvlibfs::control::takeover_path(&m.state_dir, &m.mountpoint);
    let mut idle = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-all",
            "--inh-caps",
            "-all",
            "--",
            "python3",
            "-c",
            IDLE,
        ])
        .arg(&takeover)
        .arg(CONNECTIONS.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(idle.stdout.take().unwrap()), &mut said).unwrap();
    let refused = said.split_whitespace().filter(|&tag| tag == "X").count();
    let out = Command::new(bin.join("nvlibfs"))
        .args(mount_command(&m.fixture, &m.state_dir).get_args())
        .arg("--take-over")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let _ = idle.kill();
    let _ = idle.wait();
    assert_eq!(refused, CONNECTIONS, "each idle connection got: {said}");
    common::ok(out, "a takeover while a capless root holds idle connections");
    assert_ne!(m.status().supervisor_pid, before.supervisor_pid);
}

/// The platforms' own form: every daemon in a container of an nvlibfs
/// image, as a DaemonSet's pods or compose services are, sharing the
/// state directory and the mount point (bound rshared, as a pod's
/// Bidirectional volume), each new one started with `--take-over` from
/// an image of the other build (an upgrade, then back); the old one,
/// stopped as the platform stops it, exits 0. Loaders run in their own
/// containers, one bound rslave and one with docker's default private
/// bind, through three takeovers on each data path.
#[test]
fn containers_of_an_nvlibfs_image_take_over_in_turn() {
    common::require_fixture_tools();
    common::require_docker_engine();
    common::images::require_image_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let images = Images::build();
    for extra in [&[][..], &["--no-passthrough"][..]] {
        take_over_in_containers(&images, extra);
    }
}

const IMAGE: &str = "nvlibfs-test-takeover";
/// The build id of the image's second build, as another release's.
const UPGRADE_ID: &str = "upgraded-in-a-container";

struct Images {
    /// This build's image, and the rebuilt one's.
    tags: [String; 2],
    loader: tempfile::TempDir,
}

impl Images {
    /// Two nvlibfs images from the cached Debian root: this build and a
    /// rebuild with another version string, as two releases would be.
    fn build() -> Images {
        use common::images::{inner_rootfs, run};
        let base = format!("nvlibfs-test-base:{}", common::images::IMAGE_KEY);
        if run(Command::new("docker").args(["image", "inspect", &base])).is_err() {
            let tar = inner_rootfs().expect("the cached Debian root");
            run(Command::new("docker").arg("import").arg(&tar).arg(&base)).expect("docker import");
        }
        let context = tempfile::tempdir().unwrap();
        let bin = builds::binaries(context.path());
        let upgraded = builds::variant("rebuilt-in-a-container", &[("NVLIBFS_BUILD_ID", UPGRADE_ID)]);
        let mut tags = Vec::new();
        for (n, daemon) in [None, Some(upgraded)].into_iter().enumerate() {
            if let Some(daemon) = &daemon {
                builds::install(daemon, &bin);
            }
            std::fs::write(
                context.path().join("Dockerfile"),
                format!("FROM {base}\nCOPY bin/nvlibfs bin/nvlibfs-mountd /usr/local/bin/\n"),
            )
            .unwrap();
            let tag = format!("{IMAGE}:{n}");
            // The last run's image of that tag, or it stays behind untagged.
            let _ = run(Command::new("docker").args(["image", "rm", &tag]));
            run(Command::new("docker")
                .args(["build", "-q", "-t", &tag])
                .arg(context.path()))
            .unwrap_or_else(|e| panic!("docker build {tag}: {e}"));
            tags.push(tag);
        }
        let loader = tempfile::tempdir().unwrap();
        nvlibfs_fixture::build_loader(loader.path()).unwrap();
        Images {
            tags: tags.try_into().unwrap(),
            loader,
        }
    }
}

/// A container the test removes when dropped.
struct Container(String);

impl Container {
    fn run(name: &str, args: &[String]) -> Container {
        let _ = Command::new("docker").args(["rm", "-f", name]).output();
        common::images::run(Command::new("docker").args(["run", "-d", "--name", name]).args(args))
            .unwrap_or_else(|e| panic!("docker run {name}: {e}"));
        Container(name.to_owned())
    }

    fn stop(&self) -> i64 {
        common::images::run(Command::new("docker").args(["stop", "-t", "20", &self.0])).unwrap();
        let code = common::images::run(Command::new("docker").args(["inspect", "-f", "{{.State.ExitCode}}", &self.0]))
            .unwrap();
        code.trim().parse().unwrap()
    }

    fn logs(&self) -> String {
        let out = Command::new("docker").args(["logs", &self.0]).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn wait(&self) -> i64 {
        let code = common::images::run(Command::new("docker").args(["wait", &self.0])).unwrap();
        code.trim().parse().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn take_over_in_containers(images: &Images, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let (view, state) = (dir.path().join("view"), dir.path().join("state"));
    std::fs::create_dir_all(&view).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    // The mount the daemons make inside reaches the host (and the loaders)
    // only through a shared mount, as a pod's Bidirectional volume.
    for args in [vec!["--bind", &*view.to_string_lossy()], vec!["--make-shared"]] {
        common::ok(
            Command::new("mount").args(&args).arg(&view).output().unwrap(),
            "a shared mount for the view",
        );
    }
    // The daemons' tmpfs propagates back on top of the shared bind, at the
    // same place: each `umount -R` takes the top tree only, so again until
    // nothing is mounted there (one pass left the bind behind).
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            for _ in 0..8 {
                if nvlibfs::mountinfo::at(self.0).is_none() {
                    break;
                }
                let _ = Command::new("umount").arg("-R").arg("-l").arg(self.0).output();
            }
        }
    }
    let _unmount = Unmount(&view);
    let daemon_args = |image: &str, take_over: bool| -> Vec<String> {
        let mut args: Vec<String> = common::images::all_but_privileged()
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(
            [
                "--device",
                "/dev/fuse",
                "--network",
                "none",
                "-v",
                &format!("{}:/run/nvlibfs", state.display()),
                "-v",
                &format!("{}:/run/nvlibs:rshared", view.display()),
                "-v",
                &format!("{}:/host:ro", fixture.root.display()),
                image,
                "nvlibfs",
                "mount",
                "--foreground",
                "--driver-root",
                "/host",
                "--module-version-file",
                "/host/sys/module/nvidia/version",
            ]
            .map(str::to_owned),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        if take_over {
            args.push("--take-over".into());
        }
        args.push("/run/nvlibs".into());
        args
    };
    let status = || nvlibfs::control::query(&state, Path::new("/run/nvlibs"));
    let tag = |n: usize| images.tags[n % 2].clone();
    let mut serving = Container::run("nvlibfs-test-daemon-0", &daemon_args(&tag(0), false));
    wait_for("the first daemon to serve", || status().is_ok());
    let first = status().unwrap();
    let data_path = first.data_path.clone();

    let loaders: Vec<Container> = ["ro,rslave", "ro"]
        .iter()
        .enumerate()
        .map(|(i, bind)| {
            Container::run(
                &format!("nvlibfs-test-loader-{i}"),
                &[
                    "--network".into(),
                    "none".into(),
                    "-v".into(),
                    format!("{}:/usr/local/nvidia:{bind}", view.display()),
                    "-v".into(),
                    format!("{}:/loader:ro", images.loader.path().display()),
                    tag(0),
                    "/loader/nvlibfs-load".into(),
                    "--loop".into(),
                    "15000".into(),
                    "--expect".into(),
                    VERSION.into(),
                    "/usr/local/nvidia/lib64/libcuda.so.1".into(),
                ],
            )
        })
        .collect();

    for round in 1..=3 {
        std::thread::sleep(Duration::from_millis(700));
        let image = tag(round);
        let next = Container::run(&format!("nvlibfs-test-daemon-{round}"), &daemon_args(&image, true));
        wait_for(&format!("takeover {round}"), || {
            status().is_ok_and(|s| s.handovers.iter().filter(|h| h.reason == "take-over").count() == round)
        });
        let now = status().unwrap();
        // An upgrade to the rebuilt image, then back.
        if round % 2 == 1 {
            assert!(
                now.version.contains(UPGRADE_ID),
                "{image} does not serve: {}",
                now.version
            );
        } else {
            assert_eq!(now.version, first.version, "{image} does not serve");
        }
        assert_eq!(now.data_path, data_path);
        // What a rolling update does once the new pod is ready.
        let code = serving.stop();
        assert_eq!(code, 0, "the daemon taken over exited {code}:\n{}", serving.logs());
        assert!(status().is_ok(), "stopping the daemon taken over stopped the mount");
        serving = next;
    }
    let last_event = loaders::now_ns();

    let reports: Vec<(String, nvlibfs_fixture::LoopReport)> = loaders
        .iter()
        .map(|l| {
            assert_eq!(l.wait(), 0, "{}", l.logs());
            let text = l.logs();
            (text.clone(), nvlibfs_fixture::LoopReport::parse(&text))
        })
        .collect();
    let loads: u64 = reports.iter().map(|(_, r)| r.ok).sum();
    let failed: u64 = reports.iter().map(|(_, r)| r.failed).sum();
    assert_eq!(failed, 0, "{failed} of {loads} loads failed: {reports:#?}");
    assert!(loads > 1000, "only {loads} loads: {reports:#?}");
    for (text, r) in &reports {
        assert_eq!(r.wrong, 0, "loads of another version ({:?}):\n{text}", r.wrong_versions);
        assert!(
            r.loads_after(last_event) > 0,
            "no load after the last takeover:\n{text}"
        );
        assert_eq!(r.version_after(last_event), Some(VERSION), "{text}");
    }
    eprintln!("containers, {data_path}: 3 takeovers, {loads} loads, none failed");

    // Stopping the daemon that serves still unmounts.
    assert_eq!(serving.stop(), 0, "{}", serving.logs());
    let fuse = format!("{} fuse", view.join(".live").display());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&fuse), "still mounted:\n{mounts}");
}
