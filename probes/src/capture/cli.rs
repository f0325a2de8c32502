//! The `freezetrap-capture` command line, as a library function so that any binary can serve as
//! the helper (the `freeze_demo` example re-executes itself as one).
//!
//! ```text
//! freezetrap-capture --pid P [--tid T] [--stall-id N] --out DIR --duration S [--bpftrace PATH] [--min-block-us U]
//! ```
//! Writes `offcpu.folded`, `oncpu.folded`, `offcpu.svg` and `summary.json` in DIR and prints a
//! one-line summary. Errors are one line on stderr with a distinct exit code:
//! 2 usage, 3 bpftrace not found, 4 not permitted, 5 tracefs not mounted, 6 target gone,
//! 7 output directory not writable, 8 bpftrace failed.

use super::{folded, human, parse_maps, summarize, CAPTURE_BT};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

struct Args {
    pid: u32,
    out: PathBuf,
    duration: u64,
    bpftrace: Option<PathBuf>,
    min_block_us: u64,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("freezetrap-capture: {msg}");
    ExitCode::from(code)
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

fn find_on_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// Runs the helper with `args` (without the program name) and returns its exit code.
pub fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let started = Instant::now();
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            return fail(2, format!("{e}: usage: freezetrap-capture --pid P [--tid T] [--stall-id N] --out DIR --duration S [--bpftrace PATH] [--min-block-us U]"))
        }
    };
    let bpftrace =
        match args.bpftrace.clone().or_else(|| find_on_path("bpftrace")) {
            Some(p) if p.is_file() => p,
            _ => return fail(
                3,
                "bpftrace not found: install it (apt-get install bpftrace) or pass --bpftrace PATH",
            ),
        };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return fail(4, "not permitted: eBPF needs root (or CAP_BPF and CAP_PERFMON); run as root, or run the armed recorder as a root sidecar");
    }
    if !Path::new("/sys/kernel/tracing/events").exists()
        && !Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return fail(
            5,
            "tracefs is not mounted: run `mount -t tracefs nodev /sys/kernel/tracing` as root",
        );
    }
    if !Path::new(&format!("/proc/{}", args.pid)).exists() {
        return fail(6, format!("target pid {} is gone", args.pid));
    }
    if let Err(e) = std::fs::create_dir_all(&args.out)
        .and_then(|_| std::fs::write(args.out.join(".probe"), b""))
    {
        return fail(
            7,
            format!(
                "output directory {} is not writable: {e}",
                args.out.display()
            ),
        );
    }
    let _ = std::fs::remove_file(args.out.join(".probe"));

    let script = args.out.join("capture.bt");
    if let Err(e) = std::fs::write(&script, CAPTURE_BT) {
        return fail(
            7,
            format!(
                "output directory {} is not writable: {e}",
                args.out.display()
            ),
        );
    }
    let mut child = match Command::new(&bpftrace)
        .arg("-f")
        .arg("json")
        .arg(&script)
        .arg(args.pid.to_string())
        .arg(args.min_block_us.to_string())
        .arg(args.duration.to_string())
        .env("BPFTRACE_MAX_STRLEN", "64")
        .env("BPFTRACE_MAP_KEYS_MAX", "8192")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(3, format!("cannot run {}: {e}", bpftrace.display())),
    };
    // Read stdout on a thread; print "recording" as soon as bpftrace says it attached.
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        let mut all = String::new();
        for line in BufReader::new(&mut stdout).lines().map_while(Result::ok) {
            if line.contains("\"printf\"") && line.contains("recording") {
                eprintln!("freezetrap-capture: recording");
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Our own deadline: exit even if bpftrace hangs.
    let deadline = Instant::now() + Duration::from_secs(args.duration + 15);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = reader.join().unwrap_or_default();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let maps = parse_maps(&output);
    if maps.is_empty() {
        let why = stderr
            .lines()
            .find(|l| l.contains("ERROR") && !l.contains("RLIMIT_MEMLOCK"))
            .unwrap_or("no data")
            .to_string();
        return fail(
            8,
            format!(
                "bpftrace produced no data ({}): {why}",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "killed at the deadline".into())
            ),
        );
    }

    let off = folded(maps.get("@off"));
    let on = folded(maps.get("@on"));
    let summary = summarize(args.pid, args.duration, &maps);
    let write =
        |name: &str, lines: &[String]| std::fs::write(args.out.join(name), lines.join("\n") + "\n");
    let mut svg = Vec::new();
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!("Off-CPU time, pid {} ({} s)", args.pid, args.duration);
    opts.count_name = "us".into();
    opts.colors =
        inferno::flamegraph::color::Palette::Basic(inferno::flamegraph::color::BasicPalette::Io);
    let graph = if off.is_empty() {
        Err("no off-CPU stacks".to_string())
    } else {
        inferno::flamegraph::from_lines(&mut opts, off.iter().map(String::as_str), &mut svg)
            .map_err(|e| e.to_string())
    };
    let res = write("offcpu.folded", &off)
        .and_then(|_| write("oncpu.folded", &on))
        .and_then(|_| {
            std::fs::write(
                args.out.join("summary.json"),
                serde_json::to_vec_pretty(&summary).unwrap_or_default(),
            )
        })
        .and_then(|_| {
            if graph.is_ok() {
                std::fs::write(args.out.join("offcpu.svg"), &svg)
            } else {
                Ok(())
            }
        });
    if let Err(e) = res {
        return fail(7, format!("writing to {} failed: {e}", args.out.display()));
    }
    if let Err(e) = graph {
        eprintln!("freezetrap-capture: no flame graph: {e}");
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
