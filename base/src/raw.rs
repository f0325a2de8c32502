//! System calls for the detection path that never touch `errno`: the one module with
//! architecture-specific code (x86-64 `syscall` instructions; other architectures go through
//! libc's `syscall`, which does set `errno` on failure).
//!
//! glibc's wrappers store a failing call's error in `errno`, a thread-local that lives in the
//! thread descriptor page at the top of the thread's stack mapping. That page cannot be kept
//! out of a fork (a forked child's glibc walks every thread descriptor), so while another thread
//! forks it is write-protected, and the store would fault and wait for the very mmap_lock freeze
//! being detected. These wrappers issue the `syscall` instruction directly and return `-errno`.

/// `syscall(n, a, b, c)`; returns the kernel's result (negative errno on failure).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn syscall3(n: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the Linux x86-64 syscall ABI: number in rax, arguments in rdi/rsi/rdx, result in
    // rax; the instruction clobbers rcx and r11. Callers pass valid pointers for the call.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// `syscall(n, a, b, c, d)`; returns the kernel's result (negative errno on failure).
#[cfg(target_arch = "x86_64")]
pub fn syscall4(n: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: as `syscall3`; the fourth argument goes in r10.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            in("r10") d, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// `syscall(n, a, b, c, d, e)`; returns the kernel's result (negative errno on failure).
#[cfg(target_arch = "x86_64")]
pub fn syscall5(n: libc::c_long, a: usize, b: usize, c: usize, d: usize, e: usize) -> isize {
    let ret: isize;
    // SAFETY: as `syscall3`; the fourth and fifth arguments go in r10 and r8.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            in("r10") d, in("r8") e, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// `syscall(n, a, b, c, d, e, f)`; returns the kernel's result (negative errno on failure).
#[cfg(target_arch = "x86_64")]
pub fn syscall6(
    n: libc::c_long,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
    f: usize,
) -> isize {
    let ret: isize;
    // SAFETY: as `syscall3`; the fourth to sixth arguments go in r10, r8 and r9.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// Portable fallback (touches errno on failure).
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall6(
    n: libc::c_long,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
    f: usize,
) -> isize {
    // SAFETY: forwards to libc's generic syscall wrapper.
    let r = unsafe { libc::syscall(n, a, b, c, d, e, f) } as isize;
    if r < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as isize)
    } else {
        r
    }
}

/// Sleeps until `deadline_ns` on `CLOCK_MONOTONIC` (absolute; `u64::MAX`: no deadline), or until
/// [`wake_all`] is called on `word` after it stopped holding `expected`: the watchdog's sleep,
/// which its owner's drop must be able to cut short (a process exiting would otherwise wait for
/// the next tick), and the reporter's wait for the next event.
///
/// A private futex wait with an absolute deadline (`FUTEX_WAIT_BITSET` measures it on
/// `CLOCK_MONOTONIC`); the kernel only reads `word`. A raw syscall on purpose: glibc's sleeping
/// calls are cancellation points and write the thread descriptor's cancel state on every call,
/// a store into the same fork-protected page as errno. Returns early on a wake, a changed word
/// or a signal: callers re-check their deadline and their word.
pub fn sleep_until_or_woken(word: &core::sync::atomic::AtomicU32, expected: u32, deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as _,
        tv_nsec: (deadline_ns % 1_000_000_000) as _,
    };
    // `u64::MAX`: no deadline (a null timeout), only a wake ends the wait.
    let timeout = if deadline_ns == u64::MAX {
        0
    } else {
        &ts as *const libc::timespec as usize
    };
    syscall6(
        libc::SYS_futex,
        word.as_ptr() as usize,
        (libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG) as usize,
        expected as usize,
        timeout,
        0,
        libc::FUTEX_BITSET_MATCH_ANY as u32 as usize,
    );
}

/// Wakes every thread in [`sleep_until_or_woken`] on `word` (store the new value first).
pub fn wake_all(word: &core::sync::atomic::AtomicU32) {
    syscall3(
        libc::SYS_futex,
        word.as_ptr() as usize,
        (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
        i32::MAX as usize,
    );
}

/// Portable fallback (touches errno on failure).
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall4(n: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    syscall5(n, a, b, c, d, 0)
}

/// Portable fallback (touches errno on failure).
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall5(n: libc::c_long, a: usize, b: usize, c: usize, d: usize, e: usize) -> isize {
    // SAFETY: forwards to libc's generic syscall wrapper.
    let r = unsafe { libc::syscall(n, a, b, c, d, e) } as isize;
    if r < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as isize)
    } else {
        r
    }
}

/// Portable fallback (touches errno on failure).
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall3(n: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    // SAFETY: forwards to libc's generic syscall wrapper.
    let r = unsafe { libc::syscall(n, a, b, c) } as isize;
    if r < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as isize)
    } else {
        r
    }
}

/// The stack pointer of the caller.
#[inline(always)]
pub fn stack_pointer() -> usize {
    let sp: usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads one register; no memory access.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads one register; no memory access.
    unsafe {
        core::arch::asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let marker = 0u8;
        sp = core::hint::black_box(&marker) as *const u8 as usize;
    }
    sp
}

/// The frame pointer of the caller (`rbp`, `x29`), or 0 where frame-pointer walking is not
/// supported. Meaningful only in code built with frame pointers.
#[inline(always)]
pub fn frame_pointer() -> usize {
    #[allow(unused_assignments)]
    let mut fp: usize = 0;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads one register; no memory access.
    unsafe {
        core::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags))
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads one register; no memory access.
    unsafe {
        core::arch::asm!("mov {}, x29", out(reg) fp, options(nomem, nostack, preserves_flags))
    };
    fp
}

/// The thread pointer (what glibc's `__rseq_offset` and TLS offsets are relative to), or
/// `None` on architectures this does not know.
#[inline]
pub fn thread_pointer() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let tp: usize;
        // SAFETY: on x86-64 the thread pointer is stored at fs:0 (the TCB's self pointer).
        unsafe {
            core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
        };
        Some(tp)
    }
    #[cfg(target_arch = "aarch64")]
    {
        let tp: usize;
        // SAFETY: reads the EL0 thread-ID register; no memory access.
        unsafe {
            core::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nomem, nostack, preserves_flags))
        };
        Some(tp)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

/// `openat(AT_FDCWD, path, flags)`; `path` must be NUL-terminated.
pub fn open(path: &[u8], flags: libc::c_int) -> isize {
    debug_assert_eq!(path.last(), Some(&0));
    syscall3(
        libc::SYS_openat,
        libc::AT_FDCWD as isize as usize,
        path.as_ptr() as usize,
        flags as usize,
    )
}

/// `pread64(fd, buf, offset)`: reads a `/proc` file again from its start without reopening it.
pub fn pread(fd: libc::c_int, buf: &mut [u8], offset: u64) -> isize {
    syscall4(
        libc::SYS_pread64,
        fd as usize,
        buf.as_mut_ptr() as usize,
        buf.len(),
        offset as usize,
    )
}

/// `read(fd, buf)`.
pub fn read(fd: libc::c_int, buf: &mut [u8]) -> isize {
    syscall3(
        libc::SYS_read,
        fd as usize,
        buf.as_mut_ptr() as usize,
        buf.len(),
    )
}

/// `close(fd)`.
pub fn close(fd: libc::c_int) {
    syscall3(libc::SYS_close, fd as usize, 0, 0);
}

/// `getdents64(fd, buf)`.
pub fn getdents64(fd: libc::c_int, buf: &mut [u8]) -> isize {
    syscall3(
        libc::SYS_getdents64,
        fd as usize,
        buf.as_mut_ptr() as usize,
        buf.len(),
    )
}

/// Whether `fd` has data to read now, and whether its other end hung up (`ppoll` with a zero
/// timeout: `poll` itself does not exist on every architecture).
pub fn poll_in(fd: libc::c_int) -> (bool, bool) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // ppoll(fds, nfds, timeout, sigmask = NULL, sigsetsize): with no mask the size is not read.
    let n = syscall5(
        libc::SYS_ppoll,
        &mut p as *mut libc::pollfd as usize,
        1,
        &zero as *const libc::timespec as usize,
        0,
        core::mem::size_of::<libc::sigset_t>(),
    );
    (
        n > 0 && p.revents & libc::POLLIN != 0,
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_come_back_without_errno() {
        // SAFETY: writes errno to a known value, then reads it.
        unsafe { *libc::__errno_location() = 4242 };
        assert_eq!(
            open(b"/definitely/not/here\0", libc::O_RDONLY),
            -(libc::ENOENT as isize)
        );
        assert_eq!(
            unsafe { *libc::__errno_location() },
            4242,
            "errno untouched"
        );
        let fd = open(b"/proc/self/stat\0", libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        let mut buf = [0u8; 64];
        assert!(read(fd as i32, &mut buf) > 0);
        close(fd as i32);
    }

    #[test]
    fn poll_in_sees_data_and_hangups() {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two fds for pipe() to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(poll_in(fds[0]), (false, false), "an empty pipe");
        // SAFETY: writing one byte from a valid buffer to the pipe we own.
        assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(poll_in(fds[0]), (true, false), "a pipe with a byte in it");
        close(fds[1]);
        assert_eq!(poll_in(fds[0]), (true, true), "a byte, and the writer gone");
        close(fds[0]);
    }
}
