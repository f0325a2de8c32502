//! `freezetrap-capture`: what runs outside the frozen process.
//!
//! Two ways to run it, one output format (`offcpu.folded`, `oncpu.folded`, `offcpu.svg`,
//! `summary.json`, see [`output`]):
//! - [`cli`], the triggered helper: the service's watchdog starts it on a stall and it records
//!   for a fixed time from then on (`capture.bt`);
//! - [`armed`], the flight recorder: attached in advance, it keeps a rolling window and writes
//!   it when the target fires `freezetrap:stall_begin` (`armed.bt`).
//!
//! This module turns bpftrace's JSON map dumps into folded stacks and the summary: pure
//! functions, tested without bpftrace, a kernel or root.

#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

use serde::Serialize;

pub mod armed;
pub mod cli;
pub mod output;
pub mod preflight;
pub mod stapsdt;
pub mod symbols;
use std::collections::BTreeMap;

/// The `PATH` bpftrace (and anything it starts) gets: nothing from our own environment.
pub(crate) const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A `Command` that runs `program` with bpftrace, with what both modes need:
/// - the program passed inline (`-e`), never written to and read back from a path another user
///   could touch; `args` follow as its positional parameters;
/// - a clean environment: a fixed `PATH` and bpftrace's own settings only (map and string caps,
///   for bounded memory in the kernel and in the output; cached user symbols: one target, one
///   executable per bpftrace, where uncached bpftrace re-reads the ELF and /proc/PID/maps for
///   every frame it prints);
/// - no inherited descriptor beyond 0-2;
/// - SIGTERM when this process dies, so a killed helper or recorder never leaves bpftrace
///   attached behind it.
///
/// `bpftrace` must be the path [`preflight::bpftrace`] checked.
pub(crate) fn bpftrace_command<A: AsRef<std::ffi::OsStr>>(
    bpftrace: &std::path::Path,
    program: &str,
    args: impl IntoIterator<Item = A>,
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(bpftrace);
    cmd.env_clear()
        .env("PATH", SAFE_PATH)
        .env("BPFTRACE_MAX_STRLEN", "64")
        .env("BPFTRACE_MAP_KEYS_MAX", "8192")
        .env("BPFTRACE_CACHE_USER_SYMBOLS", "1")
        .args(["-f", "json", "-e", program])
        .args(args);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, close_range); it allocates nothing. (A
    // pre_exec makes std fork instead of posix_spawn: fine here, the helper and the recorder
    // are small processes that are never the frozen one.)
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            // The parent may have died before the prctl: then nobody will signal us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited"));
            }
            // Every descriptor from 3 up close-on-exec (std's own error pipe already is);
            // CLOSE_RANGE_CLOEXEC = 4 (Linux 5.11; older kernels: inherited descriptors stay).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32);
            Ok(())
        });
    }
    cmd
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT and SIGTERM ask for an orderly stop (bpftrace interrupted, what it recorded written)
/// instead of killing the process: [`stop_requested`] says when one came.
pub(crate) fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // function pointer has the signature `signal` expects.
        unsafe { libc::signal(sig, on_stop_signal as extern "C" fn(libc::c_int) as usize) };
    }
}

/// Whether SIGINT or SIGTERM arrived (see [`install_stop_handlers`]).
pub(crate) fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Stops bpftrace: SIGINT first (it detaches and prints its maps), SIGKILL if it has not exited
/// within `grace`.
pub(crate) fn stop_bpftrace(child: &mut std::process::Child, grace: std::time::Duration) {
    // Once reaped, the pid may belong to someone else: never signal it then.
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    interrupt(child);
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGINT to bpftrace unless it has been reaped: it detaches, prints every map, and exits.
pub(crate) fn interrupt(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill() on our own child, not reaped (checked above), so the pid is its own.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    }
}

/// Collects bpftrace's stderr on a thread (a full pipe must never block bpftrace), keeping the
/// first 64 KiB.
pub(crate) fn collect_stderr(
    stderr: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        for_each_line(stderr, |line| {
            if text.len() < 64 << 10 {
                text.push_str(&line);
                text.push('\n');
            }
            true
        });
        text
    })
}

/// bpftrace's first error line in `stderr`, skipping the harmless RLIMIT_MEMLOCK warning it
/// prints on this kernel.
pub(crate) fn first_error(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .find(|l| l.contains("ERROR") && !l.contains("RLIMIT_MEMLOCK"))
}

/// Calls `each` with every line of `reader` until EOF. Bytes that are not UTF-8 (a thread name
/// cut in the middle of a character) are replaced, not taken for the end of the output.
pub(crate) fn for_each_line(reader: impl std::io::Read, mut each: impl FnMut(String) -> bool) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if !each(line.trim_end_matches(['\n', '\r']).to_string()) {
                    return;
                }
            }
        }
    }
}

/// The recording program, embedded at build time (also at `probes/bpftrace/capture.bt`).
pub const CAPTURE_BT: &str = include_str!("../bpftrace/capture.bt");

/// The maps bpftrace printed, by name (`@off` ...), each a map from its key text to a value.
pub type Maps = BTreeMap<String, BTreeMap<String, u64>>;

/// Parses bpftrace `-f json` output: one JSON object per line; keeps `{"type":"map"}` lines.
pub fn parse_maps(output: &str) -> Maps {
    let mut maps = Maps::new();
    for line in output.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["type"] != "map" {
            continue;
        }
        if let Some(data) = v["data"].as_object() {
            for (name, entries) in data {
                let m = maps.entry(name.clone()).or_default();
                if let Some(obj) = entries.as_object() {
                    for (k, val) in obj {
                        if let Some(n) = val.as_u64() {
                            *m.entry(k.clone()).or_insert(0) += n;
                        }
                    }
                } else if let Some(n) = entries.as_u64() {
                    m.insert(String::new(), n);
                }
            }
        }
    }
    maps
}

/// Removes a legacy Rust symbol hash (`::h0123456789abcdef`) and the `+offset`.
fn clean_symbol(sym: &str) -> String {
    let sym = sym.split('+').next().unwrap_or(sym);
    let sym = match sym.rfind("::h") {
        Some(i) if sym.len() - i == 19 && sym[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => {
            &sym[..i]
        }
        _ => sym,
    };
    sym.replace(';', ":")
}

/// Kernel frames of a bpftrace kstack text, innermost first (`func+off` per line).
pub fn kernel_frames(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(clean_symbol)
        .collect()
}

/// User frames of a `ustack(perf)` text (`addr sym+off (module)` per line), innermost first.
/// Unresolved frames keep their address.
pub fn user_frames(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut parts = l.splitn(2, ' ');
            let addr = parts.next().unwrap_or("");
            let rest = parts.next().unwrap_or("");
            let sym = rest
                .rsplit_once(" (")
                .map(|(s, _)| s)
                .unwrap_or(rest)
                .trim();
            if sym.is_empty() || sym == "[unknown]" {
                format!("0x{addr}")
            } else {
                clean_symbol(sym)
            }
        })
        .collect()
}

/// Renames the user frames in every key of `maps` with `syms` (see [`symbols`]): each
/// `ustack(perf)` line `\t<addr> <name>+<off> (<module>)` becomes one line per (inlined) frame
/// at that address, innermost first, named by our own symbolizer — demangled, and named even
/// when the target had exited before bpftrace printed. Lines it cannot name are kept as
/// bpftrace printed them.
pub fn resymbolize(maps: &mut Maps, syms: &symbols::TargetSymbols) {
    for entries in maps.values_mut() {
        let old = std::mem::take(entries);
        for (key, v) in old {
            let mut out = String::with_capacity(key.len());
            // The innermost user frame is where the thread was; the others are return
            // addresses, named by the call before them (`addr - 1`), as perf and gdb do.
            let mut user_index = 0;
            for (i, line) in key.split('\n').enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let Some(frame) = line.strip_prefix('\t') else {
                    out.push_str(line);
                    continue;
                };
                let mut parts = frame.splitn(2, ' ');
                let addr = parts.next().unwrap_or("");
                let module = parts
                    .next()
                    .and_then(|r| r.rsplit_once(" ("))
                    .map(|(_, m)| m.trim_end_matches(')'))
                    .unwrap_or("");
                let named = u64::from_str_radix(addr, 16)
                    .map(|a| {
                        syms.resolve(if user_index == 0 {
                            a
                        } else {
                            a.saturating_sub(1)
                        })
                    })
                    .unwrap_or_default();
                user_index += 1;
                if named.is_empty() {
                    out.push_str(line);
                    continue;
                }
                for (j, f) in named.iter().rev().enumerate() {
                    if j > 0 {
                        out.push('\n');
                    }
                    out.push_str(&format!("\t{addr} {} ({module})", f.function));
                }
            }
            *entries.entry(out).or_insert(0) += v;
        }
    }
}

/// Splits a `comm, kstack[, ustack]` map key. bpftrace joins key parts with `,`; a stack is
/// empty or `\n` plus one line per frame, kernel frames indented with spaces and `ustack(perf)`
/// frames with a tab. A thread name cannot hold a newline, so the first `,\n` ends it.
pub fn split_key(key: &str) -> (String, Vec<String>, Vec<String>) {
    let first_stack = key.find(",\n").unwrap_or(key.len());
    let comm = key[..first_stack].trim_end_matches(',').trim().to_string();
    let stacks = &key[first_stack..];
    let (k, u) = match stacks.find(",\n\t") {
        Some(i) => (&stacks[..i], &stacks[i..]),
        None => (stacks, ""),
    };
    (
        comm,
        kernel_frames(k.trim_matches(',')),
        user_frames(u.trim_start_matches(',')),
    )
}

/// Brendan Gregg's folded format: `comm;user outermost..innermost;kernel outer..inner_[k] value`,
/// one line per stack, sorted, equal stacks merged.
pub fn folded(map: Option<&BTreeMap<String, u64>>) -> Vec<String> {
    let mut acc: BTreeMap<String, u64> = BTreeMap::new();
    for (key, v) in map.into_iter().flatten() {
        let (comm, k, u) = split_key(key);
        let mut frames = vec![if comm.is_empty() {
            "?".to_string()
        } else {
            comm.replace(' ', "_")
        }];
        frames.extend(u.iter().rev().cloned());
        frames.extend(k.iter().rev().map(|f| format!("{f}_[k]")));
        *acc.entry(frames.join(";")).or_insert(0) += v;
    }
    acc.into_iter().map(|(s, v)| format!("{s} {v}")).collect()
}

/// One blocking stack in the summary.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Blocking {
    /// The folded stack.
    pub stack: String,
    /// Microseconds off CPU.
    pub us: u64,
}

/// The mmap_lock part of the summary.
#[derive(Debug, Serialize, Default, PartialEq, Eq)]
pub struct MmapLock {
    /// Longest wait for the lock, µs.
    pub max_wait_us: u64,
    /// Longest write hold, µs.
    pub max_write_hold_us: u64,
    /// Kernel stack (outermost first) that released the longest write hold.
    pub holder_stack: String,
    /// Thread names that waited at least 1 ms.
    pub waiters: u64,
}

/// `summary.json` (contract fields plus `oncpu_samples`).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Target pid.
    pub pid: u32,
    /// Recording length, seconds.
    pub duration_s: u64,
    /// Total off-CPU time recorded, µs.
    pub offcpu_total_us: u64,
    /// Heaviest off-CPU stacks, heaviest first (at most 10).
    pub top_blocking: Vec<Blocking>,
    /// The same without threads that were idle by choice (sleeping, polling): what a freeze
    /// made threads wait for. Heaviest first, at most 10.
    pub top_waits: Vec<Blocking>,
    /// Off-CPU time of those idle stacks, µs.
    pub idle_us: u64,
    /// mmap_lock waits and holds.
    pub mmap_lock: MmapLock,
    /// On-CPU samples recorded.
    pub oncpu_samples: u64,
    /// The target exited this many seconds into the recording, which then ended early (its
    /// user frames are named from the files read while it ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_exited_after_s: Option<f64>,
    /// SIGINT or SIGTERM ended the recording early.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopped_by_signal: bool,
}

/// Builds the summary from the maps.
pub fn summarize(pid: u32, duration_s: u64, maps: &Maps) -> Summary {
    let off = folded(maps.get("@off"));
    let mut blocking: Vec<Blocking> = off
        .iter()
        .filter_map(|l| {
            l.rsplit_once(' ').map(|(s, v)| Blocking {
                stack: s.to_string(),
                us: v.parse().unwrap_or(0),
            })
        })
        .collect();
    let offcpu_total_us = blocking.iter().map(|b| b.us).sum();
    blocking.sort_by_key(|b| std::cmp::Reverse(b.us));
    let idle_us = blocking
        .iter()
        .filter(|b| is_idle(&b.stack))
        .map(|b| b.us)
        .sum();
    let top_waits: Vec<Blocking> = blocking
        .iter()
        .filter(|b| !is_idle(&b.stack))
        .take(10)
        .map(|b| Blocking {
            stack: b.stack.clone(),
            us: b.us,
        })
        .collect();
    blocking.truncate(10);
    let mut lock = MmapLock::default();
    if let Some(w) = maps.get("@lock_wait_max_us") {
        lock.max_wait_us = w.values().copied().max().unwrap_or(0);
        lock.waiters = w.values().filter(|&&v| v >= 1000).count() as u64;
    }
    if let Some(h) = maps.get("@write_hold_us") {
        if let Some((key, &v)) = h.iter().max_by_key(|(_, &v)| v) {
            lock.max_write_hold_us = v;
            let (_, mut k, _) = split_key(key);
            // The innermost frames are the tracepoint's own helpers, not the holder.
            k.retain(|f| !f.contains("mmap_lock_do_trace"));
            lock.holder_stack = k.iter().rev().cloned().collect::<Vec<_>>().join(";");
        }
    }
    let oncpu_samples = maps.get("@on").map(|m| m.values().sum()).unwrap_or(0);
    Summary {
        pid,
        duration_s,
        offcpu_total_us,
        top_blocking: blocking,
        top_waits,
        idle_us,
        mmap_lock: lock,
        oncpu_samples,
        target_exited_after_s: None,
        stopped_by_signal: false,
    }
}

/// Kernel functions a thread sits in when it waits because it chose to (a sleep, an idle poll),
/// not because something held it up.
const IDLE_FRAMES: [&str; 6] = [
    "do_nanosleep",
    "ep_poll",
    "do_epoll_wait",
    "do_sys_poll",
    "do_select",
    "core_sys_select",
];

fn kernel_name(frame: &str) -> Option<&str> {
    frame.strip_suffix("_[k]")
}

/// True when a folded stack is a thread idle by choice (see [`IDLE_FRAMES`]).
pub fn is_idle(folded_stack: &str) -> bool {
    folded_stack
        .split(';')
        .filter_map(kernel_name)
        .any(|f| IDLE_FRAMES.contains(&f))
}

/// Where a folded off-CPU stack waits: its innermost frames past the scheduler's own
/// (`__schedule`, `schedule`, ...), innermost first, at most 3, e.g.
/// `rwsem_down_write_slowpath <- vm_mmap_pgoff <- do_syscall_64`.
pub fn wait_site(folded_stack: &str) -> String {
    let scheduler = |f: &str| {
        let f = kernel_name(f).unwrap_or(f);
        f == "schedule"
            || f.starts_with("__schedule")
            || f.starts_with("schedule_")
            || f.starts_with("io_schedule")
            || f.starts_with("preempt_schedule")
    };
    folded_stack
        .rsplit(';')
        .skip_while(|f| scheduler(f))
        .take(3)
        .map(|f| kernel_name(f).unwrap_or(f))
        .collect::<Vec<_>>()
        .join(" <- ")
}

/// The one-paragraph human summary printed on stdout.
pub fn human(s: &Summary) -> String {
    let ms = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
    let mut out = format!(
        "freezetrap-capture: pid {} for {} s: {} off CPU ({} of it idle)",
        s.pid,
        s.duration_s,
        ms(s.offcpu_total_us),
        ms(s.idle_us)
    );
    if s.mmap_lock.max_write_hold_us > 0 {
        let holder: Vec<&str> = s.mmap_lock.holder_stack.rsplit(';').take(3).collect();
        out.push_str(&format!(
            "; mmap_lock held for write {} by {}; {} thread(s) waited up to {}",
            ms(s.mmap_lock.max_write_hold_us),
            holder.join(" <- "),
            s.mmap_lock.waiters,
            ms(s.mmap_lock.max_wait_us)
        ));
    }
    match s.top_waits.first() {
        Some(b) => out.push_str(&format!(
            "; top wait ({}): {}",
            ms(b.us),
            wait_site(&b.stack)
        )),
        None if s.idle_us > 0 => out.push_str("; every off-CPU stack was an idle sleep or poll"),
        None => {}
    }
    if let Some(t) = s.target_exited_after_s {
        out.push_str(&format!("; the target exited after {t:.1} s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"type": "attached_probes", "data": {"probes": 6}}
{"type": "map", "data": {"@off": {"mmapper-0,\n    __schedule+1576\n    schedule+35\n    rwsem_down_write_slowpath+600\n    vm_mmap_pgoff+200\n,\n\t7f00 mmap64+20 (/usr/lib/libc.so.6)\n\t5600 my_app::worker::h0123456789abcdef+40 (/bin/app)\n": 48000, "main,\n    __schedule+1\n,\n\t7f01 [unknown] (/x)\n": 10, "sleeper,\n    __schedule+1\n    schedule+2\n    do_nanosleep+3\n    hrtimer_nanosleep+4\n,": 90000}}}
{"type": "map", "data": {"@lock_wait_max_us": {"mmapper-0": 50400, "mmapper-1": 900}}}
{"type": "map", "data": {"@write_hold_us": {"app,\n    mmap_write_unlock+10\n    dup_mmap+900\n    copy_process+2000\n    kernel_clone+100\n": 48800}}}
{"type": "map", "data": {"@on": {"app,\n    x+1\n,\n": 7}}}
"#;

    #[test]
    fn folded_lines_go_outermost_first_with_kernel_marks() {
        let maps = parse_maps(SAMPLE);
        let f = folded(maps.get("@off"));
        assert_eq!(f.len(), 3);
        assert!(f.contains(&"mmapper-0;my_app::worker;mmap64;vm_mmap_pgoff_[k];rwsem_down_write_slowpath_[k];schedule_[k];__schedule_[k] 48000".to_string()), "{f:#?}");
        assert!(
            f.iter()
                .any(|l| l.starts_with("main;0x7f01;__schedule_[k] ")),
            "{f:#?}"
        );
    }

    #[test]
    fn summary_has_the_contract_fields_and_reads_like_a_sentence() {
        let s = summarize(42, 10, &parse_maps(SAMPLE));
        assert_eq!(s.offcpu_total_us, 138010);
        assert_eq!(
            s.top_blocking[0].us, 90000,
            "the sleeper is the heaviest stack"
        );
        assert_eq!(s.idle_us, 90000);
        assert_eq!(s.top_waits[0].us, 48000, "but not a wait");
        assert_eq!(s.top_waits.len(), 2);
        assert_eq!(s.mmap_lock.max_wait_us, 50400);
        assert_eq!(s.mmap_lock.max_write_hold_us, 48800);
        assert_eq!(s.mmap_lock.waiters, 1);
        assert_eq!(
            s.mmap_lock.holder_stack,
            "kernel_clone;copy_process;dup_mmap;mmap_write_unlock"
        );
        assert_eq!(s.oncpu_samples, 7);
        let j = serde_json::to_value(&s).unwrap();
        for k in [
            "pid",
            "duration_s",
            "offcpu_total_us",
            "top_blocking",
            "top_waits",
            "idle_us",
            "mmap_lock",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
        assert_eq!(
            human(&s),
            "freezetrap-capture: pid 42 for 10 s: 138.0 ms off CPU (90.0 ms of it idle); mmap_lock held for write 48.8 ms by mmap_write_unlock <- dup_mmap <- copy_process; 1 thread(s) waited up to 50.4 ms; top wait (48.0 ms): rwsem_down_write_slowpath <- vm_mmap_pgoff <- mmap64"
        );
    }

    #[test]
    fn lines_survive_bytes_that_are_not_utf8() {
        let input: &[u8] = b"one\nth\xffree\nfour";
        let mut lines = Vec::new();
        for_each_line(input, |l| {
            lines.push(l);
            true
        });
        assert_eq!(lines, ["one", "th\u{fffd}ree", "four"]);
    }

    #[test]
    fn idle_stacks_and_wait_sites() {
        assert!(is_idle("t;nanosleep;do_nanosleep_[k];schedule_[k]"));
        assert!(is_idle(
            "t;epoll_wait;do_epoll_wait_[k];ep_poll_[k];schedule_[k]"
        ));
        assert!(
            !is_idle("t;do_nanosleep;futex_wait_[k]"),
            "a user frame of that name is not idle"
        );
        assert!(!is_idle("t;read;io_schedule_[k]"));
        assert_eq!(
            wait_site("t;f;filemap_fault_[k];folio_wait_bit_common_[k];io_schedule_[k];schedule_[k];__schedule_[k]"),
            "folio_wait_bit_common <- filemap_fault <- f"
        );
        assert_eq!(wait_site("t;__schedule_[k]"), "t");
    }

    #[test]
    fn keys_with_an_empty_stack_split_cleanly() {
        // A sample taken in user mode has no kernel stack.
        let (c, k, u) = split_key("bash,,\n\t5555 find_child+0 (/usr/bin/bash)\n");
        assert_eq!(
            (c.as_str(), k.len(), u),
            ("bash", 0, vec!["find_child".to_string()])
        );
        // A kernel thread has no user stack.
        let (c, k, u) = split_key("kworker/0:1,\n    worker_thread+1\n,");
        assert_eq!(
            (c.as_str(), k, u.len()),
            ("kworker/0:1", vec!["worker_thread".to_string()], 0)
        );
        // Two parts (the write-hold map).
        let (c, k, _) = split_key("app,\n    dup_mmap+9\n    copy_process+2\n");
        assert_eq!(c, "app");
        assert_eq!(k, ["dup_mmap", "copy_process"]);
        let (c, k, u) = split_key("idle,,");
        assert_eq!((c.as_str(), k.len(), u.len()), ("idle", 0, 0));
    }

    #[inline(never)]
    fn a_frame_to_rename() -> u64 {
        std::hint::black_box(a_frame_to_rename as fn() -> u64 as usize as u64)
    }

    #[test]
    fn user_frames_are_renamed_with_return_addresses_looked_up_at_the_call() {
        let syms = symbols::TargetSymbols::snapshot(std::process::id()).unwrap();
        let f = a_frame_to_rename();
        // Two frames: the innermost at the function's first byte, then a return address just
        // past it (looked up at `addr - 1`, still inside the function).
        let key = format!(
            "t,\n    x+1\n,\n\t{f:x} [unknown] (/x)\n\t{:x} [unknown] (/x)\n",
            f + 1
        );
        let mut maps = Maps::new();
        maps.entry("@off".into()).or_default().insert(key, 7);
        resymbolize(&mut maps, &syms);
        let (key, v) = maps["@off"].iter().next().unwrap();
        assert_eq!(*v, 7);
        let (_, _, user) = split_key(key);
        assert_eq!(user.len(), 2, "{key}");
        assert!(
            user.iter().all(|u| u.ends_with("a_frame_to_rename")),
            "{user:?}"
        );
    }

    #[test]
    fn the_embedded_program_is_the_file() {
        assert!(CAPTURE_BT.contains("tracepoint:sched:sched_switch"));
        assert!(
            !CAPTURE_BT.contains("kprobe:"),
            "this kernel has no kprobes"
        );
    }
}
