//! The allocation-overhead workloads, for instruction counting under callgrind
//! (`bash benches/callgrind.sh` runs them all and prints the ratios).
//!
//! Variants (first argument):
//! - `service`: a small-allocation-heavy request loop through the *global* allocator (strings,
//!   vectors, boxes, a bounded map): what a service pays. Build with
//!   `--features bench-bare-jemalloc` for the bare-jemalloc baseline; set
//!   `FREEZETRAP_ALLOC_THRESHOLD` for the "threshold set" case.
//! - `bare`, `guard-off`, `guard-threshold`: nothing but allocator calls (alloc/realloc/dealloc
//!   of 8..1024 bytes) made directly on `Jemalloc` or on a `GuardedAlloc`: the worst case, where
//!   the fixed per-call cost of the guard is all there is to see.

#[path = "../benches/workload.rs"]
mod workload;

use freezetrap::GuardedAlloc;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use tikv_jemallocator::Jemalloc;

#[cfg(not(feature = "bench-bare-jemalloc"))]
#[global_allocator]
static GLOBAL: GuardedAlloc<Jemalloc> = GuardedAlloc::new(Jemalloc);

#[cfg(feature = "bench-bare-jemalloc")]
#[global_allocator]
static GLOBAL: Jemalloc = Jemalloc;

/// A guard instance for the direct-call variants (the threshold state is process-wide).
static GUARD: GuardedAlloc<Jemalloc> = GuardedAlloc::new(Jemalloc);

/// A request loop: parse a line into fields, build a key and a response, keep a bounded cache.
#[inline(never)]
fn service_workload(requests: u32) -> u64 {
    // A fixed hasher: a random seed would change the eviction order and so the instruction count.
    let mut cache: HashMap<String, Vec<u32>, BuildHasherDefault<DefaultHasher>> =
        HashMap::with_capacity_and_hasher(1024, Default::default());
    let mut checksum = 0u64;
    for i in 0..requests {
        let line = format!("GET /users/{} shard={} ttl={}", i % 5000, i % 16, i % 300);
        let fields: Vec<&str> = line.split(' ').collect();
        let key = format!("{}:{}", fields[1], fields[2]);
        let mut body: Vec<u32> = Vec::new();
        for j in 0..(i % 24) {
            body.push(j ^ i);
        }
        let boxed: Box<[u8; 48]> = Box::new([i as u8; 48]);
        checksum = checksum.wrapping_add(body.len() as u64 + boxed[7] as u64 + key.len() as u64);
        if cache.len() >= 1000 {
            let victim = cache.keys().next().cloned();
            if let Some(v) = victim {
                cache.remove(&v);
            }
        }
        cache.insert(key, body);
    }
    checksum
}

fn main() {
    let variant = std::env::args().nth(1).unwrap_or_else(|| "service".into());
    let ops: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let _ft = freezetrap::init_from_env();
    let sum = match variant.as_str() {
        "service" => service_workload(ops),
        "bare" => workload::run_workload(&Jemalloc, ops, 42),
        "guard-off" => {
            freezetrap::alloc_guard::set_threshold(None);
            workload::run_workload(&GUARD, ops, 42)
        }
        "guard-threshold" => {
            freezetrap::alloc_guard::set_threshold(Some(64 << 20));
            workload::run_workload(&GUARD, ops, 42)
        }
        other => {
            eprintln!("freezetrap: unknown variant {other:?}: expected service, bare, guard-off or guard-threshold");
            std::process::exit(2);
        }
    };
    println!("{variant}: {ops} ops, checksum {sum:x}");
}
