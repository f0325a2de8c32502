//! Parsing of sizes and durations, and reading `FREEZETRAP_*` variables without allocating.
//!
//! Everything here is usable from inside the global allocator: the parsers work on byte slices
//! and return plain integers, [`getenv_bytes`] reads the environment through libc (which does not
//! allocate), and [`StackMessage`] formats a one-line message into a fixed buffer that is then
//! written to stderr with one `write(2)`.

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

/// Variables read by `alloc-guard`.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "FREEZETRAP_ALLOC_THRESHOLD",
        value: "size: `67108864`, `64MiB`, `1GiB`, `512MB` (below 64KiB: accepted, said once)",
        default: "off",
        effect: "record every allocation / reallocation of at least this size (backtrace, USDT probe, report line)",
    },
    EnvVar {
        name: "FREEZETRAP_REPORT",
        value: "a file path, `stderr`, or `off`",
        default: "off",
        effect: "where the JSON-lines report goes (appended; created 0600, never through a symlink, and only a regular file owned by this user); a relative path is taken under `FREEZETRAP_OUT` when that is set",
    },
    EnvVar {
        name: "FREEZETRAP_OUT",
        value: "directory",
        default: "none",
        effect: "where reports and captures go (created 0700 if missing; refused with one line unless owned by this process's user and not writable by group or others; without it captures stay off)",
    },
    EnvVar {
        name: "FREEZETRAP_BACKTRACE_DEPTH",
        value: "integer 1..=32",
        default: "32",
        effect: "raw frames captured per oversized allocation (fewer = cheaper event)",
    },
    EnvVar {
        name: "FREEZETRAP_UNWIND",
        value: "`auto`, `fp` or `dwarf`",
        default: "auto",
        effect: "how backtraces are taken: frame pointers (~1 µs an event) or DWARF (~10 µs, works without frame pointers); `auto` checks the first stack both ways and keeps frame pointers if they agree",
    },
    EnvVar {
        name: "FREEZETRAP_QUIET",
        value: "`1` or `0`",
        default: "0",
        effect: "with `1`, no human line per large allocation on stderr (stall summaries and errors still print)",
    },
];

/// Why a value could not be parsed. `Display` says what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Empty or all blanks.
    Empty,
    /// No leading digits, or bytes that are not a known unit.
    Malformed,
    /// The unit is not one of the accepted ones.
    UnknownUnit,
    /// The value does not fit in 64 bits (or in `usize`).
    Overflow,
    /// Zero, where zero makes no sense (a threshold of 0 would record every allocation).
    Zero,
    /// Well-formed, but outside the range that makes sense for this setting.
    OutOfRange,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::Empty => "the value is empty",
            ParseError::Malformed => "the value is not a number with an optional unit",
            ParseError::UnknownUnit => "the unit is not known",
            ParseError::Overflow => "the value is too large",
            ParseError::Zero => "the value must be greater than zero",
            ParseError::OutOfRange => "the value is outside the accepted range",
        })
    }
}

/// The form a size must take, for messages.
pub const SIZE_FORM: &str =
    "bytes or a number with a unit B/KiB/MiB/GiB/TiB (1024^n) or KB/MB/GB/TB (1000^n), e.g. 64MiB";
/// The form a duration must take, for messages.
pub const DURATION_FORM: &str = "a number with a unit ns/us/ms/s/m/h, e.g. 200ms or 2s";

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Splits `"12.5 MiB"` into the number (as integer part, fraction digits and their scale) and the
/// unit bytes. Accepts one optional `.` and a blank between number and unit.
fn split_number(s: &[u8]) -> Result<(u64, u64, u64, &[u8]), ParseError> {
    let s = trim(s);
    if s.is_empty() {
        return Err(ParseError::Empty);
    }
    let mut int: u64 = 0;
    let mut i = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        int = int
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(s[i] - b'0')))
            .ok_or(ParseError::Overflow)?;
        i += 1;
    }
    let int_digits = i;
    let (mut frac, mut scale) = (0u64, 1u64);
    if i < s.len() && s[i] == b'.' {
        i += 1;
        while i < s.len() && s[i].is_ascii_digit() {
            // Beyond 9 fraction digits the precision is irrelevant for sizes and durations.
            if scale < 1_000_000_000 {
                frac = frac * 10 + u64::from(s[i] - b'0');
                scale *= 10;
            }
            i += 1;
        }
    }
    if int_digits == 0 && scale == 1 {
        return Err(ParseError::Malformed);
    }
    Ok((int, frac, scale, trim(&s[i..])))
}

fn scaled(int: u64, frac: u64, scale: u64, unit: u64) -> Result<u64, ParseError> {
    let whole = int.checked_mul(unit).ok_or(ParseError::Overflow)?;
    // frac/scale * unit, computed in u128 so that e.g. 1.5GiB is exact.
    let part = (u128::from(frac) * u128::from(unit) / u128::from(scale)) as u64;
    whole.checked_add(part).ok_or(ParseError::Overflow)
}

fn eq_ignore_case(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Parses a size such as `67108864`, `64MiB`, `1GiB`, `512MB`, `1.5 GiB`.
///
/// KiB/MiB/GiB/TiB (and K/M/G/T) are powers of 1024; KB/MB/GB/TB powers of 1000. Units are
/// case-insensitive. Zero is rejected. Never allocates.
///
/// ```
/// use freezetrap_alloc_guard::config::parse_size;
/// assert_eq!(parse_size(b"64MiB"), Ok(64 << 20));
/// assert_eq!(parse_size(b"512MB"), Ok(512_000_000));
/// assert!(parse_size(b"64 parsecs").is_err());
/// ```
pub fn parse_size(s: &[u8]) -> Result<usize, ParseError> {
    let (int, frac, scale, unit) = split_number(s)?;
    let mult: u64 = match unit {
        b"" => 1,
        u if eq_ignore_case(u, "b") => 1,
        u if eq_ignore_case(u, "k") || eq_ignore_case(u, "kib") => 1 << 10,
        u if eq_ignore_case(u, "m") || eq_ignore_case(u, "mib") => 1 << 20,
        u if eq_ignore_case(u, "g") || eq_ignore_case(u, "gib") => 1 << 30,
        u if eq_ignore_case(u, "t") || eq_ignore_case(u, "tib") => 1 << 40,
        u if eq_ignore_case(u, "kb") => 1_000,
        u if eq_ignore_case(u, "mb") => 1_000_000,
        u if eq_ignore_case(u, "gb") => 1_000_000_000,
        u if eq_ignore_case(u, "tb") => 1_000_000_000_000,
        u if u[0].is_ascii_alphabetic() => return Err(ParseError::UnknownUnit),
        _ => return Err(ParseError::Malformed),
    };
    if mult == 1 && scale != 1 {
        return Err(ParseError::Malformed); // "1.5" bytes
    }
    let v = scaled(int, frac, scale, mult)?;
    if v == 0 {
        return Err(ParseError::Zero);
    }
    usize::try_from(v).map_err(|_| ParseError::Overflow)
}

/// Parses a duration such as `200ms`, `2s`, `500us`, `1.5s`, `1m` into nanoseconds.
///
/// A bare number is rejected: a unit is required because "200" is ambiguous. Zero is rejected.
///
/// ```
/// use freezetrap_alloc_guard::config::parse_duration_ns;
/// assert_eq!(parse_duration_ns(b"200ms"), Ok(200_000_000));
/// assert_eq!(parse_duration_ns(b"1.5s"), Ok(1_500_000_000));
/// assert!(parse_duration_ns(b"200").is_err());
/// ```
pub fn parse_duration_ns(s: &[u8]) -> Result<u64, ParseError> {
    let (int, frac, scale, unit) = split_number(s)?;
    let mult: u64 = match unit {
        b"" => return Err(ParseError::Malformed),
        u if eq_ignore_case(u, "ns") => 1,
        u if eq_ignore_case(u, "us") || u == "µs".as_bytes() => 1_000,
        u if eq_ignore_case(u, "ms") => 1_000_000,
        u if eq_ignore_case(u, "s") || eq_ignore_case(u, "sec") => 1_000_000_000,
        u if eq_ignore_case(u, "m") || eq_ignore_case(u, "min") => 60_000_000_000,
        u if eq_ignore_case(u, "h") => 3_600_000_000_000,
        u if u[0].is_ascii_alphabetic() => return Err(ParseError::UnknownUnit),
        _ => return Err(ParseError::Malformed),
    };
    let v = scaled(int, frac, scale, mult)?;
    if v == 0 {
        return Err(ParseError::Zero);
    }
    Ok(v)
}

/// [`parse_duration_ns`], then `min_ns..=max_ns` (else [`ParseError::OutOfRange`]).
pub fn parse_duration_in(s: &[u8], min_ns: u64, max_ns: u64) -> Result<u64, ParseError> {
    let v = parse_duration_ns(s)?;
    if v < min_ns || v > max_ns {
        return Err(ParseError::OutOfRange);
    }
    Ok(v)
}

/// [`parse_size`], then at least `min` (else [`ParseError::OutOfRange`]).
pub fn parse_size_at_least(s: &[u8], min: usize) -> Result<usize, ParseError> {
    let v = parse_size(s)?;
    if v < min {
        return Err(ParseError::OutOfRange);
    }
    Ok(v)
}

/// Parses a whole number in `min..=max`.
pub fn parse_uint_in(s: &[u8], min: u64, max: u64) -> Result<u64, ParseError> {
    let (int, _, scale, unit) = split_number(s)?;
    if scale != 1 || !unit.is_empty() {
        return Err(ParseError::Malformed);
    }
    if int < min {
        return Err(if int == 0 {
            ParseError::Zero
        } else {
            ParseError::Malformed
        });
    }
    if int > max {
        return Err(ParseError::Overflow);
    }
    Ok(int)
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

/// The decimal digits of `v`, written into `out` (no allocation: usable during a freeze and in a
/// process forked from a multi-threaded one).
pub fn digits(v: u64, out: &mut [u8; 20]) -> &[u8] {
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

/// Formats a byte count for people: `3.50 GiB`, `64.00 MiB`, `512 B`.
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.2} {}", UNITS[u])
        }
    }
}

/// Formats nanoseconds for people: `2.41 s`, `48.8 ms`, `7.1 µs`, `830 ns`.
pub struct HumanNanos(pub u64);

impl fmt::Display for HumanNanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0 as f64;
        if self.0 >= 1_000_000_000 {
            write!(f, "{:.2} s", n / 1e9)
        } else if self.0 >= 1_000_000 {
            write!(f, "{:.1} ms", n / 1e6)
        } else if self.0 >= 1_000 {
            write!(f, "{:.1} µs", n / 1e3)
        } else {
            write!(f, "{} ns", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_every_unit() {
        assert_eq!(parse_size(b"67108864"), Ok(67_108_864));
        assert_eq!(parse_size(b"64MiB"), Ok(64 << 20));
        assert_eq!(parse_size(b"64mib"), Ok(64 << 20));
        assert_eq!(parse_size(b"64M"), Ok(64 << 20));
        assert_eq!(parse_size(b"1GiB"), Ok(1 << 30));
        assert_eq!(parse_size(b"512MB"), Ok(512_000_000));
        assert_eq!(parse_size(b"1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(b" 2 KiB "), Ok(2048));
        assert_eq!(parse_size(b"3KB"), Ok(3000));
        assert_eq!(parse_size(b"100B"), Ok(100));
        assert_eq!(parse_size(b"1TiB"), Ok(1 << 40));
    }

    #[test]
    fn malformed_sizes_say_why() {
        assert_eq!(parse_size(b""), Err(ParseError::Empty));
        assert_eq!(parse_size(b"   "), Err(ParseError::Empty));
        assert_eq!(parse_size(b"abc"), Err(ParseError::Malformed));
        assert_eq!(parse_size(b"64 parsecs"), Err(ParseError::UnknownUnit));
        assert_eq!(parse_size(b"0"), Err(ParseError::Zero));
        assert_eq!(parse_size(b"1.5"), Err(ParseError::Malformed));
        assert_eq!(parse_size(b"-5MiB"), Err(ParseError::Malformed));
        assert_eq!(
            parse_size(b"99999999999999999999"),
            Err(ParseError::Overflow)
        );
        assert_eq!(parse_size(b"20000000TiB"), Err(ParseError::Overflow));
        assert_eq!(parse_size(b"64MiB!"), Err(ParseError::UnknownUnit));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns(b"200ms"), Ok(200_000_000));
        assert_eq!(parse_duration_ns(b"2s"), Ok(2_000_000_000));
        assert_eq!(parse_duration_ns(b"500us"), Ok(500_000));
        assert_eq!(parse_duration_ns(b"1.25s"), Ok(1_250_000_000));
        assert_eq!(parse_duration_ns(b"1m"), Ok(60_000_000_000));
        assert_eq!(parse_duration_ns(b"1h"), Ok(3_600_000_000_000));
        assert_eq!(parse_duration_ns(b"200"), Err(ParseError::Malformed));
        assert_eq!(
            parse_duration_ns(b"2 fortnights"),
            Err(ParseError::UnknownUnit)
        );
        assert_eq!(parse_duration_ns(b"0ms"), Err(ParseError::Zero));
    }

    #[test]
    fn uints() {
        assert_eq!(parse_uint_in(b"16", 1, 32), Ok(16));
        assert_eq!(parse_uint_in(b"0", 1, 32), Err(ParseError::Zero));
        assert_eq!(parse_uint_in(b"33", 1, 32), Err(ParseError::Overflow));
        assert_eq!(parse_uint_in(b"3.5", 1, 32), Err(ParseError::Malformed));
    }

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

    #[test]
    fn human_units() {
        assert_eq!(HumanBytes(3 << 30 | 1 << 29).to_string(), "3.50 GiB");
        assert_eq!(HumanBytes(512).to_string(), "512 B");
        assert_eq!(HumanNanos(2_410_000_000).to_string(), "2.41 s");
        assert_eq!(HumanNanos(48_800_000).to_string(), "48.8 ms");
    }
}
