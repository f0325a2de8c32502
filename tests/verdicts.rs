//! One real scenario per cause class that needs no privilege, each a small service under the
//! public API that makes the cause happen on this machine, asserting the verdict's cause and
//! culprit: a CPU spin (`on_cpu`), a `HashMap` resize (`first_touch`, with the growth hint), a
//! mutex held during a large fill (`lock_wait`), SIGSTOP (`stopped`), a cold file read through
//! mmap (`blocked_io`), a plain sleep (`unknown`, saying so) — and a quiet load with no stall.
//! The scenarios run one at a time: each is a freeze, and two at once would disturb each other.
//! (`tests/verdicts_root.rs` has the ones that need root.)

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// One scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[inline(never)]
fn spin_in_user_code(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut x = 0u64;
    while Instant::now() < until {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
    }
    std::hint::black_box(x)
}

/// Grows a map one insert at a time, as the incident's service did, beating every 4096 inserts.
#[inline(never)]
fn index_documents(hb: &freezetrap::Heartbeat, keys: u64) -> std::collections::HashMap<u64, u64> {
    let mut m = std::collections::HashMap::new();
    for k in 0..keys {
        if k % 4096 == 0 {
            hb.beat();
        }
        m.insert(k, k);
    }
    m
}

#[inline(never)]
fn fill(v: &mut [u8]) {
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
}

#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    let ft = freezetrap::init_from_env();
    let hb = freezetrap::Heartbeat::new(&role);
    common::beat_for(&hb, 200);
    common::wait_for_go();
    match role.as_str() {
        "spin" => {
            common::beat_for(&hb, 100);
            spin_in_user_code(700);
        }
        "resize" => {
            // Past 2^23 x 7/8 keys: the map grows through 68, 136 and 272 MiB tables to a
            // 544 MiB one, each growth a rehash into fresh memory.
            let m = index_documents(&hb, (1 << 24) / 8 * 7 + 1);
            std::hint::black_box(m.len());
        }
        "lock" => {
            let lock = std::sync::Arc::new(Mutex::new(0u64));
            let held = std::sync::Arc::new(std::sync::Barrier::new(2));
            let holder = {
                let (lock, held) = (lock.clone(), held.clone());
                std::thread::Builder::new()
                    .name("loader".into())
                    .spawn(move || {
                        let mut g = lock.lock().unwrap();
                        held.wait();
                        // Zeroed fresh memory is not touched until written: the fill is the
                        // first touch, and it happens with the lock held.
                        let mut big: Vec<u8> = vec![0u8; 768 << 20];
                        fill(&mut big);
                        *g += big[4096] as u64;
                    })
                    .unwrap()
            };
            held.wait();
            common::beat_for(&hb, 20);
            let g = lock.lock().unwrap(); // waits for the loader's whole fill
            std::hint::black_box(*g);
            drop(g);
            holder.join().unwrap();
        }
        "stopped" => {
            // The test stops and continues the whole process meanwhile.
            common::beat_for(&hb, 1500);
        }
        "cold-read" => {
            let path = std::path::Path::new(&std::env::var("FT_SCRATCH").unwrap()).join("cold");
            let len: usize = 256 << 20;
            std::fs::write(&path, vec![7u8; len]).unwrap();
            let f = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: fsync, fadvise and a read-only shared mapping of our own file.
            let p = unsafe {
                libc::fsync(f.as_raw_fd());
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: MADV_RANDOM on our mapping: no read-ahead, one page per fault.
            unsafe { libc::madvise(p, len, libc::MADV_RANDOM) };
            common::beat_for(&hb, 100);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut sum = 0u64;
            for _ in 0..8000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x as usize % (len / 4096)) * 4096;
                // SAFETY: `off` lies within the mapping.
                sum += unsafe { *(p as *const u8).add(off) } as u64;
            }
            std::hint::black_box(sum);
            // SAFETY: unmapping what we mapped.
            unsafe { libc::munmap(p, len) };
        }
        "sleep" => {
            common::beat_for(&hb, 100);
            std::thread::sleep(Duration::from_millis(500));
        }
        "quiet" => {
            // Ordinary work, beating throughout: no stall.
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                hb.beat();
                let v: Vec<u64> = (0..10_000).collect();
                std::hint::black_box(v);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        other => panic!("unknown role {other}"),
    }
    common::beat_for(&hb, 300);
    drop(hb);
    drop(ft);
}

fn run(role: &str, prepare: impl FnOnce(u32)) -> common::Scenario {
    common::run_scenario("child_service", role, "150ms", &[], prepare)
}

#[test]
fn a_cpu_spin_is_on_cpu() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("spin", |_| {});
    let v = s.with_cause("on_cpu");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert_eq!(v[0]["thread_name"], "spin");
    assert_eq!(
        v[0]["verdict"]["culprit"]["thread_name"],
        "spin",
        "{}",
        s.verdicts()
    );
    assert!(s.stderr.contains("ran user code the whole"), "{}", s.stderr);
}

#[test]
fn a_hash_map_resize_is_first_touch_with_the_growth_hint() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("resize", |_| {});
    let v = s.with_cause("first_touch");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    let last = v.last().unwrap();
    assert_eq!(
        last["verdict"]["culprit"]["thread_name"],
        "resize",
        "{}",
        s.verdicts()
    );
    let text = last["verdict"]["text"].as_str().unwrap();
    assert!(
        text.contains("growth at this call site") && text.contains("the next would be"),
        "{text}"
    );
    assert!(text.contains("verdicts::index_documents"), "{text}");
}

#[test]
fn a_mutex_held_during_a_large_fill_is_lock_wait_naming_the_holder() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("lock", |_| {});
    let v = s.with_cause("lock_wait");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert_eq!(
        v[0]["verdict"]["culprit"]["thread_name"],
        "loader",
        "{}",
        s.verdicts()
    );
}

#[test]
fn sigstop_is_stopped() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("stopped", |pid| {
        std::thread::sleep(Duration::from_millis(600));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(600));
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    });
    let v = s.with_cause("stopped");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert_eq!(v[0]["scope"], "process");
    assert_eq!(v[0]["verdict"]["confidence"], "high");
}

#[test]
fn a_cold_file_read_through_mmap_is_blocked_io() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("cold-read", |_| {});
    let v = s.with_cause("blocked_io");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert_eq!(v[0]["thread_name"], "cold-read");
}

#[test]
fn a_plain_sleep_is_unknown_and_says_it_slept() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("sleep", |_| {});
    let v = s.with_cause("unknown");
    assert!(!v.is_empty(), "{}\n{}", s.verdicts(), s.stderr);
    assert!(
        v[0]["verdict"]["text"].as_str().unwrap().contains("asleep"),
        "{}",
        s.verdicts()
    );
    assert_eq!(v[0]["verdict"]["confidence"], "low");
}

#[test]
fn a_quiet_load_has_no_stall_and_no_verdict() {
    if common::role().is_some() {
        return;
    }
    let _one = serial();
    let s = run("quiet", |_| {});
    assert!(s.stalls.is_empty(), "{}", s.verdicts());
    assert!(!s.stderr.contains("stalled"), "{}", s.stderr);
}
