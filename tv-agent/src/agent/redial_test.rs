//! The agent's dial retry against a real server: a TCP relay between the agent and the
//! server forwards the dial to the server and then cuts the link before the reply comes
//! back (the reply is lost, as when a link dies mid-request). The agent sends the same
//! dial again once it is registered again; the server answers with the first outcome,
//! and the call log holds one record. Over TLS with enrolled TVs: the relay sees only
//! TLS records, and the second link resumes the first one's TLS session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::embedded::RunningServer;
use call_proxy_server::storage::operator::{CallQuery, OperatorStore};
use call_proxy_server::storage::{open_operator, DbTarget};
use call_proxy_server::{Config, SqliteOptions, SqliteStore};
use control_client::{Client, TlsClient, Transport, TvKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Agent, AgentConfig, AgentEvent, DialResult, MissedKeeping};
use crate::media::AudioSpec;

/// A relay that, once armed, forwards the client's next bytes to the server, drops
/// whatever the server answers, and closes both sides shortly after.
struct LossyRelay {
    addr: SocketAddr,
    /// Cut the link after the client's next bytes.
    armed: Arc<AtomicBool>,
    /// Bytes from the server that were dropped.
    dropped: Arc<AtomicUsize>,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
}

impl LossyRelay {
    async fn start(server: SocketAddr) -> LossyRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = LossyRelay {
            addr: listener.local_addr().unwrap(),
            armed: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicUsize::new(0)),
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        let (armed, dropped, accepted) = (
            Arc::clone(&relay.armed),
            Arc::clone(&relay.dropped),
            Arc::clone(&relay.accepted),
        );
        tokio::spawn(async move {
            // Bounded: the test makes a handful of connections.
            for _ in 0..16 {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = TcpStream::connect(server).await else {
                    return;
                };
                tokio::spawn(pipe(
                    client,
                    upstream,
                    Arc::clone(&armed),
                    Arc::clone(&dropped),
                ));
            }
        });
        relay
    }
}

/// Forwards both ways until either side closes, or until an armed cut.
async fn pipe(
    client: TcpStream,
    upstream: TcpStream,
    armed: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let cutting = Arc::new(AtomicBool::new(false));
    let cut_up = Arc::clone(&cutting);
    let up = async move {
        let mut buf = [0u8; 4096];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if armed.swap(false, Ordering::SeqCst) {
                cut_up.store(true, Ordering::SeqCst);
            }
            if uw.write_all(&buf[..n]).await.is_err() {
                return;
            }
            if cut_up.load(Ordering::SeqCst) {
                // Let the server act on the request and answer into the void.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return;
            }
        }
    };
    let down = async move {
        let mut buf = [0u8; 4096];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cutting.load(Ordering::SeqCst) {
                dropped.fetch_add(n, Ordering::SeqCst);
                continue;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending drops both halves of both sockets: the link is cut.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_whose_reply_was_lost_is_retried_with_its_key_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("redial.sqlite");
    // Both TVs enrolled before the server starts (their credentials in its database).
    let (caller_key, callee_key) = (TvKey::generate().unwrap(), TvKey::generate().unwrap());
    call_proxy_server::storage::sqlite::enroll::seed_credentials(
        &db,
        &[
            (caller_key.cert.to_vec(), 10),
            (callee_key.cert.to_vec(), 30),
        ],
    )
    .unwrap();
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        db: Some(db.clone()),
        // No heartbeat among the bytes the relay watches.
        heartbeat_interval_ms: 20_000,
        shutdown_grace_ms: 2_000,
        ..Config::default()
    };
    let store = SqliteStore::open(&db, SqliteOptions::default()).unwrap();
    let server = RunningServer::start(config, store).unwrap();
    // The CA the server made before its port opened.
    let ca = std::fs::read(dir.path().join("tls/ca.crt")).unwrap();
    let tls = |key: &TvKey| Transport::Tls(TlsClient::new(&ca, key).unwrap());
    // The callee exists and is off.
    {
        let mut c = Client::connect_with(&tls(&callee_key), server.addr, None)
            .await
            .unwrap();
        c.register(30, 4000).await.unwrap();
        c.bye().await.unwrap();
    }
    let relay = LossyRelay::start(server.addr).await;
    let (agent, mut events) = Agent::power_on(AgentConfig {
        user: 10,
        server: relay.addr.to_string(),
        media_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise_port: None,
        ice: true,
        audio_in: AudioSpec::Null,
        audio_out: AudioSpec::Null,
        missed: MissedKeeping::Memory,
        transport: tls(&caller_key),
        presence: None,
        inbox: None,
    })
    .await
    .unwrap();
    let registered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(AgentEvent::Registered { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(registered.is_ok(), "the agent did not register");

    relay.armed.store(true, Ordering::SeqCst);
    let result = tokio::time::timeout(Duration::from_secs(40), agent.dial(30))
        .await
        .expect("the dial ends within its retry window");
    let DialResult::Cached(call_id) = result else {
        panic!("expected the first outcome, cached; got {result:?}")
    };
    // The first reply was really lost, and the answer came over a second link.
    assert!(
        relay.dropped.load(Ordering::SeqCst) > 0,
        "no reply was dropped"
    );
    assert!(relay.accepted.load(Ordering::SeqCst) >= 2, "no second link");
    // The call log, through the server's operator reads.
    let rows: Vec<(u64, u64, u64)> =
        open_operator(&DbTarget::of(&server.shared.config).unwrap(), 1)
            .calls(CallQuery {
                limit: 100,
                ..CallQuery::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.user_id, c.otheruser_id))
            .collect();
    assert_eq!(rows, vec![(call_id, 10, 30)], "one record, the first call");
    agent.power_off().await;
    server.stop().await.unwrap();
}
