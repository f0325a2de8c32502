//! The stall report thread: turns each stall record into a typed [`StallReport`] — suspects
//! symbolized, the growth hint, every thread's kernel view, jemalloc statistics and the
//! verdict — hands the record back to the pool at once, and when the last stall of an
//! incident ends, writes one `stall` JSON line per stall and one human paragraph for all of
//! them.

use crate::detector::Msg;
use crate::forksafe::ForkSafeBox;
use crate::stall::StallRecord;
use crate::stall_report::{CaptureInfo, Scope, StallReport, Suspect, ThreadState};
use crate::suspects::rank;
use crate::trigger::CaptureStatus;
use crate::verdict::{self, AllocEvidence, Evidence, ThreadEvidence};
use alloc_guard::internal::{RawEvent, CAPACITY, RING};
use alloc_guard::symbolize::{first_user_frame, Symbolizer};
use alloc_guard::ReportWriter;
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

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

/// A `stall` line: the report with `"event": "stall"` in front.
#[derive(Serialize)]
struct StallLine<'a> {
    event: &'static str,
    #[serde(flatten)]
    report: &'a StallReport,
}

/// The growth hint for the allocations at `site`, ending with `last` (an event still in the
/// allocator is not in the ring yet: its size comes last).
fn growth_at(
    site: &str,
    last: &RawEvent,
    in_flight: bool,
    ring: &[RawEvent],
    sym: &mut Symbolizer,
) -> Option<String> {
    let mut sizes: Vec<u64> = ring
        .iter()
        .filter(|e| in_flight || e.seq <= last.seq)
        .filter(|e| {
            let frames = sym.resolve(e.frames());
            first_user_frame(&frames).is_some_and(|f| f.to_string() == site)
        })
        .map(|e| e.size)
        .collect();
    if in_flight {
        sizes.push(last.size);
    }
    alloc_guard::growth::detect(&sizes).map(|g| g.hint())
}

/// Everything the report thread keeps between stalls.
struct Reporting {
    sym: Symbolizer,
    sys: crate::sysview::SysInfo,
    /// Reports of incidents whose other stalls are still going on.
    pending: BTreeMap<u64, Vec<StallReport>>,
    ring: Vec<RawEvent>,
}

impl Reporting {
    /// Builds the typed report of a finished stall (allocates: after the stall).
    fn build(&mut self, rec: &StallRecord, helper: Option<&HelperInfo>) -> StallReport {
        let ranked = rank(
            rec.thread_id,
            rec.start_ns,
            &rec.in_flight[..rec.in_flight_len],
            &rec.recent[..rec.recent_len],
        );
        let n = RING.events_between(0, u64::MAX, &mut self.ring);
        let mut ring: Vec<RawEvent> = self.ring[..n].to_vec();
        ring.reverse(); // oldest first
        let mut suspects = Vec::new();
        for (i, c) in ranked.iter().enumerate() {
            let frames = self.sym.resolve(c.event.frames());
            let site = first_user_frame(&frames).map(|f| f.to_string());
            let growth = match (&site, i) {
                (Some(site), 0) => growth_at(site, &c.event, c.in_flight, &ring, &mut self.sym),
                _ => None,
            };
            suspects.push(Suspect {
                seq: c.event.seq,
                size: c.event.size,
                old_size: c.event.old_size,
                kind: c.event.kind.as_str().to_string(),
                thread_id: c.event.thread_id,
                thread_name: c.event.thread_name().to_string(),
                delta_ns: c.delta_ns,
                in_flight: c.in_flight,
                frames,
                growth,
            });
        }
        let threads: Vec<ThreadState> = rec
            .procs
            .threads()
            .iter()
            .map(|t| ThreadState {
                tid: t.tid,
                name: t.name().to_string(),
                state: (t.state as char).to_string(),
                wchan: t.wchan().to_string(),
                kernel_stack: t.kernel_stack(),
            })
            .collect();
        let verdict = verdict::decide(&self.evidence(rec, &threads, &suspects));
        StallReport {
            id: rec.id,
            scope: rec.scope,
            thread_id: rec.thread_id,
            thread_name: rec.name().to_string(),
            start_ns: rec.start_ns,
            detected_ns: rec.detected_ns,
            duration_ns: rec.duration_ns,
            suspects,
            threads,
            threads_omitted: rec.procs.omitted,
            jemalloc: crate::jemalloc_stats::read(),
            capture: CaptureInfo {
                helper: helper.map(|h| h.helper.clone()),
                dir: (!rec.capture_dir.is_empty()).then(|| rec.capture_dir.clone()),
                status: rec.capture.describe(),
                spawned_ns: (rec.capture_spawned_ns != 0).then_some(rec.capture_spawned_ns),
            },
            incident: rec.incident,
            verdict,
        }
    }

    /// The verdict's evidence, from the record's snapshots and counters.
    fn evidence(
        &self,
        rec: &StallRecord,
        threads: &[ThreadState],
        suspects: &[Suspect],
    ) -> Evidence {
        let (process, mut unreadable) = self.sys.evidence(&rec.sys_before, &rec.sys_after);
        if !rec.procs.stacks_readable {
            unreadable.push("kernel stacks (not root)".into());
        }
        let mut stalled = None;
        let mut others = Vec::new();
        for (i, t) in threads.iter().enumerate() {
            let te = ThreadEvidence {
                tid: t.tid,
                name: t.name.clone(),
                state: t.state.chars().next().unwrap_or('?'),
                wchan: t.wchan.clone(),
                kernel_stack: t.kernel_stack.clone(),
                delta: rec.procs.delta(i),
            };
            if rec.scope == Scope::Thread && t.tid == rec.thread_id {
                stalled = Some(ThreadEvidence {
                    name: rec.name().to_string(),
                    ..te
                });
            } else {
                others.push(te);
            }
        }
        let window_ns = match rec.scope {
            Scope::Process => rec
                .sys_after
                .taken_ns
                .saturating_sub(rec.sys_before.taken_ns),
            Scope::Thread => rec.procs.end_ns.saturating_sub(rec.procs.taken_ns),
        };
        Evidence {
            process_scope: rec.scope == Scope::Process,
            duration_ns: rec.duration_ns,
            window_ns,
            stalled,
            others,
            process,
            allocations: suspects
                .iter()
                .map(|s| AllocEvidence {
                    size: s.size,
                    thread_id: s.thread_id,
                    thread_name: s.thread_name.clone(),
                    in_flight: s.in_flight,
                    began_in_stall: s.in_flight || s.delta_ns <= 0,
                    site: first_user_frame(&s.frames)
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "<unknown caller>".into()),
                    growth: s.growth.clone(),
                })
                .collect(),
            unreadable,
        }
    }
}

pub(crate) fn run(
    rx: Receiver<Msg>,
    pool: Sender<ForkSafeBox<StallRecord>>,
    writer: Arc<ReportWriter>,
    helper: Option<HelperInfo>,
    reported: crate::running::SaysReported,
) {
    alloc_guard::internal::mark_current_thread_internal();
    // Reports can wait for a free CPU or the next tick: never preempt the service (see
    // `base::thread::make_batch`). The launcher it starts is an ordinary process.
    base::thread::make_batch(None);
    // The first launcher, started here as this thread starts: not on the thread that started
    // the watchdog (which would wait for it and its first answer). This thread starts at the
    // watchdog thread's setup, 50 ms in, or at once when the launcher has to be a fork (see
    // `Running::start`). The watchdog thread installs it at its next tick.
    if let Some(h) = &helper {
        match crate::trigger::start_launcher(&h.spec) {
            Ok(l) => {
                let _ = h.launchers.try_send(l);
            }
            Err(e) => eprintln!(
                "freezetrap: the capture launcher process cannot be started ({e}): no captures until it can (retried every minute)"
            ),
        }
    }
    let mut r = Reporting {
        sym: Symbolizer::new(),
        sys: crate::sysview::SysInfo::find(),
        pending: BTreeMap::new(),
        ring: vec![RawEvent::EMPTY; CAPACITY],
    };
    for msg in rx {
        match msg {
            Msg::Stall(rec) => {
                let report = r.build(&rec, helper.as_ref());
                let (incident, last) = (rec.incident, rec.incident_last);
                // The record goes back at once: an incident's other stalls may need it.
                let _ = pool.try_send(rec);
                let reports = r.pending.entry(incident).or_default();
                reports.push(report);
                if last {
                    let reports = r.pending.remove(&incident).unwrap_or_default();
                    eprintln!("{}", crate::stall_report::human_summary(&reports));
                    for report in &reports {
                        writer.write_json(&StallLine {
                            event: "stall",
                            report,
                        });
                        crate::events::deliver(report);
                    }
                }
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
                if let Some(h) = &helper {
                    match crate::trigger::start_launcher(&h.spec) {
                        Ok(l) => {
                            eprintln!("freezetrap: the capture launcher process had died: started a new one");
                            let _ = h.launchers.try_send(l);
                        }
                        Err(e) => eprintln!(
                            "freezetrap: the capture launcher process had died and a new one cannot be started ({e}): retrying in a minute"
                        ),
                    }
                }
            }
            Msg::Dropped { stall_id } => {
                eprintln!("freezetrap: stall {stall_id} detected but not recorded: the report thread is behind (counted)");
                writer.write_json(&serde_json::json!({"event": "stall_dropped", "id": stall_id}));
            }
        }
        reported.handled();
    }
    // Incidents cut short by a shutdown still get said.
    for (_, reports) in std::mem::take(&mut r.pending) {
        eprintln!("{}", crate::stall_report::human_summary(&reports));
        for report in &reports {
            writer.write_json(&StallLine {
                event: "stall",
                report,
            });
            crate::events::deliver(report);
        }
    }
    drop(reported);
}
