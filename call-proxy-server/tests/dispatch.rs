//! The distribution service (issue 18, section D), with real processes on a real
//! PostgreSQL over loopback: `call-proxy-server dispatch` assigns an enrolled TV a live
//! node (least loaded, the other node for the second TV) with a signed token, and the TV
//! registers there presenting it in its TLS handshake; a node configured with the
//! dispatcher's public key refuses a TV without a token, and tokens that are expired,
//! forged (another key), for another node or for another TV (certificate); an agent
//! pointed at a node learns it is one (`UNSUPPORTED` to `ASSIGN`) and keeps the link;
//! and a SIGKILLed node's TV is reassigned to the other node and online there.
//! Skipped without PostgreSQL unless the run requires it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::client::{Client, ClientError};
use call_proxy_server::dispatch::{public_key_path, SigningKey, Token};
use call_proxy_server::tls::Fingerprint;
use common::{eventually, TestDb};
use control_client::dispatch::{assign, Assigned};
use control_client::{Features, TlsClient, TvKey};
use shared_proto::dispatch::{Assign, Assignment};
use shared_proto::{ErrorCode, UserId};
use test_support::net::free_port;
use test_support::process::{spawn_listening, KillOnDrop};

/// The heartbeat lease the test nodes and dispatcher run with.
const LEASE_MS: u64 = 1_000;

/// The PostgreSQL cluster, or `None` (the test is skipped).
fn cluster() -> Option<(String, PathBuf)> {
    let c = common::db::pg_cluster();
    if c.is_none() {
        eprintln!("skipped: no PostgreSQL (scripts/test.sh provides it)");
    }
    c
}

/// A node requiring the dispatcher's token (public key in `pub_key`).
async fn start_node(db: &TestDb, id: &str, slot: u8, pub_key: &Path) -> (KillOnDrop, SocketAddr) {
    let port = free_port().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = common::node_command(db, id, slot, port, LEASE_MS);
    cmd.arg("--dispatch-public-key-file").arg(pub_key);
    let child = spawn_listening(&mut cmd, addr, Duration::from_secs(20))
        .await
        .expect("node listening");
    (child, addr)
}

/// `call-proxy-server dispatch` over `db` with the signing key `key_file`.
async fn start_dispatcher(db: &TestDb, key_file: &Path) -> (KillOnDrop, SocketAddr) {
    let port = free_port().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
    cmd.args(["dispatch", "--listen", &addr.to_string()])
        .args(db.serve_args())
        .arg("--key-file")
        .arg(key_file)
        .args(["--node-lease-ms", &LEASE_MS.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = spawn_listening(&mut cmd, addr, Duration::from_secs(20))
        .await
        .expect("dispatcher listening");
    (child, addr)
}

/// A TV: its key, enrolled as `user` (what the operator's approval records).
fn enrolled_tv(db: &TestDb, user: UserId) -> TvKey {
    let key = TvKey::generate().unwrap();
    common::record_credential(db, &key, user);
    key
}

fn tls(db: &TestDb, key: &TvKey) -> TlsClient {
    let ca = std::fs::read(db.ca_path()).unwrap();
    TlsClient::new(&ca, key).unwrap()
}

/// Asks the dispatcher at `dispatcher` for a node.
async fn ask(
    tls: &TlsClient,
    dispatcher: SocketAddr,
    unreachable: &str,
) -> Result<Assigned<common::Tls>, ClientError> {
    let stream = common::tls_connect(tls, dispatcher, None).await?;
    assign(
        stream,
        Features::KNOWN,
        &Assign {
            agent_version: "dispatch-test".into(),
            unreachable_node: unreachable.into(),
        },
    )
    .await
}

async fn assigned(tls: &TlsClient, dispatcher: SocketAddr, unreachable: &str) -> Assignment {
    match ask(tls, dispatcher, unreachable).await.expect("assign") {
        Assigned::Node(a) => a,
        Assigned::AtNode(_) => panic!("the dispatcher answered as a node"),
    }
}

/// Registers `user` at `node` presenting `token` (none: plain TV settings).
async fn register_with(
    tls: &TlsClient,
    node: SocketAddr,
    user: UserId,
    token: Option<&[u8]>,
) -> Result<common::Tv, ClientError> {
    let config = match token {
        Some(t) => tls.with_token(t).unwrap(),
        None => tls.clone(),
    };
    let stream = common::tls_connect(&config, node, None).await?;
    let mut tv = Client::handshake(stream).await?;
    tv.register(user, 5000).await?;
    Ok(tv)
}

/// The refusal of a registration: its code and message.
async fn refused(
    tls: &TlsClient,
    node: SocketAddr,
    user: UserId,
    token: Option<&[u8]>,
) -> (ErrorCode, String) {
    match register_with(tls, node, user, token).await {
        Ok(_) => panic!("registered with a token that should be refused"),
        Err(ClientError::Server(e)) => (e.code, e.message),
        Err(e) => panic!("unexpected failure {e}"),
    }
}

fn node_of(db: &TestDb, user: UserId) -> Option<(String, Option<String>)> {
    let r = db.row(&format!(
        "SELECT user_netstate, node_id FROM user_property WHERE user_id = {user}"
    ))?;
    Some((r[0].clone()?, r[1].clone()))
}

fn addr_of(a: &Assignment) -> SocketAddr {
    a.node_addr.parse().expect("a loopback address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_assigns_live_nodes_and_nodes_refuse_bad_tokens() {
    let Some((url, password_file)) = cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::postgres(
        dir.path(),
        "dispatch",
        &url,
        &password_file,
    ));
    let key_file = dir.path().join("dispatch.key");
    let key = SigningKey::load_or_create(&key_file).unwrap();
    let pub_key = public_key_path(&key_file);
    let (_node_a, a) = start_node(&db, "node-a", 1, &pub_key).await;
    let (_node_b, b) = start_node(&db, "node-b", 2, &pub_key).await;
    let (_dispatcher, d) = start_dispatcher(&db, &key_file).await;

    // TV 1 goes to a node (both empty: node-a by id), registers there with its token.
    let key1 = enrolled_tv(&db, 1);
    let tv1 = tls(&db, &key1);
    let first = assigned(&tv1, d, "").await;
    assert_eq!((first.node_id.as_str(), addr_of(&first)), ("node-a", a));
    let _tv1_link = register_with(&tv1, a, 1, Some(&first.token))
        .await
        .expect("registered with the dispatcher's token");
    assert_eq!(node_of(&db, 1), Some(("1".into(), Some("node-a".into()))));

    // TV 2 goes to the least loaded node: node-b.
    let key2 = enrolled_tv(&db, 2);
    let tv2 = tls(&db, &key2);
    let second = assigned(&tv2, d, "").await;
    assert_eq!((second.node_id.as_str(), addr_of(&second)), ("node-b", b));
    let _tv2_link = register_with(&tv2, b, 2, Some(&second.token))
        .await
        .unwrap();
    assert_eq!(node_of(&db, 2), Some(("1".into(), Some("node-b".into()))));

    // A TV the dispatcher does not know is not assigned.
    let stranger = tls(&db, &TvKey::generate().unwrap());
    match ask(&stranger, d, "").await {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::UNAUTHENTICATED);
            assert!(e.message.contains("not enrolled"), "{}", e.message);
        }
        Ok(_) => panic!("an unenrolled TV was assigned"),
        Err(e) => panic!("unexpected failure {e}"),
    }

    // Pointed at a node, the agent learns it is one and keeps the link; that node wants
    // a token, so registering without one is refused.
    let key3 = enrolled_tv(&db, 3);
    let tv3 = tls(&db, &key3);
    match ask(&tv3, a, "").await.expect("a node answers") {
        Assigned::AtNode(conn) => {
            let mut c = Client::from_connection(conn);
            match c.register(3, 5000).await {
                Err(ClientError::Server(e)) => {
                    assert_eq!(e.code, ErrorCode::UNAUTHENTICATED);
                    assert!(e.message.contains("dispatcher"), "{}", e.message);
                }
                other => panic!("registered without a token: {:?}", other.is_ok()),
            }
        }
        Assigned::Node(_) => panic!("a node answered ASSIGN"),
    }
    let (code, why) = refused(&tv3, a, 3, None).await;
    assert_eq!(code, ErrorCode::UNAUTHENTICATED);
    assert!(why.contains("dispatcher"), "{why}");

    let fp3 = Fingerprint::of(&key3.cert).0;
    let now = call_proxy_server::clock::now_ms();
    let token = |user: UserId, node: &str, fingerprint: [u8; 32], expires_at_ms: i64| Token {
        user_id: user,
        node_id: node.into(),
        fingerprint,
        expires_at_ms,
    };
    // A good token made here with the dispatcher's key is accepted (the checks below
    // each break one thing of it).
    let good = token(3, "node-a", fp3, now + 60_000).sign(&key);
    // Expired.
    let (code, why) = refused(
        &tv3,
        a,
        3,
        Some(&token(3, "node-a", fp3, now - 1).sign(&key)),
    )
    .await;
    assert_eq!(code, ErrorCode::UNAUTHENTICATED);
    assert!(why.contains("expired"), "{why}");
    // Forged: signed with another key.
    let (forger, _) = SigningKey::generate().unwrap();
    let (code, why) = refused(
        &tv3,
        a,
        3,
        Some(&token(3, "node-a", fp3, now + 60_000).sign(&forger)),
    )
    .await;
    assert_eq!(code, ErrorCode::UNAUTHENTICATED);
    assert!(why.contains("forged"), "{why}");
    // For another node: node-b's token presented at node-a.
    let (code, why) = refused(
        &tv3,
        a,
        3,
        Some(&token(3, "node-b", fp3, now + 60_000).sign(&key)),
    )
    .await;
    assert_eq!(code, ErrorCode::UNAUTHENTICATED);
    assert!(why.contains("another node"), "{why}");
    // For another TV: TV 3's token presented with TV 4's certificate (for user 4 too).
    let key4 = enrolled_tv(&db, 4);
    let tv4 = tls(&db, &key4);
    let (code, why) = refused(
        &tv4,
        a,
        4,
        Some(&token(4, "node-a", fp3, now + 60_000).sign(&key)),
    )
    .await;
    assert_eq!(code, ErrorCode::UNAUTHENTICATED);
    assert!(why.contains("another TV"), "{why}");
    // The dispatcher's real token for TV 1, copied by TV 4: another TV again.
    let (code, why) = refused(&tv4, a, 1, Some(&first.token)).await;
    assert_eq!(code, ErrorCode::UNAUTHENTICATED);
    assert!(why.contains("not 1") || why.contains("another TV"), "{why}");
    // And the good one registers TV 3.
    let _tv3_link = register_with(&tv3, a, 3, Some(&good))
        .await
        .expect("a good token");
    assert_eq!(node_of(&db, 3), Some(("1".into(), Some("node-a".into()))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_nodes_tv_is_reassigned_by_the_dispatcher_and_online_elsewhere() {
    let Some((url, password_file)) = cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::postgres(
        dir.path(),
        "dispatch_kill",
        &url,
        &password_file,
    ));
    let key_file = dir.path().join("dispatch.key");
    SigningKey::load_or_create(&key_file).unwrap();
    let pub_key = public_key_path(&key_file);
    let (node_a, a) = start_node(&db, "node-a", 1, &pub_key).await;
    let (node_b, b) = start_node(&db, "node-b", 2, &pub_key).await;
    let (_dispatcher, d) = start_dispatcher(&db, &key_file).await;
    let mut nodes = vec![("node-a", a, node_a), ("node-b", b, node_b)];

    let key1 = enrolled_tv(&db, 1);
    let tv1 = tls(&db, &key1);
    let first = assigned(&tv1, d, "").await;
    let mut link = register_with(&tv1, addr_of(&first), 1, Some(&first.token))
        .await
        .unwrap();
    assert_eq!(
        node_of(&db, 1),
        Some(("1".into(), Some(first.node_id.clone())))
    );

    // SIGKILL the TV's node: its link breaks.
    let at = nodes.iter().position(|n| n.0 == first.node_id).unwrap();
    let (_, _, mut killed) = nodes.remove(at);
    test_support::process::kill(&mut killed);
    let killed_at = std::time::Instant::now();
    let broke = tokio::time::timeout(
        Duration::from_secs(10),
        link.request(shared_proto::Request::Heartbeat),
    )
    .await
    .expect("the link to a killed node ends");
    assert!(broke.is_err(), "the killed node answered");

    // The TV goes back to the dispatcher, naming the node it lost; it is sent to the
    // other node and is online there (bounded: 20 tries over at most 20 s).
    let (other_id, other_addr, _other) = &nodes[0];
    let mut online = None;
    for _ in 0..20 {
        match ask(&tv1, d, &first.node_id).await {
            Ok(Assigned::Node(a)) => {
                assert_eq!(
                    &a.node_id, other_id,
                    "reassigned to the node that was killed"
                );
                assert_eq!(addr_of(&a), *other_addr);
                if let Ok(tv) = register_with(&tv1, addr_of(&a), 1, Some(&a.token)).await {
                    online = Some(tv);
                    break;
                }
            }
            Ok(Assigned::AtNode(_)) => panic!("the dispatcher answered as a node"),
            Err(e) => eprintln!("dispatcher: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _tv = online.expect("TV 1 registered on the other node");
    assert!(
        eventually(Duration::from_secs(5), || node_of(&db, 1)
            == Some(("1".into(), Some(other_id.to_string()))))
        .await,
        "TV 1 online on {other_id}: {:?}",
        node_of(&db, 1)
    );
    eprintln!(
        "back online elsewhere {:?} after the kill",
        killed_at.elapsed()
    );
    // And a TV asking later, without naming a lost node, is not sent to the dead one
    // once its lease has run out.
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 2)).await;
    let key2 = enrolled_tv(&db, 2);
    let again = assigned(&tls(&db, &key2), d, "").await;
    assert_eq!(&again.node_id, other_id);
}

/// Asks the dispatcher (naming `lost`, the node this TV lost) until a node takes the
/// TV's registration: bounded, 40 tries over at most 20 s.
async fn reconnect(
    tls: &TlsClient,
    d: SocketAddr,
    user: UserId,
    lost: &str,
) -> (common::Tv, String) {
    for _ in 0..40 {
        match ask(tls, d, lost).await {
            Ok(Assigned::Node(a)) => {
                if let Ok(tv) = register_with(tls, addr_of(&a), user, Some(&a.token)).await {
                    return (tv, a.node_id);
                }
            }
            Ok(Assigned::AtNode(_)) => panic!("the dispatcher answered as a node"),
            Err(e) => eprintln!("dispatcher: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("TV {user} found no node through the dispatcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_no_acknowledged_call_and_its_tvs_return_through_the_dispatcher(
) {
    let Some((url, password_file)) = cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::postgres(
        dir.path(),
        "dispatch_load_kill",
        &url,
        &password_file,
    ));
    let key_file = dir.path().join("dispatch.key");
    SigningKey::load_or_create(&key_file).unwrap();
    let pub_key = public_key_path(&key_file);
    let (node_a, _) = start_node(&db, "node-a", 1, &pub_key).await;
    let (node_b, _) = start_node(&db, "node-b", 2, &pub_key).await;
    let (_dispatcher, d) = start_dispatcher(&db, &key_file).await;

    // Five switched-off TVs to call (registered once, then off).
    let callees: Vec<UserId> = (901..=905).collect();
    for &u in &callees {
        let t = tls(&db, &enrolled_tv(&db, u));
        let got = assigned(&t, d, "").await;
        let tv = register_with(&t, addr_of(&got), u, Some(&got.token))
            .await
            .unwrap();
        tv.bye().await.unwrap();
    }
    // 40 callers through the dispatcher: it spreads them over both nodes.
    const CALLERS: u64 = 40;
    let mut callers = Vec::new();
    for u in 101..101 + CALLERS {
        let t = tls(&db, &enrolled_tv(&db, u));
        let got = assigned(&t, d, "").await;
        let tv = register_with(&t, addr_of(&got), u, Some(&got.token))
            .await
            .unwrap();
        callers.push((u, t, got.node_id, tv));
    }
    let on_a: Vec<UserId> = callers
        .iter()
        .filter(|c| c.2 == "node-a")
        .map(|c| c.0)
        .collect();
    assert!(
        on_a.len() >= 10 && on_a.len() <= 30,
        "the dispatcher spreads TVs over the nodes: {} of {CALLERS} on node-a",
        on_a.len()
    );

    // Load: every caller dials the switched-off TVs in a loop (bounded: 400 dials or
    // 8 s each) and keeps the call ids the server acknowledged (`Cached`).
    let stop_at = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut loops = tokio::task::JoinSet::new();
    let mut keys = Vec::new();
    for (u, t, node, mut tv) in callers {
        keys.push((u, t, node));
        let callees = callees.clone();
        loops.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..400usize {
                if tokio::time::Instant::now() >= stop_at {
                    break;
                }
                match common::try_dial(&mut tv, callees[i % callees.len()]).await {
                    Ok(shared_proto::DialOutcome::Cached { call_id }) => acked.push(call_id),
                    Ok(other) => panic!("TV {u}: {other:?}"),
                    Err(_) => break, // its node was killed
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (u, acked, tv)
        });
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut node_a = node_a;
    test_support::process::kill(&mut node_a);
    let killed_at = std::time::Instant::now();

    // The killed node's TVs are offline within its lease (the other node reaps it), while the
    // other node's callers go on dialling.
    let offline = eventually(Duration::from_millis(LEASE_MS * 3 + 2_000), || {
        on_a.iter()
            .all(|&u| node_of(&db, u).is_some_and(|(state, _)| state == "0"))
    })
    .await;
    let offline_after = killed_at.elapsed();
    assert!(offline, "node-a's TVs not offline in time");
    eprintln!(
        "node-a's {} TVs offline {offline_after:?} after the kill",
        on_a.len()
    );

    let mut acked = Vec::new();
    let mut survivors = Vec::new();
    while let Some(r) = loops.join_next().await {
        let (u, ids, tv) = r.unwrap();
        acked.extend(ids);
        if !on_a.contains(&u) {
            survivors.push(tv);
        }
    }
    assert!(
        acked.len() >= 200,
        "load: only {} calls acknowledged",
        acked.len()
    );
    // Every acknowledged call is in the database, those placed on the killed node too.
    let list = acked
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let stored = db.count(&format!(
        "SELECT count(*) FROM user_call WHERE id IN ({list})"
    ));
    assert_eq!(stored as usize, acked.len(), "acknowledged calls lost");

    // ... and online again on node-b through the dispatcher, naming the lost node.
    let mut back = Vec::new();
    for (u, t, node) in keys.iter().filter(|k| k.2 == "node-a") {
        let (tv, now_on) = reconnect(t, d, *u, node).await;
        assert_eq!(now_on, "node-b", "TV {u}");
        back.push(tv);
    }
    for &u in &on_a {
        assert_eq!(
            node_of(&db, u),
            Some(("1".into(), Some("node-b".into()))),
            "TV {u}"
        );
    }
    eprintln!(
        "{} acknowledged calls kept; node-a's TVs back on node-b {:?} after the kill",
        acked.len(),
        killed_at.elapsed()
    );
    drop((back, survivors, node_b));
}
