//! Command-line arguments shared by `nvlibfs` and `nvlibfs-mountd`, so the
//! two binaries read the same flags the same way.

use crate::discover::KernelInfo;
use crate::pin::PinRequest;
use crate::{Plan, PlanError};
use clap::Args;
use std::ffi::OsString;
use std::path::PathBuf;

/// Which driver to serve: every command that builds a view takes these.
#[derive(Args, Clone, Debug)]
pub struct DriverArgs {
    /// Look for the driver's files under DIR instead of /. Links are
    /// followed inside DIR only; nothing outside it is ever served
    #[arg(long, value_name = "DIR", default_value = "/", help_heading = "Driver")]
    pub driver_root: PathBuf,

    /// Read the kernel module's version from FILE (sysfs or
    /// /proc/driver/nvidia/version format) instead of the running kernel's
    #[arg(
        long,
        value_name = "FILE",
        group = "pin",
        help_heading = "Version pin (default: the loaded module's)"
    )]
    pub module_version_file: Option<PathBuf>,

    /// Serve this driver version, whatever module is loaded
    #[arg(
        long,
        value_name = "VERSION",
        group = "pin",
        help_heading = "Version pin (default: the loaded module's)"
    )]
    pub driver_version: Option<String>,
}

impl DriverArgs {
    pub fn pin_request(&self) -> PinRequest {
        match (&self.module_version_file, &self.driver_version) {
            (Some(file), _) => PinRequest::ModuleFile(file.clone()),
            (None, Some(version)) => PinRequest::Version(version.clone()),
            (None, None) => PinRequest::LoadedModule,
        }
    }

    pub fn plan(&self) -> Result<Plan, PlanError> {
        crate::plan(&self.driver_root, &self.pin_request(), &KernelInfo::running())
    }

    /// The same flags as arguments, for handing to another process.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = vec!["--driver-root".into(), self.driver_root.clone().into()];
        if let Some(f) = &self.module_version_file {
            args.extend(["--module-version-file".into(), f.clone().into()]);
        }
        if let Some(v) = &self.driver_version {
            args.extend(["--driver-version".into(), v.into()]);
        }
        args
    }
}

/// How the daemon serves a view.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Serve reads through the daemon and the page cache instead of FUSE
    /// passthrough (for kernels or privileges without it)
    #[arg(long, help_heading = "Serving")]
    pub no_passthrough: bool,

    /// Threads answering FUSE requests [default: one per CPU, at least 4
    /// and at most 16]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256), help_heading = "Serving")]
    pub threads: Option<u16>,

    /// Where the daemon puts its control socket (for `nvlibfs status`)
    #[arg(long, value_name = "DIR", default_value = crate::control::DEFAULT_STATE_DIR, help_heading = "Serving")]
    pub state_dir: PathBuf,

    /// Readahead of the mount, in KiB: how much the kernel asks the
    /// daemon for around each page a process faults in or reads, on the
    /// cached path (--no-passthrough, or a kernel without passthrough).
    /// Larger means fewer, bigger requests served in parallel, so a whole
    /// file is faulted in sooner, but every first fault waits for more
    /// (128 is the kernel's own)
    #[arg(long, value_name = "KIB", default_value_t = 128, value_parser = clap::value_parser!(u32).range(4..=1048576), help_heading = "Serving")]
    pub readahead_kb: u32,

    /// On the cached path, the libraries the daemon puts into the kernel's
    /// page cache before the mount is ready (and after each re-pin), so
    /// that the first process to load them finds them there instead of
    /// waiting for a READ per readahead window: names up to `.so`
    /// (libcuda, libnvidia-ptxjitcompiler), comma-separated, or `none`.
    /// Costs their size in page cache, which the kernel reclaims like any
    /// other
    #[arg(long, value_name = "LIBS", value_delimiter = ',', default_value = "libcuda,libnvidia-ml", value_parser = warm_name, help_heading = "Serving")]
    pub warm: Vec<String>,

    /// Where the NVIDIA device nodes are, for the CDI spec the view
    /// carries (etc/cdi/nvlibfs.json): it lists those found here, as
    /// /dev/NAME, and follows them as they come and go
    #[arg(long, value_name = "DIR", default_value = "/dev", help_heading = "Serving")]
    pub dev: PathBuf,

    /// Keep running with every capability if dropping the unneeded ones
    /// fails (by default the daemon stops: it never serves with more
    /// privilege than it says)
    #[arg(long, help_heading = "Serving")]
    pub keep_privileges: bool,

    /// Act as on a kernel without FUSE_NOTIFY_RESEND (before Linux 6.9):
    /// for tests of what a handover guarantees there
    #[arg(long, hide = true)]
    pub no_resend: bool,
}

impl ServeArgs {
    /// On the cached path the kernel sends a readahead window's READs at
    /// once; with more threads than CPUs they only wait for each other
    /// (measured: 16 threads on 2 CPUs took 45-52 ms to fault in 100 MiB
    /// where 4 took 35-39 ms; on 16 CPUs 16 threads took 20 ms, 4 took 26).
    pub fn threads(&self) -> u16 {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
            cpus.clamp(4, 16) as u16
        })
    }

    /// The libraries `--warm` names; empty for `none`.
    pub fn warm_libraries(&self) -> Vec<&str> {
        self.warm.iter().map(String::as_str).filter(|&n| n != "none").collect()
    }

    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = vec![
            "--threads".into(),
            self.threads().to_string().into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--dev".into(),
            self.dev.clone().into(),
            "--readahead-kb".into(),
            self.readahead_kb.to_string().into(),
            "--warm".into(),
            self.warm.join(",").into(),
        ];
        if self.no_passthrough {
            args.push("--no-passthrough".into());
        }
        if self.keep_privileges {
            args.push("--keep-privileges".into());
        }
        if self.no_resend {
            args.push("--no-resend".into());
        }
        args
    }
}

/// A `--warm` name: `none`, or a library nvlibfs serves, by its name up
/// to `.so` (`libcuda`, not `libcuda.so.1`).
fn warm_name(name: &str) -> Result<String, String> {
    let known = crate::catalog::LIBRARIES.iter().map(|l| l.name);
    if name == "none" || known.clone().any(|k| k == name) {
        return Ok(name.to_owned());
    }
    let mut names: Vec<&str> = known.collect();
    names.sort_unstable();
    Err(format!(
        "`{name}` is not a driver library nvlibfs serves; one of: none, {}",
        names.join(", ")
    ))
}

/// What both binaries log: `-v` for info, `-vv` debug, `-vvv` trace, or
/// any tracing filter in `NVLIBFS_LOG`.
pub fn log_filter(verbose: u8) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    // fuser::session's one warning is its session trying to unmount, as it
    // ends, a mount that `nvlibfs umount` already took away: every clean
    // unmount would log "Failed to umount filesystem: Invalid argument".
    let default = match verbose {
        0 => "warn,nvlibfs=info,nvlibfs_mountd=info,fuser::session=error",
        1 => "info,fuser::session=error",
        2 => "debug",
        _ => "trace",
    };
    EnvFilter::try_from_env("NVLIBFS_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Logs to stderr, filtered by [`log_filter`]. fuser's `log` records come along.
pub fn init_logging(verbose: u8) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(verbose))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
