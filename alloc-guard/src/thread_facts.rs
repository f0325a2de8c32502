//! What the slow path needs to know about the calling thread, cached per thread and re-read
//! after `fork()`: its kernel id and name, and the top of its stack (the bound that keeps a
//! frame-pointer walk inside the stack).

use base::thread::{current_thread_name, current_tid};
use core::cell::Cell;
use core::sync::atomic::{AtomicU64, Ordering};

/// Bumped in every child right after `fork()` (pthread_atfork child handler), so per-thread
/// caches of the thread id notice they belong to the parent.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(1);

extern "C" fn after_fork_in_child() {
    // Relaxed: the child has one thread at this point; later loads on it are program-ordered.
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the fork handler. Called once from the allocator's lazy initialisation;
/// `pthread_atfork` allocates through libc's malloc, never through the Rust global allocator.
pub(crate) fn register_fork_handler() {
    // SAFETY: the handler is a plain `extern "C" fn` with no captured state, valid for the
    // whole process.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
}

/// What the slow path needs to know about the calling thread.
#[derive(Clone, Copy)]
pub(crate) struct ThreadFacts {
    generation: u64,
    /// Kernel thread id.
    pub(crate) tid: u64,
    /// Kernel thread name, NUL-padded.
    pub(crate) name: [u8; 16],
    /// One past the highest address of this thread's stack (0 = unknown): the bound that keeps
    /// a frame-pointer walk from reading outside the stack.
    pub(crate) stack_hi: usize,
}

thread_local! {
    /// This thread's id and name, read once (two syscalls, ~1.6 µs in this project's VM) and
    /// reused by later events. Const-initialised, no destructor: usable during thread teardown.
    static FACTS: Cell<ThreadFacts> =
        const { Cell::new(ThreadFacts { generation: 0, tid: 0, name: [0; 16], stack_hi: 0 }) };
}

#[cfg(ft_linux)]
extern "C" {
    /// glibc: the top of the initial thread's stack (where argv and the environment live).
    static __libc_stack_end: *mut libc::c_void;
}

/// The top of the calling thread's stack, without reading `/proc` and without the Rust global
/// allocator. 0 if unknown.
///
/// - On the initial thread: glibc's `__libc_stack_end`. (glibc's `pthread_getattr_np` would read
///   `/proc/self/maps` for it, which may block on the `mmap_lock` during a freeze.)
/// - On any other thread: `pthread_getattr_np`, which reads the bounds from the thread
///   descriptor (it allocates a CPU set through glibc's own malloc, never through the Rust
///   global allocator).
///
/// Which thread this is, is decided by where the stack pointer is, not by comparing the thread
/// id with the pid: in the child of a `fork()` called on a spawned thread, the one thread left
/// has the pid as its id but runs on the spawned thread's stack, far from `__libc_stack_end`
/// (a bound taken from the wrong stack would let a frame-pointer walk read unmapped memory).
/// The initial thread's stack lies within `RLIMIT_STACK` below `__libc_stack_end`; thread stacks
/// are mappings of their own, at least that far away.
#[cfg(not(ft_linux))]
fn stack_top() -> usize {
    0 // unknown: the frame-pointer walk is off, backtraces use DWARF
}

#[cfg(ft_linux)]
fn stack_top() -> usize {
    let marker = 0u8;
    let sp = core::hint::black_box(&marker) as *const u8 as usize;
    // SAFETY: glibc defines this symbol for every dynamically or statically linked program and
    // sets it before main; reading a pointer-sized static is sound.
    let main_end = unsafe { __libc_stack_end } as usize;
    // SAFETY: an all-zero rlimit is a valid value; getrlimit fills it (a syscall, no allocation).
    let mut lim: libc::rlimit = unsafe { core::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit.
    let max_main = if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut lim) } == 0 {
        (lim.rlim_cur as usize).min(4 << 30)
    } else {
        8 << 20
    };
    if sp < main_end && main_end - sp <= max_main {
        return main_end;
    }
    // SAFETY: `attr` is initialised by pthread_getattr_np before use and destroyed after; the
    // out-pointers are valid locals. This is not the initial thread's stack, so glibc takes the
    // bounds from the thread descriptor (no /proc read).
    unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return 0;
        }
        let mut addr: *mut libc::c_void = core::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let ok = libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        let (lo, hi) = (addr as usize, (addr as usize).saturating_add(size));
        if ok && lo <= sp && sp < hi {
            hi
        } else {
            0 // the bounds do not contain our own stack pointer: trust nothing
        }
    }
}

/// The calling thread's kernel id, name and stack top, cached per thread and re-read after
/// `fork()` (the only reader: the slow path).
///
/// The name is the one the thread had at its first oversized allocation: Rust names threads
/// before running their code, so only a later `prctl(PR_SET_NAME)` would make it stale.
pub(crate) fn current() -> ThreadFacts {
    let generation = FORK_GENERATION.load(Ordering::Relaxed);
    let cached = FACTS.try_with(|f| f.get()).ok();
    match cached {
        Some(f) if f.generation == generation && f.tid != 0 => f,
        _ => {
            let tid = current_tid();
            let facts = ThreadFacts {
                generation,
                tid,
                name: current_thread_name(),
                stack_hi: stack_top(),
            };
            let _ = FACTS.try_with(|f| f.set(facts));
            facts
        }
    }
}
