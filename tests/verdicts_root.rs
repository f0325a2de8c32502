//! The verdict scenarios that need root: a fork with GiBs resident while other threads mmap
//! (`mmap_lock`, naming the fork), a real-time neighbour on the stalled thread's CPU
//! (`cpu_starvation`), a cgroup CPU quota (`cgroup_throttling`) and a memory cgroup that
//! makes the service reclaim (`reclaim`). Without root each says why it skips (a failure under
//! `FREEZETRAP_REQUIRE_EBPF=1`, which CI sets); where the kernel lacks the facility (no cgroup
//! controller) it says that instead. One scenario at a time.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("FREEZETRAP_REQUIRE_EBPF").as_deref() == Ok("1") {
        panic!("{test} needs root, and FREEZETRAP_REQUIRE_EBPF=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it; the call affects this
    // thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Measures one fork of this process as it is now, in ms.
fn fork_ms() -> f64 {
    let t = Instant::now();
    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    ms
}

#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    let mut keep = Vec::new();
    if role == "fork" {
        // 1.5 GiB resident, then calibrate: the stall threshold is half a fork's length, so
        // the fork's freeze exceeds it on any machine.
        keep = common::resident(1536 << 20);
        let ms = (0..3).map(|_| fork_ms()).fold(f64::MAX, f64::min);
        let stall = format!("{}us", ((ms * 1000.0 / 2.0) as u64).max(3000));
        println!("FORK_MS {ms:.1} STALL {stall}");
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("FREEZETRAP_STALL", &stall) };
    }
    if role == "quota" || role == "reclaim" {
        // Started inside the cgroup the test made (a service starts in its unit's cgroup):
        // the watchdog finds the cgroup at start.
        common::wait_for_go();
    }
    let ft = freezetrap::init_from_env();
    let stop = Arc::new(AtomicBool::new(false));
    match role.as_str() {
        "fork" => {
            let workers = common::heartbeating_mmappers(2, stop.clone());
            common::wait_for_go();
            std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(|| {
                    for _ in 0..3 {
                        fork_ms();
                        std::thread::sleep(Duration::from_millis(400));
                    }
                })
                .unwrap()
                .join()
                .unwrap();
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                w.join().unwrap();
            }
        }
        "rt-neighbour" => {
            let victim = {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("victim".into())
                    .spawn(move || {
                        pin_to(1);
                        let hb = freezetrap::Heartbeat::new("victim");
                        while !stop.load(Ordering::Relaxed) {
                            hb.beat();
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                    .unwrap()
            };
            common::wait_for_go();
            std::thread::sleep(Duration::from_millis(300));
            std::thread::Builder::new()
                .name("rt-hog".into())
                .spawn(|| {
                    pin_to(1);
                    let p = libc::sched_param { sched_priority: 50 };
                    // SAFETY: SCHED_FIFO for this thread, which stops itself below (a
                    // `timeout` on the same CPU would never get to run).
                    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
                    assert_eq!(rc, 0, "SCHED_FIFO: {}", std::io::Error::last_os_error());
                    let until = Instant::now() + Duration::from_millis(700);
                    while Instant::now() < until {
                        std::hint::black_box(0u64);
                    }
                })
                .unwrap()
                .join()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
            victim.join().unwrap();
        }
        "quota" => {
            let hb = freezetrap::Heartbeat::new("busy");
            let until = Instant::now() + Duration::from_millis(2500);
            while Instant::now() < until {
                hb.beat();
                std::hint::black_box((0..1000u64).sum::<u64>());
            }
        }
        "reclaim" => {
            let hb = freezetrap::Heartbeat::new("writer");
            common::beat_for(&hb, 200);
            let path = PathBuf::from(std::env::var("FT_SCRATCH").unwrap()).join("big");
            let mut f = std::fs::File::create(&path).unwrap();
            let chunk = vec![5u8; 1 << 20];
            for _ in 0..768 {
                std::io::Write::write_all(&mut f, &chunk).unwrap();
            }
            common::beat_for(&hb, 300);
            drop(f);
            let _ = std::fs::remove_file(&path);
        }
        other => panic!("unknown role {other}"),
    }
    drop(ft);
    std::hint::black_box(&keep);
}

/// A cgroup made for one scenario, removed on drop: the v1 controller directory or a v2 one.
struct Cgroup(PathBuf);

impl Cgroup {
    /// Makes `/sys/fs/cgroup/<controller>/<name>` (v1) or `/sys/fs/cgroup/<name>` (v2, with
    /// the controller enabled), writing `settings`; `None` when the kernel has no such
    /// controller here.
    fn make(
        controller: &str,
        name: &str,
        v1: &[(&str, &str)],
        v2: &[(&str, &str)],
    ) -> Option<Cgroup> {
        let v1dir = Path::new("/sys/fs/cgroup").join(controller);
        if v1dir.join("tasks").exists() {
            let d = v1dir.join(name);
            let _ = std::fs::create_dir(&d);
            for (k, v) in v1 {
                std::fs::write(d.join(k), v).ok()?;
            }
            return Some(Cgroup(d));
        }
        let root = Path::new("/sys/fs/cgroup");
        let ctrls = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        if !ctrls.split_whitespace().any(|c| c == controller) {
            return None;
        }
        let _ = std::fs::write(
            root.join("cgroup.subtree_control"),
            format!("+{controller}"),
        );
        let d = root.join(name);
        let _ = std::fs::create_dir(&d);
        for (k, v) in v2 {
            std::fs::write(d.join(k), v).ok()?;
        }
        Some(Cgroup(d))
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The service has exited; its cgroup is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_fork_with_gibs_resident_is_mmap_lock_held_by_the_fork() {
    if common::role().is_some()
        || !root_or_skip("a_fork_with_gibs_resident_is_mmap_lock_held_by_the_fork")
    {
        return;
    }
    let _one = serial();
    // The threshold is set by the service after measuring a fork (see the role).
    let s = common::run_scenario("child_service", "fork", "25ms", &[], |_| {});
    let v = s.with_cause("mmap_lock");
    assert!(
        !v.is_empty(),
        "{}\n{}\n{}",
        s.stdout,
        s.verdicts(),
        s.stderr
    );
    // The culprit is the forking thread every time. Its operation is named when its kernel
    // stack could be read: a thread running on a CPU shows none (medium confidence then).
    for m in &v {
        assert_eq!(
            m["verdict"]["culprit"]["thread_name"],
            "snapshot",
            "{}",
            s.verdicts()
        );
        if m["verdict"]["confidence"] == "high" {
            assert_eq!(
                m["verdict"]["culprit"]["what"],
                "fork (dup_mmap)",
                "{}",
                s.verdicts()
            );
        }
    }
}

#[test]
fn a_real_time_neighbour_is_cpu_starvation() {
    if common::role().is_some() || !root_or_skip("a_real_time_neighbour_is_cpu_starvation") {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("SKIPPED a_real_time_neighbour_is_cpu_starvation: needs two CPUs");
        return;
    }
    let _one = serial();
    let s = common::run_scenario("child_service", "rt-neighbour", "150ms", &[], |_| {});
    let v = s.with_cause("cpu_starvation");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert_eq!(v[0]["thread_name"], "victim");
}

#[test]
fn a_cgroup_cpu_quota_is_cgroup_throttling() {
    if common::role().is_some() || !root_or_skip("a_cgroup_cpu_quota_is_cgroup_throttling") {
        return;
    }
    let _one = serial();
    let name = format!("freezetrap-test-quota-{}", std::process::id());
    let Some(cg) = Cgroup::make(
        "cpu",
        &name,
        &[
            ("cpu.cfs_period_us", "1000000"),
            ("cpu.cfs_quota_us", "50000"),
        ],
        &[("cpu.max", "50000 1000000")],
    ) else {
        eprintln!("SKIPPED a_cgroup_cpu_quota_is_cgroup_throttling: this kernel has no cgroup CPU controller here");
        return;
    };
    let s = common::run_scenario("child_service", "quota", "150ms", &[], |pid| cg.add(pid));
    drop(cg);
    let v = s.with_cause("cgroup_throttling");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert!(
        v[0]["verdict"]["text"].as_str().unwrap().contains(&name),
        "names the cgroup: {}",
        s.verdicts()
    );
}

#[test]
fn a_memory_cgroup_smaller_than_the_writes_is_reclaim() {
    if common::role().is_some()
        || !root_or_skip("a_memory_cgroup_smaller_than_the_writes_is_reclaim")
    {
        return;
    }
    let _one = serial();
    let name = format!("freezetrap-test-reclaim-{}", std::process::id());
    let limit = (96u64 << 20).to_string();
    let Some(cg) = Cgroup::make(
        "memory",
        &name,
        &[("memory.limit_in_bytes", &limit)],
        &[("memory.max", &limit)],
    ) else {
        eprintln!("SKIPPED a_memory_cgroup_smaller_than_the_writes_is_reclaim: this kernel has no cgroup memory controller here");
        return;
    };
    let s = common::run_scenario("child_service", "reclaim", "150ms", &[], |pid| cg.add(pid));
    drop(cg);
    let v = s.with_cause("reclaim");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert_eq!(v[0]["thread_name"], "writer");
}
