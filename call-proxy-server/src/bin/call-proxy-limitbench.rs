//! `call-proxy-limitbench`: the attacks of issue 11 against a spawned `call-proxy-server`,
//! bounded in count and time, and the figures that show genuine TVs keep getting in.
//!
//! 1. Genuine registrations on the unloaded server (`--genuine` of them, one at a time).
//! 2. `--silent` connections held from `--sources` loopback addresses (127.0.0.2 on) by
//!    attacker child processes (this program with `--attacker`, so each has its own
//!    descriptor limit), reopened when the server sheds them; `--mode registered` makes
//!    them register and then stay silent instead. With the attack holding, the genuine
//!    registrations again: how many succeeded and how long each took.
//! 3. Call set-up latency (dial → `Ringing`, then hang up) unloaded, then during a flood
//!    by `--flood-conns` connections pipelining heartbeats as fast as they can (and
//!    reconnecting when closed), with the server's CPU use and the closes counted.
//!
//! Run it through `scripts/bench-limits.sh`. Loopback only.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use call_proxy_server::client::Client;
use clap::Parser;
use shared_proto::{ClientCodec, ClientMsg, DialOutcome, Preamble, Register, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_util::codec::Encoder;

#[derive(Parser, Clone)]
#[command(about = "Connection-limit and flood benchmark of call-proxy-server (loopback)")]
struct Args {
    /// Silent (or registered-but-silent) attacking connections held.
    #[arg(long, default_value_t = 20_000)]
    silent: usize,
    /// Source addresses they come from (127.0.0.2 onwards).
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// `silent`: connect and say nothing; `registered`: register, then say nothing.
    #[arg(long, default_value = "silent")]
    mode: String,
    /// How long an attacking connection waits to reconnect after the server closed it
    /// (milliseconds; 0: never, the attack then fades as connections are shed or time
    /// out).
    #[arg(long, default_value_t = 1_000)]
    reopen_ms: u64,
    /// Genuine registrations measured, unloaded and under attack.
    #[arg(long, default_value_t = 10)]
    genuine: usize,
    /// How long the attack is held before the genuine registrations start (seconds;
    /// below the server's 5 s registration deadline, which closes silent connections).
    #[arg(long, default_value_t = 2)]
    ramp_secs: u64,
    /// Flooding connections in the flood phase (0 skips it).
    #[arg(long, default_value_t = 50)]
    flood_conns: usize,
    /// Length of the flood phase (seconds).
    #[arg(long, default_value_t = 10)]
    flood_secs: u64,
    /// How long a flooding connection waits to reconnect after the server closed it
    /// (milliseconds; each reconnection registers again).
    #[arg(long, default_value_t = 0)]
    flood_reopen_ms: u64,
    /// Dials measured per latency phase.
    #[arg(long, default_value_t = 20)]
    dials: usize,
    /// `max_per_ip` for the server (default: the server's).
    #[arg(long)]
    max_per_ip: Option<usize>,
    /// The server binary [default: call-proxy-server next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Internal: run as an attacker child against this server.
    #[arg(long, hide = true)]
    attacker: Option<SocketAddr>,
    /// Internal: the attacker's first source address's last byte.
    #[arg(long, hide = true, default_value_t = 2)]
    first_source: u8,
    /// Internal: user ids of a registered attacker start here.
    #[arg(long, hide = true, default_value_t = 1_000_000)]
    first_user: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (soft, hard) = call_proxy_server::server::limits::raise_fd_limit()
        .context("cannot read the open-file limit")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(server) = args.attacker {
        return runtime.block_on(attacker(args, server));
    }
    println!(
        "machine: {} CPUs ({}); open-file limit {soft} (hard {hard})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        test_support::procfs::cpu_model(),
    );
    runtime.block_on(bench(args))
}

fn source(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Holds `args.silent` connections until killed, reopening those the server closes.
async fn attacker(args: Args, server: SocketAddr) -> Result<()> {
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.silent {
        let src = source(args.first_source + (i % usize::from(args.sources.max(1))) as u8);
        let user = args.first_user + i as u64;
        let registered = args.mode == "registered";
        let reopen = Duration::from_millis(args.reopen_ms);
        let opened = Arc::clone(&opened);
        tasks.push(tokio::spawn(async move {
            // Bounded: the parent kills this process at the end of the phase; a
            // connection is reopened at most 1,000 times.
            for _ in 0..1_000 {
                if registered {
                    let Ok(mut c) =
                        Client::connect_from(Some(SocketAddr::new(src, 0)), server).await
                    else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if c.register(user, 4000).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    opened.fetch_add(1, Ordering::Relaxed);
                    let _ = c.next_event().await; // until closed
                } else {
                    let Ok(sock) = TcpSocket::new_v4() else {
                        return;
                    };
                    if sock.bind(SocketAddr::new(src, 0)).is_err() {
                        return;
                    }
                    let Ok(mut s) = sock.connect(server).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 512];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                }
                if reopen.is_zero() {
                    return;
                }
                tokio::time::sleep(reopen).await;
            }
        }));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    // Tell the parent once every connection was opened once (or 60 s passed).
    let started = Instant::now();
    while opened.load(Ordering::Relaxed) < args.silent as u64
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("ready {}", opened.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!("attacker: {} opened", opened.load(Ordering::Relaxed));
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
    /// Its admin listener (for `/metrics`).
    admin: SocketAddr,
    log: PathBuf,
    /// Its data directory, removed at the end.
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = test_support::process::sigterm(self.child.id());
        if !matches!(
            test_support::process::wait_exit(&mut self.child, Duration::from_secs(10)),
            Ok(Some(_))
        ) {
            test_support::process::kill(&mut self.child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_server(args: &Args) -> Result<Server> {
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("call-proxy-server"),
    };
    ensure!(bin.is_file(), "server binary {} not found", bin.display());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "call-proxy-limitbench-{}-{stamp}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let port = test_support::net::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = dir.join("server.log");
    let admin = SocketAddr::from(([127, 0, 0, 1], test_support::net::free_port()?));
    let mut cmd = Command::new(&bin);
    cmd.args([
        "serve",
        "--insecure-plaintext",
        "--listen",
        &addr.to_string(),
    ])
    .args(["--admin-listen", &admin.to_string()])
    .env(call_proxy_server::admin::TOKEN_ENV, ADMIN_TOKEN)
    .arg("--db")
    .arg(dir.join("bench.sqlite"))
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log)?);
    if let Some(n) = args.max_per_ip {
        cmd.args(["--max-per-ip", &n.to_string()]);
    }
    let child = cmd.spawn().context("cannot start the server")?;
    let server = Server {
        child,
        addr,
        admin,
        log,
        dir,
    };
    ensure!(
        test_support::net::wait_listening(addr, Duration::from_secs(10)).await,
        "the server did not start listening"
    );
    Ok(server)
}

/// The bench server's admin token.
const ADMIN_TOKEN: &str = "limitbench-admin-token-0123456789";

/// The server's counters of limits and floods, from `/metrics` (one line).
async fn limit_metrics(admin: SocketAddr) -> String {
    const NAMES: [&str; 9] = [
        "call_proxy_rate_limited_total ",
        "call_proxy_connections ",
        "call_proxy_connections_unregistered ",
        "call_proxy_connections_shed_total ",
        "call_proxy_connections_refused_full_total ",
        "call_proxy_flood_closed_total ",
        "call_proxy_rate_limited_dropped_total ",
        "call_proxy_accept_errors_total ",
        "call_proxy_connections_refused_flooding_total ",
    ];
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        let req = format!(
            "GET /metrics HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        std::io::Result::Ok(body)
    };
    match tokio::time::timeout(Duration::from_secs(10), fetch).await {
        Ok(Ok(body)) => body
            .lines()
            .filter(|l| NAMES.iter().any(|n| l.starts_with(n)))
            .map(|l| l.trim_start_matches("call_proxy_").replace(' ', "="))
            .collect::<Vec<_>>()
            .join(" "),
        Ok(Err(e)) => format!("metrics unavailable: {e}"),
        Err(_) => "metrics unavailable: no answer in 10 s".into(),
    }
}

/// Registers `user` from 127.0.0.1 and says Bye; how long the registration took.
async fn genuine_registration(server: SocketAddr, user: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut c = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = Client::connect(server).await?;
        c.register(user, 5000).await?;
        anyhow::Ok(c)
    })
    .await
    .context("no answer in 10 s")??;
    let took = started.elapsed();
    let _ = c.request(Request::Bye).await;
    Ok(took)
}

async fn registrations(server: SocketAddr, n: usize, first_user: u64) -> (usize, Vec<Duration>) {
    let mut ok = Vec::new();
    for i in 0..n {
        match genuine_registration(server, first_user + i as u64).await {
            Ok(d) => ok.push(d),
            Err(e) => println!("  genuine registration {} failed: {e:#}", i + 1),
        }
    }
    (ok.len(), ok)
}

fn summary(d: &mut [Duration]) -> String {
    if d.is_empty() {
        return "none".into();
    }
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "median {:.2} ms, max {:.2} ms",
        ms(d[d.len() / 2]),
        ms(d[d.len() - 1])
    )
}

/// Dial latencies (dial → `Ringing`) over `pairs` caller/callee pairs, paced so that no
/// TV exceeds its request allowance.
async fn dial_latencies(pairs: &mut [(Client, Client, u64)], n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = i % pairs.len();
        let (caller, _callee, callee_id) = &mut pairs[k];
        let started = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            caller.request(Request::Dial {
                callee: *callee_id,
                key: None,
                srtp: None,
                ice: None,
            }),
        )
        .await
        .context("dial: no answer in 10 s")??;
        out.push(started.elapsed());
        let Reply::Dial(DialOutcome::Ringing { call_id, .. }) = reply else {
            bail!("dial: {reply:?}");
        };
        caller.request(Request::HangUp { call_id }).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(out)
}

/// One flooding connection: registers, then writes heartbeats as fast as it can while
/// discarding what comes back; reconnects when closed, until `until`.
async fn flooder(
    server: SocketAddr,
    user: u64,
    until: Instant,
    reopen: Duration,
    frames: Arc<AtomicU64>,
    closes: Arc<AtomicU64>,
) {
    let mut codec = ClientCodec::new();
    let mut batch = BytesMut::new();
    for id in 0..2_000u32 {
        let _ = codec.encode(
            &ClientMsg {
                id: 10 + id,
                request: Request::Heartbeat,
            },
            &mut batch,
        );
    }
    let mut hello = Preamble::client().encode().to_vec();
    let mut reg = BytesMut::new();
    let _ = codec.encode(
        &ClientMsg {
            id: 1,
            request: Request::Register(Register {
                user_id: user,
                media_port: 4000,
                agent_version: "flood".into(),
            }),
        },
        &mut reg,
    );
    hello.extend_from_slice(&reg);
    while Instant::now() < until {
        let Ok(sock) = TcpSocket::new_v4() else {
            return;
        };
        if sock.bind(SocketAddr::new(source(100), 0)).is_err() {
            return;
        }
        let Ok(stream) = sock.connect(server).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (mut rd, mut wr) = stream.into_split();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        if wr.write_all(&hello).await.is_ok() {
            while Instant::now() < until {
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
                frames.fetch_add(2_000, Ordering::Relaxed);
            }
        }
        closes.fetch_add(1, Ordering::Relaxed);
        reader.abort();
        tokio::time::sleep(reopen.min(until.saturating_duration_since(Instant::now()))).await;
    }
}

async fn bench(args: Args) -> Result<()> {
    let server = start_server(&args).await?;
    let addr = server.addr;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    if let Some(line) = log.lines().find(|l| l.contains("connection limits")) {
        println!(
            "server: {}",
            line.split("connection limits")
                .last()
                .unwrap_or(line)
                .trim()
        );
    }

    println!("== genuine registrations, unloaded");
    let (ok, mut unloaded) = registrations(addr, args.genuine, 1).await;
    println!(
        "  {ok} of {} succeeded: {}",
        args.genuine,
        summary(&mut unloaded)
    );

    if args.silent > 0 {
        println!(
            "== {} {} connections from {} addresses (reopened {} ms after being closed)",
            args.silent, args.mode, args.sources, args.reopen_ms
        );
        let per_child = 9_000usize;
        let children = args.silent.div_ceil(per_child);
        let exe = std::env::current_exe()?;
        let mut attackers: Vec<Child> = Vec::new();
        let mut left = args.silent;
        for c in 0..children {
            let n = left.min(per_child);
            left -= n;
            let child = Command::new(&exe)
                .args(["--attacker", &addr.to_string()])
                .args(["--silent", &n.to_string()])
                .args(["--sources", &args.sources.to_string()])
                .args(["--mode", &args.mode])
                .args(["--reopen-ms", &args.reopen_ms.to_string()])
                .args([
                    "--first-user",
                    &(1_000_000 + (c * per_child) as u64).to_string(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            attackers.push(child);
        }
        let started = Instant::now();
        for a in &mut attackers {
            if let Some(out) = a.stdout.take() {
                let line = tokio::task::spawn_blocking(move || {
                    use std::io::BufRead;
                    std::io::BufReader::new(out).lines().next()
                })
                .await?;
                println!(
                    "  attacker: {}",
                    line.and_then(Result::ok).unwrap_or_default()
                );
            }
        }
        println!(
            "  attack opened in {:.1} s; holding {} s",
            started.elapsed().as_secs_f64(),
            args.ramp_secs
        );
        tokio::time::sleep(Duration::from_secs(args.ramp_secs)).await;
        println!("  server: {}", limit_metrics(server.admin).await);
        let (ok, mut loaded) = registrations(addr, args.genuine, 100).await;
        println!(
            "  genuine under attack: {ok} of {} succeeded: {}",
            args.genuine,
            summary(&mut loaded)
        );
        println!("  server: {}", limit_metrics(server.admin).await);
        for mut a in attackers {
            test_support::process::kill(&mut a);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    if args.flood_conns > 0 {
        println!(
            "== flood: {} connections pipelining heartbeats for {} s (reconnecting {} ms after being closed)",
            args.flood_conns, args.flood_secs, args.flood_reopen_ms
        );
        let mut pairs = Vec::new();
        for k in 0..4u64 {
            let mut a = Client::connect(addr).await?;
            a.register(200 + k, 5000).await?;
            let mut b = Client::connect(addr).await?;
            b.register(300 + k, 6000).await?;
            pairs.push((a, b, 300 + k));
        }
        let mut unloaded = dial_latencies(&mut pairs, args.dials).await?;
        println!("  dial → Ringing unloaded: {}", summary(&mut unloaded));
        let frames = Arc::new(AtomicU64::new(0));
        let closes = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(args.flood_secs);
        let meter = test_support::procfs::CpuMeter::start(Some(server.child.id()));
        let started = Instant::now();
        let floods: Vec<_> = (0..args.flood_conns)
            .map(|k| {
                tokio::spawn(flooder(
                    addr,
                    500_000 + k as u64,
                    until,
                    Duration::from_millis(args.flood_reopen_ms),
                    Arc::clone(&frames),
                    Arc::clone(&closes),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut loaded = dial_latencies(&mut pairs, args.dials).await?;
        for f in floods {
            let _ = f.await;
        }
        let wall = started.elapsed();
        println!(
            "  dial → Ringing during the flood: {}",
            summary(&mut loaded)
        );
        println!(
            "  flood: {} frames handed to the kernel, {} connections closed by the server (each reconnected and registered again)",
            frames.load(Ordering::Relaxed),
            closes.load(Ordering::Relaxed)
        );
        println!("  {}", meter.line(wall));
        println!("  server: {}", limit_metrics(server.admin).await);
    }
    drop(server);
    Ok(())
}
