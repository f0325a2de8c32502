//! Which large allocations explain a stall: pure ranking, testable without a kernel.

use alloc_guard::internal::RawEvent;

/// A candidate allocation and how it relates to the stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The allocation (for an in-flight one, `seq` and `duration_ns` are 0).
    pub event: RawEvent,
    /// Still inside the allocator when the stall was detected.
    pub in_flight: bool,
    /// Stall start minus the allocation's start, in ns (negative: it began after).
    pub delta_ns: i64,
}

/// Ranks candidates: allocations on the stalled thread first (for a process stall, none is
/// preferred), then in-flight ones, then larger, then closer in time to the stall start.
/// Duplicates (the same allocation seen in flight and completed) keep the completed copy.
pub fn rank(
    stall_tid: u64,
    stall_start_ns: u64,
    in_flight: &[RawEvent],
    recent: &[RawEvent],
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::with_capacity(in_flight.len() + recent.len());
    for e in recent {
        out.push(Candidate {
            event: *e,
            in_flight: false,
            delta_ns: stall_start_ns as i64 - e.ts_ns as i64,
        });
    }
    for e in in_flight {
        let dup = recent
            .iter()
            .any(|r| r.thread_id == e.thread_id && r.ts_ns == e.ts_ns && r.size == e.size);
        if !dup {
            out.push(Candidate {
                event: *e,
                in_flight: true,
                delta_ns: stall_start_ns as i64 - e.ts_ns as i64,
            });
        }
    }
    out.sort_by(|a, b| {
        let same = |c: &Candidate| stall_tid != 0 && c.event.thread_id == stall_tid;
        same(b)
            .cmp(&same(a))
            .then(b.in_flight.cmp(&a.in_flight))
            .then(b.event.size.cmp(&a.event.size))
            .then(a.delta_ns.unsigned_abs().cmp(&b.delta_ns.unsigned_abs()))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tid: u64, size: u64, ts: u64) -> RawEvent {
        let mut e = RawEvent::EMPTY;
        e.thread_id = tid;
        e.size = size;
        e.ts_ns = ts;
        e
    }

    #[test]
    fn same_thread_then_in_flight_then_larger() {
        let recent = [ev(1, 100, 900), ev(2, 5000, 950), ev(1, 300, 990)];
        let inflight = [ev(3, 10_000, 995), ev(1, 50, 999)];
        let r = rank(1, 1000, &inflight, &recent);
        let order: Vec<(u64, u64, bool)> = r
            .iter()
            .map(|c| (c.event.thread_id, c.event.size, c.in_flight))
            .collect();
        assert_eq!(
            order,
            vec![
                (1, 50, true),
                (1, 300, false),
                (1, 100, false),
                (3, 10_000, true),
                (2, 5000, false)
            ]
        );
        assert_eq!(r[1].delta_ns, 10);
    }

    #[test]
    fn process_stalls_prefer_size() {
        let r = rank(0, 1000, &[], &[ev(1, 10, 1), ev(2, 20, 2)]);
        assert_eq!(r[0].event.size, 20);
    }

    #[test]
    fn an_allocation_seen_twice_is_listed_once() {
        let e = ev(1, 77, 500);
        let r = rank(1, 1000, &[e], &[e]);
        assert_eq!(r.len(), 1);
        assert!(!r[0].in_flight);
    }
}
