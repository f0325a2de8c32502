//! Reading `FREEZETRAP_*` variables and saying what is wrong with them, in one grammar
//! (`freezetrap: NAME="VALUE" is not valid (WHY): expected FORM; CONSEQUENCE`), without
//! allocating: the allocator reads its variables on its first call.

use crate::parse::ParseError;
use core::fmt;

/// One environment variable that freezetrap reads: the single source of truth for the README's
/// table (a test checks that every entry appears there with its default).
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    /// The variable's name.
    pub name: &'static str,
    /// What it holds, e.g. "size".
    pub value: &'static str,
    /// The default when unset, as written in the README.
    pub default: &'static str,
    /// What it does, in one sentence.
    pub effect: &'static str,
}

/// Reads an environment variable's bytes through libc, without allocating.
///
/// `name` must be NUL-terminated. Returns `None` when unset. The returned slice points into the
/// process environment; it stays valid as long as nobody calls `setenv`/`putenv` for the same
/// name, which is why this is only used once, early, and by the allocator's lazy initialisation.
pub fn getenv_bytes(name: &'static core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is a valid NUL-terminated string. getenv returns either NULL or a pointer
    // to a NUL-terminated string inside `environ`, which lives for the whole process unless the
    // variable is changed concurrently (see the doc comment: callers accept that hazard, which
    // std's own `env::var` also has against foreign setenv calls).
    unsafe {
        let p = libc::getenv(name.as_ptr());
        if p.is_null() {
            None
        } else {
            Some(core::ffi::CStr::from_ptr(p).to_bytes())
        }
    }
}

/// Whether the name of any environment variable satisfies `pred`, read through libc's
/// `environ` without allocating (`std::env::vars_os` copies every variable: ~45 µs at the start
/// of every program here). The same hazard as [`getenv_bytes`]: a concurrent `setenv` from
/// another thread may change the array under it, so call it early.
pub fn any_name(pred: impl Fn(&[u8]) -> bool) -> bool {
    #[cfg(ft_linux)]
    {
        extern "C" {
            static environ: *const *const libc::c_char;
        }
        // SAFETY: `environ` is NULL or a NULL-terminated array of NUL-terminated `NAME=VALUE`
        // strings, stable while nobody calls setenv/putenv (see above).
        unsafe {
            let mut p = environ;
            if p.is_null() {
                return false;
            }
            while !(*p).is_null() {
                let entry = core::ffi::CStr::from_ptr(*p).to_bytes();
                let name = entry.split(|&b| b == b'=').next().unwrap_or(entry);
                if pred(name) {
                    return true;
                }
                p = p.add(1);
            }
            false
        }
    }
    #[cfg(not(ft_linux))]
    {
        use std::os::unix::ffi::OsStrExt;
        std::env::vars_os().any(|(k, _)| pred(k.as_bytes()))
    }
}

/// A fixed-size message buffer that implements `fmt::Write`, so messages can be formatted and
/// written from inside the allocator. Text past the capacity is cut (and ends with `...`).
pub struct StackMessage {
    buf: [u8; 512],
    len: usize,
    truncated: bool,
}

impl Default for StackMessage {
    fn default() -> Self {
        Self::new()
    }
}

impl StackMessage {
    /// An empty message.
    pub const fn new() -> Self {
        StackMessage {
            buf: [0; 512],
            len: 0,
            truncated: false,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Writes the message plus a newline to stderr with one `write(2)` (atomic for short lines,
    /// so concurrent messages do not interleave). Errors are ignored: there is nowhere to report
    /// a failing stderr.
    pub fn emit_stderr(mut self) {
        if self.truncated {
            let n = self.len.min(self.buf.len() - 4);
            self.buf[n..n + 3].copy_from_slice(b"...");
            self.len = n + 3;
        }
        let n = self.len.min(self.buf.len() - 1);
        self.buf[n] = b'\n';
        // SAFETY: the pointer and length describe initialised bytes of `self.buf`.
        unsafe {
            libc::write(2, self.buf.as_ptr().cast(), n + 1);
        }
    }
}

impl fmt::Write for StackMessage {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

/// Writes the one-line complaint about a malformed variable, in freezetrap's message grammar:
/// `freezetrap: NAME="VALUE" is not valid (WHY): expected FORM; CONSEQUENCE`.
pub fn complain_malformed(
    name: &str,
    value: &[u8],
    why: ParseError,
    expected: &str,
    consequence: &str,
) {
    use fmt::Write as _;
    let mut m = StackMessage::new();
    let shown = core::str::from_utf8(&value[..value.len().min(64)]).unwrap_or("<not UTF-8>");
    let _ = write!(
        m,
        "freezetrap: {name}=\"{shown}\" is not valid ({why}): expected {expected}; {consequence}"
    );
    m.emit_stderr();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_message_truncates_instead_of_growing() {
        use core::fmt::Write as _;
        let mut m = StackMessage::new();
        for _ in 0..100 {
            write!(m, "0123456789").unwrap();
        }
        assert_eq!(m.as_bytes().len(), 511);
        assert!(m.truncated);
    }
}

#[cfg(test)]
mod any_name_tests {
    #[test]
    fn names_are_matched_without_their_values() {
        assert!(super::any_name(|k| k == b"PATH"), "PATH is set in tests");
        assert!(!super::any_name(|k| k.contains(&b'=')));
        assert!(!super::any_name(|k| k == b"FT_ENV_TEST_SURELY_NOT_SET_42"));
    }
}
