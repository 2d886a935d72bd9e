//! The last line of defence: when the supervisor that holds the FUSE
//! connection is gone too (both processes SIGKILLed, or the whole daemon
//! stopped and started again), a new daemon mounts afresh under `.live`,
//! and 8 loaders looping in mount namespaces bound like containers with
//! `rslave` load again within milliseconds of it being ready. No loader
//! namespace is restarted. (A server that dies alone is taken over with no
//! failed load at all: tests/handover.rs.)

mod common;

use common::loaders::{self, Bind, Outcome};
use common::{drop_caches, mount_command, ok, Holder, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LOADERS: usize = 8;

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
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

    let loaders: Vec<Child> = (0..LOADERS)
        .map(|i| loaders::start_expecting(&m, i, Bind::Rslave, 6000, &[VERSION]))
        .collect();
    std::thread::sleep(Duration::from_millis(1000));

    // SIGKILL of the supervisor and then the server, then a new daemon.
    let status = m.status();
    let (pid, supervisor) = (status.pid, status.supervisor_pid.expect("a supervisor"));
    let killed_at = now_ns();
    // SAFETY: signals the daemon this test started.
    assert_eq!(unsafe { libc::kill(supervisor as i32, libc::SIGKILL) }, 0);
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    let restarted_at = restart(&m);
    assert_ne!(m.status().pid, pid);
    std::thread::sleep(Duration::from_millis(1500));

    // A deliberate stop and start (`systemctl stop` and `start`).
    let status = m.status();
    let (pid, supervisor) = (status.pid, status.supervisor_pid.expect("a supervisor"));
    let stopped_at = now_ns();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(supervisor as i32, libc::SIGTERM) }, 0);
    while nvlibfs::control::process_running(pid) || nvlibfs::control::process_running(supervisor) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let upgraded_at = restart(&m);

    let outcomes: Vec<Outcome> = loaders.into_iter().map(loaders::finish).collect();
    let (loaded, failed, _) = loaders::totals(&outcomes);
    let mut gaps = Vec::new();
    for o in &outcomes {
        for &at in &o.report.recovered_at {
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
    // Both outages were seen, and each loader loaded again after each: a
    // loader that never saw one (it ended first, or the view never went
    // away) would leave the checks below nothing to check.
    for (i, o) in outcomes.iter().enumerate() {
        let after_kill = o
            .report
            .recovered_at
            .iter()
            .any(|&at| at > killed_at && at < stopped_at);
        let after_stop = o.report.recovered_at.iter().any(|&at| at > stopped_at);
        assert!(
            after_kill && after_stop,
            "loader {i} did not fail and load again after both the SIGKILL and the stop:\n{}",
            o.text
        );
    }
    // Against a hang only: how soon they load again is printed above.
    for gap in &gaps {
        assert!(
            *gap < 5000.0,
            "a loader needed {gap:.0} ms after the restart to load again"
        );
    }
    loaders::loaded_after(&outcomes, upgraded_at, VERSION);

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
