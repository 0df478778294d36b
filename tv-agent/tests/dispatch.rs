//! The agent's link behind the distribution service (issue 18, section D), on a real
//! PostgreSQL over loopback: `--server` is the dispatcher; the link asks it for a node,
//! registers there with the token, and when that node goes away it goes back to the
//! dispatcher (naming the node it lost) and registers on the other node. Two nodes and
//! the dispatcher run in this process (the server's library; the nodes require the
//! dispatcher's token); the database is made with `psql`. An account whose traffic
//! allowance is used up is told so (and assigned again once the operator lifts it).
//! Skipped without PostgreSQL unless `CALL_PROXY_TEST_REQUIRE_PG=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_goes_through_the_dispatcher_and_back_to_it_when_its_node_goes() {
    let Some((cluster_url, pw)) = cluster() else {
        return;
    };
    let name = format!("t_agent_dispatch_{}", std::process::id());
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

    // TV 7, enrolled (its credential as the operator's approval records it).
    let tv = TvKey::generate().unwrap();
    let fp = call_proxy_server::tls::Fingerprint::of(&tv.cert);
    psql(
        &url,
        &pw,
        &format!(
            "INSERT INTO tv_credential (fingerprint, user_id, cert, enrolled_at)
             VALUES ('\\x{}', 7, '\\x{}', now())",
            hex(&fp.0),
            hex(tv.cert.as_ref())
        ),
    );
    let ca = std::fs::read(dir.path().join("tls/ca.crt")).unwrap();
    let mut cfg = LinkConfig::new(d.to_string(), 7, 5004);
    cfg.transport = Transport::Tls(TlsClient::new(&ca, &tv).unwrap());
    cfg.backoff_min = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(500);
    let (handle, mut events) = link::spawn(cfg);
    registered(&mut events).await;
    let first = on(&[("node-a", &node_a), ("node-b", &node_b)], 7);
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
    node_a.stop().await.unwrap();
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
    assert!(!node_b.shared.registry.is_online(7));
    psql(&url, &pw, "DELETE FROM account_allowance WHERE user_id = 7");
    registered(&mut events).await;
    assert!(node_b.shared.registry.is_online(7), "TV 7 online on node-b");

    handle.power_off().await;
    node_b.stop().await.unwrap();
    let _ = stop_d.send(());
    dispatcher_task.await.unwrap();
    psql(&cluster_url, &pw, &format!("DROP DATABASE {name}"));
}
