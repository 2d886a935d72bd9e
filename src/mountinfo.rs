//! The one reader of `/proc/self/mountinfo`, for the CLI and the daemon
//! alike: which mounts sit at a path, and what they are.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo (the fields nvlibfs uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    /// `MAJOR:MINOR` of the mounted filesystem; for FUSE the minor is the
    /// connection's number under /sys/fs/fuse/connections.
    pub device: (u32, u32),
    pub mount_point: PathBuf,
    /// `fuse.nvlibfs` for the FUSE mount, `tmpfs` for the mount point's own.
    pub fs_type: String,
    /// The mount's source: `nvlibfs` for both of nvlibfs's mounts.
    pub source: String,
}

/// Below a mount point: where the FUSE mount itself sits, and the file that
/// marks the mount point as set up by nvlibfs (see mountd's layout).
pub const LIVE_DIR: &str = ".live";
pub const MARKER: &str = ".nvlibfs";

/// Every mount in this process's mount namespace, in mount order.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read("/proc/self/mountinfo")?))
}

/// The mount on top at `path` (the last mounted there), if any.
pub fn at(path: &Path) -> Option<MountEntry> {
    mount_at(&read().ok()?, path).cloned()
}

/// The mount on top at `path` in `mounts`.
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// The small tmpfs `nvlibfs mount` puts at a mount point: its fsname, and
/// the marker file inside.
pub fn is_nvlibfs_top(mounts: &[MountEntry], path: &Path) -> bool {
    mount_at(mounts, path).is_some_and(is_nvlibfs_tmpfs) && path.join(MARKER).exists()
}

/// That tmpfs, by its mountinfo line alone.
fn is_nvlibfs_tmpfs(m: &MountEntry) -> bool {
    m.source == "nvlibfs" && m.fs_type == "tmpfs"
}

/// nvlibfs's FUSE mount: fsname `nvlibfs`, of type `fuse.nvlibfs`, or plain
/// `fuse` where the kernel was not given the subtype (fuser's own mount(2)).
pub fn is_nvlibfs_fuse(m: &MountEntry) -> bool {
    m.source == "nvlibfs" && (m.fs_type == "fuse.nvlibfs" || m.fs_type == "fuse")
}

/// Whether a daemon serves the nvlibfs mount point `top`: its FUSE mount
/// is there and answers. statfs always asks the daemon (a stat may be
/// answered from the kernel's cache); one whose daemon is gone fails with
/// ENOTCONN.
pub fn is_served(mounts: &[MountEntry], top: &Path) -> bool {
    let live = top.join(LIVE_DIR);
    is_nvlibfs_top(mounts, top)
        && mount_at(mounts, &live).is_some_and(is_nvlibfs_fuse)
        && nix::sys::statfs::statfs(&live).is_ok()
}

/// The nvlibfs mount points a daemon serves in `mounts`, sorted.
pub fn served(mounts: &[MountEntry]) -> Vec<PathBuf> {
    let mut tops: Vec<PathBuf> = mounts
        .iter()
        .filter(|m| is_nvlibfs_tmpfs(m))
        .map(|m| m.mount_point.clone())
        .filter(|top| is_served(mounts, top))
        .collect();
    tops.sort();
    tops.dedup();
    tops
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

// "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let separator = fields.iter().position(|f| *f == b"-")?;
    if separator < 6 || fields.len() < separator + 3 {
        return None;
    }
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
    let (major, minor) = std::str::from_utf8(fields[2]).ok()?.split_once(':')?;
    Some(MountEntry {
        mount_id: number(fields[0])?,
        device: (major.parse().ok()?, minor.parse().ok()?),
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        fs_type: String::from_utf8_lossy(&unescape(fields[separator + 1])).into_owned(),
        source: String::from_utf8_lossy(&unescape(fields[separator + 2])).into_owned(),
    })
}

/// The kernel writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let code = field.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8)
                .ok()
                .filter(|_| d.bytes().all(|b| b.is_ascii_digit()))
        });
        match (field[i], code) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_optional_fields_escapes_and_fuse_devices() {
        let text = b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
            98 22 0:52 / /run/my\\040mount rw shared:40 master:2 - tmpfs nvlibfs ro,size=64k\n\
            99 98 0:53 / /run/my\\040mount/.live ro,nosuid - fuse.nvlibfs nvlibfs ro,user_id=0\n\
            garbage line\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].mount_point, Path::new("/run/my mount"));
        assert_eq!(mounts[1].fs_type, "tmpfs");
        assert_eq!(mounts[1].source, "nvlibfs");
        assert_eq!(mounts[2].fs_type, "fuse.nvlibfs");
        assert_eq!(mounts[2].device, (0, 53));
        assert_eq!(mounts[2].mount_id, 99);
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"a\\9xb\\"), b"a\\9xb\\");
        assert_eq!(unescape(b"tab\\011"), b"tab\t");
    }

    #[test]
    fn reads_this_namespace() {
        let mounts = read().unwrap();
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
