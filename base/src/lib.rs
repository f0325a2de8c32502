//! `freezetrap-base`: the low-level pieces every freezetrap crate shares, in one small place.
//!
//! - [`clock`]: `CLOCK_MONOTONIC` nanoseconds, the one clock of every timestamp;
//! - [`thread`]: the calling thread's kernel id and name;
//! - [`parse`]: sizes (`64MiB`) and durations (`200ms`) as the variables and command lines write
//!   them;
//! - [`units`]: numbers for people (`3.50 GiB`, `48.8 ms`) and digits without allocating;
//! - [`env`](mod@env): reading variables and complaining about them in freezetrap's message grammar;
//! - [`raw`] (Linux): system calls that never touch `errno`, for code that runs during a freeze
//!   — the only module with architecture-specific syscall numbers and assembly;
//! - [`dirs`] (Linux): directories by handle, files created exclusively, and the ownership checks
//!   for anything that may run as root;
//! - [`verdict`]: the shape of a verdict (what caused a stall), shared by the watchdog's reports
//!   and the capture's summary.
//!
//! Everything except `dirs` is usable from inside a global allocator: no allocation, no lock.
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod clock;
#[cfg(ft_linux)]
pub mod dirs;
pub mod env;
pub mod hooks;
pub mod parse;
#[cfg(ft_linux)]
pub mod raw;
pub mod thread;
pub mod units;
pub mod verdict;
