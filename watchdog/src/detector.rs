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
use crate::running::{Shared, POOL};
use crate::stall::{Scope, StallRecord};
use crate::sysview::{SysCounters, SysView, FULL_EVERY};
use crate::trigger::{CaptureStatus, Trigger, TriggerEvent};
use crate::WatchdogConfig;
use base::clock::monotonic_ns;
use crossbeam_channel::Receiver;
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
    pool: [Option<ForkSafeBox<StallRecord>>; POOL],
    trigger: Option<Trigger>,
    next_id: u64,
    /// A new launcher was asked for at this time (0 = not asked).
    restart_asked_ns: u64,
    /// The process-wide counters' files, and their last two readings.
    sys: SysView,
    sys_prev: SysCounters,
    sys_now: SysCounters,
    ticks: u64,
}

pub(crate) struct Detector {
    pub(crate) cfg: WatchdogConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) trigger: Option<Trigger>,
    /// Blank records, made by this thread when it starts (not by the caller of `start`, which
    /// would wait for it), then moved into the fork-proof loop state.
    pub(crate) pool: Vec<ForkSafeBox<StallRecord>>,
    /// Records coming back from the report thread.
    pub(crate) returned: Receiver<ForkSafeBox<StallRecord>>,
    pub(crate) out: crate::running::ReportTx,
    /// New launchers from the report thread (after one died).
    pub(crate) launchers: Receiver<crate::launcher::Launcher>,
    /// The report thread, when this thread starts it (at setup, see `Running::start`).
    pub(crate) report: Option<crate::running::ReportStart>,
    pub(crate) next_id: u64,
}

/// How long the watchdog thread waits before it sets up (see `Detector::run`), at most a tick.
const SETTLE_NS: u64 = 50_000_000;

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

    /// The owner was dropped: setup stops between its steps (a short-lived program must not
    /// wait for a watchdog that never got to watch).
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire) != 0
    }

    fn run(mut self) {
        // A short-lived program (a CLI run, a test process) should not pay for what only a
        // stall needs: the records, the pre-faulting. So wait a little
        // first, asleep as far as the owner's drop is concerned, and leave without setting
        // anything up if it comes meanwhile. No stall could be found this early anyway: the
        // first needs a tick and a threshold after setup.
        let progress = &*self.shared.progress;
        progress.busy.store(0, Ordering::SeqCst);
        let settle = SETTLE_NS.min(ns(self.cfg.tick));
        base::raw::sleep_until_or_woken(
            &self.shared.stop,
            0,
            monotonic_ns().saturating_add(settle),
        );
        progress.busy.store(1, Ordering::SeqCst);
        if self.shared.stop.load(Ordering::SeqCst) != 0 {
            return;
        }
        if let Some(report) = self.report.take() {
            if let Err(e) = report.spawn() {
                eprintln!("freezetrap: cannot start the stall report thread ({e}): stalls will be detected, not reported");
            }
        }
        for _ in 0..POOL {
            if self.stopping() {
                return;
            }
            match StallRecord::new_fork_safe() {
                Ok(rec) => self.pool.push(rec),
                Err(e) => {
                    eprintln!("freezetrap: the watchdog cannot map its stall records ({e}): stalls will not be detected");
                    return;
                }
            }
        }
        if self.stopping() {
            return;
        }
        prefault_stack();
        // Everything the loop writes lives in fork-proof memory: this state block, the records,
        // and this thread's (marked) stack. Pages it only reads are mapped now.
        alloc_guard::internal::RING.touch_all();
        alloc_guard::internal::touch_in_flight();
        crate::forksafe::populate_code();
        if self.stopping() {
            return;
        }
        // The process-wide counters (opening them finds the cgroup: allocation, before the loop).
        let sys = SysView::open();
        // The report thread starts the first launcher as it starts: it counts as asked for.
        let launcher_asked_ns = if self.trigger.is_some() {
            monotonic_ns().max(1)
        } else {
            0
        };
        let init = |p: *mut LoopState| {
            // SAFETY: `p` is valid for writes of a LoopState (ForkSafeBox::new_with's promise).
            unsafe {
                p.write(LoopState {
                    watched: [Watched::default(); MAX_HEARTBEATS],
                    open: [const { None }; MAX_HEARTBEATS],
                    pool: [const { None }; POOL],
                    trigger: None,
                    next_id: 1,
                    restart_asked_ns: launcher_asked_ns,
                    sys,
                    sys_prev: SysCounters::default(),
                    sys_now: SysCounters::default(),
                    ticks: 0,
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
        let mut tick = Tick {
            st: &mut st,
            out: &self.out,
            returned: &self.returned,
            launchers: &self.launchers,
            shared: &self.shared,
            threshold: ns(self.cfg.threshold),
            lookback: ns(self.cfg.lookback),
        };
        let period = ns(self.cfg.tick);
        // A first reading, so the first tick already has a baseline.
        tick.sample_sys(u64::MAX);
        let mut deadline = monotonic_ns().saturating_add(period);
        while self.shared.stop.load(Ordering::Acquire) == 0 {
            // For the owner's drop, which returns at once if it finds this thread asleep with
            // nothing left to report (see `Running::drop`). Relaxed, published by the SeqCst
            // (Release) store of `busy`.
            progress.open.store(tick.open_count(), Ordering::Relaxed);
            progress.busy.store(0, Ordering::SeqCst);
            base::raw::sleep_until_or_woken(&self.shared.stop, 0, deadline);
            progress.busy.store(1, Ordering::SeqCst);
            if self.shared.stop.load(Ordering::SeqCst) != 0 {
                break;
            }
            let now = monotonic_ns();
            if now < deadline {
                continue; // a signal ended the wait early: not a tick
            }
            let late = now.saturating_sub(deadline);
            self.shared.samples.push(late);
            tick.sample_sys(late);
            tick.take_back_records();
            tick.install_launcher();
            if late >= tick.threshold {
                tick.process_stall(deadline, now, late);
            }
            tick.check_heartbeats(now);
            tick.poll_capture();
            tick.replace_dead_launcher(now);
            deadline = deadline.saturating_add(period);
            if deadline <= now {
                deadline = now.saturating_add(period); // missed ticks are not made up
            }
        }
        tick.shut_down();
        // Done with what the owner waits for: let the launcher go and close the report channel
        // now, before this thread unmaps its records and state.
        st.trigger = None;
        drop(self.out);
    }
}

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// One wake-up's work, in the steps the loop runs them in. Everything it writes is in
/// fork-proof memory (`st`) or on this thread's marked stack.
struct Tick<'a> {
    st: &'a mut ForkSafeBox<LoopState>,
    out: &'a crate::running::ReportTx,
    returned: &'a Receiver<ForkSafeBox<StallRecord>>,
    launchers: &'a Receiver<crate::launcher::Launcher>,
    shared: &'a Shared,
    threshold: u64,
    lookback: u64,
}

impl Tick<'_> {
    fn open_count(&self) -> u32 {
        self.st.open.iter().flatten().count() as u32
    }

    fn no_stall_open(&self) -> bool {
        self.st.open.iter().all(Option::is_none)
    }

    /// Reads the process-wide counters: the cheap ones every tick (the baseline a process
    /// stall, seen only after it ended, is measured from), the larger ones now and then and
    /// whenever the watchdog woke late.
    fn sample_sys(&mut self, late: u64) {
        let st = &mut **self.st;
        st.ticks += 1;
        st.sys_prev = st.sys_now;
        let full = late >= self.threshold || st.ticks % FULL_EVERY == 1;
        st.sys.sample(&mut st.sys_now, full);
    }

    /// A full reading of the process-wide counters, now.
    fn sys_full(&self) -> SysCounters {
        let mut c = SysCounters::default();
        self.st.sys.sample(&mut c, true);
        c
    }

    /// Ends the stall in `rec` (taken out of `open`): its counters at the end, and whether it
    /// was the last open stall of its incident.
    fn end(&mut self, mut rec: ForkSafeBox<StallRecord>, now: u64) {
        rec.procs.take_end();
        rec.sys_after = self.sys_full();
        rec.incident_last = !self
            .st
            .open
            .iter()
            .flatten()
            .any(|r| r.incident == rec.incident);
        end_stall(self.out, self.st.trigger.as_ref(), rec, now);
    }

    /// Takes back records the report thread is done with — but not while a stall is open:
    /// receiving writes the channel's heap memory, which a concurrent fork could freeze.
    fn take_back_records(&mut self) {
        if !self.no_stall_open() {
            return;
        }
        while let Ok(rec) = self.returned.try_recv() {
            if let Some(slot) = self.st.pool.iter_mut().find(|s| s.is_none()) {
                *slot = Some(rec);
            }
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.st.next_id;
        self.st.next_id += 1;
        id
    }

    /// The watchdog itself woke `late` ns after `deadline`: everything, this thread included,
    /// was frozen. A process stall, seen after it ended. Heartbeats did not move for the same
    /// reason: their clocks restart now.
    fn process_stall(&mut self, deadline: u64, now: u64, late: u64) {
        let id = self.next_id();
        probes::stall_begin(id, 0, late);
        probes::stall_end(id, late);
        match self.st.pool.iter_mut().find_map(Option::take) {
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
                rec.incident = id;
                rec.incident_last = true;
                rec.sys_before = self.st.sys_prev;
                rec.sys_after = self.st.sys_now;
                rec.collect(self.lookback);
                rec.procs.take_end();
                let _ = self.out.try_send(Msg::Stall(rec));
            }
            None => {
                let _ = self.out.try_send(Msg::Dropped { stall_id: id });
            }
        }
        for w in self.st.watched.iter_mut() {
            w.floor_ns = now;
        }
    }

    /// Every registered heartbeat: a stale one begins a thread stall, progress ends one.
    fn check_heartbeats(&mut self, now: u64) {
        let high = HIGH_WATER.load(Ordering::Relaxed);
        for (i, slot) in SLOTS[..high].iter().enumerate() {
            // Acquire: pairs with the Release in Heartbeat::try_new (name, tid, generation).
            let state = slot.state.load(Ordering::Acquire);
            let generation = slot.generation.load(Ordering::Relaxed);
            if state == crate::heartbeat::FREE || generation != self.st.watched[i].generation {
                self.forget(i, generation, now);
                continue;
            }
            let last = slot
                .last_ns
                .load(Ordering::Relaxed)
                .max(self.st.watched[i].floor_ns);
            if self.st.watched[i].stall.is_some() {
                self.end_if_progressed(i, state, last, now);
            } else if state == ACTIVE && now.saturating_sub(last) >= self.threshold {
                self.begin_thread_stall(i, slot, last, now);
            }
        }
    }

    /// Slot `i` was unregistered (or reused): a stall still open on it ends now.
    fn forget(&mut self, i: usize, generation: u64, now: u64) {
        if let Some(rec) = self.st.open[i].take() {
            self.end(rec, now);
        }
        if let Some((id, start, _)) = self.st.watched[i].stall.take() {
            probes::stall_end(id, now.saturating_sub(start));
        }
        self.st.watched[i] = Watched {
            generation,
            floor_ns: 0,
            stall: None,
        };
    }

    /// Progress (or an announced idle wait) ends the stall open on slot `i`; it lasted until
    /// the first beat after it began.
    fn end_if_progressed(&mut self, i: usize, state: u8, last: u64, now: u64) {
        let Some((id, start, detected)) = self.st.watched[i].stall else {
            return;
        };
        let progressed = last > start;
        if !progressed && state == ACTIVE {
            if let Some(rec) = self.st.open[i].as_mut() {
                let tid = rec.thread_id;
                rec.procs.refresh_end_of(tid);
            }
            return;
        }
        // A beat that read the clock before the stall but stored after it (the thread froze
        // inside `beat`) must not shorten the stall below what was already observed.
        let end = if progressed { last.max(detected) } else { now };
        match self.st.open[i].take() {
            Some(mut rec) => {
                rec.duration_ns = end.saturating_sub(rec.start_ns);
                self.end(rec, now);
            }
            None => probes::stall_end(id, end.saturating_sub(start)),
        }
        self.st.watched[i].stall = None;
    }

    /// Heartbeat `i` has not moved since `last`: a thread stall, detected while it goes on.
    /// Fires the probe, starts the capture and collects the suspects and the kernel view now.
    fn begin_thread_stall(&mut self, i: usize, slot: &crate::heartbeat::Slot, last: u64, now: u64) {
        let id = self.next_id();
        let tid = slot.tid.load(Ordering::Relaxed);
        probes::stall_begin(id, tid, now.saturating_sub(last));
        self.st.watched[i].stall = Some((id, last, now));
        let capture = match self.st.trigger.as_mut() {
            Some(t) => t.fire(id, tid, now),
            None => CaptureStatus::NotConfigured,
        };
        // A freeze stalls several heartbeats: a stall that begins while another is open joins
        // its incident.
        let incident = self
            .st
            .open
            .iter()
            .flatten()
            .map(|r| r.incident)
            .next()
            .unwrap_or(id);
        let sys = self.sys_full();
        match self.st.pool.iter_mut().find_map(Option::take) {
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
                rec.incident = incident;
                rec.incident_last = false;
                rec.sys_before = sys;
                rec.collect(self.lookback);
                self.st.open[i] = Some(rec);
            }
            None => {
                let _ = self.out.try_send(Msg::Dropped { stall_id: id });
            }
        }
    }

    /// What the launcher said about the capture in progress goes into the open stall's record,
    /// or, once the stall is over, into a message of its own. Between captures, every
    /// FULL_EVERY ticks: whether it is still there.
    fn poll_capture(&mut self) {
        let LoopState {
            open,
            trigger,
            ticks,
            ..
        } = &mut **self.st;
        let Some(t) = trigger.as_mut() else { return };
        // While no capture runs, the launcher can only have died: asking every FULL_EVERY
        // ticks is soon enough and saves a syscall per tick (~10 µs after a wake-up here).
        if !t.capturing() && *ticks % FULL_EVERY != 0 {
            return;
        }
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
            }) => match open.iter_mut().flatten().find(|r| r.id == stall_id) {
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
            },
            Some(TriggerEvent::LauncherDied) | None => {}
        }
    }

    /// Installs a launcher the report thread sent (the first one, started as it started, or a
    /// replacement), before stalls are processed: a stall found at the first tick has it. A
    /// lock-free receive and a move: nothing a frozen process could block.
    fn install_launcher(&mut self) {
        let Some(t) = self.st.trigger.as_mut() else {
            return;
        };
        if t.has_launcher() {
            return;
        }
        if let Ok(l) = self.launchers.try_recv() {
            // Relaxed: a monitoring value; nothing else is published with it.
            self.shared.launcher_pid.store(l.pid(), Ordering::Relaxed);
            t.install_launcher(l);
            self.st.restart_asked_ns = 0;
        }
    }

    /// A dead launcher is replaced once no stall is open (the report thread starts a new one
    /// for it), asked at most once a minute.
    fn replace_dead_launcher(&mut self, now: u64) {
        let quiet = self.no_stall_open();
        let Some(t) = self.st.trigger.as_mut() else {
            return;
        };
        if t.has_launcher() {
            return;
        }
        // Relaxed: a monitoring value (fork-proof memory, like all we write here).
        self.shared.launcher_pid.store(0, Ordering::Relaxed);
        if !quiet {
            return;
        }
        let asked = self.st.restart_asked_ns;
        if (asked == 0 || now.saturating_sub(asked) > 60_000_000_000)
            && self.out.try_send(Msg::RestartLauncher).is_ok()
        {
            self.st.restart_asked_ns = now.max(1);
        }
        let Some(t) = self.st.trigger.as_mut() else {
            return;
        };
        if let Ok(l) = self.launchers.try_recv() {
            // Relaxed: a monitoring value; nothing else is published with it.
            self.shared.launcher_pid.store(l.pid(), Ordering::Relaxed);
            t.install_launcher(l);
            self.st.restart_asked_ns = 0;
        }
    }

    /// Shutting down: stalls still open are reported as they stand.
    fn shut_down(&mut self) {
        for i in 0..self.st.open.len() {
            if let Some(rec) = self.st.open[i].take() {
                self.end(rec, monotonic_ns());
            }
        }
    }
}

fn end_stall(
    out: &crate::running::ReportTx,
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
