//! Stress: 8 threads x 1M random-size allocations, some oversized. Every oversized allocation
//! must be accounted for exactly: reported + dropped == the number the threads made.

use freezetrap::alloc_guard::{self, internal::Cursor, internal::RING};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

const THREADS: u64 = 8;
const PER_THREAD: u64 = 1_000_000;
/// Oversized here means >= 64 KiB: small enough to make tens of thousands of events quickly.
const THRESHOLD: usize = 64 << 10;

#[test]
fn every_oversized_allocation_is_reported_or_counted_as_dropped() {
    alloc_guard::set_threshold(Some(THRESHOLD));
    let start_seq = RING.recorded();
    let done = Arc::new(AtomicBool::new(false));

    // The consumer: a cursor, like the reporter's, counting what it read and what it lost.
    let d2 = done.clone();
    // Made here, before any worker exists, so it starts exactly at `start_seq`.
    let mut cursor = Cursor::new(&RING, false);
    assert_eq!(cursor.position(), start_seq);
    let consumer = std::thread::spawn(move || {
        alloc_guard::internal::mark_current_thread_internal();
        let mut oversized_read = 0u64;
        loop {
            let finished = d2.load(Ordering::Acquire);
            cursor.poll(|ev| {
                assert!(ev.size >= THRESHOLD as u64);
                oversized_read += 1;
            });
            if finished && cursor.position() == RING.recorded() {
                return (cursor.stats(), oversized_read);
            }
            std::thread::yield_now();
        }
    });

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(0x5eed + t);
                let mut oversized = 0u64;
                let mut keep: Vec<Vec<u8>> = Vec::with_capacity(64);
                for i in 0..PER_THREAD {
                    // ~0.5% oversized (64 KiB .. 256 KiB), the rest 1 B .. 4 KiB.
                    let size = if rng.gen_ratio(1, 200) {
                        rng.gen_range(THRESHOLD..4 * THRESHOLD)
                    } else {
                        rng.gen_range(1..4096)
                    };
                    if size >= THRESHOLD {
                        oversized += 1;
                    }
                    let v: Vec<u8> = Vec::with_capacity(size);
                    if keep.len() < 64 {
                        keep.push(v);
                    } else {
                        keep[(i % 64) as usize] = v;
                    }
                }
                oversized
            })
        })
        .collect();
    let made: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    done.store(true, Ordering::Release);
    let (stats, read) = consumer.join().unwrap();

    eprintln!(
        "stress: {made} oversized of {} allocations; reported {} + dropped {} (ring collisions {})",
        THREADS * PER_THREAD,
        stats.read,
        stats.lost,
        RING.collisions()
    );
    assert!(
        made > 30_000,
        "the workload makes plenty of oversized allocations"
    );
    assert_eq!(
        RING.recorded() - start_seq,
        made,
        "every oversized allocation got a sequence number"
    );
    assert_eq!(
        stats.read + stats.lost,
        made,
        "reported + dropped == oversized allocations"
    );
    assert_eq!(read, stats.read);
}
