//! Wall-clock cost of the guard (criterion). Instruction counts, which are the numbers to
//! compare on a noisy machine, come from `benches/callgrind.sh`.
//!
//! - `small_allocs/{1,2}_threads/*`: the allocator-call workload on bare jemalloc, on the guard
//!   with no threshold, and on the guard with a 64 MiB threshold.
//! - `oversized_event/*`: a 1 MiB alloc+free through bare jemalloc and through the guard with a
//!   512 KiB threshold, with each unwinder; the difference is the per-event cost on the
//!   allocating thread (backtrace, clock, cached thread facts, in-flight mark, ring push, probe).
//! - `backtrace/*`: the two ways to capture 32 raw frames: `trace_unsynchronized` (DWARF, what
//!   the guard uses) and a frame-pointer walk (cheaper, but wrong without frame pointers).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use freezetrap::GuardedAlloc;
use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tikv_jemallocator::Jemalloc;

#[path = "workload.rs"]
mod workload;

#[global_allocator]
static GLOBAL: GuardedAlloc<Jemalloc> = GuardedAlloc::new(Jemalloc);
static GUARD: GuardedAlloc<Jemalloc> = GuardedAlloc::new(Jemalloc);

const OPS: u32 = 10_000;

fn threaded<A: GlobalAlloc + Sync>(a: &A, threads: usize, iters: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..iters {
                    black_box(workload::run_workload(a, OPS, 7 + i + t as u64));
                }
            });
        }
    });
    start.elapsed()
}

fn small_allocs(c: &mut Criterion) {
    let mut g = c.benchmark_group("small_allocs");
    for threads in [1usize, 2] {
        let id = |name: &str| BenchmarkId::new(format!("{threads}_threads"), name);
        g.bench_function(id("bare_jemalloc"), |b| {
            b.iter_custom(|n| threaded(&Jemalloc, threads, n))
        });
        freezetrap::alloc_guard::set_threshold(None);
        g.bench_function(id("guard_no_env"), |b| {
            b.iter_custom(|n| threaded(&GUARD, threads, n))
        });
        freezetrap::alloc_guard::set_threshold(Some(64 << 20));
        g.bench_function(id("guard_threshold_64MiB"), |b| {
            b.iter_custom(|n| threaded(&GUARD, threads, n))
        });
        freezetrap::alloc_guard::set_threshold(None);
    }
    g.finish();
}

fn oversized_event(c: &mut Criterion) {
    let layout = Layout::from_size_align(1 << 20, 16).unwrap();
    let mut g = c.benchmark_group("oversized_event");
    g.bench_function("bare_jemalloc_1MiB", |b| {
        b.iter(|| unsafe {
            let p = Jemalloc.alloc(black_box(layout));
            Jemalloc.dealloc(black_box(p), layout);
        })
    });
    freezetrap::alloc_guard::set_threshold(Some(512 << 10));
    use freezetrap::alloc_guard::unwind::{self, Unwinder};
    for (unwinder, depth) in [
        (Unwinder::FramePointers, 32usize),
        (Unwinder::Dwarf, 32),
        (Unwinder::Dwarf, 8),
    ] {
        unwind::force(unwinder);
        freezetrap::alloc_guard::set_backtrace_depth(depth);
        g.bench_function(
            format!("guard_recorded_1MiB_{unwinder:?}_depth_{depth}"),
            |b| {
                b.iter(|| unsafe {
                    let p = GUARD.alloc(black_box(layout));
                    GUARD.dealloc(black_box(p), layout);
                })
            },
        );
    }
    unwind::force(Unwinder::Undecided);
    freezetrap::alloc_guard::set_backtrace_depth(freezetrap::alloc_guard::internal::MAX_FRAMES);
    freezetrap::alloc_guard::set_threshold(None);
    g.finish();
}

#[inline(never)]
fn fp_walk(out: &mut [usize; 32]) -> usize {
    let mut fp: usize;
    // SAFETY: reads the frame-pointer register only.
    unsafe { std::arch::asm!("mov {}, rbp", out(reg) fp) };
    let top = fp;
    let mut n = 0;
    // Walk saved (rbp, return address) pairs while they look like a stack going up.
    while n < 32 && fp != 0 && fp.is_multiple_of(8) && fp >= top && fp - top < (8 << 20) {
        // SAFETY: `fp` is within 8 MiB above our own frame on this thread's stack, aligned, and
        // this binary is built with frame pointers, so it points at a saved (rbp, ret) pair.
        let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const usize)) };
        if ret == 0 {
            break;
        }
        out[n] = ret;
        n += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    n
}

#[inline(never)]
fn unwind(out: &mut [usize; 32]) -> usize {
    let mut n = 0;
    // SAFETY: Linux unwinder is thread-safe; the closure writes into `out` only.
    unsafe {
        backtrace::trace_unsynchronized(|f| {
            out[n] = f.ip() as usize;
            n += 1;
            n < 32
        })
    };
    n
}

fn backtraces(c: &mut Criterion) {
    let mut g = c.benchmark_group("backtrace");
    g.bench_function("trace_unsynchronized", |b| {
        b.iter(|| {
            let mut f = [0; 32];
            black_box(unwind(&mut f))
        })
    });
    g.bench_function("gettid_syscall", |b| {
        b.iter(|| black_box(base::thread::current_tid()))
    });
    g.bench_function("prctl_get_name", |b| {
        b.iter(|| black_box(base::thread::current_thread_name()))
    });
    g.bench_function("clock_monotonic", |b| {
        b.iter(|| black_box(base::clock::monotonic_ns()))
    });
    g.bench_function("frame_pointer_walk", |b| {
        b.iter(|| {
            let mut f = [0; 32];
            black_box(fp_walk(&mut f))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = small_allocs, oversized_event, backtraces
}
criterion_main!(benches);
