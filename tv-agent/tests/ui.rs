//! The on-screen TV UI in headless Chromium (Debian's chromium, driven through
//! chromedriver), keyboard only, against a real server and real `tv-agent run` daemons
//! (enrolled TVs, over TLS; calls SRTP).
//! The tests also write screenshots of the main screens at 1920×1080 to
//! `target/ui-screenshots/` (or `$UI_SCREENSHOT_DIR`) for people to look at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::browser::{self, png_size, screenshot_dir, Driver};
use common::*;
use fantoccini::key::Key;
use fantoccini::Client;
use serde_json::{json, Value};
use tv_agent::agent::PresenceWord;
use tv_agent::media::AudioSpec;
use tv_agent::{AgentEvent, DialResult};

fn free_port() -> u16 {
    test_support::net::free_port().unwrap()
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_listening(port: u16, what: &str) {
    assert!(
        test_support::net::wait_listening_port(port, Duration::from_secs(10)).await,
        "{what} did not start listening on port {port}"
    );
}

/// A `tv-agent run` daemon with its UI; killed when dropped.
struct Tv {
    ui_port: u16,
    child: Child,
}

impl Tv {
    async fn start(srv: &Server, user: u64, data_dir: &Path, audio_in: &str) -> Tv {
        Tv::start_on(free_port(), srv, user, data_dir, audio_in).await
    }

    /// The same with the UI on `ui_port` (a TV's browser always opens the same address).
    /// The TV is `user`'s, enrolled: its identity is in `data_dir`.
    async fn start_on(
        ui_port: u16,
        srv: &Server,
        user: u64,
        data_dir: &Path,
        audio_in: &str,
    ) -> Tv {
        srv.tv_dir(user, data_dir).await;
        let child = Command::new(env!("CARGO_BIN_EXE_tv-agent"))
            .arg("run")
            .args(["--server", &srv.addr.to_string()])
            .args(["--audio-in", audio_in, "--audio-out", "null"])
            .args(["--control-listen", "127.0.0.1:0"])
            .args(["--ui-listen", &format!("127.0.0.1:{ui_port}")])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tv-agent");
        wait_listening(ui_port, "the TV UI").await;
        Tv { ui_port, child }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.ui_port)
    }
}

impl Drop for Tv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One screen of one TV: its browser and what it is called in messages and files.
struct Screen {
    name: &'static str,
    client: Client,
}

impl Screen {
    async fn open(driver: &Driver, name: &'static str, tv: &Tv) -> Screen {
        let client = driver.browser(1920, 1080).await;
        client.goto(&tv.url()).await.unwrap();
        let s = Screen { name, client };
        s.wait(
            "the first snapshot",
            "document.getElementById('me').textContent !== ''",
        )
        .await;
        let inner: Value = s.js("[innerWidth, innerHeight]").await;
        assert_eq!(inner, json!([1920, 1080]), "viewport");
        s
    }

    async fn js(&self, expr: &str) -> Value {
        browser::js(&self.client, expr).await
    }

    /// Waits (up to 30 s) until `expr` is truthy in the page.
    async fn wait(&self, what: &str, expr: &str) {
        if browser::wait_truthy(&self.client, expr).await {
            return;
        }
        let page = self.js("document.body.innerText").await;
        self.shot(&format!("FAILED-{}", self.name)).await;
        panic!(
            "{}: timed out waiting for {what} ({expr}); page text:\n{page}",
            self.name
        );
    }

    /// Presses remote keys (each a key down and up), as the keyboard stand-ins for
    /// the remote's buttons.
    async fn press(&self, keys: &[char]) {
        browser::press(&self.client, keys).await
    }

    async fn text(&self, id: &str) -> String {
        browser::text(&self.client, id).await
    }

    async fn focused(&self) -> String {
        self.js("document.activeElement && document.activeElement.dataset.key || ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Saves a screenshot and checks its size.
    async fn shot(&self, file: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{file}.png")), &png).unwrap();
        let (w, h) = png_size(&png);
        assert!(!file.starts_with("FAILED") || w > 0);
        if !file.starts_with("FAILED") {
            self.assert_inside_safe_area().await;
            let inner = self.js("[innerWidth, innerHeight]").await;
            assert_eq!(
                json!([w, h]),
                inner,
                "{file}: screenshot is the whole viewport"
            );
        }
    }

    /// Every visible interactive item and text block lies inside the 5 % title-safe
    /// area and nothing scrolls.
    async fn assert_inside_safe_area(&self) {
        let bad = browser::outside_safe_area(&self.client).await;
        assert_eq!(bad, json!([]), "{}: items outside the safe area", self.name);
    }
}

const OK: char = '\u{E007}'; // Enter
const BACK: char = '\u{E00C}'; // Escape
const DOWN: char = '\u{E015}';
const RIGHT: char = '\u{E014}';
const UP: char = '\u{E013}';
const LEFT: char = '\u{E012}';

fn red() -> char {
    Key::F1.into()
}
fn green() -> char {
    Key::F2.into()
}

/// TV 3003 ("Gran"), with 1001 in her address book.
async fn gran_config(srv: &Server) -> tv_agent::AgentConfig {
    let mut cfg = srv
        .agent_config(3003, AudioSpec::Null, AudioSpec::Null)
        .await;
    cfg.presence = Some(tv_agent::agent::PresenceSetup {
        contacts: vec![1001],
        ..Default::default()
    });
    cfg
}

/// Makes `user` known to the server (a TV that has been on once), then off again.
async fn switch_on_once(srv: &Server, user: u64) {
    let (agent, _events) = boot(
        srv.agent_config(user, AudioSpec::Null, AudioSpec::Null)
            .await,
    )
    .await;
    agent.power_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_call_call_back_answer_and_hang_up_with_the_remote() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_ringing(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
        60_000,
    )
    .await;
    switch_on_once(&srv, 2002).await;
    let driver = Driver::start().await;

    // TV A is on; B is off. A dials B on the dial pad: digits, then the green key.
    let tv_a = Tv::start(&srv, 1001, &dir.path().join("tv-a"), "tone:440").await;
    let a = Screen::open(&driver, "A", &tv_a).await;
    a.wait(
        "online",
        "document.getElementById('link').dataset.state === 'connected'",
    )
    .await;
    a.assert_inside_safe_area().await;
    a.press(&['2', '0', '0', '2']).await;
    a.wait("the dial pad with 2002", "document.body.dataset.screen === 'dial' && document.getElementById('dial-number').textContent === '2002'").await;
    a.press(&['9', BACK]).await; // a wrong digit, deleted with Back
    assert_eq!(a.text("dial-number").await, "2002");
    a.shot("dial-pad").await;
    a.press(&[green()]).await;
    a.wait(
        "the cached message",
        "!document.getElementById('toast').hidden && document.getElementById('toast').textContent.includes('will see it when they switch it on')",
    )
    .await;
    assert!(a.text("toast").await.starts_with("TV 2002 is off."));
    a.wait(
        "the offer to leave a message",
        "!document.getElementById('leave').hidden",
    )
    .await;
    a.shot("dial-offline-cached").await;
    a.press(&[BACK]).await; // No message this time.
    a.wait("the offer gone", "document.getElementById('leave').hidden")
        .await;
    a.press(&[BACK]).await; // Back with the number still there deletes a digit …
    a.press(&[BACK, BACK, BACK, BACK]).await; // … and on an empty pad goes home.
    a.wait("home", "document.body.dataset.screen === 'home'")
        .await;

    // B switches on: the badge and the list show A's call with A's state (on).
    let tv_b = Tv::start(&srv, 2002, &dir.path().join("tv-b"), "tone:1000").await;
    let b = Screen::open(&driver, "B", &tv_b).await;
    b.wait(
        "the badge",
        "document.getElementById('badge').textContent === '1'",
    )
    .await;
    b.wait(
        "A's call in the home list, A's TV on",
        "document.getElementById('home-missed').innerText.includes('TV 1001') && document.querySelector('#home-missed .state').dataset.state === 'online'",
    )
    .await;
    assert_eq!(
        b.focused().await,
        "tile-missed",
        "focus starts on Missed calls"
    );
    b.assert_inside_safe_area().await;
    b.shot("home-missed-call").await;
    b.press(&[OK]).await;
    b.wait(
        "the missed-calls screen",
        "document.body.dataset.screen === 'missed'",
    )
    .await;
    let row = b.text("missed-list").await;
    assert!(
        row.contains("TV 1001") && row.contains("TV on") && row.contains("OK: call back"),
        "{row}"
    );
    assert!(b.focused().await.starts_with("missed-"));
    b.shot("missed-calls").await;

    // OK on it calls A back; A's UI shows the incoming overlay.
    b.press(&[OK]).await;
    b.wait(
        "calling",
        "document.body.dataset.call === 'ringing_out' && document.body.dataset.screen === 'call'",
    )
    .await;
    a.wait(
        "the incoming overlay",
        "!document.getElementById('incoming').hidden",
    )
    .await;
    assert_eq!(a.text("incoming-peer").await, "TV 2002");
    assert!(
        a.js("document.getElementById('toast').hidden").await == json!(true),
        "the toast saying TV 2002 is off went when 2002 called"
    );
    assert_eq!(a.focused().await, "incoming-answer", "OK answers");
    a.shot("incoming-call").await;
    b.shot("calling").await;

    // A answers with OK: both in call.
    a.press(&[OK]).await;
    for s in [&a, &b] {
        s.wait("in call", "document.body.dataset.call === 'in_call' && document.getElementById('call-state').textContent.startsWith('In call')").await;
    }
    a.wait(
        "the call timer",
        "/^0:0[1-9]$/.test(document.getElementById('call-time').textContent)",
    )
    .await;
    // Mute from A's remote: focus is on Mute, OK toggles it.
    assert_eq!(a.focused().await, "call-mute");
    a.press(&[OK]).await;
    a.wait(
        "muted",
        "document.getElementById('call-state').textContent.includes('muted')",
    )
    .await;
    a.shot("in-call").await;
    b.shot("in-call-other-side").await;

    // B's red key hangs up on both.
    b.press(&[red()]).await;
    for s in [&a, &b] {
        s.wait(
            "idle again",
            "document.body.dataset.call === 'idle' && document.body.dataset.screen !== 'call'",
        )
        .await;
    }
    a.wait(
        "the peer hung up",
        "document.getElementById('toast').textContent.includes('TV 2002 hung up')",
    )
    .await;

    // The badge was cleared by looking at the list.
    b.press(&[BACK]).await;
    b.wait("home on B", "document.body.dataset.screen === 'home'")
        .await;
    assert_eq!(b.text("badge").await, "0");

    // B restarts: the server has delivered the call already, the TV still lists it
    // (seen, so no badge) until the viewer clears the list.
    let port_b = tv_b.ui_port;
    drop(tv_b);
    let tv_b = Tv::start_on(port_b, &srv, 2002, &dir.path().join("tv-b"), "null").await;
    b.client.goto(&tv_b.url()).await.unwrap();
    b.wait(
        "the kept missed call",
        "document.getElementById('home-missed').innerText.includes('TV 1001')",
    )
    .await;
    assert_eq!(b.text("badge").await, "0");
    b.press(&[OK]).await;
    b.wait(
        "the missed-calls screen",
        "document.body.dataset.screen === 'missed'",
    )
    .await;
    b.press(&[DOWN]).await;
    assert_eq!(b.focused().await, "clear-missed");
    b.press(&[OK]).await;
    b.wait("the question", "!document.getElementById('confirm').hidden")
        .await;
    assert!(b.text("confirm-text").await.contains("Clear the list"));
    b.press(&[OK]).await;
    b.wait(
        "an empty list",
        "document.getElementById('missed-list').innerText.includes('No missed calls')",
    )
    .await;
    assert_eq!(
        json_file(&dir.path().join("tv-b").join("missed.json")),
        json!([])
    );

    a.client.close().await.unwrap();
    b.client.close().await.unwrap();
    drop(tv_a);
    drop(tv_b);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_are_edited_with_the_remote_and_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    // Gran has 1001 in her address book, so 1001 may see her state.
    let (g, _ge) = boot(gran_config(&srv).await).await;
    g.power_off().await;
    let driver = Driver::start().await;
    let data = dir.path().join("tv-a");
    let tv = Tv::start(&srv, 1001, &data, "null").await;
    let a = Screen::open(&driver, "A", &tv).await;

    // Home → Contacts (Right three times, OK) → Add → name, Down, number, OK.
    a.press(&[RIGHT, RIGHT, RIGHT, OK]).await;
    a.wait("contacts", "document.body.dataset.screen === 'contacts'")
        .await;
    assert_eq!(a.focused().await, "add-contact");
    a.press(&[OK]).await;
    a.wait("the form", "document.activeElement.id === 'edit-name'")
        .await;
    a.press(&['G', 'r', 'a', 'n']).await;
    a.press(&[DOWN, '3', '0', '0', '3', OK]).await;
    a.wait(
        "the new contact listed",
        "document.getElementById('contacts-list').innerText.includes('Gran')",
    )
    .await;
    a.wait(
        "Gran's TV shown off",
        "document.querySelector('#contacts-list .contact .state').dataset.state === 'offline'",
    )
    .await;
    // A bad number is refused with a message, nothing saved.
    a.press(&[OK]).await; // focus is on "+ Add a contact" again
    a.wait("the form", "document.activeElement.id === 'edit-name'")
        .await;
    a.press(&['X', DOWN, '0', OK]).await;
    a.wait(
        "the error",
        "document.getElementById('edit-error').textContent.includes('digits only')",
    )
    .await;
    a.press(&[BACK]).await; // Back leaves the form without saving
    a.wait("contacts", "document.body.dataset.screen === 'contacts'")
        .await;
    assert!(!a.text("contacts-list").await.contains('X'));
    a.shot("contacts").await;

    // A switched-on contact shows as on at once (pushed: the page polls nothing).
    let (gran, mut ge) = boot(gran_config(&srv).await).await;
    a.wait(
        "Gran's TV shown on",
        "document.querySelector('#contacts-list .contact .state').dataset.state === 'online'",
    )
    .await;

    // Gran calls: the overlay names her; Back rejects and she is told.
    assert!(matches!(gran.dial(1001).await, DialResult::Ringing(_)));
    a.wait(
        "the incoming overlay",
        "!document.getElementById('incoming').hidden",
    )
    .await;
    assert_eq!(a.text("incoming-peer").await, "Gran");
    assert_eq!(a.text("incoming-number").await, "TV 3003");
    a.press(&[BACK]).await;
    a.wait("rejected", "document.getElementById('incoming').hidden && document.getElementById('toast').textContent === 'Call rejected.'").await;
    expect_event(&mut ge, 5, "Gran told of the rejection", |e| {
        matches!(e, AgentEvent::Ended { outcome, .. } if outcome == "rejected").then_some(())
    })
    .await;
    // Again: the green key answers, the red key hangs up.
    assert!(matches!(gran.dial(1001).await, DialResult::Ringing(_)));
    a.wait(
        "the incoming overlay",
        "!document.getElementById('incoming').hidden",
    )
    .await;
    a.press(&[green()]).await;
    a.wait("in call with Gran", "document.body.dataset.call === 'in_call' && document.getElementById('call-peer').textContent === 'Gran'").await;
    expect_event(&mut ge, 5, "answered", |e| {
        matches!(e, AgentEvent::Answered { peer: 1001, .. }).then_some(())
    })
    .await;
    a.press(&[red()]).await;
    expect_event(&mut ge, 5, "A hung up", |e| {
        matches!(e, AgentEvent::Ended { outcome, .. } if outcome == "hung_up_by_peer").then_some(())
    })
    .await;
    a.wait(
        "back on contacts",
        "document.body.dataset.call === 'idle' && document.body.dataset.screen === 'contacts'",
    )
    .await;

    // Gran is in a call with another TV: calling her says she is busy.
    let (other, _oe) = boot(
        srv.agent_config(4004, AudioSpec::Null, AudioSpec::Null)
            .await,
    )
    .await;
    assert!(matches!(other.dial(3003).await, DialResult::Ringing(_)));
    expect_event(&mut ge, 5, "the other call", |e| {
        matches!(e, AgentEvent::Incoming { caller: 4004, .. }).then_some(())
    })
    .await;
    gran.answer().await.unwrap();
    a.wait(
        "Gran shown busy",
        "document.querySelector('#contacts-list .contact .state').dataset.state === 'busy'",
    )
    .await;
    a.press(&[DOWN]).await;
    assert_eq!(a.focused().await, "contact-3003");
    a.press(&[green()]).await;
    a.wait("the busy message", "document.getElementById('toast').textContent === 'Gran is in another call. Try again later.'").await;
    // She can be left a message instead; not this time.
    a.wait(
        "the offer to leave a message",
        "!document.getElementById('leave').hidden",
    )
    .await;
    a.press(&[BACK]).await;
    other.hang_up().await.unwrap();
    // A TV that rings out unanswered (the test server rings for 3 s): "did not answer".
    a.press(&['4', '0', '0', '4', green()]).await;
    a.wait(
        "calling 4004",
        "document.body.dataset.call === 'ringing_out'",
    )
    .await;
    a.wait("no answer", "document.getElementById('toast').textContent === 'TV 4004 did not answer.' && document.body.dataset.call === 'idle'").await;
    a.wait(
        "the offer to leave a message",
        "!document.getElementById('leave').hidden && document.getElementById('leave-text').textContent.includes('TV 4004')",
    )
    .await;
    a.press(&[BACK]).await;
    other.power_off().await;

    // The TV restarts: the book is still there, on the home screen too.
    a.client.close().await.unwrap();
    drop(tv);
    let tv = Tv::start(&srv, 1001, &data, "null").await;
    let a = Screen::open(&driver, "A again", &tv).await;
    a.wait(
        "the kept contact",
        "document.getElementById('home-contacts').innerText.includes('Gran')",
    )
    .await;
    // Do not disturb, from the remote (Up from the tiles): Gran, who watches this TV,
    // sees it busy, then online again.
    a.press(&[UP]).await;
    if a.focused().await == "btn-hide" {
        a.press(&[LEFT]).await;
    }
    assert_eq!(a.focused().await, "btn-dnd");
    for (on, word) in [(true, PresenceWord::Busy), (false, PresenceWord::Online)] {
        a.press(&[OK]).await;
        a.wait(
            "the switch turned",
            &format!("document.getElementById('btn-dnd').getAttribute('aria-pressed') === '{on}'"),
        )
        .await;
        expect_event(&mut ge, 5, "Gran told", |e| {
            matches!(e, AgentEvent::Presence { user: 1001, state, .. } if *state == word)
                .then_some(())
        })
        .await;
    }
    a.shot("do-not-disturb").await;
    a.press(&[DOWN]).await;
    // The contact is one key press from a call: Down to it, green calls.
    a.press(&[DOWN]).await;
    a.wait(
        "focus on a list row",
        "document.activeElement.dataset.key === 'contact-3003'",
    )
    .await;
    a.press(&[green()]).await;
    a.wait("calling Gran", "document.body.dataset.call === 'ringing_out' && document.getElementById('call-peer').textContent === 'Gran'").await;
    a.press(&[red()]).await;
    a.wait("idle", "document.body.dataset.call === 'idle'")
        .await;

    // Rename it: Contacts → Down to its row → Right to Edit → OK; the form is filled in.
    a.press(&[RIGHT, RIGHT, RIGHT, OK]).await;
    a.wait("contacts", "document.body.dataset.screen === 'contacts'")
        .await;
    a.press(&[DOWN, RIGHT]).await;
    assert_eq!(a.focused().await, "edit-3003");
    a.press(&[OK]).await;
    a.wait(
        "the filled-in form",
        "document.activeElement.id === 'edit-name' && document.activeElement.value === 'Gran'",
    )
    .await;
    assert_eq!(
        a.js("document.getElementById('edit-number').value").await,
        json!("3003")
    );
    a.press(&[Key::End.into(), 'n', 'y', OK]).await;
    a.wait(
        "the new name",
        "document.body.dataset.screen === 'contacts' && document.getElementById('contacts-list').innerText.includes('Granny')",
    )
    .await;
    assert_eq!(
        json_file(&data.join("contacts.json")),
        json!([{"user_id": 3003, "name": "Granny"}])
    );

    // Delete it: Right to Delete on its row → OK → confirm.
    a.press(&[DOWN, RIGHT, RIGHT]).await;
    assert_eq!(a.focused().await, "delete-3003");
    a.press(&[OK]).await;
    a.wait(
        "the confirmation",
        "!document.getElementById('confirm').hidden",
    )
    .await;
    a.press(&[OK]).await;
    a.wait(
        "deleted",
        "!document.getElementById('contacts-list').innerText.includes('Gran')",
    )
    .await;
    assert_eq!(json_file(&data.join("contacts.json")), json!([]));

    gran.power_off().await;
    a.client.close().await.unwrap();
    drop(tv);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_server_shows_reconnecting_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let srv = Server::start(SocketAddr::from(([127, 0, 0, 1], 0)), &db).await;
    let addr = srv.addr;
    let driver = Driver::start().await;
    let tv = Tv::start(&srv, 1001, &dir.path().join("tv"), "null").await;
    let a = Screen::open(&driver, "A", &tv).await;
    a.wait(
        "online",
        "document.getElementById('link').dataset.state === 'connected'",
    )
    .await;
    assert!(a.js("document.getElementById('banner').hidden").await == json!(true));

    srv.stop().await;
    a.wait("the reconnecting banner", "!document.getElementById('banner').hidden && document.getElementById('banner').textContent.includes('Reconnecting')").await;
    assert_eq!(a.text("link").await, "Reconnecting…");
    a.shot("network-down-reconnecting").await;
    // Dialling meanwhile says why it cannot.
    a.press(&['7', green()]).await;
    a.wait(
        "the unreachable message",
        "document.getElementById('toast').textContent.includes('Cannot reach the call service')",
    )
    .await;

    let srv = Server::start(addr, &db).await;
    a.wait("online again", "document.getElementById('link').dataset.state === 'connected' && document.getElementById('banner').hidden").await;
    a.wait("the recovered message", "document.getElementById('toast').textContent.includes('Connected to the call service again')").await;

    // The same layout at 1280×720 still fits the safe area.
    let small = driver.browser(1280, 720).await;
    small.goto(&tv.url()).await.unwrap();
    let s = Screen {
        name: "A at 720p",
        client: small,
    };
    s.wait(
        "the first snapshot",
        "document.getElementById('me').textContent !== ''",
    )
    .await;
    s.assert_inside_safe_area().await;
    let png = s.client.screenshot().await.unwrap();
    assert_eq!(png_size(&png), (1280, 720));
    std::fs::create_dir_all(screenshot_dir()).unwrap();
    std::fs::write(screenshot_dir().join("home-1280x720.png"), &png).unwrap();
    // The other screens fit too: the dial pad, missed calls, contacts and the form.
    s.press(&['5']).await;
    s.wait("the dial pad", "document.body.dataset.screen === 'dial'")
        .await;
    s.assert_inside_safe_area().await;
    s.press(&[BACK, BACK, OK]).await;
    s.wait("missed calls", "document.body.dataset.screen === 'missed'")
        .await;
    s.assert_inside_safe_area().await;
    s.press(&[BACK, RIGHT, RIGHT, RIGHT, OK]).await;
    s.wait("contacts", "document.body.dataset.screen === 'contacts'")
        .await;
    s.assert_inside_safe_area().await;
    s.press(&[OK]).await;
    s.wait("the form", "document.body.dataset.screen === 'edit'")
        .await;
    s.assert_inside_safe_area().await;

    s.client.close().await.unwrap();
    a.client.close().await.unwrap();
    drop(tv);
    srv.stop().await;
}

/// A voice message and a picture left for a switched-off TV (with `tv-agent send`, the
/// voice message recorded from a 440 Hz tone) are on its messages screen at power-on:
/// the home tile counts them unread; OK on the picture shows it full-screen at its size,
/// OK on the voice message plays it to its end; a message deleted with the remote is
/// gone from the TV and from the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_left_for_a_switched_off_tv_are_shown_played_and_deleted_with_the_remote() {
    use call_proxy_server::storage::Store;
    const SENDER: u64 = 1001;
    const VIEWER: u64 = 2002;
    let driver = Driver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db"),
    )
    .await;
    switch_on_once(&srv, VIEWER).await;
    let sender_dir = dir.path().join("sender");
    srv.tv_dir(SENDER, &sender_dir).await;
    let picture = dir.path().join("garden.png");
    let made = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=640x480",
            "-frames:v",
            "1",
        ])
        .arg(&picture)
        .status()
        .expect("ffmpeg is installed (scripts/setup.sh installs it)");
    assert!(made.success());
    let addr = srv.addr.to_string();
    let data = sender_dir.to_str().unwrap();
    let mut ids = Vec::new();
    for body in [
        vec!["--voice", "tone:440", "--seconds", "3"],
        vec![
            "--picture",
            picture.to_str().unwrap(),
            "--caption",
            "The garden",
        ],
    ] {
        let mut args = vec![
            "send",
            "--server",
            &addr,
            "--data-dir",
            data,
            "--to",
            "2002",
        ];
        args.extend(body);
        let (code, lines, stderr) = run_agent(&args);
        assert_eq!(code, 0, "{lines:?} {stderr}");
        assert_eq!(lines[0]["outcome"], "stored");
        ids.push(lines[0]["message_id"].as_u64().unwrap());
    }
    let (voice_id, picture_id) = (ids[0], ids[1]);

    // Power-on: both messages, unread.
    let tv = Tv::start(&srv, VIEWER, &dir.path().join("viewer"), "tone:440").await;
    let s = Screen::open(&driver, "viewer", &tv).await;
    s.wait(
        "two unread messages on the home tile",
        "document.getElementById('msg-badge').textContent === '2'",
    )
    .await;
    s.shot("home-messages").await;
    assert_eq!(s.focused().await, "tile-missed");
    s.press(&[RIGHT, OK]).await;
    s.wait(
        "the messages screen",
        "document.body.dataset.screen === 'messages'",
    )
    .await;
    assert_eq!(
        s.focused().await,
        format!("message-{picture_id}"),
        "newest first"
    );
    let rows = s.text("messages-list").await;
    assert!(
        rows.contains("Picture") && rows.contains("Voice message"),
        "{rows}"
    );
    s.shot("messages").await;

    // The picture, full-screen, at its own size.
    s.press(&[OK]).await;
    s.wait(
        "the picture shown",
        "(() => { const i = document.getElementById('viewer-img'); return !i.hidden && i.complete && i.naturalWidth === 640 && i.naturalHeight === 480; })()",
    )
    .await;
    assert!(s.text("viewer-text").await.contains("The garden"));
    s.shot("message-picture").await;
    s.press(&[BACK]).await;
    s.wait(
        "the viewer closed",
        "document.getElementById('viewer').hidden",
    )
    .await;

    // The voice message plays to its end (3 s).
    s.press(&[DOWN]).await;
    assert_eq!(s.focused().await, format!("message-{voice_id}"));
    s.press(&[OK]).await;
    s.wait(
        "the voice message playing",
        "(() => { const a = document.getElementById('viewer-audio'); return !a.paused && a.currentTime > 0.2; })()",
    )
    .await;
    s.shot("message-voice").await;
    s.wait(
        "the voice message played to its end",
        "(() => { const a = document.getElementById('viewer-audio'); return a.ended && Math.abs(a.duration - 3) < 0.1; })()",
    )
    .await;
    s.press(&[BACK]).await;
    s.wait(
        "both read",
        "document.querySelectorAll('#messages-list .unread').length === 0",
    )
    .await;

    // Deleted with the remote: Delete in the viewer, then yes.
    assert_eq!(
        srv.shared().store.mailbox(VIEWER).await.unwrap().messages,
        2
    );
    s.press(&[OK]).await;
    s.wait(
        "the viewer open",
        "!document.getElementById('viewer').hidden",
    )
    .await;
    s.press(&[RIGHT, RIGHT]).await;
    assert_eq!(s.focused().await, "viewer-delete");
    s.press(&[OK]).await;
    s.wait("the question", "!document.getElementById('confirm').hidden")
        .await;
    s.press(&[OK]).await;
    s.wait(
        "one message left",
        "document.querySelectorAll('#messages-list .message').length === 1",
    )
    .await;
    let left = srv.shared().store.mailbox(VIEWER).await.unwrap();
    assert_eq!(left.messages, 1, "deleted on the server too: {left:?}");
    let kept: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("viewer/messages/messages.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(kept.as_array().unwrap().len(), 1);
    assert_eq!(kept[0]["message_id"], picture_id, "the voice message went");
    s.client.clone().close().await.unwrap();
    drop(tv);
    srv.stop().await;
}

/// After a call to a switched-off TV is cached, the caller is offered to leave a message:
/// OK on "Voice message" records one from the TV's audio source and leaves it; "Text
/// message" opens a form whose text is left. Both wait on the server for the TV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaves_a_voice_and_a_text_message_for_a_switched_off_tv() {
    use call_proxy_server::storage::Store;
    let driver = Driver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db"),
    )
    .await;
    switch_on_once(&srv, 2002).await;
    let tv_a = Tv::start(&srv, 1001, &dir.path().join("tv-a"), "tone:440").await;
    let a = Screen::open(&driver, "A", &tv_a).await;
    a.wait(
        "online",
        "document.getElementById('link').dataset.state === 'connected'",
    )
    .await;
    let offered = "!document.getElementById('leave').hidden";
    a.press(&['2', '0', '0', '2', green()]).await;
    a.wait("the offer to leave a message", offered).await;
    assert!(a.text("leave-text").await.contains("TV 2002"));
    assert_eq!(a.focused().await, "leave-voice");
    a.press(&[OK]).await;
    a.wait(
        "the voice message left",
        "document.getElementById('toast').textContent.startsWith('Message left for TV 2002')",
    )
    .await;
    let mailbox = srv.shared().store.mailbox(2002).await.unwrap();
    assert_eq!((mailbox.waiting, mailbox.messages), (1, 1), "{mailbox:?}");
    assert!(mailbox.bytes > 10_000, "a 10 s voice message: {mailbox:?}");

    a.press(&[green()]).await; // still on the dial pad with 2002
    a.wait("the offer again", offered).await;
    a.press(&[RIGHT, OK]).await;
    a.wait(
        "the message form",
        "document.body.dataset.screen === 'compose'",
    )
    .await;
    assert_eq!(a.focused().await, "compose-text");
    a.press(&"Back at six".chars().collect::<Vec<_>>()).await;
    a.shot("leave-a-text").await;
    a.press(&[OK]).await;
    a.wait(
        "the text left",
        "document.getElementById('toast').textContent.startsWith('Message left for TV 2002')",
    )
    .await;
    assert_eq!(srv.shared().store.mailbox(2002).await.unwrap().messages, 2);
    let rows = srv
        .shared()
        .store
        .messages(call_proxy_server::storage::message::MessageQuery::Waiting {
            recipient: 2002,
            before: 0,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(rows[0].text, "Back at six");
    a.client.clone().close().await.unwrap();
    drop(tv_a);
    srv.stop().await;
}
