//! The typed stall report — what a `stall` JSON line holds — and the human paragraph made from
//! it. Callbacks, `tracing` and `metrics` get the same values as the JSON line.

use alloc_guard::symbolize::{first_user_frame, Frame};
use base::units::{HumanBytes, HumanNanos};
pub use base::verdict::{Cause, Confidence, Culprit, Verdict};
use serde::Serialize;

/// Whole process or one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The watchdog itself woke late: everything was frozen.
    Process,
    /// A heartbeat stopped moving.
    Thread,
}

/// A large allocation that may explain the stall.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Suspect {
    /// Sequence number (0 while still in the allocator).
    pub seq: u64,
    /// Bytes.
    pub size: u64,
    /// Bytes before a realloc, else 0.
    pub old_size: u64,
    /// `alloc`, `alloc_zeroed` or `realloc`.
    pub kind: String,
    /// Allocating thread.
    pub thread_id: u64,
    /// Its name.
    pub thread_name: String,
    /// Stall start minus the allocation's start, ns (negative: it began after).
    pub delta_ns: i64,
    /// Still inside the allocator when the stall was detected.
    pub in_flight: bool,
    /// Caller frames, allocator frames removed.
    pub frames: Vec<Frame>,
    /// The growth hint for its call site, when allocations there grow geometrically.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth: Option<String>,
}

/// One thread as the kernel showed it at detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ThreadState {
    /// Kernel thread id.
    pub tid: u64,
    /// Name.
    pub name: String,
    /// State letter (`R`, `S`, `D`, `T`, ...).
    pub state: String,
    /// Where it slept.
    pub wchan: String,
    /// Its kernel stack, innermost first (root only).
    pub kernel_stack: Vec<String>,
}

/// jemalloc's statistics after the stall (feature `jemalloc`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct JemallocStats {
    /// `stats.allocated`.
    pub allocated: u64,
    /// `stats.active`.
    pub active: u64,
    /// `stats.resident`.
    pub resident: u64,
    /// `stats.mapped`.
    pub mapped: u64,
    /// `stats.retained`.
    pub retained: u64,
}

/// What became of the capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CaptureInfo {
    /// The helper's path, when one is configured.
    pub helper: Option<String>,
    /// The capture directory, when one was made.
    pub dir: Option<String>,
    /// `not configured`, `running`, `exited 0`, `failed: ...`, `skipped: ...`.
    pub status: String,
    /// `CLOCK_MONOTONIC` ns when the helper had exec'd.
    pub spawned_ns: Option<u64>,
}

/// One stall: the contract's `stall` line, typed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StallReport {
    /// Stall id (also in the USDT probes).
    pub id: u64,
    /// `thread` or `process`.
    pub scope: Scope,
    /// Stalled thread (0 for a process stall).
    pub thread_id: u64,
    /// The heartbeat's name.
    pub thread_name: String,
    /// `CLOCK_MONOTONIC` ns of the last progress seen.
    pub start_ns: u64,
    /// When the watchdog noticed.
    pub detected_ns: u64,
    /// How long it lasted.
    pub duration_ns: u64,
    /// Large allocations that may explain it, likeliest first.
    pub suspects: Vec<Suspect>,
    /// Every thread as the kernel showed it at detection.
    pub threads: Vec<ThreadState>,
    /// Threads that did not fit in the snapshot.
    pub threads_omitted: usize,
    /// jemalloc's statistics; `None` without the `jemalloc` feature.
    pub jemalloc: Option<JemallocStats>,
    /// The capture.
    pub capture: CaptureInfo,
    /// Stalls of one freeze share this id (the first one's).
    pub incident: u64,
    /// What caused it.
    pub verdict: Verdict,
}

/// Formats "3 ms before" / "12 ms after the stall began".
fn when(delta_ns: i64) -> String {
    if delta_ns >= 0 {
        format!("{} before", HumanNanos(delta_ns as u64))
    } else {
        format!(
            "{} after the stall began",
            HumanNanos(delta_ns.unsigned_abs())
        )
    }
}

fn suspect_text(r: &StallReport, t: &Suspect) -> String {
    let what = if t.old_size > 0 {
        format!(
            "{} {} (from {})",
            HumanBytes(t.size),
            t.kind,
            HumanBytes(t.old_size)
        )
    } else {
        format!("{} {}", HumanBytes(t.size), t.kind)
    };
    let whose = if r.scope == Scope::Thread && t.thread_id == r.thread_id {
        "on the same thread".to_string()
    } else {
        format!("on thread '{}'", t.thread_name)
    };
    let state = if t.in_flight {
        " (still in the allocator)"
    } else {
        ""
    };
    let at = first_user_frame(&t.frames)
        .map(|f| f.to_string())
        .unwrap_or_else(|| "<unknown caller>".into());
    format!(
        "suspect: {what}{state} {whose} {}, at {at}",
        when(t.delta_ns)
    )
}

/// The one paragraph for an incident (the stalls of one freeze), in freezetrap's grammar:
/// who stalled, how long, the top suspect, the capture, and — last — the verdict's text.
pub fn human_summary(reports: &[StallReport]) -> String {
    let Some(first) = reports.first() else {
        return String::new();
    };
    let who = match (first.scope, reports.len()) {
        (Scope::Process, _) => "the whole process".to_string(),
        (Scope::Thread, 1) => format!("thread '{}' (tid {})", first.thread_name, first.thread_id),
        _ => format!(
            "threads {}",
            reports
                .iter()
                .map(|r| format!("'{}' (tid {})", r.thread_name, r.thread_id))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let how_long = reports
        .iter()
        .map(|r| HumanNanos(r.duration_ns).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!("freezetrap: {who} stalled {how_long}");
    match reports
        .iter()
        .find_map(|r| r.suspects.first().map(|t| (r, t)))
    {
        Some((r, t)) => s.push_str(&format!("; {}", suspect_text(r, t))),
        None => s.push_str("; no large allocation before it"),
    }
    for r in reports {
        match (&r.capture.dir, r.capture.status.as_str()) {
            (Some(dir), st) if st == "running" || st == "exited 0" => {
                s.push_str(&format!("; capture: {dir}"))
            }
            (_, "not configured") => {}
            (_, st) if st.starts_with("skipped") && reports.len() > 1 => {}
            (_, st) => s.push_str(&format!("; capture {st}")),
        }
    }
    // The most confident verdict of the incident speaks for it.
    if let Some(v) = reports
        .iter()
        .map(|r| &r.verdict)
        .max_by_key(|v| (v.confidence, v.cause != Cause::Unknown))
    {
        s.push_str(&format!("; {}", v.text));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: u64, tid: u64, name: &str, verdict: Verdict) -> StallReport {
        StallReport {
            id,
            scope: Scope::Thread,
            thread_id: tid,
            thread_name: name.into(),
            start_ns: 0,
            detected_ns: 0,
            duration_ns: 45_800_000,
            suspects: vec![],
            threads: vec![],
            threads_omitted: 0,
            jemalloc: None,
            capture: CaptureInfo {
                helper: None,
                dir: None,
                status: "not configured".into(),
                spawned_ns: None,
            },
            incident: 7,
            verdict,
        }
    }

    #[test]
    fn an_incident_is_one_paragraph_ending_with_the_verdict() {
        let v = Verdict::new(
            Cause::MmapLock,
            Confidence::High,
            "blocked on mmap_lock for 46 ms: thread 'main' held it for write in fork (dup_mmap)",
        );
        let u = Verdict::new(Cause::Unknown, Confidence::Low, "?");
        let rs = [report(7, 1, "mapper-0", u), report(8, 2, "mapper-1", v)];
        assert_eq!(
            human_summary(&rs),
            "freezetrap: threads 'mapper-0' (tid 1), 'mapper-1' (tid 2) stalled 45.8 ms, 45.8 ms; no large allocation before it; blocked on mmap_lock for 46 ms: thread 'main' held it for write in fork (dup_mmap)"
        );
        let j = serde_json::to_value(&rs[1]).unwrap();
        assert_eq!(j["verdict"]["cause"], "mmap_lock");
        assert_eq!(j["verdict"]["confidence"], "high");
        assert_eq!(j["scope"], "thread");
        assert_eq!(j["incident"], 7);
    }
}
