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
