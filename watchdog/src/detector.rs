//! The watchdog thread: wakes every tick on absolute deadlines, measures its own lateness
//! (process stalls) and samples heartbeats (thread stalls).
//!
//! # What the detection and trigger path may not do
//! It runs while the service may be frozen on `mmap_lock`, so between the wake-up and the end of
//! a stall it never allocates (records come from a pool filled at start), never forks (the
//! helper is spawned with posix_spawn), never reads `/proc/self/maps` (only per-task files that
//! do not take the lock), and never takes a lock another thread could hold while allocating.
//! Its stack is pre-faulted at start, so it does not page-fault into the lock either.

use crate::heartbeat::{slot_name, ACTIVE, MAX_HEARTBEATS, SLOTS};
use crate::stall::{Scope, StallRecord};
use crate::trigger::{CaptureStatus, Trigger};
use crate::{Shared, WatchdogConfig};
use alloc_guard::sys::monotonic_ns;
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Messages from the watchdog thread to the report thread.
pub(crate) enum Msg {
    /// A stall ended; report it and send the record back to the pool.
    Stall(Box<StallRecord>),
    /// A helper finished after its stall was reported.
    CaptureDone {
        stall_id: u64,
        status: CaptureStatus,
        dir: String,
    },
    /// A stall was detected but no record was free (the report thread is behind).
    Dropped { stall_id: u64 },
}

/// Per-heartbeat state private to the watchdog thread.
#[derive(Clone, Copy, Default)]
struct Watched {
    generation: u64,
    beats: u64,
    last_progress_ns: u64,
    stall: Option<u64>,
}

pub(crate) struct Detector {
    pub(crate) cfg: WatchdogConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) trigger: Option<Trigger>,
    pub(crate) pool: Receiver<Box<StallRecord>>,
    pub(crate) out: Sender<Msg>,
}

#[inline(never)]
fn prefault_stack() {
    // Touch 256 KiB of stack now, so a stall never page-faults (and so never waits on the
    // mmap_lock) for stack growth on this thread.
    let mut buf = [0u8; 256 << 10];
    for i in (0..buf.len()).step_by(4096) {
        // SAFETY: in-bounds volatile write to a local buffer.
        unsafe { std::ptr::write_volatile(&mut buf[i], 1) };
    }
    std::hint::black_box(&buf);
}

fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as _,
        tv_nsec: (deadline_ns % 1_000_000_000) as _,
    };
    // SAFETY: valid timespec; EINTR just ends the sleep early, which the caller tolerates.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

impl Detector {
    pub(crate) fn run(mut self) {
        alloc_guard::mark_current_thread_internal();
        prefault_stack();
        let tick = self.cfg.tick.as_nanos() as u64;
        let threshold = self.cfg.threshold.as_nanos() as u64;
        let lookback = self.cfg.lookback.as_nanos() as u64;
        let mut watched = [Watched::default(); MAX_HEARTBEATS];
        let mut open: [Option<Box<StallRecord>>; MAX_HEARTBEATS] = [const { None }; MAX_HEARTBEATS];
        let mut deadline = monotonic_ns() + tick;
        while !self.shared.stop.load(Ordering::Acquire) {
            sleep_until(deadline);
            let now = monotonic_ns();
            let late = now.saturating_sub(deadline);
            self.shared.record_hiccup(late);

            if late >= threshold {
                // Everything, this thread included, was frozen: a process stall, seen after it
                // ended. Heartbeats did not move for the same reason: restart their clocks.
                let id = self.shared.next_stall_id();
                probes::stall_begin(id, 0, late);
                probes::stall_end(id, late);
                match self.pool.try_recv() {
                    Ok(mut rec) => {
                        rec.id = id;
                        rec.scope = Scope::Process;
                        rec.thread_id = 0;
                        rec.thread_name = [0; 32];
                        rec.start_ns = deadline;
                        rec.detected_ns = now;
                        rec.duration_ns = late;
                        rec.capture = CaptureStatus::NotConfigured;
                        rec.collect(lookback);
                        let _ = self.out.try_send(Msg::Stall(rec));
                    }
                    Err(_) => {
                        let _ = self.out.try_send(Msg::Dropped { stall_id: id });
                    }
                }
                for w in watched.iter_mut() {
                    w.last_progress_ns = now;
                }
            }

            for (i, slot) in SLOTS.iter().enumerate() {
                let w = &mut watched[i];
                // Acquire: pairs with the Release in Heartbeat::try_new (name, tid, generation).
                let state = slot.state.load(Ordering::Acquire);
                let generation = slot.generation.load(Ordering::Relaxed);
                if state == crate::heartbeat::FREE || generation != w.generation {
                    if let Some(rec) = open[i].take() {
                        self.end_stall(rec, now); // unregistered while stalled
                    }
                    *w = Watched {
                        generation,
                        beats: slot.beats.load(Ordering::Relaxed),
                        last_progress_ns: now,
                        stall: None,
                    };
                    continue;
                }
                let beats = slot.beats.load(Ordering::Relaxed);
                if beats != w.beats || state != ACTIVE {
                    w.beats = beats;
                    w.last_progress_ns = now;
                    if let Some(mut rec) = open[i].take() {
                        rec.duration_ns = now.saturating_sub(rec.start_ns);
                        self.end_stall(rec, now);
                    }
                    w.stall = None;
                    continue;
                }
                let age = now.saturating_sub(w.last_progress_ns);
                if w.stall.is_none() && age >= threshold {
                    let id = self.shared.next_stall_id();
                    let tid = slot.tid.load(Ordering::Relaxed);
                    probes::stall_begin(id, tid, age);
                    w.stall = Some(id);
                    let capture = match self.trigger.as_mut() {
                        Some(t) => t.fire(id, tid, now),
                        None => CaptureStatus::NotConfigured,
                    };
                    match self.pool.try_recv() {
                        Ok(mut rec) => {
                            rec.id = id;
                            rec.scope = Scope::Thread;
                            rec.thread_id = tid;
                            rec.thread_name = slot_name(slot);
                            rec.start_ns = w.last_progress_ns;
                            rec.detected_ns = now;
                            rec.duration_ns = 0;
                            rec.capture = capture;
                            rec.collect(lookback);
                            open[i] = Some(rec);
                        }
                        Err(_) => {
                            let _ = self.out.try_send(Msg::Dropped { stall_id: id });
                        }
                    }
                }
            }

            if let Some(t) = self.trigger.as_mut() {
                if let Some((stall_id, status)) = t.poll(now) {
                    match open.iter_mut().flatten().find(|r| r.id == stall_id) {
                        Some(rec) => rec.capture = status, // stall still going: goes in its report
                        None => {
                            let dir = t.last_dir();
                            let _ = self.out.try_send(Msg::CaptureDone {
                                stall_id,
                                status,
                                dir,
                            });
                        }
                    }
                }
            }

            deadline += tick;
            if deadline <= now {
                deadline = now + tick; // missed ticks are not made up
            }
        }
        // Shutting down: report stalls still open as they stand.
        for rec in open.iter_mut().filter_map(Option::take) {
            let now = monotonic_ns();
            self.end_stall(rec, now);
        }
    }

    fn end_stall(&mut self, mut rec: Box<StallRecord>, now: u64) {
        if rec.duration_ns == 0 {
            rec.duration_ns = now.saturating_sub(rec.start_ns);
        }
        probes::stall_end(rec.id, rec.duration_ns);
        // The stall is over: allocating is allowed again.
        rec.capture_dir.clear();
        if !matches!(
            rec.capture,
            CaptureStatus::NotConfigured
                | CaptureStatus::SkippedBusy
                | CaptureStatus::SkippedCooldown
                | CaptureStatus::SkippedHourlyCap
        ) {
            if let Some(t) = &self.trigger {
                rec.capture_dir = t.last_dir();
            }
        }
        let _ = self.out.try_send(Msg::Stall(rec));
    }
}
