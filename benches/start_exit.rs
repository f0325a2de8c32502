//! Start and exit: what freezetrap adds to a short-lived program (a CLI run, a test process).
//!
//! The bench re-executes itself as the short-lived program: the guard as its global allocator,
//! `init_from_env()` in `main`, a little work, exit. It alternates runs without any variable and
//! with every variable set (a threshold, the watchdog, an output directory, the report, a
//! capture helper, the rest at their defaults), measures each run's wall time from spawn to
//! exit status, and prints medians, spreads and the difference.
//!
//! ```text
//! cargo bench --bench start_exit [-- RUNS]
//! ```
//!
//! `FT_BENCH_SHORT_LIVED=1 FT_BENCH_VERBOSE=1 <bench binary>` (with the `FREEZETRAP_*` variables
//! of your choice) runs the short-lived program once and prints how long `init_from_env` and the
//! drop took in it.
//!
//! The target (issue #12): the difference within 1 ms. Before the watchdog slept on a futex its
//! drop waited for the next tick: ~25-100 ms per run at `FREEZETRAP_STALL=200ms`.

use std::process::Command;
use std::time::Instant;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const ROLE: &str = "FT_BENCH_SHORT_LIVED";

/// The short-lived program: what a CLI does between start and exit, with freezetrap on.
fn short_lived() {
    let t0 = std::time::Instant::now();
    let ft = freezetrap::init_from_env();
    let t_init = t0.elapsed();
    let words: Vec<String> = (0..2000).map(|i| format!("word{i}")).collect();
    let total: usize = words.iter().map(String::len).sum();
    std::hint::black_box(total);
    // A CLI's I/O: long enough for the watchdog to be in its loop when the program exits.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t1 = std::time::Instant::now();
    drop(ft);
    if std::env::var_os("FT_BENCH_VERBOSE").is_some() {
        eprintln!("init {:?} drop {:?}", t_init, t1.elapsed());
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> (f64, f64) {
    // v is sorted: the 10th and 90th percentiles.
    (v[v.len() / 10], v[v.len() * 9 / 10])
}

fn main() {
    if std::env::var_os(ROLE).is_some() {
        short_lived();
        return;
    }
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let me = std::env::current_exe().expect("the bench binary");
    let out = std::env::temp_dir().join(format!(
        "freezetrap-bench-start-exit-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&out).expect("a private output directory");
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let helper = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("true(1) as the capture helper");
    let time = |all_vars: bool| -> f64 {
        let mut cmd = Command::new(&me);
        cmd.env(ROLE, "1");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FREEZETRAP_") {
                cmd.env_remove(k);
            }
        }
        if all_vars {
            cmd.env("FREEZETRAP_ALLOC_THRESHOLD", "64MiB")
                .env("FREEZETRAP_STALL", "200ms")
                .env("FREEZETRAP_OUT", &out)
                .env("FREEZETRAP_REPORT", "report.jsonl")
                .env("FREEZETRAP_CAPTURE", helper)
                .env("FREEZETRAP_QUIET", "1");
        }
        let t = Instant::now();
        let status = cmd.status().expect("spawn the short-lived program");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(status.success(), "the short-lived program failed: {status}");
        ms
    };
    // Warm the page cache and the binary.
    for _ in 0..3 {
        time(false);
        time(true);
    }
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        off.push(time(false));
        on.push(time(true));
    }
    let (m_off, m_on) = (median(&mut off), median(&mut on));
    let ((o10, o90), (n10, n90)) = (spread(&off), spread(&on));
    println!("start to exit of a short-lived program, {runs} alternating runs each (wall ms):");
    println!("  no variable        median {m_off:.2}  (p10 {o10:.2}, p90 {o90:.2})");
    println!("  every variable set median {m_on:.2}  (p10 {n10:.2}, p90 {n90:.2})");
    println!(
        "  difference         {:+.2} ms (target: within 1 ms)",
        m_on - m_off
    );
    let _ = std::fs::remove_dir_all(&out);
}
