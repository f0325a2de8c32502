//! The watchdog's costs and detection latency.
//!
//! - `heartbeat/beat` (criterion): the cost of `Heartbeat::beat` on the beating thread.
//! - Then, printed: the detection latency of 10 injected 500 ms heartbeat stalls (detection
//!   time minus the last beat), against the target `threshold + tick`; and the CPU use of all
//!   of freezetrap's threads in an idle service started with `init_from_env` at the default
//!   tick (threshold 200 ms), with 16 heartbeats and the capture launcher, over 60 s, from
//!   their scheduler statistics, against the budget of 0.1% of one core.
//!
//! `cargo bench --bench watchdog`

use criterion::Criterion;
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

fn heartbeat(c: &mut Criterion) {
    let hb = freezetrap::Heartbeat::new("bench");
    c.bench_function("heartbeat/beat", |b| b.iter(|| hb.beat()));
}

/// CPU time each of this process's freezetrap threads has used (`freezetrap-*` by name, from
/// `/proc/self/task/*/schedstat`, ns), plus the capture launcher's process when there is one.
fn freezetrap_cpu_ns(launcher: Option<u32>) -> std::collections::BTreeMap<String, u64> {
    let run_ns = |path: std::path::PathBuf| -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm.starts_with("freezetrap-") {
            if let Some(ns) = run_ns(task.path().join("schedstat")) {
                *out.entry(comm.to_string()).or_insert(0) += ns;
            }
        }
    }
    if let Some(pid) = launcher {
        if let Some(ns) = run_ns(format!("/proc/{pid}/schedstat").into()) {
            out.insert("launcher (process)".into(), ns);
        }
    }
    out
}

/// An idle service with everything on, started as a service starts it (`init_from_env`):
/// large-allocation recording, the report thread, the watchdog at the default tick (200 ms
/// threshold, so a 100 ms tick) sampling its per-tick evidence, 16 heartbeats beaten every
/// 20 ms, and — when `freezetrap-capture` is built — the capture launcher waiting. Measured
/// over 60 s: every freezetrap thread's CPU time, against the budget of 0.1% of one core.
fn idle_service_cost() {
    let dir = std::env::temp_dir().join(format!("freezetrap-bench-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let helper = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("freezetrap-capture"))
        .filter(|p| p.is_file());
    // SAFETY: set before init_from_env reads them; the only other thread is criterion's, done.
    unsafe {
        std::env::set_var("FREEZETRAP_STALL", "200ms");
        std::env::set_var("FREEZETRAP_ALLOC_THRESHOLD", "64MiB");
        std::env::set_var("FREEZETRAP_OUT", &dir);
        std::env::set_var("FREEZETRAP_REPORT", "report.jsonl");
        match &helper {
            Some(h) => std::env::set_var("FREEZETRAP_CAPTURE", h),
            None => std::env::remove_var("FREEZETRAP_CAPTURE"),
        }
    }
    let ft = freezetrap::init_from_env();
    let wd = ft.watchdog().expect("the watchdog started");
    // The launcher is forked off this thread and installed at the watchdog's first tick.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while helper.is_some()
        && wd.capture_launcher_pid().is_none()
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let launcher = wd.capture_launcher_pid();
    let beats: Vec<_> = (0..16)
        .map(|i| freezetrap::Heartbeat::new(&format!("hb-{i}")))
        .collect();
    let beat_for = |d: Duration| {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < d {
            for b in &beats {
                b.beat();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    beat_for(Duration::from_secs(1)); // past start-up work (prefaulting, dry run)
    let stalls_before = std::fs::read_to_string(dir.join("report.jsonl")).unwrap_or_default();
    let before = freezetrap_cpu_ns(launcher);
    let t0 = std::time::Instant::now();
    beat_for(Duration::from_secs(60));
    let wall = t0.elapsed().as_secs_f64();
    let after = freezetrap_cpu_ns(launcher);
    let h = wd.hiccups();
    // A stall would start a capture (bpftrace on every context switch) and spoil the number.
    let report = std::fs::read_to_string(dir.join("report.jsonl")).unwrap_or_default();
    assert!(
        !report.contains("\"event\":\"stall\"") && !stalls_before.contains("\"event\":\"stall\""),
        "the idle service stalled; the measurement is void:\n{report}"
    );
    let mut total = 0u64;
    let mut parts = Vec::new();
    for (name, ns) in &after {
        let used = ns.saturating_sub(before.get(name).copied().unwrap_or(0));
        total += used;
        parts.push(format!("{name} {:.1} µs/s", used as f64 / 1e3 / wall));
    }
    let pct = 100.0 * total as f64 / 1e9 / wall;
    println!(
        "idle service, all of freezetrap: {:.1} µs per second = {pct:.4}% of one core ({}; budget 0.1%: {}); {}; watchdog hiccups p50 {} µs p99 {} µs max {} µs over {} ticks",
        total as f64 / 1e3 / wall,
        parts.join(", "),
        if pct <= 0.1 { "within" } else { "OVER" },
        if launcher.is_some() { "capture launcher waiting" } else { "no capture helper built (cargo build --release -p freezetrap-capture)" },
        h.p50_us,
        h.p99_us,
        h.max_us,
        h.count
    );
    drop(beats);
    drop(ft);
    let _ = std::fs::remove_dir_all(&dir);
}

fn detection_latency() {
    let dir = std::env::temp_dir().join(format!("freezetrap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("latency.jsonl");
    let _ = std::fs::remove_file(&report);
    let threshold = Duration::from_millis(200);
    let cfg = freezetrap::watchdog::WatchdogConfig::new(threshold);
    let tick = cfg.tick;
    let writer = std::sync::Arc::new(
        freezetrap::alloc_guard::ReportWriter::open(freezetrap::alloc_guard::ReportSink::File(
            report.clone(),
        ))
        .unwrap(),
    );
    let wd = freezetrap::watchdog::Watchdog::start(cfg, writer).unwrap();
    let last_beats = std::thread::Builder::new()
        .name("stalling".into())
        .spawn(|| {
            let hb = freezetrap::Heartbeat::new("stalling");
            let mut last = Vec::new();
            for _ in 0..10 {
                for _ in 0..20 {
                    hb.beat();
                    std::thread::sleep(Duration::from_millis(10));
                }
                hb.beat();
                last.push(base::clock::monotonic_ns());
                std::thread::sleep(Duration::from_millis(500)); // the injected stall
            }
            hb.beat();
            std::thread::sleep(Duration::from_millis(100));
            last
        })
        .unwrap()
        .join()
        .unwrap();
    drop(wd);
    let text = std::fs::read_to_string(&report).unwrap();
    let detected: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| j["event"] == "stall" && j["scope"] == "thread")
        .map(|j| j["detected_ns"].as_u64().unwrap())
        .collect();
    let mut lat: Vec<f64> = last_beats
        .iter()
        .filter_map(|&b| {
            detected
                .iter()
                .find(|&&d| d > b && d < b + 1_000_000_000)
                .map(|&d| (d - b) as f64 / 1e6)
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let target = (threshold + tick).as_secs_f64() * 1e3;
    println!(
        "detection latency over {} injected stalls: min {:.1} ms, median {:.1} ms, max {:.1} ms (target <= threshold + tick = {:.0} ms)",
        lat.len(),
        lat.first().unwrap_or(&f64::NAN),
        lat.get(lat.len() / 2).unwrap_or(&f64::NAN),
        lat.last().unwrap_or(&f64::NAN),
        target
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    heartbeat(&mut c);
    detection_latency();
    idle_service_cost();
    c.final_summary();
}
