//! Writing an armed capture: a fresh directory per capture, the triggered helper's four files
//! with `summary.json` extended by the window, and the byte cap over all of them.

use super::{Ready, StallSeen, TimelineRow, BUCKET_MS};
use crate::output::write_capture;
use crate::{human, summarize, StallWindow, Summary};
use base::dirs::Dir;
use serde::Serialize;
use std::ffi::{OsStr, OsString};

/// Recorder-wide counts of data that did not make it into the window.
pub(super) struct Counts {
    pub late_entries: u64,
    pub dropped_entries: u64,
    pub lost_events: u64,
    pub lost_stacks: u64,
}

/// Writes `ready` into a fresh `out/armed-PID-stall-ID` and returns the directory and the line
/// to print; an error is one line.
pub(super) fn write(
    out: &Dir,
    pid: u32,
    ready: &Ready,
    counts: Counts,
    symbols: Option<&crate::symbols::TargetSymbols>,
) -> Result<(OsString, String), String> {
    let first = &ready.stalls[0];
    let (name, dir) =
        fresh_dir(out, &format!("armed-{pid}-stall-{}", first.id)).ok_or_else(|| {
            format!(
                "cannot create a capture directory in {}",
                out.path().display()
            )
        })?;
    let stall = StallWindow {
        tid: Some(first.thread_id),
        maps: &ready.stall_maps,
        us: ready.stall_us,
    };
    // What was recorded: from the first bucket with data (the recorder may have been armed
    // less than a window before the stall) to the window's end.
    let data_from_ms = ready.timeline.first().map_or(ready.from_ms, |r| r.t_ms);
    let recorded_us = (ready.to_ms - data_from_ms).max(0) as u64 * 1000;
    let capture = summarize(pid, recorded_us, &ready.maps, &stall);
    let summary = ArmedSummary {
        line: human(&capture),
        capture,
        mode: "armed",
        stalls: &ready.stalls,
        window: WindowInfo {
            bucket_ms: BUCKET_MS,
            from_ms: ready.from_ms,
            to_ms: ready.to_ms,
            data_from_ms: ready.timeline.first().map(|r| r.t_ms),
            late_entries: counts.late_entries,
            dropped_entries: counts.dropped_entries,
            lost_events: counts.lost_events,
            lost_stacks: counts.lost_stacks,
        },
        timeline: &ready.timeline,
    };
    let title = format!(
        "Off-CPU time, pid {pid}, stall {} (armed: {} ms before to {} ms after the probe)",
        first.id, -ready.from_ms, ready.to_ms
    );
    let recorded = crate::output::Recorded {
        duration_ns: recorded_us * 1000,
        symbols,
    };
    write_capture(&dir, &ready.maps, &title, &summary, recorded)
        .map_err(|e| format!("writing {} failed: {e}", dir.path().display()))?;
    let line = format!(
        "{} (stall {}, window {:+.2} s..{:+.2} s; {})",
        summary.line,
        first.id,
        ready.from_ms as f64 / 1000.0,
        ready.to_ms as f64 / 1000.0,
        dir.path().display()
    );
    Ok((name, line))
}

/// `summary.json` of an armed capture: the triggered capture's fields plus the window.
#[derive(Serialize)]
struct ArmedSummary<'a> {
    #[serde(flatten)]
    capture: Summary,
    /// The one-line human summary.
    line: String,
    mode: &'static str,
    stalls: &'a [StallSeen],
    window: WindowInfo,
    timeline: &'a [TimelineRow],
}

#[derive(Serialize)]
struct WindowInfo {
    bucket_ms: u64,
    /// Window start and end relative to the first probe, ms.
    from_ms: i64,
    to_ms: i64,
    /// The first bucket with data (later than `from_ms` when the recorder was armed less than
    /// a window before the stall).
    data_from_ms: Option<i64>,
    /// Recorder-wide counts so far: entries too late for the window, entries over the memory
    /// cap, perf events bpftrace lost. Non-zero means this capture may be missing data.
    late_entries: u64,
    dropped_entries: u64,
    lost_events: u64,
    /// Off-CPU entries whose kernel stack bpftrace could not store.
    lost_stacks: u64,
}

/// Creates `out/name` (or `out/name-2`, ...) exclusively, by handle, so a capture never
/// overwrites an earlier one nor writes through anything planted there.
fn fresh_dir(out: &Dir, name: &str) -> Option<(OsString, Dir)> {
    (1..1000).find_map(|n| {
        let candidate = if n == 1 {
            name.to_string()
        } else {
            format!("{name}-{n}")
        };
        out.create_dir(&candidate, 0o700)
            .ok()
            .map(|d| (OsString::from(candidate), d))
    })
}

/// The byte cap over this recorder's `armed-*` directories, with a line per deletion.
pub(super) fn enforce_byte_cap(out: &Dir, max_bytes: u64, newest: Option<&OsStr>) {
    match out.enforce_byte_cap("armed-", max_bytes, newest) {
        Ok(0) => {}
        Ok(bytes) => eprintln!(
            "freezetrap-capture: removed {bytes} bytes of the oldest captures to stay under {max_bytes}"
        ),
        Err(e) => eprintln!(
            "freezetrap-capture: cannot keep the captures in {} under {max_bytes} bytes: {e}",
            out.path().display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fresh_dirs_never_collide_and_the_byte_cap_keeps_the_newest() {
        let path = std::env::temp_dir().join(format!("ft-armed-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let out = Dir::open_private(&path).unwrap();
        let (an, a) = fresh_dir(&out, "armed-1-stall-1").unwrap();
        let (bn, b) = fresh_dir(&out, "armed-1-stall-1").unwrap();
        assert_ne!(an, bn);
        assert_eq!(bn, "armed-1-stall-1-2");
        a.write_file("f", &[0u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(1100)); // distinct modification seconds
        b.write_file("f", &[0u8; 1000]).unwrap();
        enforce_byte_cap(&out, 1500, Some(&bn));
        assert!(!path.join(&an).exists() && path.join(&bn).exists());
        enforce_byte_cap(&out, 10, Some(&bn));
        assert!(path.join(&bn).exists(), "the newest capture is kept");
        std::fs::remove_dir_all(&path).unwrap();
    }
}
