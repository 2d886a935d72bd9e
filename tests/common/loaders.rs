//! Loaders looping through the view from mount namespaces bound the way
//! containers bind it, recording every failed load and the slowest one.

use super::Mounted;
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

/// What a loader saw.
#[derive(Debug)]
pub struct Outcome {
    pub ok: u64,
    pub failed: u64,
    /// The slowest single load, in ms.
    pub slowest_ms: f64,
    /// When it first loaded again after each failure, in ns since the epoch.
    pub recovered_at: Vec<i128>,
    pub text: String,
}

pub fn finish(child: Child) -> Outcome {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "loader failed:\n{text}");
    let mut outcome = Outcome {
        ok: 0,
        failed: 0,
        slowest_ms: 0.0,
        recovered_at: Vec::new(),
        text: text.clone(),
    };
    let mut failing = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[0] {
            "ok" if failing => {
                outcome.recovered_at.push(words[1].parse().unwrap());
                failing = false;
            }
            "fail" => failing = true,
            "count" => {
                outcome.ok = words[1].parse().unwrap();
                outcome.failed = words[2].parse().unwrap();
                outcome.slowest_ms = words[3].parse::<f64>().unwrap() / 1e6;
            }
            _ => {}
        }
    }
    assert!(!failing, "a loader never loaded again:\n{text}");
    outcome
}
