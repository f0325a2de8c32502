//! The checks both capture modes make before starting bpftrace, each mapped to one line and a
//! distinct exit code, so an operator (or a script) can tell "install bpftrace" from "run as
//! root" without reading bpftrace's own errors.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code: bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: bpftrace not found.
pub const EXIT_NO_BPFTRACE: u8 = 3;
/// Exit code: not permitted (not root, no CAP_BPF + CAP_PERFMON).
pub const EXIT_NOT_PERMITTED: u8 = 4;
/// Exit code: tracefs not mounted.
pub const EXIT_NO_TRACEFS: u8 = 5;
/// Exit code: the target process is gone.
pub const EXIT_TARGET_GONE: u8 = 6;
/// Exit code: the output directory is not writable (or a write to it failed).
pub const EXIT_OUT_NOT_WRITABLE: u8 = 7;
/// Exit code: bpftrace failed or produced no data.
pub const EXIT_BPFTRACE_FAILED: u8 = 8;
/// Exit code: the target's binary has no `freezetrap:stall_begin` probe (armed mode).
pub const EXIT_NO_PROBE: u8 = 9;

/// A failed check: the exit code and the one-line message.
#[derive(Debug)]
pub struct Refusal {
    /// One of the `EXIT_*` codes.
    pub code: u8,
    /// What went wrong and what to do about it.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// Prints the message as one `freezetrap-capture:` line and returns the exit code.
    pub fn exit(self) -> ExitCode {
        eprintln!("freezetrap-capture: {}", self.message);
        ExitCode::from(self.code)
    }
}

fn find_on_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// The bpftrace to run: `explicit` if given, else the first `bpftrace` on PATH.
pub fn bpftrace(explicit: Option<&Path>) -> Result<PathBuf, Refusal> {
    match explicit
        .map(Path::to_path_buf)
        .or_else(|| find_on_path("bpftrace"))
    {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(Refusal::new(
            EXIT_NO_BPFTRACE,
            "bpftrace not found: install it (apt-get install bpftrace) or pass --bpftrace PATH",
        )),
    }
}

/// Root, tracefs, and a live target (`pid`, when there is one).
pub fn system(pid: Option<u32>) -> Result<(), Refusal> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Refusal::new(
            EXIT_NOT_PERMITTED,
            "not permitted: eBPF needs root (or CAP_BPF and CAP_PERFMON); run as root, or run the armed recorder as a root sidecar",
        ));
    }
    if !Path::new("/sys/kernel/tracing/events").exists()
        && !Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Err(Refusal::new(
            EXIT_NO_TRACEFS,
            "tracefs is not mounted: run `mount -t tracefs nodev /sys/kernel/tracing` as root",
        ));
    }
    if let Some(pid) = pid {
        if !pid_alive(pid) {
            return Err(Refusal::new(
                EXIT_TARGET_GONE,
                format!("target pid {pid} is gone"),
            ));
        }
    }
    Ok(())
}

/// True while `/proc/PID` exists (and the process is not a zombie that already exited).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the last ')' of the comm field; Z and X mean it has exited.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next()),
            Some('Z' | 'X') | None
        ),
        Err(_) => false,
    }
}

/// The offset of the `write` flag in the records of the three `mmap_lock` events, read from their
/// tracefs `format` files (the programs read the flag by offset: see `capture.bt`). An error
/// says why it could not be read or the events disagree.
pub fn mmap_lock_write_offset() -> Result<u64, String> {
    let mut found = Vec::new();
    for event in [
        "mmap_lock_start_locking",
        "mmap_lock_acquire_returned",
        "mmap_lock_released",
    ] {
        let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|t| {
                std::fs::read_to_string(format!("{t}/events/mmap_lock/{event}/format")).ok()
            })
            .ok_or_else(|| format!("no tracefs format for mmap_lock:{event}"))?;
        found.push(
            write_offset_in(&format)
                .ok_or_else(|| format!("mmap_lock:{event} has no `bool write` field"))?,
        );
    }
    if found.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!(
            "the mmap_lock events keep `write` at different offsets {found:?}"
        ));
    }
    Ok(found[0])
}

/// The offset of `field:bool write;` in a tracefs event `format` text.
fn write_offset_in(format: &str) -> Option<u64> {
    let line = format.lines().find(|l| l.contains("field:bool write;"))?;
    let (_, rest) = line.split_once("offset:")?;
    rest.split(';').next()?.trim().parse().ok()
}

/// [`mmap_lock_write_offset`], or 24 (x86-64, Linux 6.x) after a one-line warning.
pub fn mmap_lock_write_offset_or_default() -> u64 {
    mmap_lock_write_offset().unwrap_or_else(|e| {
        eprintln!("freezetrap-capture: {e}; assuming offset 24 for mmap_lock's write flag");
        24
    })
}

/// Creates `dir` (and parents) and proves it is writable by writing and removing a file.
pub fn writable_dir(dir: &Path) -> Result<(), Refusal> {
    let probe = dir.join(".freezetrap-probe");
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&probe, b""))
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| {
            Refusal::new(
                EXIT_OUT_NOT_WRITABLE,
                format!("output directory {} is not writable: {e}", dir.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_one_is_not() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn the_write_offset_comes_from_the_format_text() {
        let format = "name: mmap_lock_released\nID: 676\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:struct mm_struct * mm;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:u64 memcg_id;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:bool write;\toffset:24;\tsize:1;\tsigned:0;\n";
        assert_eq!(write_offset_in(format), Some(24));
        assert_eq!(write_offset_in("field:bool success;\toffset:25;"), None);
        // Where tracefs is mounted (CI), the three events agree.
        if Path::new("/sys/kernel/tracing/events/mmap_lock").exists() {
            assert!(mmap_lock_write_offset().is_ok());
        }
    }

    #[test]
    fn an_explicit_bpftrace_that_does_not_exist_is_refused_with_code_3() {
        let r = bpftrace(Some(Path::new("/nonexistent/bpftrace"))).unwrap_err();
        assert_eq!(r.code, EXIT_NO_BPFTRACE);
        assert!(r.message.contains("apt-get install bpftrace"));
    }
}
