//! Traffic accounting (issue 18, section D): what each account used per period, as a
//! node sees it, reported to the database for the dispatcher and the operator.
//!
//! A node accounts, per account (user) and period (UTC calendar month by default;
//! [`Period`]): sessions started, session time, bytes in and out on the control link
//! (every byte of the framed protocol inside TLS, preamble included, counted by
//! [`Counted`]), and two counters kept for what later parts carry (message bodies, media
//! relayed by the TURN server when it reports it). Connections hand their deltas to the
//! node's [`Accountant`] as they go (at most every [`crate::Config::accounting_flush_ms`],
//! and when they end); the accountant's flusher writes everything pending in one
//! database write per interval ([`crate::storage::Store::add_usage`]), adding to
//! `account_usage` rows. A write that fails is kept and tried again at the next interval.
//!
//! Not a durability promise like a call's: a node killed outright loses what its TVs
//! used since they last handed it over and the node last wrote, and a write whose commit
//! succeeded but whose answer was lost is retried and counted twice. The dispatcher
//! compares the total with the account's allowance (`account_allowance`, none: not
//! limited) before it assigns a node.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use shared_proto::{UnixMillis, UserId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The accounting period: calendar months (the default), ISO weeks or days, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// `2026-12`.
    #[default]
    Month,
    /// `2026-W49` (ISO 8601 week).
    Week,
    /// `2026-12-02`.
    Day,
}

impl Period {
    /// The key of the period holding `at_ms` (Unix ms, UTC), as stored in
    /// `account_usage.period`.
    pub fn key(self, at_ms: UnixMillis) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        match self {
            Period::Month => format!("{:04}-{:02}", t.year(), u8::from(t.month())),
            Period::Week => {
                let (y, w, _) = t.to_iso_week_date();
                format!("{y:04}-W{w:02}")
            }
            Period::Day => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        }
    }

    /// Its name in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Month => "month",
            Period::Week => "week",
            Period::Day => "day",
        }
    }
}

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "month" => Ok(Period::Month),
            "week" => Ok(Period::Week),
            "day" => Ok(Period::Day),
            other => Err(format!(
                "unknown accounting period {other:?}: month, week or day"
            )),
        }
    }
}

/// What an account used (a delta to add, or a total).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// Sessions (registrations) started.
    pub sessions: u64,
    /// Time registered, in milliseconds.
    pub session_ms: u64,
    /// Bytes the TV sent on its control link.
    pub control_in: u64,
    /// Bytes the node sent the TV on its control link.
    pub control_out: u64,
    /// Message bodies stored or fetched (the messages issue).
    pub body_bytes: u64,
    /// Media bytes the TURN relay reported for the account's calls (the reach issue).
    pub relay_bytes: u64,
}

impl Usage {
    /// Adds `other` to this.
    pub fn add(&mut self, other: &Usage) {
        self.sessions = self.sessions.saturating_add(other.sessions);
        self.session_ms = self.session_ms.saturating_add(other.session_ms);
        self.control_in = self.control_in.saturating_add(other.control_in);
        self.control_out = self.control_out.saturating_add(other.control_out);
        self.body_bytes = self.body_bytes.saturating_add(other.body_bytes);
        self.relay_bytes = self.relay_bytes.saturating_add(other.relay_bytes);
    }

    /// The bytes that count against an allowance: everything carried for the account.
    pub fn bytes(&self) -> u64 {
        self.control_in
            .saturating_add(self.control_out)
            .saturating_add(self.body_bytes)
            .saturating_add(self.relay_bytes)
    }

    /// Nothing used.
    pub fn is_empty(&self) -> bool {
        *self == Usage::default()
    }
}

/// One row to add to `account_usage`: an account's usage in a period, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    /// The account.
    pub user_id: UserId,
    /// The period's key ([`Period::key`]).
    pub period: String,
    /// What to add.
    pub usage: Usage,
    /// When the last of it was used (Unix ms).
    pub at_ms: UnixMillis,
}

/// Usage not yet written, per (account, period key): what was used and when last.
type Pending = HashMap<(UserId, String), (Usage, UnixMillis)>;

/// A node's usage not yet written, per account and period.
#[derive(Debug, Default)]
pub struct Accountant {
    period: Period,
    pending: Mutex<Pending>,
}

/// Adds `usage` at `at_ms` to `key`'s pending row.
fn merge(pending: &mut Pending, key: (UserId, String), usage: &Usage, at_ms: UnixMillis) {
    let entry = pending.entry(key).or_insert((Usage::default(), at_ms));
    entry.0.add(usage);
    entry.1 = entry.1.max(at_ms);
}

impl Accountant {
    /// An accountant for periods of `period`.
    pub fn new(period: Period) -> Accountant {
        Accountant {
            period,
            pending: Mutex::default(),
        }
    }

    /// Its period.
    pub fn period(&self) -> Period {
        self.period
    }

    /// Notes `usage` by `user` at `at_ms`.
    pub fn note(&self, user: UserId, usage: &Usage, at_ms: UnixMillis) {
        if usage.is_empty() {
            return;
        }
        merge(
            &mut self.lock(),
            (user, self.period.key(at_ms)),
            usage,
            at_ms,
        );
    }

    /// The pending rows (a poisoned lock still holds valid counts).
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes everything pending, as rows to add.
    pub fn take(&self) -> Vec<UsageDelta> {
        let drained = std::mem::take(&mut *self.lock());
        drained
            .into_iter()
            .map(|((user_id, period), (usage, at_ms))| UsageDelta {
                user_id,
                period,
                usage,
                at_ms,
            })
            .collect()
    }

    /// Puts back rows whose write failed, to be written with the next ones.
    pub fn restore(&self, rows: Vec<UsageDelta>) {
        let mut pending = self.lock();
        for r in rows {
            merge(&mut pending, (r.user_id, r.period), &r.usage, r.at_ms);
        }
    }

    /// Accounts pending.
    pub fn pending_len(&self) -> usize {
        self.lock().len()
    }
}

/// A byte stream that counts what passes through it.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    read: u64,
    written: u64,
}

impl<T> Counted<T> {
    /// Counts the bytes read from and written to `inner`.
    pub fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }

    /// Bytes read and written so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.read, self.written)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.read = self.read.saturating_add(n);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written = self.written.saturating_add(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What one connection reported so far, to report only what is new.
#[derive(Debug, Clone, Copy)]
pub struct Reported {
    /// The account the connection registered as (`None`: not yet; nothing is
    /// accounted to anyone before).
    pub user: Option<UserId>,
    /// Bytes read and written when last reported.
    pub bytes: (u64, u64),
    /// When last reported.
    pub at: tokio::time::Instant,
    /// A transfer link (messages): its bytes are message bodies' (`body_bytes`), and
    /// its time is no session's.
    pub transfer: bool,
}

impl Reported {
    /// Nothing reported yet, as of `at`.
    pub fn new(at: tokio::time::Instant) -> Reported {
        Reported {
            user: None,
            bytes: (0, 0),
            at,
            transfer: false,
        }
    }

    /// The usage since the last report (time registered, bytes) given the stream's
    /// `counts` now, and marks it reported.
    pub fn since(&mut self, counts: (u64, u64), now: tokio::time::Instant) -> Usage {
        if self.transfer {
            let usage = Usage {
                body_bytes: counts
                    .0
                    .saturating_sub(self.bytes.0)
                    .saturating_add(counts.1.saturating_sub(self.bytes.1)),
                ..Usage::default()
            };
            self.bytes = counts;
            self.at = now;
            return usage;
        }
        let usage = Usage {
            sessions: 0,
            session_ms: u64::try_from(now.saturating_duration_since(self.at).as_millis())
                .unwrap_or(u64::MAX),
            control_in: counts.0.saturating_sub(self.bytes.0),
            control_out: counts.1.saturating_sub(self.bytes.1),
            body_bytes: 0,
            relay_bytes: 0,
        };
        self.bytes = counts;
        self.at = now;
        usage
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn periods_are_utc_calendar_months_weeks_and_days() {
        // 2026-12-02T04:04:03Z
        let at = 1_796_184_243_000;
        assert_eq!(Period::Month.key(at), "2026-12");
        assert_eq!(Period::Week.key(at), "2026-W49");
        assert_eq!(Period::Day.key(at), "2026-12-02");
        // The last millisecond of November is November's.
        let end_nov = 1_796_083_200_000 - 1;
        assert_eq!(Period::Month.key(end_nov), "2026-11");
        assert_eq!(Period::Month.key(end_nov + 1), "2026-12");
        assert_eq!("week".parse::<Period>().unwrap(), Period::Week);
        assert!("year".parse::<Period>().is_err());
    }

    #[test]
    fn usage_adds_up_per_account_and_period_and_failed_writes_come_back() {
        let a = Accountant::new(Period::Month);
        let u = Usage {
            control_in: 10,
            control_out: 20,
            ..Usage::default()
        };
        a.note(7, &u, 1_796_184_243_000);
        a.note(7, &u, 1_796_184_244_000);
        a.note(8, &u, 1_796_184_243_000);
        a.note(9, &Usage::default(), 1_796_184_243_000);
        // Another month: another row.
        a.note(7, &u, 1_796_083_200_000 - 1);
        let mut rows = a.take();
        rows.sort_by(|x, y| (x.user_id, &x.period).cmp(&(y.user_id, &y.period)));
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[1].user_id, rows[1].period.as_str()), (7, "2026-12"));
        assert_eq!(rows[1].usage.bytes(), 60);
        assert_eq!(rows[1].at_ms, 1_796_184_244_000);
        assert_eq!(a.pending_len(), 0);
        a.note(7, &u, 1_796_184_245_000);
        a.restore(rows);
        let again = a.take();
        let dec = again
            .iter()
            .find(|r| r.user_id == 7 && r.period == "2026-12")
            .unwrap();
        assert_eq!(dec.usage.bytes(), 90);
        assert_eq!(again.len(), 3);
    }

    #[tokio::test]
    async fn a_counted_stream_counts_both_ways_and_reports_only_what_is_new() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Counted::new(a);
        c.write_all(b"hello").await.unwrap();
        b.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(c.counts(), (3, 5));
        let t0 = tokio::time::Instant::now();
        let mut r = Reported::new(t0);
        let first = r.since(c.counts(), t0 + std::time::Duration::from_millis(1500));
        assert_eq!(
            (first.control_in, first.control_out, first.session_ms),
            (3, 5, 1500)
        );
        c.write_all(b"!").await.unwrap();
        let second = r.since(c.counts(), t0 + std::time::Duration::from_millis(1600));
        assert_eq!(
            (second.control_in, second.control_out, second.session_ms),
            (0, 1, 100)
        );
    }
}
