//! Presence (issue 16) against a real server over TLS with enrolled TVs, on either
//! backend: states pushed to watchers as they change (online, busy in a call or in "do
//! not disturb", offline or mobile), privacy, acknowledgements, the recovery of a failed
//! notification and the threshold that signs a TV out and raises an alarm, and bad
//! input (too many users, acknowledgements for nothing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{dial, event, eventually, TestServer, Tv};
use shared_proto::*;

const A: UserId = 1001;
const B: UserId = 2002;
const C: UserId = 3003;
const D: UserId = 4004;

/// Subscribes `c` to `contacts` (its address book) and `others`.
async fn subscribe(c: &mut Tv, contacts: &[UserId], others: &[UserId]) -> Subscribed {
    match c
        .request(Request::Subscribe {
            contacts: contacts.to_vec(),
            others: others.to_vec(),
        })
        .await
        .expect("subscribe")
    {
        Reply::Subscribed(s) => s,
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn set_presence(c: &mut Tv, do_not_disturb: bool, hidden: bool) {
    let reply = c
        .request(Request::SetPresence {
            do_not_disturb,
            hidden,
        })
        .await
        .expect("set presence");
    assert_eq!(reply, Reply::Done);
}

fn states(s: &Subscribed) -> Vec<(UserId, PresenceState)> {
    s.states.iter().map(|p| (p.user_id, p.state)).collect()
}

/// The next presence notification to `c` (skipping other events), acknowledged unless
/// `ack` is false; its changes as (user, state).
async fn change(c: &mut Tv, sub: u64, ack: bool) -> Vec<(UserId, PresenceState)> {
    loop {
        match event(c).await {
            Event::PresenceChanged {
                subscription,
                seq,
                changes,
            } => {
                if subscription != sub {
                    // An earlier subscription's, sent before it was replaced.
                    continue;
                }
                if ack {
                    c.connection()
                        .send(Request::PresenceAck {
                            subscription,
                            seq,
                            status: ErrorCode::OK,
                        })
                        .await
                        .expect("ack");
                }
                return changes.iter().map(|p| (p.user_id, p.state)).collect();
            }
            _ => continue,
        }
    }
}

/// Asserts that no presence notification reaches `c` within `wait`.
async fn quiet(c: &mut Tv, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(e) = tokio::time::timeout_at(deadline, c.next_event()).await {
        let e = e.expect("link alive");
        assert!(
            !matches!(
                e,
                Event::PresenceChanged { .. } | Event::PresenceLost { .. }
            ),
            "unexpected {e:?}"
        );
    }
}

#[tokio::test]
async fn a_watcher_sees_each_change_of_a_tv_that_lets_it_within_a_second() {
    let srv = TestServer::start().await;
    srv.known_offline(C).await;
    srv.known_offline(D).await;
    // B's address book holds A: A may watch B. C has neither listed nor called A.
    let mut b = srv.tv(B, 5006).await;
    subscribe(&mut b, &[A], &[]).await;
    let mut a = srv.tv(A, 5004).await;
    let sub = subscribe(&mut a, &[B], &[C, 9999, B]).await;
    assert_eq!(
        states(&sub),
        vec![
            (B, PresenceState::ONLINE),
            (C, PresenceState::NOT_ALLOWED),
            (9999, PresenceState::UNKNOWN),
        ]
    );
    let s = sub.subscription;
    let within = Duration::from_secs(1);

    // B calls C: busy; hangs up: online.
    let mut c = srv.tv(C, 5008).await;
    let DialOutcome::Ringing { call_id, .. } = dial(&mut b, C).await else {
        panic!("C is online")
    };
    let t = tokio::time::Instant::now();
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(B, PresenceState::BUSY)]
    );
    assert!(t.elapsed() < within, "busy seen in {:?}", t.elapsed());
    assert!(matches!(event(&mut c).await, Event::IncomingCall { .. }));
    b.request(Request::HangUp { call_id }).await.unwrap();
    let t = tokio::time::Instant::now();
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(B, PresenceState::ONLINE)]
    );
    assert!(t.elapsed() < within);

    // Do not disturb: busy, and A's call is cached for B as missed instead of ringing.
    set_presence(&mut b, true, false).await;
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(B, PresenceState::BUSY)]
    );
    assert!(matches!(dial(&mut a, B).await, DialOutcome::Busy { .. }));
    let rang = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Event::IncomingCall { .. } = event(&mut b).await {
                return;
            }
        }
    })
    .await;
    assert!(rang.is_err(), "a TV in do not disturb does not ring");
    let missed = b.fetch_all_cached().await.unwrap();
    assert!(
        missed
            .iter()
            .any(|m| m.caller == A && m.reason == MissedReason::Busy),
        "{missed:?}"
    );
    set_presence(&mut b, false, false).await;
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(B, PresenceState::ONLINE)]
    );

    // Power off: offline.
    let t = tokio::time::Instant::now();
    b.bye().await.unwrap();
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(B, PresenceState::OFFLINE)]
    );
    assert!(t.elapsed() < within);

    // With a phone number on file, B powered off is mobile.
    srv.db.execute(&format!(
        "INSERT INTO user_phone (user_id, phone, updated_at) VALUES ({B}, '+4930123456', {})",
        srv.db.time_literal(1_767_225_600_000)
    ));
    let b = srv.tv(B, 5006).await;
    let sub = subscribe(&mut a, &[B], &[C]).await;
    let s = sub.subscription;
    assert_eq!(states(&sub)[0], (B, PresenceState::ONLINE));
    drop(b.bye().await);
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(B, PresenceState::MOBILE)]
    );

    // C calls A: now A may watch C (anyone C has called).
    let DialOutcome::Ringing { call_id, .. } = dial(&mut c, A).await else {
        panic!("A is online")
    };
    let sub = subscribe(&mut a, &[B], &[C]).await;
    let s = sub.subscription;
    assert_eq!(
        states(&sub)[1].1,
        PresenceState::BUSY,
        "C has called A (and is ringing it)"
    );
    a.request(Request::Reject { call_id }).await.unwrap();
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(C, PresenceState::ONLINE)]
    );

    // C hides its state: A is shown a refusal, then C's state again when C stops.
    set_presence(&mut c, false, true).await;
    assert_eq!(
        change(&mut a, s, true).await,
        vec![(C, PresenceState::NOT_ALLOWED)]
    );
    let hidden = subscribe(&mut a, &[B], &[C]).await;
    assert_eq!(states(&hidden)[1].1, PresenceState::NOT_ALLOWED);
    set_presence(&mut c, false, false).await;
    assert_eq!(
        change(&mut a, hidden.subscription, true).await,
        vec![(C, PresenceState::ONLINE)],
        "checked again when it came out of hiding"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_failed_notification_is_recovered_and_the_threshold_signs_the_tv_out_with_an_alarm() {
    let srv = TestServer::start_with(|c| {
        c.presence_ack_timeout_ms = 300;
        c.presence_recovery_threshold = 3;
    })
    .await;
    let mut b = srv.tv(B, 5006).await;
    subscribe(&mut b, &[A], &[]).await;
    let mut a = srv.tv(A, 5004).await;
    let mut dnd = false;
    for round in 1..=3u32 {
        let sub = subscribe(&mut a, &[B], &[]).await;
        // A fresh full state each time.
        let expect = if dnd {
            PresenceState::BUSY
        } else {
            PresenceState::ONLINE
        };
        assert_eq!(states(&sub), vec![(B, expect)], "round {round}");
        dnd = !dnd;
        set_presence(&mut b, dnd, false).await;
        // Not acknowledged (the first round) or refused (the others).
        if round == 1 {
            change(&mut a, sub.subscription, false).await;
        } else {
            let seq = loop {
                if let Event::PresenceChanged { seq, .. } = event(&mut a).await {
                    break seq;
                }
            };
            a.connection()
                .send(Request::PresenceAck {
                    subscription: sub.subscription,
                    seq,
                    status: ErrorCode::INTERNAL,
                })
                .await
                .unwrap();
        }
        if round < 3 {
            match event(&mut a).await {
                Event::PresenceLost { subscription, .. } => {
                    assert_eq!(subscription, sub.subscription)
                }
                other => panic!("expected the recovery message, got {other:?}"),
            }
            assert_eq!(
                srv.shared.metrics.presence_recoveries.get(),
                u64::from(round)
            );
        }
    }
    // The third failure: signed out, recorded offline, an alarm raised.
    let closed = tokio::time::timeout(Duration::from_secs(5), a.next_event()).await;
    match closed {
        Ok(Err(call_proxy_server::client::ClientError::Closed(Some(e)))) => {
            assert_eq!(e.code, ErrorCode::NOTIFICATIONS_FAILED, "{e}")
        }
        other => panic!("expected the link closed with a reason, got {other:?}"),
    }
    assert!(
        eventually(Duration::from_secs(5), || srv.property(A).map(|p| p.1)
            == Some(0))
        .await,
        "recorded offline"
    );
    assert_eq!(srv.shared.metrics.presence_sign_outs.get(), 1);
    assert_eq!(srv.shared.metrics.alarms_raised.get(), 1);
    assert!(
        eventually(Duration::from_secs(5), || srv.db.count(&format!(
            "SELECT count(*) FROM operator_alarm WHERE user_id = {A} AND count = 3 AND cleared_at IS NULL"
        )) == 1)
        .await,
        "the alarm is in the database for the operator"
    );
    // B goes on as before.
    b.request(Request::Heartbeat).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn policy_drop_subscription_only_drops_it_and_alarms() {
    let srv = TestServer::start_with(|c| {
        c.presence_ack_timeout_ms = 200;
        c.presence_recovery_threshold = 1;
        c.presence_failure_policy =
            call_proxy_server::registry::presence::FailurePolicy::DropSubscription;
    })
    .await;
    let mut b = srv.tv(B, 5006).await;
    subscribe(&mut b, &[A], &[]).await;
    let mut a = srv.tv(A, 5004).await;
    let sub = subscribe(&mut a, &[B], &[]).await;
    set_presence(&mut b, true, false).await;
    change(&mut a, sub.subscription, false).await;
    assert!(
        eventually(Duration::from_secs(3), || srv
            .shared
            .metrics
            .presence_dropped
            .get()
            == 1)
        .await
    );
    // No recovery message, no more notifications, the link stays.
    set_presence(&mut b, false, false).await;
    quiet(&mut a, Duration::from_millis(500)).await;
    a.request(Request::Heartbeat)
        .await
        .expect("still registered");
    assert_eq!(srv.shared.metrics.alarms_raised.get(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn bad_presence_input_is_refused_or_ignored_and_counted() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(A, 5004).await;
    // Over the limit of 500: refused, the link stays.
    match a
        .request(Request::Subscribe {
            contacts: (1..=300).collect(),
            others: (301..=501).collect(),
        })
        .await
    {
        Err(call_proxy_server::client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::INVALID_ARGUMENT, "{e}");
            assert!(e.message.contains("500"), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        srv.shared.metrics.presence_refused.get(),
        0,
        "refused by validation"
    );
    // 10,000 users do not even decode (past what a frame may hold): the link is closed
    // with the reason, and counted.
    let mut e = srv.tv(C, 5008).await;
    let bad = srv.shared.metrics.bad_input.get();
    match e
        .request(Request::Subscribe {
            contacts: vec![],
            others: (1..=10_000).collect(),
        })
        .await
    {
        Err(call_proxy_server::client::ClientError::Closed(Some(e))) => {
            assert_eq!(e.code, ErrorCode::BAD_FRAME, "{e}")
        }
        other => panic!("expected the link closed with a reason, got {other:?}"),
    }
    assert_eq!(srv.shared.metrics.bad_input.get(), bad + 1);
    // Acknowledgements for nothing: ignored and counted, the link stays.
    for seq in [0, 1, 99] {
        a.connection()
            .send(Request::PresenceAck {
                subscription: 77,
                seq,
                status: ErrorCode::OK,
            })
            .await
            .unwrap();
    }
    let sub = subscribe(&mut a, &[], &[B]).await;
    a.connection()
        .send(Request::PresenceAck {
            subscription: sub.subscription,
            seq: 5,
            status: ErrorCode::OK,
        })
        .await
        .unwrap();
    a.request(Request::Heartbeat)
        .await
        .expect("still registered");
    assert!(
        eventually(Duration::from_secs(2), || srv
            .shared
            .metrics
            .presence_bad_acks
            .get()
            == 4)
        .await,
        "bad acks: {}",
        srv.shared.metrics.presence_bad_acks.get()
    );
    // A session that did not ask for presence pushes cannot subscribe.
    let tls = common::tls_connect(&srv.tvs.enroll(D), srv.addr, None)
        .await
        .unwrap();
    let mut d = call_proxy_server::client::Client::handshake_with(
        tls,
        Features::CALLS | Features::CACHED_NOTICES,
    )
    .await
    .unwrap();
    d.register(D, 5010).await.unwrap();
    assert!(d
        .request(Request::Subscribe {
            contacts: vec![],
            others: vec![A],
        })
        .await
        .is_err());
    // A subscription flood: bounded by the request rate limit, the others unaffected.
    let mut refused = 0;
    for _ in 0..150 {
        match a
            .request(Request::Subscribe {
                contacts: vec![],
                others: vec![B, C],
            })
            .await
        {
            Ok(_) => {}
            Err(call_proxy_server::client::ClientError::Server(e))
                if e.code == ErrorCode::RATE_LIMITED =>
            {
                refused += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "the flood met the rate limit");
    d.request(Request::Heartbeat)
        .await
        .expect("others unaffected");
    srv.stop().await;
}
