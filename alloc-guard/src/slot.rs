//! The one seqlock slot type: a `stamp` plus an event encoded as `AtomicU64` words, written by
//! one owner at a time and read by anyone without a lock. The ring ([`crate::ring`]) and the
//! in-flight table ([`crate::inflight`]) are arrays of these; each gives its stamps its own
//! meaning, and the ordering argument below is the same for both.
//!
//! # Memory ordering
//! The words are atomics, so a reader racing a writer reads stale or torn words — never
//! undefined behaviour — and detects the tear by re-checking the stamp (Boehm, "Can seqlocks
//! get along with programming language memory models?", 2012):
//!
//! - **Writer** ([`Slot::claim`] then [`Slot::write`]): a CAS moves the stamp to a "being
//!   written" value (Acquire on success, so the word stores below cannot move before the
//!   claim); a **Release fence**; the words, Relaxed; then a **Release store** of the
//!   "complete" stamp.
//! - **Reader** ([`Slot::read`]): an **Acquire load** of the stamp; the words, Relaxed; an
//!   **Acquire fence**; a Relaxed re-load of the stamp.
//!
//! The publishing Release store pairs with the reader's first Acquire load: a reader that sees
//! the complete stamp sees every word of that write. The writer's Release fence (after its
//! claim) pairs with the reader's Acquire fence (before its re-check): if the reader's copy holds
//! any word of a *later* write, the re-check sees that write's claim, so the copy is thrown
//! away as torn. Equal stamps therefore mean a whole copy of one write.

use crate::event::WORDS;
use core::sync::atomic::{fence, AtomicU64, Ordering};

/// One slot. `const`-constructible, so arrays of them live in `static`s (no allocation).
pub(crate) struct Slot {
    stamp: AtomicU64,
    words: [AtomicU64; WORDS],
}

/// What a reader found in a slot.
// The words are returned by value on purpose: boxing them would allocate, and readers copy
// events out while the allocator may be recording or the process is frozen.
#[allow(clippy::large_enum_variant)]
pub(crate) enum SlotRead {
    /// The stamp was one the reader wanted, and the copy is whole: the words.
    Copied([u64; WORDS]),
    /// The stamp was wanted, but a writer got in while copying.
    Torn,
    /// The stamp was not one the reader wanted (it is returned).
    Other(u64),
}

impl Slot {
    /// An empty slot (stamp 0).
    pub(crate) const fn new() -> Slot {
        Slot {
            stamp: AtomicU64::new(0),
            words: [const { AtomicU64::new(0) }; WORDS],
        }
    }

    /// The stamp, for a writer deciding whether to claim (Relaxed: the claim's CAS re-checks).
    pub(crate) fn stamp_relaxed(&self) -> u64 {
        self.stamp.load(Ordering::Relaxed)
    }

    /// Claims the slot: moves the stamp from `current` to `writing` (a value readers do not
    /// accept). On failure returns the stamp found. Never waits.
    pub(crate) fn claim(&self, current: u64, writing: u64) -> Result<(), u64> {
        // Acquire on success: our word stores must not move before we own the slot.
        self.stamp
            .compare_exchange(current, writing, Ordering::Acquire, Ordering::Relaxed)
            .map(|_| ())
    }

    /// Writes `words` into a slot this thread claimed and publishes it as `complete`.
    pub(crate) fn write(&self, words: &[u64; WORDS], complete: u64) {
        // Release fence: pairs with the reader's Acquire fence (module docs).
        fence(Ordering::Release);
        for (d, v) in self.words.iter().zip(words.iter()) {
            d.store(*v, Ordering::Relaxed);
        }
        // Release: pairs with the reader's first Acquire load (module docs).
        self.stamp.store(complete, Ordering::Release);
    }

    /// Gives the slot up (stamp `to`, e.g. "free"), ordering our earlier stores before anyone
    /// else can claim it.
    pub(crate) fn release(&self, to: u64) {
        // Release: a later claimer's Acquire CAS sees our stores as done.
        self.stamp.store(to, Ordering::Release);
    }

    /// Copies the slot if its stamp satisfies `wanted` (see the module docs for why a copy
    /// with equal stamps before and after is whole).
    pub(crate) fn read(&self, wanted: impl Fn(u64) -> bool) -> SlotRead {
        // Acquire: pairs with the publishing Release store.
        let s1 = self.stamp.load(Ordering::Acquire);
        if !wanted(s1) {
            return SlotRead::Other(s1);
        }
        let mut w = [0u64; WORDS];
        for (d, s) in w.iter_mut().zip(self.words.iter()) {
            *d = s.load(Ordering::Relaxed);
        }
        // Acquire fence: pairs with the writer's Release fence.
        fence(Ordering::Acquire);
        if self.stamp.load(Ordering::Relaxed) == s1 {
            SlotRead::Copied(w)
        } else {
            SlotRead::Torn
        }
    }

    /// Reads one word of the stamp and of the event, so the slot's pages are mapped (see
    /// [`crate::ring::Ring::touch_all`]).
    pub(crate) fn touch(&self) {
        // Relaxed: the values are not used.
        core::hint::black_box(self.stamp.load(Ordering::Relaxed));
        core::hint::black_box(self.words[WORDS - 1].load(Ordering::Relaxed));
    }

    /// Test support: sets the stamp directly (simulating a writer frozen mid-write).
    #[cfg(test)]
    pub(crate) fn force_stamp(&self, s: u64) {
        self.stamp.store(s, Ordering::Relaxed);
    }
}
