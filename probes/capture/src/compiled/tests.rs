//! The compiled program against this very process: threads that sleep have each of their
//! blocks measured, whether their clocks live in a slot of the program's table or (slot taken)
//! in task storage.

use super::{Recording, Settings, SLOTS};
use crate::armed::Event;
use std::collections::BTreeMap;
use std::time::Duration;

/// Root and kernel BTF, or a skip (a failure under `FREEZETRAP_REQUIRE_EBPF=1`).
fn compiled_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    if root && btf {
        return true;
    }
    let why = if root { "no kernel BTF" } else { "not root" };
    assert!(
        std::env::var("FREEZETRAP_REQUIRE_EBPF").as_deref() != Ok("1"),
        "freezetrap: {test} needs eBPF but {why}, and FREEZETRAP_REQUIRE_EBPF=1 forbids skipping"
    );
    eprintln!("SKIPPED {test}: {why} (set FREEZETRAP_REQUIRE_EBPF=1 to make this a failure)");
    false
}

const THREADS: usize = 4;
const SLEEPS: u32 = 5;
const SLEEP: Duration = Duration::from_millis(20);

/// Microseconds off CPU per tid of the `ft-slot-*` threads, recorded with `slots` slots.
fn blocks_by_thread(slots: u32) -> BTreeMap<u32, u64> {
    let mut rec = Recording::start(&Settings {
        pid: std::process::id(),
        exe: None,
        min_block_us: 5_000,
        bucket_ms: 100,
        slots,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("ft-slot-{i}"))
                .spawn(|| {
                    for _ in 0..SLEEPS {
                        std::thread::sleep(SLEEP);
                    }
                })
                .unwrap()
        })
        .collect();
    let mut off: BTreeMap<u32, u64> = BTreeMap::new();
    let mut add = |e: Event| {
        if let Event::Map { name, entries } = e {
            if name != "@off" {
                return;
            }
            for (_bucket, key, us) in entries {
                let mut fields = key.splitn(3, ',');
                let tid: u32 = fields.next().unwrap().parse().unwrap();
                if fields.next().unwrap().starts_with("ft-slot-") {
                    *off.entry(tid).or_default() += us;
                }
            }
        }
    };
    for t in threads {
        t.join().unwrap();
    }
    rec.poll(base::clock::monotonic_ns(), true, &mut add);
    off
}

#[test]
fn every_block_is_measured_in_a_slot_or_in_task_storage() {
    if !compiled_or_skip("every_block_is_measured_in_a_slot_or_in_task_storage") {
        return;
    }
    // All slots (each thread in its own, as in production), then one slot (held by whichever
    // thread of this process came back first: the others fall back to task storage).
    for slots in [SLOTS, 1] {
        let off = blocks_by_thread(slots);
        assert_eq!(
            off.len(),
            THREADS,
            "{slots} slots: a block of each thread: {off:?}"
        );
        // A new thread's first run does not come back through __schedule(), so its first
        // sleep's return is its first sight: SLEEPS - 1 blocks are measured, each >= SLEEP.
        let least = (SLEEPS - 1) as u64 * SLEEP.as_micros() as u64;
        for (tid, us) in &off {
            assert!(
                (least..1_000_000).contains(us),
                "{slots} slots: thread {tid} was off CPU {us} µs, expected at least {least} \
                 and well under a second: {off:?}"
            );
        }
    }
}
