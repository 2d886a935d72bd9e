//! `nvlibfs check`: is this host's driver consistent, and what is nvlibfs
//! serving? A diagnosis for humans, with what to do about each problem.

use crate::{command_line, shell_words};
use clap::Args;
use nvlibfs::args::DriverArgs;
use nvlibfs::control::{self, Status};
use nvlibfs::pin::{DriverVersion, PROCFS_VERSION, SYSFS_VERSION};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    driver: DriverArgs,

    /// The nvlibfs mount to ask about
    #[arg(long, value_name = "DIR", default_value = "/run/nvlibs")]
    mountpoint: PathBuf,

    /// Where the daemon keeps its control socket: the --state-dir it was
    /// mounted with
    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Prints the diagnosis; Ok(false) when something needs doing.
/// `driver_flags_given`: whether any driver flag was on the command line
/// (rather than left at its default).
pub fn check(args: CheckArgs, driver_flags_given: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let mut healthy = true;
    let mut advise = |text: String| {
        healthy = false;
        println!("  -> {text}");
    };

    let mountpoint = std::fs::canonicalize(&args.mountpoint).unwrap_or(args.mountpoint.clone());
    let answer = control::query(&args.state_dir, &mountpoint);
    // The daemon knows which driver it serves: diagnose that one unless
    // told otherwise, so `nvlibfs check` needs no flags repeated.
    let daemon_driver = answer.as_ref().ok().filter(|_| !driver_flags_given).and_then(driver_of);
    let driver = daemon_driver.clone().unwrap_or_else(|| args.driver.clone());
    // What to pass to any command suggested below to act on the same driver
    // and daemon.
    let mut flags = driver_flags(&driver);
    if args.state_dir != Path::new(control::DEFAULT_STATE_DIR) {
        flags.extend(["--state-dir".into(), args.state_dir.clone().into()]);
    }
    if answer
        .as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        && !driver_flags_given
    {
        println!("Driver flags    the daemon's are unknown (only root may ask it): checking the defaults");
    }
    if daemon_driver.is_some() {
        println!(
            "Driver flags    {} (as the daemon runs; give driver flags to check another driver)",
            match driver_flags(&driver) {
                none if none.is_empty() => "none: the defaults".to_owned(),
                some => shell_words(some),
            }
        );
    }

    // The host's side; without it (no module found) the daemon's side is
    // still worth telling.
    let plan = match driver.plan() {
        Ok(plan) => Some(plan),
        Err(e) => {
            println!("Loaded module   none found: {e}");
            advise("load the NVIDIA kernel module (modprobe nvidia), or pin a version with --driver-version".into());
            None
        }
    };
    let pinned = plan.as_ref().map(|plan| plan.view.pin().version.clone());
    if let (Some(plan), Some(pinned)) = (&plan, &pinned) {
        println!("Loaded module   {pinned} (from {})", plan.view.pin().source);

        let on_disk = plan.versions_on_disk();
        let listed: Vec<&str> = on_disk.iter().map(DriverVersion::as_str).collect();
        println!(
            "On disk         {} (under {})",
            if listed.is_empty() {
                "no driver libraries".to_owned()
            } else {
                listed.join(", ")
            },
            driver.driver_root.display()
        );
        let newer: Vec<&str> = on_disk
            .iter()
            .filter(|v| v.components() > pinned.components())
            .map(DriverVersion::as_str)
            .collect();
        let older: Vec<&str> = on_disk
            .iter()
            .filter(|v| v.components() < pinned.components())
            .map(DriverVersion::as_str)
            .collect();
        if !newer.is_empty() {
            println!(
                "                newer on disk ({}): an upgrade waiting for a reboot or module reload; tools \
                 that read the disk report 'Driver/library version mismatch' until then",
                newer.join(", ")
            );
        }
        if !older.is_empty() {
            println!(
                "                older versions left on disk ({}): never served",
                older.join(", ")
            );
        }

        let holds_pinned = answer
            .as_ref()
            .is_ok_and(|s| s.driver_version == pinned.as_str() && s.pin_problem.is_none() && s.files > 0);
        if !on_disk.contains(pinned) {
            if holds_pinned {
                println!(
                    "                the loaded module's libraries ({pinned}) are gone from disk; nvlibfs holds \
                     its pinned copies and keeps serving them. Do not restart nvlibfs before a reboot or module \
                     reload: a new daemon could not find them"
                );
            } else {
                advise(format!(
                    "the loaded module's libraries ({pinned}) are not on disk: install that driver version's \
                     user-space package, or reboot into the version on disk"
                ));
            }
        }
    }
    let with = |sub: &str, flags: &[OsString]| {
        let mut words: Vec<OsString> = vec![sub.into()];
        words.extend(flags.iter().cloned());
        words.push(mountpoint.clone().into());
        command_line(words)
    };
    match &answer {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // Not "not serving": we may simply not ask.
            println!("nvlibfs         {e}");
            advise(format!(
                "run it as root: sudo {}",
                command_line(std::env::args_os().skip(1))
            ));
        }
        Err(e) => {
            println!("nvlibfs         {e}");
            advise(format!("start it: {}", with("mount", &flags)));
        }
        Ok(s) => {
            println!(
                "nvlibfs         serving {} at {} (generation {}, {} files, {}; {})",
                s.driver_version,
                s.mountpoint.display(),
                s.generation,
                s.files,
                s.data_path,
                s.pids()
            );
            if s.held_files_replaced_on_disk > 0 {
                println!(
                    "                {} served files were replaced on disk; nvlibfs holds the pinned copies, so \
                     containers keep matching the loaded module",
                    s.held_files_replaced_on_disk
                );
            }
            let log = control::log_path(&args.state_dir, &mountpoint);
            if let Some(problem) = &s.pin_problem {
                advise(format!(
                    "the daemon reports: {problem} (details: {}; its log: {})",
                    with("status", &state_dir_flag(&args.state_dir)),
                    log.display()
                ));
            } else if let Some(pinned) = pinned.as_ref().filter(|p| s.driver_version != p.as_str()) {
                advise(format!(
                    "the daemon serves {} but the module is {pinned}; it re-pins within a second or two of a \
                     module change: if this persists, see its log ({}), or restart it: {} && {}",
                    s.driver_version,
                    log.display(),
                    with("umount", &state_dir_flag(&args.state_dir)),
                    with("mount", &flags)
                ));
            }
        }
    }
    if healthy {
        println!("OK: containers using the view get the loaded module's own libraries.");
    }
    Ok(healthy)
}

/// The driver flags a running daemon was started with, from its status;
/// None while it is still starting (it has not said yet).
fn driver_of(s: &Status) -> Option<DriverArgs> {
    if s.version_source.is_empty() || s.driver_root.as_os_str().is_empty() {
        return None;
    }
    let (module_version_file, driver_version) = match s.version_source.as_str() {
        "--driver-version" => (None, Some(s.driver_version.clone())),
        // The loaded module's own files: what the daemon reads by default.
        SYSFS_VERSION | PROCFS_VERSION => (None, None),
        file => (Some(PathBuf::from(file)), None),
    };
    Some(DriverArgs {
        driver_root: s.driver_root.clone(),
        module_version_file,
        driver_version,
    })
}

/// `driver`'s flags that differ from the defaults, as command-line words.
fn driver_flags(driver: &DriverArgs) -> Vec<OsString> {
    let mut words = driver.to_args();
    // to_args() always names the driver root; "/" is the default.
    if driver.driver_root == Path::new("/") {
        words.drain(..2);
    }
    words
}

fn state_dir_flag(state_dir: &Path) -> Vec<OsString> {
    if state_dir == Path::new(control::DEFAULT_STATE_DIR) {
        Vec::new()
    } else {
        vec!["--state-dir".into(), state_dir.into()]
    }
}
