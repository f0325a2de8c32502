//! Starting the capture helper while a stall is still going on.
//!
//! # What this code may not do (during a freeze)
//! `fork()` would block on the frozen process's `mmap_lock` (it copies the address space under
//! it), so the helper is started with `posix_spawn`, which glibc implements with
//! `clone(CLONE_VM | CLONE_VFORK)`: no address-space copy. Nothing here allocates after
//! [`Trigger::new`]: the argument strings live in fixed buffers that are rewritten in place, the
//! environment is the live `environ`, and the file actions that send the helper's output to
//! `<dir>/helper.log` were built once, against a reserved descriptor that `dup2` repoints.
//! No shell is involved: argv goes to the helper as is.

use crate::config::CaptureConfig;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

extern "C" {
    static environ: *const *const libc::c_char;
}

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

/// A fixed-capacity, NUL-terminated string rewritten in place (no allocation after creation).
struct ArgBuf {
    buf: Vec<u8>,
}

impl ArgBuf {
    fn with_capacity(n: usize) -> ArgBuf {
        ArgBuf {
            buf: vec![0u8; n + 1],
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
    fn ptr(&self) -> *mut libc::c_char {
        self.buf.as_ptr() as *mut libc::c_char
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

/// A helper run in progress.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// The helper's pid.
    pub pid: libc::pid_t,
    /// The stall that started it.
    pub stall_id: u64,
    /// When it must be gone (monotonic ns).
    pub deadline_ns: u64,
}

/// The prepared trigger. Built once at watchdog start; used on the watchdog thread only.
pub struct Trigger {
    cfg: CaptureConfig,
    helper: CString,
    out_prefix: Vec<u8>,
    pid: ArgBuf,
    tid: ArgBuf,
    stall: ArgBuf,
    dir: ArgBuf,
    log: ArgBuf,
    duration: ArgBuf,
    reserved_fd: libc::c_int,
    actions: Box<libc::posix_spawn_file_actions_t>,
    attr: Box<libc::posix_spawnattr_t>,
    starts: Vec<u64>,
    last_start_ns: Option<u64>,
    running: Option<Running>,
}

// SAFETY: the raw spawn structures are only touched by the thread that owns the Trigger.
unsafe impl Send for Trigger {}

impl Trigger {
    /// Validates the helper and prepares everything a spawn needs. Errors are one-line reasons.
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
        let path_cap = out_prefix.len() + 64;
        // A descriptor number reserved for the helper's log: file actions dup2 it onto 1 and 2.
        // SAFETY: plain syscalls on a literal path.
        let reserved_fd =
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if reserved_fd < 0 {
            return Err(format!(
                "cannot open /dev/null ({})",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: zeroed structures are initialised by the init calls before use; both are
        // boxed so their addresses stay put. Building them here is where glibc allocates.
        let (actions, attr) = unsafe {
            let mut actions: Box<libc::posix_spawn_file_actions_t> = Box::new(std::mem::zeroed());
            libc::posix_spawn_file_actions_init(&mut *actions);
            libc::posix_spawn_file_actions_adddup2(&mut *actions, reserved_fd, 1);
            libc::posix_spawn_file_actions_adddup2(&mut *actions, reserved_fd, 2);
            let mut attr: Box<libc::posix_spawnattr_t> = Box::new(std::mem::zeroed());
            libc::posix_spawnattr_init(&mut *attr);
            // Reset the signal mask and dispositions: the service may block signals the helper
            // needs (SIGINT/SIGTERM for its own clean exit).
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::posix_spawnattr_setsigmask(&mut *attr, &empty);
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::posix_spawnattr_setsigdefault(&mut *attr, &all);
            libc::posix_spawnattr_setflags(
                &mut *attr,
                (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as _,
            );
            (actions, attr)
        };
        let max = cfg.max_per_hour as usize;
        let mut t = Trigger {
            helper,
            out_prefix,
            pid: ArgBuf::with_capacity(20),
            tid: ArgBuf::with_capacity(20),
            stall: ArgBuf::with_capacity(20),
            dir: ArgBuf::with_capacity(path_cap),
            log: ArgBuf::with_capacity(path_cap + 16),
            duration: ArgBuf::with_capacity(20),
            reserved_fd,
            actions,
            attr,
            starts: Vec::with_capacity(max),
            last_start_ns: None,
            running: None,
            cfg,
        };
        let mut d = [0u8; 20];
        t.duration
            .set(&[digits(t.cfg.duration.as_secs().max(1), &mut d)]);
        Ok(t)
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
        self.starts.retain(|&t| now_ns.saturating_sub(t) < hour); // in place: no allocation
        if self.starts.len() >= self.cfg.max_per_hour as usize {
            return CaptureStatus::SkippedHourlyCap;
        }
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        let stall_digits = digits(stall_id, &mut a);
        let ok = self
            .dir
            .set(&[&self.out_prefix, stall_digits, b"-", digits(pid, &mut b)])
            && self.log.set(&[
                &self.dir.buf[..self.dir.buf.iter().position(|&c| c == 0).unwrap_or(0)],
                b"/helper.log",
            ]);
        if !ok {
            return CaptureStatus::DirFailed(libc::ENAMETOOLONG);
        }
        self.stall.set(&[stall_digits]);
        self.pid.set(&[digits(pid, &mut b)]);
        self.tid.set(&[digits(tid, &mut a)]);
        // SAFETY: NUL-terminated path in a live buffer.
        if unsafe { libc::mkdir(self.dir.ptr(), 0o700) } != 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if e != libc::EEXIST {
                return CaptureStatus::DirFailed(e);
            }
        }
        // Point the reserved descriptor at <dir>/helper.log for the child's stdout/stderr.
        // SAFETY: plain syscalls on our own buffers and descriptors.
        unsafe {
            let log = libc::open(
                self.log.ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o600,
            );
            if log >= 0 {
                libc::dup2(log, self.reserved_fd);
                libc::close(log);
            }
        }
        let argv: [*mut libc::c_char; 12] = [
            self.helper.as_ptr() as *mut _,
            c"--pid".as_ptr() as *mut _,
            self.pid.ptr(),
            c"--tid".as_ptr() as *mut _,
            self.tid.ptr(),
            c"--stall-id".as_ptr() as *mut _,
            self.stall.ptr(),
            c"--out".as_ptr() as *mut _,
            self.dir.ptr(),
            c"--duration".as_ptr() as *mut _,
            self.duration.ptr(),
            std::ptr::null_mut(),
        ];
        let mut child: libc::pid_t = 0;
        // SAFETY: every pointer is a live NUL-terminated string or null-terminated array;
        // `actions` and `attr` were initialised in `new`; `environ` is the live environment.
        let rc = unsafe {
            libc::posix_spawn(
                &mut child,
                self.helper.as_ptr(),
                &*self.actions,
                &*self.attr,
                argv.as_ptr(),
                environ as *const *mut _,
            )
        };
        if rc != 0 {
            return CaptureStatus::SpawnFailed(rc);
        }
        self.last_start_ns = Some(now_ns);
        if self.starts.len() < self.starts.capacity() {
            self.starts.push(now_ns);
        }
        let grace = Duration::from_secs(5).as_nanos() as u64;
        self.running = Some(Running {
            pid: child,
            stall_id,
            deadline_ns: now_ns + self.cfg.duration.as_nanos() as u64 + grace,
        });
        CaptureStatus::Running
    }

    /// The capture directory of the last start, as a path string (allocates; after the stall).
    pub fn last_dir(&self) -> String {
        let end = self.dir.buf.iter().position(|&c| c == 0).unwrap_or(0);
        String::from_utf8_lossy(&self.dir.buf[..end]).into_owned()
    }

    /// Reaps a finished helper, or kills one past its deadline. Returns `(stall_id, status)`
    /// when the running helper is gone. No allocation.
    pub fn poll(&mut self, now_ns: u64) -> Option<(u64, CaptureStatus)> {
        let run = self.running?;
        let mut status = 0;
        // SAFETY: waitpid on our own child, non-blocking.
        let r = unsafe { libc::waitpid(run.pid, &mut status, libc::WNOHANG) };
        if r == run.pid {
            self.running = None;
            let st = if libc::WIFEXITED(status) {
                CaptureStatus::Exited(libc::WEXITSTATUS(status))
            } else {
                CaptureStatus::Signaled(libc::WTERMSIG(status))
            };
            return Some((run.stall_id, st));
        }
        if r < 0 {
            self.running = None;
            return Some((run.stall_id, CaptureStatus::Exited(-1)));
        }
        if now_ns >= run.deadline_ns {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(run.pid, libc::SIGKILL);
                libc::waitpid(run.pid, &mut status, 0);
            }
            self.running = None;
            return Some((run.stall_id, CaptureStatus::KilledAtDeadline));
        }
        None
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        if let Some(run) = self.running.take() {
            // SAFETY: our own child: stop and reap it so no zombie is left.
            unsafe {
                libc::kill(run.pid, libc::SIGKILL);
                libc::waitpid(run.pid, std::ptr::null_mut(), 0);
            }
        }
        // SAFETY: initialised in `new`, destroyed once.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut *self.actions);
            libc::posix_spawnattr_destroy(&mut *self.attr);
            libc::close(self.reserved_fd);
        }
    }
}

/// Deletes the oldest `stall-*` directories under `out_dir` until they total at most
/// `max_bytes`. Runs on the report thread, after stalls.
pub fn enforce_byte_cap(out_dir: &Path, max_bytes: u64) -> std::io::Result<u64> {
    fn size(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        e.metadata()
                            .map(|m| if m.is_dir() { size(&e.path()) } else { m.len() })
                            .unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    let mut dirs: Vec<(std::time::SystemTime, std::path::PathBuf, u64)> =
        std::fs::read_dir(out_dir)?
            .flatten()
            .filter(|e| e.file_name().as_bytes().starts_with(b"stall-"))
            .filter_map(|e| {
                Some((
                    e.metadata().ok()?.modified().ok()?,
                    e.path(),
                    size(&e.path()),
                ))
            })
            .collect();
    dirs.sort();
    let mut total: u64 = dirs.iter().map(|d| d.2).sum();
    let mut removed = 0;
    for (_, path, bytes) in dirs {
        if total <= max_bytes {
            break;
        }
        std::fs::remove_dir_all(&path)?;
        total -= bytes;
        removed += bytes;
    }
    Ok(removed)
}
