//! The rules on recorded evidence.

use super::*;

const MS: u64 = 1_000_000;

fn thread(tid: u64, name: &str, state: char, wchan: &str, stack: &[&str]) -> ThreadEvidence {
    ThreadEvidence {
        tid,
        name: name.into(),
        state,
        wchan: wchan.into(),
        kernel_stack: stack.iter().map(|s| s.to_string()).collect(),
        delta: Some(Counters::default()),
    }
}

fn stall(st: ThreadEvidence, others: Vec<ThreadEvidence>) -> Evidence {
    Evidence {
        duration_ns: 500 * MS,
        window_ns: 300 * MS,
        stalled: Some(st),
        others,
        ..Default::default()
    }
}

#[test]
fn a_fork_holding_mmap_lock_is_named_with_its_operation() {
    // As this kernel (6.18) shows it: the rwsem slow path is not in the waiter's stack.
    let faulting = thread(
        3,
        "mapper-1",
        'D',
        "lock_mm_and_find_vma",
        &[
            "lock_mm_and_find_vma",
            "exc_page_fault",
            "asm_exc_page_fault",
        ],
    );
    let forker = thread(
        1,
        "snapshot",
        'R',
        "",
        &[
            "copy_page_range",
            "dup_mmap",
            "copy_process",
            "kernel_clone",
        ],
    );
    let v = decide(&stall(faulting, vec![forker]));
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::MmapLock, Confidence::High),
        "{}",
        v.text
    );
    let waiter = thread(
        2,
        "mapper",
        'D',
        "rwsem_down_write_slowpath",
        &["rwsem_down_write_slowpath", "vm_mmap_pgoff"],
    );
    let forker = thread(
        1,
        "snapshot",
        'R',
        "",
        &[
            "copy_pte_range",
            "copy_page_range",
            "dup_mmap",
            "copy_process",
        ],
    );
    let v = decide(&stall(waiter.clone(), vec![forker, waiter]));
    assert_eq!((v.cause, v.confidence), (Cause::MmapLock, Confidence::High));
    assert_eq!(
        v.text,
        "blocked on mmap_lock for 500.0 ms: thread 'snapshot' held it for write in fork (dup_mmap)"
    );
    assert_eq!(v.culprit.unwrap().what, "fork (dup_mmap)");
    // Without root: the wait is seen in wchan, the holder is not.
    let mut blind = thread(2, "mapper", 'D', "rwsem_down_write_slowpath", &[]);
    blind.kernel_stack.clear();
    let v = decide(&stall(blind, vec![thread(1, "snapshot", 'R', "", &[])]));
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::MmapLock, Confidence::Medium)
    );
}

#[test]
fn counters_tell_first_touch_on_cpu_starvation_and_io_apart() {
    let mut t = thread(5, "indexer", 'R', "", &[]);
    t.delta = Some(Counters {
        cpu_ns: 290 * MS,
        stime_ns: 250 * MS,
        utime_ns: 40 * MS,
        minflt: 70_000,
        ..Default::default()
    });
    let mut e = stall(t.clone(), vec![]);
    e.allocations.push(AllocEvidence {
        size: 1 << 30,
        thread_id: 5,
        thread_name: "indexer".into(),
        site: "svc::index (src/index.rs:9)".into(),
        growth: Some("the 5th doubling at this call site".into()),
        ..Default::default()
    });
    let v = decide(&e);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::FirstTouch, Confidence::High),
        "{}",
        v.text
    );
    assert!(
        v.text
            .contains("after its 1.00 GiB allocation at svc::index")
            && v.text.ends_with("the 5th doubling at this call site"),
        "{}",
        v.text
    );

    t.delta = Some(Counters {
        cpu_ns: 299 * MS,
        utime_ns: 290 * MS,
        minflt: 3,
        ..Default::default()
    });
    assert_eq!(decide(&stall(t.clone(), vec![])).cause, Cause::OnCpu);

    t.delta = Some(Counters {
        cpu_ns: 10 * MS,
        run_delay_ns: 280 * MS,
        ..Default::default()
    });
    let v = decide(&stall(t.clone(), vec![]));
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::CpuStarvation, Confidence::High)
    );

    let mut io = thread(
        5,
        "reader",
        'D',
        "folio_wait_bit_common",
        &["folio_wait_bit_common", "filemap_fault"],
    );
    io.delta = Some(Counters {
        majflt: 3000,
        cpu_ns: 20 * MS,
        ..Default::default()
    });
    let v = decide(&stall(io, vec![]));
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::BlockedIo, Confidence::High)
    );
}

#[test]
fn a_futex_wait_names_the_thread_inside_a_large_allocation() {
    let waiter = thread(
        3,
        "api",
        'S',
        "futex_wait_queue",
        &["futex_wait_queue", "futex_wait"],
    );
    let mut holder = thread(4, "loader", 'R', "", &[]);
    holder.delta = Some(Counters {
        cpu_ns: 290 * MS,
        ..Default::default()
    });
    let mut e = stall(waiter.clone(), vec![holder.clone()]);
    e.allocations.push(AllocEvidence {
        size: 1 << 30,
        thread_id: 4,
        thread_name: "loader".into(),
        in_flight: true,
        site: "svc::load".into(),
        ..Default::default()
    });
    let v = decide(&e);
    assert_eq!((v.cause, v.confidence), (Cause::LockWait, Confidence::High));
    assert_eq!(v.culprit.unwrap().thread_name, "loader");
    let v = decide(&stall(waiter, vec![holder]));
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::LockWait, Confidence::Medium)
    );
}

#[test]
fn process_stalls_are_throttling_starvation_or_a_stop() {
    let mut e = Evidence {
        process_scope: true,
        duration_ns: 900 * MS,
        window_ns: 1000 * MS,
        ..Default::default()
    };
    e.process = ProcessEvidence {
        cpu_ns: Some(0),
        watchdog_run_delay_ns: Some(0),
        throttled_ns: Some(880 * MS),
        cgroup: Some("/ft".into()),
        ..Default::default()
    };
    assert_eq!(decide(&e).cause, Cause::CgroupThrottling);
    e.process.throttled_ns = Some(0);
    e.process.watchdog_run_delay_ns = Some(850 * MS);
    assert_eq!(decide(&e).cause, Cause::CpuStarvation);
    e.process.watchdog_run_delay_ns = Some(MS);
    let v = decide(&e);
    assert_eq!((v.cause, v.confidence), (Cause::Stopped, Confidence::High));
    e.process.cpu_ns = Some(700 * MS);
    assert_eq!(decide(&e).cause, Cause::Unknown);
    e.process.cpu_ns = None;
    e.unreadable.push("cpu.stat".into());
    let v = decide(&e);
    assert_eq!(v.cause, Cause::Unknown);
    assert!(v.evidence.contains(&"unreadable: cpu.stat".to_string()));
}

#[test]
fn a_plain_sleep_is_unknown_and_says_so() {
    let v = decide(&stall(
        thread(
            6,
            "shard-3",
            'S',
            "hrtimer_nanosleep",
            &["hrtimer_nanosleep", "do_nanosleep"],
        ),
        vec![],
    ));
    assert_eq!((v.cause, v.confidence), (Cause::Unknown, Confidence::Low));
    assert!(
        v.text
            .contains("asleep (state S in hrtimer_nanosleep, on CPU 0%"),
        "{}",
        v.text
    );
}

#[test]
fn on_cpu_says_whether_it_rehashed_a_fresh_allocation_or_sat_in_system_calls() {
    // Mostly user time with faults, right after an allocation on the same thread: a rehash.
    let mut t = thread(5, "indexer", 'R', "", &[]);
    t.delta = Some(Counters {
        cpu_ns: 290 * MS,
        utime_ns: 230 * MS,
        stime_ns: 60 * MS,
        minflt: 3_700,
        ..Default::default()
    });
    let mut e = stall(t.clone(), vec![]);
    e.allocations.push(AllocEvidence {
        size: 272 << 20,
        thread_id: 5,
        thread_name: "indexer".into(),
        began_in_stall: true,
        site: "svc::index".into(),
        ..Default::default()
    });
    let v = decide(&e);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::FirstTouch, Confidence::Medium),
        "{}",
        v.text
    );
    assert!(
        v.text
            .contains("filling or rehashing its 272.00 MiB allocation at svc::index"),
        "{}",
        v.text
    );
    // The same counters with the allocation made long before the stall: its own work.
    e.allocations[0].began_in_stall = false;
    assert_eq!(decide(&e).cause, Cause::OnCpu);
    // On CPU, nearly all of it system time, no faults: a big system call, said as such (never
    // "ran user code"), and not with high confidence.
    t.delta = Some(Counters {
        cpu_ns: 295 * MS,
        utime_ns: 5 * MS,
        stime_ns: 290 * MS,
        ..Default::default()
    });
    let v = decide(&stall(t, vec![]));
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::OnCpu, Confidence::Medium),
        "{}",
        v.text
    );
    assert!(
        v.text.contains("in the kernel") && !v.text.contains("user code"),
        "{}",
        v.text
    );
}

#[test]
fn a_writer_that_mostly_waited_while_its_cgroup_reclaimed_is_reclaim_but_a_sleeper_is_not() {
    // Recorded in a 96 MiB memory cgroup: state R at detection, on CPU 28% of the window, PSI
    // memory at 15% of it (under the quarter the stronger rule wants).
    let mut writer = thread(7, "writer", 'R', "", &[]);
    writer.delta = Some(Counters {
        cpu_ns: 84 * MS,
        stime_ns: 78 * MS,
        ..Counters::default()
    });
    let mut e = stall(writer, vec![]);
    e.process.psi_memory_us = Some(45_000);
    let v = decide(&e);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::Reclaim, Confidence::Low),
        "{}",
        v.text
    );
    assert!(v.text.contains("under memory pressure"), "{}", v.text);

    // The same pressure around a thread asleep in nanosleep says nothing about that thread.
    let mut e = stall(
        thread(
            8,
            "sleeper",
            'S',
            "hrtimer_nanosleep",
            &["hrtimer_nanosleep"],
        ),
        vec![],
    );
    e.process.psi_memory_us = Some(45_000);
    assert_eq!(decide(&e).cause, Cause::Unknown);

    // Recorded too: the same writer on CPU half the window, nearly all of it in the kernel
    // (reclaiming for its own writes), PSI memory at a fifth of the window.
    let mut busy = thread(10, "writer", 'R', "", &[]);
    busy.delta = Some(Counters {
        cpu_ns: 150 * MS,
        stime_ns: 145 * MS,
        ..Counters::default()
    });
    let mut e = stall(busy, vec![]);
    e.process.psi_memory_us = Some(60_000);
    let v = decide(&e);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::Reclaim, Confidence::Low),
        "{}",
        v.text
    );

    // On CPU in the kernel the whole window under the same pressure: a large system call.
    let mut syscall = thread(11, "writer", 'R', "", &[]);
    syscall.delta = Some(Counters {
        cpu_ns: 290 * MS,
        stime_ns: 280 * MS,
        ..Counters::default()
    });
    let mut e = stall(syscall, vec![]);
    e.process.psi_memory_us = Some(60_000);
    assert_eq!(decide(&e).cause, Cause::OnCpu);

    // Under an eighth of the window: not enough to name memory.
    let mut quiet = thread(9, "writer", 'R', "", &[]);
    quiet.delta = Some(Counters {
        cpu_ns: 84 * MS,
        ..Counters::default()
    });
    let mut e = stall(quiet, vec![]);
    e.process.psi_memory_us = Some(30_000);
    assert_ne!(decide(&e).cause, Cause::Reclaim);
}
