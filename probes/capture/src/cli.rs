//! The `freezetrap-capture` command line, as a library function so that any binary can serve as
//! the helper (the `freeze_demo` example re-executes itself as one).
//!
//! ```text
//! freezetrap-capture --pid P --out DIR [--duration 10s] [--tid T] [--stall-id N] [--min-block 1ms]
//!     [--engine auto|compiled|bpftrace] [--bpftrace PATH]
//! freezetrap-capture arm (--pid P | --binary PATH) --out DIR [--window 5s] [--after 5s] ...
//! ```
//! The first form (the triggered helper) records for the duration from now and writes
//! `offcpu.folded`, `oncpu.folded`, `offcpu.svg` and `summary.json` in DIR; the second (the armed
//! flight recorder, see [`crate::armed`]) writes the same files into a fresh directory under DIR
//! for every `freezetrap:stall_begin` the target fires. Both print a one-line summary per capture.
//! Durations and sizes take the units of freezetrap's environment variables (`10s`, `250ms`,
//! `1GiB`); a bare number of seconds is also accepted, as the watchdog passes `--duration 10`.
//! Errors are one line on stderr with a distinct exit code (see [`crate::preflight`]):
//! 2 usage, 3 bpftrace not found or refused, 4 not permitted, 5 tracefs not mounted, 6 target
//! gone, 7 output directory refused or not writable, 8 bpftrace failed, 9 no stall probe.

use crate::output::write_capture;
use crate::preflight::{self, Refusal};
use crate::symbols::TargetSymbols;
use crate::{human, parse_maps, resymbolize, summarize, Taken, CAPTURE_BT};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "freezetrap-capture",
    version,
    about = "Records what a frozen process waits on (off-CPU stacks, on-CPU samples, mmap_lock waits and holds) with a compiled eBPF program or bpftrace, as root.",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Mode>,
    #[command(flatten)]
    triggered: TriggeredArgs,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// The armed flight recorder: stays attached and writes the window around every
    /// freezetrap:stall_begin the target fires.
    Arm(ArmArgs),
}

/// The triggered helper's arguments (what the watchdog passes on a stall).
#[derive(Args, Debug)]
struct TriggeredArgs {
    /// The process to record.
    #[arg(long, required = true)]
    pid: Option<u32>,
    /// The stalled thread: `stalled_thread` and the verdict follow it (the capture covers the
    /// whole process; 0 or none for a stall of the whole process).
    #[arg(long)]
    tid: Option<u64>,
    /// The watchdog's stall id (informational).
    #[arg(long = "stall-id")]
    stall_id: Option<u64>,
    /// Where the files go: created if missing; it and every directory above it must be owned by
    /// root and not writable by group or others.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// How long to record (1s..=1h).
    #[arg(long, default_value = "10s", value_parser = capture_duration)]
    duration: Duration,
    /// Off-CPU blocks shorter than this are not recorded.
    #[arg(long = "min-block", default_value = "1ms", value_parser = any_duration)]
    min_block: Duration,
    /// The same in microseconds (older form).
    #[arg(long = "min-block-us", hide = true)]
    min_block_us: Option<u64>,
    /// The bpftrace to run (default: the first on PATH); checked like everything root runs.
    #[arg(long)]
    bpftrace: Option<PathBuf>,
    /// What records: `compiled` (the embedded CO-RE program; needs the kernel's BTF),
    /// `bpftrace` (`capture.bt`), or `auto`: compiled, and bpftrace when it cannot load.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

/// `freezetrap-capture arm`'s arguments.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["pid", "binary"]))]
pub struct ArmArgs {
    /// Record this process; exit when it does.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Record whichever process runs this executable (same device and inode), and the next one
    /// after it exits (a restart).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where the capture directories go (as for the triggered helper).
    #[arg(long)]
    pub out: PathBuf,
    /// How much before a stall to keep (1s..=60s).
    #[arg(long, default_value = "5s", value_parser = window_duration)]
    pub window: Duration,
    /// How much after the stall's probe to record before writing (0s..=60s).
    #[arg(long, default_value = "5s", value_parser = after_duration)]
    pub after: Duration,
    /// Off-CPU blocks shorter than this are not recorded.
    #[arg(long = "min-block", default_value = "1ms", value_parser = any_duration)]
    pub min_block: Duration,
    /// The same in microseconds (older form).
    #[arg(long = "min-block-us", hide = true)]
    pub min_block_us: Option<u64>,
    /// Stalls this soon after a capture's window are counted, not captured.
    #[arg(long, default_value = "10s", value_parser = zero_or_duration)]
    pub cooldown: Duration,
    /// Stop after this many captures.
    #[arg(long = "max-captures")]
    pub max_captures: Option<u64>,
    /// Delete the oldest capture directories beyond this total (at least 1MiB).
    #[arg(long = "max-bytes", default_value = "1GiB", value_parser = byte_cap)]
    pub max_bytes: u64,
    /// Stop recording after this long.
    #[arg(long = "for", value_parser = any_duration)]
    pub run_for: Option<Duration>,
    /// bpftrace printing nothing this long is a hang (exit 8).
    #[arg(long = "silence-limit", default_value = "60s", value_parser = any_duration)]
    pub silence_limit: Duration,
    /// Replace bpftrace by a fresh one this often, when no capture is pending.
    #[arg(long = "rearm-every", default_value = "1h", value_parser = any_duration)]
    pub rearm_every: Duration,
    /// The bpftrace to run (default: the first on PATH).
    #[arg(long)]
    pub bpftrace: Option<PathBuf>,
    /// What records: `compiled` (the embedded CO-RE program; needs the kernel's BTF),
    /// `bpftrace` (`armed.bt`), or `auto`: compiled, and bpftrace when it cannot load.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
}

/// The armed recorder's engine (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The compiled program, and bpftrace if it cannot be loaded (said in one line).
    Auto,
    /// Only the compiled program.
    Compiled,
    /// Only bpftrace with `armed.bt`.
    Bpftrace,
}

/// A duration as freezetrap's variables write it (`250ms`, `10s`), or a bare number of seconds.
fn parse_duration(s: &str, allow_zero: bool) -> Result<Duration, String> {
    let t = s.trim();
    if allow_zero && t.trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    if let Ok(secs) = t.parse::<u64>() {
        if secs == 0 && !allow_zero {
            return Err("it must be greater than zero".into());
        }
        return Ok(Duration::from_secs(secs));
    }
    base::parse::parse_duration_ns(t.as_bytes())
        .map(Duration::from_nanos)
        .map_err(|e| format!("{e}: expected e.g. 250ms, 10s or 2m"))
}

fn in_range(d: Duration, lo: Duration, hi: Duration) -> Result<Duration, String> {
    if d < lo || d > hi {
        return Err(format!("it must be from {lo:?} to {hi:?}"));
    }
    Ok(d)
}

fn any_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s, false)
}

fn zero_or_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s, true)
}

fn capture_duration(s: &str) -> Result<Duration, String> {
    in_range(
        parse_duration(s, false)?,
        Duration::from_secs(1),
        Duration::from_secs(3600),
    )
}

fn window_duration(s: &str) -> Result<Duration, String> {
    in_range(
        parse_duration(s, false)?,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
}

fn after_duration(s: &str) -> Result<Duration, String> {
    in_range(
        parse_duration(s, true)?,
        Duration::ZERO,
        Duration::from_secs(60),
    )
}

fn byte_cap(s: &str) -> Result<u64, String> {
    base::parse::parse_size_at_least(s.as_bytes(), 1 << 20)
        .map(|v| v as u64)
        .map_err(|e| format!("{e}: expected a size of at least 1MiB, e.g. 1GiB"))
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    Refusal::new(code, msg.to_string()).exit()
}

/// Runs the helper with `args` (without the program name) and returns its exit code.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv = std::iter::once(OsString::from("freezetrap-capture"))
        .chain(args.into_iter().map(Into::into));
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let code = if e.use_stderr() {
                preflight::EXIT_USAGE
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Some(Mode::Arm(a)) => crate::armed::run(a),
        None => run_triggered(cli.triggered),
    }
}

/// Watches the target from outside: readable `pidfd` (Linux 5.3) once it has exited, or its
/// `/proc` entry gone.
struct TargetWatch {
    pid: u32,
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl TargetWatch {
    fn new(pid: u32) -> TargetWatch {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a new descriptor
        // that we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
        TargetWatch { pid, pidfd }
    }

    fn exited(&self) -> bool {
        use std::os::fd::AsRawFd;
        match &self.pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                unsafe { libc::poll(&mut p, 1, 0) > 0 }
            }
            None => !preflight::pid_alive(self.pid),
        }
    }
}

/// Takes the target's symbol snapshot on a thread (reading its maps waits out a freeze) and
/// hands it over when asked, waiting at most `limit`.
fn symbols_in_background(pid: u32) -> std::sync::mpsc::Receiver<TargetSymbols> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(s) = TargetSymbols::snapshot(pid) {
            let _ = tx.send(s);
        }
    });
    rx
}

fn run_triggered(a: TriggeredArgs) -> ExitCode {
    let started = Instant::now();
    let (Some(pid), Some(out)) = (a.pid, a.out.clone()) else {
        return fail(preflight::EXIT_USAGE, "--pid and --out are required");
    };
    let min_block_us = a
        .min_block_us
        .unwrap_or(a.min_block.as_micros().min(u128::from(u64::MAX)) as u64);
    if let Err(r) = preflight::system(Some(pid)) {
        return r.exit();
    }
    // bpftrace is needed only as the engine or the fallback (a --bpftrace that cannot be used
    // is refused at once: it was asked for).
    let bpftrace = match preflight::bpftrace(a.bpftrace.as_deref()) {
        Ok(b) => Ok(b),
        Err(r) if a.engine == Engine::Bpftrace || a.bpftrace.is_some() => return r.exit(),
        Err(r) => Err(r),
    };
    let dir = match preflight::out_dir(&out) {
        Ok(d) => d,
        Err(r) => return r.exit(),
    };
    crate::install_stop_handlers();
    let watch = TargetWatch::new(pid);
    let symbols = symbols_in_background(pid);
    let taken = match a.engine {
        Engine::Bpftrace => None,
        engine => {
            match crate::compiled::record_for(pid, min_block_us, a.duration, || watch.exited()) {
                Ok(t) => Some(t),
                Err(why) if engine == Engine::Compiled => {
                    return fail(preflight::EXIT_BPFTRACE_FAILED, why)
                }
                Err(why) => {
                    eprintln!("freezetrap-capture: {why}; recording with bpftrace instead");
                    None
                }
            }
        }
    };
    let taken = match taken {
        Some(t) => t,
        None => {
            let bpftrace = match bpftrace {
                Ok(b) => b,
                Err(r) => return r.exit(),
            };
            match record_with_bpftrace(&bpftrace, pid, min_block_us, &a, &watch, started) {
                Ok(t) => t,
                Err(code) => return code,
            }
        }
    };
    let Taken {
        mut maps,
        recording_since,
        ended,
        target_exited,
        stopped_by_signal,
    } = taken;
    // Our own names for the user frames: from files held open while the target was alive.
    let wait = if target_exited.is_some() { 1 } else { 5 };
    let syms = symbols.recv_timeout(Duration::from_secs(wait)).ok();
    if let Some(syms) = &syms {
        resymbolize(&mut maps, syms);
    }

    // From bpftrace's "recording" (its probes attached) to its end.
    let recorded_s = recording_since
        .map(|t| ended.saturating_duration_since(t))
        .unwrap_or_else(|| ended.saturating_duration_since(started))
        .as_secs_f64()
        .min(a.duration.as_secs_f64());
    // The recording starts during the stall (the watchdog runs the helper on detection), so
    // all of it is the stall's window.
    let stall = crate::StallWindow {
        tid: a.tid,
        maps: &maps,
        us: (recorded_s * 1e6) as u64,
    };
    let mut summary = summarize(pid, (recorded_s * 1e6) as u64, &maps, &stall);
    summary.target_exited_after_s = target_exited;
    summary.stopped_by_signal = stopped_by_signal;
    let title = format!("Off-CPU time, pid {pid} ({recorded_s:.1} s)");
    let recorded = crate::output::Recorded {
        duration_ns: (recorded_s * 1e9) as u64,
        symbols: syms.as_ref(),
    };
    match write_capture(&dir, &maps, &title, &summary, recorded) {
        Ok(w) => {
            if let Some(why) = w.no_graph {
                eprintln!("freezetrap-capture: no flame graph: {why}");
            }
        }
        Err(e) => {
            return fail(
                preflight::EXIT_OUT_NOT_WRITABLE,
                format!("writing to {} failed: {e}", dir.path().display()),
            )
        }
    }
    println!(
        "{} (in {:.1} s; {})",
        human(&summary),
        started.elapsed().as_secs_f64(),
        dir.path().display()
    );
    ExitCode::SUCCESS
}

/// Records with bpftrace and `capture.bt` for `--duration`, or until the target exits or a
/// signal says stop.
fn record_with_bpftrace(
    bpftrace: &std::path::Path,
    pid: u32,
    min_block_us: u64,
    a: &TriggeredArgs,
    watch: &TargetWatch,
    started: Instant,
) -> Result<Taken, ExitCode> {
    let duration_ms = a.duration.as_millis().max(1) as u64;
    let mut args = vec![
        pid.to_string(),
        min_block_us.to_string(),
        duration_ms.to_string(),
    ];
    args.extend(preflight::FieldOffsets::from_tracefs_or_default().args());
    let mut child = match crate::bpftrace_command(bpftrace, CAPTURE_BT, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Err(fail(
                preflight::EXIT_NO_BPFTRACE,
                format!("cannot run {}: {e}", bpftrace.display()),
            ))
        }
    };
    // Read stdout and stderr on threads; print "recording" as soon as bpftrace says it attached.
    let stdout = child.stdout.take().expect("piped");
    let recording_since = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let since = recording_since.clone();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        crate::for_each_line(stdout, |line| {
            if line.contains("\"printf\"") && line.contains("recording") {
                let _ = since.set(Instant::now());
                eprintln!("freezetrap-capture: recording");
            }
            all.push_str(&line);
            all.push('\n');
            true
        });
        all
    });
    let errors = crate::collect_stderr(child.stderr.take().expect("piped"));
    // Our own deadline: exit even if bpftrace hangs. SIGINT first, so that a bpftrace that is
    // merely slow still prints what it recorded.
    let mut deadline = Instant::now() + a.duration + Duration::from_secs(15);
    let mut target_exited: Option<f64> = None;
    let mut stopped_by_signal = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => {}
            _ => {
                crate::stop_bpftrace(&mut child, Duration::from_secs(5));
                break None;
            }
        }
        if target_exited.is_none() && !stopped_by_signal {
            // The target exiting (or being killed) ends the recording early: what was recorded
            // is written, which is the point of a capture that outlives the service.
            if watch.exited() {
                let after = started.elapsed().as_secs_f64();
                eprintln!("freezetrap-capture: pid {pid} exited after {after:.1} s: writing what was recorded");
                target_exited = Some(after);
                crate::interrupt(&mut child);
                deadline = deadline.min(Instant::now() + Duration::from_secs(10));
            } else if crate::stop_requested() {
                eprintln!("freezetrap-capture: stopped by a signal: writing what was recorded");
                stopped_by_signal = true;
                crate::interrupt(&mut child);
                deadline = deadline.min(Instant::now() + Duration::from_secs(10));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ended = Instant::now();
    let output = reader.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let maps = parse_maps(&output);
    if maps.is_empty() {
        let why = crate::first_error(&stderr).unwrap_or("no data").to_string();
        return Err(fail(
            preflight::EXIT_BPFTRACE_FAILED,
            format!(
                "bpftrace produced no data ({}): {why}",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "killed at the deadline".into())
            ),
        ));
    }
    Ok(Taken {
        maps,
        recording_since: recording_since.get().copied(),
        ended,
        target_exited,
        stopped_by_signal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("freezetrap-capture").chain(list.iter().copied()))
    }

    #[test]
    fn durations_take_units_or_bare_seconds() {
        let c = parse(&["--pid", "1", "--out", "/o", "--duration", "1500ms"]).unwrap();
        assert_eq!(c.triggered.duration, Duration::from_millis(1500));
        let c = parse(&["--pid=1", "--out=/o", "--duration=10"]).unwrap();
        assert_eq!(c.triggered.duration, Duration::from_secs(10));
        assert!(parse(&["--pid", "1", "--out", "/o", "--duration", "2h"]).is_err());
        assert!(parse(&["--pid", "1", "--out", "/o", "--duration", "0"]).is_err());
        assert!(parse(&["--out", "/o"]).is_err(), "--pid is required");
    }

    #[test]
    fn arm_has_defaults_and_clear_errors() {
        let c = parse(&["arm", "--pid", "42", "--out", "/tmp/x"]).unwrap();
        let Some(Mode::Arm(a)) = c.command else {
            panic!("not arm")
        };
        assert_eq!(a.pid, Some(42));
        assert_eq!(
            (a.window, a.after, a.cooldown),
            (
                Duration::from_secs(5),
                Duration::from_secs(5),
                Duration::from_secs(10)
            )
        );
        assert_eq!(a.max_bytes, 1 << 30);
        let e = parse(&["arm", "--out", "/tmp/x"]).unwrap_err().to_string();
        assert!(e.contains("--pid") && e.contains("--binary"), "{e}");
        assert!(parse(&["arm", "--pid", "1", "--out", "/o", "--window", "0"]).is_err());
        assert!(parse(&["arm", "--pid", "1", "--out", "/o", "--after", "0"]).is_ok());
        assert!(parse(&["arm", "--pid", "1", "--out", "/o", "--max-bytes", "1KiB"]).is_err());
        assert!(parse(&["arm", "--pid", "1"]).is_err(), "--out is required");
        assert!(parse(&["arm", "--pid", "1", "--out", "/o", "--bogus"]).is_err());
    }

    #[test]
    fn paths_need_not_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let out = OsString::from_vec(b"/tmp/caf\xe9".to_vec());
        let c = Cli::try_parse_from([
            OsString::from("freezetrap-capture"),
            "--pid".into(),
            "1".into(),
            "--out".into(),
            out.clone(),
        ])
        .unwrap();
        assert_eq!(c.triggered.out.unwrap().into_os_string(), out);
    }
}
