//! The kernel's view of every thread, read from `/proc/self/task/*/{stat,schedstat,wchan,stack}`
//! into preallocated buffers with raw syscalls: no allocation and no `/proc/self/maps` (which can
//! block on the very `mmap_lock` a freeze is stuck on; these files do not take it).
//!
//! A snapshot is taken when a stall is detected (state, `wchan`, kernel stack, counters) and
//! the counters are read again when it ends ([`ProcSnapshot::take_end`]): their differences —
//! CPU time, run-queue wait, minor and major faults — are the evidence of what the thread did.

use serde::Serialize;

/// Threads recorded per snapshot; more are counted in [`ProcSnapshot::omitted`].
pub const MAX_THREADS: usize = 64;
const STACK_BYTES: usize = 1536;
const WCHAN_BYTES: usize = 64;

/// A thread's cumulative counters: from `stat` (faults, user and system time in clock ticks)
/// and `schedstat` (time on CPU and waiting in the run queue, ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCounters {
    /// Both files were read.
    pub valid: bool,
    /// Minor faults.
    pub minflt: u64,
    /// Major faults.
    pub majflt: u64,
    /// User time, clock ticks.
    pub utime_ticks: u64,
    /// System time, clock ticks.
    pub stime_ticks: u64,
    /// Time on CPU, ns.
    pub run_ns: u64,
    /// Time runnable in the run queue, ns.
    pub wait_ns: u64,
}

/// One thread as the kernel sees it.
#[derive(Clone, Copy)]
pub struct ThreadView {
    /// Kernel thread id.
    pub tid: u64,
    name: [u8; 16],
    /// State letter from `stat` (`R`, `S`, `D`, `T`, ...).
    pub state: u8,
    /// Counters when the snapshot was taken.
    pub counters: RawCounters,
    wchan: [u8; WCHAN_BYTES],
    wchan_len: usize,
    stack: [u8; STACK_BYTES],
    stack_len: usize,
}

impl ThreadView {
    const EMPTY: ThreadView = ThreadView {
        tid: 0,
        name: [0; 16],
        state: b'?',
        counters: RawCounters {
            valid: false,
            minflt: 0,
            majflt: 0,
            utime_ticks: 0,
            stime_ticks: 0,
            run_ns: 0,
            wait_ns: 0,
        },
        wchan: [0; WCHAN_BYTES],
        wchan_len: 0,
        stack: [0; STACK_BYTES],
        stack_len: 0,
    };

    /// Thread name (`comm`).
    pub fn name(&self) -> &str {
        base::thread::name_str(&self.name)
    }
    /// Kernel function the thread sleeps in, or "" (`0` is shown as "").
    pub fn wchan(&self) -> &str {
        let s = core::str::from_utf8(&self.wchan[..self.wchan_len]).unwrap_or("");
        if s == "0" {
            ""
        } else {
            s
        }
    }
    /// Kernel stack function names, innermost first (empty unless root).
    pub fn kernel_stack(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.stack[..self.stack_len]);
        text.lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|f| f.split('+').next().unwrap_or(f).to_string())
            .collect()
    }
}

/// A snapshot of all threads, reusable across stalls.
pub struct ProcSnapshot {
    threads: [ThreadView; MAX_THREADS],
    len: usize,
    /// Threads that did not fit.
    pub omitted: usize,
    /// `CLOCK_MONOTONIC` ns when taken.
    pub taken_ns: u64,
    /// Whether `/proc/self/task/*/stack` can be read (root); checked once by
    /// [`ProcSnapshot::check_access`], so a failing open never happens during a stall.
    pub stacks_readable: bool,
    /// Nanoseconds per clock tick (`sysconf(_SC_CLK_TCK)`), read by `check_access`.
    pub tick_ns: u64,
    /// Each thread's counters when the stall ended (same order as the threads).
    end: [RawCounters; MAX_THREADS],
    /// `CLOCK_MONOTONIC` ns when the end counters were read (0: not yet).
    pub end_ns: u64,
}

/// The JSON form of one thread (contract: `threads[]`).
#[derive(Serialize)]
pub struct ThreadJson {
    /// Kernel thread id.
    pub tid: u64,
    /// Name.
    pub name: String,
    /// State letter.
    pub state: String,
    /// wchan.
    pub wchan: String,
    /// Kernel stack (root only).
    pub kernel_stack: Vec<String>,
}

impl ProcSnapshot {
    /// An empty snapshot on the heap (make it before any stall).
    pub fn new_boxed() -> Box<ProcSnapshot> {
        let mut s = Box::new(ProcSnapshot {
            threads: [ThreadView::EMPTY; MAX_THREADS],
            len: 0,
            omitted: 0,
            taken_ns: 0,
            stacks_readable: false,
            tick_ns: 0,
            end: [RawCounters::default(); MAX_THREADS],
            end_ns: 0,
        });
        s.check_access();
        s
    }

    /// The recorded threads.
    pub fn threads(&self) -> &[ThreadView] {
        &self.threads[..self.len]
    }

    /// JSON rows for the report (allocates: call after the stall).
    pub fn to_json(&self) -> Vec<ThreadJson> {
        self.threads()
            .iter()
            .map(|t| ThreadJson {
                tid: t.tid,
                name: t.name().to_string(),
                state: (t.state as char).to_string(),
                wchan: t.wchan().to_string(),
                kernel_stack: t.kernel_stack(),
            })
            .collect()
    }

    /// How thread `i`'s counters moved between the snapshot and [`ProcSnapshot::take_end`]:
    /// `(cpu_ns, run_delay_ns, utime_ns, stime_ns, minflt, majflt)`; `None` when either reading
    /// failed (the thread exited).
    pub fn delta(&self, i: usize) -> Option<crate::verdict::Counters> {
        let (a, b) = (self.threads.get(i)?.counters, *self.end.get(i)?);
        if !a.valid || !b.valid || self.end_ns == 0 {
            return None;
        }
        let t = self.tick_ns.max(1);
        Some(crate::verdict::Counters {
            cpu_ns: b.run_ns.saturating_sub(a.run_ns),
            run_delay_ns: b.wait_ns.saturating_sub(a.wait_ns),
            utime_ns: b
                .utime_ticks
                .saturating_sub(a.utime_ticks)
                .saturating_mul(t),
            stime_ns: b
                .stime_ticks
                .saturating_sub(a.stime_ticks)
                .saturating_mul(t),
            minflt: b.minflt.saturating_sub(a.minflt),
            majflt: b.majflt.saturating_sub(a.majflt),
        })
    }

    /// Reads every recorded thread's counters again, at the end of the stall. A thread that
    /// cannot be read any more (it exited) keeps its latest reading from
    /// [`ProcSnapshot::refresh_end_of`]. Never allocates.
    pub fn take_end(&mut self) {
        self.end_ns = base::clock::monotonic_ns();
        for i in 0..self.len {
            let mut c = RawCounters::default();
            let _ = read_counters(self.threads[i].tid, &mut c);
            if c.valid {
                self.end[i] = c;
            }
        }
    }

    /// Reads thread `tid`'s counters into its end reading now (each tick while its stall is
    /// open): a thread that exits as soon as its stall ends — a job finishing its last, slow
    /// step — can no longer be read when the watchdog sees the end, and this reading, at most a
    /// tick old, stands in. Two small reads; never allocates.
    pub fn refresh_end_of(&mut self, tid: u64) {
        if let Some(i) = self.threads().iter().position(|t| t.tid == tid) {
            let mut c = RawCounters::default();
            let _ = read_counters(tid, &mut c);
            if c.valid {
                self.end[i] = c;
            }
        }
    }

    /// Decides once whether kernel stacks are readable here (call before any stall).
    pub fn check_access(&mut self) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        self.tick_ns = if hz > 0 {
            1_000_000_000 / hz as u64
        } else {
            10_000_000
        };
        let fd = base::raw::open(b"/proc/self/stack\0", libc::O_RDONLY | libc::O_CLOEXEC);
        self.stacks_readable = fd >= 0 && {
            let mut b = [0u8; 64];
            let ok = base::raw::read(fd as libc::c_int, &mut b) > 0;
            base::raw::close(fd as libc::c_int);
            ok
        };
    }

    /// Fills the snapshot from `/proc/self/task`. Never allocates, never touches errno.
    pub fn take(&mut self) {
        self.len = 0;
        self.omitted = 0;
        self.end_ns = 0;
        self.taken_ns = base::clock::monotonic_ns();
        let dir = base::raw::open(
            b"/proc/self/task\0",
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return;
        }
        let dir = dir as libc::c_int;
        let mut buf = [0u8; 4096];
        loop {
            let n = base::raw::getdents64(dir, &mut buf);
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off + 19 < n as usize {
                // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[]
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                if reclen == 0 {
                    break;
                }
                let name = &buf[off + 19..(off + reclen).min(n as usize)];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if let Some(tid) = parse_u64(name) {
                    self.add(tid);
                }
                off += reclen;
            }
        }
        base::raw::close(dir);
    }

    fn add(&mut self, tid: u64) {
        if self.len == MAX_THREADS {
            self.omitted += 1;
            return;
        }
        // No end reading yet (the slot may hold one from an earlier stall).
        self.end[self.len] = RawCounters::default();
        let t = &mut self.threads[self.len];
        *t = ThreadView {
            tid,
            ..ThreadView::EMPTY
        };
        let (name, name_len, state) = read_counters(tid, &mut t.counters);
        t.name[..name_len].copy_from_slice(&name[..name_len]);
        t.state = state;
        t.wchan_len = read_task_file(tid, b"wchan", &mut t.wchan);
        if self.stacks_readable {
            t.stack_len = read_task_file(tid, b"stack", &mut t.stack);
            // A thread on a CPU shows an empty stack; the holder of a lock the others wait for
            // (a fork copying page tables) often is one. A few more tries catch it between
            // two slices of work now and then (each read is one small syscall).
            let mut tries = 0;
            while t.stack_len == 0 && t.state == b'R' && tries < 8 {
                t.stack_len = read_task_file(tid, b"stack", &mut t.stack);
                tries += 1;
            }
        }
        self.len += 1;
    }
}

/// Reads `stat` and `schedstat` of thread `tid` into `out` (`valid` when both parsed) and
/// returns its name (and length) and state letter. Never allocates.
fn read_counters(tid: u64, out: &mut RawCounters) -> ([u8; 16], usize, u8) {
    let mut name = [0u8; 16];
    let mut name_len = 0;
    let mut state = b'?';
    *out = RawCounters::default();
    let mut stat = [0u8; 512];
    let n = read_task_file(tid, b"stat", &mut stat);
    // "TID (comm) S ...": comm may contain spaces or parens, so take the last ')'.
    let Some(close) = stat[..n].iter().rposition(|&b| b == b')') else {
        return (name, name_len, state);
    };
    let open = stat[..n].iter().position(|&b| b == b'(').unwrap_or(0);
    let comm = &stat[open + 1..close];
    name_len = comm.len().min(15);
    name[..name_len].copy_from_slice(&comm[..name_len]);
    state = stat.get(close + 2).copied().unwrap_or(b'?');
    // Fields after the comm, 0-based: 0 state, 7 minflt, 9 majflt, 11 utime, 12 stime.
    let mut fields = stat[(close + 2).min(n)..n].split(|&b| b == b' ');
    let mut nth = |k: usize| fields.nth(k).and_then(parse_u64);
    let minflt = nth(7);
    let majflt = nth(1);
    let utime = nth(1);
    let stime = nth(0);
    let mut sched = [0u8; 96];
    let m = read_task_file(tid, b"schedstat", &mut sched);
    let mut it = sched[..m].split(|&b| b == b' ');
    let run = it.next().and_then(parse_u64);
    let wait = it.next().and_then(parse_u64);
    if let (Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)) =
        (minflt, majflt, utime, stime, run, wait)
    {
        *out = RawCounters {
            valid: true,
            minflt: a,
            majflt: b,
            utime_ticks: c,
            stime_ticks: d,
            run_ns: e,
            wait_ns: f,
        };
    }
    (name, name_len, state)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    // (The inverse, integer to digits without allocating, is `base::units::digits`.)
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |a, &d| {
        a.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Reads `/proc/self/task/<tid>/<file>` into `out`; returns the bytes read (0 on any error,
/// e.g. `stack` without root, or a thread that just exited).
fn read_task_file(tid: u64, file: &[u8], out: &mut [u8]) -> usize {
    let mut path = [0u8; 64];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let k = bytes.len().min(path.len() - 1 - len);
        path[len..len + k].copy_from_slice(&bytes[..k]);
        len += k;
    };
    push(b"/proc/self/task/");
    let mut digits = [0u8; 20];
    push(base::units::digits(tid, &mut digits));
    push(b"/");
    push(file);
    // `path` is zero-initialised and at most 63 bytes are written, so it is NUL-terminated.
    let fd = base::raw::open(&path[..len + 1], libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return 0;
    }
    let fd = fd as libc::c_int;
    let mut total = 0;
    while total < out.len() {
        let n = base::raw::read(fd, &mut out[total..]);
        if n <= 0 {
            break;
        }
        total += n as usize;
    }
    base::raw::close(fd);
    // Drop a trailing newline.
    while total > 0 && out[total - 1] == b'\n' {
        total -= 1;
    }
    total
}

#[cfg(test)]
mod tests;
