//! `alloc-guard`: a global-allocator wrapper that records every oversized allocation.
//!
//! # Why
//! A service that resizes a huge `HashMap` can freeze for seconds without a log line: one
//! multi-GiB allocation, then the kernel zeroing and mapping it while every other thread waits on
//! `mmap_lock`. `alloc-guard` makes such allocations visible: each allocation or reallocation of
//! at least a threshold is recorded with its size, thread, timing and a backtrace, fires the USDT
//! probe `freezetrap:large_alloc`, and is reported on stderr and as a JSON line. Allocations below
//! the threshold cost one relaxed atomic load and one compare.
//!
//! # Set up
//! ```
//! #[global_allocator]
//! static GLOBAL: freezetrap_alloc_guard::GuardedAlloc<std::alloc::System> =
//!     freezetrap_alloc_guard::GuardedAlloc::new(std::alloc::System);
//! # fn main() {}
//! ```
//! Any `GlobalAlloc` works as the inner allocator; `tikv_jemallocator::Jemalloc` is the intended
//! one. Then run the program with `FREEZETRAP_ALLOC_THRESHOLD=256MiB`: events are recorded and
//! probed from the first allocation on (the variable is read with libc `getenv` on the first
//! allocation, without allocating). To also get report lines, call [`init_from_env`] early in
//! `main` (the `freezetrap` facade's `init_from_env` does it for you).
//!
//! # Reading the output
//! ```text
//! freezetrap: large allocation: 256.00 MiB alloc on thread 'main' (tid 4242) took 31.0 µs at my_service::load (src/main.rs:12)
//! ```
//! and, with `FREEZETRAP_REPORT=report.jsonl`, one JSON object per event:
//! `{"event":"large_alloc","seq":0,"kind":"alloc","size":268435456,"old_size":0,...,"frames":[...]}`.
//! `took` is the time spent inside the inner allocator; `frames` start at the caller (the
//! allocator's own frames are removed).
//!
//! # Testing with it
//! [`assert_no_large_allocs`] fails a test when the code under test allocates too much at once:
//! ```should_panic
//! # #[global_allocator]
//! # static A: freezetrap_alloc_guard::GuardedAlloc<std::alloc::System> =
//! #     freezetrap_alloc_guard::GuardedAlloc::new(std::alloc::System);
//! let table = freezetrap_alloc_guard::assert_no_large_allocs(256 << 20, || {
//!     let mut m = std::collections::HashMap::<u64, u64>::new();
//!     m.reserve(20_000_000); // a ~300 MiB table: panics, naming this line
//!     m
//! });
//! ```
//!
//! # Troubleshooting
//! - *Nothing is recorded*: the wrapper is not the `#[global_allocator]`, or the threshold is
//!   above your allocations, or the value was malformed (a one-line message on stderr said so).
//! - *Frames show `??` or short names*: keep `debug = "limited"` (or more) in the release
//!   profile; `line-tables-only` drops the paths of function names.
//! - *bpftrace user stacks are short*: build with `-C force-frame-pointers=yes`.
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod config;
mod cursor;
mod event;
mod events;
pub mod growth;
mod inflight;
mod limit_word;
mod record;
mod report;
mod ring;
mod scope;
pub mod setup;
mod slot;
pub mod symbolize;
mod thread_facts;
mod threshold;
pub mod unwind;
mod writer;

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use record::Request;
use std::sync::Arc;

pub use config::EnvSettings;
pub use event::AllocKind;
pub use events::on_large_alloc;
pub use record::{stats, RecorderStats};
pub use report::{LargeAlloc, Reporter, ReporterConfig, ReporterStats};
pub use scope::assert_no_large_allocs;
pub use writer::{ReportSink, ReportWriter};

/// What the other freezetrap crates (the watchdog) and its own tests use of the recorder's
/// machinery. Not a stable interface.
#[doc(hidden)]
pub mod internal {
    pub use crate::cursor::{Cursor, CursorStats};
    pub use crate::event::{RawEvent, MAX_FRAMES};
    pub use crate::inflight::{in_flight, touch_all as touch_in_flight, untracked, SLOTS};
    pub use crate::record::mark_current_thread_internal;
    pub use crate::report::human_line;
    pub use crate::ring::{Lookup, Ring, CAPACITY, RING};
}

/// The global-allocator wrapper. See the [crate docs](crate).
///
/// Every request passes to `inner`. Requests of at least the threshold take a cold slow path that
/// records them; smaller ones cost one relaxed load and one compare, with no thread-local access
/// and no shared write.
///
/// The compared word is a field of this value, so in a `#[global_allocator]` static (defined in
/// your crate) the load is direct, not through another crate's symbol. The slow path registers
/// a static's word on first use and every threshold change updates it; an instance that is not
/// a static of the executable is never written to and sends every request through the slow path
/// (correct, only slower). Keep the allocator in a plain `static`, as `#[global_allocator]` needs
/// anyway.
#[derive(Debug)]
pub struct GuardedAlloc<A> {
    /// Requests of at least this many bytes take the slow path: 0 until the slow path registered
    /// this instance ([`limit_word`]), then the threshold in force (`usize::MAX`: off).
    limit: AtomicUsize,
    /// Whether `limit` is registered ([`limit_word::adopt`]).
    registration: AtomicU8,
    inner: A,
}

impl<A> GuardedAlloc<A> {
    /// Wraps `inner`. `const`, so it can initialise a `#[global_allocator]` static.
    pub const fn new(inner: A) -> Self {
        GuardedAlloc {
            limit: AtomicUsize::new(0),
            registration: AtomicU8::new(limit_word::UNKNOWN),
            inner,
        }
    }

    /// The wrapped allocator.
    pub const fn inner(&self) -> &A {
        &self.inner
    }

    /// The word the fast path compares against: this instance's own (Linux, where statics are
    /// registered), or the process-wide threshold (elsewhere).
    #[inline(always)]
    fn fast_limit(&self) -> usize {
        // Relaxed: a stale limit only sends one request down the wrong path; the slow path
        // re-checks against the threshold in force.
        #[cfg(ft_linux)]
        return self.limit.load(Ordering::Relaxed);
        #[cfg(not(ft_linux))]
        return threshold::fast_path_threshold();
    }

    /// The limit this instance's fast path compares against: 0 while it is not registered (every
    /// request then takes the slow path), else the threshold in force (`usize::MAX`: off). For
    /// tests and benchmarks.
    #[doc(hidden)]
    pub fn fast_path_limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }
}

impl<A: GlobalAlloc> GuardedAlloc<A> {
    /// The slow path, with this instance's limit word (registered there on first use).
    #[inline(always)]
    unsafe fn slow(&self, req: Request) -> *mut u8 {
        // SAFETY: the caller's request, forwarded unchanged.
        unsafe { record::slow_path(&self.inner, req, &self.limit, &self.registration) }
    }
}

// SAFETY: every method forwards the caller's request to `inner` unchanged, and returns exactly
// what `inner` returned (null included), so `inner`'s `GlobalAlloc` guarantees carry over. The
// slow path adds work around the call but never touches the memory, never re-enters the global
// allocator for recording (reentrancy guard), and does not unwind: it has no `unwrap`, its
// indexing stays in bounds by construction (ring and table indices are taken modulo their
// length, frame counts are capped at `MAX_FRAMES`), and its integer arithmetic either saturates
// (durations, scope counters) or advances 64-bit sequence counters that would need 2^62 events
// to overflow (`2 * seq + 2` in the ring and the in-flight table).
// The slow paths as the fast path calls them: out of line, the request's scalars as arguments
// in the order `__rust_alloc` and `__rust_realloc` receive them, the instance last. Built at each
// call site instead, the `Request` (five words, passed through memory) took a stack slot in every
// caller and, through register pressure, cost a few instructions per allocation on the fast path
// too; with the instance first, every fast path shuffled its arguments between registers
// (`bash benches/callgrind.sh`).

/// # Safety
/// `size` and `align` are those of a valid `Layout`; the request satisfies `alloc`'s contract.
#[cold]
#[inline(never)]
unsafe fn alloc_slow<A: GlobalAlloc>(size: usize, align: usize, this: &GuardedAlloc<A>) -> *mut u8 {
    // SAFETY: taken apart from a valid Layout by the caller; the request is forwarded unchanged.
    unsafe {
        let layout = Layout::from_size_align_unchecked(size, align);
        this.slow(Request::Alloc(layout))
    }
}

/// # Safety
/// As [`alloc_slow`], for `alloc_zeroed`.
#[cold]
#[inline(never)]
unsafe fn alloc_zeroed_slow<A: GlobalAlloc>(
    size: usize,
    align: usize,
    this: &GuardedAlloc<A>,
) -> *mut u8 {
    // SAFETY: as in alloc_slow.
    unsafe {
        let layout = Layout::from_size_align_unchecked(size, align);
        this.slow(Request::AllocZeroed(layout))
    }
}

/// # Safety
/// As [`alloc_slow`], for `realloc` of `ptr` (allocated with `size` and `align`) to `new_size`.
#[cold]
#[inline(never)]
unsafe fn realloc_slow<A: GlobalAlloc>(
    ptr: *mut u8,
    size: usize,
    align: usize,
    new_size: usize,
    this: &GuardedAlloc<A>,
) -> *mut u8 {
    // SAFETY: as in alloc_slow.
    unsafe {
        let layout = Layout::from_size_align_unchecked(size, align);
        this.slow(Request::Realloc {
            ptr,
            layout,
            new_size,
        })
    }
}

unsafe impl<A: GlobalAlloc> GlobalAlloc for GuardedAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < self.fast_limit() {
            // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
            return unsafe { self.inner.alloc(layout) };
        }
        // SAFETY: the request is the caller's, forwarded unchanged.
        unsafe { alloc_slow(layout.size(), layout.align(), self) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < self.fast_limit() {
            // SAFETY: forwarded unchanged.
            return unsafe { self.inner.alloc_zeroed(layout) };
        }
        // SAFETY: the request is the caller's, forwarded unchanged.
        unsafe { alloc_zeroed_slow(layout.size(), layout.align(), self) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size < self.fast_limit() {
            // SAFETY: forwarded unchanged; `ptr` was allocated by `inner` via this wrapper.
            return unsafe { self.inner.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the request is the caller's, forwarded unchanged.
        unsafe { realloc_slow(ptr, layout.size(), layout.align(), new_size, self) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; frees are never recorded.
        unsafe { self.inner.dealloc(ptr, layout) }
    }
}

/// Sets the recording threshold in code (`None` = off), overriding `FREEZETRAP_ALLOC_THRESHOLD`.
pub fn set_threshold(bytes: Option<usize>) {
    threshold::set_base(bytes.unwrap_or(usize::MAX));
}

/// Sets how many raw frames are captured per oversized allocation (clamped to 1..=32),
/// overriding `FREEZETRAP_BACKTRACE_DEPTH`. Fewer frames make each event cheaper: unwinding
/// costs roughly 0.3 µs per frame.
pub fn set_backtrace_depth(frames: usize) {
    threshold::set_depth(frames);
}

/// The recording threshold in force (`None` = off). Active `assert_no_large_allocs` scopes do not
/// change it.
pub fn threshold() -> Option<usize> {
    threshold::wait_init();
    stats().threshold
}

/// True when [`GuardedAlloc`] is this program's global allocator (it has served an allocation).
pub fn is_installed() -> bool {
    let probe = std::hint::black_box(Box::new(0u8));
    drop(probe);
    threshold::served()
}

/// Re-reads `FREEZETRAP_ALLOC_THRESHOLD` through `std::env` (for programs that set it in
/// `main`, after the first allocation already read the environment) and applies it when it is
/// valid. A malformed value prints the usual one-line message, unless it was already reported
/// at start-up.
pub fn reload_threshold_from_env() {
    threshold::wait_init();
    let Ok(v) = std::env::var("FREEZETRAP_ALLOC_THRESHOLD") else {
        return;
    };
    match base::parse::parse_size(v.as_bytes()) {
        Ok(t) => {
            if threshold() != Some(t) {
                set_threshold(Some(t));
            }
        }
        Err(e) => {
            let seen_at_start = base::env::getenv_bytes(c"FREEZETRAP_ALLOC_THRESHOLD")
                == Some(v.as_bytes())
                && threshold::complained_at_start();
            if !seen_at_start {
                base::env::complain_malformed(
                    "FREEZETRAP_ALLOC_THRESHOLD",
                    v.as_bytes(),
                    e,
                    base::parse::SIZE_FORM,
                    "large-allocation recording stays off",
                );
            }
        }
    }
}

/// Starts the reporter when recording is on (`FREEZETRAP_ALLOC_THRESHOLD` set and valid, or
/// [`set_threshold`] called), writing to `writer`. Returns `None` when recording is off, or the
/// thread could not start (said on stderr).
pub fn start_reporter(writer: Arc<ReportWriter>, quiet: bool) -> Option<Reporter> {
    threshold()?;
    let mut cfg = ReporterConfig::new(writer);
    cfg.human_lines = !quiet;
    match Reporter::start(cfg) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("freezetrap: cannot start the reporter thread ({e}): events are still recorded and probed, not reported");
            None
        }
    }
}

/// Reads the environment and starts the reporter if recording is on. The returned reporter
/// reports what is left when dropped; keep it alive for the life of the program.
pub fn init_from_env() -> Option<Reporter> {
    setup::say_problems_once();
    reload_threshold_from_env();
    let env = EnvSettings::from_env();
    start_reporter(env.open_writer(), env.quiet)
}
