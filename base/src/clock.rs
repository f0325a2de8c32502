//! The one clock every freezetrap timestamp uses.

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
