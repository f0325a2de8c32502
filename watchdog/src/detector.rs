//! The watchdog thread: wakes every tick on absolute deadlines, measures its own lateness
//! (process stalls) and samples heartbeats (thread stalls).
//!
//! # What the detection and trigger path may not do
//! It runs while the service may be frozen on `mmap_lock`, so between the wake-up and the end of
//! a stall it never allocates (records come from a pool filled at start), never forks (the
//! helper is spawned with posix_spawn), never reads `/proc/self/maps` (only per-task files that
//! do not take the lock), and never takes a lock another thread could hold while allocating.
//! Its stack is pre-faulted at start, so it does not page-fault into the lock either.

use crate::forksafe::{run_on_protected_stack, ForkSafeBox};
use crate::heartbeat::{slot_name, ACTIVE, HIGH_WATER, MAX_HEARTBEATS, SLOTS};
use crate::stall::{Scope, StallRecord};
use crate::trigger::{CaptureStatus, Trigger, TriggerEvent};
use crate::{Shared, WatchdogConfig};
use base::clock::monotonic_ns;
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Messages from the watchdog thread to the report thread.
pub(crate) enum Msg {
    /// A stall ended; report it and send the record back to the pool.
    Stall(ForkSafeBox<StallRecord>),
    /// A helper finished after its stall was reported.
    CaptureDone {
        stall_id: u64,
        status: CaptureStatus,
        dir: String,
        spawned_ns: u64,
    },
    /// A stall was detected but no record was free (the report thread is behind).
    Dropped { stall_id: u64 },
    /// The launcher process died: start a new one (forking is allowed on the report thread,
    /// and no stall is open) and send it back.
    RestartLauncher,
}

/// Per-heartbeat state private to the watchdog thread.
#[derive(Clone, Copy, Default)]
struct Watched {
    generation: u64,
    /// Beats before this time do not count as stale (set after a process stall, which froze
    /// every heartbeat thread for a reason already reported).
    floor_ns: u64,
    /// The open stall: id, start (the last beat) and when it was detected.
    stall: Option<(u64, u64, u64)>,
}

/// What the loop mutates, in one fork-proof block.
struct LoopState {
    watched: [Watched; MAX_HEARTBEATS],
    open: [Option<ForkSafeBox<StallRecord>>; MAX_HEARTBEATS],
    pool: [Option<ForkSafeBox<StallRecord>>; crate::POOL],
    trigger: Option<Trigger>,
    next_id: u64,
    /// A new launcher was asked for at this time (0 = not asked).
    restart_asked_ns: u64,
}

pub(crate) struct Detector {
    pub(crate) cfg: WatchdogConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) trigger: Option<Trigger>,
    /// Blank records; moved onto the fork-proof stack when the loop starts.
    pub(crate) pool: Vec<ForkSafeBox<StallRecord>>,
    /// Records coming back from the report thread.
    pub(crate) returned: Receiver<ForkSafeBox<StallRecord>>,
    pub(crate) out: Sender<Msg>,
    /// New launchers from the report thread (after one died).
    pub(crate) launchers: Receiver<crate::launcher::Launcher>,
    pub(crate) next_id: u64,
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

impl Detector {
    /// Thread entry: moves to a fork-proof stack region, then runs the loop there.
    pub(crate) fn start(self) {
        alloc_guard::internal::mark_current_thread_internal();
        crate::forksafe::unregister_rseq();
        let ((), marked) = run_on_protected_stack(move || self.run());
        if let Err(e) = marked {
            eprintln!("freezetrap: the watchdog's stack could not be protected from fork ({e}): a fork elsewhere may delay stall detection");
        }
    }

    fn run(mut self) {
        prefault_stack();
        // Everything the loop writes lives in fork-proof memory: this state block, the records,
        // and this thread's (marked) stack. Pages it only reads are mapped now.
        alloc_guard::internal::RING.touch_all();
        alloc_guard::internal::touch_in_flight();
        crate::forksafe::populate_code();
        let init = |p: *mut LoopState| {
            // SAFETY: `p` is valid for writes of a LoopState (ForkSafeBox::new_with's promise).
            unsafe {
                p.write(LoopState {
                    watched: [Watched::default(); MAX_HEARTBEATS],
                    open: [const { None }; MAX_HEARTBEATS],
                    pool: [const { None }; crate::POOL],
                    trigger: None,
                    next_id: 1,
                    restart_asked_ns: 0,
                })
            }
        };
        // SAFETY: `init` writes a whole LoopState.
        let mut st = match unsafe { ForkSafeBox::new_with(init) } {
            Ok(b) => b,
            Err(e) => {
                eprintln!("freezetrap: the watchdog cannot map its state ({e}): stalls will not be detected");
                return;
            }
        };
        for (slot, rec) in st.pool.iter_mut().zip(self.pool.drain(..)) {
            *slot = Some(rec);
        }
        st.trigger = self.trigger.take();
        // A dry run of the collection path, so its code and data pages are mapped before the
        // first real stall.
        if let Some(rec) = st.pool.iter_mut().flatten().next() {
            rec.collect(self.cfg.lookback.as_nanos() as u64);
        }
        st.next_id = self.next_id;
        let LoopState {
            watched,
            open,
            pool,
            trigger,
            next_id,
            restart_asked_ns,
        } = &mut *st;
        let tick = self.cfg.tick.as_nanos() as u64;
        let threshold = self.cfg.threshold.as_nanos() as u64;
        let lookback = self.cfg.lookback.as_nanos() as u64;
        let mut deadline = monotonic_ns() + tick;
        while !self.shared.stop.load(Ordering::Acquire) {
            base::raw::sleep_until(deadline);
            let now = monotonic_ns();
            let late = now.saturating_sub(deadline);
            self.shared.samples.push(late);
            // Take back records the report thread is done with, but not while a stall is open
            // (receiving writes the channel's heap memory, which a concurrent fork could freeze).
            if open.iter().all(Option::is_none) {
                while let Ok(rec) = self.returned.try_recv() {
                    if let Some(slot) = pool.iter_mut().find(|s| s.is_none()) {
                        *slot = Some(rec);
                    }
                }
            }

            if late >= threshold {
                // Everything, this thread included, was frozen: a process stall, seen after it
                // ended. Heartbeats did not move for the same reason: restart their clocks.
                let id = *next_id;
                *next_id += 1;
                probes::stall_begin(id, 0, late);
                probes::stall_end(id, late);
                match pool.iter_mut().find_map(Option::take) {
                    Some(mut rec) => {
                        rec.id = id;
                        rec.scope = Scope::Process;
                        rec.thread_id = 0;
                        rec.thread_name = [0; 32];
                        rec.start_ns = deadline;
                        rec.detected_ns = now;
                        rec.duration_ns = late;
                        rec.capture = CaptureStatus::NotConfigured;
                        rec.capture_spawned_ns = 0;
                        rec.collect(lookback);
                        let _ = self.out.try_send(Msg::Stall(rec));
                    }
                    None => {
                        let _ = self.out.try_send(Msg::Dropped { stall_id: id });
                    }
                }
                for w in watched.iter_mut() {
                    w.floor_ns = now;
                }
            }

            let high = HIGH_WATER.load(Ordering::Relaxed);
            for (i, slot) in SLOTS[..high].iter().enumerate() {
                let w = &mut watched[i];
                // Acquire: pairs with the Release in Heartbeat::try_new (name, tid, generation).
                let state = slot.state.load(Ordering::Acquire);
                let generation = slot.generation.load(Ordering::Relaxed);
                if state == crate::heartbeat::FREE || generation != w.generation {
                    if let Some(rec) = open[i].take() {
                        end_stall(&self.out, trigger.as_ref(), rec, now); // unregistered while stalled
                    }
                    if let Some((id, start, _)) = w.stall.take() {
                        probes::stall_end(id, now.saturating_sub(start));
                    }
                    *w = Watched {
                        generation,
                        floor_ns: 0,
                        stall: None,
                    };
                    continue;
                }
                let last = slot.last_ns.load(Ordering::Relaxed).max(w.floor_ns);
                if let Some((id, start, detected)) = w.stall {
                    // Progress (or an announced idle wait) ends the stall; it lasted until the
                    // first beat after it began.
                    let progressed = last > start;
                    if progressed || state != ACTIVE {
                        // A beat that read the clock before the stall but stored after it (the
                        // thread froze inside `beat`) must not shorten the stall below what was
                        // already observed at detection.
                        let end = if progressed { last.max(detected) } else { now };
                        match open[i].take() {
                            Some(mut rec) => {
                                rec.duration_ns = end.saturating_sub(rec.start_ns);
                                end_stall(&self.out, trigger.as_ref(), rec, now);
                            }
                            None => probes::stall_end(id, end.saturating_sub(start)),
                        }
                        w.stall = None;
                    }
                    continue;
                }
                if state != ACTIVE {
                    continue;
                }
                let age = now.saturating_sub(last);
                if age >= threshold {
                    let id = *next_id;
                    *next_id += 1;
                    let tid = slot.tid.load(Ordering::Relaxed);
                    probes::stall_begin(id, tid, age);
                    w.stall = Some((id, last, now));
                    let capture = match trigger.as_mut() {
                        Some(t) => t.fire(id, tid, now),
                        None => CaptureStatus::NotConfigured,
                    };
                    match pool.iter_mut().find_map(Option::take) {
                        Some(mut rec) => {
                            rec.id = id;
                            rec.scope = Scope::Thread;
                            rec.thread_id = tid;
                            rec.thread_name = slot_name(slot);
                            rec.start_ns = last;
                            rec.detected_ns = now;
                            rec.duration_ns = 0;
                            rec.capture = capture;
                            rec.capture_spawned_ns = 0;
                            rec.collect(lookback);
                            open[i] = Some(rec);
                        }
                        None => {
                            let _ = self.out.try_send(Msg::Dropped { stall_id: id });
                        }
                    }
                }
            }

            if let Some(t) = trigger.as_mut() {
                match t.poll() {
                    Some(TriggerEvent::Spawned { stall_id, mono_ns }) => {
                        if let Some(rec) = open.iter_mut().flatten().find(|r| r.id == stall_id) {
                            rec.capture_spawned_ns = mono_ns;
                        }
                    }
                    Some(TriggerEvent::Finished {
                        stall_id,
                        status,
                        spawned_ns,
                    }) => {
                        match open.iter_mut().flatten().find(|r| r.id == stall_id) {
                            Some(rec) => {
                                // The stall is still going: this goes into its report.
                                rec.capture = status;
                                rec.capture_spawned_ns = spawned_ns;
                            }
                            None => {
                                let dir = t.last_dir();
                                let _ = self.out.try_send(Msg::CaptureDone {
                                    stall_id,
                                    status,
                                    dir,
                                    spawned_ns,
                                });
                            }
                        }
                    }
                    Some(TriggerEvent::LauncherDied) | None => {}
                }
                if !t.has_launcher() {
                    // Relaxed: a monitoring value (fork-proof memory, like all we write here).
                    self.shared.launcher_pid.store(0, Ordering::Relaxed);
                }
                // A dead launcher is replaced once no stall is open (the report thread forks
                // the service for it), at most once a minute.
                if !t.has_launcher() && open.iter().all(Option::is_none) {
                    let ask = *restart_asked_ns == 0
                        || now.saturating_sub(*restart_asked_ns) > 60_000_000_000;
                    if ask && self.out.try_send(Msg::RestartLauncher).is_ok() {
                        *restart_asked_ns = now.max(1);
                    }
                    if let Ok(l) = self.launchers.try_recv() {
                        // Relaxed: a monitoring value; nothing else is published with it.
                        self.shared.launcher_pid.store(l.pid(), Ordering::Relaxed);
                        t.install_launcher(l);
                        *restart_asked_ns = 0;
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
            end_stall(&self.out, trigger.as_ref(), rec, now);
        }
    }
}

fn end_stall(
    out: &Sender<Msg>,
    trigger: Option<&Trigger>,
    mut rec: ForkSafeBox<StallRecord>,
    now: u64,
) {
    if rec.duration_ns == 0 {
        rec.duration_ns = now.saturating_sub(rec.start_ns);
    }
    probes::stall_end(rec.id, rec.duration_ns);
    // The stall is over: allocating is allowed again.
    rec.capture_dir.clear();
    if rec.capture.has_dir() {
        if let Some(t) = trigger {
            rec.capture_dir = t.last_dir();
        }
    }
    let _ = out.try_send(Msg::Stall(rec));
}
