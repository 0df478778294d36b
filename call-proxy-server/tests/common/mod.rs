//! Test harness: a real server on 127.0.0.1:0 over a real database (a SQLite file, or a
//! PostgreSQL database of its own with `CALL_PROXY_TEST_BACKEND=postgres`: see [`db`]),
//! serving TLS 1.3 as in production, with test TVs that are enrolled and connect over
//! TLS; and helpers to look into its database.
//!
//! Each test user gets its own TV key ([`Tvs`]), enrolled for that user by writing its
//! credential into the server's database (what the operator's approval records; the
//! server looks credentials up at every registration, so a running server sees it at
//! once), and a TLS configuration trusting the server's CA (one per key, so reconnects
//! resume their TLS session as a TV's do).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod db;
pub mod messages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use call_proxy_server::admin::{self, AdminHandle, AdminOptions};
use call_proxy_server::client::{Client, ClientError};
use call_proxy_server::embedded::RunningServer;
use call_proxy_server::storage::{self, AnyStore, DbTarget};
use call_proxy_server::{Config, Shared};
use control_client::{TlsClient, TvKey};
pub use db::TestDb;
use shared_proto::{DialOutcome, Event, Reply, Request, UserId};
use tokio::net::TcpStream;

/// A test TV's control stream: TLS 1.3 over TCP.
pub type Tls = tokio_rustls::client::TlsStream<control_client::recorded::Recorded<TcpStream>>;

/// A test TV's control client.
pub type Tv = Client<Tls>;

/// TLS 1.3 to a server whose CA is `ca_pem`, presenting `key`, as a TV sets it up.
pub fn tls_config(ca_pem: &[u8], key: &TvKey) -> TlsClient {
    TlsClient::new(ca_pem, key).unwrap()
}

/// A TLS connection to `server` (from `local`, if given) with `config`. A server that
/// refused the connection before TLS (its rejecting preamble where the ServerHello
/// should be) gives [`ClientError::Refused`] with its status and reason, as on plain
/// TCP (the real client's [`control_client::recorded`]).
pub async fn tls_connect(
    config: &TlsClient,
    server: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<Tls, ClientError> {
    config
        .connect(server, &server.ip().to_string(), local)
        .await
        .map_err(ClientError::from_connect)
}

/// The TVs of one server: a key per user, enrolled in the server's database, and the TLS
/// settings to reach it. Also a stranger's key, enrolled for nobody.
pub struct Tvs {
    /// The server's database, where enrollments are written.
    db: Arc<TestDb>,
    /// The server's CA certificate (PEM), made by the server at its first start.
    ca: PathBuf,
    /// The CA, read at first use.
    ca_pem: OnceLock<Vec<u8>>,
    /// Each user's TLS settings (with its key and its resumption cache).
    by_user: Mutex<HashMap<UserId, TlsClient>>,
    /// A key nobody enrolled, for connections that never register.
    stranger: OnceLock<TlsClient>,
}

impl Tvs {
    /// The TVs of the server with the database `db`, which keeps its CA in its directory
    /// (`tls/ca.crt`, as a server without TLS flags makes it).
    pub fn new(db: &Arc<TestDb>) -> Tvs {
        let ca = db.ca_path();
        Tvs {
            db: Arc::clone(db),
            ca,
            ca_pem: OnceLock::new(),
            by_user: Mutex::new(HashMap::new()),
            stranger: OnceLock::new(),
        }
    }

    /// The server's CA (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        self.ca_pem.get_or_init(|| {
            std::fs::read(&self.ca)
                .unwrap_or_else(|e| panic!("the server's CA {}: {e}", self.ca.display()))
        })
    }

    /// `user`'s TLS settings, its key made and enrolled on first use.
    pub fn enroll(&self, user: UserId) -> TlsClient {
        let mut by_user = self.by_user.lock().unwrap();
        if let Some(c) = by_user.get(&user) {
            return c.clone();
        }
        let key = TvKey::generate().unwrap();
        record_credential(&self.db, &key, user);
        let config = tls_config(self.ca_pem(), &key);
        by_user.insert(user, config.clone());
        config
    }

    /// The stranger's TLS settings.
    pub fn stranger(&self) -> TlsClient {
        self.stranger
            .get_or_init(|| tls_config(self.ca_pem(), &TvKey::generate().unwrap()))
            .clone()
    }

    /// A TLS connection as `user`'s enrolled TV (from `local`, if given), the control
    /// preambles exchanged; not registered yet.
    pub async fn connect_from(
        &self,
        server: SocketAddr,
        user: UserId,
        local: Option<SocketAddr>,
    ) -> Result<Tv, ClientError> {
        let tls = tls_connect(&self.enroll(user), server, local).await?;
        Client::handshake(tls).await
    }

    /// A TLS connection as `user`'s enrolled TV, not registered yet.
    pub async fn connect(&self, server: SocketAddr, user: UserId) -> Tv {
        self.connect_from(server, user, None)
            .await
            .expect("TLS connection")
    }

    /// `user`'s enrolled TV, registered with media port `port`.
    pub async fn tv(&self, server: SocketAddr, user: UserId, port: u16) -> Tv {
        let mut c = self.connect(server, user).await;
        c.register(user, port).await.expect("register");
        c
    }

    /// A TLS connection by the stranger with nothing said yet inside it (for bad input
    /// inside TLS).
    pub async fn raw_tls(&self, server: SocketAddr) -> Tls {
        tls_connect(&self.stranger(), server, None)
            .await
            .expect("TLS connection")
    }

    /// A TLS connection as `user`'s enrolled TV with nothing said yet inside it (for
    /// clients that speak the protocol themselves).
    pub async fn raw_tls_as(&self, server: SocketAddr, user: UserId) -> Tls {
        tls_connect(&self.enroll(user), server, None)
            .await
            .expect("TLS connection")
    }

    /// A TLS connection by the stranger, preambles exchanged (for requests that need no
    /// registration).
    pub async fn stranger_client(&self, server: SocketAddr) -> Result<Tv, ClientError> {
        Client::handshake(tls_connect(&self.stranger(), server, None).await?).await
    }
}

/// Records `key` as `user`'s enrolled TV in the database `db`, as the operator's
/// approval does, next to a server that may be running on it.
pub fn record_credential(db: &TestDb, key: &TvKey, user: UserId) {
    let fingerprint = call_proxy_server::tls::Fingerprint::of(&key.cert);
    db.execute(&format!(
        "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at)
         VALUES ({}, {user}, {}, {})",
        db.bytes_literal(&fingerprint.0),
        db.bytes_literal(key.cert.as_ref()),
        db.time_literal(1_767_225_600_000),
    ));
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// Its database.
    pub db: Arc<TestDb>,
    pub shared: Arc<Shared<AnyStore>>,
    /// Its enrolled TVs.
    pub tvs: Tvs,
    server: Option<RunningServer<AnyStore>>,
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
        let db = TestDb::new(dir.path(), "test");
        Self::start_on(db, dir, tune).await
    }

    /// A server on `db`, keeping its files in `dir` (which it keeps until it stops).
    pub async fn start_on(
        db: TestDb,
        dir: tempfile::TempDir,
        tune: impl FnOnce(&mut Config),
    ) -> TestServer {
        let db = Arc::new(db);
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ring_timeout_ms: 5_000,
            shutdown_grace_ms: 2_000,
            // TLS with a private CA made in the database's directory, as `serve` does.
            insecure_plaintext: false,
            ..Config::default()
        };
        db.configure(&mut config);
        tune(&mut config);
        config.validate().expect("valid config");
        let store = storage::open(&config).await.expect("open db");
        let server = RunningServer::start(config, store).expect("start");
        TestServer {
            addr: server.addr,
            tvs: Tvs::new(&db),
            db,
            shared: Arc::clone(&server.shared),
            server: Some(server),
            admins: Vec::new(),
            _dir: dir,
        }
    }

    /// `user`'s enrolled TV over TLS, registered with media port `port`.
    pub async fn tv(&self, user: UserId, port: u16) -> Tv {
        self.tvs.tv(self.addr, user, port).await
    }

    /// `user`'s enrolled TV over TLS, preambles exchanged, not registered yet.
    pub async fn connect(&self, user: UserId) -> Tv {
        self.tvs.connect(self.addr, user).await
    }

    /// `user`'s enrolled TV over TLS from `source` (port 0), not registered yet.
    pub async fn connect_from(
        &self,
        user: UserId,
        source: std::net::IpAddr,
    ) -> Result<Tv, ClientError> {
        self.tvs
            .connect_from(self.addr, user, Some(SocketAddr::new(source, 0)))
            .await
    }

    /// A TLS connection with nothing said inside it yet, by a TV enrolled for nobody.
    pub async fn raw_tls(&self) -> Tls {
        self.tvs.raw_tls(self.addr).await
    }

    /// A TLS connection, preambles exchanged, by a TV enrolled for nobody.
    pub async fn stranger(&self) -> Result<Tv, ClientError> {
        self.tvs.stranger_client(self.addr).await
    }

    /// Registers `user` and powers it off again, so it exists but is offline.
    pub async fn known_offline(&self, user: UserId) {
        let c = self.tv(user, 4000).await;
        c.bye().await.expect("bye");
    }

    /// `(user_ip, user_netstate, media_port)` of a user.
    pub fn property(&self, user: UserId) -> Option<(String, i64, i64)> {
        let r = self.db.row(&format!(
            "SELECT user_ip, user_netstate, media_port FROM user_property WHERE user_id = {user}"
        ))?;
        Some((
            r[0].clone()?,
            r[1].as_deref()?.parse().ok()?,
            r[2].as_deref()?.parse().ok()?,
        ))
    }

    /// `(user_id, otheruser_id, outcome, delivered)` of a call.
    pub fn call(&self, id: u64) -> Option<(i64, i64, String, i64)> {
        let r = self.db.row(&format!(
            "SELECT user_id, otheruser_id, outcome, delivered FROM user_call WHERE id = {id}"
        ))?;
        Some((
            r[0].as_deref()?.parse().ok()?,
            r[1].as_deref()?.parse().ok()?,
            r[2].clone()?,
            r[3].as_deref()?.parse().ok()?,
        ))
    }

    /// Starts an admin listener on 127.0.0.1:0 over this server (token
    /// [`ADMIN_TOKEN`]) and returns its base URL. `db` overrides the database it
    /// queries (to see readiness fail).
    pub async fn start_admin(&mut self, db: Option<DbTarget>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let addr = listener.local_addr().expect("admin addr");
        let opts = AdminOptions {
            token: ADMIN_TOKEN.to_string(),
            db: db.unwrap_or_else(|| self.db.target()),
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
            self.db.count(
                "SELECT count(*) FROM user_call
                 WHERE outcome = 'ringing' OR (outcome = 'answered' AND ended_at IS NULL)",
            ) == 0
        })
        .await;
        assert!(settled, "calls still open in the database");
    }
}

/// `call-proxy-server serve` on 127.0.0.1:`port` over `db`, with the TOML `config`
/// written beside the database as `<name>.toml`: the server process the process-level
/// tests start (log at WARN to the test's stderr).
pub fn serve_command(db: &TestDb, name: &str, config: &str, port: u16) -> std::process::Command {
    let file = db.dir().join(format!("{name}.toml"));
    std::fs::write(&file, config).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--config",
    ])
    .arg(&file)
    .args(db.serve_args())
    .env("RUST_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::inherit());
    cmd
}

/// A node of several on `db` ([`serve_command`] with its name `id` and slot `slot`):
/// generous request limits, a heartbeat lease of `lease_ms`.
pub fn node_command(
    db: &TestDb,
    id: &str,
    slot: u8,
    port: u16,
    lease_ms: u64,
) -> std::process::Command {
    let mut cmd = serve_command(
        db,
        id,
        &format!("requests_per_sec = 100000\nrequest_burst = 100000\nnode_lease_ms = {lease_ms}\n"),
        port,
    );
    cmd.args(["--node-id", id, "--node-slot", &slot.to_string()]);
    cmd
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
pub async fn event(c: &mut Tv) -> Event {
    tokio::time::timeout(Duration::from_secs(5), c.next_event())
        .await
        .expect("an event in time")
        .expect("link alive")
}

/// The ids of every call cached for `c`'s TV (all pages, not acknowledged), in
/// ascending order.
pub async fn cached_ids(c: &mut Tv) -> Vec<shared_proto::CallId> {
    let mut ids: Vec<_> = c
        .fetch_all_cached()
        .await
        .expect("fetch")
        .iter()
        .map(|x| x.call_id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Powers `user` on, fetches its cached calls and acknowledges them; returns the
/// registered client and how many calls were acknowledged.
pub async fn power_on_and_ack(srv: &TestServer, user: UserId, port: u16) -> (Tv, u32) {
    let mut c = srv.tv(user, port).await;
    let waiting = cached_ids(&mut c).await;
    let acked = c.ack_cached(&waiting).await.expect("ack");
    (c, acked)
}

/// Dials (no key, no SRTP) and returns the outcome, or the server's refusal.
pub async fn try_dial(c: &mut Tv, callee: UserId) -> Result<DialOutcome, ClientError> {
    match c
        .request(Request::Dial {
            callee,
            key: None,
            srtp: None,
            ice: None,
        })
        .await?
    {
        Reply::Dial(o) => Ok(o),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Dials and returns the outcome.
pub async fn dial(c: &mut Tv, callee: UserId) -> DialOutcome {
    try_dial(c, callee).await.expect("dial")
}

/// The call log the operator tests query, made by real traffic.
pub struct CallLog {
    /// TV 10, online.
    pub a: Tv,
    /// TV 20, online.
    pub b: Tv,
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
        ice: None,
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
        ice: None,
    })
    .await
    .unwrap();
    b.request(Request::HangUp { call_id }).await.unwrap();
    srv.calls_settled().await;
    CallLog { a, b, t_mid }
}

/// The operator CLI (`call-proxy-server ARGS`), its environment holding what the test
/// database needs (a PostgreSQL password): (exit code, stdout, stderr).
pub fn operator_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_call-proxy-server"))
        .args(args)
        .envs(db::cli_env())
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One request to an admin API: `method` (GET, POST, PUT) on `url` with `token` as the
/// bearer token (none: no `Authorization` header) and a JSON `body`; (status, body).
pub async fn admin_http(
    method: &'static str,
    url: String,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let body = body.unwrap_or_default();
        let mut resp = match method {
            "GET" => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            "POST" | "PUT" => {
                let mut r = if method == "POST" {
                    agent.post(&url)
                } else {
                    agent.put(&url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.header("Content-Type", "application/json")
                    .send(body.as_bytes())
            }
            other => panic!("no {other} requests here"),
        }
        .expect("admin request");
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}
