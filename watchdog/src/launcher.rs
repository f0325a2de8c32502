//! The launcher: a tiny process forked when the watchdog starts, which starts capture helpers on
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
//! # Lifecycle
//! - It is forked twice at start (never during a freeze): the middle process exits at once, so
//!   the launcher is nobody's thread-bound child. It has no parent-death signal, which Linux ties
//!   to the *thread* that forked: a watchdog started from a short-lived thread would otherwise
//!   lose its launcher with that thread.
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
const REQ: RawFd = 3;
const RESP: RawFd = 4;
const OUT: RawFd = 5;
const HELPER: RawFd = 6;
const NULL: RawFd = 7;
const LOG: RawFd = 8;

/// The helper's whole environment.
const HELPER_PATH_ENV: &std::ffi::CStr =
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
struct SpawnSetup {
    actions: libc::posix_spawn_file_actions_t,
    attr: libc::posix_spawnattr_t,
}

impl SpawnSetup {
    fn new(is_script: bool) -> SpawnSetup {
        // SAFETY: init functions fill the zeroed structs; the calls only record what the spawned
        // child will do (dup the fixed descriptors onto 0, 1, 2; empty signal mask; every signal
        // back to its default, SIGPIPE included, which the launcher ignores).
        unsafe {
            let mut actions: libc::posix_spawn_file_actions_t = core::mem::zeroed();
            libc::posix_spawn_file_actions_init(&mut actions);
            libc::posix_spawn_file_actions_adddup2(
                &mut actions,
                if is_script { HELPER } else { NULL },
                0,
            );
            libc::posix_spawn_file_actions_adddup2(&mut actions, LOG, 1);
            libc::posix_spawn_file_actions_adddup2(&mut actions, LOG, 2);
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
        // SAFETY: both were initialised in `new` and are destroyed once (in the parent).
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

impl Launcher {
    /// Forks a launcher for `spec`. Call outside any freeze (it forks the service).
    pub(crate) fn start(spec: &LaunchSpec) -> std::io::Result<Launcher> {
        if spec.out_path.len() > MAX_OUT_PATH {
            return Err(std::io::Error::other("FREEZETRAP_OUT's path is too long"));
        }
        let (req_r, req_w) = pipe_cloexec()?;
        let (resp_r, resp_w) = pipe_cloexec()?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        let setup = SpawnSetup::new(spec.is_script);
        let exec_path: &std::ffi::CStr = if spec.is_script {
            c"/proc/self/fd/0"
        } else {
            c"/proc/self/fd/6"
        };
        let mut duration = [0u8; 24];
        put_digits(spec.duration_secs, &mut duration);
        let plan = Plan {
            fds: [
                req_r.as_raw_fd(),
                resp_w.as_raw_fd(),
                spec.out.as_raw_fd(),
                spec.helper.as_raw_fd(),
                null.as_raw_fd(),
            ],
            setup: &setup,
            exec_path,
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
                    launcher_main(&plan);
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: reaping our own child, which exits at once.
        while unsafe { libc::waitpid(middle, &mut status, 0) } < 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
        drop((req_r, resp_w, null));
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
                _ => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
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

/// What the launcher process needs, prepared in the parent before the fork.
struct Plan<'a> {
    /// The request read end, response write end, FREEZETRAP_OUT, the helper and /dev/null, to
    /// become descriptors 3 to 7.
    fds: [RawFd; 5],
    setup: &'a SpawnSetup,
    exec_path: &'a std::ffi::CStr,
    argv0: &'a CString,
    out_path: &'a [u8],
    duration: [u8; 24],
    deadline_ns: u64,
}

/// Writes the decimal digits of `v` into `out`, NUL-terminated.
fn put_digits(v: u64, out: &mut [u8; 24]) {
    let mut tmp = [0u8; 20];
    let d = base::units::digits(v, &mut tmp);
    out[..d.len()].copy_from_slice(d);
    out[d.len()] = 0;
}

fn reply(r: Response) {
    // SAFETY: writes the bytes of a plain `repr(C)` value. SIGPIPE is ignored in the launcher,
    // so a service that is gone makes this fail with EPIPE instead of killing us.
    unsafe { libc::write(RESP, (&r as *const Response).cast(), size_of::<Response>()) };
}

fn mono_ns() -> u64 {
    base::clock::monotonic_ns()
}

/// Closes every descriptor from `from` up: `close_range` (Linux 5.9), or one by one.
///
/// # Safety
/// Only in the launcher, where nothing else owns those descriptors.
unsafe fn close_from(from: RawFd) {
    // SAFETY: a plain syscall; the caller owns every descriptor in the range.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            from as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) == 0
        {
            return;
        }
        let mut lim: libc::rlimit = core::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            (lim.rlim_cur as RawFd).clamp(from, 1 << 16)
        } else {
            1024
        };
        for fd in from..max {
            libc::close(fd);
        }
    }
}

/// The launcher process's whole life. Never returns.
///
/// # Safety
/// Call only in the grandchild forked by [`Launcher::start`], with a `plan` in (our copy of) the
/// parent's memory. That process was forked from a multi-threaded one: locks other threads held
/// at the fork stay locked here forever. So it makes only system calls through their libc
/// wrappers, plus `posix_spawn` with attributes and file actions prepared in the parent; glibc's
/// `posix_spawn` (2.36, `spawni.c`) maps a stack for its `clone(CLONE_VM | CLONE_VFORK)` child,
/// applies the prepared actions with system calls and execs: it takes no lock and does not
/// allocate. It uses no Rust allocation, no stdio and no thread-local state.
unsafe fn launcher_main(plan: &Plan<'_>) -> ! {
    // SAFETY: plain system calls on our own descriptors and stack buffers throughout.
    unsafe {
        libc::setsid();
        libc::prctl(
            libc::PR_SET_NAME,
            c"freezetrap-lnch".as_ptr() as libc::c_ulong,
        );
        // The service's signal handlers are its code, not ours: every signal to its default,
        // none blocked, SIGPIPE ignored (a reply to a vanished service must not kill us).
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut empty: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, core::ptr::null_mut());
        // Descriptors: ours to 3..=7 (close-on-exec, so a helper never inherits them), every
        // other one the service had open closed, 0-2 on /dev/null (the service's stdout may be
        // a pipe someone reads to its end).
        let mut high = [0; 5];
        for (h, &fd) in high.iter_mut().zip(plan.fds.iter()) {
            *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
        }
        for (i, &h) in high.iter().enumerate() {
            if h < 0 || libc::dup3(h, REQ + i as RawFd, libc::O_CLOEXEC) < 0 {
                libc::_exit(1);
            }
        }
        close_from(LOG);
        for fd in 0..3 {
            libc::dup2(NULL, fd);
        }
        reply(Response {
            kind: READY,
            value: 0,
            stall_id: 0,
            pid: libc::getpid() as i64,
            mono_ns: 0,
            killed: 0,
            _pad: 0,
        });
        let mut dur = plan.duration;
        let mut out = [0u8; MAX_OUT_PATH + 1 + MAX_NAME + 1];
        loop {
            let Some(r) = read_request() else {
                libc::_exit(0); // the service closed the pipe
            };
            let fail = |kind: u32, e: i32| {
                reply(Response {
                    kind,
                    value: e,
                    stall_id: r.stall_id,
                    pid: 0,
                    mono_ns: 0,
                    killed: 0,
                    _pad: 0,
                })
            };
            // The capture directory: made exclusively inside FREEZETRAP_OUT, by handle.
            let nlen = (r.name_len as usize).min(MAX_NAME - 1);
            let mut name = [0u8; MAX_NAME];
            name[..nlen].copy_from_slice(&r.name[..nlen]);
            if nlen == 0 || name[..nlen].contains(&b'/') || name[0] == b'.' {
                fail(FAILED_DIR, libc::EINVAL);
                continue;
            }
            if libc::mkdirat(OUT, name.as_ptr().cast(), 0o700) != 0 {
                fail(FAILED_DIR, *libc::__errno_location());
                continue;
            }
            let dirfd = libc::openat(
                OUT,
                name.as_ptr().cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            );
            let logfd = if dirfd >= 0 {
                libc::openat(
                    dirfd,
                    c"helper.log".as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            } else {
                -1
            };
            if dirfd >= 0 {
                libc::close(dirfd);
            }
            if logfd >= 0 {
                libc::dup3(logfd, LOG, libc::O_CLOEXEC);
                libc::close(logfd);
            } else {
                libc::dup3(NULL, LOG, libc::O_CLOEXEC);
            }
            // --out: FREEZETRAP_OUT's path, '/', the name.
            out.fill(0);
            let olen = plan.out_path.len().min(MAX_OUT_PATH);
            out[..olen].copy_from_slice(&plan.out_path[..olen]);
            out[olen] = b'/';
            out[olen + 1..olen + 1 + nlen].copy_from_slice(&name[..nlen]);
            let (mut pid, mut tid, mut stall) = ([0u8; 24], [0u8; 24], [0u8; 24]);
            put_digits(r.pid, &mut pid);
            put_digits(r.tid, &mut tid);
            put_digits(r.stall_id, &mut stall);
            let argv: [*mut libc::c_char; 12] = [
                plan.argv0.as_ptr() as *mut _,
                c"--pid".as_ptr() as *mut _,
                pid.as_mut_ptr().cast(),
                c"--tid".as_ptr() as *mut _,
                tid.as_mut_ptr().cast(),
                c"--stall-id".as_ptr() as *mut _,
                stall.as_mut_ptr().cast(),
                c"--out".as_ptr() as *mut _,
                out.as_mut_ptr().cast(),
                c"--duration".as_ptr() as *mut _,
                dur.as_mut_ptr().cast(),
                core::ptr::null_mut(),
            ];
            let envp: [*mut libc::c_char; 2] =
                [HELPER_PATH_ENV.as_ptr() as *mut _, core::ptr::null_mut()];
            // posix_spawn here, in our own address space (not the frozen one): no page-table
            // copy; it returns once the helper has exec'd (or with the exec error).
            let mut child: libc::pid_t = 0;
            let rc = libc::posix_spawn(
                &mut child,
                plan.exec_path.as_ptr(),
                &plan.setup.actions,
                &plan.setup.attr,
                argv.as_ptr(),
                envp.as_ptr(),
            );
            libc::dup3(NULL, LOG, libc::O_CLOEXEC); // close the log here
            if rc != 0 {
                fail(FAILED_SPAWN, rc);
                continue;
            }
            reply(Response {
                kind: SPAWNED,
                value: 0,
                stall_id: r.stall_id,
                pid: child as i64,
                mono_ns: mono_ns(),
                killed: 0,
                _pad: 0,
            });
            let service_gone = supervise(child, r.stall_id, plan.deadline_ns);
            if service_gone {
                libc::_exit(0);
            }
        }
    }
}

/// Reads one whole request; `None` when the service closed the pipe.
///
/// # Safety
/// Launcher only (reads descriptor [`REQ`]).
unsafe fn read_request() -> Option<Request> {
    // SAFETY: reading plain bytes into a zeroed `repr(C)` value of integers.
    unsafe {
        let mut r: Request = core::mem::zeroed();
        let mut got = 0usize;
        while got < size_of::<Request>() {
            let n = libc::read(
                REQ,
                (&mut r as *mut Request as *mut u8).add(got).cast(),
                size_of::<Request>() - got,
            );
            if n == 0 {
                return None;
            }
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                return None;
            }
            got += n as usize;
        }
        Some(r)
    }
}

/// Waits for the helper `child` to exit, stopping it at its deadline (SIGTERM, then SIGKILL 5 s
/// later), and reports how it ended. A request arriving meanwhile is refused as busy. Returns
/// true when the service closed the request pipe meanwhile.
///
/// # Safety
/// Launcher only; `child` is our own unreaped child, so signalling it by pid is safe.
unsafe fn supervise(child: libc::pid_t, stall_id: u64, deadline_ns: u64) -> bool {
    // SAFETY: system calls on our own child and descriptors.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, child, 0) as RawFd;
        let start = mono_ns();
        let mut next_kill = start.saturating_add(deadline_ns);
        let mut killed = 0u32;
        let mut service_gone = false;
        loop {
            let now = mono_ns();
            if now >= next_kill {
                if killed == 0 {
                    libc::kill(child, libc::SIGTERM);
                    killed = 1;
                    next_kill = now.saturating_add(5_000_000_000);
                } else {
                    libc::kill(child, libc::SIGKILL);
                    next_kill = u64::MAX;
                }
            }
            let mut status = 0;
            if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                if pidfd >= 0 {
                    libc::close(pidfd);
                }
                reply(Response {
                    kind: EXITED,
                    value: status,
                    stall_id,
                    pid: child as i64,
                    mono_ns: 0,
                    killed: u32::from(killed > 0),
                    _pad: 0,
                });
                return service_gone;
            }
            let wait_ms = (next_kill.saturating_sub(now) / 1_000_000).clamp(1, 1000) as libc::c_int;
            let mut fds = [
                libc::pollfd {
                    fd: pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if service_gone { -1 } else { REQ },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Without a pidfd (Linux < 5.3) wake every 50 ms to try waitpid again.
            let timeout = if pidfd >= 0 { wait_ms } else { wait_ms.min(50) };
            libc::poll(fds.as_mut_ptr(), 2, timeout);
            if fds[1].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                match read_request() {
                    None => service_gone = true,
                    Some(r) => reply(Response {
                        kind: FAILED_SPAWN,
                        value: libc::EBUSY,
                        stall_id: r.stall_id,
                        pid: 0,
                        mono_ns: 0,
                        killed: 0,
                        _pad: 0,
                    }),
                }
            }
        }
    }
}
