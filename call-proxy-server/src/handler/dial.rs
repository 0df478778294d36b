//! `Dial` (flows 4 and 5): record the call in `user_call`, then ring an online callee
//! and give the caller its media address, or tell the caller the call is cached for an
//! offline callee. No call rings and no caller hears "cached" or "busy" before the
//! call's record is durable: while the database's disk is full a dial is refused with
//! `STORAGE_FULL` and nothing rings (a live call's record costs one group commit,
//! ~1–3 ms, before the ring).
//!
//! A dial with an idempotency key is answered at most once per record: a key the caller
//! already used (within [`shared_proto::KEY_LIFETIME_MS`]) is answered from the first
//! call's record ([`replay`]) and nothing new is planned or stored; the store's keyed
//! insert is the arbiter when two dials with one key race.
//!
//! A callee connected to another node on the same database (several nodes) is reserved
//! there first (`cluster::Cluster::reserve`); the call is then planned, recorded and
//! rung here as for a TV of this node, its pushes carried to the callee's node (see
//! `registry/remote.rs`). That costs one database read (where is the callee?) and one
//! request to the other node, only when another node is alive and the callee is not
//! connected here.
//!
//! The caller's SRTP sending key (`Dial.srtp`, SDES style) goes into the live call the
//! plan makes and reaches the callee in `IncomingCall` when it rings; a busy or offline
//! dial drops it. It is never stored or logged. A retried dial ([`replay`]) carries its
//! key again: that key is dropped and the first dial's key stays, because the callee may
//! have been rung with it already (a caller sends the same key with every retry of one
//! dial, as it sends the same idempotency key).

use std::net::SocketAddr;
use std::sync::Arc;

use shared_proto::{
    CallId, DialOutcome, ErrorCode, Event, IdempotencyKey, Reply, UserId, WireError,
};

use super::{record_end, storage_error, SessionKey};
use crate::clock::now_ms;
use crate::registry::{DialPlan, Ended, MediaOffer, RemoteParty, Reserve, RingStart};
use crate::server::Shared;
use crate::storage::{InsertResult, KeyedCall, NewCall, Outcome, Store};

pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    peer: SocketAddr,
    callee: UserId,
    key: Option<IdempotencyKey>,
    offer: MediaOffer,
) -> Result<Reply, WireError> {
    let now = now_ms();
    if let Some(key) = key {
        let first = shared
            .store
            .keyed_call(me.user, key, now)
            .await
            .map_err(storage_error)?;
        if let Some(first) = first {
            // The retry's offer (SRTP key, ICE) is dropped here: the first dial's is the one the
            // callee has (or will get).
            return replay(shared, callee, first);
        }
    }
    if shared.store.metrics().is_full() {
        return Err(super::storage_full());
    }
    let mut plan =
        shared
            .registry
            .plan_dial_with_key(me.user, me.session_id, callee, offer.clone(), now)?;
    // Not connected here: perhaps to another node on the same database.
    let mut busy_at = None;
    if let (DialPlan::Offline { call_id }, Some(cluster)) = (&plan, &shared.cluster) {
        let call_id = *call_id;
        if let Some(slot) = cluster.locate(callee).await {
            match cluster.reserve(slot, call_id, me.user, callee).await {
                Reserve::Free { session_id, media } => {
                    let push = cluster.stand_in_queue(slot, callee, session_id);
                    let remote = RemoteParty {
                        slot,
                        session_id,
                        media,
                        push,
                    };
                    plan = shared.registry.plan_dial_to_remote(
                        (me.user, me.session_id),
                        callee,
                        call_id,
                        remote,
                        offer,
                        now,
                    )?;
                }
                Reserve::Busy => {
                    plan = DialPlan::Busy { call_id };
                    busy_at = Some(slot);
                }
                Reserve::Offline => {}
            }
        }
    }
    let (call_id, outcome) = match plan {
        DialPlan::Ring { call_id } => (call_id, Outcome::Ringing),
        DialPlan::Busy { call_id } => (call_id, Outcome::Busy),
        DialPlan::Offline { call_id } => (call_id, Outcome::Cached),
    };
    // `insert_keyed_call` queues the record before it returns (the `Store` write
    // contract): every later change of this call is queued after it. With a key, the
    // store also finds a first call with that key that this handler's read missed (a
    // retry racing its first dial), and records nothing.
    let recorded = shared
        .store
        .insert_keyed_call(
            NewCall {
                id: call_id,
                caller: me.user,
                callee,
                at_ms: now,
                outcome,
                caller_ip: peer.ip(),
            },
            key,
        )
        .await;
    if outcome == Outcome::Ringing && !matches!(recorded, Ok(InsertResult::Recorded { .. })) {
        // A live call whose record was not written (disk full, a key that did not
        // stick): it never rings.
        shared.registry.abandon(call_id);
    }
    let waiting = match recorded {
        Ok(InsertResult::Recorded { callee_waiting }) => callee_waiting,
        Ok(InsertResult::UnknownCallee) => {
            return Err(WireError::new(
                ErrorCode::UNKNOWN_USER,
                format!("user {callee} does not exist"),
            ));
        }
        Ok(InsertResult::AlreadyRecorded(first)) => return replay(shared, callee, first),
        Err(e) => return Err(storage_error(e)),
    };
    match outcome {
        Outcome::Ringing => ring(shared, me, callee, call_id).await,
        Outcome::Busy => {
            shared.metrics.call_ended(Outcome::Busy);
            let event = Event::CachedCallsWaiting { count: waiting };
            match (busy_at, &shared.cluster) {
                (Some(slot), Some(cluster)) => cluster.push(slot, callee, None, event),
                _ => {
                    shared.registry.notify(callee, event);
                }
            }
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

/// The answer to a dial whose key the caller used already: the first dial's reply, as
/// its record and the live call stand now. Nothing is planned or stored, and the live
/// call keeps the first dial's SRTP key (the one its callee was rung with).
///
/// - cached or busy: `Cached` / `Busy` with the first call id, as the first time;
/// - still live (ringing, or answered and not over): `Ringing` with the first call id
///   and the callee's media address, as the first time;
/// - rang and ended unanswered (`missed`; also a `ringing` row whose live call is gone,
///   which the start-up repair or the pending end record turns into `missed`): `Cached`
///   with the first call id: like a cached call, it waits for the callee as a missed
///   call, and nothing will ring;
/// - rang and ended otherwise (answered then hung up, or rejected): the error
///   `NO_SUCH_CALL` naming the call and its outcome: there is no call to join and no
///   dial outcome that says so;
/// - the key was used for a dial to someone else: `INVALID_ARGUMENT`.
fn replay<S: Store>(
    shared: &Arc<Shared<S>>,
    callee: UserId,
    first: KeyedCall,
) -> Result<Reply, WireError> {
    let call_id = first.id;
    if first.callee != callee {
        return Err(WireError::new(
            ErrorCode::INVALID_ARGUMENT,
            format!(
                "this idempotency key was used for call {call_id} to user {}, not {callee}",
                first.callee
            ),
        ));
    }
    tracing::debug!(
        call_id,
        outcome = first.outcome.as_str(),
        "dial retried with its key"
    );
    let ended = |outcome: Outcome| {
        Err(WireError::new(
            ErrorCode::NO_SUCH_CALL,
            format!(
                "call {call_id}, placed with this idempotency key, has ended ({})",
                outcome.as_str()
            ),
        ))
    };
    match first.outcome {
        Outcome::Cached | Outcome::Missed => Ok(Reply::Dial(DialOutcome::Cached { call_id })),
        Outcome::Busy => Ok(Reply::Dial(DialOutcome::Busy { call_id })),
        Outcome::Rejected => ended(Outcome::Rejected),
        // `start_ringing` of a call that rang already changes nothing and answers with
        // the callee's media address; of a call that is over, it finds nothing.
        live @ (Outcome::Ringing | Outcome::Answered) => {
            match shared.registry.start_ringing(call_id) {
                RingStart::Ringing { callee_media } => Ok(Reply::Dial(DialOutcome::Ringing {
                    call_id,
                    callee_media,
                })),
                _ if live == Outcome::Ringing => Ok(Reply::Dial(DialOutcome::Cached { call_id })),
                _ => ended(Outcome::Answered),
            }
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
