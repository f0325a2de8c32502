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
//! - *Frames show `??`*: the binary has no debug info; keep `debug = "line-tables-only"` in the
//!   release profile.
//! - *bpftrace user stacks are short*: build with `-C force-frame-pointers=yes`.
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod dirs;
pub mod inflight;
mod record;
pub mod report;
pub mod ring;
mod scope;
pub mod symbolize;
pub mod sys;
pub mod unwind;

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::Ordering;
use record::Request;
use std::path::PathBuf;
use std::sync::Arc;

pub use record::{mark_current_thread_internal, stats, RecorderStats};
pub use report::{ReportSink, ReportWriter, Reporter, ReporterConfig, ReporterStats};
pub use ring::{AllocKind, Cursor, CursorStats, RawEvent, RING};
pub use scope::assert_no_large_allocs;

/// The global-allocator wrapper. See the [crate docs](crate).
///
/// Every request passes to `inner`. Requests of at least the threshold take a cold slow path that
/// records them; smaller ones cost one relaxed load and one compare, with no thread-local access
/// and no shared write.
pub struct GuardedAlloc<A> {
    inner: A,
}

impl<A> GuardedAlloc<A> {
    /// Wraps `inner`. `const`, so it can initialise a `#[global_allocator]` static.
    pub const fn new(inner: A) -> Self {
        GuardedAlloc { inner }
    }

    /// The wrapped allocator.
    pub const fn inner(&self) -> &A {
        &self.inner
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
unsafe impl<A: GlobalAlloc> GlobalAlloc for GuardedAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < record::threshold() {
            // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
            return unsafe { self.inner.alloc(layout) };
        }
        // SAFETY: the request is the caller's, forwarded unchanged.
        unsafe { record::slow_path(&self.inner, Request::Alloc(layout)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < record::threshold() {
            // SAFETY: forwarded unchanged.
            return unsafe { self.inner.alloc_zeroed(layout) };
        }
        // SAFETY: the request is the caller's, forwarded unchanged.
        unsafe { record::slow_path(&self.inner, Request::AllocZeroed(layout)) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size < record::threshold() {
            // SAFETY: forwarded unchanged; `ptr` was allocated by `inner` via this wrapper.
            return unsafe { self.inner.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the request is the caller's, forwarded unchanged.
        unsafe {
            record::slow_path(
                &self.inner,
                Request::Realloc {
                    ptr,
                    layout,
                    new_size,
                },
            )
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; frees are never recorded.
        unsafe { self.inner.dealloc(ptr, layout) }
    }
}

/// Sets the recording threshold in code (`None` = off), overriding `FREEZETRAP_ALLOC_THRESHOLD`.
pub fn set_threshold(bytes: Option<usize>) {
    record::wait_init();
    scope::with_registry(|_| {
        record::BASE_THRESHOLD.store(bytes.unwrap_or(usize::MAX).max(1), Ordering::Relaxed)
    });
}

/// Sets how many raw frames are captured per oversized allocation (clamped to 1..=32),
/// overriding `FREEZETRAP_BACKTRACE_DEPTH`. Fewer frames make each event cheaper: unwinding
/// costs roughly 0.3 µs per frame.
pub fn set_backtrace_depth(frames: usize) {
    record::wait_init();
    record::DEPTH.store(frames.clamp(1, ring::MAX_FRAMES), Ordering::Relaxed);
}

/// The recording threshold in force (`None` = off). Active `assert_no_large_allocs` scopes do not
/// change it.
pub fn threshold() -> Option<usize> {
    record::wait_init();
    stats().threshold
}

/// True when [`GuardedAlloc`] is this program's global allocator (it has served an allocation).
pub fn is_installed() -> bool {
    let probe = std::hint::black_box(Box::new(0u8));
    drop(probe);
    record::initialised()
}

/// Re-reads `FREEZETRAP_ALLOC_THRESHOLD` through `std::env` (for programs that set it in
/// `main`, after the first allocation already read the environment) and applies it when it is
/// valid. A malformed value prints the usual one-line message, unless it was already reported
/// at start-up.
pub fn reload_threshold_from_env() {
    record::wait_init();
    let Ok(v) = std::env::var("FREEZETRAP_ALLOC_THRESHOLD") else {
        return;
    };
    match config::parse_size(v.as_bytes()) {
        Ok(t) => {
            if threshold() != Some(t) {
                set_threshold(Some(t));
            }
        }
        Err(e) => {
            let seen_at_start = config::getenv_bytes(c"FREEZETRAP_ALLOC_THRESHOLD")
                == Some(v.as_bytes())
                && record::complained_at_start();
            if !seen_at_start {
                config::complain_malformed(
                    "FREEZETRAP_ALLOC_THRESHOLD",
                    v.as_bytes(),
                    e,
                    config::SIZE_FORM,
                    "large-allocation recording stays off",
                );
            }
        }
    }
}

/// Settings read from the environment by [`init_from_env`].
#[derive(Debug, Clone)]
pub struct EnvSettings {
    /// `FREEZETRAP_OUT`, when it could be used (created 0700 if missing; refused unless owned by
    /// this process's user and not writable by group or others).
    pub out_dir: Option<PathBuf>,
    /// `FREEZETRAP_REPORT`.
    pub report: ReportSink,
    /// `FREEZETRAP_QUIET=1`: no human line per large allocation.
    pub quiet: bool,
    /// The open handle on `out_dir`: everything written there goes through it.
    out: Option<Arc<dirs::Dir>>,
}

impl EnvSettings {
    /// Reads `FREEZETRAP_OUT`, `FREEZETRAP_REPORT` and `FREEZETRAP_QUIET`. Problems print one line
    /// each and fall back to a safe default (no directory, report off, not quiet).
    pub fn from_env() -> EnvSettings {
        let out = std::env::var_os("FREEZETRAP_OUT").and_then(|d| {
            let d = PathBuf::from(d);
            match dirs::Dir::open_private(&d) {
                Ok(dir) => Some(Arc::new(dir)),
                Err(why) => {
                    eprintln!(
                        "freezetrap: FREEZETRAP_OUT={} is refused: {why}: reports and captures will not be written there",
                        d.display()
                    );
                    None
                }
            }
        });
        let out_dir = out.as_ref().map(|d| d.path().to_path_buf());
        let report = match std::env::var("FREEZETRAP_REPORT") {
            Ok(v) => ReportSink::parse(&v, out_dir.as_deref()),
            Err(std::env::VarError::NotPresent) => ReportSink::Off,
            Err(std::env::VarError::NotUnicode(v)) => ReportSink::File(match &out_dir {
                Some(dir) if std::path::Path::new(&v).is_relative() => dir.join(v),
                _ => PathBuf::from(v),
            }),
        };
        let quiet = match std::env::var("FREEZETRAP_QUIET") {
            Ok(v) => match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                other => {
                    eprintln!("freezetrap: FREEZETRAP_QUIET=\"{other}\" is not valid: expected 1 or 0; staying verbose");
                    false
                }
            },
            Err(std::env::VarError::NotPresent) => false,
            Err(std::env::VarError::NotUnicode(_)) => {
                eprintln!("freezetrap: FREEZETRAP_QUIET is not valid UTF-8: expected 1 or 0; staying verbose");
                false
            }
        };
        EnvSettings {
            out_dir,
            report,
            quiet,
            out,
        }
    }

    /// The open, checked `FREEZETRAP_OUT` directory.
    pub fn out(&self) -> Option<&Arc<dirs::Dir>> {
        self.out.as_ref()
    }

    /// Opens the report writer these settings name; on failure prints one line and returns a
    /// writer that discards JSON.
    pub fn open_writer(&self) -> Arc<ReportWriter> {
        match ReportWriter::open_in(self.report.clone(), self.out.as_deref()) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                eprintln!("freezetrap: {e}: the JSON report is off; check FREEZETRAP_REPORT");
                Arc::new(ReportWriter::off())
            }
        }
    }
}

/// Starts the reporter when recording is on (`FREEZETRAP_ALLOC_THRESHOLD` set and valid, or
/// [`set_threshold`] called), writing to `writer`. Returns `None` when recording is off, or the
/// thread could not start (said on stderr).
pub fn start_reporter(writer: Arc<ReportWriter>, quiet: bool) -> Option<Reporter> {
    threshold()?;
    let cfg = ReporterConfig {
        writer,
        human_lines: !quiet,
        poll_interval: std::time::Duration::from_millis(50),
    };
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
    reload_threshold_from_env();
    let env = EnvSettings::from_env();
    start_reporter(env.open_writer(), env.quiet)
}
