//! How `nvlibfs status` talks to a running daemon: a Unix socket per mount
//! point in the state directory; the daemon writes one JSON `Status` to each
//! connection and closes it. Nothing is read from the client, so the socket
//! offers nothing to attack beyond a connect.

use serde::{Deserialize, Serialize};
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_STATE_DIR: &str = "/run/nvlibfs";

/// Where the view is mounted unless told otherwise.
pub const DEFAULT_MOUNTPOINT: &str = "/run/nvlibs";

pub use crate::mountinfo::{LIVE_DIR, MARKER};

/// Longest socket path the kernel takes (`sun_path` is 108 bytes with NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The socket of the daemon serving `mountpoint` (an absolute, canonical path):
/// `/run/nvlibfs/run-nvlibs.sock` for `/run/nvlibs`.
pub fn socket_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    state_file(state_dir, mountpoint, "sock")
}

/// The lock a daemon holds (flock) for as long as it serves `mountpoint`:
/// one daemon per mount point, in `locks/` of its state directory (root's
/// alone, like the rest of it). Two daemons of different state
/// directories still cannot both mount one mount point: the second finds
/// it mounted.
pub fn lock_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    state_file(&state_dir.join("locks"), mountpoint, "lock")
}

/// Where the supervisor serving `mountpoint` waits for a daemon started
/// with `--take-over` (root's alone).
pub fn takeover_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    state_file(state_dir, mountpoint, "takeover")
}

/// The background daemon's log for `mountpoint`.
pub fn log_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    state_file(state_dir, mountpoint, "log")
}

/// A per-mount-point file name that no other mount point maps to: `/`
/// becomes `-`, letters, digits, `.` and `_` stay, and every other byte
/// (`-` included) becomes `%XX`, so `/run/nvlibs` and `/run-nvlibs` differ.
fn state_file(state_dir: &Path, mountpoint: &Path, extension: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let bytes = mountpoint.as_os_str().as_bytes();
    let trimmed = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut name = String::new();
    for &b in trimmed.strip_suffix(b"/").unwrap_or(trimmed) {
        match b {
            b'/' => name.push('-'),
            b if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' => name.push(b as char),
            b => name.push_str(&format!("%{b:02x}")),
        }
    }
    if name.is_empty() {
        name = "root".to_owned();
    }
    let path = state_dir.join(format!("{name}.{extension}"));
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return path;
    }
    // Too long for a socket address: a 128-bit FNV-1a of the path, stable
    // across runs and builds (unlike std's hasher).
    let hash = bytes.iter().fold(0x6c62272e07bb014262b821756295c58du128, |h, &b| {
        (h ^ b as u128).wrapping_mul(0x0000000001000000000000000000013b)
    });
    state_dir.join(format!("{hash:032x}.{extension}"))
}

/// Requests the daemon answered, since it started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub lookups: u64,
    pub getattrs: u64,
    pub readlinks: u64,
    pub opens: u64,
    pub readdirs: u64,
    /// READ requests: zero while passthrough serves every read in the kernel.
    pub reads: u64,
    pub bytes_read: u64,
    /// Bytes the cached path pushed into the kernel's page cache ahead of
    /// any READ (the `--warm` libraries, at mount and after each re-pin).
    #[serde(default)]
    pub warmed_bytes: u64,
    /// Requests refused because the view is read-only.
    pub write_attempts: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub mountpoint: PathBuf,
    /// The serving process (the one that answers FUSE requests).
    pub pid: u32,
    /// The process that holds the FUSE connection and starts a new server
    /// when this one ends; `None` when there is none.
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    /// The serving binary's version.
    #[serde(default)]
    pub version: String,
    /// The inode of the serving process's PID namespace: tells a daemon
    /// in this container or pod from one in another (`status --here`).
    #[serde(default)]
    pub pid_namespace: Option<u64>,
    /// Every time the connection passed from one serving process to
    /// another, oldest first.
    #[serde(default)]
    pub handovers: Vec<Handover>,
    pub driver_version: String,
    pub version_source: String,
    pub driver_root: PathBuf,
    /// `passthrough` or `cached`.
    pub data_path: String,
    /// Why passthrough is not in use, when it is not.
    pub fallback_reason: Option<String>,
    pub files: u64,
    pub bytes: u64,
    pub symlinks: u64,
    pub uptime_s: f64,
    pub rss_bytes: Option<u64>,
    /// Starts at 0; each re-pin installs the next.
    #[serde(default)]
    pub generation: u32,
    /// Earlier generations still referenced by open files or cached names.
    #[serde(default)]
    pub retired_generations: u64,
    /// Served files whose host path now names another file or none (a
    /// package upgrade replaced them); they are still served as held.
    #[serde(default)]
    pub held_files_replaced_on_disk: u64,
    /// Why the view does not hold the loaded module's driver, if it does not.
    #[serde(default)]
    pub pin_problem: Option<String>,
    /// Every generation the daemon still holds, oldest first; the last is
    /// the one new lookups see.
    #[serde(default)]
    pub generations: Vec<GenerationStatus>,
    /// How long re-pins have been frozen for a restart or a takeover, when
    /// they are: a freeze that outlives its step says so here.
    #[serde(default)]
    pub frozen_s: Option<f64>,
    pub counters: Counters,
}

/// One handover of the FUSE connection to a new serving process, or one
/// that was refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Handover {
    /// `crash` (the server died), `restart` (`nvlibfs restart`) or
    /// `supervisor restart` (systemd started a new supervisor).
    pub reason: String,
    pub old_pid: u32,
    pub new_pid: u32,
    pub new_version: String,
    /// Seconds since the epoch when it happened.
    pub at: f64,
    /// How long requests had nobody to answer them: from a crash until
    /// the new server answered; 0 for a restart, where the old server
    /// answers until the new one does.
    pub waited_ms: f64,
    /// Why the new server did not take over, when it did not: the old
    /// one went on serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// One generation as served.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationStatus {
    pub number: u32,
    pub driver_version: String,
    /// `passthrough` or `cached`: each generation registers its own files.
    pub data_path: String,
    /// References the kernel holds into it (lookups not yet forgotten, open files).
    pub kernel_refs: u64,
}

impl Status {
    /// The two processes, named the same way wherever they are shown:
    /// `server pid N, supervisor pid M` (signals go to the supervisor).
    pub fn pids(&self) -> String {
        match self.supervisor_pid {
            Some(supervisor) => format!("server pid {}, supervisor pid {supervisor}", self.pid),
            None => format!("server pid {}", self.pid),
        }
    }

    /// Before the first view is installed.
    pub fn starting(mountpoint: PathBuf) -> Status {
        Status {
            mountpoint,
            pid: std::process::id(),
            supervisor_pid: None,
            version: String::new(),
            pid_namespace: own_pid_namespace(),
            handovers: Vec::new(),
            driver_version: String::new(),
            version_source: String::new(),
            driver_root: PathBuf::new(),
            data_path: "starting".into(),
            fallback_reason: None,
            files: 0,
            bytes: 0,
            symlinks: 0,
            uptime_s: 0.0,
            rss_bytes: None,
            generation: 0,
            retired_generations: 0,
            held_files_replaced_on_disk: 0,
            pin_problem: None,
            generations: Vec::new(),
            frozen_s: None,
            counters: Counters::default(),
        }
    }
}

/// The inode of this process's PID namespace.
pub fn own_pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Whether process `pid` still runs (a zombie waiting for its reaper does
/// not: a detached daemon's parent is whatever init the host has). Every
/// thread counts: a killed process's first thread is a zombie while the
/// others still end, and until the last has, its sockets and locks are
/// open.
pub fn process_running(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            })
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// What the daemon writes instead of a status to a peer it may not answer,
/// before the reason.
pub const REFUSED: &str = "refused: ";

/// What the daemon writes first to a peer it cannot see (one in another
/// PID namespace, as the host is to a daemon in a pod): a file in the state
/// directory and a nonce, to be set as that file's `PROOF_XATTR`.
pub const CHALLENGE: &str = "challenge ";

/// Setting or reading a `trusted.` attribute takes CAP_SYS_ADMIN in the
/// initial user namespace: what a peer must hold to be answered.
pub const PROOF_XATTR: &str = "trusted.nvlibfs.proof";

/// Answers a daemon's challenge: sets `PROOF_XATTR` to `nonce` on the file
/// `name` (a plain name) of `state_dir`.
pub fn prove(state_dir: &Path, name: &str, nonce: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a challenge for {name:?}"),
        ));
    }
    let path = std::ffi::CString::new(state_dir.join(name).as_os_str().as_bytes())?;
    let attr = std::ffi::CString::new(PROOF_XATTR)?;
    // SAFETY: two NUL-terminated strings and a buffer of the given length.
    let set = unsafe { libc::lsetxattr(path.as_ptr(), attr.as_ptr(), nonce.as_ptr().cast(), nonce.len(), 0) };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How often `query` asks again when a server took the connection, or
/// let it wait in its listener's queue, and ended without answering.
const UNANSWERED_TRIES: u32 = 5;

/// Asks the daemon serving `mountpoint` for its status. Every server of a
/// mount accepts on the same listener, and during a handover the one that
/// takes a client may be the one that is ending: it closes without a word,
/// and the server that goes on answers the next try. A daemon killed
/// whole resets a connection that waited in the queue of its listener, and
/// the next try hears that nobody listens.
pub fn query(state_dir: &Path, mountpoint: &Path) -> io::Result<Status> {
    let mut tries = 1;
    loop {
        match ask(state_dir, mountpoint) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && tries < UNANSWERED_TRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            answer => return answer,
        }
    }
}

fn ask(state_dir: &Path, mountpoint: &Path) -> io::Result<Status> {
    let path = socket_path(state_dir, mountpoint);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        // "May not ask" is not "nobody serves": keep the kind for callers.
        let text = if e.kind() == io::ErrorKind::PermissionDenied {
            format!(
                "only root may ask the daemon serving {}: its socket {} is root's alone because status names \
                 host paths ({e}); run this as root",
                mountpoint.display(),
                path.display()
            )
        } else {
            format!(
                "no nvlibfs daemon serves {}: nothing answers at {} ({e}); {}",
                mountpoint.display(),
                path.display(),
                unserved_advice(mountpoint)
            )
        };
        io::Error::new(e.kind(), text)
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let unanswered = || {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the daemon serving {} closed {} without answering: the server that took the question ended",
                mountpoint.display(),
                path.display()
            ),
        )
    };
    // A reset is the listener closed with this connection still in its
    // queue: its process ended, as an EOF says of one that took it.
    let reset_unanswered = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionReset => unanswered(),
        _ => e,
    };
    let mut reader = io::BufReader::new(stream.try_clone()?);
    let mut text = String::new();
    io::BufRead::read_line(&mut reader, &mut text).map_err(reset_unanswered)?;
    if let Some(challenge) = text.strip_prefix(CHALLENGE) {
        let (name, nonce) = challenge.trim_end().split_once(' ').unwrap_or_default();
        prove(state_dir, name, nonce).map_err(|e| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the daemon serving {} runs where it cannot see this process, and asked it to prove \
                     CAP_SYS_ADMIN by setting {PROOF_XATTR} on {}: {e}",
                    mountpoint.display(),
                    state_dir.join(name).display()
                ),
            )
        })?;
        io::Write::write_all(&mut stream, b"proved\n")?;
        text.clear();
    }
    reader.read_to_string(&mut text).map_err(reset_unanswered)?;
    if text.is_empty() {
        return Err(unanswered());
    }
    if let Some(why) = text.strip_prefix(REFUSED) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the daemon serving {} answers only a process that may mount (root with CAP_SYS_ADMIN, in the \
                 host's user namespace), because status names host paths: {why}",
                mountpoint.display()
            ),
        ));
    }
    serde_json::from_str(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

/// What to tell a user who named a mount point no daemon answers for,
/// from what this mount namespace shows: a mount left by a daemon that is
/// gone, one served by a daemon of another state directory, or the mount
/// points nvlibfs serves instead.
pub fn unserved_advice(mountpoint: &Path) -> String {
    let mounts = crate::mountinfo::read().unwrap_or_default();
    let mp = mountpoint.display();
    if crate::mountinfo::is_served(&mounts, mountpoint) {
        return "a daemon serves it, but not one of this state directory: pass the --state-dir it was mounted with"
            .into();
    }
    if crate::mountinfo::is_nvlibfs_top(&mounts, mountpoint) {
        return format!(
            "its mount is left from a daemon that is gone: `nvlibfs umount {mp}` removes it, `nvlibfs mount {mp}` \
             serves it again"
        );
    }
    let served = crate::mountinfo::served(&mounts);
    if served.is_empty() {
        return format!("nothing is mounted there; mount it with `nvlibfs mount {mp}`");
    }
    let names: Vec<String> = served.iter().map(|p| p.display().to_string()).collect();
    format!(
        "nvlibfs serves {} here: name {}, or mount this one with `nvlibfs mount {mp}`",
        names.join(", "),
        if served.len() == 1 { "that" } else { "one of those" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose first thread ended while another still runs (as a
    /// SIGKILLed daemon is for a moment, holding its sockets) runs; once
    /// every thread has ended it does not, reaped or not.
    #[test]
    fn a_process_runs_until_its_last_thread_ends() {
        const LEADER_ENDS: &str = "import ctypes, sys, threading\n\
             threading.Thread(target=sys.stdin.read).start()\n\
             ctypes.CDLL(None).pthread_exit(None)\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", LEADER_ENDS])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (apt-get install python3) runs the process under test");
        let pid = child.id();
        let leader_state = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while leader_state() != 'Z' {
            assert!(
                std::time::Instant::now() < deadline,
                "python3's first thread never ended"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(process_running(pid), "a thread still runs");
        drop(child.stdin.take());
        while process_running(pid) {
            assert!(std::time::Instant::now() < deadline, "the last thread never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(leader_state(), 'Z', "not running, not yet reaped");
        assert!(child.wait().unwrap().success());
        assert!(!process_running(pid));
    }

    /// A server that takes the question and ends without a word (it was
    /// the one handing over) is not the answer: the next server's is.
    #[test]
    fn a_question_closed_unanswered_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = Path::new("/run/nvlibs");
        let listener = std::os::unix::net::UnixListener::bind(socket_path(dir.path(), mountpoint)).unwrap();
        let serving = Status::starting(mountpoint.to_path_buf());
        let answer = serde_json::to_vec(&serving).unwrap();
        let servers = std::thread::spawn(move || {
            for _ in 0..2 {
                drop(listener.accept().unwrap());
            }
            io::Write::write_all(&mut listener.accept().unwrap().0, &answer).unwrap();
        });
        let status = query(dir.path(), mountpoint).unwrap();
        servers.join().unwrap();
        assert_eq!(status.mountpoint, serving.mountpoint);
    }

    /// The daemon killed whole while the question waited in its
    /// listener's queue: the reset is asked again, and the next try finds
    /// whoever listens then (here a daemon that came back).
    #[test]
    fn a_question_reset_in_the_queue_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = Path::new("/run/nvlibs");
        let path = socket_path(dir.path(), mountpoint);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let serving = Status::starting(mountpoint.to_path_buf());
        let answer = serde_json::to_vec(&serving).unwrap();
        let servers = std::thread::spawn(move || {
            let mut queued = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, for the listener this thread owns.
            assert_eq!(unsafe { libc::poll(&mut queued, 1, 10_000) }, 1);
            std::fs::remove_file(&path).unwrap();
            drop(listener);
            let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            io::Write::write_all(&mut listener.accept().unwrap().0, &answer).unwrap();
        });
        let status = query(dir.path(), mountpoint).unwrap();
        servers.join().unwrap();
        assert_eq!(status.mountpoint, serving.mountpoint);
    }

    #[test]
    fn a_question_never_answered_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = Path::new("/run/nvlibs");
        let listener = std::os::unix::net::UnixListener::bind(socket_path(dir.path(), mountpoint)).unwrap();
        let servers = std::thread::spawn(move || {
            for _ in 0..UNANSWERED_TRIES {
                drop(listener.accept().unwrap());
            }
        });
        let e = query(dir.path(), mountpoint).unwrap_err();
        servers.join().unwrap();
        assert!(
            e.to_string().contains("closed") && e.to_string().contains("without answering"),
            "{e}"
        );
    }

    #[test]
    fn socket_names_are_readable_and_bounded() {
        let dir = Path::new(DEFAULT_STATE_DIR);
        assert_eq!(
            socket_path(dir, Path::new("/run/nvlibs")),
            Path::new("/run/nvlibfs/run-nvlibs.sock")
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(200)));
        let p = socket_path(dir, &long);
        assert!(p.as_os_str().len() <= MAX_SOCKET_PATH, "{p:?}");
        assert_eq!(p, socket_path(dir, &long));
    }

    #[test]
    fn socket_names_never_collide() {
        let dir = Path::new(DEFAULT_STATE_DIR);
        let names: std::collections::HashSet<PathBuf> = [
            "/run/nvlibs",
            "/run-nvlibs",
            "/run/nvlibs/",
            "/run%2dnvlibs",
            "/run/nv libs",
            "/run/nv-libs",
            "/",
        ]
        .iter()
        .map(|m| socket_path(dir, Path::new(m)))
        .collect();
        // "/run/nvlibs/" is the same mount point as "/run/nvlibs".
        assert_eq!(names.len(), 6, "{names:?}");
        assert_eq!(socket_path(dir, Path::new("/")), Path::new("/run/nvlibfs/root.sock"));
    }
}
