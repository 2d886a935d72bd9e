//! `nvlibfs check`: is this host's driver consistent, and what is nvlibfs
//! serving? A diagnosis for humans, with what to do about each problem.

use clap::Args;
use nvlibfs::args::DriverArgs;
use nvlibfs::control;
use nvlibfs::pin::DriverVersion;
use nvlibfs::reason::Reason;
use std::collections::BTreeSet;
use std::path::PathBuf;

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    driver: DriverArgs,

    /// The nvlibfs mount to ask about
    #[arg(long, value_name = "DIR", default_value = "/run/nvlibs")]
    mountpoint: PathBuf,

    #[arg(long, value_name = "DIR", default_value = control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Prints the diagnosis; Ok(false) when something needs doing.
pub fn check(args: CheckArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let mut healthy = true;
    let mut advise = |text: String| {
        healthy = false;
        println!("  -> {text}");
    };

    let plan = match args.driver.plan() {
        Ok(plan) => plan,
        Err(e) => {
            println!("Loaded module   none found: {e}");
            advise("load the NVIDIA kernel module (modprobe nvidia), or pin a version with --driver-version".into());
            return Ok(false);
        }
    };
    let pinned = plan.view.pin().version.clone();
    println!("Loaded module   {pinned} (from {})", plan.view.pin().source);

    let mut on_disk: BTreeSet<DriverVersion> = plan
        .rejected
        .iter()
        .filter_map(|r| match &r.reason {
            Reason::OtherVersion { found } if is_library(&r.source) => DriverVersion::parse(found),
            _ => None,
        })
        .collect();
    if plan.view.has_driver_libraries() {
        on_disk.insert(pinned.clone());
    }
    let listed: Vec<String> = on_disk.iter().map(|v| v.to_string()).collect();
    println!(
        "On disk         {} (under {})",
        if listed.is_empty() {
            "no driver libraries".to_owned()
        } else {
            listed.join(", ")
        },
        args.driver.driver_root.display()
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

    let mountpoint = std::fs::canonicalize(&args.mountpoint).unwrap_or(args.mountpoint.clone());
    let status = control::query(&args.state_dir, &mountpoint).ok();
    let holds_pinned = status
        .as_ref()
        .is_some_and(|s| s.driver_version == pinned.as_str() && s.pin_problem.is_none() && s.files > 0);
    if !on_disk.contains(&pinned) {
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
    match status {
        None => {
            println!("nvlibfs         not serving {}", mountpoint.display());
            advise(format!("start it: nvlibfs mount {}", mountpoint.display()));
        }
        Some(s) => {
            println!(
                "nvlibfs         serving {} at {} (generation {}, {} files, {}; daemon pid {})",
                s.driver_version,
                s.mountpoint.display(),
                s.generation,
                s.files,
                s.data_path,
                s.pid
            );
            if s.held_files_replaced_on_disk > 0 {
                println!(
                    "                {} served files were replaced on disk; nvlibfs holds the pinned copies, so \
                     containers keep matching the loaded module",
                    s.held_files_replaced_on_disk
                );
            }
            if let Some(problem) = &s.pin_problem {
                advise(format!("the daemon reports: {problem}"));
            } else if s.driver_version != pinned.as_str() {
                advise(format!(
                    "the daemon serves {} but the module is {pinned}; it re-pins within a second or two of a \
                     module change: if this persists, see its log",
                    s.driver_version
                ));
            }
        }
    }
    if healthy {
        println!("OK: containers using the view get the loaded module's own libraries.");
    }
    Ok(healthy)
}

fn is_library(source: &str) -> bool {
    source.rsplit('/').next().is_some_and(|name| name.starts_with("lib"))
}
