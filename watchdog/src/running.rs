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

/// What the watchdog thread publishes for the owner's drop (see `Running::drop`).
pub(crate) struct Progress {
    /// 0 while the watchdog thread sleeps between ticks, 1 while it works.
    pub(crate) busy: AtomicU32,
    /// Stalls open when it last went to sleep.
    pub(crate) open: AtomicU32,
    /// Messages it has sent to the report thread.
    pub(crate) sent: AtomicU64,
}

// SAFETY: atomics only; all zeroes is "asleep, nothing open, nothing sent".
unsafe impl forksafe::Zeroable for Progress {}

/// The watchdog thread's end of the report channel: it counts what it sends, so the owner's
/// drop can tell whether anything is still to be reported.
pub(crate) struct ReportTx {
    tx: crossbeam_channel::Sender<detector::Msg>,
    shared: Arc<Shared>,
}

impl ReportTx {
    /// Sends without blocking (a full channel drops the message, as before); no allocation.
    pub(crate) fn try_send(
        &self,
        m: detector::Msg,
    ) -> Result<(), crossbeam_channel::TrySendError<detector::Msg>> {
        self.tx.try_send(m)?;
        // Relaxed: published to the owner by the Release of `busy` going to 0.
        self.shared.progress.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// State shared between the handle and the watchdog thread.
pub(crate) struct Shared {
    /// 1 once the owner is dropped; the watchdog sleeps on it (a futex word), so the drop
    /// wakes it at once instead of waiting for its next tick.
    pub(crate) stop: AtomicU32,
    /// 1 once the report thread has reported everything (its channel closed, the incidents
    /// cut short said): what the owner's drop waits for, rather than the threads' exits.
    reported: AtomicU32,
    /// Messages the report thread has handled (compared with `progress.sent`).
    handled: AtomicU64,
    /// What the watchdog thread leaves for the owner's drop to read each time it goes to sleep.
    /// In fork-proof memory: the watchdog thread writes it.
    pub(crate) progress: forksafe::ForkSafeBox<Progress>,
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
}

/// What the report thread is started with (by `Running::start` or by the watchdog thread).
pub(crate) struct ReportStart {
    rx: crossbeam_channel::Receiver<detector::Msg>,
    pool: crossbeam_channel::Sender<forksafe::ForkSafeBox<crate::stall::StallRecord>>,
    writer: Arc<alloc_guard::ReportWriter>,
    helper: Option<report::HelperInfo>,
    reported: SaysReported,
}

impl ReportStart {
    /// Starts the report thread (detached: it ends when the watchdog thread's sender is
    /// dropped). If it cannot start, `reported` is dropped with the rest: the owner's drop
    /// does not wait for it.
    pub(crate) fn spawn(self) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("freezetrap-stallrep".into())
            .spawn(move || report::run(self.rx, self.pool, self.writer, self.helper, self.reported))
            .map(drop)
    }
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
            reported: AtomicU32::new(0),
            handled: AtomicU64::new(0),
            progress: forksafe::ForkSafeBox::new_zeroed()?,
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
        let report = ReportStart {
            rx: out_rx,
            pool: pool_tx,
            writer,
            helper,
            reported: SaysReported(shared.clone()),
        };
        // The report thread is needed once stalls can be found, after the watchdog thread's
        // settling, which then starts it: a short-lived program never pays for it. Except when
        // the launcher has to be forked (no exec'd launcher, see `launcher_exec`): a fork must
        // happen now, while the service is small (forked 50 ms in, after the demo had filled
        // its 2 GiB cache, it froze the demo for 60-80 ms).
        let fork_now = report
            .helper
            .as_ref()
            .is_some_and(|h| h.spec.image.is_none());
        let report = if fork_now {
            report.spawn()?;
            None
        } else {
            Some(report)
        };
        // Busy until the watchdog thread first goes to sleep: a drop during its setup waits.
        shared.progress.busy.store(1, Ordering::SeqCst);
        let det = detector::Detector {
            cfg: cfg.clone(),
            shared: shared.clone(),
            trigger,
            pool: Vec::with_capacity(POOL),
            returned: pool_rx,
            out: ReportTx {
                tx: out_tx,
                shared: shared.clone(),
            },
            launchers: launcher_rx,
            report,
            next_id: 1,
        };
        let detector = std::thread::Builder::new()
            .name("freezetrap-watchdog".into())
            .spawn(move || det.start())?;
        Ok(Running {
            shared,
            detector: Some(detector),
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

/// Given to the report thread: dropped once it has reported everything (or if it unwinds), it
/// tells the owner's drop, which waits for that rather than for the thread to exit.
pub(crate) struct SaysReported(Arc<Shared>);

impl SaysReported {
    /// One message handled (its lines written).
    pub(crate) fn handled(&self) {
        // Release: what was written for it is visible to the owner that reads the count.
        self.0.handled.fetch_add(1, Ordering::Release);
    }
}

impl Drop for SaysReported {
    fn drop(&mut self) {
        // Release: every report written before is visible to the owner that sees the flag.
        self.0.reported.store(1, Ordering::Release);
        base::raw::wake_all(&self.0.reported);
    }
}

impl Drop for Running {
    /// Stops the watchdog and returns once everything is reported. Nothing to report (the
    /// watchdog thread asleep with no stall open, every message handled): it returns at once.
    /// Otherwise the watchdog thread ends the stalls still open and closes the report channel,
    /// and the drop waits until the report thread has written what is left. Neither thread is
    /// joined: their wake-ups, unmapping their records, freeing their stacks and exiting took
    /// 0.5-0.9 ms on this project's VM, what a short-lived program paid at every exit.
    fn drop(&mut self) {
        // SeqCst, with the watchdog thread's `busy` store and `stop` load after it wakes: either
        // this drop sees it busy, or it sees `stop` before it does any more work.
        self.shared.stop.store(1, Ordering::SeqCst);
        // Woken to stop, the watchdog thread would often preempt this one and end first
        // (measured: ~0.1-0.3 ms of a short-lived program's exit); as a batch thread it ends
        // on the other CPU, or after this one.
        if let Some(d) = &self.detector {
            use std::os::unix::thread::JoinHandleExt;
            base::thread::make_batch(Some(d.as_pthread_t()));
        }
        base::raw::wake_all(&self.shared.stop);
        let p = &self.shared.progress;
        let nothing_left = p.busy.load(Ordering::SeqCst) == 0
            && p.open.load(Ordering::Relaxed) == 0
            && self.shared.handled.load(Ordering::Acquire) >= p.sent.load(Ordering::Relaxed);
        while !nothing_left && self.shared.reported.load(Ordering::Acquire) == 0 {
            base::raw::sleep_until_or_woken(&self.shared.reported, 0, u64::MAX);
        }
        // Detached: they exit on their own.
        drop(self.detector.take());
    }
}
