//! Request handlers, one module per request kind. [`handle`] dispatches a decoded,
//! validated request of one connection and returns the reply to send.

mod ack;
mod call_control;
mod dial;
mod enroll;
mod fetch;
pub mod message;
pub mod presence;
mod query;
mod register;

use std::net::SocketAddr;
use std::sync::Arc;

use shared_proto::{ErrorCode, Event, Reply, Request, UserId, WireError};

use crate::clock::now_ms;
use crate::cluster::Control;
use crate::registry::{Ended, MediaOffer, PushRx};
use crate::server::Shared;
use crate::storage::{CallEnd, Store, StoreError};

/// Per-connection state the handlers read and change.
pub struct ConnState {
    /// The peer's address as seen on the control connection.
    pub peer: SocketAddr,
    /// Set once registered.
    pub session: Option<SessionKey>,
    /// The session's push queue, taken by the connection loop after registration.
    pub push_rx: Option<PushRx>,
    /// Set by `Bye`: close after replying.
    pub closing: bool,
    /// The TV certificate the TLS handshake established (`None` on plain TCP).
    pub identity: Option<crate::tls::TvIdentity>,
    /// The session asked for presence pushes (it may subscribe).
    pub wants_presence: bool,
    /// Set once this connection is a TV's transfer link (`OpenTransfer`): the user.
    pub transfer: Option<UserId>,
    /// The body a transfer link reads (`GetChunk`): message id and body name.
    pub reading: Option<(shared_proto::MessageId, String)>,
}

/// Which user and session a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionKey {
    /// The registered user.
    pub user: UserId,
    /// The session id given at registration.
    pub session_id: u64,
}

impl ConnState {
    /// The state of a fresh connection from `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        ConnState {
            peer,
            session: None,
            push_rx: None,
            closing: false,
            identity: None,
            wants_presence: false,
            transfer: None,
            reading: None,
        }
    }

    fn registered(&self) -> Result<SessionKey, WireError> {
        self.session.ok_or_else(|| {
            WireError::new(
                ErrorCode::NOT_REGISTERED,
                "register before any other request",
            )
        })
    }
}

/// Handles one request.
pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &mut ConnState,
    request: Request,
) -> Result<Reply, WireError> {
    request
        .validate()
        .map_err(|m| WireError::new(ErrorCode::INVALID_ARGUMENT, m))?;
    match request {
        Request::Register(reg) => register::handle(shared, st, reg).await,
        Request::Heartbeat => {
            st.registered()?;
            Ok(Reply::HeartbeatAck {
                server_time_ms: now_ms(),
            })
        }
        Request::QueryState { users } => {
            st.registered()?;
            query::handle(shared, users).await
        }
        Request::Dial {
            callee,
            key,
            srtp,
            ice,
        } => {
            let offer = MediaOffer { srtp, ice };
            dial::handle(shared, st.registered()?, st.peer, callee, key, offer).await
        }
        Request::Answer { call_id, srtp, ice } => {
            let offer = MediaOffer { srtp, ice };
            control(shared, st.registered()?, call_id, Control::Answer { offer }).await
        }
        Request::IceServers => {
            let me = st.registered()?;
            Ok(Reply::IceServers(shared.ice.servers_for(me.user, now_ms())))
        }
        Request::Reject { call_id } => {
            control(shared, st.registered()?, call_id, Control::Reject).await
        }
        Request::HangUp { call_id } => {
            control(shared, st.registered()?, call_id, Control::HangUp).await
        }
        Request::FetchCached { after, limit } => {
            fetch::handle(shared, st.registered()?, after, limit).await
        }
        Request::AckCached { call_ids } => ack::handle(shared, st.registered()?, call_ids).await,
        Request::Bye => {
            st.closing = true;
            if st.session.is_some() {
                end_session(shared, st).await;
            }
            Ok(Reply::Done)
        }
        Request::StartEnrollment { agent_version } => {
            enroll::start(shared, st, agent_version).await
        }
        Request::PollEnrollment => enroll::poll(shared, st).await,
        Request::Subscribe { contacts, others } => {
            let me = st.registered()?;
            presence::subscribe(shared, st, me, contacts, others).await
        }
        Request::SetPresence {
            do_not_disturb,
            hidden,
        } => presence::set(shared, st.registered()?, do_not_disturb, hidden).await,
        Request::PresenceAck {
            subscription,
            seq,
            status,
        } => {
            // The connection loop takes these without an answer; one arriving here
            // (through another path) is taken the same way and answered `Done`.
            presence::ack(shared, st, subscription, seq, status);
            Ok(Reply::Done)
        }
        Request::OpenTransfer { user_id } => message::open(shared, st, user_id).await,
        Request::SendMessage(m) => message::send(shared, st, m).await,
        Request::PutChunk { key, offset, bytes } => {
            message::put_chunk(shared, st, key, offset, bytes).await
        }
        Request::ListMessages { before, limit } => message::list(shared, st, before, limit).await,
        Request::GetChunk {
            message_id,
            offset,
            len,
        } => message::get_chunk(shared, st, message_id, offset, len).await,
        Request::AckMessages { message_ids } => {
            message::settle(shared, st, message_ids, crate::storage::Settle::Ack).await
        }
        Request::DeleteMessages { message_ids } => {
            message::settle(shared, st, message_ids, crate::storage::Settle::Delete).await
        }
    }
}

/// `me`'s answer, reject or hang-up of call `call_id`: here, or on the node that holds
/// the call.
pub async fn control<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: shared_proto::CallId,
    control: Control,
) -> Result<Reply, WireError> {
    call_control::handle(shared, me, call_id, control).await
}

/// The answer to a request kind this server does not know (a newer client): an
/// `UNSUPPORTED` error; the connection stays up.
pub fn unsupported(kind: u16) -> WireError {
    tracing::debug!(kind, "unsupported request kind");
    WireError::new(
        ErrorCode::UNSUPPORTED,
        format!("request kind {kind:#06x} is not supported by this server"),
    )
}

/// A storage failure as the TV sees it: nothing was acknowledged, try again.
pub fn storage_error(e: StoreError) -> WireError {
    match e {
        StoreError::Full(_) => {
            tracing::warn!(error = %e, "refused: storage full");
            storage_full()
        }
        e => {
            tracing::error!(error = %e, "storage failure");
            WireError::new(
                ErrorCode::INTERNAL,
                "the server could not store this; nothing was recorded, retry",
            )
        }
    }
}

/// The refusal of a request that needs a new record while the database's disk is full.
pub fn storage_full() -> WireError {
    WireError::new(
        ErrorCode::STORAGE_FULL,
        "the server's storage is full: nothing was recorded (no call was placed); try again later",
    )
}

/// Records how a live call changed, and tells the callee when it now has missed calls
/// waiting.
pub async fn record_end<S: Store>(shared: &Shared<S>, ended: Ended) -> Result<(), StoreError> {
    let now = now_ms();
    let end = CallEnd {
        id: ended.call_id,
        outcome: ended.outcome,
        answered_at_ms: ended.answered_at_ms,
        ended_at_ms: Some(now),
        at_ms: now,
    };
    let waiting = shared.store.finish_call(end, ended.callee).await?;
    shared.metrics.call_ended(ended.outcome);
    if ended.outcome.is_missed_kind() {
        let event = Event::CachedCallsWaiting { count: waiting };
        if !shared.registry.notify(ended.callee, event.clone()) {
            // A callee on another node (its stand-in here went with the call).
            if let Some(cluster) = &shared.cluster {
                cluster.push_anywhere(ended.callee, event).await;
            }
        }
    }
    Ok(())
}

/// Ends this connection's session: removes it from the registry if still current,
/// ends its call, and records the TV offline (flow 2).
pub async fn end_session<S: Store>(shared: &Shared<S>, st: &mut ConnState) {
    let Some(key) = st.session.take() else { return };
    st.push_rx = None;
    // Its subscription goes whether or not a newer session replaced it.
    shared
        .registry
        .presence()
        .unsubscribe(key.user, key.session_id);
    let Some(ended) = shared.registry.remove(key.user, key.session_id) else {
        // Replaced by a newer session of the same TV: that one owns the row now.
        return;
    };
    if let Some(ended) = ended {
        if let Err(e) = record_end(shared, ended).await {
            tracing::error!(error = %e, "cannot record the end of a call");
        }
    }
    if let Err(e) = shared
        .store
        .set_offline(key.user, key.session_id, now_ms())
        .await
    {
        tracing::error!(user = key.user, error = %e, "cannot record user offline");
    }
    tracing::debug!(user = key.user, session = key.session_id, "offline");
}
