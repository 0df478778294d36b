//! `Dial` (flows 4 and 5): record the call in `user_call`, then ring an online callee
//! and give the caller its media address, or tell the caller the call is cached for an
//! offline callee. A cached (or busy) call's record is durable before the caller hears
//! "cached"; a live call's record is queued before the ring (a [`Store`] write is
//! queued when its method returns) and commits with the next group, so call set-up does
//! not wait for the disk.

use std::net::SocketAddr;
use std::sync::Arc;

use shared_proto::{CallId, DialOutcome, ErrorCode, Event, Reply, UserId, WireError};

use super::{record_end, storage_error, SessionKey};
use crate::clock::now_ms;
use crate::registry::{DialPlan, Ended, RingStart};
use crate::server::Shared;
use crate::storage::{InsertResult, NewCall, Outcome, Store};

pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    peer: SocketAddr,
    callee: UserId,
) -> Result<Reply, WireError> {
    let now = now_ms();
    let plan = shared
        .registry
        .plan_dial(me.user, me.session_id, callee, now)?;
    let (call_id, outcome) = match plan {
        DialPlan::Ring { call_id } => (call_id, Outcome::Ringing),
        DialPlan::Busy { call_id } => (call_id, Outcome::Busy),
        DialPlan::Offline { call_id } => (call_id, Outcome::Cached),
    };
    // `insert_call` queues the record before it returns (the `Store` write contract):
    // every later change of this call is queued after it.
    let insert = shared.store.insert_call(NewCall {
        id: call_id,
        caller: me.user,
        callee,
        at_ms: now,
        outcome,
        caller_ip: peer.ip(),
    });
    if outcome == Outcome::Ringing {
        // The record is queued (ahead of any later change to this call) and commits
        // with the next group; dropping its `Pending` does not cancel it, so the callee
        // rings without waiting for the disk. "Ringing"
        // acknowledges a live call, not a stored message: should the server die within
        // that commit, both TVs' links die with it.
        drop(insert);
        return ring(shared, me, callee, call_id).await;
    }
    let waiting = match insert.await {
        Ok(InsertResult::Recorded { callee_waiting }) => callee_waiting,
        Ok(InsertResult::UnknownCallee) => {
            return Err(WireError::new(
                ErrorCode::UNKNOWN_USER,
                format!("user {callee} does not exist"),
            ));
        }
        Err(e) => return Err(storage_error(e)),
    };
    match outcome {
        Outcome::Busy => {
            shared.metrics.call_ended(Outcome::Busy);
            shared
                .registry
                .notify(callee, Event::CachedCallsWaiting { count: waiting });
            Ok(Reply::Dial(DialOutcome::Busy { call_id }))
        }
        _ => {
            shared.metrics.call_ended(Outcome::Cached);
            // The callee may have come online while the record was written.
            shared
                .registry
                .notify(callee, Event::CachedCallsWaiting { count: waiting });
            Ok(Reply::Dial(DialOutcome::Cached { call_id }))
        }
    }
}

async fn ring<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    callee: UserId,
    call_id: CallId,
) -> Result<Reply, WireError> {
    let gone = |outcome| Ended {
        call_id,
        caller: me.user,
        callee,
        outcome,
        answered_at_ms: None,
    };
    match shared.registry.start_ringing(call_id) {
        RingStart::Ringing { callee_media } => {
            let timer_shared = Arc::clone(shared);
            let timeout = shared.config.ring_timeout();
            let timer = tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Some(ended) = timer_shared.registry.ring_timeout(call_id) {
                    if let Err(e) = record_end(&timer_shared, ended).await {
                        tracing::error!(call_id, error = %e, "cannot record a missed call");
                    }
                }
            });
            shared.registry.set_timer(call_id, timer.abort_handle());
            Ok(Reply::Dial(DialOutcome::Ringing {
                call_id,
                callee_media,
            }))
        }
        RingStart::CalleeGone => {
            record_end(shared, gone(Outcome::Cached))
                .await
                .map_err(storage_error)?;
            Ok(Reply::Dial(DialOutcome::Cached { call_id }))
        }
        RingStart::CallerGone => {
            record_end(shared, gone(Outcome::Missed))
                .await
                .map_err(storage_error)?;
            Err(WireError::new(
                ErrorCode::NOT_REGISTERED,
                "this session ended while the call was being placed",
            ))
        }
    }
}
