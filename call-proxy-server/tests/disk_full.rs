//! The server with its database on a small tmpfs that fills up (issue 11, item 4): new
//! calls are refused with `STORAGE_FULL` and nothing rings without its record, while
//! registrations and offline marks stay true; `/readyz` and `/metrics` say so; once
//! space returns the server takes calls again without a restart, and every call it
//! acknowledged is delivered.
//!
//! Mounting the tmpfs needs root (CAP_SYS_ADMIN), as CI runs the tests; it is
//! unmounted when the test ends, pass or fail. The TVs are enrolled and connect over
//! TLS (the server's CA is made beside the database, on the tmpfs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use call_proxy_server::client::ClientError;
use common::{Tv, Tvs};
use shared_proto::*;
use test_support::fs::{fill, Tmpfs};
use test_support::net::free_port;
use test_support::process::{spawn_listening, KillOnDrop};

const TOKEN: &str = "disk-full-test-token";

async fn http_get(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut resp = agent
            .get(&url)
            .header("Authorization", format!("Bearer {TOKEN}"))
            .call()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}

/// `call_proxy_storage_full` as `/metrics` reports it.
async fn storage_full_gauge(admin: &str) -> String {
    let (status, body) = http_get(format!("{admin}/metrics")).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("call_proxy_storage_full "))
        .unwrap_or("missing")
        .to_string()
}

/// `user_netstate` of `user`, read from the database file as the operator would.
fn netstate(db: &Path, user: UserId) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT user_netstate FROM user_property WHERE user_id = ?1",
        [user as i64],
        |r| r.get(0),
    )
    .ok()
}

async fn dial(c: &mut Tv, callee: UserId) -> Result<DialOutcome, ClientError> {
    match c
        .request(Request::Dial {
            callee,
            key: Some(rand::random()),
            srtp: None,
            ice: None,
        })
        .await?
    {
        Reply::Dial(o) => Ok(o),
        other => panic!("{other:?}"),
    }
}

fn is_storage_full(r: &Result<DialOutcome, ClientError>) -> bool {
    matches!(r, Err(ClientError::Server(e)) if e.code == ErrorCode::STORAGE_FULL)
}

/// Waits up to `limit` for `cond` to hold.
async fn until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_calls_keeps_states_true_and_recovers_without_a_restart() {
    let disk = Tmpfs::mount(6 << 20).unwrap();
    // The SQLite backend's own disk (PostgreSQL's full disk is PostgreSQL's data
    // directory: a test of its own).
    let test_db = std::sync::Arc::new(common::TestDb::sqlite(disk.path(), "call-proxy"));
    let db = disk.path().join("call-proxy.sqlite");
    let port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let config = disk.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "requests_per_sec = 1000000\nrequest_burst = 1000000\ndisk_reserve_mb = 1\n\
             admin_listen = \"127.0.0.1:{admin_port}\"\n"
        ),
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
    cmd.args(["serve", "--listen", &addr.to_string(), "--config"])
        .arg(&config)
        .arg("--db")
        .arg(&db)
        .env("CALL_PROXY_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let _server: KillOnDrop = spawn_listening(&mut cmd, addr, Duration::from_secs(10))
        .await
        .expect("server listening");
    let admin = format!("http://127.0.0.1:{admin_port}");
    assert!(
        until(Duration::from_secs(5), || async {
            std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_ok()
        })
        .await
    );
    assert_eq!(http_get(format!("{admin}/readyz")).await.0, 200);
    assert!(disk.path().join("call-proxy.sqlite-reserve").exists());
    const CALLER: UserId = 1001;
    const ONLINE: UserId = 2002;
    const OFF: UserId = 3003;
    const NEWCOMER: UserId = 4004;
    // Every TV is enrolled while the disk has room (an enrollment is a write too).
    let tvs = Tvs::new(&test_db);
    for user in [CALLER, ONLINE, OFF, NEWCOMER] {
        tvs.enroll(user);
    }
    tvs.tv(addr, OFF, 7000).await.bye().await.unwrap();
    let mut caller = tvs.tv(addr, CALLER, 5000).await;
    let mut online = tvs.tv(addr, ONLINE, 6000).await;

    // Calls cached before the disk fills must survive it.
    let mut acked = Vec::new();
    for _ in 0..50 {
        match dial(&mut caller, OFF).await {
            Ok(DialOutcome::Cached { call_id }) => acked.push(call_id),
            other => panic!("{other:?}"),
        }
    }
    // The disk fills up. Calls to the switched-off TV are cached while the database
    // still has room (its WAL's space is reused), then refused, clearly.
    let filler = fill(disk.path()).unwrap();
    let mut refused = None;
    for _ in 0..20_000 {
        let r = dial(&mut caller, OFF).await;
        match r {
            Ok(DialOutcome::Cached { call_id }) => acked.push(call_id),
            r if is_storage_full(&r) => {
                refused = Some(r);
                break;
            }
            other => panic!("a dial on a full disk answered {other:?}"),
        }
    }
    let refused = refused.expect("the full disk refused a call within 20,000 dials");
    eprintln!("disk full after {} cached calls: {refused:?}", acked.len());
    let (status, body) = http_get(format!("{admin}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disk is full"), "{body}");
    assert_eq!(storage_full_gauge(&admin).await, "1");

    // A call to an online TV is refused too, and does not ring there (a dial without
    // an idempotency key, as agents one release behind send it).
    let r = match caller
        .request(Request::Dial {
            callee: ONLINE,
            key: None,
            srtp: None,
            ice: None,
        })
        .await
    {
        Ok(Reply::Dial(o)) => Ok(o),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    };
    assert!(is_storage_full(&r), "{r:?}");
    let rang = tokio::time::timeout(Duration::from_millis(500), online.next_event()).await;
    assert!(
        rang.is_err(),
        "the callee heard {rang:?} for a refused call"
    );

    // States stay true: a TV that powers on is registered (and told so), one that
    // powers off is recorded offline.
    let mut newcomer = tvs.connect(addr, NEWCOMER).await;
    newcomer
        .register(NEWCOMER, 8000)
        .await
        .expect("register on a full disk");
    online.bye().await.unwrap();
    assert!(
        until(Duration::from_secs(5), || async {
            netstate(&db, ONLINE) == Some(0) && netstate(&db, NEWCOMER) == Some(1)
        })
        .await,
        "states on a full disk: {ONLINE} {:?}, {NEWCOMER} {:?}",
        netstate(&db, ONLINE),
        netstate(&db, NEWCOMER)
    );
    // Still full: nothing was freed.
    assert!(is_storage_full(&dial(&mut caller, OFF).await));

    // Space returns: the server takes calls again, no restart.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        until(Duration::from_secs(10), || async {
            http_get(format!("{admin}/readyz")).await.0 == 200
        })
        .await,
        "the server did not become ready once space returned"
    );
    assert_eq!(storage_full_gauge(&admin).await, "0");
    assert!(disk.path().join("call-proxy.sqlite-reserve").exists());
    match dial(&mut caller, OFF).await {
        Ok(DialOutcome::Cached { call_id }) => acked.push(call_id),
        other => panic!("after recovery: {other:?}"),
    }
    match dial(&mut caller, NEWCOMER).await {
        Ok(DialOutcome::Ringing { call_id, .. }) => {
            match tokio::time::timeout(Duration::from_secs(5), newcomer.next_event()).await {
                Ok(Ok(Event::IncomingCall { call_id: rung, .. })) => assert_eq!(rung, call_id),
                other => panic!("the newcomer heard {other:?}"),
            }
        }
        other => panic!("after recovery: {other:?}"),
    }

    // Every acknowledged call reaches the switched-off TV, and nothing refused does.
    let mut off = tvs.tv(addr, OFF, 7000).await;
    let got = common::cached_ids(&mut off).await;
    acked.sort_unstable();
    assert_eq!(got, acked, "cached calls delivered vs acknowledged");

    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
