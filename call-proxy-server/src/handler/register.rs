//! `Register` (flow 1): record the TV online at the IP the server observes, with its
//! media port, then make it the user's live session. On a node behind the dispatcher,
//! the connection must carry the dispatcher's token for this node, TV and user
//! ([`check_token`]; how TLS binds it: [`crate::dispatch`]).

use std::net::SocketAddr;
use std::sync::Arc;

use shared_proto::{ErrorCode, Register, Registered, Reply, WireError};

use super::{record_end, storage_error, ConnState, SessionKey};
use crate::clock::now_ms;
use crate::server::Shared;
use crate::storage::{RegisterResult, Registration, Store};

pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &mut ConnState,
    reg: Register,
) -> Result<Reply, WireError> {
    if st.session.is_some() {
        return Err(WireError::new(
            ErrorCode::ALREADY_REGISTERED,
            "this connection is registered already",
        ));
    }
    super::enroll::authenticate(shared, st, reg.user_id).await?;
    check_token(shared, st, reg.user_id)?;
    let ip = st.peer.ip().to_canonical();
    let session_id = shared.registry.new_session_id();
    let now = now_ms();
    let result = shared
        .store
        .register(Registration {
            user_id: reg.user_id,
            ip,
            media_port: reg.media_port,
            session_id,
            agent_version: reg.agent_version,
            at_ms: now,
            create_unknown: shared.config.create_unknown_users,
        })
        .await
        .map_err(storage_error)?;
    let cached_waiting = match result {
        RegisterResult::Online { cached_waiting } => cached_waiting,
        RegisterResult::UnknownUser => {
            return Err(WireError::new(
                ErrorCode::UNKNOWN_USER,
                format!("user {} is not provisioned on this server", reg.user_id),
            ))
        }
        RegisterResult::Superseded => {
            return Err(WireError::new(
                ErrorCode::SESSION_REPLACED,
                "a newer registration of this user is already recorded",
            ))
        }
    };
    let (push_tx, push_rx) = crate::registry::push_channel();
    let media = SocketAddr::new(ip, reg.media_port);
    let installed = shared
        .registry
        .install(reg.user_id, session_id, media, push_tx)?;
    st.session = Some(SessionKey {
        user: reg.user_id,
        session_id,
    });
    st.push_rx = Some(push_rx);
    // Registered: the fingerprint is all the session needs of its certificate (for
    // revocation); the certificate itself (an enrollment's business) is not kept in
    // every idle TV's state.
    if let Some(identity) = st.identity.as_mut() {
        identity.cert = Vec::new();
        identity.token = None;
    }
    shared.metrics.registered(installed.replaced);
    if let Some(ended) = installed.ended {
        if let Err(e) = record_end(shared, ended).await {
            tracing::error!(error = %e, "cannot record the end of the replaced session's call");
        }
    }
    tracing::debug!(user = reg.user_id, session_id, %media, replaced = installed.replaced, "registered");
    announce_messages(shared, reg.user_id, session_id);
    Ok(Reply::Registered(Registered {
        session_id,
        observed_ip: ip,
        heartbeat_interval_ms: u32::try_from(shared.config.heartbeat_interval_ms)
            .unwrap_or(u32::MAX),
        server_time_ms: now,
        cached_waiting,
    }))
}

/// On a node configured with the dispatcher's public key, the connection's token must
/// admit `user` here now; without that setting, nothing to check (a node alone).
pub(super) fn check_token<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &ConnState,
    user: shared_proto::UserId,
) -> Result<(), WireError> {
    let Some(key) = shared.config.dispatch_public_key.as_ref() else {
        return Ok(());
    };
    let result = match st.identity.as_ref() {
        None => Err(crate::dispatch::TokenError::Missing),
        Some(identity) => match identity.token.as_deref() {
            None => Err(crate::dispatch::TokenError::Missing),
            Some(token) => crate::dispatch::Token::verify(
                token,
                key,
                &shared.config.node_id,
                user,
                &identity.fingerprint,
                now_ms(),
            )
            .map(|_| ()),
        },
    };
    result.map_err(|e| {
        shared.metrics.auth_failures.inc();
        tracing::info!(peer = %st.peer, tv = ?st.identity, user, reason = %e, "registration refused");
        WireError::new(ErrorCode::UNAUTHENTICATED, e.to_string())
    })
}

/// Tells a freshly registered TV how many messages wait for it (`MessagesWaiting`, to
/// a session that asked for them), from a task of its own so the registration's answer
/// waits for no extra read.
fn announce_messages<S: Store>(
    shared: &Arc<Shared<S>>,
    user: shared_proto::UserId,
    session_id: u64,
) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        match shared.store.mailbox(user).await {
            Ok(m) if m.waiting > 0 => {
                shared.registry.deliver(
                    user,
                    session_id,
                    shared_proto::Event::MessagesWaiting { count: m.waiting },
                );
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(user, error = %e, "cannot count waiting messages"),
        }
    });
}
