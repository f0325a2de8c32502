//! What caused a stall, from the evidence the watchdog gathers in-process, without eBPF: every
//! thread's state, `wchan` and kernel stack at detection and its counters over the stall
//! (faults, user and system time, run-queue wait), the process's cgroup throttling, pressure
//! (PSI) and reclaim counters, and the large allocations around the stall. Pure rules over
//! plain data, so they are tested on recorded evidence.
//!
//! The rules, in order (the first that fits wins):
//! 1. `cgroup_throttling`: the cgroup was throttled for at least half the window;
//! 2. `stopped`: the thread (or the whole process) was stopped, or no thread ran and none
//!    waited for a CPU;
//! 3. `mmap_lock`: the thread waits in `rwsem_down_*` for the `mmap_lock`; the holder is the
//!    thread whose kernel stack shows `dup_mmap` (fork), `munmap`, `mprotect`, ...;
//! 4. `reclaim`: direct reclaim or compaction on its stack, or reclaim counters and memory
//!    pressure grew;
//! 5. `blocked_io`: major faults, or an I/O wait on its stack;
//! 6. `first_touch`: on CPU in the kernel, minor faults by the hundred (fresh pages);
//! 7. `on_cpu`: on CPU in user code;
//! 8. `cpu_starvation`: runnable, waiting in the run queue;
//! 9. `lock_wait`: asleep on a futex while another thread made progress;
//! 10. `unknown`, saying what was seen.

use base::units::{HumanBytes, HumanNanos};
pub use base::verdict::{Cause, Confidence, Culprit, Verdict};

/// A thread's counters over a window (differences of two readings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Time on CPU (`schedstat` field 1), ns.
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU (`schedstat` field 2), ns.
    pub run_delay_ns: u64,
    /// User time (`stat`), ns (clock-tick granularity).
    pub utime_ns: u64,
    /// System time (`stat`), ns (clock-tick granularity).
    pub stime_ns: u64,
    /// Minor page faults.
    pub minflt: u64,
    /// Major page faults (read from storage).
    pub majflt: u64,
}

/// One thread, as seen at detection and over the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadEvidence {
    /// Kernel thread id.
    pub tid: u64,
    /// Name.
    pub name: String,
    /// State letter at detection (`R`, `S`, `D`, `T`, ...).
    pub state: char,
    /// Where it slept at detection (empty when running).
    pub wchan: String,
    /// Its kernel stack at detection, innermost first (empty without root).
    pub kernel_stack: Vec<String>,
    /// Its counters over the window; `None` when unreadable (the thread is gone).
    pub delta: Option<Counters>,
}

impl ThreadEvidence {
    fn in_stack(&self, names: &[&str]) -> Option<String> {
        self.kernel_stack
            .iter()
            .find(|f| names.iter().any(|n| f.starts_with(n)))
            .cloned()
            .or_else(|| {
                names
                    .iter()
                    .any(|n| !self.wchan.is_empty() && self.wchan.starts_with(n))
                    .then(|| self.wchan.clone())
            })
    }
}

/// Process-wide counters over the window; `None` where unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessEvidence {
    /// The process's CPU time (all threads), ns.
    pub cpu_ns: Option<u64>,
    /// The watchdog thread's own run-queue wait, ns (a process stall with the watchdog
    /// waiting for a CPU is starvation).
    pub watchdog_run_delay_ns: Option<u64>,
    /// The cgroup's throttled time, ns, and its path.
    pub throttled_ns: Option<u64>,
    /// The cgroup's path (for the text).
    pub cgroup: Option<String>,
    /// PSI `some` stall time, µs: CPU, memory, I/O.
    pub psi_cpu_us: Option<u64>,
    /// PSI memory `some`, µs.
    pub psi_memory_us: Option<u64>,
    /// PSI I/O `some`, µs.
    pub psi_io_us: Option<u64>,
    /// `/proc/vmstat` direct reclaim stalls (`allocstall_*`) plus compaction stalls.
    pub reclaim_stalls: Option<u64>,
    /// Processes created on the machine (`/proc/stat` `processes`): a fork holds `mmap_lock`.
    pub forks: Option<u64>,
}

/// A large allocation near the stall.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocEvidence {
    /// Bytes.
    pub size: u64,
    /// Allocating thread.
    pub thread_id: u64,
    /// Its name.
    pub thread_name: String,
    /// Still inside the allocator at detection.
    pub in_flight: bool,
    /// The first caller frame outside the allocator, as text.
    pub site: String,
    /// The growth hint for that call site, when its allocations grow geometrically.
    pub growth: Option<String>,
}

/// Everything a verdict is decided from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The whole process stalled (the watchdog itself woke late), not one heartbeat.
    pub process_scope: bool,
    /// How long the stall lasted, ns.
    pub duration_ns: u64,
    /// The window the counters cover, ns (for a thread stall: detection to end).
    pub window_ns: u64,
    /// The stalled thread (thread stalls), with its heartbeat's name.
    pub stalled: Option<ThreadEvidence>,
    /// Every other thread of the process.
    pub others: Vec<ThreadEvidence>,
    /// Process-wide counters.
    pub process: ProcessEvidence,
    /// Large allocations, the top suspect first.
    pub allocations: Vec<AllocEvidence>,
    /// What could not be read, each one short phrase.
    pub unreadable: Vec<String>,
}

/// Kernel functions where a thread waits for the `mmap_lock`: the rwsem slow paths, or — the
/// rwsem code inlined or skipped in the stack — the functions that take it, in state D.
const MMAP_LOCK_WAITS: &[&str] = &[
    "rwsem_down_write_slowpath",
    "rwsem_down_read_slowpath",
    "lock_mm_and_find_vma",
    "vm_mmap_pgoff",
    "__vm_munmap",
    "do_mprotect_pkey",
    "do_madvise",
    "__do_sys_brk",
    "__do_sys_mremap",
    "mmap_read_lock",
    "mmap_write_lock",
    "down_write_killable",
    "down_read_killable",
];
/// Direct reclaim and compaction.
const RECLAIM: &[&str] = &[
    "try_to_free_mem_cgroup_pages",
    "do_try_to_free_pages",
    "__alloc_pages_direct_reclaim",
    "__alloc_pages_direct_compact",
    "try_to_compact_pages",
    "shrink_node",
    "shrink_lruvec",
    "mem_cgroup_handle_over_high",
    "reclaim_high",
];
/// Waits for storage.
const IO_WAITS: &[&str] = &[
    "folio_wait_bit_common",
    "wait_on_page_bit_common",
    "io_schedule",
    "filemap_fault",
    "__folio_lock",
    "blk_mq_",
    "submit_bio_wait",
    "jbd2_",
    "bit_wait_io",
];
/// User-space lock waits.
const FUTEX: &[&str] = &["futex_"];
/// Voluntary sleeps.
const SLEEPS: &[&str] = &["hrtimer_nanosleep", "do_nanosleep", "clock_nanosleep"];

fn pct(part: u64, whole: u64) -> u64 {
    (part.saturating_mul(100)).checked_div(whole).unwrap_or(0)
}

/// The heaviest piece of `what` happening on another thread: the likeliest culprit of a wait.
fn busiest_other(e: &Evidence, stalled_tid: u64) -> Option<&ThreadEvidence> {
    e.others
        .iter()
        .filter(|t| t.tid != stalled_tid && !t.name.starts_with("freezetrap-"))
        .filter_map(|t| t.delta.map(|d| (t, d.cpu_ns)))
        .filter(|(_, cpu)| *cpu > 0)
        .max_by_key(|(_, cpu)| *cpu)
        .map(|(t, _)| t)
}

/// Decides the verdict. Never fails: `unknown` says what was seen.
pub fn decide(e: &Evidence) -> Verdict {
    let mut v = if e.process_scope {
        decide_process(e)
    } else {
        decide_thread(e)
    };
    v.evidence
        .extend(e.unreadable.iter().map(|u| format!("unreadable: {u}")));
    v
}

fn throttled(e: &Evidence, window: u64) -> Option<Verdict> {
    let t = e.process.throttled_ns.filter(|&t| t > 0)?;
    // cpu.stat sums throttled time over CPUs: with 2 CPUs it can be twice the wall time.
    let confidence = if t >= window / 2 {
        Confidence::High
    } else if t >= window / 10 {
        Confidence::Medium
    } else {
        return None;
    };
    let cg = e.process.cgroup.clone().unwrap_or_else(|| "?".into());
    let mut v = Verdict::new(
        Cause::CgroupThrottling,
        confidence,
        format!(
            "the cgroup's CPU quota was used up: its CPUs spent {} throttled (summed over CPUs) while the stall lasted {} (cgroup {cg}); raise its CPU limit or spread the work",
            HumanNanos(t),
            HumanNanos(e.duration_ns)
        ),
    );
    v.evidence
        .push(format!("cpu.stat throttled time grew {}", HumanNanos(t)));
    Some(v)
}

fn decide_process(e: &Evidence) -> Verdict {
    let d = e.duration_ns;
    if let Some(v) = throttled(e, d) {
        return v;
    }
    let p = &e.process;
    if let Some(w) = p.watchdog_run_delay_ns.filter(|&w| w >= d / 2) {
        let mut v = Verdict::new(
            Cause::CpuStarvation,
            Confidence::High,
            format!(
                "the whole process was runnable but not scheduled for {} of {}: other processes took the CPUs",
                HumanNanos(w),
                HumanNanos(d)
            ),
        );
        v.evidence.push(format!(
            "the watchdog's run-queue wait grew {}",
            HumanNanos(w)
        ));
        return v;
    }
    if let Some(r) = p.reclaim_stalls.filter(|&r| r > 0) {
        if p.psi_memory_us.is_some_and(|m| m * 1000 >= d / 4) {
            let mut v = Verdict::new(
                Cause::Reclaim,
                Confidence::Medium,
                format!(
                    "the whole process stalled {} under memory pressure ({r} direct reclaim or compaction stall(s)); give it more memory or lower its footprint",
                    HumanNanos(d)
                ),
            );
            v.evidence
                .push(format!("{r} reclaim/compaction stalls in /proc/vmstat"));
            return v;
        }
    }
    match (p.cpu_ns, p.watchdog_run_delay_ns) {
        (Some(cpu), Some(wait)) if pct(cpu, d) < 5 && pct(wait, d) < 10 => {
            // Not throttled is known only when the cgroup's counters could be read.
            let confidence = if p.throttled_ns.is_some() {
                Confidence::High
            } else {
                Confidence::Medium
            };
            let mut v = Verdict::new(
                Cause::Stopped,
                confidence,
                format!(
                    "the whole process was stopped for {} (SIGSTOP, a debugger or the cgroup freezer, or the machine paused): no thread ran and none waited for a CPU",
                    HumanNanos(d)
                ),
            );
            v.evidence.push(format!(
                "process CPU time grew {} and the watchdog's run-queue wait {}",
                HumanNanos(cpu),
                HumanNanos(wait)
            ));
            v
        }
        _ => Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!(
                "the whole process stalled {}: not throttled, not starved, not stopped as far as its counters show",
                HumanNanos(d)
            ),
        ),
    }
}

fn decide_thread(e: &Evidence) -> Verdict {
    let Some(st) = e.stalled.as_ref() else {
        return Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            "the stalled thread was not found in /proc",
        );
    };
    let w = e.window_ns.max(1);
    let who = format!("thread '{}'", st.name);
    let dur = HumanNanos(e.duration_ns);
    if let Some(v) = throttled(e, w) {
        return v;
    }
    if st.state == 'T' || st.state == 't' {
        let mut v = Verdict::new(
            Cause::Stopped,
            Confidence::High,
            format!("{who} was stopped for {dur} (SIGSTOP or a debugger)"),
        );
        v.evidence.push(format!("state {}", st.state));
        return v;
    }
    if let Some(v) = mmap_lock(e, st) {
        return v;
    }
    let d = st.delta.unwrap_or_default();
    if let Some(site) = st.in_stack(RECLAIM) {
        let mut v = Verdict::new(
            Cause::Reclaim,
            Confidence::High,
            format!("{who} stalled {dur} reclaiming memory ({site}): the process or its cgroup is short of memory"),
        );
        v.evidence.push(format!("kernel stack in {site}"));
        return v;
    }
    // Memory pressure: tasks stalled on memory (PSI) for a good part of the window, or the
    // kernel counted direct reclaim or compaction stalls.
    let psi_ms = e.process.psi_memory_us.map(|m| m.saturating_mul(1000));
    let stalls = e.process.reclaim_stalls.unwrap_or(0);
    if psi_ms.is_some_and(|m| m >= w / 4)
        && (stalls > 0 || d.cpu_ns + d.run_delay_ns < w / 2 || d.stime_ns >= w / 4)
    {
        let mut v = Verdict::new(
            Cause::Reclaim,
            Confidence::Medium,
            format!(
                "{who} stalled {dur} under memory pressure: tasks waited on memory (reclaim) for {} of the {} window{}; the process or its cgroup is short of memory",
                HumanNanos(psi_ms.unwrap_or(0)),
                HumanNanos(w),
                if stalls > 0 { format!(", {stalls} direct reclaim or compaction stall(s)") } else { String::new() }
            ),
        );
        v.evidence.push(format!(
            "PSI memory stall time grew {}",
            HumanNanos(psi_ms.unwrap_or(0))
        ));
        return v;
    }
    let io_site = st.in_stack(IO_WAITS);
    if d.majflt >= 50 || (io_site.is_some() && st.state == 'D') {
        let confidence = if d.majflt >= 50 && io_site.is_some() {
            Confidence::High
        } else {
            Confidence::Medium
        };
        let mut v = Verdict::new(
            Cause::BlockedIo,
            confidence,
            format!(
                "{who} waited {dur} on storage: {} major fault(s){}: a file read through mmap or swap; read it ahead (madvise WILLNEED) or keep it cached",
                d.majflt,
                io_site.as_ref().map(|s| format!(", in {s}")).unwrap_or_default()
            ),
        );
        v.evidence.push(format!("{} major faults", d.majflt));
        if let Some(s) = io_site {
            v.evidence.push(format!("state {} in {s}", st.state));
        }
        return v;
    }
    if d.minflt >= 100 && d.stime_ns >= w / 3 {
        return first_touch(e, st, d, w);
    }
    if d.utime_ns >= w / 2 || (d.cpu_ns >= w * 4 / 5 && d.minflt < 100) {
        let mut v = Verdict::new(
            Cause::OnCpu,
            Confidence::High,
            format!(
                "{who} ran user code the whole {dur} ({}% user time, {} minor faults): a long loop or computation on the thread that must stay responsive",
                pct(d.utime_ns, w).min(100),
                d.minflt
            ),
        )
        .with_culprit(st.tid, &st.name, "running user code");
        v.evidence.push(format!(
            "on CPU {} of the {} window",
            HumanNanos(d.cpu_ns),
            HumanNanos(w)
        ));
        return v;
    }
    if d.run_delay_ns >= w / 4 {
        let confidence = if d.run_delay_ns >= w / 2 {
            Confidence::High
        } else {
            Confidence::Medium
        };
        let mut v = Verdict::new(
            Cause::CpuStarvation,
            confidence,
            format!(
                "{who} was runnable but not scheduled: it waited {} in the run queue during this {dur} stall while other threads or processes took its CPU (a real-time or busy neighbour, or too few CPUs)",
                HumanNanos(d.run_delay_ns)
            ),
        );
        v.evidence.push(format!(
            "run-queue wait grew {}",
            HumanNanos(d.run_delay_ns)
        ));
        return v;
    }
    if let Some(site) = st.in_stack(FUTEX) {
        return lock_wait(e, st, &site);
    }
    let mut seen = format!("state {}", st.state);
    if !st.wchan.is_empty() {
        seen.push_str(&format!(" in {}", st.wchan));
    }
    if let Some(d) = st.delta {
        seen.push_str(&format!(
            ", on CPU {}% ({}% system), {} faults",
            pct(d.cpu_ns, w).min(100),
            pct(d.stime_ns, w).min(100),
            d.minflt + d.majflt
        ));
    }
    let text = if st.in_stack(SLEEPS).is_some() {
        format!("{who} stalled {dur} asleep ({seen}): a sleep, not a wait on anything freezetrap can see; call Heartbeat::idle() before waiting on purpose")
    } else {
        format!("{who} stalled {dur} ({seen}): no lock, I/O, memory or CPU wait explains it")
    };
    let mut v = Verdict::new(Cause::Unknown, Confidence::Low, text);
    v.evidence.push(seen);
    v
}

fn waits_on_mmap_lock(t: &ThreadEvidence) -> Option<String> {
    if t.state != 'D' {
        return None;
    }
    t.in_stack(MMAP_LOCK_WAITS)
}

fn mmap_lock(e: &Evidence, st: &ThreadEvidence) -> Option<Verdict> {
    let wait = waits_on_mmap_lock(st)?;
    let dur = HumanNanos(e.duration_ns);
    // The holder: a thread not itself waiting for the lock whose stack shows an operation
    // that takes it for write — a fork first, the likeliest long holder.
    let candidates: Vec<(&ThreadEvidence, &'static str)> = e
        .others
        .iter()
        .filter(|t| t.tid != st.tid && waits_on_mmap_lock(t).is_none())
        .filter_map(|t| base::verdict::mmap_lock_holder_op(&t.kernel_stack).map(|op| (t, op)))
        .collect();
    let holder = candidates
        .iter()
        .find(|(_, op)| op.starts_with("fork"))
        .or_else(|| candidates.first())
        .copied();
    let waiters = e
        .others
        .iter()
        .filter(|t| t.tid != st.tid && waits_on_mmap_lock(t).is_some())
        .count();
    let mut v = match holder {
        Some((h, op)) => Verdict::new(
            Cause::MmapLock,
            Confidence::High,
            format!(
                "blocked on mmap_lock for {dur}: thread '{}' held it for write in {op}",
                h.name
            ),
        )
        .with_culprit(h.tid, &h.name, op),
        None => {
            // A thread running on a CPU shows no kernel stack: the holder of a long write hold
            // (a fork copying page tables) is then the thread that ran while the others waited.
            let running = e
                .others
                .iter()
                .filter(|t| {
                    t.tid != st.tid
                        && !t.name.starts_with("freezetrap-")
                        && waits_on_mmap_lock(t).is_none()
                        && t.state == 'R'
                        && t.kernel_stack.is_empty()
                })
                .max_by_key(|t| t.delta.map_or(0, |d| d.cpu_ns));
            let forked = e.process.forks.is_some_and(|f| f > 0);
            match running {
                Some(r) if forked => Verdict::new(
                    Cause::MmapLock,
                    Confidence::Medium,
                    format!(
                        "blocked on mmap_lock for {dur}: thread '{}' most likely held it for write in fork (dup_mmap): it was running in the kernel while the others waited, and a process was forked meanwhile",
                        r.name
                    ),
                )
                .with_culprit(r.tid, &r.name, "fork (dup_mmap), likely"),
                Some(r) => Verdict::new(
                    Cause::MmapLock,
                    Confidence::Medium,
                    format!(
                        "blocked on mmap_lock for {dur}: held for write, most likely by thread '{}', which was running (a thread on a CPU shows no kernel stack, so its operation is not known)",
                        r.name
                    ),
                )
                .with_culprit(r.tid, &r.name, "running while holding it (operation unknown)"),
                None => Verdict::new(
                    Cause::MmapLock,
                    Confidence::Medium,
                    format!(
                        "blocked on mmap_lock for {dur}, held for write by another thread ({})",
                        if e.others.iter().any(|t| !t.kernel_stack.is_empty()) {
                            "no thread's kernel stack showed which when it was read"
                        } else {
                            "kernel stacks are readable only by root"
                        }
                    ),
                ),
            }
        }
    };
    v.evidence.push(format!("thread '{}' in {wait}", st.name));
    if waiters > 0 {
        v.evidence
            .push(format!("{waiters} other thread(s) waited on it too"));
    }
    if let Some((h, _)) = holder {
        v.evidence.push(format!(
            "holder '{}' in {}",
            h.name,
            h.kernel_stack
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join(" <- ")
        ));
    }
    Some(v)
}

fn first_touch(e: &Evidence, st: &ThreadEvidence, d: Counters, w: u64) -> Verdict {
    let dur = HumanNanos(e.duration_ns);
    let alloc = e
        .allocations
        .iter()
        .find(|a| a.thread_id == st.tid)
        .cloned();
    let (confidence, after) = match &alloc {
        Some(a) => (
            Confidence::High,
            format!(" after its {} allocation at {}", HumanBytes(a.size), a.site),
        ),
        None => (Confidence::Medium, String::new()),
    };
    let mut text = format!(
        "thread '{}' was on CPU faulting in fresh pages for {dur}{after} ({} minor faults, {}% system time)",
        st.name,
        d.minflt,
        pct(d.stime_ns, w).min(100)
    );
    match alloc.as_ref().and_then(|a| a.growth.clone()) {
        Some(g) => text.push_str(&format!("; {g}")),
        None => {
            text.push_str("; reserve or pre-fault the memory outside the latency-critical path")
        }
    }
    let mut v = Verdict::new(Cause::FirstTouch, confidence, text);
    if let Some(a) = &alloc {
        v = v.with_culprit(
            st.tid,
            &st.name,
            format!("filling a {} allocation", HumanBytes(a.size)),
        );
    }
    v.evidence.push(format!(
        "{} minor faults, system time {}",
        d.minflt,
        HumanNanos(d.stime_ns)
    ));
    v
}

fn lock_wait(e: &Evidence, st: &ThreadEvidence, site: &str) -> Verdict {
    let dur = HumanNanos(e.duration_ns);
    // The likeliest holder: a thread with a large allocation still in flight, else the one
    // that ran most meanwhile.
    let by_alloc = e
        .allocations
        .iter()
        .find(|a| a.in_flight && a.thread_id != st.tid);
    // Else a thread that made a large allocation just before and was running at detection or
    // ran meanwhile: filling it, most likely while holding the lock.
    let filling = by_alloc.is_none().then(|| {
        e.allocations.iter().find(|a| {
            a.thread_id != st.tid
                && e.others.iter().any(|t| {
                    t.tid == a.thread_id
                        && (t.state == 'R' || t.delta.is_some_and(|d| d.cpu_ns >= e.window_ns / 4))
                })
        })
    });
    let mut v = if let Some(a) = by_alloc {
        Verdict::new(
            Cause::LockWait,
            Confidence::High,
            format!(
                "thread '{}' waited {dur} on a lock ({site}) while thread '{}' was inside a {} allocation at {}: do not hold a lock across large allocations",
                st.name,
                a.thread_name,
                HumanBytes(a.size),
                a.site
            ),
        )
        .with_culprit(
            a.thread_id,
            &a.thread_name,
            format!("allocating {} while holding the lock", HumanBytes(a.size)),
        )
    } else if let Some(a) = filling.flatten() {
        Verdict::new(
            Cause::LockWait,
            Confidence::High,
            format!(
                "thread '{}' waited {dur} on a lock ({site}) while thread '{}' was busy with the {} it had just allocated at {}: do not hold a lock while filling large memory",
                st.name,
                a.thread_name,
                HumanBytes(a.size),
                a.site
            ),
        )
        .with_culprit(
            a.thread_id,
            &a.thread_name,
            format!("filling a {} allocation while holding the lock", HumanBytes(a.size)),
        )
    } else if let Some(b) = busiest_other(e, st.tid) {
        let cpu = b.delta.unwrap_or_default().cpu_ns;
        let confidence = if cpu >= e.window_ns / 2 {
            Confidence::Medium
        } else {
            Confidence::Low
        };
        Verdict::new(
            Cause::LockWait,
            confidence,
            format!(
                "thread '{}' waited {dur} on a lock ({site}) while thread '{}' ran {} (likely holding it)",
                st.name,
                b.name,
                HumanNanos(cpu)
            ),
        )
        .with_culprit(b.tid, &b.name, "running while the lock was held")
    } else {
        Verdict::new(
            Cause::LockWait,
            Confidence::Low,
            format!(
                "thread '{}' waited {dur} on a lock ({site}); no other thread ran meanwhile",
                st.name
            ),
        )
    };
    v.evidence.push(format!("state {} in {site}", st.state));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn thread(tid: u64, name: &str, state: char, wchan: &str, stack: &[&str]) -> ThreadEvidence {
        ThreadEvidence {
            tid,
            name: name.into(),
            state,
            wchan: wchan.into(),
            kernel_stack: stack.iter().map(|s| s.to_string()).collect(),
            delta: Some(Counters::default()),
        }
    }

    fn stall(st: ThreadEvidence, others: Vec<ThreadEvidence>) -> Evidence {
        Evidence {
            duration_ns: 500 * MS,
            window_ns: 300 * MS,
            stalled: Some(st),
            others,
            ..Default::default()
        }
    }

    #[test]
    fn a_fork_holding_mmap_lock_is_named_with_its_operation() {
        // As this kernel (6.18) shows it: the rwsem slow path is not in the waiter's stack.
        let faulting = thread(
            3,
            "mapper-1",
            'D',
            "lock_mm_and_find_vma",
            &[
                "lock_mm_and_find_vma",
                "exc_page_fault",
                "asm_exc_page_fault",
            ],
        );
        let forker = thread(
            1,
            "snapshot",
            'R',
            "",
            &[
                "copy_page_range",
                "dup_mmap",
                "copy_process",
                "kernel_clone",
            ],
        );
        let v = decide(&stall(faulting, vec![forker]));
        assert_eq!(
            (v.cause, v.confidence),
            (Cause::MmapLock, Confidence::High),
            "{}",
            v.text
        );
        let waiter = thread(
            2,
            "mapper",
            'D',
            "rwsem_down_write_slowpath",
            &["rwsem_down_write_slowpath", "vm_mmap_pgoff"],
        );
        let forker = thread(
            1,
            "snapshot",
            'R',
            "",
            &[
                "copy_pte_range",
                "copy_page_range",
                "dup_mmap",
                "copy_process",
            ],
        );
        let v = decide(&stall(waiter.clone(), vec![forker, waiter]));
        assert_eq!((v.cause, v.confidence), (Cause::MmapLock, Confidence::High));
        assert_eq!(v.text, "blocked on mmap_lock for 500.0 ms: thread 'snapshot' held it for write in fork (dup_mmap)");
        assert_eq!(v.culprit.unwrap().what, "fork (dup_mmap)");
        // Without root: the wait is seen in wchan, the holder is not.
        let mut blind = thread(2, "mapper", 'D', "rwsem_down_write_slowpath", &[]);
        blind.kernel_stack.clear();
        let v = decide(&stall(blind, vec![thread(1, "snapshot", 'R', "", &[])]));
        assert_eq!(
            (v.cause, v.confidence),
            (Cause::MmapLock, Confidence::Medium)
        );
    }

    #[test]
    fn counters_tell_first_touch_on_cpu_starvation_and_io_apart() {
        let mut t = thread(5, "indexer", 'R', "", &[]);
        t.delta = Some(Counters {
            cpu_ns: 290 * MS,
            stime_ns: 250 * MS,
            utime_ns: 40 * MS,
            minflt: 70_000,
            ..Default::default()
        });
        let mut e = stall(t.clone(), vec![]);
        e.allocations.push(AllocEvidence {
            size: 1 << 30,
            thread_id: 5,
            thread_name: "indexer".into(),
            site: "svc::index (src/index.rs:9)".into(),
            growth: Some("the 5th doubling at this call site".into()),
            ..Default::default()
        });
        let v = decide(&e);
        assert_eq!(
            (v.cause, v.confidence),
            (Cause::FirstTouch, Confidence::High),
            "{}",
            v.text
        );
        assert!(
            v.text
                .contains("after its 1.00 GiB allocation at svc::index")
                && v.text.ends_with("the 5th doubling at this call site"),
            "{}",
            v.text
        );

        t.delta = Some(Counters {
            cpu_ns: 299 * MS,
            utime_ns: 290 * MS,
            minflt: 3,
            ..Default::default()
        });
        assert_eq!(decide(&stall(t.clone(), vec![])).cause, Cause::OnCpu);

        t.delta = Some(Counters {
            cpu_ns: 10 * MS,
            run_delay_ns: 280 * MS,
            ..Default::default()
        });
        let v = decide(&stall(t.clone(), vec![]));
        assert_eq!(
            (v.cause, v.confidence),
            (Cause::CpuStarvation, Confidence::High)
        );

        let mut io = thread(
            5,
            "reader",
            'D',
            "folio_wait_bit_common",
            &["folio_wait_bit_common", "filemap_fault"],
        );
        io.delta = Some(Counters {
            majflt: 3000,
            cpu_ns: 20 * MS,
            ..Default::default()
        });
        let v = decide(&stall(io, vec![]));
        assert_eq!(
            (v.cause, v.confidence),
            (Cause::BlockedIo, Confidence::High)
        );
    }

    #[test]
    fn a_futex_wait_names_the_thread_inside_a_large_allocation() {
        let waiter = thread(
            3,
            "api",
            'S',
            "futex_wait_queue",
            &["futex_wait_queue", "futex_wait"],
        );
        let mut holder = thread(4, "loader", 'R', "", &[]);
        holder.delta = Some(Counters {
            cpu_ns: 290 * MS,
            ..Default::default()
        });
        let mut e = stall(waiter.clone(), vec![holder.clone()]);
        e.allocations.push(AllocEvidence {
            size: 1 << 30,
            thread_id: 4,
            thread_name: "loader".into(),
            in_flight: true,
            site: "svc::load".into(),
            ..Default::default()
        });
        let v = decide(&e);
        assert_eq!((v.cause, v.confidence), (Cause::LockWait, Confidence::High));
        assert_eq!(v.culprit.unwrap().thread_name, "loader");
        let v = decide(&stall(waiter, vec![holder]));
        assert_eq!(
            (v.cause, v.confidence),
            (Cause::LockWait, Confidence::Medium)
        );
    }

    #[test]
    fn process_stalls_are_throttling_starvation_or_a_stop() {
        let mut e = Evidence {
            process_scope: true,
            duration_ns: 900 * MS,
            window_ns: 1000 * MS,
            ..Default::default()
        };
        e.process = ProcessEvidence {
            cpu_ns: Some(0),
            watchdog_run_delay_ns: Some(0),
            throttled_ns: Some(880 * MS),
            cgroup: Some("/ft".into()),
            ..Default::default()
        };
        assert_eq!(decide(&e).cause, Cause::CgroupThrottling);
        e.process.throttled_ns = Some(0);
        e.process.watchdog_run_delay_ns = Some(850 * MS);
        assert_eq!(decide(&e).cause, Cause::CpuStarvation);
        e.process.watchdog_run_delay_ns = Some(MS);
        let v = decide(&e);
        assert_eq!((v.cause, v.confidence), (Cause::Stopped, Confidence::High));
        e.process.cpu_ns = Some(700 * MS);
        assert_eq!(decide(&e).cause, Cause::Unknown);
        e.process.cpu_ns = None;
        e.unreadable.push("cpu.stat".into());
        let v = decide(&e);
        assert_eq!(v.cause, Cause::Unknown);
        assert!(v.evidence.contains(&"unreadable: cpu.stat".to_string()));
    }

    #[test]
    fn a_plain_sleep_is_unknown_and_says_so() {
        let v = decide(&stall(
            thread(
                6,
                "shard-3",
                'S',
                "hrtimer_nanosleep",
                &["hrtimer_nanosleep", "do_nanosleep"],
            ),
            vec![],
        ));
        assert_eq!((v.cause, v.confidence), (Cause::Unknown, Confidence::Low));
        assert!(
            v.text
                .contains("asleep (state S in hrtimer_nanosleep, on CPU 0%"),
            "{}",
            v.text
        );
    }
}
