//! The process-wide evidence: its cgroup's CPU throttling, pressure stall information (PSI),
//! the kernel's reclaim and compaction stalls, the process's CPU time and the watchdog
//! thread's own run-queue wait.
//!
//! The files are found and opened once, on the watchdog thread before its loop (finding the
//! cgroup allocates); after that [`SysView::sample`] reads them with `pread` into stack buffers:
//! no allocation, no `errno`, no `mmap_lock` (none of these files takes it). The cheap ones
//! (the process's CPU clock, two small files) are read every tick, so a process stall — seen
//! only after it ended — has a baseline from just before it; PSI, `/proc/vmstat` and
//! `/proc/stat` every [`FULL_EVERY`] ticks and at every stall's start and end.

use std::os::fd::{IntoRawFd, RawFd};

/// How often (in ticks) the larger files are read between stalls.
pub(crate) const FULL_EVERY: u64 = 8;

const CPU_NS: u16 = 1;
const WAIT: u16 = 1 << 1;
const THROTTLED: u16 = 1 << 2;
const PSI_CPU: u16 = 1 << 3;
const PSI_MEM: u16 = 1 << 4;
const PSI_IO: u16 = 1 << 5;
const RECLAIM: u16 = 1 << 6;
const FORKS: u16 = 1 << 7;

/// One reading of the process-wide counters. Plain integers (valid as zeroes); `readable` says
/// which were read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SysCounters {
    /// `CLOCK_MONOTONIC` ns when read.
    pub taken_ns: u64,
    readable: u16,
    /// The process's CPU time (all its threads), ns.
    pub cpu_ns: u64,
    /// The watchdog thread's run-queue wait, ns.
    pub watchdog_wait_ns: u64,
    /// The cgroup's throttled time, ns.
    pub throttled_ns: u64,
    /// PSI `some` totals, µs: CPU, memory, I/O.
    pub psi_us: [u64; 3],
    /// `allocstall_*` + `compact_stall` from `/proc/vmstat`.
    pub reclaim_stalls: u64,
    /// `processes` from `/proc/stat`: forks since boot, machine-wide.
    pub forks: u64,
}

impl SysCounters {
    fn has(&self, bit: u16) -> bool {
        self.readable & bit != 0
    }
}

/// The open files.
pub(crate) struct SysView {
    own_schedstat: RawFd,
    cpu_stat: RawFd,
    cpu_stat_v2: bool,
    psi: [RawFd; 3],
    vmstat: RawFd,
    stat: RawFd,
}

fn open_fd(path: &str) -> RawFd {
    std::fs::File::open(path)
        .map(|f| f.into_raw_fd())
        .unwrap_or(-1)
}

/// The cgroup the process is in, and its CPU controller directory: (path, cpu dir, is v2).
fn find_cgroup() -> Option<(String, String, bool)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(h), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if h == "0" && ctrl.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            if std::path::Path::new(&format!("{dir}/cpu.stat")).exists() {
                return Some((path.to_string(), dir, true));
            }
        }
        if ctrl.split(',').any(|c| c == "cpu") {
            for mount in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
                let dir = format!("{mount}{path}");
                if std::path::Path::new(&format!("{dir}/cpu.stat")).exists() {
                    return Some((path.to_string(), dir, false));
                }
            }
        }
    }
    None
}

impl SysView {
    /// Finds and opens the files. Call on the watchdog thread (its own `schedstat` is read
    /// through `/proc/thread-self`), before any stall.
    pub(crate) fn open() -> SysView {
        let cg = find_cgroup();
        let (cpu_stat, cpu_stat_v2, psi) = match &cg {
            Some((_, dir, v2)) => {
                // On cgroup v2 the pressure is the cgroup's own; on v1 the machine's.
                let psi = if *v2 {
                    ["cpu", "memory", "io"].map(|r| open_fd(&format!("{dir}/{r}.pressure")))
                } else {
                    [-1; 3]
                };
                (open_fd(&format!("{dir}/cpu.stat")), *v2, psi)
            }
            None => (-1, false, [-1; 3]),
        };
        let psi = [0, 1, 2].map(|i| {
            if psi[i] >= 0 {
                psi[i]
            } else {
                open_fd(
                    [
                        "/proc/pressure/cpu",
                        "/proc/pressure/memory",
                        "/proc/pressure/io",
                    ][i],
                )
            }
        });
        SysView {
            own_schedstat: open_fd("/proc/thread-self/schedstat"),
            cpu_stat,
            cpu_stat_v2,
            psi,
            vmstat: open_fd("/proc/vmstat"),
            stat: open_fd("/proc/stat"),
        }
    }

    /// Reads the counters into `out`: the cheap ones always, PSI and `/proc/vmstat` with
    /// `full`. Never allocates; a file that cannot be read leaves its bit clear.
    pub(crate) fn sample(&self, out: &mut SysCounters, full: bool) {
        let mut buf = [0u8; 8192];
        let keep_full = (
            out.psi_us,
            out.reclaim_stalls,
            out.forks,
            out.readable & (PSI_CPU | PSI_MEM | PSI_IO | RECLAIM | FORKS),
        );
        // The cgroup's throttled time only grows once the cgroup was ever throttled: while it
        // reads 0, reading it on full samples is enough (the value between them is 0 as well),
        // which saves a syscall per tick in the common, unthrottled case — after a wake-up each
        // syscall costs ~10 µs here, on top of the wake-up's ~55 µs.
        let keep_throttled = (out.throttled_ns, out.readable & THROTTLED);
        let read_throttled = full || keep_throttled.0 > 0;
        *out = SysCounters {
            taken_ns: base::clock::monotonic_ns(),
            ..SysCounters::default()
        };
        if !full {
            // Keep the last full reading's values (and their bits).
            (out.psi_us, out.reclaim_stalls, out.forks, out.readable) = keep_full;
        }
        if !read_throttled {
            out.throttled_ns = keep_throttled.0;
            out.readable |= keep_throttled.1;
        }
        // The process's CPU clock: one syscall, no text to format or parse (reading
        // /proc/self/stat for the same number cost several times more, per tick).
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // The raw syscall (the vDSO does not serve CPU-time clocks anyway): no errno.
        if base::raw::syscall3(
            libc::SYS_clock_gettime,
            libc::CLOCK_PROCESS_CPUTIME_ID as usize,
            &mut ts as *mut libc::timespec as usize,
            0,
        ) == 0
        {
            out.cpu_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            out.readable |= CPU_NS;
        }
        if let Some(text) = read(self.own_schedstat, &mut buf) {
            if let Some(w) = text.split(|&b| b == b' ').nth(1).and_then(num) {
                out.watchdog_wait_ns = w;
                out.readable |= WAIT;
            }
        }
        if let Some(text) = read_throttled
            .then(|| read(self.cpu_stat, &mut buf))
            .flatten()
        {
            let (key, scale): (&[u8], u64) = if self.cpu_stat_v2 {
                (b"throttled_usec", 1000)
            } else {
                (b"throttled_time", 1)
            };
            if let Some(v) = keyed(text, key) {
                out.throttled_ns = v.saturating_mul(scale);
                out.readable |= THROTTLED;
            }
        }
        if !full {
            return;
        }
        for (i, bit) in [PSI_CPU, PSI_MEM, PSI_IO].into_iter().enumerate() {
            if let Some(text) = read(self.psi[i], &mut buf) {
                // "some avg10=0.00 avg60=0.00 avg300=0.00 total=12345": the first line's total.
                let first = text.split(|&b| b == b'\n').next().unwrap_or(&[]);
                if let Some(p) = find(first, b"total=") {
                    if let Some(v) = num(&first[p + 6..]) {
                        out.psi_us[i] = v;
                        out.readable |= bit;
                    }
                }
            }
        }
        if let Some(text) = read(self.vmstat, &mut buf) {
            let mut stalls = 0;
            let mut any = false;
            for line in text.split(|&b| b == b'\n') {
                if line.starts_with(b"allocstall_") || line.starts_with(b"compact_stall ") {
                    if let Some(v) = line.split(|&b| b == b' ').nth(1).and_then(num) {
                        stalls += v;
                        any = true;
                    }
                }
            }
            if any {
                out.reclaim_stalls = stalls;
                out.readable |= RECLAIM;
            }
        }
        // /proc/stat's `intr` line can be long: a buffer of its own, read only in full samples.
        let mut big = [0u8; 16384];
        if let Some(text) = read(self.stat, &mut big) {
            if let Some(v) = keyed(text, b"processes") {
                out.forks = v;
                out.readable |= FORKS;
            }
        }
    }
}

/// What the report thread needs to read [`SysCounters`]: the cgroup's path.
#[derive(Debug, Clone, Default)]
pub(crate) struct SysInfo {
    cgroup: Option<String>,
}

impl SysInfo {
    /// Finds them (allocates: not on the detection path).
    pub(crate) fn find() -> SysInfo {
        SysInfo {
            cgroup: find_cgroup().map(|(path, _, _)| path),
        }
    }

    /// What moved between `a` and `b` (`b` later), as the verdict's process evidence; with
    /// what could not be read.
    pub(crate) fn evidence(
        &self,
        a: &SysCounters,
        b: &SysCounters,
    ) -> (crate::verdict::ProcessEvidence, Vec<String>) {
        let both = |bit| a.has(bit) && b.has(bit);
        let d = |x: u64, y: u64| y.saturating_sub(x);
        let mut unreadable = Vec::new();
        let mut say = |ok: bool, what: &str| {
            if !ok {
                unreadable.push(what.to_string());
            }
            ok
        };
        let e = crate::verdict::ProcessEvidence {
            cpu_ns: say(both(CPU_NS), "the process's CPU clock").then(|| d(a.cpu_ns, b.cpu_ns)),
            watchdog_run_delay_ns: say(both(WAIT), "the watchdog's schedstat")
                .then(|| d(a.watchdog_wait_ns, b.watchdog_wait_ns)),
            throttled_ns: say(both(THROTTLED), "the cgroup's cpu.stat")
                .then(|| d(a.throttled_ns, b.throttled_ns)),
            cgroup: self.cgroup.clone(),
            psi_cpu_us: say(both(PSI_CPU), "PSI cpu").then(|| d(a.psi_us[0], b.psi_us[0])),
            psi_memory_us: say(both(PSI_MEM), "PSI memory").then(|| d(a.psi_us[1], b.psi_us[1])),
            psi_io_us: say(both(PSI_IO), "PSI io").then(|| d(a.psi_us[2], b.psi_us[2])),
            reclaim_stalls: say(both(RECLAIM), "/proc/vmstat")
                .then(|| d(a.reclaim_stalls, b.reclaim_stalls)),
            forks: say(both(FORKS), "/proc/stat").then(|| d(a.forks, b.forks)),
        };
        (e, unreadable)
    }
}

/// `pread` of the whole file from offset 0 into `buf`; `None` when the file is not open or the
/// read failed.
fn read(fd: RawFd, buf: &mut [u8]) -> Option<&[u8]> {
    if fd < 0 {
        return None;
    }
    let n = base::raw::pread(fd, buf, 0);
    (n > 0).then(|| &buf[..n as usize])
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The number after `key ` on its line.
fn keyed(text: &[u8], key: &[u8]) -> Option<u64> {
    text.split(|&b| b == b'\n')
        .find(|l| l.starts_with(key) && l.get(key.len()) == Some(&b' '))
        .and_then(|l| num(&l[key.len() + 1..]))
}

/// The leading decimal number of `s`.
fn num(s: &[u8]) -> Option<u64> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    s[..digits].iter().try_fold(0u64, |a, &d| {
        a.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_read_the_kernels_formats() {
        assert_eq!(
            keyed(
                b"nr_periods 10\nnr_throttled 2\nthrottled_time 12345\n",
                b"throttled_time"
            ),
            Some(12345)
        );
        assert_eq!(keyed(b"throttled_usec 7\n", b"throttled_time"), None);
        assert_eq!(num(b"42 rest"), Some(42));
        assert_eq!(num(b"x"), None);
    }

    #[test]
    fn a_sample_reads_this_process_and_its_cpu_time_grows() {
        let view = SysView::open();
        let mut a = SysCounters::default();
        view.sample(&mut a, true);
        assert!(a.has(CPU_NS) && a.has(WAIT), "{a:?}");
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(100) {
            std::hint::black_box(0u64);
        }
        // Readings are made in place: the last one's slower counters carry over.
        let mut b = a;
        view.sample(&mut b, false);
        let (e, _) = SysInfo::find().evidence(&a, &b);
        assert!(e.cpu_ns.unwrap() >= 50_000_000, "{e:?}");
        // Pressure and reclaim kept from the last full reading; a throttled time of 0 (never
        // throttled) carries over without a read.
        assert_eq!(a.has(PSI_MEM), b.has(PSI_MEM));
        if a.throttled_ns == 0 {
            assert_eq!((a.has(THROTTLED), b.throttled_ns), (b.has(THROTTLED), 0));
        }
    }
}
