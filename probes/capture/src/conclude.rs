//! The capture's conclusion: the stalled thread's time inside the stall window (on CPU, blocked,
//! waiting for a CPU) and a verdict in the watchdog's shape ([`base::verdict`]), from the eBPF
//! evidence — who held `mmap_lock` for write and how long, what the stalled thread ran or
//! waited in, how long it sat in the run queue.
//!
//! The rules mirror the watchdog's (`freezetrap-watchdog`'s `verdict.rs`), with better evidence:
//! the holder's own stack instead of a guess from `/proc`, sampled on-CPU stacks instead of
//! fault counters. Pure functions over the parsed maps, unit-tested on recorded map text.

use crate::maps::{fold, split_key, Key, Maps};
use crate::summary::{is_idle, wait_site, Blocking};
use base::units::HumanNanos;
use base::verdict::{mmap_lock_holder_op, Cause, Confidence, Verdict};
use serde::Serialize;
use std::collections::BTreeMap;

/// On-CPU sampling rate of both recording programs (`profile:hz:99`).
pub const SAMPLE_HZ: u64 = 99;
const US_PER_SAMPLE: u64 = 1_000_000 / SAMPLE_HZ;

/// Where and for whom to conclude.
#[derive(Debug, Clone, Copy)]
pub struct StallWindow<'a> {
    /// The stalled thread; `None` (or 0) when the whole process stalled or no one said.
    pub tid: Option<u64>,
    /// The maps restricted to the stall (the triggered capture: the whole recording, which
    /// starts during the stall; the armed recorder: the buckets the stall spans).
    pub maps: &'a Maps,
    /// How long that window is, µs.
    pub us: u64,
}

/// `summary.json`'s `stalled_thread`: the stalled thread's time in the stall window.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StalledThread {
    /// Kernel thread id.
    pub tid: u64,
    /// Its name (empty when the window holds no data for it).
    pub name: String,
    /// On CPU, µs (99 Hz samples × 10.1 ms).
    pub oncpu_us: u64,
    /// Off CPU blocked (asleep, waiting on a lock or I/O), µs.
    pub offcpu_us: u64,
    /// Runnable but waiting for a CPU, µs.
    pub runq_us: u64,
    /// Its longest mmap_lock wait, µs.
    pub mmap_lock_wait_us: u64,
    /// Its heaviest on-CPU stacks (folded, µs), at most 5.
    pub top_oncpu: Vec<Blocking>,
    /// Its heaviest off-CPU stacks (folded, µs), at most 5.
    pub top_offcpu: Vec<Blocking>,
}

/// One thread's share of the window.
#[derive(Default)]
struct ThreadTime {
    name: String,
    on_samples: u64,
    fault_samples: u64,
    off_us: u64,
    idle_us: u64,
    runq_us: u64,
    lock_wait_us: u64,
    on: BTreeMap<String, u64>,
    off: BTreeMap<String, u64>,
    /// Innermost-first user frames of its on-CPU samples, with counts (fault samples apart).
    on_user: BTreeMap<Vec<String>, u64>,
    fault_user: BTreeMap<Vec<String>, u64>,
}

/// Kernel frames of a page fault being served.
const FAULT_FRAMES: [&str; 4] = [
    "exc_page_fault",
    "asm_exc_page_fault",
    "do_user_addr_fault",
    "handle_mm_fault",
];

fn per_thread(maps: &Maps) -> BTreeMap<u64, ThreadTime> {
    let mut threads: BTreeMap<u64, ThreadTime> = BTreeMap::new();
    let mut each = |name: &str, f: &mut dyn FnMut(&mut ThreadTime, Key, u64)| {
        for (k, &v) in maps.get(name).into_iter().flatten() {
            let key = split_key(k);
            let t = threads.entry(key.tid).or_default();
            if t.name.is_empty() {
                t.name = key.comm.clone();
            }
            f(t, key, v);
        }
    };
    each("@on", &mut |t, key, n| {
        t.on_samples += n;
        let faulting = key
            .kernel
            .iter()
            .any(|f| FAULT_FRAMES.contains(&f.as_str()));
        let user = key.user.clone();
        if faulting {
            t.fault_samples += n;
            *t.fault_user.entry(user).or_insert(0) += n;
        } else {
            *t.on_user.entry(user).or_insert(0) += n;
        }
        *t.on.entry(fold(&key)).or_insert(0) += n * US_PER_SAMPLE;
    });
    each("@off", &mut |t, key, us| {
        let stack = fold(&key);
        if is_idle(&stack) {
            t.idle_us += us;
        } else {
            t.off_us += us;
        }
        *t.off.entry(stack).or_insert(0) += us;
    });
    each("@runq", &mut |t, _, us| t.runq_us += us);
    each("@lock_wait_max_us", &mut |t, _, us| {
        t.lock_wait_us = t.lock_wait_us.max(us)
    });
    // A holder is a thread of the window too, even when nothing else of it was recorded.
    each("@write_hold_us", &mut |_, _, _| {});
    threads
}

fn top(m: &BTreeMap<String, u64>, n: usize) -> Vec<Blocking> {
    let mut v: Vec<Blocking> = m
        .iter()
        .map(|(s, &us)| Blocking {
            stack: s.clone(),
            us,
        })
        .collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.us));
    v.truncate(n);
    v
}

/// Frames that say nothing about whose code it is (memset, memcpy, the allocator's own).
fn generic_frame(f: &str) -> bool {
    f.starts_with("__mem")
        || matches!(f, "memset" | "memcpy" | "memmove")
        || f.starts_with("0x")
        || f.starts_with("core::intrinsics")
        || f.starts_with("core::ptr::write_bytes")
        || f.contains("je_") // jemalloc's own (prefixed) functions
}

/// Frames of the standard library (often inlined innermost: `core::hint::black_box`,
/// `alloc::vec::...`): the caller's frame says more.
fn std_frame(f: &str) -> bool {
    [
        "core::", "alloc::", "std::", "<core::", "<alloc::", "<std::",
    ]
    .iter()
    .any(|p| f.starts_with(p))
}

/// The most frequent user stack's first three telling frames, innermost first: from the
/// innermost frame outside the standard library (and memset, memcpy, the allocator), or,
/// when every frame is the standard library's, from the innermost named one.
fn where_it_ran(stacks: &BTreeMap<Vec<String>, u64>) -> Option<String> {
    let (frames, _) = stacks.iter().max_by_key(|(_, &n)| n)?;
    let named: Vec<&str> = frames
        .iter()
        .map(String::as_str)
        .filter(|f| !generic_frame(f))
        .collect();
    let first = named.iter().position(|f| !std_frame(f)).unwrap_or(0);
    let telling: Vec<&str> = named.into_iter().skip(first).take(3).collect();
    (!telling.is_empty()).then(|| telling.join(" <- "))
}

fn us(v: u64) -> HumanNanos {
    HumanNanos(v.saturating_mul(1000))
}

fn pct(part: u64, whole: u64) -> u64 {
    (part * 100).checked_div(whole).unwrap_or(0)
}

/// The longest mmap_lock write hold in the window: (holder tid, name, µs, operation).
fn longest_hold(maps: &Maps) -> Option<(u64, String, u64, Option<&'static str>)> {
    let (key, &hold) = maps.get("@write_hold_us")?.iter().max_by_key(|(_, &v)| v)?;
    let key = split_key(key);
    Some((key.tid, key.comm, hold, mmap_lock_holder_op(&key.kernel)))
}

/// The stalled thread's split, when a thread stalled (`window.tid` set and not 0).
pub fn stalled_thread(window: &StallWindow) -> Option<StalledThread> {
    let tid = window.tid.filter(|&t| t != 0)?;
    let threads = per_thread(window.maps);
    let t = threads.get(&tid);
    Some(match t {
        Some(t) => StalledThread {
            tid,
            name: t.name.clone(),
            oncpu_us: t.on_samples * US_PER_SAMPLE,
            offcpu_us: t.off_us + t.idle_us,
            runq_us: t.runq_us,
            mmap_lock_wait_us: t.lock_wait_us,
            top_oncpu: top(&t.on, 5),
            top_offcpu: top(&t.off, 5),
        },
        None => StalledThread {
            tid,
            name: String::new(),
            oncpu_us: 0,
            offcpu_us: 0,
            runq_us: 0,
            mmap_lock_wait_us: 0,
            top_oncpu: Vec::new(),
            top_offcpu: Vec::new(),
        },
    })
}

/// What a blocking kernel stack waits on.
fn blocked_cause(stack: &str) -> (Cause, &'static str) {
    let has = |f: &str| stack.contains(&format!(";{f}_[k]"));
    let has_prefix = |p: &str| {
        stack
            .split(';')
            .any(|f| f.starts_with(p) && f.ends_with("_[k]"))
    };
    if has("do_signal_stop") || has("ptrace_stop") {
        (Cause::Stopped, "stopped (SIGSTOP or a debugger)")
    } else if has_prefix("try_to_free_pages")
        || has_prefix("__alloc_pages_direct_reclaim")
        || has_prefix("__alloc_pages_direct_compact")
        || has_prefix("shrink_")
    {
        (Cause::Reclaim, "reclaiming memory")
    } else if has_prefix("rwsem_down_")
        && (has("lock_mm_and_find_vma")
            || has("vm_mmap_pgoff")
            || has("__vm_munmap")
            || has("do_madvise")
            || has("do_mprotect_pkey")
            || has_prefix("mmap_read_lock")
            || has_prefix("mmap_write_lock"))
    {
        (Cause::MmapLock, "waiting for mmap_lock")
    } else if has_prefix("io_schedule")
        || has_prefix("folio_wait")
        || has("filemap_fault")
        || has_prefix("blk_")
        || has_prefix("wait_on_page")
    {
        (Cause::BlockedIo, "waiting on storage")
    } else if has_prefix("futex_wait") || has("futex_do_wait") {
        (Cause::LockWait, "waiting on a lock (futex)")
    } else {
        (Cause::Unknown, "blocked")
    }
}

fn is_own(name: &str) -> bool {
    name.starts_with("freezetrap-")
}

/// The verdict for the window.
pub fn verdict(window: &StallWindow) -> Verdict {
    let threads = per_thread(window.maps);
    let hold = longest_hold(window.maps);
    let waiters: Vec<(&u64, &ThreadTime)> = threads
        .iter()
        .filter(|(_, t)| t.lock_wait_us >= 1000)
        .collect();
    let max_wait = waiters
        .iter()
        .map(|(_, t)| t.lock_wait_us)
        .max()
        .unwrap_or(0);
    let tid = window.tid.filter(|&t| t != 0);
    let Some(tid) = tid else {
        return process_verdict(&threads, hold, waiters.len(), max_wait, window.us);
    };
    let Some(s) = threads.get(&tid) else {
        let mut v = Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!("no scheduler event or CPU sample of thread {tid} in the window: it neither ran nor woke up while recorded"),
        );
        v.evidence.push(format!("thread {tid}: no data"));
        return v;
    };
    let who = format!("thread '{}'", s.name);
    // Samples are counted from bpftrace's start, a little before the window: never more on-CPU
    // time than the window holds.
    let on_us = (s.on_samples * US_PER_SAMPLE).min(window.us.max(US_PER_SAMPLE));
    let total = on_us + s.off_us + s.idle_us + s.runq_us;
    let mut evidence = vec![format!(
        "{who}: {} on CPU, {} blocked, {} idle, {} runnable",
        us(on_us),
        us(s.off_us),
        us(s.idle_us),
        us(s.runq_us)
    )];

    // mmap_lock: the stalled thread waited for it, or held it itself.
    if let Some((htid, hname, hold_us, op)) = &hold {
        let op_text = op.unwrap_or("an operation its stack does not name");
        if s.lock_wait_us >= 1000 && *htid != tid {
            evidence.push(format!("longest mmap_lock wait {}", us(s.lock_wait_us)));
            evidence.push(format!("write hold {} by '{hname}'", us(*hold_us)));
            let mut v = Verdict::new(
                Cause::MmapLock,
                if op.is_some() { Confidence::High } else { Confidence::Medium },
                format!(
                    "blocked on mmap_lock for {}: thread '{hname}' held it for write {} in {op_text}",
                    us(s.lock_wait_us),
                    us(*hold_us)
                ),
            )
            .with_culprit(*htid, hname, op.unwrap_or("held mmap_lock for write"));
            v.evidence = evidence;
            return v;
        }
        if *htid == tid && *hold_us >= 5000 {
            evidence.push(format!("write hold {}", us(*hold_us)));
            let mut v = Verdict::new(
                Cause::MmapLock,
                if op.is_some() {
                    Confidence::High
                } else {
                    Confidence::Medium
                },
                format!(
                    "{who} held mmap_lock for write {} in {op_text}; {} thread(s) waited up to {}",
                    us(*hold_us),
                    waiters.len(),
                    us(max_wait)
                ),
            )
            .with_culprit(*htid, hname, op.unwrap_or("held mmap_lock for write"));
            v.evidence = evidence;
            return v;
        }
    }

    // Otherwise the largest part of its time says what it did.
    let strong = |part: u64| {
        if pct(part, total) >= 60 && pct(total, window.us) >= 50 {
            Confidence::High
        } else {
            Confidence::Medium
        }
    };
    let blocking_top = s
        .off
        .iter()
        .filter(|(st, _)| !is_idle(st))
        .max_by_key(|(_, &v)| v);
    if total == 0 {
        let mut v = Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!("{who} has no time recorded in the window"),
        );
        v.evidence = evidence;
        return v;
    }
    let mut v = if on_us >= s.runq_us && on_us >= s.off_us && on_us >= s.idle_us {
        let faults = pct(s.fault_samples, s.on_samples);
        if faults >= 30 {
            let site = where_it_ran(&s.fault_user).unwrap_or_else(|| "its code".into());
            evidence.push(format!("{faults}% of its on-CPU samples in page faults"));
            Verdict::new(
                Cause::FirstTouch,
                strong(on_us),
                format!(
                    "{who} spent {} on CPU faulting in fresh pages ({faults}% of its samples) in {site}: a large allocation being filled or rehashed; reserve it once up front, or fill it in smaller pieces",
                    us(on_us)
                ),
            )
            .with_culprit(tid, &s.name, format!("faulting in fresh pages in {site}"))
        } else {
            let site = where_it_ran(&s.on_user)
                .or_else(|| where_it_ran(&s.fault_user))
                .unwrap_or_else(|| "code without user frames".into());
            evidence.push(format!("{faults}% of its on-CPU samples in page faults"));
            Verdict::new(
                Cause::OnCpu,
                strong(on_us),
                format!(
                    "{who} ran {} on CPU in {site} ({}% of its recorded time): the stall is its own work",
                    us(on_us),
                    pct(on_us, total)
                ),
            )
            .with_culprit(tid, &s.name, format!("running {site}"))
        }
    } else if s.runq_us >= s.off_us && s.runq_us >= s.idle_us {
        Verdict::new(
            Cause::CpuStarvation,
            strong(s.runq_us),
            format!(
                "{who} waited {} runnable for a CPU ({}% of its recorded time): other threads or processes took the CPUs",
                us(s.runq_us),
                pct(s.runq_us, total)
            ),
        )
    } else if let (Some((stack, &blocked)), true) = (blocking_top, s.off_us >= s.idle_us) {
        let (cause, doing) = blocked_cause(stack);
        let site = wait_site(stack);
        evidence.push(format!("blocked {} in {site}", us(blocked)));
        let mut v = Verdict::new(
            cause,
            match cause {
                Cause::Unknown => Confidence::Low,
                Cause::LockWait | Cause::MmapLock => Confidence::Medium,
                _ => strong(s.off_us),
            },
            format!("{who} was {doing} for {} in {site}", us(s.off_us)),
        );
        if cause == Cause::LockWait {
            if let Some((btid, b)) = busiest_other(&threads, tid) {
                let ran = b.on_samples * US_PER_SAMPLE;
                let site = where_it_ran(&b.on_user)
                    .or_else(|| where_it_ran(&b.fault_user))
                    .unwrap_or_else(|| "its code".into());
                v.text.push_str(&format!(
                    "; meanwhile thread '{}' ran {} on CPU in {site}: the likeliest holder",
                    b.name,
                    us(ran)
                ));
                v = v.with_culprit(btid, &b.name, format!("ran {} in {site}", us(ran)));
            }
        }
        v
    } else {
        let site = s
            .off
            .iter()
            .max_by_key(|(_, &v)| v)
            .map(|(st, _)| wait_site(st))
            .unwrap_or_default();
        Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!(
                "{who} was asleep {} in {site}: a sleep or an idle poll, not a wait on anything the capture can see",
                us(s.idle_us)
            ),
        )
    };
    if let Some((_, hname, hold_us, _)) = &hold {
        if v.cause != Cause::MmapLock && *hold_us >= 1000 {
            evidence.push(format!(
                "mmap_lock write hold {} by '{hname}' (not waited on by {who})",
                us(*hold_us)
            ));
        }
    }
    v.evidence = evidence;
    v
}

/// The thread other than `tid` (and freezetrap's own) with the most on-CPU samples.
fn busiest_other(threads: &BTreeMap<u64, ThreadTime>, tid: u64) -> Option<(u64, &ThreadTime)> {
    threads
        .iter()
        .filter(|(&t, th)| t != tid && !is_own(&th.name) && th.on_samples > 0)
        .max_by_key(|(_, th)| th.on_samples)
        .map(|(&t, th)| (t, th))
}

/// No stalled thread named: what held the process up as a whole.
fn process_verdict(
    threads: &BTreeMap<u64, ThreadTime>,
    hold: Option<(u64, String, u64, Option<&'static str>)>,
    waiters: usize,
    max_wait: u64,
    window_us: u64,
) -> Verdict {
    if let Some((htid, hname, hold_us, op)) = hold.filter(|h| h.2 >= 5000 && waiters > 0) {
        let mut v = Verdict::new(
            Cause::MmapLock,
            if op.is_some() { Confidence::High } else { Confidence::Medium },
            format!(
                "mmap_lock held for write {} by thread '{hname}' in {}; {waiters} thread(s) waited up to {}",
                us(hold_us),
                op.unwrap_or("an operation its stack does not name"),
                us(max_wait)
            ),
        )
        .with_culprit(htid, &hname, op.unwrap_or("held mmap_lock for write"));
        v.evidence.push(format!("write hold {}", us(hold_us)));
        v.evidence
            .push(format!("{waiters} waiter(s) of at least 1 ms"));
        return v;
    }
    // The heaviest blocking stack of the service's own threads.
    let blocked = threads
        .iter()
        .filter(|(_, t)| !is_own(&t.name))
        .flat_map(|(&tid, t)| t.off.iter().map(move |(s, &v)| (tid, t, s, v)))
        .filter(|(_, _, s, _)| !is_idle(s))
        .max_by_key(|&(_, _, _, v)| v);
    if let Some((tid, t, stack, v_us)) = blocked.filter(|b| b.3 >= window_us / 10) {
        let (cause, doing) = blocked_cause(stack);
        if cause != Cause::Unknown && cause != Cause::LockWait {
            let site = wait_site(stack);
            let mut v = Verdict::new(
                cause,
                Confidence::Medium,
                format!("thread '{}' was {doing} for {} in {site}", t.name, us(v_us)),
            )
            .with_culprit(tid, &t.name, doing);
            v.evidence.push(format!("heaviest blocking stack: {site}"));
            return v;
        }
    }
    if let Some((tid, t)) = busiest_other(threads, 0) {
        let on_us = t.on_samples * US_PER_SAMPLE;
        if pct(on_us, window_us) >= 50 {
            let faults = pct(t.fault_samples, t.on_samples);
            let (cause, what) = if faults >= 30 {
                (Cause::FirstTouch, "faulting in fresh pages in")
            } else {
                (Cause::OnCpu, "running")
            };
            let site = where_it_ran(if faults >= 30 {
                &t.fault_user
            } else {
                &t.on_user
            })
            .unwrap_or_else(|| "its code".into());
            let mut v = Verdict::new(
                cause,
                Confidence::Low,
                format!(
                    "thread '{}' was on CPU {} of the window, {what} {site} (no stalled thread was named)",
                    t.name,
                    us(on_us)
                ),
            )
            .with_culprit(tid, &t.name, format!("{what} {site}"));
            v.evidence
                .push(format!("{faults}% of its samples in page faults"));
            return v;
        }
    }
    Verdict::new(
        Cause::Unknown,
        Confidence::Low,
        "no mmap_lock hold, blocking wait or busy thread stands out in the window",
    )
}

#[cfg(test)]
mod tests;
