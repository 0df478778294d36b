//! Idempotent dials: a dial retried with the key of the first (its reply was lost) is
//! answered with the first call's outcome and stored once: on the same link, on a new
//! link, and after the server process was SIGKILLed between the dial and the retry. A
//! different key, no key, or another caller's same key are new calls. Enrolled TVs over
//! TLS, in-process and to the server binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::client::ClientError;
use common::{event, TestDb, TestServer, Tv, Tvs};
use shared_proto::{CallId, DialOutcome, ErrorCode, Event, Reply, Request, UserId};
use test_support::net::free_port;
use test_support::process::{spawn_listening, KillOnDrop};

/// Dials `callee` with `key`; the reply or the error.
async fn dial(c: &mut Tv, callee: UserId, key: Option<u64>) -> Result<DialOutcome, ClientError> {
    match c
        .request(Request::Dial {
            callee,
            key,
            srtp: None,
            ice: None,
        })
        .await?
    {
        Reply::Dial(o) => Ok(o),
        other => panic!("not a dial reply: {other:?}"),
    }
}

/// The id of a `Cached` outcome.
fn cached(o: DialOutcome) -> CallId {
    match o {
        DialOutcome::Cached { call_id } => call_id,
        other => panic!("expected cached, got {other:?}"),
    }
}

/// Rows in the call log of the database `db`.
fn call_rows(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM user_call")
}

#[tokio::test]
async fn a_retried_keyed_dial_to_an_offline_tv_is_stored_once_and_answered_the_same() {
    let srv = TestServer::start().await;
    srv.known_offline(30).await;
    let mut a = srv.tv(10, 5000).await;
    let first = cached(dial(&mut a, 30, Some(0xabc)).await.unwrap());
    assert_eq!(call_rows(&srv.db), 1);
    // The same link retries (its reply timed out), then a new link does (the old one
    // died with the reply).
    assert_eq!(cached(dial(&mut a, 30, Some(0xabc)).await.unwrap()), first);
    drop(a);
    let mut a = srv.tv(10, 5000).await;
    assert_eq!(cached(dial(&mut a, 30, Some(0xabc)).await.unwrap()), first);
    assert_eq!(call_rows(&srv.db), 1);
    // Another key is another call, and so is the same key from another caller.
    let second = cached(dial(&mut a, 30, Some(0xabd)).await.unwrap());
    assert_ne!(second, first);
    let mut b = srv.tv(11, 5002).await;
    let other_caller = cached(dial(&mut b, 30, Some(0xabc)).await.unwrap());
    assert!(![first, second].contains(&other_caller));
    assert_eq!(call_rows(&srv.db), 3);
    // Without a key every dial is a new call, as before.
    cached(dial(&mut a, 30, None).await.unwrap());
    cached(dial(&mut a, 30, None).await.unwrap());
    assert_eq!(call_rows(&srv.db), 5);
    // The key names one dial: reusing it for another callee is refused.
    srv.known_offline(31).await;
    let err = dial(&mut a, 31, Some(0xabc)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::INVALID_ARGUMENT), "{err}");
    assert_eq!(call_rows(&srv.db), 5);
    // The callee is shown each stored call once.
    let (tv, acked) = common::power_on_and_ack(&srv, 30, 4000).await;
    assert_eq!(acked, 5);
    drop(tv);
    srv.stop().await;
}

#[tokio::test]
async fn a_retried_keyed_dial_of_a_live_call_rings_once_and_gets_the_first_reply() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(10, 5000).await;
    let mut b = srv.tv(20, 6000).await;
    let first = dial(&mut a, 20, Some(7)).await.unwrap();
    let DialOutcome::Ringing { call_id, .. } = first else {
        panic!("expected ringing, got {first:?}")
    };
    assert!(matches!(event(&mut b).await, Event::IncomingCall { call_id: c, .. } if c == call_id));
    // Retried while it rings: the same reply, and the callee does not ring again.
    assert_eq!(dial(&mut a, 20, Some(7)).await.unwrap(), first);
    let again = tokio::time::timeout(Duration::from_millis(300), b.next_event()).await;
    assert!(again.is_err(), "the callee was told again: {again:?}");
    assert_eq!(call_rows(&srv.db), 1);
    // The caller's link dies (the reply was lost with it): the call ends unanswered and
    // waits for the callee as a missed call. The retry from a new link is answered
    // with that: cached, the same call id; still one record.
    drop(a);
    assert!(matches!(event(&mut b).await, Event::CallEnded { call_id: c, .. } if c == call_id));
    let mut a = srv.tv(10, 5000).await;
    assert_eq!(
        dial(&mut a, 20, Some(7)).await.unwrap(),
        DialOutcome::Cached { call_id }
    );
    srv.calls_settled().await;
    assert_eq!(call_rows(&srv.db), 1);
    assert_eq!(srv.call(call_id).map(|c| c.2), Some("missed".to_string()));
    srv.stop().await;
}

#[tokio::test]
async fn a_retried_keyed_dial_of_a_call_that_was_answered_or_rejected_names_it() {
    let srv = TestServer::start().await;
    let mut a = srv.tv(10, 5000).await;
    let mut b = srv.tv(20, 6000).await;
    // Answered, then hung up.
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, 20, Some(1)).await.unwrap() else {
        panic!()
    };
    let _ = event(&mut b).await;
    b.request(Request::Answer {
        call_id,
        srtp: None,
        ice: None,
    })
    .await
    .unwrap();
    a.request(Request::HangUp { call_id }).await.unwrap();
    srv.calls_settled().await;
    let err = dial(&mut a, 20, Some(1)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NO_SUCH_CALL), "{err}");
    assert!(
        err.to_string().contains(&format!("call {call_id}")),
        "{err}"
    );
    // Rejected.
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, 20, Some(2)).await.unwrap() else {
        panic!()
    };
    while !matches!(event(&mut b).await, Event::IncomingCall { .. }) {}
    b.request(Request::Reject { call_id }).await.unwrap();
    srv.calls_settled().await;
    let err = dial(&mut a, 20, Some(2)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NO_SUCH_CALL), "{err}");
    assert_eq!(call_rows(&srv.db), 2);
    srv.stop().await;
}

/// The server binary on `port` over `db`, with its TLS and CA beside the database.
struct Process {
    /// Killed (SIGKILL) when dropped.
    _child: KillOnDrop,
    addr: SocketAddr,
}

impl Process {
    async fn start(db: &TestDb, port: u16) -> Process {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(db.serve_args())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = spawn_listening(&mut cmd, addr, Duration::from_secs(5))
            .await
            .expect("server listening");
        Process {
            _child: child,
            addr,
        }
    }

    async fn tv(&self, tvs: &Tvs, user: UserId, port: u16) -> Tv {
        tvs.tv(self.addr, user, port).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_dial_retried_after_a_sigkill_of_the_server_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new(dir.path(), "idem"));
    let port = free_port().unwrap();
    let server = Process::start(&db, port).await;
    // Enrolled once, in the database both server processes use.
    let tvs = Tvs::new(&db);
    server.tv(&tvs, 30, 4000).await.bye().await.unwrap();
    let mut a = server.tv(&tvs, 10, 5000).await;
    let mut b = server.tv(&tvs, 20, 6000).await;
    // A cached call and a ringing one, each placed with a key; then the server dies.
    let cached_id = cached(dial(&mut a, 30, Some(u64::MAX)).await.unwrap());
    let mut c = server.tv(&tvs, 11, 5002).await;
    let DialOutcome::Ringing { call_id: rang, .. } = dial(&mut c, 20, Some(5)).await.unwrap()
    else {
        panic!("expected ringing")
    };
    let _ = event(&mut b).await;
    drop(server); // SIGKILL
    assert_eq!(call_rows(&db), 2);

    let server = Process::start(&db, port).await;
    let mut a = server.tv(&tvs, 10, 5000).await;
    assert_eq!(
        cached(dial(&mut a, 30, Some(u64::MAX)).await.unwrap()),
        cached_id
    );
    // The ringing call died with the server (the restart recorded it missed): the retry
    // is told it waits for the callee, under its first id, and nothing rings.
    let _b = server.tv(&tvs, 20, 6000).await;
    let mut c = server.tv(&tvs, 11, 5002).await;
    assert_eq!(
        dial(&mut c, 20, Some(5)).await.unwrap(),
        DialOutcome::Cached { call_id: rang }
    );
    assert_eq!(call_rows(&db), 2);
    // A new key after the restart is a new call with a new id.
    let fresh = cached(dial(&mut a, 30, Some(1)).await.unwrap());
    assert!(fresh > cached_id.max(rang));
    assert_eq!(call_rows(&db), 3);
}
