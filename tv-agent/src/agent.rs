//! The agent core: the TV's power-on sequence and its call state, driven by the viewer's
//! commands (UI, control API or a scripted mode) and by the control link's events.
//!
//! Power-on, as the documents give it: bind the UDP media socket first, then open the TCP
//! control link and register with the media port. After every registration the cached
//! calls are fetched, presented (each with its caller's current state) and then
//! acknowledged. Power-off closes the control link first (the server records the TV
//! offline), then the media socket.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shared_proto::{
    CachedCall, CallId, DialOutcome, EndReason, ErrorCode, Event, MissedReason, NetState, Reply,
    Request, UserId, UserState,
};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::link::{self, LinkConfig, LinkError, LinkEvent, LinkHandle};
use crate::media::{open_sink, open_source, AudioSpec, CallQuality, MediaParams, MediaSession};

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
    /// Call audio source.
    pub audio_in: AudioSpec,
    /// Call audio sink.
    pub audio_out: AudioSpec,
    /// Where presented cached calls are kept before the server is told they were
    /// delivered.
    pub missed: MissedKeeping,
}

/// Where the agent keeps the cached calls it presents, and so when it acknowledges them:
/// never before they are somewhere the viewer will see them.
#[derive(Debug, Clone, PartialEq)]
pub enum MissedKeeping {
    /// The daemon's missed-call list, kept across restarts in this file (shown by the
    /// on-screen UI and the control API): written and synced, then acknowledged.
    File(std::path::PathBuf),
    /// Whoever shows them acknowledges them with [`Agent::shown`] once shown (a
    /// scripted mode prints and flushes first); until then they stay on the server, so
    /// a TV killed mid-fetch never loses a call it did not show.
    WhenShown,
    /// In memory only, acknowledged once the `CachedCalls` event is sent: for code that
    /// embeds the agent and presents in the same process (tests, benchmarks).
    Memory,
}

/// Most missed calls kept in the missed-call list (the oldest go first).
pub const MAX_MISSED_KEPT: usize = 200;
/// Largest missed-call file read at power-on.
const MAX_MISSED_FILE: u64 = 512 * 1024;

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
    /// Why it was missed: `offline`, `no_answer` or `busy`.
    pub reason: String,
}

impl MissedCall {
    fn from_wire(c: &CachedCall) -> Self {
        MissedCall {
            call_id: c.call_id,
            user_id: c.caller,
            otheruser_id: c.callee,
            call_date: rfc3339(c.call_date_ms),
            user_netstate: netstate(c.caller_state),
            reason: match c.reason {
                MissedReason::Offline => "offline",
                MissedReason::NoAnswer => "no_answer",
                MissedReason::Busy => "busy",
            }
            .into(),
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

/// Everything the agent reports, in order, to the UI, the control API and scripted modes.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// Registered with the server (at power-on and after every reconnect).
    Registered {
        /// This TV.
        user: UserId,
        /// The IP the server sees.
        observed_ip: String,
        /// The media address registered.
        media_port: u16,
    },
    /// The control link is down; retrying.
    LinkDown {
        /// Why.
        reason: String,
        /// Milliseconds until the next attempt.
        retry_in_ms: u64,
    },
    /// Calls cached while this TV could not take them, each with its caller's state now.
    CachedCalls {
        /// Oldest first.
        calls: Vec<MissedCall>,
    },
    /// Someone is calling: ring.
    Incoming {
        /// The call.
        call_id: CallId,
        /// Who.
        caller: UserId,
    },
    /// Our call is ringing at the callee.
    Ringing {
        /// The call.
        call_id: CallId,
        /// Who.
        callee: UserId,
    },
    /// Our call's callee is off: cached, they will see it when their TV is switched on.
    Cached {
        /// The call.
        call_id: CallId,
        /// Who.
        callee: UserId,
    },
    /// A dial did not ring: `busy`, `unknown_user`, `unreachable`, …
    DialFailed {
        /// Who was dialled.
        callee: UserId,
        /// Outcome word.
        outcome: String,
        /// Detail for people.
        message: String,
    },
    /// Answered: media flows between the TVs.
    Answered {
        /// The call.
        call_id: CallId,
        /// The other TV.
        peer: UserId,
        /// The other TV's media address.
        peer_media: String,
    },
    /// This TV's microphone was muted or unmuted.
    Muted {
        /// The call.
        call_id: CallId,
        /// Muted now.
        muted: bool,
    },
    /// The call is over.
    Ended {
        /// The call.
        call_id: CallId,
        /// The other TV.
        peer: UserId,
        /// `hung_up`, `hung_up_by_peer`, `no_answer`, `rejected`, `peer_lost`,
        /// `server_shutdown`, `link_lost`.
        outcome: String,
        /// Media quality, if media flowed.
        quality: Option<CallQuality>,
    },
    /// The viewer cleared the missed-call list.
    MissedCleared,
    /// The agent powered off (signal, UI or API command); nothing follows.
    PoweredOff,
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
            DialResult::Busy(_) => "busy",
            DialResult::UnknownUser => "unknown_user",
            DialResult::AlreadyInCall => "already_in_call",
            DialResult::Unreachable(_) => "unreachable",
            DialResult::Failed(_) => "failed",
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
}

type Reply1<T> = oneshot::Sender<Result<T, AgentError>>;

enum Cmd {
    Dial(UserId, oneshot::Sender<DialResult>),
    Answer(Reply1<()>),
    Reject(Reply1<()>),
    HangUp(Reply1<()>),
    Mute(bool, Reply1<()>),
    Query(Vec<UserId>, Reply1<Vec<UserState>>),
    Missed(oneshot::Sender<Vec<MissedCall>>),
    Shown(Vec<CallId>, Reply1<()>),
    ClearMissed(Reply1<()>),
    Status(oneshot::Sender<Status>),
    PowerOff(oneshot::Sender<()>),
}

/// The agent's current state, for UIs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// This TV.
    pub user: UserId,
    /// Registered with the server now.
    pub registered: bool,
    /// `idle`, `ringing_out`, `ringing_in`, `in_call`.
    pub call_state: &'static str,
    /// The call, if any.
    pub call_id: Option<CallId>,
    /// The other TV, if any.
    pub peer: Option<UserId>,
    /// When the current call state began, Unix milliseconds.
    pub since_ms: i64,
    /// This TV's microphone is muted in the current call.
    pub muted: bool,
}

/// A running agent. Commands go to its core task.
#[derive(Clone)]
pub struct Agent {
    cmds: mpsc::Sender<Cmd>,
    events: broadcast::Sender<AgentEvent>,
    media_addr: SocketAddr,
}

/// Binds the UDP media socket: address reuse, roomy buffers, and the voice DSCP (EF)
/// so home routers prioritise call audio.
pub fn bind_media(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    use anyhow::Context;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    let _ = socket.set_recv_buffer_size(256 * 1024);
    let _ = socket.set_send_buffer_size(256 * 1024);
    if addr.is_ipv4() {
        // DSCP 46 (expedited forwarding) in the upper six bits of the TOS byte.
        let _ = socket.set_tos_v4(46 << 2);
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind the media socket to {addr}"))?;
    Ok(UdpSocket::from_std(socket.into())?)
}

impl Agent {
    /// Powers on: binds the media socket, then starts the control link. Returns the
    /// agent and a subscription that sees every event from the very first.
    pub async fn power_on(
        cfg: AgentConfig,
    ) -> anyhow::Result<(Agent, broadcast::Receiver<AgentEvent>)> {
        let missed = match &cfg.missed {
            MissedKeeping::File(path) => {
                let mut kept: Vec<MissedCall> = crate::files::read_json(path, MAX_MISSED_FILE)
                    .map_err(|e| {
                        anyhow::anyhow!("cannot read the missed calls {}: {e}", path.display())
                    })?;
                keep_newest(&mut kept);
                kept
            }
            MissedKeeping::WhenShown | MissedKeeping::Memory => Vec::new(),
        };
        let socket = bind_media(cfg.media_bind)?;
        let media_addr = socket.local_addr()?;
        let media_port = cfg.advertise_port.unwrap_or(media_addr.port());
        let (link, link_events) =
            link::spawn(LinkConfig::new(cfg.server.clone(), cfg.user, media_port));
        let (events, first) = broadcast::channel(1024);
        let (cmds, cmd_rx) = mpsc::channel(64);
        let core = Core {
            cfg,
            media_port,
            link,
            socket: Arc::new(socket),
            events: events.clone(),
            call: Call::Idle,
            missed,
            registered: false,
            call_since_ms: now_ms(),
        };
        tokio::spawn(core.run(cmd_rx, link_events));
        Ok((
            Agent {
                cmds,
                events,
                media_addr,
            },
            first,
        ))
    }

    /// The bound media socket address.
    pub fn media_addr(&self) -> SocketAddr {
        self.media_addr
    }

    /// A new subscription to events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Calls `callee`.
    pub async fn dial(&self, callee: UserId) -> DialResult {
        self.ask(|tx| Cmd::Dial(callee, tx))
            .await
            .unwrap_or(DialResult::Failed("the agent is powered off".into()))
    }

    /// Answers the ringing incoming call.
    pub async fn answer(&self) -> Result<(), AgentError> {
        self.ask(Cmd::Answer).await.unwrap_or(Err(AgentError::Off))
    }

    /// Rejects the ringing incoming call.
    pub async fn reject(&self) -> Result<(), AgentError> {
        self.ask(Cmd::Reject).await.unwrap_or(Err(AgentError::Off))
    }

    /// Hangs up the current call (or cancels our ringing one).
    pub async fn hang_up(&self) -> Result<(), AgentError> {
        self.ask(Cmd::HangUp).await.unwrap_or(Err(AgentError::Off))
    }

    /// Mutes or unmutes this TV's microphone in the current call.
    pub async fn set_muted(&self, muted: bool) -> Result<(), AgentError> {
        self.ask(|tx| Cmd::Mute(muted, tx))
            .await
            .unwrap_or(Err(AgentError::Off))
    }

    /// Other users' network state.
    pub async fn query(&self, users: Vec<UserId>) -> Result<Vec<UserState>, AgentError> {
        self.ask(|tx| Cmd::Query(users, tx))
            .await
            .unwrap_or(Err(AgentError::Off))
    }

    /// The missed calls presented since power-on.
    pub async fn missed(&self) -> Vec<MissedCall> {
        self.ask(Cmd::Missed).await.unwrap_or_default()
    }

    /// Tells the server that these cached calls have been shown (printed and flushed,
    /// or kept where the viewer will see them), so it stops delivering them: the
    /// presenter's call with [`MissedKeeping::WhenShown`].
    pub async fn shown(&self, call_ids: Vec<CallId>) -> Result<(), AgentError> {
        self.ask(|tx| Cmd::Shown(call_ids, tx))
            .await
            .unwrap_or(Err(AgentError::Off))
    }

    /// Empties the missed-call list (and its file).
    pub async fn clear_missed(&self) -> Result<(), AgentError> {
        self.ask(Cmd::ClearMissed)
            .await
            .unwrap_or(Err(AgentError::Off))
    }

    /// Current state.
    pub async fn status(&self) -> Option<Status> {
        self.ask(Cmd::Status).await
    }

    /// Powers off: ends a call, closes the control link (server records offline), then
    /// the media socket.
    pub async fn power_off(&self) {
        let _ = self.ask(Cmd::PowerOff).await;
    }
}

enum Call {
    Idle,
    RingingOut {
        call_id: CallId,
        callee: UserId,
        callee_media: SocketAddr,
    },
    RingingIn {
        call_id: CallId,
        caller: UserId,
        caller_media: SocketAddr,
    },
    Active {
        call_id: CallId,
        peer: UserId,
        media: MediaSession,
    },
}

struct Core {
    cfg: AgentConfig,
    media_port: u16,
    link: LinkHandle,
    socket: Arc<UdpSocket>,
    events: broadcast::Sender<AgentEvent>,
    call: Call,
    missed: Vec<MissedCall>,
    registered: bool,
    /// When the current call state began (Unix ms), so a UI opened mid-call shows the
    /// right duration.
    call_since_ms: i64,
}

/// Drops the oldest missed calls beyond [`MAX_MISSED_KEPT`].
fn keep_newest(missed: &mut Vec<MissedCall>) {
    let excess = missed.len().saturating_sub(MAX_MISSED_KEPT);
    missed.drain(..excess);
}

/// Now as Unix milliseconds.
fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

impl Core {
    fn set_call(&mut self, call: Call) {
        self.call = call;
        self.call_since_ms = now_ms();
    }

    fn emit(&self, e: AgentEvent) {
        tracing::debug!(event = ?e, "agent event");
        let _ = self.events.send(e);
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut link_events: mpsc::Receiver<LinkEvent>,
    ) {
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => { self.shutdown().await; return; }
                    Some(Cmd::PowerOff(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd).await,
                },
                ev = link_events.recv() => match ev {
                    None => return,
                    Some(ev) => self.link_event(ev).await,
                },
            }
        }
    }

    async fn shutdown(&mut self) {
        if !matches!(self.call, Call::Idle) {
            let _ = self.hang_up().await;
        }
        self.link.power_off().await;
        // The media socket closes when the core (its last owner) is dropped, after the
        // control link.
        self.emit(AgentEvent::PoweredOff);
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Dial(callee, tx) => {
                let r = self.dial(callee).await;
                let _ = tx.send(r);
            }
            Cmd::Answer(tx) => {
                let r = self.answer().await;
                let _ = tx.send(r);
            }
            Cmd::Reject(tx) => {
                let r = self.reject().await;
                let _ = tx.send(r);
            }
            Cmd::HangUp(tx) => {
                let r = self.hang_up().await;
                let _ = tx.send(r);
            }
            Cmd::Query(users, tx) => {
                let r = match self.link.request(Request::QueryState { users }).await {
                    Ok(Reply::States(s)) => Ok(s),
                    Ok(_) => Err(AgentError::NoCall),
                    Err(e) => Err(e.into()),
                };
                let _ = tx.send(r);
            }
            Cmd::Missed(tx) => {
                let _ = tx.send(self.missed.clone());
            }
            Cmd::Shown(ids, tx) => {
                let _ = tx.send(self.acknowledge(&ids).await);
            }
            Cmd::ClearMissed(tx) => {
                let r = self.save_missed(Vec::new()).await;
                if r.is_ok() {
                    self.missed.clear();
                    self.emit(AgentEvent::MissedCleared);
                }
                let _ = tx.send(r);
            }
            Cmd::Status(tx) => {
                let (call_state, call_id, peer) = match &self.call {
                    Call::Idle => ("idle", None, None),
                    Call::RingingOut {
                        call_id, callee, ..
                    } => ("ringing_out", Some(*call_id), Some(*callee)),
                    Call::RingingIn {
                        call_id, caller, ..
                    } => ("ringing_in", Some(*call_id), Some(*caller)),
                    Call::Active { call_id, peer, .. } => ("in_call", Some(*call_id), Some(*peer)),
                };
                let muted = matches!(&self.call, Call::Active { media, .. } if media.muted());
                let _ = tx.send(Status {
                    user: self.cfg.user,
                    registered: self.registered,
                    call_state,
                    call_id,
                    peer,
                    since_ms: self.call_since_ms,
                    muted,
                });
            }
            Cmd::Mute(muted, tx) => {
                let r = match &self.call {
                    Call::Active { call_id, media, .. } => {
                        media.set_muted(muted);
                        let call_id = *call_id;
                        self.emit(AgentEvent::Muted { call_id, muted });
                        Ok(())
                    }
                    _ => Err(AgentError::NoCall),
                };
                let _ = tx.send(r);
            }
            Cmd::PowerOff(_) => {}
        }
    }

    async fn dial(&mut self, callee: UserId) -> DialResult {
        if !matches!(self.call, Call::Idle) {
            return DialResult::AlreadyInCall;
        }
        let result = match self.link.request(Request::Dial { callee }).await {
            Ok(Reply::Dial(DialOutcome::Ringing {
                call_id,
                callee_media,
            })) => {
                self.set_call(Call::RingingOut {
                    call_id,
                    callee,
                    callee_media,
                });
                self.emit(AgentEvent::Ringing { call_id, callee });
                return DialResult::Ringing(call_id);
            }
            Ok(Reply::Dial(DialOutcome::Cached { call_id })) => {
                self.emit(AgentEvent::Cached { call_id, callee });
                return DialResult::Cached(call_id);
            }
            Ok(Reply::Dial(DialOutcome::Busy { call_id })) => DialResult::Busy(call_id),
            Ok(other) => DialResult::Failed(format!("unexpected reply {other:?}")),
            Err(e) => match e.code() {
                Some(ErrorCode::UNKNOWN_USER) => DialResult::UnknownUser,
                Some(ErrorCode::ALREADY_IN_CALL) => DialResult::AlreadyInCall,
                Some(_) => DialResult::Failed(e.to_string()),
                None => DialResult::Unreachable(e.to_string()),
            },
        };
        let message = match &result {
            DialResult::Busy(_) => format!("{callee} is in another call"),
            DialResult::UnknownUser => format!("{callee} is not a known TV"),
            DialResult::Unreachable(m) | DialResult::Failed(m) => m.clone(),
            _ => String::new(),
        };
        self.emit(AgentEvent::DialFailed {
            callee,
            outcome: result.outcome().into(),
            message,
        });
        result
    }

    fn start_media(&self, peer_media: SocketAddr) -> Result<MediaSession, AgentError> {
        // Drop whatever reached the socket between calls, so the new call's stream is
        // the first one the session sees.
        let mut scratch = [0u8; 1500];
        while self.socket.try_recv_from(&mut scratch).is_ok() {}
        let source =
            open_source(&self.cfg.audio_in).map_err(|e| AgentError::Media(format!("{e:#}")))?;
        let sink =
            open_sink(&self.cfg.audio_out).map_err(|e| AgentError::Media(format!("{e:#}")))?;
        MediaSession::start(
            Arc::clone(&self.socket),
            MediaParams::voice(peer_media),
            source,
            sink,
        )
        .map_err(|e| AgentError::Media(format!("{e:#}")))
    }

    async fn answer(&mut self) -> Result<(), AgentError> {
        let Call::RingingIn {
            call_id,
            caller,
            caller_media,
        } = self.call
        else {
            return Err(AgentError::NoCall);
        };
        // Media first, so the first words of the caller are not lost.
        let media = self.start_media(caller_media)?;
        if let Err(e) = self.link.request(Request::Answer { call_id }).await {
            let _ = media.stop().await;
            self.set_call(Call::Idle);
            self.emit(AgentEvent::Ended {
                call_id,
                peer: caller,
                outcome: "answer_failed".into(),
                quality: None,
            });
            return Err(e.into());
        }
        self.set_call(Call::Active {
            call_id,
            peer: caller,
            media,
        });
        self.emit(AgentEvent::Answered {
            call_id,
            peer: caller,
            peer_media: caller_media.to_string(),
        });
        Ok(())
    }

    async fn reject(&mut self) -> Result<(), AgentError> {
        let Call::RingingIn {
            call_id, caller, ..
        } = self.call
        else {
            return Err(AgentError::NoCall);
        };
        self.set_call(Call::Idle);
        let r = self.link.request(Request::Reject { call_id }).await;
        self.emit(AgentEvent::Ended {
            call_id,
            peer: caller,
            outcome: "rejected".into(),
            quality: None,
        });
        r.map(|_| ()).map_err(Into::into)
    }

    async fn hang_up(&mut self) -> Result<(), AgentError> {
        let (call_id, peer) = match &self.call {
            Call::Idle => return Err(AgentError::NoCall),
            Call::RingingIn { .. } => return self.reject().await,
            Call::RingingOut {
                call_id, callee, ..
            } => (*call_id, *callee),
            Call::Active { call_id, peer, .. } => (*call_id, *peer),
        };
        let quality = self.end_local().await;
        let r = self.link.request(Request::HangUp { call_id }).await;
        self.emit(AgentEvent::Ended {
            call_id,
            peer,
            outcome: "hung_up".into(),
            quality,
        });
        // The server may have ended the call already (peer hung up at the same moment).
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::NO_SUCH_CALL) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops local media (if any), logs call quality, and goes idle.
    async fn end_local(&mut self) -> Option<CallQuality> {
        self.call_since_ms = now_ms();
        match std::mem::replace(&mut self.call, Call::Idle) {
            Call::Active { call_id, media, .. } => match media.stop().await {
                Ok(q) => {
                    tracing::info!(
                        call_id,
                        seconds = format!("{:.1}", q.seconds),
                        sent = q.packets_sent,
                        received = q.packets_received,
                        loss_pct = format!("{:.1}", q.loss_pct),
                        jitter_ms = format!("{:.1}", q.jitter_ms),
                        rtt_ms = ?q.rtt_ms,
                        fec_recovered = q.fec_recovered,
                        concealed = q.concealed,
                        "call quality"
                    );
                    Some(q)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "media ended with an error");
                    None
                }
            },
            _ => None,
        }
    }

    fn current_call(&self) -> Option<(CallId, UserId)> {
        match &self.call {
            Call::Idle => None,
            Call::RingingOut {
                call_id, callee, ..
            } => Some((*call_id, *callee)),
            Call::RingingIn {
                call_id, caller, ..
            } => Some((*call_id, *caller)),
            Call::Active { call_id, peer, .. } => Some((*call_id, *peer)),
        }
    }

    async fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Registered(r) => {
                self.registered = true;
                self.emit(AgentEvent::Registered {
                    user: self.cfg.user,
                    observed_ip: r.observed_ip.to_string(),
                    media_port: self.media_port,
                });
                self.fetch_cached().await;
            }
            LinkEvent::Down { reason, retry_in } => {
                self.registered = false;
                // The server ends our call when our link goes; end it here as well.
                if let Some((call_id, peer)) = self.current_call() {
                    let quality = self.end_local().await;
                    self.emit(AgentEvent::Ended {
                        call_id,
                        peer,
                        outcome: "link_lost".into(),
                        quality,
                    });
                }
                self.emit(AgentEvent::LinkDown {
                    reason,
                    retry_in_ms: retry_in.as_millis() as u64,
                });
            }
            LinkEvent::Server(Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                ..
            }) => {
                if matches!(self.call, Call::Idle) {
                    self.set_call(Call::RingingIn {
                        call_id,
                        caller,
                        caller_media,
                    });
                    self.emit(AgentEvent::Incoming { call_id, caller });
                } else {
                    // One call at a time.
                    let _ = self.link.request(Request::Reject { call_id }).await;
                }
            }
            LinkEvent::Server(Event::CallAnswered { call_id }) => {
                if let Call::RingingOut {
                    call_id: id,
                    callee,
                    callee_media,
                } = self.call
                {
                    if id == call_id {
                        match self.start_media(callee_media) {
                            Ok(media) => {
                                self.set_call(Call::Active {
                                    call_id,
                                    peer: callee,
                                    media,
                                });
                                self.emit(AgentEvent::Answered {
                                    call_id,
                                    peer: callee,
                                    peer_media: callee_media.to_string(),
                                });
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start media; hanging up");
                                let _ = self.hang_up().await;
                            }
                        }
                    }
                }
            }
            LinkEvent::Server(Event::CallEnded { call_id, reason }) => {
                if let Some((id, peer)) = self.current_call() {
                    if id == call_id {
                        let quality = self.end_local().await;
                        let outcome = match reason {
                            EndReason::HungUp { by } if by == self.cfg.user => "hung_up",
                            EndReason::HungUp { .. } => "hung_up_by_peer",
                            EndReason::NoAnswer => "no_answer",
                            EndReason::Rejected => "rejected",
                            EndReason::PeerLost => "peer_lost",
                            EndReason::ServerShutdown => "server_shutdown",
                        };
                        self.emit(AgentEvent::Ended {
                            call_id,
                            peer,
                            outcome: outcome.into(),
                            quality,
                        });
                    }
                }
            }
            LinkEvent::Server(Event::CachedCallsWaiting { .. }) => self.fetch_cached().await,
        }
    }

    /// Writes the missed-call list to its file, if it has one.
    async fn save_missed(&self, missed: Vec<MissedCall>) -> Result<(), AgentError> {
        let MissedKeeping::File(path) = &self.cfg.missed else {
            return Ok(());
        };
        let path = path.clone();
        tokio::task::spawn_blocking(move || crate::files::write_json(&path, &missed))
            .await
            .map_err(|e| AgentError::Save(e.to_string()))?
            .map_err(|e| AgentError::Save(e.to_string()))
    }

    /// Fetches every cached call, presents them, then acknowledges them. A failure
    /// leaves them on the server, to be fetched again.
    async fn fetch_cached(&mut self) {
        let mut calls = Vec::new();
        let mut after = 0;
        loop {
            match self
                .link
                .request(Request::FetchCached {
                    after,
                    limit: shared_proto::MAX_PAGE as u16,
                })
                .await
            {
                Ok(Reply::Cached(page)) => {
                    if let Some(last) = page.calls.last() {
                        after = last.call_id;
                    }
                    calls.extend(page.calls);
                    if !page.more {
                        break;
                    }
                }
                Ok(_) | Err(_) => {
                    tracing::warn!(
                        "cannot fetch cached calls now; will retry at next registration"
                    );
                    return;
                }
            }
        }
        let presented: Vec<MissedCall> = calls.iter().map(MissedCall::from_wire).collect();
        for m in &presented {
            if !self.missed.iter().any(|x| x.call_id == m.call_id) {
                self.missed.push(m.clone());
            }
        }
        keep_newest(&mut self.missed);
        if self.cfg.missed == MissedKeeping::WhenShown {
            // Whoever shows them acknowledges them (`Agent::shown`), after showing.
            self.emit(AgentEvent::CachedCalls { calls: presented });
            return;
        }
        // Kept on the TV before the server forgets them; if that fails they stay on the
        // server and come again.
        let saved = self.save_missed(self.missed.clone()).await;
        self.emit(AgentEvent::CachedCalls { calls: presented });
        if let Err(e) = saved {
            tracing::warn!(error = %e, "cached calls not acknowledged");
            return;
        }
        let ids: Vec<CallId> = calls.iter().map(|c| c.call_id).collect();
        if let Err(e) = self.acknowledge(&ids).await {
            tracing::warn!(error = %e, "cannot acknowledge cached calls; they will come again");
        }
    }

    /// Marks cached calls delivered on the server, a page at a time.
    async fn acknowledge(&self, ids: &[CallId]) -> Result<(), AgentError> {
        for chunk in ids.chunks(shared_proto::MAX_PAGE) {
            self.link
                .request(Request::AckCached {
                    call_ids: chunk.to_vec(),
                })
                .await?;
        }
        Ok(())
    }
}
