//! The `freezetrap-capture` command line, as a library function so that any binary can serve as
//! the helper (the `freeze_demo` example re-executes itself as one).
//!
//! ```text
//! freezetrap-capture --pid P [--tid T] [--stall-id N] --out DIR --duration S [--bpftrace PATH] [--min-block-us U]
//! freezetrap-capture arm (--pid P | --binary PATH) --out DIR [--window S] [--after S] ...
//! ```
//! The first form (the triggered helper) records for S seconds from now and writes
//! `offcpu.folded`, `oncpu.folded`, `offcpu.svg` and `summary.json` in DIR; the second (the armed
//! flight recorder, see [`super::armed`]) writes the same files into a fresh directory under DIR
//! for every `freezetrap:stall_begin` the target fires. Both print a one-line summary per capture.
//! Errors are one line on stderr with a distinct exit code (see [`super::preflight`]):
//! 2 usage, 3 bpftrace not found, 4 not permitted, 5 tracefs not mounted, 6 target gone,
//! 7 output directory not writable, 8 bpftrace failed.

use super::output::write_capture;
use super::preflight::{self, Refusal};
use super::{human, parse_maps, summarize, CAPTURE_BT};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

struct Args {
    pid: u32,
    out: PathBuf,
    duration: u64,
    bpftrace: Option<PathBuf>,
    min_block_us: u64,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut pid, mut out, mut duration, mut bpftrace, mut min_block_us) =
        (None, None, 10u64, None, 1000u64);
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--pid" => {
                pid = Some(
                    val("--pid")?
                        .parse::<u32>()
                        .map_err(|_| "--pid takes a process id".to_string())?,
                )
            }
            "--tid" | "--stall-id" => {
                val(&a)?; // recorded by the caller; the capture covers the whole process
            }
            "--out" => out = Some(PathBuf::from(val("--out")?)),
            "--duration" => {
                duration = val("--duration")?
                    .parse()
                    .map_err(|_| "--duration takes whole seconds".to_string())?
            }
            "--bpftrace" => bpftrace = Some(PathBuf::from(val("--bpftrace")?)),
            "--min-block-us" => {
                min_block_us = val("--min-block-us")?
                    .parse()
                    .map_err(|_| "--min-block-us takes microseconds".to_string())?
            }
            "-h" | "--help" => return Err("usage".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let pid = pid.ok_or("--pid is required")?;
    let out = out.ok_or("--out is required")?;
    if !(1..=3600).contains(&duration) {
        return Err("--duration must be 1..=3600 seconds".into());
    }
    Ok(Args {
        pid,
        out,
        duration,
        bpftrace,
        min_block_us,
    })
}

const USAGE: &str = "usage: freezetrap-capture --pid P [--tid T] [--stall-id N] --out DIR --duration S [--bpftrace PATH] [--min-block-us U] | freezetrap-capture arm (--pid P | --binary PATH) --out DIR [--window S] [--after S] [--min-block-us U] [--max-captures N] [--for S] [--bpftrace PATH]";

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    Refusal::new(code, msg.to_string()).exit()
}

/// Runs the helper with `args` (without the program name) and returns its exit code.
pub fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let mut args = args.peekable();
    if args.peek().map(String::as_str) == Some("arm") {
        args.next();
        return super::armed::run(args);
    }
    run_triggered(args)
}

fn run_triggered(args: impl Iterator<Item = String>) -> ExitCode {
    let started = Instant::now();
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => return fail(preflight::EXIT_USAGE, format!("{e}: {USAGE}")),
    };
    let bpftrace = match preflight::bpftrace(args.bpftrace.as_deref())
        .and_then(|b| preflight::system(Some(args.pid)).map(|_| b))
        .and_then(|b| preflight::writable_dir(&args.out).map(|_| b))
    {
        Ok(b) => b,
        Err(r) => return r.exit(),
    };
    let script = args.out.join("capture.bt");
    if let Err(e) = std::fs::write(&script, CAPTURE_BT) {
        return fail(
            preflight::EXIT_OUT_NOT_WRITABLE,
            format!(
                "output directory {} is not writable: {e}",
                args.out.display()
            ),
        );
    }
    let mut child = match super::bpftrace_command(&bpftrace)
        .arg("-f")
        .arg("json")
        .arg(&script)
        .arg(args.pid.to_string())
        .arg(args.min_block_us.to_string())
        .arg(args.duration.to_string())
        .args(preflight::FieldOffsets::from_tracefs_or_default().args())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return fail(
                preflight::EXIT_NO_BPFTRACE,
                format!("cannot run {}: {e}", bpftrace.display()),
            )
        }
    };
    // Read stdout and stderr on threads; print "recording" as soon as bpftrace says it attached.
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        super::for_each_line(stdout, |line| {
            if line.contains("\"printf\"") && line.contains("recording") {
                eprintln!("freezetrap-capture: recording");
            }
            all.push_str(&line);
            all.push('\n');
            true
        });
        all
    });
    let errors = super::collect_stderr(child.stderr.take().expect("piped"));
    // Our own deadline: exit even if bpftrace hangs. SIGINT first, so that a bpftrace that is
    // merely slow still prints what it recorded.
    let deadline = Instant::now() + Duration::from_secs(args.duration + 15);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                super::stop_bpftrace(&mut child, Duration::from_secs(5));
                break None;
            }
        }
    };
    let output = reader.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let maps = parse_maps(&output);
    if maps.is_empty() {
        let why = super::first_error(&stderr).unwrap_or("no data").to_string();
        return fail(
            preflight::EXIT_BPFTRACE_FAILED,
            format!(
                "bpftrace produced no data ({}): {why}",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "killed at the deadline".into())
            ),
        );
    }

    let summary = summarize(args.pid, args.duration, &maps);
    let title = format!("Off-CPU time, pid {} ({} s)", args.pid, args.duration);
    match write_capture(&args.out, &maps, &title, &summary) {
        Ok(w) => {
            if let Some(why) = w.no_graph {
                eprintln!("freezetrap-capture: no flame graph: {why}");
            }
        }
        Err(e) => {
            return fail(
                preflight::EXIT_OUT_NOT_WRITABLE,
                format!("writing to {} failed: {e}", args.out.display()),
            )
        }
    }
    let _ = std::fs::remove_file(&script);
    println!(
        "{} (in {:.1} s; {})",
        human(&summary),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    ExitCode::SUCCESS
}
