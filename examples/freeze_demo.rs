//! The main job: a small service whose index — a `HashMap` that grows as documents arrive —
//! resizes into a ~1 GiB table, the allocation pattern behind the incident freezetrap was built
//! for. freezetrap is enabled through environment variables (defaults set below when absent) and
//! names the resize: its size, how long the allocator took, the thread and the call site.
//!
//! ```sh
//! cargo run --release --example freeze_demo              # defaults: ~30M keys, ~1 GiB table
//! cargo run --release --example freeze_demo -- 58720257  # the incident's size (~3.5 GB table)
//! ```
//! The indexer and the workers beat heartbeats, so the watchdog (`FREEZETRAP_STALL`, 300 ms
//! here) reports the resize's stall while it happens and names the large allocation behind it.
//! The eBPF capture helper (`freezetrap-capture`) is the next step (issue #4).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// Just past 2^25 buckets x 7/8: the next insert resizes into a 2^26-bucket table (1.06 GiB).
const DEFAULT_KEYS: u64 = (1 << 25) / 8 * 7 + 1;

/// The index: document id -> offset, grown one insert at a time, as the incident's service did.
/// The indexer beats its heartbeat every 4096 documents: a resize that takes seconds is a stall.
#[inline(never)]
fn index_documents(index: &mut HashMap<u64, u64>, from: u64, to: u64, hb: &freezetrap::Heartbeat) {
    for doc in from..to {
        if doc % 4096 == 0 {
            hb.beat();
        }
        index.insert(doc, doc.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

fn set_default(var: &str, value: &str) {
    if std::env::var_os(var).is_none() {
        // SAFETY: called at the start of main, before any thread is spawned.
        unsafe { std::env::set_var(var, value) };
    }
}

fn main() {
    let keys: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_KEYS);
    let out = std::env::current_dir()
        .unwrap()
        .join("target/freezetrap-demo");
    set_default("FREEZETRAP_ALLOC_THRESHOLD", "256MiB");
    set_default("FREEZETRAP_OUT", out.to_str().unwrap());
    set_default("FREEZETRAP_REPORT", "report.jsonl");
    set_default("FREEZETRAP_STALL", "300ms");
    let ft = freezetrap::init_from_env();

    eprintln!(
        "demo: indexing {keys} documents into a HashMap<u64, u64> (threshold {:?} bytes)",
        freezetrap::alloc_guard::threshold()
    );
    // Workers serve small requests meanwhile, as the incident's service did.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    let hb = freezetrap::Heartbeat::new(&format!("worker-{i}"));
                    while !stop.load(Ordering::Relaxed) {
                        hb.beat();
                        let reply = format!(
                            "request {} served by worker-{i}",
                            served.load(Ordering::Relaxed)
                        );
                        std::hint::black_box(reply);
                        served.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                })
                .unwrap()
        })
        .collect();

    let started = Instant::now();
    let indexer = std::thread::Builder::new()
        .name("indexer".into())
        .spawn(move || {
            let hb = freezetrap::Heartbeat::new("indexer");
            let mut index = HashMap::new();
            index_documents(&mut index, 0, keys, &hb);
            hb.beat(); // done: the last resize's stall ends here
            index.len()
        })
        .unwrap();
    let n = indexer.join().unwrap();
    // Give the watchdog a tick to notice the last stall ended and print its report.
    std::thread::sleep(std::time::Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    if let Some(r) = ft.reporter() {
        r.flush(std::time::Duration::from_secs(10));
    }
    eprintln!(
        "demo: indexed {n} documents in {:.1} s; workers served {} requests",
        started.elapsed().as_secs_f64(),
        served.load(Ordering::Relaxed)
    );
    match &ft.settings().report {
        freezetrap::alloc_guard::ReportSink::File(p) => {
            eprintln!("demo: JSON report: {}", p.display())
        }
        other => eprintln!("demo: JSON report: {other:?}"),
    }
}
