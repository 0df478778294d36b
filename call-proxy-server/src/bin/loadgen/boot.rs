//! Phase 6: boot fetch, from sending a registration to holding (and having
//! acknowledged) every cached call.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use call_proxy_server::client::Client;
use shared_proto::UserId;
use tokio::time::timeout;

use std::sync::Arc;

use hdrhistogram::Histogram;

use crate::args::Args;
use crate::bounded;
use crate::cached::cached_task;
use crate::stats::{micros, new_hist};
use crate::tvs::{keep_alive, on_chunks, register_many, request_bye, share, Sources, Tv};

/// What the boot-fetch phase measured.
pub(crate) struct Boot {
    /// Register sent → all calls received (µs).
    pub(crate) fetch: Histogram<u64>,
    /// Register sent → all calls received and acknowledged (µs).
    pub(crate) fetch_ack: Histogram<u64>,
    /// Samples that failed.
    pub(crate) failed: u64,
    /// Errors while caching the samples' calls.
    pub(crate) fill_errors: u64,
}

/// `--boot-samples` times: a fresh user gets `--boot-calls` cached calls from the
/// registered TVs, then switches on and fetches them.
pub(crate) async fn run(
    args: &Args,
    server: SocketAddr,
    sources: Sources,
    tvs: &mut Vec<Tv>,
    last_alive: &mut Instant,
    req_t: Duration,
) -> Result<Boot> {
    let mut boot = Boot {
        fetch: new_hist()?,
        fetch_ack: new_hist()?,
        failed: 0,
        fill_errors: 0,
    };
    let boot_base = 3_000_000_000 + u64::from(rand::random::<u32>() % 1_000_000) * 1_000;
    let fill = args.cached_concurrency.min(args.boot_calls).max(1);
    for s in 0..args.boot_samples {
        keep_alive(args, tvs, last_alive, req_t).await?;
        let user = boot_base + s as u64;
        let (_, st) =
            register_many(server, None, sources, vec![user], 1, false, req_t, false).await?;
        ensure!(st.errors == 0, "boot user {user} failed to register");
        let target = Arc::new(vec![user]);
        let (back, st) = bounded(
            args,
            "boot fill",
            on_chunks(std::mem::take(tvs), fill, |k, chunk| {
                let count = share(args.boot_calls, fill, k);
                cached_task(chunk, count, s, Arc::clone(&target), 0, req_t)
            }),
        )
        .await?;
        *tvs = back;
        st.print_errors("boot fill");
        boot.fill_errors += st.errors;
        ensure!(
            st.errors == 0,
            "could not cache {} calls for boot user {user}",
            args.boot_calls
        );
        match bounded(
            args,
            "boot fetch",
            boot_sample(server, sources, user, args.boot_calls, req_t),
        )
        .await
        {
            Ok((fetch, ack)) => {
                boot.fetch.saturating_record(micros(fetch));
                boot.fetch_ack.saturating_record(micros(ack));
            }
            Err(e) => {
                boot.failed += 1;
                println!("    boot sample {s}: {e:#}");
            }
        }
    }
    Ok(boot)
}

/// A TV with `calls` cached calls switches on: time from sending Register to holding
/// every cached call, and to having acknowledged them.
pub(crate) async fn boot_sample(
    server: SocketAddr,
    sources: Sources,
    user: UserId,
    calls: usize,
    req_t: Duration,
) -> Result<(Duration, Duration)> {
    let local = sources.for_index(0);
    let mut client = match timeout(req_t, Client::connect_from(local, server)).await {
        Ok(r) => r.context("boot TV cannot connect")?,
        Err(_) => bail!("boot TV: connect took over {} s", req_t.as_secs()),
    };
    let deadline = req_t * 3;
    let (reg, fetched, ids, fetch_took, acked, ack_took) = match timeout(deadline, async {
        let t0 = Instant::now();
        let reg = client.register(user, 5004).await?;
        let fetched = client.fetch_all_cached().await?;
        let fetch_took = t0.elapsed();
        let ids: Vec<u64> = fetched.iter().map(|c| c.call_id).collect();
        let acked = client.ack_cached(&ids).await?;
        let ack_took = t0.elapsed();
        anyhow::Ok((reg, fetched, ids, fetch_took, acked, ack_took))
    })
    .await
    {
        Ok(r) => r.with_context(|| format!("boot TV {user}"))?,
        Err(_) => bail!("boot TV {user}: no result within {} s", deadline.as_secs()),
    };
    ensure!(
        usize::try_from(reg.cached_waiting).ok() == Some(calls),
        "boot TV {user}: registration said {} cached calls wait, expected {calls}",
        reg.cached_waiting
    );
    ensure!(
        fetched.len() == calls,
        "boot TV {user}: fetched {} cached calls, expected {calls}",
        fetched.len()
    );
    ensure!(
        fetched.iter().all(|c| c.callee == user),
        "boot TV {user}: fetched a call for another user"
    );
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    ensure!(
        unique.len() == calls,
        "boot TV {user}: duplicate call ids fetched"
    );
    ensure!(
        usize::try_from(acked).ok() == Some(calls),
        "boot TV {user}: {acked} of {calls} calls newly acknowledged"
    );
    let again = timeout(req_t, client.fetch_all_cached())
        .await
        .map_err(|_| anyhow!("boot TV {user}: second fetch timed out"))??;
    ensure!(
        again.is_empty(),
        "boot TV {user}: {} calls still delivered after acknowledging",
        again.len()
    );
    request_bye(client, req_t).await?;
    Ok((fetch_took, ack_took))
}
