//! `call-proxy-querybench`: times the operator's call-log queries on a large SQLite call
//! log (default 10 million rows, generated once into the given file), synchronously on
//! one read-only connection of the SQLite backend (so the figures are the queries').
//! Usage: call-proxy-querybench [--db PATH] [--calls N] [--users N] [--samples N]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use call_proxy_server::storage::operator::{CallQuery, OutcomeFilter};
use call_proxy_server::storage::sqlite::operator::{fill_synthetic, OperatorDb};
use clap::Parser;

/// Builds the i-th query of one kind.
type QueryMaker<'a> = Box<dyn Fn(u64) -> CallQuery + 'a>;

#[derive(Parser)]
#[command(about = "Times filtered call-log pages on a large synthetic call log")]
struct Args {
    /// Database file; generated if it does not exist.
    #[arg(long, default_value = "target/querybench.sqlite")]
    db: PathBuf,
    /// Call records to generate.
    #[arg(long, default_value_t = 10_000_000)]
    calls: u64,
    /// Users to spread them over.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Queries per kind.
    #[arg(long, default_value_t = 200)]
    samples: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if !a.db.exists() {
        let t = Instant::now();
        eprintln!(
            "generating {} calls between {} users into {} ...",
            a.calls,
            a.users,
            a.db.display()
        );
        fill_synthetic(&a.db, a.users, a.calls).context("cannot generate the call log")?;
        eprintln!("generated in {:.1} s", t.elapsed().as_secs_f64());
    }
    let db = OperatorDb::open(&a.db)?;
    let day_ms = 86_400_000i64;
    let first_ms = 1_700_000_000_000i64;
    let span_ms = (a.calls as i64) * 3_000;
    let kinds: [(&str, QueryMaker); 4] = [
        (
            "one user (either side), 30 days, newest 50",
            Box::new(|i| {
                let since = first_ms + ((i as i64 * 7_777_777_777) % span_ms.max(1));
                CallQuery {
                    party: Some(1_000_000 + (i * 7919) % a.users),
                    since_ms: Some(since),
                    until_ms: Some(since + 30 * day_ms),
                    limit: 50,
                    ..CallQuery::default()
                }
            }),
        ),
        (
            "one user (either side), all time, newest 50",
            Box::new(|i| CallQuery {
                party: Some(1_000_000 + (i * 7919) % a.users),
                limit: 50,
                ..CallQuery::default()
            }),
        ),
        (
            "one caller, one week, newest 50",
            Box::new(|i| {
                let since = first_ms + ((i as i64 * 7_777_777_777) % span_ms.max(1));
                CallQuery {
                    caller: Some(1_000_000 + (i * 104_729) % a.users),
                    since_ms: Some(since),
                    until_ms: Some(since + 7 * day_ms),
                    limit: 50,
                    ..CallQuery::default()
                }
            }),
        ),
        (
            "undelivered for one callee, newest 50",
            Box::new(|i| CallQuery {
                callee: Some(1_000_000 + (i * 31) % a.users),
                outcome: Some(OutcomeFilter::Undelivered),
                limit: 50,
                ..CallQuery::default()
            }),
        ),
    ];
    for (name, make) in &kinds {
        let mut times = Vec::with_capacity(a.samples as usize);
        let mut rows = 0usize;
        for i in 0..a.samples {
            let q = make(i);
            let t = Instant::now();
            rows += db.calls(&q)?.len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() as f64 - 1.0) * p) as usize];
        println!(
            "{name}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} queries, {:.1} rows each)",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            times.len(),
            rows as f64 / times.len() as f64
        );
    }
    Ok(())
}
