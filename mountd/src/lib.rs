//! nvlibfs-mountd: the FUSE daemon that serves an nvlibfs `View`.
//!
//! Empty until the mount lands (issue "Serve the view"): the crate exists so
//! the workspace has its final shape and the daemon's dependencies stay out
//! of the core, which is tested without FUSE.
