//! Where each [`LargeAlloc`] goes besides the JSON line and the human line (both written by the
//! report thread from the same typed event): the service's [`on_large_alloc`] callbacks, and —
//! with the features — a `tracing` event and a `metrics` counter. All of it runs on the report
//! thread, never inside the allocator.

use crate::LargeAlloc;
use base::hooks::Hooks;

static HOOKS: Hooks<LargeAlloc> = Hooks::new("on_large_alloc");

/// Registers `f` to be called with every large allocation the reporter reports, on its thread
/// (`freezetrap-report`), after the event's JSON line is written. A callback may allocate and
/// block briefly (it delays later reports, not the service); one that panics is caught, said
/// once on stderr, and still called for later events.
///
/// ```
/// freezetrap_alloc_guard::on_large_alloc(|a| {
///     if a.size >= 1 << 30 {
///         eprintln!("{} allocated {} bytes", a.thread_name, a.size);
///     }
/// });
/// ```
pub fn on_large_alloc(f: impl Fn(&LargeAlloc) + Send + Sync + 'static) {
    HOOKS.add(f);
}

/// Hands `a` to every consumer. Report thread only.
pub(crate) fn deliver(a: &LargeAlloc) {
    #[cfg(feature = "tracing")]
    {
        let site = crate::symbolize::first_user_frame(&a.frames)
            .map(|f| f.to_string())
            .unwrap_or_default();
        // In a span of its own, as stalls are (see the watchdog): span-based pipelines export it.
        let span = tracing::info_span!(target: "freezetrap::large_alloc", "freezetrap.large_alloc");
        let _in_span = span.enter();
        tracing::info!(
            target: "freezetrap::large_alloc",
            seq = a.seq,
            kind = %a.kind,
            size = a.size,
            old_size = a.old_size,
            thread_id = a.thread_id,
            thread_name = %a.thread_name,
            ts_ns = a.ts_ns,
            duration_ns = a.duration_ns,
            site = %site,
            growth = a.growth.as_deref(),
            "large allocation of {} at {site}",
            base::units::HumanBytes(a.size),
        );
    }
    #[cfg(feature = "metrics")]
    metrics::counter!("freezetrap_large_allocs_total").increment(1);
    HOOKS.run(a);
}
