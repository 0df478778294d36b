//! The `tv-agent run` daemon and its control API (JSON lines on loopback), as a process,
//! enrolled and over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use shared_proto::NetState;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tv_agent::media::AudioSpec;

/// Sends a command and returns its `{"ok":…}` reply, skipping event lines.
async fn command(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    cmd: &str,
) -> Value {
    write
        .write_all(format!("{cmd}\n").as_bytes())
        .await
        .unwrap();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("connection open");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("ok").is_some() {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_serves_the_control_api_and_powers_off_on_command() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let api_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = dir.path().join("tv");
    srv.tv_dir(5005, &data).await;
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_tv-agent"))
        .args(["run", "--server", &srv.addr.to_string()])
        .args(["--audio-in", "null", "--audio-out", "null"])
        .args(["--control-listen", &format!("127.0.0.1:{api_port}")])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stream = None;
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", api_port)).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (read, mut write) = stream.expect("control API up").into_split();
    let mut lines = BufReader::new(read).lines();
    let mut registered = false;
    for _ in 0..100 {
        let status = command(&mut lines, &mut write, r#"{"cmd":"status"}"#).await;
        if status["status"]["registered"] == json!(true) {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registered, "the daemon registered");
    let q = command(
        &mut lines,
        &mut write,
        r#"{"cmd":"query","users":[5005,42]}"#,
    )
    .await;
    assert_eq!(
        q["states"],
        json!([{"user_id": 5005, "user_netstate": 1}, {"user_id": 42, "user_netstate": null}])
    );
    let bad = command(&mut lines, &mut write, r#"{"cmd":"fly"}"#).await;
    assert_eq!(bad["ok"], json!(false));
    let dial = command(&mut lines, &mut write, r#"{"cmd":"dial","to":42}"#).await;
    assert_eq!(dial["outcome"], json!("unknown_user"));
    assert_eq!(
        command(&mut lines, &mut write, r#"{"cmd":"power_off"}"#).await["ok"],
        json!(true)
    );
    let status = test_support::process::wait_exit_async(&mut daemon, Duration::from_secs(5))
        .await
        .unwrap();
    test_support::process::kill(&mut daemon);
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon exited cleanly: {status:?}"
    );
    // The server recorded it offline.
    let (other, _e) = boot(
        srv.agent_config(6006, AudioSpec::Null, AudioSpec::Null)
            .await,
    )
    .await;
    let states = other.query(vec![5005]).await.unwrap();
    assert_eq!(states[0].state, NetState::Offline);
    other.power_off().await;
    srv.stop().await;
}
