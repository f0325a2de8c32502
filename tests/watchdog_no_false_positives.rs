//! No false positives: a few seconds of normal multi-threaded load — heartbeating workers, big
//! allocations, idle waits marked as idle — produce no stall report.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

#[test]
fn child_service() {
    if common::role().is_none() {
        return;
    }
    let ft = freezetrap::init_from_env();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..3 {
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("busy-{i}"))
                .spawn(move || {
                    let hb = freezetrap::Heartbeat::new(&format!("busy-{i}"));
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        hb.beat();
                        // Big allocations (recorded) and small churn, as a service does.
                        let big: Vec<u8> = vec![1u8; 8 << 20];
                        let small: Vec<String> = (0..200).map(|k| format!("item-{k}")).collect();
                        n += big[n as usize % big.len()] as u64 + small.len() as u64;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    n
                })
                .unwrap(),
        );
    }
    // A thread that waits for work on purpose and says so.
    let stop2 = stop.clone();
    threads.push(
        std::thread::Builder::new()
            .name("idler".into())
            .spawn(move || {
                let hb = freezetrap::Heartbeat::new("idler");
                while !stop2.load(Ordering::Relaxed) {
                    hb.beat();
                    hb.idle();
                    std::thread::sleep(Duration::from_millis(700)); // longer than the threshold
                }
                0
            })
            .unwrap(),
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let h = ft.watchdog().unwrap().hiccups();
    println!(
        "HICCUPS count={} p50={}us p99={}us max={}us",
        h.count, h.p50_us, h.p99_us, h.max_us
    );
    drop(ft);
}

#[test]
fn normal_load_produces_no_stall() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("nofp");
    let report = dir.path().join("report.jsonl");
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_STALL", "500ms")
        .env("FREEZETRAP_ALLOC_THRESHOLD", "4MiB")
        .env("FREEZETRAP_QUIET", "1")
        .env("FREEZETRAP_REPORT", &report);
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines = common::report_lines(&report);
    let allocs = lines.iter().filter(|l| l["event"] == "large_alloc").count();
    assert!(allocs > 100, "the load made big allocations ({allocs})");
    let stalls: Vec<_> = lines.iter().filter(|l| l["event"] == "stall").collect();
    assert!(stalls.is_empty(), "false positives: {stalls:#?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("HICCUPS count="), "{stdout}");
    eprintln!(
        "{}",
        stdout.lines().find(|l| l.starts_with("HICCUPS")).unwrap()
    );
}
