//! Parsing sizes and durations as freezetrap's environment variables and command lines write
//! them (`64MiB`, `200ms`), without allocating: usable from inside the global allocator.

use core::fmt;

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
/// use freezetrap_base::parse::parse_size;
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
/// use freezetrap_base::parse::parse_duration_ns;
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
}
