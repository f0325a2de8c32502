//! The launcher: a small process started with the watchdog, which starts capture helpers on
//! request and looks after them.
//!
//! # Why a separate process
//! Starting a process from inside a frozen one is the whole point of the trigger, and every way
//! of doing it from the frozen address space waits for its `mmap_lock`: `fork()` copies the
//! address space under the lock; glibc's `posix_spawn` mmaps a stack for the child; and even a
//! hand-made `clone(CLONE_VM | CLONE_VFORK)` + `execve` waits, because exec releases the old
//! address space under the lock. Measured here, during a 25–35 ms fork of a 1.5 GiB process,
//! each of those returned only after the fork was over. The launcher has an address space of its
//! own, so its spawn and the helper's exec do not touch the frozen one. The watchdog only writes
//! a fixed-size request into a pipe (no allocation, no page fault, no lock).
//!
//! # How it starts
//! The service's own executable, exec'd from a handle opened at start, with marker arguments a
//! constructor recognises before `main` (see [`crate::launcher_exec`]): it shares no memory
//! with the service and costs it no page-table copy, however large the service has grown.
//! Where that is not possible (not glibc, freezetrap inside a shared library, an executable
//! others could change), or the exec'd one does not come up, it is a fork of the service.
//!
//! # Lifecycle
//! - It is started by the watchdog's report thread, never during a freeze and never on the
//!   thread that starts the watchdog (which would wait ~1 ms for it). The report thread itself
//!   starts when the watchdog thread sets up, 50 ms after start, so a short-lived program
//!   starts neither — except when the launcher is a fork: it is then started at once, while
//!   the service is still small (a fork copies the page tables under `mmap_lock`; forked 50 ms
//!   in, after the demo had filled a 2 GiB cache, it froze the demo for 60-80 ms). The
//!   watchdog thread installs it at its next tick.
//! - The process started (the fork, or the exec'd program) forks once more and exits, so the
//!   launcher is nobody's child. It has no parent-death signal, which Linux ties to the
//!   *thread* that forked: a watchdog started from a short-lived thread would otherwise lose its
//!   launcher with that thread.
//! - It exits when the service's end of the request pipe closes (the service exited, was killed,
//!   or dropped its watchdog) — but only after the capture in progress, if any, has finished or
//!   reached its deadline: the capture of the freeze that got a service killed is the one that
//!   matters. It starts its own session, so a Ctrl-C aimed at the service does not reach it.
//! - It kills a helper that outlives its deadline (SIGTERM, SIGKILL 5 s later). The helper is its
//!   own child and is not reaped before that, so its pid cannot have been recycled.
//! - The service notices its death (the response pipe hangs up) and starts a new one after the
//!   stall in progress (see `crate::trigger`).
//!
//! # What the helper gets
//! It is executed from the descriptor opened and checked at start (`/proc/self/fd/N`), so
//! replacing the helper's path later changes nothing; with the environment
//! `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin` and nothing else; and with
//! descriptors 0, 1 and 2 only: stdin is `/dev/null`, stdout and stderr go to `helper.log` in the
//! capture directory. (A `#!` script gets its own file as stdin instead: the kernel hands its
//! interpreter a `/dev/fd/N` path to read it from, and that must stay open across the exec.)

use core::mem::size_of;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Longest capture-directory *name* a request can carry (the directory is made inside
/// `FREEZETRAP_OUT`, by handle).
pub const MAX_NAME: usize = 128;
/// Longest `FREEZETRAP_OUT` path the launcher passes on as `--out`.
pub const MAX_OUT_PATH: usize = 384;

// The launcher's descriptors, fixed so that the spawn's file actions can be prepared in advance.
pub(crate) const REQ: RawFd = 3;
pub(crate) const RESP: RawFd = 4;
pub(crate) const OUT: RawFd = 5;
pub(crate) const HELPER: RawFd = 6;
pub(crate) const NULL: RawFd = 7;
pub(crate) const LOG: RawFd = 8;

/// The helper's whole environment.
pub(crate) const HELPER_PATH_ENV: &std::ffi::CStr =
    c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One request: start the helper for this stall. Fixed size, below PIPE_BUF, so one `write` is
/// atomic and never interleaves.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Request {
    pub stall_id: u64,
    pub tid: u64,
    pub pid: u64,
    pub name_len: u64,
    pub name: [u8; MAX_NAME],
}

/// The launcher's answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Response {
    /// [`SPAWNED`], [`FAILED_DIR`], [`FAILED_SPAWN`] or [`EXITED`].
    pub kind: u32,
    /// errno (FAILED_*) or wait status (EXITED).
    pub value: i32,
    pub stall_id: u64,
    /// The helper's pid (SPAWNED, EXITED).
    pub pid: i64,
    /// `CLOCK_MONOTONIC` ns when the launcher saw the exec succeed (SPAWNED).
    pub mono_ns: u64,
    /// EXITED: 1 when the launcher killed the helper at its deadline.
    pub killed: u32,
    pub _pad: u32,
}

pub(crate) const SPAWNED: u32 = 1;
pub(crate) const FAILED_DIR: u32 = 2;
pub(crate) const FAILED_SPAWN: u32 = 3;
pub(crate) const EXITED: u32 = 4;
/// The launcher is up (its first answer); `pid` is its own.
pub(crate) const READY: u32 = 5;

/// Everything needed to (re)start a launcher, opened and checked once at watchdog start.
pub(crate) struct LaunchSpec {
    /// The helper, opened and checked (close-on-exec).
    pub helper: OwnedFd,
    /// It is a `#!` script.
    pub is_script: bool,
    /// Its canonical path: the helper's `argv[0]`.
    pub argv0: CString,
    /// The service's own executable, opened and checked: launchers are exec'd from it (`None`:
    /// forked; see [`crate::launcher_exec`]).
    pub image: Option<OwnedFd>,
    /// `FREEZETRAP_OUT`, opened and checked.
    pub out: OwnedFd,
    /// Its path, for the helper's `--out`.
    pub out_path: Vec<u8>,
    /// `--duration`'s value (whole seconds).
    pub duration_secs: u64,
    /// How long after its start a helper is stopped: duration + grace.
    pub deadline_ns: u64,
}

/// What [`Launcher::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Polled {
    Nothing,
    Answer(Response),
    /// The launcher process is gone (its end of the response pipe closed).
    Died,
}

/// The service's handle on a running launcher. Dropping it closes the request pipe: the
/// launcher then exits, after the capture in progress.
pub(crate) struct Launcher {
    req_w: OwnedFd,
    resp_r: OwnedFd,
    pid: u32,
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// posix_spawn's attributes and file actions, prepared in the parent (they allocate through
/// glibc's malloc) so that the launcher, a child of a multi-threaded process, never allocates.
pub(crate) struct SpawnSetup {
    pub(crate) actions: libc::posix_spawn_file_actions_t,
    pub(crate) attr: libc::posix_spawnattr_t,
}

impl SpawnSetup {
    /// The helper's: the fixed descriptors onto 0, 1 and 2.
    pub(crate) fn new(is_script: bool) -> SpawnSetup {
        SpawnSetup::with_dups(&[
            (if is_script { HELPER } else { NULL }, 0),
            (LOG, 1),
            (LOG, 2),
        ])
    }

    /// Each `(from, to)` duplicated onto `to` in the child, which starts with an empty signal
    /// mask and every signal back to its default (SIGPIPE included, which the launcher
    /// ignores).
    pub(crate) fn with_dups(dups: &[(RawFd, RawFd)]) -> SpawnSetup {
        // SAFETY: init functions fill the zeroed structs; the calls only record what the spawned
        // child will do.
        unsafe {
            let mut actions: libc::posix_spawn_file_actions_t = core::mem::zeroed();
            libc::posix_spawn_file_actions_init(&mut actions);
            for &(from, to) in dups {
                libc::posix_spawn_file_actions_adddup2(&mut actions, from, to);
            }
            let mut attr: libc::posix_spawnattr_t = core::mem::zeroed();
            libc::posix_spawnattr_init(&mut attr);
            let mut empty: libc::sigset_t = core::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::posix_spawnattr_setsigmask(&mut attr, &empty);
            let mut all: libc::sigset_t = core::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::posix_spawnattr_setsigdefault(&mut attr, &all);
            libc::posix_spawnattr_setflags(
                &mut attr,
                (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as _,
            );
            SpawnSetup { actions, attr }
        }
    }
}

impl Drop for SpawnSetup {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `with_dups` and are destroyed once (by their owner).
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

/// The path the launcher execs the helper by: its descriptor ([`HELPER`]), or for a `#!`
/// script, the descriptor it becomes in the helper (stdin), which its interpreter reads.
pub(crate) fn helper_exec_path(is_script: bool) -> &'static std::ffi::CStr {
    if is_script {
        c"/proc/self/fd/0"
    } else {
        c"/proc/self/fd/6"
    }
}

/// A launcher started by [`Launcher::begin`], not yet known to be up.
struct Begun {
    /// The process that starts the launcher and exits at once (so that the launcher is nobody's
    /// child): a fork of the service, or the exec'd program.
    middle: libc::pid_t,
    req_w: OwnedFd,
    resp_r: OwnedFd,
}

impl Begun {
    /// Reaps the middle process and waits (at most 5 s) for the launcher's first answer.
    fn finish(self) -> std::io::Result<Launcher> {
        let Begun {
            middle,
            req_w,
            resp_r,
        } = self;
        let mut status = 0;
        // SAFETY: reaping our own child, which exits at once.
        while unsafe { libc::waitpid(middle, &mut status, 0) } < 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
        // SAFETY: making our own read end non-blocking.
        unsafe {
            let fl = libc::fcntl(resp_r.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(resp_r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let mut l = Launcher {
            req_w,
            resp_r,
            pid: 0,
        };
        // Its first word says it is up, and who it is.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match l.poll() {
                Polled::Answer(r) if r.kind == READY => {
                    l.pid = r.pid as u32;
                    return Ok(l);
                }
                Polled::Died => return Err(std::io::Error::other("it exited at once")),
                _ if std::time::Instant::now() >= until => {
                    return Err(std::io::Error::other("it did not answer within 5 s"))
                }
                _ => {
                    // Block until it answers (or dies): a 1 ms sleep between polls made every
                    // start wait at least that long, most of what the watchdog's start cost.
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    let mut p = libc::pollfd {
                        fd: l.resp_r.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, alive for the call.
                    unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 5000) as i32) };
                }
            }
        }
    }
}

impl Launcher {
    /// Starts a launcher for `spec` and waits until it is up: exec'd from the service's own
    /// executable when it can be (see [`crate::launcher_exec`]), forked otherwise. Call outside
    /// any freeze (the fork copies the service's page tables).
    pub(crate) fn start(spec: &LaunchSpec) -> std::io::Result<Launcher> {
        if let Some(image) = &spec.image {
            // An exec'd launcher that fails (its program cannot be loaded, say) costs only
            // this attempt: the forked one works wherever the watchdog does.
            if let Ok(l) = Launcher::begin(spec, Some(image)).and_then(Begun::finish) {
                return Ok(l);
            }
        }
        Launcher::begin(spec, None)?.finish()
    }

    /// Starts a launcher for `spec` from `image` (exec'd) or by a fork, without waiting for
    /// it: [`Begun::finish`] does.
    fn begin(spec: &LaunchSpec, image: Option<&OwnedFd>) -> std::io::Result<Begun> {
        if spec.out_path.len() > MAX_OUT_PATH {
            return Err(std::io::Error::other("FREEZETRAP_OUT's path is too long"));
        }
        let (req_r, req_w) = pipe_cloexec()?;
        let (resp_r, resp_w) = pipe_cloexec()?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        let fds = [
            req_r.as_raw_fd(),
            resp_w.as_raw_fd(),
            spec.out.as_raw_fd(),
            spec.helper.as_raw_fd(),
            null.as_raw_fd(),
        ];
        if let Some(image) = image {
            let middle = crate::launcher_exec::spawn(image, fds, spec)?;
            return Ok(Begun {
                middle,
                req_w,
                resp_r,
            });
        }
        let setup = SpawnSetup::new(spec.is_script);
        let mut duration = [0u8; 24];
        crate::launcher_process::put_digits(spec.duration_secs, &mut duration);
        let plan = crate::launcher_process::Plan {
            fds,
            setup: &setup,
            exec_path: helper_exec_path(spec.is_script),
            argv0: &spec.argv0,
            out_path: &spec.out_path,
            duration,
            deadline_ns: spec.deadline_ns,
        };
        // SAFETY: fork at start-up, outside any freeze. The middle child only forks again and
        // `_exit`s; the launcher runs `launcher_main`, which never returns (see its contract).
        let middle = unsafe { libc::fork() };
        if middle < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if middle == 0 {
            // SAFETY: in the middle child: fork again and leave; nothing else runs here.
            unsafe {
                if libc::fork() == 0 {
                    crate::launcher_process::launcher_main(&plan);
                }
                libc::_exit(0);
            }
        }
        drop((req_r, resp_w, null, setup));
        Ok(Begun {
            middle,
            req_w,
            resp_r,
        })
    }

    /// The launcher process's pid (for monitoring, and for tests that kill it).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a request (one atomic write). Returns errno on failure (without touching the
    /// thread's errno).
    pub(crate) fn request(&self, r: &Request) -> Result<(), i32> {
        let n = base::raw::syscall3(
            libc::SYS_write,
            self.req_w.as_raw_fd() as usize,
            r as *const Request as usize,
            size_of::<Request>(),
        );
        if n == size_of::<Request>() as isize {
            Ok(())
        } else if n < 0 {
            Err(-n as i32)
        } else {
            Err(libc::EIO)
        }
    }

    /// The next answer, or news of the launcher's death. Never blocks, never touches errno
    /// (see [`base::raw`]).
    pub(crate) fn poll(&self) -> Polled {
        let fd = self.resp_r.as_raw_fd();
        let (readable, hung_up) = base::raw::poll_in(fd);
        if readable {
            let mut r = Response {
                kind: 0,
                value: 0,
                stall_id: 0,
                pid: 0,
                mono_ns: 0,
                killed: 0,
                _pad: 0,
            };
            // SAFETY: a Response is plain integers: any bytes are a valid value. Responses are
            // written whole (below PIPE_BUF), so a read gets one whole or nothing.
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(
                    (&mut r as *mut Response).cast::<u8>(),
                    size_of::<Response>(),
                )
            };
            let n = base::raw::read(fd, bytes);
            if n == size_of::<Response>() as isize {
                return Polled::Answer(r);
            }
            if n == 0 {
                return Polled::Died;
            }
        }
        if hung_up {
            Polled::Died
        } else {
            Polled::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// `argv[0]` of process `pid`.
    fn argv0(pid: u32) -> String {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(first).into_owned()
    }

    /// Asks `l` to run the helper for stall 7 in `<out>/<name>` and waits for its end.
    fn capture(l: &Launcher, name: &str) -> Response {
        let mut req = Request {
            stall_id: 7,
            tid: 11,
            pid: std::process::id() as u64,
            name_len: name.len() as u64,
            name: [0; MAX_NAME],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        l.request(&req).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match l.poll() {
                Polled::Answer(r) if r.kind != SPAWNED => return r,
                Polled::Died => panic!("the launcher died"),
                _ => assert!(Instant::now() < until, "no answer within 10 s"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn exec_d_and_forked_launchers_run_the_helper_alike() {
        let dir = std::env::temp_dir().join(format!("freezetrap-launcher-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("out")).unwrap();
        let helper = dir.join("helper.sh");
        // Its arguments, one per line, into the capture directory (`--out`, the 8th).
        std::fs::write(&helper, "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$8/args\"\n").unwrap();
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let mut cfg = crate::WatchdogConfig::new(Duration::from_millis(200))
            .with_capture(helper, dir.join("out"))
            .capture
            .unwrap();
        cfg.duration = Duration::from_secs(3);
        let trigger = crate::trigger::Trigger::new(cfg).unwrap();
        let spec = trigger.spec();
        assert_eq!(spec.image.is_some(), crate::launcher_exec::trusted_image());
        // Started, as in a service, from a batch thread (the report thread is one).
        assert!(base::thread::make_batch(None));
        for exec in [true, false] {
            if exec && spec.image.is_none() {
                eprintln!("this test binary is writable by group or others: only the forked launcher is tested");
                continue;
            }
            let image = if exec { spec.image.as_ref() } else { None };
            let l = Launcher::begin(&spec, image)
                .and_then(Begun::finish)
                .unwrap();
            assert_eq!(
                argv0(l.pid()) == "freezetrap-launcher",
                exec,
                "exec'd: {exec}, argv[0] {}",
                argv0(l.pid())
            );
            // SAFETY: querying another process's policy.
            let policy = unsafe { libc::sched_getscheduler(l.pid() as libc::pid_t) };
            assert_eq!(
                policy,
                libc::SCHED_OTHER,
                "the launcher kept the batch policy"
            );
            let name = format!("stall-7-{exec}");
            let r = capture(&l, &name);
            assert_eq!((r.kind, r.value), (EXITED, 0), "{r:?}");
            let args = std::fs::read_to_string(dir.join("out").join(&name).join("args")).unwrap();
            let out = dir.join("out").join(&name);
            assert_eq!(
                args,
                format!(
                    "--pid\n{}\n--tid\n11\n--stall-id\n7\n--out\n{}\n--duration\n3\n",
                    std::process::id(),
                    out.display()
                )
            );
            // Closing its request pipe ends it (an orphan: gone, or a zombie until init reaps it).
            let pid = l.pid();
            drop(l);
            let until = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").starts_with(" Z"))
            {
                assert!(
                    Instant::now() < until,
                    "launcher {pid} outlived its service's end"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
