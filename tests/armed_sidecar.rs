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
    let mut big = vec![0u8; 1536 << 20];
    for i in (0..big.len()).step_by(4096) {
        big[i] = 1;
    }
    let ft = freezetrap::init_from_env();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("mmapper-{i}"))
                .spawn(move || {
                    let hb = freezetrap::Heartbeat::new(&format!("mmapper-{i}"));
                    while !stop.load(Ordering::Relaxed) {
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
        .collect();
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
/// FREEZETRAP_TEST_ARGS (any binary can be the helper through `probes::capture::cli::run`).
#[test]
fn child_recorder() {
    if common::role().as_deref() != Some("recorder") {
        return;
    }
    let args = std::env::var("FREEZETRAP_TEST_ARGS").unwrap();
    let code = freezetrap::probes::capture::cli::run(args.split('\x1f').map(String::from));
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

#[test]
fn an_unprivileged_style_service_is_captured_by_the_armed_sidecar() {
    if common::role().is_some()
        || !common::ebpf_or_skip("an_unprivileged_style_service_is_captured_by_the_armed_sidecar")
    {
        return;
    }
    let dir = common::TempDir::new("sidecar");
    let service_out = dir.path().join("service");
    let captures = dir.path().join("captures");
    let mut service = common::child("child_service", "service")
        .env("FREEZETRAP_STALL", "12ms")
        .env("FREEZETRAP_TICK", "2ms")
        .env("FREEZETRAP_OUT", &service_out)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = service.id();
    let service_lines = lines_of(service.stdout.take().unwrap());
    let service_err = lines_of(service.stderr.take().unwrap());
    wait_for(&service_lines, "READY", Duration::from_secs(60));

    let args = [
        "arm",
        "--pid",
        &pid.to_string(),
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
    ]
    .join("\x1f");
    let mut recorder = common::child("child_recorder", "recorder")
        .env("FREEZETRAP_TEST_ARGS", args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_out = lines_of(recorder.stdout.take().unwrap());
    let rec_err = lines_of(recorder.stderr.take().unwrap());
    eprintln!(
        "{}",
        wait_for(&rec_err, "armed on pid", Duration::from_secs(30))
    );
    std::thread::sleep(Duration::from_millis(500));
    service.stdin.take().unwrap().write_all(b"go\n").unwrap();

    let limit = Instant::now() + Duration::from_secs(120);
    while service.try_wait().unwrap().is_none() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = service.kill();
    assert!(service.wait().unwrap().success());
    while recorder.try_wait().unwrap().is_none() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = recorder.kill();
    let status = recorder.wait().unwrap();
    let said: Vec<String> = rec_out.try_iter().collect();
    let errs: Vec<String> = rec_err.try_iter().collect();
    let service_said: Vec<String> = service_err.try_iter().collect();
    assert!(status.success(), "recorder: {said:#?}\n{errs:#?}");
    eprintln!("{}", said.join("\n"));

    // The service reported its stalls itself, without any capture helper.
    let stalls = common::stalls(&service_out.join("report.jsonl"));
    assert!(!stalls.is_empty(), "no stall reported: {service_said:#?}");
    assert!(
        stalls
            .iter()
            .all(|s| s["capture"]["status"] == "not configured"),
        "{stalls:#?}"
    );
    let ids: Vec<u64> = stalls.iter().map(|s| s["id"].as_u64().unwrap()).collect();

    // The sidecar captured at least one of them, freeze included.
    let dirs: Vec<_> = std::fs::read_dir(&captures)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("summary.json").is_file())
        .collect();
    assert!(!dirs.is_empty(), "no armed capture: {errs:#?}");
    let mut held = false;
    for d in &dirs {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["mode"], "armed");
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
