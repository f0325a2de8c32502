//! Watchdog settings: one struct holding every default, filled from `FREEZETRAP_*` variables.
//!
//! Every variable has a range; a value outside it (or malformed, or not UTF-8) is refused with
//! one line naming the variable, the value and what is expected, and that setting keeps its
//! default (or, for `FREEZETRAP_STALL`, the watchdog stays off). All duration arithmetic
//! saturates.

use base::env::{complain_malformed, EnvVar};
use base::parse::{parse_duration_in, parse_size_at_least, parse_uint_in, ParseError};
use std::path::PathBuf;
use std::time::Duration;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

/// The accepted ranges, in nanoseconds (bytes for the cap): the README's table says the same.
pub mod limits {
    use super::{MS, SEC};
    /// `FREEZETRAP_STALL`: 1 ms to 1 h.
    pub const STALL_NS: (u64, u64) = (MS, 3600 * SEC);
    /// `FREEZETRAP_TICK`: 100 µs up to (not including) the stall threshold, at most 1 s.
    pub const TICK_NS: (u64, u64) = (100_000, SEC);
    /// `FREEZETRAP_LOOKBACK`: 1 ms to 10 min.
    pub const LOOKBACK_NS: (u64, u64) = (MS, 600 * SEC);
    /// `FREEZETRAP_CAPTURE_DURATION`: 1 s to 1 h (freezetrap-capture's own limit).
    pub const CAPTURE_DURATION_NS: (u64, u64) = (SEC, 3600 * SEC);
    /// `FREEZETRAP_CAPTURE_GRACE`: 1 ms to 10 min.
    pub const GRACE_NS: (u64, u64) = (MS, 600 * SEC);
    /// `FREEZETRAP_CAPTURE_COOLDOWN`: 1 ms to 24 h.
    pub const COOLDOWN_NS: (u64, u64) = (MS, 24 * 3600 * SEC);
    /// `FREEZETRAP_CAPTURE_MAX_PER_HOUR`: 1 to this.
    pub const MAX_PER_HOUR: usize = 1000;
    /// `FREEZETRAP_CAPTURE_MAX_BYTES`: at least 1 MiB.
    pub const MIN_CAPTURE_BYTES: usize = 1 << 20;
}

/// Variables read by the watchdog (the README's table is checked against this list).
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "FREEZETRAP_STALL",
        value: "duration: `200ms`, `2s`, `500us` (1ms..=1h)",
        default: "off",
        effect:
            "start the watchdog (needs `init_from_env`); a stall is anything at least this long",
    },
    EnvVar {
        name: "FREEZETRAP_TICK",
        value: "duration (100us..=1s, below the stall)",
        default: "stall / 2, at most 250ms",
        effect: "how often the watchdog wakes to check heartbeats and its own lateness",
    },
    EnvVar {
        name: "FREEZETRAP_LOOKBACK",
        value: "duration (1ms..=10min)",
        default: "2s",
        effect: "how far before a stall large allocations count as suspects",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE",
        value: "absolute path of an executable",
        default: "none",
        effect: "helper run on a stall with `--pid --tid --stall-id --out --duration` (needs `FREEZETRAP_OUT`; checked at start with every directory above it, then run from that open file)",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_DURATION",
        value: "duration (1s..=1h, whole seconds)",
        default: "10s",
        effect: "the helper's `--duration`",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_GRACE",
        value: "duration (1ms..=10min)",
        default: "10s",
        effect: "how long past its duration the helper may run (attach, write outputs) before it is killed",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_COOLDOWN",
        value: "duration (1ms..=24h)",
        default: "60s",
        effect: "minimum time between two helper starts",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_MAX_PER_HOUR",
        value: "integer 1..=1000",
        default: "10",
        effect: "cap on helper starts in any hour",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_MAX_BYTES",
        value: "size (at least 1MiB)",
        default: "1GiB",
        effect:
            "capture directories under `FREEZETRAP_OUT` beyond this total are deleted, oldest first",
    },
];

/// How the capture helper is run. Made by [`WatchdogConfig::with_capture`]; the fields can be
/// changed after.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaptureConfig {
    /// Absolute path of the helper.
    pub helper: PathBuf,
    /// Parent of the per-stall capture directories (`FREEZETRAP_OUT`).
    pub out_dir: PathBuf,
    /// Passed as `--duration` (whole seconds, at least 1).
    pub duration: Duration,
    /// Minimum time between two starts.
    pub cooldown: Duration,
    /// Maximum starts in any sliding hour.
    pub max_per_hour: u32,
    /// Total bytes of capture directories kept.
    pub max_bytes: u64,
    /// How long past `duration` the helper may run (attaching, writing its outputs) before it
    /// is killed.
    pub grace: Duration,
}

/// Everything the watchdog needs. [`WatchdogConfig::new`] holds the defaults; the fields can
/// be changed after.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchdogConfig {
    /// A stall is anything at least this long.
    pub threshold: Duration,
    /// Wake-up period.
    pub tick: Duration,
    /// Large allocations this long before a stall's start are suspects.
    pub lookback: Duration,
    /// The capture helper, if any.
    pub capture: Option<CaptureConfig>,
}

impl WatchdogConfig {
    /// Defaults for a stall threshold: tick = threshold / 2 clamped to 100 µs..=250 ms (each
    /// wake-up costs ~50 µs of CPU in a VM, so a faster tick is not free), look-back 2 s,
    /// no capture.
    pub fn new(threshold: Duration) -> Self {
        let tick = (threshold / 2).clamp(Duration::from_micros(100), Duration::from_millis(250));
        WatchdogConfig {
            threshold,
            tick,
            lookback: Duration::from_secs(2),
            capture: None,
        }
    }

    /// Adds a capture helper with default limits (10 s, cooldown 60 s, 10 an hour, 1 GiB kept,
    /// 10 s of grace).
    pub fn with_capture(mut self, helper: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        self.capture = Some(CaptureConfig {
            helper: helper.into(),
            out_dir: out_dir.into(),
            duration: Duration::from_secs(10),
            cooldown: Duration::from_secs(60),
            max_per_hour: 10,
            max_bytes: 1 << 30,
            grace: Duration::from_secs(10),
        });
        self
    }

    /// Checks every setting against its range (see [`limits`]); the error is one line naming
    /// the first one that is out.
    pub fn validate(&self) -> Result<(), String> {
        let ns = |d: Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
        let within = |name: &str, d: Duration, (lo, hi): (u64, u64)| {
            if (lo..=hi).contains(&ns(d)) {
                Ok(())
            } else {
                Err(format!(
                    "{name} {d:?} is outside {:?}..={:?}",
                    Duration::from_nanos(lo),
                    Duration::from_nanos(hi)
                ))
            }
        };
        within("the stall threshold", self.threshold, limits::STALL_NS)?;
        within("the tick", self.tick, limits::TICK_NS)?;
        if self.tick >= self.threshold {
            return Err(format!(
                "the tick {:?} is not below the stall threshold {:?}",
                self.tick, self.threshold
            ));
        }
        within("the look-back", self.lookback, limits::LOOKBACK_NS)?;
        if let Some(c) = &self.capture {
            within(
                "the capture duration",
                c.duration,
                limits::CAPTURE_DURATION_NS,
            )?;
            within("the capture grace", c.grace, limits::GRACE_NS)?;
            within("the capture cooldown", c.cooldown, limits::COOLDOWN_NS)?;
            if !(1..=limits::MAX_PER_HOUR as u32).contains(&c.max_per_hour) {
                return Err(format!(
                    "the hourly cap {} is outside 1..=1000",
                    c.max_per_hour
                ));
            }
            if c.max_bytes < limits::MIN_CAPTURE_BYTES as u64 {
                return Err(format!("the byte cap {} is below 1 MiB", c.max_bytes));
            }
        }
        Ok(())
    }

    /// Reads the environment. `None` when `FREEZETRAP_STALL` is unset, malformed or out of range
    /// (said in one line). Other malformed or out-of-range values keep their defaults, one line
    /// each. `out_dir` is `FREEZETRAP_OUT` when it was accepted: without it, captures stay off.
    pub fn from_env(out_dir: Option<&std::path::Path>) -> Option<Self> {
        let stall = env_text("FREEZETRAP_STALL", "the watchdog stays off")?;
        let threshold =
            match parse_duration_in(stall.as_bytes(), limits::STALL_NS.0, limits::STALL_NS.1) {
                Ok(ns) => Duration::from_nanos(ns),
                Err(e) => {
                    complain_malformed(
                        "FREEZETRAP_STALL",
                        stall.as_bytes(),
                        e,
                        "a duration from 1ms to 1h, e.g. 200ms",
                        "the watchdog stays off",
                    );
                    return None;
                }
            };
        let mut cfg = WatchdogConfig::new(threshold);
        let stall_ns = threshold.as_nanos() as u64;
        let tick_max = stall_ns.saturating_sub(1).min(limits::TICK_NS.1);
        if let Some(t) = env_duration_in(
            "FREEZETRAP_TICK",
            (limits::TICK_NS.0, tick_max),
            "a duration from 100us up to (not including) FREEZETRAP_STALL, at most 1s",
        ) {
            cfg.tick = t;
        }
        if let Some(l) = env_duration_in(
            "FREEZETRAP_LOOKBACK",
            limits::LOOKBACK_NS,
            "a duration from 1ms to 10min",
        ) {
            cfg.lookback = l;
        }
        let Some(helper) = std::env::var_os("FREEZETRAP_CAPTURE") else {
            return Some(cfg);
        };
        let Some(out) = out_dir else {
            eprintln!(
                "freezetrap: FREEZETRAP_CAPTURE is set but FREEZETRAP_OUT is not (or was refused): captures stay off; stalls are still detected and reported (set FREEZETRAP_OUT to a directory private to this user)"
            );
            return Some(cfg);
        };
        cfg = cfg.with_capture(helper, out);
        let c = cfg.capture.as_mut().expect("just set");
        if let Some(d) = env_duration_in(
            "FREEZETRAP_CAPTURE_DURATION",
            limits::CAPTURE_DURATION_NS,
            "a duration from 1s to 1h, e.g. 10s",
        ) {
            // Whole seconds: that is what the helper's --duration carries.
            c.duration = Duration::from_secs(d.as_secs_f64().ceil() as u64);
        }
        if let Some(d) = env_duration_in(
            "FREEZETRAP_CAPTURE_GRACE",
            limits::GRACE_NS,
            "a duration from 1ms to 10min",
        ) {
            c.grace = d;
        }
        if let Some(d) = env_duration_in(
            "FREEZETRAP_CAPTURE_COOLDOWN",
            limits::COOLDOWN_NS,
            "a duration from 1ms to 24h",
        ) {
            c.cooldown = d;
        }
        if let Some(v) = env_text("FREEZETRAP_CAPTURE_MAX_PER_HOUR", "using 10") {
            match parse_uint_in(v.as_bytes(), 1, limits::MAX_PER_HOUR as u64) {
                Ok(n) => c.max_per_hour = n as u32,
                Err(e) => complain_malformed(
                    "FREEZETRAP_CAPTURE_MAX_PER_HOUR",
                    v.as_bytes(),
                    e,
                    "a whole number from 1 to 1000",
                    "using 10",
                ),
            }
        }
        if let Some(v) = env_text("FREEZETRAP_CAPTURE_MAX_BYTES", "using 1GiB") {
            match parse_size_at_least(v.as_bytes(), limits::MIN_CAPTURE_BYTES) {
                Ok(n) => c.max_bytes = n as u64,
                Err(e) => complain_malformed(
                    "FREEZETRAP_CAPTURE_MAX_BYTES",
                    v.as_bytes(),
                    e,
                    "a size of at least 1MiB, e.g. 1GiB",
                    "using 1GiB",
                ),
            }
        }
        Some(cfg)
    }
}

/// A variable's text: `None` when unset, and when it is not UTF-8 (said in one line, with what
/// happens instead).
fn env_text(name: &str, consequence: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => {
            complain_malformed(
                name,
                v.as_encoded_bytes(),
                ParseError::Malformed,
                "UTF-8 text",
                consequence,
            );
            None
        }
    }
}

/// A duration variable within `range` (ns); otherwise one line and `None` (the default stays).
fn env_duration_in(name: &str, range: (u64, u64), expected: &str) -> Option<Duration> {
    let v = env_text(name, "using the default")?;
    match parse_duration_in(v.as_bytes(), range.0, range.1) {
        Ok(ns) => Some(Duration::from_nanos(ns)),
        Err(e) => {
            complain_malformed(name, v.as_bytes(), e, expected, "using the default");
            None
        }
    }
}
