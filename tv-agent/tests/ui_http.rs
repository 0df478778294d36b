//! The TV UI's HTTP side without a browser: what it serves, and how it refuses requests
//! from other sites, bad commands and bad contact edits (real server, real agent, real
//! sockets and address-book file; the agent enrolled, over TLS).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tv_agent::contacts::ContactBook;
use tv_agent::media::AudioSpec;

use common::http;

const JSON: &str = "Content-Type: application/json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_serves_its_page_and_refuses_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let (agent, _events) = boot(
        srv.agent_config(1001, AudioSpec::Null, AudioSpec::Null)
            .await,
    )
    .await;
    let book_path = dir.path().join("tv").join("contacts.json");
    let book = ContactBook::open(&book_path).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ui = listener.local_addr().unwrap();
    tokio::spawn(tv_agent::ui::serve(listener, agent.clone(), book));

    // The page and its parts, from the binary, with a strict content policy.
    let page = http(ui, "GET", "/", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.head.contains("content-type: text/html"));
    assert!(page
        .head
        .contains("content-security-policy: default-src 'self'"));
    assert!(page.body.contains("<script src=\"/app.js\""));
    for (path, kind) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
        let r = http(ui, "GET", path, &[], "").await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.head.contains(kind), "{path}: {}", r.head);
    }
    assert_eq!(http(ui, "GET", "/nothing", &[], "").await.status, 404);

    // Another host name (DNS rebinding) or another site's page: refused.
    let rebound = http(ui, "GET", "/", &["Host: tv.attacker.example:80"], "").await;
    assert_eq!(rebound.status, 403);
    let cross = http(
        ui,
        "POST",
        "/api/command",
        &[JSON, "Origin: http://attacker.example"],
        r#"{"cmd":"dial","to":2002}"#,
    )
    .await;
    assert_eq!(cross.status, 403);
    // A plain form post (no JSON type) cannot run a command.
    let form = http(
        ui,
        "POST",
        "/api/command",
        &["Content-Type: text/plain"],
        r#"{"cmd":"status"}"#,
    )
    .await;
    assert_eq!(form.status, 415);

    // Commands are the control API's.
    let origin = format!("Origin: http://{ui}");
    let status = http(
        ui,
        "POST",
        "/api/command",
        &[JSON, &origin],
        r#"{"cmd":"status"}"#,
    )
    .await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["status"]["user"], json!(1001));
    assert_eq!(status.json()["status"]["registered"], json!(true));
    let bad = http(ui, "POST", "/api/command", &[JSON], r#"{"cmd":"fly"}"#).await;
    assert_eq!(bad.json()["ok"], json!(false));
    let mute = http(
        ui,
        "POST",
        "/api/command",
        &[JSON],
        r#"{"cmd":"mute","muted":true}"#,
    )
    .await;
    assert_eq!(mute.json(), json!({"ok": false, "error": "no such call"}));
    let huge = format!(r#"{{"cmd":"query","users":[{}1]}}"#, "1,".repeat(10_000));
    assert_eq!(
        http(ui, "POST", "/api/command", &[JSON], &huge)
            .await
            .status,
        413
    );

    // Contact edits: checked, saved to the file, errors with the status a client expects.
    let put = http(
        ui,
        "PUT",
        "/api/contacts/2002",
        &[JSON],
        r#"{"name":"Gran"}"#,
    )
    .await;
    assert_eq!(put.status, 200);
    assert_eq!(
        put.json()["contacts"],
        json!([{"user_id": 2002, "name": "Gran"}])
    );
    assert_eq!(
        json_file(&book_path),
        json!([{"user_id": 2002, "name": "Gran"}])
    );
    let long = format!(r#"{{"name":"{}"}}"#, "x".repeat(41));
    for (path, body, want) in [
        ("/api/contacts/0", r#"{"name":"Zero"}"#, 422),
        ("/api/contacts/2003", r#"{"name":"   "}"#, 422),
        ("/api/contacts/2003", long.as_str(), 422),
        ("/api/contacts/abc", r#"{"name":"Abc"}"#, 400),
        ("/api/contacts/2003", r#"{"nom":"x"}"#, 422),
    ] {
        let r = http(ui, "PUT", path, &[JSON], body).await;
        assert_eq!(r.status, want, "PUT {path} {body}: {}", r.body);
    }
    let gone = http(ui, "DELETE", "/api/contacts/9999", &[], "").await;
    assert_eq!(gone.status, 404);
    assert!(gone.json()["error"].as_str().unwrap().contains("9999"));
    let list = http(ui, "GET", "/api/contacts", &[], "").await;
    assert_eq!(
        list.json()["contacts"],
        json!([{"user_id": 2002, "name": "Gran"}])
    );

    // The event stream starts with a snapshot of everything the page shows.
    let mut s = TcpStream::connect(ui).await.unwrap();
    s.write_all(format!("GET /api/events HTTP/1.1\r\nHost: {ui}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("\n\n") || !got.contains("data:") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the first event")
            .unwrap();
        assert!(n > 0, "stream closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got
        .to_lowercase()
        .contains("content-type: text/event-stream"));
    // A cut-off page reconnects after 1 s, not the browser's default 3 s.
    assert!(got.contains("retry: 1000"), "{got}");
    let data = got
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let snapshot: Value = serde_json::from_str(data).unwrap();
    assert_eq!(snapshot["event"], json!("snapshot"));
    assert_eq!(snapshot["status"]["user"], json!(1001));
    assert_eq!(
        snapshot["contacts"],
        json!([{"user_id": 2002, "name": "Gran"}])
    );

    agent.power_off().await;
    srv.stop().await;
}
