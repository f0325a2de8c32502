//! The capture side's numbers (issue #4), printed: needs root and bpftrace, else it says so and
//! exits. `cargo bench --bench capture`
//!
//! 1. Time from invocation to recording: the triggered helper (`freezetrap-capture --pid ...`,
//!    until it prints "recording") and the armed recorder (`arm`, until "armed on pid").
//! 2. The armed recorder's overhead on a context-switch-heavy workload: two threads bouncing a
//!    byte through a socket pair, both pinned to CPU 0 (so the in-kernel cost is not hidden by
//!    the second core; the recorder runs on the other), in alternating 3 s phases without and
//!    with the recorder attached to this process, seven rounds in one run, for each engine
//!    (`--engine compiled`, then `--engine bpftrace`): medians and spread of the round-trip
//!    rates, the cost per context switch as (1/on - 1/off)/2 (a round trip is two switches of
//!    the target; the median over rounds, each on phase against the off phase before it), the
//!    throughput ratio, the recorder's CPU (itself and its bpftrace, if any)
//!    and its resident memory (RSS and PSS of the recorder and its children; BPF maps are
//!    kernel memory, not counted there).
//! 3. Output sizes of a 10 s capture of this process (the workload running), triggered and armed
//!    (5 s before + 5 s after a `stall_begin` this process fires).
//!
//! This binary is its own capture helper: run with `--capture-helper ARGS` it is
//! `freezetrap-capture ARGS`. `FT_BENCH_OVERHEAD_ONLY=compiled` (or `bpftrace`) runs part 2 alone,
//! for that engine.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// Pins the calling thread to CPU 0.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity(0 = this
    // thread) only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// (RSS, PSS) in KiB of `pid` and its children (the recorder and its bpftrace).
fn resident_kib(pid: u32) -> (u64, u64) {
    let one = |p: &str| -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("Rss:"), field("Pss:"))
    };
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid.to_string())
        .chain(children.split_whitespace().map(str::to_string))
        .map(|p| one(&p))
        .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Two threads bouncing one byte through a socket pair until `stop`; counts round trips.
fn ping_pong(stop: Arc<AtomicBool>, trips: Arc<AtomicU64>) -> Vec<std::thread::JoinHandle<()>> {
    let (mut a_write, mut a_read) = std::os::unix::net::UnixStream::pair().unwrap();
    let (mut b_read, mut b_write) = (a_write.try_clone().unwrap(), a_read.try_clone().unwrap());
    let stop2 = stop.clone();
    let ponger = std::thread::Builder::new()
        .name("pong".into())
        .spawn(move || {
            pin_to_cpu0();
            let mut byte = [0u8];
            while a_read.read_exact(&mut byte).is_ok() {
                if b_write.write_all(&byte).is_err() || stop2.load(Ordering::Relaxed) {
                    return;
                }
            }
        })
        .unwrap();
    let pinger = std::thread::Builder::new()
        .name("ping".into())
        .spawn(move || {
            pin_to_cpu0();
            let mut byte = [1u8];
            while !stop.load(Ordering::Relaxed) {
                a_write.write_all(&byte).unwrap();
                b_read.read_exact(&mut byte).unwrap();
                trips.fetch_add(1, Ordering::Relaxed);
            }
            let _ = a_write.write_all(&byte);
        })
        .unwrap();
    vec![pinger, ponger]
}

fn helper(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    // This binary's allocator is jemalloc, which keeps freed pages for 10 s: without this, the
    // recorder's resident memory would include the kernel BTF it parsed once at start and freed
    // (the freezetrap-capture binary, on the system allocator, does not keep them either).
    c.env("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0");
    c.arg("--capture-helper").args(args);
    c
}

/// Spawns `cmd` with stderr piped and returns it once a stderr line contains `what`, with the
/// time that took.
fn spawn_until(
    mut cmd: Command,
    what: &str,
) -> (Child, Duration, std::sync::mpsc::Receiver<String>) {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = String::new();
    loop {
        let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no {what:?} from the helper; it said:\n{seen}");
        };
        seen.push_str(&l);
        seen.push('\n');
        if l.contains(what) {
            return (child, t0.elapsed(), rx);
        }
    }
}

fn stop(mut child: Child) -> String {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    out
}

/// CPU seconds used so far by the recorder and its children (its bpftrace, if any).
fn recorder_cpu_s(recorder: u32) -> f64 {
    let children = std::fs::read_to_string(format!("/proc/{recorder}/task/{recorder}/children"))
        .unwrap_or_default();
    let tick = 100.0; // USER_HZ
    std::iter::once(recorder.to_string())
        .chain(children.split_whitespace().map(str::to_string))
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?) / tick)
        })
        .sum()
}

/// Context switches of every thread of this process so far.
fn switches() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Round trips per second and context switches per second over `secs`.
fn rate(trips: &AtomicU64, secs: u64) -> (f64, f64) {
    let (before, sw) = (trips.load(Ordering::Relaxed), switches());
    std::thread::sleep(Duration::from_secs(secs));
    (
        (trips.load(Ordering::Relaxed) - before) as f64 / secs as f64,
        (switches() - sw) as f64 / secs as f64,
    )
}

fn dir_sizes(dir: &std::path::Path) -> String {
    [
        "offcpu.folded",
        "oncpu.folded",
        "offcpu.svg",
        "summary.json",
    ]
    .iter()
    .map(|f| {
        let n = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        format!("{f} {:.1} KB", n as f64 / 1000.0)
    })
    .collect::<Vec<_>>()
    .join(", ")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--capture-helper") {
        std::process::exit(match probes_run(args[2..].to_vec()) {
            c if c == std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        });
    }
    let bpftrace = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("bpftrace").is_file()))
        .unwrap_or(false);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 || !bpftrace {
        println!("capture bench SKIPPED: needs root and bpftrace (apt-get install bpftrace)");
        return;
    }
    let me = std::process::id().to_string();
    let out = std::env::temp_dir().join(format!("freezetrap-capture-bench-{me}"));
    let _ = std::fs::remove_dir_all(&out);
    // Root's and private: the helper refuses an output directory anyone else could change.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let outs = out.to_str().unwrap().to_string();

    // FT_BENCH_OVERHEAD_ONLY=compiled (or bpftrace): only part 2, for that engine.
    let only = std::env::var("FT_BENCH_OVERHEAD_ONLY").ok();
    if let Some(engine) = only.as_deref() {
        let halt = Arc::new(AtomicBool::new(false));
        let trips = Arc::new(AtomicU64::new(0));
        let _threads = ping_pong(halt.clone(), trips.clone());
        std::thread::sleep(Duration::from_secs(1));
        overhead(engine, &me, &outs, &trips);
        halt.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&out);
        return;
    }

    // 1. Time to recording.
    for i in 0..3 {
        let dir = format!("{outs}/t{i}");
        let (c, t, _) = spawn_until(
            helper(&["--pid", &me, "--out", &dir, "--duration", "1"]),
            "recording",
        );
        println!(
            "triggered helper: invocation to recording {:.3} s",
            t.as_secs_f64()
        );
        stop(c);
        for engine in ENGINES {
            let (c, t, _) = spawn_until(
                helper(&["arm", "--pid", &me, "--out", &dir, "--engine", engine]),
                "armed on pid",
            );
            println!(
                "armed recorder ({engine}): invocation to armed {:.3} s",
                t.as_secs_f64()
            );
            stop(c);
        }
    }

    // 2. Overhead, alternating phases in one run, for each engine.
    let halt = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicU64::new(0));
    let threads = ping_pong(halt.clone(), trips.clone());
    std::thread::sleep(Duration::from_secs(1));
    for engine in ENGINES {
        overhead(engine, &me, &outs, &trips);
    }

    // 3. Output sizes of a 10 s capture, triggered and armed, with the workload running.
    let dir = format!("{outs}/ten");
    let status = helper(&["--pid", &me, "--out", &dir, "--duration", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    println!(
        "triggered 10 s capture: {}",
        dir_sizes(std::path::Path::new(&dir))
    );
    let armed_dir = format!("{outs}/armed");
    let (rec, _, _) = spawn_until(
        helper(&[
            "arm",
            "--pid",
            &me,
            "--out",
            &armed_dir,
            "--max-captures",
            "1",
            "--engine",
            "compiled",
        ]),
        "armed on pid",
    );
    std::thread::sleep(Duration::from_secs(6));
    freezetrap::probes::stall_begin(1, 0, 0);
    let mut rec = rec;
    let status = rec.wait().unwrap();
    assert!(status.success());
    let cap = std::path::Path::new(&armed_dir).join(format!("armed-{me}-stall-1"));
    println!("armed capture (5 s + 5 s): {}", dir_sizes(&cap));

    halt.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The armed recorder's engines, compared.
const ENGINES: [&str; 2] = ["compiled", "bpftrace"];

/// Off/on alternations per engine.
const ROUNDS: usize = 7;

/// ROUNDS alternations of 3 s without and 3 s with the recorder (`engine`) attached to this
/// process; prints the medians, spreads, cost per switch, ratio, the recorder's CPU and memory.
fn overhead(engine: &str, me: &str, outs: &str, trips: &AtomicU64) {
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut cpu, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(rate(trips, 3).0);
        let (rec, _, _) = spawn_until(
            helper(&["arm", "--pid", me, "--out", outs, "--engine", engine]),
            "armed on pid",
        );
        // Past the first prints: the first symbolization loads this binary's symbols once
        // (~0.1 s of CPU), which is not the steady state.
        std::thread::sleep(Duration::from_millis(1500));
        let c0 = recorder_cpu_s(rec.id());
        with.push(rate(trips, 3).0);
        cpu.push((recorder_cpu_s(rec.id()) - c0) / 3.0);
        mem.push(resident_kib(rec.id()));
        stop(rec);
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{lo:.0}-{hi:.0}")
    };
    let (off, on) = (median(&without), median(&with));
    // Each on phase against the off phase just before it: this VM's speed drifts over tens of
    // seconds (other tenants), and a pair 3 s apart shares the drift.
    let per_round: Vec<f64> = without
        .iter()
        .zip(&with)
        .map(|(off, on)| (1e6 / on - 1e6 / off) / 2.0)
        .collect();
    let (lo, hi) = per_round
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    println!(
        "{engine}: ping-pong on CPU 0, round trips/s: recorder off median {off:.0} (spread {}), on median {on:.0} (spread {})",
        spread(&without),
        spread(&with)
    );
    println!(
        "{engine}: armed recorder overhead: {:.3} µs per context switch of the target (median over {ROUNDS} rounds of (1/on - 1/off)/2, each on phase against the off phase before it; spread {lo:.3}..{hi:.3}; goal <= 0.2), throughput ratio {:.3}; the recorder used {:.2}% of one core (median; goal <= 1%); resident: {}",
        median(&per_round),
        on / off,
        100.0 * median(&cpu),
        mem.iter()
            .max_by_key(|(rss, _)| *rss)
            .map(|(r, p)| format!(
                "RSS {:.1} MiB, PSS {:.1} MiB at most (the recorder and its children; goal < 32 MiB)",
                *r as f64 / 1024.0,
                *p as f64 / 1024.0
            ))
            .unwrap_or_default()
    );
}

fn probes_run(args: Vec<String>) -> std::process::ExitCode {
    freezetrap_capture::cli::run(args)
}
