//! Memory that a `fork()` elsewhere in the process cannot freeze.
//!
//! `fork()` write-protects every private page of the parent for copy-on-write while it holds the
//! `mmap_lock` (and each VMA's lock) for write. A thread that then *writes* to one of those
//! pages takes a page fault that waits until the fork is over — which would make the watchdog
//! freeze with the service it watches. Memory marked `MADV_DONTFORK` is not copied into the
//! child, so fork leaves it writable and the watchdog keeps running: its stack and everything it
//! writes during a stall live in such memory.

use core::mem::size_of;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;

fn page_size() -> usize {
    // SAFETY: sysconf cannot fail for _SC_PAGESIZE.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// A heap-like box in its own `MADV_DONTFORK` mapping, prefaulted.
pub struct ForkSafeBox<T> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: ForkSafeBox owns its T exclusively, like Box.
unsafe impl<T: Send> Send for ForkSafeBox<T> {}
// SAFETY: shared access only hands out &T, like Box.
unsafe impl<T: Sync> Sync for ForkSafeBox<T> {}

/// Types for which the all-zero bit pattern is a valid value (integers, atomics, arrays of
/// them), so a [`ForkSafeBox`] of fresh zeroed memory holds a valid one without initialisation.
///
/// # Safety
/// Implement only for types whose every field is valid as zero bytes: no references, no
/// `NonNull`, no enums without a zero discriminant, no `String` or `Vec`.
pub unsafe trait Zeroable {}

// SAFETY: an atomic integer is valid as zero.
unsafe impl Zeroable for core::sync::atomic::AtomicU32 {}

impl<T> ForkSafeBox<T> {
    /// A box of zeroed memory: a valid `T` by [`Zeroable`]'s contract.
    pub fn new_zeroed() -> std::io::Result<Self>
    where
        T: Zeroable,
    {
        // SAFETY: `T: Zeroable`, so the zeroed mapping already holds a valid `T`.
        unsafe { Self::new_with(|_| {}) }
    }

    /// Maps fresh memory, marks it `MADV_DONTFORK`, touches every page, and lets `init` finish
    /// the value in place.
    ///
    /// # Safety
    /// `init` receives a pointer to zeroed, writable, suitably aligned memory of `size_of::<T>()`
    /// bytes and must leave a valid `T` there: every field whose all-zero pattern is not a
    /// valid value must be written (with `ptr::write`/`addr_of_mut!`, never by assignment, which
    /// would drop the invalid old value). The box then derefs to, and finally drops, that `T`.
    pub unsafe fn new_with(init: impl FnOnce(*mut T)) -> std::io::Result<Self> {
        let ps = page_size();
        let len = size_of::<T>().max(1).div_ceil(ps) * ps;
        if core::mem::align_of::<T>() > ps {
            return Err(std::io::Error::other("alignment above a page"));
        }
        // SAFETY: a fresh private anonymous mapping, checked for failure; madvise and the
        // page-touching writes stay inside it. Anonymous memory is zero-filled, so `init` gets
        // zeroed memory as promised; the caller's contract makes it a valid `T`.
        unsafe {
            let p = libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            if libc::madvise(p, len, libc::MADV_DONTFORK) != 0 {
                let e = std::io::Error::last_os_error();
                libc::munmap(p, len);
                return Err(e);
            }
            for off in (0..len).step_by(ps) {
                core::ptr::write_volatile((p as *mut u8).add(off), 0);
            }
            init(p as *mut T);
            Ok(ForkSafeBox {
                ptr: NonNull::new_unchecked(p as *mut T),
                len,
            })
        }
    }
}

impl<T> Deref for ForkSafeBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: initialised in `new_with`, valid until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for ForkSafeBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above; `&mut self` guarantees exclusivity.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for ForkSafeBox<T> {
    fn drop(&mut self) {
        // SAFETY: the value was initialised and is dropped once; the mapping is ours.
        unsafe {
            core::ptr::drop_in_place(self.ptr.as_ptr());
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Marks this thread's stack *below the caller's frame* `MADV_DONTFORK`, then runs `f` on it.
///
/// Only the part below is marked: glibc keeps the thread descriptor and static TLS at the top
/// of the stack mapping, and a forked child walks those descriptors, so they must exist in the
/// child. `f`'s frames (and everything it calls) lie below the marked boundary: a padding frame
/// moves the stack pointer down a few pages first, and `f` runs in a frame of its own below it.
/// What `f` captured may live above the boundary: `f` may read it, but must not write it once
/// forks can happen (the watchdog's loop only reads its `Detector`). Returns `f`'s value; if marking fails, `f`
/// still runs (unprotected) and the error is returned alongside.
pub fn run_on_protected_stack<R>(f: impl FnOnce() -> R) -> (R, std::io::Result<()>) {
    let sp: usize;
    // SAFETY: reads the stack pointer register only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    let ps = page_size();
    // Everything from two pages below our frame downwards to the guard page.
    let end = (sp / ps - 2) * ps;
    // SAFETY: pthread_getattr_np fills `attr`, destroyed after use; the madvise range lies
    // inside this thread's stack mapping, above its guard page and below our own frame.
    let marked = unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            Err(std::io::Error::other("pthread_getattr_np failed"))
        } else {
            let mut addr: *mut libc::c_void = core::ptr::null_mut();
            let mut size: libc::size_t = 0;
            libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
            libc::pthread_attr_destroy(&mut attr);
            let start = (addr as usize).div_ceil(ps) * ps;
            if end <= start {
                Err(std::io::Error::other("stack too small"))
            } else if libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTFORK)
                != 0
            {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    (below_padding(f), marked)
}

/// Unregisters the calling thread's restartable-sequences area.
///
/// glibc (2.35+) registers an `rseq` area for every thread inside its thread descriptor, and the
/// kernel writes the current CPU into it on every return to user space after a reschedule. That
/// write faults while a fork has the descriptor page write-protected, so a thread with rseq
/// cannot even wake from `clock_nanosleep` during a fork (seen here: threads blocked in
/// `__rseq_handle_notify_resume -> __put_user -> exc_page_fault -> lock_mm_and_find_vma`). The
/// watchdog does not need rseq (glibc only uses it to speed up `sched_getcpu`). Returns whether
/// an area was unregistered.
pub fn unregister_rseq() -> bool {
    const RSEQ_SIG: u32 = 0x5305_3053;
    const RSEQ_FLAG_UNREGISTER: usize = 1;
    // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names; absent symbols (glibc < 2.35,
    // or rseq disabled) mean there is nothing to unregister.
    let (off, size) = unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr());
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr());
        if off.is_null() || size.is_null() {
            return false;
        }
        (*(off as *const isize), *(size as *const u32))
    };
    if size == 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let tp: usize;
        // SAFETY: on x86-64 the thread pointer is stored at fs:0 (the TCB's self pointer).
        unsafe {
            core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
        };
        let area = (tp as isize + off) as usize;
        // The registered length is 32 (struct rseq) on current glibc; older ones used __rseq_size.
        for len in [32usize, size as usize] {
            let r = base::raw::syscall4(
                libc::SYS_rseq,
                area,
                len,
                RSEQ_FLAG_UNREGISTER,
                RSEQ_SIG as usize,
            );
            if r == 0 {
                return true;
            }
        }
    }
    false
}

/// Maps the page tables of every loaded object's executable code (`MADV_POPULATE_READ`), so
/// the first stall does not page-fault into code it never ran before — a fault that would wait
/// for the mmap_lock of the very freeze being detected. Best effort; call at start.
pub fn populate_code() {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        _data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr hands us a valid info with `dlpi_phnum` program headers.
        unsafe {
            let info = &*info;
            let ps = page_size();
            for i in 0..info.dlpi_phnum as usize {
                let ph = &*info.dlpi_phdr.add(i);
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                    let start = (info.dlpi_addr as usize + ph.p_vaddr as usize) / ps * ps;
                    let end = (info.dlpi_addr as usize + ph.p_vaddr as usize + ph.p_memsz as usize)
                        .div_ceil(ps)
                        * ps;
                    // MADV_POPULATE_READ = 22 (Linux 5.14); older kernels say EINVAL: ignored.
                    libc::madvise(start as *mut libc::c_void, end - start, 22);
                }
            }
        }
        0
    }
    // SAFETY: the callback only reads the headers glibc passes and calls madvise.
    unsafe { libc::dl_iterate_phdr(Some(each), core::ptr::null_mut()) };
}

#[inline(never)]
fn below_padding<R>(f: impl FnOnce() -> R) -> R {
    // Four pages of padding, then `f` in a frame of its own: that frame starts below this one,
    // and so below the marked boundary. Calling `f` here directly is not enough: the compiler
    // inlines it, and its locals then share this frame, whose top lies *above* the boundary
    // (seen: the watchdog loop kept `now` at -0x30(%rbp), write-protected by every fork, so a
    // fork with GiBs resident blocked the watchdog on its first tick).
    let pad = [0u8; 16 << 10];
    core::hint::black_box(&pad);
    let r = in_own_frame(f);
    core::hint::black_box(&pad);
    r
}

/// Runs `f` in this (never inlined) frame, so `f`'s inlined locals live below the caller's.
#[inline(never)]
fn in_own_frame<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rseq_can_be_unregistered_on_a_thread() {
        // glibc >= 2.35 registers rseq per thread (this machine has 2.36); on older systems
        // there is nothing to unregister and the call says so.
        let registered =
            unsafe { !libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()).is_null() };
        let done = std::thread::spawn(unregister_rseq).join().unwrap();
        assert_eq!(done, registered);
    }

    #[test]
    fn a_box_survives_a_fork_untouched_and_the_child_does_not_see_it() {
        // SAFETY: the closure writes a whole, valid array.
        let mut b =
            unsafe { ForkSafeBox::new_with(|p: *mut [u64; 1024]| p.write([7; 1024])).unwrap() };
        b[3] = 9;
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::_exit(0) };
        }
        let mut st = 0;
        unsafe { libc::waitpid(pid, &mut st, 0) };
        b[4] = 10; // still writable, no copy-on-write involved
        assert_eq!((b[0], b[3], b[4]), (7, 9, 10));
    }
}
