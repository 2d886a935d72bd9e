//! Every step of a restart and of a takeover, on both sides, meets each
//! fault: the process killed there, stalled past the step limit, or the
//! step failing (mountd/src/failpoint.rs lists the steps; a build with the
//! `failpoints` feature has them). After each, once the fault is over:
//! exactly one daemon holds the lock and serves, `nvlibfs status` answers
//! for it and no server stays frozen, every file reads its exact bytes
//! with the page cache dropped, the other daemon has exited, no
//! checkpoint number was used twice, and loaders in rslave and private
//! binds went on loading.
//!
//! The suite runs each step once on each data path, its fault chosen in
//! turn (48 cells); `NVLIBFS_FAILPOINT_MATRIX=full` runs all three faults
//! on both paths (144 cells), `NVLIBFS_FAILPOINT_MATRIX=step,step` all of
//! them for the steps named.
//!
//! Beside the matrix, one test for each way a handover used to fail.

mod common;

use common::loaders::{self, Bind};
use common::{builds, drop_caches, mount_command, Mounted, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The step limit the failpoints build runs with here (20 s in releases).
const STEP_LIMIT_MS: u64 = 2000;

/// The version a module change switches to (its files are beside).
const OTHER: &str = "570.86.15";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stall,
    Error,
}

impl Fault {
    const ALL: [Fault; 3] = [Fault::Kill, Fault::Stall, Fault::Error];

    fn action(self) -> String {
        match self {
            Fault::Kill => "return(kill)".into(),
            Fault::Stall => format!("sleep({})", 2 * STEP_LIMIT_MS + 500),
            Fault::Error => "return(error)".into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Cell {
    point: String,
    trigger: String,
    fault: Fault,
    cached: bool,
}

/// The binaries the cells run: the nvlibfs cargo built and nvlibfs-mountd
/// with failpoints, and the other protocol's build for refused restarts.
struct Binaries {
    bin: PathBuf,
    other_protocol: PathBuf,
    _dir: tempfile::TempDir,
}

fn binaries() -> Binaries {
    let dir = tempfile::tempdir().unwrap();
    let bin = builds::binaries(dir.path());
    builds::install(&builds::failpoints_variant(), &bin);
    Binaries {
        bin,
        other_protocol: builds::protocol_variant(),
        _dir: dir,
    }
}

/// Every failpoint and what reaches it, as the failpoints build lists them.
fn steps(bin: &Path) -> Vec<(String, String)> {
    let out = common::ok(
        Command::new(bin.join("nvlibfs-mountd"))
            .args(["--list-failpoints", "/nonexistent"])
            .output()
            .unwrap(),
        "nvlibfs-mountd --list-failpoints",
    );
    out.lines()
        .map(|l| {
            let (name, trigger) = l.split_once(' ').unwrap();
            (name.to_owned(), trigger.to_owned())
        })
        .collect()
}

/// One cell's mount: the fixture served by the failpoints build, with
/// its failpoint directory; unmounted (and whatever of it still runs,
/// killed) on drop.
struct Scene {
    m: Mounted,
    failpoints: tempfile::TempDir,
    bin: PathBuf,
    step_limit_ms: u64,
}

impl Scene {
    fn new(binaries: &Binaries, cached: bool) -> Scene {
        Scene::with_step_limit(binaries, cached, STEP_LIMIT_MS)
    }

    fn with_step_limit(binaries: &Binaries, cached: bool, step_limit_ms: u64) -> Scene {
        let failpoints = tempfile::tempdir().unwrap();
        // Each scene its own copy: a refused restart installs another build.
        let bin = failpoints.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for name in ["nvlibfs", "nvlibfs-mountd"] {
            std::fs::copy(binaries.bin.join(name), bin.join(name)).unwrap();
        }
        let extra: &[&str] = if cached { &["--no-passthrough"] } else { &[] };
        let spec = FixtureSpec {
            stale: Some(OTHER.into()),
            ..FixtureSpec::new(VERSION)
        };
        let m = Mounted::with_env(
            spec,
            extra,
            Some(&bin),
            &[
                ("NVLIBFS_FAILPOINTS", failpoints.path().as_os_str()),
                ("NVLIBFS_STEP_LIMIT_MS", step_limit_ms.to_string().as_ref()),
            ],
        );
        Scene {
            m,
            failpoints,
            bin,
            step_limit_ms,
        }
    }

    /// The command that takes this scene's mount over, as a new daemon.
    fn take_over(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("nvlibfs"));
        cmd.args(mount_command(&self.m.fixture, &self.m.state_dir).get_args())
            .arg("--take-over")
            .arg(&self.m.mountpoint)
            .env("NVLIBFS_FAILPOINTS", self.failpoints.path())
            .env("NVLIBFS_STEP_LIMIT_MS", self.step_limit_ms.to_string());
        cmd
    }

    fn restart(&self) -> std::process::Output {
        Command::new(self.bin.join("nvlibfs"))
            .args(["restart", "--state-dir"])
            .arg(&self.m.state_dir)
            .arg(&self.m.mountpoint)
            .output()
            .unwrap()
    }

    fn arm(&self, point: &str, action: &str) {
        std::fs::write(self.failpoints.path().join("armed"), format!("{point}={action}\n")).unwrap();
    }

    fn fired(&self, point: &str) -> bool {
        self.failpoints.path().join(format!("{point}.fired")).exists()
    }

    fn log(&self) -> String {
        let path = nvlibfs::control::log_path(&self.m.state_dir, &self.m.mountpoint);
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        // Whatever a cell left of this scene goes with it; Mounted's drop
        // unmounts.
        for pid in supervisors(&self.m.mountpoint)
            .into_iter()
            .chain(servers(&self.m.mountpoint))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// nvlibfs-mountd processes of `mountpoint`: (pid, is a server).
fn daemons(mountpoint: &Path) -> Vec<(u32, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_mountd = args.first().is_some_and(|a| a.ends_with(b"nvlibfs-mountd"));
        let ours = args
            .last()
            .is_some_and(|a| *a == mountpoint.as_os_str().as_encoded_bytes())
            || args
                .iter()
                .rev()
                .nth(1)
                .is_some_and(|a| *a == mountpoint.as_os_str().as_encoded_bytes());
        if is_mountd && ours {
            found.push((pid, args.iter().any(|a| *a == b"--supervisor-socket")));
        }
    }
    found
}

fn supervisors(mountpoint: &Path) -> Vec<u32> {
    daemons(mountpoint).into_iter().filter(|d| !d.1).map(|d| d.0).collect()
}

fn servers(mountpoint: &Path) -> Vec<u32> {
    daemons(mountpoint).into_iter().filter(|d| d.1).map(|d| d.0).collect()
}

/// Whether the mount point's lock is held (by anyone).
fn lock_held(m: &Mounted) -> bool {
    let path = nvlibfs::control::lock_path(&m.state_dir, &m.mountpoint);
    let Ok(file) = std::fs::File::open(&path) else {
        return false;
    };
    matches!(
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// What must hold once a fault is over; `Err` names what does not. A
/// supervisor killed is the one death nothing saves (but systemd's store):
/// then its server serves on alone, and status says that no supervisor is
/// there.
fn settled(scene: &Scene, cell: &Cell) -> Result<(), String> {
    let m = &scene.m;
    let status = nvlibfs::control::query(&m.state_dir, &m.mountpoint).map_err(|e| format!("status: {e}"))?;
    let supervisors = supervisors(&m.mountpoint);
    match status.supervisor_pid {
        Some(supervisor) if supervisors != [supervisor] => {
            return Err(format!("supervisors {supervisors:?}, status says {supervisor}"))
        }
        Some(_) => {}
        None if cell.fault == Fault::Kill && !cell.point.starts_with("server-") => {
            if !supervisors.is_empty() {
                return Err(format!("supervisors {supervisors:?}, status says none"));
            }
        }
        None => return Err(format!("no supervisor (supervisors {supervisors:?})")),
    }
    let servers = servers(&m.mountpoint);
    if servers != [status.pid] {
        return Err(format!("servers {servers:?}, status says {}", status.pid));
    }
    if let Some(frozen) = status.frozen_s {
        return Err(format!("the server is frozen ({frozen:.1} s)"));
    }
    let module = std::fs::read_to_string(m.fixture.module_version_file()).unwrap();
    if status.driver_version != module.trim() {
        return Err(format!(
            "the view serves {}, the module is {}",
            status.driver_version,
            module.trim()
        ));
    }
    if !lock_held(m) {
        return Err("nobody holds the lock".into());
    }
    Ok(())
}

/// Every file of the view reads the bytes of its host file, from disk,
/// and the view serves the version the module says.
fn exact_bytes(m: &Mounted) -> Result<(), String> {
    let served = m.status().driver_version;
    drop_caches();
    for lib in m.fixture.libraries.iter().filter(|l| l.version == served) {
        let host = std::fs::read(m.fixture.root.join(&lib.host_path)).unwrap();
        let served = std::fs::read(m.mountpoint.join(&lib.view_path))
            .map_err(|e| format!("{}: {e}", lib.view_path.display()))?;
        if host != served {
            return Err(format!("{} differs from its host file", lib.view_path.display()));
        }
    }
    Ok(())
}

/// Checkpoint numbers the log shows sent, each once.
fn numbers_used_once(log: &str) -> Result<(), String> {
    let mut seen = HashMap::new();
    for n in log.lines().filter_map(|l| {
        let at = l.find("checkpoint ")?;
        let rest = l[at + 11..].strip_suffix(" sent")?;
        rest.parse::<u64>().ok()
    }) {
        *seen.entry(n).or_insert(0) += 1;
    }
    match seen.iter().find(|(_, &c)| c > 1) {
        Some((n, c)) => Err(format!("checkpoint {n} was sent {c} times")),
        None if seen.is_empty() => Err("the log shows no checkpoint sent".into()),
        None => Ok(()),
    }
}

fn run_cell(binaries: &Binaries, cell: &Cell) -> Result<String, String> {
    let scene = Scene::new(binaries, cell.cached);
    let m = &scene.m;
    let first = m.status();
    let stall = if cell.fault == Fault::Stall {
        2 * STEP_LIMIT_MS + 500
    } else {
        0
    };
    let loop_ms = 4000 + stall + 2 * STEP_LIMIT_MS;
    let rslave = loaders::start(m, 0, Bind::Rslave, loop_ms);
    let private = loaders::start(m, 1, Bind::Private, loop_ms);
    let checked = fault_and_check(binaries, &scene, cell, stall, private.id());
    let outcomes = [loaders::finish(rslave), loaders::finish(private)];
    let summary = checked?;
    numbers_used_once(&scene.log())?;
    let (ok, failed, _) = loaders::totals(&outcomes);
    if failed > 0 {
        return Err(format!(
            "{failed} loads failed ({ok} loaded):\n{}\n{}",
            outcomes[0].text, outcomes[1].text
        ));
    }
    let last = m.status();
    Ok(format!(
        "{summary}, {ok} loads, supervisor {} -> {}",
        first.supervisor_pid.unwrap_or(0),
        last.supervisor_pid.unwrap_or(0)
    ))
}

/// Arms the cell's failpoint, triggers its step, and waits for the mount
/// to settle once the fault is over.
fn fault_and_check(
    binaries: &Binaries,
    scene: &Scene,
    cell: &Cell,
    stall: u64,
    private: u32,
) -> Result<String, String> {
    let m = &scene.m;
    std::thread::sleep(Duration::from_millis(300));
    scene.arm(&cell.point, &cell.fault.action());
    let started = Instant::now();
    let said = match cell.trigger.as_str() {
        "Restart" => scene.restart(),
        "RefusedRestart" => {
            builds::install(&binaries.other_protocol, &scene.bin);
            scene.restart()
        }
        "TakenOver" | "TakingOver" => scene.take_over().output().unwrap(),
        "ModuleChange" => {
            std::fs::write(m.fixture.module_version_file(), format!("{OTHER}\n")).unwrap();
            let supervisor = m.status().supervisor_pid.expect("a supervisor");
            // SAFETY: signals the daemon this test started.
            unsafe { libc::kill(supervisor as i32, libc::SIGHUP) };
            std::thread::sleep(Duration::from_millis(500));
            Command::new("true").output().unwrap()
        }
        other => panic!("a trigger this test does not know: {other}"),
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&said.stdout),
        String::from_utf8_lossy(&said.stderr)
    );
    if !scene.fired(&cell.point) {
        return Err(format!("the step was never reached; the trigger said: {said}"));
    }
    // The fault is over once the stall has run out; from then on, 2 s,
    // and the step limit for a step that was stuck to be given up.
    let over = started + Duration::from_millis(stall);
    let deadline = over + Duration::from_millis(2 * STEP_LIMIT_MS + 2000);
    let mut last = Err(String::new());
    while Instant::now() < deadline {
        last = settled(scene, cell);
        if last.is_ok() && Instant::now() >= over {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after_fault = Instant::now().saturating_duration_since(over);
    last.map_err(|e| format!("{e}; the trigger said: {said}"))?;
    exact_bytes(m)?;
    // A stat through the private bind the second loader was given before
    // the fault (docker's default), in its mount namespace.
    let stat_started = Instant::now();
    let stat = Command::new("nsenter")
        .args(["-t", &private.to_string(), "-m", "timeout", "2", "stat"])
        .arg(m.dir.path().join("container-1/lib64/libcuda.so.1"))
        .output()
        .unwrap();
    if !stat.status.success() {
        return Err(format!("stat through the view failed or hung: {stat:?}"));
    }
    Ok(format!(
        "settled {:.1} s after the fault, stat {:.0} ms",
        after_fault.as_secs_f64(),
        stat_started.elapsed().as_secs_f64() * 1e3
    ))
}

fn cells(steps: &[(String, String)]) -> Vec<Cell> {
    let chosen = std::env::var("NVLIBFS_FAILPOINT_MATRIX").unwrap_or_default();
    let full = !chosen.is_empty();
    let mut cells = Vec::new();
    for (i, (point, trigger)) in steps.iter().enumerate() {
        if full && chosen != "full" && !chosen.split(',').any(|c| c == point) {
            continue;
        }
        for cached in [false, true] {
            let faults: Vec<Fault> = if full {
                Fault::ALL.to_vec()
            } else {
                vec![Fault::ALL[(i + cached as usize) % 3]]
            };
            for fault in faults {
                cells.push(Cell {
                    point: point.clone(),
                    trigger: trigger.clone(),
                    fault,
                    cached,
                });
            }
        }
    }
    cells
}

#[test]
fn every_step_survives_every_fault_on_both_data_paths() {
    common::require_fixture_tools();
    common::require("unshare", "util-linux");
    let binaries = binaries();
    let steps = steps(&binaries.bin);
    assert!(steps.len() >= 20, "only {} failpoints listed", steps.len());
    let cells = cells(&steps);
    let total = cells.len();
    let queue = std::sync::Mutex::new(cells.into_iter());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some(cell) = queue.lock().unwrap().next() else {
                    return;
                };
                let result = run_cell(&binaries, &cell);
                eprintln!(
                    "{} {:?} {}: {}",
                    cell.point,
                    cell.fault,
                    if cell.cached { "cached" } else { "passthrough" },
                    match &result {
                        Ok(s) => s.clone(),
                        Err(e) => format!("FAILED: {e}"),
                    }
                );
                results.lock().unwrap().push((cell, result));
            });
        }
    });
    let results = results.into_inner().unwrap();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(c, r)| {
            r.as_ref().err().map(|e| {
                format!(
                    "{} {:?} {}: {e}",
                    c.point,
                    c.fault,
                    if c.cached { "cached" } else { "passthrough" }
                )
            })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {total} cells failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

/// Waits (up to the step limit and 10 s) for what must hold once a fault
/// is over, and for the view's bytes; panics naming what does not hold.
fn assert_settles(scene: &Scene, cell: &Cell) {
    let deadline = Instant::now() + Duration::from_millis(STEP_LIMIT_MS) + Duration::from_secs(10);
    let mut last = settled(scene, cell);
    while last.is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        last = settled(scene, cell);
    }
    if let Err(e) = last {
        panic!("{e}\nlog:\n{}", scene.log());
    }
    exact_bytes(&scene.m).unwrap();
    numbers_used_once(&scene.log()).unwrap();
}

/// A cell for `settled`, for the tests below that fault by hand.
fn by_hand(point: &str) -> Cell {
    Cell {
        point: point.into(),
        trigger: String::new(),
        fault: Fault::Error,
        cached: false,
    }
}

/// What a process offering a takeover gets: the first message's tag and
/// how many descriptors came with it, or what the connection said.
const OFFER: &str = r#"
import array, json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.send(b"O" + json.dumps({"protocol": int(sys.argv[2]), "version": "0.1.0", "pid": os.getpid()}).encode())
except BrokenPipeError:
    pass  # refused on sight, before the offer went out: the refusal is still queued
try:
    msg, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
except Exception as e:
    print("error", e)
    sys.exit(0)
fds = sum(len(d) // 4 for (l, t, d) in anc if l == socket.SOL_SOCKET and t == socket.SCM_RIGHTS)
print(chr(msg[0]) if msg else "EOF", fds, msg[1:200].decode(errors="replace"))
"#;

/// A root that holds no capability (a container's root without
/// CAP_SYS_ADMIN), and a root of a user namespace of its own, reach the
/// takeover and status sockets and get nothing: refused before anything
/// is frozen or handed over.
#[test]
fn a_root_without_capabilities_gets_nothing_from_any_socket() {
    common::require_fixture_tools();
    common::require("setpriv", "util-linux");
    common::require("python3", "python3");
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let before = m.status();
    let takeover = nvlibfs::control::takeover_path(&m.state_dir, &m.mountpoint);
    let protocol = builds::protocol_version().to_string();
    let wrappers: [&[&str]; 2] = [
        &["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--"],
        &["unshare", "--user", "--map-root-user", "--"],
    ];
    for wrapper in wrappers {
        let out = Command::new(wrapper[0])
            .args(&wrapper[1..])
            .args(["python3", "-c", OFFER])
            .arg(&takeover)
            .arg(&protocol)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.starts_with("X 0 refused:"),
            "{wrapper:?} got: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let now = m.status();
        assert_eq!(now.frozen_s, None, "{wrapper:?} froze the server");
        assert_eq!((now.pid, now.supervisor_pid), (before.pid, before.supervisor_pid));

        let out = Command::new(wrapper[0])
            .args(&wrapper[1..])
            .arg(env!("CARGO_BIN_EXE_nvlibfs"))
            .args(["status", "--format", "json", "--state-dir"])
            .arg(&m.state_dir)
            .arg(&m.mountpoint)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{wrapper:?} read the status: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains("CAP_SYS_ADMIN"), "{wrapper:?}: {err}");
    }
    // The daemon's own kind still gets both.
    assert_eq!(m.status().pid, before.pid);
}

/// An offer on a socket whose connecting process has ended (it connected
/// in a child that exited, and the parent holds the socket): the daemon
/// can read nothing about that process, and must refuse it. It used to
/// take it for a peer of another PID namespace and challenge it, which
/// holds the one thread answering takeovers (and, on the status socket,
/// the one answering status) for 5 s per connection: a root without
/// CAP_SYS_ADMIN holding a few such connections kept `nvlibfs status`
/// failing and `--take-over` waiting for as long as it liked. The
/// supervisor, which accepts, is stopped until the child has ended: it
/// judges a peer on accept, and a live child would be refused for its
/// capabilities instead.
#[test]
fn an_offer_from_a_process_that_ended_is_refused_not_challenged() {
    common::require_fixture_tools();
    common::require("setpriv", "util-linux");
    common::require("python3", "python3");
    const ENDED: &str = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
pid = os.fork()
if pid == 0:
    s.connect(sys.argv[1])
    os._exit(0)
os.waitpid(pid, 0)
print("ended", flush=True)
s.settimeout(10)
try:
    s.send(b"O" + json.dumps({"protocol": int(sys.argv[2]), "version": "0.1.0", "pid": os.getpid()}).encode())
except BrokenPipeError:
    pass  # refused on sight, before the offer went out: the refusal is still queued
msg = s.recv(65536)
print(chr(msg[0]) if msg else "EOF", msg[1:200].decode(errors="replace"))
"#;
    /// Continues the stopped supervisor however the test goes on.
    struct Stopped(nix::unistd::Pid);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::SIGCONT);
        }
    }
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let before = m.status();
    let takeover = nvlibfs::control::takeover_path(&m.state_dir, &m.mountpoint);
    let supervisor = nix::unistd::Pid::from_raw(before.supervisor_pid.unwrap() as i32);
    nix::sys::signal::kill(supervisor, nix::sys::signal::SIGSTOP).unwrap();
    let stopped = Stopped(supervisor);
    let mut offer = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-all",
            "--inh-caps",
            "-all",
            "--",
            "python3",
            "-c",
            ENDED,
        ])
        .arg(&takeover)
        .arg(builds::protocol_version().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut stdout = std::io::BufReader::new(offer.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut said).unwrap();
    assert_eq!(said, "ended\n", "the connecting child did not end");
    drop(stopped);
    said.clear();
    std::io::Read::read_to_string(&mut stdout, &mut said).unwrap();
    assert!(offer.wait().unwrap().success());
    assert!(
        said.starts_with("X refused:") && said.contains("has ended"),
        "got: {said}"
    );
    let now = m.status();
    assert_eq!((now.pid, now.supervisor_pid), (before.pid, before.supervisor_pid));
}

/// The daemon taking over loses its server while ours drains (stalled
/// there): it waits for the drain, then a successor of its own serves;
/// ours exits. And the daemon taking over killed whole while ours drains:
/// ours takes the mount back.
#[test]
fn a_takeover_that_loses_a_process_while_the_other_drains_leaves_one_daemon_serving() {
    common::require_fixture_tools();
    let binaries = binaries();
    for kill_whole_daemon in [false, true] {
        let scene = Scene::new(&binaries, false);
        let first = scene.m.status();
        let original = first.supervisor_pid.unwrap();
        let loader = loaders::start(&scene.m, 0, Bind::Private, 9000);
        scene.arm("server-drain", &format!("sleep({})", STEP_LIMIT_MS));
        let mut joiner = scene.take_over().stdout(std::process::Stdio::null()).spawn().unwrap();
        wait_for_file(&scene, "server-drain");
        let joining = supervisors(&scene.m.mountpoint)
            .into_iter()
            .find(|&p| p != original)
            .expect("the joining supervisor");
        let victim = if kill_whole_daemon {
            joining
        } else {
            servers(&scene.m.mountpoint)
                .into_iter()
                .find(|&p| parent(p) == joining)
                .expect("the joining daemon's server")
        };
        // SAFETY: kills a process this test started.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let _ = joiner.wait();
        assert_settles(&scene, &by_hand("server-drain"));
        let now = scene.m.status();
        let expected = if kill_whole_daemon { original } else { joining };
        assert_eq!(now.supervisor_pid, Some(expected), "{}", scene.log());
        let outcome = loaders::finish(loader);
        assert_eq!(outcome.report.failed, 0, "{}", outcome.text);
    }
}

fn parent(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn wait_for_file(scene: &Scene, point: &str) {
    common::wait_for(&format!("{point} to be reached"), || scene.fired(point));
}

/// A takeover step that is slow but within the step limit (a big state
/// to restore, a drain that waits on a slow request): the takeover
/// completes. The running daemon's reader of the other daemon used to
/// keep the 5 s receive timeout of the offer, took 5 s of silence for
/// the other daemon going away, and gave the takeover up (or, while its
/// server drained, took the mount back), although the step limit (20 s
/// in releases; 12 s here) had not run out.
#[test]
fn a_takeover_step_within_the_step_limit_is_waited_for() {
    common::require_fixture_tools();
    let binaries = binaries();
    for point in ["server-restore", "server-drain"] {
        let scene = Scene::with_step_limit(&binaries, false, 12_000);
        let before = scene.m.status();
        scene.arm(point, "sleep(7000)");
        let out = scene.take_over().output().unwrap();
        assert!(scene.fired(point));
        assert!(
            out.status.success(),
            "{point}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            scene.log()
        );
        assert_settles(&scene, &by_hand(point));
        assert_ne!(
            scene.m.status().supervisor_pid,
            before.supervisor_pid,
            "{point}: {}",
            scene.log()
        );
    }
}

/// The supervisor answers a checkpoint only after the server gave up on it
/// (a re-pin to another module version): the next checkpoint takes a new
/// number and sends everything again, the re-pin happens, and a successor
/// after a crash serves the module's version, byte for byte.
#[test]
fn a_checkpoint_answered_late_takes_no_number_twice() {
    common::require_fixture_tools();
    let binaries = binaries();
    let scene = Scene::new(&binaries, false);
    // Longer than the server's 10 s wait for an answer.
    scene.arm("supervisor-checkpoint-ack", "sleep(11000)");
    std::fs::write(scene.m.fixture.module_version_file(), format!("{OTHER}\n")).unwrap();
    wait_for_file(&scene, "supervisor-checkpoint-ack");
    assert_settles(&scene, &by_hand("supervisor-checkpoint-ack"));
    // SAFETY: kills the server this test started.
    unsafe { libc::kill(scene.m.status().pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    assert_settles(&scene, &by_hand("supervisor-checkpoint-ack"));
    let log = scene.log();
    assert!(!log.contains("refused checkpoint"), "{log}");
    assert_eq!(scene.m.status().driver_version, OTHER);
}

/// A daemon taking over fails right after the lock was handed on: the
/// serving daemon keeps its lock (a plain mount is refused), its lock file
/// and its status socket.
#[test]
fn a_takeover_refused_after_the_lock_was_handed_on_takes_nothing_away() {
    common::require_fixture_tools();
    let binaries = binaries();
    let scene = Scene::new(&binaries, false);
    let before = scene.m.status();
    scene.arm("join-lock", "return(error)");
    let out = scene.take_over().output().unwrap();
    assert!(!out.status.success());
    assert!(scene.fired("join-lock"));
    assert_settles(&scene, &by_hand("join-lock"));
    assert_eq!(scene.m.status().supervisor_pid, before.supervisor_pid);
    assert!(nvlibfs::control::lock_path(&scene.m.state_dir, &scene.m.mountpoint).exists());
    let out = mount_command(&scene.m.fixture, &scene.m.state_dir)
        .arg(&scene.m.mountpoint)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already served"), "{err}");
    assert_eq!(scene.m.status().pid, before.pid);
}

/// A restart's new server fails after it would have bound the status
/// socket: the server that goes on still answers `nvlibfs status`.
#[test]
fn a_successor_that_fails_leaves_status_answering() {
    common::require_fixture_tools();
    let binaries = binaries();
    let scene = Scene::new(&binaries, false);
    let before = scene.m.status();
    scene.arm("server-ready", "return(error)");
    let out = scene.restart();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_settles(&scene, &by_hand("server-ready"));
    assert_eq!(scene.m.status().pid, before.pid);
}

/// A re-pin's scan outlasts the step limit while a restart waits to
/// freeze: the restart is given up, and the server, which would have
/// frozen once the scan ended, is not left frozen: the re-pin happens and
/// status shows no freeze.
#[test]
fn a_freeze_that_times_out_leaves_no_server_frozen() {
    common::require_fixture_tools();
    let binaries = binaries();
    let scene = Scene::new(&binaries, false);
    scene.arm("server-repin", &format!("sleep({})", 2 * STEP_LIMIT_MS));
    std::fs::write(scene.m.fixture.module_version_file(), format!("{OTHER}\n")).unwrap();
    wait_for_file(&scene, "server-repin");
    let out = scene.restart();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("freeze step"), "{said}");
    assert_settles(&scene, &by_hand("server-repin"));
    let log = scene.log();
    assert!(log.contains("not freezing") || log.contains("thawing"), "{log}");
}

/// The state directory must be root's and writable by nobody else, and
/// nothing in it is opened through a symbolic link: a link planted at the
/// lock's path or the log's is refused, naming it, and its target is left
/// as it was.
#[test]
fn state_files_are_never_opened_through_symbolic_links() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let mountpoint = dir.path().join("mnt");
    let target = dir.path().join("target");
    std::fs::write(&target, "untouched").unwrap();

    let open = dir.path().join("open-state");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = mount_command(&fixture, &open).arg(&mountpoint).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("others may write"), "{err}");

    let state = dir.path().join("state");
    let lock = nvlibfs::control::lock_path(&state, &mountpoint);
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let out = mount_command(&fixture, &state).arg(&mountpoint).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    std::fs::remove_file(&lock).unwrap();

    let log = nvlibfs::control::log_path(&state, &mountpoint);
    std::os::unix::fs::symlink(&target, &log).unwrap();
    let out = mount_command(&fixture, &state).arg(&mountpoint).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let _unmount = common::UnmountOnDrop(mountpoint.clone(), state.clone());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched", "{err}");

    // A FIFO nobody reads at the log's path: refused, naming it, where
    // the open used to wait for a reader for ever.
    let other = dir.path().join("mnt-fifo");
    let fifo_log = nvlibfs::control::log_path(&state, &other);
    nix::unistd::mkfifo(&fifo_log, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut mount = mount_command(&fixture, &state)
        .arg(&other)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ended = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended.is_none() && Instant::now() < deadline {
        ended = mount.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    if ended.is_none() {
        let _ = mount.kill();
    }
    let out = mount.wait_with_output().unwrap();
    let _unmount_other = common::UnmountOnDrop(other.clone(), state.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        ended.is_some(),
        "a FIFO at the log's path held the mount for 60 s: {err}"
    );
    assert!(
        !out.status.success() && err.contains("not a regular file") && err.contains(&*fifo_log.to_string_lossy()),
        "{err}"
    );
}

/// A fault nothing survives: the kernel aborting the connection. The
/// daemon says so, naming what to do, and ends, rather than start servers
/// that cannot answer or hang.
#[test]
fn an_aborted_connection_ends_the_daemon_with_a_clear_error() {
    common::require_fixture_tools();
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let supervisor = m.status().supervisor_pid.expect("a supervisor");
    let live = m.mountpoint.join(".live");
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&live).unwrap());
    let connections = Path::new("/sys/fs/fuse/connections");
    if !connections.join("1").exists() && std::fs::read_dir(connections).map_or(true, |mut d| d.next().is_none()) {
        common::ok(
            Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(connections)
                .output()
                .unwrap(),
            "mounting fusectl",
        );
    }
    let minor = nix::sys::stat::minor(dev);
    std::fs::write(connections.join(minor.to_string()).join("abort"), "1").unwrap();
    let started = Instant::now();
    common::wait_for("the supervisor to end", || {
        !nvlibfs::control::process_running(supervisor)
    });
    let log = std::fs::read_to_string(nvlibfs::control::log_path(&m.state_dir, &m.mountpoint)).unwrap();
    assert!(
        log.contains("the kernel ended the FUSE connection") && log.contains("nvlibfs umount"),
        "{log}"
    );
    eprintln!(
        "the daemon ended {:.1} s after the abort",
        started.elapsed().as_secs_f64()
    );
}
