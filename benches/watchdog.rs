//! The watchdog's costs and detection latency.
//!
//! - `heartbeat/beat` (criterion): the cost of `Heartbeat::beat` on the beating thread.
//! - Then, printed: the watchdog thread's CPU use at the default tick (threshold 200 ms, so a
//!   50 ms tick) with 16 registered heartbeats, over 20 s, from its per-thread CPU clock; and the
//!   detection latency of 10 injected 500 ms heartbeat stalls (detection time minus the last
//!   beat), against the target `threshold + tick`.
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

fn cpu_cost() {
    let threshold = Duration::from_millis(200);
    let cfg = freezetrap::watchdog::WatchdogConfig::new(threshold);
    let tick = cfg.tick;
    let wd = freezetrap::watchdog::Watchdog::start(
        cfg,
        std::sync::Arc::new(freezetrap::alloc_guard::ReportWriter::off()),
    )
    .unwrap();
    let beats: Vec<_> = (0..16)
        .map(|i| freezetrap::Heartbeat::new(&format!("hb-{i}")))
        .collect();
    std::thread::sleep(Duration::from_secs(1)); // past start-up work (prefaulting, dry run)
    let cpu0 = wd.cpu_time().unwrap();
    let wall = Duration::from_secs(20);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < wall {
        for b in &beats {
            b.beat();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = wd.cpu_time().unwrap() - cpu0;
    let h = wd.hiccups();
    println!(
        "watchdog CPU: {:.1} µs per second of wall time = {:.4}% of one core (tick {:?}, 16 heartbeats, {:?} measured); hiccups p50 {} µs p99 {} µs max {} µs over {} ticks",
        cpu.as_secs_f64() * 1e6 / t0.elapsed().as_secs_f64(),
        100.0 * cpu.as_secs_f64() / t0.elapsed().as_secs_f64(),
        tick,
        wall,
        h.p50_us,
        h.p99_us,
        h.max_us,
        h.count
    );
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
    cpu_cost();
    detection_latency();
    c.final_summary();
}
