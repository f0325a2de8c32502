//! A heartbeat thread blocked for ~1 s is reported as a thread stall while it is still going on:
//! the helper starts before the block ends, with the contract's arguments, and the report names
//! the large allocation the thread made just before (or none when there was none).

mod common;

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const BIG: usize = 96 << 20;

#[inline(never)]
fn resize_index() -> Vec<u8> {
    std::hint::black_box(Vec::with_capacity(BIG))
}

#[test]
fn child_service() {
    let Some(role) = common::role() else { return };
    let ft = freezetrap::init_from_env();
    let with_alloc = role == "with-alloc";
    let shard = std::thread::Builder::new()
        .name("shard-3".into())
        .spawn(move || {
            let hb = freezetrap::Heartbeat::new("shard-3");
            for _ in 0..30 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            let keep = with_alloc.then(resize_index);
            println!("TID {}", base::thread::current_tid());
            std::thread::sleep(Duration::from_millis(1000)); // the stall
            println!("BLOCK_END {}", common::realtime_ns());
            for _ in 0..30 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(keep);
        })
        .unwrap();
    shard.join().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // let the helper finish
    drop(ft);
}

struct Run {
    stall: serde_json::Value,
    stderr: String,
    stdout: String,
    out_dir: std::path::PathBuf,
    _dir: common::TempDir,
    child_pid: u32,
}

fn run(role: &str) -> Run {
    let dir = common::TempDir::new(role);
    let out_dir = dir.path().join("out");
    let helper = common::write_helper(
        dir.path(),
        "helper.sh",
        "date +%s%N > \"$8/started\"\necho \"$@\" > \"$8/args\"\nsleep 0.2\necho helper-done",
    );
    let mut cmd = common::child("child_service", role);
    cmd.env("FREEZETRAP_STALL", "200ms")
        .env("FREEZETRAP_ALLOC_THRESHOLD", "32MiB")
        .env("FREEZETRAP_CAPTURE", &helper)
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_REPORT", "report.jsonl")
        .env("FREEZETRAP_CAPTURE_DURATION", "3s");
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let child_pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stderr}");
    let stalls = common::stalls(&out_dir.join("report.jsonl"));
    assert_eq!(stalls.len(), 1, "one stall:\n{stalls:#?}\n{stderr}");
    Run {
        stall: stalls[0].clone(),
        stderr,
        stdout,
        out_dir,
        _dir: dir,
        child_pid,
    }
}

fn value_after<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
        .trim()
}

#[test]
fn a_blocked_heartbeat_is_a_thread_stall_and_the_helper_starts_during_it() {
    if common::role().is_some() {
        return;
    }
    let r = run("with-alloc");
    let s = &r.stall;
    let tid: u64 = value_after(&r.stdout, "TID ").parse().unwrap();
    assert_eq!(s["scope"], "thread");
    assert_eq!(s["thread_name"], "shard-3");
    assert_eq!(s["thread_id"], tid);
    let d = s["duration_ns"].as_u64().unwrap();
    assert!((900_000_000..2_000_000_000).contains(&d), "duration {d}");

    // The suspect: our 96 MiB allocation, same thread, with its call site.
    let top = &s["suspects"][0];
    assert_eq!(top["size"], BIG as u64);
    assert_eq!(top["thread_id"], tid);
    assert_eq!(top["in_flight"], false);
    assert!(
        top["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["function"] == "watchdog_thread_stall::resize_index"),
        "{top:#}"
    );

    // The helper ran during the stall, with the contract's arguments.
    let dir = std::path::PathBuf::from(s["capture"]["dir"].as_str().expect("capture dir"));
    assert!(dir.starts_with(&r.out_dir));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let started: u128 = std::fs::read_to_string(dir.join("started"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let block_end: u128 = value_after(&r.stdout, "BLOCK_END ").parse().unwrap();
    assert!(
        started < block_end,
        "helper started {} ms after the stall ended",
        (started - block_end) / 1_000_000
    );
    let args = std::fs::read_to_string(dir.join("args")).unwrap();
    let id = s["id"].as_u64().unwrap();
    assert_eq!(
        args.trim(),
        format!(
            "--pid {} --tid {tid} --stall-id {id} --out {} --duration 3",
            r.child_pid,
            dir.display()
        )
    );
    assert!(std::fs::read_to_string(dir.join("helper.log"))
        .unwrap()
        .contains("helper-done"));
    let status = s["capture"]["status"].as_str().unwrap();
    assert!(status == "running" || status == "exited 0", "{status}");

    // The human summary.
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("freezetrap: thread 'shard-3'"))
        .unwrap_or_else(|| panic!("{}", r.stderr));
    assert!(
        line.contains(" stalled 1.0") || line.contains(" stalled 1.1"),
        "{line}"
    );
    assert!(
        line.contains("; suspect: 96.00 MiB alloc on the same thread "),
        "{line}"
    );
    assert!(
        line.contains(" at watchdog_thread_stall::resize_index ("),
        "{line}"
    );
    // It points at the capture directory (which exists), never at a file that may not.
    assert!(
        line.contains(&format!("; capture: {}; ", dir.display())),
        "{line}"
    );
    // And ends with the verdict: the thread slept, which freezetrap says in so many words.
    let v = &s["verdict"];
    assert_eq!(v["cause"], "unknown", "{v:#}");
    assert!(
        line.ends_with(v["text"].as_str().unwrap())
            && line.contains("asleep (state S in hrtimer_nanosleep"),
        "{line}"
    );
    // Kernel view of the stalled thread: sleeping in a timer.
    let me = s["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tid"] == tid)
        .expect("stalled thread in the kernel view");
    assert_eq!(me["state"], "S");
}

#[test]
fn a_stall_without_a_large_allocation_names_no_suspect() {
    if common::role().is_some() {
        return;
    }
    let r = run("no-alloc");
    assert_eq!(
        r.stall["suspects"].as_array().unwrap().len(),
        0,
        "{:#}",
        r.stall
    );
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("freezetrap: thread 'shard-3'"))
        .unwrap();
    assert!(line.contains("; no large allocation before it"), "{line}");
}
