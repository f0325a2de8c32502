//! The recorder's settings, owned here and nowhere else: the threshold the fast path compares
//! against, what it is made of, and the backtrace depth.
//!
//! [`THRESHOLD`] is the fast path's word (copied into each `GuardedAlloc` static, where the fast
//! path reads it: [`crate::limit_word`]). It starts at 0, so the very first
//! allocation takes the slow path and initialises everything from the environment
//! ([`ensure_init`]: libc `getenv`, byte parsing, a stack-formatted message — no allocation).
//! After that it holds `min(base threshold, smallest active assert scope limit)`, `usize::MAX`
//! meaning "off". The base threshold comes from `FREEZETRAP_ALLOC_THRESHOLD` or
//! [`crate::set_threshold`]; scope limits come from [`crate::assert_no_large_allocs`] through
//! [`add_scope_limit`] and [`remove_scope_limit`].

use crate::event::MAX_FRAMES;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The fast path's threshold. 0 = not initialised yet (everything takes the slow path once).
static THRESHOLD: AtomicUsize = AtomicUsize::new(0);
/// The threshold asked for by the environment or [`crate::set_threshold`]; `usize::MAX` = off.
static BASE: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The smallest limit of an active `assert_no_large_allocs` scope; `usize::MAX` = none.
static SCOPE_MIN: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Frames to capture per event (1..=MAX_FRAMES).
static DEPTH: AtomicUsize = AtomicUsize::new(MAX_FRAMES);

const UNINIT: u8 = 0;
const INITIALISING: u8 = 1;
const READY: u8 = 2;
static INIT: AtomicU8 = AtomicU8::new(UNINIT);
/// Set by the slow path: `GuardedAlloc` has served an allocation, so it is the global allocator.
static SERVED: AtomicBool = AtomicBool::new(false);
/// Whether the start-up read found `FREEZETRAP_ALLOC_THRESHOLD` malformed (and said so).
static COMPLAINED: AtomicBool = AtomicBool::new(false);

/// Active scope limits across all threads (a multiset). A lock the allocator never takes: only
/// scope entry and exit and `set_threshold` do, outside the allocator.
static SCOPES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

/// Below this, a threshold is accepted but said once: so many allocations reach it that the
/// backtrace each one pays for (about 1 µs with frame pointers) becomes the program's cost.
pub(crate) const SMALL_THRESHOLD: usize = 64 << 10;

/// The threshold the fast path compares against (its copy in each registered `GuardedAlloc`
/// static: [`crate::limit_word`]).
#[inline]
pub(crate) fn fast_path_threshold() -> usize {
    // SeqCst: pairs with the registration in `limit_word::adopt`. A stale value only means
    // one allocation takes the wrong path; the slow path re-checks against the base threshold
    // and the thread's scopes, so nothing is mis-recorded.
    THRESHOLD.load(Ordering::SeqCst)
}

/// Stores the fast path's threshold here and in every registered `GuardedAlloc` static.
fn set_fast_path_threshold(t: usize) {
    THRESHOLD.store(t, Ordering::SeqCst);
    crate::limit_word::publish(t);
}

/// The base threshold (`usize::MAX` = off), what the slow path records globally.
#[inline]
pub(crate) fn base() -> usize {
    BASE.load(Ordering::Relaxed)
}

/// Frames to capture per event.
#[inline]
pub(crate) fn depth() -> usize {
    DEPTH.load(Ordering::Relaxed)
}

/// Sets the frames captured per event (clamped to 1..=MAX_FRAMES).
pub(crate) fn set_depth(frames: usize) {
    wait_init();
    DEPTH.store(frames.clamp(1, MAX_FRAMES), Ordering::Relaxed);
}

/// Sets the base threshold (`usize::MAX` = off) and republishes.
pub(crate) fn set_base(bytes: usize) {
    wait_init();
    let scopes = SCOPES.lock().unwrap_or_else(|e| e.into_inner());
    BASE.store(bytes.max(1), Ordering::Relaxed);
    publish(&scopes);
}

/// Registers an active scope limit (the fast path then sends allocations of at least `limit`
/// to the slow path).
pub(crate) fn add_scope_limit(limit: usize) {
    wait_init();
    let mut scopes = SCOPES.lock().unwrap_or_else(|e| e.into_inner());
    *scopes.entry(limit).or_insert(0) += 1;
    publish(&scopes);
}

/// Unregisters a scope limit added by [`add_scope_limit`].
pub(crate) fn remove_scope_limit(limit: usize) {
    let mut scopes = SCOPES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = scopes.get_mut(&limit) {
        *c -= 1;
        if *c == 0 {
            scopes.remove(&limit);
        }
    }
    publish(&scopes);
}

/// Recomputes [`THRESHOLD`] from its two inputs. Callers hold [`SCOPES`]'s lock (passed in, so
/// two recomputations cannot interleave), or are the one initialiser.
fn publish(scopes: &BTreeMap<usize, usize>) {
    let min = scopes.keys().next().copied().unwrap_or(usize::MAX);
    SCOPE_MIN.store(min, Ordering::Relaxed);
    set_fast_path_threshold(base().min(min));
}

/// True when start-up already printed the malformed-threshold line.
pub(crate) fn complained_at_start() -> bool {
    COMPLAINED.load(Ordering::Relaxed)
}

/// Reads the environment once. Safe to call from inside the allocator: libc getenv, byte
/// parsing and a stack-formatted message only.
pub(crate) fn ensure_init() {
    if INIT.load(Ordering::Acquire) == READY {
        return;
    }
    // Acquire/Release on the state: whoever sees READY also sees the values stored before.
    if INIT
        .compare_exchange(UNINIT, INITIALISING, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return; // another thread is initialising; this allocation just passes through
    }
    crate::thread_facts::register_fork_handler();
    if let Some(v) = base::env::getenv_bytes(c"FREEZETRAP_ALLOC_THRESHOLD") {
        match base::parse::parse_size(v) {
            Ok(t) => {
                if t < SMALL_THRESHOLD {
                    warn_small_threshold(v, t);
                }
                BASE.store(t, Ordering::Relaxed)
            }
            Err(e) => {
                COMPLAINED.store(true, Ordering::Relaxed);
                base::env::complain_malformed(
                    "FREEZETRAP_ALLOC_THRESHOLD",
                    v,
                    e,
                    base::parse::SIZE_FORM,
                    "large-allocation recording stays off",
                )
            }
        }
    }
    crate::unwind::init_from_env();
    if let Some(v) = base::env::getenv_bytes(c"FREEZETRAP_BACKTRACE_DEPTH") {
        match base::parse::parse_uint_in(v, 1, MAX_FRAMES as u64) {
            Ok(d) => DEPTH.store(d as usize, Ordering::Relaxed),
            Err(e) => base::env::complain_malformed(
                "FREEZETRAP_BACKTRACE_DEPTH",
                v,
                e,
                "a whole number from 1 to 32",
                "using 32",
            ),
        }
    }
    // No scope can be active yet (scopes wait for READY), so SCOPE_MIN is still "none".
    set_fast_path_threshold(base());
    INIT.store(READY, Ordering::Release);
}

/// The one-time note about a threshold under [`SMALL_THRESHOLD`]. Formatted on the stack: this
/// runs inside the allocator's first call.
fn warn_small_threshold(value: &[u8], bytes: usize) {
    use core::fmt::Write as _;
    let mut m = base::env::StackMessage::new();
    let shown = core::str::from_utf8(&value[..value.len().min(64)]).unwrap_or("<not UTF-8>");
    let _ = write!(
        m,
        "freezetrap: FREEZETRAP_ALLOC_THRESHOLD=\"{shown}\" is below 64 KiB: every allocation of at least {bytes} bytes pays for a backtrace (about 1 µs each); recording anyway"
    );
    m.emit_stderr();
}

/// True once the slow path has run at least once: the wrapper is serving allocations.
pub(crate) fn initialised() -> bool {
    INIT.load(Ordering::Acquire) != UNINIT
}

/// Called by the slow path: the wrapper is serving allocations (the very first allocation of
/// the process takes the slow path, since the threshold starts at 0).
#[inline]
pub(crate) fn note_served() {
    // Relaxed: a flag read later by the same or another thread, publishing nothing else.
    SERVED.store(true, Ordering::Relaxed);
}

/// Whether the slow path ever ran: `GuardedAlloc` is this program's global allocator.
pub(crate) fn served() -> bool {
    SERVED.load(Ordering::Relaxed)
}

/// Waits (outside the allocator only) until initialisation has finished.
pub(crate) fn wait_init() {
    if !initialised() {
        // Not installed as the global allocator (or nothing allocated yet): initialise here.
        ensure_init();
    }
    while INIT.load(Ordering::Acquire) != READY {
        std::thread::yield_now();
    }
}
