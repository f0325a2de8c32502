//! Starting the capture helper while a stall is still going on: validation, rate limits,
//! deadlines and reaping. The actual start is the [`crate::launcher`]'s job, a process of its
//! own, because anything started from the frozen address space waits for its `mmap_lock`.
//!
//! # What this code may not do (during a freeze)
//! No `fork()`, no allocation, no mapping: [`Trigger::fire`] fills a fixed-size request on the
//! stack and writes it into a pipe. No shell anywhere: argv goes to the helper as is.

use crate::config::CaptureConfig;
use crate::launcher::{Launcher, Request, FAILED, MAX_DIR, SPAWNED};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Checks that `path` is safe to run as root-adjacent tooling: absolute, a regular executable
/// file, not writable by group or others, owned by root or by us.
pub fn validate_helper(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err("it is not an absolute path".into());
    }
    let md = std::fs::metadata(path).map_err(|e| format!("it cannot be read ({e})"))?;
    if !md.is_file() {
        return Err("it is not a regular file".into());
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "it is group- or world-writable (mode {:o}): anyone could replace it",
            md.mode() & 0o7777
        ));
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != 0 && md.uid() != euid {
        return Err(format!(
            "it is owned by uid {}, neither root nor us (uid {euid})",
            md.uid()
        ));
    }
    if md.mode() & 0o111 == 0 {
        return Err("it is not executable".into());
    }
    Ok(())
}

/// A fixed-capacity, NUL-terminated string rewritten in place. Inline (not on the heap): the
/// watchdog owns the trigger on its fork-proof stack and writes this during stalls.
struct ArgBuf {
    buf: [u8; MAX_DIR],
}

impl ArgBuf {
    fn new() -> ArgBuf {
        ArgBuf {
            buf: [0u8; MAX_DIR],
        }
    }
    fn set(&mut self, parts: &[&[u8]]) -> bool {
        let mut len = 0;
        for p in parts {
            if len + p.len() >= self.buf.len() {
                return false;
            }
            self.buf[len..len + p.len()].copy_from_slice(p);
            len += p.len();
        }
        self.buf[len] = 0;
        true
    }
}

/// Decimal digits of `v` in a stack buffer.
pub(crate) fn digits(v: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    let mut v = v;
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &out[i..]
}

/// What became of a capture request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureStatus {
    /// No helper configured.
    NotConfigured,
    /// Started, still running.
    Running,
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// Outlived its deadline; we killed it.
    KilledAtDeadline,
    /// Not started: another capture was running.
    SkippedBusy,
    /// Not started: within the cooldown after the last one.
    SkippedCooldown,
    /// Not started: the hourly cap was reached.
    SkippedHourlyCap,
    /// The capture directory could not be created (errno).
    DirFailed(i32),
    /// posix_spawn failed (errno).
    SpawnFailed(i32),
}

impl CaptureStatus {
    /// The report's `status` text.
    pub fn describe(&self) -> String {
        match self {
            CaptureStatus::NotConfigured => "not configured".into(),
            CaptureStatus::Running => "running".into(),
            CaptureStatus::Exited(0) => "exited 0".into(),
            CaptureStatus::Exited(c) => format!("failed: exited {c}"),
            CaptureStatus::Signaled(s) => format!("failed: killed by signal {s}"),
            CaptureStatus::KilledAtDeadline => {
                "failed: still running at its deadline, killed".into()
            }
            CaptureStatus::SkippedBusy => "skipped: another capture is running".into(),
            CaptureStatus::SkippedCooldown => "skipped: cooldown".into(),
            CaptureStatus::SkippedHourlyCap => "skipped: hourly cap reached".into(),
            CaptureStatus::DirFailed(e) => format!(
                "failed: cannot create the capture directory: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            CaptureStatus::SpawnFailed(e) => format!(
                "failed: cannot start the helper: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
        }
    }
}

/// The largest accepted `FREEZETRAP_CAPTURE_MAX_PER_HOUR`.
pub const MAX_PER_HOUR: usize = 1000;

/// A helper run in progress.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// The helper's pid.
    pub pid: libc::pid_t,
    /// The stall that started it.
    pub stall_id: u64,
    /// When it must be gone (monotonic ns).
    pub deadline_ns: u64,
    /// When the launcher saw it exec (monotonic ns; 0 until then).
    pub spawned_ns: u64,
}

/// The prepared trigger. Built once at watchdog start; used on the watchdog thread only.
pub struct Trigger {
    cfg: CaptureConfig,
    launcher: Launcher,
    out_prefix: Vec<u8>,
    dir: ArgBuf,
    /// Start times within the last hour (inline ring, see `fire`).
    starts: [u64; MAX_PER_HOUR],
    starts_len: usize,
    last_start_ns: Option<u64>,
    running: Option<Running>,
    killed: bool,
}

/// What [`Trigger::poll`] saw happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerEvent {
    /// The helper exec'd at this `CLOCK_MONOTONIC` time.
    Spawned {
        /// The stall it is for.
        stall_id: u64,
        /// When.
        mono_ns: u64,
    },
    /// The helper is gone (or never started).
    Finished {
        /// The stall it was for.
        stall_id: u64,
        /// How it ended.
        status: CaptureStatus,
        /// When it had exec'd (`CLOCK_MONOTONIC` ns, 0 if it never did).
        spawned_ns: u64,
    },
}

impl Trigger {
    /// Validates the helper, creates the output directory and forks the launcher.
    /// Errors are one-line reasons.
    pub fn new(cfg: CaptureConfig) -> Result<Trigger, String> {
        validate_helper(&cfg.helper)?;
        alloc_guard::create_private_dir(&cfg.out_dir).map_err(|e| {
            format!(
                "the output directory {} cannot be created ({e})",
                cfg.out_dir.display()
            )
        })?;
        let helper = CString::new(cfg.helper.as_os_str().as_bytes())
            .map_err(|_| "it contains a NUL byte".to_string())?;
        let mut out_prefix = cfg.out_dir.as_os_str().as_bytes().to_vec();
        out_prefix.extend_from_slice(b"/stall-");
        if out_prefix.len() + 48 > MAX_DIR {
            return Err(format!(
                "the output directory path is longer than {} bytes",
                MAX_DIR - 48
            ));
        }
        let launcher = Launcher::start(&helper, cfg.duration.as_secs().max(1))
            .map_err(|e| format!("the launcher process cannot be started ({e})"))?;
        Ok(Trigger {
            launcher,
            dir: ArgBuf::new(),
            out_prefix,
            starts: [0; MAX_PER_HOUR],
            starts_len: 0,
            last_start_ns: None,
            running: None,
            killed: false,
            cfg,
        })
    }

    /// The configured helper.
    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// The helper run in progress, if any.
    pub fn running(&self) -> Option<Running> {
        self.running
    }

    /// Starts the helper for a stall (watchdog thread, during the stall: no allocation).
    /// Returns the status and, when started, the capture directory's path bytes.
    pub fn fire(&mut self, stall_id: u64, tid: u64, now_ns: u64) -> CaptureStatus {
        if self.running.is_some() {
            return CaptureStatus::SkippedBusy;
        }
        if let Some(last) = self.last_start_ns {
            if now_ns.saturating_sub(last) < self.cfg.cooldown.as_nanos() as u64 {
                return CaptureStatus::SkippedCooldown;
            }
        }
        let hour = 3_600_000_000_000u64;
        // Keep only the starts of the last hour (compacting in place).
        let mut kept = 0;
        for i in 0..self.starts_len {
            if now_ns.saturating_sub(self.starts[i]) < hour {
                self.starts[kept] = self.starts[i];
                kept += 1;
            }
        }
        self.starts_len = kept;
        if self.starts_len >= (self.cfg.max_per_hour as usize).min(MAX_PER_HOUR) {
            return CaptureStatus::SkippedHourlyCap;
        }
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        if !self.dir.set(&[
            &self.out_prefix,
            digits(stall_id, &mut a),
            b"-",
            digits(pid, &mut b),
        ]) {
            return CaptureStatus::DirFailed(libc::ENAMETOOLONG);
        }
        let dir_len = self.dir.buf.iter().position(|&c| c == 0).unwrap_or(0);
        let mut req = Request {
            stall_id,
            tid,
            pid,
            dir_len: dir_len as u64,
            dir: [0; MAX_DIR],
        };
        req.dir[..dir_len].copy_from_slice(&self.dir.buf[..dir_len]);
        if let Err(e) = self.launcher.request(&req) {
            return CaptureStatus::SpawnFailed(e);
        }
        self.last_start_ns = Some(now_ns);
        if self.starts_len < MAX_PER_HOUR {
            self.starts[self.starts_len] = now_ns;
            self.starts_len += 1;
        }
        let grace = self.cfg.grace.as_nanos() as u64;
        self.running = Some(Running {
            pid: 0,
            stall_id,
            deadline_ns: now_ns + self.cfg.duration.as_nanos() as u64 + grace,
            spawned_ns: 0,
        });
        self.killed = false;
        CaptureStatus::Running
    }

    /// The capture directory of the last start, as a path string (allocates; after the stall).
    pub fn last_dir(&self) -> String {
        let end = self.dir.buf.iter().position(|&c| c == 0).unwrap_or(0);
        String::from_utf8_lossy(&self.dir.buf[..end]).into_owned()
    }

    /// Reads the launcher's answers and kills a helper past its deadline. Call every tick;
    /// never blocks, never allocates.
    pub fn poll(&mut self, now_ns: u64) -> Option<TriggerEvent> {
        let run = self.running.as_mut()?;
        if let Some(r) = self.launcher.poll() {
            match r.kind {
                SPAWNED => {
                    run.pid = r.pid as libc::pid_t;
                    run.spawned_ns = r.mono_ns;
                    return Some(TriggerEvent::Spawned {
                        stall_id: r.stall_id,
                        mono_ns: r.mono_ns,
                    });
                }
                FAILED => {
                    self.running = None;
                    return Some(TriggerEvent::Finished {
                        stall_id: r.stall_id,
                        status: CaptureStatus::SpawnFailed(r.value),
                        spawned_ns: 0,
                    });
                }
                _ => {
                    let spawned_ns = run.spawned_ns;
                    self.running = None;
                    let st = r.value;
                    let status = if self.killed {
                        CaptureStatus::KilledAtDeadline
                    } else if libc::WIFEXITED(st) {
                        CaptureStatus::Exited(libc::WEXITSTATUS(st))
                    } else {
                        CaptureStatus::Signaled(libc::WTERMSIG(st))
                    };
                    return Some(TriggerEvent::Finished {
                        stall_id: r.stall_id,
                        status,
                        spawned_ns,
                    });
                }
            }
        }
        if now_ns >= run.deadline_ns && run.pid > 0 && !self.killed {
            // The launcher reaps it and reports EXITED; we remember why it died.
            // SAFETY: signalling the helper, our grandchild, by pid.
            unsafe { libc::kill(run.pid, libc::SIGKILL) };
            self.killed = true;
        }
        None
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        if let Some(run) = self.running.take() {
            if run.pid > 0 {
                // SAFETY: stopping the helper; the launcher (dropped next) reaps it.
                unsafe { libc::kill(run.pid, libc::SIGKILL) };
            }
        }
    }
}

/// Deletes the oldest `stall-*` directories under `out_dir` until they total at most
/// `max_bytes`. Runs on the report thread, after stalls.
pub fn enforce_byte_cap(out_dir: &Path, max_bytes: u64) -> std::io::Result<u64> {
    probes::capture::output::enforce_byte_cap(out_dir, "stall-", max_bytes, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_validation_reasons() {
        assert_eq!(
            validate_helper(Path::new("rel/path")).unwrap_err(),
            "it is not an absolute path"
        );
        assert!(validate_helper(Path::new("/"))
            .unwrap_err()
            .contains("not a regular file"));
        assert!(
            validate_helper(Path::new("/bin/sh")).is_ok(),
            "a root-owned 0755 binary is fine"
        );
    }
}
