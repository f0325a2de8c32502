//! Attaching the recorder's uprobes to the target's `freezetrap:stall_begin`/`stall_end` sites,
//! and reading a probe's arguments back from the registers it sent.
//!
//! aya 0.14 attaches uprobes but cannot give the kernel a *reference counter* (the probe's
//! semaphore, which the `usdt` crate's probes test before firing), and a probe with a zero
//! semaphore never fires. So the perf event is opened here (`perf_event_open` on the `uprobe`
//! PMU with `ref_ctr_offset`, the way libbpf does it) and linked to the program with
//! `BPF_LINK_CREATE`, whose cookie tells the program which site fired: each inlined site keeps
//! its arguments in registers of its own (`8@%rdi` at one, `8@%rax` at another).
//!
//! The event is opened for every process (pid -1, cpu 0: a uprobe's program runs on whichever
//! CPU hits it), not for the target's pid, and the program keeps only the target's hits. A
//! per-process perf event costs every context switch on the machine ~0.08 µs (measured with
//! `cargo bench --bench capture`): it turns on the scheduler's perf context switching for every
//! task. The price of the system-wide event falls only on other processes running the same
//! executable: they, too, find their probe's semaphore set, and a stall they report takes a
//! uprobe trap, filtered out by the program.

use crate::stapsdt::Site;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `perf_event_attr` up to `config2` (PERF_ATTR_SIZE_VER1, 72 bytes): all a uprobe needs.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` with a perf event target.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
    pad: [u64; 8],
}

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `config` bits that carry the reference counter's file offset (PERF_UPROBE_REF_CTR_OFFSET_SHIFT).
const REF_CTR_OFFSET_SHIFT: u32 = 32;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PERF_EVENT: u32 = 41;

/// One attached site: the perf event and the link, closed (detached) on drop.
pub(crate) struct Attached {
    _event: OwnedFd,
    _link: OwnedFd,
}

/// The PMU type of uprobes, from sysfs.
fn uprobe_pmu() -> std::io::Result<u32> {
    let text = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?;
    text.trim().parse().map_err(std::io::Error::other)
}

/// Attaches `program` to `site` of `exe` (in every process running it; see the module docs),
/// with `cookie` for the program.
pub(crate) fn attach(
    program: impl AsFd,
    exe: &Path,
    site: &Site,
    cookie: u64,
) -> std::io::Result<Attached> {
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(exe.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = PerfEventAttr {
        kind: uprobe_pmu()?,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: site.semaphore << REF_CTR_OFFSET_SHIFT,
        sample_period: 1,
        wakeup_events: 1,
        config1: path.as_ptr() as u64,
        config2: site.pc,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it states, and `path` outlives the
    // call (the kernel copies the string during it); the result is a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            -1 as libc::pid_t, // every process ...
            0,                 // ... seen from CPU 0, which for a uprobe is every CPU
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by perf_event_open and is owned by nobody else.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let link_attr = LinkCreateAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        target_fd: event.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        bpf_cookie: cookie,
        ..Default::default()
    };
    // SAFETY: `link_attr` is a valid bpf_attr prefix for BPF_LINK_CREATE, zero-padded, with its
    // size passed; the result is a new fd or -1.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &link_attr as *const LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as u32,
        )
    };
    if link < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Attached {
        _event: event,
        // SAFETY: as above, a new fd from BPF_LINK_CREATE.
        _link: unsafe { OwnedFd::from_raw_fd(link as i32) },
    })
}

/// Where one argument is: a register (index into x86-64 `struct pt_regs`) or a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arg {
    Register {
        index: usize,
        bytes: u32,
        signed: bool,
    },
    Constant(u64),
}

/// Parses a note's argument specification (`8@%rdi -4@%eax 8@$5`). Memory operands
/// (`8@-16(%rbp)`) are refused: the program sends registers only.
pub(crate) fn parse_args(spec: &str) -> Result<Vec<Arg>, String> {
    spec.split_whitespace()
        .map(|a| {
            let (size, place) = a
                .split_once('@')
                .ok_or_else(|| format!("argument {a:?}: no size@place"))?;
            let size: i32 = size
                .parse()
                .map_err(|_| format!("argument {a:?}: bad size"))?;
            if let Some(c) = place.strip_prefix('$') {
                return c
                    .parse::<i64>()
                    .map(|v| Arg::Constant(v as u64))
                    .map_err(|_| format!("argument {a:?}: bad constant"));
            }
            let reg = place.strip_prefix('%').ok_or_else(|| {
                format!("argument {a:?}: not a register (memory operands are not supported)")
            })?;
            let index =
                register_index(reg).ok_or_else(|| format!("argument {a:?}: unknown register"))?;
            Ok(Arg::Register {
                index,
                bytes: size.unsigned_abs().clamp(1, 8),
                signed: size < 0,
            })
        })
        .collect()
}

/// Index in x86-64 `struct pt_regs` (r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di
/// orig_ax ip cs flags sp ss) of a register by any of its names (`rdi`, `edi`, `di`, `dil`,
/// `r8`, `r8d`, ...).
fn register_index(name: &str) -> Option<usize> {
    const LEGACY: [(&str, usize); 8] = [
        ("ax", 10),
        ("bx", 5),
        ("cx", 11),
        ("dx", 12),
        ("si", 13),
        ("di", 14),
        ("bp", 4),
        ("sp", 19),
    ];
    if let Some(n) = name.strip_prefix('r').and_then(|n| {
        let digits = n.trim_end_matches(['d', 'w', 'b']);
        digits.parse::<usize>().ok()
    }) {
        // r8 .. r15
        return match n {
            8 => Some(9),
            9 => Some(8),
            10 => Some(7),
            11 => Some(6),
            12 => Some(3),
            13 => Some(2),
            14 => Some(1),
            15 => Some(0),
            _ => None,
        };
    }
    let base = name
        .strip_prefix('r')
        .or_else(|| name.strip_prefix('e'))
        .unwrap_or(name);
    let base = match base {
        "al" | "ah" => "ax",
        "bl" | "bh" => "bx",
        "cl" | "ch" => "cx",
        "dl" | "dh" => "dx",
        "sil" => "si",
        "dil" => "di",
        "bpl" => "bp",
        "spl" => "sp",
        "ip" => return Some(16),
        other => other,
    };
    LEGACY.iter().find(|(n, _)| *n == base).map(|(_, i)| *i)
}

/// The value of `arg` given the registers the program sent.
pub(crate) fn value(arg: Arg, regs: &[u64]) -> u64 {
    match arg {
        Arg::Constant(v) => v,
        Arg::Register {
            index,
            bytes,
            signed,
        } => {
            let raw = regs.get(index).copied().unwrap_or(0);
            if bytes >= 8 {
                return raw;
            }
            let bits = bytes * 8;
            let v = raw & ((1u64 << bits) - 1);
            if signed && v >> (bits - 1) == 1 {
                v | !((1u64 << bits) - 1)
            } else {
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_specs_name_registers_of_pt_regs() {
        let args = parse_args("8@%rdi -4@%eax 8@%r8 8@$-5 2@%r15w").unwrap();
        assert_eq!(
            args,
            [
                Arg::Register {
                    index: 14,
                    bytes: 8,
                    signed: false
                },
                Arg::Register {
                    index: 10,
                    bytes: 4,
                    signed: true
                },
                Arg::Register {
                    index: 9,
                    bytes: 8,
                    signed: false
                },
                Arg::Constant(-5i64 as u64),
                Arg::Register {
                    index: 0,
                    bytes: 2,
                    signed: false
                },
            ]
        );
        let mut regs = [0u64; 21];
        regs[14] = 77;
        regs[10] = 0xffff_ffff_ffff_fff0;
        regs[0] = 0x1_0005;
        assert_eq!(value(args[0], &regs), 77);
        assert_eq!(value(args[1], &regs), (-16i64) as u64);
        assert_eq!(value(args[4], &regs), 5);
        assert!(parse_args("8@-16(%rbp)")
            .unwrap_err()
            .contains("memory operands"));
        assert!(parse_args("8@%xmm0").is_err());
    }
}
