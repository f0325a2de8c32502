//! The capture launcher is forked as soon as the watchdog starts, while the service is still
//! small: a fork copies the page tables under `mmap_lock`, so forking a service that has grown
//! freezes it (deferred by 50 ms, the launcher was forked after the demo had filled a 2 GiB
//! cache, and froze it for 60-80 ms).

mod common;

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// A process's resident memory in KiB (its `VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn child_service() {
    if common::role().is_none() {
        return;
    }
    let ft = freezetrap::init_from_env();
    // Grow at once, as a service filling a cache at start does: 512 MiB, every page touched
    // (~200 ms of page faults here; a launcher forked 50 ms in held ~126 MiB of it, one forked
    // at once ~2.5 MiB).
    let mut cache = vec![0u8; 512 << 20];
    for i in (0..cache.len()).step_by(4096) {
        cache[i] = 1;
    }
    std::hint::black_box(&cache);
    let until = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        if let Some(p) = ft.watchdog().and_then(|w| w.capture_launcher_pid()) {
            break p;
        }
        assert!(Instant::now() < until, "no launcher within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    // A forked child shares the pages its parent had then: they count in its VmRSS.
    println!("LAUNCHER_RSS_KIB {}", rss_kib(pid));
    drop(ft);
}

#[test]
fn the_launcher_is_forked_before_the_service_grows() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("launcher-start");
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let helper = common::write_helper(dir.path(), "helper.sh", "exit 0");
    let out = common::child("child_service", "service")
        .env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_CAPTURE", &helper)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LAUNCHER_RSS_KIB "))
        .unwrap_or_else(|| panic!("no launcher RSS in:\n{stdout}"))
        .parse()
        .unwrap();
    assert!(
        kib < 32 << 10,
        "the launcher holds {kib} KiB of the service's 512 MiB cache: it was forked after the service grew"
    );
}
