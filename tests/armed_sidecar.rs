//! The second deployment mode end to end: a service with only `FREEZETRAP_STALL` set (no
//! capture helper, nothing that needs privileges) and the armed recorder beside it. A real fork
//! freeze stalls the service's heartbeating workers; its watchdog fires `freezetrap:stall_begin`;
//! the recorder writes a capture whose window holds the freeze and names the same stall ids as the
//! service's own report.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// The service: 1.5 GiB resident (a fork holds mmap_lock for ~30-60 ms), three heartbeating mmap workers; on "go" it forks three times,
/// 700 ms apart, then lives 2.5 s more.
#[test]
fn child_service() {
    if common::role().as_deref() != Some("service") {
        return;
    }
    let big = common::resident(1536 << 20);
    let ft = freezetrap::init_from_env();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = common::heartbeating_mmappers(3, stop.clone());
    println!("READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    for _ in 0..3 {
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::_exit(0) };
        }
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        std::thread::sleep(Duration::from_millis(700));
    }
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    drop(ft);
    std::hint::black_box(&big);
}

/// The recorder: this test binary running `freezetrap-capture` with the arguments in
/// FREEZETRAP_TEST_ARGS (any binary can be the helper through `freezetrap_capture::cli::run`).
#[test]
fn child_recorder() {
    if common::role().as_deref() != Some("recorder") {
        return;
    }
    let args = std::env::var("FREEZETRAP_TEST_ARGS").unwrap();
    let code = freezetrap_capture::cli::run(args.split('\x1f').map(String::from));
    assert_eq!(code, ExitCode::SUCCESS, "the recorder failed");
}

fn lines_of(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(reader).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, what: &str, limit: Duration) -> String {
    let until = Instant::now() + limit;
    let mut seen = String::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(what) => return l,
            Ok(l) => seen.push_str(&(l + "\n")),
            Err(_) => break,
        }
    }
    panic!("no {what:?} within {limit:?}; saw:\n{seen}");
}

/// A running service child: its pid and output lines.
struct Service {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    errors: mpsc::Receiver<String>,
    out: std::path::PathBuf,
}

/// Starts `exe` (this test binary or a copy of it) as the service, reporting into `out`, and
/// waits until it is ready for "go".
fn start_service(exe: &std::path::Path, out: &std::path::Path) -> Service {
    let template = common::child("child_service", "service");
    let mut child = std::process::Command::new(exe)
        .args(template.get_args())
        .envs(template.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("FREEZETRAP_STALL", "12ms")
        .env("FREEZETRAP_TICK", "2ms")
        .env("FREEZETRAP_OUT", out)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let errors = lines_of(child.stderr.take().unwrap());
    wait_for(&lines, "READY", Duration::from_secs(60));
    Service {
        child,
        lines,
        errors,
        out: out.to_path_buf(),
    }
}

impl Service {
    /// Sends "go" (three forks follow), waits for the exit, and returns the stall ids it reported
    /// (never with a capture of its own).
    fn freeze_and_finish(mut self) -> Vec<u64> {
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let limit = Instant::now() + Duration::from_secs(120);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        assert!(self.child.wait().unwrap().success());
        let _ = self.lines.try_iter().count();
        let said: Vec<String> = self.errors.try_iter().collect();
        let stalls = common::stalls(&self.out.join("report.jsonl"));
        assert!(!stalls.is_empty(), "no stall reported: {said:#?}");
        // A stall detected while every record was in use is still said, as `stall_dropped`.
        let dropped: Vec<u64> = common::report_lines(&self.out.join("report.jsonl"))
            .iter()
            .filter(|l| l["event"] == "stall_dropped")
            .map(|l| l["id"].as_u64().unwrap())
            .collect();
        assert!(
            stalls
                .iter()
                .all(|s| s["capture"]["status"] == "not configured"),
            "{stalls:#?}"
        );
        stalls
            .iter()
            .map(|s| s["id"].as_u64().unwrap())
            .chain(dropped)
            .collect()
    }
}

/// Starts this test binary as `freezetrap-capture` with `args`.
fn start_recorder(
    args: &[&str],
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    mpsc::Receiver<String>,
) {
    let mut recorder = common::child("child_recorder", "recorder")
        .env("FREEZETRAP_TEST_ARGS", args.join("\x1f"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(recorder.stdout.take().unwrap());
    let err = lines_of(recorder.stderr.take().unwrap());
    (recorder, out, err)
}

/// Waits for the recorder to exit (after a SIGTERM when `terminate`) and returns its stdout and
/// stderr lines.
fn finish_recorder(
    mut recorder: std::process::Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    terminate: bool,
) -> (Vec<String>, Vec<String>) {
    if terminate {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(recorder.id() as libc::pid_t, libc::SIGTERM) };
    }
    let limit = Instant::now() + Duration::from_secs(120);
    while recorder.try_wait().unwrap().is_none() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = recorder.kill();
    let status = recorder.wait().unwrap();
    // Up to the end of the recorder's output (the reader threads may lag behind its exit).
    let drain = |rx: mpsc::Receiver<String>| -> Vec<String> {
        std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(5)).ok()).collect()
    };
    let (said, errs) = (drain(out), drain(err));
    assert!(status.success(), "recorder: {said:#?}\n{errs:#?}");
    eprintln!("{}", said.join("\n"));
    (said, errs)
}

/// Checks the armed captures of `pid` in `captures`: every one names stalls from `ids` and has
/// data from before its probe, and one holds the fork's write hold.
fn check_captures(captures: &std::path::Path, pid: u32, ids: &[u64], errs: &[String]) {
    let dirs: Vec<_> = std::fs::read_dir(captures)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("armed-{pid}-"))
                && p.join("summary.json").is_file()
        })
        .collect();
    assert!(!dirs.is_empty(), "no armed capture of pid {pid}: {errs:#?}");
    let mut held = false;
    for d in &dirs {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["mode"], "armed");
        assert_eq!(s["pid"], pid);
        for st in s["stalls"].as_array().unwrap() {
            let id = st["id"].as_u64().unwrap();
            assert!(ids.contains(&id), "stall {id} not in the report's {ids:?}");
        }
        let timeline = s["timeline"].as_array().unwrap();
        assert!(timeline.iter().any(|r| r["t_ms"].as_i64().unwrap() < 0));
        if s["mmap_lock"]["holder_stack"]
            .as_str()
            .unwrap()
            .contains("dup_mmap")
            && s["mmap_lock"]["max_write_hold_us"].as_u64().unwrap() >= 1000
        {
            held = true;
        }
    }
    assert!(held, "no capture shows the fork's write hold: {dirs:?}");
}

#[test]
fn an_unprivileged_style_service_is_captured_by_the_armed_sidecar() {
    if common::role().is_some()
        || !common::ebpf_or_skip("an_unprivileged_style_service_is_captured_by_the_armed_sidecar")
    {
        return;
    }
    let dir = common::TempDir::new("sidecar");
    let captures = dir.path().join("captures");
    let service = start_service(
        &std::env::current_exe().unwrap(),
        &dir.path().join("service"),
    );
    let pid = service.child.id().to_string();
    let (rec, out, err) = start_recorder(&[
        "arm",
        "--pid",
        &pid,
        "--out",
        captures.to_str().unwrap(),
        "--window",
        "3",
        "--after",
        "1",
        "--cooldown",
        "0",
        "--for",
        "90",
    ]);
    eprintln!(
        "{}",
        wait_for(&err, "armed on pid", Duration::from_secs(30))
    );
    std::thread::sleep(Duration::from_millis(500));
    let ids = service.freeze_and_finish();
    // With --pid the recorder exits on its own when the service does.
    let (_, errs) = finish_recorder(rec, out, err, false);
    check_captures(&captures, pid.parse().unwrap(), &ids, &errs);
}

/// `--binary`: the recorder waits for the service's executable to run, and follows a restart.
#[test]
fn the_binary_mode_recorder_follows_a_restart() {
    if common::role().is_some()
        || !common::ebpf_or_skip("the_binary_mode_recorder_follows_a_restart")
    {
        return;
    }
    let dir = common::TempDir::new("sidecar-binary");
    // A copy of this test binary is the service: a different inode from the test runner, so
    // only the service's processes match.
    let exe = dir.path().join("service-bin");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let captures = dir.path().join("captures");
    let (rec, out, err) = start_recorder(&[
        "arm",
        "--binary",
        exe.to_str().unwrap(),
        "--out",
        captures.to_str().unwrap(),
        "--window",
        "3",
        "--after",
        "1",
        "--cooldown",
        "0",
        "--for",
        "150",
    ]);
    wait_for(
        &err,
        "waiting for a process running",
        Duration::from_secs(30),
    );
    let mut runs = Vec::new();
    for run in 0..2 {
        let service = start_service(&exe, &dir.path().join(format!("service-{run}")));
        let pid = service.child.id();
        eprintln!(
            "{}",
            wait_for(
                &err,
                &format!("armed on pid {pid}"),
                Duration::from_secs(30)
            )
        );
        std::thread::sleep(Duration::from_millis(500));
        runs.push((pid, service.freeze_and_finish()));
    }
    // With --binary it waits for the next run; SIGTERM ends it cleanly.
    wait_for(
        &err,
        "waiting for a process running",
        Duration::from_secs(30),
    );
    let (_, errs) = finish_recorder(rec, out, err, true);
    for (pid, ids) in &runs {
        check_captures(&captures, *pid, ids, &errs);
    }
}
