//! nvlibfs-mountd: the FUSE daemon that serves an nvlibfs `View`.
//!
//! [`fs`] is the thin FUSE adapter, [`served`] holds the generations of
//! views with their data path and counters, [`repin`] follows the kernel
//! module and swaps in new generations, [`daemon`] runs a mount from checks
//! to clean unmount.

pub mod daemon;
pub mod fs;
pub mod layout;
pub mod privileges;
pub mod repin;
pub mod served;
