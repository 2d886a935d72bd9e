//! Under a real systemd as PID 1 (containers from debootstrapped Debian 12,
//! systemd 252, and Debian 13, systemd 257), the unit from contrib/systemd
//! serving a fixture driver at /run/nvlibs, with loaders looping through it
//! the whole time: SIGKILL of the serving process, `systemctl kill -s KILL
//! nvlibfs` (the whole unit: systemd starts it again and hands back its
//! file-descriptor store) and `systemctl reload nvlibfs` fail no load.
//! `systemctl restart` under systemd 257, which keeps the store across it
//! (`FileDescriptorStorePreserve=`), fails no load either, and `systemctl
//! stop` then unmounts; under 252 a restart is a stop (which unmounts) and
//! a start: its outage is measured and printed, and the loaders load again
//! after it.
//!
//! This machine mounts cgroup v1, which systemd 256+ refuses unless told
//! otherwise on the kernel command line; a container's systemd reads that
//! from `SYSTEMD_PROC_CMDLINE`, so the Debian 13 container boots with
//! `systemd.unified_cgroup_hierarchy=0 SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1`
//! there (on a cgroup v2 host it needs nothing).

mod common;

use common::images::{all_but_privileged, cache_dir, debootstrap_tar, run};
use common::loaders::{finish, handovers, loaded_after, now_ns, totals, Outcome};
use common::VERSION;
use nvlibfs::control::Status;
use nvlibfs_fixture::{build, build_loader, FixtureSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Debian release with its systemd.
struct Systemd {
    suite: &'static str,
    /// Whether its systemd keeps a unit's fd store across a restart
    /// (`FileDescriptorStorePreserve=`, 254+).
    keeps_store_across_restart: bool,
}

const BOOKWORM: Systemd = Systemd {
    suite: "bookworm",
    keeps_store_across_restart: false,
};
const TRIXIE: Systemd = Systemd {
    suite: "trixie",
    keeps_store_across_restart: true,
};

impl Systemd {
    fn image(&self) -> String {
        format!("nvlibfs-test-systemd:{}-1", self.suite)
    }

    fn cache_name(&self) -> String {
        format!("systemd-{}-1", self.suite)
    }

    /// Debian with systemd, imported into the host's dockerd once; the
    /// root file system is cached beside the other test images.
    fn build(&self) -> Result<(), String> {
        if run(docker().args(["image", "inspect", &self.image()])).is_ok() {
            return Ok(());
        }
        let tar = debootstrap_tar(&self.cache_name(), self.suite, &["systemd", "systemd-sysv", "dbus"])?;
        run(Command::new("sh")
            .arg("-c")
            .arg(format!("docker import '{}' {}", tar.display(), self.image())))?;
        Ok(())
    }
}

fn docker() -> Command {
    Command::new("docker")
}

/// One systemd container at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether this machine mounts cgroup v1 (systemd 256+ then needs telling).
fn cgroup_v1() -> bool {
    !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A container booted with systemd as PID 1; removed when dropped.
struct Machine {
    name: String,
}

impl Machine {
    fn boot(systemd: &Systemd, test: &Path, out: &Path) -> Result<Machine, String> {
        let name = format!("nvlibfs-test-systemd-{}-{}", systemd.suite, std::process::id());
        let _ = docker().args(["rm", "-f", &name]).output();
        // As for the DIND test's outer container; systemd also wants the
        // cgroup tree and its own /run.
        run(docker()
            .args(["run", "-d", "--name", &name, "--network", "none"])
            .args(all_but_privileged())
            .args([
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            ])
            .args(["--device", "/dev/fuse"])
            .args(match (systemd.keeps_store_across_restart, cgroup_v1()) {
                (true, true) => vec![
                    "-e",
                    "SYSTEMD_PROC_CMDLINE=systemd.unified_cgroup_hierarchy=0 SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1",
                ],
                _ => vec![],
            })
            .arg(format!("--volume={}:/test:ro", test.display()))
            .arg(format!("--volume={}:/out", out.display()))
            .args([&systemd.image(), "/lib/systemd/systemd"]))?;
        let machine = Machine { name };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = machine.sh("systemctl is-system-running || true").unwrap_or_default();
            if matches!(state.trim(), "running" | "degraded") {
                return Ok(machine);
            }
            if Instant::now() > deadline {
                return Err(format!("systemd did not come up: {state}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn sh(&self, script: &str) -> Result<String, String> {
        run(docker().args(["exec", &self.name, "sh", "-c", script]))
    }

    fn status(&self) -> Result<Status, String> {
        let json = self.sh("/test/bin/nvlibfs status --json /run/nvlibs")?;
        serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))
    }

    /// Waits until the unit serves and has made `handovers` handovers.
    fn wait_serving(&self, handovers: usize) -> Result<Status, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = self.status() {
                if s.handovers.len() >= handovers {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                let journal = self
                    .sh("journalctl -u nvlibfs --no-pager | tail -30")
                    .unwrap_or_default();
                return Err(format!("not serving with {handovers} handovers after 30 s:\n{journal}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn loader(&self, ms: u64) -> Child {
        docker()
            .args(["exec", &self.name, "/test/nvlibfs-load", "--loop", &ms.to_string()])
            .args(["--expect", VERSION, "/run/nvlibs/lib64/libcuda.so.1"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = docker().args(["rm", "-f", &self.name]).output();
    }
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T, String>) -> T {
    f().unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn under_systemd_252_crashes_kills_and_reloads_fail_no_load() {
    under_systemd(&BOOKWORM);
}

#[test]
fn under_systemd_257_restarts_fail_no_load_either() {
    under_systemd(&TRIXIE);
}

fn under_systemd(systemd: &Systemd) {
    common::require_fixture_tools();
    common::require_docker_engine();
    if run(docker().args(["image", "inspect", &systemd.image()])).is_err()
        && !cache_dir().join(format!("{}.tar", systemd.cache_name())).exists()
    {
        common::require("debootstrap", "debootstrap");
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    step("systemd image (cached)", || systemd.build());
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("test");
    let out = dir.path().join("out");
    std::fs::create_dir_all(test.join("bin")).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    common::nvlibfs(); // builds nvlibfs-mountd beside nvlibfs
    let built = PathBuf::from(env!("CARGO_BIN_EXE_nvlibfs"));
    for name in ["nvlibfs", "nvlibfs-mountd"] {
        std::fs::copy(built.with_file_name(name), test.join("bin").join(name)).unwrap();
    }
    build(&FixtureSpec::new(VERSION), &test.join("host")).expect("fixture builds");
    build_loader(&test).expect("loader builds");

    let machine = step("boot systemd in a container", || Machine::boot(systemd, &test, &out));
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/systemd/nvlibfs.service")).unwrap();
    let dropin = "[Service]\nExecStart=\nExecStart=/test/bin/nvlibfs mount --foreground --driver-root /test/host \
                  --module-version-file /test/host/sys/module/nvidia/version /run/nvlibs\n\
                  ExecReload=\nExecReload=/test/bin/nvlibfs restart /run/nvlibs\n";
    step("install and start the unit", || {
        machine.sh(&format!(
            "cat > /etc/systemd/system/nvlibfs.service <<'EOF'\n{unit}EOF\n\
             mkdir -p /etc/systemd/system/nvlibfs.service.d\n\
             cat > /etc/systemd/system/nvlibfs.service.d/test.conf <<'EOF'\n{dropin}EOF\n\
             systemctl daemon-reload && systemctl start nvlibfs"
        ))
    });
    let first = step("the unit serves", || machine.wait_serving(0));
    assert!(first.supervisor_pid.is_some(), "{first:?}");

    let loaders: Vec<Child> = (0..4).map(|_| machine.loader(9000)).collect();
    std::thread::sleep(Duration::from_millis(1000));
    // The serving process alone.
    let pid = step("status", || machine.status()).pid;
    step("SIGKILL of the server", || machine.sh(&format!("kill -9 {pid}")));
    step("taken over", || machine.wait_serving(1));
    std::thread::sleep(Duration::from_millis(1500));
    // The whole unit: systemd starts it again with its fd store.
    step("systemctl kill -s KILL nvlibfs", || {
        machine.sh("systemctl kill -s KILL nvlibfs")
    });
    // The supervisor tells its server the handovers once the server says
    // it is ready, so a status in between lists none yet: wait for them.
    let after_kill = step("restarted by systemd, fd store taken over", || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Ok(s) = machine.status() {
                if s.supervisor_pid != first.supervisor_pid && !s.handovers.is_empty() {
                    return Ok(s);
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                let journal = machine
                    .sh("journalctl -u nvlibfs --no-pager | tail -30")
                    .unwrap_or_default();
                return Err(format!(
                    "no new supervisor with a handover after 30 s; last status {last:?}\n{journal}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(
        after_kill.handovers.iter().any(|h| h.reason == "supervisor restart"),
        "the new supervisor mounted afresh instead of taking the kept connection over: {after_kill:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    step("systemctl reload nvlibfs", || machine.sh("systemctl reload nvlibfs"));
    let reloaded_at = now_ns();
    let reloaded = step("status", || machine.status());
    assert!(reloaded.handovers.iter().any(|h| h.reason == "restart"), "{reloaded:?}");

    let outcomes: Vec<Outcome> = loaders.into_iter().map(finish).collect();
    let (loads, failed, slowest) = totals(&outcomes);
    eprintln!(
        "systemd: {loads} loads, {failed} failed, slowest {slowest:.1} ms; handovers: {}",
        handovers(&reloaded)
    );
    assert!(loads > 4 * 1000, "only {loads} loads");
    assert_eq!(failed, 0, "{:#?}", outcomes.iter().map(|o| &o.text).collect::<Vec<_>>());
    // The pinned version all along (finish refuses any other), still
    // loaded after the reload.
    loaded_after(&outcomes, reloaded_at, VERSION);
    // Against a hang only: how slow loads are is benches/handover.rs's.
    assert!(slowest < 10_000.0, "a load took {slowest:.0} ms");

    let loaders: Vec<Child> = (0..4).map(|_| machine.loader(5000)).collect();
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    let restart_began = now_ns();
    step("systemctl restart nvlibfs", || machine.sh("systemctl restart nvlibfs"));
    let took = started.elapsed();
    let restarted_at = now_ns();
    let outcomes: Vec<Outcome> = loaders.into_iter().map(finish).collect();
    let (loads, failed, slowest) = totals(&outcomes);
    if systemd.keeps_store_across_restart {
        // The connection waited in the store; the new daemon took it over.
        let restarted = step("served after the restart", || machine.wait_serving(1));
        eprintln!(
            "systemd ({}): systemctl restart took {:.0} ms; {loads} loads, {failed} failed, slowest {slowest:.1} ms; \
             handovers: {}",
            systemd.suite,
            took.as_secs_f64() * 1e3,
            handovers(&restarted)
        );
        assert_ne!(
            restarted.supervisor_pid, reloaded.supervisor_pid,
            "no new daemon: {restarted:?}"
        );
        assert_eq!(
            restarted.handovers.last().map(|h| h.reason.as_str()),
            Some("supervisor restart"),
            "the new daemon did not take the kept connection over: {restarted:?}"
        );
        assert_eq!(failed, 0, "{:#?}", outcomes.iter().map(|o| &o.text).collect::<Vec<_>>());
        loaded_after(&outcomes, restarted_at, VERSION);
        // Left in the store drained, not killed with requests in hand.
        let journal = step("journal", || machine.sh("journalctl -u nvlibfs --no-pager"));
        assert!(
            journal.contains("the connection waits in systemd's fd store"),
            "the restart did not leave the connection drained:\n{journal}"
        );

        // A stop is still a stop.
        step("systemctl stop nvlibfs", || machine.sh("systemctl stop nvlibfs"));
        let mounts = step("mounts", || machine.sh("cat /proc/mounts"));
        assert!(
            !mounts.contains("/run/nvlibs/.live fuse"),
            "still mounted after a stop:\n{mounts}"
        );
    } else {
        // A stop, which unmounts, then a start.
        eprintln!(
            "systemd ({}): systemctl restart took {:.0} ms; {failed} loads failed across 4 loaders (about one a \
             ms each)",
            systemd.suite,
            took.as_secs_f64() * 1e3
        );
        // The outage was seen (the stop unmounted), and every loader
        // loaded the pinned version again once `systemctl restart` returned.
        for (i, o) in outcomes.iter().enumerate() {
            assert!(
                o.report.failed > 0 && o.report.recovered_at.iter().any(|&at| at > restart_began),
                "loader {i} saw no outage and recovery across the restart:\n{}",
                o.text
            );
        }
        loaded_after(&outcomes, restarted_at, VERSION);
    }
}
