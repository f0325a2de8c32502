//! The `freezetrap` USDT provider: the probe points that outside tools attach to.
//!
//! Three probes, integer arguments only (see `probes/freezetrap.d`):
//!
//! | probe | arguments |
//! |---|---|
//! | `large_alloc` | size, old_size (0 unless realloc), address, duration_ns, thread_id |
//! | `stall_begin` | stall_id, thread_id (0 = whole process), elapsed_ns at detection |
//! | `stall_end` | stall_id, duration_ns |
//!
//! On Linux the [`usdt`] crate emits SystemTap (`stapsdt`) notes, so `bpftrace` and `perf` see the
//! probes without any registration step. Each probe is guarded by a semaphore that the tracer
//! increments when it attaches: a disabled probe costs one volatile `u16` load and a branch, and
//! the argument expressions are not evaluated at all.
//!
//! ```sh
//! bpftrace -e 'usdt:/path/to/service:freezetrap:large_alloc { printf("%d bytes\n", arg0); }'
//! ```
//!
//! # Safe to call from an allocator
//! The functions here never allocate, lock or panic: they are one semaphore load and, when a
//! tracer is attached, a `nop` that the kernel turns into a breakpoint.
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

usdt::dtrace_provider!("freezetrap.d");

/// The provider name every probe lives under (`usdt:BINARY:freezetrap:PROBE`).
pub const PROVIDER: &str = "freezetrap";

/// Names of the probes this crate defines, in the order of `freezetrap.d`.
pub const PROBE_NAMES: [&str; 3] = ["large_alloc", "stall_begin", "stall_end"];

/// Fires `freezetrap:large_alloc`.
///
/// Called by `alloc-guard` for every allocation at or above the threshold, after the inner
/// allocator returned. `address` is 0 when the inner allocator failed.
#[inline(always)]
pub fn large_alloc(size: u64, old_size: u64, address: u64, duration_ns: u64, thread_id: u64) {
    freezetrap::large_alloc!(|| (size, old_size, address, duration_ns, thread_id));
}

/// Fires `freezetrap:stall_begin` when the watchdog detects a stall (while it is still going on).
///
/// `thread_id` is 0 for a whole-process stall.
#[inline(always)]
pub fn stall_begin(stall_id: u64, thread_id: u64, elapsed_ns: u64) {
    freezetrap::stall_begin!(|| (stall_id, thread_id, elapsed_ns));
}

/// Fires `freezetrap:stall_end` when a stall that fired [`stall_begin`] is over.
#[inline(always)]
pub fn stall_end(stall_id: u64, duration_ns: u64) {
    freezetrap::stall_end!(|| (stall_id, duration_ns));
}
