//! The compiled recorder: `bpf/recorder.bpf.o` (C, CO-RE, built by `bpf/build.sh`), loaded by
//! aya, turned into the same [`Event`]s that `armed.bt`'s output decodes to, so the rolling
//! window, the captures and their conclusions are one code path for both engines.
//!
//! Why: `armed.bt` walked the kernel and user stacks of every target thread at every switch out
//! (3.6-3.9 µs per context switch, pinned), and bpftrace compiles its program at every start
//! (0.2-0.5 s) and keeps LLVM in memory (~120 MiB). This program has one hook, at the end of
//! `__schedule()` on the thread that runs again: from the thread's own scheduler clocks it knows
//! how long it was away, and walks its stacks only for blocks of `--min-block-us` or more
//! (~0.2 µs per context switch). It is verified and attached in tens of milliseconds.
//!
//! It needs the kernel's BTF (`/sys/kernel/btf/vmlinux`) for its CO-RE relocations and its
//! `tp_btf` programs; without it (or when loading fails) the recorder says why in one line and
//! runs `armed.bt` with bpftrace instead.

mod kernel_symbols;
#[cfg(test)]
mod tests;
mod triggered;
mod usdt;

pub(crate) use triggered::record_for;

use crate::armed::{Event, StallSeen};
use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{BtfTracePoint, PerfEvent, UProbe};
use aya::{Btf, Ebpf, EbpfLoader, Pod};
use kernel_symbols::KernelSymbols;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The compiled program, embedded (aligned: aya parses it in place).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/recorder.bpf.o");

const FRAMES: usize = 32;
const EVENT_OFF: u32 = 1;
const EVENT_ON: u32 = 2;
const EVENT_HOLD: u32 = 3;
const EVENT_STALL_BEGIN: u32 = 4;
const EVENT_STALL_END: u32 = 5;

/// `struct event` of recorder.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct StackEvent {
    kind: u32,
    tid: u32,
    ts: u64,
    value: u64,
    comm: [u8; 16],
    kernel_bytes: i32,
    user_bytes: i32,
    kstack: [u64; FRAMES],
    ustack: [u64; FRAMES],
}

/// `struct usdt_event` of recorder.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct UsdtEvent {
    kind: u32,
    tid: u32,
    ts: u64,
    site: u64,
    regs: [u64; 21],
}

/// `struct bucket_key` of recorder.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct BucketKey {
    bucket: u64,
    tid: u32,
    pad: u32,
}

/// `struct bucket_value` of recorder.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct BucketValue {
    us: u64,
    comm: [u8; 16],
}

// SAFETY: plain `repr(C)` integers and byte arrays, no padding (every field is naturally
// aligned and the sizes add up), valid for any bit pattern — what the kernel copies out.
unsafe impl Pod for BucketKey {}
// SAFETY: as above.
unsafe impl Pod for BucketValue {}

/// What to record.
pub(crate) struct Settings<'a> {
    pub(crate) pid: u32,
    /// The target's executable, as this process can open it, for the uprobes on its stall
    /// probes (the armed recorder); None records without them (the triggered helper).
    pub(crate) exe: Option<&'a Path>,
    pub(crate) min_block_us: u64,
    pub(crate) bucket_ms: u64,
    /// Per-thread slots (a power of two, at most [`SLOTS`]): [`SLOTS`] but in tests, which use
    /// fewer to send threads down the program's fallback for a slot another thread holds.
    pub(crate) slots: u32,
}

/// The program's per-thread slots (`SLOTS` in recorder.bpf.c).
pub(crate) const SLOTS: u32 = 65536;

/// Maps of one bucket: map name (`@off`, ...) -> key text -> value.
type Bucket = BTreeMap<&'static str, BTreeMap<String, u64>>;

/// The loaded, attached program and what it has sent that is not yet handed on.
pub(crate) struct Recording {
    /// Holds the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    _usdt: Vec<usdt::Attached>,
    ring: RingBuf<MapData>,
    waits: HashMap<MapData, BucketKey, BucketValue>,
    runq: HashMap<MapData, BucketKey, BucketValue>,
    counters: Array<MapData, u64>,
    /// Each attached site's argument locations, by cookie.
    sites: Vec<Vec<usdt::Arg>>,
    kernel: Kernel,
    bucket_ns: u64,
    pending: BTreeMap<u64, Bucket>,
    last_tick: Option<u64>,
    lost_seen: u64,
}

/// The kernel's symbol table, being read or read.
enum Kernel {
    Loading(std::thread::JoinHandle<std::io::Result<KernelSymbols>>),
    Loaded(KernelSymbols),
}

impl Kernel {
    /// The table, waiting for it if it is still being read; empty (frames as addresses, said
    /// once) if it could not be read.
    fn get(&mut self) -> &KernelSymbols {
        if let Kernel::Loading(_) = self {
            let Kernel::Loading(handle) =
                std::mem::replace(self, Kernel::Loaded(KernelSymbols::empty()))
            else {
                unreachable!()
            };
            match handle.join() {
                Ok(Ok(table)) => *self = Kernel::Loaded(table),
                Ok(Err(e)) => eprintln!("freezetrap-capture: cannot read /proc/kallsyms ({e}): kernel frames are addresses"),
                Err(_) => eprintln!("freezetrap-capture: reading /proc/kallsyms failed: kernel frames are addresses"),
            }
        }
        match self {
            Kernel::Loaded(table) => table,
            Kernel::Loading(_) => unreachable!("joined above"),
        }
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Recording {
    /// Loads and attaches the program for `s.pid`. Errors are one line each.
    pub(crate) fn start(s: &Settings) -> Result<Self, String> {
        let btf = Btf::from_sys_fs().map_err(|e| {
            format!("no kernel BTF (/sys/kernel/btf/vmlinux) for the compiled recorder: {e}")
        })?;
        // The executable is opened once and used only through that descriptor: its probe notes
        // are read from it and the uprobes attached to `/proc/self/fd/N`, so a file renamed
        // over the path after the check is neither read nor probed.
        let opened = match s.exe {
            Some(exe) => Some(open_target_exe(exe, s.pid)?),
            None => None,
        };
        let by_fd = opened
            .as_ref()
            .map(|f| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())));
        let sites = match (&by_fd, s.exe) {
            (Some(fd_path), Some(exe)) => crate::stapsdt::sites_in(fd_path)
                .map_err(|e| format!("cannot read the probes of {}: {e}", exe.display()))?,
            _ => Vec::new(),
        };
        // The kernel's symbols are needed only to name frames when data comes back: read on a
        // thread while the program loads (reading /proc/kallsyms takes ~60 ms here, more than
        // half of the time to recording otherwise).
        let kernel = Kernel::Loading(std::thread::spawn(KernelSymbols::load));
        let bucket_ns = s.bucket_ms.max(1) * 1_000_000;
        let min_block_ns = s.min_block_us.saturating_mul(1000);
        if !s.slots.is_power_of_two() || s.slots > SLOTS {
            return Err(format!("{} slots: a power of two up to {SLOTS}", s.slots));
        }
        let slot_mask = s.slots - 1;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            // `seen` is task storage, which aya creates but has no user-space type for (it is
            // only used by the programs).
            .allow_unsupported_maps()
            .override_global("target_tgid", &s.pid, true)
            .override_global("min_block_ns", &min_block_ns, true)
            .override_global("bucket_ns", &bucket_ns, true)
            .override_global("slot_mask", &slot_mask, true)
            .load(OBJECT)
            .map_err(|e| format!("loading the compiled recorder failed: {e}"))?;

        for (program, tracepoint) in [
            ("on_schedule_exit", "sched_exit_tp"),
            ("on_lock_start", "mmap_lock_start_locking"),
            ("on_lock_acquired", "mmap_lock_acquire_returned"),
            ("on_lock_released", "mmap_lock_released"),
            ("on_exit", "sched_process_exit"),
        ] {
            let p: &mut BtfTracePoint = program_mut(&mut ebpf, program)?;
            p.load(tracepoint, &btf)
                .map_err(|e| verifier(program, &e))?;
            p.attach().map_err(err(tracepoint))?;
        }
        let p: &mut PerfEvent = program_mut(&mut ebpf, "on_cpu_sample")?;
        p.load().map_err(|e| verifier("on_cpu_sample", &e))?;
        let cpus = aya::util::online_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
        for cpu in cpus {
            p.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(99),
                false,
            )
            .map_err(err("the 99 Hz on-CPU sampler"))?;
        }

        let mut attached = Vec::new();
        let mut site_args = Vec::new();
        for (program, probe) in [
            ("on_stall_begin", "stall_begin"),
            ("on_stall_end", "stall_end"),
        ] {
            let Some(fd_path) = &by_fd else { break };
            let p: &mut UProbe = program_mut(&mut ebpf, program)?;
            p.load().map_err(|e| verifier(program, &e))?;
            let fd = p.fd().map_err(err(program))?;
            for site in sites
                .iter()
                .filter(|x| x.provider == probes::PROVIDER && x.name == probe)
            {
                let args = usdt::parse_args(&site.args)
                    .map_err(|e| format!("freezetrap:{probe} at {:#x}: {e}", site.pc))?;
                let cookie = site_args.len() as u64;
                attached.push(
                    usdt::attach(fd, fd_path, site, cookie).map_err(|e| {
                        format!("attaching freezetrap:{probe} at {:#x}: {e}", site.pc)
                    })?,
                );
                site_args.push(args);
            }
        }
        if let (Some(exe), true) = (s.exe, site_args.is_empty()) {
            return Err(format!(
                "{} has no freezetrap:stall_begin probe",
                exe.display()
            ));
        }

        let ring = RingBuf::try_from(take_map(&mut ebpf, "events")?).map_err(err("events"))?;
        let waits = HashMap::try_from(take_map(&mut ebpf, "waits")?).map_err(err("waits"))?;
        let runq = HashMap::try_from(take_map(&mut ebpf, "runq")?).map_err(err("runq"))?;
        let counters =
            Array::try_from(take_map(&mut ebpf, "counters")?).map_err(err("counters"))?;
        Ok(Self {
            _ebpf: ebpf,
            _usdt: attached,
            ring,
            waits,
            runq,
            counters,
            sites: site_args,
            kernel,
            bucket_ns,
            pending: BTreeMap::new(),
            last_tick: None,
            lost_seen: 0,
        })
    }

    /// Hands on what arrived: stall probes at once; the data of every bucket that ended before
    /// the previous one (so nothing still being counted is cut), as one [`Event::Map`] per map;
    /// then [`Event::Tick`] for the current bucket, once per bucket. `flush` hands on every
    /// bucket (the recording is ending).
    pub(crate) fn poll(&mut self, now_ns: u64, flush: bool, out: &mut dyn FnMut(Event)) {
        self.drain_ring(out);
        let current = now_ns / self.bucket_ns;
        let cutoff = if flush {
            u64::MAX
        } else {
            current.saturating_sub(2)
        };
        for (map, name, sum) in [
            (&mut self.waits, "@wait", false),
            (&mut self.runq, "@runq", true),
        ] {
            let done: Vec<(BucketKey, BucketValue)> = map
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| k.bucket <= cutoff)
                .collect();
            for (k, v) in done {
                let _ = map.remove(&k);
                let entry = self
                    .pending
                    .entry(k.bucket)
                    .or_default()
                    .entry(name)
                    .or_default()
                    .entry(format!("{},{}", k.tid, comm(&v.comm)))
                    .or_insert(0);
                *entry = if sum {
                    *entry + v.us
                } else {
                    (*entry).max(v.us)
                };
            }
        }
        let later = if flush {
            BTreeMap::new()
        } else {
            self.pending.split_off(&(cutoff.saturating_add(1)))
        };
        let ready = std::mem::replace(&mut self.pending, later);
        let mut by_name: BTreeMap<&'static str, Vec<(u64, String, u64)>> = BTreeMap::new();
        for (bucket, maps) in ready {
            for (name, entries) in maps {
                by_name
                    .entry(name)
                    .or_default()
                    .extend(entries.into_iter().map(|(k, v)| (bucket, k, v)));
            }
        }
        for (name, entries) in by_name {
            out(Event::Map {
                name: name.to_string(),
                entries,
            });
        }
        let lost: u64 = self.counters.iter().filter_map(Result::ok).sum();
        if lost > self.lost_seen {
            out(Event::Lost(lost - self.lost_seen));
            self.lost_seen = lost;
        }
        if self.last_tick != Some(current) {
            self.last_tick = Some(current);
            out(Event::Tick(current));
        }
    }

    fn drain_ring(&mut self, out: &mut dyn FnMut(Event)) {
        let Self {
            ring,
            sites,
            kernel,
            bucket_ns,
            pending,
            ..
        } = self;
        let kernel = kernel.get();
        while let Some(item) = ring.next() {
            let bytes: &[u8] = &item;
            let kind = bytes
                .get(..4)
                .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or_default()));
            match kind {
                EVENT_STALL_BEGIN | EVENT_STALL_END => {
                    let Some(e) = read::<UsdtEvent>(bytes) else {
                        continue;
                    };
                    let args: Vec<u64> = sites
                        .get(e.site as usize)
                        .map(|a| a.iter().map(|&a| usdt::value(a, &e.regs)).collect())
                        .unwrap_or_default();
                    let arg = |i: usize| args.get(i).copied().unwrap_or(0);
                    out(if kind == EVENT_STALL_BEGIN {
                        Event::StallBegin(StallSeen {
                            id: arg(0),
                            thread_id: arg(1),
                            elapsed_ns: arg(2),
                            probe_ns: e.ts,
                            duration_ns: None,
                        })
                    } else {
                        Event::StallEnd {
                            id: arg(0),
                            duration_ns: arg(1),
                        }
                    });
                }
                EVENT_OFF | EVENT_ON | EVENT_HOLD => {
                    let Some(e) = read::<StackEvent>(bytes) else {
                        continue;
                    };
                    add_stack_event(pending, kernel, *bucket_ns, &e);
                }
                _ => {}
            }
        }
    }
}

/// Adds an off-CPU block, on-CPU sample or write hold to its bucket's map.
fn add_stack_event(
    pending: &mut BTreeMap<u64, Bucket>,
    kernel: &KernelSymbols,
    bucket_ns: u64,
    e: &StackEvent,
) {
    let kstack = kernel_stack(kernel, e);
    let (name, key) = match e.kind {
        EVENT_OFF => (
            "@off",
            format!("{},{},{kstack},{}", e.tid, comm(&e.comm), user_stack(e)),
        ),
        EVENT_ON => (
            "@on",
            format!("{},{},{kstack},{}", e.tid, comm(&e.comm), user_stack(e)),
        ),
        _ => ("@hold", format!("{},{},{kstack}", e.tid, comm(&e.comm))),
    };
    let entry = pending
        .entry(e.ts / bucket_ns)
        .or_default()
        .entry(name)
        .or_default()
        .entry(key)
        .or_insert(0);
    match e.kind {
        EVENT_OFF => *entry += e.value / 1000,
        EVENT_ON => *entry += e.value,
        _ => *entry = (*entry).max(e.value / 1000),
    }
}

/// Opens `exe` and checks that it is the file `pid` runs (same device and inode as
/// `/proc/PID/exe`).
fn open_target_exe(exe: &Path, pid: u32) -> Result<std::fs::File, String> {
    let file =
        std::fs::File::open(exe).map_err(|e| format!("cannot open {}: {e}", exe.display()))?;
    let (have, want) = (
        file.metadata(),
        std::fs::metadata(format!("/proc/{pid}/exe")),
    );
    match (have, want) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => Ok(file),
        _ => Err(format!(
            "{} is no longer the executable pid {pid} runs",
            exe.display()
        )),
    }
}

/// A copy of the `T` at the start of `bytes` (ring buffer records are only 8-byte aligned).
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>()).then(|| {
        // SAFETY: `bytes` holds at least size_of::<T>() bytes, the read is unaligned, and T is
        // one of this module's repr(C) structs of integers, valid for any bit pattern.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn frames(stack: &[u64; FRAMES], bytes: i32) -> &[u64] {
    let n = usize::try_from(bytes).unwrap_or(0) / 8;
    &stack[..n.min(FRAMES)]
}

/// A kernel stack as bpftrace's `kstack` prints it: `\n` and one indented `name+off` per frame.
/// A tracepoint program's own frames are left out (the program, which `/proc/kallsyms` did not
/// list yet when it was read, and `bpf_trace_run*`, which called it): the stack starts where
/// the kernel was.
fn kernel_stack(kernel: &KernelSymbols, e: &StackEvent) -> String {
    let names: Vec<String> = frames(&e.kstack, e.kernel_bytes)
        .iter()
        .map(|&a| kernel.frame(a))
        .collect();
    let skip = names
        .iter()
        .take(4)
        .position(|n| n.starts_with("bpf_trace_run"))
        .map_or(0, |i| i + 1);
    if names.len() <= skip {
        return String::new();
    }
    let mut s = String::from("\n");
    for n in &names[skip..] {
        s.push_str("    ");
        s.push_str(n);
        s.push('\n');
    }
    s
}

/// A user stack as bpftrace's `ustack(perf)` prints it before naming: `\n` and a tab-indented
/// hex address per frame (named later from the target's files, see `maps::resymbolize`).
fn user_stack(e: &StackEvent) -> String {
    let f = frames(&e.ustack, e.user_bytes);
    if f.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n");
    for &a in f {
        s.push_str(&format!("\t{a:x} [unknown] ([unknown])\n"));
    }
    s
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the compiled recorder has no program {name}"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, String> {
    ebpf.take_map(name)
        .ok_or_else(|| format!("the compiled recorder has no map {name}"))
}

/// A load error with the verifier's last line (the full log is long; its end says why).
fn verifier(program: &str, e: &aya::programs::ProgramError) -> String {
    let text = match e {
        aya::programs::ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            log.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!("{e}: {l}"))
                .unwrap_or_else(|| e.to_string())
        }
        other => other.to_string(),
    };
    format!("the kernel refused the compiled recorder's {program}: {text}")
}
