//! The admin API's JSON types: what `/api/…` returns and what the operator CLI prints
//! (read from the database file or from a running server, the same types either way).
//!
//! They are separate from the storage module's records so the HTTP contract and the
//! database can change independently; field names follow the documents' columns.

use serde::{Deserialize, Serialize};
use shared_proto::{CallId, UserId};

use crate::storage::operator::{CallRecord, Stats as StatsRecord, UserRecord};

/// One call of the log (`GET /api/calls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// The call id; also the pagination cursor.
    pub id: CallId,
    /// Caller.
    pub user_id: UserId,
    /// Callee.
    pub otheruser_id: UserId,
    /// When it was placed, RFC 3339 UTC.
    pub call_date: String,
    /// `ringing`, `answered`, `missed`, `rejected`, `busy` or `cached`.
    pub outcome: String,
    /// Whether the callee's TV has been shown it.
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

impl From<CallRecord> for Call {
    fn from(r: CallRecord) -> Self {
        Call {
            id: r.id,
            user_id: r.user_id,
            otheruser_id: r.otheruser_id,
            call_date: r.call_date,
            outcome: r.outcome,
            delivered: r.delivered,
            answered_at: r.answered_at,
            ended_at: r.ended_at,
            delivered_at: r.delivered_at,
            caller_ip: r.caller_ip,
        }
    }
}

/// A page of the call log, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallsPage {
    /// The calls.
    pub calls: Vec<Call>,
    /// Pass as `before` for the next (older) page; `null` when this page is the last.
    pub next_before: Option<CallId>,
}

/// One user (`GET /api/users`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The TV's calling number.
    pub user_id: UserId,
    /// IP the server last saw it at.
    pub user_ip: String,
    /// 1 online, 0 offline.
    pub user_netstate: u8,
    /// UDP media port it registered.
    pub media_port: u16,
    /// Last registration or disconnect, RFC 3339 UTC.
    pub last_seen: Option<String>,
    /// The agent's build.
    pub agent_version: String,
}

impl From<UserRecord> for User {
    fn from(r: UserRecord) -> Self {
        User {
            user_id: r.user_id,
            user_ip: r.user_ip,
            user_netstate: r.user_netstate,
            media_port: r.media_port,
            last_seen: r.last_seen,
            agent_version: r.agent_version,
        }
    }
}

/// The users table (`GET /api/users`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Users {
    /// Users by id.
    pub users: Vec<User>,
}

/// One user with its recent calls (`GET /api/users/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDetail {
    /// The user's row.
    #[serde(flatten)]
    pub user: User,
    /// Its latest calls on either side, newest first.
    pub recent_calls: Vec<Call>,
}

/// Service statistics (`GET /api/stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

impl From<StatsRecord> for Stats {
    fn from(r: StatsRecord) -> Self {
        Stats {
            users: r.users,
            online: r.online,
            calls_last_hour: r.calls_last_hour,
            calls_last_day: r.calls_last_day,
            cached_waiting: r.cached_waiting,
            delivery_delay_p50_s: r.delivery_delay_p50_s,
            delivery_delay_max_s: r.delivery_delay_max_s,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// The query parameter that was refused, if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Its value as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}
