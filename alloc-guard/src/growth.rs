//! Geometric growth at one call site: the pattern behind the incident this project answers (a
//! `HashMap` doubling 68 → 136 → 272 → 544 MiB → 1.06 GiB) and behind every growable buffer
//! (a search tool's line buffer tripling 5 → 15 → 45 → 137 → 410 MiB). Once three or more
//! allocations at the same call site grow by about the same factor, the next one is
//! predictable — and avoidable by reserving the final capacity up front.

use base::units::HumanBytes;
use std::collections::HashMap;

/// Allocations at one call site growing by a steady factor.
#[derive(Debug, Clone, PartialEq)]
pub struct Growth {
    /// The sizes of the run, oldest first (at least 3).
    pub sizes: Vec<u64>,
    /// The factor between consecutive sizes (their geometric mean).
    pub ratio: f64,
    /// What the next growth would allocate.
    pub next: u64,
}

/// Consecutive factors in this range count as growth (a doubling, a 1.5x Vec, a tripling).
const MIN_RATIO: f64 = 1.3;
const MAX_RATIO: f64 = 8.0;
/// Each factor within this much of the run's mean factor.
const TOLERANCE: f64 = 0.25;

/// Finds the growth run that ends with the last of `sizes` (oldest first): the longest suffix
/// of at least three sizes whose consecutive factors are steady. `None` when there is none.
pub fn detect(sizes: &[u64]) -> Option<Growth> {
    let mut best: Option<Growth> = None;
    for start in (0..sizes.len().saturating_sub(2)).rev() {
        let run = &sizes[start..];
        let ratios: Vec<f64> = run
            .windows(2)
            .map(|w| w[1] as f64 / w[0].max(1) as f64)
            .collect();
        if ratios
            .iter()
            .any(|&r| !(MIN_RATIO..=MAX_RATIO).contains(&r))
        {
            break; // an older run cannot be steady through this step either
        }
        let mean = ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64;
        let mean = mean.exp();
        if ratios.iter().all(|r| (r / mean - 1.0).abs() <= TOLERANCE) {
            best = Some(Growth {
                sizes: run.to_vec(),
                ratio: mean,
                next: (*run.last()? as f64 * mean) as u64,
            });
        }
    }
    best
}

impl Growth {
    /// The hint, e.g. "the 5th growth at this call site (68.00 MiB → ... → 1.06 GiB, x2.0
    /// each): the next would be 2.12 GiB; reserve the final capacity up front".
    pub fn hint(&self) -> String {
        let path: Vec<String> = self
            .sizes
            .iter()
            .map(|&s| HumanBytes(s).to_string())
            .collect();
        format!(
            "the {} growth at this call site ({}, x{:.1} each): the next would be {}; reserve the final capacity up front (e.g. with_capacity)",
            ordinal(self.sizes.len()),
            path.join(" → "),
            self.ratio,
            HumanBytes(self.next)
        )
    }
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, r) if r != 11 => "st",
        (2, r) if r != 12 => "nd",
        (3, r) if r != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Sizes seen per call site, oldest first, bounded: the reporter feeds it every event.
#[derive(Debug, Default)]
pub struct GrowthTracker {
    sites: HashMap<String, Vec<u64>>,
}

/// Sizes kept per site, and sites kept.
const PER_SITE: usize = 12;
const SITES: usize = 4096;

impl GrowthTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an allocation of `size` at `site` and returns the growth it completes, if any.
    pub fn record(&mut self, site: &str, size: u64) -> Option<Growth> {
        if !self.sites.contains_key(site) && self.sites.len() >= SITES {
            return None;
        }
        let sizes = self.sites.entry(site.to_string()).or_default();
        if sizes.len() == PER_SITE {
            sizes.remove(0);
        }
        sizes.push(size);
        detect(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_doubling_hash_map_and_a_tripling_buffer_are_growth() {
        let map = [68 * MIB, 136 * MIB, 272 * MIB, 544 * MIB, 1088 * MIB];
        let g = detect(&map).unwrap();
        assert_eq!(g.sizes.len(), 5);
        assert!((g.ratio - 2.0).abs() < 0.01);
        assert_eq!(g.next, 2176 * MIB);
        assert_eq!(
            g.hint(),
            "the 5th growth at this call site (68.00 MiB → 136.00 MiB → 272.00 MiB → 544.00 MiB → 1.06 GiB, x2.0 each): the next would be 2.12 GiB; reserve the final capacity up front (e.g. with_capacity)"
        );
        let buf = [5 * MIB, 15 * MIB, 45 * MIB, 137 * MIB, 410 * MIB];
        let g = detect(&buf).unwrap();
        assert!((g.ratio - 3.0).abs() < 0.1 && g.sizes.len() == 5);
    }

    #[test]
    fn no_pattern_no_hint() {
        assert_eq!(detect(&[64 * MIB, 128 * MIB]), None, "two is not a pattern");
        assert_eq!(
            detect(&[64 * MIB; 4]),
            None,
            "the same size again is not growth"
        );
        assert_eq!(detect(&[64 * MIB, 100 * MIB, 400 * MIB]), None, "unsteady");
        // Only the steady suffix counts.
        let g = detect(&[900 * MIB, 10 * MIB, 20 * MIB, 40 * MIB]).unwrap();
        assert_eq!(g.sizes, vec![10 * MIB, 20 * MIB, 40 * MIB]);
    }

    #[test]
    fn the_tracker_sees_the_pattern_per_site() {
        let mut t = GrowthTracker::new();
        assert!(t.record("a", 64 * MIB).is_none());
        assert!(t.record("b", 64 * MIB).is_none());
        assert!(t.record("a", 128 * MIB).is_none());
        assert_eq!(t.record("a", 256 * MIB).unwrap().next, 512 * MIB);
        assert!(t.record("b", 65 * MIB).is_none());
        assert_eq!(ordinal(1), "1st");
        assert_eq!(ordinal(12), "12th");
        assert_eq!(ordinal(23), "23rd");
    }
}
