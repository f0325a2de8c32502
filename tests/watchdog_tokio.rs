//! A Tokio runtime heartbeated by `watchdog::tokio::spawn_heartbeat` is reported as stalled
//! while a blocking call holds its only worker, and not otherwise.

mod common;

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    let ft = freezetrap::init_from_env();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let hb = freezetrap::watchdog::tokio::spawn_heartbeat(
        rt.handle(),
        "tokio-runtime",
        Duration::from_millis(10),
    );
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if role == "blocking" {
            std::thread::sleep(Duration::from_millis(700)); // blocks the runtime's only worker
        } else {
            tokio::time::sleep(Duration::from_millis(700)).await; // yields: the runtime stays live
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    drop(hb);
    drop(rt);
    drop(ft);
}

fn stalls(role: &str) -> Vec<serde_json::Value> {
    let dir = common::TempDir::new(role);
    let report = dir.path().join("r.jsonl");
    let mut cmd = common::child("child_service", role);
    cmd.env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_REPORT", &report);
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::stalls(&report)
}

#[test]
fn a_blocked_runtime_is_reported_and_a_yielding_one_is_not() {
    if common::role().is_some() {
        return;
    }
    let s = stalls("blocking");
    assert_eq!(s.len(), 1, "{s:#?}");
    assert_eq!(s[0]["thread_name"], "tokio-runtime");
    let d = s[0]["duration_ns"].as_u64().unwrap();
    assert!((600_000_000..1_200_000_000).contains(&d), "{d}");
    assert!(stalls("yielding").is_empty());
}
