//! freezetrap: catch the freezes nobody can log.
//!
//! A service installs [`GuardedAlloc`] as its global allocator and calls [`init_from_env`] at
//! the top of `main`. With no `FREEZETRAP_*` variable set nothing runs, and an allocation costs
//! one relaxed load and one compare more than the inner allocator's:
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: freezetrap::GuardedAlloc<std::alloc::System> =
//!     freezetrap::GuardedAlloc::new(std::alloc::System);
//!
//! fn main() {
//!     let _freezetrap = freezetrap::init_from_env(); // off when no variable is set
//! }
//! ```
//!
//! Then, per variable (the README has the full table):
//! - `FREEZETRAP_ALLOC_THRESHOLD=256MiB` records every allocation at least that large, with a
//!   backtrace, and fires the USDT probe `freezetrap:large_alloc` ([`alloc_guard`], [`probes`]);
//! - `FREEZETRAP_STALL=500ms` starts the watchdog ([`watchdog`]): a [`Heartbeat`] that stops
//!   beating, or the whole process falling behind, is a stall, reported with the large
//!   allocations just before it and every thread's kernel state, and announced through the probe
//!   `freezetrap:stall_begin`;
//! - `FREEZETRAP_CAPTURE=/usr/local/bin/freezetrap-capture` runs that helper during the stall to
//!   record off-CPU stacks and `mmap_lock` waits with bpftrace. Or, without giving the service
//!   any privilege, run `freezetrap-capture arm --binary /path/to/service --out DIR` as root
//!   beside it: the armed recorder keeps the last seconds of the same data and writes them out on
//!   every `stall_begin` (the `freezetrap-capture` crate; with the `capture` feature it is
//!   also `freezetrap::capture`).
//!
//! Heartbeats mark progress where the service makes it:
//!
//! ```
//! let hb = freezetrap::Heartbeat::new("event-loop");
//! for _request in 0..3 {
//!     hb.beat(); // one relaxed store of the time
//!     // ... handle one request ...
//! }
//! ```
//!
//! In tests the same allocator enforces a size limit on a code path, with no variable set:
//!
//! ```should_panic
//! #[global_allocator]
//! static GLOBAL: freezetrap::GuardedAlloc<std::alloc::System> =
//!     freezetrap::GuardedAlloc::new(std::alloc::System);
//!
//! fn build_index(n: usize) -> Vec<u64> {
//!     (0..n as u64).collect()
//! }
//!
//! // Fine: 8 KiB.
//! freezetrap::assert_no_large_allocs(1 << 20, || build_index(1024));
//! // Panics, naming the 8 MiB allocation and its call site.
//! freezetrap::assert_no_large_allocs(1 << 20, || build_index(1 << 20));
//! ```
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use alloc_guard;
pub use alloc_guard::{assert_no_large_allocs, on_large_alloc, GuardedAlloc};
pub use probes;
pub use watchdog;
pub use watchdog::{on_stall, Heartbeat};

/// Heartbeats for Tokio runtimes ([`tokio::spawn_heartbeat`]).
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use watchdog::tokio;

/// The capture helper and armed recorder (`freezetrap-capture`) as a library: a service binary
/// can serve as its own helper with `capture::cli::run` (feature `capture`).
#[cfg(feature = "capture")]
#[cfg_attr(docsrs, doc(cfg(feature = "capture")))]
pub use freezetrap_capture as capture;

/// What [`init_from_env`] started. Keep it alive for the life of the program: dropping it
/// reports what is still pending and stops freezetrap's threads.
#[must_use = "dropping the handle stops freezetrap's background threads"]
#[derive(Debug)]
pub struct Freezetrap {
    // Field order is drop order: the watchdog stops (reporting open stalls) before the
    // allocation reporter flushes.
    watchdog: Option<watchdog::Watchdog>,
    reporter: Option<alloc_guard::Reporter>,
    settings: alloc_guard::EnvSettings,
}

impl Freezetrap {
    /// The large-allocation reporter, when recording is on.
    pub fn reporter(&self) -> Option<&alloc_guard::Reporter> {
        self.reporter.as_ref()
    }

    /// The watchdog, when `FREEZETRAP_STALL` is set.
    pub fn watchdog(&self) -> Option<&watchdog::Watchdog> {
        self.watchdog.as_ref()
    }

    /// The settings read from the environment.
    pub fn settings(&self) -> &alloc_guard::EnvSettings {
        &self.settings
    }
}

/// Reads the `FREEZETRAP_*` environment and starts what it asks for. Never fails the program:
/// malformed values print one line and leave that feature off. With no variable set it starts
/// nothing.
pub fn init_from_env() -> Freezetrap {
    alloc_guard::setup::say_problems_once();
    alloc_guard::reload_threshold_from_env();
    let settings = alloc_guard::EnvSettings::from_env();
    let writer = settings.open_writer();
    let reporter = alloc_guard::start_reporter(writer.clone(), settings.quiet);
    let watchdog = watchdog::WatchdogConfig::from_env(settings.out_dir.as_deref())
        .and_then(|cfg| watchdog::Watchdog::start_logged(cfg, writer));
    Freezetrap {
        watchdog,
        reporter,
        settings,
    }
}
