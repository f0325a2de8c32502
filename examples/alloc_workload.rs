//! The allocation-overhead workloads, for instruction counting under callgrind
//! (`bash benches/callgrind.sh` runs them all and prints the ratios).
//!
//! `alloc_workload WORKLOAD OPS THREADS`: every workload goes through the *global* allocator
//! (`__rust_alloc`), as a service's allocations do. Build with `--features bench-bare-jemalloc`
//! for the bare-jemalloc baseline; set `FREEZETRAP_ALLOC_THRESHOLD` for the "threshold set" case.
//! - `service`: a request loop (format a line, split it, build a key and a response, keep a
//!   bounded cache): what a service pays.
//! - `churn`: allocator-heavy: small `Vec`/`String`/`Box` churn plus `HashMap` inserts.
//! - `calls`: nothing but allocator calls (alloc/realloc/dealloc of 8..1024 bytes): the worst
//!   case, where the fixed per-call cost of the guard is all there is to see.
//!
//! `THREADS` (1 or more) runs the workload on that many threads at once.

#[path = "../benches/workload.rs"]
mod workload;

#[cfg(not(any(feature = "bench-bare-jemalloc", feature = "bench-minimal-wrapper")))]
use freezetrap::GuardedAlloc;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use tikv_jemallocator::Jemalloc;

#[cfg(not(any(feature = "bench-bare-jemalloc", feature = "bench-minimal-wrapper")))]
#[global_allocator]
static GLOBAL: GuardedAlloc<Jemalloc> = GuardedAlloc::new(Jemalloc);

/// The reference: one relaxed load and one compare of a word in this crate's static, nothing
/// more (its "slow path" only calls an out-of-line function).
#[cfg(feature = "bench-minimal-wrapper")]
struct Minimal(std::sync::atomic::AtomicUsize);

#[cfg(feature = "bench-minimal-wrapper")]
#[cold]
#[inline(never)]
fn minimal_slow(size: usize) {
    std::hint::black_box(size);
}

#[cfg(feature = "bench-minimal-wrapper")]
// SAFETY: forwards every call unchanged to jemalloc.
unsafe impl std::alloc::GlobalAlloc for Minimal {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= self.0.load(std::sync::atomic::Ordering::Relaxed) {
            minimal_slow(layout.size());
        }
        // SAFETY: the caller's request, unchanged.
        unsafe { Jemalloc.alloc(layout) }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's request, unchanged.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= self.0.load(std::sync::atomic::Ordering::Relaxed) {
            minimal_slow(layout.size());
        }
        // SAFETY: the caller's request, unchanged.
        unsafe { Jemalloc.alloc_zeroed(layout) }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if new >= self.0.load(std::sync::atomic::Ordering::Relaxed) {
            minimal_slow(new);
        }
        // SAFETY: the caller's request, unchanged.
        unsafe { Jemalloc.realloc(ptr, layout, new) }
    }
}

#[cfg(feature = "bench-minimal-wrapper")]
#[global_allocator]
static GLOBAL: Minimal = Minimal(std::sync::atomic::AtomicUsize::new(usize::MAX));

#[cfg(feature = "bench-bare-jemalloc")]
#[global_allocator]
static GLOBAL: Jemalloc = Jemalloc;

/// The global allocator as a `GlobalAlloc` value, so `run_workload` calls go through
/// `__rust_alloc` like every `Box` and `Vec` does.
struct Global;

// SAFETY: forwards every call unchanged to the global allocator.
unsafe impl std::alloc::GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's request, unchanged.
        unsafe { std::alloc::alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's request, unchanged.
        unsafe { std::alloc::dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's request, unchanged.
        unsafe { std::alloc::realloc(ptr, layout, new) }
    }
}

/// Allocator-heavy: short-lived small vectors, strings and boxes, and a map that grows.
#[inline(never)]
fn churn_workload(iterations: u32) -> u64 {
    let mut map: HashMap<u64, Vec<u8>, BuildHasherDefault<DefaultHasher>> = HashMap::default();
    let mut checksum = 0u64;
    for i in 0..iterations {
        let v: Vec<u64> = (0..(i % 16) as u64).collect();
        let s = String::from("freezetrap") + if i % 2 == 0 { "-even" } else { "-odd" };
        let b = Box::new([i as u8; 32]);
        checksum = checksum.wrapping_add(v.len() as u64 + s.len() as u64 + b[3] as u64);
        map.insert(u64::from(i % 50_000), vec![i as u8; 24]);
    }
    checksum.wrapping_add(map.len() as u64)
}

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
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "service".into());
    let ops: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let _ft = freezetrap::init_from_env();
    // The reference's word must be writable as the guard's is, or the compiler folds it away.
    #[cfg(feature = "bench-minimal-wrapper")]
    if let Some(v) = std::env::var_os("FREEZETRAP_ALLOC_THRESHOLD") {
        let t = v
            .to_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        GLOBAL.0.store(t, std::sync::atomic::Ordering::Relaxed);
    }
    let run = move || match workload.as_str() {
        "service" => service_workload(ops),
        "churn" => churn_workload(ops),
        "calls" => workload::run_workload(&Global, ops, 42),
        other => {
            eprintln!(
                "alloc_workload: unknown workload {other:?}: expected service, churn or calls"
            );
            std::process::exit(2);
        }
    };
    let sum = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(run.clone())).collect();
        handles
            .into_iter()
            .fold(0u64, |a, h| a.wrapping_add(h.join().unwrap()))
    });
    println!("{ops} ops on {threads} thread(s), checksum {sum:x}");
}
