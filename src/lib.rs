//! freezetrap: catch the freezes nobody can log.
//!
//! See the README for the full story. Install the allocator, call [`init_from_env`], and set
//! `FREEZETRAP_*` variables:
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
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub use alloc_guard;
pub use alloc_guard::{assert_no_large_allocs, GuardedAlloc};
pub use probes;
pub use watchdog;
pub use watchdog::Heartbeat;

/// What [`init_from_env`] started. Keep it alive for the life of the program: dropping it
/// reports what is still pending and stops freezetrap's threads.
#[must_use = "dropping the handle stops freezetrap's background threads"]
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
