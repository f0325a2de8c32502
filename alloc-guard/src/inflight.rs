//! The in-flight table: oversized allocations that have entered the inner allocator and not yet
//! returned. This is what lets the watchdog name a resize that is *still running* when a stall is
//! detected (the incident's 3.5 GB table), not only allocations that already finished.
//!
//! A fixed array of [`SLOTS`] seqlock slots ([`crate::slot::Slot`], which has the ordering
//! argument) in a `static`. The owning thread claims a free slot (`0 -> CLAIMING`), writes the
//! event words, publishes a unique even token, and frees the slot (back to `0`) when the inner
//! allocator returns. Readers keep a copy only if the token did not change while they copied;
//! tokens are unique, so a slot freed and reclaimed during a read is detected. When every slot
//! is taken, the allocation is not tracked and [`untracked`] counts it.

use crate::event::{decode, RawEvent};
use crate::slot::{Slot, SlotRead};
use core::sync::atomic::{AtomicU64, Ordering};

/// Concurrent oversized allocations that can be tracked at once.
pub const SLOTS: usize = 64;

const FREE: u64 = 0;
const CLAIMING: u64 = 1;

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
static UNTRACKED: AtomicU64 = AtomicU64::new(0);

/// Oversized allocations that could not be marked in flight because all [`SLOTS`] were taken.
pub fn untracked() -> u64 {
    UNTRACKED.load(Ordering::Relaxed)
}

/// A claimed slot; freeing it is the owner's job ([`InFlightMark::finish`] or drop).
pub(crate) struct InFlightMark {
    slot: Option<usize>,
}

impl InFlightMark {
    /// Marks `ev` (with `address = 0`, `duration_ns = 0`) as in flight. Never blocks.
    pub(crate) fn begin(ev: &RawEvent) -> InFlightMark {
        let start = (ev.thread_id as usize) % SLOTS;
        for k in 0..SLOTS {
            let i = (start + k) % SLOTS;
            let slot = &TABLE[i];
            if slot.claim(FREE, CLAIMING).is_ok() {
                // Relaxed: only uniqueness matters.
                let token = 2 * NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
                slot.write(&ev.encode(), token);
                return InFlightMark { slot: Some(i) };
            }
        }
        UNTRACKED.fetch_add(1, Ordering::Relaxed);
        InFlightMark { slot: None }
    }

    /// The allocation returned: free the slot.
    pub(crate) fn finish(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(i) = self.slot.take() {
            TABLE[i].release(FREE);
        }
    }
}

impl Drop for InFlightMark {
    fn drop(&mut self) {
        self.release();
    }
}

/// Reads every slot once so its pages are mapped (see [`crate::ring::Ring::touch_all`]).
pub fn touch_all() {
    for slot in TABLE.iter() {
        slot.touch();
    }
}

/// Copies the allocations in flight right now into `out` and returns how many. `seq` of each is
/// 0 (sequence numbers are assigned on completion) and `duration_ns` is 0; the caller computes
/// "in flight for" from `ts_ns`. Never allocates: meant for the watchdog during a stall.
pub fn in_flight(out: &mut [RawEvent]) -> usize {
    let mut n = 0;
    for slot in TABLE.iter() {
        if n == out.len() {
            break;
        }
        // A published token is even and at least 2 (0 = free, 1 = being claimed).
        if let SlotRead::Copied(w) = slot.read(|s| s >= 2) {
            out[n] = decode(&w);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_is_visible_until_finished() {
        let mut ev = RawEvent::EMPTY;
        ev.size = 0xfeed_0001;
        ev.thread_id = 7;
        let mark = InFlightMark::begin(&ev);
        let mut out = [RawEvent::EMPTY; SLOTS];
        let n = in_flight(&mut out);
        assert!(out[..n].iter().any(|e| e.size == 0xfeed_0001));
        mark.finish();
        let n = in_flight(&mut out);
        assert!(!out[..n].iter().any(|e| e.size == 0xfeed_0001));

        // One test, not two: the table is process-wide and a full table would starve a
        // concurrently running test.
        let mut ev = RawEvent::EMPTY;
        ev.size = 0xbeef;
        let before = untracked();
        let marks: Vec<_> = (0..SLOTS + 3).map(|_| InFlightMark::begin(&ev)).collect();
        assert!(untracked() >= before + 3);
        drop(marks);
    }
}
