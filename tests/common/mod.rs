//! Helpers shared by the test files that mount real views.
// Each test file uses its own subset of these.
#![allow(dead_code)]

pub mod builds;
pub mod images;
pub mod loaders;
pub mod packages;
pub mod toolkit;

use nvlibfs::control::Status;
use nvlibfs_fixture::{build, build_loader, Fixture, FixtureSpec};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

pub const VERSION: &str = "580.159.04";

/// The one command that installs everything the tests use on a fresh
/// Debian or Ubuntu machine (and then runs them).
pub const TEST_SCRIPT: &str = "contrib/test.sh";

/// Fails the calling test at once, in one line, when the program `tool` is
/// not installed: naming it and what installs it (Debian's `package`),
/// rather than failing later with an error that names something else, and
/// never skipping silently.
#[track_caller]
pub fn require(tool: &str, package: &str) {
    if find_program(tool).is_none() {
        panic!("{tool} is not installed: run {TEST_SCRIPT}, or apt-get install {package}");
    }
}

/// `require` for a Python module (`python3 -c 'import MODULE'`), installed
/// with pip as `pip_packages`.
#[track_caller]
pub fn require_python_module(module: &str, pip_packages: &str) {
    require("python3", "python3");
    let imports = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !imports {
        panic!(
            "Python's {module} module is not installed: run {TEST_SCRIPT}, or python3 -m pip install {pip_packages}"
        );
    }
}

/// What the fixture drivers are built with: a C compiler with the C
/// library's headers, and ldconfig for their ld.so.cache.
#[track_caller]
pub fn require_fixture_tools() {
    require("cc", "gcc");
    if !Path::new("/usr/include/dlfcn.h").exists() {
        panic!("the C library's headers are not installed: run {TEST_SCRIPT}, or apt-get install libc6-dev");
    }
    require("ldconfig", "libc-bin");
}

/// A running Docker engine: `docker info` answers.
#[track_caller]
pub fn require_docker_engine() {
    require("docker", "docker.io");
    let answers = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !answers {
        // An engine elsewhere (a mounted socket) needs no dockerd here.
        require("dockerd", "docker.io");
        panic!(
            "no Docker engine answers (`docker info` fails): run {TEST_SCRIPT}, which starts dockerd, \
             or start it: dockerd &"
        );
    }
}

/// Where `program` is found: on PATH, or in the sbin directories that a
/// non-login root shell may lack on its PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Mounts in this file run one at a time: the page-cache test measures the
/// whole machine's cache, which another test's fixture build would disturb.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// `nvlibfs mount` starts the `nvlibfs-mountd` binary beside it, which
/// belongs to another package: `cargo test --workspace` builds it, but a
/// narrower `cargo test` would leave an old one there, so build it once.
fn fresh_daemon() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let Ok(cargo) = std::env::var("CARGO") else { return };
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "nvlibfs-mountd", "--bin", "nvlibfs-mountd"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        ok(cmd.output().unwrap(), "building nvlibfs-mountd");
    });
}

pub fn nvlibfs() -> Command {
    fresh_daemon();
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvlibfs"));
    c.env_remove("NVLIBFS_LOG");
    c
}

/// The status of the daemon serving `mountpoint`. A daemon that takes
/// longer than the client's 5 s to answer (this machine's two cores under
/// every test binary at once) is asked again, for up to a minute.
pub fn status_of(state_dir: &Path, mountpoint: &Path) -> Status {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match nvlibfs::control::query(state_dir, mountpoint) {
            Ok(status) => return status,
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                    && std::time::Instant::now() < deadline => {}
            Err(e) => panic!("the status of {}: {e}", mountpoint.display()),
        }
    }
}

pub fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `nvlibfs mount` of `fixture`, pinned by its module version file, with
/// its own state directory; the caller adds flags and the mount point.
pub fn mount_command(fixture: &Fixture, state_dir: &Path) -> Command {
    mount_root_command(&fixture.root, state_dir)
}

/// `nvlibfs mount` of any driver root pinned by its own
/// `sys/module/nvidia/version`; the caller adds flags and the mount point.
pub fn mount_root_command(root: &Path, state_dir: &Path) -> Command {
    let mut c = nvlibfs();
    c.args(["mount", "--driver-root"])
        .arg(root)
        .arg("--module-version-file")
        .arg(root.join("sys/module/nvidia/version"))
        .arg("--state-dir")
        .arg(state_dir);
    c
}

/// `nvlibfs umount` of a mount made with `state_dir`; fails the test if it fails.
pub fn umount(mountpoint: &Path, state_dir: &Path) {
    let out = nvlibfs()
        .args(["umount", "--state-dir"])
        .arg(state_dir)
        .arg(mountpoint)
        .output()
        .unwrap();
    ok(out, "nvlibfs umount");
}

/// A fixture driver mounted by `nvlibfs mount`, unmounted on drop.
pub struct Mounted {
    pub fixture: Fixture,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub loader: PathBuf,
    // Last: removed after the unmount in drop().
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(spec: FixtureSpec, extra: &[&str]) -> Mounted {
        Mounted::with_binaries(spec, extra, None)
    }

    /// `new`, mounting with the nvlibfs (and so nvlibfs-mountd) in `bin`
    /// instead of the ones cargo built: a test can then replace them.
    pub fn with_binaries(spec: FixtureSpec, extra: &[&str], bin: Option<&Path>) -> Mounted {
        Mounted::with_env(spec, extra, bin, &[])
    }

    /// `with_binaries`, the daemon started with `env` set.
    pub fn with_env(
        spec: FixtureSpec,
        extra: &[&str],
        bin: Option<&Path>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        // Unprivileged users in these tests must reach the mount and the loader.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let fixture = build(&spec, &dir.path().join("host")).expect("fixture builds");
        let loader = build_loader(dir.path()).expect("loader builds");
        let mountpoint = dir.path().join("mnt");
        let state_dir = dir.path().join("state");
        let mount = mount_command(&fixture, &state_dir);
        let mut mount = match bin {
            Some(bin) => {
                let mut c = Command::new(bin.join("nvlibfs"));
                c.args(mount.get_args());
                c
            }
            None => mount,
        };
        let out = mount
            .args(extra)
            .envs(env.iter().copied())
            .arg(&mountpoint)
            .output()
            .unwrap();
        ok(out, "nvlibfs mount");
        Mounted {
            fixture,
            mountpoint,
            state_dir,
            loader,
            dir,
        }
    }

    pub fn status(&self) -> Status {
        status_of(&self.state_dir, &self.mountpoint)
    }

    /// The pinned libcuda: (its host file, its path through the mount).
    pub fn libcuda(&self) -> (PathBuf, PathBuf) {
        let lib = self
            .fixture
            .libraries
            .iter()
            .find(|l| l.name == "libcuda" && l.version == VERSION)
            .unwrap();
        (
            self.fixture.root.join(&lib.host_path),
            self.mountpoint.join(&lib.view_path),
        )
    }

    pub fn lib64(&self) -> Vec<(PathBuf, String)> {
        self.fixture
            .libraries
            .iter()
            .filter(|l| l.view_path.starts_with("lib64"))
            .map(|l| (self.mountpoint.join(&l.view_path), l.version.clone()))
            .collect()
    }

    /// Runs the loader on `libs` under `wrapper`; returns lib -> version.
    pub fn load(&self, wrapper: &[&str], libs: &[PathBuf], touch: bool) -> Vec<(String, String)> {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.loader);
                c
            }
            None => Command::new(&self.loader),
        };
        if touch {
            cmd.arg("--touch");
        }
        let out = ok(cmd.args(libs).output().unwrap(), "loader");
        out.lines()
            .map(|l| {
                let mut parts = l.split(' ');
                (
                    parts.next().unwrap().to_owned(),
                    parts.next().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    pub fn assert_loads_everything(&self, wrapper: &[&str]) {
        let libs = self.lib64();
        assert!(libs.len() >= 30, "only {} libraries", libs.len());
        let paths: Vec<PathBuf> = libs.iter().map(|(p, _)| p.clone()).collect();
        let loaded = self.load(wrapper, &paths, false);
        assert_eq!(loaded.len(), libs.len());
        for ((path, version), (shown, got)) in libs.iter().zip(&loaded) {
            assert_eq!(Path::new(shown), path);
            assert_eq!(got, version, "{shown} under {wrapper:?}");
        }
    }
}

/// Unmounts (mount point, state directory) however the test ends.
pub struct UnmountOnDrop(pub PathBuf, pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = nvlibfs()
            .arg("umount")
            .arg("--state-dir")
            .arg(&self.1)
            .arg(&self.0)
            .output();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let out = nvlibfs()
            .args(["umount", "--state-dir"])
            .arg(&self.state_dir)
            .arg(&self.mountpoint)
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            let _ = nvlibfs().args(["umount", "--lazy"]).arg(&self.mountpoint).output();
        }
        let _ = &self.dir;
    }
}

/// The host's /dev/nvidia* nodes: NVIDIA's libraries create them when run
/// as root where they are missing, and a test must leave none behind.
pub fn nvidia_nodes() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nvidia"))
        .collect()
}

/// Every regular file below `dir`, not following links.
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(walk_files(&path));
        } else if meta.is_file() {
            out.push(path);
        }
    }
    out
}

/// Waits for `what` to hold, up to 20 s; returns how long it took.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    start.elapsed()
}

/// Drops the page cache machine-wide (tests that prove mappings survive).
pub fn drop_caches() {
    let _dropping = page_cache_lock(nix::fcntl::FlockArg::LockExclusive);
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
}

/// Held by a test that asserts what stays in the page cache: no test
/// binary (they run side by side) drops the machine's cache meanwhile.
pub fn keep_page_cache() -> nix::fcntl::Flock<std::fs::File> {
    page_cache_lock(nix::fcntl::FlockArg::LockShared)
}

fn page_cache_lock(how: nix::fcntl::FlockArg) -> nix::fcntl::Flock<std::fs::File> {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("page-cache.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    nix::fcntl::Flock::lock(file, how).unwrap_or_else(|(_, e)| panic!("{}: {e}", path.display()))
}

/// A process that mapped every given library (the loader's `--hold`) and,
/// at each `check`, calls each again and reads every page of its data:
/// do old mappings survive an event?
pub struct Holder {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    count: usize,
}

impl Holder {
    /// Starts it and returns its first report: "LIB VERSION" per library.
    pub fn start(loader: &Path, libs: &[PathBuf]) -> (Holder, String) {
        Holder::start_with(loader, &[], libs)
    }

    /// `start` with more loader flags (`--touch`, `--half`).
    pub fn start_with(loader: &Path, flags: &[&str], libs: &[PathBuf]) -> (Holder, String) {
        use std::io::BufRead;
        let mut child = Command::new(loader)
            .arg("--hold")
            .args(flags)
            .args(libs)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut loaded = String::new();
        for _ in libs {
            out.read_line(&mut loaded).unwrap();
        }
        (
            Holder {
                child,
                out,
                count: libs.len(),
            },
            loaded,
        )
    }

    /// Lets it call every library again and read all their pages; its
    /// "after LIB VERSION" lines. Fails the test if it died (SIGBUS).
    pub fn check(&mut self) -> String {
        use std::io::{BufRead, Write};
        self.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut after = String::new();
        for _ in 0..self.count {
            if self.out.read_line(&mut after).unwrap() == 0 {
                panic!(
                    "the process with old mappings died: {:?}\n{after}",
                    self.child.wait().unwrap()
                );
            }
        }
        after
    }

    /// A last `check`, then it exits.
    pub fn release(mut self) -> String {
        let after = self.check();
        drop(self.child.stdin.take());
        assert!(
            self.child.wait().unwrap().success(),
            "the process with old mappings died:\n{after}"
        );
        after
    }
}

/// The project's CUDA check (contrib/cuda-check), built with warnings as
/// errors into `dir`.
pub fn build_cuda_check(dir: &Path) -> PathBuf {
    let out = dir.join("nvlibfs-cuda-check");
    ok(
        Command::new("cc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/contrib/cuda-check/nvlibfs-cuda-check.c"
            ))
            .args(["-ldl", "-lm"])
            .output()
            .unwrap(),
        "building nvlibfs-cuda-check",
    );
    out
}
