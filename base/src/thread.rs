//! The calling thread's kernel id and name, each one system call and no allocation.

/// The kernel thread id of the calling thread (what `/proc/self/task/TID` and bpftrace's `tid`
/// show).
///
/// Not cached in a thread-local on purpose: a cached id would be wrong in the child after
/// `fork()`, and this is only called on the slow path.
#[inline]
pub fn current_tid() -> u64 {
    #[cfg(ft_linux)]
    {
        // SAFETY: gettid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) as u64 }
    }
    #[cfg(not(ft_linux))]
    {
        // Elsewhere: the pthread handle, unique among live threads (no kernel id to match).
        // SAFETY: pthread_self has no preconditions.
        unsafe { libc::pthread_self() as usize as u64 }
    }
}

/// The calling thread's kernel name (`comm`, at most 15 bytes, NUL-padded). Rust's
/// `thread::Builder::name` sets it, so this is the thread name without touching
/// `std::thread::current()`, which may allocate.
#[inline]
pub fn current_thread_name() -> [u8; 16] {
    #[allow(unused_mut)]
    let mut name = [0u8; 16];
    #[cfg(ft_linux)]
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
