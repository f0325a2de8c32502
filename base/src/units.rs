//! Numbers for people (`3.50 GiB`, `48.8 ms`) and digits without allocating.

use core::fmt;

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
    fn human_units() {
        assert_eq!(HumanBytes(3 << 30 | 1 << 29).to_string(), "3.50 GiB");
        assert_eq!(HumanBytes(512).to_string(), "512 B");
        assert_eq!(HumanNanos(2_410_000_000).to_string(), "2.41 s");
        assert_eq!(HumanNanos(48_800_000).to_string(), "48.8 ms");
    }

    #[test]
    fn digits_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(digits(0, &mut b), b"0");
        assert_eq!(digits(u64::MAX, &mut b), b"18446744073709551615");
    }
}
