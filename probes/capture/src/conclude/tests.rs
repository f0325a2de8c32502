//! The capture's rules on map text as bpftrace prints it (`tid,comm,kstack,ustack` keys).

use super::*;

/// A key: kernel frames and user frames innermost first, as bpftrace prints them.
fn key(tid: u64, comm: &str, kernel: &[&str], user: &[&str]) -> String {
    let mut k = format!("{tid},{comm},");
    if !kernel.is_empty() {
        k.push('\n');
        for f in kernel {
            k.push_str(&format!("    {f}+1\n"));
        }
    }
    k.push(',');
    if !user.is_empty() {
        k.push('\n');
        for f in user {
            k.push_str(&format!("\t5600 {f}+0 (/bin/app)\n"));
        }
    }
    k
}

#[derive(Default)]
struct Recorded(Maps);

impl Recorded {
    fn add(mut self, map: &str, key: String, v: u64) -> Self {
        *self
            .0
            .entry(map.into())
            .or_default()
            .entry(key)
            .or_insert(0) += v;
        self
    }
    fn on(self, tid: u64, comm: &str, kernel: &[&str], user: &[&str], samples: u64) -> Self {
        self.add("@on", key(tid, comm, kernel, user), samples)
    }
    fn off(self, tid: u64, comm: &str, kernel: &[&str], user: &[&str], us: u64) -> Self {
        self.add("@off", key(tid, comm, kernel, user), us)
    }
    fn runq(self, tid: u64, comm: &str, us: u64) -> Self {
        self.add("@runq", format!("{tid},{comm}"), us)
    }
    fn lock_wait(self, tid: u64, comm: &str, us: u64) -> Self {
        self.add("@lock_wait_max_us", format!("{tid},{comm}"), us)
    }
    fn hold(self, tid: u64, comm: &str, kernel: &[&str], us: u64) -> Self {
        self.add(
            "@write_hold_us",
            format!(
                "{tid},{comm},\n{}",
                kernel
                    .iter()
                    .map(|f| format!("    {f}+1\n"))
                    .collect::<String>()
            ),
            us,
        )
    }
    fn verdict(&self, tid: Option<u64>, window_ms: u64) -> Verdict {
        verdict(&StallWindow {
            tid,
            maps: &self.0,
            us: window_ms * 1000,
        })
    }
}

const SCHED: [&str; 2] = ["__schedule", "schedule"];

fn with_sched<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    SCHED.iter().copied().chain(rest.iter().copied()).collect()
}

const FORK: [&str; 5] = [
    "mmap_lock_do_trace_released",
    "up_write",
    "dup_mmap",
    "copy_process",
    "kernel_clone",
];

#[test]
fn a_waiter_on_mmap_lock_names_the_holder_and_its_operation() {
    let r = Recorded::default()
        .hold(100, "snapshot", &FORK, 61_000)
        .lock_wait(101, "worker", 60_000)
        .off(
            101,
            "worker",
            &with_sched(&[
                "rwsem_down_read_slowpath",
                "lock_mm_and_find_vma",
                "do_user_addr_fault",
            ]),
            &["app::work"],
            60_000,
        );
    let v = r.verdict(Some(101), 100);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::MmapLock, Confidence::High),
        "{v:?}"
    );
    let c = v.culprit.as_ref().unwrap();
    assert_eq!(
        (c.thread_id, c.thread_name.as_str(), c.what.as_str()),
        (100, "snapshot", "fork (dup_mmap)")
    );
    assert_eq!(
        v.text,
        "blocked on mmap_lock for 60.0 ms: thread 'snapshot' held it for write 61.0 ms in fork (dup_mmap)"
    );
    // The whole process: the same holder, from the waiters.
    let v = r.verdict(None, 100);
    assert_eq!(v.cause, Cause::MmapLock);
    assert_eq!(v.culprit.unwrap().thread_id, 100);
    // The holder itself stalled.
    let v = r.verdict(Some(100), 100);
    assert_eq!(v.cause, Cause::MmapLock);
    assert!(
        v.text.starts_with(
            "thread 'snapshot' held mmap_lock for write 61.0 ms in fork (dup_mmap); 1 thread(s)"
        ),
        "{}",
        v.text
    );
}

#[test]
fn page_faults_on_cpu_are_first_touch_named_by_the_telling_user_frames() {
    let fault = [
        "clear_page_erms",
        "do_anonymous_page",
        "handle_mm_fault",
        "do_user_addr_fault",
        "exc_page_fault",
        "asm_exc_page_fault",
    ];
    let user = [
        "__memset_avx2_unaligned_erms",
        "hashbrown::raw::RawTable<T>::reserve_rehash",
        "demo::fill",
        "main",
    ];
    let r = Recorded::default()
        .on(7, "main", &fault, &user, 70)
        .on(7, "main", &[], &["demo::fill", "main"], 20)
        .on(8, "freezetrap-watc", &[], &["x"], 1);
    let v = r.verdict(Some(7), 1000);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::FirstTouch, Confidence::High),
        "{v:?}"
    );
    let c = v.culprit.unwrap();
    assert_eq!(c.thread_id, 7);
    assert_eq!(c.what, "faulting in fresh pages in hashbrown::raw::RawTable<T>::reserve_rehash <- demo::fill <- main");
    assert!(v.text.contains("77% of its samples"), "{}", v.text);
    let st = stalled_thread(&StallWindow {
        tid: Some(7),
        maps: &r.0,
        us: 1_000_000,
    })
    .unwrap();
    assert_eq!(
        (st.name.as_str(), st.oncpu_us, st.offcpu_us),
        ("main", 90 * US_PER_SAMPLE, 0)
    );
    assert_eq!(st.top_oncpu.len(), 2);
    assert!(
        st.top_oncpu[0].stack.starts_with("main;main;demo::fill;"),
        "{:?}",
        st.top_oncpu
    );
}

#[test]
fn user_code_on_cpu_the_whole_time_is_on_cpu() {
    let r = Recorded::default()
        .on(
            9,
            "spinner",
            &[],
            &["app::spin::busy", "app::spin", "main"],
            95,
        )
        .on(9, "spinner", &["exc_page_fault"], &["app::spin::busy"], 2);
    let v = r.verdict(Some(9), 1000);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::OnCpu, Confidence::High),
        "{v:?}"
    );
    assert_eq!(
        v.culprit.unwrap().what,
        "running app::spin::busy <- app::spin <- main"
    );
    // Half the window unaccounted for: on CPU still, but less sure.
    let v = r.verdict(Some(9), 3000);
    assert_eq!((v.cause, v.confidence), (Cause::OnCpu, Confidence::Medium));
}

#[test]
fn waiting_runnable_is_cpu_starvation() {
    let r = Recorded::default()
        .runq(5, "worker", 700_000)
        .on(5, "worker", &[], &["f"], 10);
    let v = r.verdict(Some(5), 1000);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::CpuStarvation, Confidence::High),
        "{v:?}"
    );
    assert!(v.text.contains("waited 700.0 ms runnable"), "{}", v.text);
}

#[test]
fn a_futex_wait_is_lock_wait_with_the_busiest_other_thread_as_the_likely_holder() {
    let r = Recorded::default()
        .off(
            5,
            "worker",
            &with_sched(&["futex_wait_queue", "futex_wait", "do_futex"]),
            &["std::sync::Mutex::lock", "app::handle"],
            900_000,
        )
        .on(6, "loader", &["exc_page_fault"], &["app::load"], 10)
        .on(6, "loader", &[], &["app::load"], 70)
        .on(8, "freezetrap-watc", &[], &["watch"], 99);
    let v = r.verdict(Some(5), 1000);
    assert_eq!(
        (v.cause, v.confidence),
        (Cause::LockWait, Confidence::Medium),
        "{v:?}"
    );
    let c = v.culprit.as_ref().unwrap();
    assert_eq!(
        (c.thread_id, c.thread_name.as_str()),
        (6, "loader"),
        "freezetrap's own thread is never the culprit"
    );
    assert!(
        v.text.contains("waiting on a lock (futex)") && v.text.contains("'loader'"),
        "{}",
        v.text
    );
}

#[test]
fn blocking_stacks_say_stopped_io_reclaim_or_mmap_lock() {
    let case = |kernel: &[&str]| {
        Recorded::default()
            .off(5, "w", &with_sched(kernel), &["f"], 800_000)
            .verdict(Some(5), 1000)
    };
    assert_eq!(
        case(&["do_signal_stop", "get_signal"]).cause,
        Cause::Stopped
    );
    let io = case(&[
        "io_schedule",
        "folio_wait_bit_common",
        "filemap_fault",
        "__do_fault",
    ]);
    assert_eq!(
        (io.cause, io.confidence),
        (Cause::BlockedIo, Confidence::High)
    );
    assert!(
        io.text
            .contains("in folio_wait_bit_common <- filemap_fault <- __do_fault"),
        "{}",
        io.text
    );
    assert_eq!(
        case(&[
            "shrink_folio_list",
            "try_to_free_pages",
            "__alloc_pages_slowpath"
        ])
        .cause,
        Cause::Reclaim
    );
    let mm = case(&[
        "rwsem_down_write_slowpath",
        "down_write_killable",
        "vm_mmap_pgoff",
    ]);
    assert_eq!(
        (mm.cause, mm.confidence),
        (Cause::MmapLock, Confidence::Medium),
        "no holder seen"
    );
    assert_eq!(case(&["pipe_read"]).cause, Cause::Unknown);
}

#[test]
fn sleeping_or_missing_threads_are_unknown_and_said_so() {
    let r = Recorded::default().off(
        5,
        "w",
        &with_sched(&["do_nanosleep", "hrtimer_nanosleep"]),
        &["sleep"],
        900_000,
    );
    let v = r.verdict(Some(5), 1000);
    assert_eq!((v.cause, v.confidence), (Cause::Unknown, Confidence::Low));
    assert!(v.text.contains("asleep"), "{}", v.text);
    let v = r.verdict(Some(77), 1000);
    assert_eq!(v.cause, Cause::Unknown);
    assert!(v.text.contains("thread 77"), "{}", v.text);
    // A whole-process stall with nothing standing out.
    assert_eq!(
        Recorded::default().verdict(None, 1000).cause,
        Cause::Unknown
    );
}

#[test]
fn an_unrelated_hold_is_evidence_not_the_verdict() {
    let r = Recorded::default().hold(100, "snapshot", &FORK, 3_000).on(
        9,
        "spinner",
        &[],
        &["app::spin"],
        99,
    );
    let v = r.verdict(Some(9), 1000);
    assert_eq!(v.cause, Cause::OnCpu);
    assert!(
        v.evidence
            .iter()
            .any(|e| e.contains("write hold 3.0 ms by 'snapshot'")),
        "{:?}",
        v.evidence
    );
}
