//! Helpers shared by the integration tests: re-running this test binary as a child process,
//! and deciding whether an eBPF test may run here.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The environment variable that tells a re-executed test binary which child role to play.
pub const ROLE: &str = "FREEZETRAP_TEST_ROLE";

/// The role this process was started for, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// A command that re-runs this test binary, executing only the test `test_name` in role `role`.
pub fn child(test_name: &str, role: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current_exe"));
    c.args([
        "--exact",
        test_name,
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    c.env(ROLE, role);
    for v in [
        "FREEZETRAP_ALLOC_THRESHOLD",
        "FREEZETRAP_REPORT",
        "FREEZETRAP_OUT",
        "FREEZETRAP_STALL",
        "FREEZETRAP_CAPTURE",
        "FREEZETRAP_QUIET",
        "FREEZETRAP_BACKTRACE_DEPTH",
    ] {
        c.env_remove(v);
    }
    c
}

/// Runs `cmd` to completion, killing it after `limit` (a hang is a test failure, not a hung CI).
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "child did not finish within {limit:?} (hang?)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether eBPF tests can run: root and `bpftrace` on PATH. When they cannot, the test skips
/// with a message, unless `FREEZETRAP_REQUIRE_EBPF=1`, which turns the skip into a failure (CI
/// sets it so the eBPF path is always exercised there).
pub fn ebpf_or_skip(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let bpftrace = which("bpftrace").is_some();
    let required = std::env::var("FREEZETRAP_REQUIRE_EBPF").as_deref() == Ok("1");
    if root && bpftrace {
        return true;
    }
    let why = match (root, bpftrace) {
        (false, false) => "not root and bpftrace not installed",
        (false, true) => "not root",
        _ => "bpftrace not installed (apt-get install bpftrace)",
    };
    if required {
        panic!("freezetrap: {test} needs eBPF but {why}, and FREEZETRAP_REQUIRE_EBPF=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why} (set FREEZETRAP_REQUIRE_EBPF=1 to make this a failure)");
    false
}

/// The full path of `prog` on PATH.
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// A fresh, empty directory under the target dir's tmp, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir().join(format!(
            "freezetrap-test-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(tag) as u128)
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        TempDir(base)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an executable shell-script helper (mode 0700) into `dir` and returns its path. The
/// watchdog runs it directly (the kernel reads the `#!` line; no shell is involved on our side).
pub fn write_helper(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
    p
}

/// Wall-clock nanoseconds (what `date +%s%N` prints in a helper script).
pub fn realtime_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The JSON lines of a report file.
pub fn report_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The `stall` events of a report file.
pub fn stalls(path: &std::path::Path) -> Vec<serde_json::Value> {
    report_lines(path)
        .into_iter()
        .filter(|j| j["event"] == "stall")
        .collect()
}

/// `bytes` of memory with every page touched: resident, so that a `fork()` must copy page tables
/// for all of it while holding mmap_lock for write.
pub fn resident(bytes: usize) -> Vec<u8> {
    let mut big = vec![0u8; bytes];
    for i in (0..big.len()).step_by(4096) {
        big[i] = 1;
    }
    big
}

/// `n` heartbeating threads named `mmapper-N` that map, touch and unmap 64 KiB in a loop until
/// `stop`: each mmap takes mmap_lock for write, so they wait (and their heartbeats stall) while
/// a fork holds it. They sleep 200 µs per turn: on 2 cores, spinning workers would starve each
/// other into stalls that have nothing to do with the lock.
pub fn heartbeating_mmappers(
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("mmapper-{i}"))
                .spawn(move || {
                    let hb = freezetrap::Heartbeat::new(&format!("mmapper-{i}"));
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        hb.beat();
                        // SAFETY: a fresh private anonymous mapping, touched and unmapped.
                        unsafe {
                            let p = libc::mmap(
                                std::ptr::null_mut(),
                                1 << 16,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                                -1,
                                0,
                            );
                            assert_ne!(p, libc::MAP_FAILED);
                            *(p as *mut u8) = 1;
                            libc::munmap(p, 1 << 16);
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
                .unwrap()
        })
        .collect()
}

/// What a verdict scenario's service reported.
pub struct Scenario {
    /// The `stall` lines of its report.
    pub stalls: Vec<serde_json::Value>,
    /// Its stderr.
    pub stderr: String,
    /// Its stdout.
    pub stdout: String,
}

impl Scenario {
    /// The stalls whose verdict is `cause`.
    pub fn with_cause(&self, cause: &str) -> Vec<&serde_json::Value> {
        self.stalls
            .iter()
            .filter(|s| s["verdict"]["cause"] == cause)
            .collect()
    }

    /// Every stall's cause, confidence and text, for failure messages.
    pub fn verdicts(&self) -> String {
        self.stalls
            .iter()
            .map(|s| {
                format!(
                    "{} '{}' {} ms: {} ({}) {} | evidence {}",
                    s["scope"],
                    s["thread_name"].as_str().unwrap_or(""),
                    s["duration_ns"].as_u64().unwrap_or(0) / 1_000_000,
                    s["verdict"]["cause"],
                    s["verdict"]["confidence"],
                    s["verdict"]["text"],
                    s["verdict"]["evidence"]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs this test binary's `test_name` in `role` as a service with the watchdog on (stall
/// threshold `stall`), extra environment `env`, and returns what it reported. `prepare` may
/// act on the running child (its pid) before it is waited for.
pub fn run_scenario(
    test_name: &str,
    role: &str,
    stall: &str,
    env: &[(&str, &str)],
    prepare: impl FnOnce(u32),
) -> Scenario {
    use std::process::Stdio;
    let dir = TempDir::new(role);
    let out = dir.path().join("out");
    let mut cmd = child(test_name, role);
    cmd.env("FREEZETRAP_STALL", stall)
        .env("FREEZETRAP_OUT", &out)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .env("FREEZETRAP_ALLOC_THRESHOLD", "64MiB")
        .env("FREEZETRAP_QUIET", "1")
        .env("FT_SCRATCH", dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut c = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the service");
    prepare(c.id());
    drop(c.stdin.take()); // "go": the service reads stdin to its end before its stall
    let start = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = c.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "the {role} service failed: {:?}\n{stderr}",
        o.status
    );
    if std::env::var_os("FT_SHOW_VERDICTS").is_some() {
        eprintln!("== {role}\n{stderr}");
    }
    Scenario {
        stalls: stalls(&out.join("report.jsonl")),
        stderr,
        stdout,
    }
}

/// Waits for stdin to close: the test's "go".
pub fn wait_for_go() {
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s);
}

/// A heartbeat that beats for `ms` (every 5 ms), on the calling thread.
pub fn beat_for(hb: &freezetrap::Heartbeat, ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        hb.beat();
        std::thread::sleep(Duration::from_millis(5));
    }
}
