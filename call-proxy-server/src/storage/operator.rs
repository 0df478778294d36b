//! Operator queries on the user management database, backend-neutral: the call log
//! with filters and stable newest-first pages, the users table, and summary statistics,
//! behind the [`OperatorStore`] interface. Read-only. The admin HTTP API of a running
//! server and the operator CLI (on the database itself, which works while the server
//! runs and when it is down) both read through it; each backend implements it beside
//! its [`super::Store`] (SQLite: [`super::sqlite::operator`]).

use std::future::Future;

use shared_proto::{CallId, UnixMillis, UserId};

use super::{Outcome, StoreError};

/// Which calls, by what happened to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeFilter {
    /// Answered calls.
    Answered,
    /// Rang and was not answered.
    Missed,
    /// Rejected by the callee.
    Rejected,
    /// The callee was in another call.
    Busy,
    /// The callee was off when called.
    Cached,
    /// Missed, busy or cached and not yet shown on the callee's TV.
    Undelivered,
    /// Missed, busy or cached and shown on the callee's TV.
    Delivered,
}

impl OutcomeFilter {
    /// The name operators type (`--outcome`, `?outcome=`); parses back to the same filter.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeFilter::Answered => "answered",
            OutcomeFilter::Missed => "missed",
            OutcomeFilter::Rejected => "rejected",
            OutcomeFilter::Busy => "busy",
            OutcomeFilter::Cached => "cached",
            OutcomeFilter::Undelivered => "cached-undelivered",
            OutcomeFilter::Delivered => "delivered",
        }
    }
}

/// The calls an [`OutcomeFilter`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Calls with this outcome.
    Outcome(Outcome),
    /// Calls of the missed kinds ([`super::MISSED_KINDS`]), delivered (`true`) or not.
    MissedKinds {
        /// Shown on the callee's TV already.
        delivered: bool,
    },
}

impl OutcomeFilter {
    /// The calls this filter selects.
    pub fn selection(self) -> Selection {
        match self {
            OutcomeFilter::Answered => Selection::Outcome(Outcome::Answered),
            OutcomeFilter::Missed => Selection::Outcome(Outcome::Missed),
            OutcomeFilter::Rejected => Selection::Outcome(Outcome::Rejected),
            OutcomeFilter::Busy => Selection::Outcome(Outcome::Busy),
            OutcomeFilter::Cached => Selection::Outcome(Outcome::Cached),
            OutcomeFilter::Undelivered => Selection::MissedKinds { delivered: false },
            OutcomeFilter::Delivered => Selection::MissedKinds { delivered: true },
        }
    }
}

/// The largest page an operator query returns (call log and users), from the CLI or
/// the admin API.
pub const MAX_PAGE: usize = 10_000;

impl std::str::FromStr for OutcomeFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "answered" => OutcomeFilter::Answered,
            "missed" => OutcomeFilter::Missed,
            "rejected" => OutcomeFilter::Rejected,
            "busy" => OutcomeFilter::Busy,
            "cached" => OutcomeFilter::Cached,
            "undelivered" | "cached-undelivered" => OutcomeFilter::Undelivered,
            "delivered" => OutcomeFilter::Delivered,
            other => {
                return Err(format!(
                    "unknown outcome {other:?}: use answered, missed, rejected, busy, cached, undelivered or delivered"
                ))
            }
        })
    }
}

/// A call-log query. Results are newest first; `before` continues after the last id of
/// the previous page, so pages stay stable while new calls arrive.
#[derive(Debug, Clone, Default)]
pub struct CallQuery {
    /// Calls placed by this user.
    pub caller: Option<UserId>,
    /// Calls to this user.
    pub callee: Option<UserId>,
    /// Calls with this user on either side.
    pub party: Option<UserId>,
    /// Placed at or after (ms since the epoch).
    pub since_ms: Option<UnixMillis>,
    /// Placed before (ms since the epoch).
    pub until_ms: Option<UnixMillis>,
    /// What happened to them.
    pub outcome: Option<OutcomeFilter>,
    /// Only calls with a smaller id (the previous page's last id).
    pub before: Option<CallId>,
    /// Page size.
    pub limit: usize,
}

/// A parameter of a call-log query, for the backend to bind in its own types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlArg {
    /// An id or a count.
    Int(i64),
    /// A text value.
    Text(String),
    /// A time, compared with the `call_date` column.
    Time(UnixMillis),
}

/// The `WHERE` conditions, order and limit of a call-log page (appended to the backend's
/// `SELECT … FROM user_call WHERE true`), and their parameters in order: the one reading
/// of a [`CallQuery`] every SQL backend uses. `placeholder(n, arg)` writes the `n`th
/// parameter (from 1) as the backend spells it (`?n`, `$n::bigint`, `tvcall_ts($n)`, …).
/// With a party, the union of the two lookups on (user_id, call_date) and
/// (otheruser_id, call_date), each narrowed to the time range inside its index, so only
/// the calls in range are read from the table.
pub fn call_log_conditions(
    q: &CallQuery,
    placeholder: impl Fn(usize, &SqlArg) -> String,
) -> (String, Vec<SqlArg>) {
    let mut sql = String::new();
    let mut args: Vec<SqlArg> = Vec::new();
    let arg = |args: &mut Vec<SqlArg>, v: SqlArg| {
        args.push(v);
        placeholder(args.len(), &args[args.len() - 1])
    };
    if let Some(u) = q.caller {
        let p = arg(&mut args, SqlArg::Int(u as i64));
        sql.push_str(&format!(" AND user_id = {p}"));
    }
    if let Some(u) = q.callee {
        let p = arg(&mut args, SqlArg::Int(u as i64));
        sql.push_str(&format!(" AND otheruser_id = {p}"));
    }
    let mut range = String::new();
    if let Some(t) = q.since_ms {
        let p = arg(&mut args, SqlArg::Time(t));
        range.push_str(&format!(" AND call_date >= {p}"));
    }
    if let Some(t) = q.until_ms {
        let p = arg(&mut args, SqlArg::Time(t));
        range.push_str(&format!(" AND call_date < {p}"));
    }
    sql.push_str(&range);
    if let Some(u) = q.party {
        let p = arg(&mut args, SqlArg::Int(u as i64));
        sql.push_str(&format!(
            " AND id IN (SELECT id FROM user_call WHERE user_id = {p}{range}
                         UNION ALL SELECT id FROM user_call WHERE otheruser_id = {p}{range})"
        ));
    }
    if let Some(before) = q.before {
        let p = arg(
            &mut args,
            SqlArg::Int(i64::try_from(before).unwrap_or(i64::MAX)),
        );
        sql.push_str(&format!(" AND id < {p}"));
    }
    match q.outcome.map(|o| o.selection()) {
        None => {}
        Some(Selection::MissedKinds { delivered }) => sql.push_str(&format!(
            " AND delivered = {} AND {}",
            u8::from(delivered),
            super::MISSED_KINDS_SQL
        )),
        Some(Selection::Outcome(outcome)) => {
            let p = arg(&mut args, SqlArg::Text(outcome.as_str().into()));
            sql.push_str(&format!(" AND outcome = {p}"));
        }
    }
    let p = arg(
        &mut args,
        SqlArg::Int(i64::try_from(q.limit).unwrap_or(i64::MAX)),
    );
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {p}"));
    (sql, args)
}

/// One call of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// The call (`user_call` row id).
    pub id: CallId,
    /// Caller (`user_id`).
    pub user_id: UserId,
    /// Callee (`otheruser_id`).
    pub otheruser_id: UserId,
    /// When it was placed, RFC 3339 UTC.
    pub call_date: String,
    /// `ringing`, `answered`, `missed`, `rejected`, `busy` or `cached`.
    pub outcome: String,
    /// Whether the callee's TV has been shown it (answered/rejected calls count as shown).
    pub delivered: bool,
    /// When it was answered.
    pub answered_at: Option<String>,
    /// When it ended.
    pub ended_at: Option<String>,
    /// When the callee's TV acknowledged it.
    pub delivered_at: Option<String>,
    /// The caller's IP.
    pub caller_ip: String,
}

/// One user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// `user_id`.
    pub user_id: UserId,
    /// `user_ip`.
    pub user_ip: String,
    /// `user_netstate`: 1 online, 0 offline.
    pub user_netstate: u8,
    /// UDP media port.
    pub media_port: u16,
    /// Last registration or disconnect.
    pub last_seen: Option<String>,
    /// The agent's build.
    pub agent_version: String,
    /// The phone number on file (`user_phone`), E.164.
    pub phone: Option<String>,
}

/// An alarm raised for the operator (`operator_alarm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmRecord {
    /// Its number, for clearing it.
    pub id: u64,
    /// The user it is about.
    pub user_id: UserId,
    /// When it was raised, RFC 3339 UTC.
    pub raised_at: String,
    /// What happened, for people.
    pub reason: String,
    /// How many failures led to it.
    pub count: u32,
    /// When the operator cleared it (`None`: still open).
    pub cleared_at: Option<String>,
}

/// Which messages of the message log (never their contents). Newest first; `before`
/// continues after the last id of the previous page.
#[derive(Debug, Clone, Default)]
pub struct MessageLogQuery {
    /// Left by this user.
    pub sender: Option<UserId>,
    /// Left for this user.
    pub recipient: Option<UserId>,
    /// With this user on either side.
    pub party: Option<UserId>,
    /// Of this kind ([`shared_proto::MessageKind`] number).
    pub kind: Option<u8>,
    /// Taken by the recipient's TV (`true`) or still waiting (`false`).
    pub delivered: Option<bool>,
    /// Only messages with a smaller id (the previous page's last id).
    pub before: Option<u64>,
    /// Page size.
    pub limit: usize,
}

/// One message of the log: who, when, what kind and how big, and whether it was taken;
/// never its text, its body or where the body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// The message.
    pub id: u64,
    /// Who left it.
    pub user_id: UserId,
    /// Who it is for.
    pub otheruser_id: UserId,
    /// `text`, `voice`, `picture` or `video`.
    pub kind: String,
    /// Bytes counted against the mailbox (body and text).
    pub size: u64,
    /// The body's MIME type.
    pub mime: Option<String>,
    /// Length of a voice message or clip.
    pub duration_ms: Option<u32>,
    /// Width of a picture or clip.
    pub width: Option<u32>,
    /// Height of a picture or clip.
    pub height: Option<u32>,
    /// When it was stored, RFC 3339 UTC.
    pub sent_at: String,
    /// Whether the recipient's TV took it.
    pub delivered: bool,
    /// When it did.
    pub delivered_at: Option<String>,
}

/// Messages kept on the server, over every mailbox or one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailboxTotals {
    /// Messages kept.
    pub messages: u64,
    /// Of them, not yet taken by their recipient's TV.
    pub waiting: u64,
    /// Bytes (bodies and texts) kept.
    pub bytes: u64,
}

/// The `WHERE` conditions, order and limit of a message-log page (appended to the
/// backend's `SELECT … FROM user_message WHERE true`), with their parameters, like
/// [`call_log_conditions`].
pub fn message_log_conditions(
    q: &MessageLogQuery,
    placeholder: impl Fn(usize, &SqlArg) -> String,
) -> (String, Vec<SqlArg>) {
    let mut sql = String::new();
    let mut args: Vec<SqlArg> = Vec::new();
    let mut arg = |v: SqlArg| {
        args.push(v);
        placeholder(args.len(), &args[args.len() - 1])
    };
    if let Some(u) = q.sender {
        sql.push_str(&format!(" AND user_id = {}", arg(SqlArg::Int(u as i64))));
    }
    if let Some(u) = q.recipient {
        sql.push_str(&format!(
            " AND otheruser_id = {}",
            arg(SqlArg::Int(u as i64))
        ));
    }
    if let Some(u) = q.party {
        let p = arg(SqlArg::Int(u as i64));
        sql.push_str(&format!(" AND (user_id = {p} OR otheruser_id = {p})"));
    }
    if let Some(k) = q.kind {
        sql.push_str(&format!(" AND kind = {}", arg(SqlArg::Int(i64::from(k)))));
    }
    if let Some(d) = q.delivered {
        sql.push_str(&format!(" AND delivered = {}", u8::from(d)));
    }
    if let Some(before) = q.before {
        let p = arg(SqlArg::Int(i64::try_from(before).unwrap_or(i64::MAX)));
        sql.push_str(&format!(" AND message_id < {p}"));
    }
    let p = arg(SqlArg::Int(i64::try_from(q.limit).unwrap_or(i64::MAX)));
    sql.push_str(&format!(" ORDER BY message_id DESC LIMIT {p}"));
    (sql, args)
}

/// Service statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Users known.
    pub users: u64,
    /// TVs online now.
    pub online: u64,
    /// Calls placed in the last hour.
    pub calls_last_hour: u64,
    /// Calls placed in the last 24 hours.
    pub calls_last_day: u64,
    /// Missed/busy/cached calls waiting to be shown on their callee's TV.
    pub cached_waiting: u64,
    /// Median delay from call to delivery, over calls delivered in the last 24 hours.
    pub delivery_delay_p50_s: Option<f64>,
    /// Largest such delay.
    pub delivery_delay_max_s: Option<f64>,
    /// Messages kept, waiting and bytes, over every mailbox.
    pub mailboxes: MailboxTotals,
}

/// Which usage rows (traffic accounting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// One account only.
    pub user: Option<UserId>,
    /// One period only (its key: `2026-12`, `2026-W49`, `2026-12-02`).
    pub period: Option<String>,
    /// At most this many rows.
    pub limit: usize,
}

/// An account's usage in one period, with its allowance (flat, for tables and CSV).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// The account.
    pub user_id: UserId,
    /// The period's key.
    pub period: String,
    /// Sessions started.
    pub sessions: u64,
    /// Time registered, in milliseconds.
    pub session_ms: u64,
    /// Control-link bytes from the TV.
    pub control_in: u64,
    /// Control-link bytes to the TV.
    pub control_out: u64,
    /// Message bodies.
    pub body_bytes: u64,
    /// Media relayed by the TURN server.
    pub relay_bytes: u64,
    /// The bytes counted against its allowance (all of the byte counters).
    pub bytes: u64,
    /// Its allowance per period (`None`: not limited).
    pub allowance: Option<u64>,
    /// What is left of it this period (`None`: not limited).
    pub remaining: Option<u64>,
    /// First usage reported in the period, RFC 3339 UTC.
    pub first_at: String,
    /// Last usage reported in the period.
    pub last_at: String,
}

impl UsageRecord {
    /// A row, with its byte total and remaining allowance worked out.
    pub fn new(
        user_id: UserId,
        period: String,
        u: crate::accounting::Usage,
        first_at: String,
        last_at: String,
        allowance: Option<u64>,
    ) -> UsageRecord {
        let bytes = u.bytes();
        UsageRecord {
            user_id,
            period,
            sessions: u.sessions,
            session_ms: u.session_ms,
            control_in: u.control_in,
            control_out: u.control_out,
            body_bytes: u.body_bytes,
            relay_bytes: u.relay_bytes,
            bytes,
            allowance,
            remaining: allowance.map(|a| a.saturating_sub(bytes)),
            first_at,
            last_at,
        }
    }
}

/// The operator's reads, as the admin API and the operator CLI use them. Every method
/// reads committed data only and never waits for the server's writes.
pub trait OperatorStore: Clone + Send + Sync + 'static {
    /// A page of the call log (see [`CallQuery`]).
    fn calls(
        &self,
        q: CallQuery,
    ) -> impl Future<Output = Result<Vec<CallRecord>, StoreError>> + Send;

    /// Users, by id; only online ones if asked.
    fn users(
        &self,
        online_only: bool,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<UserRecord>, StoreError>> + Send;

    /// One user, if it exists.
    fn user(
        &self,
        id: UserId,
    ) -> impl Future<Output = Result<Option<UserRecord>, StoreError>> + Send;

    /// Statistics as of `now_ms`.
    fn stats(&self, now_ms: UnixMillis) -> impl Future<Output = Result<Stats, StoreError>> + Send;

    /// A trivial read of the database: is it reachable?
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Missed calls waiting to be shown on their callee's TV (the offline cache's depth).
    fn cached_waiting(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A page of the message log (see [`MessageLogQuery`]); never the contents.
    fn messages(
        &self,
        q: MessageLogQuery,
    ) -> impl Future<Output = Result<Vec<MessageRecord>, StoreError>> + Send;

    /// Messages kept over every mailbox (`None`) or `user`'s.
    fn mailbox_totals(
        &self,
        user: Option<UserId>,
    ) -> impl Future<Output = Result<MailboxTotals, StoreError>> + Send;

    /// Approves the enrollment with this code (stored form, see
    /// [`crate::storage::enroll::normalise_code`]) for `user`; with `replace`, a TV the user
    /// has already is revoked. The one kind of write besides [`OperatorStore::revoke`]: a
    /// single transaction on its own connection, never through the server's writer.
    fn approve(
        &self,
        code: String,
        user: UserId,
        replace: bool,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<crate::storage::enroll::Approval, StoreError>> + Send;

    /// Refuses the pending enrollment with this code (stored form): the TV's next poll
    /// is told, and the code can no longer be approved.
    fn refuse(
        &self,
        code: String,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<crate::storage::enroll::Refusal, StoreError>> + Send;

    /// Withdraws `user`'s TV credential (`false`: it had none). The server cuts the
    /// TV's live session off within a second.
    fn revoke(
        &self,
        user: UserId,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The newest enrollments, at most `limit`.
    fn enrollments(
        &self,
        now_ms: UnixMillis,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<crate::storage::enroll::EnrollmentRecord>, StoreError>> + Send;

    /// Traffic accounting: usage rows, newest period first (see [`UsageQuery`]).
    fn usage(
        &self,
        q: UsageQuery,
    ) -> impl Future<Output = Result<Vec<UsageRecord>, StoreError>> + Send;

    /// Sets `user`'s allowance per period to `bytes` (`None`: not limited). A write like
    /// [`OperatorStore::revoke`]: its own transaction, never through the server's writer;
    /// the dispatcher applies it at the TV's next assignment.
    fn set_allowance(
        &self,
        user: UserId,
        bytes: Option<u64>,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sets (`Some`, an E.164 number checked by the caller) or clears (`None`) `user`'s
    /// phone number on file; `false`: no such user (nothing written). A write like
    /// [`OperatorStore::revoke`]: its own transaction, never through the server's writer.
    fn set_phone(
        &self,
        user: UserId,
        phone: Option<String>,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The newest alarms first, at most `limit`: only open ones unless `include_cleared`.
    fn alarms(
        &self,
        include_cleared: bool,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AlarmRecord>, StoreError>> + Send;

    /// How many alarms are open (not cleared): the `call_proxy_alarms_open` gauge.
    fn open_alarms(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Clears alarm `id`; `false`: no such alarm, or cleared already. A write like
    /// [`OperatorStore::revoke`].
    fn clear_alarm(
        &self,
        id: u64,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_filters_parse_and_explain_bad_ones() {
        assert_eq!("cached-undelivered".parse(), Ok(OutcomeFilter::Undelivered));
        assert_eq!("answered".parse(), Ok(OutcomeFilter::Answered));
        let err = "lost".parse::<OutcomeFilter>().unwrap_err();
        assert!(err.contains("answered, missed"), "{err}");
        for f in [
            OutcomeFilter::Answered,
            OutcomeFilter::Missed,
            OutcomeFilter::Rejected,
            OutcomeFilter::Busy,
            OutcomeFilter::Cached,
            OutcomeFilter::Undelivered,
            OutcomeFilter::Delivered,
        ] {
            assert_eq!(f.as_str().parse(), Ok(f));
        }
    }
}
