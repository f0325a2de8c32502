//! The fast path's threshold, kept inside the user's `#[global_allocator]` static.
//!
//! The fast path is one load and one compare. Where the loaded word lives decides what the load
//! costs: this crate's own static is, from the user's crate, an upstream symbol reached through
//! the GOT (`mov GOT(%rip),%rax; mov (%rax),%rax; cmp; jae`: four instructions, measured at
//! +2.4 instructions per allocator call). A field of the `GuardedAlloc` static itself is defined
//! in the user's crate, so `__rust_alloc` compares against it directly (`cmp GLOBAL(%rip),%rdi;
//! jae`).
//!
//! That word must then be updated when the threshold changes (`set_threshold`, an
//! `assert_no_large_allocs` scope, start-up): the slow path registers it here on first use, and
//! [`publish`] writes every registered word. Only words inside the main executable's writable
//! segments are registered — that is where statics live, and memory there stays mapped, holding
//! the same static, for the life of the process, so writing through the pointer later is sound.
//! An instance anywhere else (on a stack, in a heap block, in a `cdylib`'s statics) is never
//! written to: its word stays 0 and each of its calls takes the slow path, which compares
//! against the process-wide threshold. Correct, only slower.
//!
//! Everything here runs inside the allocator: no lock, no allocation (hand-written for that).

use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

/// How many `GuardedAlloc` statics can be registered (a program has one; tests and benches a
/// few more). Beyond that, instances fall back to the slow path, as unregistrable ones do.
const MAX_INSTANCES: usize = 8;

static INSTANCES: [AtomicPtr<AtomicUsize>; MAX_INSTANCES] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_INSTANCES];

/// A `GuardedAlloc`'s registration state.
pub(crate) const UNKNOWN: u8 = 0;
const REGISTERED: u8 = 1;
const NOT_REGISTRABLE: u8 = 2;

/// Registers `word` (the instance's limit field; `state` its registration state) the first time
/// its instance reaches the slow path, and gives it the current threshold. `current` reads the
/// process-wide threshold.
#[inline]
pub(crate) fn adopt(word: &AtomicUsize, state: &AtomicU8, current: impl Fn() -> usize) {
    // Relaxed: the state only decides whether to try; the registration itself is ordered below.
    if state.load(Ordering::Relaxed) != UNKNOWN {
        return;
    }
    if state
        .compare_exchange(
            UNKNOWN,
            NOT_REGISTRABLE,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return; // another thread is registering it
    }
    let addr = word as *const AtomicUsize as usize;
    if !in_executable_data(addr, core::mem::size_of::<AtomicUsize>()) {
        return;
    }
    let taken = INSTANCES.iter().any(|s| {
        s.compare_exchange(
            core::ptr::null_mut(),
            addr as *mut AtomicUsize,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_ok()
    });
    if !taken {
        return;
    }
    // SeqCst against `publish`: either the publisher's scan sees this slot (and writes the new
    // value), or its store of the threshold comes first and the load below sees it. A store of
    // an older value racing with the publisher's write is caught by the re-check.
    loop {
        let t = current();
        word.store(t, Ordering::SeqCst);
        if current() == t {
            break;
        }
    }
    state.store(REGISTERED, Ordering::Relaxed);
}

/// Writes `threshold` into every registered word. Callers have already stored it as the
/// process-wide threshold (with `SeqCst`).
pub(crate) fn publish(threshold: usize) {
    for slot in &INSTANCES {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: only pointers into the main executable's writable segments are stored
            // (`adopt`), where a `GuardedAlloc` static's limit field lives for the whole
            // process: the pointee is a live `AtomicUsize`, and atomics may be written from any
            // thread.
            unsafe { (*p).store(threshold, Ordering::SeqCst) };
        }
    }
}

/// True when `[addr, addr + len)` lies inside a writable `PT_LOAD` segment of the main
/// executable (its `.data` and `.bss`: statics). Reads the program headers through the
/// auxiliary vector (`getauxval` reads a table libc filled at start: no lock, no allocation).
#[cfg(ft_linux)]
fn in_executable_data(addr: usize, len: usize) -> bool {
    // SAFETY: getauxval has no preconditions; it returns 0 for absent entries.
    let (phdr, phnum) = unsafe {
        (
            libc::getauxval(libc::AT_PHDR) as usize,
            libc::getauxval(libc::AT_PHNUM) as usize,
        )
    };
    if phdr == 0 || phnum == 0 {
        return false;
    }
    // SAFETY: AT_PHDR points at the executable's `phnum` program headers, mapped for the life
    // of the process (the dynamic loader and libc read them the same way).
    let headers = unsafe { core::slice::from_raw_parts(phdr as *const libc::Elf64_Phdr, phnum) };
    // The load bias: where PT_PHDR says the headers are, against where they are.
    let Some(bias) = headers
        .iter()
        .find(|h| h.p_type == libc::PT_PHDR)
        .map(|h| phdr.wrapping_sub(h.p_vaddr as usize))
    else {
        return false;
    };
    headers.iter().any(|h| {
        let start = bias.wrapping_add(h.p_vaddr as usize);
        let end = start.saturating_add(h.p_memsz as usize);
        h.p_type == libc::PT_LOAD
            && h.p_flags & libc::PF_W != 0
            && addr >= start
            && addr.saturating_add(len) <= end
    })
}

/// Elsewhere the executable's segments are not looked up: nothing is registered, and the fast
/// path compares against the process-wide threshold instead (see `GuardedAlloc::fast_limit`).
#[cfg(not(ft_linux))]
fn in_executable_data(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(all(test, ft_linux))]
mod tests {
    use super::*;

    static A_STATIC: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn statics_are_in_the_executables_data_and_locals_and_heap_blocks_are_not() {
        let local = AtomicUsize::new(0);
        let boxed = Box::new(AtomicUsize::new(0));
        assert!(in_executable_data(&A_STATIC as *const _ as usize, 8));
        assert!(!in_executable_data(&local as *const _ as usize, 8));
        assert!(!in_executable_data(&*boxed as *const _ as usize, 8));
    }

    #[test]
    fn a_registered_word_follows_publish_and_a_local_one_is_never_written() {
        static WORD: AtomicUsize = AtomicUsize::new(0);
        static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
        adopt(&WORD, &STATE, || 1234);
        assert_eq!(WORD.load(Ordering::SeqCst), 1234);
        assert_eq!(STATE.load(Ordering::SeqCst), REGISTERED);
        let local = AtomicUsize::new(0);
        let local_state = AtomicU8::new(UNKNOWN);
        adopt(&local, &local_state, || 1234);
        assert_eq!(local_state.load(Ordering::SeqCst), NOT_REGISTRABLE);
        publish(99);
        assert_eq!(WORD.load(Ordering::SeqCst), 99);
        assert_eq!(local.load(Ordering::SeqCst), 0, "never written");
    }
}
