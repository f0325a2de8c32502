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

mod cases;
mod evidence;

use cases::{first_touch, lock_wait, mmap_lock, throttled};
pub use evidence::*;

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
    // A thread that spent most of the window neither running nor waiting for a CPU was waiting
    // on something: with the cgroup's tasks stalled on memory for an eighth of the window or
    // more, memory is the likeliest (seen: a writer in a 96 MiB cgroup, state R at detection
    // after sleeping 72% of the window, PSI memory at 15-33% of it from run to run).
    let psi_ms = e.process.psi_memory_us.map(|m| m.saturating_mul(1000));
    let stalls = e.process.reclaim_stalls.unwrap_or(0);
    let waiting = d.cpu_ns + d.run_delay_ns < w / 2;
    let strong =
        psi_ms.is_some_and(|m| m >= w / 4) && (stalls > 0 || waiting || d.stime_ns >= w / 4);
    // Or in the kernel a quarter of the window without faulting, yet off CPU a fifth of it:
    // what a thread reclaiming for its own writes does (seen: the same writer at 34-55% CPU,
    // nearly all system time, with PSI memory under a quarter of the window). A thread on CPU
    // nearly throughout is a large system call instead (below).
    let reclaiming = d.stime_ns >= w / 4 && d.minflt < 100 && d.cpu_ns < w * 4 / 5;
    // (Not a thread asleep in S at detection: a sleep is not a memory wait.)
    let weak = psi_ms.is_some_and(|m| m >= w / 8) && (waiting || reclaiming) && st.state != 'S';
    if strong || weak {
        let mut v = Verdict::new(
            Cause::Reclaim,
            if strong {
                Confidence::Medium
            } else {
                Confidence::Low
            },
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
    // On CPU, mostly in user code, faulting: a rehash or fill of an allocation it made once the
    // stall began (a HashMap resize moves every entry, touching the new table as it goes).
    let fresh = e
        .allocations
        .iter()
        .any(|a| a.thread_id == st.tid && a.began_in_stall);
    if fresh && d.minflt >= 100 && d.cpu_ns >= w / 2 {
        return first_touch(e, st, d, w);
    }
    if d.cpu_ns >= w * 4 / 5 && d.utime_ns < w / 2 && d.minflt < 100 {
        let mut v = Verdict::new(
            Cause::OnCpu,
            Confidence::Medium,
            format!(
                "{who} was on CPU the whole {dur}, {}% of it in the kernel with few faults: a large system call (writing or reading a big buffer, unmapping a large region) on the thread that must stay responsive",
                pct(d.stime_ns, w).min(100)
            ),
        )
        .with_culprit(st.tid, &st.name, "in system calls");
        v.evidence.push(format!(
            "on CPU {} of the {} window, system time {}",
            HumanNanos(d.cpu_ns),
            HumanNanos(w),
            HumanNanos(d.stime_ns)
        ));
        return v;
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

#[cfg(test)]
mod tests;
