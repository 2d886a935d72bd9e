//! Loaders looping through the view from mount namespaces bound the way
//! containers bind it, recording every failed load and the slowest one.

use super::Mounted;
use nvlibfs_fixture::LoopReport;
use std::process::{Child, Command, Stdio};

/// How a container got the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// `-v MOUNTPOINT:/usr/local/nvidia:ro,rslave`: later mounts under the
    /// mount point reach it.
    Rslave,
    /// `-v MOUNTPOINT:/usr/local/nvidia:ro`: docker's default, a recursive
    /// bind that is private; it keeps the mounts it was given.
    Private,
}

/// A loader looping for `ms` in its own mount namespace, where the view
/// is bound at another path; any version it loads counts as loaded.
pub fn start(m: &Mounted, i: usize, bind: Bind, ms: u64) -> Child {
    start_expecting(m, i, bind, ms, &[])
}

/// `start`, counting each load of a version not in `expect` (when not
/// empty) as a wrong load, which `finish` refuses.
pub fn start_expecting(m: &Mounted, i: usize, bind: Bind, ms: u64, expect: &[&str]) -> Child {
    let target = m.dir.path().join(format!("container-{i}"));
    std::fs::create_dir_all(&target).unwrap();
    let propagation = match bind {
        Bind::Rslave => "--make-rslave",
        Bind::Private => "--make-rprivate",
    };
    let expect = if expect.is_empty() {
        String::new()
    } else {
        format!("--expect '{}'", expect.join(","))
    };
    let script = format!(
        "mount --rbind '{top}' '{t}' && mount {propagation} '{t}' && exec '{loader}' --loop {ms} {expect} '{t}/lib64/libcuda.so.1'",
        top = m.mountpoint.display(),
        t = target.display(),
        loader = m.loader.display(),
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a loader saw, and its output for failure messages.
#[derive(Debug)]
pub struct Outcome {
    pub report: LoopReport,
    pub text: String,
}

pub fn finish(child: Child) -> Outcome {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "loader failed:\n{text}");
    let report = LoopReport::parse(&text);
    assert_eq!(
        report.wrong, 0,
        "a loader loaded a version not served then ({:?}):\n{text}",
        report.wrong_versions
    );
    assert!(!report.failing_at_end, "a loader never loaded again:\n{text}");
    Outcome { report, text }
}

/// Now, as the loaders' clock (CLOCK_REALTIME) reads it, in ns.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// That every loader was still loading after `ns` (the last event), and
/// that each load it began after it got `version`: the test's loaders ran
/// past what they were there to watch.
pub fn loaded_after(outcomes: &[Outcome], ns: i128, version: &str) {
    for (i, o) in outcomes.iter().enumerate() {
        let after = o.report.loads_after(ns);
        assert!(after > 0, "loader {i} made no load after the last event:\n{}", o.text);
        assert_eq!(
            o.report.version_after(ns),
            Some(version),
            "loader {i}: the loads after the last event:\n{}",
            o.text
        );
    }
}

/// All loaders together: loads, failed loads, the slowest load (ms).
pub fn totals(outcomes: &[Outcome]) -> (u64, u64, f64) {
    (
        outcomes.iter().map(|o| o.report.ok).sum(),
        outcomes.iter().map(|o| o.report.failed).sum(),
        outcomes.iter().map(|o| o.report.slowest_ms).fold(0.0, f64::max),
    )
}

/// The handovers a status lists, as "REASON WAITED ms, ...".
pub fn handovers(status: &nvlibfs::control::Status) -> String {
    status
        .handovers
        .iter()
        .map(|h| format!("{} {:.1} ms", h.reason, h.waited_ms))
        .collect::<Vec<_>>()
        .join(", ")
}
