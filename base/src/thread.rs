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

/// Makes thread `thread` (`None`: the calling thread) a `SCHED_BATCH` thread when it is an
/// ordinary (`SCHED_OTHER`) one; returns whether it now is. A batch thread gets the same share
/// of the CPU, but its wake-ups never preempt a running thread (the kernel's fair scheduler
/// leaves that to the next tick). For freezetrap's background threads: measured on this
/// project's VM, a reporter woken at exit preempted the exiting thread about half the time and
/// ran its own exit first (~150 µs of that thread's end), and never did as a batch thread. A
/// thread with a real-time policy (inherited from a real-time service) is left alone.
pub fn make_batch(thread: Option<libc::pthread_t>) -> bool {
    #[cfg(ft_linux)]
    {
        // SAFETY: pthread_self has no preconditions; `thread` is a live thread of this process
        // (the caller's promise, as for any pthread_t); the out-pointers are valid locals.
        unsafe {
            let t = thread.unwrap_or_else(|| libc::pthread_self());
            let mut policy = 0;
            let mut param = libc::sched_param { sched_priority: 0 };
            if libc::pthread_getschedparam(t, &mut policy, &mut param) != 0 {
                return false;
            }
            if policy == libc::SCHED_BATCH {
                return true;
            }
            if policy != libc::SCHED_OTHER {
                return false;
            }
            param.sched_priority = 0;
            libc::pthread_setschedparam(t, libc::SCHED_BATCH, &param) == 0
        }
    }
    #[cfg(not(ft_linux))]
    {
        let _ = thread;
        false
    }
}

#[cfg(all(test, ft_linux))]
mod tests {
    #[test]
    fn a_thread_made_batch_reports_it_and_real_time_ones_are_left_alone() {
        std::thread::spawn(|| {
            assert!(super::make_batch(None));
            // SAFETY: querying the calling thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_BATCH);
            assert!(super::make_batch(None), "already batch");
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: setting the calling thread's own policy (needs root: skipped otherwise).
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                return;
            }
            assert!(!super::make_batch(None));
            // SAFETY: querying the calling thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
        })
        .join()
        .unwrap();
    }
}
