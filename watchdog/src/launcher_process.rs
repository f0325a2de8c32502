//! The launcher process's life (see [`crate::launcher`] for why it exists): it starts helpers
//! in its own address space and looks after them.
//!
//! # What this code may do
//! It runs in a process forked from a multi-threaded one (the service, or for an exec'd
//! launcher a fresh single-threaded one): locks other threads held at the fork stay locked
//! here forever. So it makes only system calls through their libc wrappers, plus
//! `posix_spawn` with attributes and file actions prepared in the parent; glibc's `posix_spawn`
//! (2.36, `spawni.c`) maps a stack for its `clone(CLONE_VM | CLONE_VFORK)` child, applies the
//! prepared actions with system calls and execs: it takes no lock and does not allocate. No Rust
//! allocation, no stdio, no thread-local state.

use crate::launcher::{
    Request, Response, SpawnSetup, EXITED, FAILED_DIR, FAILED_SPAWN, HELPER_PATH_ENV, LOG,
    MAX_NAME, MAX_OUT_PATH, NULL, OUT, READY, REQ, RESP, SPAWNED,
};
use core::mem::size_of;
use std::ffi::CStr;
use std::os::fd::RawFd;

/// What the launcher process needs, prepared in the parent before the fork.
pub(crate) struct Plan<'a> {
    /// The request read end, response write end, FREEZETRAP_OUT, the helper and /dev/null, to
    /// become descriptors 3 to 7.
    pub(crate) fds: [RawFd; 5],
    pub(crate) setup: &'a SpawnSetup,
    pub(crate) exec_path: &'a std::ffi::CStr,
    pub(crate) argv0: &'a CStr,
    pub(crate) out_path: &'a [u8],
    pub(crate) duration: [u8; 24],
    pub(crate) deadline_ns: u64,
}

/// Writes the decimal digits of `v` into `out`, NUL-terminated.
pub(crate) fn put_digits(v: u64, out: &mut [u8; 24]) {
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
/// Call only in the grandchild forked by [`Launcher::start`] (or by the exec'd launcher's
/// constructor, `crate::launcher_exec`), with a `plan` in (our copy of) the parent's memory. That process was forked from a multi-threaded one: locks other threads held
/// at the fork stay locked here forever. So it makes only system calls through their libc
/// wrappers, plus `posix_spawn` with attributes and file actions prepared in the parent; glibc's
/// `posix_spawn` (2.36, `spawni.c`) maps a stack for its `clone(CLONE_VM | CLONE_VFORK)` child,
/// applies the prepared actions with system calls and execs: it takes no lock and does not
/// allocate. It uses no Rust allocation, no stdio and no thread-local state.
pub(crate) unsafe fn launcher_main(plan: &Plan<'_>) -> ! {
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
        // The report thread that started us is a batch thread (it never preempts the
        // service); the launcher, which starts helpers during a freeze, and they, are not.
        if libc::sched_getscheduler(0) == libc::SCHED_BATCH {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        }
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
