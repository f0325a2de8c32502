//! The launcher: a tiny process forked when the watchdog starts, which starts capture helpers on
//! request.
//!
//! # Why a separate process
//! Starting a process from inside a frozen one is the whole point of the trigger, and every way
//! of doing it from the frozen address space waits for its `mmap_lock`: `fork()` copies the
//! address space under the lock; glibc's `posix_spawn` mmaps a stack for the child; and even a
//! hand-made `clone(CLONE_VM | CLONE_VFORK)` + `execve` waits, because exec releases the old
//! address space under the lock. Measured here, during a 25–35 ms fork of a 1.5 GiB process,
//! each of those returned only after the fork was over. The launcher has an address space of its
//! own, so its fork and the helper's exec do not touch the frozen one. The watchdog only writes
//! a fixed-size request into a pipe (no allocation, no page fault, no lock).
//!
//! The launcher is forked once, at start (never during a freeze). In the child only
//! async-signal-safe calls are made (it was forked from a multi-threaded process); it dies with
//! the service (`PR_SET_PDEATHSIG`) or when the request pipe closes. Cost: one idle process, and
//! copy-on-write faults in the service for pages that existed at start and are written later
//! (small when the watchdog starts early in `main`).

use core::mem::size_of;
use std::ffi::CStr;

extern "C" {
    static environ: *const *const libc::c_char;
}

/// The descriptor number the launcher keeps pointed at the current helper's log.
const LOG_FD: libc::c_int = 100;

/// Longest capture-directory path a request can carry.
pub const MAX_DIR: usize = 512;

/// One request: start the helper for this stall. Fixed size, below PIPE_BUF, so one `write` is
/// atomic and never interleaves.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Request {
    pub stall_id: u64,
    pub tid: u64,
    pub pid: u64,
    pub dir_len: u64,
    pub dir: [u8; MAX_DIR],
}

/// The launcher's answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Response {
    /// [`SPAWNED`], [`FAILED`] or [`EXITED`].
    pub kind: u32,
    /// errno (FAILED) or wait status (EXITED).
    pub value: i32,
    pub stall_id: u64,
    /// The helper's pid (SPAWNED, EXITED).
    pub pid: i64,
    /// `CLOCK_MONOTONIC` ns when the launcher saw the exec succeed (SPAWNED).
    pub mono_ns: u64,
}

pub(crate) const SPAWNED: u32 = 1;
pub(crate) const FAILED: u32 = 2;
pub(crate) const EXITED: u32 = 3;

/// The parent's handle on the launcher process.
pub(crate) struct Launcher {
    pid: libc::pid_t,
    req_w: libc::c_int,
    resp_r: libc::c_int,
}

fn pipe_cloexec() -> std::io::Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fds)
}

impl Launcher {
    /// Forks the launcher. `helper` and `duration` are fixed for its life.
    pub(crate) fn start(helper: &CStr, duration_secs: u64) -> std::io::Result<Launcher> {
        let req = pipe_cloexec()?;
        let resp = pipe_cloexec()?;
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        // SAFETY: fork at start-up; the child runs only `launcher_main`, which makes
        // async-signal-safe calls and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child; descriptors are ours.
            unsafe {
                libc::close(req[1]);
                libc::close(resp[0]);
                launcher_main(req[0], resp[1], helper.as_ptr(), duration_secs, parent)
            }
        }
        // SAFETY: closing the child's ends and making our read end non-blocking.
        unsafe {
            libc::close(req[0]);
            libc::close(resp[1]);
            let fl = libc::fcntl(resp[0], libc::F_GETFL);
            libc::fcntl(resp[0], libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Launcher {
            pid,
            req_w: req[1],
            resp_r: resp[0],
        })
    }

    /// Sends a request (one atomic write). Returns errno on failure (without touching the
    /// thread's errno).
    pub(crate) fn request(&self, r: &Request) -> Result<(), i32> {
        let n = crate::rawsys::syscall3(
            libc::SYS_write,
            self.req_w as usize,
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

    /// The next answer, if one is waiting (never blocks, never touches errno: see
    /// [`crate::rawsys`]).
    pub(crate) fn poll(&self) -> Option<Response> {
        if !crate::rawsys::readable(self.resp_r) {
            return None;
        }
        let mut r = Response {
            kind: 0,
            value: 0,
            stall_id: 0,
            pid: 0,
            mono_ns: 0,
        };
        // SAFETY: a Response is plain integers: any bytes are a valid value. Responses are
        // written whole (below PIPE_BUF), so a read gets one whole or nothing.
        let bytes = unsafe {
            core::slice::from_raw_parts_mut(
                (&mut r as *mut Response).cast::<u8>(),
                size_of::<Response>(),
            )
        };
        let n = crate::rawsys::read(self.resp_r, bytes);
        (n == size_of::<Response>() as isize).then_some(r)
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // SAFETY: our descriptors and our own child, stopped and reaped (no zombie).
        unsafe {
            libc::close(self.req_w);
            libc::close(self.resp_r);
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Writes the decimal digits of `v` into `out`, NUL-terminated.
fn put_digits(v: u64, out: &mut [u8; 24]) {
    let mut tmp = [0u8; 20];
    let d = crate::trigger::digits(v, &mut tmp);
    out[..d.len()].copy_from_slice(d);
    out[d.len()] = 0;
}

fn reply(fd: libc::c_int, r: Response) {
    // SAFETY: writes the bytes of a plain `repr(C)` value.
    unsafe { libc::write(fd, (&r as *const Response).cast(), size_of::<Response>()) };
}

/// The launcher process's whole life. Async-signal-safe calls only; never returns.
///
/// # Safety
/// Call only in the child of `fork()`, with the request read end, the response write end, a
/// NUL-terminated helper path that stays valid (it is in our copy of the parent's memory) and
/// the parent's pid.
unsafe fn launcher_main(
    req: libc::c_int,
    resp: libc::c_int,
    helper: *const libc::c_char,
    duration: u64,
    parent: libc::pid_t,
) -> ! {
    // SAFETY: plain syscalls on our own descriptors and stack buffers throughout.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != parent {
            libc::_exit(0); // the service died before we could ask to die with it
        }
        libc::prctl(
            libc::PR_SET_NAME,
            c"freezetrap-lnch".as_ptr() as libc::c_ulong,
        );
        let mut dur = [0u8; 24];
        put_digits(duration, &mut dur);
        // Prepared once: the helper's stdout/stderr go to LOG_FD, signals are reset.
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        libc::dup2(devnull, LOG_FD);
        let mut actions: libc::posix_spawn_file_actions_t = core::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut actions);
        libc::posix_spawn_file_actions_adddup2(&mut actions, LOG_FD, 1);
        libc::posix_spawn_file_actions_adddup2(&mut actions, LOG_FD, 2);
        libc::posix_spawn_file_actions_addclose(&mut actions, LOG_FD);
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
        loop {
            let mut r: Request = core::mem::zeroed();
            let mut got = 0usize;
            while got < size_of::<Request>() {
                let n = libc::read(
                    req,
                    (&mut r as *mut Request as *mut u8).add(got).cast(),
                    size_of::<Request>() - got,
                );
                if n == 0 {
                    libc::_exit(0); // the service closed the pipe
                }
                if n < 0 {
                    if *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    libc::_exit(1);
                }
                got += n as usize;
            }
            let (mut pid, mut tid, mut stall) = ([0u8; 24], [0u8; 24], [0u8; 24]);
            put_digits(r.pid, &mut pid);
            put_digits(r.tid, &mut tid);
            put_digits(r.stall_id, &mut stall);
            let dlen = (r.dir_len as usize).min(MAX_DIR - 1);
            let mut dir = [0u8; MAX_DIR + 16];
            dir[..dlen].copy_from_slice(&r.dir[..dlen]);
            let mut log = dir;
            log[dlen..dlen + 12].copy_from_slice(b"/helper.log\0");
            let fail = |e: i32| {
                reply(
                    resp,
                    Response {
                        kind: FAILED,
                        value: e,
                        stall_id: r.stall_id,
                        pid: 0,
                        mono_ns: 0,
                    },
                )
            };
            if libc::mkdir(dir.as_ptr().cast(), 0o700) != 0
                && *libc::__errno_location() != libc::EEXIST
            {
                fail(*libc::__errno_location());
                continue;
            }
            let logfd = libc::open(
                log.as_ptr().cast(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o600,
            );
            // Point the reserved descriptor (which the file actions dup onto 1 and 2) at the log.
            if logfd >= 0 {
                libc::dup2(logfd, LOG_FD);
                libc::close(logfd);
            } else {
                libc::dup2(devnull, LOG_FD);
            }
            let argv: [*mut libc::c_char; 12] = [
                helper as *mut _,
                c"--pid".as_ptr() as *mut _,
                pid.as_mut_ptr().cast(),
                c"--tid".as_ptr() as *mut _,
                tid.as_mut_ptr().cast(),
                c"--stall-id".as_ptr() as *mut _,
                stall.as_mut_ptr().cast(),
                c"--out".as_ptr() as *mut _,
                dir.as_mut_ptr().cast(),
                c"--duration".as_ptr() as *mut _,
                dur.as_mut_ptr().cast(),
                core::ptr::null_mut(),
            ];
            // posix_spawn here, in our own address space (not the frozen one): clone(CLONE_VM |
            // CLONE_VFORK) + exec, no page-table copy; it returns once the helper has exec'd
            // (or with the exec error).
            let mut child: libc::pid_t = 0;
            let rc = libc::posix_spawn(
                &mut child,
                helper,
                &actions,
                &attr,
                argv.as_ptr(),
                environ as *const *mut _,
            );
            if rc != 0 {
                fail(rc);
                continue;
            }
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
            let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            reply(
                resp,
                Response {
                    kind: SPAWNED,
                    value: 0,
                    stall_id: r.stall_id,
                    pid: child as i64,
                    mono_ns: mono,
                },
            );
            let mut status = 0;
            while libc::waitpid(child, &mut status, 0) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            reply(
                resp,
                Response {
                    kind: EXITED,
                    value: status,
                    stall_id: r.stall_id,
                    pid: child as i64,
                    mono_ns: 0,
                },
            );
        }
    }
}
