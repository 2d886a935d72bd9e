//! nvlibfs-mountd: the FUSE daemon that serves an nvlibfs `View`.
//!
//! [`fs`] is the thin FUSE adapter, [`served`] holds a view with its data
//! path and counters, [`daemon`] runs a mount from checks to clean unmount.

pub mod daemon;
pub mod fs;
pub mod served;
