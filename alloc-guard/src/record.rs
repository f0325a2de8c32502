//! The slow path: what happens to an allocation at or above the threshold.
//!
//! # What this code may not do
//! It runs *inside* the global allocator, on any thread, possibly during thread teardown, in a
//! freshly forked child, or while another thread panics. So it never panics, never allocates
//! through the Rust global allocator (its own allocations would recurse; the reentrancy guard
//! turns any that slip through into plain pass-throughs), never takes a lock (a lock held by the
//! reporter while it allocates, or by a thread that vanished at `fork()`, would deadlock us),
//! never symbolizes and never reads `/proc`. Backtraces are raw return addresses (see
//! [`crate::unwind`] for the two ways they are taken).
//!
//! # Threshold state
//! [`THRESHOLD`] is the one word the fast path reads. It starts at 0, so the very first
//! allocation comes here and initialises it from `FREEZETRAP_ALLOC_THRESHOLD` (libc `getenv`, no
//! allocation). After that it holds `min(base threshold, smallest active assert scope limit)`,
//! `usize::MAX` meaning "off".

use crate::config;
use crate::inflight::InFlightMark;
use crate::ring::{AllocKind, RawEvent, MAX_FRAMES, RING};
use crate::scope;
use crate::sys;
use crate::unwind;
use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// The fast path's threshold. 0 = not initialised yet (everything takes the slow path once).
pub(crate) static THRESHOLD: AtomicUsize = AtomicUsize::new(0);
/// The threshold asked for by the environment or [`crate::set_threshold`]; `usize::MAX` = off.
pub(crate) static BASE_THRESHOLD: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The smallest limit of an active `assert_no_large_allocs` scope; `usize::MAX` = none.
pub(crate) static SCOPE_MIN: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Frames to capture per event (1..=MAX_FRAMES).
pub(crate) static DEPTH: AtomicUsize = AtomicUsize::new(MAX_FRAMES);

const UNINIT: u8 = 0;
const INITIALISING: u8 = 1;
const READY: u8 = 2;
static INIT: AtomicU8 = AtomicU8::new(UNINIT);
/// Whether the start-up read found `FREEZETRAP_ALLOC_THRESHOLD` malformed (and said so).
static COMPLAINED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// True when start-up already printed the malformed-threshold line.
pub(crate) fn complained_at_start() -> bool {
    COMPLAINED.load(Ordering::Relaxed)
}

/// The threshold the fast path compares against.
#[inline(always)]
pub(crate) fn threshold() -> usize {
    // Relaxed: a stale value only means one allocation takes the wrong path; the slow path
    // re-checks against the base threshold and the thread's scopes, so nothing is mis-recorded.
    THRESHOLD.load(Ordering::Relaxed)
}

/// Recomputes [`THRESHOLD`] from its two inputs. Callers serialise through `scope::SCOPES`'s
/// lock (or are the one initialiser), so two recomputations cannot interleave.
pub(crate) fn publish_threshold() {
    let t = BASE_THRESHOLD
        .load(Ordering::Relaxed)
        .min(SCOPE_MIN.load(Ordering::Relaxed));
    THRESHOLD.store(t, Ordering::Relaxed);
}

/// Reads the environment once. Safe to call from inside the allocator: libc getenv, byte
/// parsing and a stack-formatted message only.
pub(crate) fn ensure_init() {
    if INIT.load(Ordering::Acquire) == READY {
        return;
    }
    // Acquire/Release on the state: whoever sees READY also sees the thresholds stored before.
    if INIT
        .compare_exchange(UNINIT, INITIALISING, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return; // another thread is initialising; this allocation just passes through
    }
    sys::register_fork_handler();
    if let Some(v) = config::getenv_bytes(c"FREEZETRAP_ALLOC_THRESHOLD") {
        match config::parse_size(v) {
            Ok(t) => {
                if t < SMALL_THRESHOLD {
                    warn_small_threshold(v, t);
                }
                BASE_THRESHOLD.store(t, Ordering::Relaxed)
            }
            Err(e) => {
                COMPLAINED.store(true, Ordering::Relaxed);
                config::complain_malformed(
                    "FREEZETRAP_ALLOC_THRESHOLD",
                    v,
                    e,
                    config::SIZE_FORM,
                    "large-allocation recording stays off",
                )
            }
        }
    }
    unwind::init_from_env();
    if let Some(v) = config::getenv_bytes(c"FREEZETRAP_BACKTRACE_DEPTH") {
        match config::parse_uint_in(v, 1, MAX_FRAMES as u64) {
            Ok(d) => DEPTH.store(d as usize, Ordering::Relaxed),
            Err(e) => config::complain_malformed(
                "FREEZETRAP_BACKTRACE_DEPTH",
                v,
                e,
                "a whole number from 1 to 32",
                "using 32",
            ),
        }
    }
    publish_threshold();
    INIT.store(READY, Ordering::Release);
}

/// Below this, a threshold is accepted but said once: so many allocations reach it that the
/// backtrace each one pays for (about 1 µs with frame pointers) becomes the program's cost.
pub(crate) const SMALL_THRESHOLD: usize = 64 << 10;

/// The one-time note about a threshold under [`SMALL_THRESHOLD`]. Formatted on the stack: this
/// runs inside the allocator's first call.
fn warn_small_threshold(value: &[u8], bytes: usize) {
    use core::fmt::Write as _;
    let mut m = config::StackMessage::new();
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

/// Waits (outside the allocator only) until initialisation has finished.
pub(crate) fn wait_init() {
    if INIT.load(Ordering::Acquire) == UNINIT && !initialised() {
        // Not installed as the global allocator (or nothing allocated yet): initialise here.
        ensure_init();
    }
    while INIT.load(Ordering::Acquire) != READY {
        std::thread::yield_now();
    }
}

thread_local! {
    /// Set while this thread is inside the recording slow path, or for the whole life of an
    /// internal thread (the reporter). Const-initialised `Cell<bool>`: no lazy init, no
    /// destructor, so it is usable from the allocator during thread teardown.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// The reentrancy guard. Every allocation freezetrap's own machinery makes on this thread while
/// a guard is alive goes straight to the inner allocator. `Drop` resets the flag, so a panic
/// cannot leave a thread permanently unrecorded.
pub(crate) struct Reentrancy(());

impl Reentrancy {
    /// `None` when this thread is already inside (or is an internal thread).
    #[inline]
    pub(crate) fn enter() -> Option<Reentrancy> {
        BUSY.try_with(|b| {
            if b.get() {
                None
            } else {
                b.set(true);
                Some(Reentrancy(()))
            }
        })
        .ok()
        .flatten()
    }
}

impl Drop for Reentrancy {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

/// Marks the calling thread as freezetrap-internal for the rest of its life: its allocations are
/// never recorded (they are freezetrap's overhead, not the service's).
pub fn mark_current_thread_internal() {
    let _ = BUSY.try_with(|b| b.set(true));
}

/// One allocator request that reached the slow path.
#[derive(Clone, Copy)]
pub(crate) enum Request {
    Alloc(Layout),
    AllocZeroed(Layout),
    Realloc {
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    },
}

impl Request {
    fn kind_and_sizes(&self) -> (AllocKind, usize, usize) {
        match *self {
            Request::Alloc(l) => (AllocKind::Alloc, l.size(), 0),
            Request::AllocZeroed(l) => (AllocKind::AllocZeroed, l.size(), 0),
            Request::Realloc {
                layout, new_size, ..
            } => (AllocKind::Realloc, new_size, layout.size()),
        }
    }

    /// Forwards the request to `inner`.
    ///
    /// # Safety
    /// The request must satisfy `inner`'s `GlobalAlloc` contract (it is the caller's request).
    #[inline(always)]
    unsafe fn forward<A: GlobalAlloc>(self, inner: &A) -> *mut u8 {
        // SAFETY: forwarded unchanged from our caller, who upholds the contract.
        unsafe {
            match self {
                Request::Alloc(l) => inner.alloc(l),
                Request::AllocZeroed(l) => inner.alloc_zeroed(l),
                Request::Realloc {
                    ptr,
                    layout,
                    new_size,
                } => inner.realloc(ptr, layout, new_size),
            }
        }
    }
}

/// The slow path for one allocation at or above [`THRESHOLD`].
///
/// Takes the request as a value (not a closure) so the fast path builds nothing before its
/// compare; `#[cold]` and `#[inline(never)]` keep all of this out of the caller's code.
///
/// # Safety
/// `req` must satisfy `inner`'s `GlobalAlloc` contract (the caller's request, unchanged).
#[cold]
#[inline(never)]
pub(crate) unsafe fn slow_path<A: GlobalAlloc>(inner: &A, req: Request) -> *mut u8 {
    let (kind, size, old_size) = req.kind_and_sizes();
    // SAFETY (for every `req.forward(inner)` below): the request is the caller's, unchanged.
    let call = || unsafe { req.forward(inner) };
    ensure_init();
    let record_global = size >= BASE_THRESHOLD.load(Ordering::Relaxed);
    let record_scope = scope::wants(size);
    if !record_global && !record_scope {
        return call();
    }
    let Some(_guard) = Reentrancy::enter() else {
        return call();
    };

    let mut ev = RawEvent::EMPTY;
    ev.kind = kind;
    ev.size = size as u64;
    ev.old_size = old_size as u64;
    let facts = sys::current_thread_facts();
    ev.frame_count = unwind::capture_frames(&mut ev.frames, facts.stack_hi);
    (ev.thread_id, ev.thread_name) = (facts.tid, facts.name);
    ev.ts_ns = sys::monotonic_ns();

    let mark = if record_global {
        Some(InFlightMark::begin(&ev))
    } else {
        None
    };
    let ptr = call();
    ev.duration_ns = sys::monotonic_ns().saturating_sub(ev.ts_ns);
    ev.address = ptr as u64;
    if let Some(m) = mark {
        m.finish();
    }

    if record_global {
        RING.push(&ev);
        probes::large_alloc(
            ev.size,
            ev.old_size,
            ev.address,
            ev.duration_ns,
            ev.thread_id,
        );
    }
    if record_scope {
        scope::record(&ev);
    }
    ptr
}

/// Counters that say what the recorder did, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderStats {
    /// Oversized events recorded since start (each got a sequence number).
    pub recorded: u64,
    /// Events a writer had to give up because its ring slot was still being written.
    pub ring_collisions: u64,
    /// Oversized allocations not marked in flight because the in-flight table was full.
    pub inflight_untracked: u64,
    /// The threshold in force (`None` = recording off).
    pub threshold: Option<usize>,
}

/// A snapshot of the recorder's counters.
pub fn stats() -> RecorderStats {
    let base = BASE_THRESHOLD.load(Ordering::Relaxed);
    RecorderStats {
        recorded: RING.recorded(),
        ring_collisions: RING.collisions(),
        inflight_untracked: crate::inflight::untracked(),
        threshold: (base != usize::MAX).then_some(base),
    }
}
