//! The stall report thread: symbolizes suspects, adds jemalloc statistics, writes the human
//! summary to stderr and the `stall` JSON line, then hands the record back to the pool.

use crate::detector::Msg;
use crate::forksafe::ForkSafeBox;
use crate::stall::{Scope, StallRecord};
use crate::suspects::rank;
use crate::trigger::CaptureStatus;
use alloc_guard::symbolize::{first_user_frame, Frame, Symbolizer};
use alloc_guard::ReportWriter;
use base::units::{HumanBytes, HumanNanos};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::sync::Arc;

#[derive(Serialize)]
struct SuspectJson {
    seq: u64,
    size: u64,
    old_size: u64,
    kind: &'static str,
    thread_id: u64,
    thread_name: String,
    delta_ns: i64,
    in_flight: bool,
    frames: Vec<Frame>,
}

#[derive(Serialize)]
struct CaptureJson {
    helper: Option<String>,
    dir: Option<String>,
    status: String,
    /// CLOCK_MONOTONIC ns when posix_spawn returned (the helper had exec'd).
    spawned_ns: Option<u64>,
}

#[derive(Serialize)]
struct StallJson {
    event: &'static str,
    id: u64,
    scope: &'static str,
    thread_id: u64,
    thread_name: String,
    start_ns: u64,
    detected_ns: u64,
    duration_ns: u64,
    suspects: Vec<SuspectJson>,
    threads: Vec<crate::procview::ThreadJson>,
    threads_omitted: usize,
    /// jemalloc's statistics after the stall; null without the `jemalloc` feature.
    jemalloc: Option<crate::jemalloc_stats::JemallocJson>,
    capture: CaptureJson,
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

/// Builds the one-paragraph human summary.
fn summary(rec: &StallRecord, top: Option<&SuspectJson>, capture: &CaptureJson) -> String {
    let who = match rec.scope {
        Scope::Process => "the whole process".to_string(),
        Scope::Thread => format!("thread '{}' (tid {})", rec.name(), rec.thread_id),
    };
    let mut s = format!("freezetrap: {who} stalled {}", HumanNanos(rec.duration_ns));
    match top {
        Some(t) => {
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
            let whose = if rec.scope == Scope::Thread && t.thread_id == rec.thread_id {
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
            s.push_str(&format!(
                "; suspect: {what}{state} {whose} {}, at {at}",
                when(t.delta_ns)
            ));
        }
        None => s.push_str("; no large allocation before it"),
    }
    match (&capture.dir, capture.status.as_str()) {
        (Some(dir), st) if st == "running" || st == "exited 0" => {
            s.push_str(&format!("; capture: {dir}"))
        }
        (_, "not configured") => {}
        (_, st) => s.push_str(&format!("; capture {st}")),
    }
    s
}

/// What the report thread knows about the capture helper.
pub(crate) struct HelperInfo {
    /// The helper's path, for the report.
    pub helper: String,
    /// `FREEZETRAP_OUT`, opened: the byte cap works through it.
    pub out: Arc<base::dirs::Dir>,
    /// `FREEZETRAP_CAPTURE_MAX_BYTES`.
    pub max_bytes: u64,
    /// What a new launcher is started from.
    pub spec: Arc<crate::launcher::LaunchSpec>,
    /// Where a new launcher goes (the watchdog thread installs it).
    pub launchers: Sender<crate::launcher::Launcher>,
}

pub(crate) fn run(
    rx: Receiver<Msg>,
    pool: Sender<ForkSafeBox<StallRecord>>,
    writer: Arc<ReportWriter>,
    helper: Option<HelperInfo>,
) {
    alloc_guard::internal::mark_current_thread_internal();
    let mut sym = Symbolizer::new();
    for msg in rx {
        match msg {
            Msg::Stall(rec) => {
                let ranked = rank(
                    rec.thread_id,
                    rec.start_ns,
                    &rec.in_flight[..rec.in_flight_len],
                    &rec.recent[..rec.recent_len],
                );
                let suspects: Vec<SuspectJson> = ranked
                    .iter()
                    .map(|c| SuspectJson {
                        seq: c.event.seq,
                        size: c.event.size,
                        old_size: c.event.old_size,
                        kind: c.event.kind.as_str(),
                        thread_id: c.event.thread_id,
                        thread_name: c.event.thread_name().to_string(),
                        delta_ns: c.delta_ns,
                        in_flight: c.in_flight,
                        frames: sym.resolve(c.event.frames()),
                    })
                    .collect();
                let capture = CaptureJson {
                    helper: helper.as_ref().map(|h| h.helper.clone()),
                    dir: (!rec.capture_dir.is_empty()).then(|| rec.capture_dir.clone()),
                    status: rec.capture.describe(),
                    spawned_ns: (rec.capture_spawned_ns != 0).then_some(rec.capture_spawned_ns),
                };
                eprintln!("{}", summary(&rec, suspects.first(), &capture));
                writer.write_json(&StallJson {
                    event: "stall",
                    id: rec.id,
                    scope: match rec.scope {
                        Scope::Process => "process",
                        Scope::Thread => "thread",
                    },
                    thread_id: rec.thread_id,
                    thread_name: rec.name().to_string(),
                    start_ns: rec.start_ns,
                    detected_ns: rec.detected_ns,
                    duration_ns: rec.duration_ns,
                    suspects,
                    threads: rec.procs.to_json(),
                    threads_omitted: rec.procs.omitted,
                    jemalloc: crate::jemalloc_stats::read(),
                    capture,
                });
                let _ = pool.try_send(rec);
            }
            Msg::CaptureDone {
                stall_id,
                status,
                dir,
                spawned_ns,
            } => {
                let st = status.describe();
                if status != CaptureStatus::Exited(0) {
                    eprintln!(
                        "freezetrap: capture for stall {stall_id} {st} (see {dir}/helper.log)"
                    );
                } else {
                    eprintln!("freezetrap: capture for stall {stall_id} done: {dir}");
                }
                writer.write_json(&serde_json::json!({"event": "capture", "stall_id": stall_id, "dir": dir, "status": st, "spawned_ns": (spawned_ns != 0).then_some(spawned_ns)}));
                if let Some(h) = &helper {
                    if let Err(e) = h.out.enforce_byte_cap("stall-", h.max_bytes, None) {
                        eprintln!(
                            "freezetrap: cannot enforce FREEZETRAP_CAPTURE_MAX_BYTES in {} ({e})",
                            h.out.path().display()
                        );
                    }
                }
            }
            Msg::RestartLauncher => {
                let Some(h) = &helper else { continue };
                match crate::trigger::restart_launcher(&h.spec) {
                    Ok(l) => {
                        eprintln!("freezetrap: the capture launcher process had died: started a new one");
                        let _ = h.launchers.try_send(l);
                    }
                    Err(e) => eprintln!(
                        "freezetrap: the capture launcher process had died and a new one cannot be started ({e}): retrying in a minute"
                    ),
                }
            }
            Msg::Dropped { stall_id } => {
                eprintln!("freezetrap: stall {stall_id} detected but not recorded: the report thread is behind (counted)");
                writer.write_json(&serde_json::json!({"event": "stall_dropped", "id": stall_id}));
            }
        }
    }
}
