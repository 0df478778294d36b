//! Counters the server keeps about itself (connections, registrations, calls by
//! outcome, rejected input) and a latency histogram. Lock-free; read by logs, tests and
//! the admin listener's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::storage::Outcome;

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Control connections open now.
    pub connections: AtomicU64,
    /// Control connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections refused because the server was full.
    pub rejected_full: AtomicU64,
    /// Connections closed for a bad preamble, bad frame, oversized frame or timeout.
    pub bad_input: AtomicU64,
    /// Requests refused by the per-connection rate limit.
    pub rate_limited: AtomicU64,
    /// Successful registrations.
    pub registrations: AtomicU64,
    /// Registrations that replaced a live session of the same user.
    pub reregistrations: AtomicU64,
    /// Calls by final outcome: answered, missed, rejected, busy, cached.
    pub calls: [AtomicU64; 5],
}

impl Metrics {
    /// Counts a registration.
    pub fn registered(&self, replaced: bool) {
        self.registrations.fetch_add(1, Relaxed);
        if replaced {
            self.reregistrations.fetch_add(1, Relaxed);
        }
    }

    /// Counts a call that reached its final outcome.
    pub fn call_ended(&self, outcome: Outcome) {
        if let Some(i) = Self::slot(outcome) {
            self.calls[i].fetch_add(1, Relaxed);
        }
    }

    /// Calls that ended with this outcome since start.
    pub fn calls_by(&self, outcome: Outcome) -> u64 {
        Self::slot(outcome).map_or(0, |i| self.calls[i].load(Relaxed))
    }

    fn slot(outcome: Outcome) -> Option<usize> {
        Some(match outcome {
            Outcome::Answered => 0,
            Outcome::Missed => 1,
            Outcome::Rejected => 2,
            Outcome::Busy => 3,
            Outcome::Cached => 4,
            Outcome::Ringing => return None,
        })
    }
}

/// Upper bounds of the [`Histogram`] buckets, in microseconds (0.5 ms to 2.5 s; a
/// last, unbounded bucket takes the rest).
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BOUNDS_US`]), safe to update from
/// any thread without a lock (the database writer thread times each group commit).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is unbounded.
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    /// Sum of all observations, in microseconds.
    sum_us: AtomicU64,
}

/// A histogram as read at one moment, cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, ascending; the last
    /// bound is `f64::INFINITY` and its count is the total.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |b| b.1)
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let slot = LATENCY_BOUNDS_US.partition_point(|&bound| bound < us);
        self.counts[slot].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// The cumulative buckets and the sum, now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let bounds = LATENCY_BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain([f64::INFINITY]);
        let buckets = bounds
            .zip(&self.counts)
            .map(|(le, n)| {
                total = total.saturating_add(n.load(Relaxed));
                (le, total)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_inclusive_bounds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // le 0.0005 (bounds are inclusive)
        h.observe(Duration::from_micros(501)); // le 0.001
        h.observe(Duration::from_secs(10)); // only +Inf
        let s = h.snapshot();
        assert_eq!(s.buckets[0], (0.0005, 1));
        assert_eq!(s.buckets[1], (0.001, 2));
        assert_eq!(s.buckets[11], (2.5, 2));
        assert_eq!(s.buckets[12], (f64::INFINITY, 3));
        assert_eq!(s.count(), 3);
        assert!(
            (s.sum_seconds - 10.001001).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }
}
