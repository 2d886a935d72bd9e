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
/// is bound at another path.
pub fn start(m: &Mounted, i: usize, bind: Bind, ms: u64) -> Child {
    let target = m.dir.path().join(format!("container-{i}"));
    std::fs::create_dir_all(&target).unwrap();
    let propagation = match bind {
        Bind::Rslave => "--make-rslave",
        Bind::Private => "--make-rprivate",
    };
    let script = format!(
        "mount --rbind '{top}' '{t}' && mount {propagation} '{t}' && exec '{loader}' --loop {ms} '{t}/lib64/libcuda.so.1'",
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
    assert!(!report.failing_at_end, "a loader never loaded again:\n{text}");
    Outcome { report, text }
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
