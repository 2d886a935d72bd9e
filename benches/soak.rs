//! Load on one mount: 64 processes loop dlopen, stat, readdir and readlink
//! through a fixture view for a while. Reports errors (the goal is zero),
//! per-operation latency percentiles, and the daemon's memory and open
//! descriptors before and after (the goal is no growth).
//!
//!   cargo bench --bench soak                  # 64 processes, 60 s
//!   cargo bench --bench soak -- --procs 16 --seconds 10

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const OPS: [&str; 4] = ["dlopen", "stat", "readdir", "readlink"];

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__worker") {
        return worker(Path::new(&args[2]), args[3].parse().unwrap(), args[4].parse().unwrap());
    }
    let mut procs = 64usize;
    let mut seconds = 60u64;
    let mut out = PathBuf::from("benches/results/soak.md");
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--procs" => procs = value().parse().unwrap_or_else(|_| usage("--procs takes a number")),
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage("--seconds takes a number")),
            "--out" => out = value().into(),
            "--bench" => {}
            other => usage(&format!("unknown argument {other}")),
        }
    }
    run(procs, seconds, &out);
}

fn usage(why: &str) -> ! {
    eprintln!("soak: {why}\nusage: soak [--procs N] [--seconds S] [--out FILE]");
    std::process::exit(2);
}

/// One process's loop; prints per-op latencies (ns) as "op ns" lines,
/// sampled 1 in 16, and errors as "error op what".
fn worker(mnt: &Path, seconds: u64, seed: u64) {
    let lib64 = mnt.join("lib64");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&lib64).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    let libs: Vec<&PathBuf> = entries.iter().filter(|p| !p.is_symlink() && p.is_file()).collect();
    let links: Vec<&PathBuf> = entries.iter().filter(|p| p.is_symlink()).collect();
    let mut state = seed | 1;
    let mut pick = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0u64;
    let mut lines = String::new();
    while Instant::now() < end {
        let op = (i % 4) as usize;
        let start = Instant::now();
        let result: Result<(), String> = match op {
            0 => {
                let lib = libs[pick(libs.len())];
                let name = CString::new(lib.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: loading and unloading a fixture library.
                unsafe {
                    let h = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                    if h.is_null() {
                        Err(std::ffi::CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned())
                    } else {
                        libc::dlclose(h);
                        Ok(())
                    }
                }
            }
            1 => std::fs::metadata(&entries[pick(entries.len())])
                .map(drop)
                .map_err(|e| e.to_string()),
            2 => std::fs::read_dir(&lib64)
                .map(|d| {
                    std::hint::black_box(d.count());
                })
                .map_err(|e| e.to_string()),
            _ => std::fs::read_link(links[pick(links.len())])
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        let ns = start.elapsed().as_nanos();
        match result {
            Err(e) => lines.push_str(&format!("error {} {e}\n", OPS[op])),
            Ok(()) if i % 16 < 4 => lines.push_str(&format!("{} {ns}\n", OPS[op])),
            Ok(()) => {}
        }
        i += 1;
    }
    lines.push_str(&format!("count {i}\n"));
    print!("{lines}");
}

fn daemon_numbers(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss_kb, fds)
}

fn run(procs: usize, seconds: u64, out: &Path) {
    let work = tempfile::tempdir().unwrap();
    let _ = std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let fixture = nvlibfs_fixture::build(
        &nvlibfs_fixture::FixtureSpec::new("580.159.04"),
        &work.path().join("host"),
    )
    .expect("fixture builds");
    let exe = std::env::current_exe().unwrap();
    let nvlibfs = common::nvlibfs_near_bench()
        .unwrap_or_else(|| usage("no nvlibfs binary near this bench; build the workspace first"));
    let mnt = work.path().join("mnt");
    let state = work.path().join("state");
    common::mount_fixture(&nvlibfs, &fixture, &state, &mnt, &[]);
    let pid = nvlibfs::control::query(&state, &std::fs::canonicalize(&mnt).unwrap())
        .unwrap()
        .pid;

    // Warm up, then take the daemon's numbers.
    let warm = Command::new(&exe)
        .arg("__worker")
        .arg(&mnt)
        .args(["1", "7"])
        .output()
        .unwrap();
    assert!(warm.status.success());
    let before = daemon_numbers(pid);
    let started = Instant::now();
    let children: Vec<_> = (0..procs)
        .map(|i| {
            Command::new(&exe)
                .arg("__worker")
                .arg(&mnt)
                .arg(seconds.to_string())
                .arg((i as u64 * 7919 + 1).to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); OPS.len()];
    let (mut errors, mut total) = (Vec::new(), 0u64);
    for child in children {
        let output = child.wait_with_output().unwrap();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
            match head {
                "error" => errors.push(rest.to_owned()),
                "count" => total += rest.parse::<u64>().unwrap_or(0),
                op => {
                    if let Some(i) = OPS.iter().position(|o| *o == op) {
                        samples[i].push(rest.parse().unwrap_or(0));
                    }
                }
            }
        }
    }
    let wall = started.elapsed();
    let after = daemon_numbers(pid);
    let _ = Command::new(&nvlibfs)
        .args(["umount", "--state-dir"])
        .arg(&state)
        .arg(&mnt)
        .status();

    let mut report = String::new();
    report.push_str("# Soak: many processes on one mount\n\n");
    report.push_str(&format!(
        "- {procs} processes for {seconds} s on {} (kernel {}), fixture driver, passthrough\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()).to_string() + " cores",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));
    report.push_str(&format!(
        "- {total} operations in {:.1} s ({:.0}/s), {} errors\n",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64(),
        errors.len()
    ));
    report.push_str(&format!(
        "- daemon RSS {} KiB before, {} KiB after; open descriptors {} before, {} after\n\n",
        before.0, after.0, before.1, after.1
    ));
    report.push_str("| operation | samples | p50 | p90 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|\n");
    for (i, op) in OPS.iter().enumerate() {
        let s = &mut samples[i];
        s.sort_unstable();
        if s.is_empty() {
            continue;
        }
        let p = |q: f64| s[((s.len() - 1) as f64 * q) as usize] as f64 / 1e3;
        report.push_str(&format!(
            "| {op} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |\n",
            s.len(),
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            *s.last().unwrap() as f64 / 1e3
        ));
    }
    if !errors.is_empty() {
        report.push_str(&format!("\nFirst errors: {:?}\n", &errors[..errors.len().min(10)]));
    }
    print!("{report}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(out, report).unwrap();
    eprintln!("soak: wrote {}", out.display());
}
