//! Latency histograms and error counts of a phase, and their quantiles.

use std::time::Duration;

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;

/// Latencies (microseconds) and errors of one phase.
pub(crate) struct Stats {
    pub(crate) hist: Histogram<u64>,
    /// Second histogram (time until the callee rings, in the dial phase).
    pub(crate) hist2: Histogram<u64>,
    pub(crate) errors: u64,
    pub(crate) first_errors: Vec<String>,
    /// Paced operations that started over 2 ms after their slot.
    pub(crate) late: u64,
}

impl Stats {
    pub(crate) fn new() -> Result<Stats> {
        Ok(Stats {
            hist: new_hist()?,
            hist2: new_hist()?,
            errors: 0,
            first_errors: Vec::new(),
            late: 0,
        })
    }

    pub(crate) fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(format!("{e:#}"));
        }
    }

    pub(crate) fn merge(&mut self, other: Stats) -> Result<()> {
        self.hist
            .add(&other.hist)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))?;
        self.hist2
            .add(&other.hist2)
            .map_err(|e| anyhow!("cannot merge histograms: {e:?}"))?;
        self.errors += other.errors;
        self.late += other.late;
        for e in other.first_errors {
            if self.first_errors.len() < 5 {
                self.first_errors.push(e);
            }
        }
        Ok(())
    }

    pub(crate) fn print_errors(&self, phase: &str) {
        if self.errors > 0 {
            println!("    {phase}: {} errors; first ones:", self.errors);
            for e in &self.first_errors {
                println!("      - {e}");
            }
        }
    }
}

pub(crate) fn new_hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| anyhow!("cannot create a histogram: {e:?}"))
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Quantiles of a latency histogram, in milliseconds.
pub(crate) struct Quantiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Quantiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Quantiles {
        Quantiles {
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            self.p50, self.p99, self.p999, self.max
        )
    }
}
