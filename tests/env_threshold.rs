//! `FREEZETRAP_ALLOC_THRESHOLD` alone switches recording on (no code beyond the
//! `#[global_allocator]` line), and malformed values give one clear line and no recording.
//! Each case runs this binary again as a child with the variable set.

mod common;

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// The child: allocates 3 blocks over 64 MiB and one under, then prints what was recorded.
/// With `init` it also starts the facade as a service would.
#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    let handle = (role == "init").then(freezetrap::init_from_env);
    for mib in [70usize, 80, 90, 10] {
        let v: Vec<u8> = Vec::with_capacity(mib << 20);
        std::hint::black_box(&v);
    }
    if let Some(h) = &handle {
        if let Some(r) = h.reporter() {
            assert!(r.flush(Duration::from_secs(10)));
        }
    }
    println!("RECORDED={}", freezetrap::alloc_guard::stats().recorded);
    drop(handle);
}

fn recorded(stdout: &[u8]) -> u64 {
    let s = String::from_utf8_lossy(stdout);
    s.lines()
        .find_map(|l| l.strip_prefix("RECORDED="))
        .unwrap_or_else(|| panic!("child printed no RECORDED line:\n{s}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_variable_alone_turns_recording_on() {
    let out = common::run_with_timeout(
        common::child("child_service", "bare").env("FREEZETRAP_ALLOC_THRESHOLD", "64MiB"),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        recorded(&out.stdout),
        3,
        "three allocations of at least 64 MiB"
    );
}

#[test]
fn no_variable_means_nothing_is_recorded() {
    let out = common::run_with_timeout(
        &mut common::child("child_service", "init"),
        Duration::from_secs(60),
    );
    assert!(out.status.success());
    assert_eq!(recorded(&out.stdout), 0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("freezetrap:"), "silent when off:\n{err}");
}

#[test]
fn init_from_env_reports_each_event_to_stderr_and_the_json_file() {
    let dir = common::TempDir::new("env-report");
    let out_dir = dir.path().join("out");
    let out = common::run_with_timeout(
        common::child("child_service", "init")
            .env("FREEZETRAP_ALLOC_THRESHOLD", "67108864")
            .env("FREEZETRAP_OUT", &out_dir)
            .env("FREEZETRAP_REPORT", "report.jsonl"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let human: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("freezetrap: large allocation: "))
        .collect();
    assert_eq!(human.len(), 3, "one human line per event:\n{err}");
    assert!(
        human[0].contains("70.00 MiB alloc on thread 'child_service'"),
        "{}",
        human[0]
    );
    assert!(
        human[0].contains(" at env_threshold::child_service ("),
        "{}",
        human[0]
    );

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "FREEZETRAP_OUT is created private");
    let report = std::fs::read_to_string(out_dir.join("report.jsonl")).unwrap();
    let sizes: Vec<u64> = report
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|j| j["event"] == "large_alloc")
        .map(|j| j["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![70 << 20, 80 << 20, 90 << 20]);
}

fn assert_one_clear_line(value: &str, why: &str) {
    let out = common::run_with_timeout(
        common::child("child_service", "init").env("FREEZETRAP_ALLOC_THRESHOLD", value),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a malformed value must not stop the program:\n{err}"
    );
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("freezetrap:"))
        .collect();
    assert_eq!(lines.len(), 1, "exactly one line for {value:?}:\n{err}");
    assert_eq!(
        lines[0],
        format!(
            "freezetrap: FREEZETRAP_ALLOC_THRESHOLD=\"{value}\" is not valid ({why}): expected bytes or a number with a unit B/KiB/MiB/GiB/TiB (1024^n) or KB/MB/GB/TB (1000^n), e.g. 64MiB; large-allocation recording stays off"
        )
    );
    assert_eq!(recorded(&out.stdout), 0, "recording stays off");
}

#[test]
fn malformed_values_print_one_line_and_leave_recording_off() {
    assert_one_clear_line("64 parsecs", "the unit is not known");
    assert_one_clear_line("lots", "the value is not a number with an optional unit");
    assert_one_clear_line("0", "the value must be greater than zero");
    assert_one_clear_line("", "the value is empty");
    assert_one_clear_line("99999999999999999999999", "the value is too large");
}

#[test]
fn an_unwritable_report_path_is_one_line_and_the_service_goes_on() {
    let out = common::run_with_timeout(
        common::child("child_service", "init")
            .env("FREEZETRAP_ALLOC_THRESHOLD", "64MiB")
            .env("FREEZETRAP_REPORT", "/proc/definitely/not/writable.jsonl"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with(
            "freezetrap: cannot open report file /proc/definitely/not/writable.jsonl:"
        ) && l.ends_with("the JSON report is off; check FREEZETRAP_REPORT")),
        "{err}"
    );
    assert_eq!(recorded(&out.stdout), 3, "recording itself is unaffected");
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("freezetrap: large allocation: "))
            .count(),
        3
    );
}
