//! Benchmark of presence (issue 16) against a spawned `call-proxy-server` on TLS 1.3
//! with enrolled TVs, all on loopback:
//! - memory per subscription: the server's RSS with every subscriber registered and
//!   idle, then with each watching `--watch` users, divided by the watched pairs;
//! - fan-out: one TV's state change (do not disturb on, off, …) to all `--subscribers`
//!   watchers, timed from the change's request to each watcher's receipt (each
//!   acknowledges at once), `--rounds` times;
//! - sustained: `--togglers` TVs change state every 50 ms (each watched by about
//!   `--watch` others) for `--sustain-secs`; notifications and state changes received per
//!   second, and what the server's CPU did.
//!
//! TVs' credentials and the address books that let each watcher see whom it watches are
//! written into the database before the server starts, as if enrolled and subscribed
//! before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use control_client::{Client, TlsClient, TvKey};
use futures::stream::{self, StreamExt};
use shared_proto::{ErrorCode, Event, Reply, Request, UserId};
use test_support::process::KillOnDrop;
use test_support::procfs::{rss_bytes, CpuMeter};
use test_support::stats::{ms, pct};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(about = "Presence fan-out, sustained notifications and memory per subscription")]
struct Args {
    /// Watchers of the one TV whose change is fanned out.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Users each watcher watches in all (the fanned-out TV and its address book, the
    /// watchers on either side of it), for the memory figure and the sustained phase
    /// (at most 500; an even number watches one less).
    #[arg(long, default_value_t = 100)]
    watch: usize,
    /// Fan-out rounds.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// TVs that change state every 50 ms in the sustained phase.
    #[arg(long, default_value_t = 100)]
    togglers: usize,
    /// Length of the sustained phase (0 skips it).
    #[arg(long, default_value_t = 10)]
    sustain_secs: u64,
    /// Worker threads of the load generator (its 1,000 TLS clients).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The server binary [default: call-proxy-server next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// The fanned-out TV.
const TARGET: UserId = 1;
/// The first watcher's user id.
const FIRST: UserId = 100_000;

type Tv = Client<control_client::Stream>;

/// What a watcher's task reports.
enum Seen {
    /// A notification carrying the target's change, received at this instant.
    Target(Instant),
}

fn watcher_id(i: usize) -> UserId {
    FIRST + i as UserId
}

/// Watcher `i`'s address book: the `(watch - 1) / 2` watchers on each side of it
/// (round), who have it in theirs. It watches them and the target.
fn contacts_of(i: usize, n: usize, watch: usize) -> Vec<UserId> {
    let h = ((watch.saturating_sub(1)) / 2).min(n.saturating_sub(1) / 2);
    (1..=h)
        .flat_map(|k| [watcher_id((i + k) % n), watcher_id((i + n - k) % n)])
        .collect()
}

async fn bench(args: Args) -> Result<()> {
    ensure!(
        (1..=shared_proto::MAX_SUBSCRIPTIONS).contains(&args.watch),
        "--watch must be 1 to {}",
        shared_proto::MAX_SUBSCRIPTIONS
    );
    let n = args.subscribers;
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("call-proxy-server"),
    };
    println!(
        "machine: {} CPUs ({}); {} watchers of one TV, each watching {} users; load generator on {} thread(s)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        test_support::procfs::cpu_model(),
        n,
        args.watch,
        args.threads
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.sqlite");
    // Keys and enrollments: the target and every watcher; address books: everyone lets
    // whoever watches them.
    let keys: Vec<TvKey> = (0..=n)
        .map(|_| TvKey::generate())
        .collect::<Result<_, _>>()?;
    let user_of = |k: usize| if k == 0 { TARGET } else { watcher_id(k - 1) };
    let seeds: Vec<(Vec<u8>, UserId)> = keys
        .iter()
        .enumerate()
        .map(|(k, key)| (key.cert.to_vec(), user_of(k)))
        .collect();
    call_proxy_server::storage::sqlite::enroll::seed_credentials(&db, &seeds)?;
    let mut books: Vec<(UserId, UserId)> = Vec::new();
    for i in 0..n {
        books.push((TARGET, watcher_id(i)));
        for u in contacts_of(i, n, args.watch) {
            books.push((watcher_id(i), u));
        }
    }
    call_proxy_server::storage::sqlite::presence::seed_contacts(&db, &books)?;
    let (child, addr) = spawn_server(&bin, dir.path())?;
    let ca = std::fs::read(dir.path().join("tls/ca.crt")).context("the server's CA")?;

    // Everyone registers (the target too), then idles: the baseline.
    let tls: Vec<TlsClient> = keys
        .iter()
        .map(|k| TlsClient::new(&ca, k))
        .collect::<Result<_, _>>()?;
    let mut target = connect(&tls[0], addr, TARGET, 0).await?;
    let mut watchers: Vec<Tv> = stream::iter(0..n)
        .map(|i| {
            let tls = &tls[i + 1];
            async move { connect(tls, addr, watcher_id(i), i + 1).await }
        })
        .buffered(64)
        .collect::<Vec<Result<Tv>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_bytes(child.id())?;
    let mut subs = Vec::with_capacity(n);
    for (i, w) in watchers.iter_mut().enumerate() {
        // Its address book (as seeded: a subscription replaces it) and the target.
        let reply = w
            .request(Request::Subscribe {
                contacts: contacts_of(i, n, args.watch),
                others: vec![TARGET],
            })
            .await?;
        let Reply::Subscribed(s) = reply else {
            bail!("unexpected answer to a subscription: {reply:?}")
        };
        if let Some(p) = s
            .states
            .iter()
            .find(|p| p.state == shared_proto::PresenceState::NOT_ALLOWED)
        {
            bail!("watcher {} may not watch {}", watcher_id(i), p.user_id);
        }
        subs.push(s.subscription);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watching = rss_bytes(child.id())?;
    let pairs = n * (1 + contacts_of(0, n, args.watch).len());
    println!(
        "memory: {} subscriptions, {pairs} watched pairs: server RSS {:.1} → {:.1} MiB, {:.0} B per watched pair",
        n,
        idle as f64 / 1048576.0,
        watching as f64 / 1048576.0,
        watching.saturating_sub(idle) as f64 / pairs as f64
    );

    // Every watcher acknowledges what it gets at once and reports the target's changes.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let notifications = Arc::new(AtomicU64::new(0));
    let changes = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let (toggle_tx, _) = tokio::sync::broadcast::channel::<bool>(4);
    for (i, (mut w, sub)) in watchers.into_iter().zip(subs).enumerate() {
        let seen = seen_tx.clone();
        let counts = (
            Arc::clone(&notifications),
            Arc::clone(&changes),
            Arc::clone(&lost),
        );
        let mut toggle = (i < args.togglers).then(|| toggle_tx.subscribe());
        tasks.push(tokio::spawn(async move {
            watch(&mut w, sub, seen, counts, &mut toggle).await
        }));
    }

    // Fan-out rounds.
    let mut each = Vec::with_capacity(args.rounds * n);
    let mut last = Vec::with_capacity(args.rounds);
    let mut first = Vec::with_capacity(args.rounds);
    let mut answered = Vec::with_capacity(args.rounds);
    let mut dnd = false;
    for round in 0..args.rounds {
        dnd = !dnd;
        let t0 = Instant::now();
        target
            .request(Request::SetPresence {
                do_not_disturb: dnd,
                hidden: false,
            })
            .await?;
        answered.push(t0.elapsed());
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got < n {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some(Seen::Target(at))) => {
                    each.push(at.saturating_duration_since(t0));
                    if got == 0 {
                        first.push(at.saturating_duration_since(t0));
                    }
                    got += 1;
                }
                Ok(None) => bail!("the watchers stopped"),
                Err(_) => bail!("round {round}: {got} of {n} watchers told within 10 s"),
            }
        }
        last.push(each[each.len() - 1]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    each.sort_unstable();
    last.sort_unstable();
    first.sort_unstable();
    answered.sort_unstable();
    println!(
        "  the change's request answered p50 {:.2} ms; first watcher told p50 {:.2} ms",
        ms(pct(&answered, 0.50)),
        ms(pct(&first, 0.50)),
    );
    println!(
        "fan-out of one change to {n} watchers, {} rounds: each watcher told p50 {:.2} ms, p99 {:.2} ms; last watcher told p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.rounds,
        ms(pct(&each, 0.50)),
        ms(pct(&each, 0.99)),
        ms(pct(&last, 0.50)),
        ms(pct(&last, 0.99)),
        ms(last.last().copied().unwrap_or_default()),
    );

    // Sustained changes.
    if args.sustain_secs > 0 && args.togglers > 0 {
        let (n0, c0) = (
            notifications.load(Ordering::Relaxed),
            changes.load(Ordering::Relaxed),
        );
        let meter = CpuMeter::start(Some(child.id()));
        let started = Instant::now();
        let _ = toggle_tx.send(true);
        tokio::time::sleep(Duration::from_secs(args.sustain_secs)).await;
        let _ = toggle_tx.send(false);
        let wall = started.elapsed();
        let (n1, c1) = (
            notifications.load(Ordering::Relaxed),
            changes.load(Ordering::Relaxed),
        );
        println!(
            "sustained: {} TVs changing every 50 ms for {:.1} s: {:.0} notifications/s carrying {:.0} state changes/s to watchers; {} recovery messages",
            args.togglers,
            wall.as_secs_f64(),
            (n1 - n0) as f64 / wall.as_secs_f64(),
            (c1 - c0) as f64 / wall.as_secs_f64(),
            lost.load(Ordering::Relaxed)
        );
        println!("  CPU: {}", meter.line(wall));
    }
    for t in tasks {
        t.abort();
    }
    drop(child);
    Ok(())
}

/// One watcher: acknowledges every notification at once, reports the target's changes,
/// counts, and (a toggler) changes its own state every 50 ms while told to.
async fn watch(
    w: &mut Tv,
    mut sub: u64,
    seen: mpsc::UnboundedSender<Seen>,
    (notifications, changes, lost): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>),
    toggle: &mut Option<tokio::sync::broadcast::Receiver<bool>>,
) -> Result<()> {
    let mut toggling = false;
    let mut dnd = false;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            e = w.next_event() => match e? {
                Event::PresenceChanged { subscription, seq, changes: c } => {
                    let at = Instant::now();
                    w.connection()
                        .send(Request::PresenceAck { subscription, seq, status: ErrorCode::OK })
                        .await?;
                    notifications.fetch_add(1, Ordering::Relaxed);
                    changes.fetch_add(c.len() as u64, Ordering::Relaxed);
                    if subscription == sub && c.iter().any(|p| p.user_id == TARGET) {
                        let _ = seen.send(Seen::Target(at));
                    }
                }
                // Counted (a failure under load); this watcher is done with the round
                // figures then.
                Event::PresenceLost { .. } => {
                    lost.fetch_add(1, Ordering::Relaxed);
                    sub = 0;
                }
                _ => {}
            },
            t = next_toggle(toggle) => toggling = t,
            _ = tick.tick(), if toggling => {
                dnd = !dnd;
                // Not awaited: the Done reply is read (and dropped) with the events.
                w.connection()
                    .send(Request::SetPresence { do_not_disturb: dnd, hidden: false })
                    .await?;
            }
        }
    }
}

async fn next_toggle(rx: &mut Option<tokio::sync::broadcast::Receiver<bool>>) -> bool {
    match rx {
        Some(rx) => rx.recv().await.unwrap_or(false),
        None => std::future::pending().await,
    }
}

/// `user`'s TV connected over TLS and registered, from its own loopback address.
async fn connect(tls: &TlsClient, addr: SocketAddr, user: UserId, i: usize) -> Result<Tv> {
    let local = SocketAddr::from(([127, 3, (i / 250) as u8, (i % 250 + 1) as u8], 0));
    let stream = tls.connect(addr, "127.0.0.1", Some(local)).await?;
    let mut c = Client::handshake(tokio_util::either::Either::Right(stream)).await?;
    c.register(user, 5000).await?;
    Ok(c)
}

fn spawn_server(bin: &Path, dir: &Path) -> Result<(KillOnDrop, SocketAddr)> {
    let port = test_support::net::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = KillOnDrop(
        Command::new(bin)
            .arg("serve")
            .args(["--listen", &addr.to_string(), "--no-sync"])
            .arg("--db")
            .arg(dir.join("bench.sqlite"))
            .args(["--max-per-ip", "0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        ensure!(
            Instant::now() < deadline,
            "the server did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = call_proxy_server::server::limits::raise_fd_limit() {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    test_support::process::bench_main("call-proxy-presencebench", args.threads, bench(args))
}
