//! A reader that walks the ring in sequence order and accounts for every event: each sequence
//! number ends up either read or counted lost, which is what lets a test check that reported +
//! dropped equals the number of oversized allocations exactly.

use crate::event::RawEvent;
use crate::ring::{Lookup, Ring, CAPACITY};

/// Tallies of a [`Cursor`]'s progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorStats {
    /// Events handed to the callback.
    pub read: u64,
    /// Events that were overwritten or abandoned before this cursor reached them.
    pub lost: u64,
}

/// A reader that walks the ring in sequence order, seeing each event at most once and counting
/// every event it could not see. The reporter is one; a test can make its own.
pub struct Cursor<'r> {
    ring: &'r Ring,
    next: u64,
    stats: CursorStats,
    pending_since: Option<(u64, u64)>,
}

/// How long a sequence number may stay pending (taken but never published) before a cursor
/// counts it as lost: only a writer frozen between two instructions can cause it.
pub(crate) const PENDING_GIVE_UP_NS: u64 = 2_000_000_000;

impl<'r> Cursor<'r> {
    /// A cursor that starts at the oldest event still in `ring` (`from_start`) or at the next
    /// event to be recorded.
    pub fn new(ring: &'r Ring, from_start: bool) -> Self {
        let head = ring.recorded();
        let next = if from_start { 0 } else { head };
        Cursor {
            ring,
            next,
            stats: CursorStats::default(),
            pending_since: None,
        }
    }

    /// Hands every newly readable event to `f`, in sequence order; stops at the first pending
    /// one. Returns the running tallies.
    pub fn poll(&mut self, mut f: impl FnMut(&RawEvent)) -> CursorStats {
        let head = self.ring.recorded();
        // Everything older than the ring's window is gone: count it in one step.
        let oldest = head.saturating_sub(CAPACITY as u64);
        if self.next < oldest {
            self.stats.lost += oldest - self.next;
            self.next = oldest;
        }
        while self.next < head {
            match self.ring.lookup(self.next) {
                Lookup::Found(ev) => {
                    f(&ev);
                    self.stats.read += 1;
                }
                Lookup::Lost => self.stats.lost += 1,
                Lookup::Pending => {
                    let now = base::clock::monotonic_ns();
                    match self.pending_since {
                        Some((seq, t)) if seq == self.next => {
                            if now.saturating_sub(t) < PENDING_GIVE_UP_NS {
                                break;
                            }
                            self.stats.lost += 1;
                        }
                        _ => {
                            self.pending_since = Some((self.next, now));
                            break;
                        }
                    }
                }
            }
            self.next += 1;
        }
        self.stats
    }

    /// The sequence number this cursor will look at next.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Tallies so far.
    pub fn stats(&self) -> CursorStats {
        self.stats
    }
}
