//! The admin API's JSON types: what `/api/…` returns and what the operator CLI prints
//! (read from the database file or from a running server, the same types either way).
//!
//! They are separate from the storage module's records so the HTTP contract and the
//! database can change independently; field names follow the documents' columns.

use serde::{Deserialize, Serialize};
use shared_proto::{CallId, UserId};

use crate::storage::operator::{
    AlarmRecord, CallRecord, MailboxTotals, MessageRecord, Stats as StatsRecord, UserRecord,
};

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
    /// The phone number on file, E.164 (`null`: none).
    #[serde(default)]
    pub phone: Option<String>,
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
            phone: r.phone,
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
    /// What its mailbox holds (messages left for it).
    #[serde(default)]
    pub mailbox: Mailbox,
}

/// Messages kept in one mailbox, or in all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Mailbox {
    /// Messages kept.
    pub messages: u64,
    /// Of them, not yet taken by the recipient's TV.
    pub waiting: u64,
    /// Bytes kept (bodies and texts).
    pub bytes: u64,
}

impl From<MailboxTotals> for Mailbox {
    fn from(t: MailboxTotals) -> Self {
        Mailbox {
            messages: t.messages,
            waiting: t.waiting,
            bytes: t.bytes,
        }
    }
}

/// One message of the log (`GET /api/messages`): never its text or body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The message id; also the pagination cursor.
    pub id: u64,
    /// Who left it.
    pub user_id: UserId,
    /// Who it is for.
    pub otheruser_id: UserId,
    /// `text`, `voice`, `picture` or `video`.
    pub kind: String,
    /// Bytes counted against the mailbox.
    pub size: u64,
    /// The body's MIME type.
    pub mime: Option<String>,
    /// Length of a voice message or clip, in milliseconds.
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

impl From<MessageRecord> for Message {
    fn from(r: MessageRecord) -> Self {
        Message {
            id: r.id,
            user_id: r.user_id,
            otheruser_id: r.otheruser_id,
            kind: r.kind,
            size: r.size,
            mime: r.mime,
            duration_ms: r.duration_ms,
            width: r.width,
            height: r.height,
            sent_at: r.sent_at,
            delivered: r.delivered,
            delivered_at: r.delivered_at,
        }
    }
}

/// A message kind by its name (`text`, `voice`, `picture`, `video`).
pub fn message_kind(s: &str) -> Result<u8, String> {
    match shared_proto::MessageKind::from_name(s) {
        Some(k) => Ok(k.0),
        None => Err("use text, voice, picture or video".into()),
    }
}

/// A delivery state: `waiting` (not yet taken) or `delivered`.
pub fn message_state(s: &str) -> Result<bool, String> {
    match s {
        "waiting" => Ok(false),
        "delivered" => Ok(true),
        _ => Err("use waiting or delivered".into()),
    }
}

/// A page of the message log, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesPage {
    /// The messages.
    pub messages: Vec<Message>,
    /// Pass as `before` for the next (older) page; `null` when this page is the last.
    pub next_before: Option<u64>,
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
    /// Messages kept on the server, over every mailbox.
    #[serde(default)]
    pub messages_kept: u64,
    /// Of them, not yet taken by their recipient's TV.
    #[serde(default)]
    pub messages_waiting: u64,
    /// Bytes the mailboxes hold.
    #[serde(default)]
    pub message_bytes: u64,
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
            messages_kept: r.mailboxes.messages,
            messages_waiting: r.mailboxes.waiting,
            message_bytes: r.mailboxes.bytes,
        }
    }
}

/// An alarm raised for the operator (`GET /api/alarms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    /// Its number (`POST /api/alarms/{id}/clear`).
    pub id: u64,
    /// The user it is about.
    pub user_id: UserId,
    /// When it was raised, RFC 3339 UTC.
    pub raised_at: String,
    /// What happened.
    pub reason: String,
    /// How many failures led to it.
    pub count: u32,
    /// When it was cleared (`null`: open).
    pub cleared_at: Option<String>,
}

impl From<AlarmRecord> for Alarm {
    fn from(r: AlarmRecord) -> Self {
        Alarm {
            id: r.id,
            user_id: r.user_id,
            raised_at: r.raised_at,
            reason: r.reason,
            count: r.count,
            cleared_at: r.cleared_at,
        }
    }
}

/// The alarms, newest first (`GET /api/alarms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarms {
    /// Open ones only, unless cleared ones were asked for.
    pub alarms: Vec<Alarm>,
}

/// The body of `PUT /api/users/{id}/phone`: the number, or `null` to clear it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneBody {
    /// E.164 (`+` and 8 to 15 digits); `null`: no number on file.
    pub phone: Option<String>,
}

/// Checks a phone number as the operator gives it: E.164, a `+` and 8 to 15 digits
/// (the country code first), nothing else. The one check of the CLI and the admin API.
pub fn check_phone(text: &str) -> Result<(), String> {
    let digits = text.strip_prefix('+').unwrap_or("");
    if text.starts_with('+')
        && (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
    {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a phone number in E.164 form: a + then 8 to 15 digits, \
             country code first (e.g. +4930123456)"
        ))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn phone_numbers_must_be_e164() {
        for ok in [
            "+4930123456",
            "+12025550123",
            "+49301234",
            "+123456789012345",
        ] {
            assert_eq!(check_phone(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "+",
            "4930123456",
            "+4930 123456",
            "+49-30-123456",
            "+4930123",
            "+1234567890123456",
            "+04930123456",
            "++4930123456",
            "+49301234a6",
        ] {
            let err = check_phone(bad).unwrap_err();
            assert!(err.contains("E.164"), "{bad}: {err}");
        }
    }
}
