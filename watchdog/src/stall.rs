//! The record of one stall: filled on the watchdog thread without allocating (it comes from a
//! preallocated pool), turned into report lines on the report thread.

use crate::forksafe::ForkSafeBox;
use crate::procview::ProcSnapshot;
use crate::trigger::CaptureStatus;
use alloc_guard::internal::RawEvent;

/// In-flight allocations kept per stall.
pub const MAX_IN_FLIGHT: usize = 16;
/// Recent large allocations kept per stall.
pub const MAX_RECENT: usize = 32;

pub use crate::stall_report::Scope;

/// Everything known about a stall. Preallocated; reused.
pub struct StallRecord {
    /// Stall id (also in the USDT probes).
    pub id: u64,
    /// Scope.
    pub scope: Scope,
    /// Stalled thread (0 for a process stall).
    pub thread_id: u64,
    /// Heartbeat (or thread) name.
    pub thread_name: [u8; 32],
    /// `CLOCK_MONOTONIC` ns of the last progress seen.
    pub start_ns: u64,
    /// When the watchdog noticed.
    pub detected_ns: u64,
    /// Length of the stall (set at its end).
    pub duration_ns: u64,
    /// Allocations in flight at detection.
    pub in_flight: [RawEvent; MAX_IN_FLIGHT],
    /// How many of `in_flight` are valid.
    pub in_flight_len: usize,
    /// Large allocations in the look-back window.
    pub recent: [RawEvent; MAX_RECENT],
    /// How many of `recent` are valid.
    pub recent_len: usize,
    /// Every thread's kernel view at detection.
    pub procs: ProcSnapshot,
    /// What happened to the capture request.
    pub capture: CaptureStatus,
    /// The capture directory, when a helper was started (filled after the stall ends).
    pub capture_dir: String,
    /// `CLOCK_MONOTONIC` ns when the helper's spawn returned (0 = not started).
    pub capture_spawned_ns: u64,
    /// The incident this stall belongs to (the id of its first stall).
    pub incident: u64,
    /// No other stall of the incident is still open: its report can be written.
    pub incident_last: bool,
    /// Process-wide counters before the stall (a process stall: the tick before it; a
    /// thread stall: at detection) and after it.
    pub sys_before: crate::sysview::SysCounters,
    /// Process-wide counters at the end.
    pub sys_after: crate::sysview::SysCounters,
}

impl StallRecord {
    /// A blank record in fork-proof memory (see [`crate::forksafe`]): the watchdog writes into
    /// it during a stall, possibly while another thread forks. Create before any stall.
    pub fn new_fork_safe() -> std::io::Result<ForkSafeBox<StallRecord>> {
        let init = |p: *mut StallRecord| {
            use core::ptr::addr_of_mut;
            // SAFETY: `p` points at zeroed, writable memory big enough for a StallRecord. All
            // integer and array fields are valid as zeroes (RawEvent's kind 0 is `Alloc`,
            // ProcSnapshot is integers and byte arrays); the fields whose zero pattern is not a
            // valid value are written here, with `write` (nothing invalid is dropped).
            unsafe {
                addr_of_mut!((*p).scope).write(Scope::Thread);
                addr_of_mut!((*p).capture).write(CaptureStatus::NotConfigured);
                addr_of_mut!((*p).capture_dir).write(String::new());
                (*p).procs.check_access();
            }
        };
        // SAFETY: `init` leaves a valid StallRecord (see above).
        unsafe { ForkSafeBox::new_with(init) }
    }

    /// The name as text.
    pub fn name(&self) -> &str {
        let end = self.thread_name.iter().position(|&b| b == 0).unwrap_or(32);
        core::str::from_utf8(&self.thread_name[..end]).unwrap_or("?")
    }

    /// Collects suspects and the kernel view, at detection. No allocation.
    pub(crate) fn collect(&mut self, lookback_ns: u64) {
        self.in_flight_len = alloc_guard::internal::in_flight(&mut self.in_flight);
        let from = self.start_ns.saturating_sub(lookback_ns);
        self.recent_len =
            alloc_guard::internal::RING.events_between(from, u64::MAX, &mut self.recent);
        self.procs.take();
    }
}
