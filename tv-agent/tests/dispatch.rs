//! The agent's link behind the distribution service (issue 18, section D), on a real
//! PostgreSQL over loopback: `--server` is the dispatcher; the link asks it for a node,
//! registers there with the token, and when that node goes away it goes back to the
//! dispatcher (naming the node it lost) and registers on the other node. Two nodes and
//! the dispatcher run in this process (the server's library; the nodes require the
//! dispatcher's token); the database is made with `psql`. An account whose traffic
//! allowance is used up is told so (and assigned again once the operator lifts it). Two
//! real agents sent to two different nodes call each other with two-way audio.
//! Skipped without PostgreSQL unless `CALL_PROXY_TEST_REQUIRE_PG=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::dispatch::{Dispatcher, SigningKey};
use call_proxy_server::embedded::RunningServer;
use call_proxy_server::storage::postgres::dispatch::{advertise, PgDispatch};
use call_proxy_server::storage::postgres::PgTarget;
use call_proxy_server::storage::{self, AnyStore};
use call_proxy_server::Config;
use control_client::{TlsClient, Transport, TvKey};
use tv_agent::link::{self, LinkConfig, LinkEvent};

/// The cluster (`CALL_PROXY_TEST_PG`, `CALL_PROXY_TEST_PG_PASSWORD_FILE`), or `None`.
fn cluster() -> Option<(String, PathBuf)> {
    let url = std::env::var("CALL_PROXY_TEST_PG").ok();
    let pw = std::env::var("CALL_PROXY_TEST_PG_PASSWORD_FILE").ok();
    match (url, pw) {
        (Some(u), Some(p)) => Some((u, PathBuf::from(p))),
        _ => {
            assert!(
                std::env::var("CALL_PROXY_TEST_REQUIRE_PG").as_deref() != Ok("1"),
                "CALL_PROXY_TEST_REQUIRE_PG=1 but no CALL_PROXY_TEST_PG"
            );
            eprintln!("skipped: no PostgreSQL (scripts/test.sh provides it)");
            None
        }
    }
}

/// Runs `sql` with psql on `url`.
fn psql(url: &str, password_file: &Path, sql: &str) {
    let password = std::fs::read_to_string(password_file).unwrap();
    let out = Command::new("psql")
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-d", url, "-c", sql])
        .env("PGPASSWORD", password.lines().next().unwrap_or(""))
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn node(
    dir: &Path,
    url: &str,
    pw: &Path,
    id: &str,
    slot: u8,
    key: call_proxy_server::dispatch::PublicKey,
) -> RunningServer<AnyStore> {
    let mut c = Config::default();
    c.set_db(Path::new(url));
    c.db_password_file = Some(pw.to_path_buf());
    c.data_dir = dir.to_path_buf();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.node_id = id.into();
    c.node_slot = slot;
    c.node_lease_ms = 1_000;
    c.heartbeat_interval_ms = 500;
    c.dispatch_public_key = Some(key);
    let store = storage::open(&c).await.unwrap();
    let srv = RunningServer::start(c, store).unwrap();
    let target = PgTarget::new(url, Some(pw)).unwrap();
    assert!(advertise(&target, id, &srv.addr.to_string()).await.unwrap());
    srv
}

async fn registered(events: &mut tokio::sync::mpsc::Receiver<LinkEvent>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(LinkEvent::Registered(_))) => return,
            Ok(Some(LinkEvent::Down { reason, .. })) => eprintln!("link down: {reason}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the link ended"),
            Err(_) => panic!("not registered in time"),
        }
    }
}

/// Whose session the TV is on now, by the nodes' registries.
fn on(nodes: &[(&str, &RunningServer<AnyStore>)], user: u64) -> Vec<String> {
    nodes
        .iter()
        .filter(|(_, n)| n.shared.registry.is_online(user))
        .map(|(id, _)| id.to_string())
        .collect()
}

/// Two nodes (node-a, node-b) requiring the dispatcher's token and the dispatcher, on a
/// database of their own in the test cluster, all in this process.
struct Setup {
    cluster_url: String,
    pw: PathBuf,
    name: String,
    url: String,
    dir: tempfile::TempDir,
    /// The nodes (`None` once stopped).
    node_a: Option<RunningServer<AnyStore>>,
    node_b: Option<RunningServer<AnyStore>>,
    /// The dispatcher's address.
    d: std::net::SocketAddr,
    stop_d: tokio::sync::oneshot::Sender<()>,
    dispatcher_task: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn start(tag: &str) -> Option<Setup> {
        let (cluster_url, pw) = cluster()?;
        let name = format!("t_agent_{tag}_{}", std::process::id());
        psql(&cluster_url, &pw, &format!("CREATE DATABASE {name}"));
        let url = format!("{}/{name}", cluster_url.rsplit_once('/').unwrap().0);
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("dispatch.key");
        let key = SigningKey::load_or_create(&key_file).unwrap();
        let public = key.public();
        let node_a = node(dir.path(), &url, &pw, "node-a", 1, public).await;
        let node_b = node(dir.path(), &url, &pw, "node-b", 2, public).await;
        let files = call_proxy_server::tls::server_cert_files(
            None,
            None,
            &dir.path().join("tls"),
            &["127.0.0.1".to_string()],
        )
        .unwrap();
        let tls = call_proxy_server::dispatch::tls_acceptor(&files).unwrap();
        let target = PgTarget::new(&url, Some(&pw)).unwrap();
        let dispatcher = Arc::new(Dispatcher {
            db: PgDispatch::new(&target, 2).unwrap(),
            key,
            token_ttl: Duration::from_secs(600),
            node_lease: Duration::from_millis(1_000),
            tls,
            period: call_proxy_server::accounting::Period::Month,
            allowance_threshold: 1_024,
            tally: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let d = listener.local_addr().unwrap();
        let (stop_d, stopped_d) = tokio::sync::oneshot::channel::<()>();
        let dispatcher_task = tokio::spawn(call_proxy_server::dispatch::run(
            listener,
            dispatcher,
            async {
                let _ = stopped_d.await;
            },
        ));
        Some(Setup {
            cluster_url,
            pw,
            name,
            url,
            dir,
            node_a: Some(node_a),
            node_b: Some(node_b),
            d,
            stop_d,
            dispatcher_task,
        })
    }

    /// A new TV key enrolled as `user` (its credential as the operator's approval
    /// records it), and TLS to the servers with it.
    fn enrolled(&self, user: u64) -> Transport {
        let tv = TvKey::generate().unwrap();
        let fp = call_proxy_server::tls::Fingerprint::of(&tv.cert);
        psql(
            &self.url,
            &self.pw,
            &format!(
                "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at)
                 VALUES ('\\x{}', {user}, '\\x{}', now())",
                hex(&fp.0),
                hex(tv.cert.as_ref())
            ),
        );
        let ca = std::fs::read(self.dir.path().join("tls/ca.crt")).unwrap();
        Transport::Tls(TlsClient::new(&ca, &tv).unwrap())
    }

    /// A node still running.
    fn node(&self, id: &str) -> &RunningServer<AnyStore> {
        let n = if id == "node-a" {
            &self.node_a
        } else {
            &self.node_b
        };
        n.as_ref().expect("node running")
    }

    /// Stops a node.
    async fn stop_node(&mut self, id: &str) {
        let n = if id == "node-a" {
            &mut self.node_a
        } else {
            &mut self.node_b
        };
        n.take().expect("node running").stop().await.unwrap();
    }

    /// Stops what is still running and drops the database.
    async fn finish(mut self) {
        for n in [self.node_a.take(), self.node_b.take()]
            .into_iter()
            .flatten()
        {
            n.stop().await.unwrap();
        }
        let _ = self.stop_d.send(());
        self.dispatcher_task.await.unwrap();
        psql(
            &self.cluster_url,
            &self.pw,
            &format!("DROP DATABASE {}", self.name),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_goes_through_the_dispatcher_and_back_to_it_when_its_node_goes() {
    let Some(mut setup) = Setup::start("dispatch").await else {
        return;
    };
    let (url, pw, d) = (setup.url.clone(), setup.pw.clone(), setup.d);
    // TV 7, enrolled.
    let mut cfg = LinkConfig::new(d.to_string(), 7, 5004);
    cfg.transport = setup.enrolled(7);
    cfg.backoff_min = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(500);
    let (handle, mut events) = link::spawn(cfg);
    registered(&mut events).await;
    let first = on(
        &[
            ("node-a", setup.node("node-a")),
            ("node-b", setup.node("node-b")),
        ],
        7,
    );
    assert_eq!(
        first,
        vec!["node-a".to_string()],
        "both empty: node-a by id"
    );

    // The operator gives account 7 an allowance it has used up (less than the
    // threshold left); then node-a goes away. The dispatcher assigns no node and says
    // why; once the allowance is lifted the link comes back on node-b.
    psql(
        &url,
        &pw,
        "INSERT INTO account_allowance (user_id, bytes_per_period, set_at) VALUES (7, 1000, now())",
    );
    setup.stop_node("node-a").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(LinkEvent::Down { reason, .. }))
                if reason.starts_with(link::ALLOWANCE_REASON) =>
            {
                break reason
            }
            Ok(Some(LinkEvent::Registered(_))) => panic!("registered although over its allowance"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the link ended"),
            Err(_) => panic!("no allowance refusal in time"),
        }
    };
    assert!(refused.contains("used its allowance"), "{refused}");
    assert!(!setup.node("node-b").shared.registry.is_online(7));
    psql(&url, &pw, "DELETE FROM account_allowance WHERE user_id = 7");
    registered(&mut events).await;
    assert!(
        setup.node("node-b").shared.registry.is_online(7),
        "TV 7 online on node-b"
    );

    handle.power_off().await;
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_two_nodes_call_each_other_with_two_way_audio() {
    use tv_agent::media::AudioSpec;
    let Some(setup) = Setup::start("two_nodes_audio").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a_id, b_id) = (21, 22);
    let agent = |user, tone, wav: PathBuf, transport| tv_agent::AgentConfig {
        user,
        server: setup.d.to_string(),
        media_bind: "127.0.0.1:0".parse().unwrap(),
        advertise_port: None,
        ice: true,
        audio_in: AudioSpec::Tone(tone),
        audio_out: AudioSpec::Wav(wav),
        missed: tv_agent::agent::MissedKeeping::Memory,
        transport,
        presence: None,
        inbox: None,
    };
    let (wav_a, wav_b) = (
        dir.path().join("a-hears.wav"),
        dir.path().join("b-hears.wav"),
    );
    // The dispatcher sends the first TV to node-a (both empty, by id) and the second to
    // node-b (the least loaded).
    let (a, mut ea) = common::boot(agent(a_id, 440.0, wav_a.clone(), setup.enrolled(a_id))).await;
    let (b, mut eb) = common::boot(agent(b_id, 1000.0, wav_b.clone(), setup.enrolled(b_id))).await;
    let nodes = [
        ("node-a", setup.node("node-a")),
        ("node-b", setup.node("node-b")),
    ];
    assert_eq!(on(&nodes, a_id), ["node-a"]);
    assert_eq!(on(&nodes, b_id), ["node-b"]);

    common::dial_and_answer(&a, &mut ea, a_id, &b, &mut eb, b_id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.hang_up().await.unwrap();
    common::expect_event(&mut eb, 5, "B's end", |e| {
        matches!(e, tv_agent::AgentEvent::Ended { .. }).then_some(())
    })
    .await;
    a.power_off().await;
    b.power_off().await;
    // Each heard the other's tone (and not its own), through media TV to TV, the call
    // set up across the nodes.
    let heard_by_b = common::analyse(&wav_b, 440.0, 1000.0);
    let heard_by_a = common::analyse(&wav_a, 1000.0, 440.0);
    assert!(heard_by_b > 0.9, "B heard A's tone: {heard_by_b}");
    assert!(heard_by_a > 0.9, "A heard B's tone: {heard_by_a}");
    setup.finish().await;
}
