//! Where each [`StallReport`] goes besides the JSON line and the human paragraph (both written by
//! the stall report thread from the same typed reports): the service's [`on_stall`] callbacks,
//! and — with the features — a `tracing` event and `metrics`. All of it runs on the stall report
//! thread (`freezetrap-stallrep`), never in the detector.

use crate::stall_report::StallReport;
use base::hooks::Hooks;

static HOOKS: Hooks<StallReport> = Hooks::new("on_stall");

/// Registers `f` to be called with every stall, on freezetrap's stall report thread, once its
/// incident is over (several heartbeats stalled by one freeze are reported together, each with
/// the shared `incident` id), after its JSON line is written. A callback may allocate and block
/// briefly (it delays later reports, not the service); one that panics is caught, said once on
/// stderr, and still called for later stalls.
///
/// ```
/// freezetrap_watchdog::on_stall(|r| {
///     if r.duration_ns > 1_000_000_000 {
///         eprintln!("page someone: {} ({})", r.verdict.text, r.verdict.cause);
///     }
/// });
/// ```
pub fn on_stall(f: impl Fn(&StallReport) + Send + Sync + 'static) {
    HOOKS.add(f);
}

/// Hands `r` to every consumer. Stall report thread only (which exists on Linux only).
#[cfg_attr(not(ft_linux), allow(dead_code))]
pub(crate) fn deliver(r: &StallReport) {
    #[cfg(feature = "tracing")]
    {
        use crate::stall_report::Scope;
        let scope = match r.scope {
            Scope::Process => "process",
            Scope::Thread => "thread",
        };
        let top = r.suspects.first();
        // Inside a span of its own: pipelines built on spans (tracing-opentelemetry, which
        // drops events outside any span) export the stall as a span with this event in it.
        let span = tracing::warn_span!(target: "freezetrap::stall", "freezetrap.stall");
        let _in_span = span.enter();
        tracing::warn!(
            target: "freezetrap::stall",
            id = r.id,
            scope,
            thread_id = r.thread_id,
            thread_name = %r.thread_name,
            start_ns = r.start_ns,
            duration_ns = r.duration_ns,
            incident = r.incident,
            cause = r.verdict.cause.as_str(),
            confidence = r.verdict.confidence.as_str(),
            culprit = r.verdict.culprit.as_ref().map(|c| c.thread_name.as_str()),
            culprit_what = r.verdict.culprit.as_ref().map(|c| c.what.as_str()),
            suspects = r.suspects.len(),
            top_suspect_size = top.map(|s| s.size),
            capture_dir = r.capture.dir.as_deref(),
            capture_status = %r.capture.status,
            "{} stalled {}: {}",
            if r.scope == Scope::Process { "the whole process".to_string() } else { format!("thread '{}'", r.thread_name) },
            base::units::HumanNanos(r.duration_ns),
            r.verdict.text,
        );
    }
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("freezetrap_stalls_total", "cause" => r.verdict.cause.as_str())
            .increment(1);
        metrics::histogram!("freezetrap_stall_duration_seconds").record(r.duration_ns as f64 / 1e9);
    }
    HOOKS.run(r);
}
