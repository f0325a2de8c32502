//! Decoding `armed.bt`'s output, one `-f json` line at a time: ticks, stall probes, printed
//! maps, lost events.

use serde::Serialize;

/// One line of bpftrace's `-f json` output from `armed.bt`, decoded.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// The program is attached.
    Armed,
    /// Every probe printed; `b` is the bucket the interval fired in.
    Tick(u64),
    /// `freezetrap:stall_begin` fired.
    StallBegin(StallSeen),
    /// `freezetrap:stall_end` fired.
    StallEnd {
        /// The stall id, as in `stall_begin`.
        id: u64,
        /// How long the stall lasted.
        duration_ns: u64,
    },
    /// A printed map.
    Map {
        /// Its base name: `@off`, `@on`, `@wait` or `@hold`.
        name: String,
        /// `(bucket, key, value)` per entry.
        entries: Vec<(u64, String, u64)>,
    },
    /// bpftrace lost perf events (its ring buffer was full).
    Lost(u64),
    /// Anything else (attached_probes, blank lines).
    Other,
}

/// A stall the target announced through `freezetrap:stall_begin`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StallSeen {
    /// The watchdog's stall id.
    pub id: u64,
    /// The stalled thread, 0 for the whole process.
    pub thread_id: u64,
    /// How long the stall had lasted when the watchdog detected it, ns.
    pub elapsed_ns: u64,
    /// CLOCK_MONOTONIC when the probe fired, ns.
    pub probe_ns: u64,
    /// From `freezetrap:stall_end`, when it fired before the capture was written.
    pub duration_ns: Option<u64>,
}

/// Decodes one output line. Unknown or malformed lines are [`Event::Other`].
pub fn parse_line(line: &str) -> Event {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return Event::Other;
    };
    match v["type"].as_str() {
        Some("printf") => {
            let text = v["data"].as_str().unwrap_or("").trim();
            let mut words = text.split_whitespace();
            let what = words.next().unwrap_or("");
            let nums: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
            match (what, nums.as_slice()) {
                ("armed", _) => Event::Armed,
                ("tick", [b]) => Event::Tick(*b),
                ("stall_begin", [id, tid, elapsed, ns]) => Event::StallBegin(StallSeen {
                    id: *id,
                    thread_id: *tid,
                    elapsed_ns: *elapsed,
                    probe_ns: *ns,
                    duration_ns: None,
                }),
                ("stall_end", [id, duration, _ns]) => Event::StallEnd {
                    id: *id,
                    duration_ns: *duration,
                },
                _ => Event::Other,
            }
        }
        Some("lost_events") => Event::Lost(v["data"]["events"].as_u64().unwrap_or(0)),
        Some("map") => {
            let Some((name, data)) = v["data"].as_object().and_then(|o| o.iter().next()) else {
                return Event::Other;
            };
            // `@off0` .. `@off3` are the four rotations of the same map.
            let name = name.trim_end_matches(['0', '1', '2', '3']).to_string();
            let entries = data
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, val)| {
                    let (bucket, key) = k.split_once(',')?;
                    Some((bucket.parse().ok()?, key.to_string(), val.as_u64()?))
                })
                .collect();
            Event::Map { name, entries }
        }
        _ => Event::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_decode_into_events() {
        assert_eq!(
            parse_line(r#"{"type": "printf", "data": "tick 42\n"}"#),
            Event::Tick(42)
        );
        assert_eq!(
            parse_line(r#"{"type": "printf", "data": "stall_begin 3 77 25000000 9000000000\n"}"#),
            Event::StallBegin(StallSeen {
                id: 3,
                thread_id: 77,
                elapsed_ns: 25_000_000,
                probe_ns: 9_000_000_000,
                duration_ns: None
            })
        );
        assert_eq!(
            parse_line(r#"{"type": "printf", "data": "stall_end 3 40000000 9015000000\n"}"#),
            Event::StallEnd {
                id: 3,
                duration_ns: 40_000_000
            }
        );
        let map = parse_line(
            r#"{"type": "map", "data": {"@hold1": {"41,app,\n    dup_mmap+1\n": 32000}}}"#,
        );
        assert_eq!(
            map,
            Event::Map {
                name: "@hold".into(),
                entries: vec![(41, "app,\n    dup_mmap+1\n".into(), 32000)]
            }
        );
        assert_eq!(
            parse_line(r#"{"type": "lost_events", "data": {"events": 12}}"#),
            Event::Lost(12)
        );
        assert_eq!(parse_line(""), Event::Other);
        assert_eq!(parse_line("not json"), Event::Other);
    }
}
