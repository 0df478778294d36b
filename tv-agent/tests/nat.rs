//! Calls between TVs behind real NAT routers (issue 13): Linux network namespaces with
//! nftables NAT (see `common/netlab.rs`), the server and its STUN service on the lab's
//! internet, `tv-agent call` and `tv-agent answer` processes in the homes. Each scenario
//! places a real call (a tone each way over SRTP, checked in what each side recorded) and
//! asserts the path ICE chose.
//!
//! Needs root (CI runs as root; `scripts/setup.sh` installs iproute2 and nftables).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use call_proxy_server::Config;
use common::netlab::{self, Coturn, Lab, Nat, NsServer, SERVER_IP, TURN_IP};
use common::{analyse, Trust};

const A: u64 = 1001;
const B: u64 = 2002;
const CONTROL_PORT: u16 = 7600;
const STUN_PORT: u16 = 3478;

/// Runs `tv-agent args` in namespace `ns`, its output captured.
fn agent_in(ns: &str, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tv-agent")])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("NAT_TEST_LOG").unwrap_or_else(|_| "tv_agent=info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tv-agent under ip netns exec")
}

/// The one JSON line a scripted mode printed, and its stderr for the failure message.
fn outcome(child: Child) -> (serde_json::Value, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("null");
    let v = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not JSON: {line:?} ({e}); stderr:\n{stderr}"));
    (v, stderr)
}

/// The lab's server: TLS with the test CA, its own STUN service, on the internet; TVs A
/// and B enrolled first (their data directories `tv-a`, `tv-b` in `dir`).
async fn server(inet: &str, dir: &Path, turn: Option<&Coturn>) -> NsServer {
    let addr = SocketAddr::from((SERVER_IP, CONTROL_PORT));
    let trust = Trust::of(&dir.join("calls.db"));
    trust.tv_dir(addr, A, &dir.join("tv-a")).await;
    trust.tv_dir(addr, B, &dir.join("tv-b")).await;
    let config = Config {
        listen: addr,
        db: Some(dir.join("calls.db")),
        ring_timeout_ms: 20_000,
        heartbeat_interval_ms: 1_000,
        shutdown_grace_ms: 2_000,
        stun_listen: Some(SocketAddr::from((SERVER_IP, STUN_PORT))),
        stun_urls: vec![format!("stun:{SERVER_IP}:{STUN_PORT}")],
        turn_urls: turn
            .map(|_| vec![format!("turn:{TURN_IP}:3478?transport=udp")])
            .unwrap_or_default(),
        turn_secret_file: turn.map(|t| t.secret_file.clone()),
        ..Config::default()
    };
    NsServer::start(inet, config)
}

/// What one side of a call printed: its JSON outcome and its stderr.
type Side = (serde_json::Value, String);

/// A calls B (A in `ns_a`, B in `ns_b`); both send a tone for `secs` seconds. Returns
/// each side's JSON outcome (with the call's quality and path) and stderr.
async fn place_call(
    dir: &Path,
    srv: &NsServer,
    ns_a: &str,
    ns_b: &str,
    secs: &str,
) -> (Side, Side) {
    let (da, db) = (dir.join("tv-a"), dir.join("tv-b"));
    let (wa, wb) = (dir.join("a-hears.wav"), dir.join("b-hears.wav"));
    let server = srv.addr.to_string();
    let common_args = |d: &Path| {
        vec![
            "--data-dir".to_string(),
            d.to_str().unwrap().to_string(),
            "--server".to_string(),
            server.clone(),
        ]
    };
    let mut b_args = vec!["answer".to_string()];
    b_args.extend(common_args(&db));
    b_args.extend(
        [
            "--audio-in",
            "tone:1000",
            "--audio-out",
            &format!("wav:{}", wb.display()),
            "--seconds",
            secs,
            "--wait",
            "30",
        ]
        .map(String::from),
    );
    let b = agent_in(ns_b, &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    // Dial once B is registered.
    let deadline = Instant::now() + Duration::from_secs(15);
    while srv.shared.registry.online() < 1 {
        assert!(Instant::now() < deadline, "B never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut a_args = vec!["call".to_string()];
    a_args.extend(common_args(&da));
    a_args.extend(
        [
            "--to",
            &B.to_string(),
            "--audio-in",
            "tone:440",
            "--audio-out",
            &format!("wav:{}", wa.display()),
            "--seconds",
            secs,
        ]
        .map(String::from),
    );
    let a = agent_in(ns_a, &a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let (oa, ea) = tokio::task::spawn_blocking(move || outcome(a))
        .await
        .unwrap();
    let (ob, eb) = tokio::task::spawn_blocking(move || outcome(b))
        .await
        .unwrap();
    assert_eq!(oa["outcome"], "answered", "A: {oa}\n{ea}");
    assert_eq!(ob["outcome"], "answered", "B: {ob}\n{eb}");
    ((oa, ea), (ob, eb))
}

/// A calls B (A in `ns_a`, B in `ns_b`); both send a tone for three seconds. Returns
/// each side's JSON outcome (with the call's quality and path) after checking that each
/// heard the other's tone.
async fn call(
    dir: &Path,
    srv: &NsServer,
    ns_a: &str,
    ns_b: &str,
) -> (serde_json::Value, serde_json::Value) {
    let ((oa, ea), (ob, eb)) = place_call(dir, srv, ns_a, ns_b, "3").await;
    let (wa, wb) = (dir.join("a-hears.wav"), dir.join("b-hears.wav"));
    let (ha, hb) = (analyse(&wa, 1000.0, 440.0), analyse(&wb, 440.0, 1000.0));
    assert!(
        ha > 0.8 && hb > 0.8,
        "each hears the other: A {ha:.2}, B {hb:.2}\nA: {oa}\n{ea}\nB: {ob}\n{eb}"
    );
    for o in [&oa, &ob] {
        assert_eq!(o["quality"]["srtp"], true, "{o}");
        assert_eq!(o["quality"]["ice_state"], "connected", "{o}");
    }
    (oa, ob)
}

/// The internet and two homes, A's router doing `nat_a` (LAN 192.0.2.0/24, outside
/// 203.0.113.11) and B's `nat_b` (198.51.100.0/24, 203.0.113.12), a TV in each: the
/// internet's namespace and the TVs'.
fn two_homes(lab: &mut Lab, nat_a: Nat, nat_b: Nat) -> (String, String, String) {
    let inet = lab.internet();
    let r1 = lab.router(&inet, 1, 11, "192.0.2", nat_a);
    let r2 = lab.router(&inet, 2, 12, "198.51.100", nat_b);
    let (tv_a, _) = lab.tv(&r1, "192.0.2", 10, "a");
    let (tv_b, _) = lab.tv(&r2, "198.51.100", 10, "b");
    (inet, tv_a, tv_b)
}

fn lab_or_skip() -> Option<Lab> {
    match netlab::available() {
        Ok(()) => Some(Lab::new()),
        Err(why) if std::env::var_os("TV_AGENT_SKIP_NAT_TESTS").is_some() => {
            eprintln!("skipped: {why}");
            None
        }
        Err(why) => panic!("{why} (set TV_AGENT_SKIP_NAT_TESTS=1 to skip)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_behind_masquerading_routers_call_directly_through_their_nats() {
    let Some(mut lab) = lab_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (inet, tv_a, tv_b) = two_homes(&mut lab, Nat::Masquerade, Nat::Masquerade);
    let srv = server(&inet, dir.path(), None).await;
    let (oa, ob) = call(dir.path(), &srv, &tv_a, &tv_b).await;
    // Each TV learnt its router's outside address from the server's STUN responder.
    assert!(srv.shared.metrics.stun_answered.get() >= 2);
    // Hole punched: each reached the other at its router's outside address.
    assert_eq!(oa["path"], "srflx", "{oa}");
    assert_eq!(ob["quality"]["path"], "srflx", "{ob}");
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tvs_behind_one_router_call_on_their_own_addresses() {
    let Some(mut lab) = lab_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let inet = lab.internet();
    let r1 = lab.router(&inet, 1, 11, "192.0.2", Nat::Masquerade);
    let (tv_a, _) = lab.tv(&r1, "192.0.2", 10, "a");
    let (tv_b, _) = lab.tv(&r1, "192.0.2", 20, "b");
    let srv = server(&inet, dir.path(), None).await;
    let (oa, ob) = call(dir.path(), &srv, &tv_a, &tv_b).await;
    assert_eq!(oa["quality"]["path"], "host", "{oa}");
    assert_eq!(ob["quality"]["path"], "host", "{ob}");
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_behind_symmetric_nats_call_through_coturn() {
    let Some(mut lab) = lab_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (inet, tv_a, tv_b) = two_homes(&mut lab, Nat::Symmetric, Nat::Symmetric);
    let turn = Coturn::start(&inet, dir.path());
    let srv = server(&inet, dir.path(), Some(&turn)).await;
    let (oa, ob) = call(dir.path(), &srv, &tv_a, &tv_b).await;
    // No direct pair works through two symmetric NATs: relayed.
    assert_eq!(oa["quality"]["path"], "relay", "{oa}");
    assert_eq!(ob["quality"]["path"], "relay", "{ob}");
    drop(srv);
    drop(turn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_that_blocks_udp_gets_a_clear_message_instead_of_silence() {
    let Some(mut lab) = lab_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (inet, tv_a, tv_b) = two_homes(&mut lab, Nat::BlockUdp, Nat::Masquerade);
    let turn = Coturn::start(&inet, dir.path());
    let srv = server(&inet, dir.path(), Some(&turn)).await;
    // The control link is TCP and works; no UDP leaves A's home, not even to the relay
    // (TURN over TCP is not offered by this agent yet).
    let ((oa, ea), (ob, eb)) = place_call(dir.path(), &srv, &tv_a, &tv_b, "5").await;
    for (o, e) in [(&oa, &ea), (&ob, &eb)] {
        assert_eq!(o["quality"]["ice_state"], "failed", "{o}\n{e}");
        assert!(o["quality"].get("path").is_none(), "{o}");
        assert_eq!(o["quality"]["packets_received"], 0, "{o}");
        assert!(
            e.contains("no sound can reach the other TV"),
            "the viewer is told: {e}"
        );
    }
    drop(srv);
    drop(turn);
}
