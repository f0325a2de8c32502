//! The main job: a small service whose index — a `HashMap` that grows as documents arrive —
//! resizes into a ~1 GiB table, the allocation pattern behind the incident freezetrap was built
//! for. freezetrap is enabled through environment variables (defaults set below when absent) and
//! names the resize: its size, how long the allocator took, the thread and the call site.
//!
//! ```sh
//! cargo run --release --example freeze_demo              # defaults: ~30M keys, ~1 GiB table
//! cargo run --release --example freeze_demo -- 58720257  # the incident's size (~3.5 GB table)
//! cargo run --release --example freeze_demo_fixed        # the fix: with_capacity up front
//! ```
//! The indexer and the workers beat heartbeats, so the watchdog (`FREEZETRAP_STALL`, 25 ms here)
//! reports the resize's stall while it happens and names the large allocation behind it. Then the
//! service "snapshots" its index the way Redis' BGSAVE does — `fork()` while holding ~1 GiB —
//! which holds the mmap_lock for write while the workers' mmaps wait: a process-wide freeze.
//! A fork's cost differs several-fold between machines, so the demo first measures one and
//! sizes the memory the service holds (a "cache") so that the fork's freeze exceeds the stall
//! threshold wherever it runs; only when that memory is not available does it lower the
//! threshold (never below 10 ms, and never one you set).
//!
//! As root with bpftrace installed, this binary is also its own capture helper
//! (`FREEZETRAP_CAPTURE` points at itself; run with `--pid ...` it is `freezetrap-capture`), so
//! each stall gets an off-CPU flame graph and an mmap_lock summary while it is going on.

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
pub fn index_documents(
    index: &mut HashMap<u64, u64>,
    from: u64,
    to: u64,
    hb: &freezetrap::Heartbeat,
) {
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

fn have_ebpf() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let bpftrace = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("bpftrace").is_file()));
    root && bpftrace
}

/// The workers' request loop: small allocations and an mmap per request (as a service reading
/// files or growing buffers does), with a heartbeat per request.
fn serve(i: usize, stop: Arc<AtomicBool>, served: Arc<AtomicU64>) {
    let hb = freezetrap::Heartbeat::new(&format!("worker-{i}"));
    while !stop.load(Ordering::Relaxed) {
        hb.beat();
        let reply = format!(
            "request {} served by worker-{i}",
            served.load(Ordering::Relaxed)
        );
        std::hint::black_box(reply);
        // SAFETY: a private anonymous mapping, touched and unmapped.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                1 << 16,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                *(p as *mut u8) = 1;
                libc::munmap(p, 1 << 16);
            }
        }
        served.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The helper's last word in its log: its one-line summary, or its error.
fn final_line(log: &str) -> Option<&str> {
    log.lines().rev().find(|l| {
        l.starts_with("freezetrap-capture: ")
            && !l.starts_with("freezetrap-capture: recording")
            && !l.starts_with("freezetrap-capture: no flame graph")
    })
}

/// Waits (at most `limit`) until every capture started under `out` has said its last word.
fn wait_for_captures(out: &std::path::Path, limit: std::time::Duration) {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        let running = std::fs::read_dir(out)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("helper.log")).ok())
            .any(|log| final_line(&log).is_none());
        if !running {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Anonymous memory with every page touched, mapped directly (not through the allocator: it
/// stands for memory the service holds, not an allocation to report).
struct Resident(*mut libc::c_void, usize);

impl Resident {
    fn new(bytes: usize) -> Option<Resident> {
        if bytes == 0 {
            return None;
        }
        // SAFETY: a fresh private anonymous mapping; MAP_POPULATE touches every page.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Resident(p, bytes))
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, once.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// What a fork costs here per GiB resident: the fastest of three forks with a touched 256 MiB
/// mapping, less the fastest of three without. A fork's freeze is mostly copying page tables,
/// so it grows with resident memory — and machines differ several-fold (a fork with 1.5 GiB
/// resident takes ~13 ms on one VM and ~40 ms on another).
fn fork_ms_per_gib() -> f64 {
    let fastest = || (0..3).map(|_| snapshot()).fold(f64::MAX, f64::min);
    let bare = fastest();
    let probe = Resident::new(256 << 20);
    let with = fastest();
    drop(probe);
    ((with - bare) * 4.0).max(0.5)
}

/// Bytes of the table a `HashMap<u64, u64>` of `keys` entries ends in: a power of two of
/// buckets at most 7/8 full, 16 bytes each plus one control byte.
fn table_bytes(keys: u64) -> u64 {
    let buckets = (keys * 8 / 7 + 1).next_power_of_two();
    buckets * 17
}

/// Memory the kernel says is available, bytes (0 when unreadable).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The snapshot phase, sized for this machine: how much extra memory the service holds so
/// that a fork's freeze is ~2.5x the stall threshold, and the threshold (lowered, never below
/// 10 ms, only when the memory that would take is not there and the user did not set one).
struct ForkPlan {
    per_gib_ms: f64,
    cache: Option<Resident>,
    cache_gib: f64,
    expected_ms: f64,
    stall_ms: f64,
}

fn plan_fork_phase(keys: u64) -> ForkPlan {
    let user_stall = std::env::var("FREEZETRAP_STALL").ok().and_then(|v| {
        base::parse::parse_duration_ns(v.as_bytes())
            .ok()
            .map(|ns| ns as f64 / 1e6)
    });
    let per_gib_ms = fork_ms_per_gib();
    let index_gib = table_bytes(keys) as f64 / GIB;
    let stall = user_stall.unwrap_or(25.0);
    let cap_gib = (mem_available() as f64 / GIB / 4.0).min(8.0);
    let cache_gib = (2.5 * stall / per_gib_ms - index_gib).clamp(0.0, cap_gib);
    let expected_ms = per_gib_ms * (index_gib + cache_gib);
    let stall_ms = match user_stall {
        Some(s) => s,
        None if expected_ms < 1.5 * stall => (expected_ms / 2.5).max(10.0),
        None => stall,
    };
    ForkPlan {
        per_gib_ms,
        cache: Resident::new((cache_gib * GIB) as usize & !4095),
        cache_gib,
        expected_ms,
        stall_ms,
    }
}

/// Snapshotting the index like BGSAVE: fork, let the child "write" it, wait.
fn snapshot() -> f64 {
    let t = Instant::now();
    // SAFETY: the child only calls _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    let forked = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    forked
}

#[allow(dead_code)] // unused where this file is included as a module (freeze_demo_fixed, tests)
fn main() -> std::process::ExitCode {
    // Run as `freeze_demo --pid ...`, this binary is the capture helper.
    if std::env::args().nth(1).as_deref() == Some("--pid") {
        return freezetrap_capture::cli::run(std::env::args().skip(1));
    }
    run(std::env::args().any(|a| a == "--fixed"))
}

/// The service. `fixed`: reserve the index's capacity up front, the incident's one-line fix.
pub fn run(fixed: bool) -> std::process::ExitCode {
    let keys: u64 = std::env::args()
        .skip(1)
        .find_map(|s| s.parse().ok())
        .unwrap_or(DEFAULT_KEYS);
    let out = match std::env::var_os("FREEZETRAP_OUT") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let d = std::env::current_dir()
                .unwrap()
                .join("target/freezetrap-demo");
            let _ = std::fs::remove_dir_all(&d); // each default run starts clean
            d
        }
    };
    // Before the watchdog starts: size the snapshot phase for this machine.
    let plan = plan_fork_phase(keys);
    set_default("FREEZETRAP_ALLOC_THRESHOLD", "64MiB");
    set_default("FREEZETRAP_OUT", out.to_str().unwrap());
    set_default("FREEZETRAP_REPORT", "report.jsonl");
    set_default("FREEZETRAP_STALL", &format!("{:.0}ms", plan.stall_ms));
    let ebpf = have_ebpf();
    if ebpf {
        let me = std::env::current_exe().unwrap();
        set_default("FREEZETRAP_CAPTURE", me.to_str().unwrap());
        set_default("FREEZETRAP_CAPTURE_DURATION", "3s");
        set_default("FREEZETRAP_CAPTURE_COOLDOWN", "1s");
    }
    let ft = freezetrap::init_from_env();

    eprintln!(
        "demo: indexing {keys} documents into a HashMap<u64, u64>{} (threshold {:?} bytes)",
        if fixed {
            " reserved up front with with_capacity (the fix)"
        } else {
            ""
        },
        freezetrap::alloc_guard::threshold()
    );
    eprintln!(
        "demo: a fork costs {:.1} ms per GiB resident here: {}the snapshot's fork (~{:.0} ms) exceeds the {:.0} ms stall threshold",
        plan.per_gib_ms,
        if plan.cache.is_some() {
            format!("the service also holds a {:.2} GiB cache so ", plan.cache_gib)
        } else {
            String::new()
        },
        plan.expected_ms,
        plan.stall_ms
    );
    if !ebpf {
        eprintln!("demo: no eBPF capture: run as root with bpftrace installed (apt-get install bpftrace) for flame graphs and the mmap_lock summary");
    }
    // Workers serve small requests meanwhile, as the incident's service did.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || serve(i, stop, served))
                .unwrap()
        })
        .collect();

    let started = Instant::now();
    let indexer = std::thread::Builder::new()
        .name("indexer".into())
        .spawn(move || {
            let hb = freezetrap::Heartbeat::new("indexer");
            let mut index = if fixed {
                HashMap::with_capacity(keys as usize)
            } else {
                HashMap::new()
            };
            index_documents(&mut index, 0, keys, &hb);
            hb.beat(); // done: the last resize's stall ends here
            index
        })
        .unwrap();
    let index = indexer.join().unwrap();
    let n = index.len();
    // Give the watchdog a tick to notice the last stall ended and print its report.
    std::thread::sleep(std::time::Duration::from_millis(400));
    eprintln!("demo: indexed {n} documents in {:.1} s; now snapshotting the index (fork with ~1 GiB resident)", started.elapsed().as_secs_f64());
    // Three snapshots; with eBPF, more (up to eight) until a capture started in this phase has
    // been recording during a fork. A capture starts when a stall is seen, during a fork, and
    // bpftrace needs a fraction of a second to attach, so it is the *next* fork it records; and
    // a capture still busy with the indexing stalls can make the phase's first forks skip theirs.
    let captures = || {
        std::fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("helper.log").exists())
                    .count()
            })
            .unwrap_or(0)
    };
    let before_phase = captures();
    let mut recorded_a_fork = false;
    for round in 0..8 {
        let capture_running_before = captures() > before_phase;
        let ms = snapshot();
        eprintln!("demo: snapshot {round}: fork took {ms:.1} ms");
        recorded_a_fork |= capture_running_before;
        std::thread::sleep(std::time::Duration::from_millis(1500));
        if round >= 2 && (!ebpf || recorded_a_fork) {
            break;
        }
    }
    // Stop the workers before freeing the index and the cache: unmapping GiBs holds mmap_lock
    // for write too, and the workers' mmaps would stall on it — a real freeze, but not this
    // demo's story.
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    drop(index);
    drop(plan.cache);
    if let Some(r) = ft.reporter() {
        r.flush(std::time::Duration::from_secs(10));
    }
    if ebpf {
        wait_for_captures(&out, std::time::Duration::from_secs(30));
    }
    eprintln!(
        "demo: done in {:.1} s; workers served {} requests",
        started.elapsed().as_secs_f64(),
        served.load(Ordering::Relaxed)
    );
    match &ft.settings().report {
        freezetrap::alloc_guard::ReportSink::File(p) => {
            eprintln!("demo: JSON report: {}", p.display())
        }
        other => eprintln!("demo: JSON report: {other:?}"),
    }
    let mut caps: Vec<_> = std::fs::read_dir(&out)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("helper.log").exists())
                .collect()
        })
        .unwrap_or_default();
    caps.sort();
    for c in &caps {
        let log = std::fs::read_to_string(c.join("helper.log")).unwrap_or_default();
        let line = final_line(&log).unwrap_or("(still running)");
        eprintln!("demo: capture {}: {}", c.display(), line);
        if c.join("offcpu.svg").exists() {
            eprintln!("demo:   flame graph: {}", c.join("offcpu.svg").display());
        }
    }
    std::process::ExitCode::SUCCESS
}
