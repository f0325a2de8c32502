//! `watchdog`: notices freezes from inside the process, names the large allocations behind
//! them, and starts an external capture while the freeze is still going on.
//!
//! Two detectors, both on wall-clock (`CLOCK_MONOTONIC`) time, so off-CPU waits count:
//! - **process hiccups** (jHiccup-style): the watchdog thread sleeps one tick on absolute
//!   deadlines; waking late by at least the threshold means the whole process was frozen
//!   (SIGSTOP, a VM pause, a global lock) — reported with scope `process`;
//! - **heartbeats**: [`Heartbeat`] handles that critical threads beat; one that has not moved
//!   for the threshold is a thread stall, detected while it is still going on.
//!
//! On a stall it fires `freezetrap:stall_begin`, collects suspects from `alloc-guard` (in
//! flight now, and large allocations from the look-back window on), reads every thread's
//! `/proc/self/task/*/{stat,wchan,stack}`, and starts `FREEZETRAP_CAPTURE` with posix_spawn.
//! When the stall ends it fires `stall_end` and the report thread writes the summary:
//!
//! ```text
//! freezetrap: thread 'indexer' (tid 4242) stalled 2.41 s; suspect: 1.06 GiB alloc on the same thread 3.0 ms before, at my_service::index::insert (svc/src/index.rs:57); capture: /var/tmp/ft/stall-1-4200/offcpu.svg
//! ```
//!
//! ```no_run
//! use std::time::Duration;
//! let cfg = freezetrap_watchdog::WatchdogConfig::new(Duration::from_millis(200));
//! let wd = freezetrap_watchdog::Watchdog::start(cfg, std::sync::Arc::new(alloc_guard::ReportWriter::off())).unwrap();
//! let hb = freezetrap_watchdog::Heartbeat::new("event-loop");
//! loop {
//!     hb.beat();
//!     // ... one turn of the loop ...
//! #   break;
//! }
//! drop(wd);
//! ```
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod config;
#[cfg(ft_linux)]
mod detector;
mod events;
#[cfg(ft_linux)]
#[doc(hidden)]
pub mod forksafe;
pub mod heartbeat;
#[cfg(ft_linux)]
mod jemalloc_stats;
#[cfg(ft_linux)]
mod launcher;
#[cfg(ft_linux)]
mod launcher_exec;
#[cfg(ft_linux)]
mod launcher_process;
#[cfg(ft_linux)]
#[doc(hidden)]
pub mod procview;
#[cfg(ft_linux)]
mod report;
#[cfg(ft_linux)]
mod running;
#[cfg(ft_linux)]
mod stall;
pub mod stall_report;
pub mod suspects;
#[cfg(ft_linux)]
mod sysview;
#[cfg(ft_linux)]
mod trigger;

pub mod verdict;

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[path = "tokio_heartbeat.rs"]
pub mod tokio;

pub use config::{CaptureConfig, WatchdogConfig};
pub use events::on_stall;
pub use heartbeat::Heartbeat;
pub use stall_report::StallReport;
#[cfg(ft_linux)]
pub use trigger::CaptureStatus;

use std::sync::Arc;

/// Percentiles of how late the watchdog woke, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HiccupStats {
    /// Samples (ticks).
    pub count: u64,
    /// Median lateness.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Worst.
    pub max_us: u64,
}

/// The running watchdog. Dropping it stops the thread and reports open stalls.
pub struct Watchdog {
    #[cfg(ft_linux)]
    running: running::Running,
    cfg: WatchdogConfig,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("config", &self.cfg)
            .field("capture_launcher_pid", &self.capture_launcher_pid())
            .finish()
    }
}

/// What the watchdog says when it cannot run on this OS.
pub const UNSUPPORTED: &str = "the watchdog (heartbeat and process stall detection, /proc views and captures) is Linux-only: it is off on this OS";

impl Watchdog {
    /// Starts the watchdog thread (`freezetrap-watchdog`) and its report thread. A helper that
    /// fails validation is refused with the reason; the watchdog then runs without captures
    /// (said on stderr by [`Watchdog::start_logged`]). Elsewhere than Linux it returns an
    /// `Unsupported` error ([`UNSUPPORTED`]).
    ///
    /// Nothing here waits: the watchdog thread sets itself up (its stall records,
    /// pre-faulting, the report thread, which starts the capture launcher) 50 ms later (at most
    /// one tick), so a program that exits sooner pays for none of that; detection starts a
    /// tick after it. Only a launcher that has to be a fork of the service (see
    /// [`Watchdog::capture_launcher_pid`]) is started at once, by the report thread, while the
    /// process is still small. Dropping the handle returns at once when nothing is left to
    /// report (see the README's performance section).
    pub fn start(
        cfg: WatchdogConfig,
        writer: Arc<alloc_guard::ReportWriter>,
    ) -> std::io::Result<Watchdog> {
        cfg.validate()
            .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
        #[cfg(ft_linux)]
        {
            let trigger = match &cfg.capture {
                Some(c) => Some(trigger::Trigger::new(c.clone()).map_err(|why| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "FREEZETRAP_CAPTURE={} is refused: {why}",
                            c.helper.display()
                        ),
                    )
                })?),
                None => None,
            };
            let running = running::Running::start(cfg.clone(), writer, trigger)?;
            Ok(Watchdog { running, cfg })
        }
        #[cfg(not(ft_linux))]
        {
            let _ = writer;
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                UNSUPPORTED,
            ))
        }
    }

    /// Like [`Watchdog::start`], but a refused helper prints one line and the watchdog runs
    /// without captures; an error only if the threads cannot start (also printed, as is
    /// [`UNSUPPORTED`] elsewhere than Linux).
    pub fn start_logged(
        #[allow(unused_mut)] mut cfg: WatchdogConfig,
        writer: Arc<alloc_guard::ReportWriter>,
    ) -> Option<Watchdog> {
        if let Err(why) = cfg.validate() {
            eprintln!("freezetrap: the watchdog's settings are refused: {why}: stalls will not be detected");
            return None;
        }
        #[cfg(ft_linux)]
        {
            let trigger = match &cfg.capture {
                Some(c) => match trigger::Trigger::new(c.clone()) {
                    Ok(t) => Some(t),
                    Err(why) => {
                        eprintln!("freezetrap: FREEZETRAP_CAPTURE={} is refused: {why}; stalls are still detected and reported, without captures", c.helper.display());
                        cfg.capture = None;
                        None
                    }
                },
                None => None,
            };
            match running::Running::start(cfg.clone(), writer, trigger) {
                Ok(running) => Some(Watchdog { running, cfg }),
                Err(e) => {
                    eprintln!(
                        "freezetrap: cannot start the watchdog ({e}): stalls will not be detected"
                    );
                    None
                }
            }
        }
        #[cfg(not(ft_linux))]
        {
            let _ = writer;
            eprintln!("freezetrap: {UNSUPPORTED}");
            None
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &WatchdogConfig {
        &self.cfg
    }

    /// The pid of the process that starts capture helpers (see the README's "How the capture is
    /// started during a freeze"), while there is one. It is the service's own executable,
    /// exec'd (`argv[0]` `freezetrap-launcher`), or where that cannot be used (not glibc,
    /// freezetrap linked into a shared library, an executable writable by group or others) a
    /// fork of the service. `None` until the watchdog thread has set up (50 ms after start, at
    /// most a tick) and installed the launcher the report thread started, a few milliseconds
    /// later.
    pub fn capture_launcher_pid(&self) -> Option<u32> {
        #[cfg(ft_linux)]
        {
            self.running.launcher_pid()
        }
        #[cfg(not(ft_linux))]
        {
            None
        }
    }

    /// Percentiles of the watchdog's wake-up lateness so far.
    pub fn hiccups(&self) -> HiccupStats {
        #[cfg(ft_linux)]
        {
            self.running.hiccups()
        }
        #[cfg(not(ft_linux))]
        {
            HiccupStats {
                count: 0,
                p50_us: 0,
                p99_us: 0,
                max_us: 0,
            }
        }
    }

    /// CPU time the watchdog thread has used so far (its per-thread CPU clock), for measuring
    /// its overhead.
    pub fn cpu_time(&self) -> Option<std::time::Duration> {
        #[cfg(ft_linux)]
        {
            self.running.cpu_time()
        }
        #[cfg(not(ft_linux))]
        {
            None
        }
    }
}
