//! The test-suite assertion, used the way a service's own tests would use it: "this code path
//! never allocates 256 MiB at once".

use freezetrap::assert_no_large_allocs;
use std::collections::HashMap;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const LIMIT: usize = 64 << 20;

/// The code under test: builds an index. `reserve_up_front` is the incident's fix.
#[inline(never)]
fn build_index(n: u64, reserve_up_front: bool) -> HashMap<u64, u64> {
    let mut m = if reserve_up_front {
        HashMap::with_capacity(n as usize)
    } else {
        HashMap::new()
    };
    for k in 0..n {
        m.insert(k, k);
    }
    m
}

/// The line of the `Vec::with_capacity` call below, which reports must point at.
const BIG_BUFFER_LINE: u32 = line!() + 3;
#[inline(never)]
fn allocate_big_buffer(bytes: usize) -> Vec<u8> {
    Vec::with_capacity(bytes)
}

/// The intended use: a test that fails if a code path makes a single huge allocation.
#[test]
fn small_index_stays_under_the_limit() {
    let m = assert_no_large_allocs(LIMIT, || build_index(100_000, false));
    assert_eq!(m.len(), 100_000);
}

#[test]
fn a_growing_map_that_resizes_past_the_limit_is_caught_with_its_call_site() {
    // 3M entries of (u64, u64): the last resize allocates a 2^22-bucket table of 68 MiB.
    let err = std::panic::catch_unwind(|| {
        assert_no_large_allocs(LIMIT, || build_index(3_000_000, false))
    })
    .expect_err("a 128+ MiB table must trip a 64 MiB limit");
    let msg = err.downcast_ref::<String>().expect("String panic payload");
    let lines: Vec<&str> = msg.lines().collect();
    assert!(
        lines[0].starts_with("freezetrap: 1 allocation(s) of at least 67108864 bytes (64.00 MiB) inside assert_no_large_allocs"),
        "{msg}"
    );
    assert_eq!(lines.len(), 2, "one line per offending allocation:\n{msg}");
    assert!(lines[1].contains("bytes ("), "{msg}");
    assert!(
        lines[1].contains("assert_no_large_allocs::build_index")
            && lines[1].contains("tests/assert_no_large_allocs.rs:"),
        "the first frame outside the allocator and std must be the map's owner:\n{msg}"
    );
}

#[test]
fn every_offending_allocation_gets_a_line_with_size_and_location() {
    let err = std::panic::catch_unwind(|| {
        assert_no_large_allocs(LIMIT, || {
            let a = allocate_big_buffer(70 << 20);
            let b = allocate_big_buffer(100 << 20);
            let small = allocate_big_buffer(1 << 20);
            (a.capacity(), b.capacity(), small.capacity())
        })
    })
    .expect_err("two allocations over the limit");
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("freezetrap: 2 allocation(s)"), "{msg}");
    assert!(
        msg.contains("73400320 bytes (70.00 MiB) at assert_no_large_allocs::allocate_big_buffer (")
            && msg.contains(&format!(
                "tests/assert_no_large_allocs.rs:{BIG_BUFFER_LINE})"
            )),
        "{msg}"
    );
    assert!(
        msg.contains("104857600 bytes (100.00 MiB) at assert_no_large_allocs::allocate_big_buffer"),
        "{msg}"
    );
    assert!(
        !msg.contains("1048576 bytes"),
        "allocations under the limit are not listed:\n{msg}"
    );
}

#[test]
fn the_fix_passes_and_returns_the_value() {
    // Reserving up front still allocates the big table: the assertion reports it honestly...
    let err =
        std::panic::catch_unwind(|| assert_no_large_allocs(LIMIT, || build_index(4_000_000, true)));
    assert!(err.is_err());
    // ...while a limit above the reserved size passes and hands the body's value back.
    let m = assert_no_large_allocs(512 << 20, || build_index(4_000_000, true));
    assert_eq!(m.len(), 4_000_000);
}

#[test]
fn other_threads_allocations_are_not_counted() {
    // Another thread allocates big while our scope is active: it must not fail our assertion.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let noisy = std::thread::spawn(move || {
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let v = allocate_big_buffer(200 << 20);
            std::hint::black_box(&v);
            n += 1;
        }
        n
    });
    let r = assert_no_large_allocs(LIMIT, || {
        let mut acc = 0u64;
        for i in 0..2_000 {
            let v: Vec<u64> = (0..1000).map(|x| x * i).collect();
            acc += v.iter().sum::<u64>();
            std::thread::yield_now();
        }
        acc
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(noisy.join().unwrap() > 0);
    assert!(r > 0);
}

#[test]
fn nested_scopes_each_see_what_meets_their_limit() {
    let err = std::panic::catch_unwind(|| {
        assert_no_large_allocs(256 << 20, || {
            // The inner scope with a smaller limit catches the 100 MiB buffer; the outer one,
            // whose limit is 256 MiB, would not.
            assert_no_large_allocs(LIMIT, || allocate_big_buffer(100 << 20).capacity())
        })
    })
    .expect_err("inner scope must trip");
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("at least 67108864 bytes"),
        "the inner scope reports:\n{msg}"
    );
    // After the panic unwound both scopes, the threshold is back to off.
    assert_eq!(freezetrap::alloc_guard::threshold(), None);
    let v = assert_no_large_allocs(256 << 20, || allocate_big_buffer(100 << 20).capacity());
    assert!(v >= 100 << 20);
}

#[test]
fn realloc_growth_is_caught_as_a_realloc() {
    let err = std::panic::catch_unwind(|| {
        assert_no_large_allocs(LIMIT, || {
            let mut v: Vec<u8> = Vec::with_capacity(32 << 20);
            v.reserve_exact(96 << 20); // realloc from 32 MiB to 96 MiB
            v.capacity()
        })
    })
    .expect_err("a realloc to 96 MiB trips 64 MiB");
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("realloc to 100663296 bytes (96.00 MiB) from 33554432 bytes"),
        "{msg}"
    );
}
