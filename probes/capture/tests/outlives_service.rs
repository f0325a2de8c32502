//! A capture in progress outlives the service: the service stalls, its watchdog starts the real
//! `freezetrap-capture` for 10 s, and 1-2 s later the service exits normally — or is killed
//! with SIGKILL. In both cases the capture directory gets `summary.json` (saying the target
//! exited), the folded stacks and the flame graph, with the service's own functions named even
//! though bpftrace printed only after the service was gone.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: alloc_guard::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    alloc_guard::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const HELPER: &str = env!("CARGO_BIN_EXE_freezetrap-capture");

/// A function of the service's own that sleeps often: its frames are in the off-CPU stacks.
#[inline(never)]
fn napping_worker_of_the_service(hb: &watchdog::Heartbeat, turns: u32) {
    for _ in 0..turns {
        hb.beat();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn child_service() {
    if std::env::var("FREEZETRAP_TEST_ROLE").as_deref() != Ok("service") {
        return;
    }
    let settings = alloc_guard::EnvSettings::from_env();
    let cfg = watchdog::WatchdogConfig::from_env(settings.out_dir.as_deref()).unwrap();
    let wd = watchdog::Watchdog::start_logged(cfg, settings.open_writer()).unwrap();
    let hb = watchdog::Heartbeat::new("worker");
    napping_worker_of_the_service(&hb, 40);
    std::thread::sleep(Duration::from_millis(400)); // the stall
    println!("STALLED");
    // Keep running (and napping) while the capture records, then exit: normally, or killed
    // by the test meanwhile.
    napping_worker_of_the_service(&hb, 250);
    drop(hb);
    drop(wd);
    println!("SERVICE_EXITING");
}

fn run(kill: bool) {
    let me = std::process::id();
    let base = std::env::temp_dir().join(format!("ft-outlives-{me}-{kill}"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let out = base.join("out");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_service",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env("FREEZETRAP_TEST_ROLE", "service")
        .env("FREEZETRAP_STALL", "150ms")
        .env("FREEZETRAP_OUT", &out)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .env("FREEZETRAP_CAPTURE", HELPER)
        .env("FREEZETRAP_CAPTURE_DURATION", "10s")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    if kill {
        // About 1.5 s into the capture.
        std::thread::sleep(Duration::from_millis(2200));
        child.kill().unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    if !kill {
        assert!(o.status.success(), "{stderr}");
    }
    let dir = capture_dir(&out).unwrap_or_else(|| panic!("no capture directory:\n{stderr}"));
    // The helper goes on without its service; its summary appears well before its 10 s.
    let summary =
        wait_for(&dir.join("summary.json"), Duration::from_secs(25)).unwrap_or_else(|| {
            panic!(
                "no summary.json after {:?}; helper.log:\n{}\nservice:\n{stderr}",
                started.elapsed(),
                std::fs::read_to_string(dir.join("helper.log")).unwrap_or_default()
            )
        });
    let log = std::fs::read_to_string(dir.join("helper.log")).unwrap_or_default();
    let s: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let exited = s["target_exited_after_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("{s:#}\n{log}"));
    assert!(
        exited < 8.0,
        "the recording ended when the target did: {exited}"
    );
    for f in ["offcpu.folded", "oncpu.folded", "offcpu.svg"] {
        assert!(dir.join(f).is_file(), "{f} missing\n{log}");
    }
    common::assert_svg(&dir.join("offcpu.svg"));
    let folded = std::fs::read_to_string(dir.join("offcpu.folded")).unwrap();
    assert!(
        folded.contains("outlives_service::napping_worker_of_the_service"),
        "the service's frames are named although it had exited:\n{folded}"
    );
    assert!(log.contains("exited after"), "{log}");
    let _ = std::fs::remove_dir_all(&base);
}

fn capture_dir(out: &Path) -> Option<PathBuf> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Some(d) = std::fs::read_dir(out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir())
        {
            return Some(d);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn wait_for(file: &Path, limit: Duration) -> Option<String> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Ok(s) = std::fs::read_to_string(file) {
            if !s.is_empty() {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_capture_outlives_a_service_that_exits() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !common::ebpf_or_skip("a_capture_outlives_a_service_that_exits")
    {
        return;
    }
    run(false);
}

#[test]
fn a_capture_outlives_a_service_killed_with_sigkill() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !common::ebpf_or_skip("a_capture_outlives_a_service_killed_with_sigkill")
    {
        return;
    }
    run(true);
}
