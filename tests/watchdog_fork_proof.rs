//! The watchdog must keep running while the service forks. `fork()` write-protects every private
//! page of the parent and holds `mmap_lock` for write while it copies page tables (tens of ms per
//! GiB resident); a thread that writes such a page meanwhile page-faults and waits for the fork to
//! end. If the watchdog did, it would wake late with everything else, see a *process* stall with
//! no CPU time used by anyone it can see, and call a fork "stopped" — the wrong cause, with high
//! confidence (seen in the demo before this test existed: the loop kept `now` in a stack slot above
//! the fork-proof part of its stack).
//!
//! The test needs no root and no big memory: after a fork the parent's pages stay
//! write-protected until first written, so every page a thread writes shows up as one minor
//! fault. The watchdog must take none; a control thread writing ordinary memory must take some,
//! which proves the counter sees them.

mod common;

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// Minor faults of thread `tid` of this process (`/proc/self/task/<tid>/stat`, field 10).
fn minflt(tid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(7).unwrap().parse().unwrap()
}

fn tid_named(prefix: &str) -> Option<u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with(prefix)
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
}

fn fork_and_reap() {
    // SAFETY: the child only calls _exit; the parent reaps it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::_exit(0);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}

fn this_tid() -> u64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

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
    // Let the loop settle (its first ticks map what they touch).
    std::thread::sleep(Duration::from_millis(300));
    let watchdog = tid_named("freezetrap-watc").expect("the watchdog thread runs");
    let mut control = vec![1u8; 64 << 10];
    let me = this_tid();
    let (mut wd_faults, mut control_faults) = (0, 0);
    for _ in 0..5 {
        let (wd0, me0) = (minflt(watchdog), minflt(me));
        fork_and_reap();
        // Control: ordinary heap memory, written after the fork, faults once per page.
        for i in (0..control.len()).step_by(4096) {
            control[i] = control[i].wrapping_add(1);
        }
        control_faults += minflt(me) - me0;
        // Ten ticks of the watchdog after the fork.
        std::thread::sleep(Duration::from_millis(100));
        wd_faults += minflt(watchdog) - wd0;
    }
    std::hint::black_box(&control);
    println!("FAULTS watchdog={wd_faults} control={control_faults}");
    drop(ft);
}

#[test]
fn the_watchdog_writes_no_page_a_fork_write_protects() {
    if common::role().is_some() {
        return;
    }
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_STALL", "20ms");
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FAULTS "))
        .unwrap_or_else(|| panic!("no FAULTS line:\n{stdout}\n{stderr}"));
    let count = |key: &str| -> u64 {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    assert!(
        count("control=") >= 5 * 16,
        "the control thread's writes after each fork must fault (else the counter proves nothing): {line}"
    );
    assert_eq!(
        count("watchdog="),
        0,
        "the watchdog wrote a page a fork had write-protected, so a fork with GiBs resident would block it: {line}"
    );
}
