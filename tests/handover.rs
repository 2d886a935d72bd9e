//! Restarts nobody notices. The supervisor holds the FUSE connection; when
//! the serving process dies, a new one takes the connection over, and
//! `nvlibfs restart` hands it to the binary now on disk. Through three
//! SIGKILLs of the server at random moments and a restart to a rebuilt
//! binary with another version string, on both data paths: 8 loaders
//! looping in mount namespaces (4 bound with rslave, 4 with docker's
//! default private bind) see no failed load, load only the pinned version
//! and still load after the last event (how slow their slowest load was is
//! measured by benches/handover.rs), and a process that mapped half of a
//! 100 MB library reads every page of it after each event, with the page
//! cache dropped, and lives.

mod common;

use common::loaders::{self, Bind, Outcome};
use common::{builds, drop_caches, ok, wait_for, Holder, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

const BUILD_ID: &str = "rebuilt-for-the-handover-test";

/// nvlibfs-mountd built again with another version string.
fn rebuilt_daemon() -> PathBuf {
    builds::variant("rebuilt", &[("NVLIBFS_BUILD_ID", BUILD_ID)])
}

/// A pause of 200 to 1000 ms, from the clock: a random moment.
fn random_pause() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Duration::from_millis(200 + u64::from(nanos) % 800)
}

fn events_that_nobody_notices(extra: &[&str]) {
    let bins = tempfile::tempdir().unwrap();
    let bin = builds::binaries(bins.path());
    let rebuilt = rebuilt_daemon();
    let mut spec = FixtureSpec::new(VERSION);
    spec.libcuda_bytes = 100 << 20;
    let m = Mounted::with_binaries(spec, extra, Some(&bin));
    let nvlibfs = |args: &[&str]| {
        let mut c = Command::new(bin.join("nvlibfs"));
        c.args(args).arg("--state-dir").arg(&m.state_dir).arg(&m.mountpoint);
        c.output().unwrap()
    };
    let first = m.status();
    assert!(first.supervisor_pid.is_some(), "no supervisor: {first:?}");
    // The data path each run is for, not a quiet fallback.
    let named = if extra.contains(&"--no-passthrough") {
        "cached"
    } else {
        "passthrough"
    };
    assert_eq!(first.data_path, named, "{:?}", first.fallback_reason);
    assert_ne!(first.version, "", "status names the server's version");

    let (_, libcuda) = m.libcuda();
    let (mut holder, loaded) = Holder::start_with(&m.loader, &["--touch", "--half"], &[libcuda]);
    assert!(loaded.contains("touched=104857600"), "{loaded}");
    let loaders: Vec<Child> = (0..8)
        .map(|i| {
            let bind = if i % 2 == 0 { Bind::Rslave } else { Bind::Private };
            loaders::start_expecting(&m, i, bind, 12000, &[VERSION])
        })
        .collect();

    for kill in 1..=3 {
        std::thread::sleep(random_pause());
        let pid = m.status().pid;
        // SAFETY: signals the server this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        wait_for(&format!("handover {kill}"), || {
            nvlibfs::control::query(&m.state_dir, &m.mountpoint).is_ok_and(|s| s.handovers.len() == kill)
        });
        drop_caches();
        let after = holder.check();
        assert!(after.contains(VERSION), "after SIGKILL {kill}: {after}");
    }

    // An upgrade: the binary on disk is replaced, then `nvlibfs restart`.
    std::thread::sleep(random_pause());
    builds::install(&rebuilt, &bin);
    let said = ok(nvlibfs(&["restart"]), "nvlibfs restart");
    assert!(said.contains(BUILD_ID), "{said}");
    let last_event = loaders::now_ns();
    drop_caches();
    assert!(holder.check().contains(VERSION));

    let outcomes: Vec<Outcome> = loaders.into_iter().map(loaders::finish).collect();
    let status = m.status();
    let (loads, failed, slowest) = loaders::totals(&outcomes);
    eprintln!(
        "handover {extra:?}: {loads} loads, {failed} failed, slowest load {slowest:.1} ms; requests waited: {}",
        loaders::handovers(&status)
    );
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(
            o.report.failed,
            0,
            "loader {i} ({:?}) failed loads:\n{}",
            if i % 2 == 0 { Bind::Rslave } else { Bind::Private },
            o.text
        );
    }
    assert!(loads > 8 * 1000, "only {loads} loads");
    // No load got another version than the pinned one (finish refuses
    // those), and each loader still loaded it after the upgrade.
    loaders::loaded_after(&outcomes, last_event, VERSION);
    // Against a hang only: how slow loads are is benches/handover.rs's.
    assert!(slowest < 10_000.0, "a load took {slowest:.0} ms");
    assert_eq!(status.handovers.len(), 4);
    assert!(status.version.contains(BUILD_ID), "{}", status.version);
    assert_eq!(status.handovers[3].reason, "restart");
    assert_eq!(status.data_path, named, "after the events");
    holder.release();
}

#[test]
fn sigkills_and_an_upgrade_fail_no_load_on_either_data_path() {
    common::require_fixture_tools();
    common::require("unshare", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    events_that_nobody_notices(&[]);
    events_that_nobody_notices(&["--no-passthrough"]);
}
