//! Least privilege once mounted: the daemon keeps only the capabilities it
//! still uses, in every set including the bounding set, and sets
//! no_new_privs, so a bug in request handling cannot be turned into more
//! than what is left.
//!
//! Kept: CAP_SYS_ADMIN, because registering passthrough backing files for a
//! new driver generation (FUSE_DEV_IOC_BACKING_OPEN) and unmounting at
//! shutdown need it; CAP_DAC_READ_SEARCH, to re-scan a driver root whose
//! directories only root may search. Capabilities are per thread, so this
//! runs on the main thread before any serving thread is started.

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_ADMIN: u32 = 21;
pub const KEPT: &[(u32, &str)] = &[
    (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH (re-scanning the driver root)"),
    (
        CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN (passthrough backing files for new generations, unmounting)",
    ),
];
/// _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Mounting needs root or CAP_SYS_ADMIN: say so before anything is created.
pub fn check_can_mount() -> Result<(), crate::error::DaemonError> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    if effective & (1 << CAP_SYS_ADMIN) != 0 {
        return Ok(());
    }
    Err(crate::error::DaemonError::new(format!(
        "mounting needs root (or CAP_SYS_ADMIN); this runs as uid {}",
        nix::unistd::geteuid()
    )))
}

pub fn drop_to_kept() -> std::io::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    let keep = |cap: u32| KEPT.iter().any(|(c, _)| *c == cap);
    for cap in (0..=last).filter(|c| !keep(*c)) {
        // Already out of the bounding set (a server the supervisor started
        // after it dropped them; dropping again needs CAP_SETPCAP, gone).
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: a capability this kernel does not know.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    let mut data = [CapData::default(); 2];
    for (cap, _) in KEPT {
        let word = &mut data[(*cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads a header and two data words we own.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

/// The supervisor, once the first server has mounted: it starts only
/// servers that take over, which need what a server keeps (capabilities
/// pass to them through exec, bounded by what it has) and nothing of what
/// mounting needs. It serves nothing itself; if it cannot drop them, it
/// says so and goes on.
pub fn drop_for_supervisor() {
    match drop_to_kept() {
        Ok(()) => tracing::info!("supervisor: dropped every capability its servers do not need"),
        Err(e) => tracing::warn!("supervisor: could not drop capabilities ({e}); keeping them"),
    }
}
