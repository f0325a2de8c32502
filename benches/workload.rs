//! The small-allocation-heavy workload shared by the criterion bench (`alloc_overhead`) and the
//! instruction-count binary (`examples/alloc_workload.rs`): the same code measures bare jemalloc
//! and the guard, calling the allocator directly so only the allocator differs.

use std::alloc::{GlobalAlloc, Layout};

/// Live blocks the workload juggles.
const SLOTS: usize = 256;

/// Runs `ops` allocator operations (alloc / realloc / dealloc of 8..=1024 bytes) on `a`, with a
/// fixed pseudo-random sequence, and frees everything at the end. Returns a checksum so the work
/// cannot be optimised away.
#[inline(never)]
pub fn run_workload<A: GlobalAlloc>(a: &A, ops: u32, seed: u64) -> u64 {
    let mut live: [(usize, usize); SLOTS] = [(0, 0); SLOTS];
    let mut x = seed | 1;
    let mut sum = 0u64;
    for _ in 0..ops {
        // xorshift64: deterministic, allocation-free.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let slot = (x as usize) % SLOTS;
        let size = 8 + ((x >> 20) as usize % 1017);
        let (ptr, old) = live[slot];
        // SAFETY: every pointer in `live` came from `a` with Layout (old, 8) and is freed or
        // reallocated exactly once; sizes are non-zero.
        unsafe {
            if ptr == 0 {
                let p = a.alloc(Layout::from_size_align_unchecked(size, 8));
                live[slot] = (p as usize, size);
            } else if (x >> 40) & 3 == 0 {
                let p = a.realloc(
                    ptr as *mut u8,
                    Layout::from_size_align_unchecked(old, 8),
                    size,
                );
                live[slot] = (p as usize, size);
            } else {
                a.dealloc(ptr as *mut u8, Layout::from_size_align_unchecked(old, 8));
                live[slot] = (0, 0);
            }
        }
        sum = sum.wrapping_add(live[slot].0 as u64);
    }
    for (ptr, size) in live {
        if ptr != 0 {
            // SAFETY: as above.
            unsafe { a.dealloc(ptr as *mut u8, Layout::from_size_align_unchecked(size, 8)) };
        }
    }
    sum
}
