//! Presence requests: `Subscribe` (privacy and phone facts read from the store, the
//! TV's address book stored when it changed, then the registry's presence table),
//! `SetPresence` (do not disturb, hide my state), `PresenceAck` (not answered), and the
//! sweeper that fails late notifications and raises the alarms of section E.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_proto::{ErrorCode, Reply, UserId, WireError};

use super::{storage_error, ConnState, SessionKey};
use crate::clock::now_ms;
use crate::registry::presence::{AckResult, Failure, FailureAction};
use crate::server::Shared;
use crate::storage::{NewAlarm, Store};

/// How often late notifications are looked for and full TV queues retried.
pub const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// `Subscribe`: watch `contacts` (the TV's address book, also who may see it) and
/// `others`.
pub async fn subscribe<S: Store>(
    shared: &Arc<Shared<S>>,
    st: &ConnState,
    me: SessionKey,
    contacts: Vec<UserId>,
    others: Vec<UserId>,
) -> Result<Reply, WireError> {
    if !st.wants_presence {
        shared.metrics.presence_refused.inc();
        return Err(WireError::new(
            ErrorCode::INVALID_ARGUMENT,
            "this connection did not ask for presence pushes (preamble feature PRESENCE)",
        ));
    }
    let mut book = contacts.clone();
    book.sort_unstable();
    book.dedup();
    book.retain(|u| *u != me.user);
    let mut users = contacts;
    users.extend(others);
    // This TV's own row too: whether its owner has a phone number now.
    let (rows, stored, own) = tokio::join!(
        shared.store.presence_view(me.user, users.clone()),
        shared.store.presence_book(me.user),
        shared.store.presence_view(me.user, vec![me.user])
    );
    let rows = rows.map_err(storage_error)?;
    if let Some(own) = own.map_err(storage_error)?.first() {
        shared
            .registry
            .presence()
            .set_has_phone(me.user, own.has_phone);
    }
    let stored = stored.map_err(storage_error)?;
    if stored.contacts != book {
        // Who may see this TV: stored before the answer, so it holds after a restart.
        let changed: Vec<UserId> = book
            .iter()
            .filter(|u| !stored.contacts.contains(u))
            .chain(stored.contacts.iter().filter(|u| !book.contains(u)))
            .copied()
            .collect();
        shared
            .store
            .set_presence_book(me.user, book)
            .await
            .map_err(storage_error)?;
        // Those let in or out see the change (a contact the TV has called stays allowed
        // by that call; its subscription is made again all the same).
        shared
            .registry
            .presence()
            .permissions_changed(me.user, &changed);
    }
    // In the order asked (the store's rows come in any order).
    let by_user: std::collections::HashMap<UserId, &crate::storage::PresenceRow> =
        rows.iter().map(|r| (r.user_id, r)).collect();
    let ordered: Vec<crate::storage::PresenceRow> = users
        .iter()
        .filter_map(|u| by_user.get(u).map(|r| (*r).clone()))
        .collect();
    shared
        .registry
        .subscribe(me.user, me.session_id, &ordered, now_ms())
        .map(Reply::Subscribed)
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::NOT_REGISTERED,
                "this session is no longer current",
            )
        })
}

/// `SetPresence`: "do not disturb" for this session, "hide my state" stored.
pub async fn set<S: Store>(
    shared: &Arc<Shared<S>>,
    me: SessionKey,
    do_not_disturb: bool,
    hidden: bool,
) -> Result<Reply, WireError> {
    let stored = shared
        .store
        .presence_book(me.user)
        .await
        .map_err(storage_error)?;
    if stored.hidden != hidden {
        shared
            .store
            .set_presence_hidden(me.user, hidden)
            .await
            .map_err(storage_error)?;
    }
    if !shared
        .registry
        .set_dnd(me.user, me.session_id, do_not_disturb)
    {
        return Err(WireError::new(
            ErrorCode::NOT_REGISTERED,
            "this session is no longer current",
        ));
    }
    let presence = shared.registry.presence();
    let recheck = presence.set_hidden(me.user, hidden, Instant::now());
    // Out of hiding: the watchers refused only because it was hidden may be allowed.
    for (sub, watcher) in recheck {
        match shared.store.presence_view(watcher, vec![me.user]).await {
            Ok(rows) if rows.iter().any(|r| r.allowed) => {
                presence.permit(sub, me.user, Instant::now());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check a watcher again"),
        }
    }
    Ok(Reply::Done)
}

/// `PresenceAck`: never answered. Whether it acknowledged (or refused) a notification
/// that was sent; one for nothing is counted and ignored.
pub fn ack<S: Store>(
    shared: &Shared<S>,
    st: &ConnState,
    subscription: u64,
    seq: u64,
    status: ErrorCode,
) -> bool {
    let Some(me) = st.session else {
        shared.metrics.presence_bad_acks.inc();
        return false;
    };
    match shared.registry.presence().ack(
        me.user,
        me.session_id,
        subscription,
        seq,
        status,
        Instant::now(),
    ) {
        AckResult::Taken => true,
        AckResult::Unknown => {
            shared.metrics.presence_bad_acks.inc();
            false
        }
        AckResult::Refused(f) => {
            failed(shared, f);
            true
        }
    }
}

/// Fails late notifications and retries full queues, until the server stops.
pub async fn sweep<S: Store>(shared: &Arc<Shared<S>>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for f in shared.registry.presence().sweep(Instant::now()) {
            failed(shared, f);
        }
    }
}

/// Counts, logs and (at the threshold) raises the alarm of a failed notification.
fn failed<S: Store>(shared: &Shared<S>, f: Failure) {
    match f.action {
        FailureAction::Recovered => {
            shared.metrics.presence_recoveries.inc();
            tracing::info!(user = f.user, count = f.count, reason = %f.reason, "presence notification failed; TV told to subscribe again");
            return;
        }
        FailureAction::SignedOut => shared.metrics.presence_sign_outs.inc(),
        FailureAction::Dropped => shared.metrics.presence_dropped.inc(),
    }
    let what = match f.action {
        FailureAction::SignedOut => "signed out",
        _ => "subscription dropped",
    };
    let reason = format!(
        "presence notifications failed {} times within the window ({}); {what}",
        f.count, f.reason
    );
    tracing::warn!(user = f.user, session = f.session_id, count = f.count, %reason, "ALARM");
    shared.metrics.alarms_raised.inc();
    // Queued now (ordered with the TV's offline mark, if it is signed out); the result
    // is logged, never awaited here.
    let pending = shared.store.raise_alarm(NewAlarm {
        user_id: f.user,
        at_ms: now_ms(),
        reason,
        count: f.count,
    });
    let user = f.user;
    tokio::spawn(async move {
        if let Err(e) = pending.await {
            tracing::error!(user, error = %e, "cannot record an alarm");
        }
    });
}
