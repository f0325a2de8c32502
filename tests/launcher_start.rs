//! How the capture launcher starts, and what it costs the service.
//!
//! - Normally it is the service's own executable, exec'd (`posix_spawn`): it shares no memory
//!   with the service, whatever the service has grown to.
//! - When that executable is one another user could change (here: a group-writable copy), it
//!   is a fork of the service, made as soon as the watchdog starts, while the service is still
//!   small: a fork copies the page tables under `mmap_lock`, so forking a service that has
//!   grown freezes it (forked 50 ms in, after the demo had filled a 2 GiB cache, it froze the
//!   demo for 60-80 ms).

mod common;

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// A process's resident memory in KiB (its `VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn child_service() {
    if common::role().is_none() {
        return;
    }
    let ft = freezetrap::init_from_env();
    // Grow at once, as a service filling a cache at start does: 512 MiB, every page touched
    // (~200 ms of page faults here; a launcher forked 50 ms in held ~126 MiB of it, one forked
    // at once ~2.5 MiB).
    let mut cache = vec![0u8; 512 << 20];
    for i in (0..cache.len()).step_by(4096) {
        cache[i] = 1;
    }
    std::hint::black_box(&cache);
    let until = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        if let Some(p) = ft.watchdog().and_then(|w| w.capture_launcher_pid()) {
            break p;
        }
        assert!(Instant::now() < until, "no launcher within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    // A forked child shares the pages its parent had then: they count in its VmRSS.
    println!("LAUNCHER_RSS_KIB {}", rss_kib(pid));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    println!("LAUNCHER_ARGV0 {}", String::from_utf8_lossy(argv0));
    drop(ft);
}

/// Runs `child_service` from `exe` with a capture helper; returns the launcher's VmRSS (KiB)
/// and `argv[0]`.
fn launcher_of(exe: &std::path::Path, dir: &std::path::Path) -> (u64, String) {
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let helper = common::write_helper(dir, "helper.sh", "exit 0");
    let cmd = common::child("child_service", "service");
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(common::ROLE, "service")
        .env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_CAPTURE", &helper);
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
            .to_string()
    };
    (
        field("LAUNCHER_RSS_KIB ").parse().unwrap(),
        field("LAUNCHER_ARGV0 "),
    )
}

#[test]
fn the_launcher_is_the_services_executable_exec_d_and_shares_none_of_its_memory() {
    if common::role().is_some() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let exe = std::env::current_exe().unwrap();
    if std::fs::metadata(&exe).unwrap().mode() & 0o022 != 0 {
        // A build with umask 002: the next test covers what happens then.
        eprintln!(
            "skipped: this test binary is writable by group or others, so its launcher is forked"
        );
        return;
    }
    let dir = common::TempDir::new("launcher-exec");
    let (kib, argv0) = launcher_of(&exe, dir.path());
    assert_eq!(
        argv0, "freezetrap-launcher",
        "the launcher was forked, not exec'd"
    );
    assert!(kib < 32 << 10, "the exec'd launcher holds {kib} KiB");
}

#[test]
fn a_service_executable_others_could_change_forks_its_launcher_before_growing() {
    if common::role().is_some() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = common::TempDir::new("launcher-fork");
    // A copy of this test binary that group members could rewrite: exec'ing it as the
    // launcher would run whatever they put there.
    let exe = dir.path().join("service");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o775)).unwrap();
    let (kib, argv0) = launcher_of(&exe, dir.path());
    assert_eq!(
        argv0,
        exe.to_string_lossy(),
        "a group-writable executable was exec'd as the launcher"
    );
    assert!(
        kib < 32 << 10,
        "the launcher holds {kib} KiB of the service's 512 MiB cache: it was forked after the service grew"
    );
}
