//! Real mounts: `nvlibfs mount` on fixture drivers, libraries loaded through
//! them with dlopen by real processes, from other mount namespaces and as an
//! unprivileged user; writes refused; passthrough proven by the daemon's own
//! READ counter and the page cache. Needs root and /dev/fuse.

mod common;

use common::{mount_command, nvlibfs, ok, wait_for, Holder, Mounted, SERIAL, VERSION};
use nvlibfs_fixture::{build, FixtureSpec};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The MiB of this file's own page cache (cachestat(2), Linux 6.5+): what
/// is cached for this inode, whatever other processes do to the rest of the
/// cache. Through the mount that is the FUSE inode's cache, not the host
/// file's that passthrough reads.
fn cached_mib(path: &Path) -> u64 {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let range = Range { off: 0, len: 0 };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both ours and alive.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            &range as *const Range,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    (stat.nr_cache * page) >> 20
}

#[test]
fn loads_every_library_binary_and_firmware_through_the_mount() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    m.assert_loads_everything(&[]);

    // By SONAME, the way CUDA programs find the driver.
    let out = Command::new(&m.loader)
        .env("LD_LIBRARY_PATH", m.mountpoint.join("lib64"))
        .args([
            "libcuda.so.1",
            "libnvidia-ml.so.1",
            "libEGL_nvidia.so.0",
            "libnvidia-nvvm.so.4",
        ])
        .output()
        .unwrap();
    let out = ok(out, "load by SONAME");
    assert_eq!(out.lines().filter(|l| l.ends_with(VERSION)).count(), 4, "{out}");

    let smi = ok(
        Command::new(m.mountpoint.join("bin/nvidia-smi")).output().unwrap(),
        "bin/nvidia-smi",
    );
    assert!(smi.contains(&format!("Driver Version: {VERSION}")), "{smi}");

    for (host, view) in &m.fixture.others {
        let served = std::fs::read(m.mountpoint.join(view)).unwrap();
        let source = std::fs::read(m.fixture.root.join(host)).unwrap();
        assert!(served == source, "{view:?} differs from {host:?}");
    }
    let firmware = m.mountpoint.join(format!("firmware/nvidia/{VERSION}/gsp_ga10x.bin"));
    assert!(std::fs::metadata(firmware).unwrap().len() > 0);
}

#[test]
fn loads_from_another_mount_namespace_and_as_an_unprivileged_user() {
    common::require_fixture_tools();
    common::require("unshare", "util-linux");
    common::require("setpriv", "util-linux");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    m.assert_loads_everything(&["unshare", "--mount", "--propagation", "private"]);
    m.assert_loads_everything(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
}

#[test]
fn writes_are_refused_and_secrets_stay_out() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(
        FixtureSpec {
            hostile: true,
            ..FixtureSpec::new(VERSION)
        },
        &[],
    );
    let lib = m.mountpoint.join(format!("lib64/libcuda.so.{VERSION}"));
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        std::fs::OpenOptions::new().write(true).open(&lib).map(drop),
        "open for writing",
    );
    erofs(
        std::fs::OpenOptions::new().read(true).write(true).open(&lib).map(drop),
        "open read-write",
    );
    erofs(
        std::fs::File::create(m.mountpoint.join("lib64/new.so")).map(drop),
        "create",
    );
    erofs(
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    erofs(std::fs::remove_file(&lib), "unlink");
    erofs(std::fs::rename(&lib, m.mountpoint.join("lib64/renamed")), "rename");
    erofs(std::fs::create_dir(m.mountpoint.join("newdir")), "mkdir");
    erofs(
        std::os::unix::fs::symlink("x", m.mountpoint.join("lib64/link")),
        "symlink",
    );

    // The shadow link and the escapes are not in the view, and no served
    // byte stream is the secret.
    for trap in &m.fixture.hostile {
        let name = trap.host_path.file_name().unwrap();
        assert!(!m.mountpoint.join("lib64").join(name).exists(), "{} served", trap.what);
    }
    let secret = std::fs::read(m.fixture.root.join("etc/shadow")).unwrap();
    let mut files = 0;
    for entry in common::walk_files(&m.mountpoint) {
        if entry.is_file() {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(secret.len().min(32)).any(|w| w == &secret[..w.len()]),
                "{entry:?} holds the secret"
            );
            files += 1;
        }
    }
    assert!(files > 30);
}

#[test]
fn passthrough_sends_no_reads_and_shares_the_hosts_page_cache() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = FixtureSpec {
        libcuda_bytes: 100 << 20,
        ..FixtureSpec::new(VERSION)
    };
    let m = Mounted::new(spec, &[]);
    let status = m.status();
    assert_eq!(
        status.data_path, "passthrough",
        "this kernel supports passthrough: {:?}",
        status.fallback_reason
    );

    // The host already has the library cached, as a host that runs CUDA would.
    let (host_lib, lib) = m.libcuda();
    std::fs::read(&host_lib).unwrap();
    let loaded = m.load(&[], std::slice::from_ref(&lib), true);
    assert!(loaded[0].1 == VERSION);
    // A process that keeps all 100 MiB mapped and touched: mapped pages stay
    // cached whatever drops the rest of the cache meanwhile.
    let (holder, said) = Holder::start_with(&m.loader, &["--touch"], std::slice::from_ref(&lib));
    assert!(said.contains("touched=104857600"), "{said}");
    let (through_mount, on_host) = (cached_mib(&lib), cached_mib(&host_lib));
    eprintln!("passthrough: {through_mount} MiB cached for the view's libcuda, {on_host} MiB for the host's");
    let status = m.status();
    assert_eq!(
        status.counters.reads, 0,
        "passthrough must keep reads out of the daemon"
    );
    assert!(status.counters.opens >= 2);
    // The process's pages are the host file's; the view's file has no copy.
    assert!(
        on_host >= 99,
        "the host's libcuda has {on_host} MiB cached while mapped"
    );
    assert!(
        through_mount < 2,
        "the view's libcuda has its own {through_mount} MiB in the page cache with passthrough"
    );
    holder.release();
}

#[test]
fn without_passthrough_later_loads_come_from_the_kernel_cache() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = FixtureSpec {
        libcuda_bytes: 100 << 20,
        ..FixtureSpec::new(VERSION)
    };
    // Not warmed: this is about what the kernel keeps of the READs' answers.
    let m = Mounted::new(spec, &["--no-passthrough", "--warm", "none"]);
    let status = m.status();
    assert_eq!(status.counters.warmed_bytes, 0, "--warm none warmed");
    assert_eq!(status.data_path, "cached");
    assert!(status.fallback_reason.unwrap().contains("--no-passthrough"));

    let (host_lib, lib) = m.libcuda();
    std::fs::read(&host_lib).unwrap();
    // The first load, by a process that keeps all 100 MiB mapped and
    // touched: mapped pages stay cached whatever drops the rest of the
    // cache meanwhile (other tests drop it machine-wide).
    let (holder, said) = Holder::start_with(&m.loader, &["--touch"], std::slice::from_ref(&lib));
    assert!(said.contains("touched=104857600"), "{said}");
    // Readahead the loader started may still be on its way when it exits.
    let mut first = m.status().counters;
    wait_for("the first load's readahead to settle", || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = m.status().counters;
        std::mem::replace(&mut first, now).reads == first.reads
    });
    assert!(first.reads > 0 && first.bytes_read >= 100 << 20, "{first:?}");
    // A second copy in the page cache, the view's file's own: the contrast
    // the passthrough test relies on.
    let (through_mount, on_host) = (cached_mib(&lib), cached_mib(&host_lib));
    eprintln!("no passthrough: {through_mount} MiB cached for the view's libcuda, {on_host} MiB for the host's");
    assert!(
        through_mount >= 99,
        "the cached path should hold its own 100 MiB copy, the view's libcuda has {through_mount} MiB"
    );

    m.load(&[], std::slice::from_ref(&lib), true);
    m.load(&[], std::slice::from_ref(&lib), true);
    // A stray late READ (a readahead window the first load's exit left in
    // flight, one evicted page) is not a re-read; a re-read is ~100 MiB.
    let later = m.status().counters;
    let reread = later.bytes_read - first.bytes_read;
    eprintln!(
        "two later loads read {reread} bytes in {} READs",
        later.reads - first.reads
    );
    assert!(
        reread < 1 << 20,
        "later loads must be served from the kernel's cache, they read {reread} bytes of a 100 MiB library"
    );
    // Without passthrough nothing needs an OPEN: the daemon spends the
    // connection's first before the mount is ready, answering it so that
    // the kernel opens files itself from then on, a round trip less each.
    assert_eq!(status.counters.opens, 1, "before any load");
    assert_eq!(later.opens, 1, "three loads sent {} OPENs", later.opens - 1);
    holder.release();
}

#[test]
fn mount_refuses_bad_mount_points_and_missing_drivers() {
    common::require_fixture_tools();
    common::require("mount", "mount");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let vf = m.fixture.module_version_file();
    let try_mount = |mountpoint: &Path, extra: &[&str]| {
        let out = nvlibfs()
            .args(["mount", "--driver-root"])
            .arg(&m.fixture.root)
            .args(extra)
            .arg("--state-dir")
            .arg(m.dir.path().join("state2"))
            .arg(mountpoint)
            .output()
            .unwrap();
        assert!(!out.status.success(), "mount at {mountpoint:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let pin = ["--module-version-file", vf.to_str().unwrap()];

    let err = try_mount(&m.mountpoint, &pin);
    assert!(err.contains("already served by"), "{err}");
    let other = m.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "x"])
            .arg(&other)
            .output()
            .unwrap(),
        "mount tmpfs",
    );
    // Someone else's mount, with something in it, is left alone (an empty
    // one, a container's volume, is mounted over: tests/takeover.rs).
    std::fs::write(other.join("theirs"), "").unwrap();
    let err = try_mount(&other, &pin);
    ok(Command::new("umount").arg(&other).output().unwrap(), "umount tmpfs");
    assert!(err.contains("not empty (it is a mount"), "{err}");

    let full = m.dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), "").unwrap();
    let err = try_mount(&full, &pin);
    assert!(err.contains("not empty"), "{err}");

    let file = m.dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let err = try_mount(&file, &pin);
    assert!(err.contains("not a directory"), "{err}");

    let err = try_mount(&m.dir.path().join("warm"), &["--warm", "libcuda,libcuda.so.1"]);
    assert!(
        err.contains("--warm")
            && err.contains("`libcuda.so.1` is not a driver library")
            && err.contains("libnvidia-ml"),
        "{err}"
    );

    let err = try_mount(&m.dir.path().join("fresh"), &["--driver-version", "1.2.3"]);
    assert!(err.contains("no driver found") && err.contains("1.2.3"), "{err}");
    assert!(!nvlibfs_mountpoint(&m.dir.path().join("fresh")));
}

fn nvlibfs_mountpoint(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

#[test]
fn sigterm_unmounts_cleanly_and_a_missing_mount_point_is_created() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let mountpoint = dir.path().join("a/b/mnt");
    let mut daemon = mount_command(&fixture, &dir.path().join("state"))
        .arg("--foreground")
        .arg(&mountpoint)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mountpoint.join("lib64/libcuda.so.1").exists() {
        assert!(Instant::now() < deadline, "mount never appeared");
        assert!(daemon.try_wait().unwrap().is_none(), "daemon exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(nvlibfs_mountpoint(&mountpoint));
    nix_kill(daemon.id(), libc::SIGTERM);
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon exited with {status}");
    // The FUSE mount is gone; the mount point's own small tmpfs stays for
    // the next daemon (containers keep their bind of it) until `umount`.
    assert!(
        !nvlibfs_mountpoint(&mountpoint.join(".live")),
        "still mounted after SIGTERM"
    );
    assert!(nvlibfs_mountpoint(&mountpoint));
    ok(
        nvlibfs().arg("umount").arg(&mountpoint).output().unwrap(),
        "nvlibfs umount",
    );
    assert!(!nvlibfs_mountpoint(&mountpoint));
}

fn nix_kill(pid: u32, signal: i32) {
    // SAFETY: sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// What `ls` and `readlink` show through the mount is exactly the plan
/// `nvlibfs scan --json` prints for the same driver.
#[test]
fn the_mount_shows_exactly_the_scanned_view() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(
        FixtureSpec {
            lib32: true,
            stale: Some("570.86.15".into()),
            ..FixtureSpec::new(VERSION)
        },
        &[],
    );
    let out = nvlibfs()
        .args(["scan", "--json", "--driver-root"])
        .arg(&m.fixture.root)
        .arg("--module-version-file")
        .arg(m.fixture.module_version_file())
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_str(&ok(out, "scan")).unwrap();
    let mut expected: Vec<(String, String)> = Vec::new();
    for f in plan["files"].as_array().unwrap() {
        expected.push((f["path"].as_str().unwrap().to_owned(), format!("file {}", f["size"])));
    }
    for l in plan["symlinks"].as_array().unwrap() {
        expected.push((
            l["path"].as_str().unwrap().to_owned(),
            format!("link {}", l["target"].as_str().unwrap()),
        ));
    }
    expected.sort();

    // The mount point itself: links into the FUSE mount below it.
    for name in ["bin", "etc", "firmware", "lib", "lib64", "share", "usr"] {
        let target = std::fs::read_link(m.mountpoint.join(name)).unwrap();
        assert_eq!(target, Path::new(".live").join(name));
    }
    let live = m.mountpoint.join(".live");
    let mut seen = Vec::new();
    let mut stack = vec![live.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(&live).unwrap().to_str().unwrap().to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                assert_eq!(meta.permissions().mode() & 0o7777, 0o555, "{rel}");
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                seen.push((rel, format!("link {}", std::fs::read_link(&path).unwrap().display())));
            } else {
                let mode = meta.permissions().mode() & 0o7777;
                assert!(
                    mode == 0o444 || (rel.starts_with("bin/") && mode == 0o555),
                    "{rel}: {mode:o}"
                );
                seen.push((rel, format!("file {}", meta.len())));
            }
        }
    }
    seen.sort();
    // The mount adds its CDI spec to what scan shows.
    let spec = seen.iter().position(|(rel, _)| rel == "etc/cdi/nvlibfs.json");
    seen.remove(spec.expect("the mount carries its CDI spec"));
    assert_eq!(seen, expected);
}

/// Under systemd (`Type=notify`) the daemon says READY=1 only once the
/// mount answers: a socket standing in for systemd's receives it.
#[test]
fn foreground_daemon_notifies_systemd_when_ready() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let notify = dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mountpoint = dir.path().join("mnt");
    let mut daemon = mount_command(&fixture, &dir.path().join("state"))
        .arg("--foreground")
        .arg(&mountpoint)
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    // The supervisor also fills the unit's fd store (FDSTORE=1 messages,
    // descriptors attached) before and after it says READY=1.
    let mut buf = [0u8; 512];
    let mut next = |what: &str| {
        let n = systemd
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{what} within 30 s: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut stored = Vec::new();
    let message = loop {
        let m = next("READY=1");
        if !m.starts_with("FDSTORE") {
            break m;
        }
        stored.push(m);
    };
    assert!(message.starts_with("READY=1\n"), "{message}");
    assert!(message.contains(VERSION), "{message}");
    assert!(
        stored.iter().any(|m| m == "FDSTORE=1\nFDNAME=nvlibfs-fuse"),
        "the connection was not given to the fd store: {stored:?}"
    );
    // Ready means answering: no waiting here.
    assert!(mountpoint.join("lib64/libcuda.so.1").exists());
    nix_kill(daemon.id(), libc::SIGTERM);
    let stopping = loop {
        let m = next("STOPPING=1");
        if !m.starts_with("FDSTORE") && !m.starts_with("STATUS") {
            break m;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    assert!(daemon.wait().unwrap().success());
    ok(
        nvlibfs().arg("umount").arg(&mountpoint).output().unwrap(),
        "nvlibfs umount",
    );
}

/// Once mounted, the daemon keeps only CAP_SYS_ADMIN and
/// CAP_DAC_READ_SEARCH, in every set including the bounding set, with
/// no_new_privs; it still serves.
#[test]
fn the_daemon_drops_to_the_capabilities_it_needs() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let pid = m.status().pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let kept = format!("{:016x}", (1u64 << 21) | (1u64 << 2));
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(set), kept, "{set} of the daemon");
    }
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("CapAmb:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    m.assert_loads_everything(&[]);
}

/// `status --format prometheus`: every sample has HELP and TYPE, parses as
/// `name{labels} value`, and the counters say what the JSON says.
#[test]
fn status_speaks_prometheus() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let out = nvlibfs()
        .args(["status", "--format", "prometheus", "--state-dir"])
        .arg(&m.state_dir)
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let text = ok(out, "status --format prometheus");
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = series
            .split_once('{')
            .unwrap_or_else(|| panic!("no labels in {line:?}"));
        assert!(labels.ends_with('}') && labels.contains("mountpoint=\""), "{line}");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        assert!(typed.contains(name), "{name} has no TYPE line");
    }
    assert!(text.contains(&format!("driver_version=\"{VERSION}\"")), "{text}");
    assert!(
        text.contains("nvlibfs_requests_total{") && text.contains("op=\"read\"} 0"),
        "{text}"
    );
}

/// The view also works as a driver root for tools that take one: NVIDIA's
/// lookup rules (FACTS.md §1: the distribution's library directories, the
/// kernel's firmware path, the bin directories, the vendor config paths)
/// find every served file, and nvlibfs's own scan of the mount finds
/// exactly the view again.
#[test]
fn the_view_is_a_driver_root_for_nvidia_tools() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let root = &m.mountpoint;
    for path in [
        format!("usr/lib/x86_64-linux-gnu/libcuda.so.{VERSION}"),
        "usr/lib/x86_64-linux-gnu/libcuda.so.1".into(),
        "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1".into(),
        format!("usr/lib/x86_64-linux-gnu/vdpau/libvdpau_nvidia.so.{VERSION}"),
        format!("usr/lib64/libnvidia-ml.so.{VERSION}"),
        format!("lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin"),
        "usr/bin/nvidia-smi".into(),
        "usr/share/glvnd/egl_vendor.d/10_nvidia.json".into(),
        "etc/vulkan/icd.d/nvidia_icd.json".into(),
    ] {
        assert!(
            root.join(&path).is_file(),
            "{path} not found under the view as a driver root"
        );
    }

    // Its own loader cache, which glibc's ldconfig reads like any other.
    let listed = ok(
        Command::new("ldconfig")
            .arg("-p")
            .arg("-C")
            .arg(root.join("etc/ld.so.cache"))
            .output()
            .unwrap(),
        "ldconfig -p",
    );
    assert!(
        listed.contains("libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        "{listed}"
    );
    for line in listed.lines().skip(1) {
        let path = line.rsplit(" => ").next().unwrap().trim();
        assert!(
            root.join(path.trim_start_matches('/')).exists(),
            "{path} listed but missing"
        );
    }

    let scan = |driver_root: &Path| -> Vec<(String, u64)> {
        let out = nvlibfs()
            .args(["scan", "--json", "--driver-version", VERSION, "--driver-root"])
            .arg(driver_root)
            .output()
            .unwrap();
        let plan: serde_json::Value = serde_json::from_str(&ok(out, "scan")).unwrap();
        let mut files: Vec<(String, u64)> = plan["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["path"].as_str().unwrap().to_owned(), f["size"].as_u64().unwrap()))
            .collect();
        files.sort();
        files
    };
    assert_eq!(
        scan(root),
        scan(&m.fixture.root),
        "the view, scanned as a driver root, is not the view"
    );
}

/// On the cached path the mount is ready only once libcuda and
/// libnvidia-ml are in the kernel's page cache: the first process to load
/// libcuda after the mount, touching all of it, sends (almost) no READs.
/// A new generation (here: the module reloaded at another version and
/// back) is warmed too. A library not warmed is read as before.
#[test]
fn the_cached_path_warms_libcuda_before_the_mount_is_ready() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // What is warmed must still be cached when it is loaded.
    let _kept = common::keep_page_cache();
    const OTHER: &str = "570.86.15";
    let spec = FixtureSpec {
        libcuda_bytes: 64 << 20,
        stale: Some(OTHER.into()),
        ..FixtureSpec::new(VERSION)
    };
    let m = Mounted::new(spec, &["--no-passthrough"]);
    let (_, lib) = m.libcuda();
    let size = std::fs::metadata(&lib).unwrap().len();
    let first_load_reads = |m: &Mounted, generation: u32| {
        let before = m.status().counters;
        m.load(&[], std::slice::from_ref(&lib), true);
        let read = m.status().counters.bytes_read - before.bytes_read;
        eprintln!("the first load of generation {generation}'s warmed 64 MiB libcuda read {read} bytes");
        assert!(read < 1 << 20, "the first load of a warmed libcuda read {read} bytes");
    };
    assert!(
        m.status().counters.warmed_bytes >= size,
        "libcuda was warmed before the mount was ready"
    );
    first_load_reads(&m, 0);

    // The new generations are warmed right after each is swapped in.
    let reload = |version: &str, generation: u32| {
        let warmed = m.status().counters.warmed_bytes;
        std::fs::write(m.fixture.module_version_file(), format!("{version}\n")).unwrap();
        wait_for("the new generation and its warm-up", || {
            let status = m.status();
            status.generation == generation && status.counters.warmed_bytes > warmed
        });
    };
    reload(OTHER, 1);
    reload(VERSION, 2);
    wait_for("libcuda warmed again", || m.status().counters.warmed_bytes >= 2 * size);
    first_load_reads(&m, 2);
    let after = m.status().counters;

    let other = m
        .lib64()
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| p.to_string_lossy().contains("libnvidia-ptxjitcompiler.so."))
        .expect("ptxjitcompiler in the view");
    m.load(&[], std::slice::from_ref(&other), true);
    assert!(
        m.status().counters.bytes_read > after.bytes_read,
        "a library --warm does not name is read through the daemon"
    );
}

/// `--readahead-kb`, as a user would check it: the mount's readahead in
/// sysfs is what the flag says, and a walk of a library nobody warmed
/// takes fewer, larger READs than the kernel's 128 KiB windows would.
#[test]
fn readahead_on_the_cached_path() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = FixtureSpec {
        libcuda_bytes: 64 << 20,
        ..FixtureSpec::new(VERSION)
    };
    let m = Mounted::new(spec, &["--no-passthrough", "--readahead-kb", "2048", "--warm", "none"]);
    let live = m.mountpoint.join(".live").display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let device = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(live.as_str()))
        .and_then(|l| l.split(' ').nth(2))
        .expect("the FUSE mount in mountinfo");
    let readahead = std::fs::read_to_string(format!("/sys/class/bdi/{device}/read_ahead_kb")).unwrap();
    assert_eq!(readahead.trim(), "2048");

    let (_, lib) = m.libcuda();
    let before = m.status().counters;
    m.load(&[], std::slice::from_ref(&lib), true);
    let after = m.status().counters;
    let reads = after.reads - before.reads;
    eprintln!(
        "walking 64 MiB with readahead 2048 KiB: {reads} READs, {} bytes",
        after.bytes_read - before.bytes_read
    );
    assert!(
        reads > 0 && reads < 256,
        "walking a 64 MiB library sent {reads} READs; 128 KiB windows take 512"
    );
}
