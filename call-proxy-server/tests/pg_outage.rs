//! The server on PostgreSQL when PostgreSQL goes away and comes back (a database
//! restart, a failover): requests that need the database fail with a clear error while it
//! is down, nothing acknowledged before is lost, and the server works again once the
//! database is back, without a restart. Runs on a cluster of its own (it stops it), made
//! by `scripts/pg-cluster.sh`; skipped without PostgreSQL unless the run requires it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use call_proxy_server::client::ClientError;
use common::{power_on_and_ack, try_dial as dial, TestDb, TestServer};
use shared_proto::{DialOutcome, ErrorCode, Request};

/// A PostgreSQL cluster of this test's own; stopped and removed when dropped.
struct Cluster {
    dir: PathBuf,
    url: String,
    password_file: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-cluster.sh")
}

impl Cluster {
    fn start(dir: PathBuf) -> Cluster {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg-cluster.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}='")))
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or_else(|| panic!("{name} in {env}"))
                .to_string()
        };
        Cluster {
            url: value("CALL_PROXY_TEST_PG"),
            password_file: PathBuf::from(value("CALL_PROXY_TEST_PG_PASSWORD_FILE")),
            dir,
        }
    }

    fn run(&self, what: &str) {
        let out = Command::new("bash")
            .arg(script())
            .arg(what)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg-cluster.sh {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_fails_requests_clearly_loses_nothing_and_the_server_recovers() {
    if common::db::pg_cluster().is_none() {
        eprintln!("skipped: no PostgreSQL (scripts/test.sh provides it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path().join("pg"));
    let server_dir = tempfile::tempdir().unwrap();
    let db = TestDb::postgres(
        server_dir.path(),
        "outage",
        &cluster.url,
        &cluster.password_file,
    );
    let srv = TestServer::start_on(db, server_dir, |_| {}).await;
    srv.known_offline(2).await;
    let mut a = srv.tv(1, 5000).await;
    let first = match dial(&mut a, 2).await.unwrap() {
        DialOutcome::Cached { call_id } => call_id,
        other => panic!("{other:?}"),
    };

    cluster.run("pause");
    // The dial needs the database: refused with a clear error, in bounded time.
    let refused = tokio::time::timeout(Duration::from_secs(30), dial(&mut a, 2))
        .await
        .expect("an answer while the database is down");
    match refused {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::INTERNAL, "{e:?}"),
        other => panic!("expected a storage error, got {other:?}"),
    }
    // The link itself is fine: heartbeats and the like need no database.
    assert!(a.request(Request::Heartbeat).await.is_ok());

    cluster.run("resume");
    // Back without a restart of the server (a retry may still meet a stale connection).
    let mut second = None;
    for _ in 0..50 {
        match dial(&mut a, 2).await {
            Ok(DialOutcome::Cached { call_id }) => {
                second = Some(call_id);
                break;
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let second = second.expect("dials work again once PostgreSQL is back");
    assert_ne!(first, second);
    // Both acknowledged calls are there for the TV, and nothing else.
    let (_b, acked) = power_on_and_ack(&srv, 2, 6000).await;
    assert_eq!(acked, 2);
    srv.stop().await;
    drop(cluster);
}
