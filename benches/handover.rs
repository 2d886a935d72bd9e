//! How long requests wait when the FUSE connection passes to a new
//! serving process, for each kind of event, on both data paths:
//!
//!   cargo bench --bench handover [-- --events N] [--out DIR]
//!
//! Events: SIGKILL of the serving process (the supervisor starts another,
//! which takes over), `nvlibfs restart` (an upgrade: the old server
//! answers until the new one does, then drains), and `nvlibfs mount
//! --take-over` (another daemon, in a process tree of its own, takes the
//! mount over the same way, as a DaemonSet's new pod does). For each, the
//! supervisor's measure (from when it saw the old server end to the new
//! one answering) and what a loader looping through the view the whole
//! time saw: failed loads and its slowest single load.
//! Fixture driver; writes a markdown table (`--out`, default
//! benches/results).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut events = 20usize;
    let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/results"));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--events" => events = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--out" => out = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--bench" => {}
            _ => usage(),
        }
    }
    let nvlibfs = common::nvlibfs_near_bench().unwrap_or_else(|| usage());
    let mut rows = Vec::new();
    for (path, extra) in [("passthrough", &[][..]), ("cached", &["--no-passthrough"][..])] {
        for kind in [
            "SIGKILL of the server",
            "nvlibfs restart",
            "another daemon's --take-over",
        ] {
            eprintln!("handover: {path}, {kind} x{events}");
            rows.push((path, kind, measure(&nvlibfs, extra, kind, events)));
        }
    }
    let mut report = String::from("# Handovers: how long requests wait\n\n");
    report.push_str(&format!(
        "- Machine: {} cores, kernel {}; fixture driver; {events} events of each kind per data path\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));
    report.push_str(
        "- waited: how long requests had nobody to answer them, as the supervisor measures it: from a \
         server's death to its successor answering; 0 for a restart or a takeover, where the old server \
         answers until the new one does and then drains\n\
         - loader: one process loading libcuda about every millisecond through the view the whole time; \
         its slowest load bounds what a request saw\n\n\
         | data path | event | waited p50 (ms) | p99 | max | loader's failed loads | loader's slowest load (ms) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (path, kind, m) in &rows {
        report.push_str(&format!(
            "| {path} | {kind} | {:.1} | {:.1} | {:.1} | {} of {} | {:.1} |\n",
            quantile(&m.waited, 0.5),
            quantile(&m.waited, 0.99),
            quantile(&m.waited, 1.0),
            m.failed,
            m.loads,
            m.slowest_ms
        ));
    }
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("handover.md"), &report).unwrap();
    print!("{report}");
}

fn usage() -> ! {
    eprintln!("usage: handover [--events N] [--out DIR] (needs root, and nvlibfs built beside the bench)");
    std::process::exit(2);
}

struct Measured {
    waited: Vec<f64>,
    loads: u64,
    failed: u64,
    slowest_ms: f64,
}

fn measure(nvlibfs: &Path, extra: &[&str], kind: &str, events: usize) -> Measured {
    let work = tempfile::tempdir().unwrap();
    let fixture = nvlibfs_fixture::build(
        &nvlibfs_fixture::FixtureSpec::new("580.159.04"),
        &work.path().join("host"),
    )
    .expect("fixture builds");
    let loader = nvlibfs_fixture::build_loader(work.path()).expect("loader builds");
    let (mnt, state) = (work.path().join("mnt"), work.path().join("state"));
    common::mount_fixture(nvlibfs, &fixture, &state, &mnt, extra);
    let mnt = std::fs::canonicalize(&mnt).unwrap();
    let query = || nvlibfs::control::query(&state, &mnt);
    // Long enough for every event; it stops by itself.
    let budget_ms = 2000 + events as u64 * 900;
    let looping = Command::new(&loader)
        .args(["--loop", &budget_ms.to_string()])
        .arg(mnt.join("lib64/libcuda.so.1"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for n in 1..=events {
        let pid = query().unwrap().pid;
        if kind.starts_with("SIGKILL") {
            // SAFETY: signals the server this bench started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        } else if kind.contains("take-over") {
            let mut flags = extra.to_vec();
            flags.push("--take-over");
            common::mount_fixture(nvlibfs, &fixture, &state, &mnt, &flags);
        } else {
            let ok = Command::new(nvlibfs)
                .args(["restart", "--state-dir"])
                .arg(&state)
                .arg(&mnt)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(ok.success(), "nvlibfs restart failed");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !query().is_ok_and(|s| s.handovers.len() == n) {
            assert!(Instant::now() < deadline, "handover {n} did not happen");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Past the supervisor's early-death window (a server killed
        // sooner counts towards giving up).
        std::thread::sleep(Duration::from_millis(600));
    }
    let waited = query().unwrap().handovers.iter().map(|h| h.waited_ms).collect();
    let out = looping.wait_with_output().unwrap();
    let report = nvlibfs_fixture::LoopReport::parse(&String::from_utf8_lossy(&out.stdout));
    let _ = Command::new(nvlibfs)
        .args(["umount", "--state-dir"])
        .arg(&state)
        .arg(&mnt)
        .status();
    Measured {
        waited,
        loads: report.ok,
        failed: report.failed,
        slowest_ms: report.slowest_ms,
    }
}

/// The `q` quantile (nearest rank) of `values`.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}
