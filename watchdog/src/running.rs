//! The running watchdog (Linux): its two threads, and the state they share with the handle.

use crate::config::WatchdogConfig;
use crate::{detector, forksafe, report, trigger, HiccupStats};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Records kept ready for stalls (more concurrent stalls than this are counted, not detailed).
pub(crate) const POOL: usize = 8;

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
    /// 1 once the owner is dropped; the watchdog sleeps on it (a futex word), so the drop
    /// wakes it at once instead of waiting for its next tick.
    pub(crate) stop: AtomicU32,
    /// The capture launcher's pid (0: none), for monitoring. In fork-proof memory: the watchdog
    /// thread writes it.
    pub(crate) launcher_pid: forksafe::ForkSafeBox<core::sync::atomic::AtomicU32>,
    pub(crate) samples: forksafe::ForkSafeBox<SampleRing>,
    hiccups: Mutex<(hdrhistogram::Histogram<u64>, u64)>,
}

impl Shared {
    /// Moves new lateness samples (ns) into the histogram (µs).
    fn drain(&self) -> MutexGuard<'_, (hdrhistogram::Histogram<u64>, u64)> {
        let mut g = self.hiccups.lock().unwrap_or_else(|e| e.into_inner());
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

/// The watchdog's threads and shared state.
pub(crate) struct Running {
    shared: Arc<Shared>,
    detector: Option<JoinHandle<()>>,
    reporter: Option<JoinHandle<()>>,
}

impl Running {
    pub(crate) fn start(
        cfg: WatchdogConfig,
        writer: Arc<alloc_guard::ReportWriter>,
        trigger: Option<trigger::Trigger>,
    ) -> std::io::Result<Running> {
        let hist = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
            .map_err(|e| std::io::Error::other(format!("histogram: {e}")))?;
        let samples = forksafe::ForkSafeBox::<SampleRing>::new_zeroed()?;
        let shared = Arc::new(Shared {
            stop: AtomicU32::new(0),
            launcher_pid: forksafe::ForkSafeBox::new_zeroed()?,
            samples,
            hiccups: Mutex::new((hist, 0)),
        });
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
            pool: Vec::with_capacity(POOL),
            returned: pool_rx,
            out: out_tx,
            launchers: launcher_rx,
            next_id: 1,
        };
        let detector = std::thread::Builder::new()
            .name("freezetrap-watchdog".into())
            .spawn(move || det.start())?;
        Ok(Running {
            shared,
            detector: Some(detector),
            reporter: Some(reporter),
        })
    }

    /// The capture launcher's pid, while there is one.
    pub(crate) fn launcher_pid(&self) -> Option<u32> {
        // Relaxed: a monitoring value.
        match self.shared.launcher_pid.load(Ordering::Relaxed) {
            0 => None,
            p => Some(p),
        }
    }

    /// Percentiles of the watchdog's wake-up lateness so far.
    pub(crate) fn hiccups(&self) -> HiccupStats {
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
    pub(crate) fn cpu_time(&self) -> Option<std::time::Duration> {
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

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.stop.store(1, Ordering::Release);
        base::raw::wake_all(&self.shared.stop);
        if let Some(d) = self.detector.take() {
            let _ = d.join(); // drops the sender: the report thread drains and exits
        }
        if let Some(r) = self.reporter.take() {
            let _ = r.join();
        }
    }
}
