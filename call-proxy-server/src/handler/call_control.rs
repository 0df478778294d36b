//! `Answer`, `Reject` and `HangUp`: move a live call through its states and record it.
//! An answer's SRTP key (the callee's sending key) goes to the caller in `CallAnswered`
//! and nowhere else: not into the record, not into a log line.

use std::sync::Arc;

use shared_proto::{CallId, Reply, SrtpKey, WireError};

use super::{record_end, storage_error, SessionKey};
use crate::clock::now_ms;
use crate::server::Shared;
use crate::storage::{CallEnd, Store};

pub async fn answer<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
    srtp: Option<SrtpKey>,
) -> Result<Reply, WireError> {
    let now = now_ms();
    let answered = shared
        .registry
        .answer_with_key(me.user, me.session_id, call_id, srtp, now)?;
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

pub async fn reject<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
) -> Result<Reply, WireError> {
    let ended = shared.registry.reject(me.user, me.session_id, call_id)?;
    record_end(shared, ended).await.map_err(storage_error)?;
    Ok(Reply::Done)
}

pub async fn hang_up<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    call_id: CallId,
) -> Result<Reply, WireError> {
    let ended = shared.registry.hang_up(me.user, me.session_id, call_id)?;
    record_end(shared, ended).await.map_err(storage_error)?;
    Ok(Reply::Done)
}
