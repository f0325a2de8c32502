//! The main job on small settings: the demo's report names the resize (suspect size and the
//! inserting function), and with eBPF the capture's summary shows the fork's mmap_lock write hold.

mod common;

use std::time::Duration;

fn demo_exe() -> std::path::PathBuf {
    // tests live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("freeze_demo");
    assert!(
        p.is_file(),
        "{} not built (cargo test builds examples)",
        p.display()
    );
    p
}

#[test]
fn the_demo_names_the_resize_and_captures_the_snapshot_freeze() {
    let ebpf = common::ebpf_or_skip(
        "the eBPF part of the_demo_names_the_resize_and_captures_the_snapshot_freeze",
    );
    let dir = common::TempDir::new("demo");
    let out_dir = dir.path().join("out");
    // 3.7M keys: the last resize builds a 2^23-bucket table of 136 MiB.
    let mut cmd = std::process::Command::new(demo_exe());
    cmd.arg("3700000")
        .env("FREEZETRAP_OUT", &out_dir)
        .env("FREEZETRAP_CAPTURE_DURATION", "5s")
        .env_remove("FREEZETRAP_ALLOC_THRESHOLD")
        .env_remove("FREEZETRAP_STALL")
        .env_remove("FREEZETRAP_CAPTURE");
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let lines = common::report_lines(&out_dir.join("report.jsonl"));
    let resize = lines
        .iter()
        .filter(|l| l["event"] == "stall" && l["thread_name"] == "indexer")
        .filter_map(|l| l["suspects"].as_array()?.first().cloned())
        .find(|s| s["size"].as_u64().unwrap_or(0) >= 128 << 20)
        .unwrap_or_else(|| panic!("no indexer stall names the 136 MiB resize:\n{stderr}"));
    assert!(
        resize["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["function"] == "freeze_demo::index_documents"),
        "{resize:#}"
    );
    assert!(
        stderr.contains("suspect: 136.00 MiB alloc on the same thread"),
        "{stderr}"
    );
    // The verdicts: the resize is first_touch on the indexer; the demo sized its snapshot so
    // the fork's freeze exceeds the stall threshold here, and the workers' stalls say
    // mmap_lock held by a fork (`fork (dup_mmap)` from the holder's kernel stack, or
    // `fork (dup_mmap), likely` when the holder was caught running, with no stack to read).
    let verdict_of = |l: &serde_json::Value| {
        (
            l["verdict"]["cause"].as_str().unwrap_or("").to_string(),
            l["verdict"]["culprit"]["what"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    assert!(
        lines
            .iter()
            .filter(|l| l["event"] == "stall" && l["thread_name"] == "indexer")
            .any(|l| verdict_of(l).0 == "first_touch"),
        "the resize's stall is first_touch:\n{stderr}"
    );
    assert!(
        stderr.contains("demo: a fork costs"),
        "the demo says how it sized the snapshot:\n{stderr}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l["event"] == "stall"
                && l["thread_name"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("worker-"))
            .map(verdict_of)
            .any(|(cause, what)| cause == "mmap_lock" && what.starts_with("fork (dup_mmap)")),
        "a snapshot's stall is mmap_lock held by fork:\n{stderr}"
    );

    if !ebpf {
        assert!(
            stderr.contains("demo: no eBPF capture: run as root with bpftrace installed"),
            "{stderr}"
        );
        return;
    }
    let holds: Vec<serde_json::Value> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("summary.json")).ok())
        .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
        .collect();
    let logs: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("helper.log")).ok())
        .collect();
    assert!(
        !holds.is_empty(),
        "no capture summary written:\n{stderr}\nhelper logs:\n{logs:#?}\nreport:\n{lines:#?}"
    );
    assert!(
        holds.iter().any(
            |s| s["mmap_lock"]["max_write_hold_us"].as_u64().unwrap_or(0) > 0
                && s["mmap_lock"]["holder_stack"]
                    .as_str()
                    .unwrap_or("")
                    .contains("dup_mmap")
        ),
        "no capture saw the snapshot fork's write hold: {holds:#?}\n{stderr}"
    );
}
