//! The rolling window: time buckets of off-CPU, on-CPU and mmap_lock data as bpftrace prints them,
//! the stalls the target announced, and the captures that become due. Pure data handling, so it is
//! tested without bpftrace.
//!
//! Timing: bpftrace prints bucket `b` some time after `b` ended (at the `tick` of `b + 2` or
//! later, see `armed.bt`). A capture covering buckets `from..=to` is therefore written only once a tick of
//! `to + SETTLE` has been seen, and data that still arrives for a bucket older than anything kept
//! is counted as late, not silently dropped.

use super::lines::StallSeen;
use crate::Maps;
use serde::Serialize;
use std::collections::BTreeMap;

/// Ticks to wait past a capture's last bucket before writing it: bucket b is printed at the
/// tick of b + 2 (see `armed.bt`), a skipped interval delays that by one, one more is margin.
pub const SETTLE: u64 = 4;

/// The triggered capture's name for an armed map (so `summarize` reads both).
fn capture_name(armed: &str) -> Option<&'static str> {
    match armed {
        "@off" => Some("@off"),
        "@on" => Some("@on"),
        "@runq" => Some("@runq"),
        "@wait" => Some("@lock_wait_max_us"),
        "@hold" => Some("@write_hold_us"),
        _ => None,
    }
}

/// True for the maps whose values are maxima; the others are sums.
fn merges_by_max(capture_name: &str) -> bool {
    matches!(capture_name, "@lock_wait_max_us" | "@write_hold_us")
}

/// One bucket of the timeline in `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimelineRow {
    /// Bucket start relative to the first `stall_begin` probe, ms (negative: before it fired).
    pub t_ms: i64,
    /// Off-CPU µs of threads that ran again in this bucket.
    pub offcpu_us: u64,
    /// On-CPU samples (99 Hz).
    pub oncpu_samples: u64,
    /// Time threads waited runnable for a CPU, µs.
    pub runq_us: u64,
    /// Longest mmap_lock wait that ended in this bucket, µs.
    pub max_lock_wait_us: u64,
    /// Longest mmap_lock write hold that ended in this bucket, µs.
    pub max_write_hold_us: u64,
}

/// A capture whose buckets are all in: what gets written to disk.
#[derive(Debug)]
pub struct Ready {
    /// The stalls it covers (the first one opened it).
    pub stalls: Vec<StallSeen>,
    /// Window start relative to the first probe, ms (negative).
    pub from_ms: i64,
    /// Window end relative to the first probe, ms.
    pub to_ms: i64,
    /// Every bucket's data merged, under the triggered capture's map names.
    pub maps: Maps,
    /// The same for the buckets the first stall spans (from `probe - elapsed` to its end, or
    /// to the window's end when `stall_end` has not fired): what its verdict rests on.
    pub stall_maps: Maps,
    /// How long that span is, µs.
    pub stall_us: u64,
    /// Per-bucket totals.
    pub timeline: Vec<TimelineRow>,
}

struct Pending {
    stalls: Vec<StallSeen>,
    from: u64,
    to: u64,
}

/// The rolling window and the captures waiting for their last buckets.
pub struct Window {
    bucket_ns: u64,
    before: u64,
    after: u64,
    max_entries: usize,
    buckets: BTreeMap<u64, Maps>,
    entries: usize,
    newest_tick: u64,
    pending: Vec<Pending>,
    /// Bucket ranges of the captures already written (while still within the horizon).
    written: Vec<(u64, u64)>,
    /// Entries that arrived for buckets already pruned or written.
    pub late_entries: u64,
    /// Entries refused because the window held `max_entries` already.
    pub dropped_entries: u64,
    /// Off-CPU entries without a kernel stack: bpftrace's stack map had no room for it (every
    /// off-CPU block has one, down to `__schedule`).
    pub lost_stacks: u64,
}

impl Window {
    /// A window of `before_ns` kept before a stall and `after_ns` recorded after it, in buckets of
    /// `bucket_ns`, holding at most `max_entries` map entries in total.
    pub fn new(bucket_ns: u64, before_ns: u64, after_ns: u64, max_entries: usize) -> Self {
        let per = |ns: u64| ns.div_ceil(bucket_ns);
        Window {
            bucket_ns,
            before: per(before_ns),
            after: per(after_ns),
            max_entries,
            buckets: BTreeMap::new(),
            entries: 0,
            newest_tick: 0,
            pending: Vec::new(),
            written: Vec::new(),
            late_entries: 0,
            dropped_entries: 0,
            lost_stacks: 0,
        }
    }

    /// The oldest bucket still needed: by a pending capture, or by one that could open now.
    fn horizon(&self) -> u64 {
        let open = self.newest_tick.saturating_sub(self.before + SETTLE);
        self.pending.iter().map(|p| p.from).fold(open, u64::min)
    }

    /// Adds a printed map.
    pub fn add_map(&mut self, name: &str, entries: Vec<(u64, String, u64)>) {
        let Some(name) = capture_name(name) else {
            return;
        };
        let is_max = merges_by_max(name);
        let horizon = self.horizon();
        for (bucket, key, value) in entries {
            if name == "@off" && !key.contains(",\n ") {
                self.lost_stacks += 1;
            }
            if bucket < horizon {
                self.late_entries += 1;
                continue;
            }
            if self.written.iter().any(|&(f, t)| (f..=t).contains(&bucket)) {
                // Kept for captures still to come, but missing from one already on disk.
                self.late_entries += 1;
            }
            let map = self
                .buckets
                .entry(bucket)
                .or_default()
                .entry(name.to_string())
                .or_default();
            let len = map.len();
            if !map.contains_key(&key) && self.entries >= self.max_entries {
                self.dropped_entries += 1;
                continue;
            }
            let slot = map.entry(key).or_insert(0);
            *slot = if is_max {
                (*slot).max(value)
            } else {
                *slot + value
            };
            self.entries += map.len() - len;
        }
    }

    /// True while a capture waits for its last buckets.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Records a stall. Returns false when it joined a capture that was already pending (one
    /// freeze usually stalls several heartbeats; they share one capture).
    pub fn stall_begin(&mut self, stall: StallSeen) -> bool {
        let b = stall.probe_ns / self.bucket_ns;
        if let Some(p) = self.pending.iter_mut().find(|p| b <= p.to) {
            p.stalls.push(stall);
            return false;
        }
        self.pending.push(Pending {
            stalls: vec![stall],
            from: b.saturating_sub(self.before),
            to: b + self.after,
        });
        true
    }

    /// Attaches a stall's duration to the pending capture that holds it.
    pub fn stall_end(&mut self, id: u64, duration_ns: u64) {
        for s in self.pending.iter_mut().flat_map(|p| p.stalls.iter_mut()) {
            if s.id == id && s.duration_ns.is_none() {
                s.duration_ns = Some(duration_ns);
            }
        }
    }

    /// A tick: returns the captures that are complete now and prunes what no one needs.
    pub fn tick(&mut self, bucket: u64) -> Vec<Ready> {
        self.newest_tick = self.newest_tick.max(bucket);
        let newest = self.newest_tick;
        let due = |p: &Pending| newest >= p.to + SETTLE;
        let (ready, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(due);
        self.pending = keep;
        self.written.extend(ready.iter().map(|p| (p.from, p.to)));
        let out = ready.into_iter().map(|p| self.assemble(p)).collect();
        self.prune();
        out
    }

    /// Every pending capture with what has arrived so far (the target or the recorder is
    /// going away).
    pub fn flush(&mut self) -> Vec<Ready> {
        let pending = std::mem::take(&mut self.pending);
        pending.into_iter().map(|p| self.assemble(p)).collect()
    }

    fn prune(&mut self) {
        let horizon = self.horizon();
        self.written.retain(|&(_, to)| to >= horizon);
        while let Some(entry) = self.buckets.first_entry() {
            if *entry.key() >= horizon {
                break;
            }
            let maps = entry.remove();
            self.entries -= maps.values().map(|m| m.len()).sum::<usize>();
        }
    }

    fn assemble(&self, p: Pending) -> Ready {
        let first = &p.stalls[0];
        let probe_ns = first.probe_ns;
        let stall_from = probe_ns.saturating_sub(first.elapsed_ns) / self.bucket_ns;
        let stall_to = match first.duration_ns {
            Some(d) => (probe_ns + d.saturating_sub(first.elapsed_ns)) / self.bucket_ns,
            None => p.to,
        }
        .clamp(stall_from, p.to);
        let stall_from = stall_from.max(p.from);
        let mut maps = Maps::new();
        let mut stall_maps = Maps::new();
        let mut timeline = Vec::new();
        for (&b, bucket) in self.buckets.range(p.from..=p.to) {
            let mut row = TimelineRow {
                t_ms: ((b * self.bucket_ns) as i64 - probe_ns as i64) / 1_000_000,
                ..Default::default()
            };
            for (name, entries) in bucket {
                merge(&mut maps, name, entries);
                if (stall_from..=stall_to).contains(&b) {
                    merge(&mut stall_maps, name, entries);
                }
                let sum: u64 = entries.values().sum();
                let max = entries.values().copied().max().unwrap_or(0);
                match name.as_str() {
                    "@off" => row.offcpu_us = sum,
                    "@on" => row.oncpu_samples = sum,
                    "@runq" => row.runq_us = sum,
                    "@lock_wait_max_us" => row.max_lock_wait_us = max,
                    "@write_hold_us" => row.max_write_hold_us = max,
                    _ => {}
                }
            }
            timeline.push(row);
        }
        let rel_ms = |b: u64| ((b * self.bucket_ns) as i64 - probe_ns as i64) / 1_000_000;
        Ready {
            stalls: p.stalls,
            from_ms: rel_ms(p.from),
            to_ms: rel_ms(p.to + 1),
            maps,
            stall_maps,
            stall_us: (stall_to + 1 - stall_from) * self.bucket_ns / 1000,
            timeline,
        }
    }
}

/// Adds one bucket's entries of map `name` into `into` (sums, or maxima for the maxima maps).
fn merge(into: &mut Maps, name: &str, entries: &BTreeMap<String, u64>) {
    let is_max = merges_by_max(name);
    let merged = into.entry(name.to_string()).or_default();
    for (k, &v) in entries {
        let slot = merged.entry(k.clone()).or_insert(0);
        *slot = if is_max { (*slot).max(v) } else { *slot + v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn stall(id: u64, at_ms: u64) -> StallSeen {
        StallSeen {
            id,
            thread_id: 7,
            elapsed_ns: 30 * MS,
            probe_ns: at_ms * MS,
            duration_ns: None,
        }
    }

    #[test]
    fn a_capture_holds_the_buckets_before_the_probe_and_waits_for_the_ones_after() {
        // 250 ms buckets, 1 s before, 500 ms after.
        let mut w = Window::new(250 * MS, 1000 * MS, 500 * MS, 1000);
        for b in 0..=12 {
            w.add_map("@off", vec![(b, "t,\n    k\n,".into(), 100)]);
            assert!(w.tick(b + 1).is_empty());
        }
        // A write hold in bucket 11 (before the probe, which fires in bucket 12).
        w.add_map("@hold", vec![(11, "t,\n    dup_mmap\n".into(), 40_000)]);
        assert!(w.stall_begin(stall(1, 12 * 250 + 10)));
        // The second heartbeat of the same freeze joins the capture.
        assert!(!w.stall_begin(stall(2, 12 * 250 + 30)));
        w.stall_end(1, 45 * MS);
        let mut ready = Vec::new();
        for b in 13..=20 {
            w.add_map("@off", vec![(b, "t,\n    k\n,".into(), 100)]);
            ready.extend(w.tick(b + 1));
            if b + 1 < 12 + 2 + SETTLE {
                assert!(ready.is_empty(), "due too early at tick {}", b + 1);
            }
        }
        assert_eq!(ready.len(), 1);
        // Data for a bucket of the written capture, arriving now, is counted as late.
        let late = w.late_entries;
        w.add_map("@off", vec![(14, "t,\n    k\n,".into(), 1)]);
        assert_eq!(w.late_entries, late + 1);
        let r = &ready[0];
        assert_eq!((r.from_ms, r.to_ms), (8 * 250 - 3010, 15 * 250 - 3010));
        assert_eq!(r.stalls.len(), 2);
        assert_eq!(r.stalls[0].duration_ns, Some(45 * MS));
        assert_eq!(r.maps["@off"]["t,\n    k\n,"], 700);
        assert_eq!(r.maps["@write_hold_us"]["t,\n    dup_mmap\n"], 40_000);
        // The stall itself: it began 30 ms before the probe (bucket 11) and lasted 45 ms
        // (to bucket 12).
        assert_eq!(r.stall_maps["@off"]["t,\n    k\n,"], 200);
        assert_eq!(r.stall_maps["@write_hold_us"]["t,\n    dup_mmap\n"], 40_000);
        assert_eq!(r.stall_us, 500_000);
        assert_eq!(r.timeline.len(), 7);
        assert_eq!(r.timeline[0].t_ms, -1010);
        let hold = r.timeline.iter().find(|t| t.max_write_hold_us > 0).unwrap();
        assert!(
            hold.t_ms < 0,
            "the hold happened before the probe: {hold:?}"
        );
    }

    #[test]
    fn old_buckets_are_pruned_and_late_data_is_counted() {
        let mut w = Window::new(250 * MS, 500 * MS, 500 * MS, 1000);
        for b in 0..40 {
            w.add_map("@on", vec![(b, "t,,".into(), 1)]);
            w.tick(b + 1);
        }
        assert!(
            w.buckets.len() <= 2 + SETTLE as usize + 1,
            "{}",
            w.buckets.len()
        );
        assert_eq!(w.entries, w.buckets.len());
        w.add_map("@on", vec![(3, "t,,".into(), 1)]);
        assert_eq!(w.late_entries, 1);
    }

    #[test]
    fn the_entry_cap_refuses_and_counts() {
        let mut w = Window::new(250 * MS, 500 * MS, 500 * MS, 3);
        w.add_map("@off", (0..5).map(|i| (0, format!("t{i},,"), 1)).collect());
        assert_eq!(w.entries, 3);
        assert_eq!(w.dropped_entries, 2);
        // Off-CPU keys without a kernel stack: bpftrace had no room left for the stack.
        assert_eq!(w.lost_stacks, 5);
        w.add_map("@off", vec![(0, "t0,\n    __schedule+1\n,".into(), 1)]);
        assert_eq!(w.lost_stacks, 5);
        // An existing key still accumulates.
        w.add_map("@off", vec![(0, "t0,,".into(), 5)]);
        assert_eq!(w.buckets[&0]["@off"]["t0,,"], 6);
    }

    #[test]
    fn flush_returns_what_is_there() {
        let mut w = Window::new(250 * MS, 500 * MS, 5000 * MS, 1000);
        w.add_map("@wait", vec![(4, "t".into(), 900), (4, "u".into(), 1200)]);
        w.tick(5);
        w.stall_begin(stall(9, 5 * 250));
        let r = w.flush();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].timeline[0].max_lock_wait_us, 1200);
        assert!(w.flush().is_empty());
    }
}
