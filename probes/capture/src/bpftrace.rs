//! Running bpftrace from a root process: the command (program inline, clean environment, no
//! inherited descriptors, gone with us), stopping it so it still prints, reading its output
//! line by line and its errors, and the SIGINT/SIGTERM handling both modes share.

/// The `PATH` bpftrace (and anything it starts) gets: nothing from our own environment.
pub(crate) const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A `Command` that runs `program` with bpftrace, with what both modes need:
/// - the program passed inline (`-e`), never written to and read back from a path another user
///   could touch; `args` follow as its positional parameters;
/// - a clean environment: a fixed `PATH` and bpftrace's own settings only (map and string caps,
///   for bounded memory in the kernel and in the output; cached user symbols: one target, one
///   executable per bpftrace, where uncached bpftrace re-reads the ELF and /proc/PID/maps for
///   every frame it prints);
/// - no inherited descriptor beyond 0-2;
/// - SIGTERM when this process dies, so a killed helper or recorder never leaves bpftrace
///   attached behind it.
///
/// `bpftrace` must be the path [`preflight::bpftrace`] checked.
pub(crate) fn bpftrace_command<A: AsRef<std::ffi::OsStr>>(
    bpftrace: &std::path::Path,
    program: &str,
    args: impl IntoIterator<Item = A>,
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(bpftrace);
    cmd.env_clear()
        .env("PATH", SAFE_PATH)
        .env("BPFTRACE_MAX_STRLEN", "64")
        .env("BPFTRACE_MAP_KEYS_MAX", "8192")
        .env("BPFTRACE_CACHE_USER_SYMBOLS", "1")
        .args(["-f", "json", "-e", program])
        .args(args);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, close_range); it allocates nothing. (A
    // pre_exec makes std fork instead of posix_spawn: fine here, the helper and the recorder
    // are small processes that are never the frozen one.)
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            // The parent may have died before the prctl: then nobody will signal us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited"));
            }
            // Every descriptor from 3 up close-on-exec (std's own error pipe already is);
            // CLOSE_RANGE_CLOEXEC = 4 (Linux 5.11; older kernels: inherited descriptors stay).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32);
            Ok(())
        });
    }
    cmd
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT and SIGTERM ask for an orderly stop (bpftrace interrupted, what it recorded written)
/// instead of killing the process: [`stop_requested`] says when one came.
pub(crate) fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // function pointer has the signature `signal` expects.
        unsafe { libc::signal(sig, on_stop_signal as extern "C" fn(libc::c_int) as usize) };
    }
}

/// Whether SIGINT or SIGTERM arrived (see [`install_stop_handlers`]).
pub(crate) fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Stops bpftrace: SIGINT first (it detaches and prints its maps), SIGKILL if it has not exited
/// within `grace`.
pub(crate) fn stop_bpftrace(child: &mut std::process::Child, grace: std::time::Duration) {
    // Once reaped, the pid may belong to someone else: never signal it then.
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    interrupt(child);
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGINT to bpftrace unless it has been reaped: it detaches, prints every map, and exits.
pub(crate) fn interrupt(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill() on our own child, not reaped (checked above), so the pid is its own.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    }
}

/// Collects bpftrace's stderr on a thread (a full pipe must never block bpftrace), keeping the
/// first 64 KiB.
pub(crate) fn collect_stderr(
    stderr: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        for_each_line(stderr, |line| {
            if text.len() < 64 << 10 {
                text.push_str(&line);
                text.push('\n');
            }
            true
        });
        text
    })
}

/// bpftrace's first error line in `stderr`, skipping the harmless RLIMIT_MEMLOCK warning it
/// prints on this kernel.
pub(crate) fn first_error(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .find(|l| l.contains("ERROR") && !l.contains("RLIMIT_MEMLOCK"))
}

/// Calls `each` with every line of `reader` until EOF. Bytes that are not UTF-8 (a thread name
/// cut in the middle of a character) are replaced, not taken for the end of the output.
pub(crate) fn for_each_line(reader: impl std::io::Read, mut each: impl FnMut(String) -> bool) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if !each(line.trim_end_matches(['\n', '\r']).to_string()) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_survive_bytes_that_are_not_utf8() {
        let input: &[u8] = b"one\nth\xffree\nfour";
        let mut lines = Vec::new();
        for_each_line(input, |l| {
            lines.push(l);
            true
        });
        assert_eq!(lines, ["one", "th\u{fffd}ree", "four"]);
    }
}
