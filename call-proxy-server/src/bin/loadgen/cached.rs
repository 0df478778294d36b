//! Phase 5: durably cached calls per second, to offline users.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use shared_proto::{DialOutcome, Reply, Request, UserId};

use std::net::SocketAddr;

use anyhow::ensure;
use test_support::procfs::CpuMeter;

use crate::args::Args;
use crate::bounded;
use crate::stats::{micros, Quantiles, Stats};
use crate::tvs::{keep_alive, on_chunks, register_many, request, share, Sources, Tv};

/// What the cached-call phase measured.
pub(crate) struct Cached {
    /// Concurrent callers.
    pub(crate) callers: usize,
    /// Wall time of the phase.
    pub(crate) took: Duration,
    /// Dial → `Cached` reply.
    pub(crate) latency: Quantiles,
    /// CPU split during the phase.
    pub(crate) cpu: String,
    /// Errors.
    pub(crate) stats: Stats,
}

/// Registers `--offline-targets` users and powers them off, then dials them `--cached`
/// times from the registered TVs.
pub(crate) async fn run(
    args: &Args,
    server: SocketAddr,
    sources: Sources,
    tvs: &mut Vec<Tv>,
    last_alive: &mut Instant,
    pid: Option<u32>,
    req_t: Duration,
) -> Result<Cached> {
    let target_base = 2_000_000_000 + u64::from(rand::random::<u32>() % 1_000_000) * 10_000;
    let targets: Vec<UserId> = (0..args.offline_targets as u64)
        .map(|i| target_base + i)
        .collect();
    let (_, st) = bounded(
        args,
        "offline targets",
        register_many(
            server,
            None,
            sources,
            targets.clone(),
            args.concurrency,
            false,
            req_t,
            false,
        ),
    )
    .await?;
    ensure!(
        st.errors == 0,
        "{} offline targets failed to register",
        st.errors
    );
    keep_alive(args, tvs, last_alive, req_t).await?;
    let callers = args.cached_concurrency.min(tvs.len());
    let targets = Arc::new(targets);
    let t0 = Instant::now();
    let cpu = CpuMeter::start(pid);
    let (back, stats) = bounded(
        args,
        "cached",
        on_chunks(std::mem::take(tvs), callers, |k, chunk| {
            let count = share(args.cached, callers, k);
            let offset = (0..k).map(|j| share(args.cached, callers, j)).sum();
            cached_task(chunk, count, 0, Arc::clone(&targets), offset, req_t)
        }),
    )
    .await?;
    *tvs = back;
    Ok(Cached {
        callers,
        took: t0.elapsed(),
        latency: Quantiles::of(&stats.hist),
        cpu: cpu.line(t0.elapsed()),
        stats,
    })
}

/// Dials `count` offline users (round robin over `targets` from `offset`), rotating over
/// this chunk's TVs as callers from `start`; every reply must be `Cached`.
pub(crate) async fn cached_task(
    mut tvs: Vec<Tv>,
    count: usize,
    start: usize,
    targets: Arc<Vec<UserId>>,
    offset: usize,
    req_t: Duration,
) -> (Vec<Tv>, Result<Stats>) {
    let mut st = match Stats::new() {
        Ok(st) => st,
        Err(e) => return (tvs, Err(e)),
    };
    let l = tvs.len();
    if l == 0 || targets.is_empty() {
        return (tvs, Ok(st));
    }
    for j in 0..count {
        let tv = &mut tvs[(start * count + j) % l];
        let target = targets[(offset + j) % targets.len()];
        let t = Instant::now();
        let r = request(
            &mut tv.client,
            Request::Dial {
                callee: target,
                key: None,
                srtp: None,
                ice: None,
            },
            req_t,
        )
        .await;
        let took = t.elapsed();
        let _ = tv.client.queued_events();
        match r {
            Ok(Reply::Dial(DialOutcome::Cached { .. })) => st.hist.saturating_record(micros(took)),
            Ok(other) => st.error(&anyhow!(
                "dial {} -> offline {target} answered {other:?}, not Cached",
                tv.user
            )),
            Err(e) => st.error(&e.context(format!("dial {} -> offline {target}", tv.user))),
        }
        if st.errors > 100 {
            break;
        }
    }
    (tvs, Ok(st))
}
