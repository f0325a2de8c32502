//! Dropping the handle returns once everything recorded before it is reported — a stall still
//! open, an oversized allocation made just before — and does not wait for threads with nothing
//! left to do; those exit on their own a moment later.

mod common;

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// The names of this process's freezetrap threads.
fn freezetrap_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("freezetrap-"))
        .collect()
}

#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    let ft = freezetrap::init_from_env();
    match role.as_str() {
        "open-stall" => {
            let hb = freezetrap::Heartbeat::new("stuck-7");
            for _ in 0..20 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            // Silent for 3x the threshold: the stall is detected, and still open at the drop.
            std::thread::sleep(Duration::from_millis(600));
            drop(ft);
            drop(hb);
        }
        "alloc-then-drop" => {
            let v: Vec<u8> = Vec::with_capacity(64 << 20);
            std::hint::black_box(&v);
            drop(ft); // at once: the reporter has not written it yet, the drop must wait
        }
        "threads-exit" => {
            std::thread::sleep(Duration::from_millis(300)); // set up, asleep between ticks
            assert!(!freezetrap_threads().is_empty(), "freezetrap's threads run");
            for e in std::fs::read_dir("/proc/self/task").unwrap() {
                let path = e.unwrap().path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let tid: libc::pid_t = path.file_name().unwrap().to_str().unwrap().parse().unwrap();
                // SAFETY: querying a thread's scheduling policy.
                let policy = unsafe { libc::sched_getscheduler(tid) };
                println!("POLICY {} {policy}", comm.trim());
            }
            drop(ft);
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                let left = freezetrap_threads();
                if left.is_empty() {
                    println!("GONE");
                    break;
                }
                if Instant::now() > until {
                    println!("LEFT {left:?}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn run(role: &str, dir: &common::TempDir) -> (std::path::PathBuf, String) {
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = common::child("child_service", role)
        .env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_ALLOC_THRESHOLD", "32MiB")
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out_dir.join("report.jsonl"), stdout)
}

#[test]
fn a_stall_still_open_is_reported_before_the_drop_returns() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("drop-open-stall");
    let (report, _) = run("open-stall", &dir);
    let stalls = common::stalls(&report);
    assert!(
        stalls.iter().any(|s| s["thread_name"] == "stuck-7"),
        "the open stall is in the report:\n{stalls:#?}"
    );
}

#[test]
fn an_allocation_just_before_the_drop_is_reported_before_it_returns() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("drop-alloc");
    let (report, _) = run("alloc-then-drop", &dir);
    let lines = common::report_lines(&report);
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "large_alloc" && l["size"] == 64u64 << 20),
        "the 64 MiB allocation is in the report:\n{lines:#?}"
    );
}

#[test]
fn the_threads_exit_on_their_own_after_the_drop() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("drop-threads");
    let (_, stdout) = run("threads-exit", &dir);
    assert!(stdout.contains("GONE"), "{stdout}");
    // The reporting threads never preempt the service (`base::thread::make_batch`); the
    // watchdog thread, whose wake-ups measure lateness, is an ordinary thread while it runs.
    for (thread, policy) in [
        ("freezetrap-repo", libc::SCHED_BATCH),
        ("freezetrap-stal", libc::SCHED_BATCH),
        ("freezetrap-watc", libc::SCHED_OTHER),
    ] {
        assert!(
            stdout.contains(&format!("POLICY {thread} {policy}\n")),
            "{thread} should have policy {policy}:\n{stdout}"
        );
    }
}
