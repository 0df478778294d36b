//! A TV killed while fetching its cached calls loses none: `tv-agent missed` is SIGKILLed
//! at random points of a 500-call fetch, 20 times, and after every kill each call the
//! server counts as delivered must have been printed by one of the runs so far (shown
//! before acknowledged). A last run shows whatever is left. Each TV is enrolled and
//! fetches over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use call_proxy_server::storage::operator::{CallQuery, OutcomeFilter};
use call_proxy_server::storage::sqlite::operator::OperatorDb;
use call_proxy_server::storage::{NewCall, Outcome, Registration, Store};
use call_proxy_server::{SqliteOptions, SqliteStore};
use common::Server;
use rand::{Rng, SeedableRng};

const CALLS: u64 = 500;
const KILLS: usize = 20;
/// The first of the TVs killed while they fetch, one per kill.
const FIRST_TV: u64 = 7100;
/// The TV whose unkilled fetch of the same size tells how long a whole run takes.
const CALIBRATION_TV: u64 = 7003;
const CALLER: u64 = 7002;

/// Records `CALLS` cached calls from `CALLER` to each of `callees` (all offline).
async fn fill(db: &Path, callees: &[u64]) {
    let store = SqliteStore::open(db, SqliteOptions::default()).unwrap();
    for (i, &user_id) in callees.iter().chain([CALLER].iter()).enumerate() {
        store
            .register(Registration {
                user_id,
                ip: [127, 0, 0, 1].into(),
                media_port: 5004,
                session_id: i as u64 + 1,
                agent_version: "test".into(),
                at_ms: 1,
                create_unknown: true,
            })
            .await
            .unwrap();
        store.set_offline(user_id, i as u64 + 1, 2).await.unwrap();
    }
    let mut id = 0;
    for &callee in callees {
        let writes: Vec<_> = (0..CALLS)
            .map(|_| {
                id += 1;
                store.insert_call(NewCall {
                    id,
                    caller: CALLER,
                    callee,
                    at_ms: 1_000 + id as i64,
                    outcome: Outcome::Cached,
                    caller_ip: [127, 0, 0, 1].into(),
                })
            })
            .collect();
        for w in futures::future::join_all(writes).await {
            w.unwrap();
        }
    }
    store.close().await;
}

/// Calls to `callee` the server still holds undelivered.
fn undelivered(db: &Path, callee: u64) -> BTreeSet<u64> {
    let q = CallQuery {
        callee: Some(callee),
        outcome: Some(OutcomeFilter::Undelivered),
        limit: 10_000,
        ..CallQuery::default()
    };
    OperatorDb::open(db)
        .unwrap()
        .calls(&q)
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// When a run is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Not: it runs to its end.
    Never,
    /// This long after it started (connecting, registering, fetching, printing).
    After(Duration),
    /// Once it has printed this many bytes, and then this much later (printing, and the
    /// acknowledgement that follows).
    AtOutput(u64, Duration),
}

/// Runs `tv-agent missed` for the TV whose (enrolled) data directory is `data`,
/// SIGKILLed as `kill` says; returns the call ids it printed completely and how many
/// bytes it printed.
fn run_missed(server: SocketAddr, data: &Path, kill: Kill) -> (Vec<u64>, u64) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tv-agent"))
        .args(["missed", "--server", &server.to_string()])
        .arg("--data-dir")
        .arg(data)
        .stdout(out.reopen().unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = start + Duration::from_secs(20);
    let mut kill_at = match kill {
        Kill::After(after) => Some(start + after),
        Kill::Never | Kill::AtOutput(..) => None,
    };
    loop {
        if let (Kill::AtOutput(bytes, then), None) = (kill, kill_at) {
            if std::fs::metadata(out.path()).unwrap().len() >= bytes {
                kill_at = Some(Instant::now() + then);
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            let _ = child.kill();
            break;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.wait().unwrap();
    let text = std::fs::read_to_string(out.path()).unwrap();
    // A line cut off by the kill does not parse: it was not shown.
    let ids = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["call_id"].as_u64())
        .collect();
    (ids, text.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_fetch_the_tv_loses_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    // One TV per kill, each with its own 500 calls, and one to time an unkilled run.
    let tvs: Vec<u64> = (0..KILLS as u64).map(|i| FIRST_TV + i).collect();
    fill(&db, &[&[CALIBRATION_TV], &tvs[..]].concat()).await;
    let srv = Server::start(SocketAddr::from(([127, 0, 0, 1], 0)), &db).await;
    let addr = srv.addr;
    // Each TV enrolled, with its own data directory (TLS to the server).
    let data = |tv: u64| dir.path().join(format!("tv-{tv}"));
    for &tv in tvs.iter().chain([CALIBRATION_TV].iter()) {
        srv.tv_dir(tv, &data(tv)).await;
    }

    // How long a whole run takes here and how much it prints: the kills are spread over
    // both.
    let start = Instant::now();
    let calibration = data(CALIBRATION_TV);
    let (shown, printed) =
        tokio::task::spawn_blocking(move || run_missed(addr, &calibration, Kill::Never))
            .await
            .unwrap();
    let whole = start.elapsed();
    assert_eq!(
        shown.len() as u64,
        CALLS,
        "an unkilled run shows every call"
    );
    assert!(undelivered(&db, CALIBRATION_TV).is_empty());

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut before_print, mut mid_print, mut before_ack, mut acked) = (0, 0, 0, 0);
    for (kill, &tv) in tvs.iter().enumerate() {
        let all = undelivered(&db, tv);
        assert_eq!(all.len() as u64, CALLS);
        // Half of the kills anywhere in the run, half once printing has begun.
        let how = if kill % 2 == 0 {
            Kill::After(whole.mul_f64(rng.random_range(0.05..1.0)))
        } else {
            Kill::AtOutput(
                (printed as f64 * rng.random_range(0.0..1.0)) as u64 + 1,
                Duration::from_micros(rng.random_range(0..3_000)),
            )
        };
        let tv_data = data(tv);
        let (ids, _) = tokio::task::spawn_blocking(move || run_missed(addr, &tv_data, how))
            .await
            .unwrap();
        let mut shown: BTreeSet<u64> = ids.into_iter().collect();
        let still = undelivered(&db, tv);
        match (shown.len() as u64, still.len() as u64) {
            (0, _) => before_print += 1,
            (_, CALLS) if (shown.len() as u64) < CALLS => mid_print += 1,
            (_, CALLS) => before_ack += 1,
            _ => acked += 1,
        }
        let lost: Vec<u64> = all
            .difference(&still)
            .filter(|id| !shown.contains(id))
            .copied()
            .collect();
        assert!(
            lost.is_empty(),
            "kill {kill} ({how:?}): {} calls acknowledged but never shown, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        // Whatever is left comes with the next power-on.
        let tv_data = data(tv);
        let (ids, _) = tokio::task::spawn_blocking(move || run_missed(addr, &tv_data, Kill::Never))
            .await
            .unwrap();
        shown.extend(ids);
        assert!(
            undelivered(&db, tv).is_empty(),
            "kill {kill}: all delivered in the end"
        );
        assert_eq!(shown, all, "kill {kill}: every call shown at least once");
    }
    eprintln!(
        "{KILLS} kills of {CALLS}-call fetches (a whole run: {whole:?}, {printed} bytes): \
         {before_print} before anything was printed, {mid_print} mid-print, \
         {before_ack} after printing and before the acknowledgement, {acked} after it"
    );
    srv.stop().await;
}
