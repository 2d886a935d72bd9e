//! nvlibfs-mountd: the FUSE daemon that serves an nvlibfs `View`.
//!
//! [`served`] is the serving core (generations of views, their data paths,
//! the kernel's references, counters) with no FUSE types in it; [`fs`] is
//! the thin FUSE adapter over it; [`repin`] follows the kernel module and
//! swaps in new generations; [`layout`] is the restart-safe mount point;
//! [`daemon`] runs a mount from its lock to a clean unmount.

pub mod backing;
pub mod daemon;
pub mod drain;
pub mod error;
pub mod failpoint;
pub mod fdstore;
pub mod fs;
pub mod kept;
pub mod layout;
pub mod link;
pub mod logging;
pub mod own_mount;
pub mod peer;
pub mod privileges;
pub mod protocol;
pub mod repin;
pub mod served;
pub mod statedir;
pub mod supervisor;
pub mod systemd;
pub mod takeover;
pub mod warm;

/// This binary's version; `NVLIBFS_BUILD_ID` at build time adds to it, so
/// two builds can be told apart after `nvlibfs restart`.
pub fn version() -> String {
    match option_env!("NVLIBFS_BUILD_ID") {
        Some(id) => format!("{} ({id})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_owned(),
    }
}
