//! The NVIDIA device nodes a container needs beside the driver's files.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Character devices named `nvidia*` under `dev` (`nvidiactl`, `nvidia-uvm`,
/// `nvidia-uvm-tools`, `nvidia-modeset`, `nvidia0`, ...) and those in
/// `dev/nvidia-caps/`, sorted.
pub fn nvidia_device_nodes(dev: &Path) -> Vec<PathBuf> {
    let mut nodes = Vec::new();
    for dir in [dev.to_path_buf(), dev.join("nvidia-caps")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_char = entry.file_type().is_ok_and(|t| t.is_char_device());
            if is_char && (dir != dev || name.to_string_lossy().starts_with("nvidia")) {
                nodes.push(entry.path());
            }
        }
    }
    nodes.sort();
    nodes
}
