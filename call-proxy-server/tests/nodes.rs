//! Several `call-proxy-server serve` processes on one PostgreSQL database (issue 18,
//! first part): each node claims its name and slot, writes a heartbeat and records which
//! TVs it holds; a node starting does not mark another's TVs offline; the nodes' call ids
//! never collide; a call cached through one node is delivered through another; a TV
//! registering on another node replaces its session on the first; a second
//! node with a live node's name is refused; a SIGKILLed node's TVs are offline within its
//! lease, and they register again on the other node; a crashed node's slot or name can be
//! taken at once. TVs on two nodes call each other: ring, answer, media both ways,
//! busy, hang-up from either side, reject, cancel (a missed call pushed across), the
//! callee's link lost, and the callee's node killed. A node stopped with SIGTERM drains:
//! its idle TVs are told to move at once, its live call goes on until it ends. Skipped without PostgreSQL unless
//! the run requires it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, TestDb, Tvs};
use shared_proto::{DialOutcome, EndReason, ErrorCode, Event, Reply, Request};
use test_support::net::free_port;
use test_support::process::{spawn_listening, KillOnDrop};
use tokio::net::UdpSocket;

/// The heartbeat lease the test nodes run with.
const LEASE_MS: u64 = 1_000;

/// A node process over `db`, with its TLS files in `db`'s directory (shared by every
/// node, as an operator gives every node the same certificate).
fn node_cmd(db: &TestDb, id: &str, slot: u8, port: u16) -> Command {
    let mut cmd = common::node_command(db, id, slot, port, LEASE_MS);
    cmd.stderr(Stdio::piped());
    cmd
}

async fn start_node(db: &TestDb, id: &str, slot: u8) -> (KillOnDrop, SocketAddr) {
    let port = free_port().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = node_cmd(db, id, slot, port);
    cmd.stderr(Stdio::inherit());
    let child = spawn_listening(&mut cmd, addr, Duration::from_secs(20))
        .await
        .expect("node listening");
    (child, addr)
}

fn netstate(db: &TestDb, user: u64) -> Option<(String, Option<String>)> {
    let r = db.row(&format!(
        "SELECT user_netstate, node_id FROM user_property WHERE user_id = {user}"
    ))?;
    Some((r[0].clone()?, r[1].clone()))
}

async fn cached(tv: &mut common::Tv, callee: u64) -> u64 {
    match common::dial(tv, callee).await {
        DialOutcome::Cached { call_id } => call_id,
        other => panic!("expected cached, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_database_and_a_dead_nodes_tvs_go_offline_within_its_lease() {
    let Some((url, password_file)) = common::db::pg_cluster() else {
        eprintln!("skipped: no PostgreSQL (scripts/test.sh provides it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::postgres(dir.path(), "nodes", &url, &password_file));
    let (mut node_a, a) = start_node(&db, "node-a", 1).await;
    let tvs = Tvs::new(&db);
    tvs.tv(a, 3, 4000).await.bye().await.unwrap(); // TV 3 exists, and is off
    let mut tv1 = tvs.tv(a, 1, 5000).await;
    assert_eq!(
        netstate(&db, 1),
        Some(("1".into(), Some("node-a".into()))),
        "the row names the node holding the TV"
    );

    // A second node starting does not touch the first one's TVs.
    let (mut node_b, b) = start_node(&db, "node-b", 2).await;
    assert_eq!(netstate(&db, 1).map(|n| n.0), Some("1".into()));
    let mut tv2 = tvs.tv(b, 2, 6000).await;
    assert_eq!(netstate(&db, 2).and_then(|n| n.1), Some("node-b".into()));

    // A TV of node A registering on node B (a new connection, as after a network
    // change) replaces its session on A at once: A's link is told SESSION_REPLACED.
    let mut tv4_on_a = tvs.tv(a, 4, 7000).await;
    let _tv4_on_b = tvs.tv(b, 4, 7002).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), tv4_on_a.next_event())
        .await
        .expect("the old link is told in time");
    assert_eq!(
        closed.unwrap_err().code(),
        Some(ErrorCode::SESSION_REPLACED)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        netstate(&db, 4),
        Some(("1".into(), Some("node-b".into()))),
        "the old link's end on A did not mark the TV offline"
    );

    // Call ids of the two nodes never meet (each takes its slot modulo 64), and a call
    // cached through either node is delivered through the other.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(cached(&mut tv1, 3).await);
        ids.push(cached(&mut tv2, 3).await);
    }
    assert!(ids.iter().step_by(2).all(|id| id % 64 == 1), "{ids:?}");
    assert!(
        ids.iter().skip(1).step_by(2).all(|id| id % 64 == 2),
        "{ids:?}"
    );
    let mut tv3 = tvs.tv(b, 3, 4000).await;
    let delivered = common::cached_ids(&mut tv3).await;
    let mut placed = ids.clone();
    placed.sort_unstable();
    assert_eq!(delivered, placed, "every call, through either node, once");
    tv3.bye().await.unwrap();

    // A node may not take a live node's name (nor its slot).
    let out = node_cmd(&db, "node-a", 5, free_port().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("held by a live node"), "{err}");
    let out = node_cmd(&db, "node-c", 2, free_port().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node_slot 2 is held by live node \"node-b\""),
        "{err}"
    );

    // Node A dies: within its lease (and a heartbeat period of node B) its TV is offline.
    test_support::process::kill(&mut node_a);
    let killed = std::time::Instant::now();
    let offline = eventually(Duration::from_millis(LEASE_MS * 5), || {
        netstate(&db, 1).is_some_and(|n| n.0 == "0")
    })
    .await;
    assert!(
        offline,
        "node A's TV still online {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        killed.elapsed() >= Duration::from_millis(LEASE_MS / 2),
        "offline only after the lease ran out ({:?})",
        killed.elapsed()
    );
    // B's TV is untouched; A's TV registers again, on B.
    assert_eq!(netstate(&db, 2).map(|n| n.0), Some("1".into()));
    drop(tv1);
    let _tv1 = tvs.tv(b, 1, 5000).await;
    assert_eq!(netstate(&db, 1), Some(("1".into(), Some("node-b".into()))));

    // A node that crashed can be replaced at once by another taking its slot (its lock
    // went with its connection): what the dead node held is set offline, though its
    // lease has not run out.
    test_support::process::kill(&mut node_b);
    let (mut node_c, c) = start_node(&db, "node-c", 2).await;
    assert_eq!(netstate(&db, 1).map(|n| n.0), Some("0".into()));
    assert_eq!(netstate(&db, 2).map(|n| n.0), Some("0".into()));
    let _tv2 = tvs.tv(c, 2, 6000).await;
    assert_eq!(netstate(&db, 2), Some(("1".into(), Some("node-c".into()))));
    // And a crashed node starts again at once under its own name, setting what it held
    // offline.
    test_support::process::kill(&mut node_c);
    let (_node_c, _) = start_node(&db, "node-c", 3).await;
    assert_eq!(netstate(&db, 2).map(|n| n.0), Some("0".into()));
}

/// The next event of `tv`, within a few seconds.
async fn next(tv: &mut common::Tv) -> Event {
    tokio::time::timeout(Duration::from_secs(5), tv.next_event())
        .await
        .expect("an event in time")
        .expect("the link is up")
}

/// The next event of `tv` that is not a `CachedCallsWaiting`.
async fn next_call_event(tv: &mut common::Tv) -> Event {
    loop {
        match next(tv).await {
            Event::CachedCallsWaiting { .. } => continue,
            e => return e,
        }
    }
}

async fn ring(
    from: &mut common::Tv,
    to: &mut common::Tv,
    callee: u64,
) -> (u64, SocketAddr, SocketAddr) {
    let (call_id, callee_media) = match common::dial(from, callee).await {
        DialOutcome::Ringing {
            call_id,
            callee_media,
        } => (call_id, callee_media),
        other => panic!("expected ringing, got {other:?}"),
    };
    match next_call_event(to).await {
        Event::IncomingCall {
            call_id: id,
            caller_media,
            ..
        } => {
            assert_eq!(id, call_id);
            (call_id, callee_media, caller_media)
        }
        other => panic!("expected the ring, got {other:?}"),
    }
}

/// `from` calls `to` (user `callee`), which answers; the call's id.
async fn answered(from: &mut common::Tv, to: &mut common::Tv, callee: u64) -> u64 {
    let (call_id, _, _) = ring(from, to, callee).await;
    let answer = Request::Answer {
        call_id,
        srtp: None,
        ice: None,
    };
    assert_eq!(to.request(answer).await.unwrap(), Reply::Done);
    assert!(matches!(
        next_call_event(from).await,
        Event::CallAnswered { call_id: id, .. } if id == call_id
    ));
    call_id
}

fn outcome(db: &TestDb, call_id: u64) -> Option<String> {
    db.row(&format!(
        "SELECT outcome FROM user_call WHERE id = {call_id}"
    ))?[0]
        .clone()
}

/// One datagram from `from` to `to`, received.
async fn media_flows(from: &UdpSocket, to: &UdpSocket, dest: SocketAddr) {
    from.send_to(b"rtp", dest).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, src) = tokio::time::timeout(Duration::from_secs(2), to.recv_from(&mut buf))
        .await
        .expect("media arrives")
        .unwrap();
    assert_eq!((&buf[..n], src), (&b"rtp"[..], from.local_addr().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tvs_on_two_nodes_ring_answer_reject_hang_up_and_lose_each_other() {
    let Some((url, password_file)) = common::db::pg_cluster() else {
        eprintln!("skipped: no PostgreSQL (scripts/test.sh provides it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::postgres(dir.path(), "cross", &url, &password_file));
    let (_node_a, a) = start_node(&db, "node-a", 1).await;
    let (mut node_b, b) = start_node(&db, "node-b", 2).await;
    let tvs = Tvs::new(&db);
    let media_1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let media_2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut tv1 = tvs.tv(a, 1, media_1.local_addr().unwrap().port()).await;
    let mut tv2 = tvs.tv(b, 2, media_2.local_addr().unwrap().port()).await;
    let mut tv3 = tvs.tv(a, 3, 7003).await;
    let mut tv4 = tvs.tv(b, 4, 7004).await;
    // Each node learns of the other at its next heartbeat (a fifth of the lease).
    tokio::time::sleep(Duration::from_millis(LEASE_MS / 5 * 3)).await;

    // TV 1 on node A calls TV 2 on node B: it rings there with 1's media address, and
    // 1 is told 2's; answered there, 1 hears of it; media flows both ways between them.
    let (call_id, callee_media, caller_media) = ring(&mut tv1, &mut tv2, 2).await;
    assert_eq!(callee_media, media_2.local_addr().unwrap());
    assert_eq!(caller_media, media_1.local_addr().unwrap());
    assert_eq!(outcome(&db, call_id).as_deref(), Some("ringing"));
    let answer = Request::Answer {
        call_id,
        srtp: None,
        ice: None,
    };
    assert_eq!(tv2.request(answer).await.unwrap(), Reply::Done);
    assert_eq!(
        next_call_event(&mut tv1).await,
        Event::CallAnswered {
            call_id,
            srtp: None,
            ice: None,
        }
    );
    assert_eq!(outcome(&db, call_id).as_deref(), Some("answered"));
    media_flows(&media_1, &media_2, callee_media).await;
    media_flows(&media_2, &media_1, caller_media).await;
    // Both are busy to everyone, on either node.
    assert!(matches!(
        common::dial(&mut tv3, 2).await,
        DialOutcome::Busy { .. }
    ));
    assert!(matches!(
        common::dial(&mut tv4, 1).await,
        DialOutcome::Busy { .. }
    ));
    assert!(matches!(
        common::dial(&mut tv4, 2).await,
        DialOutcome::Busy { .. }
    ));
    // 2 hangs up on node B; 1 hears it on node A; the record is ended.
    tv2.request(Request::HangUp { call_id }).await.unwrap();
    assert_eq!(
        next_call_event(&mut tv1).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: 2 }
        }
    );
    assert!(
        eventually(Duration::from_secs(2), || db
            .row(&format!(
                "SELECT ended_at IS NOT NULL FROM user_call WHERE id = {call_id}"
            ))
            .is_some_and(|r| r[0].as_deref() == Some("t")))
        .await
    );

    // The other way round: 2 (node B) calls 1 (node A), and 1 rejects.
    let (call_id, _, _) = ring(&mut tv2, &mut tv1, 1).await;
    tv1.request(Request::Reject { call_id }).await.unwrap();
    assert_eq!(
        next_call_event(&mut tv2).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::Rejected
        }
    );
    assert_eq!(outcome(&db, call_id).as_deref(), Some("rejected"));

    // 1 calls 2 and gives up while it rings: 2's ring stops and it has a missed call
    // waiting, pushed across.
    let (call_id, _, _) = ring(&mut tv1, &mut tv2, 2).await;
    tv1.request(Request::HangUp { call_id }).await.unwrap();
    assert!(matches!(
        next(&mut tv2).await,
        Event::CallEnded { call_id: id, .. } if id == call_id
    ));
    assert!(matches!(next(&mut tv2).await, Event::CachedCallsWaiting { count } if count >= 1));
    assert_eq!(outcome(&db, call_id).as_deref(), Some("missed"));

    // Answered, then 2's TV goes away: 1 is told its peer is lost.
    let call_id = answered(&mut tv1, &mut tv2, 2).await;
    drop(tv2);
    assert_eq!(
        next_call_event(&mut tv1).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::PeerLost
        }
    );

    // Answered, then node B dies: within its lease node A ends the call for 1, and both
    // TVs are free for new calls.
    let mut tv2 = tvs.tv(b, 2, media_2.local_addr().unwrap().port()).await;
    let call_id = answered(&mut tv1, &mut tv2, 2).await;
    test_support::process::kill(&mut node_b);
    let lost = tokio::time::timeout(
        Duration::from_millis(LEASE_MS * 5),
        next_call_event(&mut tv1),
    )
    .await
    .expect("told within the lease");
    assert_eq!(
        lost,
        Event::CallEnded {
            call_id,
            reason: EndReason::PeerLost
        }
    );
    assert!(matches!(
        common::dial(&mut tv1, 3).await,
        DialOutcome::Ringing { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_drains_its_idle_tvs_move_at_once_and_its_live_call_goes_on() {
    let Some((url, password_file)) = common::db::pg_cluster() else {
        eprintln!("skipped: no PostgreSQL (scripts/test.sh provides it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::postgres(dir.path(), "drain", &url, &password_file));
    let (mut node_a, a) = start_node(&db, "node-a", 1).await;
    let (_node_b, b) = start_node(&db, "node-b", 2).await;
    let tvs = Tvs::new(&db);
    let mut tv1 = tvs.tv(a, 1, 7001).await;
    let mut tv2 = tvs.tv(b, 2, 7002).await;
    let mut tv3 = tvs.tv(a, 3, 7003).await;
    tokio::time::sleep(Duration::from_millis(LEASE_MS / 5 * 3)).await;
    let call_id = answered(&mut tv1, &mut tv2, 2).await;

    // SIGTERM: node A stops taking TVs (the dispatcher's choice drops it), and its TV
    // in no call is told to move at once.
    test_support::process::sigterm(node_a.0.id()).unwrap();
    let moved = tokio::time::timeout(Duration::from_secs(5), tv3.next_event())
        .await
        .expect("told in time");
    let moved = match moved {
        Ok(e) => panic!("DEBUG got event {e:?}"),
        Err(e) => e,
    };
    assert_eq!(moved.code(), Some(ErrorCode::SHUTTING_DOWN));
    assert!(
        eventually(Duration::from_secs(2), || db
            .row("SELECT listen FROM tvcall_node WHERE node_id = 'node-a'")
            .is_some_and(|r| r[0].as_deref() == Some("")))
        .await,
        "node A is withdrawn from the dispatcher's choice"
    );
    // The call goes on: nobody is told anything for a while, and node A still runs.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), tv2.next_event())
            .await
            .is_err(),
        "the callee heard nothing"
    );
    assert!(tv1.queued_events().is_empty());
    assert!(
        node_a.0.try_wait().unwrap().is_none(),
        "node A still serves its call"
    );
    // No new call starts on the draining node; a call to its TV in a call is busy.
    let mut tv4 = tvs.tv(b, 4, 7004).await;
    assert!(matches!(
        common::dial(&mut tv4, 1).await,
        DialOutcome::Busy { .. }
    ));
    // The callee hangs up: the caller hears it, then is told to move, and node A stops.
    tv2.request(Request::HangUp { call_id }).await.unwrap();
    assert_eq!(
        next_call_event(&mut tv1).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: 2 }
        }
    );
    // (TV 4's busy attempt is a missed call for TV 1: its CachedCallsWaiting, pushed
    // from node B once recorded, may arrive after the hang-up under load.)
    let moved = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tv1.next_event().await {
                Ok(Event::CachedCallsWaiting { .. }) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("told in time");
    assert_eq!(moved.unwrap_err().code(), Some(ErrorCode::SHUTTING_DOWN));
    let exit = test_support::process::wait_exit_async(&mut node_a.0, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}
