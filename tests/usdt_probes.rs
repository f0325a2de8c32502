//! The USDT probes are real: the ELF notes exist in the binary, and bpftrace attached to this
//! very test binary sees the exact sizes it allocates.

mod common;

use std::process::Command;
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const SIZES: [usize; 3] = [(100 << 20) + 1, (200 << 20) + 3, (48 << 20) + 9];
const REALLOC_FROM: usize = 40 << 20;
const REALLOC_TO: usize = (150 << 20) + 5;

#[test]
fn probe_notes_are_in_the_binary() {
    if common::role().is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("readelf")
        .arg("-n")
        .arg(&exe)
        .output()
        .expect("readelf (binutils) must be installed");
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(
        notes.contains("stapsdt"),
        "no .note.stapsdt section:\n{notes}"
    );
    for probe in freezetrap::probes::PROBE_NAMES {
        if probe == "large_alloc" {
            assert!(
                notes.contains(&format!("Provider: {}", freezetrap::probes::PROVIDER))
                    && notes.contains(&format!("Name: {probe}")),
                "probe {probe} missing:\n{notes}"
            );
        }
    }
    // Five integer arguments, 8 bytes each (`8@...`), per the contract.
    let block = notes.split("Name: large_alloc").nth(1).unwrap();
    let args = block
        .lines()
        .find(|l| l.trim_start().starts_with("Arguments:"))
        .unwrap();
    assert_eq!(args.matches("8@").count(), 5, "{args}");
}

/// The child bpftrace starts: makes the allocations whose sizes the parent expects to see.
#[test]
fn child_allocator() {
    if common::role().as_deref() != Some("usdt") {
        return;
    }
    for s in SIZES {
        let v: Vec<u8> = Vec::with_capacity(s);
        std::hint::black_box(&v);
    }
    let mut v: Vec<u8> = Vec::with_capacity(REALLOC_FROM);
    v.reserve_exact(REALLOC_TO);
    std::hint::black_box(&v);
    let small: Vec<u8> = Vec::with_capacity(1 << 20);
    std::hint::black_box(&small);
    println!("CHILD_TID {}", base::thread::current_tid());
}

#[test]
fn bpftrace_sees_the_exact_sizes_allocated() {
    if common::role().is_some() || !common::ebpf_or_skip("bpftrace_sees_the_exact_sizes_allocated")
    {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let script = format!(
        "usdt:{exe}:freezetrap:large_alloc {{ printf(\"LARGE size=%lu old=%lu addr=%lu dur=%lu tid=%lu\\n\", arg0, arg1, arg2, arg3, arg4); }}"
    );
    let mut cmd = Command::new("bpftrace");
    cmd.arg("-e").arg(&script).arg("-c").arg(format!(
        "{exe} --exact child_allocator --nocapture --test-threads=1"
    ));
    cmd.env(common::ROLE, "usdt")
        .env("FREEZETRAP_ALLOC_THRESHOLD", "32MiB");
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftrace failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<(u64, u64, u64, u64, u64)> = stdout
        .lines()
        .filter_map(|l| l.find("LARGE ").map(|i| &l[i + 6..]))
        .map(|l| {
            let v: Vec<u64> = l
                .split(' ')
                .map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap())
                .collect();
            (v[0], v[1], v[2], v[3], v[4])
        })
        .collect();
    let sizes: Vec<u64> = seen.iter().map(|s| s.0).collect();
    let mut expected: Vec<u64> = SIZES.iter().map(|&s| s as u64).collect();
    expected.push(REALLOC_FROM as u64);
    expected.push(REALLOC_TO as u64);
    assert_eq!(sizes, expected, "bpftrace output:\n{stdout}");
    let realloc = seen.last().unwrap();
    assert_eq!(realloc.1, REALLOC_FROM as u64, "old_size of the realloc");
    let child_tid: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD_TID "))
        .and_then(|t| t.trim().parse().ok())
        .expect("child printed its tid");
    assert!(
        seen.iter().all(|s| s.2 != 0 && s.4 == child_tid),
        "address set, thread id is the child's: {seen:?}"
    );
}
