//! Every environment variable's out-of-range (or malformed, or non-UTF-8) values: one line
//! naming the variable, the documented effect (the setting keeps its default, or the feature
//! stays off), no flood of lines, no panic, no wrap-around — and the service runs on.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// A service with one 400 ms heartbeat stall and one 2 MiB allocation.
#[test]
fn child_service() {
    if common::role().as_deref() != Some("service") {
        return;
    }
    let ft = freezetrap::init_from_env();
    let hb = freezetrap::Heartbeat::new("worker");
    for _ in 0..20 {
        hb.beat();
        std::thread::sleep(Duration::from_millis(10));
    }
    let v: Vec<u8> = Vec::with_capacity(2 << 20);
    std::hint::black_box(&v);
    std::thread::sleep(Duration::from_millis(400));
    for _ in 0..30 {
        hb.beat();
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(hb);
    if let Some(r) = ft.reporter() {
        r.flush(Duration::from_secs(5));
    }
    drop(ft);
    println!("SERVICE_OK");
}

/// What must happen besides the one line.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Effect {
    /// The watchdog stays off: no stall is reported.
    NoWatchdog,
    /// The watchdog runs (with the default for that setting): the stall is reported.
    StallReported,
    /// Large allocations are recorded (the threshold was accepted).
    Recorded,
}

fn check(var: &str, value: OsString, line_has: &str, effect: Effect) {
    let dir = common::TempDir::new("ranges");
    let out = dir.path().join("out");
    let helper = common::write_helper(dir.path(), "h.sh", "exit 0");
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_STALL", "150ms")
        .env("FREEZETRAP_OUT", &out)
        .env("FREEZETRAP_CAPTURE", &helper)
        .env("FREEZETRAP_ALLOC_THRESHOLD", "1MiB")
        .env(var, &value);
    let o = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let shown = value.to_string_lossy();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("SERVICE_OK"),
        "{var}={shown}: the service must run on:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "{var}={shown}: a panic:\n{stderr}"
    );
    let about: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("freezetrap: {var}")))
        .collect();
    assert_eq!(
        about.len(),
        1,
        "{var}={shown}: exactly one line about it:\n{stderr}"
    );
    assert!(about[0].contains(line_has), "{var}={shown}: {}", about[0]);
    let stalls = stderr.lines().filter(|l| l.contains(" stalled ")).count();
    assert!(
        stalls <= 1,
        "{var}={shown}: no flood of stall lines (FREEZETRAP_STALL=1ns once made every tick one):\n{stderr}"
    );
    match effect {
        Effect::NoWatchdog => assert_eq!(stalls, 0, "{var}={shown}:\n{stderr}"),
        Effect::StallReported => assert_eq!(stalls, 1, "{var}={shown}:\n{stderr}"),
        Effect::Recorded => assert!(
            stderr.contains("freezetrap: large allocation: 2.00 MiB"),
            "{var}={shown}:\n{stderr}"
        ),
    }
}

#[test]
fn every_variable_refuses_values_outside_its_range_in_one_line() {
    if common::role().is_some() {
        return;
    }
    let range = "outside the accepted range";
    let cases: &[(&str, &str, &str, Effect)] = &[
        ("FREEZETRAP_STALL", "1ns", range, Effect::NoWatchdog),
        ("FREEZETRAP_STALL", "999us", range, Effect::NoWatchdog),
        ("FREEZETRAP_STALL", "2h", range, Effect::NoWatchdog),
        (
            "FREEZETRAP_STALL",
            "soon",
            "not a number",
            Effect::NoWatchdog,
        ),
        ("FREEZETRAP_TICK", "150ms", range, Effect::StallReported),
        ("FREEZETRAP_TICK", "10us", range, Effect::StallReported),
        ("FREEZETRAP_LOOKBACK", "1h", range, Effect::StallReported),
        (
            "FREEZETRAP_CAPTURE_DURATION",
            "500ms",
            range,
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_DURATION",
            "2h",
            range,
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_GRACE",
            "11min",
            range,
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_GRACE",
            "99999999999999h",
            "too large",
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_COOLDOWN",
            "25h",
            range,
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_MAX_PER_HOUR",
            "0",
            "greater than zero",
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_MAX_PER_HOUR",
            "5000",
            "too large",
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_MAX_BYTES",
            "1B",
            range,
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_CAPTURE_MAX_BYTES",
            "1000KiB",
            range,
            Effect::StallReported,
        ),
        (
            "FREEZETRAP_BACKTRACE_DEPTH",
            "99",
            "too large",
            Effect::Recorded,
        ),
        (
            "FREEZETRAP_ALLOC_THRESHOLD",
            "1KiB",
            "below 64 KiB",
            Effect::Recorded,
        ),
        (
            "FREEZETRAP_QUIET",
            "maybe",
            "expected 1 or 0",
            Effect::Recorded,
        ),
    ];
    for &(var, value, line_has, effect) in cases {
        check(var, value.into(), line_has, effect);
    }
    // Not UTF-8: said, not ignored.
    let bad = OsString::from_vec(b"200\xffms".to_vec());
    check("FREEZETRAP_STALL", bad.clone(), "UTF-8", Effect::NoWatchdog);
    check(
        "FREEZETRAP_TICK",
        bad.clone(),
        "UTF-8",
        Effect::StallReported,
    );
    check("FREEZETRAP_QUIET", bad, "UTF-8", Effect::Recorded);
}
