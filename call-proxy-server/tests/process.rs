//! The server as a process: durability across SIGKILL, and clean shutdown on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use call_proxy_server::client::Client;
use shared_proto::*;
use test_support::net::free_port;
use test_support::process::{spawn_listening, KillOnDrop};

struct Server {
    /// Killed (SIGKILL) when dropped.
    child: KillOnDrop,
    addr: SocketAddr,
}

impl Server {
    async fn start(db: &Path, port: u16) -> Server {
        // TVs are limited to a few requests a second; these test callers are not.
        let config = db.with_extension("toml");
        std::fs::write(
            &config,
            "requests_per_sec = 1000000\nrequest_burst = 1000000\n",
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .arg("--db")
        .arg(db)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        let child = spawn_listening(&mut cmd, addr, Duration::from_secs(5))
            .await
            .expect("server listening");
        Server { child, addr }
    }

    fn kill(&mut self) {
        test_support::process::kill(&mut self.child); // SIGKILL
    }

    fn signal(&self, sig: i32) {
        test_support::process::signal(self.child.id(), sig).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_cached_calls_survive_sigkill_and_are_delivered_at_next_boot() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("durable.sqlite");
    let port = free_port().unwrap();
    let mut server = Server::start(&db, port).await;
    let addr = server.addr;
    const CALLEE: UserId = 9000;
    {
        let mut c = Client::connect(addr).await.unwrap();
        c.register(CALLEE, 4000).await.unwrap();
        c.bye().await.unwrap();
    }
    // Eight TVs keep calling the switched-off TV; every "cached" reply is an
    // acknowledgement that must survive.
    let acked = Arc::new(Mutex::new(Vec::<CallId>::new()));
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            c.register(100 + i, 5000).await.unwrap();
            loop {
                match c
                    .request(Request::Dial {
                        callee: CALLEE,
                        key: None,
                    })
                    .await
                {
                    Ok(Reply::Dial(DialOutcome::Cached { call_id })) => {
                        acked.lock().unwrap().push(call_id)
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => return, // the server died under us
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 2000 {
        assert!(tokio::time::Instant::now() < deadline, "callers stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let acked: HashSet<CallId> = acked.lock().unwrap().iter().copied().collect();
    assert!(acked.len() >= 2000);

    let server = Server::start(&db, port).await;
    let mut tv = Client::connect(server.addr).await.unwrap();
    let reg = tv.register(CALLEE, 4000).await.unwrap();
    assert!(reg.cached_waiting as usize >= acked.len());
    let delivered: HashSet<CallId> = tv
        .fetch_all_cached()
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!(c.reason, MissedReason::Offline);
            c.call_id
        })
        .collect();
    let lost: Vec<_> = acked.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged calls lost: {lost:?}",
        lost.len()
    );
    // The callers were recorded online before the crash; the restart repaired that.
    let states = tv
        .request(Request::QueryState {
            users: vec![100, 101],
        })
        .await
        .unwrap();
    let Reply::States(states) = states else {
        panic!()
    };
    assert!(states.iter().all(|s| s.state == NetState::Offline));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_calls_closes_sessions_records_offline_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("term.sqlite");
    let mut server = Server::start(&db, free_port().unwrap()).await;
    let mut a = Client::connect(server.addr).await.unwrap();
    a.register(1, 5000).await.unwrap();
    let mut b = Client::connect(server.addr).await.unwrap();
    b.register(2, 6000).await.unwrap();
    let Reply::Dial(DialOutcome::Ringing { call_id, .. }) = a
        .request(Request::Dial {
            callee: 2,
            key: None,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let _ = b.next_event().await.unwrap();
    b.request(Request::Answer { call_id }).await.unwrap();
    let _ = a.next_event().await.unwrap(); // answered

    server.signal(libc::SIGTERM);
    for c in [&mut a, &mut b] {
        let ended = tokio::time::timeout(Duration::from_secs(5), c.next_event())
            .await
            .unwrap();
        assert_eq!(
            ended.unwrap(),
            Event::CallEnded {
                call_id,
                reason: EndReason::ServerShutdown
            }
        );
        let closing = tokio::time::timeout(Duration::from_secs(5), c.next_event())
            .await
            .unwrap();
        assert_eq!(closing.unwrap_err().code(), Some(ErrorCode::SHUTTING_DOWN));
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");

    let conn = rusqlite::Connection::open(&db).unwrap();
    let online: i64 = conn
        .query_row(
            "SELECT count(*) FROM user_property WHERE user_netstate = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(online, 0);
    let (outcome, ended): (String, Option<String>) = conn
        .query_row(
            "SELECT outcome, ended_at FROM user_call WHERE id = ?1",
            [call_id as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome, "answered");
    assert!(ended.is_some());
}
