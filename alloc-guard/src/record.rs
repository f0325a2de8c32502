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
//! The threshold and depth it works with are owned by [`crate::threshold`].

use crate::event::{AllocKind, RawEvent};
use crate::inflight::InFlightMark;
use crate::ring::RING;
use crate::scope;
use crate::thread_facts;
use crate::threshold;
use crate::unwind;
use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::sync::atomic::{AtomicU8, AtomicUsize};

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

/// The slow path for one allocation at or above the fast path's threshold.
///
/// Takes the request as a value (not a closure) so the fast path builds nothing before its
/// compare; `#[cold]` and `#[inline(never)]` keep all of this out of the caller's code.
///
/// # Safety
/// `req` must satisfy `inner`'s `GlobalAlloc` contract (the caller's request, unchanged).
#[cold]
#[inline(never)]
pub(crate) unsafe fn slow_path<A: GlobalAlloc>(
    inner: &A,
    req: Request,
    limit: &AtomicUsize,
    registration: &AtomicU8,
) -> *mut u8 {
    let (kind, size, old_size) = req.kind_and_sizes();
    // SAFETY (for every `req.forward(inner)` below): the request is the caller's, unchanged.
    let call = || unsafe { req.forward(inner) };
    threshold::note_served();
    threshold::ensure_init();
    crate::limit_word::adopt(limit, registration, threshold::fast_path_threshold);
    let record_global = size >= threshold::base();
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
    let facts = thread_facts::current();
    ev.frame_count = unwind::capture_frames(&mut ev.frames, threshold::depth(), facts.stack_hi);
    (ev.thread_id, ev.thread_name) = (facts.tid, facts.name);
    ev.ts_ns = base::clock::monotonic_ns();

    let mark = if record_global {
        Some(InFlightMark::begin(&ev))
    } else {
        None
    };
    let ptr = call();
    ev.duration_ns = base::clock::monotonic_ns().saturating_sub(ev.ts_ns);
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
#[non_exhaustive]
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
    let base = threshold::base();
    RecorderStats {
        recorded: RING.recorded(),
        ring_collisions: RING.collisions(),
        inflight_untracked: crate::inflight::untracked(),
        threshold: (base != usize::MAX).then_some(base),
    }
}
