//! Starting the capture helper while a stall is still going on: checks at start, rate limits,
//! capture directory names, and what became of each request. The actual start is the
//! [`crate::launcher`]'s job, a process of its own, because anything started from the frozen
//! address space waits for its `mmap_lock`.
//!
//! # What this code may not do (during a freeze)
//! No `fork()`, no allocation, no mapping: [`Trigger::fire`] fills a fixed-size request on the
//! stack and writes it into a pipe. No shell anywhere: argv goes to the helper as is.

use crate::config::CaptureConfig;
use crate::launcher::{
    LaunchSpec, Launcher, Polled, Request, EXITED, FAILED_DIR, FAILED_SPAWN, MAX_NAME,
    MAX_OUT_PATH, SPAWNED,
};
use base::dirs::{self, Dir, Owners};
use base::units::digits;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// Checks the helper as something a process that may be root runs: an absolute path to a
/// regular, executable file owned by root or by this process's user, not writable by group or
/// others, nor any directory above it. Returns it opened: it is run from that handle.
pub fn validate_helper(path: &Path) -> Result<dirs::Executable, String> {
    dirs::open_executable(path, Owners::root_or_me())
}

/// A fixed-capacity, NUL-terminated string rewritten in place. Inline (not on the heap): the
/// watchdog owns the trigger on its fork-proof stack and writes this during stalls.
struct ArgBuf {
    buf: [u8; MAX_OUT_PATH + 1 + MAX_NAME + 1],
    len: usize,
}

impl ArgBuf {
    fn new() -> ArgBuf {
        ArgBuf {
            buf: [0u8; MAX_OUT_PATH + 1 + MAX_NAME + 1],
            len: 0,
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
        self.len = len;
        true
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
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
    /// Outlived its deadline; the launcher stopped it.
    KilledAtDeadline,
    /// Not started: another capture was running.
    SkippedBusy,
    /// Not started: within the cooldown after the last one.
    SkippedCooldown,
    /// Not started: the hourly cap was reached.
    SkippedHourlyCap,
    /// The capture directory could not be created (errno).
    DirFailed(i32),
    /// The helper could not be started (errno).
    SpawnFailed(i32),
    /// The launcher process had died (a new one is started after the stall).
    LauncherDied,
    /// The first launcher process was not up yet (it is started with the watchdog).
    LauncherNotUp,
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
            CaptureStatus::LauncherDied => {
                "failed: the capture launcher process had died; a new one is started after this stall".into()
            }
            CaptureStatus::LauncherNotUp => {
                "failed: the capture launcher process was not up yet".into()
            }
        }
    }

    /// Whether a capture directory exists for this status (the helper was asked to start and
    /// the directory was made).
    pub fn has_dir(&self) -> bool {
        matches!(
            self,
            CaptureStatus::Running
                | CaptureStatus::Exited(_)
                | CaptureStatus::Signaled(_)
                | CaptureStatus::KilledAtDeadline
                | CaptureStatus::SpawnFailed(_)
        )
    }
}

use crate::config::limits::MAX_PER_HOUR;

/// A helper run in progress.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// The helper's pid (0 until the launcher says it started).
    pub pid: libc::pid_t,
    /// The stall that started it.
    pub stall_id: u64,
    /// When the launcher saw it exec (monotonic ns; 0 until then).
    pub spawned_ns: u64,
}

/// The prepared trigger. Built once at watchdog start; used on the watchdog thread only.
pub struct Trigger {
    cfg: CaptureConfig,
    launcher: Option<Launcher>,
    /// A launcher was installed once (none now: it died, rather than is still starting).
    had_launcher: bool,
    spec: Arc<LaunchSpec>,
    out: Arc<Dir>,
    /// Random at start: capture directory names never repeat across restarts, even when the
    /// stall ids (restarting at 1) and the pid (a container's) do.
    nonce: u64,
    dir: ArgBuf,
    /// Start times within the last hour (inline ring, see `fire`).
    starts: [u64; MAX_PER_HOUR],
    starts_len: usize,
    last_start_ns: Option<u64>,
    running: Option<Running>,
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
    /// The launcher process died; no capture was running.
    LauncherDied,
}

/// A random 64-bit number from the kernel (or, failing that, the clock and the pid).
fn random_u64() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom((&mut v as *mut u64).cast(), 8, libc::GRND_NONBLOCK) };
    if n == 8 {
        v
    } else {
        base::clock::monotonic_ns() ^ (u64::from(std::process::id()) << 32)
    }
}

/// A 64-bit mix (splitmix64's finaliser): distinct ids give unrelated suffixes.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Trigger {
    /// Opens and checks the helper and the output directory. Errors are one-line reasons.
    ///
    /// The launcher is not started here, on the caller's thread (a short-lived program would
    /// wait for it and its first answer): the watchdog's report thread starts it as it starts,
    /// and the watchdog thread installs it (see `crate::running`).
    pub fn new(cfg: CaptureConfig) -> Result<Trigger, String> {
        let helper = validate_helper(&cfg.helper)?;
        let out = Dir::open_private(&cfg.out_dir).map_err(|why| {
            format!(
                "the output directory {} is refused: {why}",
                cfg.out_dir.display()
            )
        })?;
        if dirs::euid() == 0 {
            // The helper runs as root: freezetrap-capture then refuses an --out with a
            // directory above it that another user could change. Say so now, once, rather
            // than in every capture's helper.log.
            Dir::open_trusted(out.path(), Owners::ROOT, false).map_err(|why| {
                format!(
                    "the capture helper runs as root and would refuse the output directory: {why}"
                )
            })?;
        }
        let out_path = out.path().as_os_str().as_bytes().to_vec();
        if out_path.len() > MAX_OUT_PATH {
            return Err(format!(
                "the output directory path is longer than {MAX_OUT_PATH} bytes"
            ));
        }
        let argv0 = CString::new(helper.path.as_os_str().as_bytes())
            .map_err(|_| "its path contains a NUL byte".to_string())?;
        let duration_secs = cfg.duration.as_secs().max(1);
        let out_fd: OwnedFd = out
            .try_clone()
            .map_err(|e| format!("the output directory cannot be opened twice ({e})"))?
            .into_fd();
        let spec = Arc::new(LaunchSpec {
            helper: helper.fd,
            is_script: helper.is_script,
            argv0,
            image: crate::launcher_exec::open_image(),
            out: out_fd,
            out_path,
            duration_secs,
            deadline_ns: cfg
                .duration
                .saturating_add(cfg.grace)
                .as_nanos()
                .min(u64::MAX as u128) as u64,
        });
        Ok(Trigger {
            launcher: None,
            had_launcher: false,
            spec,
            out: Arc::new(out),
            nonce: random_u64(),
            dir: ArgBuf::new(),
            starts: [0; MAX_PER_HOUR],
            starts_len: 0,
            last_start_ns: None,
            running: None,
            cfg,
        })
    }

    /// The configured helper.
    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// The output directory, opened and checked.
    pub fn out(&self) -> &Arc<Dir> {
        &self.out
    }

    /// What a new launcher is started from (after one died).
    pub(crate) fn spec(&self) -> Arc<LaunchSpec> {
        self.spec.clone()
    }

    /// Whether a capture was started and has not finished.
    pub fn capturing(&self) -> bool {
        self.running.is_some()
    }

    /// Whether a launcher process is there to start helpers.
    pub fn has_launcher(&self) -> bool {
        self.launcher.is_some()
    }

    /// Installs a launcher (started off the watchdog thread: the first one, or after the last
    /// one died).
    pub(crate) fn install_launcher(&mut self, l: Launcher) {
        self.launcher = Some(l);
        self.had_launcher = true;
    }

    /// Starts the helper for a stall (watchdog thread, during the stall: no allocation).
    pub fn fire(&mut self, stall_id: u64, tid: u64, now_ns: u64) -> CaptureStatus {
        let Some(launcher) = self.launcher.as_ref() else {
            return if self.had_launcher {
                CaptureStatus::LauncherDied
            } else {
                CaptureStatus::LauncherNotUp
            };
        };
        if self.running.is_some() {
            return CaptureStatus::SkippedBusy;
        }
        if let Some(last) = self.last_start_ns {
            let cooldown = self.cfg.cooldown.as_nanos().min(u64::MAX as u128) as u64;
            if now_ns.saturating_sub(last) < cooldown {
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
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        // stall-<id>-<pid>-<16 hex digits>: unique across restarts and pid namespaces.
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        let mut hex = [0u8; 16];
        let suffix = mix(self.nonce ^ stall_id);
        for (i, h) in hex.iter_mut().enumerate() {
            *h = b"0123456789abcdef"[((suffix >> (60 - 4 * i)) & 0xf) as usize];
        }
        let mut name = [0u8; MAX_NAME];
        let parts: [&[u8]; 6] = [
            b"stall-",
            digits(stall_id, &mut a),
            b"-",
            digits(pid, &mut b),
            b"-",
            &hex,
        ];
        let mut nlen = 0;
        for p in parts {
            name[nlen..nlen + p.len()].copy_from_slice(p);
            nlen += p.len();
        }
        if !self.dir.set(&[&self.spec.out_path, b"/", &name[..nlen]]) {
            return CaptureStatus::DirFailed(libc::ENAMETOOLONG);
        }
        let req = Request {
            stall_id,
            tid,
            pid,
            name_len: nlen as u64,
            name,
        };
        if let Err(e) = launcher.request(&req) {
            return CaptureStatus::SpawnFailed(e);
        }
        self.last_start_ns = Some(now_ns);
        if self.starts_len < MAX_PER_HOUR {
            self.starts[self.starts_len] = now_ns;
            self.starts_len += 1;
        }
        self.running = Some(Running {
            pid: 0,
            stall_id,
            spawned_ns: 0,
        });
        CaptureStatus::Running
    }

    /// The capture directory of the last start, as a path string (allocates; after the stall).
    pub fn last_dir(&self) -> String {
        String::from_utf8_lossy(self.dir.bytes()).into_owned()
    }

    /// Reads the launcher's answers. Call every tick; never blocks, never allocates.
    pub fn poll(&mut self) -> Option<TriggerEvent> {
        let polled = self.launcher.as_ref()?.poll();
        let r = match polled {
            Polled::Nothing => return None,
            Polled::Died => {
                self.launcher = None;
                return Some(match self.running.take() {
                    Some(run) => TriggerEvent::Finished {
                        stall_id: run.stall_id,
                        status: CaptureStatus::LauncherDied,
                        spawned_ns: run.spawned_ns,
                    },
                    None => TriggerEvent::LauncherDied,
                });
            }
            Polled::Answer(r) => r,
        };
        let spawned_ns = self.running.map_or(0, |r| r.spawned_ns);
        let finished = |status| {
            Some(TriggerEvent::Finished {
                stall_id: r.stall_id,
                status,
                spawned_ns,
            })
        };
        match r.kind {
            SPAWNED => {
                if let Some(run) = self.running.as_mut() {
                    run.pid = r.pid as libc::pid_t;
                    run.spawned_ns = r.mono_ns;
                }
                Some(TriggerEvent::Spawned {
                    stall_id: r.stall_id,
                    mono_ns: r.mono_ns,
                })
            }
            FAILED_DIR => {
                self.running = None;
                finished(CaptureStatus::DirFailed(r.value))
            }
            FAILED_SPAWN if r.value == libc::EBUSY => None, // a duplicate request, refused
            FAILED_SPAWN => {
                self.running = None;
                finished(CaptureStatus::SpawnFailed(r.value))
            }
            EXITED => {
                self.running = None;
                let st = r.value;
                finished(if r.killed != 0 {
                    CaptureStatus::KilledAtDeadline
                } else if libc::WIFEXITED(st) {
                    CaptureStatus::Exited(libc::WEXITSTATUS(st))
                } else {
                    CaptureStatus::Signaled(libc::WTERMSIG(st))
                })
            }
            _ => None,
        }
    }
}

/// Starts a launcher from `spec` (the report thread does this as it starts, and after the last
/// one died, outside any stall: it forks the service).
pub(crate) fn start_launcher(spec: &LaunchSpec) -> std::io::Result<Launcher> {
    Launcher::start(spec)
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
        assert!(validate_helper(Path::new("/usr"))
            .unwrap_err()
            .contains("not a regular file"));
        assert!(
            validate_helper(Path::new("/bin/sh")).is_ok(),
            "a root-owned 0755 binary is fine"
        );
    }

    #[test]
    fn directory_suffixes_differ_per_id_and_per_nonce() {
        assert_ne!(mix(1), mix(2));
        assert_ne!(mix(random_u64() ^ 1), mix(random_u64() ^ 1));
    }
}
