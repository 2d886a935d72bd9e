//! Daemon restarts that running containers survive: 8 loaders loop through
//! the view from a mount namespace bound like a container's (`rslave`)
//! while the daemon is SIGKILLed and started again, then stopped and
//! started again as an upgrade would. No loader namespace is restarted.

mod common;

use common::{drop_caches, mount_command, ok, Holder, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LOADERS: usize = 8;

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
}

/// A loader looping in its own mount namespace, where the view is bound at
/// another path with rslave propagation, as `docker run -v
/// MOUNTPOINT:/usr/local/nvidia:ro,rslave` does.
fn start_loader(m: &Mounted, i: usize, ms: u64) -> Child {
    let target = m.dir.path().join(format!("container-{i}"));
    std::fs::create_dir_all(&target).unwrap();
    let script = format!(
        "mount --rbind '{top}' '{t}' && mount --make-rslave '{t}' && exec '{loader}' --loop {ms} '{t}/lib64/libcuda.so.1'",
        top = m.mountpoint.display(),
        t = target.display(),
        loader = m.loader.display(),
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a loader saw: (failed loads, the successful loads' restart gaps).
struct Outcome {
    ok: u64,
    failed: u64,
    /// When it first loaded again after each failure, in ns since the epoch.
    recovered_at: Vec<i128>,
}

fn finish(child: Child) -> Outcome {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "loader failed:\n{text}");
    if std::env::var_os("NVLIBFS_TEST_DEBUG").is_some() {
        eprintln!("{text}");
    }
    let mut outcome = Outcome {
        ok: 0,
        failed: 0,
        recovered_at: Vec::new(),
    };
    let mut failing = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[0] {
            "ok" if failing => {
                outcome.recovered_at.push(words[1].parse().unwrap());
                failing = false;
            }
            "fail" => failing = true,
            "count" => {
                outcome.ok = words[1].parse().unwrap();
                outcome.failed = words[2].parse().unwrap();
            }
            _ => {}
        }
    }
    assert!(!failing, "a loader never loaded again:\n{text}");
    outcome
}

fn restart(m: &Mounted) -> i128 {
    let out = mount_command(&m.fixture, &m.state_dir)
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    ok(out, "restarting nvlibfs");
    now_ns()
}

#[test]
fn running_namespaces_survive_sigkill_and_restarts_of_the_daemon() {
    common::require_fixture_tools();
    common::require("unshare", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let libs: Vec<PathBuf> = m.lib64().into_iter().map(|(p, _)| p).collect();

    // Maps every library before the daemon dies.
    let (holder, _) = Holder::start(&m.loader, &libs);

    let loaders: Vec<Child> = (0..LOADERS).map(|i| start_loader(&m, i, 6000)).collect();
    std::thread::sleep(Duration::from_millis(1000));

    // SIGKILL, then a new daemon.
    let pid = m.status().pid;
    let killed_at = now_ns();
    // SAFETY: signals the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    let restarted_at = restart(&m);
    assert_ne!(m.status().pid, pid);
    std::thread::sleep(Duration::from_millis(1500));

    // A deliberate stop and start, as an upgrade of nvlibfs itself does.
    let pid = m.status().pid;
    let stopped_at = now_ns();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    while nvlibfs::control::process_running(pid) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let upgraded_at = restart(&m);

    let outcomes: Vec<Outcome> = loaders.into_iter().map(finish).collect();
    let failed: u64 = outcomes.iter().map(|o| o.failed).sum();
    let loaded: u64 = outcomes.iter().map(|o| o.ok).sum();
    let mut gaps = Vec::new();
    for o in &outcomes {
        for &at in &o.recovered_at {
            // Measured from whichever restart it followed (or slightly
            // preceded: the mount answers before the CLI returns).
            let since = if (at - upgraded_at).abs() < (at - restarted_at).abs() {
                upgraded_at
            } else {
                restarted_at
            };
            gaps.push((at - since) as f64 / 1e6);
        }
    }
    if std::env::var_os("NVLIBFS_TEST_DEBUG").is_some() {
        eprintln!("killed {killed_at} restarted {restarted_at} stopped {stopped_at} upgraded {upgraded_at}");
    }
    eprintln!(
        "restart: {loaded} loads, {failed} failed; SIGKILL to restart {:.0} ms, SIGTERM to restart {:.0} ms; \
         loaders loaded again {:?} ms after the new daemon was ready",
        (restarted_at - killed_at) as f64 / 1e6,
        (upgraded_at - stopped_at) as f64 / 1e6,
        gaps.iter().map(|g| g.round() as i64).collect::<Vec<_>>()
    );
    assert!(loaded > 0);
    for gap in &gaps {
        assert!(
            *gap < 1000.0,
            "a loader needed {gap:.0} ms after the restart to load again"
        );
    }

    // The process that mapped everything before the SIGKILL still runs,
    // even with the page cache dropped.
    drop_caches();
    let rest = holder.release();
    assert_eq!(
        rest.lines().filter(|l| l.starts_with("after ")).count(),
        libs.len(),
        "{rest}"
    );
}
