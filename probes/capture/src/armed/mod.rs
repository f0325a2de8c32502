//! The armed flight recorder: `freezetrap-capture arm`.
//!
//! ```text
//! freezetrap-capture arm (--pid P | --binary PATH) --out DIR [--window S] [--after S]
//!     [--min-block-us U] [--cooldown S] [--max-captures N] [--max-bytes BYTES] [--for S]
//!     [--silence-limit S] [--rearm-every S] [--engine auto|compiled|bpftrace] [--bpftrace PATH]
//! ```
//! The triggered helper starts bpftrace when a stall is detected, so it records from about a
//! second after the detection (bpftrace 0.17 takes ~1 s to compile and attach). The armed
//! recorder is attached before anything goes wrong: it records the target all the time (with the
//! compiled program `bpf/recorder.bpf.o`, or with `armed.bt` under bpftrace where the kernel has
//! no BTF or `--engine bpftrace` says so), keeps the last `--window` seconds (default 5) of
//! off-CPU, on-CPU and mmap_lock data in
//! memory, and when the target fires `freezetrap:stall_begin` it waits `--after` seconds (default
//! 5) and writes the window around the probe into a fresh `DIR/armed-PID-stall-ID/`: the same
//! four files as the triggered helper, with `summary.json` extended by `mode`, `stalls`, `window`
//! and a per-bucket `timeline` (ms relative to the probe, negative = before it).
//!
//! It is also how an unprivileged service gets captures: the recorder runs as root beside it
//! (a sidecar), and the service needs no `FREEZETRAP_CAPTURE`, only `FREEZETRAP_STALL` so that
//! its watchdog fires the probe.
//!
//! With `--pid` it records that process and exits when it does. With `--binary` it waits for a
//! process running that executable, records it, and when it exits waits for the next one (a
//! service restart). Stalls less than `--cooldown` seconds (default 10) after a capture's window
//! are counted, not captured; `--max-captures` stops the recorder after N captures; capture
//! directories beyond `--max-bytes` (default 1 GiB) are deleted oldest first; `--for` ends the
//! recording after S seconds. bpftrace printing nothing for `--silence-limit` seconds (default 60)
//! is a hang: the recorder stops it and exits 8. bpftrace gets SIGTERM if the recorder dies.
//! The compiled program costs ~0.2 µs per context switch of the target where `armed.bt`
//! costs ~7 µs (`cargo bench --bench capture`), is armed in ~0.1 s, and needs no re-arming. With bpftrace, every `--rearm-every` seconds (default 3600), when no capture is
//! pending, bpftrace is
//! replaced by a fresh one (a gap of about half a second in the data; the window in memory is
//! kept): bpftrace 0.17's stack maps are never emptied, and once full, new stacks are lost
//! (counted as `lost_stacks`).

mod disk;
mod lines;
mod program;
mod recorder;
mod source;
mod window;

pub use lines::{parse_line, Event, StallSeen};
pub use window::{Ready, TimelineRow, Window};

use crate::cli::{ArmArgs, Engine};
use crate::preflight::{self, Refusal};
use base::dirs::Dir;
use recorder::{Outcome, Recorder};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The recorder's program, embedded at build time (also at `probes/bpftrace/armed.bt`).
pub const ARMED_BT: &str = include_str!("../../bpftrace/armed.bt");

/// Bucket length: the window's time resolution, and how often bpftrace prints.
pub(crate) const BUCKET_MS: u64 = 250;
/// Map entries the window may hold in memory in total (beyond: counted as dropped).
pub(crate) const MAX_ENTRIES: usize = 50_000;

/// What to record.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Pid(u32),
    Binary(PathBuf),
}

/// The recorder's settings, from [`ArmArgs`].
#[derive(Debug)]
pub(crate) struct Args {
    pub(crate) target: Target,
    pub(crate) out: Dir,
    pub(crate) window: Duration,
    pub(crate) after: Duration,
    pub(crate) min_block_us: u64,
    pub(crate) cooldown: Duration,
    pub(crate) max_captures: Option<u64>,
    pub(crate) max_bytes: u64,
    pub(crate) run_for: Option<Duration>,
    pub(crate) silence_limit: Duration,
    pub(crate) rearm_every: Duration,
    pub(crate) engine: Engine,
}

pub(crate) fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// Runs `freezetrap-capture arm` with its parsed arguments.
pub fn run(a: ArmArgs) -> ExitCode {
    let target = match (a.pid, &a.binary) {
        (Some(0), _) => {
            return Refusal::new(preflight::EXIT_USAGE, "--pid takes a process id, not 0").exit()
        }
        (Some(p), _) => Target::Pid(p),
        (None, Some(b)) if !b.is_file() => {
            return Refusal::new(
                preflight::EXIT_USAGE,
                format!("--binary {}: no such file", b.display()),
            )
            .exit()
        }
        (None, Some(b)) => Target::Binary(b.clone()),
        (None, None) => {
            return Refusal::new(preflight::EXIT_USAGE, "arm needs --pid P or --binary PATH").exit()
        }
    };
    let pid = match target {
        Target::Pid(p) => Some(p),
        Target::Binary(_) => None,
    };
    if let Err(r) = preflight::system(pid) {
        return r.exit();
    }
    // bpftrace is needed only as the engine or the fallback; its absence is said when it is
    // (a --bpftrace that cannot be used is refused at once: it was asked for).
    let bpftrace = match (a.engine, preflight::bpftrace(a.bpftrace.as_deref())) {
        (_, Ok(b)) => Ok(b),
        (Engine::Bpftrace, Err(r)) => return r.exit(),
        (_, Err(r)) if a.bpftrace.is_some() => return r.exit(),
        (_, Err(r)) => Err(r),
    };
    let out = match preflight::out_dir(&a.out) {
        Ok(d) => d,
        Err(r) => return r.exit(),
    };
    let args = Args {
        target,
        out,
        window: a.window,
        after: a.after,
        min_block_us: a
            .min_block_us
            .unwrap_or(a.min_block.as_micros().min(u128::from(u64::MAX)) as u64),
        cooldown: a.cooldown,
        max_captures: a.max_captures,
        max_bytes: a.max_bytes,
        run_for: a.run_for,
        silence_limit: a.silence_limit.max(Duration::from_secs(1)),
        rearm_every: a.rearm_every.max(Duration::from_secs(1)),
        engine: a.engine,
    };
    crate::install_stop_handlers();
    let deadline = args.run_for.map(|d| Instant::now() + d);
    let mut rec = Recorder {
        args: &args,
        bpftrace,
        compiled: a.engine != Engine::Bpftrace,
        deadline,
        captures: 0,
        skipped: 0,
        last_capture_end_ns: 0,
    };
    loop {
        let pid = match &args.target {
            Target::Pid(p) => *p,
            Target::Binary(path) => match rec.wait_for_process(path) {
                Some(p) => p,
                None => break,
            },
        };
        let mut session = rec.new_session(pid);
        let outcome = loop {
            match rec.record(&mut session) {
                // The same window goes on with a fresh bpftrace (and fresh stack maps).
                Ok(Outcome::Rearm) => continue,
                other => break other,
            }
        };
        match outcome {
            Ok(Outcome::TargetExited) if matches!(args.target, Target::Binary(_)) => continue,
            Ok(_) => break,
            Err(r) => return r.exit(),
        }
    }
    eprintln!(
        "freezetrap-capture: armed recorder done: {} capture(s), {} stall(s) skipped by the cooldown",
        rec.captures, rec.skipped
    );
    ExitCode::SUCCESS
}
