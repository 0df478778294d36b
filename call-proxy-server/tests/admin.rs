//! The admin HTTP listener on a real server (real TCP, real SQLite file) with real
//! traffic from enrolled TVs over TLS: each call-log filter, cursor pages that stay
//! stable while calls arrive, CSV that parses, the bearer token, metrics that follow
//! the traffic, clear 400s, and the operator CLI's `--admin` mode as a process
//! (in-process server and the real binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use call_proxy_server::storage::DbTarget;
use common::{dial, power_on_and_ack, six_calls, TestDb, TestServer, ADMIN_TOKEN};
use serde_json::Value;
use shared_proto::*;

/// An HTTP answer.
struct Resp {
    /// HTTP status.
    status: u16,
    /// Response headers.
    headers: ureq::http::HeaderMap,
    /// The body as text.
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `GET base+path` with these request headers (blocking client, on a blocking thread).
async fn get_with(url: String, headers: Vec<(&'static str, String)>) -> Resp {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let mut req = agent.get(&url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let mut resp = req.call().unwrap();
        Resp {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.body_mut().read_to_string().unwrap(),
        }
    })
    .await
    .unwrap()
}

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

/// `GET` with the right token.
async fn get(base: &str, path: &str) -> Resp {
    get_with(format!("{base}{path}"), vec![bearer(ADMIN_TOKEN)]).await
}

/// `GET` with the right token, expecting 200 and JSON.
async fn json(base: &str, path: &str) -> Value {
    let r = get(base, path).await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

/// The `calls` of `GET /api/calls?{query}`.
async fn calls(base: &str, query: &str) -> Vec<Value> {
    json(base, &format!("/api/calls?{query}")).await["calls"]
        .as_array()
        .unwrap()
        .clone()
}

fn ids(rows: &[Value]) -> Vec<u64> {
    rows.iter().map(|r| r["id"].as_u64().unwrap()).collect()
}

/// Runs the CLI as a process (on a blocking thread, so the in-process server keeps
/// serving): `(exit code, stdout, stderr)`. `token_env` sets `CALL_PROXY_ADMIN_TOKEN`.
async fn cli(args: Vec<String>, token_env: Option<&str>) -> (i32, String, String) {
    let token_env = token_env.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
        cmd.args(&args)
            .env_remove("CALL_PROXY_ADMIN_TOKEN")
            .envs(common::db::cli_env());
        if let Some(t) = token_env {
            cmd.env("CALL_PROXY_ADMIN_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The same operator command through the database file and through the admin API
/// gives the same output, byte for byte.
async fn same_output_both_ways(db: &str, base: &str, command: &[&str]) -> String {
    let mut by_db = strings(command);
    by_db.extend(strings(&["--db", db]));
    let mut by_api = strings(command);
    by_api.extend(strings(&["--admin", base, "--token", ADMIN_TOKEN]));
    let (code, from_db, err) = cli(by_db, None).await;
    assert_eq!(code, 0, "{err}");
    let (code, from_api, err) = cli(by_api, None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(from_api, from_db, "{command:?}");
    from_api
}

/// A Prometheus scrape as `series → value`, checking the text format on the way:
/// every sample line is `name{labels} value` and every family has a `# TYPE`.
async fn scrape(base: &str) -> HashMap<String, f64> {
    let r = get(base, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let mut typed = HashSet::new();
    let mut out = HashMap::new();
    for line in r.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no # TYPE for {line}");
        out.insert(series.to_string(), value.parse::<f64>().unwrap());
    }
    out
}

/// Scrapes until `cond` holds (5 s at most) and returns that scrape.
async fn scrape_until(
    base: &str,
    what: &str,
    cond: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(base).await;
        if cond(&m) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rfc3339_with_offset(ms: i64, hours: i8) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(hours, 0, 0).unwrap())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_filters_pages_csv_users_stats_and_bad_parameters() {
    let mut srv = TestServer::start_with(|c| c.ring_timeout_ms = 300).await;
    let base = srv.start_admin(None).await;
    let db = srv.db.db_arg();
    let log = six_calls(&srv).await; // keeps TVs 10 and 20 online

    // Every filter, through HTTP.
    let page = json(&base, "/api/calls?limit=1000").await;
    assert!(page["next_before"].is_null(), "one page holds all: {page}");
    let all = page["calls"].as_array().unwrap().clone();
    let all_ids = ids(&all);
    assert_eq!(all_ids.len(), 6);
    assert!(all_ids.windows(2).all(|w| w[0] > w[1]), "{all_ids:?}");
    assert_eq!(calls(&base, "caller=10").await.len(), 5);
    assert_eq!(calls(&base, "callee=10").await.len(), 1);
    assert_eq!(calls(&base, "user=20").await.len(), 4);
    assert_eq!(calls(&base, "user=30").await.len(), 2);
    assert!(calls(&base, "user=30")
        .await
        .iter()
        .all(|c| c["otheruser_id"] == 30 && c["user_id"] == 10));
    let answered = calls(&base, "outcome=answered").await;
    assert_eq!(answered.len(), 2);
    assert!(answered
        .iter()
        .all(|c| c["outcome"] == "answered" && c["ended_at"].is_string()));
    assert_eq!(calls(&base, "outcome=rejected").await.len(), 1);
    assert_eq!(calls(&base, "outcome=missed").await.len(), 1);
    assert_eq!(calls(&base, "outcome=busy").await.len(), 0);
    assert_eq!(calls(&base, "outcome=cached").await.len(), 2);
    assert_eq!(calls(&base, "outcome=cached-undelivered").await.len(), 3);
    assert_eq!(calls(&base, "outcome=delivered").await.len(), 0);
    assert_eq!(calls(&base, "caller=10&outcome=cached").await.len(), 2);
    let mid = call_proxy_server::clock::to_db_text(log.t_mid);
    assert_eq!(calls(&base, &format!("until={mid}")).await.len(), 2);
    assert_eq!(calls(&base, &format!("since={mid}")).await.len(), 4);
    let mid_plus2 = rfc3339_with_offset(log.t_mid, 2).replace('+', "%2B");
    assert_eq!(calls(&base, &format!("since={mid_plus2}")).await.len(), 4);
    let two = json(&base, "/api/calls?limit=2").await;
    assert_eq!(ids(two["calls"].as_array().unwrap()), all_ids[..2].to_vec());
    assert_eq!(two["next_before"], all_ids[1]);
    let older = calls(&base, &format!("before={}", all_ids[1])).await;
    assert_eq!(ids(&older), all_ids[2..].to_vec());

    // The CLI's --admin mode prints exactly what its --db mode prints.
    for format in ["json", "csv", "table"] {
        same_output_both_ways(&db, &base, &["calls", "--format", format]).await;
        same_output_both_ways(&db, &base, &["users", "--format", format]).await;
    }
    let filtered = same_output_both_ways(
        &db,
        &base,
        &[
            "calls",
            "--format",
            "json",
            "--user",
            "20",
            "--since",
            &mid,
            "--outcome",
            "answered",
            "--limit",
            "1",
        ],
    )
    .await;
    let filtered: Vec<Value> = serde_json::from_str(&filtered).unwrap();
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0]["outcome"], "answered");

    // 30 powers on and fetches its calls: they become delivered.
    let (mut c, acked) = power_on_and_ack(&srv, 30, 7000).await;
    assert_eq!(acked, 2);
    assert_eq!(calls(&base, "outcome=delivered").await.len(), 2);
    assert_eq!(calls(&base, "outcome=undelivered").await.len(), 1);

    // Users, one user, statistics.
    let online = json(&base, "/api/users?online=true").await["users"]
        .as_array()
        .unwrap()
        .clone();
    let online_ids: Vec<u64> = online
        .iter()
        .map(|u| u["user_id"].as_u64().unwrap())
        .collect();
    assert_eq!(online_ids, vec![10, 20, 30]);
    assert!(online
        .iter()
        .all(|u| u["user_netstate"] == 1 && u["user_ip"] == "127.0.0.1"));
    drop(log.b); // TV 20 powers off
    let off = common::eventually(Duration::from_secs(5), || {
        srv.property(20).is_some_and(|p| p.1 == 0)
    })
    .await;
    assert!(off, "20 recorded offline");
    let online = json(&base, "/api/users?online=true&limit=10").await;
    assert_eq!(online["users"].as_array().unwrap().len(), 2);
    assert_eq!(
        json(&base, "/api/users").await["users"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let u20 = json(&base, "/api/users/20").await;
    assert_eq!(u20["user_id"], 20);
    assert_eq!(u20["user_netstate"], 0);
    assert_eq!(u20["media_port"], 6000);
    assert_eq!(u20["user_ip"], "127.0.0.1");
    assert!(u20["last_seen"].is_string());
    let recent = ids(u20["recent_calls"].as_array().unwrap());
    assert_eq!(recent.len(), 4);
    assert!(recent.windows(2).all(|w| w[0] > w[1]));
    let missing = get(&base, "/api/users/999").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].as_str().unwrap().contains("999"));
    let stats = json(&base, "/api/stats").await;
    assert_eq!(stats["users"], 3);
    assert_eq!(stats["online"], 2);
    assert_eq!(stats["calls_last_hour"], 6);
    assert_eq!(stats["calls_last_day"], 6);
    assert_eq!(stats["cached_waiting"], 1);
    assert!(stats["delivery_delay_p50_s"].is_number());
    let stats_cli = same_output_both_ways(&db, &base, &["stats", "--format", "json"]).await;
    assert!(stats_cli.contains("\"cached_waiting\": 1"), "{stats_cli}");

    // Pages walked by cursor while new calls arrive: no page repeats or skips a call.
    let before_walk = ids(&calls(&base, "limit=1000").await);
    let mut walked = Vec::new();
    let mut cursor: Option<u64> = None;
    let mut arrived = 0;
    loop {
        let query = match cursor {
            Some(b) => format!("/api/calls?limit=2&before={b}"),
            None => "/api/calls?limit=2".to_string(),
        };
        let page = json(&base, &query).await;
        walked.extend(ids(page["calls"].as_array().unwrap()));
        // A newer call lands between every two pages.
        if let DialOutcome::Ringing { call_id, .. } = dial(&mut c, 10).await {
            c.request(Request::HangUp { call_id }).await.unwrap();
        }
        arrived += 1;
        match page["next_before"].as_u64() {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        walked, before_walk,
        "pages concatenate to the log as it was"
    );
    let now = ids(&calls(&base, "limit=1000").await);
    assert_eq!(now.len(), before_walk.len() + arrived, "calls did arrive");

    // CSV: by parameter and by Accept header; it parses and matches the JSON.
    let r = get(&base, "/api/calls?format=csv&user=20").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    let mut reader = csv::Reader::from_reader(r.body.as_bytes());
    let headers = reader.headers().unwrap().clone();
    assert_eq!(&headers[0], "id");
    assert!(headers.iter().any(|h| h == "otheruser_id"));
    let csv_ids: Vec<u64> = reader
        .records()
        .map(|rec| rec.unwrap()[0].parse().unwrap())
        .collect();
    assert_eq!(csv_ids, ids(&calls(&base, "user=20").await));
    let r = get_with(
        format!("{base}/api/calls?limit=3"),
        vec![bearer(ADMIN_TOKEN), ("Accept", "text/csv".into())],
    )
    .await;
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    assert_eq!(
        csv::Reader::from_reader(r.body.as_bytes())
            .records()
            .count(),
        3
    );
    assert_eq!(r.header("x-next-before"), Some(now[2].to_string().as_str()));

    // Bad parameters: 400 with a JSON body naming the parameter and the value.
    for (query, parameter, value, says) in [
        ("since=last%20tuesday", "since", "last tuesday", "RFC 3339"),
        (
            "until=2026-13-01T00:00:00Z",
            "until",
            "2026-13-01T00:00:00Z",
            "RFC 3339",
        ),
        ("outcome=lost", "outcome", "lost", "unknown outcome"),
        ("limit=0", "limit", "0", "1 to 10000"),
        ("limit=10001", "limit", "10001", "1 to 10000"),
        ("caller=ten", "caller", "ten", "user number"),
        ("before=-1", "before", "-1", "call id"),
        ("format=xml", "format", "xml", "json or csv"),
    ] {
        let r = get(&base, &format!("/api/calls?{query}")).await;
        assert_eq!(r.status, 400, "{query}");
        let body = r.json();
        assert_eq!(body["parameter"], parameter, "{body}");
        assert_eq!(body["value"], value, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says) && error.contains(parameter), "{error}");
    }
    let r = get(&base, "/api/calls?colour=red").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("colour"));
    let r = get(&base, "/api/users?online=maybe").await;
    assert_eq!(
        (r.status, r.json()["parameter"].clone()),
        (400, "online".into())
    );
    let r = get(&base, "/api/users/abc").await;
    assert_eq!(
        (r.status, r.json()["parameter"].clone()),
        (400, "id".into())
    );

    // The CLI reports the server's 400 clearly, with exit code 2.
    let (code, _, err) = cli(
        strings(&["users", "--admin", &base, "--limit", "20000"]),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("400") && err.contains("limit"), "{err}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_all_but_health_and_readiness_and_admin_stops_with_server() {
    let mut srv = TestServer::start().await;
    let base = srv.start_admin(None).await;
    for open in ["/healthz", "/readyz"] {
        let r = get_with(format!("{base}{open}"), vec![]).await;
        assert_eq!(r.status, 200, "{open}: {}", r.body);
    }
    let wrong_tokens = [
        vec![],
        vec![bearer("wrong")],
        vec![bearer(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])],
        vec![bearer(&format!("{ADMIN_TOKEN}x"))],
        vec![("Authorization", format!("Basic {ADMIN_TOKEN}"))],
    ];
    for path in [
        "/metrics",
        "/api/calls",
        "/api/users",
        "/api/users/1",
        "/api/stats",
    ] {
        for headers in &wrong_tokens {
            let r = get_with(format!("{base}{path}"), headers.clone()).await;
            assert_eq!(r.status, 401, "{path} {headers:?}");
            assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
            assert!(r.json()["error"].as_str().unwrap().contains("token"));
        }
        let r = get(&base, path).await;
        assert!(r.status == 200 || (path == "/api/users/1" && r.status == 404));
    }
    let r = get_with(
        format!("{base}/api/stats"),
        vec![("Authorization", format!("bearer {ADMIN_TOKEN}"))],
    )
    .await;
    assert_eq!(r.status, 200, "the scheme is case-insensitive");

    // The CLI: a wrong token is an error (exit 1) that says why.
    let (code, _, err) = cli(
        strings(&["stats", "--admin", &base, "--token", "wrong"]),
        None,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("401") && err.contains("invalid bearer token"),
        "{err}"
    );
    let (code, out, err) = cli(strings(&["stats", "--admin", &base]), Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 0, "token from the environment: {err}");
    assert!(out.contains("cached_waiting"), "{out}");
    let (code, _, err) = cli(strings(&["stats", "--admin", &base]), None).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CALL_PROXY_ADMIN_TOKEN"), "{err}");
    let (code, _, err) = cli(
        strings(&["calls", "--admin", &base, "--db", "x.sqlite"]),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(code, 2, "--db and --admin together: {err}");

    // Readiness fails (503) when the database cannot be reached; liveness does not.
    let broken = srv
        .start_admin(Some(DbTarget::sqlite(std::path::Path::new(
            "/nonexistent/dir/db.sqlite",
        ))))
        .await;
    let r = get_with(format!("{broken}/readyz"), vec![]).await;
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].as_str().unwrap().contains("no database"));
    assert_eq!(
        get_with(format!("{broken}/healthz"), vec![]).await.status,
        200
    );
    let m = scrape(&broken).await;
    assert_eq!(m["call_proxy_db_up"], 0.0);
    assert!(!m.contains_key("call_proxy_cached_calls_waiting"));

    // The admin listeners stop with the server.
    let addrs: Vec<SocketAddr> = [&base, &broken]
        .iter()
        .map(|b| b.trim_start_matches("http://").parse().unwrap())
        .collect();
    srv.stop().await;
    for addr in addrs {
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic() {
    let mut srv = TestServer::start_with(|c| c.ring_timeout_ms = 300).await;
    let base = srv.start_admin(None).await;
    let m0 = scrape(&base).await;
    assert_eq!(m0["call_proxy_registrations_total"], 0.0);
    assert_eq!(m0["call_proxy_db_up"], 1.0);
    let commits0 = m0["call_proxy_db_commit_seconds_count"];

    let _log = six_calls(&srv).await; // 3 registrations, TVs 10 and 20 stay online
                                      // TV 30 registered and powered off again; its connection closes in the background.
    let m1 = scrape_until(&base, "two connections open", |m| {
        m["call_proxy_connections"] == 2.0
    })
    .await;
    assert_eq!(m1["call_proxy_registrations_total"], 3.0);
    for (outcome, n) in [
        ("answered", 2.0),
        ("missed", 1.0),
        ("rejected", 1.0),
        ("busy", 0.0),
        ("cached", 2.0),
    ] {
        let series = format!("call_proxy_calls_total{{outcome=\"{outcome}\"}}");
        assert_eq!(m1[&series], n, "{series}");
    }
    assert_eq!(m1["call_proxy_tvs_online"], 2.0);
    assert_eq!(m1["call_proxy_connections_accepted_total"], 3.0);
    assert_eq!(m1["call_proxy_cached_calls_waiting"], 3.0);
    // Every registration and call wrote through a group commit that was timed.
    let commits1 = m1["call_proxy_db_commit_seconds_count"];
    assert!(commits1 >= commits0 + 4.0, "{commits0} -> {commits1}");
    assert!(m1["call_proxy_db_commit_seconds_sum"] > 0.0);
    assert_eq!(
        m1["call_proxy_db_commit_seconds_bucket{le=\"+Inf\"}"],
        commits1
    );
    let buckets: Vec<f64> = call_proxy_server::metrics::LATENCY_BOUNDS_US
        .iter()
        .map(|us| {
            m1[&format!(
                "call_proxy_db_commit_seconds_bucket{{le=\"{}\"}}",
                *us as f64 / 1e6
            )]
        })
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");

    // A bad frame and a request flood show up too.
    let mut junk = srv.stranger().await.unwrap();
    junk.send_raw(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0xff])
        .await
        .unwrap();
    let mut flood = srv.tv(40, 4040).await;
    for _ in 0..300 {
        if let Err(e) = flood.request(Request::Heartbeat).await {
            if matches!(e, call_proxy_server::client::ClientError::Closed(_)) {
                break;
            }
        }
    }
    let m2 = scrape_until(&base, "bad frame and flood counted", |m| {
        m["call_proxy_bad_input_total"] >= 1.0 && m["call_proxy_rate_limited_total"] >= 1.0
    })
    .await;
    assert_eq!(m2["call_proxy_registrations_total"], 4.0);
    srv.stop().await;
}

/// Two ports free now (both held while asked, so they differ).
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// `serve` as a process: refuses an admin listener without a token; with one, serves
/// the CLI's `--admin` mode, and closes the admin port on SIGTERM with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_process_with_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new(dir.path(), "proc"));
    let db_s = db.db_arg();
    let (port, admin_port) = two_free_ports();
    let serve = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_call-proxy-server"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(db.serve_args())
            .envs(db.cli_env())
            .env("RUST_LOG", "warn")
            .env_remove("CALL_PROXY_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.env("CALL_PROXY_ADMIN_TOKEN", t);
        }
        cmd
    };
    let out = serve(None).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a token"), "{err}");
    if let Some(path) = db.sqlite_path() {
        assert!(!path.exists(), "refused before opening the database");
    } else {
        assert!(
            db.try_rows("SELECT count(*) FROM tvcall_schema").is_err(),
            "refused before opening the database"
        );
    }

    let mut child = serve(Some(ADMIN_TOKEN)).spawn().unwrap();
    let base = format!("http://127.0.0.1:{admin_port}");
    let mut ready = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
            .await
            .is_ok()
            && get_with(format!("{base}/readyz"), vec![]).await.status == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !ready {
        let _ = child.kill();
        panic!("admin listener did not become ready");
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // TVs enrolled in the database of the running process, over TLS to the CA it made.
    let tvs = common::Tvs::new(&db);
    tvs.tv(addr, 2, 4000).await.bye().await.unwrap();
    let mut tv = tvs.tv(addr, 1, 5000).await;
    assert!(matches!(dial(&mut tv, 2).await, DialOutcome::Cached { .. }));

    let out = same_output_both_ways(&db_s, &base, &["calls", "--format", "csv"]).await;
    let mut reader = csv::Reader::from_reader(out.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][1], "1");
    assert_eq!(&rows[0][2], "2");
    assert_eq!(&rows[0][4], "cached");
    same_output_both_ways(&db_s, &base, &["users", "--online", "--format", "table"]).await;
    let m = scrape(&base).await;
    assert_eq!(m["call_proxy_registrations_total"], 2.0);
    assert_eq!(m["call_proxy_calls_total{outcome=\"cached\"}"], 1.0);

    // SAFETY: sending a signal to our own child process.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
        .await
        .is_err());
}
