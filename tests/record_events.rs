//! What gets recorded for an oversized allocation: every field of the event, the in-flight mark
//! while the inner allocator runs, null propagation, and the reporter's JSON lines.

mod common;

use freezetrap::alloc_guard::internal::{self as inflight, Cursor, RawEvent, RING};
use freezetrap::alloc_guard::{self, AllocKind};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// An inner allocator with two test hooks: a request of exactly `NULL_SIZE` fails (null), and one
/// of exactly `GATED_SIZE` waits until `GATE_OPEN` (so the test can look at it while in flight).
struct HookedSystem;
const NULL_SIZE: usize = (48 << 20) + 1;
const GATED_SIZE: usize = (40 << 20) + 3;
static GATE_OPEN: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for HookedSystem {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() == NULL_SIZE {
            return std::ptr::null_mut();
        }
        if layout.size() == GATED_SIZE {
            while !GATE_OPEN.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<HookedSystem> = freezetrap::GuardedAlloc::new(HookedSystem);

const THRESHOLD: usize = 32 << 20;

fn setup() {
    alloc_guard::set_threshold(Some(THRESHOLD));
}

/// Finds the event of `size` recorded by thread `tid` among the ring's last events.
fn find_event(size: u64, tid: u64) -> Option<RawEvent> {
    let mut out = vec![RawEvent::EMPTY; 256];
    let n = RING.events_between(0, u64::MAX, &mut out);
    out[..n]
        .iter()
        .find(|e| e.size == size && e.thread_id == tid)
        .copied()
}

#[inline(never)]
fn make_zeroed(bytes: usize) -> Vec<u8> {
    vec![0u8; bytes]
}

#[test]
fn alloc_zeroed_and_realloc_events_carry_every_field() {
    setup();
    let tid = base::thread::current_tid();
    let before = alloc_guard::stats().recorded;
    let t0 = base::clock::monotonic_ns();

    let zeroed = make_zeroed(33 << 20);
    let mut grown: Vec<u8> = Vec::with_capacity(16 << 20);
    grown.reserve_exact(35 << 20);
    let plain: Vec<u8> = Vec::with_capacity(34 << 20);
    let small: Vec<u8> = Vec::with_capacity((32 << 20) - 1);
    let t1 = base::clock::monotonic_ns();
    std::hint::black_box((&zeroed, &grown, &plain, &small));

    assert!(alloc_guard::stats().recorded >= before + 3);
    let z = find_event(33 << 20, tid).expect("alloc_zeroed event");
    assert_eq!(z.kind, AllocKind::AllocZeroed);
    assert_eq!(z.old_size, 0);
    assert_eq!(z.address, zeroed.as_ptr() as u64);
    assert!(
        z.ts_ns >= t0 && z.ts_ns <= t1,
        "timestamp within the test's window"
    );
    assert!(z.ts_ns + z.duration_ns <= t1);
    assert!(z.frame_count >= 4, "a backtrace was captured");

    let r = find_event(grown.capacity() as u64, tid).expect("realloc event");
    assert_eq!(r.kind, AllocKind::Realloc);
    assert_eq!(r.old_size, 16 << 20);
    assert_eq!(r.address, grown.as_ptr() as u64);

    let p = find_event(34 << 20, tid).expect("alloc event");
    assert_eq!(p.kind, AllocKind::Alloc);
    let name = std::thread::current().name().unwrap().to_string();
    assert!(
        name.starts_with(p.thread_name()),
        "thread name {:?} vs {name:?}",
        p.thread_name()
    );

    assert!(
        find_event(((32 << 20) - 1) as u64, tid).is_none(),
        "under the threshold: not recorded"
    );

    // The frames resolve to this test's functions, with the allocator's own frames removed.
    let frames = alloc_guard::symbolize::Symbolizer::new().resolve(z.frames());
    let first = alloc_guard::symbolize::first_user_frame(&frames).unwrap();
    assert_eq!(first.function, "record_events::make_zeroed", "{frames:#?}");
    assert!(!frames
        .iter()
        .any(|f| alloc_guard::symbolize::is_allocator_frame(&f.function)));
}

#[test]
fn an_allocation_is_in_flight_until_the_inner_allocator_returns() {
    setup();
    let h = std::thread::Builder::new()
        .name("gated-alloc".into())
        .spawn(|| {
            // black_box: otherwise LLVM may elide an allocation whose capacity is all we use.
            let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(GATED_SIZE));
            (base::thread::current_tid(), v.capacity())
        })
        .unwrap();
    let mut out = [RawEvent::EMPTY; inflight::SLOTS];
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let n = inflight::in_flight(&mut out);
        if let Some(e) = out[..n].iter().find(|e| e.size == GATED_SIZE as u64) {
            break *e;
        }
        assert!(
            Instant::now() < deadline,
            "the gated allocation never showed as in flight"
        );
        std::thread::yield_now();
    };
    assert_eq!(seen.thread_name(), "gated-alloc");
    assert_eq!(seen.address, 0, "not returned yet");
    assert!(seen.frame_count > 0);
    GATE_OPEN.store(true, Ordering::Release);
    let (tid, cap) = h.join().unwrap();
    assert_eq!(seen.thread_id, tid);
    assert_eq!(cap, GATED_SIZE);
    let n = inflight::in_flight(&mut out);
    assert!(
        !out[..n].iter().any(|e| e.size == GATED_SIZE as u64),
        "mark cleared on return"
    );
    let done = find_event(GATED_SIZE as u64, tid).expect("completed event");
    assert!(done.address != 0);
}

#[test]
fn a_failing_inner_allocator_returns_null_and_is_still_recorded() {
    setup();
    // black_box: LLVM may otherwise fold an unused allocation and its null check away.
    let layout = std::hint::black_box(Layout::from_size_align(NULL_SIZE, 8).unwrap());
    let p = std::hint::black_box(unsafe { std::alloc::alloc(layout) });
    assert!(p.is_null(), "null must be propagated");
    let e = find_event(NULL_SIZE as u64, base::thread::current_tid()).expect("event");
    assert_eq!(e.address, 0);
}

#[test]
fn the_reporter_writes_contract_json_lines() {
    setup();
    let dir = common::TempDir::new("report");
    let path = dir.path().join("report.jsonl");
    let writer = std::sync::Arc::new(
        alloc_guard::ReportWriter::open(alloc_guard::ReportSink::File(path.clone())).unwrap(),
    );
    let mut cfg = alloc_guard::ReporterConfig::new(writer);
    cfg.human_lines = false;
    cfg.poll_interval = Duration::from_millis(5);
    let reporter = alloc_guard::Reporter::start(cfg).unwrap();
    let marker = (37 << 20) + 11;
    let v: Vec<u8> = Vec::with_capacity(marker);
    std::hint::black_box(&v);
    assert!(reporter.flush(Duration::from_secs(10)));
    drop(reporter);
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("each line is JSON"))
        .find(|j| j["size"] == marker)
        .unwrap_or_else(|| panic!("no line for our allocation in:\n{text}"));
    for key in [
        "event",
        "seq",
        "kind",
        "size",
        "old_size",
        "thread_id",
        "thread_name",
        "ts_ns",
        "duration_ns",
        "frames",
    ] {
        assert!(line.get(key).is_some(), "missing {key} in {line}");
    }
    assert_eq!(line["event"], "large_alloc");
    assert_eq!(line["kind"], "alloc");
    let frames = line["frames"].as_array().unwrap();
    assert!(
        frames.iter().any(|f| f["function"]
            .as_str()
            .unwrap_or("")
            .contains("the_reporter_writes_contract_json_lines")),
        "caller frame present: {line}"
    );
    assert!(!frames[0]["function"]
        .as_str()
        .unwrap()
        .starts_with("alloc_guard::"));
}

#[test]
fn a_cursor_accounts_for_every_event_it_did_not_see() {
    setup();
    let mut cursor = Cursor::new(&RING, false);
    let start = cursor.position();
    for _ in 0..10 {
        let v: Vec<u8> = Vec::with_capacity(THRESHOLD);
        std::hint::black_box(&v);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = cursor.poll(|_| {});
        if st.read + st.lost >= 10 {
            assert_eq!(st.read + st.lost, cursor.position() - start);
            break;
        }
        assert!(Instant::now() < deadline);
    }
}

#[test]
fn the_human_line_reads_like_a_sentence() {
    let mut ev = RawEvent::EMPTY;
    ev.kind = AllocKind::Realloc;
    ev.size = 3584 << 20;
    ev.old_size = 1792 << 20;
    ev.thread_id = 42;
    ev.thread_name[..7].copy_from_slice(b"shard-3");
    ev.duration_ns = 2_410_000_000;
    ev.address = 0x1000;
    let frames = vec![alloc_guard::symbolize::Frame {
        function: "my_service::index::insert".into(),
        file: Some("/src/svc/src/index.rs".into()),
        line: Some(57),
    }];
    assert_eq!(
        alloc_guard::internal::human_line(&ev, &frames),
        "freezetrap: large allocation: 3.50 GiB realloc (from 1.75 GiB) on thread 'shard-3' (tid 42) took 2.41 s at my_service::index::insert (svc/src/index.rs:57)"
    );
}

#[inline(never)]
fn allocate_marker(bytes: usize) -> Vec<u8> {
    std::hint::black_box(Vec::with_capacity(bytes))
}

#[test]
fn both_unwinders_name_the_same_caller_and_auto_picks_frame_pointers_here() {
    use alloc_guard::unwind::{self, Unwinder};
    setup();
    let tid = base::thread::current_tid();
    let mut sym = alloc_guard::symbolize::Symbolizer::new();
    let mut callers = Vec::new();
    for (i, u) in [Unwinder::Dwarf, Unwinder::FramePointers]
        .into_iter()
        .enumerate()
    {
        unwind::force(u);
        let size = (45 << 20) + i;
        let v = allocate_marker(size);
        let ev = find_event(size as u64, tid).expect("event");
        drop(v);
        let frames = sym.resolve(ev.frames());
        let first = alloc_guard::symbolize::first_user_frame(&frames)
            .unwrap()
            .clone();
        assert_eq!(
            first.function, "record_events::allocate_marker",
            "{u:?}: {frames:#?}"
        );
        assert!(
            frames
                .iter()
                .any(|f| f.function.contains("both_unwinders_name_the_same_caller")),
            "{u:?} reaches the test function: {frames:#?}"
        );
        callers.push(first);
    }
    assert_eq!(callers[0], callers[1]);
    // auto: the first stack is unwound both ways; this workspace builds with frame pointers, so
    // they agree and the cheap unwinder is kept.
    unwind::force(Unwinder::Undecided);
    let v = allocate_marker(46 << 20);
    drop(v);
    assert_eq!(unwind::current(), Unwinder::FramePointers);
}
