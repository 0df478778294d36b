//! `call-proxy-loadgen`: drives many simulated TVs over real TCP against a real
//! `call-proxy-server` and prints the figures of the server's performance goals.
//!
//! By default it starts the `call-proxy-server` binary found next to its own executable
//! on a free loopback port with a fresh database in a temporary directory, and stops it
//! (SIGTERM) at the end; `--server ADDR` targets a server that is already running instead
//! (`--server-pid PID` then enables the memory figures).
//!
//! Phases, each bounded in time (`--phase-timeout-secs`):
//! 1. the server's resident memory before any TV connects;
//! 2. connect and register `--tvs` TVs with `--concurrency` in flight (registrations/s),
//!    keeping every connection open and idle;
//! 3. the server's resident memory with all of them registered (bytes per idle TV);
//! 4. call set-up latency with all of them online: `--dial-pairs` tasks dial, wait for
//!    `Ringing`, and hang up, over pairs of registered TVs;
//! 5. durably cached calls per second to offline users;
//! 6. boot fetch: how long a TV with `--boot-calls` cached calls takes, from sending its
//!    registration, to hold all of them (and to have acknowledged them).
//!
//! Every phase's work is spread over the registered TVs so that no single connection
//! exceeds the server's per-connection request rate limit (20 requests/s sustained, a
//! burst of 100, by default): real TVs do not dial hundreds of times a second.
//!
//! The TVs stay connected until a spawned server has been stopped, so the server closes
//! first (no TIME_WAIT sockets pile up on this side) and its shutdown is exercised with
//! every session open. The process's open-file limit (soft raised to hard) bounds
//! `--tvs`; a run that does not fit is refused up front.
//!
//! Map: `args` (the command line), `server` (the spawned server process), `tvs` (the
//! simulated TVs: registering many, keeping them alive, work over chunks), one module
//! per phase (`register`, `dial`, `cached`, `boot`), `stats` (histograms and quantiles),
//! and `report`, the one printer of the figures (lines for people, the JSON line).

mod args;
mod boot;
mod cached;
mod dial;
mod register;
mod report;
mod server;
mod stats;
mod tvs;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use call_proxy_server::server::limits::raise_fd_limit;
use clap::Parser;
use test_support::procfs::cpu_model;
use tokio::time::timeout;

use crate::args::Args;
use crate::report::Report;
use crate::server::SpawnedServer;
use crate::tvs::{keep_alive, Sources, Tv};

fn main() -> Result<()> {
    let args = Args::parse();
    let (soft, hard) = raise_fd_limit().context("cannot read the open-file limit")?;
    let margin = args.concurrency.max(args.cached_concurrency) + 100;
    let needed = args.tvs + margin;
    ensure!(
        u64::try_from(needed).unwrap_or(u64::MAX) <= soft,
        "--tvs {} needs about {needed} file descriptors ({} TVs + {margin} for short-lived \
         connections and files), but this process may open only {soft} (hard limit {hard}, \
         which an unprivileged process cannot raise); lower --tvs or --concurrency",
        args.tvs,
        args.tvs
    );
    ensure!(args.tvs >= 2, "--tvs must be at least 2");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(args.dial_pairs >= 1, "--dial-pairs must be at least 1");
    ensure!(
        args.cached_concurrency >= 1,
        "--cached-concurrency must be at least 1"
    );
    ensure!(
        args.offline_targets >= 1,
        "--offline-targets must be at least 1"
    );
    ensure!(
        args.per_source_ip >= 1,
        "--per-source-ip must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    println!(
        "machine: {} CPUs ({}); load generator: {} worker thread(s); open-file limit {soft} \
         (hard {hard})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        args.threads.max(1)
    );
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let mut spawned = match args.server {
        Some(_) => None,
        None => Some(SpawnedServer::start(&args)?),
    };
    let (server, pid) = match (&spawned, args.server) {
        (Some(s), _) => (s.addr, Some(s.child.id())),
        (None, Some(addr)) => (addr, args.server_pid),
        (None, None) => bail!("no server to test"),
    };
    if let Some(s) = spawned.as_mut() {
        s.wait_ready().await?;
    }
    let started = Instant::now();
    let result = phases(&args, server, pid).await;
    // The TVs stay connected until the server has stopped: the server then closes
    // first, so no TIME_WAIT sockets pile up on the load generator's source addresses,
    // and the shutdown is tested with every session open.
    let (result, tvs) = match result {
        Ok((errors, tvs)) => (Ok(errors), tvs),
        Err(e) => (Err(e), Vec::new()),
    };
    let mut problems = Vec::new();
    if let Some(mut s) = spawned {
        match s.stop().await {
            Ok(msg) => println!("server with {} TVs connected {msg}", tvs.len()),
            Err(e) => problems.push(format!("{e:#}")),
        }
        let warnings = s.log_problems();
        if warnings.is_empty() {
            println!("server log: no WARN or ERROR lines");
        } else {
            println!(
                "server log: {} WARN/ERROR lines; first ones:",
                warnings.len()
            );
            for w in warnings.iter().take(10) {
                println!("  {w}");
            }
        }
        if result.is_ok() && problems.is_empty() && !args.keep {
            let _ = std::fs::remove_dir_all(&s.dir);
        } else {
            println!("kept {} (database and server log)", s.dir.display());
            if result.is_err() {
                println!("server log tail:\n{}", s.log_tail(20));
            }
        }
    }
    drop(tvs);
    println!("total run time {:.1} s", started.elapsed().as_secs_f64());
    let errors = result?;
    if let Some(p) = problems.first() {
        bail!("{p}");
    }
    ensure!(
        errors == 0,
        "{errors} requests failed during the run (see above)"
    );
    Ok(())
}

/// Runs a phase within the phase time limit.
pub(crate) async fn bounded<T>(
    args: &Args,
    name: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let limit = Duration::from_secs(args.phase_timeout_secs);
    match timeout(limit, fut).await {
        Ok(r) => r.with_context(|| format!("phase {name:?} failed")),
        Err(_) => bail!(
            "phase {name:?} did not finish within {} s (--phase-timeout-secs)",
            limit.as_secs()
        ),
    }
}

/// All phases; returns how many requests failed, and the TVs, still connected.
async fn phases(args: &Args, server: SocketAddr, pid: Option<u32>) -> Result<(u64, Vec<Tv>)> {
    let req_t = Duration::from_secs(args.request_timeout_secs);
    let loopback = server.ip().is_loopback();
    // Fresh source addresses every run: 127.2-121.x.y for the TVs that stay connected,
    // 127.130-249.x.y for short-lived connections.
    let tv_sources = Sources {
        loopback,
        per_ip: args.per_source_ip,
        net: 2 + rand::random::<u8>() % 120,
    };
    let short_sources = Sources {
        net: 130 + rand::random::<u8>() % 120,
        ..tv_sources
    };
    let mut report = Report::default();
    report.start(args, server);

    // 1. Baseline memory.
    let baseline = match pid {
        Some(pid) => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(rss_bytes(pid)?)
        }
        None => None,
    };
    report.baseline_rss(baseline);

    // 2. Connect and register N TVs.
    let (mut tvs, registrations) = register::run(args, server, tv_sources, pid, req_t).await?;
    report.registrations(&registrations);
    let mut last_alive = Instant::now();

    // 3. Memory with N idle TVs.
    let idle = match (pid, baseline) {
        (Some(pid), Some(base)) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((base, rss_bytes(pid)?))
        }
        _ => None,
    };
    report.idle_rss(args.tvs, idle);

    // Held: every TV connected and heartbeating every 30 s, as TVs do.
    if args.hold_secs > 0 {
        let (rounds, rss) = hold(args, &mut tvs, &mut last_alive, pid, req_t).await?;
        report.held(tvs.len(), args.hold_secs, rounds, rss);
    }
    if args.idle_only {
        report.finish(0, args.json);
        return Ok((0, tvs));
    }

    // 4. Dial latency with all N online.
    keep_alive(args, &mut tvs, &mut last_alive, req_t).await?;
    let (back, dials) = dial::run(args, tvs, pid, req_t).await?;
    tvs = back;
    report.dials(args.tvs, &dials);

    // 5. Cached calls per second.
    let cached = cached::run(
        args,
        server,
        short_sources,
        &mut tvs,
        &mut last_alive,
        pid,
        req_t,
    )
    .await?;
    report.cached(args, &cached);

    // 6. Boot fetch.
    let boot = boot::run(
        args,
        server,
        short_sources,
        &mut tvs,
        &mut last_alive,
        req_t,
    )
    .await?;
    report.boot(args, &boot);

    if let Some(pid) = pid {
        report.end_rss(tvs.len(), rss_bytes(pid)?);
    }
    let errors = dials.stats.errors + cached.stats.errors + boot.fill_errors + boot.failed;
    report.finish(errors, args.json);
    Ok((errors, tvs))
}

/// Holds every TV connected for `--hold-secs`, heartbeating each every 30 s (a failed
/// heartbeat fails the run). Returns the heartbeat rounds and the server's memory at
/// the end.
async fn hold(
    args: &Args,
    tvs: &mut Vec<Tv>,
    last_alive: &mut Instant,
    pid: Option<u32>,
    req_t: Duration,
) -> Result<(u32, Option<u64>)> {
    let until = Instant::now() + Duration::from_secs(args.hold_secs);
    let mut rounds = 0;
    while Instant::now() < until {
        let before = *last_alive;
        keep_alive(args, tvs, last_alive, req_t).await?;
        if *last_alive != before {
            rounds += 1;
        }
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    let rss = match pid {
        Some(pid) => Some(rss_bytes(pid)?),
        None => None,
    };
    Ok((rounds, rss))
}

/// Resident memory of the server, in bytes.
fn rss_bytes(pid: u32) -> Result<u64> {
    test_support::procfs::rss_bytes(pid)
        .with_context(|| format!("cannot read the memory of process {pid}"))
}
