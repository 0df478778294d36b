//! `FetchCached` (flow 6): a page of the calls that reached this TV while it could not
//! take them, each with its caller's current state. All of them have ended, so each is
//! a missed call; none is presented as ringing.

use std::sync::Arc;

use shared_proto::{CachedCall, CachedPage, CallId, MissedReason, NetState, Reply, WireError};

use super::{storage_error, SessionKey};
use crate::server::Shared;
use crate::storage::{Outcome, Store};

pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    after: CallId,
    limit: u16,
) -> Result<Reply, WireError> {
    let limit = usize::from(limit);
    let mut rows = shared
        .store
        .cached_calls(me.user, after, limit + 1)
        .await
        .map_err(storage_error)?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let calls = rows
        .into_iter()
        .map(|r| CachedCall {
            call_id: r.id,
            caller: r.caller,
            callee: r.callee,
            call_date_ms: r.at_ms,
            reason: match r.outcome {
                Outcome::Cached => MissedReason::Offline,
                Outcome::Busy => MissedReason::Busy,
                _ => MissedReason::NoAnswer,
            },
            caller_state: match r.caller_online {
                Some(true) => NetState::Online,
                Some(false) => NetState::Offline,
                None => NetState::Unknown,
            },
        })
        .collect();
    Ok(Reply::Cached(CachedPage { calls, more }))
}
