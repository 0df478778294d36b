//! The simulated TVs: connecting and registering many at once from spread loopback
//! source addresses, keeping them alive, and running work over chunks of them.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use call_proxy_server::client::Client;
use shared_proto::{Event, Reply, Request, UserId};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::args::Args;
use crate::bounded;
use crate::stats::{micros, Stats};

/// One simulated TV: its user id and its open control connection.
pub(crate) struct Tv {
    pub(crate) user: UserId,
    pub(crate) client: Client,
}

/// Where connections come from: spread over loopback source addresses when the server
/// is on loopback, so that no source address runs out of ephemeral ports.
#[derive(Clone, Copy)]
pub(crate) struct Sources {
    pub(crate) loopback: bool,
    pub(crate) per_ip: usize,
    /// Second octet of the source addresses (127.net.x.y), drawn per run.
    pub(crate) net: u8,
}

impl Sources {
    pub(crate) fn for_index(&self, i: usize) -> Option<SocketAddr> {
        if !self.loopback {
            return None;
        }
        let k = i / self.per_ip.max(1);
        let third = u8::try_from(k / 250).unwrap_or(u8::MAX);
        let fourth = u8::try_from(2 + k % 250).unwrap_or(u8::MAX);
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, self.net, third, fourth)),
            0,
        ))
    }
}

/// Item `k`'s share of `total` split over `parts`.
pub(crate) fn share(total: usize, parts: usize, k: usize) -> usize {
    total / parts + usize::from(k < total % parts)
}

/// Sends a heartbeat on every TV when the last one is getting old, so the server does
/// not time idle TVs out during a long run.
pub(crate) async fn keep_alive(
    args: &Args,
    tvs: &mut Vec<Tv>,
    last: &mut Instant,
    req_t: Duration,
) -> Result<()> {
    if last.elapsed() < Duration::from_secs(30) {
        return Ok(());
    }
    let all = std::mem::take(tvs);
    let (back, st) = bounded(
        args,
        "heartbeat",
        on_chunks(all, args.concurrency, |_, mut chunk| async move {
            let mut st = match Stats::new() {
                Ok(st) => st,
                Err(e) => return (chunk, Err(e)),
            };
            for tv in &mut chunk {
                if let Err(e) = request(&mut tv.client, Request::Heartbeat, req_t).await {
                    st.error(&e.context(format!("heartbeat of {}", tv.user)));
                }
                let _ = tv.client.queued_events();
            }
            (chunk, Ok(st))
        }),
    )
    .await?;
    *tvs = back;
    *last = Instant::now();
    st.print_errors("heartbeat");
    ensure!(st.errors == 0, "{} heartbeats failed", st.errors);
    Ok(())
}

/// One request with a time limit.
pub(crate) async fn request(client: &mut Client, req: Request, t: Duration) -> Result<Reply> {
    match timeout(t, client.request(req)).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("no reply within {} s", t.as_secs()),
    }
}

/// Connects and registers `users` with `conc` in flight, at `server` (the users of odd
/// index at `other`, when given). `keep`: keep the connections (else say Bye, leaving the
/// users offline). Every failure is an error of the phase.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn register_many(
    server: SocketAddr,
    other: Option<SocketAddr>,
    sources: Sources,
    users: Vec<UserId>,
    conc: usize,
    keep: bool,
    req_t: Duration,
    fail_fast: bool,
) -> Result<(Vec<Tv>, Stats)> {
    let n = users.len();
    let users = Arc::new(users);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..conc.clamp(1, n.max(1)) {
        let users = Arc::clone(&users);
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut out = Vec::new();
            let mut st = Stats::new()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&user) = users.get(i) else { break };
                let server = match other {
                    Some(other) if i % 2 == 1 => other,
                    _ => server,
                };
                match register_one(server, sources.for_index(i), user, i, req_t).await {
                    Ok((client, connect, took)) => {
                        st.hist.saturating_record(micros(took));
                        st.hist2.saturating_record(micros(connect));
                        if keep {
                            out.push((i, Tv { user, client }));
                        } else if let Err(e) =
                            request_bye(client, req_t).await.context("bye failed")
                        {
                            st.error(&e.context(format!("user {user}")));
                        }
                    }
                    Err(e) if fail_fast => return Err(e),
                    Err(e) => st.error(&e),
                }
            }
            anyhow::Ok((out, st))
        });
    }
    let mut all = Vec::with_capacity(if keep { n } else { 0 });
    let mut stats = Stats::new()?;
    while let Some(joined) = set.join_next().await {
        let (out, st) = joined.context("a registration task panicked")??;
        all.extend(out);
        stats.merge(st)?;
    }
    all.sort_by_key(|(i, _)| *i);
    Ok((all.into_iter().map(|(_, tv)| tv).collect(), stats))
}

pub(crate) async fn register_one(
    server: SocketAddr,
    local: Option<SocketAddr>,
    user: UserId,
    i: usize,
    req_t: Duration,
) -> Result<(Client, Duration, Duration)> {
    let t0 = Instant::now();
    let mut client = match timeout(req_t, Client::connect_from(local, server)).await {
        Ok(r) => r.with_context(|| {
            format!(
                "TV {user}: cannot connect to {server} from {}",
                local.map_or_else(|| "any address".into(), |l| l.ip().to_string())
            )
        })?,
        Err(_) => bail!(
            "TV {user}: connect + preamble took over {} s",
            req_t.as_secs()
        ),
    };
    let port = u16::try_from(10_000 + i % 50_000).unwrap_or(5004);
    let t = Instant::now();
    match timeout(req_t, client.register(user, port)).await {
        Ok(r) => {
            r.with_context(|| format!("TV {user}: register failed"))?;
        }
        Err(_) => bail!(
            "TV {user}: no reply to register within {} s",
            req_t.as_secs()
        ),
    }
    Ok((client, t.duration_since(t0), t.elapsed()))
}

pub(crate) async fn request_bye(mut client: Client, req_t: Duration) -> Result<()> {
    match request(&mut client, Request::Bye, req_t).await? {
        Reply::Done => Ok(()),
        other => bail!("Bye answered {other:?}"),
    }
}

/// Splits `tvs` into `parts` contiguous chunks, runs `f` on each concurrently, and puts
/// the TVs back together in their order. `f` returns its TVs with its result.
pub(crate) async fn on_chunks<F, Fut>(tvs: Vec<Tv>, parts: usize, f: F) -> Result<(Vec<Tv>, Stats)>
where
    F: Fn(usize, Vec<Tv>) -> Fut,
    Fut: Future<Output = (Vec<Tv>, Result<Stats>)> + Send + 'static,
{
    let n = tvs.len();
    let parts = parts.clamp(1, n.max(1));
    let mut rest = tvs;
    let mut chunks = Vec::with_capacity(parts);
    for k in (0..parts).rev() {
        let size = share(n, parts, k);
        let tail = rest.split_off(rest.len() - size);
        chunks.push((k, tail));
    }
    let mut set = JoinSet::new();
    for (k, chunk) in chunks {
        let fut = f(k, chunk);
        set.spawn(async move {
            let (tvs, r) = fut.await;
            (k, tvs, r)
        });
    }
    let mut done = Vec::with_capacity(parts);
    let mut stats = Stats::new()?;
    let mut first_err = None;
    while let Some(joined) = set.join_next().await {
        let (k, tvs, r) = joined.context("a load task panicked")?;
        match r {
            Ok(st) => stats.merge(st)?,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        done.push((k, tvs));
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    done.sort_by_key(|(k, _)| *k);
    let mut all = Vec::with_capacity(n);
    for (_, tvs) in done {
        all.extend(tvs);
    }
    Ok((all, stats))
}

/// Two distinct elements of a slice, mutably.
pub(crate) fn pair_mut(tvs: &mut [Tv], a: usize, b: usize) -> Option<(&mut Tv, &mut Tv)> {
    if a == b || a >= tvs.len() || b >= tvs.len() {
        return None;
    }
    if a < b {
        let (x, y) = tvs.split_at_mut(b);
        Some((&mut x[a], &mut y[0]))
    } else {
        let (x, y) = tvs.split_at_mut(a);
        Some((&mut y[0], &mut x[b]))
    }
}

/// Reads events until one matches (discarding the others).
pub(crate) async fn wait_event(
    client: &mut Client,
    pred: impl Fn(&Event) -> bool,
) -> Result<Event> {
    loop {
        let e = client.next_event().await?;
        if pred(&e) {
            return Ok(e);
        }
    }
}
