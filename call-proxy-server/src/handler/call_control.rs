//! `Answer`, `Reject` and `HangUp`: move a live call through its states and record it.
//! An answer's SRTP key (the callee's sending key) goes to the caller in `CallAnswered`
//! and nowhere else: not into the record, not into a log line.
//!
//! A call another node holds (the caller is connected there) is acted on there: the
//! request goes to that node ([`crate::cluster::Cluster::control`]), which runs
//! [`apply`] on its stand-in for this TV, and its answer is this TV's.

use std::sync::Arc;

use shared_proto::{CallId, Reply, WireError};

use super::{record_end, storage_error, SessionKey};
use crate::clock::now_ms;
use crate::cluster::Control;
use crate::registry::MediaOffer;
use crate::server::Shared;
use crate::storage::{CallEnd, Store};

/// `me`'s `control` of call `call_id`, wherever the call is held.
pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
    control: Control,
) -> Result<Reply, WireError> {
    let remote = shared.cluster.as_ref().and_then(|c| {
        Some((
            c,
            shared
                .registry
                .remote_owner(me.user, me.session_id, call_id)?,
        ))
    });
    let Some((cluster, owner)) = remote else {
        return apply(shared, me, call_id, control).await;
    };
    let ends = !matches!(control, Control::Answer { .. });
    let r = cluster.control(owner, me, call_id, control).await;
    // Over there (rejected, hung up, or already gone): free this TV's slot here.
    if ends && r.is_ok()
        || r.as_ref()
            .is_err_and(|e| e.code == shared_proto::ErrorCode::NO_SUCH_CALL)
    {
        shared.registry.release_remote(me.user, call_id);
    }
    r.map(|()| Reply::Done)
}

/// `me`'s `control` of call `call_id`, held by this node (`me` may be a stand-in for a
/// TV on another node).
pub async fn apply<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
    control: Control,
) -> Result<Reply, WireError> {
    match control {
        Control::Answer { offer } => answer(shared, me, call_id, offer).await,
        Control::Reject => reject(shared, me, call_id).await,
        Control::HangUp => hang_up(shared, me, call_id).await,
    }
}

async fn answer<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
    offer: MediaOffer,
) -> Result<Reply, WireError> {
    let now = now_ms();
    let answered = shared
        .registry
        .answer_with_key(me.user, me.session_id, call_id, offer, now)?;
    shared
        .store
        .finish_call(
            CallEnd {
                id: call_id,
                outcome: answered.outcome,
                answered_at_ms: Some(now),
                ended_at_ms: None,
                at_ms: now,
            },
            answered.callee,
        )
        .await
        .map_err(storage_error)?;
    Ok(Reply::Done)
}

async fn reject<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
) -> Result<Reply, WireError> {
    let ended = shared.registry.reject(me.user, me.session_id, call_id)?;
    record_end(shared, ended).await.map_err(storage_error)?;
    Ok(Reply::Done)
}

async fn hang_up<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
) -> Result<Reply, WireError> {
    let ended = shared.registry.hang_up(me.user, me.session_id, call_id)?;
    record_end(shared, ended).await.map_err(storage_error)?;
    Ok(Reply::Done)
}
