//! Watchdog settings: one struct holding every default, filled from `FREEZETRAP_*` variables.

use alloc_guard::config::{
    complain_malformed, parse_duration_ns, parse_size, parse_uint_in, EnvVar, DURATION_FORM,
    SIZE_FORM,
};
use std::path::PathBuf;
use std::time::Duration;

/// Variables read by the watchdog (the README's table is checked against this list).
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "FREEZETRAP_STALL",
        value: "duration: `200ms`, `2s`, `500us`",
        default: "off",
        effect:
            "start the watchdog (needs `init_from_env`); a stall is anything at least this long",
    },
    EnvVar {
        name: "FREEZETRAP_TICK",
        value: "duration",
        default: "stall / 2, 1ms..250ms",
        effect: "how often the watchdog wakes to check heartbeats and its own lateness",
    },
    EnvVar {
        name: "FREEZETRAP_LOOKBACK",
        value: "duration",
        default: "2s",
        effect: "how far before a stall large allocations count as suspects",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE",
        value: "absolute path of an executable",
        default: "none",
        effect: "helper run on a stall with `--pid --tid --stall-id --out --duration`",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_DURATION",
        value: "duration",
        default: "10s",
        effect: "the helper's `--duration`",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_GRACE",
        value: "duration",
        default: "10s",
        effect: "how long past its duration the helper may run (attach, write outputs) before it is killed",
    },
    EnvVar {
        name: "FREEZETRAP_CAPTURE_COOLDOWN",
        value: "duration",
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
        value: "size",
        default: "1GiB",
        effect:
            "capture directories under `FREEZETRAP_OUT` beyond this total are deleted, oldest first",
    },
];

/// How the capture helper is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Absolute path of the helper.
    pub helper: PathBuf,
    /// Parent of the per-stall capture directories (`FREEZETRAP_OUT`, or a temp dir).
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

/// Everything the watchdog needs. [`WatchdogConfig::new`] holds the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Defaults for a stall threshold: tick = threshold / 2 clamped to 1..=250 ms (each wake-up
    /// costs ~50 µs of CPU in a VM, so a faster tick is not free), look-back 2 s,
    /// no capture.
    pub fn new(threshold: Duration) -> Self {
        let tick = (threshold / 2).clamp(Duration::from_millis(1), Duration::from_millis(250));
        WatchdogConfig {
            threshold,
            tick,
            lookback: Duration::from_secs(2),
            capture: None,
        }
    }

    /// Adds a capture helper with default limits (10 s, cooldown 60 s, 10 an hour, 1 GiB kept).
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

    /// Reads the environment. `None` when `FREEZETRAP_STALL` is unset or malformed (said in one
    /// line). Malformed extras fall back to their defaults with one line each.
    pub fn from_env(out_dir: Option<&std::path::Path>) -> Option<Self> {
        let stall = std::env::var("FREEZETRAP_STALL").ok()?;
        let threshold = match parse_duration_ns(stall.as_bytes()) {
            Ok(ns) => Duration::from_nanos(ns),
            Err(e) => {
                complain_malformed(
                    "FREEZETRAP_STALL",
                    stall.as_bytes(),
                    e,
                    DURATION_FORM,
                    "the watchdog stays off",
                );
                return None;
            }
        };
        let mut cfg = WatchdogConfig::new(threshold);
        if let Some(t) = env_duration("FREEZETRAP_TICK") {
            cfg.tick = t.clamp(Duration::from_micros(100), Duration::from_secs(1));
        }
        if let Some(l) = env_duration("FREEZETRAP_LOOKBACK") {
            cfg.lookback = l;
        }
        if let Ok(helper) = std::env::var("FREEZETRAP_CAPTURE") {
            let out = out_dir
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| std::env::temp_dir().join("freezetrap"));
            cfg = cfg.with_capture(helper, out);
            let c = cfg.capture.as_mut().expect("just set");
            if let Some(d) = env_duration("FREEZETRAP_CAPTURE_DURATION") {
                c.duration = d.max(Duration::from_secs(1));
            }
            if let Some(d) = env_duration("FREEZETRAP_CAPTURE_GRACE") {
                c.grace = d;
            }
            if let Some(d) = env_duration("FREEZETRAP_CAPTURE_COOLDOWN") {
                c.cooldown = d;
            }
            if let Ok(v) = std::env::var("FREEZETRAP_CAPTURE_MAX_PER_HOUR") {
                match parse_uint_in(v.as_bytes(), 1, 1000) {
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
            if let Ok(v) = std::env::var("FREEZETRAP_CAPTURE_MAX_BYTES") {
                match parse_size(v.as_bytes()) {
                    Ok(n) => c.max_bytes = n as u64,
                    Err(e) => complain_malformed(
                        "FREEZETRAP_CAPTURE_MAX_BYTES",
                        v.as_bytes(),
                        e,
                        SIZE_FORM,
                        "using 1GiB",
                    ),
                }
            }
        }
        Some(cfg)
    }
}

fn env_duration(name: &str) -> Option<Duration> {
    let v = std::env::var(name).ok()?;
    match parse_duration_ns(v.as_bytes()) {
        Ok(ns) => Some(Duration::from_nanos(ns)),
        Err(e) => {
            complain_malformed(name, v.as_bytes(), e, DURATION_FORM, "using the default");
            None
        }
    }
}
