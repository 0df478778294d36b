//! What the server counts about itself, each metric declared once, here, with its
//! Prometheus name and help: connections, registrations, calls by outcome, rejected input,
//! the gauges read at scrape time, and the database's group-commit latency histogram.
//!
//! Built on the `prometheus` crate (tikv's rust-prometheus): lock-free counters and
//! gauges, and its text encoder writes the exposition format (0.0.4) that `/metrics`
//! serves. Logs, tests and the admin listener read the same handles.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::storage::Outcome;

/// Upper bounds of the commit-latency histogram's buckets, in microseconds (0.5 ms to
/// 2.5 s; a last, unbounded bucket takes the rest).
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

/// The outcomes calls are counted by (a live call's `ringing` is not a final one).
const FINAL_OUTCOMES: [Outcome; 5] = [
    Outcome::Answered,
    Outcome::Missed,
    Outcome::Rejected,
    Outcome::Busy,
    Outcome::Cached,
];

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Process-wide metrics, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Where every metric below is registered; `/metrics` encodes it.
    registry: Registry,
    /// Control connections open now.
    pub connections: IntGauge,
    /// Control connections accepted since start.
    pub accepted: IntCounter,
    /// Connections refused because the server was full.
    pub rejected_full: IntCounter,
    /// Failed accepts (out of descriptors or memory); the listener backs off.
    pub accept_errors: IntCounter,
    /// Unregistered connections closed to make room for new ones.
    pub shed: IntCounter,
    /// Registrations refused because their source address had `max_per_ip` already.
    pub refused_per_ip: IntCounter,
    /// Connections closed for sending too many requests over the rate limit.
    pub flood_closed: IntCounter,
    /// Connections refused because their source address flooded lately.
    pub refused_flooding: IntCounter,
    /// TLS handshakes that failed or did not complete in time.
    pub tls_failed: IntCounter,
    /// Requests refused for want of a valid TV credential (not enrolled, revoked,
    /// another user's).
    pub auth_failures: IntCounter,
    /// STUN Binding requests the own STUN responder answered (`stun_listen`).
    pub stun_answered: IntCounter,
    /// Datagrams the own STUN responder dropped (not a well-formed Binding request).
    pub stun_dropped: IntCounter,
    /// Enrollments started (new codes handed out).
    pub enrollments_started: IntCounter,
    /// Live sessions ended because their TV's credential was revoked.
    pub revoked_sessions: IntCounter,
    /// Requests over the rate limit dropped without an answer.
    pub rate_limited_dropped: IntCounter,
    /// Control-link bytes from registered TVs, accounted to their accounts.
    pub accounted_in: IntCounter,
    /// Control-link bytes to registered TVs, accounted to their accounts.
    pub accounted_out: IntCounter,
    /// Usage rows (account and period) written to the database.
    pub usage_rows_written: IntCounter,
    /// Writes of traffic accounting that failed (kept and retried).
    pub usage_write_failures: IntCounter,
    /// Presence subscriptions now (set at scrape time).
    pub presence_subscriptions: IntGauge,
    /// Watched (subscriber, user) pairs now (set at scrape time).
    pub presence_pairs: IntGauge,
    /// Presence notifications queued to TVs (brought up to date at scrape time).
    pub presence_notifications: IntCounter,
    /// State changes carried in them (brought up to date at scrape time).
    pub presence_changes: IntCounter,
    /// Presence acknowledgements ignored: for no subscription of the session, or a
    /// sequence number never sent.
    pub presence_bad_acks: IntCounter,
    /// Subscriptions refused: over the limit of users per TV, or from a TV that did not
    /// ask for presence pushes.
    pub presence_refused: IntCounter,
    /// Failed notifications answered with the recovery message.
    pub presence_recoveries: IntCounter,
    /// TVs signed out because their notifications kept failing.
    pub presence_sign_outs: IntCounter,
    /// Subscriptions only dropped (policy `drop_subscription`) at the threshold.
    pub presence_dropped: IntCounter,
    /// Alarms raised for the operator.
    pub alarms_raised: IntCounter,
    /// Alarms open now (not cleared), counted in the database at each scrape (the CLI
    /// clears them on the file).
    pub alarms_open: IntGauge,
    /// The effective connection limit derived at start (see `Config::max_connections`).
    pub connection_limit: IntGauge,
    /// Connections open now that have not registered.
    pub unregistered: IntGauge,
    /// Connections closed for a bad preamble, bad frame, oversized frame or timeout.
    pub bad_input: IntCounter,
    /// Requests refused by the per-connection rate limit.
    pub rate_limited: IntCounter,
    /// Successful registrations.
    pub registrations: IntCounter,
    /// Registrations that replaced a live session of the same user.
    pub reregistrations: IntCounter,
    /// Calls by final outcome.
    calls: IntCounterVec,
    /// Messages stored, by kind.
    messages_stored: IntCounterVec,
    /// Messages refused, by reason (`too_large`, `bad_media`, `quota_exceeded`, …).
    messages_refused: IntCounterVec,
    /// Bodies refused by the media check, by what was wrong.
    bodies_bad: IntCounterVec,
    /// TVs registered on this server now (set at scrape time from the registry).
    pub tvs_online: IntGauge,
    /// Calls ringing or in progress now (set at scrape time from the registry).
    pub live_calls: IntGauge,
    /// 1 if the database answered the scrape's query, else 0.
    pub db_up: IntGauge,
    /// Missed calls waiting for their callee (set at scrape time from the database).
    pub cached_waiting: IntGauge,
    /// Messages kept in the mailboxes (set at scrape time from the database).
    pub mailbox_messages: IntGauge,
    /// Of them, not yet taken by their recipient's TV.
    pub mailbox_waiting: IntGauge,
    /// Bytes the mailboxes hold (bodies and texts).
    pub mailbox_bytes: IntGauge,
    /// 1 while the database's disk is full (new records refused), else 0 (set at
    /// scrape time from the store).
    pub storage_full: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A latency histogram in seconds with the [`LATENCY_BOUNDS_US`] buckets, not yet
/// registered anywhere (the store keeps its own and [`Metrics::encode`] adds it).
pub fn latency_histogram(name: &str, help: &str) -> Histogram {
    let buckets = LATENCY_BOUNDS_US
        .iter()
        .map(|&us| us as f64 / 1e6)
        .collect();
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    // The name, help and buckets are constants of this module: they are valid.
    Histogram::with_opts(opts).unwrap_or_else(|e| unreachable!("latency histogram: {e}"))
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c =
                IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("counter {name}: {e}"));
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| unreachable!("counter {name}: {e}"));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("gauge {name}: {e}"));
            registry
                .register(Box::new(g.clone()))
                .unwrap_or_else(|e| unreachable!("gauge {name}: {e}"));
            g
        };
        let calls = IntCounterVec::new(
            Opts::new("call_proxy_calls_total", "Calls by final outcome."),
            &["outcome"],
        )
        .unwrap_or_else(|e| unreachable!("calls: {e}"));
        registry
            .register(Box::new(calls.clone()))
            .unwrap_or_else(|e| unreachable!("calls: {e}"));
        // Every outcome is exported from the start, at zero.
        for o in FINAL_OUTCOMES {
            calls.with_label_values(&[o.as_str()]);
        }
        let vec = |name: &str, help: &str, label: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable!("{name}: {e}"));
            registry
                .register(Box::new(v.clone()))
                .unwrap_or_else(|e| unreachable!("{name}: {e}"));
            v
        };
        let messages_stored = vec(
            "call_proxy_messages_stored_total",
            "Messages stored for a TV, by kind.",
            "kind",
        );
        let messages_refused = vec(
            "call_proxy_messages_refused_total",
            "Messages refused, by reason (nothing of them was stored).",
            "reason",
        );
        let bodies_bad = vec(
            "call_proxy_message_bodies_bad_total",
            "Message bodies refused by the media check, by what was wrong.",
            "reason",
        );
        Metrics {
            connections: gauge("call_proxy_connections", "TV control connections open now."),
            accepted: counter(
                "call_proxy_connections_accepted_total",
                "TV control connections accepted.",
            ),
            rejected_full: counter(
                "call_proxy_connections_refused_full_total",
                "Connections refused because the server was full.",
            ),
            accept_errors: counter(
                "call_proxy_accept_errors_total",
                "Failed accepts (out of descriptors or memory); the listener backed off.",
            ),
            shed: counter(
                "call_proxy_connections_shed_total",
                "Unregistered connections closed to make room for new ones.",
            ),
            refused_per_ip: counter(
                "call_proxy_registrations_refused_per_ip_total",
                "Registrations refused because their source address had max_per_ip already.",
            ),
            flood_closed: counter(
                "call_proxy_flood_closed_total",
                "Connections closed for too many requests over the rate limit.",
            ),
            tls_failed: counter(
                "call_proxy_tls_handshakes_failed_total",
                "TLS handshakes on the control port that failed or did not complete in time.",
            ),
            auth_failures: counter(
                "call_proxy_auth_failures_total",
                "Requests refused for want of a valid TV credential (not enrolled, revoked, or another user's).",
            ),
            stun_answered: counter(
                "call_proxy_stun_answered_total",
                "STUN Binding requests answered by this server's STUN responder (stun_listen).",
            ),
            stun_dropped: counter(
                "call_proxy_stun_dropped_total",
                "Datagrams this server's STUN responder dropped: not a well-formed Binding request.",
            ),
            enrollments_started: counter(
                "call_proxy_enrollments_started_total",
                "Enrollment codes handed out to TVs.",
            ),
            revoked_sessions: counter(
                "call_proxy_revoked_sessions_total",
                "Live sessions ended because their TV's credential was revoked.",
            ),
            refused_flooding: counter(
                "call_proxy_connections_refused_flooding_total",
                "Connections refused because their source address flooded lately (flood_penalty_ms).",
            ),
            rate_limited_dropped: counter(
                "call_proxy_rate_limited_dropped_total",
                "Requests over the rate limit dropped without an answer.",
            ),
            accounted_in: counter(
                "call_proxy_accounted_control_in_bytes_total",
                "Control-link bytes received from registered TVs, accounted to their accounts.",
            ),
            accounted_out: counter(
                "call_proxy_accounted_control_out_bytes_total",
                "Control-link bytes sent to registered TVs, accounted to their accounts.",
            ),
            usage_rows_written: counter(
                "call_proxy_usage_rows_written_total",
                "Traffic accounting rows (account and period) written to the database.",
            ),
            usage_write_failures: counter(
                "call_proxy_usage_write_failures_total",
                "Writes of traffic accounting that failed (kept and retried at the next interval).",
            ),
            presence_subscriptions: gauge(
                "call_proxy_presence_subscriptions",
                "Presence subscriptions (one per watching TV session) now.",
            ),
            presence_pairs: gauge(
                "call_proxy_presence_watched_pairs",
                "Watched (subscriber, user) pairs now.",
            ),
            presence_notifications: counter(
                "call_proxy_presence_notifications_total",
                "Presence notifications queued to TVs.",
            ),
            presence_changes: counter(
                "call_proxy_presence_changes_total",
                "State changes carried in presence notifications (one notification may carry several).",
            ),
            presence_bad_acks: counter(
                "call_proxy_presence_bad_acks_total",
                "Presence acknowledgements ignored: for no subscription of the session, or a sequence number never sent.",
            ),
            presence_refused: counter(
                "call_proxy_presence_refused_total",
                "Presence subscriptions refused (too many users, or a session that did not ask for presence pushes).",
            ),
            presence_recoveries: counter(
                "call_proxy_presence_recoveries_total",
                "Failed presence notifications answered with the recovery message (the TV subscribes again).",
            ),
            presence_sign_outs: counter(
                "call_proxy_presence_sign_outs_total",
                "TVs signed out because their presence notifications kept failing (policy sign_out).",
            ),
            presence_dropped: counter(
                "call_proxy_presence_dropped_subscriptions_total",
                "Presence subscriptions dropped at the failure threshold (policy drop_subscription).",
            ),
            alarms_raised: counter(
                "call_proxy_alarms_raised_total",
                "Alarms raised for the operator (see GET /api/alarms).",
            ),
            alarms_open: gauge(
                "call_proxy_alarms_open",
                "Alarms not cleared yet (GET /api/alarms; cleared by POST /api/alarms/{id}/clear or the CLI).",
            ),
            connection_limit: gauge(
                "call_proxy_connection_limit",
                "Effective limit on TV connections, derived at start from max_connections and the descriptor limit.",
            ),
            unregistered: gauge(
                "call_proxy_connections_unregistered",
                "TV connections open now that have not registered.",
            ),
            bad_input: counter(
                "call_proxy_bad_input_total",
                "Connections closed for a bad preamble, bad or oversized frame, or a timeout.",
            ),
            rate_limited: counter(
                "call_proxy_rate_limited_total",
                "Requests refused by the per-connection rate limit.",
            ),
            registrations: counter(
                "call_proxy_registrations_total",
                "Successful registrations.",
            ),
            reregistrations: counter(
                "call_proxy_reregistrations_total",
                "Registrations that replaced a live session of the same user.",
            ),
            calls,
            messages_stored,
            messages_refused,
            bodies_bad,
            tvs_online: gauge(
                "call_proxy_tvs_online",
                "TVs registered on this server now.",
            ),
            live_calls: gauge("call_proxy_live_calls", "Calls ringing or in progress now."),
            db_up: gauge(
                "call_proxy_db_up",
                "1 if the database answered this scrape's query, else 0.",
            ),
            cached_waiting: gauge(
                "call_proxy_cached_calls_waiting",
                "Missed, busy and cached calls waiting to be delivered to their callee's TV.",
            ),
            mailbox_messages: gauge(
                "call_proxy_mailbox_messages",
                "Messages kept for TVs (taken or not), over every mailbox.",
            ),
            mailbox_waiting: gauge(
                "call_proxy_mailbox_waiting",
                "Messages not yet taken by their recipient's TV.",
            ),
            mailbox_bytes: gauge(
                "call_proxy_mailbox_bytes",
                "Bytes the mailboxes hold (message bodies and texts).",
            ),
            storage_full: gauge(
                "call_proxy_storage_full",
                "1 while the database's disk is full: new calls are refused (STORAGE_FULL), registrations and state changes go on.",
            ),
            registry,
        }
    }

    /// Brings the presence gauges and counters up to date (at scrape time).
    pub fn sync_presence(&self, p: &crate::registry::presence::Presence) {
        use std::sync::atomic::Ordering::Relaxed;
        let (subs, pairs) = p.sizes();
        self.presence_subscriptions
            .set(i64::try_from(subs).unwrap_or(i64::MAX));
        self.presence_pairs
            .set(i64::try_from(pairs).unwrap_or(i64::MAX));
        for (counter, now) in [
            (
                &self.presence_notifications,
                p.counts.notifications.load(Relaxed),
            ),
            (&self.presence_changes, p.counts.changes.load(Relaxed)),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
    }

    /// Counts a registration.
    pub fn registered(&self, replaced: bool) {
        self.registrations.inc();
        if replaced {
            self.reregistrations.inc();
        }
    }

    /// Counts a call that reached its final outcome.
    pub fn call_ended(&self, outcome: Outcome) {
        if FINAL_OUTCOMES.contains(&outcome) {
            self.calls.with_label_values(&[outcome.as_str()]).inc();
        }
    }

    /// Counts a stored message.
    pub fn message_stored(&self, kind: &str) {
        self.messages_stored.with_label_values(&[kind]).inc();
    }

    /// Counts a refused message.
    pub fn message_refused(&self, reason: &str) {
        self.messages_refused.with_label_values(&[reason]).inc();
    }

    /// Counts a body the media check refused.
    pub fn message_bad_media(&self, reason: &str) {
        self.bodies_bad.with_label_values(&[reason]).inc();
    }

    /// Messages refused for this reason since start.
    pub fn messages_refused_by(&self, reason: &str) -> u64 {
        self.messages_refused.with_label_values(&[reason]).get()
    }

    /// Calls that ended with this outcome since start.
    pub fn calls_by(&self, outcome: Outcome) -> u64 {
        if FINAL_OUTCOMES.contains(&outcome) {
            self.calls.with_label_values(&[outcome.as_str()]).get()
        } else {
            0
        }
    }

    /// The text exposition of every metric, plus `extra` collected now (the store's
    /// commit histogram). `cached_waiting` and the mailbox gauges are left out when the
    /// database did not answer (`db_up` is 0), rather than exported stale.
    pub fn encode(&self, extra: &[&Histogram]) -> String {
        let mut families = self.registry.gather();
        if self.db_up.get() == 0 {
            families.retain(|f| {
                f.name() != "call_proxy_cached_calls_waiting"
                    && !f.name().starts_with("call_proxy_mailbox_")
            });
        }
        for h in extra {
            families.extend(prometheus::core::Collector::collect(*h));
        }
        let mut out = Vec::new();
        match TextEncoder::new().encode(&families, &mut out) {
            Ok(()) => String::from_utf8(out).unwrap_or_default(),
            Err(e) => format!("# cannot encode the metrics: {e}\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_metric_is_exported_once_in_the_text_format() {
        let m = Metrics::new();
        m.registered(true);
        m.call_ended(Outcome::Cached);
        m.call_ended(Outcome::Ringing);
        m.db_up.set(1);
        let h = latency_histogram("lat_seconds", "Latency.");
        h.observe(0.0005); // le 0.0005 (bounds are inclusive)
        h.observe(0.000501); // le 0.001
        h.observe(10.0); // only +Inf
        let text = m.encode(&[&h]);
        assert!(
            text.contains(
                "# TYPE call_proxy_registrations_total counter\ncall_proxy_registrations_total 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("call_proxy_reregistrations_total 1\n"));
        for name in [
            "call_proxy_accept_errors_total 0\n",
            "call_proxy_connections_shed_total 0\n",
            "call_proxy_registrations_refused_per_ip_total 0\n",
            "call_proxy_flood_closed_total 0\n",
            "call_proxy_rate_limited_dropped_total 0\n",
            "call_proxy_accounted_control_in_bytes_total 0\n",
            "call_proxy_usage_write_failures_total 0\n",
            "call_proxy_connection_limit 0\n",
            "call_proxy_connections_unregistered 0\n",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert!(text.contains("call_proxy_calls_total{outcome=\"cached\"} 1\n"));
        assert!(text.contains("call_proxy_calls_total{outcome=\"busy\"} 0\n"));
        assert!(!text.contains("outcome=\"ringing\""));
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_bucket{le=\"0.001\"} 2\n"));
        assert!(text.contains("lat_seconds_bucket{le=\"2.5\"} 2\n"));
        assert!(text.contains("lat_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("lat_seconds_count 3\n"));
        assert!(text.contains("# TYPE call_proxy_cached_calls_waiting gauge"));
        m.db_up.set(0);
        assert!(!m.encode(&[]).contains("call_proxy_cached_calls_waiting"));
        assert_eq!(m.calls_by(Outcome::Cached), 1);
        assert_eq!(m.calls_by(Outcome::Ringing), 0);
    }
}
