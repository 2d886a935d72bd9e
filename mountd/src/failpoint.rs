//! Failpoints: the steps of a restart and of a takeover, on both sides,
//! where tests kill a process, stall it past the step limit or make the
//! step fail (tests/failpoints.rs visits each with each fault). Compiled
//! in only with the `failpoints` feature (the `fail` crate's); without it
//! `hit` is nothing, and release builds carry none of it.
//!
//! A test arms a failpoint by writing `name=action` lines (fail's actions:
//! `return(kill)`, `return(error)`, `sleep(ms)`) into `armed` in the
//! directory that `NVLIBFS_FAILPOINTS` names, at any time: each step reads
//! it when it is reached, so a fault can wait until the mount is ready.
//! Each armed failpoint fires once across every process of the test (the
//! first to create `DIR/name.fired`), so that a successor started after the
//! fault does not meet it again, and the test can see the step was reached.

/// What makes a failpoint's step happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `nvlibfs restart` (SIGUSR2), on the daemon's side.
    Restart,
    /// A restart to a binary that refuses the state: the old server thaws.
    RefusedRestart,
    /// `--take-over`, on the side of the daemon taken over.
    TakenOver,
    /// `--take-over`, on the side of the daemon taking over.
    TakingOver,
    /// The loaded module changes version.
    ModuleChange,
}

/// Every failpoint, and what reaches it.
pub const STEPS: &[(&str, Trigger)] = &[
    ("restart-freeze", Trigger::Restart),
    ("server-freeze", Trigger::Restart),
    ("server-checkpoint-send", Trigger::Restart),
    ("supervisor-checkpoint-ack", Trigger::Restart),
    ("fdstore-save", Trigger::Restart),
    ("restart-prepare", Trigger::Restart),
    ("server-restore", Trigger::Restart),
    ("restart-go", Trigger::Restart),
    ("server-ready", Trigger::Restart),
    ("restart-drain", Trigger::Restart),
    ("server-drain", Trigger::Restart),
    ("server-drained", Trigger::Restart),
    ("restart-sole", Trigger::Restart),
    ("server-thaw", Trigger::RefusedRestart),
    ("server-repin", Trigger::ModuleChange),
    ("handover-offered", Trigger::TakenOver),
    ("handover-lock", Trigger::TakenOver),
    ("handover-replayed", Trigger::TakenOver),
    ("handover-drain", Trigger::TakenOver),
    ("handover-drained", Trigger::TakenOver),
    ("join-offer", Trigger::TakingOver),
    ("join-lock", Trigger::TakingOver),
    ("join-prepared", Trigger::TakingOver),
    ("join-ready", Trigger::TakingOver),
    ("join-sole", Trigger::TakingOver),
];

/// Reaches the step `name`: `Err` with a message where the failpoint says
/// `return(error)`; killed (SIGKILL) where it says `return(kill)`; after
/// the stall where it says `sleep(ms)`.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) -> Result<(), String> {
    debug_assert!(STEPS.iter().any(|(n, _)| *n == name), "failpoint {name} is not listed");
    let Some(dir) = std::env::var_os("NVLIBFS_FAILPOINTS").map(std::path::PathBuf::from) else {
        return Ok(());
    };
    let armed = std::fs::read_to_string(dir.join("armed")).unwrap_or_default();
    let Some(action) = armed
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
    else {
        return Ok(());
    };
    let first = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(format!("{name}.fired")));
    if first.is_err() {
        return Ok(());
    }
    tracing::warn!("failpoint {name} reached: {action}");
    fail::cfg(name, action)?;
    match fail::eval(name, |arg| arg) {
        Some(Some(arg)) if arg == "kill" => {
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            unreachable!("killed")
        }
        Some(arg) => Err(format!("failpoint {name}: {}", arg.unwrap_or_default())),
        None => Ok(()),
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) -> Result<(), String> {
    Ok(())
}

/// How long a step of a restart or takeover may take: `default`, or in a
/// failpoints build `NVLIBFS_STEP_LIMIT_MS`, so that the tests' stalls
/// outlast it in seconds, not minutes.
pub fn step_limit(default: std::time::Duration) -> std::time::Duration {
    #[cfg(feature = "failpoints")]
    if let Some(ms) = std::env::var("NVLIBFS_STEP_LIMIT_MS").ok().and_then(|v| v.parse().ok()) {
        return std::time::Duration::from_millis(ms);
    }
    default
}
