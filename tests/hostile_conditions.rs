//! The wrapper under the conditions that deadlock allocator hooks in other projects: a child
//! after `fork()` while other threads were recording, thread teardown (TLS destructors that
//! allocate), and a panic with backtrace on another thread. Each case runs in a child process
//! with a deadline, so a deadlock fails the test instead of hanging the suite.

mod common;

use freezetrap::alloc_guard;
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const BIG: usize = 1 << 20;

fn churn_big_allocations(
    stop: &'static std::sync::atomic::AtomicBool,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let v: Vec<u8> = Vec::with_capacity(BIG + (n as usize % 4096));
            std::hint::black_box(&v);
            n += 1;
        }
        n
    })
}

#[test]
fn child_roles() {
    let Some(role) = common::role() else { return };
    alloc_guard::set_threshold(Some(BIG));
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match role.as_str() {
        "fork" => {
            // Four threads record big allocations non-stop while we fork 30 times; each child
            // records a big allocation of its own (backtrace, ring, probe) and exits.
            let churners: Vec<_> = (0..4).map(|_| churn_big_allocations(&STOP)).collect();
            // Record once in the parent's main thread, so its thread id is cached before fork.
            let warm: Vec<u8> = Vec::with_capacity(BIG * 2);
            std::hint::black_box(&warm);
            for i in 0..30 {
                // SAFETY: the child only allocates through the global allocator and calls
                // _exit; that is exactly what this test is about.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let before = alloc_guard::stats().recorded;
                    let v: Vec<u8> = Vec::with_capacity(BIG * 3);
                    std::hint::black_box(&v);
                    let small: Vec<u64> = (0..1000).collect();
                    std::hint::black_box(&small);
                    let ok = alloc_guard::stats().recorded > before;
                    // The event must carry the child's thread id (= its pid), not the parent's
                    // cached one.
                    let mut evs = [alloc_guard::internal::RawEvent::EMPTY; 8];
                    let n = alloc_guard::internal::RING.events_between(0, u64::MAX, &mut evs);
                    let pid = unsafe { libc::getpid() } as u64;
                    let right_tid = evs[..n]
                        .iter()
                        .any(|e| e.size == (BIG * 3) as u64 && e.thread_id == pid);
                    unsafe {
                        libc::_exit(if !ok {
                            3
                        } else if !right_tid {
                            4
                        } else {
                            0
                        })
                    };
                }
                assert!(pid > 0, "fork failed");
                let mut status = 0;
                let start = std::time::Instant::now();
                loop {
                    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                    if r == pid {
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(10) {
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        panic!("forked child {i} hung while allocating");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "child {i} status {status}"
                );
            }
            STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            let total: u64 = churners.into_iter().map(|c| c.join().unwrap()).sum();
            println!("FORK_OK churned={total}");
        }
        "teardown" => {
            struct AllocatesOnDrop;
            impl Drop for AllocatesOnDrop {
                fn drop(&mut self) {
                    let v: Vec<u8> = Vec::with_capacity(BIG * 2 + 7);
                    std::hint::black_box(&v);
                }
            }
            thread_local!(static T: AllocatesOnDrop = const { AllocatesOnDrop });
            let before = alloc_guard::stats().recorded;
            for _ in 0..50 {
                std::thread::spawn(|| T.with(|_| ())).join().unwrap();
            }
            let recorded = alloc_guard::stats().recorded - before;
            assert!(
                recorded >= 50,
                "big allocations in TLS destructors are recorded: {recorded}"
            );
            println!("TEARDOWN_OK recorded={recorded}");
        }
        "panic" => {
            std::panic::set_hook(Box::new(|_| {
                // Capture a backtrace like the default hook does (it takes std's backtrace lock
                // and allocates), while another thread is recording.
                let bt = std::backtrace::Backtrace::force_capture();
                std::hint::black_box(bt.to_string());
            }));
            let churner = churn_big_allocations(&STOP);
            for _ in 0..200 {
                let r = std::thread::spawn(|| {
                    let v: Vec<u8> = Vec::with_capacity(BIG * 2);
                    std::hint::black_box(&v);
                    panic!("deliberate");
                })
                .join();
                assert!(r.is_err());
            }
            STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            let n = churner.join().unwrap();
            println!("PANIC_OK churned={n}");
        }
        "fork-from-thread" => {
            // fork() on a spawned thread: the child's one thread runs on that thread's stack,
            // while its id equals the pid. The frame-pointer walk must be bounded by that stack,
            // not by the initial thread's (`__libc_stack_end`): a garbage frame pointer between
            // the two would otherwise be read — here it points into a PROT_NONE page.
            alloc_guard::unwind::force(alloc_guard::unwind::Unwinder::FramePointers);
            let warm: Vec<u8> = Vec::with_capacity(BIG * 2);
            std::hint::black_box(&warm);
            let status = std::thread::spawn(|| {
                let warm: Vec<u8> = Vec::with_capacity(BIG * 2); // caches this thread's facts
                std::hint::black_box(&warm);
                // SAFETY: the child makes raw system calls and allocates through the global
                // allocator (the point of the test), then _exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let garbage = unmapped_page_above_this_stack();
                    let before = alloc_guard::stats().recorded;
                    // SAFETY: `allocate_big` is an `extern "C" fn()`; the frame pointer holds
                    // garbage only for that call, and nothing dereferences it but the walk.
                    unsafe { call_with_frame_pointer(garbage, allocate_big) };
                    let ok = alloc_guard::stats().recorded > before;
                    unsafe { libc::_exit(if ok { 0 } else { 3 }) };
                }
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                status
            })
            .join()
            .unwrap();
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the child crashed or did not record: status {status:#x} (signal {})",
                libc::WTERMSIG(status)
            );
            println!("FORK_THREAD_OK");
        }
        other => panic!("unknown role {other}"),
    }
}

/// A big allocation, in a function of its own: its prologue saves whatever the frame pointer
/// held when it was called.
extern "C" fn allocate_big() {
    let v: Vec<u8> = Vec::with_capacity(BIG * 3);
    std::hint::black_box(&v);
}

/// Calls `f` with the frame pointer set to `rbp`.
///
/// # Safety
/// `f` must be safe to call; it must not rely on the frame pointer (Rust code does not).
#[cfg(target_arch = "x86_64")]
unsafe fn call_with_frame_pointer(rbp: usize, f: extern "C" fn()) {
    // SAFETY: saves and restores rbp around the call; `sub rsp, 8` keeps the stack 16-byte
    // aligned at the call (the block starts aligned for a call, `push` moved it by 8).
    unsafe {
        core::arch::asm!(
            "push rbp",
            "sub rsp, 8",
            "mov rbp, {rbp}",
            "call {f}",
            "add rsp, 8",
            "pop rbp",
            rbp = in(reg) rbp,
            f = in(reg) f,
            clobber_abi("C"),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn call_with_frame_pointer(_rbp: usize, f: extern "C" fn()) {
    f()
}

extern "C" {
    /// glibc: the top of the initial thread's stack.
    static __libc_stack_end: *mut libc::c_void;
}

/// A PROT_NONE page between this (spawned) thread's stack and the initial thread's stack top:
/// readable by nobody, so a walk that follows a frame pointer into it crashes.
fn unmapped_page_above_this_stack() -> usize {
    let here = &0u8 as *const u8 as usize;
    // SAFETY: reading a pointer-sized glibc static.
    let top = unsafe { __libc_stack_end } as usize;
    let mut at = (top - (16 << 20)) & !0xfff;
    while at > here {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == at {
            return at;
        }
        at -= 1 << 20;
    }
    unsafe { libc::_exit(5) }
}

fn run_role(role: &str, ok_marker: &str) {
    let out = common::run_with_timeout(
        &mut common::child("child_roles", role),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(ok_marker),
        "role {role} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_forked_child_can_allocate_and_record_while_the_parent_was_recording() {
    run_role("fork", "FORK_OK");
}

#[test]
fn allocations_in_tls_destructors_during_thread_teardown_are_recorded() {
    run_role("teardown", "TEARDOWN_OK");
}

#[test]
fn a_panicking_thread_does_not_deadlock_a_recording_one() {
    run_role("panic", "PANIC_OK");
}

#[test]
fn fork_on_a_spawned_thread_then_a_garbage_frame_pointer_does_not_crash_the_child() {
    run_role("fork-from-thread", "FORK_THREAD_OK");
}
