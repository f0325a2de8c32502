//! jemalloc's own statistics for stall reports (feature `jemalloc`, on by default): allocated,
//! active, resident, mapped and retained bytes, read after the stall.

use crate::stall_report::JemallocStats;

/// The statistics now; `None` without the `jemalloc` feature (or when jemalloc cannot say).
#[cfg(feature = "jemalloc")]
pub(crate) fn read() -> Option<JemallocStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // Advancing the epoch touches most jemalloc locks: only here, after the stall.
    epoch::advance().ok()?;
    Some(JemallocStats {
        allocated: stats::allocated::read().unwrap_or(0) as u64,
        active: stats::active::read().unwrap_or(0) as u64,
        resident: stats::resident::read().unwrap_or(0) as u64,
        mapped: stats::mapped::read().unwrap_or(0) as u64,
        retained: stats::retained::read().unwrap_or(0) as u64,
    })
}

/// Without the `jemalloc` feature: nothing (the stall line says `"jemalloc": null`).
#[cfg(not(feature = "jemalloc"))]
pub(crate) fn read() -> Option<JemallocStats> {
    None
}
