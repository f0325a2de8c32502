//! A real mmap_lock freeze: a process with ~1.5 GiB resident forks while its worker threads
//! mmap. `fork()` holds the lock for write while it copies the page tables; the workers block in
//! the rwsem slow paths. The watchdog must detect the stall from the workers' heartbeats and
//! start the helper *during* the fork — which it can only do because it never forks itself.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const RESIDENT: usize = 1536 << 20;

#[test]
fn child_service() {
    if common::role().as_deref() != Some("forker") {
        return;
    }
    let big = common::resident(RESIDENT);
    let ft = freezetrap::init_from_env();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = common::heartbeating_mmappers(3, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let before = base::clock::monotonic_ns();
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::_exit(0) };
        }
        let after = base::clock::monotonic_ns();
        println!("FORK {before} {after}");
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        std::thread::sleep(Duration::from_millis(400));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(ft);
    std::hint::black_box(&big);
}

#[test]
fn a_fork_of_a_large_process_is_detected_and_the_helper_starts_during_it() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("mmaplock");
    let out_dir = dir.path().join("out");
    let helper = common::write_helper(dir.path(), "helper.sh", "exit 0");
    let mut cmd = common::child("child_service", "forker");
    cmd.env("FREEZETRAP_STALL", "12ms")
        .env("FREEZETRAP_TICK", "1ms")
        .env("FREEZETRAP_CAPTURE", &helper)
        .env("FREEZETRAP_CAPTURE_COOLDOWN", "1ms")
        .env("FREEZETRAP_CAPTURE_DURATION", "1s")
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_REPORT", "report.jsonl");
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    let forks: Vec<(u128, u128)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FORK "))
        .map(|l| {
            let mut it = l.split(' ').map(|v| v.parse::<u128>().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        })
        .collect();
    assert_eq!(forks.len(), 3, "{stdout}");
    eprintln!(
        "fork durations: {:?} ms",
        forks
            .iter()
            .map(|(a, b)| (b - a) / 1_000_000)
            .collect::<Vec<_>>()
    );
    let stalls = common::stalls(&out_dir.join("report.jsonl"));
    let thread_stalls: Vec<_> = stalls.iter().filter(|s| s["scope"] == "thread").collect();
    assert!(
        !thread_stalls.is_empty(),
        "no thread stall detected:\n{stderr}"
    );
    for s in &thread_stalls {
        assert!(
            s["thread_name"].as_str().unwrap().starts_with("mmapper-"),
            "{s:#}"
        );
    }
    // The kernel view shows the mmap_lock waiters: threads in uninterruptible sleep (D) in the
    // functions that take the lock (mmap, munmap, the page-fault path).
    const LOCK_TAKERS: [&str; 4] = [
        "vm_mmap_pgoff",
        "__vm_munmap",
        "lock_mm_and_find_vma",
        "do_user_addr_fault",
    ];
    let waiters: Vec<&serde_json::Value> = thread_stalls
        .iter()
        .flat_map(|s| s["threads"].as_array().unwrap().iter())
        .filter(|t| {
            t["state"] == "D"
                && LOCK_TAKERS.iter().any(|f| {
                    t["wchan"] == *f || t["kernel_stack"].as_array().unwrap().iter().any(|k| k == f)
                })
        })
        .collect();
    assert!(
        !waiters.is_empty(),
        "no thread seen waiting on the mmap_lock:\n{thread_stalls:#?}"
    );
    // Some capture was spawned (posix_spawn returned, so the helper had exec'd: vfork
    // semantics) while a fork was still holding the lock.
    let lines = common::report_lines(&out_dir.join("report.jsonl"));
    let spawned: Vec<u128> = thread_stalls
        .iter()
        .filter_map(|s| s["capture"]["spawned_ns"].as_u64())
        .chain(
            lines
                .iter()
                .filter(|l| l["event"] == "capture")
                .filter_map(|l| l["spawned_ns"].as_u64()),
        )
        .map(u128::from)
        .collect();
    assert!(
        !spawned.is_empty(),
        "the helper was never started:\n{stderr}"
    );
    eprintln!(
        "helper spawns relative to fork start: {:?} ms",
        spawned
            .iter()
            .map(|&t| forks
                .iter()
                .map(|&(a, _)| (t as i128 - a as i128) / 1_000_000)
                .min_by_key(|d| d.abs())
                .unwrap())
            .collect::<Vec<_>>()
    );
    assert!(
        spawned
            .iter()
            .any(|&t| forks.iter().any(|&(a, b)| t >= a && t <= b)),
        "no helper spawn fell inside a fork: spawns {spawned:?}, forks {forks:?}\n{stderr}"
    );
}
