//! The user management database, behind the [`Store`] interface the server depends on
//! and the [`operator::OperatorStore`] interface the admin API and the operator CLI read
//! through. Backend-neutral: nothing here names a database library.
//!
//! The server never sees SQL: it calls [`Store`] methods with plain row types from this
//! module. [`sqlite`] is the embedded implementation, [`postgres`] the one for
//! deployments on PostgreSQL (several nodes on one database). Each implements [`Store`]
//! and [`operator::OperatorStore`], is one variant of [`StorageBackend`], [`DbTarget`],
//! [`AnyStore`] and [`AnyOperator`], and passes the storage contract tests
//! (`tests/store_contract.rs`); the server's integration tests run on both.
//!
//! The rules every backend shares are written once, here: which outcomes are missed
//! calls ([`Outcome::is_missed_kind`], [`MISSED_KINDS`] and its SQL form
//! [`MISSED_KINDS_SQL`]), the ordering and durability of writes ([`Store`], [`Pending`]),
//! and the kinds of failure ([`StoreError`]).

pub mod enroll;
pub mod message;
pub mod operator;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use shared_proto::{CallId, IdempotencyKey, UnixMillis, UserId};
use tokio::sync::oneshot;

use crate::config::Config;
use enroll::{Approval, Credential, EnrollmentRecord, EnrollmentState, NewEnrollment, Revocation};
pub use message::{
    BodyMeta, Mailbox, MessageInsert, MessageQuery, MessageRow, NewMessage, Quota, Settle, Settled,
};
use operator::{
    CallQuery, CallRecord, MailboxTotals, MessageLogQuery, MessageRecord, OperatorStore, Stats,
    UserRecord,
};

/// What a storage call can fail with. Nothing reported as failed was acknowledged: a
/// failed write left no trace (its partial changes are rolled back), and the writes
/// queued with it are not affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or used now (missing, locked, busy, read-only,
    /// connection lost, timed out); retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database's disk (or quota) is full (`SQLITE_FULL`, `ENOSPC`).
    #[error("database disk full: {0}")]
    Full(String),
    /// The change breaks a constraint of the schema (a duplicate id, a bad value).
    #[error("database constraint violated: {0}")]
    Constraint(String),
    /// The database holds data this server cannot read (a damaged file, a bad row).
    #[error("database corrupt: {0}")]
    Corrupt(String),
    /// The store has been closed (server shutting down).
    #[error("store is closed")]
    Closed,
    /// Any other failure of the database.
    #[error("database error: {0}")]
    Other(String),
}

/// The outcomes that are missed calls: delivered to the callee's TV until acknowledged.
pub const MISSED_KINDS: [Outcome; 3] = [Outcome::Missed, Outcome::Busy, Outcome::Cached];

/// [`MISSED_KINDS`] as a condition on `user_call.outcome`, in standard SQL, for
/// `concat!` in statements of SQL backends (a unit test checks it lists exactly
/// [`MISSED_KINDS`]).
macro_rules! missed_kinds_sql {
    () => {
        "outcome IN ('missed', 'busy', 'cached')"
    };
}
pub(crate) use missed_kinds_sql;

/// [`MISSED_KINDS`] as a condition on `user_call.outcome`, in standard SQL.
pub const MISSED_KINDS_SQL: &str = missed_kinds_sql!();

/// A call record's outcome (`user_call.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Rang on an online TV; not over yet.
    Ringing,
    /// The callee answered.
    Answered,
    /// Rang and was not answered (timeout, caller gave up, a party's link was lost).
    Missed,
    /// The callee rejected it.
    Rejected,
    /// The callee was in another call.
    Busy,
    /// The callee was off; cached for its next power-on.
    Cached,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 6] = [
        Outcome::Ringing,
        Outcome::Answered,
        Outcome::Missed,
        Outcome::Rejected,
        Outcome::Busy,
        Outcome::Cached,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ringing => "ringing",
            Outcome::Answered => "answered",
            Outcome::Missed => "missed",
            Outcome::Rejected => "rejected",
            Outcome::Busy => "busy",
            Outcome::Cached => "cached",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// Whether a call with this outcome is delivered to the callee as a missed call
    /// (one of [`MISSED_KINDS`]).
    pub fn is_missed_kind(self) -> bool {
        MISSED_KINDS.contains(&self)
    }
}

/// A registration to record (flow 1).
#[derive(Debug, Clone)]
pub struct Registration {
    /// The TV's user number.
    pub user_id: UserId,
    /// The IP the server observed on the control connection.
    pub ip: IpAddr,
    /// The TV's UDP media port.
    pub media_port: u16,
    /// This session's id; a registration only wins over a stored larger one never.
    pub session_id: u64,
    /// The agent's build identifier.
    pub agent_version: String,
    /// When.
    pub at_ms: UnixMillis,
    /// Create the user if it has never been seen (off for provisioned deployments).
    pub create_unknown: bool,
}

/// What recording a registration found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterResult {
    /// Recorded online; this many cached calls wait for the TV.
    Online {
        /// Undelivered missed calls for this user.
        cached_waiting: u32,
    },
    /// Not provisioned and creation is off: nothing written.
    UnknownUser,
    /// A newer session of this user is already recorded: nothing written.
    Superseded,
}

/// A user's row, as a state query needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The user.
    pub user_id: UserId,
    /// `user_netstate = 1`.
    pub online: bool,
    /// When the server last heard of the user (registration or disconnect).
    pub last_seen_ms: Option<UnixMillis>,
}

/// What a watcher may learn of one user, read when it subscribes (presence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRow {
    /// The user asked about.
    pub user_id: UserId,
    /// `user_netstate = 1`; `None` when the user has no `user_property` row (unknown).
    pub online: Option<bool>,
    /// When the server last heard of the user.
    pub last_seen_ms: Option<UnixMillis>,
    /// The user has "hide my state" on.
    pub hidden: bool,
    /// The watcher may see this user's state: not hidden, and the watcher is in the
    /// user's address book (`presence_contact`) or the user has called the watcher
    /// (a `user_call` row from the user to the watcher).
    pub allowed: bool,
    /// A phone number is on file for the user (`user_phone`): offline shows as mobile.
    pub has_phone: bool,
}

/// A TV's own presence settings as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceBook {
    /// Its address book (who may see its state), ascending, no duplicates.
    pub contacts: Vec<UserId>,
    /// "Hide my state".
    pub hidden: bool,
}

/// An alarm raised for the operator (presence recovery over its threshold, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlarm {
    /// The user it is about.
    pub user_id: UserId,
    /// When it was raised.
    pub at_ms: UnixMillis,
    /// What happened, for people.
    pub reason: String,
    /// How many failures led to it (recovery messages within the window).
    pub count: u32,
}

/// `ids` as a presence list: ascending, without duplicates, each a valid user id, at
/// most [`shared_proto::MAX_SUBSCRIPTIONS`] of them ([`StoreError::Other`] naming `what`
/// otherwise). Every backend reads and writes presence lists through it.
pub fn presence_list(ids: Vec<UserId>, what: &str) -> Result<Vec<UserId>, StoreError> {
    let mut ids = ids;
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > shared_proto::MAX_SUBSCRIPTIONS {
        return Err(StoreError::Other(format!(
            "{what}: at most {} users, not {}",
            shared_proto::MAX_SUBSCRIPTIONS,
            ids.len()
        )));
    }
    if let Some(bad) = ids.iter().find(|&&id| !shared_proto::valid_user_id(id)) {
        return Err(StoreError::Other(format!(
            "{what}: user {bad} is out of range"
        )));
    }
    Ok(ids)
}

/// A new call record.
#[derive(Debug, Clone)]
pub struct NewCall {
    /// Id pre-allocated by the server.
    pub id: CallId,
    /// Caller (`user_call.user_id`).
    pub caller: UserId,
    /// Callee (`user_call.otheruser_id`).
    pub callee: UserId,
    /// `user_call.call_date`.
    pub at_ms: UnixMillis,
    /// Outcome at the time of recording.
    pub outcome: Outcome,
    /// The caller's IP, for the log.
    pub caller_ip: IpAddr,
}

/// A call recorded under a caller's idempotency key: what a retry of that dial is
/// answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedCall {
    /// The call's id.
    pub id: CallId,
    /// Who it called.
    pub callee: UserId,
    /// Its outcome as recorded now (a ringing call's row changes as the call goes on).
    pub outcome: Outcome,
    /// When it was placed.
    pub at_ms: UnixMillis,
}

/// Whether the callee of a new call exists, or the call is recorded already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertResult {
    /// Recorded durably.
    Recorded {
        /// For a missed kind: undelivered missed calls for the callee, this one included
        /// (else 0).
        callee_waiting: u32,
    },
    /// No such callee: nothing written.
    UnknownCallee,
    /// The caller used this idempotency key for this call within
    /// [`shared_proto::KEY_LIFETIME_MS`]: nothing written.
    AlreadyRecorded(KeyedCall),
}

/// A change of a live call's record: answered, or ended.
#[derive(Debug, Clone)]
pub struct CallEnd {
    /// The call.
    pub id: CallId,
    /// Final outcome.
    pub outcome: Outcome,
    /// When it was answered, if it was.
    pub answered_at_ms: Option<UnixMillis>,
    /// When it ended; `None` for an answered call still in progress.
    pub ended_at_ms: Option<UnixMillis>,
    /// When this update happens (the delivery time of answered and rejected calls).
    pub at_ms: UnixMillis,
}

/// An undelivered missed call, with its caller's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRow {
    /// The call.
    pub id: CallId,
    /// Caller.
    pub caller: UserId,
    /// Callee.
    pub callee: UserId,
    /// When it was placed.
    pub at_ms: UnixMillis,
    /// Missed, busy or cached.
    pub outcome: Outcome,
    /// The caller's state now: `None` if the caller has no row.
    pub caller_online: Option<bool>,
}

/// The largest ids in use, read when the server starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watermarks {
    /// Largest session id ever recorded.
    pub max_session_id: u64,
    /// Largest call id ever recorded.
    pub max_call_id: CallId,
    /// Largest revocation number so far: the server follows revocations after it.
    pub max_revocation_seq: i64,
    /// New call ids step by this much (0 or 1: every id; several nodes on one database
    /// each take every `stride`-th id, from their own `call_id_offset`, so none collide).
    pub call_id_stride: u64,
    /// This node's residue of call ids modulo `call_id_stride`.
    pub call_id_offset: u64,
}

impl Watermarks {
    /// The first call id this store may hand out: above every id recorded, and this
    /// node's own modulo the stride.
    pub fn first_call_id(&self) -> CallId {
        let stride = self.call_id_stride.max(1);
        let offset = self.call_id_offset % stride;
        let above = self.max_call_id.saturating_add(1);
        // The smallest id >= above with id % stride == offset.
        let base = above - above % stride + offset;
        if base >= above {
            base
        } else {
            base.saturating_add(stride)
        }
    }
}

/// What another node on the same database tells this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// `user` registered on another node with this (newer) session: its session here,
    /// if older, is replaced (`SESSION_REPLACED`).
    Replaced {
        /// The TV's user.
        user: UserId,
        /// Its new session, on the other node.
        session_id: u64,
    },
    /// A message from another node (JSON, read by [`crate::cluster`]).
    Message(String),
    /// The node in this slot stopped or its lease ran out: calls with its TVs are over.
    NodeGone {
        /// Its slot.
        slot: u8,
    },
}

/// A queued write's result, available once the write is durably committed (or has
/// failed). The write itself was queued when the [`Store`] method returned this:
/// awaiting it only waits for durability, and dropping it does not cancel the write.
#[must_use = "the write is queued either way: await it to know it is durable, or drop it explicitly"]
#[derive(Debug)]
pub struct Pending<T> {
    state: PendingState<T>,
}

#[derive(Debug)]
enum PendingState<T> {
    /// Queued: the backend answers through the channel.
    Queued(oneshot::Receiver<Result<T, StoreError>>),
    /// Known already (a store that refused the write); taken by the first poll.
    Ready(Option<Result<T, StoreError>>),
}

/// The backend's side of a [`Pending`]: completes it once the write's fate is known.
/// Dropping it unanswered completes the [`Pending`] with [`StoreError::Closed`].
#[derive(Debug)]
pub struct Completion<T>(oneshot::Sender<Result<T, StoreError>>);

impl<T> Completion<T> {
    /// Answers the write's caller (who may have stopped waiting: that is fine).
    pub fn complete(self, result: Result<T, StoreError>) {
        let _ = self.0.send(result);
    }
}

impl<T> Pending<T> {
    /// A queued write's two ends: the backend keeps the [`Completion`] with the queued
    /// job, the caller gets the [`Pending`].
    pub fn queued() -> (Completion<T>, Pending<T>) {
        let (tx, rx) = oneshot::channel();
        (
            Completion(tx),
            Pending {
                state: PendingState::Queued(rx),
            },
        )
    }

    /// A write that was not queued, with its result (e.g. [`StoreError::Closed`]).
    pub fn ready(result: Result<T, StoreError>) -> Pending<T> {
        Pending {
            state: PendingState::Ready(Some(result)),
        }
    }
}

// The result is never pinned in place (it is moved out when ready), so `Pending` is
// `Unpin` whatever `T` is.
impl<T> Unpin for Pending<T> {}

impl<T> Future for Pending<T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            PendingState::Queued(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
            PendingState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(StoreError::Closed)))
            }
        }
    }
}

/// What every backend measures about itself for `/metrics`, in backend-neutral terms.
/// The backend records into it; the admin listener reads it through [`Store::metrics`].
#[derive(Debug)]
pub struct StoreMetrics {
    /// Duration of each durable commit of acknowledged writes (one transaction and one
    /// sync, however many writes it carried), in seconds.
    commits: prometheus::Histogram,
    /// The database's disk is full: new records are refused, state changes go on.
    full: std::sync::atomic::AtomicBool,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            commits: crate::metrics::latency_histogram(
                "call_proxy_db_commit_seconds",
                "Duration of each database group commit (one transaction, one sync).",
            ),
            full: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl StoreMetrics {
    /// Records one durable commit (or one failed attempt at it) that took `took`.
    pub fn committed(&self, took: Duration) {
        self.commits.observe(took.as_secs_f64());
    }

    /// Commits timed so far.
    pub fn commit_count(&self) -> u64 {
        self.commits.get_sample_count()
    }

    /// Marks the database's disk full (or not any more).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, std::sync::atomic::Ordering::Release);
    }

    /// Whether the database's disk is full now: new call records (and later messages)
    /// are refused with [`StoreError::Full`], while registrations, offline marks, call
    /// ends and acknowledgements are still recorded.
    pub fn is_full(&self) -> bool {
        self.full.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The commit-duration histogram, for `/metrics`.
    pub fn commit_histogram(&self) -> &prometheus::Histogram {
        &self.commits
    }
}

/// The user management database as the server uses it.
///
/// # The write contract (every backend must keep it; `tests/store_contract.rs` checks)
/// - **Queued in call order.** A write method (`register`, `set_offline`, `insert_call`,
///   `finish_call`, `ack_cached`) is a plain `fn`: the change is queued before it
///   returns, and changes apply in the order the methods were called, whether or not
///   anyone awaits the returned [`Pending`]. The dial handler relies on it: a live
///   call's record is queued before the callee rings, so any later change of that call
///   applies after it, while the ring does not wait for the disk.
/// - **Acknowledged only when durable.** A [`Pending`] completes with `Ok` only after its
///   change is committed durably (with `sync_full`, it survives power loss). Backends may
///   share one commit among many writes (group commit).
/// - **Failures are isolated.** A write that fails leaves no partial change and fails
///   alone: the other writes committed with it are kept and answered `Ok`.
/// - **Reads see what was acknowledged.** A read issued after a [`Pending`] completed
///   `Ok` sees that change.
/// - **Closing flushes.** [`Store::close`] waits for every queued write; later writes
///   fail with [`StoreError::Closed`].
/// - **A full disk is a state.** When the disk fills, the backend reports it
///   ([`StoreMetrics::is_full`]) and refuses new records with [`StoreError::Full`] while
///   the writes that keep the state true (registrations, offline marks, call ends,
///   acknowledgements) still commit, until space returns; then it accepts records again,
///   with no restart.
/// - **A keyed call is stored at most once.** Among the calls of one caller placed
///   within [`shared_proto::KEY_LIFETIME_MS`] of each other, at most one record carries
///   a given idempotency key: [`Store::insert_keyed_call`] with a key already recorded
///   writes nothing and answers [`InsertResult::AlreadyRecorded`] with the first call,
///   also after a restart (the key is stored with the call's record). A key older than
///   the lifetime no longer counts: the new call takes it over.
pub trait Store: Clone + Send + Sync + 'static {
    /// Largest ids in use, so new ones are never reused.
    fn watermarks(&self) -> Watermarks;

    /// Flow 1: record the user online at this address (unless superseded). Queued now.
    fn register(&self, reg: Registration) -> Pending<RegisterResult>;

    /// Flow 2: record the user offline, if `session_id` is still the recorded session.
    /// Queued now.
    fn set_offline(&self, user_id: UserId, session_id: u64, at_ms: UnixMillis) -> Pending<()>;

    /// Flow 3: the rows of these users (missing users are absent from the answer).
    fn users(
        &self,
        ids: Vec<UserId>,
    ) -> impl Future<Output = Result<Vec<UserRow>, StoreError>> + Send;

    /// Flows 4 and 5: record a call, if its callee exists. Queued now.
    fn insert_call(&self, call: NewCall) -> Pending<InsertResult> {
        self.insert_keyed_call(call, None)
    }

    /// Flows 4 and 5: record a call, if its callee exists and (with a key) the caller
    /// has not recorded a call under `key` within [`shared_proto::KEY_LIFETIME_MS`]
    /// before `call.at_ms`; else answers [`InsertResult::AlreadyRecorded`] with that
    /// call and writes nothing. Queued now (ordered with every other write).
    fn insert_keyed_call(
        &self,
        call: NewCall,
        key: Option<IdempotencyKey>,
    ) -> Pending<InsertResult>;

    /// The call `caller` recorded under `key` within [`shared_proto::KEY_LIFETIME_MS`]
    /// before `now_ms`, if any (a read: it sees acknowledged writes; a keyed insert
    /// still queued is caught by [`Store::insert_keyed_call`] itself).
    fn keyed_call(
        &self,
        caller: UserId,
        key: IdempotencyKey,
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<Option<KeyedCall>, StoreError>> + Send;

    /// Records how a live call changed; for a missed kind, returns the callee's
    /// undelivered missed-call count (else 0). Queued now.
    fn finish_call(&self, end: CallEnd, callee: UserId) -> Pending<u32>;

    /// Flow 6: up to `limit` undelivered missed calls of `callee` with id > `after`,
    /// oldest first.
    fn cached_calls(
        &self,
        callee: UserId,
        after: CallId,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CachedRow>, StoreError>> + Send;

    /// Flow 6: mark these calls to `callee` delivered; returns how many changed. Queued
    /// now.
    fn ack_cached(&self, callee: UserId, ids: Vec<CallId>, at_ms: UnixMillis) -> Pending<u32>;

    /// A TV asks to be enrolled: its key's state if it is enrolled or has a live code,
    /// else a new pending enrollment under `e.code` (a code already taken fails with
    /// [`StoreError::Constraint`]; draw another). Queued now.
    fn start_enrollment(&self, e: NewEnrollment) -> Pending<EnrollmentState>;

    /// Adds a node's accounted usage to `account_usage` (one row per account and
    /// period, added to). Queued now; written in one transaction.
    fn add_usage(&self, rows: Vec<crate::accounting::UsageDelta>) -> Pending<()>;

    /// How the key with this certificate fingerprint stands.
    fn enrollment(
        &self,
        fingerprint: [u8; 32],
        now_ms: UnixMillis,
    ) -> impl Future<Output = Result<EnrollmentState, StoreError>> + Send;

    /// The credential of this certificate fingerprint, if any.
    fn credential(
        &self,
        fingerprint: [u8; 32],
    ) -> impl Future<Output = Result<Option<Credential>, StoreError>> + Send;

    /// Revocations numbered above `seq`, oldest first (a bounded batch).
    fn revocations_after(
        &self,
        seq: i64,
    ) -> impl Future<Output = Result<Vec<Revocation>, StoreError>> + Send;

    /// Presence: for each distinct user in `users`, what `watcher` may learn of it (one
    /// row per user asked, unknown users included with `online: None`), in any order.
    /// One query however many users are asked; more than
    /// [`shared_proto::MAX_SUBSCRIPTIONS`] distinct users fail with [`StoreError::Other`].
    fn presence_view(
        &self,
        watcher: UserId,
        users: Vec<UserId>,
    ) -> impl Future<Output = Result<Vec<PresenceRow>, StoreError>> + Send;

    /// Presence: `user`'s own stored settings (an empty book when it has none).
    fn presence_book(
        &self,
        user: UserId,
    ) -> impl Future<Output = Result<PresenceBook, StoreError>> + Send;

    /// Presence: replaces `user`'s address book with `contacts` (deduplicated), in one
    /// write. More than [`shared_proto::MAX_SUBSCRIPTIONS`] distinct contacts fail with
    /// [`StoreError::Other`] and nothing is written. Queued now.
    fn set_presence_book(&self, user: UserId, contacts: Vec<UserId>) -> Pending<()>;

    /// Presence: sets `user`'s "hide my state". Queued now.
    fn set_presence_hidden(&self, user: UserId, hidden: bool) -> Pending<()>;

    /// Records an alarm for the operator (`operator_alarm`). Queued now.
    fn raise_alarm(&self, alarm: NewAlarm) -> Pending<()>;

    /// Messages: stores `m` if its recipient exists, the recipient's mailbox has room
    /// for it under `quota` (checked in the same step), and the sender stored nothing
    /// under `m.key` before (else answers that message and writes nothing). Refused with
    /// [`StoreError::Full`] while the disk is full. Queued now.
    fn insert_message(&self, m: NewMessage, quota: Quota) -> Pending<MessageInsert>;

    /// Messages: acknowledges or deletes these messages to `recipient` (others' are
    /// left alone); answers the ones it changed, with their bodies' paths for a
    /// deletion to remove once it committed. Queued now.
    fn settle_messages(
        &self,
        recipient: UserId,
        ids: Vec<shared_proto::MessageId>,
        settle: Settle,
        at_ms: UnixMillis,
    ) -> Pending<Vec<Settled>>;

    /// Messages: deletes up to `limit` messages stored before `before_ms` (retention),
    /// answering them with their bodies' paths. Queued now.
    fn expire_messages(&self, before_ms: UnixMillis, limit: usize) -> Pending<Vec<Settled>>;

    /// Messages: reads (see [`MessageQuery`]).
    fn messages(
        &self,
        q: MessageQuery,
    ) -> impl Future<Output = Result<Vec<MessageRow>, StoreError>> + Send;

    /// Messages: `recipient`'s mailbox (waiting, kept, bytes).
    fn mailbox(
        &self,
        recipient: UserId,
    ) -> impl Future<Output = Result<Mailbox, StoreError>> + Send;

    /// What the backend measured about its commits (for `/metrics`).
    fn metrics(&self) -> &StoreMetrics;

    /// The events other nodes on the same database send this one, once (the first
    /// call takes them); `None` for a backend no other node can share.
    fn node_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<NodeEvent>> {
        None
    }

    /// The path to the other nodes on the same database; `None` for a backend no other
    /// node can share.
    fn node_link(&self) -> Option<postgres::link::NodeLink> {
        None
    }

    /// Flushes every pending write and stops the store. Later calls fail with `Closed`.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Which database the server keeps its records in (`backend` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum StorageBackend {
    /// The embedded SQLite file ([`Config::db_path`]).
    #[default]
    Sqlite,
    /// A PostgreSQL database ([`Config::db_url`]).
    Postgres,
}

impl StorageBackend {
    /// The name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageBackend::Sqlite => "sqlite",
            StorageBackend::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for StorageBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StorageBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sqlite" => Ok(StorageBackend::Sqlite),
            "postgres" | "postgresql" => Ok(StorageBackend::Postgres),
            other => Err(format!(
                "unknown storage backend {other:?}: this server supports \"sqlite\" and \"postgres\""
            )),
        }
    }
}

impl TryFrom<String> for StorageBackend {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Where the database is: the one thing that differs between backends in how the server,
/// the admin API and the operator CLI reach it.
#[derive(Debug, Clone)]
pub enum DbTarget {
    /// An embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (boxed: its settings are large beside a path).
    Postgres(Box<postgres::PgTarget>),
}

impl DbTarget {
    /// The database `config` names (for PostgreSQL, its password is read now).
    pub fn of(config: &Config) -> Result<DbTarget, StoreError> {
        match config.backend {
            StorageBackend::Sqlite => Ok(DbTarget::Sqlite(config.db_path())),
            StorageBackend::Postgres => {
                let url = config.db_url.as_deref().ok_or_else(|| {
                    StoreError::Other(
                        "backend \"postgres\" needs db_url (--db postgres://USER@HOST/DB)".into(),
                    )
                })?;
                Ok(DbTarget::Postgres(Box::new(postgres::PgTarget::new(
                    url,
                    config.db_password_file.as_deref(),
                )?)))
            }
        }
    }

    /// The SQLite file at `path`.
    pub fn sqlite(path: &Path) -> DbTarget {
        DbTarget::Sqlite(path.to_path_buf())
    }
}

impl std::fmt::Display for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbTarget::Sqlite(p) => write!(f, "{}", p.display()),
            DbTarget::Postgres(t) => f.write_str(&t.url),
        }
    }
}

/// The store of the configured backend (see [`open`]). Adding a backend adds a variant.
#[derive(Clone)]
pub enum AnyStore {
    /// [`sqlite::SqliteStore`].
    Sqlite(sqlite::SqliteStore),
    /// [`postgres::PostgresStore`].
    Postgres(postgres::PostgresStore),
}

/// Opens the store `config` names: its backend, location and durability. The one place
/// the server's store is constructed (PostgreSQL's writer runs on the calling runtime).
pub async fn open(config: &Config) -> Result<AnyStore, StoreError> {
    match DbTarget::of(config)? {
        DbTarget::Sqlite(path) => Ok(AnyStore::Sqlite(sqlite::SqliteStore::open(
            &path,
            sqlite::SqliteOptions {
                sync_full: config.sync_full,
                reserve_bytes: config.disk_reserve_mb.saturating_mul(1 << 20),
                ..sqlite::SqliteOptions::default()
            },
        )?)),
        DbTarget::Postgres(target) => Ok(AnyStore::Postgres(
            postgres::PostgresStore::open(
                &target,
                postgres::PostgresOptions {
                    sync_full: config.sync_full,
                    readers: config.db_pool_size,
                    node: postgres::NodeOptions {
                        id: config.node_id.clone(),
                        slot: config.node_slot,
                        lease: Duration::from_millis(config.node_lease_ms),
                        listen: config.listen.to_string(),
                    },
                    ..postgres::PostgresOptions::default()
                },
            )
            .await?,
        )),
    }
}

impl Store for AnyStore {
    fn watermarks(&self) -> Watermarks {
        match self {
            AnyStore::Sqlite(s) => s.watermarks(),
            AnyStore::Postgres(s) => s.watermarks(),
        }
    }

    fn register(&self, reg: Registration) -> Pending<RegisterResult> {
        match self {
            AnyStore::Sqlite(s) => s.register(reg),
            AnyStore::Postgres(s) => s.register(reg),
        }
    }

    fn set_offline(&self, user_id: UserId, session_id: u64, at_ms: UnixMillis) -> Pending<()> {
        match self {
            AnyStore::Sqlite(s) => s.set_offline(user_id, session_id, at_ms),
            AnyStore::Postgres(s) => s.set_offline(user_id, session_id, at_ms),
        }
    }

    async fn users(&self, ids: Vec<UserId>) -> Result<Vec<UserRow>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.users(ids).await,
            AnyStore::Postgres(s) => s.users(ids).await,
        }
    }

    fn insert_keyed_call(
        &self,
        call: NewCall,
        key: Option<IdempotencyKey>,
    ) -> Pending<InsertResult> {
        match self {
            AnyStore::Sqlite(s) => s.insert_keyed_call(call, key),
            AnyStore::Postgres(s) => s.insert_keyed_call(call, key),
        }
    }

    async fn keyed_call(
        &self,
        caller: UserId,
        key: IdempotencyKey,
        now_ms: UnixMillis,
    ) -> Result<Option<KeyedCall>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.keyed_call(caller, key, now_ms).await,
            AnyStore::Postgres(s) => s.keyed_call(caller, key, now_ms).await,
        }
    }

    fn finish_call(&self, end: CallEnd, callee: UserId) -> Pending<u32> {
        match self {
            AnyStore::Sqlite(s) => s.finish_call(end, callee),
            AnyStore::Postgres(s) => s.finish_call(end, callee),
        }
    }

    async fn cached_calls(
        &self,
        callee: UserId,
        after: CallId,
        limit: usize,
    ) -> Result<Vec<CachedRow>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.cached_calls(callee, after, limit).await,
            AnyStore::Postgres(s) => s.cached_calls(callee, after, limit).await,
        }
    }

    fn ack_cached(&self, callee: UserId, ids: Vec<CallId>, at_ms: UnixMillis) -> Pending<u32> {
        match self {
            AnyStore::Sqlite(s) => s.ack_cached(callee, ids, at_ms),
            AnyStore::Postgres(s) => s.ack_cached(callee, ids, at_ms),
        }
    }

    fn start_enrollment(&self, e: NewEnrollment) -> Pending<EnrollmentState> {
        match self {
            AnyStore::Sqlite(s) => s.start_enrollment(e),
            AnyStore::Postgres(s) => s.start_enrollment(e),
        }
    }

    fn add_usage(&self, rows: Vec<crate::accounting::UsageDelta>) -> Pending<()> {
        match self {
            AnyStore::Sqlite(s) => s.add_usage(rows),
            AnyStore::Postgres(s) => s.add_usage(rows),
        }
    }

    async fn enrollment(
        &self,
        fingerprint: [u8; 32],
        now_ms: UnixMillis,
    ) -> Result<EnrollmentState, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.enrollment(fingerprint, now_ms).await,
            AnyStore::Postgres(s) => s.enrollment(fingerprint, now_ms).await,
        }
    }

    async fn credential(&self, fingerprint: [u8; 32]) -> Result<Option<Credential>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.credential(fingerprint).await,
            AnyStore::Postgres(s) => s.credential(fingerprint).await,
        }
    }

    async fn revocations_after(&self, seq: i64) -> Result<Vec<Revocation>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.revocations_after(seq).await,
            AnyStore::Postgres(s) => s.revocations_after(seq).await,
        }
    }

    async fn presence_view(
        &self,
        watcher: UserId,
        users: Vec<UserId>,
    ) -> Result<Vec<PresenceRow>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.presence_view(watcher, users).await,
            AnyStore::Postgres(s) => s.presence_view(watcher, users).await,
        }
    }

    async fn presence_book(&self, user: UserId) -> Result<PresenceBook, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.presence_book(user).await,
            AnyStore::Postgres(s) => s.presence_book(user).await,
        }
    }

    fn set_presence_book(&self, user: UserId, contacts: Vec<UserId>) -> Pending<()> {
        match self {
            AnyStore::Sqlite(s) => s.set_presence_book(user, contacts),
            AnyStore::Postgres(s) => s.set_presence_book(user, contacts),
        }
    }

    fn set_presence_hidden(&self, user: UserId, hidden: bool) -> Pending<()> {
        match self {
            AnyStore::Sqlite(s) => s.set_presence_hidden(user, hidden),
            AnyStore::Postgres(s) => s.set_presence_hidden(user, hidden),
        }
    }

    fn raise_alarm(&self, alarm: NewAlarm) -> Pending<()> {
        match self {
            AnyStore::Sqlite(s) => s.raise_alarm(alarm),
            AnyStore::Postgres(s) => s.raise_alarm(alarm),
        }
    }

    fn insert_message(&self, m: NewMessage, quota: Quota) -> Pending<MessageInsert> {
        match self {
            AnyStore::Sqlite(s) => s.insert_message(m, quota),
            AnyStore::Postgres(s) => s.insert_message(m, quota),
        }
    }

    fn settle_messages(
        &self,
        recipient: UserId,
        ids: Vec<shared_proto::MessageId>,
        settle: Settle,
        at_ms: UnixMillis,
    ) -> Pending<Vec<Settled>> {
        match self {
            AnyStore::Sqlite(s) => s.settle_messages(recipient, ids, settle, at_ms),
            AnyStore::Postgres(s) => s.settle_messages(recipient, ids, settle, at_ms),
        }
    }

    fn expire_messages(&self, before_ms: UnixMillis, limit: usize) -> Pending<Vec<Settled>> {
        match self {
            AnyStore::Sqlite(s) => s.expire_messages(before_ms, limit),
            AnyStore::Postgres(s) => s.expire_messages(before_ms, limit),
        }
    }

    async fn messages(&self, q: MessageQuery) -> Result<Vec<MessageRow>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.messages(q).await,
            AnyStore::Postgres(s) => s.messages(q).await,
        }
    }

    async fn mailbox(&self, recipient: UserId) -> Result<Mailbox, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.mailbox(recipient).await,
            AnyStore::Postgres(s) => s.mailbox(recipient).await,
        }
    }

    fn metrics(&self) -> &StoreMetrics {
        match self {
            AnyStore::Sqlite(s) => s.metrics(),
            AnyStore::Postgres(s) => s.metrics(),
        }
    }

    fn node_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<NodeEvent>> {
        match self {
            AnyStore::Sqlite(s) => s.node_events(),
            AnyStore::Postgres(s) => s.node_events(),
        }
    }

    fn node_link(&self) -> Option<postgres::link::NodeLink> {
        match self {
            AnyStore::Sqlite(s) => s.node_link(),
            AnyStore::Postgres(s) => s.node_link(),
        }
    }

    async fn close(&self) {
        match self {
            AnyStore::Sqlite(s) => s.close().await,
            AnyStore::Postgres(s) => s.close().await,
        }
    }
}

/// The operator reads of the configured backend (see [`open_operator`]).
#[derive(Clone)]
pub enum AnyOperator {
    /// [`sqlite::operator::SqliteOperator`].
    Sqlite(sqlite::operator::SqliteOperator),
    /// [`postgres::operator::PostgresOperator`].
    Postgres(postgres::operator::PostgresOperator),
}

/// Operator reads on the database at `target`, at most `max_queries` at once. The one
/// place they are constructed (admin API and operator CLI). Nothing is opened yet: a
/// database that is missing or down fails each query (and `/readyz`), so the admin
/// listener still comes up to report it.
pub fn open_operator(target: &DbTarget, max_queries: usize) -> AnyOperator {
    match target {
        DbTarget::Sqlite(path) => AnyOperator::Sqlite(sqlite::operator::SqliteOperator::new(
            path.clone(),
            max_queries,
        )),
        DbTarget::Postgres(t) => {
            AnyOperator::Postgres(postgres::operator::PostgresOperator::new(t, max_queries))
        }
    }
}

impl OperatorStore for AnyOperator {
    async fn calls(&self, q: CallQuery) -> Result<Vec<CallRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.calls(q).await,
            AnyOperator::Postgres(o) => o.calls(q).await,
        }
    }

    async fn messages(&self, q: MessageLogQuery) -> Result<Vec<MessageRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.messages(q).await,
            AnyOperator::Postgres(o) => o.messages(q).await,
        }
    }

    async fn mailbox_totals(&self, user: Option<UserId>) -> Result<MailboxTotals, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.mailbox_totals(user).await,
            AnyOperator::Postgres(o) => o.mailbox_totals(user).await,
        }
    }

    async fn users(&self, online_only: bool, limit: usize) -> Result<Vec<UserRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.users(online_only, limit).await,
            AnyOperator::Postgres(o) => o.users(online_only, limit).await,
        }
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.user(id).await,
            AnyOperator::Postgres(o) => o.user(id).await,
        }
    }

    async fn stats(&self, now_ms: UnixMillis) -> Result<Stats, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.stats(now_ms).await,
            AnyOperator::Postgres(o) => o.stats(now_ms).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.ping().await,
            AnyOperator::Postgres(o) => o.ping().await,
        }
    }

    async fn cached_waiting(&self) -> Result<u64, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.cached_waiting().await,
            AnyOperator::Postgres(o) => o.cached_waiting().await,
        }
    }

    async fn approve(
        &self,
        code: String,
        user: UserId,
        replace: bool,
        now_ms: UnixMillis,
    ) -> Result<Approval, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.approve(code, user, replace, now_ms).await,
            AnyOperator::Postgres(o) => o.approve(code, user, replace, now_ms).await,
        }
    }

    async fn refuse(
        &self,
        code: String,
        now_ms: UnixMillis,
    ) -> Result<crate::storage::enroll::Refusal, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.refuse(code, now_ms).await,
            AnyOperator::Postgres(o) => o.refuse(code, now_ms).await,
        }
    }

    async fn revoke(&self, user: UserId, now_ms: UnixMillis) -> Result<bool, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.revoke(user, now_ms).await,
            AnyOperator::Postgres(o) => o.revoke(user, now_ms).await,
        }
    }

    async fn enrollments(
        &self,
        now_ms: UnixMillis,
        limit: usize,
    ) -> Result<Vec<EnrollmentRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.enrollments(now_ms, limit).await,
            AnyOperator::Postgres(o) => o.enrollments(now_ms, limit).await,
        }
    }

    async fn usage(
        &self,
        q: operator::UsageQuery,
    ) -> Result<Vec<operator::UsageRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.usage(q).await,
            AnyOperator::Postgres(o) => o.usage(q).await,
        }
    }

    async fn set_allowance(
        &self,
        user: UserId,
        bytes: Option<u64>,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.set_allowance(user, bytes, now_ms).await,
            AnyOperator::Postgres(o) => o.set_allowance(user, bytes, now_ms).await,
        }
    }

    async fn set_phone(
        &self,
        user: UserId,
        phone: Option<String>,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.set_phone(user, phone, now_ms).await,
            AnyOperator::Postgres(o) => o.set_phone(user, phone, now_ms).await,
        }
    }

    async fn alarms(
        &self,
        include_cleared: bool,
        limit: usize,
    ) -> Result<Vec<operator::AlarmRecord>, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.alarms(include_cleared, limit).await,
            AnyOperator::Postgres(o) => o.alarms(include_cleared, limit).await,
        }
    }

    async fn open_alarms(&self) -> Result<u64, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.open_alarms().await,
            AnyOperator::Postgres(o) => o.open_alarms().await,
        }
    }

    async fn clear_alarm(&self, id: u64, now_ms: UnixMillis) -> Result<bool, StoreError> {
        match self {
            AnyOperator::Sqlite(o) => o.clear_alarm(id, now_ms).await,
            AnyOperator::Postgres(o) => o.clear_alarm(id, now_ms).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_form_of_the_missed_kinds_lists_exactly_the_missed_kinds() {
        let listed: Vec<Outcome> = Outcome::ALL
            .into_iter()
            .filter(|o| MISSED_KINDS_SQL.contains(&format!("'{}'", o.as_str())))
            .collect();
        assert_eq!(listed, MISSED_KINDS.to_vec());
        for o in Outcome::ALL {
            assert_eq!(o.is_missed_kind(), listed.contains(&o), "{o:?}");
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
    }

    #[test]
    fn an_unknown_backend_is_named_in_the_error() {
        assert_eq!("sqlite".parse(), Ok(StorageBackend::Sqlite));
        assert_eq!("postgres".parse(), Ok(StorageBackend::Postgres));
        let err = "mysql".parse::<StorageBackend>().unwrap_err();
        assert!(err.contains("unknown storage backend \"mysql\""), "{err}");
    }

    #[test]
    fn call_ids_of_several_nodes_never_meet() {
        let w = |max, stride, offset| Watermarks {
            max_call_id: max,
            call_id_stride: stride,
            call_id_offset: offset,
            ..Watermarks::default()
        };
        assert_eq!(w(0, 0, 0).first_call_id(), 1);
        assert_eq!(w(41, 1, 0).first_call_id(), 42);
        assert_eq!(w(0, 64, 0).first_call_id(), 64);
        assert_eq!(w(0, 64, 5).first_call_id(), 5);
        assert_eq!(w(130, 64, 2).first_call_id(), 194);
        assert_eq!(w(130, 64, 3).first_call_id(), 131);
        assert_eq!(w(130, 64, 1).first_call_id(), 193);
    }

    #[tokio::test]
    async fn a_pending_completes_with_its_result_or_closed() {
        let (done, pending) = Pending::<u32>::queued();
        done.complete(Ok(7));
        assert_eq!(pending.await, Ok(7));
        let (done, pending) = Pending::<u32>::queued();
        drop(done);
        assert_eq!(pending.await, Err(StoreError::Closed));
        assert_eq!(
            Pending::<u32>::ready(Err(StoreError::Full("x".into()))).await,
            Err(StoreError::Full("x".into()))
        );
    }
}
