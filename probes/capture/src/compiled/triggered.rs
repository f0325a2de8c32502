//! The triggered helper with the compiled program: record for `--duration` (or until the target
//! exits or a signal says stop), then hand over the maps under the names `capture.bt` prints,
//! so the capture is written by the same code whichever engine recorded it.

use super::{Recording, Settings};
use crate::armed::Event;
use crate::maps::Maps;
use crate::Taken;
use std::time::{Duration, Instant};

/// How often the program's ring buffer and maps are read during the recording.
const POLL: Duration = Duration::from_millis(100);

/// Records `pid` with the compiled program. Loading errors are one line (the caller may fall
/// back to bpftrace); `exited` tells whether the target is gone.
pub(crate) fn record_for(
    pid: u32,
    min_block_us: u64,
    duration: Duration,
    exited: impl Fn() -> bool,
) -> Result<Taken, String> {
    let started = Instant::now();
    let mut rec = Recording::start(&Settings {
        pid,
        exe: None,
        min_block_us,
        bucket_ms: 250,
        slots: super::SLOTS,
    })?;
    let since = Instant::now();
    eprintln!("freezetrap-capture: recording");
    let mut maps = Maps::new();
    let mut add = |e: Event| {
        if let Event::Map { name, entries } = e {
            let (name, max) = match name.as_str() {
                "@wait" => ("@lock_wait_max_us", true),
                "@hold" => ("@write_hold_us", true),
                other => (other, false),
            };
            let map = maps.entry(name.to_string()).or_default();
            for (_bucket, key, v) in entries {
                let slot = map.entry(key).or_insert(0);
                *slot = if max { (*slot).max(v) } else { *slot + v };
            }
        }
    };
    let (mut target_exited, mut stopped_by_signal) = (None, false);
    let until = since + duration;
    while Instant::now() < until {
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        rec.poll(base::clock::monotonic_ns(), false, &mut add);
        if exited() {
            let after = started.elapsed().as_secs_f64();
            eprintln!("freezetrap-capture: pid {pid} exited after {after:.1} s: writing what was recorded");
            target_exited = Some(after);
            break;
        }
        if crate::stop_requested() {
            eprintln!("freezetrap-capture: stopped by a signal: writing what was recorded");
            stopped_by_signal = true;
            break;
        }
    }
    rec.poll(base::clock::monotonic_ns(), true, &mut add);
    let ended = Instant::now();
    drop(rec);
    Ok(Taken {
        maps,
        recording_since: Some(since),
        ended,
        target_exited,
        stopped_by_signal,
    })
}
