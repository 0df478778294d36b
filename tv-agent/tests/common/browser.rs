//! chromedriver and the headless Chromium sessions it drives, for the tests that look at
//! the TV's screen in a real browser (`ui.rs`, `activation.rs`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

/// chromedriver and the browsers it drives.
pub struct Driver {
    port: u16,
    child: Child,
}

impl Driver {
    pub async fn start() -> Driver {
        let port = test_support::net::free_port().expect("a free port");
        // Its own process group, so the browsers it starts go with it (see Drop).
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver not found: install chromium and chromium-driver (bash scripts/setup.sh)");
        assert!(
            test_support::net::wait_listening_port(port, Duration::from_secs(10)).await,
            "chromedriver did not start"
        );
        Driver { port, child }
    }

    /// A new headless Chromium at `width`×`height` CSS pixels.
    pub async fn browser(&self, width: u32, height: u32) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-extensions", "--no-first-run",
                    "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=en-US",
                    // Voice messages and clips play when opened with the remote.
                    "--autoplay-policy=no-user-gesture-required",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a headless Chromium session");
        // The window size includes the browser's own frame: grow the window until the
        // page itself (the TV screen) is exactly width × height.
        let inner = |c: Client| async move {
            let v = c
                .execute("return [innerWidth, innerHeight];", vec![])
                .await
                .unwrap();
            (v[0].as_i64().unwrap(), v[1].as_i64().unwrap())
        };
        let (w, h) = (i64::from(width), i64::from(height));
        let (iw, ih) = inner(client.clone()).await;
        client
            .set_window_size((2 * w - iw) as u32, (2 * h - ih) as u32)
            .await
            .unwrap();
        assert_eq!(
            inner(client.clone()).await,
            (w, h),
            "the page is {width}×{height}"
        );
        client
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver and every Chromium process it started, even when a failed test
        // never closed its session.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// Runs `expr` in the page and returns its value.
pub async fn js(client: &Client, expr: &str) -> Value {
    client
        .execute(&format!("return ({expr});"), vec![])
        .await
        .unwrap_or_else(|e| panic!("script `{expr}` failed: {e}"))
}

/// Waits up to 30 s until `expr` is truthy in the page; `false` if it never was.
pub async fn wait_truthy(client: &Client, expr: &str) -> bool {
    for _ in 0..300 {
        let v = js(client, expr).await;
        if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The text of the element with id `id` (empty if there is none).
pub async fn text(client: &Client, id: &str) -> String {
    js(
        client,
        &format!("document.getElementById('{id}').innerText"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// Presses remote-control keys, one after another.
pub async fn press(client: &Client, keys: &[char]) {
    let mut actions = KeyActions::new("remote".into());
    for &k in keys {
        actions = actions
            .then(KeyAction::Down { value: k })
            .then(KeyAction::Up { value: k });
    }
    client.perform_actions(actions).await.unwrap();
}

/// What lies outside the 5 % title-safe area of the TV screen (every visible item in
/// `#safe`), and whether the page scrolls: empty when the screen is right.
pub async fn outside_safe_area(client: &Client) -> Value {
    js(
        client,
        "(() => { const W = innerWidth, H = innerHeight, out = [];
           for (const el of document.querySelectorAll('#safe *')) {
             if (!el.offsetParent || el.closest('[hidden]')) continue;
             const r = el.getBoundingClientRect();
             if (r.width === 0 || r.height === 0) continue;
             if (r.left < W * 0.05 - 1 || r.top < H * 0.05 - 1 || r.right > W * 0.95 + 1 || r.bottom > H * 0.95 + 1)
               out.push((el.id || el.className) + ' ' + JSON.stringify([r.left, r.top, r.right, r.bottom]));
           }
           if (document.documentElement.scrollHeight > H || document.documentElement.scrollWidth > W) out.push('page scrolls');
           return out; })()",
    )
    .await
}

/// Where screenshots go: `$UI_SCREENSHOT_DIR`, or `target/ui-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("UI_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("ui-screenshots")
        })
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[1..4], b"PNG", "a PNG screenshot");
    let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
    (be(16), be(20))
}
