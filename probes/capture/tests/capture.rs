//! freezetrap-capture end to end: a real mmap_lock freeze (a process with 1 GiB resident forks
//! while its threads mmap) recorded by the real bpftrace, and every error exit.

mod common;

use common::ebpf_or_skip;
use std::process::Command;
use std::time::Duration;

const EXE: &str = env!("CARGO_BIN_EXE_freezetrap-capture");

/// The target: 1 GiB resident, three threads that mmap, and a fork every 400 ms.
#[test]
fn child_forker() {
    if std::env::var("FREEZETRAP_TEST_ROLE").as_deref() != Ok("forker") {
        return;
    }
    let big = common::resident_gib();
    common::start_mmappers(3);
    println!("READY");
    loop {
        std::thread::sleep(Duration::from_millis(400));
        common::fork_once();
        std::hint::black_box(&big);
    }
}

#[test]
fn a_fork_freeze_is_captured_with_its_holder_and_waiters() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("a_fork_freeze_is_captured_with_its_holder_and_waiters")
    {
        return;
    }
    fork_freeze_capture("compiled");
}

/// The same with `capture.bt` under bpftrace: the engine for kernels without BTF.
#[test]
fn a_fork_freeze_is_captured_by_bpftrace_too() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("a_fork_freeze_is_captured_by_bpftrace_too")
    {
        return;
    }
    fork_freeze_capture("bpftrace");
}

fn fork_freeze_capture(engine: &str) {
    use std::io::BufRead;
    let mut target = common::child("child_forker", "forker")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(target.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.map(|l| l.contains("READY")).unwrap_or(false)),
        "target did not start"
    );
    let out_dir = std::env::temp_dir().join(format!(
        "freezetrap-capture-test-{}-{engine}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(EXE)
        .args([
            "--pid",
            &target.id().to_string(),
            "--tid",
            "0",
            "--stall-id",
            "1",
            "--out",
        ])
        .arg(&out_dir)
        .args(["--duration", "3", "--engine", engine])
        .output()
        .unwrap();
    let _ = target.kill();
    let _ = target.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("freezetrap-capture: recording"), "{stderr}");
    eprintln!("{stdout}");

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("summary.json")).unwrap()).unwrap();
    let lock = &summary["mmap_lock"];
    assert!(
        lock["max_write_hold_us"].as_u64().unwrap() >= 1000,
        "a fork holds the lock for ms: {summary:#}"
    );
    assert!(
        lock["holder_stack"].as_str().unwrap().contains("dup_mmap"),
        "{summary:#}"
    );
    assert!(lock["waiters"].as_u64().unwrap() >= 1, "{summary:#}");
    assert!(summary["offcpu_total_us"].as_u64().unwrap() > 0);
    // No thread is off CPU longer than the recording: the target has a handful of threads, so
    // 3 s each is a generous bound (a wrong clock once made it 430 s).
    assert!(
        summary["offcpu_total_us"].as_u64().unwrap() < 16 * 3_000_000,
        "{summary:#}"
    );
    assert!(
        stdout.contains("mmap_lock held for write") && stdout.contains("dup_mmap"),
        "{stdout}"
    );
    // The whole process stalled (--tid 0): the verdict names the fork as the holder.
    let v = &summary["verdict"];
    assert_eq!(v["cause"], "mmap_lock", "{summary:#}");
    assert_eq!(v["culprit"]["what"], "fork (dup_mmap)", "{summary:#}");
    assert!(
        stdout.starts_with(&format!(
            "freezetrap-capture: pid {} for 3 s: mmap_lock (",
            target.id()
        )),
        "the line leads with the verdict: {stdout}"
    );

    let off = std::fs::read_to_string(out_dir.join("offcpu.folded")).unwrap();
    assert!(
        off.lines().any(|l| l.starts_with("mmapper-")),
        "thread names in the folded stacks:\n{off}"
    );
    assert!(
        off.contains("rwsem_down_"),
        "waiters blocked in an rwsem slow path:\n{off}"
    );
    for l in off.lines() {
        let (stack, v) = l.rsplit_once(' ').expect("folded: stack value");
        assert!(!stack.is_empty() && v.parse::<u64>().is_ok(), "{l}");
    }
    assert!(std::fs::metadata(out_dir.join("oncpu.folded")).is_ok());

    common::assert_svg(&out_dir.join("offcpu.svg"));
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// The target: a thread `spinner` on CPU in one function all along, plus the headline decoys.
#[test]
fn child_spinner() {
    if std::env::var("FREEZETRAP_TEST_ROLE").as_deref() != Ok("spinner") {
        return;
    }
    common::start_headline_decoys();
    std::thread::Builder::new()
        .name("spinner".into())
        .spawn(|| {
            println!("SPINNER {}", common::gettid());
            common::spin_in_one_function(std::time::Instant::now() + Duration::from_secs(3600));
        })
        .unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The complaint: a thread spinning through the whole capture must be the verdict
/// (`on_cpu`, in that function), not an idle wait or freezetrap's own thread.
#[test]
fn a_spinning_thread_is_concluded_on_cpu_in_its_function() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !ebpf_or_skip("a_spinning_thread_is_concluded_on_cpu_in_its_function")
    {
        return;
    }
    let mut target = common::child("child_spinner", "spinner")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::lines_of(target.stdout.take().unwrap());
    let mut seen = String::new();
    let tid: u64 = common::wait_for(&lines, "SPINNER", 60, &mut seen)
        .rsplit("SPINNER ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out_dir =
        std::env::temp_dir().join(format!("freezetrap-capture-spin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(EXE)
        .args([
            "--pid",
            &target.id().to_string(),
            "--tid",
            &tid.to_string(),
            "--out",
        ])
        .arg(&out_dir)
        .args(["--duration", "2s"])
        .output()
        .unwrap();
    let _ = target.kill();
    let _ = target.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("summary.json")).unwrap()).unwrap();
    common::assert_concluded_on_cpu_in_the_spin(&summary, tid);
    assert!(
        stdout.contains(": on_cpu (high): thread 'spinner' ran"),
        "the line leads with the verdict: {stdout}"
    );
    common::assert_pprof_shows_the_spin(&out_dir);
    let _ = std::fs::remove_dir_all(&out_dir);
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(EXE).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the helper for a one-second capture of `pid` into `out` with `bpftrace` (as the engine:
/// these are bpftrace's error cases).
fn capture(pid: &str, out: &str, bpftrace: &str) -> (i32, String) {
    run(&[
        "--pid",
        pid,
        "--out",
        out,
        "--duration",
        "1",
        "--engine",
        "bpftrace",
        "--bpftrace",
        bpftrace,
    ])
}

#[test]
fn each_error_has_its_message_and_exit_code() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok() {
        return;
    }
    let me = std::process::id().to_string();
    let tmp = std::env::temp_dir().join(format!("freezetrap-capture-err-{me}"));
    let tmp = tmp.to_str().unwrap();

    let (c, e) = run(&["--out", tmp]);
    assert_eq!(c, 2, "{e}");
    assert!(
        e.contains("required arguments were not provided") && e.contains("--pid <PID>"),
        "{e}"
    );
    // --help and --version are answers, not errors.
    let out = Command::new(EXE).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--duration <DURATION>"));
    let out = Command::new(EXE).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("freezetrap-capture {}", env!("CARGO_PKG_VERSION"))
    );

    let (c, e) = capture(&me, tmp, "/nonexistent/bpftrace");
    assert_eq!(c, 3, "{e}");
    assert_eq!(e.trim(), "freezetrap-capture: bpftrace not found: install it (apt-get install bpftrace) or pass --bpftrace PATH");

    // /bin/true stands in for bpftrace below: the checks run before bpftrace is started.
    if unsafe { libc::geteuid() } != 0 {
        let (c, e) = capture(&me, tmp, "/bin/true");
        assert_eq!(c, 4, "{e}");
        assert!(e.contains("not permitted"), "{e}");
        eprintln!(
            "SKIPPED the target-gone and not-writable cases: they are checked after the root check"
        );
        return;
    }
    eprintln!("SKIPPED the not-root case: running as root");
    if !std::path::Path::new("/sys/kernel/tracing/events").exists() {
        let (c, e) = capture(&me, tmp, "/bin/true");
        assert_eq!(c, 5, "{e}");
        assert!(
            e.contains("mount -t tracefs nodev /sys/kernel/tracing"),
            "{e}"
        );
        return;
    }
    eprintln!("SKIPPED the tracefs-not-mounted case: tracefs is mounted");

    let (c, e) = capture("999999999", tmp, "/bin/true");
    assert_eq!(c, 6, "{e}");
    assert_eq!(e.trim(), "freezetrap-capture: target pid 999999999 is gone");

    let (c, e) = capture(&me, "/proc/1/nope", "/bin/true");
    assert_eq!(c, 7, "{e}");
    assert!(
        e.starts_with("freezetrap-capture: output directory /proc/1/nope is refused: "),
        "{e}"
    );
    // An --out whose parent another user owns: refused, and nothing is written there.
    let parent = std::path::Path::new(tmp).join("theirs");
    std::fs::create_dir_all(&parent).unwrap();
    let c_parent = std::ffi::CString::new(parent.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(c_parent.as_ptr(), 65534, 65534) }, 0);
    let (c, e) = capture(&me, parent.join("cap").to_str().unwrap(), "/bin/true");
    assert_eq!(c, 7, "{e}");
    assert!(e.contains("is owned by uid 65534, not root"), "{e}");
    assert!(!parent.join("cap").exists());

    // bpftrace that produces nothing (here: /bin/true) is a clear failure, not an empty capture.
    let (c, e) = capture(&me, tmp, "/bin/true");
    assert_eq!(c, 8, "{e}");
    assert!(
        e.starts_with("freezetrap-capture: bpftrace produced no data"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(tmp);
}

/// The attack that worked against the shared default directory: another user's directory with
/// `helper.log` pointing at a victim and a FIFO where the program used to be written. The
/// helper refuses the directory; the victim is untouched and nobody ever opens the FIFO.
#[test]
fn a_planted_directory_is_refused_and_nothing_in_it_is_touched() {
    if std::env::var("FREEZETRAP_TEST_ROLE").is_ok()
        || !common::ebpf_or_skip("a_planted_directory_is_refused_and_nothing_in_it_is_touched")
    {
        return; // root is needed to make a directory another user owns
    }
    use std::os::unix::ffi::OsStrExt;
    let base = std::env::temp_dir().join(format!("freezetrap-plant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let planted = base.join("stall-1-4242");
    std::fs::create_dir_all(&planted).unwrap();
    let victim = base.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("helper.log")).unwrap();
    let fifo = std::ffi::CString::new(planted.join("capture.bt").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let dir = std::ffi::CString::new(planted.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::chown(dir.as_ptr(), 65534, 65534) }, 0);
    // Watch the FIFO: a non-blocking open for writing succeeds only while someone reads it.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, fifo) = (done.clone(), fifo.clone());
        std::thread::spawn(move || {
            let mut opened = false;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let fd = unsafe { libc::open(fifo.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK) };
                if fd >= 0 {
                    opened = true;
                    unsafe { libc::close(fd) };
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            opened
        })
    };
    let me = std::process::id().to_string();
    let (c, e) = capture(&me, planted.to_str().unwrap(), "/bin/true");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(c, 7, "{e}");
    assert!(e.contains("is owned by uid 65534, not root"), "{e}");
    assert!(!watcher.join().unwrap(), "nobody read the planted FIFO");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let names: Vec<_> = std::fs::read_dir(&planted)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2, "nothing written there: {names:?}");
    let _ = std::fs::remove_dir_all(&base);
}
