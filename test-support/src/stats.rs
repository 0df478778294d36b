//! Latency figures for benchmarks: a percentile of sorted durations, and durations in
//! milliseconds for printing.

use std::time::Duration;

/// The `p` quantile (0.0–1.0, nearest rank) of `sorted` (ascending); zero when empty.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct(&d, 0.5), Duration::from_millis(50));
        assert_eq!(pct(&d, 0.99), Duration::from_millis(99));
        assert_eq!(pct(&d, 1.0), Duration::from_millis(100));
        assert_eq!(pct(&d, 0.0), Duration::from_millis(1));
        assert_eq!(pct(&[], 0.5), Duration::ZERO);
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }
}
