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
}

impl Scene {
    fn new(binaries: &Binaries, cached: bool) -> Scene {
        let failpoints = tempfile::tempdir().unwrap();
        // Each scene its own copy: a refused restart installs another build.
        let bin = failpoints.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for name in ["nvlibfs", "nvlibfs-mountd"] {
            std::fs::copy(binaries.bin.join(name), bin.join(name)).unwrap();
        }
        let extra: &[&str] = if cached { &["--no-passthrough"] } else { &[] };
        let m = Mounted::with_env(
            FixtureSpec::new(VERSION),
            extra,
            Some(&bin),
            &[
                ("NVLIBFS_FAILPOINTS", failpoints.path().as_os_str()),
                ("NVLIBFS_STEP_LIMIT_MS", STEP_LIMIT_MS.to_string().as_ref()),
            ],
        );
        Scene { m, failpoints, bin }
    }

    /// The command that takes this scene's mount over, as a new daemon.
    fn take_over(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("nvlibfs"));
        cmd.args(mount_command(&self.m.fixture, &self.m.state_dir).get_args())
            .arg("--take-over")
            .arg(&self.m.mountpoint)
            .env("NVLIBFS_FAILPOINTS", self.failpoints.path())
            .env("NVLIBFS_STEP_LIMIT_MS", STEP_LIMIT_MS.to_string());
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

/// What must hold once a fault is over; `Err` names what does not.
fn settled(scene: &Scene) -> Result<(), String> {
    let m = &scene.m;
    let status = nvlibfs::control::query(&m.state_dir, &m.mountpoint).map_err(|e| format!("status: {e}"))?;
    let supervisor = status.supervisor_pid.ok_or("status names no supervisor")?;
    let supervisors = supervisors(&m.mountpoint);
    if supervisors != [supervisor] {
        return Err(format!("supervisors {supervisors:?}, status says {supervisor}"));
    }
    let servers = servers(&m.mountpoint);
    if servers != [status.pid] {
        return Err(format!("servers {servers:?}, status says {}", status.pid));
    }
    if let Some(frozen) = status.frozen_s {
        return Err(format!("the server is frozen ({frozen:.1} s)"));
    }
    if !lock_held(m) {
        return Err("nobody holds the lock".into());
    }
    Ok(())
}

/// Every file of the view reads the bytes of its host file, from disk.
fn exact_bytes(m: &Mounted) -> Result<(), String> {
    drop_caches();
    for lib in &m.fixture.libraries {
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
        last = settled(scene);
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
