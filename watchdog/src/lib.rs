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

pub mod config;
mod detector;
pub mod forksafe;
pub mod heartbeat;
mod launcher;
pub mod procview;
mod report;
pub mod stall;
pub mod suspects;
pub mod trigger;

#[cfg(feature = "tokio")]
#[path = "tokio_heartbeat.rs"]
pub mod tokio;

pub use config::{CaptureConfig, WatchdogConfig};
pub use heartbeat::Heartbeat;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Records kept ready for stalls (more concurrent stalls than this are counted, not detailed).
const POOL: usize = 4;

/// Lateness samples from the watchdog thread, fed into the histogram by readers.
///
/// Single producer (the watchdog), which only stores into fork-proof memory: one Relaxed store
/// of the sample, then a Release store of `head`. The consumer (under the histogram lock)
/// Acquire-loads `head`, so the samples before it are visible; if the producer lapped it, the
/// overwritten samples are skipped.
pub(crate) struct SampleRing {
    head: AtomicU64,
    samples: [AtomicU64; SAMPLES],
}

const SAMPLES: usize = 4096;

// SAFETY: a SampleRing is atomics only; all zeroes is an empty ring.
unsafe impl forksafe::Zeroable for SampleRing {}

impl SampleRing {
    pub(crate) fn push(&self, v: u64) {
        let h = self.head.load(Ordering::Relaxed);
        self.samples[(h % SAMPLES as u64) as usize].store(v, Ordering::Relaxed);
        self.head.store(h + 1, Ordering::Release);
    }
}

/// State shared between the handle and the watchdog thread.
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    /// The capture launcher's pid (0: none), for monitoring. In fork-proof memory: the watchdog
    /// thread writes it.
    pub(crate) launcher_pid: forksafe::ForkSafeBox<core::sync::atomic::AtomicU32>,
    pub(crate) samples: forksafe::ForkSafeBox<SampleRing>,
    hiccups: parking_lot::Mutex<(hdrhistogram::Histogram<u64>, u64)>,
}

impl Shared {
    /// Moves new lateness samples (ns) into the histogram (µs).
    fn drain(&self) -> parking_lot::MutexGuard<'_, (hdrhistogram::Histogram<u64>, u64)> {
        let mut g = self.hiccups.lock();
        let head = self.samples.head.load(Ordering::Acquire);
        let mut tail = g.1.max(head.saturating_sub(SAMPLES as u64));
        while tail < head {
            let v = self.samples.samples[(tail % SAMPLES as u64) as usize].load(Ordering::Relaxed);
            g.0.saturating_record((v / 1000).max(1));
            tail += 1;
        }
        g.1 = tail;
        g
    }
}

/// Percentiles of how late the watchdog woke, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    shared: Arc<Shared>,
    detector: Option<JoinHandle<()>>,
    reporter: Option<JoinHandle<()>>,
    cfg: WatchdogConfig,
}

impl Watchdog {
    /// Starts the watchdog thread (`freezetrap-watchdog`) and its report thread. A helper that
    /// fails validation is refused with the reason; the watchdog then runs without captures
    /// (said on stderr by [`Watchdog::start_logged`]).
    pub fn start(
        cfg: WatchdogConfig,
        writer: Arc<alloc_guard::ReportWriter>,
    ) -> std::io::Result<Watchdog> {
        cfg.validate()
            .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
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
        Self::start_with(cfg, writer, trigger)
    }

    /// Like [`Watchdog::start`], but a refused helper prints one line and the watchdog runs
    /// without captures; an error only if the threads cannot start (also printed).
    pub fn start_logged(
        mut cfg: WatchdogConfig,
        writer: Arc<alloc_guard::ReportWriter>,
    ) -> Option<Watchdog> {
        if let Err(why) = cfg.validate() {
            eprintln!("freezetrap: the watchdog's settings are refused: {why}: stalls will not be detected");
            return None;
        }
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
        match Self::start_with(cfg, writer, trigger) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!(
                    "freezetrap: cannot start the watchdog ({e}): stalls will not be detected"
                );
                None
            }
        }
    }

    fn start_with(
        cfg: WatchdogConfig,
        writer: Arc<alloc_guard::ReportWriter>,
        trigger: Option<trigger::Trigger>,
    ) -> std::io::Result<Watchdog> {
        let hist = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
            .map_err(|e| std::io::Error::other(format!("histogram: {e}")))?;
        let samples = forksafe::ForkSafeBox::<SampleRing>::new_zeroed()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            launcher_pid: forksafe::ForkSafeBox::new_zeroed()?,
            samples,
            hiccups: parking_lot::Mutex::new((hist, 0)),
        });
        // Relaxed: a monitoring value; nothing else is published with it.
        shared.launcher_pid.store(
            trigger.as_ref().and_then(|t| t.launcher_pid()).unwrap_or(0),
            Ordering::Relaxed,
        );
        let mut pool = Vec::with_capacity(POOL);
        for _ in 0..POOL {
            pool.push(stall::StallRecord::new_fork_safe()?);
        }
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(POOL);
        let (out_tx, out_rx) = crossbeam_channel::bounded(POOL * 4);
        let (launcher_tx, launcher_rx) = crossbeam_channel::bounded(1);
        let helper = trigger.as_ref().map(|t| report::HelperInfo {
            helper: t.config().helper.display().to_string(),
            out: t.out().clone(),
            max_bytes: t.config().max_bytes,
            spec: t.spec(),
            launchers: launcher_tx,
        });
        let reporter = std::thread::Builder::new()
            .name("freezetrap-stallrep".into())
            .spawn(move || report::run(out_rx, pool_tx, writer, helper))?;
        let det = detector::Detector {
            cfg: cfg.clone(),
            shared: shared.clone(),
            trigger,
            pool,
            returned: pool_rx,
            out: out_tx,
            launchers: launcher_rx,
            next_id: 1,
        };
        let detector = std::thread::Builder::new()
            .name("freezetrap-watchdog".into())
            .spawn(move || det.start())?;
        Ok(Watchdog {
            shared,
            detector: Some(detector),
            reporter: Some(reporter),
            cfg,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &WatchdogConfig {
        &self.cfg
    }

    /// The pid of the process that starts capture helpers (see the README's "How the capture is
    /// started during a freeze"), while there is one.
    pub fn capture_launcher_pid(&self) -> Option<u32> {
        match self.shared.launcher_pid.load(Ordering::Relaxed) {
            0 => None,
            p => Some(p),
        }
    }

    /// Percentiles of the watchdog's wake-up lateness so far.
    pub fn hiccups(&self) -> HiccupStats {
        let g = self.shared.drain();
        let h = &g.0;
        HiccupStats {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }

    /// CPU time the watchdog thread has used so far (its per-thread CPU clock), for measuring
    /// its overhead.
    pub fn cpu_time(&self) -> Option<std::time::Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let pt = self.detector.as_ref()?.as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `pt` is a live thread (joined only in Drop); out-pointers are valid locals.
        unsafe {
            if libc::pthread_getcpuclockid(pt, &mut clock) != 0
                || libc::clock_gettime(clock, &mut ts) != 0
            {
                return None;
            }
        }
        Some(std::time::Duration::new(
            ts.tv_sec as u64,
            ts.tv_nsec as u32,
        ))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(d) = self.detector.take() {
            let _ = d.join(); // drops the sender: the report thread drains and exits
        }
        if let Some(r) = self.reporter.take() {
            let _ = r.join();
        }
    }
}
