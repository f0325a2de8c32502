//! The checks both capture modes make before starting bpftrace, each mapped to one line and a
//! distinct exit code, so an operator (or a script) can tell "install bpftrace" from "run as
//! root" without reading bpftrace's own errors.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code: bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: bpftrace not found.
pub const EXIT_NO_BPFTRACE: u8 = 3;
/// Exit code: not permitted (not root).
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
#[derive(Debug, Clone)]
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

/// The bpftrace to run: `explicit` if given, else the first `bpftrace` on PATH — resolved to its
/// canonical path once and checked as root runs it: a regular executable owned by root and not
/// writable by group or others, nor any directory above it. Its path can then only change by
/// root's hand.
pub fn bpftrace(explicit: Option<&Path>) -> Result<PathBuf, Refusal> {
    let found =
        match explicit
            .map(Path::to_path_buf)
            .or_else(|| find_on_path("bpftrace"))
        {
            Some(p) if p.is_file() => p,
            _ => return Err(Refusal::new(
                EXIT_NO_BPFTRACE,
                "bpftrace not found: install it (apt-get install bpftrace) or pass --bpftrace PATH",
            )),
        };
    let found = std::path::absolute(&found).unwrap_or(found);
    match base::dirs::open_executable(&found, base::dirs::Owners::ROOT) {
        Ok(exe) => Ok(exe.path),
        Err(why) => Err(Refusal::new(
            EXIT_NO_BPFTRACE,
            format!("bpftrace {} is refused: {why}", found.display()),
        )),
    }
}

/// Root, tracefs, and a live target (`pid`, when there is one).
pub fn system(pid: Option<u32>) -> Result<(), Refusal> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Refusal::new(
            EXIT_NOT_PERMITTED,
            "not permitted: eBPF needs root, and this tool writes as root (it refuses capabilities without uid 0); run it as root, or run the armed recorder as a root sidecar",
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

/// Where the tracepoint fields the programs read sit in the events' records. The programs read
/// them by offset, not as `args->field`: that keeps bpftrace 0.17 from building the events'
/// structs with clang and BTF, which was most of its start-up (see `capture.bt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldOffsets {
    /// `write` in the three `mmap_lock` events (they must agree).
    pub write: u64,
    /// `next_comm` in `sched:sched_switch`.
    pub next_comm: u64,
    /// `next_pid` in `sched:sched_switch`.
    pub next_pid: u64,
    /// `prev_state` in `sched:sched_switch`.
    pub prev_state: u64,
    /// `success` in `mmap_lock:mmap_lock_acquire_returned`.
    pub success: u64,
}

impl FieldOffsets {
    /// x86-64, Linux 6.x: what this kernel's formats say.
    pub const DEFAULT: FieldOffsets = FieldOffsets {
        write: 24,
        next_comm: 40,
        next_pid: 56,
        prev_state: 32,
        success: 25,
    };

    /// Reads the offsets from the events' tracefs `format` files. An error says which event or
    /// field could not be read, or that the mmap_lock events disagree.
    pub fn from_tracefs() -> Result<FieldOffsets, String> {
        let offset = |event: &str, field: &str| -> Result<u64, String> {
            let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                .iter()
                .find_map(|t| std::fs::read_to_string(format!("{t}/events/{event}/format")).ok())
                .ok_or_else(|| format!("no tracefs format for {event}"))?;
            field_offset_in(&format, field).ok_or_else(|| format!("{event} has no field {field}"))
        };
        let writes = [
            offset("mmap_lock/mmap_lock_start_locking", "write")?,
            offset("mmap_lock/mmap_lock_acquire_returned", "write")?,
            offset("mmap_lock/mmap_lock_released", "write")?,
        ];
        if writes.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "the mmap_lock events keep `write` at different offsets {writes:?}"
            ));
        }
        Ok(FieldOffsets {
            write: writes[0],
            next_comm: offset("sched/sched_switch", "next_comm")?,
            next_pid: offset("sched/sched_switch", "next_pid")?,
            prev_state: offset("sched/sched_switch", "prev_state")?,
            success: offset("mmap_lock/mmap_lock_acquire_returned", "success")?,
        })
    }

    /// [`FieldOffsets::from_tracefs`], or [`FieldOffsets::DEFAULT`] after a one-line warning.
    pub fn from_tracefs_or_default() -> FieldOffsets {
        Self::from_tracefs().unwrap_or_else(|e| {
            eprintln!(
                "freezetrap-capture: {e}; assuming the x86-64 Linux 6.x field offsets {:?}",
                Self::DEFAULT
            );
            Self::DEFAULT
        })
    }

    /// The offsets as the programs' last five arguments: WRITE NEXT_COMM NEXT_PID PREV_STATE
    /// SUCCESS.
    pub fn args(&self) -> [String; 5] {
        [
            self.write,
            self.next_comm,
            self.next_pid,
            self.prev_state,
            self.success,
        ]
        .map(|o| o.to_string())
    }
}

/// The offset of field `name` in a tracefs event `format` text (lines like
/// `field:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;`).
fn field_offset_in(format: &str, name: &str) -> Option<u64> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
        let field = decl.rsplit(' ').next()?.split('[').next()?;
        if field != name {
            return None;
        }
        let (_, rest) = line.split_once("offset:")?;
        rest.split(';').next()?.trim().parse().ok()
    })
}

/// Opens the output directory by handle, creating its last component (0700) if missing. Root
/// writes there, so it must be owned by root and not writable by group or others, and so must
/// every directory above it (a root-owned sticky directory such as `/tmp` excepted); it must
/// not be a symbolic link. Everything is then written beneath that handle, exclusively.
pub fn out_dir(dir: &Path) -> Result<base::dirs::Dir, Refusal> {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    base::dirs::Dir::open_trusted(&abs, base::dirs::Owners::ROOT, true).map_err(|why| {
        Refusal::new(
            EXIT_OUT_NOT_WRITABLE,
            format!("output directory {} is refused: {why}", dir.display()),
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
    fn field_offsets_come_from_the_format_text() {
        let format = "name: sched_switch\nID: 372\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;\n\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n\nprint fmt: \"prev_comm=%s\"\n";
        assert_eq!(field_offset_in(format, "next_comm"), Some(40));
        assert_eq!(field_offset_in(format, "next_pid"), Some(56));
        assert_eq!(field_offset_in(format, "prev_pid"), Some(24));
        assert_eq!(field_offset_in(format, "pid"), None, "whole names only");
        assert_eq!(
            field_offset_in("\tfield:bool write;\toffset:24;\tsize:1;", "write"),
            Some(24)
        );
        // Where tracefs is mounted (CI), this kernel's formats have every field.
        if Path::new("/sys/kernel/tracing/events/mmap_lock").exists() {
            let found = FieldOffsets::from_tracefs().unwrap();
            eprintln!("{found:?} (defaults {:?})", FieldOffsets::DEFAULT);
        }
    }

    #[test]
    fn an_output_directory_another_user_could_change_is_refused() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root (the rule is \"owned by root\")");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("ft-outdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("parent")).unwrap();
        let c = std::ffi::CString::new(base.join("parent").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
        let r = out_dir(&base.join("parent/out")).unwrap_err();
        assert_eq!(r.code, EXIT_OUT_NOT_WRITABLE);
        assert!(
            r.message.contains("is owned by uid 65534, not root"),
            "{}",
            r.message
        );
        assert!(!base.join("parent/out").exists(), "nothing created");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let r = out_dir(&base.join("x")).unwrap_err();
        assert!(
            r.message.contains("writable by group or others"),
            "{}",
            r.message
        );
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(out_dir(&base.join("x")).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn an_explicit_bpftrace_that_does_not_exist_is_refused_with_code_3() {
        let r = bpftrace(Some(Path::new("/nonexistent/bpftrace"))).unwrap_err();
        assert_eq!(r.code, EXIT_NO_BPFTRACE);
        assert!(r.message.contains("apt-get install bpftrace"));
    }
}
