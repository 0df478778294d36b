//! The agent's plain types: its configuration, a missed call as shown to the viewer, the
//! status for UIs, a dial's result and a command's failure.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shared_proto::{CachedCall, CallId, NetState, UserId};

use super::events::{CallState, DialFailure, MissReason};
use crate::link::LinkError;
use crate::media::AudioSpec;

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This TV's user number.
    pub user: UserId,
    /// The call-proxy server, `host:port`.
    pub server: String,
    /// Where to bind the UDP media socket.
    pub media_bind: SocketAddr,
    /// Media port to register instead of the bound one (a port forwarded by a router).
    pub advertise_port: Option<u16>,
    /// Offer ICE candidates and run connectivity checks (issue 13). Off: media goes to
    /// the address the server saw, as an agent built before ICE does (lab use, and
    /// networks where a port is forwarded to the TV).
    pub ice: bool,
    /// Call audio source.
    pub audio_in: AudioSpec,
    /// Call audio sink.
    pub audio_out: AudioSpec,
    /// Where presented cached calls are kept before the server is told they were
    /// delivered.
    pub missed: MissedKeeping,
    /// How the control link reaches the server: TLS with the TV's key (see
    /// [`crate::identity`]) or, for lab use, plain TCP.
    pub transport: control_client::Transport,
    /// Presence: whom to watch and where the viewer's settings are kept; `None` (the
    /// scripted modes that do one thing) subscribes to nothing and leaves the address
    /// book the server holds for this TV as it is.
    pub presence: Option<PresenceSetup>,
    /// Messages: where the TV keeps the ones it takes (`--data-dir/messages`); `None`
    /// takes none (messages wait on the server for a TV that keeps them).
    pub inbox: Option<super::inbox::Inbox>,
}

/// What a TV with presence watches, and where it keeps the viewer's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PresenceSetup {
    /// The address book's user numbers: watched, and who may see this TV.
    pub contacts: Vec<UserId>,
    /// Others to watch besides the missed callers (a scripted `watch`'s `--users`).
    pub others: Vec<UserId>,
    /// Where "do not disturb" and "hide my state" are kept across restarts (sent to the
    /// server at every registration once the viewer has set them); `None`: in memory.
    pub settings_file: Option<std::path::PathBuf>,
}

/// A change to the viewer's presence settings: `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PresenceChange {
    /// "Do not disturb" on or off.
    pub do_not_disturb: Option<bool>,
    /// "Hide my state" on or off.
    pub hidden: Option<bool>,
}

/// The viewer's presence settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceSettings {
    /// "Do not disturb": shown to watchers as busy; calls are cached as missed, not rung.
    pub do_not_disturb: bool,
    /// "Hide my state": nobody may watch this TV.
    pub hidden: bool,
}

/// Where the agent keeps the cached calls it presents, and so when it acknowledges them:
/// never before they are somewhere the viewer will see them.
#[derive(Debug, Clone, PartialEq)]
pub enum MissedKeeping {
    /// The daemon's missed-call list, kept across restarts in this file (shown by the
    /// on-screen UI and the control API): written and synced, then acknowledged.
    File(std::path::PathBuf),
    /// Whoever shows them acknowledges them with [`Agent::shown`](super::Agent::shown)
    /// once shown (a scripted mode prints and flushes first); until then they stay on the
    /// server, so a TV killed mid-fetch never loses a call it did not show.
    WhenShown,
    /// In memory only, acknowledged once the `CachedCalls` event is sent: for code that
    /// embeds the agent and presents in the same process (tests, benchmarks).
    Memory,
}

/// A missed call as presented to the viewer (and printed by `tv-agent missed`). Field
/// names follow the documents' tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MissedCall {
    /// The call.
    pub call_id: CallId,
    /// The caller (`user_call.user_id`).
    pub user_id: UserId,
    /// This TV (`user_call.otheruser_id`).
    pub otheruser_id: UserId,
    /// When the call was placed, RFC 3339.
    pub call_date: String,
    /// The caller's network state now: 1 online, 0 offline, null unknown.
    pub user_netstate: Option<u8>,
    /// Why it was missed.
    pub reason: MissReason,
}

impl MissedCall {
    /// A cached call from the server, as the viewer sees it.
    pub fn from_wire(c: &CachedCall) -> Self {
        MissedCall {
            call_id: c.call_id,
            user_id: c.caller,
            otheruser_id: c.callee,
            call_date: rfc3339(c.call_date_ms),
            user_netstate: netstate(c.caller_state),
            reason: c.reason.into(),
        }
    }
}

/// `user_netstate` as the documents encode it.
pub fn netstate(s: NetState) -> Option<u8> {
    match s {
        NetState::Online => Some(1),
        NetState::Offline => Some(0),
        NetState::Unknown => None,
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Now as Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

/// The result of a dial, for the one who dialled.
#[derive(Debug, Clone, PartialEq)]
pub enum DialResult {
    /// Ringing at the callee.
    Ringing(CallId),
    /// Cached for an offline callee.
    Cached(CallId),
    /// The callee is in another call.
    Busy(CallId),
    /// No such user.
    UnknownUser,
    /// This TV is already in a call.
    AlreadyInCall,
    /// The server's storage is full: nothing was placed or recorded (retry later).
    StorageFull,
    /// No connection to the server.
    Unreachable(String),
    /// Another error from the server.
    Failed(String),
}

impl DialResult {
    /// The outcome word used in events and scripted output.
    pub fn outcome(&self) -> &'static str {
        match self {
            DialResult::Ringing(_) => "ringing",
            DialResult::Cached(_) => "cached",
            _ => self.failure().map_or("failed", DialFailure::as_str),
        }
    }

    /// Why the dial did not ring or cache, if it did not.
    pub fn failure(&self) -> Option<DialFailure> {
        match self {
            DialResult::Ringing(_) | DialResult::Cached(_) => None,
            DialResult::Busy(_) => Some(DialFailure::Busy),
            DialResult::UnknownUser => Some(DialFailure::UnknownUser),
            DialResult::AlreadyInCall => Some(DialFailure::AlreadyInCall),
            DialResult::StorageFull => Some(DialFailure::StorageFull),
            DialResult::Unreachable(_) => Some(DialFailure::Unreachable),
            DialResult::Failed(_) => Some(DialFailure::Failed),
        }
    }
}

/// A command's failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// No call in a state the command applies to.
    #[error("no such call")]
    NoCall,
    /// The control link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The agent has powered off.
    #[error("the agent is powered off")]
    Off,
    /// Media could not start.
    #[error("media: {0}")]
    Media(String),
    /// The missed-call list could not be saved.
    #[error("cannot save the missed-call list: {0}")]
    Save(String),
    /// The presence settings could not be saved; they were not changed.
    #[error("cannot save the presence settings: {0}")]
    SaveSettings(String),
    /// This agent was started without presence (a scripted mode).
    #[error("presence is not on in this mode")]
    NoPresence,
    /// The server does not support this (a server one release behind).
    #[error("{0}")]
    Unsupported(&'static str),
}

/// The agent's current state, for UIs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// This TV.
    pub user: UserId,
    /// Registered with the server now.
    pub registered: bool,
    /// The call state.
    pub call_state: CallState,
    /// The call, if any.
    pub call_id: Option<CallId>,
    /// The other TV, if any.
    pub peer: Option<UserId>,
    /// When the current call state began, Unix milliseconds.
    pub since_ms: i64,
    /// This TV's microphone is muted in the current call.
    pub muted: bool,
    /// "Do not disturb" is on.
    pub do_not_disturb: bool,
    /// "Hide my state" is on.
    pub hidden: bool,
}
