//! Bad helpers: missing, not executable, world-writable, relative, crashing, hanging. Each is
//! reported in one clear line or in the stall report, the service keeps running, and a hung
//! helper is killed at its deadline and reaped.

mod common;

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// The service: one heartbeat thread stalls for 500 ms, then the service lingers
/// `FT_LINGER_MS` so a slow helper can be watched, and says it finished.
#[test]
fn child_service() {
    if common::role().is_none() {
        return;
    }
    let ft = freezetrap::init_from_env();
    std::thread::Builder::new()
        .name("worker".into())
        .spawn(|| {
            let hb = freezetrap::Heartbeat::new("worker");
            for _ in 0..20 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(500));
            for _ in 0..20 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let linger: u64 = std::env::var("FT_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    std::thread::sleep(Duration::from_millis(linger));
    drop(ft);
    println!("SERVICE_OK");
}

struct Outcome {
    stderr: String,
    lines: Vec<serde_json::Value>,
    _dir: common::TempDir,
}

fn run_with_helper(helper: &std::path::Path, dir: common::TempDir, linger_ms: u64) -> Outcome {
    let out_dir = dir.path().join("out");
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_STALL", "150ms")
        .env("FREEZETRAP_CAPTURE", helper)
        .env("FREEZETRAP_CAPTURE_DURATION", "1s")
        .env("FREEZETRAP_CAPTURE_GRACE", "2s")
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .env("FT_LINGER_MS", linger_ms.to_string());
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "the service must keep running:\n{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVICE_OK"));
    let lines = common::report_lines(&out_dir.join("report.jsonl"));
    let stalls: Vec<_> = lines.iter().filter(|l| l["event"] == "stall").collect();
    assert_eq!(
        stalls.len(),
        1,
        "the stall is still detected and reported:\n{stderr}"
    );
    Outcome {
        stderr,
        lines,
        _dir: dir,
    }
}

fn assert_refused(helper: &std::path::Path, dir: common::TempDir, why: &str) {
    let o = run_with_helper(helper, dir, 100);
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("FREEZETRAP_CAPTURE="))
        .unwrap_or_else(|| panic!("no refusal line:\n{}", o.stderr));
    assert!(
        line.starts_with(&format!(
            "freezetrap: FREEZETRAP_CAPTURE={} is refused: ",
            helper.display()
        )),
        "{line}"
    );
    assert!(line.contains(why), "{line}");
    assert!(
        line.ends_with("; stalls are still detected and reported, without captures"),
        "{line}"
    );
    let stall = o.lines.iter().find(|l| l["event"] == "stall").unwrap();
    assert_eq!(stall["capture"]["status"], "not configured");
}

#[test]
fn a_missing_helper_is_refused_in_one_line() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("missing");
    let p = dir.path().join("no-such-helper");
    assert_refused(&p, dir, "it cannot be read (No such file or directory");
}

#[test]
fn a_non_executable_helper_is_refused() {
    if common::role().is_some() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = common::TempDir::new("noexec");
    let p = common::write_helper(dir.path(), "h.sh", "exit 0");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_refused(&p, dir, "it is not executable");
}

#[test]
fn a_world_writable_helper_is_refused() {
    if common::role().is_some() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = common::TempDir::new("ww");
    let p = common::write_helper(dir.path(), "h.sh", "exit 0");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused(
        &p,
        dir,
        "it is group- or world-writable (mode 777): anyone could replace it",
    );
}

#[test]
fn a_helper_owned_by_another_user_is_refused() {
    if common::role().is_some() {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED a_helper_owned_by_another_user_is_refused: needs root to chown the helper"
        );
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let dir = common::TempDir::new("owner");
    let p = common::write_helper(dir.path(), "h.sh", "exit 0");
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::chown(c.as_ptr(), 65534, 65534) },
        0,
        "chown to nobody"
    );
    assert_refused(
        &p,
        dir,
        "it is owned by uid 65534, neither root nor us (uid 0)",
    );
}

#[test]
fn a_relative_helper_path_is_refused() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("relative");
    assert_refused(
        std::path::Path::new("bin/freezetrap-capture"),
        dir,
        "it is not an absolute path",
    );
}

#[test]
fn a_crashing_helper_is_reported_with_its_signal() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("crash");
    let p = common::write_helper(dir.path(), "h.sh", "kill -SEGV $$");
    let o = run_with_helper(&p, dir, 400);
    let statuses: Vec<String> = o
        .lines
        .iter()
        .filter_map(|l| match l["event"].as_str() {
            Some("stall") => l["capture"]["status"].as_str().map(String::from),
            Some("capture") => l["status"].as_str().map(String::from),
            _ => None,
        })
        .collect();
    assert!(
        statuses.iter().any(|s| s == "failed: killed by signal 11"),
        "{statuses:?}\n{}",
        o.stderr
    );
}

#[test]
fn a_hanging_helper_is_killed_at_its_deadline_and_reaped() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("hang");
    let pidfile = dir.path().join("helper.pid");
    let p = common::write_helper(
        dir.path(),
        "h.sh",
        &format!("echo $$ > {}\nexec sleep 1000", pidfile.display()),
    );
    // Deadline: 1 s duration + 2 s grace after the start; linger long enough to see the kill.
    let o = run_with_helper(&p, dir, 3500);
    let done = o
        .lines
        .iter()
        .find(|l| l["event"] == "capture")
        .unwrap_or_else(|| panic!("no capture line:\n{}", o.stderr));
    assert_eq!(
        done["status"],
        "failed: still running at its deadline, killed"
    );
    assert!(
        o.stderr.contains("still running at its deadline, killed"),
        "{}",
        o.stderr
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "helper {pid} still exists (not killed or a zombie)"
    );
}
