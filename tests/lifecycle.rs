//! The daemon's life around the serving core, through real mounts: old
//! generations released as soon as their last user lets go, inode numbers
//! a 32-bit stat can take, one daemon per mount point, signals that do
//! what the README says, a takeover that never waits on a hung server, a
//! privilege drop that is never silently skipped, and write requests that
//! do reach the daemon refused by it.

mod common;

use common::{nvlibfs, ok, require, require_fixture_tools, wait_for, Holder, Mounted, SERIAL, VERSION};
use nvlibfs::control::Status;
use nvlibfs_fixture::FixtureSpec;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const OTHER: &str = "570.86.15";

fn with_other_version() -> FixtureSpec {
    let mut spec = FixtureSpec::new(VERSION);
    spec.stale = Some(OTHER.into());
    spec
}

/// Switches the "loaded module" and waits until the daemon serves it.
/// Re-pins and waits until the new generation is what paths reach: status
/// shows it as soon as it is committed, and the kernel drops the old
/// generation's cached names just after.
fn repin(m: &Mounted, version: &str, generation: u32) -> Status {
    let lib64 = || std::fs::metadata(m.mountpoint.join("lib64")).unwrap().ino();
    let before = lib64();
    std::fs::write(m.fixture.module_version_file(), format!("{version}\n")).unwrap();
    let mut status = m.status();
    wait_for(&format!("generation {generation} ({version})"), || {
        status = m.status();
        status.generation == generation && lib64() != before
    });
    assert_eq!(status.driver_version, version);
    status
}

fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

#[test]
fn a_retired_generation_is_released_once_its_last_user_lets_go() {
    require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(with_other_version(), &[]);
    let (_, libcuda) = m.libcuda();
    let (holder, loaded) = Holder::start(&m.loader, std::slice::from_ref(&libcuda));
    assert!(loaded.contains(VERSION), "{loaded}");

    let status = repin(&m, OTHER, 1);
    assert_eq!(status.retired_generations, 1, "the holder keeps generation 0");
    let numbers: Vec<u32> = status.generations.iter().map(|g| g.number).collect();
    assert_eq!(numbers, [0, 1]);
    assert!(status.generations[0].kernel_refs > 0);
    for g in &status.generations {
        assert_eq!(g.data_path, status.data_path, "generation {}", g.number);
    }

    // No drop_caches: the names were deleted at the swap, so the kernel
    // evicts the inodes (and says FORGET) as soon as nothing uses them.
    holder.release();
    // wait_for's 20 s guard against a hang is the only limit.
    wait_for("generation 0 to be released", || m.status().retired_generations == 0);
    let log = std::fs::read_to_string(m.state_dir.join(log_name(&m.mountpoint))).unwrap();
    assert!(log.contains("released a generation's files"), "{log}");
}

/// The same after the server that counted the references was killed and
/// another took over: the counts live in memory the new one maps.
#[test]
fn a_retired_generation_is_released_after_a_takeover_too() {
    require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(with_other_version(), &[]);
    let (_, libcuda) = m.libcuda();
    let (holder, _) = Holder::start(&m.loader, std::slice::from_ref(&libcuda));
    repin(&m, OTHER, 1);
    let pid = m.status().pid;
    kill(pid, nix::sys::signal::Signal::SIGKILL);
    wait_for("the takeover", || {
        nvlibfs::control::query(&m.state_dir, &m.mountpoint).is_ok_and(|s| s.handovers.len() == 1)
    });
    let status = m.status();
    // Killed right after the re-pin showed in `status`: the new server
    // must still serve the new generation, not the one before it.
    assert_eq!(
        (status.generation, status.driver_version.as_str()),
        (1, OTHER),
        "{status:?}"
    );
    assert_eq!(status.retired_generations, 1, "{status:?}");
    assert!(status.generations[0].kernel_refs > 0, "{:?}", status.generations);
    holder.release();
    // wait_for's 20 s guard against a hang is the only limit.
    wait_for("generation 0 to be released", || m.status().retired_generations == 0);
}

fn log_name(mountpoint: &Path) -> PathBuf {
    nvlibfs::control::log_path(Path::new(""), mountpoint)
}

#[test]
fn inode_numbers_fit_32_bits_after_five_repins() {
    require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(with_other_version(), &[]);
    // Hold something of every generation, so none of their numbers can be
    // handed out again.
    let mut holders = Vec::new();
    for n in 1..=5u32 {
        holders.push(std::fs::File::open(m.mountpoint.join("lib64/libcuda.so.1")).unwrap());
        repin(&m, if n % 2 == 1 { OTHER } else { VERSION }, n);
    }
    let mut seen = std::collections::HashMap::new();
    let mut stack = vec![m.mountpoint.join(".live")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert!(meta.ino() < 1 << 32, "{} has inode {:#x}", path.display(), meta.ino());
            if let Some(other) = seen.insert(meta.ino(), path.clone()) {
                panic!("{} and {} share inode {}", other.display(), path.display(), meta.ino());
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    assert!(seen.len() > 50);
    let held: Vec<u64> = holders.iter().map(|f| f.metadata().unwrap().ino()).collect();
    assert!(held.iter().all(|&i| i < 1 << 32), "{held:x?}");
    assert_eq!(m.status().retired_generations, 5);
}

#[test]
fn eight_daemons_at_once_one_serves() {
    require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let mountpoint = dir.path().join("mnt");
    let state = dir.path().join("state");
    let children: Vec<_> = (0..8)
        .map(|_| {
            common::mount_command(&fixture, &state)
                .arg(&mountpoint)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let winners = outputs.iter().filter(|o| o.status.success()).count();
    let refusals: Vec<String> = outputs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    let mounts = nvlibfs::mountinfo::read().unwrap();
    let at = |p: &Path| mounts.iter().filter(|e| e.mount_point == p).count();
    let (top, live) = (at(&mountpoint), at(&mountpoint.join(".live")));
    let log = std::fs::read_to_string(state.join(log_name(&mountpoint))).unwrap_or_default();
    ok(
        nvlibfs()
            .args(["umount", "--state-dir"])
            .arg(&state)
            .arg(&mountpoint)
            .output()
            .unwrap(),
        "umount",
    );
    assert_eq!(winners, 1, "{refusals:#?}");
    for r in &refusals {
        assert!(r.contains("already served by nvlibfs"), "{r}");
        assert_eq!(r.lines().count(), 1, "one line: {r}");
    }
    assert_eq!((top, live), (1, 1), "mounted once at the mount point and once at .live");
    // The refused daemons reported to their callers only.
    assert!(!log.contains("already served"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn signals_do_what_the_readme_says() {
    require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(with_other_version(), &[]);
    let pid = m.status().pid;
    use nix::sys::signal::Signal;
    kill(pid, Signal::SIGUSR1);
    kill(pid, Signal::SIGUSR2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.status().pid, pid, "SIGUSR1/2 are ignored");
    assert!(std::fs::read_dir(m.mountpoint.join("lib64")).is_ok());

    // SIGHUP: the module is checked at once, not at the next poll.
    std::fs::write(m.fixture.module_version_file(), format!("{OTHER}\n")).unwrap();
    kill(pid, Signal::SIGHUP);
    wait_for("the SIGHUP re-check", || m.status().driver_version == OTHER);
    assert_eq!(m.status().pid, pid, "SIGHUP does not stop the daemon");

    kill(pid, Signal::SIGTERM);
    wait_for("SIGTERM to end the daemon", || !nvlibfs::control::process_running(pid));
    assert!(
        nvlibfs::mountinfo::at(&m.mountpoint.join(".live")).is_none(),
        "SIGTERM unmounts"
    );
}

/// A dup of the daemon's /dev/fuse descriptor, taken from outside: the
/// connection stays up with nobody reading it once the daemon is killed.
fn steal_fuse_fd(pid: u32) -> OwnedFd {
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
        .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .expect("the daemon holds /dev/fuse");
    // SAFETY: pidfd_open/pidfd_getfd with plain integers; each returns a
    // new descriptor we own or -1.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        let pidfd = OwnedFd::from_raw_fd(pidfd);
        let dup = libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0) as i32;
        assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(dup)
    }
}

#[test]
fn a_new_daemon_takes_over_from_a_hung_connection_without_waiting() {
    require_fixture_tools();
    require("stat", "coreutils");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let status = m.status();
    let pid = status.pid;
    // Without its supervisor, which would hand the connection to a new
    // server: the case of a daemon wholly gone but for its connection.
    let supervisor = status.supervisor_pid.expect("a supervisor");
    kill(supervisor, nix::sys::signal::Signal::SIGKILL);
    wait_for("the supervisor to die", || {
        !nvlibfs::control::process_running(supervisor)
    });
    let hung = steal_fuse_fd(pid);
    kill(pid, nix::sys::signal::Signal::SIGKILL);
    wait_for("the daemon to die", || !nvlibfs::control::process_running(pid));
    // Nobody reads the connection now: a request on it waits.
    let mut waiting = Command::new("stat")
        .arg(m.mountpoint.join(".live/never-looked-up"))
        .env("LC_ALL", "C")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the request should be waiting on the hung connection"
    );

    let start = Instant::now();
    let out = common::mount_command(&m.fixture, &m.state_dir)
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let took = start.elapsed();
    ok(out, "mount over the hung connection");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The waiting request was failed by the abort, not left hanging, nor
    // answered by anyone (it would then say the name does not exist).
    wait_for("the waiting stat to end", || waiting.try_wait().unwrap().is_some());
    let ended = waiting.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(1), "the waiting stat: {said}");
    assert!(
        said.contains("Software caused connection abort") || said.contains("Transport endpoint is not connected"),
        "the waiting stat did not end by the abort: {said}"
    );
    drop(hung);
    m.assert_loads_everything(&[]);
}

#[test]
fn a_failed_privilege_drop_stops_the_daemon_unless_told_otherwise() {
    require_fixture_tools();
    require("setpriv", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let state = dir.path().join("state");
    // Without CAP_SETPCAP the bounding set cannot be cut down.
    let mount = |mountpoint: &Path, extra: &[&str]| {
        let cmd = common::mount_command(&fixture, &state);
        let mut setpriv = Command::new("setpriv");
        setpriv
            .args(["--bounding-set", "-setpcap", "--inh-caps", "-all"])
            .arg(cmd.get_program());
        setpriv
            .args(cmd.get_args())
            .args(extra)
            .arg(mountpoint)
            .output()
            .unwrap()
    };
    let refused = mount(&dir.path().join("strict"), &[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "served without dropping privileges");
    assert!(err.contains("--keep-privileges"), "{err}");
    assert!(nvlibfs::mountinfo::at(&dir.path().join("strict/.live")).is_none());
    assert!(
        nvlibfs::mountinfo::at(&dir.path().join("strict")).is_none(),
        "a failed first mount leaves nothing mounted"
    );

    let kept = dir.path().join("kept");
    ok(mount(&kept, &["--keep-privileges"]), "mount --keep-privileges");
    ok(
        nvlibfs()
            .args(["umount", "--state-dir"])
            .arg(&state)
            .arg(&kept)
            .output()
            .unwrap(),
        "umount",
    );
}

/// A read-only mount has the kernel refuse writes before the daemon sees
/// them; a privileged process can remount it read-write (a container with
/// CAP_SYS_ADMIN over its bind, say), and then every write-type request
/// reaches the daemon, which must refuse it itself.
#[test]
fn write_requests_that_reach_the_daemon_are_refused() {
    require_fixture_tools();
    require("mount", "mount");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let live = m.mountpoint.join(".live");
    ok(
        Command::new("mount")
            .args(["-i", "-o", "remount,rw"]) // -i: no mount.fuse helper, which would run the source
            .arg(&live)
            .output()
            .unwrap(),
        "remount rw",
    );
    let before = m.status().counters.write_attempts;
    let lib = live.join("lib64").join(format!("libcuda.so.{VERSION}"));
    let erofs = |what: &str, r: std::io::Result<()>| {
        assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::EROFS), "{what}");
    };
    use std::os::unix::fs::PermissionsExt;
    erofs("create", std::fs::File::create(live.join("lib64/new")).map(|_| ()));
    erofs(
        "open for writing",
        std::fs::OpenOptions::new().write(true).open(&lib).map(|_| ()),
    );
    erofs("mkdir", std::fs::create_dir(live.join("d")));
    erofs("unlink", std::fs::remove_file(&lib));
    erofs("rmdir", std::fs::remove_dir(live.join("bin")));
    erofs("rename", std::fs::rename(&lib, live.join("lib64/x")));
    erofs("symlink", std::os::unix::fs::symlink("x", live.join("lib64/l")));
    erofs("link", std::fs::hard_link(&lib, live.join("lib64/h")));
    erofs(
        "chmod",
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o777)),
    );
    erofs("setxattr", xattr_set(&lib));
    let refused = m.status().counters.write_attempts - before;
    assert!(refused >= 10, "the daemon refused only {refused} writes");
    m.assert_loads_everything(&[]);
}

fn xattr_set(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated strings and a one-byte value we own.
    let rc = unsafe { libc::setxattr(c.as_ptr(), c"user.x".as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
