//! Capturing raw return addresses inside the allocator: two unwinders, picked once per process.
//!
//! - **DWARF** (`backtrace::trace_unsynchronized`, i.e. libgcc's `_Unwind_Backtrace`): correct on
//!   any binary, no lock and no allocation on glibc >= 2.35 (unwind tables are found with
//!   `_dl_find_object`), but it interprets CFI for every frame: ~0.3-0.5 µs a frame here, about
//!   10 µs for a 32-frame stack.
//! - **Frame pointers**: follows the saved `rbp` chain, ~1 ns a frame, but only meaningful when
//!   the code was built with `-C force-frame-pointers=yes` (this workspace's `.cargo/config.toml`
//!   does; Rust's std is built with them).
//!
//! `FREEZETRAP_UNWIND=auto` (the default) unwinds the first recorded stack both ways and keeps
//! frame pointers only if both agree frame for frame (a stack that passes through the service's
//! own code, so a build without frame pointers shows up right there); otherwise DWARF for the
//! rest of the process. The frame-pointer walk never reads outside the calling thread's stack:
//! each saved frame pointer must be 8-aligned, above the previous one, and below the stack top
//! cached per thread (`thread_facts`) — so a garbage `rbp` ends the walk, it cannot
//! fault.

use crate::event::MAX_FRAMES;
use core::sync::atomic::{AtomicU8, Ordering};

const UNDECIDED: u8 = 0;
const FRAME_POINTERS: u8 = 1;
const DWARF: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Which unwinder is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwinder {
    /// Not decided yet (no event recorded, `auto`).
    Undecided,
    /// Frame-pointer walk.
    FramePointers,
    /// libgcc DWARF unwinder.
    Dwarf,
}

/// The unwinder in use.
pub fn current() -> Unwinder {
    match MODE.load(Ordering::Relaxed) {
        FRAME_POINTERS => Unwinder::FramePointers,
        DWARF => Unwinder::Dwarf,
        _ => Unwinder::Undecided,
    }
}

/// Reads `FREEZETRAP_UNWIND` (`auto`, `fp`, `dwarf`). Called from the allocator's lazy
/// initialisation, so it parses bytes and allocates nothing.
pub(crate) fn init_from_env() {
    let mode = match base::env::getenv_bytes(c"FREEZETRAP_UNWIND") {
        None => UNDECIDED,
        Some(v) => match v {
            b"auto" | b"" => UNDECIDED,
            b"fp" | b"frame-pointers" => FRAME_POINTERS,
            b"dwarf" => DWARF,
            _ => {
                base::env::complain_malformed(
                    "FREEZETRAP_UNWIND",
                    v,
                    base::parse::ParseError::Malformed,
                    "auto, fp or dwarf",
                    "using auto",
                );
                UNDECIDED
            }
        },
    };
    let mode = if FP_SUPPORTED { mode } else { DWARF };
    MODE.store(mode, Ordering::Relaxed);
}

/// Forces an unwinder (tests and benchmarks).
pub fn force(u: Unwinder) {
    let m = match u {
        Unwinder::Undecided => UNDECIDED,
        Unwinder::FramePointers if FP_SUPPORTED => FRAME_POINTERS,
        _ => DWARF,
    };
    MODE.store(m, Ordering::Relaxed);
}

/// Captures up to `depth` raw return addresses of the calling thread into `out`.
///
/// `#[inline(never)]` so the frames above it are always the same few allocator frames, which the
/// symbolizer trims by name (and so that it has a frame of its own to start the walk from).
#[inline(never)]
pub(crate) fn capture_frames(
    out: &mut [usize; MAX_FRAMES],
    depth: usize,
    stack_hi: usize,
) -> usize {
    let depth = depth.clamp(1, MAX_FRAMES);
    match MODE.load(Ordering::Relaxed) {
        FRAME_POINTERS if stack_hi != 0 => fp_walk(&mut out[..depth], stack_hi),
        UNDECIDED => {
            let n = dwarf(&mut out[..depth]);
            if stack_hi != 0 {
                let mut fp = [0usize; MAX_FRAMES];
                let m = fp_walk(&mut fp, stack_hi);
                let decided = if agree(&out[..n], &fp[..m]) {
                    FRAME_POINTERS
                } else {
                    DWARF
                };
                // Relaxed: a racing thread that decides too reaches the same verdict on its own
                // stack or the other one; either is a valid choice and nothing else hangs on it.
                let _ =
                    MODE.compare_exchange(UNDECIDED, decided, Ordering::Relaxed, Ordering::Relaxed);
            }
            n
        }
        _ => dwarf(&mut out[..depth]),
    }
}

/// Whether a frame-pointer walk of the calling stack agrees with DWARF — the same test `auto`
/// makes on the first recorded stack, made on demand (outside the allocator). `None` where
/// frame-pointer walking is not supported or the stack's bounds are unknown.
pub fn frame_pointers_work_here() -> Option<bool> {
    if !FP_SUPPORTED {
        return None;
    }
    let facts = crate::thread_facts::current();
    if facts.stack_hi == 0 {
        return None;
    }
    #[inline(never)]
    fn both(
        dw: &mut [usize; CHECK_FRAMES],
        fp: &mut [usize; CHECK_FRAMES],
        hi: usize,
    ) -> (usize, usize) {
        (dwarf(dw), fp_walk(fp, hi))
    }
    let (mut dw, mut fp) = ([0usize; CHECK_FRAMES], [0usize; CHECK_FRAMES]);
    let (n, m) = both(&mut dw, &mut fp, facts.stack_hi);
    Some(agree(&dw[..n], &fp[..m]))
}

/// How many frames the start-up check unwinds: enough for `agree`'s four in common after the
/// check's own frames, few enough that DWARF stays in the caller's code (the first unwind
/// through a shared library's tables — libc's, at the bottom of every stack — cost ~50 µs of
/// a ~90 µs check).
const CHECK_FRAMES: usize = 10;

/// True when the frame-pointer walk `fp` reproduces the DWARF unwind `dw` from the first common
/// return address on, for at least 4 frames and every frame both have.
fn agree(dw: &[usize], fp: &[usize]) -> bool {
    let Some(first) = fp.first() else {
        return false;
    };
    let Some(j) = dw.iter().position(|ip| ip == first) else {
        return false;
    };
    let both = (dw.len() - j).min(fp.len());
    // The DWARF list may stop at the depth limit; require what both have to be equal.
    both >= 4 && dw[j..j + both] == fp[..both]
}

fn dwarf(out: &mut [usize]) -> usize {
    let mut n = 0;
    // SAFETY: `trace_unsynchronized` is unsafe only because it skips backtrace-rs's global lock,
    // which exists for platforms whose unwinders are not thread-safe (Windows dbghelp). On Linux
    // it calls libgcc's `_Unwind_Backtrace`, which is thread-safe. Skipping the lock is the point:
    // a lock here could be held by a thread that is itself allocating (dhat-rs #38), or by a
    // thread that no longer exists after fork(). The closure only writes into `out`.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if n >= out.len() {
                return false;
            }
            out[n] = frame.ip() as usize;
            n += 1;
            true
        });
    }
    n
}

/// Whether this build can walk frame pointers (x86-64 and aarch64 Linux, where a frame is a
/// `(saved frame pointer, return address)` pair at the frame pointer).
const FP_SUPPORTED: bool = cfg!(all(
    ft_linux,
    any(target_arch = "x86_64", target_arch = "aarch64")
));

#[cfg(all(ft_linux, any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
fn fp_walk(out: &mut [usize], stack_hi: usize) -> usize {
    let (mut fp, sp) = (base::raw::frame_pointer(), base::raw::stack_pointer());
    let mut n = 0;
    let mut low = sp;
    while n < out.len() {
        // Each (saved rbp, return address) pair must lie within [low, stack_hi): above the
        // current stack pointer and the previous frame, below the stack top.
        if fp < low || fp % 8 != 0 || fp.checked_add(16).is_none_or(|end| end > stack_hi) {
            break;
        }
        // SAFETY: `fp..fp+16` lies between this thread's stack pointer and its stack top, which
        // is mapped, readable stack memory; alignment was checked above.
        let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const usize)) };
        if ret == 0 {
            break;
        }
        out[n] = ret;
        n += 1;
        low = fp + 16;
        fp = next;
    }
    n
}

#[cfg(not(all(ft_linux, any(target_arch = "x86_64", target_arch = "aarch64"))))]
fn fp_walk(_out: &mut [usize], _stack_hi: usize) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_needs_a_common_run() {
        assert!(agree(&[9, 8, 1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]));
        assert!(
            agree(&[9, 1, 2, 3, 4], &[1, 2, 3, 4, 5, 6]),
            "DWARF cut at depth"
        );
        assert!(!agree(&[9, 1, 2, 7, 4], &[1, 2, 3, 4]));
        assert!(!agree(&[9, 1, 2], &[1, 2]), "too short to trust");
        assert!(!agree(&[9, 8], &[]));
    }

    #[test]
    #[cfg(all(ft_linux, any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn this_crate_is_built_with_frame_pointers_and_both_unwinders_agree() {
        let facts = crate::thread_facts::current();
        assert_ne!(facts.stack_hi, 0);
        let mut dw = [0usize; MAX_FRAMES];
        let mut fp = [0usize; MAX_FRAMES];
        #[inline(never)]
        fn both(
            dw: &mut [usize; MAX_FRAMES],
            fp: &mut [usize; MAX_FRAMES],
            hi: usize,
        ) -> (usize, usize) {
            (dwarf(dw), fp_walk(fp, hi))
        }
        let (n, m) = both(&mut dw, &mut fp, facts.stack_hi);
        assert!(m >= 4, "frame-pointer walk found {m} frames");
        assert!(
            agree(&dw[..n], &fp[..m]),
            "dwarf {:x?}\nfp {:x?}",
            &dw[..n],
            &fp[..m]
        );
    }

    #[test]
    #[cfg(all(ft_linux, any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn the_start_up_check_finds_this_workspaces_frame_pointers() {
        assert_eq!(frame_pointers_work_here(), Some(true));
    }
}
