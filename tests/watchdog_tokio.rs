//! A Tokio runtime heartbeated by `watchdog::tokio::spawn_heartbeat` is reported as stalled
//! while a blocking call holds its only worker, and not otherwise. With per-worker heartbeats
//! (`watchdog::tokio::worker_heartbeats`, `--cfg tokio_unstable`), one blocked worker of a
//! multi-thread runtime is a stall of that worker's thread, while a busy worker, parked workers
//! and `spawn_blocking` work are not.

mod common;

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// `workers` workers: one task blocks its worker for 600 ms with `std::thread::sleep` (after
/// saying its thread id), `workers / 2` tasks keep other workers busy with short polls,
/// `spawn_blocking` sleeps 600 ms on the blocking pool, and the workers park in between.
#[cfg(tokio_unstable)]
fn per_worker_service(workers: usize) {
    let ft = freezetrap::init_from_env();
    let rt = freezetrap::watchdog::tokio::worker_heartbeats(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_time(),
        "rt",
    )
    .build()
    .unwrap();
    rt.block_on(async move {
        // Parked workers for a while: no stall.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let busy: Vec<_> = (0..workers / 2)
            .map(|_| {
                tokio::spawn(async {
                    let t0 = std::time::Instant::now();
                    let mut polls = 0u64;
                    while t0.elapsed() < Duration::from_millis(1500) {
                        tokio::task::yield_now().await; // thousands of short polls
                        polls += 1;
                    }
                    polls
                })
            })
            .collect();
        let blocking_pool = tokio::task::spawn_blocking(|| {
            std::thread::sleep(Duration::from_millis(600)); // long on purpose, off the workers
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let blocker = tokio::spawn(async {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            println!("BLOCKED_TID {tid}");
            std::thread::sleep(Duration::from_millis(600)); // blocks this worker
        });
        blocker.await.unwrap();
        blocking_pool.await.unwrap();
        let mut polls = u64::MAX;
        for b in busy {
            polls = polls.min(b.await.unwrap());
        }
        println!("BUSY_POLLS {polls}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    });
    drop(rt);
    drop(ft);
}

#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    #[cfg(tokio_unstable)]
    if let Some(n) = role.strip_prefix("per-worker-") {
        per_worker_service(n.parse().unwrap());
        return;
    }
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

#[cfg(tokio_unstable)]
fn per_worker_run(workers: usize) {
    let role = format!("per-worker-{workers}");
    let dir = common::TempDir::new(&role);
    let report = dir.path().join("r.jsonl");
    let mut cmd = common::child("child_service", &role);
    cmd.env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_REPORT", &report);
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let value = |key: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} line:\n{stdout}"))
    };
    let blocked = value("BLOCKED_TID ");
    assert!(
        value("BUSY_POLLS ") > 1000,
        "the busy workers polled many short tasks"
    );
    let s = common::stalls(&report);
    assert_eq!(
        s.len(),
        1,
        "{workers} workers: exactly one stall, the blocked worker's (busy, parked and blocking-pool threads none):\n{s:#?}\n{stderr}"
    );
    assert_eq!(s[0]["scope"], "thread");
    assert_eq!(
        s[0]["thread_id"], blocked,
        "the stalled thread is the blocked worker"
    );
    assert!(
        s[0]["thread_name"]
            .as_str()
            .unwrap()
            .starts_with("rt worker "),
        "{}",
        s[0]["thread_name"]
    );
    let d = s[0]["duration_ns"].as_u64().unwrap();
    assert!((500_000_000..1_200_000_000).contains(&d), "{d}");
}

#[cfg(tokio_unstable)]
#[test]
fn one_blocked_worker_of_a_multi_thread_runtime_is_a_stall_of_that_worker() {
    if common::role().is_some() {
        return;
    }
    per_worker_run(2);
    per_worker_run(4);
}
