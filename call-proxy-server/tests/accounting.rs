//! Traffic accounting (issue 18, section D) on a real server and database (SQLite, or
//! PostgreSQL with `CALL_PROXY_TEST_BACKEND=postgres`), with enrolled TVs over TLS:
//! sessions, session time and control-link bytes per account and period reach
//! `account_usage`; more traffic is more bytes; what is left when the server stops is
//! written; operators read it (CLI, admin API, metrics) and set allowances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{eventually, TestServer, ADMIN_TOKEN};
use serde_json::Value;
use shared_proto::*;

use common::operator_cli as cli;

/// `call-proxy-server usage --user USER --format json`: its rows.
fn usage(db: &str, user: u64) -> Vec<Value> {
    let (code, out, err) = cli(&[
        "usage",
        "--db",
        db,
        "--user",
        &user.to_string(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn field(row: &Value, name: &str) -> u64 {
    row[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {row}"))
}

/// The usage row of `user` once `done` holds for it (a connection's usage reaches the
/// database in parts: its start, then what it used, at most every interval).
async fn usage_once(db: &str, user: u64, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Vec::new();
    let ok = eventually(Duration::from_secs(10), || {
        last = usage(db, user);
        last.first().is_some_and(&done)
    })
    .await;
    assert!(ok, "usage of {user} not as expected in time: {last:?}");
    assert_eq!(last.len(), 1, "one period: {last:?}");
    last.remove(0)
}

/// This month's key, as the server names periods (UTC).
fn this_month() -> String {
    call_proxy_server::accounting::Period::Month.key(call_proxy_server::clock::now_ms())
}

/// An HTTP request to the admin API with the token: (status, body).
async fn http(method: &'static str, url: String, body: Option<String>) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let mut resp = match (method, body) {
            ("PUT", Some(b)) => agent
                .put(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.as_bytes())
                .unwrap(),
            _ => agent
                .get(&url)
                .header("Authorization", &auth)
                .call()
                .unwrap(),
        };
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_time_and_bytes_are_accounted_per_account_and_operators_see_them() {
    let mut srv = TestServer::start_with(|c| {
        c.accounting_flush_ms = 100;
        c.requests_per_sec = 10_000;
        c.request_burst = 10_000;
    })
    .await;
    let db = srv.db.db_arg();
    let admin = srv.start_admin(None).await;

    // One short session: registered, a state query, goodbye.
    let mut a = srv.tv(31, 4000).await;
    a.request(Request::QueryState { users: vec![32] })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.bye().await.unwrap();
    // The session's end is accounted: its time is in.
    let first = usage_once(&db, 31, |r| field(r, "session_ms") >= 250).await;
    assert_eq!(first["period"], Value::from(this_month()), "{first}");
    assert_eq!(field(&first, "sessions"), 1, "{first}");
    let (in1, out1) = (field(&first, "control_in"), field(&first, "control_out"));
    // At least the preamble and the registration in, the preamble and two replies out.
    assert!(in1 >= 20 && out1 >= 20, "{first}");
    assert!(field(&first, "session_ms") >= 250, "{first}");
    assert_eq!(field(&first, "bytes"), in1 + out1, "{first}");
    assert_eq!(first["allowance"], Value::Null);
    // Nobody else was charged: user 32 never connected.
    assert!(usage(&db, 32).is_empty());

    // A second session with 300 heartbeats: a second session, and at least 300 frames
    // more each way (a frame is a 4-byte length and a kind/id header at least).
    let mut a = srv.tv(31, 4000).await;
    for _ in 0..300 {
        a.request(Request::Heartbeat).await.unwrap();
    }
    // Accounted while the session is live: a connection hands its usage over with the
    // first frame after each accounting_flush_ms (a TV's heartbeats keep coming).
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.request(Request::Heartbeat).await.unwrap();
    let live = usage_once(&db, 31, |r| {
        field(r, "sessions") == 2 && field(r, "control_in") >= in1 + 300 * 8
    })
    .await;
    assert!(field(&live, "control_out") >= out1 + 300 * 8, "{live}");
    a.bye().await.unwrap();

    // The operator sets an allowance: shown with what is left; lifted again.
    let (code, out, err) = cli(&["allowance", "--db", &db, "--user", "31", "--mb", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1048576"), "{out}");
    let row = usage(&db, 31).remove(0);
    assert_eq!(field(&row, "allowance"), 1 << 20);
    assert_eq!(field(&row, "remaining"), (1 << 20) - field(&row, "bytes"));
    let (code, _, err) = cli(&["allowance", "--db", &db, "--user", "31"]);
    assert_eq!(code, 2, "no amount is a usage error: {err}");
    assert!(err.contains("--bytes"), "{err}");
    let (code, _, err) = cli(&["allowance", "--db", &db, "--user", "31", "--unlimited"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(usage(&db, 31)[0]["allowance"], Value::Null);

    // The admin API: the same rows; an allowance set over HTTP; bad input named.
    let (status, body) = http("GET", format!("{admin}/api/usage?user=31"), None).await;
    assert_eq!(status, 200, "{body}");
    let api: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api["usage"][0]["user_id"], 31);
    assert_eq!(
        field(&api["usage"][0], "control_in"),
        field(&usage(&db, 31)[0], "control_in")
    );
    let (status, body) = http(
        "PUT",
        format!("{admin}/api/allowances/31"),
        Some(r#"{"bytes": 5000000}"#.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&usage(&db, 31)[0], "allowance"), 5_000_000);
    let (status, body) = http("GET", format!("{admin}/api/usage?period=x%20y"), None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("period"), "{body}");
    let (status, metrics) = http("GET", format!("{admin}/metrics"), None).await;
    assert_eq!(status, 200);
    let accounted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("call_proxy_accounted_control_in_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(accounted >= in1 + 300 * 8, "{accounted}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_still_unwritten_when_the_server_stops_is_written_then() {
    // An interval no test waits for: only the stop writes the usage. The database
    // outlives the server (its file in `keep`, its handle held).
    let keep = tempfile::tempdir().unwrap();
    let srv = TestServer::start_on(
        common::TestDb::new(keep.path(), "test"),
        tempfile::tempdir().unwrap(),
        |c| c.accounting_flush_ms = 600_000,
    )
    .await;
    let held = std::sync::Arc::clone(&srv.db);
    let db = srv.db.db_arg();
    let a = srv.tv(41, 4000).await;
    let b = srv.tv(42, 4002).await;
    a.bye().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(usage(&db, 41).is_empty(), "written before its interval");
    // B is still connected when the server stops: its session is accounted too.
    srv.stop().await;
    drop(b);
    for user in [41, 42] {
        let rows = usage(&db, user);
        assert_eq!(rows.len(), 1, "{user}: {rows:?}");
        assert_eq!(field(&rows[0], "sessions"), 1);
        assert!(field(&rows[0], "control_in") > 0);
    }
    drop(held);
}
