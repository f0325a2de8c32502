//! The armed flight recorder end to end: `freezetrap-capture arm` attached to a real process,
//! which makes a real mmap_lock freeze (a fork with 1 GiB resident while threads mmap) and only
//! 1.5 s later fires `freezetrap:stall_begin`. The capture must hold the freeze: data from before
//! the probe fired. Also the arm-specific error exits.

mod common;

use common::{ebpf_or_skip, lines_of, wait_for};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const EXE: &str = env!("CARGO_BIN_EXE_freezetrap-capture");

/// How long before the probe the freeze happens.
const LEAD_MS: u64 = 1500;

/// The target: 1 GiB resident and three mmapping threads. On "go" it forks (the freeze), waits
/// LEAD_MS, fires `stall_begin`, and lives 4 s more. It prints both CLOCK_MONOTONIC times.
#[test]
fn child_armed_target() {
    if std::env::var("FREEZETRAP_TEST_ROLE").as_deref() != Ok("armed-target") {
        return;
    }
    let big = common::resident_gib();
    common::start_mmappers(3);
    println!("READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let fork_ns = common::monotonic_ns();
    common::fork_once();
    println!("FORKED {fork_ns} {}", common::monotonic_ns());
    std::thread::sleep(Duration::from_millis(LEAD_MS));
    let probe_ns = common::monotonic_ns();
    // The stall began when the fork did (a watchdog's last heartbeat before it).
    probes::stall_begin(1, 0, probe_ns - fork_ns);
    println!("FIRED {probe_ns}");
    std::thread::sleep(Duration::from_millis(300));
    probes::stall_end(1, 300_000_000);
    std::thread::sleep(Duration::from_millis(3700));
    std::hint::black_box(&big);
}

/// Another process running the same executable, which reports a stall (id 99) every 50 ms:
/// the compiled recorder's uprobes are on the file, for every process running it, and only the
/// target's stalls may come through.
#[test]
fn child_armed_bystander() {
    if std::env::var("FREEZETRAP_TEST_ROLE").as_deref() != Ok("armed-bystander") {
        return;
    }
    println!("READY");
    for _ in 0..1200 {
        probes::stall_begin(99, 0, 1);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn armed_mode_captures_the_seconds_before_stall_begin() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("armed_mode_captures_the_seconds_before_stall_begin")
    {
        return;
    }
    armed_capture("compiled");
}

/// The same with `armed.bt` under bpftrace: the engine for kernels without BTF.
#[test]
fn armed_mode_with_bpftrace_captures_the_seconds_before_stall_begin() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("armed_mode_with_bpftrace_captures_the_seconds_before_stall_begin")
    {
        return;
    }
    armed_capture("bpftrace");
}

fn armed_capture(engine: &str) {
    let mut bystander = common::child("child_armed_bystander", "armed-bystander")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut bystander_seen = String::new();
    wait_for(
        &lines_of(bystander.stdout.take().unwrap()),
        "READY",
        60,
        &mut bystander_seen,
    );
    let mut target = common::child("child_armed_target", "armed-target")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = target.id();
    let target_out = lines_of(target.stdout.take().unwrap());
    let mut seen = String::new();
    wait_for(&target_out, "READY", 60, &mut seen);

    let out_dir: PathBuf = std::env::temp_dir().join(format!("freezetrap-armed-test-{pid}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut rec = Command::new(EXE)
        .args(["arm", "--pid", &pid.to_string(), "--out"])
        .arg(&out_dir)
        .args([
            "--window",
            "3",
            "--after",
            "1",
            "--cooldown",
            "0",
            "--for",
            "60",
            "--engine",
            engine,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_err = lines_of(rec.stderr.take().unwrap());
    let rec_out = lines_of(rec.stdout.take().unwrap());
    let mut rec_seen = String::new();
    let armed = wait_for(&rec_err, "armed on pid", 30, &mut rec_seen);
    eprintln!("{armed}");
    let with = if engine == "compiled" {
        "with the compiled program"
    } else {
        "with bpftrace"
    };
    assert!(armed.contains(with), "{armed}");
    // Two buckets of steady state before the freeze.
    std::thread::sleep(Duration::from_millis(600));
    target.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let forked = wait_for(&target_out, "FORKED", 30, &mut seen);
    let fired = wait_for(&target_out, "FIRED", 30, &mut seen);
    let began = wait_for(&rec_err, "stall 1 began", 30, &mut rec_seen);
    eprintln!("{began}");
    let line = wait_for(&rec_out, "(stall 1,", 30, &mut rec_seen);
    eprintln!("{line}");
    let _ = target.wait();
    let status = rec.wait().unwrap();
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(status.success(), "recorder failed: {status}\n{rec_seen}");
    rec_seen.extend(rec_err.iter().chain(rec_out.iter()).map(|l| l + "\n"));
    assert!(
        !rec_seen.contains("stall 99"),
        "another process's stall came through:\n{rec_seen}"
    );

    let fork_ns: u64 = forked.split_whitespace().nth(1).unwrap().parse().unwrap();
    let probe_ns: u64 = fired.split_whitespace().nth(1).unwrap().parse().unwrap();
    let dir = out_dir.join(format!("armed-{pid}-stall-1"));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["mode"], "armed");
    // No thread is off CPU longer than the window (3 s before, ~1 s after): a handful of
    // threads, 16 × 5 s is a generous bound (a wrong clock once made it 360 s).
    assert!(
        summary["offcpu_total_us"].as_u64().unwrap() < 16 * 5_000_000,
        "{summary:#}"
    );
    assert_eq!(summary["stalls"][0]["id"], 1);
    assert_eq!(summary["stalls"][0]["duration_ns"], 300_000_000u64);
    let probe_seen = summary["stalls"][0]["probe_ns"].as_u64().unwrap();
    assert!(
        probe_seen.abs_diff(probe_ns) < 50_000_000,
        "the probe's time as bpftrace saw it ({probe_seen}) is the target's ({probe_ns})"
    );
    let lock = &summary["mmap_lock"];
    assert!(
        lock["max_write_hold_us"].as_u64().unwrap() >= 1000,
        "{summary:#}"
    );
    assert!(
        lock["holder_stack"].as_str().unwrap().contains("dup_mmap"),
        "{summary:#}"
    );
    let window = &summary["window"];
    assert!(
        (-3250..=-2750).contains(&window["from_ms"].as_i64().unwrap()),
        "a 3 s window: {window}"
    );
    assert!(
        window["data_from_ms"].as_i64().unwrap() <= -(LEAD_MS as i64),
        "data from before the freeze: {window}"
    );

    // The freeze is in the timeline, in a bucket that ended before the probe fired, about
    // LEAD_MS earlier.
    let timeline = summary["timeline"].as_array().unwrap();
    // The longest hold is the fork's (other mmap_lock writers, e.g. the mmappers, can hold it
    // for a millisecond on a busy machine, but not for the fork's tens).
    let hold = timeline
        .iter()
        .max_by_key(|r| r["max_write_hold_us"].as_u64().unwrap())
        .filter(|r| r["max_write_hold_us"].as_u64().unwrap() >= 1000)
        .unwrap_or_else(|| panic!("no write hold in the timeline: {summary:#}"));
    let t_ms = hold["t_ms"].as_i64().unwrap();
    let expected = -((probe_ns - fork_ns) as i64 / 1_000_000);
    assert!(
        t_ms + 250 <= 0 && (t_ms - expected).abs() <= 300,
        "hold at {t_ms} ms, fork at {expected} ms relative to the probe: {summary:#}"
    );
    let before: u64 = timeline
        .iter()
        .filter(|r| r["t_ms"].as_i64().unwrap() < 0)
        .map(|r| r["offcpu_us"].as_u64().unwrap())
        .sum();
    assert!(
        before > 0,
        "off-CPU data from before the probe: {summary:#}"
    );

    // The probe said the whole process (thread 0) stalled from 1.5 s before it: the verdict
    // looks at that span and finds the fork.
    assert_eq!(summary["verdict"]["cause"], "mmap_lock", "{summary:#}");
    assert_eq!(
        summary["verdict"]["culprit"]["what"], "fork (dup_mmap)",
        "{summary:#}"
    );

    let off = std::fs::read_to_string(dir.join("offcpu.folded")).unwrap();
    assert!(
        off.lines().any(|l| l.starts_with("mmapper-")),
        "thread names in the folded stacks:\n{off}"
    );
    assert!(
        off.contains("rwsem_down_"),
        "waiters in rwsem slow paths:\n{off}"
    );
    common::assert_svg(&dir.join("offcpu.svg"));
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// How long the armed spinner spins, and when into it the probe fires (a watchdog detects a
/// stall some time after it began).
const SPIN_MS: u64 = 1200;
const DETECTED_AFTER_MS: u64 = 1000;

/// The target: on "go", thread `spinner` spins SPIN_MS in one function; DETECTED_AFTER_MS in,
/// `stall_begin` names it (as a watchdog would, some time after the stall began), and
/// `stall_end` fires when it is done. Plus the headline decoys.
#[test]
fn child_armed_spinner() {
    if std::env::var("FREEZETRAP_TEST_ROLE").as_deref() != Ok("armed-spinner") {
        return;
    }
    common::start_headline_decoys();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let spinner = std::thread::Builder::new()
        .name("spinner".into())
        .spawn(move || {
            tid_tx.send(common::gettid()).unwrap();
            go_rx.recv().unwrap();
            common::spin_in_one_function(
                std::time::Instant::now() + Duration::from_millis(SPIN_MS),
            );
        })
        .unwrap();
    let tid = tid_rx.recv().unwrap();
    println!("SPINNER {tid}");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let began = std::time::Instant::now();
    go_tx.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(DETECTED_AFTER_MS));
    probes::stall_begin(1, tid, began.elapsed().as_nanos() as u64);
    println!("FIRED");
    spinner.join().unwrap();
    probes::stall_end(1, began.elapsed().as_nanos() as u64);
    std::thread::sleep(Duration::from_secs(3));
}

/// The complaint about the armed capture of a 1.2 s spin: it must say the stalled
/// thread was on CPU in one function the whole time.
#[test]
fn an_armed_capture_concludes_on_the_stalled_thread() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("an_armed_capture_concludes_on_the_stalled_thread")
    {
        return;
    }
    let mut target = common::child("child_armed_spinner", "armed-spinner")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = target.id();
    let target_out = lines_of(target.stdout.take().unwrap());
    let mut seen = String::new();
    let tid: u64 = wait_for(&target_out, "SPINNER", 60, &mut seen)
        .rsplit("SPINNER ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out_dir: PathBuf = std::env::temp_dir().join(format!("freezetrap-armed-spin-{pid}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut rec = Command::new(EXE)
        .args(["arm", "--pid", &pid.to_string(), "--out"])
        .arg(&out_dir)
        .args([
            "--window",
            "3",
            "--after",
            "1",
            "--cooldown",
            "0",
            "--for",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_err = lines_of(rec.stderr.take().unwrap());
    let rec_out = lines_of(rec.stdout.take().unwrap());
    let mut rec_seen = String::new();
    wait_for(&rec_err, "armed on pid", 30, &mut rec_seen);
    std::thread::sleep(Duration::from_millis(600));
    target.stdin.take().unwrap().write_all(b"go\n").unwrap();
    wait_for(&target_out, "FIRED", 30, &mut seen);
    let line = wait_for(&rec_out, "(stall 1,", 30, &mut rec_seen);
    eprintln!("{line}");
    let _ = target.wait();
    let status = rec.wait().unwrap();
    assert!(status.success(), "recorder failed: {status}\n{rec_seen}");
    let dir = out_dir.join(format!("armed-{pid}-stall-1"));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    common::assert_concluded_on_cpu_in_the_spin(&summary, tid);
    assert!(
        line.contains(": on_cpu ("),
        "the line leads with the verdict: {line}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}

fn arm(args: &[&str]) -> (i32, String) {
    let out = Command::new(EXE).arg("arm").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn arm_errors_have_their_message_and_exit_code() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok() {
        return;
    }
    let me = std::process::id().to_string();
    let tmp = std::env::temp_dir().join(format!("freezetrap-arm-err-{me}"));
    let tmp = tmp.to_str().unwrap();

    let (c, e) = arm(&["--out", tmp]);
    assert_eq!(c, 2, "{e}");
    assert!(
        e.contains("required arguments were not provided")
            && e.contains("--pid <PID>|--binary <BINARY>"),
        "{e}"
    );
    let (c, e) = arm(&["--binary", "/nonexistent/service", "--out", tmp]);
    assert_eq!(c, 2, "{e}");
    assert_eq!(
        e.trim(),
        "freezetrap-capture: --binary /nonexistent/service: no such file"
    );
    let (c, e) = arm(&[
        "--pid",
        &me,
        "--out",
        tmp,
        "--bpftrace",
        "/nonexistent/bpftrace",
    ]);
    assert_eq!(c, 3, "{e}");
    assert!(e.contains("bpftrace not found"), "{e}");

    if unsafe { libc::geteuid() } != 0 {
        let (c, e) = arm(&["--pid", &me, "--out", tmp, "--bpftrace", "/bin/true"]);
        assert_eq!(c, 4, "{e}");
        assert!(
            e.contains("run the armed recorder as a root sidecar"),
            "{e}"
        );
        eprintln!("SKIPPED the root-only arm error cases: not root");
        return;
    }
    let (c, e) = arm(&[
        "--pid",
        "999999999",
        "--out",
        tmp,
        "--bpftrace",
        "/bin/true",
    ]);
    assert_eq!(c, 6, "{e}");
    assert_eq!(e.trim(), "freezetrap-capture: target pid 999999999 is gone");
    let (c, e) = arm(&[
        "--pid",
        &me,
        "--out",
        "/proc/1/nope",
        "--bpftrace",
        "/bin/true",
    ]);
    assert_eq!(c, 7, "{e}");
    assert!(
        e.contains("output directory /proc/1/nope is refused"),
        "{e}"
    );
    // An --out whose parent another user owns: that user could swap it; nothing is written.
    let parent = std::path::Path::new(tmp).join("theirs");
    std::fs::create_dir_all(&parent).unwrap();
    let c_parent = std::ffi::CString::new(parent.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(c_parent.as_ptr(), 65534, 65534) }, 0);
    let theirs = parent.join("captures");
    let (c, e) = arm(&[
        "--pid",
        &me,
        "--out",
        theirs.to_str().unwrap(),
        "--bpftrace",
        "/bin/true",
    ]);
    assert_eq!(c, 7, "{e}");
    assert!(e.contains("is owned by uid 65534, not root"), "{e}");
    assert!(
        !theirs.exists(),
        "nothing created under another user's directory"
    );
    // A process whose binary has no freezetrap probes: nothing could trigger a capture.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let (c, e) = arm(&[
        "--pid",
        &sleeper.id().to_string(),
        "--out",
        tmp,
        "--bpftrace",
        "/bin/true",
    ]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(c, 9, "{e}");
    assert!(e.contains("has no freezetrap:stall_begin probe"), "{e}");
    // A "bpftrace" that exits at once: the recorder says so instead of waiting forever.
    let (c, e) = arm(&[
        "--pid",
        &me,
        "--out",
        tmp,
        "--engine",
        "bpftrace",
        "--bpftrace",
        "/bin/true",
    ]);
    assert_eq!(c, 8, "{e}");
    assert!(
        e.starts_with(&format!(
            "freezetrap-capture: bpftrace stopped recording pid {me}"
        )),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(tmp);
}

/// A stand-in for bpftrace that says it attached and then hangs: `exec sleep`, so the pid the
/// recorder started is the one that must go away.
fn hanging_bpftrace(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("hanging-bpftrace");
    std::fs::write(
        &p,
        "#!/bin/sh\nprintf '{\"type\": \"printf\", \"data\": \"armed\"}\\n'\nexec sleep 1000\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s)
                if s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')) =>
            {
                return true
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

/// Neither a hung bpftrace nor a killed recorder leaves bpftrace behind.
#[test]
fn a_hung_bpftrace_is_stopped_and_a_killed_recorder_takes_it_along() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok() {
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED a_hung_bpftrace_is_stopped_and_a_killed_recorder_takes_it_along: the recorder's checks need root");
        return;
    }
    // This test binary carries the stall_begin probe (child_armed_target fires it).
    let me = std::process::id().to_string();
    let tmp = std::env::temp_dir().join(format!("freezetrap-arm-hang-{me}"));
    let fake = hanging_bpftrace(&tmp);
    let out = tmp.join("out");
    let out = out.to_str().unwrap();

    // Hung: silence past --silence-limit is exit 8, and the fake is stopped.
    let mut rec = Command::new(EXE)
        .args([
            "arm",
            "--pid",
            &me,
            "--out",
            out,
            "--silence-limit",
            "2",
            "--engine",
            "bpftrace",
            "--bpftrace",
        ])
        .arg(&fake)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_err = lines_of(rec.stderr.take().unwrap());
    let mut seen = String::new();
    wait_for(&rec_err, "armed on pid", 30, &mut seen);
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", rec.id()))
        .unwrap_or_default();
    let fake_pid: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let status = rec.wait().unwrap();
    // Everything the recorder said, up to the end of its stderr (the reader thread may lag
    // behind the exit).
    let said: Vec<String> =
        std::iter::from_fn(|| rec_err.recv_timeout(Duration::from_secs(5)).ok()).collect();
    assert_eq!(status.code(), Some(8), "{said:?}");
    assert!(
        said.iter()
            .any(|l| l == "freezetrap-capture: bpftrace printed nothing for 2 s; stopped it"),
        "{said:?}"
    );
    assert!(
        gone_within(fake_pid, Duration::from_secs(1)),
        "the hung bpftrace is still there"
    );

    // Killed: SIGKILL gives the recorder no chance to clean up; PR_SET_PDEATHSIG does it.
    let mut rec = Command::new(EXE)
        .args([
            "arm",
            "--pid",
            &me,
            "--out",
            out,
            "--engine",
            "bpftrace",
            "--bpftrace",
        ])
        .arg(&fake)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_err = lines_of(rec.stderr.take().unwrap());
    wait_for(&rec_err, "armed on pid", 30, &mut seen);
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", rec.id()))
        .unwrap_or_default();
    let fake_pid: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    rec.kill().unwrap();
    rec.wait().unwrap();
    assert!(
        gone_within(fake_pid, Duration::from_secs(3)),
        "bpftrace outlived the recorder that was killed"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `--rearm-every`: a fresh bpftrace replaces the old one (its stack maps never empty) and the
/// recorder goes on.
#[test]
fn the_recorder_rearms_with_a_fresh_bpftrace() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("the_recorder_rearms_with_a_fresh_bpftrace")
    {
        return;
    }
    // This test binary carries the stall_begin probe (child_armed_target fires it).
    let me = std::process::id().to_string();
    let out = std::env::temp_dir().join(format!("freezetrap-arm-rearm-{me}"));
    let rec = Command::new(EXE)
        .args([
            "arm",
            "--pid",
            &me,
            "--engine",
            "bpftrace",
            "--rearm-every",
            "2",
            "--for",
            "8",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&rec.stderr);
    assert!(rec.status.success(), "{err}");
    assert!(err.contains("armed on pid"), "{err}");
    assert!(err.contains(&format!("re-armed on pid {me}")), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
