//! Flows 1–6 of the source documents, over real TLS (enrolled TVs) against a real SQLite
//! file, plus ring timeout, reject, busy, re-registration, heartbeat timeout and unknown
//! users.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{event, eventually, try_dial as dial, TestServer};
use shared_proto::*;

const A: UserId = 1001;
const B: UserId = 2002;
const C: UserId = 3003;

fn media(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn flow1_registration_records_online_state_ip_and_media_port() {
    let srv = TestServer::start().await;
    assert_eq!(srv.property(A), None);
    let mut a = srv.connect(A).await;
    let reg = a.register(A, 5004).await.unwrap();
    assert_eq!(
        reg.observed_ip,
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(reg.cached_waiting, 0);
    assert_eq!(srv.property(A), Some(("127.0.0.1".into(), 1, 5004)));
    srv.stop().await;
}

#[tokio::test]
async fn flow2_power_off_and_lost_link_record_offline() {
    let srv = TestServer::start().await;
    // Clean power-off: the offline state is recorded before the reply.
    let a = srv.tv(A, 5004).await;
    a.bye().await.unwrap();
    assert_eq!(srv.property(A).map(|p| p.1), Some(0));
    // Link dropped without a word.
    let b = srv.tv(B, 5006).await;
    assert_eq!(srv.property(B).map(|p| p.1), Some(1));
    drop(b);
    assert!(
        eventually(Duration::from_secs(5), || srv.property(B).map(|p| p.1)
            == Some(0))
        .await
    );
    srv.stop().await;
}

#[tokio::test]
async fn flow3_state_query_answers_from_user_property() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(A, 5004).await;
    srv.known_offline(B).await;
    let reply = a
        .request(Request::QueryState {
            users: vec![B, A, C],
        })
        .await
        .unwrap();
    let Reply::States(states) = reply else {
        panic!("{reply:?}")
    };
    let got: Vec<(UserId, NetState)> = states.iter().map(|s| (s.user_id, s.state)).collect();
    assert_eq!(
        got,
        vec![
            (B, NetState::Offline),
            (A, NetState::Online),
            (C, NetState::Unknown)
        ]
    );
    assert!(states[0].last_seen_ms.is_some());
    // Bad queries get a clear error, not a dropped link.
    let err = a
        .request(Request::QueryState { users: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::INVALID_ARGUMENT));
    a.request(Request::Heartbeat).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn flow4_call_between_online_tvs_exchanges_media_addresses() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(A, 5004).await;
    let mut b = srv.tv(B, 6004).await;
    let DialOutcome::Ringing {
        call_id,
        callee_media,
    } = dial(&mut a, B).await.unwrap()
    else {
        panic!("expected ringing")
    };
    assert_eq!(callee_media, media(6004));
    // The record was queued before the ring and commits with the next group.
    let ringing = Some((A as i64, B as i64, "ringing".to_string(), 0));
    assert!(eventually(Duration::from_secs(2), || srv.call(call_id) == ringing).await);
    match event(&mut b).await {
        Event::IncomingCall {
            call_id: id,
            caller,
            caller_media,
            ..
        } => {
            assert_eq!((id, caller, caller_media), (call_id, A, media(5004)));
        }
        other => panic!("expected incoming call, got {other:?}"),
    }
    assert_eq!(
        b.request(Request::Answer {
            call_id,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap(),
        Reply::Done
    );
    assert_eq!(
        event(&mut a).await,
        Event::CallAnswered {
            call_id,
            srtp: None,
            ice: None,
        }
    );
    assert_eq!(
        srv.call(call_id).map(|c| (c.2, c.3)),
        Some(("answered".into(), 1))
    );
    // A second call from either is refused while in this one.
    let err = dial(&mut a, C).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ALREADY_IN_CALL));
    a.request(Request::HangUp { call_id }).await.unwrap();
    assert_eq!(
        event(&mut b).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: A }
        }
    );
    let ended = srv
        .db
        .row(&format!(
            "SELECT ended_at FROM user_call WHERE id = {call_id}"
        ))
        .expect("the call's row");
    assert!(ended[0].is_some());
    // Answered calls are not delivered again as missed.
    assert!(b.fetch_all_cached().await.unwrap().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn flow5_and_6_offline_call_is_cached_then_delivered_until_acknowledged() {
    let srv = TestServer::start().await;
    srv.known_offline(B).await;
    let mut a = srv.tv(A, 5004).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let DialOutcome::Cached { call_id } = dial(&mut a, B).await.unwrap() else {
            panic!("expected cached")
        };
        assert_eq!(
            srv.call(call_id),
            Some((A as i64, B as i64, "cached".into(), 0))
        );
        ids.push(call_id);
    }
    // B powers on: told how many wait, fetches them with A's current state.
    let mut b = srv.connect(B).await;
    assert_eq!(b.register(B, 6004).await.unwrap().cached_waiting, 3);
    let calls = b.fetch_all_cached().await.unwrap();
    assert_eq!(calls.iter().map(|c| c.call_id).collect::<Vec<_>>(), ids);
    for c in &calls {
        assert_eq!((c.caller, c.callee), (A, B));
        assert_eq!(c.reason, MissedReason::Offline);
        assert_eq!(c.caller_state, NetState::Online);
    }
    // B's TV dies mid-fetch (no acknowledgement): it gets them again.
    drop(b);
    assert!(
        eventually(Duration::from_secs(5), || srv.property(B).map(|p| p.1)
            == Some(0))
        .await
    );
    a.bye().await.unwrap();
    let mut b = srv.tv(B, 6004).await;
    let again = b.fetch_all_cached().await.unwrap();
    assert_eq!(again.len(), 3);
    assert!(
        again.iter().all(|c| c.caller_state == NetState::Offline),
        "A is off now"
    );
    // Paging: one at a time, in order.
    let Reply::Cached(page) = b
        .request(Request::FetchCached { after: 0, limit: 1 })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (page.calls.len(), page.more, page.calls[0].call_id),
        (1, true, ids[0])
    );
    // Acknowledge two; only the third remains. Acking another TV's call does nothing.
    assert_eq!(b.ack_cached(&ids[..2]).await.unwrap(), 2);
    assert_eq!(b.ack_cached(&ids[..2]).await.unwrap(), 0, "idempotent");
    let rest = b.fetch_all_cached().await.unwrap();
    assert_eq!(
        rest.iter().map(|c| c.call_id).collect::<Vec<_>>(),
        vec![ids[2]]
    );
    let mut c = srv.tv(C, 7004).await;
    assert_eq!(c.ack_cached(&[ids[2]]).await.unwrap(), 0);
    assert_eq!(b.fetch_all_cached().await.unwrap().len(), 1);
    let delivered = srv
        .db
        .count("SELECT count(*) FROM user_call WHERE delivered = 1 AND delivered_at IS NOT NULL");
    assert_eq!(delivered, 2);
    srv.stop().await;
}

#[tokio::test]
async fn call_ended_before_power_on_is_delivered_as_missed_never_ringing() {
    let srv = TestServer::start().await;
    srv.known_offline(B).await;
    let mut a = srv.tv(A, 5004).await;
    let DialOutcome::Cached { call_id } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    let mut b = srv.tv(B, 6004).await;
    // Powering on produces no ring; the call only appears in the cache, as missed.
    let calls = b.fetch_all_cached().await.unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].call_id, call_id);
    assert_eq!(calls[0].reason, MissedReason::Offline);
    b.request(Request::Heartbeat).await.unwrap();
    assert!(
        b.queued_events().is_empty(),
        "no IncomingCall for a cached call"
    );
    // Answering a cached call is refused: it is not ringing.
    let err = b
        .request(Request::Answer {
            call_id,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NO_SUCH_CALL));
    srv.stop().await;
}

#[tokio::test]
async fn ring_timeout_makes_a_missed_call_for_the_callee() {
    let srv = TestServer::start_with(|c| c.ring_timeout_ms = 300).await;
    let mut a = srv.tv(A, 5004).await;
    let mut b = srv.tv(B, 6004).await;
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    assert!(matches!(event(&mut b).await, Event::IncomingCall { .. }));
    assert_eq!(
        event(&mut a).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::NoAnswer
        }
    );
    assert_eq!(
        event(&mut b).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::NoAnswer
        }
    );
    assert_eq!(event(&mut b).await, Event::CachedCallsWaiting { count: 1 });
    assert_eq!(srv.call(call_id).map(|c| c.2), Some("missed".into()));
    let missed = b.fetch_all_cached().await.unwrap();
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0].reason, MissedReason::NoAnswer);
    // Answering after the timeout is refused.
    let err = b
        .request(Request::Answer {
            call_id,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NO_SUCH_CALL));
    srv.stop().await;
}

#[tokio::test]
async fn reject_and_caller_cancel() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(A, 5004).await;
    let mut b = srv.tv(B, 6004).await;
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    let _ = event(&mut b).await;
    b.request(Request::Reject { call_id }).await.unwrap();
    assert_eq!(
        event(&mut a).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::Rejected
        }
    );
    assert_eq!(
        srv.call(call_id).map(|c| (c.2, c.3)),
        Some(("rejected".into(), 1))
    );
    // Caller gives up while it rings: the callee gets a missed call.
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    let _ = event(&mut b).await;
    a.request(Request::HangUp { call_id }).await.unwrap();
    assert_eq!(
        event(&mut b).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: A }
        }
    );
    assert_eq!(
        srv.call(call_id).map(|c| (c.2, c.3)),
        Some(("missed".into(), 0))
    );
    // Only a party may act on a call.
    let mut c = srv.tv(C, 7004).await;
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    let err = c.request(Request::HangUp { call_id }).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NO_SUCH_CALL));
    srv.stop().await;
}

#[tokio::test]
async fn busy_callee_is_recorded_and_told() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(A, 5004).await;
    let mut b = srv.tv(B, 6004).await;
    let mut c = srv.tv(C, 7004).await;
    let DialOutcome::Ringing { .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    let _ = event(&mut b).await;
    let DialOutcome::Busy { call_id } = dial(&mut c, B).await.unwrap() else {
        panic!("expected busy")
    };
    assert_eq!(srv.call(call_id).map(|c| c.2), Some("busy".into()));
    assert_eq!(event(&mut b).await, Event::CachedCallsWaiting { count: 1 });
    let waiting = b.fetch_all_cached().await.unwrap();
    assert_eq!(
        (waiting[0].caller, waiting[0].reason),
        (C, MissedReason::Busy)
    );
    srv.stop().await;
}

#[tokio::test]
async fn reregistration_replaces_the_old_session_and_keeps_the_state_right() {
    let srv = TestServer::start().await;
    let mut old = srv.connect(B).await;
    let first = old.register(B, 6004).await.unwrap();
    // The TV reboots and registers again before the old link timed out.
    let mut new = srv.connect(B).await;
    let second = new.register(B, 6010).await.unwrap();
    assert!(second.session_id > first.session_id);
    let closed = tokio::time::timeout(Duration::from_secs(5), old.next_event())
        .await
        .unwrap();
    assert_eq!(
        closed.unwrap_err().code(),
        Some(ErrorCode::SESSION_REPLACED)
    );
    drop(old);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The old link's end did not mark the TV offline; the new media port is recorded.
    assert_eq!(srv.property(B), Some(("127.0.0.1".into(), 1, 6010)));
    let mut a = srv.tv(A, 5004).await;
    let DialOutcome::Ringing { callee_media, .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    assert_eq!(callee_media, media(6010));
    assert!(matches!(event(&mut new).await, Event::IncomingCall { .. }));
    // A second register on the same connection is refused.
    let err = new.register(B, 6010).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ALREADY_REGISTERED));
    srv.stop().await;
}

#[tokio::test]
async fn heartbeat_timeout_marks_silent_tv_offline_and_ends_its_call() {
    let srv = TestServer::start_with(|c| {
        c.heartbeat_interval_ms = 200; // timeout 3 x 200 + 100 = 700 ms
    })
    .await;
    let mut a = srv.tv(A, 5004).await;
    let mut b = srv.tv(B, 6004).await;
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, B).await.unwrap() else {
        panic!()
    };
    // A keeps heart-beating; B has gone silent (a TV whose network dropped).
    let beats = async {
        for _ in 0..10 {
            a.request(Request::Heartbeat).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        a
    };
    let mut a = beats.await;
    assert!(
        srv.property(B).map(|p| p.1) == Some(0),
        "silent TV recorded offline"
    );
    assert_eq!(
        srv.property(A).map(|p| p.1),
        Some(1),
        "live TV stays online"
    );
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(5), b.next_event())
            .await
            .unwrap()
        {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(ErrorCode::HEARTBEAT_TIMEOUT));
    assert_eq!(
        event(&mut a).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::PeerLost
        }
    );
    assert_eq!(srv.call(call_id).map(|c| c.2), Some("missed".into()));
    srv.stop().await;
}

#[tokio::test]
async fn unknown_users_get_a_clear_error() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(A, 5004).await;
    let err = dial(&mut a, 999_999).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_USER));
    assert_eq!(srv.db.count("SELECT count(*) FROM user_call"), 0);
    let err = dial(&mut a, A).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::INVALID_ARGUMENT));
    let err = dial(&mut a, 0).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::INVALID_ARGUMENT));
    // The link is still fine.
    a.request(Request::Heartbeat).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn provisioned_only_server_refuses_unknown_registrations() {
    let srv = TestServer::start_with(|c| c.create_unknown_users = false).await;
    let mut x = srv.connect(A).await;
    let err = x.register(A, 5004).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_USER));
    assert_eq!(srv.property(A), None);
    // Requests before registering are refused too.
    let err = x
        .request(Request::Dial {
            callee: B,
            key: None,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NOT_REGISTERED));
    srv.stop().await;
}

#[tokio::test]
async fn callee_coming_online_is_told_about_calls_cached_meanwhile() {
    let srv = TestServer::start().await;
    srv.known_offline(B).await;
    let mut b = srv.tv(B, 6004).await;
    assert!(b.fetch_all_cached().await.unwrap().is_empty());
    // A call placed after B's fetch reaches B live (B is online now) ...
    let mut a = srv.tv(A, 5004).await;
    assert!(matches!(
        dial(&mut a, B).await.unwrap(),
        DialOutcome::Ringing { .. }
    ));
    srv.stop().await;
}
