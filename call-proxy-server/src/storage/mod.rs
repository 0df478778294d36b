//! The user management database, behind the [`Store`] interface the server depends on.
//!
//! The server never sees SQL: it calls [`Store`] methods with plain row types from this
//! module. [`sqlite::SqliteStore`] is the embedded implementation; a PostgreSQL one can
//! be added beside it without touching protocol or call-handling code.
//!
//! Write methods queue their change when they are called, so changes apply in the order
//! they were issued even if nobody awaits them; the returned future completes only after
//! the change is durably committed (group commit: concurrent writes share one
//! transaction and one sync).

pub mod operator;
pub mod sqlite;

use std::future::Future;
use std::net::IpAddr;

use shared_proto::{CallId, UnixMillis, UserId};

/// What a storage call can fail with. Nothing reported as failed was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed the operation.
    #[error("database error: {0}")]
    Db(String),
    /// The store has been closed (server shutting down).
    #[error("store is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

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
        Some(match text {
            "ringing" => Outcome::Ringing,
            "answered" => Outcome::Answered,
            "missed" => Outcome::Missed,
            "rejected" => Outcome::Rejected,
            "busy" => Outcome::Busy,
            "cached" => Outcome::Cached,
            _ => return None,
        })
    }

    /// Whether a call with this outcome is delivered to the callee as a missed call.
    pub fn is_missed_kind(self) -> bool {
        matches!(self, Outcome::Missed | Outcome::Busy | Outcome::Cached)
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

/// Whether the callee of a new call exists.
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
}

/// The user management database as the server uses it.
pub trait Store: Clone + Send + Sync + 'static {
    /// Largest ids in use, so new ones are never reused.
    fn watermarks(&self) -> Watermarks;

    /// Flow 1: record the user online at this address (unless superseded).
    fn register(
        &self,
        reg: Registration,
    ) -> impl Future<Output = Result<RegisterResult, StoreError>> + Send;

    /// Flow 2: record the user offline, if `session_id` is still the recorded session.
    fn set_offline(
        &self,
        user_id: UserId,
        session_id: u64,
        at_ms: UnixMillis,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Flow 3: the rows of these users (missing users are absent from the answer).
    fn users(
        &self,
        ids: Vec<UserId>,
    ) -> impl Future<Output = Result<Vec<UserRow>, StoreError>> + Send;

    /// Flows 4 and 5: record a call, if its callee exists.
    fn insert_call(
        &self,
        call: NewCall,
    ) -> impl Future<Output = Result<InsertResult, StoreError>> + Send;

    /// Records how a live call changed; for a missed kind, returns the callee's
    /// undelivered missed-call count (else 0).
    fn finish_call(
        &self,
        end: CallEnd,
        callee: UserId,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Flow 6: up to `limit` undelivered missed calls of `callee` with id > `after`,
    /// oldest first.
    fn cached_calls(
        &self,
        callee: UserId,
        after: CallId,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CachedRow>, StoreError>> + Send;

    /// Flow 6: mark these calls to `callee` delivered; returns how many changed.
    fn ack_cached(
        &self,
        callee: UserId,
        ids: Vec<CallId>,
        at_ms: UnixMillis,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// How long each group commit took (for `/metrics`).
    fn commit_latency(&self) -> &crate::metrics::Histogram;

    /// Flushes every pending write and stops the store. Later calls fail with `Closed`.
    fn close(&self) -> impl Future<Output = ()> + Send;
}
