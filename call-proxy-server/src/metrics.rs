//! Counters the server keeps about itself (connections, registrations, calls by
//! outcome, rejected input). Lock-free; read by logs, tests and the operator interface.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
