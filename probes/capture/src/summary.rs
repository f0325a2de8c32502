//! `summary.json` and the one-line human summary of a capture: the verdict, totals, the
//! heaviest blocking stacks (with idle waits and freezetrap's own threads set apart), the
//! mmap_lock holder and waiters, the stalled thread's share.

use crate::conclude::{self, StallWindow, StalledThread};
use crate::maps::{fold, folded, split_key, Maps};
use base::verdict::Verdict;
use serde::Serialize;
use std::collections::BTreeMap;

/// One stack in the summary with its time.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Blocking {
    /// The folded stack.
    pub stack: String,
    /// Microseconds off CPU.
    pub us: u64,
}

/// The mmap_lock part of the summary.
#[derive(Debug, Serialize, Default, PartialEq, Eq)]
pub struct MmapLock {
    /// Longest wait for the lock, µs.
    pub max_wait_us: u64,
    /// Longest write hold, µs.
    pub max_write_hold_us: u64,
    /// Kernel stack (outermost first) that released the longest write hold.
    pub holder_stack: String,
    /// Thread names that waited at least 1 ms.
    pub waiters: u64,
}

/// `summary.json` (contract fields plus `oncpu_samples`).
#[derive(Debug, Serialize)]
#[non_exhaustive]
pub struct Summary {
    /// Target pid.
    pub pid: u32,
    /// Recording length, seconds (rounded).
    pub duration_s: u64,
    /// Total off-CPU time recorded, µs.
    pub offcpu_total_us: u64,
    /// Heaviest off-CPU stacks, heaviest first (at most 10).
    pub top_blocking: Vec<Blocking>,
    /// The same without waits that were idle by choice (sleeping, polling, the futex waits of a
    /// parked thread: half the recording or more in futex waits, under 5% on CPU) and without
    /// freezetrap's own threads: what a freeze made the service's threads wait for. Heaviest
    /// first, at most 10.
    pub top_waits: Vec<Blocking>,
    /// Off-CPU time of those idle waits, µs.
    pub idle_us: u64,
    /// Time threads waited runnable for a CPU, µs (not part of `offcpu_total_us`).
    pub runq_total_us: u64,
    /// mmap_lock waits and holds.
    pub mmap_lock: MmapLock,
    /// On-CPU samples recorded.
    pub oncpu_samples: u64,
    /// The stalled thread's time inside the stall (when the capture was told which thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_thread: Option<StalledThread>,
    /// What caused the stall, from this capture's evidence (the watchdog's shape).
    pub verdict: Verdict,
    /// The target exited this many seconds into the recording, which then ended early (its
    /// user frames are named from the files read while it ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_exited_after_s: Option<f64>,
    /// SIGINT or SIGTERM ended the recording early.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopped_by_signal: bool,
}

/// Builds the summary from the maps: `maps` is everything recorded over `recorded_us`, `stall`
/// the part of it the stall spans and the stalled thread, for `stalled_thread` and the verdict.
pub fn summarize(pid: u32, recorded_us: u64, maps: &Maps, stall: &StallWindow) -> Summary {
    let duration_s = ((recorded_us + 500_000) / 1_000_000).max(1);
    let off = folded(maps.get("@off"));
    let mut blocking: Vec<Blocking> = off
        .iter()
        .filter_map(|l| {
            l.rsplit_once(' ').map(|(s, v)| Blocking {
                stack: s.to_string(),
                us: v.parse().unwrap_or(0),
            })
        })
        .collect();
    let offcpu_total_us = blocking.iter().map(|b| b.us).sum();
    blocking.sort_by_key(|b| std::cmp::Reverse(b.us));
    blocking.truncate(10);
    let (top_waits, idle_us) = waits(maps, recorded_us);
    let mut lock = MmapLock::default();
    if let Some(w) = maps.get("@lock_wait_max_us") {
        lock.max_wait_us = w.values().copied().max().unwrap_or(0);
        lock.waiters = w.values().filter(|&&v| v >= 1000).count() as u64;
    }
    if let Some(h) = maps.get("@write_hold_us") {
        if let Some((key, &v)) = h.iter().max_by_key(|(_, &v)| v) {
            lock.max_write_hold_us = v;
            let mut k = split_key(key).kernel;
            // The innermost frames are the tracepoint's own helpers, not the holder.
            k.retain(|f| !f.contains("mmap_lock_do_trace"));
            lock.holder_stack = k.iter().rev().cloned().collect::<Vec<_>>().join(";");
        }
    }
    let oncpu_samples = maps.get("@on").map(|m| m.values().sum()).unwrap_or(0);
    Summary {
        pid,
        duration_s,
        offcpu_total_us,
        top_blocking: blocking,
        top_waits,
        idle_us,
        runq_total_us: maps.get("@runq").map(|m| m.values().sum()).unwrap_or(0),
        mmap_lock: lock,
        oncpu_samples,
        stalled_thread: conclude::stalled_thread(stall),
        verdict: conclude::verdict(stall),
        target_exited_after_s: None,
        stopped_by_signal: false,
    }
}

/// The headline waits (heaviest first, at most 10) and the idle time set apart: stacks idle
/// by choice, futex waits of a parked thread — one that spent at least half the recording in
/// futex waits and under 5% of it on CPU (a worker waiting on its queue) — and freezetrap's own
/// threads (left out, not counted as idle).
fn waits(maps: &Maps, recording_us: u64) -> (Vec<Blocking>, u64) {
    let off = maps.get("@off");
    let futex = |k: &crate::maps::Key| k.kernel.iter().any(|f| f.starts_with("futex_"));
    let mut futex_us: BTreeMap<u64, u64> = BTreeMap::new();
    for (k, &v) in off.into_iter().flatten() {
        let key = split_key(k);
        if futex(&key) {
            *futex_us.entry(key.tid).or_insert(0) += v;
        }
    }
    let mut on_us: BTreeMap<u64, u64> = BTreeMap::new();
    for (k, &n) in maps.get("@on").into_iter().flatten() {
        *on_us.entry(split_key(k).tid).or_insert(0) += n * 1_000_000 / conclude::SAMPLE_HZ;
    }
    let parked = |tid: u64| {
        futex_us.get(&tid).copied().unwrap_or(0) >= recording_us / 2
            && on_us.get(&tid).copied().unwrap_or(0) <= recording_us / 20
    };
    let mut idle_us = 0;
    let mut acc: BTreeMap<String, u64> = BTreeMap::new();
    for (k, &v) in off.into_iter().flatten() {
        let key = split_key(k);
        if key.comm.starts_with("freezetrap-") {
            continue;
        }
        let stack = fold(&key);
        if is_idle(&stack) || (futex(&key) && parked(key.tid)) {
            idle_us += v;
        } else {
            *acc.entry(stack).or_insert(0) += v;
        }
    }
    let mut top: Vec<Blocking> = acc
        .into_iter()
        .map(|(stack, us)| Blocking { stack, us })
        .collect();
    top.sort_by_key(|b| std::cmp::Reverse(b.us));
    top.truncate(10);
    (top, idle_us)
}

/// Kernel functions a thread sits in when it waits because it chose to (a sleep, an idle poll),
/// not because something held it up.
const IDLE_FRAMES: [&str; 6] = [
    "do_nanosleep",
    "ep_poll",
    "do_epoll_wait",
    "do_sys_poll",
    "do_select",
    "core_sys_select",
];

fn kernel_name(frame: &str) -> Option<&str> {
    frame.strip_suffix("_[k]")
}

/// True when a folded stack is a thread idle by choice: its kernel frames include a sleep or an
/// idle `poll`/`epoll`/`select` (`do_nanosleep`, `ep_poll`, `do_sys_poll`, `do_select`, ...).
pub fn is_idle(folded_stack: &str) -> bool {
    folded_stack
        .split(';')
        .filter_map(kernel_name)
        .any(|f| IDLE_FRAMES.contains(&f))
}

/// Where a folded off-CPU stack waits: its innermost frames past the scheduler's own
/// (`__schedule`, `schedule`, ...), innermost first, at most 3, e.g.
/// `rwsem_down_write_slowpath <- vm_mmap_pgoff <- do_syscall_64`.
pub fn wait_site(folded_stack: &str) -> String {
    let scheduler = |f: &str| {
        let f = kernel_name(f).unwrap_or(f);
        f == "schedule"
            || f.starts_with("__schedule")
            || f.starts_with("schedule_")
            || f.starts_with("io_schedule")
            || f.starts_with("preempt_schedule")
    };
    folded_stack
        .rsplit(';')
        .skip_while(|f| scheduler(f))
        .take(3)
        .map(|f| kernel_name(f).unwrap_or(f))
        .collect::<Vec<_>>()
        .join(" <- ")
}

/// The one-paragraph human summary printed on stdout.
pub fn human(s: &Summary) -> String {
    let ms = |us: u64| base::units::HumanNanos(us.saturating_mul(1000)).to_string();
    let mut out = format!(
        "freezetrap-capture: pid {} for {} s: {} ({}): {}; {} off CPU ({} of it idle)",
        s.pid,
        s.duration_s,
        s.verdict.cause,
        s.verdict.confidence,
        s.verdict.text,
        ms(s.offcpu_total_us),
        ms(s.idle_us)
    );
    let holder: Vec<&str> = s.mmap_lock.holder_stack.rsplit(';').take(3).collect();
    if s.verdict.cause == base::verdict::Cause::MmapLock && s.mmap_lock.max_write_hold_us > 0 {
        out.push_str(&format!("; the holder's stack: {}", holder.join(" <- ")));
    } else if s.mmap_lock.max_write_hold_us >= 1000 {
        out.push_str(&format!(
            "; mmap_lock held for write {} by {}; {} thread(s) waited up to {}",
            ms(s.mmap_lock.max_write_hold_us),
            holder.join(" <- "),
            s.mmap_lock.waiters,
            ms(s.mmap_lock.max_wait_us)
        ));
    }
    match s.top_waits.first() {
        Some(b) => out.push_str(&format!(
            "; top wait ({}): {}",
            ms(b.us),
            wait_site(&b.stack)
        )),
        None if s.offcpu_total_us > 0 => out
            .push_str("; no wait besides idle sleeps, polls, parked threads and freezetrap's own"),
        None => {}
    }
    if let Some(t) = s.target_exited_after_s {
        out.push_str(&format!("; the target exited after {t:.1} s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::parse_maps;

    const SAMPLE: &str = r#"{"type": "attached_probes", "data": {"probes": 6}}
{"type": "map", "data": {"@off": {"101,mmapper-0,\n    __schedule+1576\n    schedule+35\n    rwsem_down_write_slowpath+600\n    vm_mmap_pgoff+200\n,\n\t7f00 mmap64+20 (/usr/lib/libc.so.6)\n\t5600 my_app::worker::h0123456789abcdef+40 (/bin/app)\n": 48000, "100,main,\n    __schedule+1\n,\n\t7f01 [unknown] (/x)\n": 10, "102,sleeper,\n    __schedule+1\n    schedule+2\n    do_nanosleep+3\n    hrtimer_nanosleep+4\n,": 90000}}}
{"type": "map", "data": {"@lock_wait_max_us": {"101,mmapper-0": 50400, "103,mmapper-1": 900}}}
{"type": "map", "data": {"@write_hold_us": {"100,app,\n    mmap_write_unlock+10\n    dup_mmap+900\n    copy_process+2000\n    kernel_clone+100\n": 48800}}}
{"type": "map", "data": {"@on": {"100,app,\n    x+1\n,\n": 7}}}
{"type": "map", "data": {"@off": {"104,freezetrap-watc,\n    __schedule+1\n    futex_wait+2\n,": 70000, "105,worker,\n    __schedule+1\n    futex_wait+2\n,": 9500000}}}
{"type": "map", "data": {"@runq": {"101,mmapper-0": 300}}}
"#;

    #[test]
    fn summary_has_the_contract_fields_and_reads_like_a_sentence() {
        let maps = parse_maps(SAMPLE);
        let stall = StallWindow {
            tid: None,
            maps: &maps,
            us: 10_000_000,
        };
        let s = summarize(42, 10_000_000, &maps, &stall);
        assert_eq!(s.offcpu_total_us, 138010 + 70000 + 9_500_000);
        assert_eq!(
            s.top_blocking[0].us, 9_500_000,
            "the parked worker is the heaviest stack"
        );
        assert_eq!(
            s.idle_us,
            90000 + 9_500_000,
            "the sleeper and the worker parked all along are idle"
        );
        assert_eq!(s.top_waits[0].us, 48000, "but not a wait");
        assert_eq!(
            s.top_waits.len(),
            2,
            "freezetrap's own threads are left out: {:?}",
            s.top_waits
        );
        assert_eq!(s.runq_total_us, 300);
        assert_eq!(s.stalled_thread, None);
        assert_eq!(s.verdict.cause, base::verdict::Cause::MmapLock);
        assert_eq!(s.mmap_lock.max_wait_us, 50400);
        assert_eq!(s.mmap_lock.max_write_hold_us, 48800);
        assert_eq!(s.mmap_lock.waiters, 1);
        assert_eq!(
            s.mmap_lock.holder_stack,
            "kernel_clone;copy_process;dup_mmap;mmap_write_unlock"
        );
        assert_eq!(s.oncpu_samples, 7);
        let j = serde_json::to_value(&s).unwrap();
        for k in [
            "pid",
            "duration_s",
            "offcpu_total_us",
            "top_blocking",
            "top_waits",
            "idle_us",
            "mmap_lock",
            "verdict",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
        assert_eq!(
            human(&s),
            "freezetrap-capture: pid 42 for 10 s: mmap_lock (high): mmap_lock held for write 48.8 ms by thread 'app' in fork (dup_mmap); 1 thread(s) waited up to 50.4 ms; 9.71 s off CPU (9.59 s of it idle); the holder's stack: mmap_write_unlock <- dup_mmap <- copy_process; top wait (48.0 ms): rwsem_down_write_slowpath <- vm_mmap_pgoff <- mmap64"
        );
    }

    #[test]
    fn idle_stacks_and_wait_sites() {
        assert!(is_idle("t;nanosleep;do_nanosleep_[k];schedule_[k]"));
        assert!(is_idle(
            "t;epoll_wait;do_epoll_wait_[k];ep_poll_[k];schedule_[k]"
        ));
        assert!(
            !is_idle("t;do_nanosleep;futex_wait_[k]"),
            "a user frame of that name is not idle"
        );
        assert!(!is_idle("t;read;io_schedule_[k]"));
        assert_eq!(
            wait_site("t;f;filemap_fault_[k];folio_wait_bit_common_[k];io_schedule_[k];schedule_[k];__schedule_[k]"),
            "folio_wait_bit_common <- filemap_fault <- f"
        );
        assert_eq!(wait_site("t;__schedule_[k]"), "t");
    }
}
