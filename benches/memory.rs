//! Memory: the resident memory freezetrap adds to a service.
//!
//! The bench re-executes itself as a small service (the guard as its global allocator,
//! `init_from_env()`, 16 heartbeats, idle for two seconds), once with no variable and once with
//! every variable set (threshold, watchdog, output directory, report, capture helper), and reads
//! each one's `/proc/<pid>/smaps_rollup` while it idles: RSS and PSS (pages shared with another
//! process counted by share, so a capture launcher that is a forked copy of the service is not
//! counted twice; the usual one, the executable exec'd, shares only file pages). The capture
//! launcher is a process of its own: its PSS is reported separately.
//!
//! ```text
//! cargo build --release -p freezetrap-capture   # the helper, so the launcher is started
//! cargo bench --bench memory
//! ```
//!
//! Target (issue #12): what freezetrap adds under 32 MiB. The armed recorder's memory is measured
//! by `cargo bench --bench capture` (root and bpftrace).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const ROLE: &str = "FT_BENCH_MEMORY_SERVICE";

/// The service: start, say the launcher's pid, idle with heartbeats until told to stop.
fn service() {
    let ft = freezetrap::init_from_env();
    let beats: Vec<_> = (0..16)
        .map(|i| freezetrap::Heartbeat::new(&format!("hb-{i}")))
        .collect();
    // The launcher is started by the report thread once the watchdog thread has set up (~50 ms),
    // and installed at its next tick.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::env::var_os("FREEZETRAP_CAPTURE").is_some()
        && ft
            .watchdog()
            .and_then(|w| w.capture_launcher_pid())
            .is_none()
        && std::time::Instant::now() < until
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let launcher = ft
        .watchdog()
        .and_then(|w| w.capture_launcher_pid())
        .map_or_else(|| "-".to_string(), |p| p.to_string());
    println!("READY {launcher}");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    // Beat until the parent closes our stdin (after reading our memory).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    while rx.recv_timeout(Duration::from_millis(20)).is_err() {
        for b in &beats {
            b.beat();
        }
    }
    drop(beats);
    drop(ft);
}

/// (RSS, PSS) in KiB from `/proc/<pid>/smaps_rollup`.
fn rss_pss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

struct Reading {
    rss: u64,
    pss: u64,
    launcher_pss: Option<u64>,
}

fn run(all_vars: bool, out: &std::path::Path, helper: Option<&std::path::Path>) -> Reading {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(ROLE, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FREEZETRAP_") {
            cmd.env_remove(k);
        }
    }
    if all_vars {
        cmd.env("FREEZETRAP_ALLOC_THRESHOLD", "64MiB")
            .env("FREEZETRAP_STALL", "200ms")
            .env("FREEZETRAP_OUT", out)
            .env("FREEZETRAP_REPORT", "report.jsonl");
        if let Some(h) = helper {
            cmd.env("FREEZETRAP_CAPTURE", h);
        }
    }
    let mut child = cmd.spawn().expect("spawn the service");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    let launcher: Option<u32> = ready
        .trim()
        .strip_prefix("READY ")
        .and_then(|p| p.parse().ok());
    // Idle long enough for start-up work to finish and the heap to settle.
    std::thread::sleep(Duration::from_secs(2));
    let (rss, pss) = rss_pss_kib(child.id()).expect("the service's smaps_rollup");
    let launcher_pss = launcher.and_then(rss_pss_kib).map(|(_, p)| p);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "the service failed");
    Reading {
        rss,
        pss,
        launcher_pss,
    }
}

fn main() {
    if std::env::var_os(ROLE).is_some() {
        service();
        return;
    }
    let out = std::env::temp_dir().join(format!("freezetrap-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let helper = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("freezetrap-capture"))
        .filter(|p| p.is_file());
    let mut rows = Vec::new();
    for _ in 0..3 {
        let off = run(false, &out, helper.as_deref());
        let on = run(true, &out, helper.as_deref());
        rows.push((off, on));
    }
    println!("resident memory of an idle service (KiB), three runs:");
    for (off, on) in &rows {
        println!(
            "  no variable RSS {} PSS {}; every variable RSS {} PSS {}; added RSS {:+} PSS {:+}; capture launcher PSS {}",
            off.rss,
            off.pss,
            on.rss,
            on.pss,
            on.rss as i64 - off.rss as i64,
            on.pss as i64 - off.pss as i64,
            on.launcher_pss
                .map_or_else(|| "- (no helper built)".into(), |p| p.to_string()),
        );
    }
    let worst = rows
        .iter()
        .map(|(off, on)| (on.pss as i64 - off.pss as i64) + on.launcher_pss.unwrap_or(0) as i64)
        .max()
        .unwrap_or(0);
    println!(
        "  freezetrap's total (added PSS + launcher PSS), worst run: {:.1} MiB (target: under 32 MiB)",
        worst as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&out);
}
