//! The event ring: a fixed-capacity, lock-free, overwrite-oldest buffer of oversized-allocation
//! events, living in a `static` so that recording never allocates.
//!
//! # Design
//! Writers are allocating threads (many), readers are the reporter and the watchdog (a few,
//! reading without consuming). Each slot is a *seqlock*: a `stamp` plus the event encoded as
//! `AtomicU64` words (so a reader racing a writer reads stale or torn words, never undefined
//! behaviour, and detects the tear by re-checking the stamp).
//!
//! The stamp encodes which sequence number the slot holds and whether it is complete:
//! `0` = never written, `2*seq+1` = being written for `seq`, `2*seq+2` = holds `seq`, complete.
//!
//! **Writing** event `seq` (unique, from `HEAD.fetch_add`): the slot is `seq % CAPACITY`.
//! 1. If the slot's stamp is for a *newer* sequence, or for an older one still being written (a
//!    writer preempted mid-copy while `CAPACITY` more events came in), the writer gives up at
//!    once: it must never wait. It leaves a *tombstone* (`SKIPPED[slot] = seq`) so readers know
//!    `seq` will never appear, and counts a collision.
//! 2. Otherwise it CASes the stamp to `2*seq+1`, issues a Release fence, stores the words
//!    (Relaxed), and publishes with a Release store of `2*seq+2`.
//!
//! **Reading** `seq`: Acquire-load the stamp; if it is `2*seq+2`, load the words (Relaxed), then
//! an Acquire fence, then re-load the stamp. Equal stamps mean the copy is whole: the writer's
//! Release fence after the odd stamp pairs with the reader's Acquire fence, so if the reader saw
//! any word of a later write, its second stamp load sees that write's odd stamp (the classic
//! seqlock argument, see Boehm, "Can seqlocks get along with programming language memory
//! models?", 2012). The publishing Release store pairs with the reader's first Acquire load, so a
//! complete stamp implies the words of that write are visible.
//!
//! A reader following the sequence (the reporter's [`Cursor`]) classifies each `seq < HEAD` as
//! *read*, *lost* (slot already holds a newer sequence, or a tombstone says the writer gave up),
//! or *pending* (the writer took its number but has not published yet; retried later). Every
//! sequence number ends in exactly one of `read` or `lost`, which is what lets a test check that
//! logged + dropped equals the number of oversized allocations exactly.

use core::sync::atomic::{fence, AtomicU64, Ordering};

/// Raw return addresses kept per event.
pub const MAX_FRAMES: usize = 32;
/// Slots in the ring: the most recent `CAPACITY` events stay readable.
pub const CAPACITY: usize = 1024;

const HEADER_WORDS: usize = 10;
pub(crate) const WORDS: usize = HEADER_WORDS + MAX_FRAMES;

/// Which allocator entry point produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AllocKind {
    /// `GlobalAlloc::alloc`.
    Alloc = 0,
    /// `GlobalAlloc::alloc_zeroed`.
    AllocZeroed = 1,
    /// `GlobalAlloc::realloc` (`old_size` is the size before).
    Realloc = 2,
}

impl AllocKind {
    /// The name used in reports: `alloc`, `alloc_zeroed` or `realloc`.
    pub fn as_str(self) -> &'static str {
        match self {
            AllocKind::Alloc => "alloc",
            AllocKind::AllocZeroed => "alloc_zeroed",
            AllocKind::Realloc => "realloc",
        }
    }
    fn from_u8(v: u8) -> AllocKind {
        match v {
            1 => AllocKind::AllocZeroed,
            2 => AllocKind::Realloc,
            _ => AllocKind::Alloc,
        }
    }
}

/// One oversized allocation, as recorded on the allocating thread: plain integers and raw return
/// addresses, symbolized later by the reporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    /// Sequence number, 0-based, in order of completion.
    pub seq: u64,
    /// Entry point.
    pub kind: AllocKind,
    /// Requested size in bytes.
    pub size: u64,
    /// Size before a realloc; 0 otherwise.
    pub old_size: u64,
    /// Address returned by the inner allocator; 0 if it failed.
    pub address: u64,
    /// Kernel thread id of the allocating thread.
    pub thread_id: u64,
    /// Kernel name of the allocating thread, NUL-padded.
    pub thread_name: [u8; 16],
    /// `CLOCK_MONOTONIC` nanoseconds when the allocation entered the allocator.
    pub ts_ns: u64,
    /// Nanoseconds spent inside the inner allocator.
    pub duration_ns: u64,
    /// How many entries of `frames` are valid.
    pub frame_count: usize,
    /// Raw return addresses, innermost first (allocator frames included; the reporter trims them).
    pub frames: [usize; MAX_FRAMES],
}

impl RawEvent {
    /// An all-zero event, for preallocated buffers.
    pub const EMPTY: RawEvent = RawEvent {
        seq: 0,
        kind: AllocKind::Alloc,
        size: 0,
        old_size: 0,
        address: 0,
        thread_id: 0,
        thread_name: [0; 16],
        ts_ns: 0,
        duration_ns: 0,
        frame_count: 0,
        frames: [0; MAX_FRAMES],
    };

    /// The valid frames.
    pub fn frames(&self) -> &[usize] {
        &self.frames[..self.frame_count.min(MAX_FRAMES)]
    }

    /// The thread name as text.
    pub fn thread_name(&self) -> &str {
        crate::sys::name_str(&self.thread_name)
    }

    pub(crate) fn encode(&self) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        w[0] = self.seq;
        w[1] = self.kind as u64 | ((self.frame_count.min(MAX_FRAMES) as u64) << 8);
        w[2] = self.size;
        w[3] = self.old_size;
        w[4] = self.address;
        w[5] = self.thread_id;
        w[6] = u64::from_le_bytes(self.thread_name[..8].try_into().unwrap_or([0; 8]));
        w[7] = u64::from_le_bytes(self.thread_name[8..].try_into().unwrap_or([0; 8]));
        w[8] = self.ts_ns;
        w[9] = self.duration_ns;
        for (d, f) in w[HEADER_WORDS..].iter_mut().zip(self.frames.iter()) {
            *d = *f as u64;
        }
        w
    }
}

/// One seqlock slot: the stamp and the event encoded as words.
struct Slot {
    stamp: AtomicU64,
    words: [AtomicU64; WORDS],
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            stamp: AtomicU64::new(0),
            words: [const { AtomicU64::new(0) }; WORDS],
        }
    }
}

pub(crate) fn decode(w: &[u64; WORDS]) -> RawEvent {
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(&w[6].to_le_bytes());
    name[8..].copy_from_slice(&w[7].to_le_bytes());
    let mut frames = [0usize; MAX_FRAMES];
    for (d, s) in frames.iter_mut().zip(w[HEADER_WORDS..].iter()) {
        *d = *s as usize;
    }
    RawEvent {
        seq: w[0],
        kind: AllocKind::from_u8((w[1] & 0xff) as u8),
        frame_count: ((w[1] >> 8) as usize).min(MAX_FRAMES),
        size: w[2],
        old_size: w[3],
        address: w[4],
        thread_id: w[5],
        thread_name: name,
        ts_ns: w[8],
        duration_ns: w[9],
        frames,
    }
}

/// The ring. One static instance ([`RING`]) serves the process; tests may build their own.
pub struct Ring {
    /// Next sequence number to hand out = number of events ever recorded.
    head: AtomicU64,
    /// Writers that gave up because their slot was busy (see module docs).
    collisions: AtomicU64,
    slots: [Slot; CAPACITY],
    /// Tombstones: `SKIPPED[i] = seq + 1` when the writer of `seq` gave up (0 = none).
    skipped: [AtomicU64; CAPACITY],
}

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
        let mut cur = slot.stamp.load(Ordering::Relaxed);
        loop {
            let busy = cur & 1 == 1;
            let newer = cur != 0 && (cur - 1) / 2 >= seq;
            if busy || newer {
                self.skipped[idx].fetch_max(seq + 1, Ordering::Release);
                self.collisions.fetch_add(1, Ordering::Relaxed);
                return seq;
            }
            // Acquire on success: we must not let our word stores move before we own the slot.
            match slot.stamp.compare_exchange_weak(
                cur,
                mine_odd,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        // Release fence: pairs with the reader's Acquire fence (see module docs): a reader that
        // sees any word below also sees our odd stamp on its re-check.
        fence(Ordering::Release);
        let mut e = *ev;
        e.seq = seq;
        for (dst, v) in slot.words.iter().zip(e.encode().iter()) {
            dst.store(*v, Ordering::Relaxed);
        }
        // Release: pairs with the reader's first Acquire stamp load; the words are visible to
        // anyone who sees the complete stamp.
        slot.stamp.store(mine_odd + 1, Ordering::Release);
        seq
    }

    /// Reads event `seq` without consuming it.
    pub fn lookup(&self, seq: u64) -> Lookup {
        if seq >= self.head.load(Ordering::Acquire) {
            return Lookup::Pending;
        }
        let idx = (seq % CAPACITY as u64) as usize;
        let slot = &self.slots[idx];
        let want = 2 * seq + 2;
        let s1 = slot.stamp.load(Ordering::Acquire);
        if s1 == want - 1 {
            return Lookup::Pending; // being written right now
        }
        if s1 != want {
            let newer = s1 != 0 && (s1 - 1) / 2 > seq;
            // Acquire: pairs with the giving-up writer's Release, for symmetry with stamps.
            let tomb = self.skipped[idx].load(Ordering::Acquire);
            return if newer || tomb > seq {
                Lookup::Lost
            } else {
                Lookup::Pending
            };
        }
        let mut w = [0u64; WORDS];
        for (d, s) in w.iter_mut().zip(slot.words.iter()) {
            *d = s.load(Ordering::Relaxed);
        }
        // Acquire fence: pairs with the writer's Release fence after its odd stamp.
        fence(Ordering::Acquire);
        let s2 = slot.stamp.load(Ordering::Relaxed);
        if s2 != want {
            return Lookup::Lost; // overwritten while we copied
        }
        Lookup::Found(decode(&w))
    }

    /// Reads one word of every slot and tombstone, so every page of the ring is mapped. The
    /// watchdog calls this at start: a reader that touches a never-mapped page takes a page
    /// fault, which waits for the mmap_lock while another thread forks.
    pub fn touch_all(&self) {
        for (slot, tomb) in self.slots.iter().zip(self.skipped.iter()) {
            // Relaxed: the values are not used.
            core::hint::black_box(slot.stamp.load(Ordering::Relaxed));
            core::hint::black_box(slot.words[WORDS - 1].load(Ordering::Relaxed));
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
const PENDING_GIVE_UP_NS: u64 = 2_000_000_000;

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
                    let now = crate::sys::monotonic_ns();
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

#[cfg(test)]
mod tests {
    use super::*;

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
        ring.slots[0].stamp.store(1, Ordering::Relaxed);
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
