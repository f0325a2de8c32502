//! Heartbeats: cheap progress marks that critical threads leave for the watchdog.
//!
//! A [`Heartbeat`] owns one slot of a fixed, static registry. [`Heartbeat::beat`] is one relaxed
//! store of the current `CLOCK_MONOTONIC` time (a vDSO read, no syscall, no shared
//! read-modify-write). The watchdog reads the stamps every tick; a stamp older than the stall
//! threshold is a thread stall, detected between `threshold` and `threshold + tick` after the
//! last beat. (A counter instead of a time would save the clock read, ~20-40 ns, but the
//! watchdog would only learn *which tick* a beat fell in, stretching detection to
//! `threshold + 2 ticks`.)

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Heartbeats that can be registered at once.
pub const MAX_HEARTBEATS: usize = 256;

pub(crate) const FREE: u8 = 0;
const CLAIMING: u8 = 1;
pub(crate) const ACTIVE: u8 = 2;
pub(crate) const IDLE: u8 = 3;

pub(crate) struct Slot {
    pub(crate) state: AtomicU8,
    pub(crate) last_ns: AtomicU64,
    pub(crate) tid: AtomicU64,
    /// Bumped on every registration, so the watchdog notices a slot that was reused.
    pub(crate) generation: AtomicU64,
    pub(crate) name: [AtomicU64; 4],
}

/// One past the highest slot index ever claimed: the watchdog scans only `SLOTS[..HIGH_WATER]`.
pub(crate) static HIGH_WATER: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

pub(crate) static SLOTS: [Slot; MAX_HEARTBEATS] = [const {
    Slot {
        state: AtomicU8::new(FREE),
        last_ns: AtomicU64::new(0),
        tid: AtomicU64::new(0),
        generation: AtomicU64::new(0),
        name: [const { AtomicU64::new(0) }; 4],
    }
}; MAX_HEARTBEATS];

/// A registered heartbeat. Create it on the thread it watches; beat it from there.
///
/// ```
/// let hb = freezetrap_watchdog::Heartbeat::new("event-loop");
/// for _request in 0..3 {
///     hb.beat(); // one relaxed store
///     // ... handle the request ...
/// }
/// ```
/// Dropping the handle unregisters it. A thread that waits for work on purpose should call
/// [`Heartbeat::idle`] before waiting, so a quiet period is not reported as a stall.
pub struct Heartbeat {
    slot: &'static Slot,
}

/// Why a heartbeat could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryFull;

impl std::fmt::Display for RegistryFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "freezetrap: all {MAX_HEARTBEATS} heartbeat slots are taken: drop unused heartbeats"
        )
    }
}

impl Heartbeat {
    /// Registers a heartbeat named `name` (at most 32 bytes are kept) for the calling thread.
    ///
    /// # Panics
    /// When all [`MAX_HEARTBEATS`] slots are taken; use [`Heartbeat::try_new`] to handle that.
    pub fn new(name: &str) -> Heartbeat {
        Self::try_new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Heartbeat::new`], returning an error when the registry is full.
    pub fn try_new(name: &str) -> Result<Heartbeat, RegistryFull> {
        for (i, slot) in SLOTS.iter().enumerate() {
            // Acquire: our stores below must not move before we own the slot.
            if slot
                .state
                .compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let mut bytes = [0u8; 32];
                let n = name.len().min(32);
                bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
                for (i, w) in slot.name.iter().enumerate() {
                    w.store(
                        u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()),
                        Ordering::Relaxed,
                    );
                }
                slot.tid
                    .store(base::thread::current_tid(), Ordering::Relaxed);
                slot.last_ns
                    .store(base::clock::monotonic_ns(), Ordering::Relaxed);
                slot.generation.fetch_add(1, Ordering::Relaxed);
                // Release: the watchdog's Acquire load of ACTIVE sees name, tid and generation.
                slot.state.store(ACTIVE, Ordering::Release);
                HIGH_WATER.fetch_max(i + 1, Ordering::Relaxed);
                return Ok(Heartbeat { slot });
            }
        }
        Err(RegistryFull)
    }

    /// Marks progress: one relaxed store of the current time. Relaxed suffices: the watchdog
    /// only needs to see the stamp eventually (within a tick), in no order with other memory.
    #[inline]
    pub fn beat(&self) {
        self.slot
            .last_ns
            .store(base::clock::monotonic_ns(), Ordering::Relaxed);
        if self.slot.state.load(Ordering::Relaxed) == IDLE {
            // Release: the watchdog's Acquire load of ACTIVE then sees the stamp above, never
            // one from before the idle period (which would read as a long stall).
            self.slot.state.store(ACTIVE, Ordering::Release);
        }
    }

    /// Marks the thread as waiting on purpose: no stall is reported until the next
    /// [`Heartbeat::beat`].
    pub fn idle(&self) {
        self.slot.state.store(IDLE, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = slot_name_text(self.slot);
        f.debug_struct("Heartbeat")
            .field(
                "name",
                &String::from_utf8_lossy(&name).trim_end_matches('\0'),
            )
            // Relaxed: a snapshot for display.
            .field("last_beat_ns", &self.slot.last_ns.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // Release: pairs with a claimer's Acquire CAS.
        self.slot.state.store(FREE, Ordering::Release);
    }
}

/// Reads a slot's name into a string (watchdog side, after a stall).
#[cfg(ft_linux)]
pub(crate) fn slot_name(slot: &Slot) -> [u8; 32] {
    slot_name_text(slot)
}

fn slot_name_text(slot: &Slot) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, w) in slot.name.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    out
}

/// Runs `f` in a loop, beating before each call, until it returns `false`: the plain-loop helper.
///
/// ```
/// let mut n = 0;
/// freezetrap_watchdog::heartbeat::beat_loop("worker", || { n += 1; n < 10 });
/// assert_eq!(n, 10);
/// ```
pub fn beat_loop(name: &str, mut f: impl FnMut() -> bool) {
    let hb = Heartbeat::new(name);
    loop {
        hb.beat();
        if !f() {
            break;
        }
    }
}
