//! The background reporter: turns recorded events into a human line on stderr and a JSON line in
//! the report, off the allocating threads.
//!
//! It runs on its own thread, marked internal (its allocations are never recorded), polls the
//! ring every [`ReporterConfig::poll_interval`] while events arrive and otherwise sleeps until
//! the next push wakes it ([`crate::ring::Ring::wait_for_push`]), symbolizes with a cache, and counts every event
//! it could not report (overwritten before it got to it) in [`ReporterStats::lost`], also writing
//! a `{"event":"dropped",...}` line so that nothing is lost silently.

use crate::cursor::Cursor;
use crate::event::RawEvent;
use crate::ring::RING;
use crate::symbolize::{first_user_frame, Frame, Symbolizer};
use crate::writer::ReportWriter;
use base::units::{HumanBytes, HumanNanos};
use serde::Serialize;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One large allocation: the contract's `large_alloc` line, typed (what `on_large_alloc`
/// callbacks, `tracing` and `metrics` get).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LargeAlloc {
    /// Sequence number.
    pub seq: u64,
    /// `alloc`, `alloc_zeroed` or `realloc`.
    pub kind: String,
    /// Requested size.
    pub size: u64,
    /// Size before a realloc, else 0.
    pub old_size: u64,
    /// Returned address (0 = the inner allocator failed).
    pub address: u64,
    /// Kernel thread id.
    pub thread_id: u64,
    /// Kernel thread name.
    pub thread_name: String,
    /// `CLOCK_MONOTONIC` ns at entry.
    pub ts_ns: u64,
    /// ns inside the inner allocator.
    pub duration_ns: u64,
    /// Caller frames, allocator frames removed.
    pub frames: Vec<Frame>,
    /// The growth hint, once allocations at this call site grow geometrically.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth: Option<String>,
}

impl LargeAlloc {
    /// The typed event for a recorded one, with its frames resolved.
    pub(crate) fn new(ev: &RawEvent, frames: Vec<Frame>, growth: Option<String>) -> LargeAlloc {
        LargeAlloc {
            seq: ev.seq,
            kind: ev.kind.as_str().to_string(),
            size: ev.size,
            old_size: ev.old_size,
            address: ev.address,
            thread_id: ev.thread_id,
            thread_name: ev.thread_name().to_string(),
            ts_ns: ev.ts_ns,
            duration_ns: ev.duration_ns,
            frames,
            growth,
        }
    }
}

/// A `large_alloc` line: the event with `"event": "large_alloc"` in front.
#[derive(Serialize)]
struct LargeAllocLine<'a> {
    event: &'static str,
    #[serde(flatten)]
    alloc: &'a LargeAlloc,
}

/// The human one-liner for an event, in freezetrap's message grammar.
pub fn human_line(ev: &RawEvent, frames: &[Frame]) -> String {
    let what = if ev.old_size > 0 {
        format!(
            "{} {} (from {})",
            HumanBytes(ev.size),
            ev.kind.as_str(),
            HumanBytes(ev.old_size)
        )
    } else {
        format!("{} {}", HumanBytes(ev.size), ev.kind.as_str())
    };
    let at = first_user_frame(frames)
        .map(|f| f.to_string())
        .unwrap_or_else(|| "<unknown caller>".into());
    let failed = if ev.address == 0 {
        " FAILED (null)"
    } else {
        ""
    };
    format!(
        "freezetrap: large allocation: {what}{failed} on thread '{}' (tid {}) took {} at {at}",
        ev.thread_name(),
        ev.thread_id,
        HumanNanos(ev.duration_ns)
    )
}

/// How the reporter behaves. Made with [`ReporterConfig::new`]; the fields can be changed after.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReporterConfig {
    /// Where JSON lines go.
    pub writer: Arc<ReportWriter>,
    /// Print one human line per event on stderr (`FREEZETRAP_QUIET=1` turns it off).
    pub human_lines: bool,
    /// How often the ring is polled while events arrive (a burst is reported in batches).
    /// Default 50 ms. With nothing to report the thread sleeps until the next oversized
    /// allocation wakes it: no timer in an idle service.
    pub poll_interval: Duration,
}

impl ReporterConfig {
    /// Reporting to `writer`, with a human line per event, polling every 50 ms.
    pub fn new(writer: Arc<ReportWriter>) -> Self {
        ReporterConfig {
            writer,
            human_lines: true,
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// What the reporter did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReporterStats {
    /// Events written.
    pub reported: u64,
    /// Events overwritten or abandoned before the reporter got to them.
    pub lost: u64,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// 1 once the thread, stopping, has reported what was left (a futex word the drop waits on).
    finished: AtomicU32,
    position: AtomicU64,
    reported: AtomicU64,
    lost: AtomicU64,
}

/// The running reporter thread. Dropping it reports what is left and stops the thread.
#[derive(Debug)]
pub struct Reporter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts the reporter thread (`freezetrap-report`). It reports events recorded from now on
    /// and those still in the ring from before.
    pub fn start(cfg: ReporterConfig) -> io::Result<Reporter> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            finished: AtomicU32::new(0),
            position: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("freezetrap-report".into())
            .spawn(move || run(cfg, sh))?;
        Ok(Reporter {
            shared,
            thread: Some(thread),
        })
    }

    /// Tallies so far.
    pub fn stats(&self) -> ReporterStats {
        ReporterStats {
            reported: self.shared.reported.load(Ordering::Acquire),
            lost: self.shared.lost.load(Ordering::Acquire),
        }
    }

    /// Waits until every event recorded before this call has been reported or counted lost, or
    /// `timeout` passes. Returns whether it caught up.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = RING.recorded();
        let deadline = Instant::now() + timeout;
        if let Some(t) = &self.thread {
            t.thread().unpark(); // it may be between polls
        }
        RING.wake_consumer(); // or waiting for a push
        while self.shared.position.load(Ordering::Acquire) < target {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl Drop for Reporter {
    /// Returns once every event recorded before it is reported: at once if the thread already
    /// has (`position` counts what it wrote, Release after writing), else when the thread,
    /// stopping, has written the rest. It is not joined: freeing its state and stack and
    /// exiting (~0.1 ms on this project's VM) goes on without the owner.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            RING.wake_consumer();
            #[cfg(ft_linux)]
            {
                let reported_all = self.shared.position.load(Ordering::Acquire) >= RING.recorded();
                while !reported_all && self.shared.finished.load(Ordering::Acquire) == 0 {
                    base::raw::sleep_until_or_woken(&self.shared.finished, 0, u64::MAX);
                }
                drop(t); // detached: it exits on its own
            }
            // (Elsewhere there is no futex to wait on: joined.)
            #[cfg(not(ft_linux))]
            let _ = t.join();
        }
    }
}

/// Held by the thread; dropped once it has reported what was left (or if it unwinds).
struct SaysFinished(Arc<Shared>);

impl Drop for SaysFinished {
    fn drop(&mut self) {
        // Release: the lines written before are visible to the owner that sees the flag.
        self.0.finished.store(1, Ordering::Release);
        #[cfg(ft_linux)]
        base::raw::wake_all(&self.0.finished);
    }
}

fn run(cfg: ReporterConfig, sh: Arc<Shared>) {
    let finished = SaysFinished(sh.clone());
    crate::record::mark_current_thread_internal();
    // Reporting can wait for a free CPU or the next tick: never preempt the service (see
    // `make_batch`).
    base::thread::make_batch(None);
    // Here rather than in `init_from_env` (see `setup::say_problems_once`).
    crate::setup::say_frame_pointer_problem_once();
    let mut sym = Symbolizer::new();
    let mut growth = crate::growth::GrowthTracker::new();
    let mut cursor = Cursor::new(&RING, true);
    let mut lost_announced = 0;
    loop {
        let stopping = sh.stop.load(Ordering::Acquire);
        let before = cursor.position();
        let stats = cursor.poll(|ev| {
            let frames = sym.resolve(ev.frames());
            // Once allocations at one call site grow by a steady factor, each line says so.
            let hint = first_user_frame(&frames)
                .map(|f| f.to_string())
                .and_then(|site| growth.record(&site, ev.size))
                .map(|g| g.hint());
            if cfg.human_lines {
                match &hint {
                    Some(h) => eprintln!("{}; {h}", human_line(ev, &frames)),
                    None => eprintln!("{}", human_line(ev, &frames)),
                }
            }
            let alloc = LargeAlloc::new(ev, frames, hint);
            cfg.writer.write_json(&LargeAllocLine {
                event: "large_alloc",
                alloc: &alloc,
            });
            crate::events::deliver(&alloc);
        });
        if stats.lost > lost_announced {
            let n = stats.lost - lost_announced;
            eprintln!(
                "freezetrap: {n} large-allocation event(s) dropped before they could be reported ({} in total): the ring holds the last {}",
                stats.lost,
                crate::ring::CAPACITY
            );
            cfg.writer.write_json(&serde_json::json!({
                "event": "dropped", "count": n, "total": stats.lost,
            }));
            lost_announced = stats.lost;
        }
        // Release: `flush` Acquire-loads position and then reads the counters.
        sh.reported.store(stats.read, Ordering::Release);
        sh.lost.store(stats.lost, Ordering::Release);
        sh.position.store(cursor.position(), Ordering::Release);
        if stopping {
            break;
        }
        if cursor.position() > before || RING.recorded() > cursor.position() {
            // Events are arriving (or one is still being written): poll again after a while,
            // so a burst is reported in batches.
            std::thread::park_timeout(cfg.poll_interval);
        } else {
            // Nothing to report: sleep until the next push wakes this thread (or a flush or
            // the drop does). No timer: an idle service pays nothing here.
            RING.wait_for_push(cursor.position());
        }
    }
    drop(finished);
}
