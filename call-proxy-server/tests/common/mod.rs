//! Test harness: a real server on 127.0.0.1:0 over a real SQLite file, and helpers to
//! look into its database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::client::Client;
use call_proxy_server::{bind, run, Config, Shared, SqliteOptions, SqliteStore};
use shared_proto::{Event, UserId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub addr: SocketAddr,
    pub db_path: PathBuf,
    pub shared: Arc<Shared<SqliteStore>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

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
            ..Config::default()
        };
        tune(&mut config);
        config.validate().expect("valid config");
        let store = SqliteStore::open(&db_path, SqliteOptions::default()).expect("open db");
        let listener = bind(config.listen).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Shared::new(store, config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, Arc::clone(&shared), async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            db_path,
            shared,
            stop: Some(stop),
            task: Some(task),
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

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
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
