//! Hostile requests through a real mount: each gets the right errno and
//! the daemon keeps serving. Raw libc calls, so nothing in between
//! second-guesses the kernel's answer.

mod common;

use common::{Mounted, SERIAL, VERSION};
use nvlibfs_fixture::FixtureSpec;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// The errno of a libc call that returned -1 (or MAP_FAILED); 0 if it succeeded.
fn errno_of(rc: isize) -> i32 {
    if rc == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    } else {
        0
    }
}

fn open(path: &Path, flags: i32) -> i32 {
    // SAFETY: a NUL-terminated path; the descriptor is closed at once.
    let fd = unsafe { libc::open(c(path).as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    let e = errno_of(fd as isize);
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
    e
}

#[test]
fn hostile_requests_get_the_right_errno_and_the_daemon_keeps_serving() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);
    let lib64 = m.mountpoint.join("lib64");
    let lib = lib64.join(format!("libcuda.so.{VERSION}"));
    let new = lib64.join("libnew.so");
    let mut checks: Vec<(&str, i32, i32)> = Vec::new();
    let mut expect = |what: &'static str, got: i32, want: i32| checks.push((what, got, want));

    // Names.
    let long255 = lib64.join("x".repeat(255));
    let long256 = lib64.join("x".repeat(256));
    let long1025 = lib64.join("x".repeat(1025));
    let not_utf8 = lib64.join(OsStr::from_bytes(b"lib\xff\xfe.so"));
    expect(
        "lookup of a 255-byte name",
        open(&long255, libc::O_RDONLY),
        libc::ENOENT,
    );
    expect(
        "lookup of a 256-byte name",
        open(&long256, libc::O_RDONLY),
        libc::ENAMETOOLONG,
    );
    expect(
        "lookup of a 1025-byte name",
        open(&long1025, libc::O_RDONLY),
        libc::ENAMETOOLONG,
    );
    expect(
        "lookup of a name that is not UTF-8",
        open(&not_utf8, libc::O_RDONLY),
        libc::ENOENT,
    );

    // Opens that would write.
    expect("open O_WRONLY", open(&lib, libc::O_WRONLY), libc::EROFS);
    expect("open O_RDWR", open(&lib, libc::O_RDWR), libc::EROFS);
    expect(
        "open O_RDONLY|O_TRUNC",
        open(&lib, libc::O_RDONLY | libc::O_TRUNC),
        libc::EROFS,
    );
    expect(
        "open O_CREAT of a new name",
        open(&new, libc::O_RDONLY | libc::O_CREAT),
        libc::EROFS,
    );
    expect(
        "open O_CREAT|O_EXCL",
        open(&new, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL),
        libc::EROFS,
    );

    // SAFETY (all below): libc calls with NUL-terminated paths and valid buffers.
    unsafe {
        expect(
            "truncate",
            errno_of(libc::truncate(c(&lib).as_ptr(), 0) as isize),
            libc::EROFS,
        );
        expect(
            "link",
            errno_of(libc::link(c(&lib).as_ptr(), c(&new).as_ptr()) as isize),
            libc::EROFS,
        );
        expect(
            "symlink",
            errno_of(libc::symlink(c(&lib).as_ptr(), c(&new).as_ptr()) as isize),
            libc::EROFS,
        );
        expect(
            "chown",
            errno_of(libc::chown(c(&lib).as_ptr(), 1, 1) as isize),
            libc::EROFS,
        );
        expect(
            "chmod",
            errno_of(libc::chmod(c(&lib).as_ptr(), 0o777) as isize),
            libc::EROFS,
        );
        expect(
            "utimes",
            errno_of(libc::utimes(c(&lib).as_ptr(), std::ptr::null()) as isize),
            libc::EROFS,
        );
        expect(
            "mknod",
            errno_of(libc::mknod(c(&new).as_ptr(), libc::S_IFIFO | 0o644, 0) as isize),
            libc::EROFS,
        );
        let value = b"x";
        expect(
            "setxattr",
            errno_of(libc::setxattr(c(&lib).as_ptr(), c"user.x".as_ptr(), value.as_ptr().cast(), 1, 0) as isize),
            libc::EROFS,
        );
        expect(
            "removexattr",
            errno_of(libc::removexattr(c(&lib).as_ptr(), c"user.x".as_ptr()) as isize),
            libc::EROFS,
        );
        let mut buf = [0u8; 64];
        expect(
            "getxattr",
            errno_of(libc::getxattr(
                c(&lib).as_ptr(),
                c"user.x".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )),
            libc::EOPNOTSUPP,
        );
        expect(
            "listxattr",
            errno_of(libc::listxattr(c(&lib).as_ptr(), buf.as_mut_ptr().cast(), buf.len())),
            libc::EOPNOTSUPP,
        );

        // A writable shared mapping of a read-only open.
        let fd = libc::open(c(&lib).as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        let map = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        expect(
            "mmap PROT_WRITE|MAP_SHARED",
            if map == libc::MAP_FAILED { errno_of(-1) } else { 0 },
            libc::EACCES,
        );
        // ioctls the view has no business answering.
        let mut flags: libc::c_long = 0;
        let rc = libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags);
        expect("ioctl FS_IOC_GETFLAGS", if rc == -1 { 1 } else { 0 }, 1);
        let rc = libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags);
        expect("ioctl FS_IOC_SETFLAGS", if rc == -1 { 1 } else { 0 }, 1);
        libc::close(fd);
    }

    let wrong: Vec<String> = checks
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| {
            format!(
                "{what}: got {}, want {}",
                std::io::Error::from_raw_os_error(*got),
                std::io::Error::from_raw_os_error(*want)
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Still serving, and nothing was created.
    m.assert_loads_everything(&[]);
    assert!(!new.exists());
    assert!(m.status().counters.lookups > 0);
}
