//! Faults under the daemon: a served file truncated on disk, the driver
//! root unmounted, the mount point detached, file descriptors exhausted.
//! Each gives a clear error or keeps working; none kills the daemon or
//! serves wrong bytes silently.

mod common;

use common::{mount_command, mount_root_command, nvlibfs, ok, umount, wait_for, Mounted, SERIAL, VERSION};
use nvlibfs::control::process_running;
use nvlibfs_fixture::{build, FixtureSpec};
use std::io::{Read, Seek, SeekFrom};
use std::process::Command;

/// Without passthrough the daemon maps the files it serves; a file cut
/// short on disk must give EIO, not SIGBUS the daemon, and not old bytes.
#[test]
fn a_file_truncated_on_disk_gives_eio_and_the_daemon_keeps_serving() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = FixtureSpec {
        libcuda_bytes: 4 << 20,
        ..FixtureSpec::new(VERSION)
    };
    // Not warmed: pages the kernel already holds keep the bytes they were
    // given, truncated on disk or not; this is about the daemon's reads.
    let m = Mounted::new(spec, &["--no-passthrough", "--warm", "none"]);
    let (host, served) = m.libcuda();
    let mut head = [0u8; 4096];
    std::fs::File::open(&served).unwrap().read_exact(&mut head).unwrap();

    std::fs::OpenOptions::new()
        .write(true)
        .open(&host)
        .unwrap()
        .set_len(8192)
        .unwrap();
    let mut file = std::fs::File::open(&served).unwrap();
    file.seek(SeekFrom::Start(2 << 20)).unwrap();
    let mut buf = vec![0u8; 65536];
    let err = file.read(&mut buf).expect_err("a read past the truncation must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    let pid = m.status().pid;
    assert!(process_running(pid), "the daemon died");
    let others: Vec<_> = m
        .lib64()
        .into_iter()
        .filter(|(p, _)| !p.ends_with(format!("libcuda.so.{VERSION}")))
        .map(|(p, _)| p)
        .collect();
    m.load(&[], &others, false);
}

/// The files a view serves are held open: unmounting the file system they
/// live on does not take them away from running containers.
#[test]
fn the_driver_root_unmounted_keeps_the_held_files_served() {
    common::require_fixture_tools();
    common::require("mount", "mount");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    ok(
        Command::new("mount")
            .arg("--bind")
            .arg(&fixture.root)
            .arg(&root)
            .output()
            .unwrap(),
        "bind mount",
    );
    let mountpoint = dir.path().join("mnt");
    let state = dir.path().join("state");
    // Pinned by the fixture's own version file, read through the bind mount.
    let out = mount_root_command(&root, &state).arg(&mountpoint).output().unwrap();
    ok(out, "nvlibfs mount");
    ok(
        Command::new("umount").arg("-l").arg(&root).output().unwrap(),
        "lazy unmount of the driver root",
    );

    let smi = Command::new(mountpoint.join("bin/nvidia-smi")).output().unwrap();
    let text = String::from_utf8_lossy(&smi.stdout);
    assert!(text.contains(&format!("Driver Version: {VERSION}")), "{text}");
    let original = std::fs::read(
        fixture
            .root
            .join("usr/lib/x86_64-linux-gnu")
            .join(format!("libcuda.so.{VERSION}")),
    )
    .unwrap();
    let served = std::fs::read(mountpoint.join(format!("lib64/libcuda.so.{VERSION}"))).unwrap();
    assert!(served == original);
    umount(&mountpoint, &state);
}

/// Detaching the mount point from outside ends the daemon cleanly.
#[test]
fn a_lazily_unmounted_mount_point_ends_the_daemon() {
    common::require_fixture_tools();
    common::require("umount", "mount");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let pid = m.status().pid;
    ok(
        Command::new("umount")
            .arg("-l")
            .arg(m.mountpoint.join(".live"))
            .output()
            .unwrap(),
        "umount -l",
    );
    wait_for("the daemon to exit", || !process_running(pid));
    let status = nvlibfs()
        .args(["status", "--state-dir"])
        .arg(&m.state_dir)
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert!(!status.status.success(), "status still answers after the daemon exited");
}

/// Holding every file open needs descriptors; too few is a clear error
/// naming the limit, not a partial view.
#[test]
fn exhausted_file_descriptors_fail_the_mount_clearly() {
    common::require_fixture_tools();
    common::require("prlimit", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let mountpoint = dir.path().join("mnt");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=24:24", "--"]).arg(env!("CARGO_BIN_EXE_nvlibfs"));
    let probe = mount_command(&fixture, &dir.path().join("state"));
    cmd.args(probe.get_args()).arg(&mountpoint);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted with 24 descriptors");
    assert!(
        err.contains("ran out of file descriptors") && err.contains("raise the limit"),
        "{err}"
    );
    assert!(!mountpoint.join(".live").join("lib64").exists());
}
