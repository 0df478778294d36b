//! Presence (issue 16) with real `tv-agent` processes against a real server over TLS on
//! loopback: A's daemon watches B and sees each of B's changes within a second (power-on,
//! a call, hang-up, do not disturb with A's call cached and not rung, power-off as
//! offline and, with a phone number on file, as mobile); a TV B does not allow gets a
//! refusal; and the section E recovery driven by the agent's test switch
//! (`TV_AGENT_PRESENCE_FAULT`): recovery message → subscription made again → fresh full
//! state, then the threshold signs the TV out (or, by policy, only drops it) with an
//! alarm the operator sees (the admin API's alarms and metrics, and the CLI when it is
//! built beside this binary); and a server restart, after which the TV subscribes again
//! and the full state it gets holds what changed while it was away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use call_proxy_server::registry::presence::FailurePolicy;
use call_proxy_server::storage::operator::OperatorStore;
use call_proxy_server::storage::{open_operator, DbTarget};
use call_proxy_server::{Config, SqliteOptions, SqliteStore};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

const A: u64 = 1001;
const B: u64 = 2002;
const C: u64 = 3003;
const D: u64 = 4004;
/// How soon a watcher must see a change.
const WITHIN: Duration = Duration::from_secs(1);

/// A data directory for `user`: enrolled, with `contacts` in its address book.
async fn tv_dir(srv: &Server, root: &Path, user: u64, contacts: &[u64]) -> PathBuf {
    let dir = root.join(format!("tv-{user}"));
    srv.tv_dir(user, &dir).await;
    let book: Vec<Value> = contacts
        .iter()
        .map(|u| json!({"user_id": u, "name": format!("TV {u}")}))
        .collect();
    std::fs::write(
        dir.join("contacts.json"),
        serde_json::to_vec(&book).unwrap(),
    )
    .unwrap();
    dir
}

/// One line a process printed, with when it was read.
type Line = (Instant, Value);

/// Reads `read`'s JSON lines into a channel, stamped as they arrive.
fn lines_of(
    read: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> mpsc::UnboundedReceiver<Line> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The same for a process's pipe, read on a thread of its own.
fn pipe_lines(read: impl std::io::Read + Send + 'static) -> mpsc::UnboundedReceiver<Line> {
    use std::io::BufRead;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(read).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Waits up to `secs` for a line `pick` accepts; the lines before it are dropped.
async fn next_line(
    rx: &mut mpsc::UnboundedReceiver<Line>,
    secs: u64,
    what: &str,
    pick: impl Fn(&Value) -> bool,
) -> Line {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((at, v))) if pick(&v) => return (at, v),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended waiting for {what}"),
            Err(_) => panic!("no {what} within {secs} s"),
        }
    }
}

/// A `tv-agent run` daemon with its control API; killed when dropped.
struct Daemon {
    child: Child,
    write: tokio::net::tcp::OwnedWriteHalf,
    replies: mpsc::UnboundedReceiver<Line>,
    events: mpsc::UnboundedReceiver<Line>,
}

impl Daemon {
    async fn start(srv: &Server, dir: &Path, fault: Option<&str>) -> Daemon {
        let port = test_support::net::free_port().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tv-agent"));
        cmd.args(["run", "--server", &srv.addr.to_string()])
            .args(["--audio-in", "null", "--audio-out", "null"])
            .args(["--control-listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(f) = fault {
            cmd.env("TV_AGENT_PRESENCE_FAULT", f);
        }
        let child = cmd.spawn().unwrap();
        assert!(
            test_support::net::wait_listening_port(port, Duration::from_secs(10)).await,
            "the control API is up"
        );
        let (read, write) = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap()
            .into_split();
        let mut all = lines_of(read);
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(line) = all.recv().await {
                let to = if line.1.get("ok").is_some() {
                    &reply_tx
                } else {
                    &event_tx
                };
                let _ = to.send(line);
            }
        });
        Daemon {
            child,
            write,
            replies,
            events,
        }
    }

    async fn cmd(&mut self, cmd: Value) -> Value {
        self.write
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        next_line(&mut self.replies, 10, "a reply", |_| true)
            .await
            .1
    }

    /// Waits until the daemon is registered; when it saw that.
    async fn registered(&mut self) -> Instant {
        for _ in 0..200 {
            let s = self.cmd(json!({"cmd": "status"})).await;
            if s["status"]["registered"] == json!(true) {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the daemon did not register");
    }

    /// Waits until its subscription is answered (its address book is then on the
    /// server) and returns the states it knows, as its control API lists them.
    async fn subscribed(&mut self) -> Value {
        for _ in 0..200 {
            let p = self.cmd(json!({"cmd": "presence"})).await;
            if p["states"].as_array().is_some_and(|s| !s.is_empty()) {
                return p["states"].clone();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no answer to its subscription");
    }

    /// The next presence event about `user` in `state`; when it came.
    async fn sees(&mut self, user: u64, state: &str) -> Instant {
        let what = format!("{user} shown {state}");
        next_line(&mut self.events, 10, &what, |v| {
            v["event"] == "presence" && v["user"] == user && v["state"] == state
        })
        .await
        .0
    }

    async fn power_off(mut self) {
        assert_eq!(
            self.cmd(json!({"cmd": "power_off"})).await["ok"],
            json!(true)
        );
        let status =
            test_support::process::wait_exit_async(&mut self.child, Duration::from_secs(5))
                .await
                .unwrap();
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        test_support::process::kill(&mut self.child);
    }
}

/// `tv-agent watch` as a process: its stdout lines and its stderr.
struct Watch {
    child: Child,
    lines: mpsc::UnboundedReceiver<Line>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Watch {
    fn start(srv: &Server, dir: &Path, users: &[u64], seconds: u64, fault: Option<&str>) -> Watch {
        let users: Vec<String> = users.iter().map(u64::to_string).collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tv-agent"));
        cmd.args(["watch", "--server", &srv.addr.to_string()])
            .arg("--data-dir")
            .arg(dir)
            .args(["--seconds", &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !users.is_empty() {
            cmd.args(["--users", &users.join(",")]);
        }
        if let Some(f) = fault {
            cmd.env("TV_AGENT_PRESENCE_FAULT", f);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = pipe_lines(child.stdout.take().unwrap());
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (err, into) = (child.stderr.take().unwrap(), std::sync::Arc::clone(&stderr));
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            let mut err = err;
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    return;
                }
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Watch {
            child,
            lines,
            stderr,
        }
    }

    /// What it wrote to stderr so far.
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn sees(&mut self, user: u64, state: &str, full: bool) -> Line {
        let what = format!("a line: {user} {state} (full: {full})");
        next_line(&mut self.lines, 10, &what, |v| {
            v["user"] == user && v["state"] == state && (v["full"] == json!(true)) == full
        })
        .await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        test_support::process::kill(&mut self.child);
    }
}

fn server(dir: &Path, tune: impl FnOnce(&mut Config)) -> (Server, PathBuf) {
    let db = dir.join("db.sqlite");
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        db: Some(db.clone()),
        ring_timeout_ms: 60_000,
        heartbeat_interval_ms: 1_000,
        shutdown_grace_ms: 2_000,
        ..Config::default()
    };
    tune(&mut config);
    let store = SqliteStore::open(&db, SqliteOptions::default()).unwrap();
    (Server::start_with(config, store), db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_each_change_of_a_contact_within_a_second() {
    let root = tempfile::tempdir().unwrap();
    let (srv, db) = server(root.path(), |_| {});
    // B lists A (so A may see B); A lists B; C and D list nobody.
    let (a_dir, b_dir) = (
        tv_dir(&srv, root.path(), A, &[B]).await,
        tv_dir(&srv, root.path(), B, &[A]).await,
    );
    let (c_dir, d_dir) = (
        tv_dir(&srv, root.path(), C, &[]).await,
        tv_dir(&srv, root.path(), D, &[B]).await,
    );
    // B has been on once (its address book is on the server), and is off.
    let mut b = Daemon::start(&srv, &b_dir, None).await;
    b.registered().await;
    b.subscribed().await;
    b.power_off().await;
    let mut c = Daemon::start(&srv, &c_dir, None).await;
    c.registered().await;

    let mut a = Daemon::start(&srv, &a_dir, None).await;
    a.registered().await;
    assert_eq!(
        a.subscribed().await,
        json!([{"user": B, "state": "offline"}])
    );

    // B powers on.
    let mut b = Daemon::start(&srv, &b_dir, None).await;
    let on = b.registered().await;
    let seen = a.sees(B, "online").await;
    assert!(
        seen.saturating_duration_since(on) < WITHIN,
        "online seen {:?} after",
        seen.saturating_duration_since(on)
    );

    // B calls C: busy; C answers (still busy); B hangs up: online.
    let t = Instant::now();
    assert_eq!(
        b.cmd(json!({"cmd": "dial", "to": C})).await["outcome"],
        "ringing"
    );
    let seen = a.sees(B, "busy").await;
    assert!(seen - t < WITHIN, "busy seen in {:?}", seen - t);
    next_line(&mut c.events, 10, "C rings", |v| v["event"] == "incoming").await;
    assert_eq!(c.cmd(json!({"cmd": "answer"})).await["ok"], json!(true));
    next_line(&mut b.events, 10, "answered", |v| v["event"] == "answered").await;
    let t = Instant::now();
    assert_eq!(b.cmd(json!({"cmd": "hangup"})).await["ok"], json!(true));
    let seen = a.sees(B, "online").await;
    assert!(seen - t < WITHIN, "online seen in {:?}", seen - t);

    // Do not disturb: busy; A's call is cached for B as missed, not rung.
    let t = Instant::now();
    let set = b.cmd(json!({"cmd": "dnd", "on": true})).await;
    assert_eq!(
        set,
        json!({"ok": true, "do_not_disturb": true, "hidden": false})
    );
    let seen = a.sees(B, "busy").await;
    assert!(seen - t < WITHIN, "do not disturb seen in {:?}", seen - t);
    assert_eq!(
        a.cmd(json!({"cmd": "dial", "to": B})).await["outcome"],
        "busy"
    );
    let missed = next_line(&mut b.events, 10, "A's call in B's missed calls", |v| {
        v["event"] == "cached_calls"
            && v["calls"]
                .as_array()
                .is_some_and(|c| c.iter().any(|m| m["user_id"] == A && m["reason"] == "busy"))
    })
    .await;
    drop(missed);
    while let Ok((_, v)) = b.events.try_recv() {
        assert_ne!(
            v["event"], "incoming",
            "a TV in do not disturb does not ring"
        );
    }
    // Kept across a restart of B: presence.json.
    let kept: Value =
        serde_json::from_slice(&std::fs::read(b_dir.join("presence.json")).unwrap()).unwrap();
    assert_eq!(kept["do_not_disturb"], json!(true));
    let t = Instant::now();
    b.cmd(json!({"cmd": "dnd", "on": false})).await;
    let seen = a.sees(B, "online").await;
    assert!(seen - t < WITHIN);

    // D (not in B's book, never called by B) is refused B's state.
    let mut d = Watch::start(&srv, &d_dir, &[], 5, None);
    d.sees(B, "not_allowed", true).await;

    // B powers off: offline.
    let t = Instant::now();
    b.power_off().await;
    let seen = a.sees(B, "offline").await;
    assert!(seen - t < WITHIN, "offline seen in {:?}", seen - t);

    // The operator puts B's phone number on file (as the CLI and admin API do): B, on
    // again and off, is mobile.
    let ops = open_operator(&DbTarget::Sqlite(db.clone()), 1);
    assert!(ops
        .set_phone(B, Some("+4930123456".into()), 1)
        .await
        .unwrap());
    let mut b = Daemon::start(&srv, &b_dir, None).await;
    b.registered().await;
    a.sees(B, "online").await;
    let t = Instant::now();
    b.power_off().await;
    let seen = a.sees(B, "mobile").await;
    assert!(seen - t < WITHIN, "mobile seen in {:?}", seen - t);

    // A's control API lists what it knows.
    let p = a.cmd(json!({"cmd": "presence"})).await;
    assert_eq!(p["states"], json!([{"user": B, "state": "mobile"}]));
    a.power_off().await;
    c.power_off().await;
    srv.stop().await;
}

const ADMIN_TOKEN: &str = "presence-test-token";

/// The admin API over the running server, on loopback; its base URL.
async fn admin_api(srv: &Server, db: &Path) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = call_proxy_server::admin::router(
        std::sync::Arc::clone(srv.shared()),
        call_proxy_server::admin::AdminOptions {
            token: ADMIN_TOKEN.into(),
            db: DbTarget::Sqlite(db.to_path_buf()),
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// One authorised GET on the admin API; its body (a 200 is required).
async fn get(url: String) -> String {
    tokio::task::spawn_blocking(move || {
        let mut resp = ureq::get(&url)
            .header("Authorization", &format!("Bearer {ADMIN_TOKEN}"))
            .call()
            .unwrap();
        resp.body_mut().read_to_string().unwrap()
    })
    .await
    .unwrap()
}

/// The operator's CLI built beside this test's `tv-agent` (`cargo test --workspace`
/// builds it), if it is there.
fn operator_cli() -> Option<PathBuf> {
    let cli = Path::new(env!("CARGO_BIN_EXE_tv-agent")).with_file_name("call-proxy-server");
    cli.exists().then_some(cli)
}

/// Section E with `watch` and the agent's switch: each change B makes is not
/// acknowledged (`drop`) or refused (`refuse`); the server sends the recovery message,
/// A subscribes again and prints the fresh full state; the third failure applies the
/// policy and raises an alarm.
async fn recovery(fault: &str, policy: FailurePolicy) {
    let root = tempfile::tempdir().unwrap();
    let (srv, db) = server(root.path(), |c| {
        c.presence_ack_timeout_ms = 300;
        c.presence_recovery_threshold = 3;
        c.presence_failure_policy = policy;
    });
    let a_dir = tv_dir(&srv, root.path(), A, &[B]).await;
    let b_dir = tv_dir(&srv, root.path(), B, &[A]).await;
    let mut b = Daemon::start(&srv, &b_dir, None).await;
    b.registered().await;
    b.subscribed().await;
    let mut a = Watch::start(&srv, &a_dir, &[], 30, Some(fault));
    a.sees(B, "online", true).await;
    let metrics = &srv.shared().metrics;
    let mut dnd = false;
    for round in 1..=3u64 {
        dnd = !dnd;
        b.cmd(json!({"cmd": "dnd", "on": dnd})).await;
        let shown = if dnd { "busy" } else { "online" };
        // The change is printed (it was received), then not acknowledged or refused.
        a.sees(B, shown, false).await;
        if round < 3 {
            // The recovery message: A subscribes again and prints the fresh state.
            a.sees(B, shown, true).await;
            assert_eq!(metrics.presence_recoveries.get(), round);
        }
    }
    // The third failure within the window: the policy, and an alarm.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.alarms_raised.get() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metrics.alarms_raised.get(), 1);
    assert_eq!(metrics.presence_recoveries.get(), 2);
    // The operator sees it: the admin API's alarms and metrics, and the CLI.
    let admin = admin_api(&srv, &db).await;
    let alarms: Value = serde_json::from_str(&get(format!("{admin}/api/alarms")).await).unwrap();
    let alarms = alarms["alarms"].as_array().unwrap().clone();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(
        (alarms[0]["user_id"].as_u64(), alarms[0]["count"].as_u64()),
        (Some(A), Some(3))
    );
    let metrics_text = get(format!("{admin}/metrics")).await;
    let metric = |name: &str| {
        metrics_text
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().to_string())
    };
    assert_eq!(metric("call_proxy_alarms_open").as_deref(), Some("1"));
    assert_eq!(
        metric("call_proxy_alarms_raised_total").as_deref(),
        Some("1")
    );
    assert_eq!(
        metric("call_proxy_presence_recoveries_total").as_deref(),
        Some("2")
    );
    let applied = match policy {
        FailurePolicy::SignOut => "call_proxy_presence_sign_outs_total",
        FailurePolicy::DropSubscription => "call_proxy_presence_dropped_subscriptions_total",
    };
    assert_eq!(metric(applied).as_deref(), Some("1"), "{applied}");
    if let Some(cli) = operator_cli() {
        let out = Command::new(cli)
            .args(["alarms", "--json", "--db"])
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (listed[0]["user_id"].as_u64(), listed[0]["count"].as_u64()),
            (Some(A), Some(3)),
            "{listed}"
        );
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    } else {
        eprintln!("call-proxy-server is not built beside tv-agent: the CLI part is checked by cargo test --workspace");
    }
    match policy {
        FailurePolicy::SignOut => {
            assert_eq!(metrics.presence_sign_outs.get(), 1);
            // Signed out: its link closed with the reason; it connects again by itself
            // and starts afresh (a full state).
            a.sees(B, if dnd { "busy" } else { "online" }, true).await;
            let err = a.stderr();
            assert!(
                err.contains("signed out") && err.contains("presence notifications"),
                "{err}"
            );
        }
        FailurePolicy::DropSubscription => {
            assert_eq!(metrics.presence_dropped.get(), 1);
            assert_eq!(metrics.presence_sign_outs.get(), 0);
            // Still registered: nothing more is pushed, and no full state comes again.
            dnd = !dnd;
            b.cmd(json!({"cmd": "dnd", "on": dnd})).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
            while let Ok((_, v)) = a.lines.try_recv() {
                assert!(
                    v["full"] != json!(true),
                    "no new subscription after the drop: {v}"
                );
                assert!(
                    v["user"] != B || v["full"] == json!(true),
                    "nothing more pushed: {v}"
                );
            }
            let online = srv.shared().registry.is_online(A);
            assert!(online, "A stays registered");
        }
    }
    drop(a);
    b.power_off().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_notifications_are_recovered_then_sign_the_tv_out_with_an_alarm() {
    recovery("drop", FailurePolicy::SignOut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_notifications_are_recovered_then_only_dropped_by_policy_with_an_alarm() {
    recovery("refuse", FailurePolicy::DropSubscription).await;
}

/// A node restart: the TV's link comes back, it subscribes again and the full state it is
/// answered holds what changed while it was away (B switched off meanwhile), then the
/// pushes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_tv_subscribes_again_and_loses_no_change() {
    let root = tempfile::tempdir().unwrap();
    let (srv, db) = server(root.path(), |_| {});
    let a_dir = tv_dir(&srv, root.path(), A, &[B]).await;
    let b_dir = tv_dir(&srv, root.path(), B, &[A]).await;
    let mut b = Daemon::start(&srv, &b_dir, None).await;
    b.registered().await;
    b.subscribed().await;
    let mut a = Daemon::start(&srv, &a_dir, None).await;
    a.registered().await;
    assert_eq!(
        a.subscribed().await,
        json!([{"user": B, "state": "online"}])
    );
    // (The first full state was read before the reply that listed it.)
    while a.events.try_recv().is_ok() {}
    let addr = srv.addr;
    srv.stop().await;
    // B is switched off while the server is away (its goodbye cannot reach it).
    drop(b);
    let (srv, _db) = server(root.path(), |c| c.listen = addr);
    let full = next_line(&mut a.events, 20, "the full state after the restart", |v| {
        v["event"] == "presence" && v["full"] == json!(true)
    })
    .await
    .1;
    assert_eq!(
        (full["user"].as_u64(), full["state"].as_str()),
        (Some(B), Some("offline"))
    );
    let mut b = Daemon::start(&srv, &b_dir, None).await;
    b.registered().await;
    a.sees(B, "online").await;
    drop(db);
    a.power_off().await;
    b.power_off().await;
    srv.stop().await;
}
