//! The setup mistakes that would make freezetrap silently useless are said at start, once, in
//! one line each. This test binary deliberately has no `#[global_allocator]`: with a
//! `FREEZETRAP_*` variable set, `init_from_env` says the guard is not installed; with none set,
//! it says nothing at all.

mod common;

use std::time::Duration;

#[test]
fn child_service() {
    if common::role().as_deref() != Some("service") {
        return;
    }
    let ft = freezetrap::init_from_env();
    let again = freezetrap::init_from_env(); // a second call says nothing more
    drop(again);
    drop(ft);
    println!("SERVICE_OK");
}

fn run(env: &[(&str, &str)]) -> String {
    let mut cmd = common::child("child_service", "service");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("SERVICE_OK"));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_program_without_the_guard_is_told_once() {
    if common::role().is_some() {
        return;
    }
    let stderr = run(&[("FREEZETRAP_ALLOC_THRESHOLD", "64MiB")]);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("is not this program's #[global_allocator]"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("freezetrap: FREEZETRAP_* is set but freezetrap::GuardedAlloc")
            && lines[0].contains("#[global_allocator] static GLOBAL"),
        "{}",
        lines[0]
    );
}

#[test]
fn nothing_is_said_when_nothing_is_set() {
    if common::role().is_some() {
        return;
    }
    let stderr = run(&[]);
    assert!(!stderr.contains("freezetrap:"), "{stderr}");
}
