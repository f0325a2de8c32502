//! The event ring: a fixed-capacity, lock-free, overwrite-oldest buffer of oversized-allocation
//! events, living in a `static` so that recording never allocates. Each slot is a
//! [`crate::slot::Slot`] (the seqlock and its memory-ordering argument live there).
//!
//! # Design
//! Writers are allocating threads (many), readers are the reporter and the watchdog (a few,
//! reading without consuming).
//!
//! The stamp of a ring slot encodes which sequence number it holds and whether it is complete:
//! `0` = never written, `2*seq+1` = being written for `seq`, `2*seq+2` = holds `seq`, complete.
//!
//! **Writing** event `seq` (unique, from `HEAD.fetch_add`): the slot is `seq % CAPACITY`.
//! 1. If the slot's stamp is for a *newer* sequence, or for an older one still being written (a
//!    writer preempted mid-copy while `CAPACITY` more events came in), the writer gives up at
//!    once: it must never wait. It leaves a *tombstone* (`SKIPPED[slot] = seq`) so readers know
//!    `seq` will never appear, and counts a collision.
//! 2. Otherwise it claims the slot (stamp `2*seq+1`), writes the words and publishes `2*seq+2`
//!    ([`crate::slot`] has the ordering argument).
//!
//! A reader following the sequence (the reporter's [`Cursor`]) classifies each `seq < HEAD` as
//! *read*, *lost* (slot already holds a newer sequence, or a tombstone says the writer gave up),
//! or *pending* (the writer took its number but has not published yet; retried later). Every
//! sequence number ends in exactly one of `read` or `lost`, which is what lets a test check that
//! logged + dropped equals the number of oversized allocations exactly.
use crate::event::{decode, RawEvent};
use crate::slot::{Slot, SlotRead};
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Slots in the ring: the most recent `CAPACITY` events stay readable.
pub const CAPACITY: usize = 1024;

/// The ring. One static instance ([`RING`]) serves the process; tests may build their own.
pub struct Ring {
    /// Next sequence number to hand out = number of events ever recorded.
    head: AtomicU64,
    /// Writers that gave up because their slot was busy (see module docs).
    collisions: AtomicU64,
    slots: [Slot; CAPACITY],
    /// Tombstones: `SKIPPED[i] = seq + 1` when the writer of `seq` gave up (0 = none).
    skipped: [AtomicU64; CAPACITY],
    /// The reporter's sleep state, a futex word: [`IDLE`] while it waits for the next push
    /// ([`Ring::wait_for_push`]), which the pushing thread then wakes.
    consumer: AtomicU32,
}

const AWAKE: u32 = 0;
const IDLE: u32 = 1;

/// What a reader found at a sequence number.
// The event is returned by value on purpose: boxing it would allocate, and readers copy events
// out of the ring while the allocator may be recording.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The event, copied out whole.
    Found(RawEvent),
    /// Overwritten by a newer event, or abandoned by its writer: it will never be readable.
    Lost,
    /// Not published yet (or not handed out yet).
    Pending,
}

impl Default for Ring {
    fn default() -> Self {
        Self::new()
    }
}

impl Ring {
    /// An empty ring (const, so it can be a `static` in `.bss`).
    pub const fn new() -> Ring {
        Ring {
            head: AtomicU64::new(0),
            collisions: AtomicU64::new(0),
            slots: [const { Slot::new() }; CAPACITY],
            skipped: [const { AtomicU64::new(0) }; CAPACITY],
            consumer: AtomicU32::new(AWAKE),
        }
    }

    /// Sleeps until an event after `position` is pushed, or [`Ring::wake_consumer`] is called:
    /// the reporter's wait when it has nothing to report, so an idle service pays no timer.
    /// Returns at once if such an event was pushed already.
    pub fn wait_for_push(&self, position: u64) {
        self.consumer.store(IDLE, Ordering::Relaxed);
        // SeqCst fence, paired with the one in `wake_idle_consumer`: either this load of `head`
        // sees the pushed event, or the pusher's load of `consumer` sees IDLE and wakes us.
        fence(Ordering::SeqCst);
        if self.recorded() <= position {
            #[cfg(ft_linux)]
            base::raw::sleep_until_or_woken(&self.consumer, IDLE, u64::MAX);
            // Elsewhere: a timed park (the reporter's flush and drop unpark it).
            #[cfg(not(ft_linux))]
            std::thread::park_timeout(std::time::Duration::from_millis(50));
        }
        self.consumer.store(AWAKE, Ordering::Relaxed);
    }

    /// Wakes the reporter from [`Ring::wait_for_push`] (a flush, a shutdown).
    pub fn wake_consumer(&self) {
        self.consumer.store(AWAKE, Ordering::SeqCst);
        #[cfg(ft_linux)]
        base::raw::wake_all(&self.consumer);
    }

    /// End of a push: wakes the reporter if it sleeps waiting for one. A fence and a load on
    /// every push; the system call only when the reporter was idle.
    fn wake_idle_consumer(&self) {
        fence(Ordering::SeqCst);
        // Relaxed: the fence above orders the load; the swap makes only one pusher wake it.
        if self.consumer.load(Ordering::Relaxed) == IDLE
            && self.consumer.swap(AWAKE, Ordering::Relaxed) == IDLE
        {
            #[cfg(ft_linux)]
            base::raw::wake_all(&self.consumer);
        }
    }

    /// Number of events ever pushed (published or not).
    pub fn recorded(&self) -> u64 {
        // Relaxed: a statistic; readers that need the events use `lookup`, which synchronises
        // through the slot stamps.
        self.head.load(Ordering::Relaxed)
    }

    /// Writers that had to give up their event because its slot was still being written.
    pub fn collisions(&self) -> u64 {
        self.collisions.load(Ordering::Relaxed)
    }

    /// Records an event and returns its sequence number. Never blocks, never allocates; the
    /// `seq` field of `ev` is overwritten.
    pub fn push(&self, ev: &RawEvent) -> u64 {
        // Relaxed: the counter only hands out unique numbers; publication is ordered by the stamp.
        let seq = self.head.fetch_add(1, Ordering::Relaxed);
        let idx = (seq % CAPACITY as u64) as usize;
        let slot = &self.slots[idx];
        let mine_odd = 2 * seq + 1;
        let mut cur = slot.stamp_relaxed();
        loop {
            let busy = cur & 1 == 1;
            let newer = cur != 0 && (cur - 1) / 2 >= seq;
            if busy || newer {
                // Release: for symmetry with the stamps; readers Acquire-load tombstones.
                self.skipped[idx].fetch_max(seq + 1, Ordering::Release);
                self.collisions.fetch_add(1, Ordering::Relaxed);
                self.wake_idle_consumer(); // a loss to count
                return seq;
            }
            match slot.claim(cur, mine_odd) {
                Ok(()) => break,
                Err(now) => cur = now,
            }
        }
        let mut e = *ev;
        e.seq = seq;
        slot.write(&e.encode(), mine_odd + 1);
        self.wake_idle_consumer();
        seq
    }

    /// Reads event `seq` without consuming it.
    pub fn lookup(&self, seq: u64) -> Lookup {
        if seq >= self.head.load(Ordering::Acquire) {
            return Lookup::Pending;
        }
        let idx = (seq % CAPACITY as u64) as usize;
        let want = 2 * seq + 2;
        match self.slots[idx].read(|s| s == want) {
            SlotRead::Copied(w) => Lookup::Found(decode(&w)),
            SlotRead::Torn => Lookup::Lost, // overwritten while we copied
            SlotRead::Other(s1) if s1 == want - 1 => Lookup::Pending, // being written now
            SlotRead::Other(s1) => {
                let newer = s1 != 0 && (s1 - 1) / 2 > seq;
                // Acquire: pairs with the giving-up writer's Release.
                let tomb = self.skipped[idx].load(Ordering::Acquire);
                if newer || tomb > seq {
                    Lookup::Lost
                } else {
                    Lookup::Pending
                }
            }
        }
    }

    /// Reads one word of every slot and tombstone, so every page of the ring is mapped. The
    /// watchdog calls this at start: a reader that touches a never-mapped page takes a page
    /// fault, which waits for the mmap_lock while another thread forks.
    pub fn touch_all(&self) {
        for (slot, tomb) in self.slots.iter().zip(self.skipped.iter()) {
            // Relaxed: the values are not used.
            slot.touch();
            // Relaxed: the value is not used.
            core::hint::black_box(tomb.load(Ordering::Relaxed));
        }
    }

    /// Copies the complete events whose start (`ts_ns`) lies in `[t0_ns, t1_ns]` into `out`,
    /// newest first, and returns how many were written. Looks at the last `CAPACITY` sequence
    /// numbers only. Never allocates: meant for the watchdog during a stall.
    pub fn events_between(&self, t0_ns: u64, t1_ns: u64, out: &mut [RawEvent]) -> usize {
        let head = self.head.load(Ordering::Acquire);
        let oldest = head.saturating_sub(CAPACITY as u64);
        let mut n = 0;
        let mut seq = head;
        while seq > oldest && n < out.len() {
            seq -= 1;
            if let Lookup::Found(ev) = self.lookup(seq) {
                let end = ev.ts_ns.saturating_add(ev.duration_ns);
                if ev.ts_ns <= t1_ns && end >= t0_ns {
                    out[n] = ev;
                    n += 1;
                }
            }
        }
        n
    }
}

/// The process-wide ring that [`crate::GuardedAlloc`] records into.
pub static RING: Ring = Ring::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Cursor;
    use crate::event::AllocKind;

    #[test]
    fn a_consumer_waiting_for_a_push_is_woken_by_it_and_by_wake_consumer() {
        static R: Ring = Ring::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            R.wait_for_push(0);
            tx.send(R.recorded()).unwrap();
            R.wait_for_push(1);
            tx.send(u64::MAX).unwrap();
        });
        // Whether the waiter is asleep yet or not, the push must end its wait.
        std::thread::sleep(std::time::Duration::from_millis(20));
        R.push(&ev(1, 1));
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Ok(1), "the push woke the waiting consumer");
        std::thread::sleep(std::time::Duration::from_millis(20));
        R.wake_consumer();
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Ok(u64::MAX), "wake_consumer ended the second wait");
        waiter.join().unwrap();
        // Already pushed: no wait at all.
        R.wait_for_push(0);
    }

    fn ev(size: u64, ts: u64) -> RawEvent {
        let mut e = RawEvent::EMPTY;
        e.size = size;
        e.ts_ns = ts;
        e.duration_ns = 5;
        e.frame_count = 3;
        e.frames[..3].copy_from_slice(&[1, 2, 3]);
        e.thread_name[..4].copy_from_slice(b"main");
        e
    }

    #[test]
    fn round_trip() {
        let ring = Box::new(Ring::new());
        let mut e = ev(123, 1000);
        e.kind = AllocKind::Realloc;
        e.old_size = 7;
        let seq = ring.push(&e);
        match ring.lookup(seq) {
            Lookup::Found(got) => {
                e.seq = seq;
                assert_eq!(got, e);
                assert_eq!(got.thread_name(), "main");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ring.lookup(seq + 1), Lookup::Pending);
    }

    #[test]
    fn overwrite_is_counted_as_lost() {
        let ring = Box::new(Ring::new());
        let mut cur = Cursor::new(&ring, true);
        for i in 0..(CAPACITY as u64 + 10) {
            ring.push(&ev(i, i));
        }
        let mut seen = Vec::new();
        let st = cur.poll(|e| seen.push(e.size));
        assert_eq!(st.read + st.lost, CAPACITY as u64 + 10);
        assert_eq!(st.lost, 10);
        assert_eq!(seen.first(), Some(&10));
        assert_eq!(seen.last(), Some(&(CAPACITY as u64 + 9)));
    }

    #[test]
    fn tombstone_makes_abandoned_sequence_lost() {
        let ring = Box::new(Ring::new());
        // Simulate a writer stuck mid-write on slot 0 for seq 0.
        ring.head.store(1, Ordering::Relaxed);
        ring.slots[0].force_stamp(1);
        ring.head.store(CAPACITY as u64, Ordering::Relaxed);
        let seq = ring.push(&ev(9, 9)); // seq = CAPACITY -> slot 0, busy -> gives up
        assert_eq!(seq, CAPACITY as u64);
        assert_eq!(ring.collisions(), 1);
        assert_eq!(ring.lookup(seq), Lookup::Lost);
    }

    #[test]
    fn window_query_returns_newest_first() {
        let ring = Box::new(Ring::new());
        for i in 0..10u64 {
            ring.push(&ev(i, i * 100));
        }
        let mut out = [RawEvent::EMPTY; 4];
        let n = ring.events_between(250, 650, &mut out);
        let sizes: Vec<u64> = out[..n].iter().map(|e| e.size).collect();
        assert_eq!(sizes, vec![6, 5, 4, 3]);
    }

    #[test]
    fn concurrent_writers_and_a_reader_account_for_every_event() {
        let ring: &'static Ring = Box::leak(Box::new(Ring::new()));
        let per = if cfg!(miri) { 200 } else { 50_000 };
        let writers: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..per {
                        ring.push(&ev(t * 1_000_000 + i, i));
                    }
                })
            })
            .collect();
        let mut cur = Cursor::new(ring, true);
        let mut last = 0;
        while writers.iter().any(|w| !w.is_finished()) {
            cur.poll(|e| {
                assert!(e.seq >= last);
                last = e.seq;
                assert_eq!(e.frames(), &[1, 2, 3]);
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        let st = cur.poll(|_| {});
        assert_eq!(st.read + st.lost, 4 * per);
        assert_eq!(ring.recorded(), 4 * per);
    }
}
