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

mod rules;
pub use rules::verdict;

#[cfg(test)]
mod tests;
