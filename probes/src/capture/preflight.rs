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
    fn an_explicit_bpftrace_that_does_not_exist_is_refused_with_code_3() {
        let r = bpftrace(Some(Path::new("/nonexistent/bpftrace"))).unwrap_err();
        assert_eq!(r.code, EXIT_NO_BPFTRACE);
        assert!(r.message.contains("apt-get install bpftrace"));
    }
}
