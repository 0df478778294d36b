//! The operator CLI on a real server's database, with real traffic: each filter,
//! pagination stability while new calls arrive, CSV that parses, clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{dial, power_on_and_ack, six_calls, TestServer};
use serde_json::Value;
use shared_proto::*;

use common::operator_cli as cli;

fn calls_json(db: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["calls", "--db", db, "--format", "json"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--limit") {
        args.extend_from_slice(&["--limit", "1000"]);
    }
    let (code, out, err) = cli(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn ids(rows: &[Value]) -> Vec<u64> {
    rows.iter().map(|r| r["id"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_log_filters_pages_formats_and_errors() {
    let srv = TestServer::start_with(|c| c.ring_timeout_ms = 300).await;
    let db = srv.db.db_arg();
    let log = six_calls(&srv).await; // keeps TVs 10 and 20 online
    let t_mid = log.t_mid;

    let all = calls_json(&db, &[]);
    assert_eq!(all.len(), 6);
    let all_ids = ids(&all);
    assert!(
        all_ids.windows(2).all(|w| w[0] > w[1]),
        "newest first: {all_ids:?}"
    );
    assert_eq!(calls_json(&db, &["--caller", "10"]).len(), 5);
    assert_eq!(calls_json(&db, &["--callee", "10"]).len(), 1);
    assert_eq!(calls_json(&db, &["--user", "20"]).len(), 4);
    assert_eq!(calls_json(&db, &["--user", "30"]).len(), 2);
    let answered = calls_json(&db, &["--outcome", "answered"]);
    assert_eq!(answered.len(), 2);
    assert!(answered
        .iter()
        .all(|r| r["outcome"] == "answered" && r["ended_at"].is_string()));
    assert_eq!(calls_json(&db, &["--outcome", "rejected"]).len(), 1);
    assert_eq!(calls_json(&db, &["--outcome", "missed"]).len(), 1);
    assert_eq!(calls_json(&db, &["--outcome", "cached"]).len(), 2);
    // Undelivered: the two cached calls to 30 and the missed one to 20.
    assert_eq!(
        calls_json(&db, &["--outcome", "cached-undelivered"]).len(),
        3
    );
    assert_eq!(calls_json(&db, &["--outcome", "delivered"]).len(), 0);
    let mid = call_proxy_server::clock::to_db_text(t_mid);
    assert_eq!(
        calls_json(&db, &["--until", &mid]).len(),
        2,
        "before the midpoint: the cached calls"
    );
    assert_eq!(calls_json(&db, &["--since", &mid]).len(), 4);
    // Either party within a time range (the range narrows both index lookups).
    assert_eq!(calls_json(&db, &["--user", "30", "--until", &mid]).len(), 2);
    assert_eq!(calls_json(&db, &["--user", "30", "--since", &mid]).len(), 0);
    assert_eq!(calls_json(&db, &["--user", "20", "--since", &mid]).len(), 4);
    assert_eq!(calls_json(&db, &["--user", "20", "--until", &mid]).len(), 0);
    let long_ago = "2000-01-01T00:00:00Z";
    assert_eq!(
        calls_json(
            &db,
            &[
                "--since",
                long_ago,
                "--until",
                &mid,
                "--user",
                "30",
                "--outcome",
                "cached"
            ]
        )
        .len(),
        2
    );
    // Offsets are understood: the same instant written in +02:00.
    let mid_plus2 = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t_mid) * 1_000_000)
        .unwrap()
        .to_offset(time::macros::offset!(+2))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(calls_json(&db, &["--since", &mid_plus2]).len(), 4);
    // 30 powers on and fetches: its calls become delivered.
    let (mut c, acked) = power_on_and_ack(&srv, 30, 7000).await;
    assert_eq!(acked, 2);
    assert_eq!(calls_json(&db, &["--outcome", "delivered"]).len(), 2);

    // Pages stay stable while new calls arrive.
    let page1 = calls_json(&db, &["--limit", "3"]);
    assert_eq!(ids(&page1), all_ids[..3].to_vec());
    for _ in 0..3 {
        let DialOutcome::Ringing { call_id, .. } = dial(&mut c, 10).await else {
            panic!()
        };
        c.request(Request::HangUp { call_id }).await.unwrap();
    }
    assert_eq!(calls_json(&db, &[]).len(), 9, "three newer calls arrived");
    let last = page1.last().unwrap()["id"].as_u64().unwrap().to_string();
    let page2 = calls_json(&db, &["--limit", "3", "--before", &last]);
    assert_eq!(ids(&page2), all_ids[3..6].to_vec());

    // CSV parses, with a header and the same rows.
    let (code, out, _) = cli(&["calls", "--db", &db, "--format", "csv", "--user", "20"]);
    assert_eq!(code, 0);
    let mut r = csv::Reader::from_reader(out.as_bytes());
    let headers = r.headers().unwrap().clone();
    assert_eq!(&headers[0], "id");
    assert!(headers.iter().any(|h| h == "otheruser_id"));
    assert_eq!(r.records().count(), 4);

    // Users and statistics.
    let (code, out, _) = cli(&["users", "--db", &db, "--online", "--format", "json"]);
    assert_eq!(code, 0);
    let online: Vec<Value> = serde_json::from_str(&out).unwrap();
    let mut online_ids: Vec<u64> = online
        .iter()
        .map(|u| u["user_id"].as_u64().unwrap())
        .collect();
    online_ids.sort();
    assert_eq!(online_ids, vec![10, 20, 30]);
    assert!(online
        .iter()
        .all(|u| u["user_netstate"] == 1 && u["user_ip"] == "127.0.0.1"));
    let (code, out, _) = cli(&["stats", "--db", &db, "--format", "json"]);
    assert_eq!(code, 0);
    let stats: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(stats[0]["online"], 3);
    assert_eq!(stats[0]["users"], 3);
    assert!(stats[0]["calls_last_hour"].as_u64().unwrap() >= 6);
    assert!(stats[0]["delivery_delay_p50_s"].is_number());

    // Bad filters: a clear message and exit code 2; a missing database: exit 1.
    let (code, _, err) = cli(&["calls", "--db", &db, "--since", "last tuesday"]);
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = cli(&["calls", "--db", &db, "--outcome", "lost"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown outcome"), "{err}");
    let (code, _, err) = cli(&["calls", "--db", "/nonexistent/db.sqlite"]);
    assert_eq!(code, 1);
    assert!(err.contains("no database"), "{err}");
    srv.stop().await;
}

/// Presence's operator side (issue 16) on a real server's database: phone numbers set,
/// shown and cleared from the CLI and the admin API, bad numbers refused with the rule;
/// alarms the server raised listed (open ones by default), cleared once, in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_numbers_and_alarms_from_the_cli_and_the_admin_api() {
    use call_proxy_server::storage::{NewAlarm, Store};
    use common::{admin_http as http, ADMIN_TOKEN};
    let mut srv = TestServer::start().await;
    let db = srv.db.db_arg();
    let admin = srv.start_admin(None).await;
    let tok = Some(ADMIN_TOKEN);
    let _tv = srv.tv(51, 4000).await;
    srv.known_offline(52).await;

    // The CLI sets a number; `users` shows it; a bad one is a usage error naming E.164.
    let (code, out, err) = cli(&[
        "phone",
        "--db",
        &db,
        "--user",
        "51",
        "--number",
        "+4930123456",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("+4930123456"), "{out}");
    let user = |id: u64| {
        let (code, out, err) = cli(&["users", "--db", &db, "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        let rows: Value = serde_json::from_str(&out).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["user_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no user {id} in {rows}"))
    };
    assert_eq!(user(51)["phone"], "+4930123456");
    assert_eq!(user(52)["phone"], Value::Null);
    for bad in ["4930123456", "+49 30 123456", "+4930", "+4930123456789012"] {
        let (code, _, err) = cli(&["phone", "--db", &db, "--user", "51", "--number", bad]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("E.164"), "{bad}: {err}");
    }
    assert_eq!(
        user(51)["phone"],
        "+4930123456",
        "a refused number changes nothing"
    );
    let (code, _, err) = cli(&["phone", "--db", &db, "--user", "51"]);
    assert_eq!(code, 2, "neither --number nor --clear: {err}");
    let (code, _, err) = cli(&[
        "phone",
        "--db",
        &db,
        "--user",
        "999",
        "--number",
        "+4930123456",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no user 999"), "{err}");
    let (code, _, err) = cli(&["phone", "--db", &db, "--user", "51", "--clear"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(user(51)["phone"], Value::Null);

    // The admin API: PUT sets and clears, shown by GET /api/users/{id}; 400 names the
    // rule, 404 an unknown user, 401 without the token.
    let phone = |id: u64| format!("{admin}/api/users/{id}/phone");
    let (status, body) = http(
        "PUT",
        phone(52),
        tok,
        Some(r#"{"phone":"+12025550123"}"#.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http("GET", format!("{admin}/api/users/52"), tok, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["phone"],
        "+12025550123"
    );
    assert_eq!(user(52)["phone"], "+12025550123");
    let (status, body) = http(
        "PUT",
        phone(52),
        tok,
        Some(r#"{"phone":"12025550123"}"#.into()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("E.164"), "{body}");
    let (status, body) = http(
        "PUT",
        phone(999),
        tok,
        Some(r#"{"phone":"+12025550123"}"#.into()),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = http("PUT", phone(52), None, Some(r#"{"phone":null}"#.into())).await;
    assert_eq!(status, 401);
    assert_eq!(
        user(52)["phone"],
        "+12025550123",
        "refused without the token"
    );
    let (status, body) = http("PUT", phone(52), tok, Some(r#"{"phone":null}"#.into())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(user(52)["phone"], Value::Null);

    // Alarms the server raised: listed newest first, open ones unless --all / all=true.
    let now = call_proxy_server::clock::now_ms();
    for (user_id, count) in [(51, 5), (52, 7)] {
        srv.shared
            .store
            .raise_alarm(NewAlarm {
                user_id,
                at_ms: now,
                reason: "presence notifications kept failing: signed out".into(),
                count,
            })
            .await
            .unwrap();
    }
    let alarms = |extra: &[&str]| {
        let mut args = vec!["alarms", "--db", &db, "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let open = alarms(&[]);
    assert_eq!(open.len(), 2, "{open:?}");
    assert_eq!(
        (open[0]["user_id"].as_u64(), open[0]["count"].as_u64()),
        (Some(52), Some(7))
    );
    assert_eq!(open[1]["user_id"], 51);
    assert_eq!(open[0]["cleared_at"], Value::Null);
    let (first, second) = (
        open[1]["id"].as_u64().unwrap(),
        open[0]["id"].as_u64().unwrap(),
    );
    let (code, table, err) = cli(&["alarms", "--db", &db]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("reason") && table.contains("signed out"),
        "{table}"
    );

    let (code, out, err) = cli(&["clear-alarm", "--db", &db, "--id", &first.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&first.to_string()), "{out}");
    let (code, _, err) = cli(&["clear-alarm", "--db", &db, "--id", &first.to_string()]);
    assert_eq!(code, 1, "cleared already: {err}");
    assert!(err.contains("no open alarm"), "{err}");
    let open = alarms(&[]);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["id"].as_u64(), Some(second));
    let all = alarms(&["--all"]);
    assert_eq!(all.len(), 2);
    assert!(all[1]["cleared_at"].is_string(), "{all:?}");

    // The same over HTTP.
    let list = |query: &'static str| {
        let url = format!("{admin}/api/alarms{query}");
        async move {
            let (status, body) = http("GET", url, tok, None).await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()["alarms"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    let open = list("").await;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["id"].as_u64(), Some(second));
    assert_eq!(
        open[0]["reason"],
        "presence notifications kept failing: signed out"
    );
    assert_eq!(list("?all=true").await.len(), 2);
    // The gauge counts the open ones in the database (one cleared by the CLI above).
    let open_gauge = || async {
        let (status, text) = http("GET", format!("{admin}/metrics"), tok, None).await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("call_proxy_alarms_open "))
            .map(|v| v.trim().to_string())
    };
    assert_eq!(open_gauge().await.as_deref(), Some("1"));
    let (status, body) = http("GET", format!("{admin}/api/alarms?all=maybe"), tok, None).await;
    assert_eq!(status, 400, "{body}");
    let clear = |id: u64| format!("{admin}/api/alarms/{id}/clear");
    let (status, _) = http("POST", clear(second), None, None).await;
    assert_eq!(status, 401);
    let (status, body) = http("POST", clear(second), tok, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http("POST", clear(second), tok, None).await;
    assert_eq!(status, 404, "cleared already: {body}");
    let (status, body) = http("POST", clear(second + 100), tok, None).await;
    assert_eq!(status, 404, "unknown: {body}");
    assert!(list("").await.is_empty());
    assert!(alarms(&[]).is_empty());
    assert_eq!(open_gauge().await.as_deref(), Some("0"));
    srv.stop().await;
}

/// The message log for operators, from the CLI (on the database) and the admin API:
/// who left what kind of message for whom, its size and delivery state, filtered and
/// paged; the mailbox's totals in `/api/users/{id}`, `/api/stats` and `/metrics` — and
/// never a message's text, caption or body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_log_shows_kinds_sizes_and_delivery_never_contents() {
    use common::messages::{fixture, message, open_transfer, put, stored};
    use common::{admin_http as http, ADMIN_TOKEN};
    const SECRET: &str = "the key is under the mat";
    const CAPTION: &str = "secret caption";
    let mut srv = TestServer::start().await;
    let db = srv.db.db_arg();
    let admin = srv.start_admin(None).await;
    let tok = Some(ADMIN_TOKEN);
    srv.known_offline(61).await;
    srv.known_offline(62).await;
    let mut a = srv.connect(61).await;
    open_transfer(&mut a, 61).await;
    let text = stored(
        a.request(message(62, 1, MessageKind::TEXT, SECRET, None))
            .await
            .unwrap(),
    );
    let voice = fixture("voice.opus");
    let req = message(62, 2, MessageKind::VOICE, CAPTION, Some(&voice));
    a.request(req.clone()).await.unwrap();
    put(&mut a, 2, &voice, 0, voice.len()).await;
    let voice_id = stored(a.request(req).await.unwrap());
    let picture = fixture("picture.png");
    let req = message(62, 3, MessageKind::PICTURE, "", Some(&picture));
    a.request(req.clone()).await.unwrap();
    put(&mut a, 3, &picture, 0, picture.len()).await;
    let picture_id = stored(a.request(req).await.unwrap());
    let total = (SECRET.len() + voice.len() + CAPTION.len() + picture.len()) as u64;
    // The TV takes the text.
    let mut b = srv.connect(62).await;
    open_transfer(&mut b, 62).await;
    assert_eq!(
        b.request(Request::AckMessages {
            message_ids: vec![text]
        })
        .await
        .unwrap(),
        Reply::Acked { count: 1 }
    );

    let json = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["messages", "--db", &db, "--format", "json"];
        args.extend_from_slice(extra);
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{err}");
        assert!(!out.contains(SECRET) && !out.contains(CAPTION), "{out}");
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let all = json(&[]);
    assert_eq!(ids(&all), vec![picture_id, voice_id, text]);
    let by_id = |id: u64| all.iter().find(|r| r["id"] == id).unwrap().clone();
    let v = by_id(voice_id);
    assert_eq!(v["kind"], "voice");
    assert_eq!(v["user_id"], 61);
    assert_eq!(v["otheruser_id"], 62);
    assert_eq!(v["size"], (voice.len() + CAPTION.len()) as u64);
    assert_eq!(v["mime"], "audio/ogg");
    let ms = v["duration_ms"].as_u64().unwrap();
    assert!((3_900..=4_100).contains(&ms), "{ms}");
    assert_eq!(v["delivered"], false);
    let p = by_id(picture_id);
    assert_eq!(
        (p["kind"].as_str(), p["width"].as_u64()),
        (Some("picture"), Some(320))
    );
    let t = by_id(text);
    assert_eq!(
        (t["kind"].as_str(), t["size"].as_u64()),
        (Some("text"), Some(SECRET.len() as u64))
    );
    assert_eq!(t["delivered"], true);
    assert!(t["delivered_at"].is_string());
    // Filters and pages.
    assert_eq!(ids(&json(&["--kind", "voice"])), vec![voice_id]);
    assert_eq!(ids(&json(&["--state", "delivered"])), vec![text]);
    assert_eq!(
        ids(&json(&["--state", "waiting"])),
        vec![picture_id, voice_id]
    );
    assert_eq!(json(&["--sender", "61"]).len(), 3);
    assert_eq!(json(&["--recipient", "61"]).len(), 0);
    assert_eq!(json(&["--user", "62"]).len(), 3);
    assert_eq!(ids(&json(&["--limit", "2"])), vec![picture_id, voice_id]);
    assert_eq!(ids(&json(&["--before", &voice_id.to_string()])), vec![text]);
    let (code, _, err) = cli(&["messages", "--db", &db, "--kind", "fax"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("text, voice, picture or video"), "{err}");
    let (code, out, err) = cli(&["messages", "--db", &db, "--format", "csv"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(SECRET) && !out.contains(CAPTION), "{out}");
    let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(out.as_bytes())
        .records()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3);

    // The admin API: the same log, the same filters, the mailbox's totals.
    let (status, body) = http(
        "GET",
        format!("{admin}/api/messages?state=waiting&kind=picture"),
        tok,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ids(page["messages"].as_array().unwrap()), vec![picture_id]);
    let (status, body) = http("GET", format!("{admin}/api/messages?limit=1"), tok, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(SECRET) && !body.contains(CAPTION), "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["next_before"],
        picture_id
    );
    let (status, body) = http("GET", format!("{admin}/api/messages?state=gone"), tok, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("waiting or delivered"), "{body}");
    let (status, _) = http("GET", format!("{admin}/api/messages"), None, None).await;
    assert_eq!(status, 401);
    let (status, body) = http("GET", format!("{admin}/api/users/62"), tok, None).await;
    assert_eq!(status, 200, "{body}");
    let mailbox = &serde_json::from_str::<Value>(&body).unwrap()["mailbox"];
    assert_eq!(
        (mailbox["messages"].as_u64(), mailbox["waiting"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(mailbox["bytes"], total);
    let (status, body) = http("GET", format!("{admin}/api/stats"), tok, None).await;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            stats["messages_kept"].as_u64(),
            stats["messages_waiting"].as_u64(),
            stats["message_bytes"].as_u64()
        ),
        (Some(3), Some(2), Some(total))
    );
    let (code, out, err) = cli(&["stats", "--db", &db, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()[0]["messages_waiting"],
        2
    );
    let (status, body) = http("GET", format!("{admin}/metrics"), tok, None).await;
    assert_eq!(status, 200, "{body}");
    for line in [
        "call_proxy_mailbox_messages 3".to_string(),
        "call_proxy_mailbox_waiting 2".to_string(),
        format!("call_proxy_mailbox_bytes {total}"),
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
    }
}
