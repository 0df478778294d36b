//! The I/O shell around the call state machine: one task owns the agent's state (the
//! [`CallMachine`], the running media, the missed-call list), takes commands from
//! [`Agent`](super::Agent) handles, events from the control link and reports from its own
//! spawned tasks, and runs the machine's actions.
//!
//! Call requests (dial, answer, reject, hang up) are awaited here, one at a time, so a
//! call's steps keep their order. Round trips that can take long (fetching and
//! acknowledging cached calls, state queries) run as spawned tasks: a fetch reports back
//! through a channel, so answer and hang-up are never held up by it. Order kept: a fetch's
//! calls are merged, saved where the policy says, sent as `CachedCalls`, and only then
//! acknowledged.
//!
//! Each dial gets a fresh random idempotency key here. A dial whose reply was lost waits
//! in the machine (`Redialling`) without holding up the core: its caller's reply channel
//! is kept in [`Core::dial_waiting`], the retry timer is a spawned task reporting
//! [`Done::RetryDial`], and a registration of the link retries at once.
//!
//! SRTP keys (SDES style, RFC 4568, over the TLS control link) are kept here, never in
//! the call machine or its events: a dial makes a fresh sending key in
//! [`srtp::OFFERED_SUITE`] and sends it with every send of that dial (a retried dial
//! carries the same key, as it carries the same idempotency key); a ring brings the
//! caller's key, and answering makes a fresh key in the caller's suite; `CallAnswered`
//! brings the callee's key. Media starts with both ([`MediaParams::srtp`]), or as plain
//! RTP, with a warning, when the peer offered no key (an agent one release behind). The
//! keys go when the call does.
//!
//! ICE (issue 13): a TV that places or answers a call asks the server for its STUN and
//! TURN servers ([`Request::IceServers`]; an older server answers `UNSUPPORTED` and the
//! TV offers its host candidates only), gathers candidates on the media socket into the
//! call's [`CallTransport`] (host: the socket's address, or the one it reaches the server
//! from; server-reflexive: STUN's answers and the address the server saw) and sends them
//! with the dial or the answer, beside the SRTP key. The peer's come with the ring or
//! `CallAnswered`; media starts on the transport, which runs the checks and sends only on
//! the pair they confirm. A peer that offered none (one release behind) gets media at the
//! address the server saw, as before. The transport goes when the call does.
//!
//! Presence ([`super::presence`] holds the rules): a TV set up with presence subscribes
//! at every registration and whenever its address book or missed callers change (each
//! subscription a spawned request reporting [`Done::Subscribed`]); notifications are
//! applied here in order and acknowledged without waiting (the server answers none);
//! `PresenceLost` subscribes again at once. The viewer's "do not disturb" and "hide my
//! state" are kept in a file and sent again after every registration. For tests of the
//! server's recovery, `TV_AGENT_PRESENCE_FAULT=drop` sends no acknowledgements and
//! `=refuse` refuses every notification.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shared_proto::{
    CachedCall, CallId, DialOutcome, ErrorCode, Event, IceParams, IdempotencyKey, NetState,
    Presence, PresenceState, Reply, Request, SrtpKey, TurnServer, UserId, UserState,
};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;

use super::call::{Action, Call, CallMachine, DialReply, Input, Tell};
use super::events::AgentEvent;
use super::handle::{Cmd, Reply1};
use super::inbox::KeptMessage;
use super::missed::{AckWhen, MissedList};
use super::presence::{Applied, Subscribe, Watching};
use super::transfer::{TransferError, TransferLink};
use super::types::{
    now_ms, AgentConfig, AgentError, DialResult, MissedCall, PresenceChange, PresenceSettings,
    Status,
};
use crate::link::{LinkError, LinkEvent, LinkHandle};
use crate::media::ice::{IceState, Role};
use crate::media::srtp::{self, CallKeys};
use crate::media::transport::{CallTransport, TurnServerAddr};
use crate::media::{open_sink, open_source, CallQuality, MediaParams, MediaSession};

/// How long power-off waits for acknowledgements in flight before closing the link (an
/// acknowledgement cut off only means the calls come again).
const ACK_GRACE: Duration = Duration::from_secs(2);

/// How long after a refused subscription (rate limit, timeout) it is tried again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(5);
/// How long after a failed fetch of messages it is tried again.
const MESSAGES_RETRY: Duration = Duration::from_secs(5);
/// Largest presence settings file read at power-on.
const MAX_SETTINGS_FILE: u64 = 4096;

/// What a spawned task reports back to the core.
enum Done {
    /// A fetch of the cached calls ended: all of them, or `None` if it failed.
    Fetched(Option<Vec<CachedCall>>),
    /// A dial whose reply was lost may go again.
    RetryDial,
    /// The answer to a presence subscription.
    Subscribed(Result<Reply, LinkError>),
    /// A refused subscription may be tried again.
    RetrySubscribe,
    /// From a server without presence: the watched users' online state, asked once.
    Queried(Vec<UserState>),
    /// A fetch of waiting messages ended: the messages new to the TV, or why it failed
    /// (with whether to try again later).
    Messages(Result<Vec<KeptMessage>, (String, bool)>),
    /// A failed fetch of messages may be tried again.
    RetryMessages,
    /// The call's ICE checks found no path, or the path went (consent lost).
    NoMediaPath(CallId, IceState),
}

/// The test-only switch `TV_AGENT_PRESENCE_FAULT`: what happens to presence
/// acknowledgements, so tests can drive the server's recovery (section E).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckFault {
    /// Acknowledged (normal).
    None,
    /// Never acknowledged (`drop`).
    Drop,
    /// Refused (`refuse`).
    Refuse,
}

impl AckFault {
    fn from_env() -> AckFault {
        match std::env::var("TV_AGENT_PRESENCE_FAULT").as_deref() {
            Ok("drop") => {
                tracing::warn!("TV_AGENT_PRESENCE_FAULT=drop: presence notifications are not acknowledged (test switch)");
                AckFault::Drop
            }
            Ok("refuse") => {
                tracing::warn!("TV_AGENT_PRESENCE_FAULT=refuse: presence notifications are refused (test switch)");
                AckFault::Refuse
            }
            Ok(other) if !other.is_empty() => {
                tracing::warn!(
                    value = other,
                    "TV_AGENT_PRESENCE_FAULT is drop or refuse; ignored"
                );
                AckFault::None
            }
            _ => AckFault::None,
        }
    }
}

/// The command waiting for the machine's answer.
enum Pending {
    /// None (a server push or a power-off).
    None,
    /// A dial.
    Dial(oneshot::Sender<DialResult>),
    /// Answer, reject, hang up, mute.
    Unit(Reply1<()>),
}

impl Pending {
    fn reply(&mut self, r: Result<(), AgentError>) {
        if let Pending::Unit(tx) = std::mem::replace(self, Pending::None) {
            let _ = tx.send(r);
        }
    }

    fn reply_dial(&mut self, r: DialResult) {
        if let Pending::Dial(tx) = std::mem::replace(self, Pending::None) {
            let _ = tx.send(r);
        }
    }
}

/// The current call's SRTP keys, as they become known.
struct Keys {
    /// The call, once known (a dial learns it from the ringing reply).
    call_id: Option<CallId>,
    /// This TV's fresh sending key, sent with the dial (caller) or the answer (callee);
    /// `None` for a callee whose caller offered no key, or a suite this build lacks.
    local: Option<SrtpKey>,
    /// The peer's sending key, from `IncomingCall` or `CallAnswered`; `None` until
    /// then, or for good when the peer offered none (plain RTP).
    remote: Option<SrtpKey>,
    /// The peer's ICE credentials and candidates, from the same events; `None` until
    /// then, or for good for a peer without ICE.
    remote_ice: Option<Box<IceParams>>,
    /// Ours, once gathered (the callee's go with its answer).
    local_ice: Option<Box<IceParams>>,
}

impl Keys {
    /// Keys for a dial about to be sent.
    fn dial() -> Keys {
        Keys {
            call_id: None,
            local: srtp::fresh_key(srtp::OFFERED_SUITE),
            remote: None,
            remote_ice: None,
            local_ice: None,
        }
    }

    /// Keys for a call ringing here with the caller's `offer`: ours in its suite.
    fn incoming(call_id: CallId, offer: Option<SrtpKey>, ice: Option<Box<IceParams>>) -> Keys {
        Keys {
            call_id: Some(call_id),
            local: offer.as_ref().and_then(|o| srtp::fresh_key(o.suite)),
            remote: offer,
            remote_ice: ice,
            local_ice: None,
        }
    }
}

/// The core task's state.
pub(super) struct Core {
    /// How the agent was set up (user, audio devices).
    cfg: AgentConfig,
    /// The media port registered (bound or advertised).
    media_port: u16,
    /// Requests to the server.
    link: LinkHandle,
    /// The media socket, shared with each call's media session.
    socket: Arc<UdpSocket>,
    /// Where events go.
    events: broadcast::Sender<AgentEvent>,
    /// The call state (pure logic).
    machine: CallMachine,
    /// The running call's media, if any.
    media: Option<MediaSession>,
    /// The missed-call list and its keeping policy.
    missed: MissedList,
    /// Registered with the server now.
    registered: bool,
    /// A fetch of cached calls is running.
    fetching: bool,
    /// Another fetch was asked for while one ran: start it when that one ends.
    fetch_again: bool,
    /// Acknowledgements in flight, finished before the link closes at power-off.
    acks: JoinSet<()>,
    /// For spawned tasks to report back.
    done_tx: mpsc::Sender<Done>,
    /// Their reports.
    done_rx: mpsc::Receiver<Done>,
    /// The caller of a dial being retried (the machine is `Redialling`): answered when
    /// the machine answers the dial.
    dial_waiting: Option<oneshot::Sender<DialResult>>,
    /// The current call's SRTP keys (dialling, ringing or in a call); `None` when idle.
    keys: Option<Keys>,
    /// The current call's transport on the media socket (ICE), from gathering at the
    /// dial or answer until media starts on it; `None` when idle.
    transport: Option<CallTransport>,
    /// The IP the server sees this TV at (its NAT's outside address), from the last
    /// registration.
    observed_ip: Option<IpAddr>,
    /// Presence, for a TV set up with it.
    watching: Option<Watching>,
    /// The address book's users (watched, and who may see this TV).
    contacts: Vec<UserId>,
    /// The others watched besides the missed callers.
    watch_others: Vec<UserId>,
    /// The viewer's presence settings.
    settings: PresenceSettings,
    /// The viewer has set them (this power-on or before): sent at every registration.
    settings_known: bool,
    /// The test switch for acknowledgements.
    fault: AckFault,
    /// A fetch of waiting messages is running.
    fetching_messages: bool,
    /// More messages arrived while one ran: fetch again when it ends.
    messages_again: bool,
}

impl Core {
    /// A core for a just-bound socket and just-started link.
    pub(super) fn new(
        cfg: AgentConfig,
        media_port: u16,
        link: LinkHandle,
        socket: Arc<UdpSocket>,
        events: broadcast::Sender<AgentEvent>,
        missed: MissedList,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::channel(8);
        // Warns at power-on if the SRTP key log is on.
        let _ = srtp::Keylog::from_env();
        let (watching, contacts, watch_others, settings) = match &cfg.presence {
            Some(p) => (
                Some(Watching::default()),
                p.contacts.clone(),
                p.others.clone(),
                p.settings_file.as_deref().map(load_settings),
            ),
            None => (None, Vec::new(), Vec::new(), None),
        };
        let settings_known = matches!(settings, Some(Some(_)));
        let mut core = Core {
            machine: CallMachine::new(cfg.user, now_ms()),
            cfg,
            media_port,
            link,
            socket,
            events,
            media: None,
            missed,
            registered: false,
            fetching: false,
            fetch_again: false,
            acks: JoinSet::new(),
            done_tx,
            done_rx,
            dial_waiting: None,
            keys: None,
            transport: None,
            observed_ip: None,
            watching,
            contacts,
            watch_others,
            settings: settings.flatten().unwrap_or_default(),
            settings_known,
            fault: AckFault::None,
            fetching_messages: false,
            messages_again: false,
        };
        if core.watching.is_some() {
            core.fault = AckFault::from_env();
            let _ = core.watch_list_changed();
        }
        core
    }

    fn emit(&self, e: AgentEvent) {
        tracing::debug!(event = ?e, "agent event");
        let _ = self.events.send(e);
    }

    /// Runs until powered off (or every handle and the link are gone).
    pub(super) async fn run(
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
                Some(done) = self.done_rx.recv() => match done {
                    Done::Fetched(calls) => self.fetched(calls).await,
                    Done::RetryDial => self.step(Input::RetryDial, Pending::None).await,
                    Done::Subscribed(r) => self.subscribed(r).await,
                    Done::Queried(states) => self.queried(states).await,
                    Done::Messages(r) => self.messages_fetched(r),
                    Done::RetryMessages => self.start_messages(),
                    Done::NoMediaPath(call_id, state) => {
                        // Only about the call still going on.
                        if self.machine.view().1 == Some(call_id) && self.media.is_some() {
                            let message = if state == IceState::Failed {
                                "The call connected but no sound can reach the other TV: the network between the two TVs lets no media through."
                            } else {
                                "The sound of this call has stopped reaching the other TV: the network between the two TVs changed or went away."
                            };
                            tracing::warn!(call_id, ?state, "{message}");
                            self.emit(AgentEvent::NoMedia {
                                call_id,
                                message: message.into(),
                            });
                        }
                    }
                    Done::RetrySubscribe => {
                        if self.watching.as_ref().is_some_and(Watching::wants_retry) {
                            let list = self.watching.as_mut().and_then(Watching::registered);
                            self.subscribe(list);
                        }
                    }
                },
            }
        }
    }

    async fn shutdown(&mut self) {
        if self.machine.view().1.is_some() {
            self.step(Input::HangUp, Pending::None).await;
        }
        let acks = &mut self.acks;
        let _ = tokio::time::timeout(ACK_GRACE, async {
            while acks.join_next().await.is_some() {}
        })
        .await;
        self.link.power_off().await;
        // The media socket closes when the core (its last owner) is dropped, after the
        // control link.
        self.emit(AgentEvent::PoweredOff);
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Dial(callee, tx) => {
                let key = rand::random::<IdempotencyKey>();
                // (A dial while in a call is refused by the machine: keep that call's.)
                if matches!(self.machine.call(), Call::Idle) {
                    self.keys = Some(Keys::dial());
                }
                self.step(Input::Dial(callee, key), Pending::Dial(tx)).await
            }
            Cmd::Answer(tx) => self.step(Input::Answer, Pending::Unit(tx)).await,
            Cmd::Reject(tx) => self.step(Input::Reject, Pending::Unit(tx)).await,
            Cmd::HangUp(tx) => self.step(Input::HangUp, Pending::Unit(tx)).await,
            Cmd::Mute(muted, tx) => self.step(Input::Mute(muted), Pending::Unit(tx)).await,
            Cmd::Query(users, tx) => {
                let link = self.link.clone();
                tokio::spawn(async move {
                    let r = match link.request(Request::QueryState { users }).await {
                        Ok(Reply::States(s)) => Ok(s),
                        Ok(_) => Err(AgentError::NoCall),
                        Err(e) => Err(e.into()),
                    };
                    let _ = tx.send(r);
                });
            }
            Cmd::Missed(tx) => {
                let _ = tx.send(self.missed.calls().to_vec());
            }
            Cmd::Shown(ids, tx) => {
                let link = self.link.clone();
                tokio::spawn(async move {
                    let _ = tx.send(acknowledge(&link, &ids).await);
                });
            }
            Cmd::ClearMissed(tx) => {
                let r = self.missed.save(Vec::new()).await;
                if r.is_ok() {
                    self.missed.clear();
                    self.emit(AgentEvent::MissedCleared);
                    let list = self.watch_list_changed();
                    self.subscribe(list);
                }
                let _ = tx.send(r);
            }
            Cmd::Status(tx) => {
                let (call_state, call_id, peer) = self.machine.view();
                let _ = tx.send(Status {
                    user: self.cfg.user,
                    registered: self.registered,
                    call_state,
                    call_id,
                    peer,
                    since_ms: self.machine.since_ms(),
                    muted: self.machine.muted(),
                    do_not_disturb: self.settings.do_not_disturb,
                    hidden: self.settings.hidden,
                });
            }
            Cmd::Presence(tx) => {
                let _ = tx.send(
                    self.watching
                        .as_ref()
                        .map(Watching::states)
                        .unwrap_or_default(),
                );
            }
            Cmd::SetContacts(contacts, tx) => {
                let r = if self.watching.is_some() {
                    self.contacts = contacts;
                    let list = self.watch_list_changed();
                    self.subscribe(list);
                    Ok(())
                } else {
                    Err(AgentError::NoPresence)
                };
                let _ = tx.send(r);
            }
            Cmd::SetPresence(change, tx) => {
                let r = self.set_presence(change).await;
                let _ = tx.send(r);
            }
            Cmd::PowerOff(_) => {}
        }
    }

    async fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Registered(r) => {
                self.registered = true;
                self.observed_ip = Some(r.observed_ip);
                self.emit(AgentEvent::Registered {
                    user: self.cfg.user,
                    observed_ip: r.observed_ip.to_string(),
                    media_port: self.media_port,
                });
                self.start_fetch();
                if let Some(w) = self.watching.as_mut() {
                    let list = w.registered();
                    self.subscribe(list);
                    if self.settings_known {
                        self.send_settings();
                    }
                }
                // A dial whose reply was lost goes again now.
                self.step(Input::RetryDial, Pending::None).await;
            }
            LinkEvent::Down { reason, retry_in } => {
                self.registered = false;
                if let Some(w) = self.watching.as_mut() {
                    w.link_down();
                }
                // The server ends our call when our link goes; end it here as well.
                self.step(Input::LinkDown, Pending::None).await;
                self.emit(AgentEvent::LinkDown {
                    allowance_exhausted: reason.starts_with(crate::link::ALLOWANCE_REASON),
                    reason,
                    retry_in_ms: retry_in.as_millis() as u64,
                });
            }
            LinkEvent::Server(Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                srtp,
                ice,
                ..
            }) => {
                // Only an idle TV rings; a second call is rejected and keeps no keys.
                if matches!(self.machine.call(), Call::Idle) {
                    self.keys = Some(Keys::incoming(call_id, srtp, ice));
                }
                let input = Input::Incoming {
                    call_id,
                    caller,
                    caller_media,
                };
                self.step(input, Pending::None).await;
            }
            LinkEvent::Server(Event::CallAnswered { call_id, srtp, ice }) => {
                if let Some(k) = self.keys.as_mut().filter(|k| k.call_id == Some(call_id)) {
                    k.remote = srtp;
                    k.remote_ice = ice;
                }
                self.step(Input::PeerAnswered(call_id), Pending::None).await;
            }
            LinkEvent::Server(Event::CallEnded { call_id, reason }) => {
                self.step(Input::Ended(call_id, reason), Pending::None)
                    .await;
            }
            LinkEvent::Server(Event::CachedCallsWaiting { .. }) => self.start_fetch(),
            LinkEvent::Server(Event::MessagesWaiting { .. }) => self.start_messages(),
            LinkEvent::Server(Event::PresenceChanged {
                subscription,
                seq,
                changes,
            }) => {
                if let Some(w) = self.watching.as_mut() {
                    let applied = w.changed(subscription, seq, &changes);
                    self.show_presence(applied).await;
                }
            }
            LinkEvent::Server(Event::PresenceLost {
                subscription,
                reason,
            }) => {
                if let Some(w) = self.watching.as_mut() {
                    tracing::warn!(subscription, %reason, "the server ended our presence subscription; subscribing again");
                    let list = w.lost(subscription);
                    self.emit(AgentEvent::PresenceLost { reason });
                    self.subscribe(list);
                }
            }
        }
    }

    /// The watch list as it is now (contacts; the others asked for, then the missed
    /// callers, newest first), given to the presence rules: the subscription to send if
    /// it changed.
    fn watch_list_changed(&mut self) -> Option<Subscribe> {
        let me = self.cfg.user;
        let mut others = self.watch_others.clone();
        others.extend(self.missed.calls().iter().rev().map(|m| m.user_id));
        others.retain(|u| *u != me);
        let contacts: Vec<UserId> = self.contacts.iter().copied().filter(|u| *u != me).collect();
        self.watching.as_mut()?.set_watch_list(&contacts, &others)
    }

    /// Sends `list` as a subscription, if there is one to send.
    fn subscribe(&self, list: Option<Subscribe>) {
        let Some(Subscribe { contacts, others }) = list else {
            return;
        };
        let link = self.link.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let r = link.request(Request::Subscribe { contacts, others }).await;
            let _ = done.send(Done::Subscribed(r)).await;
        });
    }

    /// The answer to a subscription.
    async fn subscribed(&mut self, r: Result<Reply, LinkError>) {
        let Some(w) = self.watching.as_mut() else {
            return;
        };
        match r {
            Ok(Reply::Subscribed(s)) => {
                let applied = w.subscribed(s);
                self.show_presence(applied).await;
            }
            Err(e) if e.code() == Some(ErrorCode::UNSUPPORTED) => {
                // A server one release behind: no pushes. Show each state once, as it
                // answers a query, and ask no more until the next registration.
                w.refused(true);
                tracing::info!("the server has no presence pushes; states are asked once");
                let users: Vec<UserId> = w.watched().take(shared_proto::MAX_QUERY_USERS).collect();
                self.query_once(users);
            }
            Err(LinkError::NotConnected | LinkError::Closed) => w.refused(false),
            other => {
                let why = match other {
                    Ok(reply) => format!("unexpected reply {reply:?}"),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(error = %why, "presence subscription refused; trying again later");
                w.refused(false);
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                    let _ = done.send(Done::RetrySubscribe).await;
                });
            }
        }
    }

    /// From a server without presence: each watched user's online state, asked once.
    fn query_once(&self, users: Vec<UserId>) {
        if users.is_empty() {
            return;
        }
        let link = self.link.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            if let Ok(Reply::States(states)) = link.request(Request::QueryState { users }).await {
                let _ = done.send(Done::Queried(states)).await;
            }
        });
    }

    /// The answer to [`Core::query_once`]: shown as a full state.
    async fn queried(&mut self, states: Vec<UserState>) {
        let shown = states
            .iter()
            .map(|s| {
                let state = match s.state {
                    NetState::Online => PresenceState::ONLINE,
                    NetState::Offline => PresenceState::OFFLINE,
                    NetState::Unknown => PresenceState::UNKNOWN,
                };
                let p = Presence {
                    user_id: s.user_id,
                    state,
                    since_ms: None,
                };
                (p, 0)
            })
            .collect();
        let applied = Applied {
            shown,
            full: true,
            ..Applied::default()
        };
        let Some(w) = self.watching.as_mut() else {
            return;
        };
        w.remember(&applied.shown);
        self.show_presence(applied).await;
    }

    /// Shows what a notification or a subscription's answer brought, then acknowledges
    /// it (as the test switch allows) and sends the next subscription, if any.
    async fn show_presence(&mut self, applied: Applied) {
        for (p, seq) in &applied.shown {
            self.emit(AgentEvent::Presence {
                user: p.user_id,
                state: p.state.into(),
                seq: *seq,
                full: applied.full,
            });
        }
        if let Some((subscription, seq)) = applied.ack {
            let status = match self.fault {
                AckFault::None => Some(ErrorCode::OK),
                AckFault::Drop => None,
                AckFault::Refuse => Some(ErrorCode::INTERNAL),
            };
            if let Some(status) = status {
                let ack = Request::PresenceAck {
                    subscription,
                    seq,
                    status,
                };
                // Not answered; if the link is gone the subscription went with it.
                let _ = self.link.send(ack).await;
            }
        }
        self.subscribe(applied.subscribe);
    }

    /// Applies the viewer's change to "do not disturb" or "hide my state": kept in the
    /// settings file, then told to the server (now if registered, else at registration).
    async fn set_presence(
        &mut self,
        change: PresenceChange,
    ) -> Result<PresenceSettings, AgentError> {
        if self.watching.is_none() {
            return Err(AgentError::NoPresence);
        }
        let mut next = self.settings;
        if let Some(on) = change.do_not_disturb {
            next.do_not_disturb = on;
        }
        if let Some(on) = change.hidden {
            next.hidden = on;
        }
        if self.registered {
            let r = self
                .link
                .request(Request::SetPresence {
                    do_not_disturb: next.do_not_disturb,
                    hidden: next.hidden,
                })
                .await;
            match r {
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::UNSUPPORTED) => {
                    return Err(AgentError::Unsupported(
                        "the server does not support do not disturb or hiding the TV's state",
                    ))
                }
                // Not connected after all: sent at the next registration.
                Err(LinkError::NotConnected | LinkError::Timeout) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(path) = self
            .cfg
            .presence
            .as_ref()
            .and_then(|p| p.settings_file.clone())
        {
            tokio::task::spawn_blocking(move || crate::files::write_json(&path, &next))
                .await
                .map_err(|e| AgentError::SaveSettings(e.to_string()))?
                .map_err(|e| AgentError::SaveSettings(e.to_string()))?;
        }
        self.settings = next;
        self.settings_known = true;
        self.emit(AgentEvent::PresenceSettings {
            do_not_disturb: next.do_not_disturb,
            hidden: next.hidden,
        });
        Ok(next)
    }

    /// Sends the viewer's settings after a registration (a new session starts without
    /// "do not disturb").
    fn send_settings(&self) {
        let link = self.link.clone();
        let request = Request::SetPresence {
            do_not_disturb: self.settings.do_not_disturb,
            hidden: self.settings.hidden,
        };
        tokio::spawn(async move {
            if let Err(e) = link.request(request).await {
                tracing::warn!(error = %e, "cannot send the presence settings to the server");
            }
        });
    }

    /// Feeds `input` to the call machine and runs its actions (and those of the inputs
    /// they feed back), answering `pending`.
    async fn step(&mut self, input: Input, mut pending: Pending) {
        let mut queue: VecDeque<Action> = self.machine.handle(input, now_ms()).into();
        while let Some(action) = queue.pop_front() {
            let Some(next) = self.act(action, &mut pending).await else {
                continue;
            };
            for a in self.machine.handle(next, now_ms()).into_iter().rev() {
                queue.push_front(a);
            }
        }
        // A dial left unanswered waits for its retry; keep its caller.
        if let Pending::Dial(tx) = std::mem::replace(&mut pending, Pending::None) {
            if matches!(self.machine.call(), Call::Redialling { .. }) {
                self.dial_waiting = Some(tx);
            }
        }
        // No call, no keys, no transport.
        if matches!(self.machine.call(), Call::Idle) {
            self.keys = None;
            self.transport = None;
        }
    }

    /// Runs one action; returns the input it feeds back, if any.
    async fn act(&mut self, action: Action, pending: &mut Pending) -> Option<Input> {
        match action {
            Action::Emit(e) => self.emit(e),
            Action::SendDial { callee, key } => {
                // Every send of this dial carries the same SRTP key and candidates.
                let srtp = self.keys.as_ref().and_then(|k| k.local.clone());
                if self.transport.is_none() && self.cfg.ice {
                    self.transport = Some(self.gather(Role::Controlling).await);
                }
                let ice = self
                    .transport
                    .as_ref()
                    .and_then(CallTransport::local_params)
                    .map(Box::new);
                let r = self
                    .link
                    .request(Request::Dial {
                        callee,
                        key: Some(key),
                        srtp,
                        ice,
                    })
                    .await;
                let reply = dial_reply(r);
                if let (DialReply::Ringing(call_id, _), Some(k)) = (&reply, self.keys.as_mut()) {
                    k.call_id = Some(*call_id);
                }
                if let DialReply::Other(DialResult::Unreachable(reason)) = &reply {
                    tracing::info!(callee, %reason, "no reply to a dial; it may be retried with its key");
                }
                return Some(Input::Dialled(reply));
            }
            Action::RetryDialIn(ms) => {
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = done.send(Done::RetryDial).await;
                });
            }
            Action::StartMedia(peer) => {
                return Some(match self.start_media(peer).await {
                    Ok(()) => Input::MediaStarted,
                    Err(e) => Input::MediaFailed(e),
                });
            }
            Action::SendAnswer(call_id) => {
                // Our key only to a caller that offered one (an older one sends plain).
                let srtp = self
                    .keys
                    .as_ref()
                    .filter(|k| k.call_id == Some(call_id) && k.remote.is_some())
                    .and_then(|k| k.local.clone());
                // Candidates (gathered as media started) only to a caller that offered
                // some (an older one has no ICE).
                let ice = self
                    .keys
                    .as_ref()
                    .filter(|k| k.call_id == Some(call_id) && k.remote_ice.is_some())
                    .and_then(|k| k.local_ice.clone());
                let r = self
                    .link
                    .request(Request::Answer { call_id, srtp, ice })
                    .await;
                return Some(Input::AnswerSent(r.map(|_| ()).map_err(Into::into)));
            }
            Action::SetMuted(muted) => {
                if let Some(m) = &self.media {
                    m.set_muted(muted);
                }
            }
            Action::EndCall {
                call_id,
                peer,
                outcome,
                tell,
            } => {
                let quality = self.stop_media(call_id).await;
                if let Some(tell) = tell {
                    let r = match tell {
                        Tell::Reject => self.link.request(Request::Reject { call_id }).await,
                        Tell::HangUp => self.link.request(Request::HangUp { call_id }).await,
                    };
                    pending.reply(match r {
                        Ok(_) => Ok(()),
                        // The server may have ended the call already (peer hung up at the
                        // same moment).
                        Err(e)
                            if tell == Tell::HangUp
                                && e.code() == Some(ErrorCode::NO_SUCH_CALL) =>
                        {
                            Ok(())
                        }
                        Err(e) => Err(e.into()),
                    });
                }
                self.emit(AgentEvent::Ended {
                    call_id,
                    peer,
                    outcome,
                    quality,
                });
            }
            Action::RejectOther(call_id) => {
                let link = self.link.clone();
                tokio::spawn(async move {
                    let _ = link.request(Request::Reject { call_id }).await;
                });
            }
            Action::ReplyDial(r) => match (pending, self.dial_waiting.take()) {
                (p @ Pending::Dial(_), waiting) => {
                    // A second dial while one is retried: answer the one asking now.
                    self.dial_waiting = waiting;
                    p.reply_dial(r);
                }
                (_, Some(tx)) => {
                    let _ = tx.send(r);
                }
                (p, None) => p.reply_dial(r),
            },
            Action::Reply(r) => pending.reply(r),
        }
        None
    }

    async fn start_media(&mut self, peer_media: SocketAddr) -> Result<(), String> {
        if let Some(old) = self.media.take() {
            let _ = old.stop().await;
        }
        let peer_has_ice = self.keys.as_ref().is_some_and(|k| k.remote_ice.is_some());
        let transport = match self.transport.take() {
            // The caller gathered at the dial.
            Some(t) => t,
            // The callee gathers now, before it answers (media starts first, then the
            // answer carries the candidates).
            None if peer_has_ice && self.cfg.ice => self.gather(Role::Controlled).await,
            None => {
                self.drain_socket();
                CallTransport::fixed(Arc::clone(&self.socket), peer_media)
            }
        };
        // The peer's candidates start the checks; a peer without them gets media at the
        // address the server saw.
        if let Some(k) = self.keys.as_mut() {
            k.local_ice = transport.local_params().map(Box::new);
        }
        let remote_ice = self.keys.as_ref().and_then(|k| k.remote_ice.as_deref());
        transport.set_remote(remote_ice, peer_media);
        let srtp = self.media_keys()?;
        let source = open_source(&self.cfg.audio_in).map_err(|e| format!("{e:#}"))?;
        let sink = open_sink(&self.cfg.audio_out).map_err(|e| format!("{e:#}"))?;
        let media = MediaSession::start_on(
            transport,
            MediaParams {
                srtp,
                ..MediaParams::voice(peer_media)
            },
            source,
            sink,
        )
        .map_err(|e| format!("{e:#}"))?;
        // Tell the viewer when no path works, instead of leaving them in silence.
        if let Some(call_id) = self.machine.view().1 {
            let mut ice = media.watch_ice();
            let done = self.done_tx.clone();
            tokio::spawn(async move {
                while ice.changed().await.is_ok() {
                    let state = *ice.borrow_and_update();
                    if let Some(s @ (IceState::Failed | IceState::Disconnected)) = state {
                        let _ = done.send(Done::NoMediaPath(call_id, s)).await;
                    }
                }
            });
        }
        self.media = Some(media);
        Ok(())
    }

    /// Drops whatever reached the media socket between calls, so the new call's first
    /// datagrams are its own.
    fn drain_socket(&self) {
        let mut scratch = [0u8; 1500];
        while self.socket.try_recv_from(&mut scratch).is_ok() {}
    }

    /// Gathers this TV's candidates for a call in `role` into a new transport: asks the
    /// server for its STUN servers (none from an older server), then host and
    /// server-reflexive candidates (see the module's documentation).
    async fn gather(&mut self, role: Role) -> CallTransport {
        let (stun_urls, turn_servers) = match self.link.request(Request::IceServers).await {
            Ok(Reply::IceServers(s)) if s.check().is_ok() => (s.stun, s.turn),
            Ok(_) => (Vec::new(), Vec::new()),
            Err(e) => {
                if e.code() != Some(ErrorCode::UNSUPPORTED) {
                    tracing::info!(error = %e, "no ICE servers for this call; host candidates only");
                }
                (Vec::new(), Vec::new())
            }
        };
        let local = self
            .socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], self.media_port)));
        let servers = resolve(&[self.cfg.server.as_str()], local.is_ipv4()).await;
        let hosts = host_addresses(local, servers.first().copied());
        let stun_hostports: Vec<&str> = stun_urls
            .iter()
            .filter_map(|u| crate::media::gather::url_host_port(u, &["stun"]))
            .collect();
        let stun = resolve(&stun_hostports, local.is_ipv4()).await;
        // The address the server saw with the registered port (a forwarded one, or
        // the socket's own when the NAT keeps ports): a server-reflexive guess the
        // checks confirm or not.
        let seen: Vec<SocketAddr> = self
            .observed_ip
            .filter(|ip| ip.is_ipv4() == local.is_ipv4() && !hosts.iter().any(|h| h.ip() == *ip))
            .map(|ip| SocketAddr::new(ip, self.media_port))
            .into_iter()
            .collect();
        let turn = turn_over_udp(&turn_servers, local.is_ipv4()).await;
        self.drain_socket();
        let t = CallTransport::gather(
            Arc::clone(&self.socket),
            role,
            &hosts,
            &seen,
            &stun,
            turn,
            &servers,
        )
        .await;
        if let Some(p) = t.local_params() {
            tracing::debug!(candidates = ?p.candidates, "gathered ICE candidates");
        }
        t
    }

    /// The SRTP keys for the current call's media: both directions, or `None` (plain
    /// RTP) when the peer offered no key. Refuses (the call does not start) rather than
    /// fall back to plain RTP when a key is there but unusable.
    fn media_keys(&self) -> Result<Option<CallKeys>, String> {
        let current = self.machine.view().1;
        let keys = self
            .keys
            .as_ref()
            .filter(|k| k.call_id.is_some() && k.call_id == current);
        let (Some(call_id), Some(k)) = (current, keys) else {
            return Err("no SRTP keys for this call".into());
        };
        match (&k.local, &k.remote) {
            (Some(local), Some(remote)) => Ok(Some(CallKeys {
                call_id,
                send: local.clone(),
                recv: remote.clone(),
            })),
            (_, None) => {
                tracing::warn!(
                    call_id,
                    "the other TV offered no SRTP key (an older agent): this call's media is plain RTP, unencrypted"
                );
                Ok(None)
            }
            (None, Some(remote)) => Err(format!(
                "the other TV's SRTP suite {} is not one this agent has",
                remote.suite.0
            )),
        }
    }

    /// Stops the call's media (if any) and logs its quality.
    async fn stop_media(&mut self, call_id: CallId) -> Option<CallQuality> {
        match self.media.take()?.stop().await {
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
                    other_streams = q.other_streams,
                    srtp = q.srtp,
                    srtp_auth_failed = q.srtp_auth_failed,
                    srtp_replayed = q.srtp_replayed,
                    "call quality"
                );
                Some(q)
            }
            Err(e) => {
                tracing::warn!(error = %e, "media ended with an error");
                None
            }
        }
    }

    /// Starts fetching the cached calls in a task of its own (one at a time).
    fn start_fetch(&mut self) {
        if self.fetching {
            self.fetch_again = true;
            return;
        }
        self.fetching = true;
        let link = self.link.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let calls = fetch_all(&link).await;
            let _ = done.send(Done::Fetched(calls)).await;
        });
    }

    /// Starts taking the waiting messages into the TV's inbox on a transfer link of its
    /// own (one fetch at a time; the control link is not involved).
    fn start_messages(&mut self) {
        let Some(inbox) = self.cfg.inbox.clone() else {
            return;
        };
        if self.fetching_messages {
            self.messages_again = true;
            return;
        }
        self.fetching_messages = true;
        let mut link_cfg = crate::link::LinkConfig::new(self.cfg.server.clone(), self.cfg.user, 0);
        link_cfg.transport = self.cfg.transport.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let result = async {
                let mut link = TransferLink::open(&link_cfg).await?;
                super::inbox::fetch_into(&mut link, &inbox, |_| Ok(())).await
            }
            .await
            .map_err(|e| {
                let again = matches!(e, TransferError::Link(_) | TransferError::File(_));
                (e.to_string(), again)
            });
            let _ = done.send(Done::Messages(result)).await;
        });
    }

    /// A fetch of messages ended: tells the screen, or tries again later.
    fn messages_fetched(&mut self, result: Result<Vec<KeptMessage>, (String, bool)>) {
        self.fetching_messages = false;
        match result {
            Ok(messages) => {
                if !messages.is_empty() {
                    self.emit(AgentEvent::Messages { messages });
                }
            }
            Err((why, again)) => {
                tracing::warn!(error = %why, "cannot fetch messages; they wait on the server");
                if again {
                    let done = self.done_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(MESSAGES_RETRY).await;
                        let _ = done.send(Done::RetryMessages).await;
                    });
                }
            }
        }
        if std::mem::take(&mut self.messages_again) {
            self.start_messages();
        }
    }

    /// A fetch ended: presents its calls, then acknowledges them as the policy allows.
    async fn fetched(&mut self, calls: Option<Vec<CachedCall>>) {
        self.fetching = false;
        if let Some(calls) = calls {
            self.present(&calls).await;
        }
        if std::mem::take(&mut self.fetch_again) {
            self.start_fetch();
        }
    }

    async fn present(&mut self, calls: &[CachedCall]) {
        let presented: Vec<MissedCall> = calls.iter().map(MissedCall::from_wire).collect();
        let ids: Vec<CallId> = calls.iter().map(|c| c.call_id).collect();
        self.missed.merge(&presented);
        // New missed callers are watched too.
        let list = self.watch_list_changed();
        self.subscribe(list);
        match self.missed.after_fetch() {
            // Whoever shows them acknowledges them (`Agent::shown`), after showing.
            AckWhen::ByPresenter => self.emit(AgentEvent::CachedCalls { calls: presented }),
            AckWhen::AfterEmitting => {
                self.emit(AgentEvent::CachedCalls { calls: presented });
                self.spawn_ack(ids);
            }
            AckWhen::AfterSaving(_) => {
                // Kept on the TV before the server forgets them; if that fails they stay
                // on the server and come again.
                let saved = self.missed.save(self.missed.calls().to_vec()).await;
                self.emit(AgentEvent::CachedCalls { calls: presented });
                match saved {
                    Ok(()) => self.spawn_ack(ids),
                    Err(e) => tracing::warn!(error = %e, "cached calls not acknowledged"),
                }
            }
        }
    }

    fn spawn_ack(&mut self, ids: Vec<CallId>) {
        // Forget the acknowledgements that are done.
        while self.acks.try_join_next().is_some() {}
        if ids.is_empty() {
            return;
        }
        let link = self.link.clone();
        self.acks.spawn(async move {
            if let Err(e) = acknowledge(&link, &ids).await {
                tracing::warn!(error = %e, "cannot acknowledge cached calls; they will come again");
            }
        });
    }
}

/// The settings kept at `path`: `None` when the viewer never set them (no file).
fn load_settings(path: &std::path::Path) -> Option<PresenceSettings> {
    if !path.exists() {
        return None;
    }
    match crate::files::read_json::<PresenceSettings>(path, MAX_SETTINGS_FILE) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the presence settings");
            None
        }
    }
}

/// The server's answer to a dial, for the machine.
fn dial_reply(r: Result<Reply, LinkError>) -> DialReply {
    match r {
        Ok(Reply::Dial(DialOutcome::Ringing {
            call_id,
            callee_media,
        })) => DialReply::Ringing(call_id, callee_media),
        Ok(Reply::Dial(DialOutcome::Cached { call_id })) => {
            DialReply::Other(DialResult::Cached(call_id))
        }
        Ok(Reply::Dial(DialOutcome::Busy { call_id })) => {
            DialReply::Other(DialResult::Busy(call_id))
        }
        Ok(other) => DialReply::Other(DialResult::Failed(format!("unexpected reply {other:?}"))),
        Err(e) => DialReply::Other(match e.code() {
            Some(ErrorCode::UNKNOWN_USER) => DialResult::UnknownUser,
            Some(ErrorCode::ALREADY_IN_CALL) => DialResult::AlreadyInCall,
            Some(ErrorCode::STORAGE_FULL) => DialResult::StorageFull,
            Some(_) => DialResult::Failed(e.to_string()),
            None => DialResult::Unreachable(e.to_string()),
        }),
    }
}

/// The socket addresses `host:port` names resolve to, of one family, each once (at most
/// eight in all); names that do not resolve within a second are left out (a call does
/// not wait on a slow resolver).
async fn resolve(names: &[&str], ipv4: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for name in names {
        let lookup = tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(*name));
        let Ok(Ok(addrs)) = lookup.await else {
            tracing::info!(name, "cannot resolve; left out");
            continue;
        };
        for a in addrs.filter(|a| a.is_ipv4() == ipv4) {
            if !out.contains(&a) && out.len() < 8 {
                out.push(a);
            }
        }
    }
    out
}

/// The first TURN server of `servers` reachable over UDP (a `turn:` URL without
/// `transport=tcp`), resolved, with its credentials. TURN over TCP or TLS is not offered
/// by this agent yet.
async fn turn_over_udp(servers: &[TurnServer], ipv4: bool) -> Option<TurnServerAddr> {
    for s in servers {
        for url in &s.urls {
            let Some(hp) = shared_proto::IceUrl::parse(url)
                .filter(|u| u.scheme == "turn" && u.transport.is_none_or(|t| t == "udp"))
                .map(|u| u.host_port)
            else {
                continue;
            };
            if let Some(addr) = resolve(&[hp], ipv4).await.first() {
                return Some(TurnServerAddr {
                    addr: *addr,
                    username: s.username.clone(),
                    password: s.credential.clone(),
                });
            }
        }
    }
    None
}

/// The media socket's host candidates: its own address, or, bound to every interface,
/// the address it reaches `server` from (asked of the kernel's routing with an
/// unconnected-then-connected UDP socket; nothing is sent).
fn host_addresses(local: SocketAddr, server: Option<SocketAddr>) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let routed = server.and_then(|server| {
        let probe = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).ok()?;
        probe.connect(server).ok()?;
        probe.local_addr().ok()
    });
    routed
        .map(|a| vec![SocketAddr::new(a.ip(), local.port())])
        .unwrap_or_default()
}

/// Fetches every cached call, a page at a time (the paging rule of `control-client`);
/// `None` if a page failed (they stay on the server, to be fetched at the next
/// registration).
async fn fetch_all(link: &LinkHandle) -> Option<Vec<CachedCall>> {
    match control_client::fetch_all_cached(|req| link.request(req)).await {
        Ok(calls) => Some(calls),
        Err(e) => {
            tracing::warn!(error = %e, "cannot fetch cached calls now; will retry at next registration");
            None
        }
    }
}

/// Marks cached calls delivered on the server, a page at a time.
async fn acknowledge(link: &LinkHandle, ids: &[CallId]) -> Result<(), AgentError> {
    for req in control_client::ack_requests(ids) {
        link.request(req).await?;
    }
    Ok(())
}
