//! A whole-process freeze (SIGSTOP for ~500 ms, then SIGCONT) is reported as a process stall of
//! about that length.

mod common;

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

#[test]
fn child_service() {
    if common::role().as_deref() != Some("service") {
        return;
    }
    let ft = freezetrap::init_from_env();
    assert!(
        ft.watchdog().is_some(),
        "FREEZETRAP_STALL starts the watchdog"
    );
    println!("READY");
    std::thread::sleep(Duration::from_millis(2500));
    let h = ft.watchdog().unwrap().hiccups();
    println!(
        "HICCUPS count={} p50={} p99={} max={}",
        h.count, h.p50_us, h.p99_us, h.max_us
    );
    drop(ft);
}

#[test]
fn sigstop_for_half_a_second_is_a_process_stall_of_that_length() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("procstall");
    let report = dir.path().join("report.jsonl");
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_REPORT", &report);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let pid = child.id() as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let stop_len = stopped.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stalls = common::stalls(&report);
    assert_eq!(stalls.len(), 1, "exactly one stall:\n{stalls:#?}\n{stderr}");
    let s = &stalls[0];
    assert_eq!(s["scope"], "process");
    assert_eq!(s["thread_id"], 0);
    let d = s["duration_ns"].as_u64().unwrap();
    // The watchdog's lateness is the stop length minus up to one tick (100 ms at 200 ms).
    assert!(
        d + 110_000_000 >= stop_len.as_nanos() as u64
            && d <= stop_len.as_nanos() as u64 + 200_000_000,
        "stall of {d} ns for a stop of {stop_len:?}"
    );
    assert!(s["threads"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "freezetrap-watc"));
    assert!(
        stderr.contains("freezetrap: the whole process stalled"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("HICCUPS count="), "{stdout}");
}
