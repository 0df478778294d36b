//! Test harness: a real call-proxy server on loopback over a real SQLite file, over TLS
//! with enrolled TVs (as in production), real agents, a UDP relay that loses and reorders
//! packets, and WAV analysis.
//!
//! Trust: the server's private CA is made under `<db dir>/tls/` before the first server
//! starts on a database (as the server itself would on first start; every later server
//! on that database reuses it). Each TV (user number) gets one key per database, made on
//! "the TV" and enrolled once: through the real device flow (start an enrollment over
//! TLS, the operator approves its code, the TV polls and is told it is enrolled) while a
//! server runs, or by writing its credential into the database while none runs (a server
//! running on the file must not be bypassed: opening the store again would repair it).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod netlab;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use call_proxy_server::embedded::RunningServer;
use call_proxy_server::{Config, SqliteOptions, SqliteStore};
use control_client::{Client, Stream, TlsClient, Transport, TvKey};
use rand::{Rng, SeedableRng};
use shared_proto::{EnrollmentStatus, Reply, Request};
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tv_agent::identity::{Enrolled, IdentityDir};
use tv_agent::media::AudioSpec;
use tv_agent::{Agent, AgentConfig, AgentEvent};

/// The server's CA and the TVs enrolled on one database.
pub struct Trust {
    db: PathBuf,
    /// The CA TVs trust (`<db dir>/tls/ca.crt`).
    pub ca_path: PathBuf,
    pub ca_pem: Vec<u8>,
    /// Each user's TV key, enrolled on this database.
    keys: tokio::sync::Mutex<HashMap<u64, TvKey>>,
    /// The server running on this database, if one is.
    running: Mutex<Option<SocketAddr>>,
}

impl Trust {
    /// The trust of the database at `db` (one per database in this test binary).
    pub fn of(db: &Path) -> Arc<Trust> {
        static ALL: OnceLock<Mutex<HashMap<PathBuf, Arc<Trust>>>> = OnceLock::new();
        let mut all = ALL.get_or_init(Default::default).lock().unwrap();
        Arc::clone(all.entry(db.to_path_buf()).or_insert_with(|| {
            let config = Config {
                db: Some(db.to_path_buf()),
                ..Config::default()
            };
            // Loopback, and the NAT tests' internet address of the server (netlab).
            let mut names = config.tls_names.clone();
            names.push(netlab::SERVER_IP.to_string());
            let files =
                call_proxy_server::tls::server_cert_files(None, None, &config.tls_dir(), &names)
                    .unwrap();
            let ca_path = files.ca.unwrap();
            Arc::new(Trust {
                db: db.to_path_buf(),
                ca_pem: std::fs::read(&ca_path).unwrap(),
                ca_path,
                keys: Default::default(),
                running: Mutex::new(None),
            })
        }))
    }

    /// TLS trusting this server, presenting `key`.
    pub fn transport(&self, key: &TvKey) -> Transport {
        Transport::Tls(TlsClient::new(&self.ca_pem, key).unwrap())
    }

    /// `user`'s TV key, made and enrolled on first use.
    pub async fn key(&self, user: u64) -> TvKey {
        let mut keys = self.keys.lock().await;
        if let Some(k) = keys.get(&user) {
            return k.clone();
        }
        let key = TvKey::generate().unwrap();
        self.enroll(user, &key).await;
        keys.insert(user, key.clone());
        key
    }

    /// Enrolls `key` as `user`'s TV.
    async fn enroll(&self, user: u64, key: &TvKey) {
        let running = *self.running.lock().unwrap();
        match running {
            Some(addr) => self.enroll_live(addr, user, key).await,
            None => {
                call_proxy_server::storage::sqlite::enroll::seed_credentials(
                    &self.db,
                    &[(key.cert.to_vec(), user)],
                )
                .unwrap();
            }
        }
    }

    /// The device flow against the running server at `addr`, approved by the operator
    /// store (what `call-proxy-server approve` does).
    async fn enroll_live(&self, addr: SocketAddr, user: u64, key: &TvKey) {
        use call_proxy_server::storage::enroll::{normalise_code, Approval};
        use call_proxy_server::storage::operator::OperatorStore;
        let mut tv = Client::connect_with(&self.transport(key), addr, None)
            .await
            .unwrap();
        let status = |r: Reply| match r {
            Reply::Enrollment(s) => s,
            other => panic!("not an enrollment reply: {other:?}"),
        };
        let start = Request::StartEnrollment {
            agent_version: "tv-agent tests".into(),
        };
        let EnrollmentStatus::Pending { user_code, .. } = status(tv.request(start).await.unwrap())
        else {
            panic!("a new key is pending")
        };
        let ops = call_proxy_server::storage::open_operator(
            &call_proxy_server::storage::DbTarget::sqlite(&self.db),
            1,
        );
        let code = normalise_code(&user_code).unwrap();
        let approved = ops
            .approve(code, user, false, call_proxy_server::clock::now_ms())
            .await
            .unwrap();
        assert!(
            matches!(approved, Approval::Approved { .. }),
            "{approved:?}"
        );
        let now = status(tv.request(Request::PollEnrollment).await.unwrap());
        assert_eq!(now, EnrollmentStatus::Enrolled { user_id: user });
        let _ = tv.bye().await;
    }

    /// An in-process agent of `user` (enrolled) for the server at `server`.
    pub async fn agent_config(
        &self,
        server: SocketAddr,
        user: u64,
        audio_in: AudioSpec,
        audio_out: AudioSpec,
    ) -> AgentConfig {
        AgentConfig {
            user,
            server: server.to_string(),
            media_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_port: None,
            ice: true,
            audio_in,
            audio_out,
            missed: tv_agent::agent::MissedKeeping::Memory,
            transport: self.transport(&self.key(user).await),
            presence: None,
            inbox: None,
        }
    }

    /// Gives the `tv-agent` data directory `dir` the identity of `user`'s enrolled TV,
    /// as `tv-agent enroll` leaves it (`identity/`: tv.key, tv.crt, server-ca.crt,
    /// enrolled.json), so the binary runs with `--data-dir` alone. A TV seen before
    /// keeps its key.
    pub async fn tv_dir(&self, server: SocketAddr, user: u64, dir: &Path) {
        let ids = IdentityDir::new(dir);
        let known = self.keys.lock().await.get(&user).cloned();
        match known {
            Some(key) => {
                if ids.key().unwrap().is_none_or(|k| k.cert != key.cert) {
                    let (cert, key) = key.to_pem();
                    let d = dir.join("identity");
                    std::fs::create_dir_all(&d).unwrap();
                    tv_agent::files::write_atomic(&d.join("tv.key"), key.as_bytes(), true).unwrap();
                    tv_agent::files::write_atomic(&d.join("tv.crt"), cert.as_bytes(), false)
                        .unwrap();
                }
            }
            None => {
                // Made on the TV, as `tv-agent enroll` makes it.
                let key = ids.key_or_new().unwrap();
                let mut keys = self.keys.lock().await;
                self.enroll(user, &key).await;
                keys.insert(user, key);
            }
        }
        ids.save_enrolled(
            &self.ca_pem,
            &Enrolled {
                user_id: user,
                server: server.to_string(),
            },
        )
        .unwrap();
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub trust: Arc<Trust>,
    server: RunningServer<SqliteStore>,
}

impl Server {
    /// A server on `addr` (port 0 for any) over the database at `db`.
    pub async fn start(addr: SocketAddr, db: &Path) -> Server {
        Server::start_ringing(addr, db, 3_000).await
    }

    /// The same, with calls ringing for `ring_timeout_ms`.
    pub async fn start_ringing(addr: SocketAddr, db: &Path, ring_timeout_ms: u64) -> Server {
        let config = Config {
            listen: addr,
            db: Some(db.to_path_buf()),
            ring_timeout_ms,
            heartbeat_interval_ms: 1_000,
            shutdown_grace_ms: 2_000,
            ..Config::default()
        };
        let store = SqliteStore::open(db, SqliteOptions::default()).unwrap();
        Server::start_with(config, store)
    }

    /// A server with `config` (its `db` set) over `store`: TLS with the database's CA.
    pub fn start_with(config: Config, store: SqliteStore) -> Server {
        assert!(!config.insecure_plaintext, "these tests run over TLS");
        let trust = Trust::of(config.db.as_ref().expect("a database file"));
        let server = RunningServer::start(config, store).unwrap();
        *trust.running.lock().unwrap() = Some(server.addr);
        Server {
            addr: server.addr,
            trust,
            server,
        }
    }

    /// An in-process agent of `user`, enrolled, for this server.
    pub async fn agent_config(
        &self,
        user: u64,
        audio_in: AudioSpec,
        audio_out: AudioSpec,
    ) -> AgentConfig {
        self.trust
            .agent_config(self.addr, user, audio_in, audio_out)
            .await
    }

    /// `dir`, a `tv-agent` data directory, holds `user`'s enrolled identity.
    pub async fn tv_dir(&self, user: u64, dir: &Path) {
        self.trust.tv_dir(self.addr, user, dir).await;
    }

    /// A raw protocol client over TLS with `user`'s enrolled key (not yet registered).
    pub async fn client(&self, user: u64) -> Client<Stream> {
        let key = self.trust.key(user).await;
        Client::connect_with(&self.trust.transport(&key), self.addr, None)
            .await
            .unwrap()
    }

    /// The running server's state (registry, metrics, store).
    pub fn shared(&self) -> &Arc<call_proxy_server::Shared<SqliteStore>> {
        &self.server.shared
    }

    pub async fn stop(self) {
        *self.trust.running.lock().unwrap() = None;
        self.server.stop().await.unwrap();
    }
}

/// Waits for an event matching `pick`, failing the test after `secs`.
pub async fn expect_event<T>(
    events: &mut broadcast::Receiver<AgentEvent>,
    secs: u64,
    what: &str,
    mut pick: impl FnMut(&AgentEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) => {
                if let Some(t) = pick(&ev) {
                    return t;
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event stream ended waiting for {what}: {e}"),
            Err(_) => panic!("no {what} within {secs} s"),
        }
    }
}

/// Powers on an agent and waits until it is registered and has presented its cache.
pub async fn boot(cfg: AgentConfig) -> (Agent, broadcast::Receiver<AgentEvent>) {
    let (agent, mut events) = Agent::power_on(cfg).await.unwrap();
    expect_event(&mut events, 10, "cached calls at boot", |e| {
        matches!(e, AgentEvent::CachedCalls { .. }).then_some(())
    })
    .await;
    (agent, events)
}

/// A UDP relay standing in for the network between two TVs: each TV is told the
/// other's address is a relay port, and the relay forwards with loss and delay
/// (random delays reorder packets).
pub struct Relay {
    /// The port advertised for TV A (B sends here; A's packets leave from here).
    pub port_a: u16,
    /// The port advertised for TV B.
    pub port_b: u16,
    sock_a: Arc<UdpSocket>,
    sock_b: Arc<UdpSocket>,
}

impl Relay {
    pub async fn new() -> Relay {
        let sock_a = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let sock_b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        Relay {
            port_a: sock_a.local_addr().unwrap().port(),
            port_b: sock_b.local_addr().unwrap().port(),
            sock_a,
            sock_b,
        }
    }

    /// Starts forwarding between the real media addresses with `loss` (0..1) and a
    /// uniform delay of up to `max_delay`.
    pub fn start(
        &self,
        real_a: SocketAddr,
        real_b: SocketAddr,
        loss: f64,
        max_delay: Duration,
        seed: u64,
    ) {
        for (inbound, outbound, dest, seed) in [
            (
                Arc::clone(&self.sock_b),
                Arc::clone(&self.sock_a),
                real_b,
                seed,
            ),
            (
                Arc::clone(&self.sock_a),
                Arc::clone(&self.sock_b),
                real_a,
                seed + 1,
            ),
        ] {
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut buf = vec![0u8; 2048];
                while let Ok((n, _)) = inbound.recv_from(&mut buf).await {
                    if rng.random::<f64>() < loss {
                        continue;
                    }
                    let delay = max_delay.mul_f64(rng.random::<f64>());
                    let data = buf[..n].to_vec();
                    let out = Arc::clone(&outbound);
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = out.send_to(&data, dest).await;
                    });
                }
            });
        }
    }
}

/// Reads a mono 16-bit WAV file.
pub fn read_wav(path: &PathBuf) -> Vec<f64> {
    let mut r = hound::WavReader::open(path).unwrap();
    assert_eq!(r.spec().sample_rate, 48_000);
    r.samples::<i16>().map(|s| f64::from(s.unwrap())).collect()
}

/// Power of `freq` in `samples` (Goertzel).
pub fn tone_power(samples: &[f64], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 48_000.0;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / samples.len().max(1) as f64
}

/// Checks the recording carries `expected` Hz (and not `other` Hz) and returns the
/// share of 20 ms windows (ignoring the first and last 200 ms) that carry sound.
pub fn analyse(path: &PathBuf, expected: f64, other: f64) -> f64 {
    let s = read_wav(path);
    assert!(
        s.len() > 48_000,
        "at least a second of audio in {}, got {} samples",
        path.display(),
        s.len()
    );
    let body = &s[9_600..s.len() - 9_600];
    let p_exp = tone_power(body, expected);
    let p_other = tone_power(body, other);
    assert!(
        p_exp > 20.0 * p_other,
        "{}: {expected} Hz power {p_exp:.0} vs {other} Hz {p_other:.0}",
        path.display()
    );
    let windows: Vec<f64> = body
        .chunks(960)
        .map(|w| (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt())
        .collect();
    windows.iter().filter(|&&rms| rms > 1000.0).count() as f64 / windows.len() as f64
}

/// A JSON file the agent keeps (address book, missed-call list), parsed.
/// Runs the `tv-agent` binary with `args`: its exit code, its stdout as JSON lines (one
/// value each; anything else fails the test), and its stderr.
pub fn run_agent(args: &[&str]) -> (i32, Vec<serde_json::Value>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tv-agent"))
        .args(args)
        .output()
        .expect("run tv-agent");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `a` (user `a_id`) dials `b_id`; `b` answers; returns once each side has seen it.
pub async fn dial_and_answer(
    a: &Agent,
    ea: &mut broadcast::Receiver<AgentEvent>,
    a_id: u64,
    b: &Agent,
    eb: &mut broadcast::Receiver<AgentEvent>,
    b_id: u64,
) {
    assert!(matches!(
        a.dial(b_id).await,
        tv_agent::DialResult::Ringing(_)
    ));
    expect_event(eb, 5, "incoming call", |e| {
        matches!(e, AgentEvent::Incoming { caller, .. } if *caller == a_id).then_some(())
    })
    .await;
    b.answer().await.unwrap();
    expect_event(ea, 5, "answered", |e| {
        matches!(e, AgentEvent::Answered { peer, .. } if *peer == b_id).then_some(())
    })
    .await;
}

/// A TLS server for enrollment tests (its own CA in `<db dir>/tls/`, polls every second)
/// whose codes live `ttl_s` seconds.
pub struct EnrollServer {
    pub server: RunningServer<SqliteStore>,
    /// Its database.
    pub db: PathBuf,
    /// The CA TVs trust.
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn enroll_server(ttl_s: u64) -> EnrollServer {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let store = SqliteStore::open(&db, SqliteOptions::default()).unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: Some(db.clone()),
        enrollment_ttl_s: ttl_s,
        enrollment_poll_s: 1,
        heartbeat_interval_ms: 1_000,
        shutdown_grace_ms: 2_000,
        insecure_plaintext: false,
        ..Config::default()
    };
    let server = RunningServer::start(config, store).unwrap();
    EnrollServer {
        server,
        ca: dir.path().join("tls/ca.crt"),
        db,
        _dir: dir,
    }
}

/// A response: status, head (lower-cased) and body.
pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("JSON body expected ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection; `headers` are extra lines.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> HttpReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|h| h.to_lowercase().starts_with("host:"))
    {
        req += &format!("Host: {addr}\r\n");
    }
    for h in headers {
        req += &format!("{h}\r\n");
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("a complete reply")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    HttpReply {
        status,
        head: head.to_lowercase(),
        body: body.to_owned(),
    }
}
