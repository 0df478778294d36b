//! Test harness: a real server on 127.0.0.1:0 over a real SQLite file, and helpers to
//! look into its database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::admin::{self, AdminHandle, AdminOptions};
use call_proxy_server::client::Client;
use call_proxy_server::embedded::RunningServer;
use call_proxy_server::{Config, Shared, SqliteOptions, SqliteStore};
use shared_proto::{DialOutcome, Event, Reply, Request, UserId};

pub struct TestServer {
    pub addr: SocketAddr,
    pub db_path: PathBuf,
    pub shared: Arc<Shared<SqliteStore>>,
    server: Option<RunningServer<SqliteStore>>,
    /// Admin listeners started by [`TestServer::start_admin`], stopped after the server.
    admins: Vec<AdminHandle>,
    _dir: tempfile::TempDir,
}

/// The admin token of test servers.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("test.sqlite");
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: Some(db_path.clone()),
            ring_timeout_ms: 5_000,
            shutdown_grace_ms: 2_000,
            // Plain TCP until these tests move to TLS with enrolled TVs.
            insecure_plaintext: true,
            ..Config::default()
        };
        tune(&mut config);
        config.validate().expect("valid config");
        let store = SqliteStore::open(&db_path, SqliteOptions::default()).expect("open db");
        let server = RunningServer::start(config, store).expect("start");
        TestServer {
            addr: server.addr,
            db_path,
            shared: Arc::clone(&server.shared),
            server: Some(server),
            admins: Vec::new(),
            _dir: dir,
        }
    }

    /// A registered client for `user` with media port `port`.
    pub async fn tv(&self, user: UserId, port: u16) -> Client {
        let mut c = Client::connect(self.addr).await.expect("connect");
        c.register(user, port).await.expect("register");
        c
    }

    /// Registers `user` and powers it off again, so it exists but is offline.
    pub async fn known_offline(&self, user: UserId) {
        let c = self.tv(user, 4000).await;
        c.bye().await.expect("bye");
    }

    /// A read-only view of the database.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            &self.db_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open db read-only")
    }

    /// `(user_ip, user_netstate, media_port)` of a user.
    pub fn property(&self, user: UserId) -> Option<(String, i64, i64)> {
        self.db()
            .query_row(
                "SELECT user_ip, user_netstate, media_port FROM user_property WHERE user_id = ?1",
                [user as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .ok()
    }

    /// `(user_id, otheruser_id, outcome, delivered)` of a call.
    pub fn call(&self, id: u64) -> Option<(i64, i64, String, i64)> {
        self.db()
            .query_row(
                "SELECT user_id, otheruser_id, outcome, delivered FROM user_call WHERE id = ?1",
                [id as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .ok()
    }

    /// Starts an admin listener on 127.0.0.1:0 over this server (token
    /// [`ADMIN_TOKEN`]) and returns its base URL. `db_path` overrides the database it
    /// queries (to see readiness fail).
    pub async fn start_admin(&mut self, db_path: Option<PathBuf>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let addr = listener.local_addr().expect("admin addr");
        let opts = AdminOptions {
            token: ADMIN_TOKEN.to_string(),
            db_path: db_path.unwrap_or_else(|| self.db_path.clone()),
        };
        self.admins
            .push(admin::spawn(listener, Arc::clone(&self.shared), opts));
        format!("http://{addr}")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.expect("server task");
        }
        for a in self.admins.drain(..) {
            a.stop().await;
        }
    }

    /// Waits until every answered call's end is recorded (the end of a call commits
    /// with the next group, after the hang-up was answered).
    pub async fn calls_settled(&self) {
        let settled = eventually(Duration::from_secs(5), || {
            self.db()
                .query_row(
                    "SELECT count(*) FROM user_call
                     WHERE outcome = 'ringing' OR (outcome = 'answered' AND ended_at IS NULL)",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .is_ok_and(|n| n == 0)
        })
        .await;
        assert!(settled, "calls still open in the database");
    }
}

/// Waits until `cond` holds, for at most `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next event, failing the test if none arrives within 5 s.
pub async fn event(c: &mut Client) -> Event {
    tokio::time::timeout(Duration::from_secs(5), c.next_event())
        .await
        .expect("an event in time")
        .expect("link alive")
}

/// Powers `user` on, fetches its cached calls and acknowledges them; returns the
/// registered client and how many calls were acknowledged.
pub async fn power_on_and_ack(srv: &TestServer, user: UserId, port: u16) -> (Client, u32) {
    let mut c = srv.tv(user, port).await;
    let waiting: Vec<u64> = c
        .fetch_all_cached()
        .await
        .expect("fetch")
        .iter()
        .map(|x| x.call_id)
        .collect();
    let acked = c.ack_cached(&waiting).await.expect("ack");
    (c, acked)
}

/// Dials and returns the outcome.
pub async fn dial(c: &mut Client, callee: UserId) -> DialOutcome {
    match c
        .request(Request::Dial {
            callee,
            key: None,
            srtp: None,
        })
        .await
        .expect("dial")
    {
        Reply::Dial(o) => o,
        other => panic!("{other:?}"),
    }
}

/// The call log the operator tests query, made by real traffic.
pub struct CallLog {
    /// TV 10, online.
    pub a: Client,
    /// TV 20, online.
    pub b: Client,
    /// A moment between the first two calls and the last four.
    pub t_mid: i64,
}

/// Six calls: 10 -> 30 (off) twice, cached; then 10 -> 20 answered, rejected and missed
/// (ring timeout: start the server with a short one); then 20 -> 10 answered. Returns
/// once every call's end is recorded.
pub async fn six_calls(srv: &TestServer) -> CallLog {
    srv.known_offline(30).await;
    let mut a = srv.tv(10, 5000).await;
    let mut b = srv.tv(20, 6000).await;
    for _ in 0..2 {
        assert!(matches!(dial(&mut a, 30).await, DialOutcome::Cached { .. }));
    }
    // Call dates have millisecond resolution: keep the midpoint strictly between.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let t_mid = call_proxy_server::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, 20).await else {
        panic!()
    };
    let _ = event(&mut b).await;
    b.request(Request::Answer {
        call_id,
        srtp: None,
    })
    .await
    .unwrap();
    a.request(Request::HangUp { call_id }).await.unwrap();
    let DialOutcome::Ringing { call_id, .. } = dial(&mut a, 20).await else {
        panic!()
    };
    while !matches!(event(&mut b).await, Event::IncomingCall { .. }) {}
    b.request(Request::Reject { call_id }).await.unwrap();
    let DialOutcome::Ringing {
        call_id: missed, ..
    } = dial(&mut a, 20).await
    else {
        panic!()
    };
    loop {
        if let Event::CallEnded { call_id, .. } = event(&mut a).await {
            if call_id == missed {
                break;
            }
        }
    }
    let DialOutcome::Ringing { call_id, .. } = dial(&mut b, 10).await else {
        panic!()
    };
    while !matches!(event(&mut a).await, Event::IncomingCall { .. }) {}
    a.request(Request::Answer {
        call_id,
        srtp: None,
    })
    .await
    .unwrap();
    b.request(Request::HangUp { call_id }).await.unwrap();
    srv.calls_settled().await;
    CallLog { a, b, t_mid }
}
