//! The launcher as a program of its own: the service's executable, exec'd, rather than a fork
//! of the service.
//!
//! # Why
//! A fork copies the service's page tables under its `mmap_lock` (~0.15 ms for a service that
//! has just started, here; seconds for one that has grown, which is what a launcher started
//! again after the last one died would pay), and the launcher then shares every page the
//! service had: each page the service writes afterwards is copied on a fault, and the shared
//! pages make both exits slower. For a short-lived program that was ~0.6 ms of a 22 ms run
//! (`cargo bench --bench start_exit`). `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)`
//! and `execve`) copies nothing, and the exec'd launcher shares no page with the service.
//!
//! # How
//! The program is the running executable itself: `/proc/self/exe`, opened once when the
//! watchdog starts and checked like the helper (a regular executable file owned by root or the
//! service's user, writable by neither group nor others), then exec'd from that handle — not
//! from its path, so replacing the file on disk changes nothing — with marker arguments, an
//! empty environment, and the launcher's five descriptors in place (3 to 7). A constructor in
//! this crate (`.init_array`, run before `main` and before constructors of default priority)
//! sees the marker, forks once (the exec'd process exits, so the launcher is nobody's child,
//! as with the fork) and runs [`launcher_main`]. In every other process it notes that it ran
//! and returns.
//!
//! # When the launcher is forked instead
//! The exec'd launcher is used only where the constructor is known to run in the program
//! itself: on glibc (which passes `argc` and `argv` to constructors), in a process where the
//! constructor did run, with this crate linked into the executable (not into a shared library
//! some other program loaded: exec'ing that program would start *it*). And whenever an exec'd
//! launcher does not come up (its program cannot be loaded without the service's environment,
//! say), the launcher is forked as before: see [`crate::launcher::Launcher::start`].

use crate::launcher::{helper_exec_path, LaunchSpec, SpawnSetup, REQ};
use crate::launcher_process::{launcher_main, put_digits, Plan};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// `argv[1]` of an exec'd launcher.
const MARKER: &CStr = c"--freezetrap-launcher-v1";
/// Its `argv`: a name, the marker, "1" for a `#!` helper ("0" otherwise), `--duration`'s
/// value, the helper's deadline in ns, the helper's `argv[0]`, `FREEZETRAP_OUT`'s path.
const ARGC: usize = 7;

/// Set by the constructor in every process it runs in.
static CONSTRUCTOR_RAN: AtomicBool = AtomicBool::new(false);

/// The constructor. Its priority (101, the first one not reserved for the C runtime) runs it
/// after the shared libraries' constructors and std's (99, which keeps `argv`), and before the
/// program's own, which an exec'd launcher should not run.
#[cfg(target_env = "gnu")]
#[used]
#[link_section = ".init_array.00101"]
static ENTER_IF_LAUNCHER: extern "C" fn(
    libc::c_int,
    *const *const libc::c_char,
    *const *const libc::c_char,
) = enter_if_launcher;

/// In an exec'd launcher, becomes the launcher (never returns); elsewhere returns at once.
extern "C" fn enter_if_launcher(
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    // Relaxed: read later by threads this one starts (thread creation orders it).
    CONSTRUCTOR_RAN.store(true, Ordering::Relaxed);
    if argc != ARGC as libc::c_int || argv.is_null() {
        return;
    }
    // SAFETY: glibc calls constructors with the program's own `argc` and `argv`: `argc`
    // pointers to NUL-terminated strings.
    let arg = |i: usize| unsafe { CStr::from_ptr(*argv.add(i)) };
    if arg(1) != MARKER {
        return;
    }
    // From here on this process is a launcher or nothing: it never falls through to `main`.
    // SAFETY: a fresh, single-threaded process (only the C runtime and constructors of
    // higher priority have run), which owns descriptors 3 to 7 (the service put them there).
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        let (Some(duration), Some(deadline_ns)) = (digits(arg(3)), number(arg(4))) else {
            libc::_exit(2);
        };
        // The request pipe must be in place: otherwise someone ran the program by hand with
        // the marker.
        if libc::fstat(REQ, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            libc::_exit(2);
        }
        let is_script = arg(2) == c"1";
        let setup = SpawnSetup::new(is_script);
        let plan = Plan {
            fds: [REQ, REQ + 1, REQ + 2, REQ + 3, REQ + 4],
            setup: &setup,
            exec_path: helper_exec_path(is_script),
            argv0: arg(5),
            out_path: arg(6).to_bytes(),
            duration,
            deadline_ns,
        };
        match libc::fork() {
            0 => launcher_main(&plan),
            -1 => libc::_exit(1),
            _ => libc::_exit(0),
        }
    }
}

/// A decimal number's digits, NUL-terminated, as [`Plan::duration`] holds them.
fn digits(s: &CStr) -> Option<[u8; 24]> {
    let b = s.to_bytes();
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut out = [0u8; 24];
    out[..b.len()].copy_from_slice(b);
    Some(out)
}

/// A decimal number (no allocation: it runs before `main`).
fn number(s: &CStr) -> Option<u64> {
    digits(s)?;
    s.to_bytes().iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether `addr` lies in the program's executable itself (the first object
/// `dl_iterate_phdr` reports), not in a shared library.
fn in_executable(addr: usize) -> bool {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: glibc passes a valid `info` for the call, whose `dlpi_phdr` has `dlpi_phnum`
        // entries; `data` is the `(usize, bool)` given below.
        unsafe {
            let (addr, found) = &mut *data.cast::<(usize, bool)>();
            let info = &*info;
            for i in 0..usize::from(info.dlpi_phnum) {
                let ph = &*info.dlpi_phdr.add(i);
                let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
                if ph.p_type == libc::PT_LOAD && (start..start + ph.p_memsz as usize).contains(addr)
                {
                    *found = true;
                }
            }
        }
        1 // only the first object: the program
    }
    let mut data = (addr, false);
    // SAFETY: the callback only reads what glibc passes and writes `data`, alive for the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut data as *mut (usize, bool)).cast()) };
    data.1
}

/// The running executable, opened and checked, to exec launchers from; `None` where they are
/// forked instead (see the module docs).
pub(crate) fn open_image() -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    if !cfg!(target_env = "gnu")
        || !CONSTRUCTOR_RAN.load(Ordering::Relaxed)
        || !in_executable(enter_if_launcher as *const () as usize)
    {
        return None;
    }
    let f = std::fs::File::open("/proc/self/exe").ok()?; // close-on-exec
    let m = f.metadata().ok()?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let trusted = m.file_type().is_file()
        && (m.uid() == 0 || m.uid() == euid)
        && m.mode() & 0o022 == 0
        && m.mode() & 0o111 != 0;
    trusted.then(|| f.into())
}

/// Starts the launcher program from `image` with `fds` (the request pipe's read end, the
/// response pipe's write end, `FREEZETRAP_OUT`, the helper and `/dev/null`) as its descriptors
/// 3 to 7. Returns the pid of the exec'd process, which forks the launcher and exits.
pub(crate) fn spawn(
    image: &OwnedFd,
    fds: [RawFd; 5],
    spec: &LaunchSpec,
) -> std::io::Result<libc::pid_t> {
    // Every source above 7 first, so that putting one in place never overwrites another (or
    // the image, which the exec opens after the descriptors are in place).
    let high = |fd: RawFd| -> std::io::Result<OwnedFd> {
        // SAFETY: duplicating a descriptor we hold; the copy is owned by the result.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `h` was just created and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(h) })
    };
    let image = high(image.as_raw_fd())?;
    let moved = fds
        .iter()
        .map(|&fd| high(fd))
        .collect::<Result<Vec<_>, _>>()?;
    let path = CString::new(format!("/proc/self/fd/{}", image.as_raw_fd()))
        .map_err(std::io::Error::other)?;
    let out = CString::new(spec.out_path.clone()).map_err(std::io::Error::other)?;
    let (mut duration, mut deadline) = ([0u8; 24], [0u8; 24]);
    put_digits(spec.duration_secs, &mut duration);
    put_digits(spec.deadline_ns, &mut deadline);
    let argv: [*const libc::c_char; ARGC + 1] = [
        c"freezetrap-launcher".as_ptr(),
        MARKER.as_ptr(),
        if spec.is_script { c"1" } else { c"0" }.as_ptr(),
        duration.as_ptr().cast(),
        deadline.as_ptr().cast(),
        spec.argv0.as_ptr(),
        out.as_ptr(),
        core::ptr::null(),
    ];
    // Nothing of the service's environment: the launcher needs none.
    let envp: [*const libc::c_char; 1] = [core::ptr::null()];
    let dups: Vec<(RawFd, RawFd)> = (moved.iter().zip(REQ..))
        .map(|(m, to)| (m.as_raw_fd(), to))
        .collect();
    let setup = SpawnSetup::with_dups(&dups);
    let mut pid: libc::pid_t = 0;
    // SAFETY: `setup` is initialised (and destroyed by its drop); every pointer passed is alive
    // for the call (argv's strings are locals or `spec`'s).
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &setup.actions,
            &setup.attr,
            argv.as_ptr().cast(),
            envp.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(pid)
}

/// Whether this test binary meets [`open_image`]'s rule (a build with umask 002 makes it
/// group-writable: its launchers are then forked).
#[cfg(test)]
pub(crate) fn trusted_image() -> bool {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/exe").unwrap();
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    (m.uid() == 0 || m.uid() == euid) && m.mode() & 0o022 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_parsed_without_allocating_and_refused_when_malformed() {
        assert_eq!(number(c"0"), Some(0));
        assert_eq!(number(c"18446744073709551615"), Some(u64::MAX));
        assert_eq!(number(c"18446744073709551616"), None);
        assert_eq!(number(c""), None);
        assert_eq!(number(c"12a"), None);
        assert_eq!(&digits(c"42").unwrap()[..3], b"42\0");
    }

    #[test]
    fn the_constructor_ran_in_this_executable() {
        assert!(
            CONSTRUCTOR_RAN.load(Ordering::Relaxed),
            "the .init_array entry did not run"
        );
        assert!(in_executable(enter_if_launcher as *const () as usize));
        assert!(
            !in_executable(libc::getpid as *const () as usize),
            "libc is a shared library"
        );
        assert_eq!(
            open_image().is_some(),
            trusted_image(),
            "/proc/self/exe is exec'd as a launcher exactly when it is root's or ours and not \
             writable by group or others"
        );
    }
}
