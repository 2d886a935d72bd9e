//! A handover serves every byte exactly, or is refused and the old server
//! goes on: through a real mount, the real supervisor socket and real
//! builds of nvlibfs-mountd that differ as releases do.
//!
//! - A crash after a package upgrade put a new binary on disk restarts the
//!   binary that ran; then a restart to that new build, which lays the view
//!   out differently (one directory more, numbered first): every file the
//!   kernel holds, and every path, reads the same bytes after each, with
//!   the page cache dropped, on both data paths; the new build's own
//!   layout shows only in the generation it builds itself.
//! - A restart to a build of another protocol version, and to a binary
//!   that is no nvlibfs at all: refused, `nvlibfs restart` exits 1 saying
//!   why, and the old server serves on.
//! - Restarts at random moments around re-pins, acting as on a kernel
//!   without FUSE_NOTIFY_RESEND, and SIGUSR2 followed by a SIGKILL of the
//!   server: no failed load, no load hung, no generation number reused or
//!   rolled back.
//! - 200 generations held by the kernel at once, a supervisor started at
//!   the usual soft limit of 1024 descriptors, a SIGKILL of the server,
//!   then another daemon taking them all over at that limit too: every
//!   held directory of every generation still reads its own version's
//!   bytes; once they are let go, the supervisor holds no more
//!   than the live generations' files.

mod common;

use common::loaders::{self, Bind, Outcome};
use common::{builds, drop_caches, ok, wait_for, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

/// The version a "module reload" switches to and from.
const OTHER: &str = "570.86.15";
const LAYOUT_ID: &str = "laid-out-differently";

fn layout_variant() -> PathBuf {
    builds::variant(
        "layout",
        &[("NVLIBFS_TEST_VIEW_LAYOUT", "1"), ("NVLIBFS_BUILD_ID", LAYOUT_ID)],
    )
}

fn spec() -> FixtureSpec {
    let mut spec = FixtureSpec::new(VERSION);
    spec.stale = Some(OTHER.into());
    spec
}

fn nvlibfs_with(bin: &Path, m: &Mounted, args: &[&str]) -> Output {
    Command::new(bin.join("nvlibfs"))
        .args(args)
        .arg("--state-dir")
        .arg(&m.state_dir)
        .arg(&m.mountpoint)
        .output()
        .unwrap()
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: signals a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
}

/// `signal`, to a process that may have ended already.
fn signal_if_running(pid: u32, signal: libc::c_int) {
    // SAFETY: signals a process this test started.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Switches the "loaded module" and has the server look at once.
fn reload_module(m: &Mounted, version: &str) {
    std::fs::write(m.fixture.module_version_file(), format!("{version}\n")).unwrap();
    signal(m.status().supervisor_pid.expect("a supervisor"), libc::SIGHUP);
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

/// What a file held open reads now, from the start.
fn read_held(file: &std::fs::File, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, 0).unwrap();
    out
}

fn exactly_after_a_restart_to_another_layout(extra: &[&str]) {
    let bins = tempfile::tempdir().unwrap();
    let bin = builds::binaries(bins.path());
    let variant = layout_variant();
    let m = Mounted::with_binaries(spec(), extra, Some(&bin));
    // The kernel holds every file of the view, open, and knows every path.
    let files: Vec<PathBuf> = common::walk_files(&m.mountpoint);
    assert!(files.len() > 40, "only {} files", files.len());
    let before: BTreeMap<PathBuf, Vec<u8>> = files.iter().map(|f| (f.clone(), read_all(f))).collect();
    let held: Vec<(PathBuf, std::fs::File)> = files
        .iter()
        .map(|f| (f.clone(), std::fs::File::open(f).unwrap()))
        .collect();
    // The view's own root (the mount point itself is a small tmpfs of
    // links into it; see mountd's layout.rs).
    let live = m.mountpoint.join(".live");
    let names_before: Vec<_> = std::fs::read_dir(&live)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    builds::install(&variant, &bin);
    // A crash after a package upgrade put the new binary on disk: the
    // successor is the binary that wrote the checkpoint, as it was.
    let first = m.status();
    signal(first.pid, libc::SIGKILL);
    wait_for("the takeover after a crash", || {
        nvlibfs::control::query(&m.state_dir, &m.mountpoint)
            .is_ok_and(|s| s.pid != first.pid && !s.handovers.is_empty())
    });
    let crashed = m.status();
    assert_eq!(
        crashed.version, first.version,
        "a crash restarts the binary that ran, not the one on disk"
    );
    drop_caches();
    for (path, file) in &held {
        assert_eq!(
            &read_held(file, before[path].len()),
            &before[path],
            "{} after the crash",
            path.display()
        );
    }
    let said = ok(nvlibfs_with(&bin, &m, &["restart"]), "nvlibfs restart");
    assert!(said.contains(LAYOUT_ID), "{said}");
    drop_caches();

    for (path, file) in &held {
        let want = &before[path];
        assert_eq!(
            &read_held(file, want.len()),
            want,
            "{extra:?}: {} read through a descriptor held across the restart",
            path.display()
        );
        assert_eq!(
            &read_all(path),
            want,
            "{extra:?}: {} opened again after the restart",
            path.display()
        );
    }
    let names_after: Vec<_> = std::fs::read_dir(&live)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names_after, names_before,
        "the generation served is the one the old build made"
    );
    let status = m.status();
    assert!(status.version.contains(LAYOUT_ID), "{}", status.version);

    // The new build's own layout: in the generation it builds itself.
    reload_module(&m, OTHER);
    wait_for("the re-pin", || m.status().driver_version == OTHER);
    assert!(
        live.join("layout-variant").is_dir(),
        "the new build made the new generation"
    );
    for (path, file) in &held {
        assert_eq!(
            &read_held(file, before[path].len()),
            &before[path],
            "{}",
            path.display()
        );
    }
}

#[test]
fn a_restart_to_a_build_laid_out_differently_serves_every_byte_exactly() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    exactly_after_a_restart_to_another_layout(&[]);
    exactly_after_a_restart_to_another_layout(&["--no-passthrough"]);
}

#[test]
fn a_restart_that_cannot_be_exact_is_refused_and_the_old_server_serves_on() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bins = tempfile::tempdir().unwrap();
    let bin = builds::binaries(bins.path());
    let built = bin.join("nvlibfs-mountd.built");
    std::fs::copy(bin.join("nvlibfs-mountd"), &built).unwrap();
    let m = Mounted::with_binaries(spec(), &[], Some(&bin));
    let first = m.status();
    let (_, libcuda) = m.libcuda();
    let bytes = read_all(&libcuda);

    // Another protocol version: it says which, and refuses.
    builds::install(&builds::protocol_variant(), &bin);
    let out = nvlibfs_with(&bin, &m, &["restart"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("protocol version {}", builds::protocol_version())) && err.contains("version 1000"),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {} ", first.pid)) && err.contains("goes on serving"),
        "{err}"
    );

    // Not nvlibfs at all.
    let script = bins.path().join("not-nvlibfs");
    std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    builds::install(&script, &bin);
    let out = nvlibfs_with(&bin, &m, &["restart"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the restart did not happen") && err.contains("goes on serving"),
        "{err}"
    );

    let now = m.status();
    assert_eq!(
        (now.pid, now.generation),
        (first.pid, first.generation),
        "the old server serves on"
    );
    assert_eq!(read_all(&libcuda), bytes);
    let refused: Vec<_> = now.handovers.iter().filter(|h| h.refused.is_some()).collect();
    assert_eq!(refused.len(), 2, "{:?}", now.handovers);
    // And re-pins still happen: the old server thawed.
    reload_module(&m, OTHER);
    wait_for("a re-pin after the refusals", || m.status().driver_version == OTHER);

    // The right binary again: the restart happens.
    builds::install(&built, &bin);
    ok(nvlibfs_with(&bin, &m, &["restart"]), "nvlibfs restart");
    assert_ne!(m.status().pid, first.pid);
}

/// A pause of 0 to `ms` ms, from the clock.
fn pause(ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Duration::from_millis(u64::from(nanos) % ms.max(1))
}

/// No failed or wrong load, and loads of `version` after `last_event`.
fn check_loaders(loaders: Vec<Child>, what: &str, last_event: i128, version: &str) {
    let outcomes: Vec<Outcome> = loaders.into_iter().map(loaders::finish).collect();
    let (loads, failed, slowest) = loaders::totals(&outcomes);
    eprintln!("{what}: {loads} loads, {failed} failed, slowest {slowest:.1} ms");
    for o in &outcomes {
        assert_eq!(o.report.failed, 0, "{what}: failed loads:\n{}", o.text);
    }
    loaders::loaded_after(&outcomes, last_event, version);
    // Against a hang only: how slow loads are is benches/handover.rs's.
    assert!(slowest < 10_000.0, "{what}: a load took {slowest:.0} ms");
}

#[test]
fn restarts_around_repins_and_crashes_lose_nothing() {
    common::require_fixture_tools();
    common::require("unshare", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Restarts never need the kernel to resend: the old server answers
    // what it holds before it goes.
    let m = Mounted::new(spec(), &["--no-resend"]);
    let loaders: Vec<Child> = (0..4)
        .map(|i| {
            let bind = if i % 2 == 0 { Bind::Rslave } else { Bind::Private };
            loaders::start_expecting(&m, i, bind, 12000, &[VERSION, OTHER])
        })
        .collect();
    let mut last_generation = 0;
    let mut versions = [OTHER, VERSION].into_iter().cycle();
    for i in 0..10 {
        let before = m.status();
        reload_module(&m, versions.next().unwrap());
        std::thread::sleep(pause(30));
        let out = common::nvlibfs()
            .args(["restart", "--state-dir"])
            .arg(&m.state_dir)
            .arg(&m.mountpoint)
            .output()
            .unwrap();
        ok(out, &format!("restart {i}"));
        let after = m.status();
        assert_ne!(after.pid, before.pid);
        assert!(
            after.generation >= before.generation && after.generation >= last_generation,
            "restart {i}: generation {} after {}",
            after.generation,
            before.generation
        );
        let numbers: Vec<u32> = after.generations.iter().map(|g| g.number).collect();
        let mut unique = numbers.clone();
        unique.dedup();
        assert_eq!(numbers, unique, "restart {i}: generation numbers reused");
        last_generation = after.generation;
    }
    wait_for("the last re-pin", || {
        let s = m.status();
        std::fs::read_to_string(m.fixture.module_version_file()).unwrap().trim() == s.driver_version
    });
    // Re-pinned: every load begun from now on gets the last pinned version.
    let pinned = m.status().driver_version;
    check_loaders(
        loaders,
        "restarts around re-pins, no RESEND",
        loaders::now_ns(),
        &pinned,
    );
    drop(m);

    // SIGUSR2, then the server dies at once or a moment later: whatever
    // step the restart was at, a server serves and nothing is lost.
    let m = Mounted::new(spec(), &[]);
    let loaders: Vec<Child> = (0..4)
        .map(|i| {
            let bind = if i % 2 == 0 { Bind::Rslave } else { Bind::Private };
            loaders::start_expecting(&m, i, bind, 7000, &[VERSION])
        })
        .collect();
    let handovers = |s: &nvlibfs::control::Status| s.handovers.iter().filter(|h| h.refused.is_none()).count();
    for delay_us in [0, 500, 3000, 20_000] {
        let before = m.status();
        signal(before.supervisor_pid.unwrap(), libc::SIGUSR2);
        std::thread::sleep(Duration::from_micros(delay_us));
        // A restart takes milliseconds: at the longer delays the server
        // may have handed over and gone already.
        signal_if_running(before.pid, libc::SIGKILL);
        let served = || {
            nvlibfs::control::query(&m.state_dir, &m.mountpoint)
                .is_ok_and(|s| s.pid != before.pid && handovers(&s) > handovers(&before))
        };
        let start = std::time::Instant::now();
        while !served() {
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "no server 20 s after SIGUSR2 and a SIGKILL {delay_us} µs later; the daemon's log:\n{}",
                    daemon_log(&m)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Settled: no step of the restart is left over.
        std::thread::sleep(Duration::from_millis(200));
    }
    check_loaders(loaders, "SIGUSR2 then SIGKILL", loaders::now_ns(), VERSION);
}

/// The daemon's log, for a failure message.
fn daemon_log(m: &Mounted) -> String {
    std::fs::read_dir(&m.state_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn two_hundred_held_generations_survive_a_crash_under_a_supervisor_started_at_1024() {
    const GENERATIONS: usize = 200;
    common::require_fixture_tools();
    common::require("prlimit", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&spec(), &dir.path().join("host")).unwrap();
    let (mountpoint, state_dir) = (dir.path().join("mnt"), dir.path().join("state"));
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    let hard = limit.rlim_max;
    assert!(
        hard >= 16_384,
        "this test needs a hard open-file limit of 16384 (it is {hard})"
    );
    let mount = common::mount_command(&fixture, &state_dir);
    let out = Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg("--")
        .arg(mount.get_program())
        .args(mount.get_args())
        .arg(&mountpoint)
        .output()
        .unwrap();
    ok(out, "nvlibfs mount at a soft limit of 1024");
    let _unmount = common::UnmountOnDrop(mountpoint.clone(), state_dir.clone());
    let status = || common::status_of(&state_dir, &mountpoint);
    let supervisor = status().supervisor_pid.unwrap();
    let libcuda_of = |version: &str| {
        read_all(
            &fixture
                .root
                .join(format!("usr/lib/x86_64-linux-gnu/libcuda.so.{version}")),
        )
    };
    let expected: BTreeMap<&str, Vec<u8>> = [VERSION, OTHER].into_iter().map(|v| (v, libcuda_of(v))).collect();

    // Each generation held by the kernel through an open directory.
    let mut held: Vec<(std::fs::File, &str)> = Vec::new();
    let mut versions = [OTHER, VERSION].into_iter().cycle();
    let mut version = VERSION;
    // The new generation's lib64 once the kernel has dropped the old
    // one's cached name, which it is told to just after the commit that
    // status already shows.
    let open_new_lib64 = |held: &[(std::fs::File, &str)]| loop {
        let dir = std::fs::File::open(mountpoint.join("lib64")).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&dir.metadata().unwrap());
        if held
            .last()
            .is_none_or(|(last, _)| std::os::unix::fs::MetadataExt::ino(&last.metadata().unwrap()) != ino)
        {
            return dir;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    held.push((open_new_lib64(&held), version));
    let started = std::time::Instant::now();
    for n in 1..GENERATIONS {
        version = versions.next().unwrap();
        std::fs::write(fixture.module_version_file(), format!("{version}\n")).unwrap();
        signal(supervisor, libc::SIGHUP);
        wait_for(&format!("generation {n}"), || status().generation as usize == n);
        held.push((open_new_lib64(&held), version));
    }
    let s = status();
    assert_eq!(s.generations.len(), GENERATIONS, "every held generation is live");
    let held_by_supervisor = descriptors(supervisor);
    eprintln!(
        "{GENERATIONS} generations in {:.1} s; the supervisor holds {held_by_supervisor} descriptors",
        started.elapsed().as_secs_f64()
    );
    assert!(
        held_by_supervisor > GENERATIONS * 40,
        "{held_by_supervisor} descriptors"
    );

    // A crash: the new server restores all of them.
    signal(s.pid, libc::SIGKILL);
    wait_for("the takeover", || {
        nvlibfs::control::query(&state_dir, &mountpoint).is_ok_and(|t| t.pid != s.pid && t.handovers.len() == 1)
    });
    // All of them, and perhaps one more: a crash between a commit and its
    // checkpoint makes the successor re-pin once itself. Every held
    // directory reads its own version's bytes.
    let all_there = |held: &[(std::fs::File, &str)], after: &str| {
        let numbers: Vec<u32> = status().generations.iter().map(|g| g.number).collect();
        assert!(
            (0..GENERATIONS as u32).all(|n| numbers.contains(&n)),
            "generations after {after}: {numbers:?}"
        );
        drop_caches();
        for (i, (dir, version)) in held.iter().enumerate() {
            let libcuda = dir_path(dir).join("libcuda.so.1");
            assert_eq!(
                read_all(&libcuda),
                expected[version],
                "generation {i} ({version}) after {after}"
            );
        }
    };
    all_there(&held, "the crash");

    // Another daemon takes them all over, started at the same soft limit
    // (it receives every held file at once).
    let out = Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg("--")
        .arg(mount.get_program())
        .args(mount.get_args())
        .arg("--take-over")
        .arg(&mountpoint)
        .output()
        .unwrap();
    ok(out, "nvlibfs mount --take-over at a soft limit of 1024");
    let taken = status();
    assert_ne!(taken.supervisor_pid, Some(supervisor), "{taken:?}");
    all_there(&held, "the takeover by another daemon");
    let supervisor = taken.supervisor_pid.unwrap();

    // Let go of them all: the supervisor lets go too.
    drop(held);
    reload_module_at(&fixture, supervisor, OTHER);
    wait_for("the re-pin", || status().driver_version == OTHER);
    wait_for("retired generations freed", || status().generations.len() == 1);
    reload_module_at(&fixture, supervisor, VERSION);
    wait_for("the re-pin back", || status().driver_version == VERSION);
    wait_for("retired generations freed", || status().generations.len() == 1);
    let left = descriptors(supervisor);
    eprintln!("after letting go: the supervisor holds {left} descriptors");
    assert!(left < 3 * 60, "the supervisor still holds {left} descriptors");
    common::umount(&mountpoint, &state_dir);
}

/// A descriptor's path as this process sees it.
fn dir_path(dir: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

fn reload_module_at(fixture: &nvlibfs_fixture::Fixture, supervisor: u32, version: &str) {
    std::fs::write(fixture.module_version_file(), format!("{version}\n")).unwrap();
    signal(supervisor, libc::SIGHUP);
}
