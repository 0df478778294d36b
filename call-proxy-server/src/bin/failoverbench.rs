//! Failover benchmark (issue 18): how long the TVs of a node that dies (SIGKILL) take to
//! be back online on another node through the distribution service, on a real
//! PostgreSQL, with real processes and enrolled TVs over TLS 1.3.
//!
//! It spawns node-a and the dispatcher (`call-proxy-server serve` / `dispatch` on the
//! database given with `--db`, which must be empty), registers `--tvs` TVs through the
//! dispatcher (all land on node-a, the only node), starts node-b, then SIGKILLs node-a.
//! Each TV behaves as `tv-agent`'s link does: when its link breaks it waits its first
//! backoff (125–250 ms, full jitter on the upper half, doubling on each failure up to
//! 30 s), asks the dispatcher again naming the node it lost, and registers where it is
//! sent with the token it got. Reported: the initial registrations per second through the
//! dispatcher, and from the kill, the time until each TV is registered again (p50, p90,
//! p99, all), and the database's count of those TVs online on node-b at the end.
//!
//! The TVs' credentials are written straight into the database before the servers start
//! (`seed_credentials`), as if each had been enrolled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use call_proxy_server::client::ClientError;
use clap::Parser;
use control_client::dispatch::{assign, Assigned};
use control_client::{Client, Features, TlsClient, Transport, TvKey};
use futures::stream::{self, StreamExt};
use rand::Rng;
use shared_proto::dispatch::Assign;
use test_support::process::KillOnDrop;

#[derive(Parser, Debug)]
#[command(
    about = "Time for a SIGKILLed node's TVs to be back online elsewhere through the dispatcher"
)]
struct Args {
    /// The (empty) PostgreSQL database, postgres://USER@HOST:PORT/DB.
    #[arg(long)]
    db: String,
    /// File whose first line is its password.
    #[arg(long)]
    db_password_file: Option<PathBuf>,
    /// TVs on the node that is killed.
    #[arg(long, default_value_t = 10_000)]
    tvs: usize,
    /// Initial registrations in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// The nodes' heartbeat lease, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    lease_ms: u64,
    /// The server binary [default: call-proxy-server next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Give up waiting for the TVs to come back after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Worker threads of the simulated TVs.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// First user id of the simulated TVs.
const USER_BASE: u64 = 5_000_000;

/// A spawned server process and its address.
struct Proc {
    child: KillOnDrop,
    addr: SocketAddr,
}

fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        test_support::net::free_port()?,
    )))
}

/// Spawns `bin` with `args` (stderr to `log`) and waits until it listens on `addr`.
async fn spawn(bin: &Path, args: &[String], addr: SocketAddr, log: &Path) -> Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    let child = test_support::process::spawn_listening(&mut cmd, addr, Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "{} {} (see {})",
                bin.display(),
                args.first().map(String::as_str).unwrap_or(""),
                log.display()
            )
        })?;
    Ok(Proc { child, addr })
}

/// What every spawned process of this run shares.
struct Setup {
    bin: PathBuf,
    dir: PathBuf,
    db_args: Vec<String>,
    lease_ms: u64,
}

impl Setup {
    async fn node(&self, id: &str, slot: u8) -> Result<Proc> {
        let addr = free_addr()?;
        let key_pub = self.dir.join("dispatch.key.pub");
        let config = self.dir.join(format!("{id}.toml"));
        std::fs::write(&config, format!("node_lease_ms = {}\n", self.lease_ms))?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--config".into(),
            config.display().to_string(),
            "--node-id".into(),
            id.into(),
            "--node-slot".into(),
            slot.to_string(),
            "--dispatch-public-key-file".into(),
            key_pub.display().to_string(),
            "--data-dir".into(),
            self.dir.display().to_string(),
            "--max-per-ip".into(),
            "0".into(),
            "--max-unregistered-per-ip".into(),
            "100000".into(),
        ];
        args.extend(self.db_args.iter().cloned());
        spawn(&self.bin, &args, addr, &self.dir.join(format!("{id}.log"))).await
    }

    async fn dispatcher(&self) -> Result<Proc> {
        let addr = free_addr()?;
        let mut args: Vec<String> = vec![
            "dispatch".into(),
            "--listen".into(),
            addr.to_string(),
            "--key-file".into(),
            self.dir.join("dispatch.key").display().to_string(),
            "--node-lease-ms".into(),
            self.lease_ms.to_string(),
            "--data-dir".into(),
            self.dir.display().to_string(),
        ];
        args.extend(self.db_args.iter().cloned());
        spawn(&self.bin, &args, addr, &self.dir.join("dispatch.log")).await
    }
}

/// One TV's way in: the dispatcher (naming the node it lost, if any), then the node it
/// is sent to, with the token. Returns the registered client and its node's id.
async fn through_dispatcher(
    tls: &TlsClient,
    dispatcher: SocketAddr,
    user: u64,
    lost: &str,
) -> Result<(Client<control_client::Stream>, String), ClientError> {
    let name = "127.0.0.1";
    let stream = Transport::Tls(tls.clone())
        .connect_addr(dispatcher, name, None)
        .await
        .map_err(ClientError::from_connect)?;
    let ask = Assign {
        agent_version: "failoverbench".into(),
        unreachable_node: lost.into(),
    };
    let a = match assign(stream, Features::KNOWN, &ask).await? {
        Assigned::Node(a) => a,
        Assigned::AtNode(_) => return Err(ClientError::Protocol("not a dispatcher".into())),
    };
    let node: SocketAddr = a
        .node_addr
        .parse()
        .map_err(|_| ClientError::Protocol(format!("node address {}", a.node_addr)))?;
    let with_token = tls
        .with_token(&a.token)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let stream = Transport::Tls(with_token)
        .connect_addr(node, name, None)
        .await
        .map_err(ClientError::from_connect)?;
    let mut client = Client::handshake(stream).await?;
    let port = 20_000 + (user % 40_000) as u16;
    client.register(user, port).await?;
    Ok((client, a.node_id))
}

/// Percentile `p` (0..=100) of sorted `v`, in seconds.
fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64()
}

async fn bench(args: Args) -> Result<()> {
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("call-proxy-server"),
    };
    let dir = std::env::temp_dir().join(format!("call-proxy-failoverbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut db_args = vec!["--db".to_string(), args.db.clone()];
    if let Some(p) = &args.db_password_file {
        db_args.push("--db-password-file".into());
        db_args.push(p.display().to_string());
    }
    let setup = Setup {
        bin,
        dir: dir.clone(),
        db_args,
        lease_ms: args.lease_ms,
    };
    let target = call_proxy_server::storage::postgres::PgTarget::new(
        &args.db,
        args.db_password_file.as_deref(),
    )?;
    println!(
        "failoverbench: {} TVs, lease {} ms, {} client thread(s), server {}",
        args.tvs,
        args.lease_ms,
        args.threads,
        setup.bin.display()
    );
    let keys: Vec<TvKey> = (0..args.tvs)
        .map(|_| TvKey::generate())
        .collect::<Result<_, _>>()?;
    let seeds: Vec<(Vec<u8>, u64)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.cert.to_vec(), USER_BASE + i as u64))
        .collect();
    call_proxy_server::storage::postgres::enroll::seed_credentials(&target, &seeds).await?;
    call_proxy_server::dispatch::SigningKey::load_or_create(&dir.join("dispatch.key"))?;

    let mut node_a = setup.node("node-a", 1).await?;
    let dispatcher = setup.dispatcher().await?;
    let ca = std::fs::read(dir.join("tls/ca.crt"))?;
    let tls: Vec<TlsClient> = keys
        .iter()
        .map(|k| TlsClient::new(&ca, k))
        .collect::<Result<_, _>>()?;

    // Every TV registers through the dispatcher; node-a is the only node.
    let d = dispatcher.addr;
    let started = Instant::now();
    let registered: Vec<_> = stream::iter(tls.iter().enumerate())
        .map(|(i, t)| async move {
            let user = USER_BASE + i as u64;
            (i, through_dispatcher(t, d, user, "").await)
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let took = started.elapsed();
    let rate = args.tvs as f64 / took.as_secs_f64().max(1e-9);
    let mut clients = Vec::with_capacity(args.tvs);
    let mut failed = 0;
    for (i, r) in registered {
        match r {
            Ok((c, node)) if node == "node-a" => clients.push((i, c)),
            Ok((_, node)) => bail!("TV {i} was sent to {node}, not node-a"),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("TV {i}: {e}");
                }
            }
        }
    }
    ensure!(
        failed == 0,
        "{failed} TVs could not register through the dispatcher"
    );
    println!(
        "  registered through the dispatcher: {} TVs in {:.2} s ({:.0}/s, each a TLS handshake with the dispatcher and one with the node)",
        clients.len(),
        took.as_secs_f64(),
        rate
    );

    // node-b joins; the dispatcher sees it once it has advertised and beaten once.
    let node_b = setup.node("node-b", 2).await?;
    tokio::time::sleep(Duration::from_millis(args.lease_ms / 2 + 500)).await;

    // Each TV waits for its link to break, then comes back as tv-agent's link does.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let tls = Arc::new(tls);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut client) in clients {
        let tls = Arc::clone(&tls);
        let done = done_tx.clone();
        let mut hold = hold_rx.clone();
        tasks.spawn(async move {
            let broke = loop {
                match client.next_event().await {
                    Ok(_) => continue,
                    Err(_) => break Instant::now(),
                }
            };
            drop(client);
            let user = USER_BASE + i as u64;
            let mut backoff = Duration::from_millis(250);
            let mut tries = 0u32;
            let back = loop {
                let half = backoff / 2;
                let wait = half + rand::rng().random_range(Duration::ZERO..=half);
                tokio::time::sleep(wait).await;
                tries += 1;
                match through_dispatcher(&tls[i], d, user, "node-a").await {
                    Ok((c, node)) => break Some((c, node)),
                    Err(_) if tries < 64 => backoff = (backoff * 2).min(Duration::from_secs(30)),
                    Err(_) => break None,
                }
            };
            let (client, node) = match back {
                Some((c, n)) => (Some(c), n),
                None => (None, String::new()),
            };
            let _ = done.send((broke, Instant::now(), node, tries));
            // Stay registered until the run is over.
            let _ = hold.changed().await;
            drop(client);
        });
    }
    drop(done_tx);

    let killed_at = Instant::now();
    test_support::process::kill(&mut node_a.child.0);
    let expected = tasks.len();
    let mut back = Vec::with_capacity(expected);
    let mut broke_at = Vec::with_capacity(expected);
    let mut elsewhere = 0usize;
    let mut retries = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    while back.len() < expected {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((broke, at, node, tries))) => {
                broke_at.push(broke.saturating_duration_since(killed_at));
                back.push(at.saturating_duration_since(killed_at));
                if node == "node-b" {
                    elsewhere += 1;
                }
                retries += u64::from(tries.saturating_sub(1));
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    back.sort();
    broke_at.sort();
    let online_b = call_proxy_server::storage::postgres::dispatch::online_on(
        &target,
        "node-b",
        USER_BASE..USER_BASE + args.tvs as u64,
    )
    .await?;
    println!(
        "  node-a killed: {expected} TVs; links broken within {:.3} s (p99 {:.3} s)",
        pct(&broke_at, 100.0),
        pct(&broke_at, 99.0)
    );
    println!(
        "  back online through the dispatcher: {} of {expected} on node-b; from the kill p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, all {:.2} s; {retries} retries",
        elsewhere,
        pct(&back, 50.0),
        pct(&back, 90.0),
        pct(&back, 99.0),
        pct(&back, 100.0)
    );
    println!("  database: {online_b} of them online on node-b");
    println!(
        "{}",
        serde_json::json!({
            "tvs": expected,
            "registrations_per_s": rate,
            "back_p50_s": pct(&back, 50.0),
            "back_p90_s": pct(&back, 90.0),
            "back_p99_s": pct(&back, 99.0),
            "back_all_s": pct(&back, 100.0),
            "back_on_node_b": elsewhere,
            "online_on_node_b_in_db": online_b,
            "retries": retries,
        })
    );
    let _ = hold_tx.send(true);
    while tasks.join_next().await.is_some() {}
    drop((node_b, dispatcher));
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        elsewhere == expected && back.len() == expected,
        "only {elsewhere} of {expected} TVs came back"
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    test_support::process::bench_main("failoverbench", args.threads, bench(args))
}
