//! [`Agent`], the handle UIs, the control API and the scripted modes hold: each method
//! sends one command to the core task ([`super::core`]) and waits for its answer.

use std::net::SocketAddr;
use std::sync::Arc;

use shared_proto::{CallId, Presence, UserId, UserState};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::core::Core;
use super::events::AgentEvent;
use super::media_socket::bind_media;
use super::messenger::Messenger;
use super::missed::MissedList;
use super::types::{
    AgentConfig, AgentError, DialResult, MissedCall, PresenceChange, PresenceSettings, Status,
};
use crate::link::{self, LinkConfig};

/// A command's reply channel.
pub(super) type Reply1<T> = oneshot::Sender<Result<T, AgentError>>;

/// A command to the core task.
pub(super) enum Cmd {
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
    Presence(oneshot::Sender<Vec<Presence>>),
    SetContacts(Vec<UserId>, Reply1<()>),
    SetPresence(PresenceChange, Reply1<PresenceSettings>),
    PowerOff(oneshot::Sender<()>),
}

/// A running agent. Commands go to its core task.
#[derive(Clone)]
pub struct Agent {
    /// To the core task.
    cmds: mpsc::Sender<Cmd>,
    /// The core's events, for new subscriptions.
    events: broadcast::Sender<AgentEvent>,
    /// The bound media socket's address.
    media_addr: SocketAddr,
    /// Messages, for a TV that keeps them ([`AgentConfig::inbox`]).
    messenger: Option<Messenger>,
}

impl Agent {
    /// Powers on: binds the media socket, then starts the control link. Returns the
    /// agent and a subscription that sees every event from the very first.
    pub async fn power_on(
        cfg: AgentConfig,
    ) -> anyhow::Result<(Agent, broadcast::Receiver<AgentEvent>)> {
        let missed = MissedList::load(cfg.missed.clone())?;
        let socket = bind_media(cfg.media_bind)?;
        let media_addr = socket.local_addr()?;
        let media_port = cfg.advertise_port.unwrap_or(media_addr.port());
        let mut link_cfg = LinkConfig::new(cfg.server.clone(), cfg.user, media_port);
        link_cfg.transport = cfg.transport.clone();
        let messenger = cfg.inbox.clone().map(|inbox| {
            let mut transfer = LinkConfig::new(cfg.server.clone(), cfg.user, 0);
            transfer.transport = cfg.transport.clone();
            Messenger::new(transfer, inbox, cfg.audio_in.clone())
        });
        let (link, link_events) = link::spawn(link_cfg);
        let (events, first) = broadcast::channel(1024);
        let (cmds, cmd_rx) = mpsc::channel(64);
        let core = Core::new(
            cfg,
            media_port,
            link,
            Arc::new(socket),
            events.clone(),
            missed,
        );
        tokio::spawn(core.run(cmd_rx, link_events));
        Ok((
            Agent {
                cmds,
                events,
                media_addr,
                messenger,
            },
            first,
        ))
    }

    /// The bound media socket address.
    pub fn media_addr(&self) -> SocketAddr {
        self.media_addr
    }

    /// The TV's messages, if it keeps them.
    pub fn messenger(&self) -> Option<&Messenger> {
        self.messenger.as_ref()
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
    /// presenter's call with [`MissedKeeping::WhenShown`](super::MissedKeeping::WhenShown).
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

    /// The watched users' states as last heard (contacts first, then missed callers).
    pub async fn presence(&self) -> Vec<Presence> {
        self.ask(Cmd::Presence).await.unwrap_or_default()
    }

    /// The address book changed: these users are watched (and may see this TV) now.
    pub async fn set_contacts(&self, contacts: Vec<UserId>) -> Result<(), AgentError> {
        self.ask(|tx| Cmd::SetContacts(contacts, tx))
            .await
            .unwrap_or(Err(AgentError::Off))
    }

    /// Turns "do not disturb" or "hide my state" on or off; the settings as they are now.
    pub async fn set_presence(
        &self,
        change: PresenceChange,
    ) -> Result<PresenceSettings, AgentError> {
        self.ask(|tx| Cmd::SetPresence(change, tx))
            .await
            .unwrap_or(Err(AgentError::Off))
    }

    /// Powers off: ends a call, closes the control link (server records offline), then
    /// the media socket.
    pub async fn power_off(&self) {
        let _ = self.ask(Cmd::PowerOff).await;
    }
}
