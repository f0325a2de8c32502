//! The few system facts the slow path needs, each one syscall or vDSO call and no allocation.

/// Nanoseconds on `CLOCK_MONOTONIC`: the clock every freezetrap timestamp (`ts_ns`, `start_ns`)
/// uses, so alloc-guard events and watchdog stalls can be compared directly.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux, so the
    // call cannot fail and goes through the vDSO (no syscall, no allocation, no lock).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// The kernel thread id of the calling thread (what `/proc/self/task/TID` and bpftrace's `tid`
/// show).
///
/// Not cached in a thread-local on purpose: a cached id would be wrong in the child after
/// `fork()`, and this is only called on the slow path.
#[inline]
pub fn current_tid() -> u64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

/// The calling thread's kernel name (`comm`, at most 15 bytes, NUL-padded). Rust's
/// `thread::Builder::name` sets it, so this is the thread name without touching
/// `std::thread::current()`, which may allocate.
#[inline]
pub fn current_thread_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (including the NUL) into the buffer we pass,
    // which is exactly 16 bytes long.
    unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            name.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    name
}

/// The text of a NUL-padded thread name.
pub fn name_str(name: &[u8; 16]) -> &str {
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    core::str::from_utf8(&name[..end]).unwrap_or("?")
}
