//! Looking paths up through this server's own mount, from a child
//! process. A thread of the server that waits on its own mount cannot be
//! killed once a server thread has read its request: if the server is
//! SIGKILLed then (a crash, a test), that thread never ends, the process
//! never finishes exiting, its sockets stay open, and the supervisor never
//! learns that it died, so no successor answers and the mount hangs. A
//! child that holds no descriptor of the server's waits instead; the
//! successor that the supervisor starts is sent the request again and
//! answers it, and the child ends.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The inode number of each of `paths` (following a last symbolic link
/// where `follow`), or the errno its lookup failed with.
pub fn inodes(paths: &[&Path], follow: bool) -> Vec<Result<u64, std::io::Error>> {
    let failed = |e: std::io::Error| paths.iter().map(|_| Err(std::io::Error::from(e.kind()))).collect();
    let names: Vec<CString> = match paths.iter().map(|p| CString::new(p.as_os_str().as_bytes())).collect() {
        Ok(names) => names,
        Err(e) => return failed(e.into()),
    };
    let mut pipe = [0; 2];
    // SAFETY: a two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return failed(std::io::Error::last_os_error());
    }
    let [read_end, write_end] = pipe;
    // SAFETY: the child calls only system calls (close_range, stat,
    // write, _exit) on memory prepared before the fork: nothing that
    // takes a lock another thread may have held at the fork.
    let child = unsafe { libc::fork() };
    if child == 0 {
        unsafe {
            if write_end > 0 {
                libc::close_range(0, write_end as u32 - 1, 0);
            }
            libc::close_range(write_end as u32 + 1, u32::MAX, 0);
            for name in &names {
                let mut st: libc::stat = std::mem::zeroed();
                let looked = if follow {
                    libc::stat(name.as_ptr(), &mut st)
                } else {
                    libc::lstat(name.as_ptr(), &mut st)
                };
                // The inode, or the errno negated.
                let answer: i64 = if looked == 0 {
                    st.st_ino as i64
                } else {
                    -(*libc::__errno_location() as i64)
                };
                libc::write(write_end, (&answer as *const i64).cast(), 8);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: the write end is this process's, and closed once.
    unsafe { libc::close(write_end) };
    // SAFETY: the read end is this process's alone from here on.
    let mut answers = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(read_end) };
    if child < 0 {
        return failed(std::io::Error::last_os_error());
    }
    let mut out = Vec::with_capacity(paths.len());
    for _ in paths {
        let mut answer = [0u8; 8];
        out.push(match std::io::Read::read_exact(&mut answers, &mut answer) {
            Ok(()) => match i64::from_ne_bytes(answer) {
                ino if ino >= 0 => Ok(ino as u64),
                errno => Err(std::io::Error::from_raw_os_error(-errno as i32)),
            },
            Err(e) => Err(e),
        });
    }
    let mut status = 0;
    // SAFETY: reaps the child forked above.
    unsafe { libc::waitpid(child, &mut status, 0) };
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_are_looked_up_as_stat_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let missing = dir.path().join("missing");
        let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap());
        let got = super::inodes(&[&file, &link, &missing], true);
        assert_eq!(got[0].as_ref().unwrap(), &ino(&file));
        assert_eq!(got[1].as_ref().unwrap(), &ino(&file));
        assert_eq!(got[2].as_ref().unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let got = super::inodes(&[&link], false);
        assert_eq!(got[0].as_ref().unwrap(), &ino(&link));
    }
}
