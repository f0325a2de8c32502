//! `freezetrap-capture`: what runs outside the frozen process.
//!
//! Two ways to run it, one output format (`offcpu.folded`, `oncpu.folded`, `offcpu.svg`,
//! `summary.json`, see [`output`]):
//! - [`cli`], the triggered helper: the service's watchdog starts it on a stall and it records
//!   for a fixed time from then on (`capture.bt`);
//! - [`armed`], the flight recorder: attached in advance, it keeps a rolling window and writes
//!   it when the target fires `freezetrap:stall_begin` (`armed.bt`).
//!
//! [`maps`] turns bpftrace's JSON map dumps into folded stacks, [`summary`] into the summary and
//! [`conclude`] into the verdict: pure functions, tested without bpftrace, a kernel or root.

#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod armed;
mod bpftrace;
pub mod cli;
mod compiled;
pub mod conclude;
pub mod frame_pointers;
pub mod maps;
pub mod output;
pub mod pprof;
pub mod preflight;
pub mod stapsdt;
pub mod summary;
pub mod symbols;

pub(crate) use bpftrace::{
    bpftrace_command, collect_stderr, first_error, for_each_line, install_stop_handlers, interrupt,
    stop_bpftrace, stop_requested,
};
pub use conclude::StallWindow;
pub use maps::{fold, folded, parse_maps, resymbolize, split_key, Key, Maps};
pub use summary::{human, summarize, Summary};

/// The recording program, embedded at build time (also at `probes/bpftrace/capture.bt`).
pub const CAPTURE_BT: &str = include_str!("../bpftrace/capture.bt");

/// What a triggered recording gathered, by either engine.
pub(crate) struct Taken {
    pub(crate) maps: crate::maps::Maps,
    /// When the probes were attached (None: never said so).
    pub(crate) recording_since: Option<std::time::Instant>,
    pub(crate) ended: std::time::Instant,
    /// Seconds after the start at which the target exited, if it did.
    pub(crate) target_exited: Option<f64>,
    pub(crate) stopped_by_signal: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_program_is_the_file() {
        assert!(CAPTURE_BT.contains("tracepoint:sched:sched_switch"));
        assert!(
            !CAPTURE_BT.contains("kprobe:"),
            "this kernel has no kprobes"
        );
    }
}
