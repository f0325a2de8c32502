//! The evidence a verdict rests on: plain data gathered by the watchdog (`/proc`, the
//! process's counters, the ring), so the rules are tested on recorded evidence.

/// A thread's counters over a window (differences of two readings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Time on CPU (`schedstat` field 1), ns.
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU (`schedstat` field 2), ns.
    pub run_delay_ns: u64,
    /// User time (`stat`), ns (clock-tick granularity).
    pub utime_ns: u64,
    /// System time (`stat`), ns (clock-tick granularity).
    pub stime_ns: u64,
    /// Minor page faults.
    pub minflt: u64,
    /// Major page faults (read from storage).
    pub majflt: u64,
}

/// One thread, as seen at detection and over the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadEvidence {
    /// Kernel thread id.
    pub tid: u64,
    /// Name.
    pub name: String,
    /// State letter at detection (`R`, `S`, `D`, `T`, ...).
    pub state: char,
    /// Where it slept at detection (empty when running).
    pub wchan: String,
    /// Its kernel stack at detection, innermost first (empty without root).
    pub kernel_stack: Vec<String>,
    /// Its counters over the window; `None` when unreadable (the thread is gone).
    pub delta: Option<Counters>,
}

impl ThreadEvidence {
    pub(super) fn in_stack(&self, names: &[&str]) -> Option<String> {
        self.kernel_stack
            .iter()
            .find(|f| names.iter().any(|n| f.starts_with(n)))
            .cloned()
            .or_else(|| {
                names
                    .iter()
                    .any(|n| !self.wchan.is_empty() && self.wchan.starts_with(n))
                    .then(|| self.wchan.clone())
            })
    }
}

/// Process-wide counters over the window; `None` where unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessEvidence {
    /// The process's CPU time (all threads), ns.
    pub cpu_ns: Option<u64>,
    /// The watchdog thread's own run-queue wait, ns (a process stall with the watchdog
    /// waiting for a CPU is starvation).
    pub watchdog_run_delay_ns: Option<u64>,
    /// The cgroup's throttled time, ns, and its path.
    pub throttled_ns: Option<u64>,
    /// The cgroup's path (for the text).
    pub cgroup: Option<String>,
    /// PSI `some` stall time, µs: CPU, memory, I/O.
    pub psi_cpu_us: Option<u64>,
    /// PSI memory `some`, µs.
    pub psi_memory_us: Option<u64>,
    /// PSI I/O `some`, µs.
    pub psi_io_us: Option<u64>,
    /// `/proc/vmstat` direct reclaim stalls (`allocstall_*`) plus compaction stalls.
    pub reclaim_stalls: Option<u64>,
    /// Processes created on the machine (`/proc/stat` `processes`): a fork holds `mmap_lock`.
    pub forks: Option<u64>,
}

/// A large allocation near the stall.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocEvidence {
    /// Bytes.
    pub size: u64,
    /// Allocating thread.
    pub thread_id: u64,
    /// Its name.
    pub thread_name: String,
    /// Still inside the allocator at detection.
    pub in_flight: bool,
    /// Made after the stall began (or still in flight): what the stalled time went into.
    pub began_in_stall: bool,
    /// The first caller frame outside the allocator, as text.
    pub site: String,
    /// The growth hint for that call site, when its allocations grow geometrically.
    pub growth: Option<String>,
}

/// Everything a verdict is decided from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The whole process stalled (the watchdog itself woke late), not one heartbeat.
    pub process_scope: bool,
    /// How long the stall lasted, ns.
    pub duration_ns: u64,
    /// The window the counters cover, ns (for a thread stall: detection to end).
    pub window_ns: u64,
    /// The stalled thread (thread stalls), with its heartbeat's name.
    pub stalled: Option<ThreadEvidence>,
    /// Every other thread of the process.
    pub others: Vec<ThreadEvidence>,
    /// Process-wide counters.
    pub process: ProcessEvidence,
    /// Large allocations, the top suspect first.
    pub allocations: Vec<AllocEvidence>,
    /// What could not be read, each one short phrase.
    pub unreadable: Vec<String>,
}
