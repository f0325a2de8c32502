//! Directories by handle: how freezetrap writes files and checks what it runs, when it may be
//! running as root beside other users.
//!
//! # The rules
//! A path names a file only at the moment it is resolved; any directory on the way that another
//! user can write lets that user swap what the path means (a symlink to `/etc/shadow`, a FIFO
//! that feeds root's bpftrace a program). So:
//! - a directory is opened **once**, component by component from `/`, never following a symbolic
//!   link, and every directory on the way is checked ([`Dir::open_trusted`], [`open_executable`]);
//!   afterwards only the open handle is used (`*at` system calls), never the path again;
//! - files are created **exclusively** (`O_CREAT | O_EXCL`, which never follows a symlink), mode
//!   0600 ([`Dir::create_file`]); a file that is appended to (the JSON report) is opened without
//!   following a symlink and must be a regular file owned by this process's user
//!   ([`Dir::open_append`]);
//! - a directory another user can write is accepted *above* a path only when it is root's and
//!   sticky, like `/tmp`: there nobody else can rename or remove what we created.
//!
//! Errors are one-line reasons meant to follow "X is refused: ".

mod dir;
mod trust;

pub use dir::{Dir, Entry};
pub use trust::{open_executable, Executable, Owners};

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

pub(crate) fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path contains a NUL byte"))
}

/// `-1` becomes the thread's `errno` as an error.
pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)` as an owned descriptor.
pub(crate) fn openat(
    dir: RawFd,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; `dir` is a descriptor
    // the caller owns (or AT_FDCWD); the returned descriptor is new and owned by nobody else.
    let fd = cvt(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat(fd)`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct; fstat fills it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: the entry itself, never what a symlink points to.
pub(crate) fn lstatat(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = c_name(name)?;
    // SAFETY: as in `fstat`.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: valid NUL-terminated name and writable buffer.
    cvt(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn is_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}
