//! A TV switched on without an identity, as its owner meets it (issue 12): a real TLS
//! server, a real `tv-agent run` with an empty data directory. With its UI it shows
//! "Activate this TV" and its code (over HTTP and in headless Chromium, driven by remote
//! keys as tests/ui.rs does), is approved by the operator with the code it showed, and
//! carries on into the normal daemon (registered, the home screen) without a restart; a
//! withdrawn approval is shown as refused and OK asks for a new code; an expired code is
//! replaced by a new one, one per expiry. Without a UI it prints the code as `tv-agent
//! enroll` does; without a CA to enroll against it exits 4. Screenshots of the
//! activation screen go to `target/ui-screenshots/` (or `$UI_SCREENSHOT_DIR`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use call_proxy_server::storage::enroll::{normalise_code, Approval};
use call_proxy_server::storage::operator::OperatorStore;
use common::browser::{self, Driver};
use fantoccini::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Linux signal numbers (libc is not a dependency here).
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;
const SIGTERM: i32 = 15;

/// The letters of user codes (call-proxy-server's CODE_ALPHABET), as a pattern.
const CODE_PATTERN: &str = "^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$";

fn is_code(s: &str) -> bool {
    let ok = |half: &str| {
        half.len() == 4
            && half
                .bytes()
                .all(|b| call_proxy_server::storage::enroll::CODE_ALPHABET.contains(&b))
    };
    matches!(s.split_once('-'), Some((a, b)) if ok(a) && ok(b))
}

fn free_port() -> u16 {
    test_support::net::free_port().unwrap()
}

use common::EnrollServer as TlsServer;

fn start_server(ttl_s: u64) -> TlsServer {
    common::enroll_server(ttl_s)
}

impl TlsServer {
    fn operator(&self) -> impl OperatorStore {
        call_proxy_server::storage::open_operator(
            &call_proxy_server::storage::DbTarget::sqlite(&self.db),
            1,
        )
    }

    /// `call-proxy-server approve --code CODE --user USER` on the database file.
    async fn approve(&self, code: &str, user: u64) {
        let r = self
            .operator()
            .approve(
                normalise_code(code).unwrap(),
                user,
                false,
                call_proxy_server::clock::now_ms(),
            )
            .await
            .unwrap();
        assert!(
            matches!(r, Approval::Approved { .. }),
            "approve {code}: {r:?}"
        );
    }

    /// `call-proxy-server revoke --user USER`.
    async fn revoke(&self, user: u64) {
        let done = self
            .operator()
            .revoke(user, call_proxy_server::clock::now_ms())
            .await
            .unwrap();
        assert!(done, "revoke {user}");
    }

    /// Waits (up to 15 s) until the server records `user` online.
    async fn wait_online(&self, user: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rec = self.operator().user(user).await.unwrap();
            if rec.as_ref().is_some_and(|r| r.user_netstate == 1) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "user {user} never online: {rec:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many enrollments (codes) the server has handed out.
    async fn codes_handed_out(&self) -> usize {
        self.operator()
            .enrollments(call_proxy_server::clock::now_ms(), 1000)
            .await
            .unwrap()
            .len()
    }
}

/// A `tv-agent run` with an empty data directory; its stdout's JSON lines are collected.
/// Killed when dropped.
struct Tv {
    ui_port: Option<u16>,
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    data: PathBuf,
}

impl Tv {
    /// With the UI (`ui`) or without; `--server-ca` only if `ca` is given.
    async fn start(srv: &TlsServer, data: &Path, ui: bool, ca: Option<&Path>) -> Tv {
        let ui_port = ui.then(free_port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tv-agent"));
        cmd.args(["run", "--server", &srv.server.addr.to_string()])
            .args(["--audio-in", "null", "--audio-out", "null"])
            .args(["--control-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(ca) = ca {
            cmd.arg("--server-ca").arg(ca);
        }
        if let Some(port) = ui_port {
            cmd.args(["--ui-listen", &format!("127.0.0.1:{port}")]);
        }
        let mut child = cmd.spawn().expect("start tv-agent");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        if let Some(port) = ui_port {
            assert!(
                test_support::net::wait_listening_port(port, Duration::from_secs(10)).await,
                "the TV UI did not start listening on {port}"
            );
        }
        Tv {
            ui_port,
            child,
            lines,
            seen: Vec::new(),
            data: data.to_path_buf(),
        }
    }

    fn ui(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ui_port.expect("a UI")))
    }

    /// Waits (up to `secs`) for a stdout line that `pick` accepts.
    async fn line<T>(&mut self, secs: u64, what: &str, pick: impl Fn(&Value) -> Option<T>) -> T {
        if let Some(t) = self.seen.iter().find_map(&pick) {
            return t;
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            while let Ok(v) = self.lines.try_recv() {
                self.seen.push(v.clone());
                if let Some(t) = pick(&v) {
                    return t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on stdout within {secs} s; lines: {:?}",
                self.seen
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: i32) {
        test_support::process::signal(self.child.id(), sig).unwrap();
    }

    fn enrolled_file(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.data.join("identity/enrolled.json")).unwrap())
            .unwrap()
    }
}

impl Drop for Tv {
    fn drop(&mut self) {
        let _ = test_support::process::signal(self.child.id(), SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to the UI: status and JSON body.
async fn http(ui: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let r = common::http(ui, method, path, &["Content-Type: application/json"], body).await;
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

/// Reads the UI's event stream (a new connection: the current state first) until an
/// event `pick` accepts, within `secs`; every event read is passed to `pick`.
async fn event<T>(
    ui: SocketAddr,
    secs: u64,
    what: &str,
    mut pick: impl FnMut(&Value) -> Option<T>,
) -> T {
    let mut s = TcpStream::connect(ui).await.unwrap();
    s.write_all(format!("GET /api/events HTTP/1.1\r\nHost: {ui}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut text = String::new();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Whole lines only; a data line is one JSON event.
        while let Some(at) = text.find('\n') {
            let line: String = text.drain(..=at).collect();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                if let Some(t) = pick(&v) {
                    return t;
                }
                seen.push(v);
            }
        }
        let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("no {what} within {secs} s; events: {seen:?}"),
        };
        assert!(
            n > 0,
            "the event stream closed waiting for {what}; events: {seen:?}"
        );
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// The activation state in an `activation` event.
fn activation(ev: &Value) -> Option<&Value> {
    (ev["event"] == "activation").then(|| &ev["activation"])
}

/// The TV's screen in the browser.
struct Screen {
    client: Client,
}

impl Screen {
    async fn js(&self, expr: &str) -> Value {
        browser::js(&self.client, expr).await
    }

    async fn text(&self, id: &str) -> String {
        browser::text(&self.client, id).await
    }

    /// Waits (up to 30 s) until `expr` is truthy in the page.
    async fn wait(&self, what: &str, expr: &str) {
        if browser::wait_truthy(&self.client, expr).await {
            return;
        }
        let page = self.js("document.body.innerText").await;
        self.save("FAILED-activation").await;
        panic!("timed out waiting for {what} ({expr}); page text:\n{page}");
    }

    async fn press(&self, keys: &[char]) {
        browser::press(&self.client, keys).await
    }

    async fn focused(&self) -> String {
        self.js("document.activeElement && document.activeElement.dataset.key || ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn save(&self, file: &str) -> (u32, u32) {
        let png = self.client.screenshot().await.unwrap();
        let dir = browser::screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{file}.png")), &png).unwrap();
        browser::png_size(&png)
    }

    /// Checks that everything visible lies in the 5 % title-safe area and nothing
    /// scrolls.
    async fn assert_inside_safe_area(&self) {
        let bad = browser::outside_safe_area(&self.client).await;
        assert_eq!(bad, json!([]), "items outside the safe area");
    }

    /// The same check, then a screenshot of the whole 1920×1080 screen.
    async fn shot(&self, file: &str) {
        self.assert_inside_safe_area().await;
        assert_eq!(self.save(file).await, (1920, 1080), "{file}");
    }
}

const OK: char = '\u{E007}'; // Enter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_tv_shows_its_code_shows_a_refusal_and_starts_once_approved() {
    let srv = start_server(900);
    let dir = tempfile::tempdir().unwrap();
    let mut tv = Tv::start(&srv, &dir.path().join("tv"), true, Some(&srv.ca)).await;
    let ui = tv.ui();

    // Over HTTP: the event stream carries the code; stdout has it as `enroll` prints it.
    let first = event(ui, 15, "a code", |ev| {
        activation(ev).filter(|a| a["state"] == "code").cloned()
    })
    .await;
    let code = first["user_code"].as_str().unwrap().to_string();
    assert!(is_code(&code), "{code} is not like {CODE_PATTERN}");
    assert_eq!(first["number"], 1);
    let secs = first["expires_in_s"].as_u64().unwrap();
    assert!((800..=900).contains(&secs), "{first}");
    let printed = tv
        .line(5, "the code line", |v| v.get("user_code").cloned())
        .await;
    assert_eq!(printed, json!(code));
    // Nothing to command before the activation; no new code while one is valid.
    let (_, r) = http(ui, "POST", "/api/command", r#"{"cmd":"status"}"#).await;
    assert_eq!(
        r,
        json!({"ok": false, "error": "this TV is not activated yet"})
    );
    let (status, _) = http(ui, "POST", "/api/activation", r#"{"cmd":"new_code"}"#).await;
    assert_eq!(status, 409);

    // On the screen: the activation page, full screen, with the code and its validity.
    let driver = Driver::start().await;
    let screen = Screen {
        client: driver.browser(1920, 1080).await,
    };
    screen.client.goto(&format!("http://{ui}/")).await.unwrap();
    screen
        .wait(
            "the activation screen with the code",
            &format!(
                "document.body.dataset.screen === 'activate' && document.getElementById('activate-code').innerText === '{code}'"
            ),
        )
        .await;
    let page = screen.js("document.body.innerText").await;
    let page = page.as_str().unwrap();
    assert!(page.contains("Activate this TV"), "{page}");
    assert!(page.contains("operator"), "{page}");
    assert!(
        !page.contains("Missed calls"),
        "only the activation screen: {page}"
    );
    let valid = screen.text("activate-valid").await;
    assert!(valid.starts_with("Valid for 1"), "{valid}");
    assert_eq!(screen.text("link").await, "Not activated");
    screen.shot("activate-tv").await;
    // A 720p screen fits it too.
    let small = Screen {
        client: driver.browser(1280, 720).await,
    };
    small.client.goto(&format!("http://{ui}/")).await.unwrap();
    small
        .wait(
            "the code at 720p",
            &format!("document.getElementById('activate-code').innerText === '{code}'"),
        )
        .await;
    small.assert_inside_safe_area().await;
    small.client.close().await.unwrap();

    // The operator approves, then withdraws the approval before the TV polls again (the
    // TV is paused meanwhile, so it cannot see the approval in between): refused.
    tv.signal(SIGSTOP);
    srv.approve(&code, 2002).await;
    srv.revoke(2002).await;
    tv.signal(SIGCONT);
    screen
        .wait(
            "the refusal",
            "document.getElementById('activate-code').dataset.state === 'refused' && document.getElementById('activate-status').innerText.includes('revoked')",
        )
        .await;
    assert_eq!(screen.focused().await, "activate-new-code", "OK asks again");
    screen.shot("activate-refused").await;
    // Digits and Back do nothing here; OK on "Get a new code" brings a new one.
    screen.press(&['5', '\u{E00C}']).await;
    assert_eq!(
        screen.js("document.body.dataset.screen").await,
        json!("activate")
    );
    screen.press(&[OK]).await;
    screen
        .wait(
            "a new code",
            &format!(
                "document.getElementById('activate-code').dataset.state === 'code' && document.getElementById('activate-code').innerText !== '{code}'"
            ),
        )
        .await;
    let second = screen.text("activate-code").await;
    assert!(is_code(&second), "{second}");
    // The new code is printed too, as `enroll` prints its code.
    tv.line(5, "the second code line", |v| {
        (v.get("user_code") == Some(&json!(second))).then_some(())
    })
    .await;

    // Approved for real: the TV saves its credential, registers and shows its home
    // screen, with no restart.
    srv.approve(&second, 2002).await;
    screen
        .wait(
            "the home screen, online",
            "document.body.dataset.screen === 'home' && document.getElementById('link').dataset.state === 'connected'",
        )
        .await;
    assert_eq!(screen.text("me").await, "My number 2002");
    assert!(screen
        .text("toast")
        .await
        .contains("This TV is activated. Its number is 2002."));
    srv.wait_online(2002).await;
    tv.line(5, "the enrolled line", |v| {
        (v.get("enrolled") == Some(&json!(2002))).then_some(())
    })
    .await;
    assert_eq!(tv.enrolled_file()["user_id"], 2002);
    // The normal UI's commands reach the agent now.
    let (_, r) = http(ui, "POST", "/api/command", r#"{"cmd":"status"}"#).await;
    assert_eq!(r["status"]["user"], 2002, "{r}");
    assert_eq!(r["status"]["registered"], true, "{r}");

    screen.client.close().await.unwrap();
    drop(tv);
    srv.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_is_replaced_by_a_new_one_once_per_expiry() {
    // Codes live 2 s here.
    let srv = start_server(2);
    let dir = tempfile::tempdir().unwrap();
    let tv = Tv::start(&srv, &dir.path().join("tv"), true, Some(&srv.ca)).await;
    let started = Instant::now();
    let mut codes: Vec<(String, u64)> = Vec::new();
    event(tv.ui(), 30, "three codes", |ev| {
        let a = activation(ev)?;
        if a["state"] == "code" {
            let code = a["user_code"].as_str().unwrap().to_string();
            if codes.last().map(|(c, _)| c) != Some(&code) {
                codes.push((code, a["number"].as_u64().unwrap()));
            }
        }
        (codes.len() == 3).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    for (code, _) in &codes {
        assert!(is_code(code), "{code}");
    }
    assert_ne!(codes[0].0, codes[1].0);
    assert_ne!(codes[1].0, codes[2].0);
    let numbers: Vec<u64> = codes.iter().map(|(_, n)| *n).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    // A new code only when the last one expired: three codes take two lifetimes at
    // least, and the server handed out no more codes than the TV showed (plus the one
    // being asked for right now).
    assert!(elapsed >= Duration::from_secs(4), "{elapsed:?}");
    let handed = srv.codes_handed_out().await;
    let shown = usize::try_from(numbers[2]).unwrap();
    assert!(
        handed <= shown + 1,
        "{handed} codes handed out for {shown} shown"
    );
    drop(tv);
    srv.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ui_run_enrolls_printing_its_code_and_without_a_ca_exits_4() {
    let srv = start_server(900);
    let dir = tempfile::tempdir().unwrap();

    // No CA to enroll against: exit 4 at once, saying what to give it.
    let started = std::time::Instant::now();
    let mut tv = Tv::start(&srv, &dir.path().join("no-ca"), false, None).await;
    let status = tokio::task::block_in_place(|| {
        test_support::process::wait_exit(&mut tv.child, Duration::from_secs(10))
    })
    .unwrap()
    .expect("exits");
    assert_eq!(status.code(), Some(4));
    let line = tv.line(2, "the reason", |v| Some(v.clone())).await;
    assert_eq!(line["outcome"], "not_enrolled", "{line}");
    assert!(
        line["reason"].as_str().unwrap().contains("--server-ca"),
        "{line}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));

    // The scripted modes still exit 4 when not enrolled: they never enroll by themselves.
    let (rc, out) = tokio::task::block_in_place(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_tv-agent"))
            .args(["missed", "--server", &srv.server.addr.to_string()])
            .arg("--server-ca")
            .arg(&srv.ca)
            .arg("--data-dir")
            .arg(dir.path().join("scripted"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    });
    assert_eq!(rc, Some(4), "{out}");
    assert!(out.contains("not_enrolled"), "{out}");

    // With the CA: it prints its code, is approved, prints the user and runs.
    let mut tv = Tv::start(&srv, &dir.path().join("tv"), false, Some(&srv.ca)).await;
    let (code, expires) = tv
        .line(15, "the code line", |v| {
            Some((
                v.get("user_code")?.as_str()?.to_string(),
                v.get("expires_in")?.as_u64()?,
            ))
        })
        .await;
    assert!(is_code(&code), "{code}");
    assert!(expires > 800, "{expires}");
    srv.approve(&code, 3003).await;
    tv.line(10, "the enrolled line", |v| {
        (v.get("enrolled") == Some(&json!(3003))).then_some(())
    })
    .await;
    srv.wait_online(3003).await;
    // A daemon: it stops on SIGTERM, cleanly.
    tv.signal(SIGTERM);
    let status = tokio::task::block_in_place(|| {
        test_support::process::wait_exit(&mut tv.child, Duration::from_secs(10))
    })
    .unwrap()
    .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(tv.enrolled_file()["user_id"], 3003);
    drop(tv);
    srv.server.stop().await.unwrap();
}
