//! `assert_no_large_allocs`: the test-suite assertion.
//!
//! A scope lowers the global threshold to its limit (the fast path stays one compare) and
//! installs a per-thread record. The slow path then records an allocation into the scope only if
//! it happens on the scope's own thread, so tests running in parallel under `cargo test` do not
//! see each other's allocations. Symbolization happens after `body` returns, outside the
//! allocator.

use crate::event::{RawEvent, MAX_FRAMES};
use crate::symbolize::Symbolizer;
use crate::threshold;
use core::cell::{Cell, UnsafeCell};

/// Offending allocations kept per scope with their backtraces; later ones are only counted.
const HITS_KEPT: usize = 16;

#[derive(Clone, Copy)]
struct Hit {
    size: u64,
    old_size: u64,
    frame_count: usize,
    frames: [usize; MAX_FRAMES],
}

/// One active scope, owned by `assert_no_large_allocs`'s stack frame (boxed before activation,
/// so recording never allocates) and reachable from the allocator through [`ACTIVE`].
struct ScopeRecord {
    limit: usize,
    /// The enclosing scope on this thread (nested asserts), or null.
    outer: *const ScopeRecord,
    hits: UnsafeCell<[Hit; HITS_KEPT]>,
    kept: Cell<usize>,
    total: Cell<usize>,
}

thread_local! {
    /// The innermost active scope on this thread. Const-initialised raw pointer, no destructor.
    static ACTIVE: Cell<*const ScopeRecord> = const { Cell::new(core::ptr::null()) };
}

/// True when an allocation of `size` on this thread falls into an active scope.
#[inline]
pub(crate) fn wants(size: usize) -> bool {
    ACTIVE
        .try_with(|a| {
            let mut p = a.get();
            // SAFETY: every pointer in the chain is a live `ScopeRecord`: it is installed by
            // `assert_no_large_allocs` after boxing and removed (by `ActiveGuard::drop`, also on
            // unwind) before the box is freed, and only this thread reads its own chain.
            while let Some(s) = unsafe { p.as_ref() } {
                if size >= s.limit {
                    return true;
                }
                p = s.outer;
            }
            false
        })
        .unwrap_or(false)
}

/// Records an offending allocation into every active scope on this thread whose limit it meets.
pub(crate) fn record(ev: &RawEvent) {
    let _ = ACTIVE.try_with(|a| {
        let mut p = a.get();
        // SAFETY: as in `wants`. `hits` is written only here, on the owning thread, while no
        // reference to it exists (the owner reads it only after the scope is deactivated).
        while let Some(s) = unsafe { p.as_ref() } {
            if ev.size as usize >= s.limit {
                let k = s.kept.get();
                if k < HITS_KEPT {
                    unsafe {
                        (*s.hits.get())[k] = Hit {
                            size: ev.size,
                            old_size: ev.old_size,
                            frame_count: ev.frame_count,
                            frames: ev.frames,
                        };
                    }
                    s.kept.set(k + 1);
                }
                s.total.set(s.total.get().saturating_add(1));
            }
            p = s.outer;
        }
    });
}

/// Deactivates a scope on drop, also when `body` panics.
struct ActiveGuard<'a> {
    rec: &'a ScopeRecord,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let _ = ACTIVE.try_with(|a| a.set(self.rec.outer));
        threshold::remove_scope_limit(self.rec.limit);
    }
}

/// Runs `body` and returns its value; panics if the calling thread allocated `limit_bytes` or
/// more inside it.
///
/// Works with no environment variable set and under `cargo test`'s parallel threads: only
/// allocations made by the calling thread while `body` runs count (work `body` hands to other
/// threads does not). The panic message has one line per offending allocation (up to 16, then a
/// count): its size and the first caller frame outside the allocator and the standard library.
/// For useful locations, keep debug line info in the test profile (the default).
///
/// ```should_panic
/// # #[global_allocator]
/// # static A: freezetrap_alloc_guard::GuardedAlloc<std::alloc::System> =
/// #     freezetrap_alloc_guard::GuardedAlloc::new(std::alloc::System);
/// freezetrap_alloc_guard::assert_no_large_allocs(1 << 20, || {
///     let v: Vec<u8> = Vec::with_capacity(4 << 20); // 4 MiB >= 1 MiB: panics
///     v.capacity()
/// });
/// ```
///
/// Requires [`crate::GuardedAlloc`] to be the global allocator; without it nothing is seen, so
/// the assertion panics if it can tell the guard is not installed (see [`crate::is_installed`]).
#[track_caller]
pub fn assert_no_large_allocs<R>(limit_bytes: usize, body: impl FnOnce() -> R) -> R {
    if !crate::is_installed() {
        panic!(
            "freezetrap: assert_no_large_allocs needs GuardedAlloc as the #[global_allocator] of \
             this test binary: add `#[global_allocator] static A: alloc_guard::GuardedAlloc<std::alloc::System> = alloc_guard::GuardedAlloc::new(std::alloc::System);`"
        );
    }
    let limit = limit_bytes.max(1);
    threshold::wait_init();
    let rec = Box::new(ScopeRecord {
        limit,
        outer: ACTIVE.with(|a| a.get()),
        hits: UnsafeCell::new(
            [Hit {
                size: 0,
                old_size: 0,
                frame_count: 0,
                frames: [0; MAX_FRAMES],
            }; HITS_KEPT],
        ),
        kept: Cell::new(0),
        total: Cell::new(0),
    });
    threshold::add_scope_limit(limit);
    let out = {
        let _active = ActiveGuard { rec: &rec };
        ACTIVE.with(|a| a.set(&*rec));
        body()
    };
    let total = rec.total.get();
    if total == 0 {
        return out;
    }
    let kept = rec.kept.get();
    // SAFETY: the scope is deactivated (`_active` dropped), so the allocator no longer writes
    // `hits`; this is the only access.
    let hits: [Hit; HITS_KEPT] = unsafe { *rec.hits.get() };
    let mut sym = Symbolizer::new();
    let mut msg = format!(
        "freezetrap: {total} allocation(s) of at least {limit} bytes ({}) inside assert_no_large_allocs:",
        base::units::HumanBytes(limit as u64)
    );
    for h in &hits[..kept] {
        let frames = sym.resolve(&h.frames[..h.frame_count]);
        let at = crate::symbolize::first_user_frame(&frames)
            .map(|f| f.to_string())
            .unwrap_or_else(|| "<no symbol: build tests with debug info>".into());
        let what = if h.old_size > 0 {
            format!(
                "realloc to {} bytes ({}) from {} bytes",
                h.size,
                base::units::HumanBytes(h.size),
                h.old_size
            )
        } else {
            format!("{} bytes ({})", h.size, base::units::HumanBytes(h.size))
        };
        msg.push_str(&format!("\n  {what} at {at}"));
    }
    if total > kept {
        msg.push_str(&format!("\n  ... and {} more", total - kept));
    }
    panic!("{msg}");
}
