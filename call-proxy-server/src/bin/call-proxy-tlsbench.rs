//! Benchmark of the trusted control link (issue 12), side by side in one run: a spawned
//! `call-proxy-server` on plain TCP and one on TLS 1.3 with every TV enrolled, the same
//! number of TVs registering with the same concurrency on each. Reports registrations per
//! second with full TLS handshakes (each TV's own Ed25519 certificate, verified by the
//! server, and its credential looked up), with resumption (each TV reconnects with the
//! ticket of its first session), and the server's memory per idle TV on each. Last, the
//! floor under those figures: the same handshakes driven in memory on one thread (rustls
//! and its cryptography alone, both ends, no sockets), as CPU time per handshake.
//!
//! The TVs' credentials are written straight into the TLS server's database before it
//! starts (`seed_credentials`), as if each had been enrolled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use control_client::{Client, TlsClient, TvKey};
use futures::stream::{self, StreamExt};
use test_support::process::KillOnDrop;
use test_support::procfs::{rss_bytes, CpuMeter};
use tokio_util::either::Either;

#[derive(Parser, Debug)]
#[command(about = "Plain TCP vs TLS 1.3 registrations of call-proxy-server (loopback)")]
struct Args {
    /// TVs registering on each server.
    #[arg(long, default_value_t = 10_000)]
    tvs: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// The server binary [default: call-proxy-server next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Handshakes driven in memory to measure rustls and its cryptography alone.
    #[arg(long, default_value_t = 2_000)]
    in_memory: usize,
    /// Seconds to hold the idle TLS TVs after the memory reading (to look at the
    /// server with a heap profiler meanwhile).
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// Enrolled TVs' registrations timed with no attack and under each attack on the
    /// TLS port (garbage, stalled handshakes, a failed-login flood, oversized frames);
    /// 0 skips the phase.
    #[arg(long, default_value_t = 300)]
    attack_samples: usize,
    /// Load generator worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// A fresh directory under the system's temporary one, removed at the end.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("call-proxy-tlsbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(WorkDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A spawned server and where it keeps its files.
struct Server {
    child: KillOnDrop,
    addr: SocketAddr,
}

fn spawn_server(bin: &Path, dir: &Path, tls: bool) -> Result<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    if !tls {
        cmd.arg("--insecure-plaintext");
    }
    cmd.args(["--listen", &addr.to_string(), "--no-sync"])
        .arg("--db")
        .arg(dir.join("bench.sqlite"))
        .args(["--max-per-ip", "0", "--max-unregistered-per-ip", "100000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log"))?);
    let child = KillOnDrop(
        cmd.spawn()
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
    Ok(Server { child, addr })
}

/// One phase's result.
struct Phase {
    per_s: f64,
    resumed: usize,
    cpu: String,
}

/// Registers every TV (TLS with its own client if `tls` is given), `conc` at a time;
/// returns the open clients' count and the phase's figures.
async fn register_all(
    srv: &Server,
    tls: Option<&[TlsClient]>,
    n: usize,
    conc: usize,
    keep: bool,
) -> Result<(Vec<Client<control_client::Stream>>, Phase)> {
    let meter = CpuMeter::start(Some(srv.child.id()));
    let started = Instant::now();
    let addr = srv.addr;
    let results: Vec<Result<(Option<Client<control_client::Stream>>, bool)>> = stream::iter(0..n)
        .map(|i| async move {
            let user = 100_000 + i as u64;
            // Each TV from its own loopback address: binding port 0 on an address many
            // sockets use already makes the kernel search for a free port (cost grows
            // with the count), which would measure the kernel, not the server.
            let local = SocketAddr::from((
                [127, 1, ((i / 250) % 250 + 1) as u8, (i % 250 + 1) as u8],
                0,
            ));
            let (stream, resumed): (control_client::Stream, bool) = match tls {
                Some(tls) => {
                    let stream = tls[i].connect(addr, "127.0.0.1", Some(local)).await?;
                    let resumed =
                        stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    (Either::Right(stream), resumed)
                }
                None => (
                    Either::Left(control_client::client::tcp_connect(addr, Some(local)).await?),
                    false,
                ),
            };
            let mut c = Client::handshake(stream).await?;
            c.register(user, 5000).await?;
            let kept = if keep {
                Some(c)
            } else {
                c.bye().await?;
                None
            };
            anyhow::Ok((kept, resumed))
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut kept = Vec::new();
    let mut resumed = 0;
    for r in results {
        let (c, res) = r?;
        resumed += usize::from(res);
        kept.extend(c);
    }
    Ok((
        kept,
        Phase {
            per_s: n as f64 / wall.as_secs_f64(),
            resumed,
            cpu: meter.line(wall),
        },
    ))
}

async fn idle_memory(srv: &Server, baseline: u64, clients: usize) -> f64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_bytes(srv.child.id()).unwrap_or(0);
    (rss.saturating_sub(baseline)) as f64 / clients.max(1) as f64
}

async fn bench(args: Args) -> Result<()> {
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("call-proxy-server"),
    };
    println!(
        "machine: {} CPUs ({}); {} TVs, {} in flight, {} load-generator thread(s)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        test_support::procfs::cpu_model(),
        args.tvs,
        args.concurrency,
        args.threads
    );
    let work = WorkDir::new()?;

    // Plain TCP.
    let plain_dir = work.path().join("plain");
    std::fs::create_dir_all(&plain_dir)?;
    let plain = spawn_server(&bin, &plain_dir, false)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_bytes(plain.child.id()).unwrap_or(0);
    let (kept, p) = register_all(&plain, None, args.tvs, args.concurrency, true).await?;
    let plain_mem = idle_memory(&plain, base, kept.len()).await;
    drop(kept);
    println!(
        "plain TCP: {:.0} registrations/s; server memory per idle TV {plain_mem:.0} B",
        p.per_s
    );
    println!("  CPU: {}", p.cpu);
    drop(plain);

    // TLS, every TV enrolled.
    let tls_dir = work.path().join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let t = Instant::now();
    let keys: Vec<TvKey> = (0..args.tvs)
        .map(|_| TvKey::generate())
        .collect::<Result<_, _>>()?;
    let seeds: Vec<(Vec<u8>, u64)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.cert.to_vec(), 100_000 + i as u64))
        .collect();
    call_proxy_server::storage::sqlite::enroll::seed_credentials(
        &tls_dir.join("bench.sqlite"),
        &seeds,
    )?;
    println!(
        "({} TV keys made and enrolled in {:.1} s)",
        args.tvs,
        t.elapsed().as_secs_f64()
    );
    let srv = spawn_server(&bin, &tls_dir, true)?;
    let ca = std::fs::read(tls_dir.join("tls/ca.crt")).context("the server's CA")?;
    let clients: Vec<TlsClient> = keys
        .iter()
        .map(|k| TlsClient::new(&ca, k))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_bytes(srv.child.id()).unwrap_or(0);
    let (kept, full) = register_all(&srv, Some(&clients), args.tvs, args.concurrency, true).await?;
    let tls_mem = idle_memory(&srv, base, kept.len()).await;
    if args.hold_secs > 0 {
        println!(
            "holding {} idle TLS TVs for {} s (server pid {})",
            kept.len(),
            args.hold_secs,
            srv.child.id()
        );
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    }
    drop(kept);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "TLS 1.3, full handshakes: {:.0} registrations/s ({} resumed); server memory per idle TV {tls_mem:.0} B",
        full.per_s, full.resumed
    );
    println!("  CPU: {}", full.cpu);
    let (_, res) = register_all(&srv, Some(&clients), args.tvs, args.concurrency, false).await?;
    println!(
        "TLS 1.3, resumed: {:.0} registrations/s ({} of {} resumed)",
        res.per_s, res.resumed, args.tvs
    );
    println!("  CPU: {}", res.cpu);
    if args.attack_samples > 0 {
        attacks(&srv, &ca, &keys, args.attack_samples).await?;
    }
    let files = call_proxy_server::tls::ServerCertFiles {
        cert: tls_dir.join("tls/server.crt"),
        key: tls_dir.join("tls/server.key"),
        ca: None,
    };
    let server_cfg = call_proxy_server::tls::server_config(&files)?;
    let fresh: Vec<TlsClient> = keys
        .iter()
        .take(args.in_memory)
        .map(|k| TlsClient::new(&ca, k))
        .collect::<Result<_, _>>()?;
    let (full_cpu, resumed_cpu) = in_memory(&server_cfg, &fresh, args.in_memory)?;
    println!(
        "TLS 1.3 in memory (no sockets, both ends on one thread, {} TVs): full {:.0} us, resumed {:.0} us of CPU per handshake",
        fresh.len(),
        full_cpu.as_secs_f64() * 1e6,
        resumed_cpu.as_secs_f64() * 1e6
    );
    Ok(())
}

/// One enrolled TV's registration as a TV does it after power-on (a full TLS handshake:
/// a fresh client, no ticket), from `local`: connect, TLS, preamble, `Register`, reply.
async fn timed_registration(
    srv: &Server,
    ca: &[u8],
    key: &TvKey,
    user: u64,
    local: SocketAddr,
) -> Result<Duration> {
    let tls = TlsClient::new(ca, key)?;
    let started = Instant::now();
    let stream = tls.connect(srv.addr, "127.0.0.1", Some(local)).await?;
    let mut c = Client::handshake(stream).await?;
    c.register(user, 5000).await?;
    let took = started.elapsed();
    c.bye().await?;
    Ok(took)
}

/// p50 and p99 of `samples` enrolled TVs' registrations, one after another.
async fn registration_latency(
    srv: &Server,
    ca: &[u8],
    keys: &[TvKey],
    samples: usize,
) -> Result<(Duration, Duration)> {
    let mut took = Vec::with_capacity(samples);
    for (i, key) in keys.iter().take(samples).enumerate() {
        let local = SocketAddr::from(([127, 5, (i / 250) as u8, (i % 250 + 1) as u8], 0));
        took.push(timed_registration(srv, ca, key, 100_000 + i as u64, local).await?);
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 - 1.0) * q).round() as usize];
    ensure!(!took.is_empty(), "no samples");
    Ok((at(0.5), at(0.99)))
}

/// One attack on the TLS port, run by `tasks` loops until `stop`; returns how many
/// attempts were made.
async fn attack_loop(
    kind: &'static str,
    spread: bool,
    addr: SocketAddr,
    ca: Vec<u8>,
    tasks: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    let stranger = match TvKey::generate().and_then(|k| TlsClient::new(&ca, &k)) {
        Ok(t) => t,
        Err(_) => return 0,
    };
    let mut handles = Vec::new();
    for t in 0..tasks {
        let stop = stop.clone();
        let stranger = stranger.clone();
        handles.push(tokio::spawn(async move {
            let mut n = 0usize;
            // Bounded in count as well as by the phase's end.
            while !*stop.borrow() && n < 20_000 {
                n += 1;
                // One address, or 250 per loop (each used once in 250 attempts).
                let local = if spread {
                    SocketAddr::from(([127, 7, (t % 250) as u8, (n % 250 + 1) as u8], 0))
                } else {
                    SocketAddr::from(([127, 6, 0, 1], 0))
                };
                let attempt = async {
                    match kind {
                        "garbage" => {
                            let mut s =
                                control_client::client::tcp_connect(addr, Some(local)).await?;
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            s.write_all(&[0x5a; 1024]).await?;
                            let mut sink = [0u8; 512];
                            while s.read(&mut sink).await? > 0 {}
                        }
                        "failed logins" => {
                            let stream = stranger.connect(addr, "127.0.0.1", Some(local)).await?;
                            let mut c = Client::handshake(stream).await?;
                            let _ = c.register(7_000_000, 5000).await;
                        }
                        _ => {
                            // An oversized frame: a length prefix of 16 MiB after the
                            // preamble, inside TLS.
                            let stream = stranger.connect(addr, "127.0.0.1", Some(local)).await?;
                            let mut c = Client::handshake(stream).await?;
                            let mut frame = (16u32 << 20).to_be_bytes().to_vec();
                            frame.extend_from_slice(&[0u8; 64]);
                            c.send_raw(&frame).await?;
                            let _ = c.next_event().await;
                        }
                    }
                    anyhow::Ok(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), attempt).await;
            }
            n
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap_or(0);
    }
    total
}

/// Enrolled TVs' registration latency with no attack and under each attack on the TLS
/// port, side by side.
async fn attacks(srv: &Server, ca: &[u8], keys: &[TvKey], samples: usize) -> Result<()> {
    let (p50, p99) = registration_latency(srv, ca, keys, samples).await?;
    println!(
        "enrolled TVs' registrations (full handshake), no attack: p50 {:.2} ms, p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    // Stalled handshakes: TCP connections that never send a byte, held open.
    let mut stalled = Vec::new();
    for i in 0..2_000u32 {
        let local = SocketAddr::from(([127, 8, (i / 250) as u8, (i % 250 + 1) as u8], 0));
        if let Ok(s) = control_client::client::tcp_connect(srv.addr, Some(local)).await {
            stalled.push(s);
        }
    }
    let (p50, p99) = registration_latency(srv, ca, keys, samples).await?;
    println!(
        "  under {} stalled handshakes: p50 {:.2} ms, p99 {:.2} ms",
        stalled.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    drop(stalled);
    for (kind, spread, tasks) in [
        ("garbage", false, 16),
        ("failed logins", false, 32),
        ("oversized frames", false, 16),
        ("garbage", true, 16),
        ("oversized frames", true, 16),
    ] {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The attacker runs on its own thread and runtime, as another process would:
        // the timed TVs never wait behind its tasks in this process's scheduler.
        let (addr, ca_owned) = (srv.addr, ca.to_vec());
        let attack = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_or(0, |rt| {
                    rt.block_on(attack_loop(kind, spread, addr, ca_owned, tasks, stop_rx))
                })
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let measured = registration_latency(srv, ca, keys, samples).await;
        let _ = stop_tx.send(true);
        let attempts = attack.join().unwrap_or(0);
        let (p50, p99) = measured?;
        let from = if spread {
            format!("from {} addresses", tasks * 250)
        } else {
            "from one address".to_string()
        };
        println!(
            "  under {kind} {from} ({tasks} loops, {attempts} attempts): p50 {:.2} ms, p99 {:.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// Moves every pending TLS record from `from` to `to` and lets `to` process them.
fn transfer(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    buf: &mut Vec<u8>,
) -> Result<bool> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf)?;
    }
    if buf.is_empty() {
        return Ok(false);
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd)?;
        to.process_new_packets()?;
    }
    Ok(true)
}

/// The floor under the socket figures: `n` TLS handshakes (the server's and the TVs'
/// real configurations, each TV its own key) driven in memory on this thread, no
/// sockets, no runtime: rustls and its cryptography alone, both ends. Returns the CPU
/// time per handshake, full then resumed.
fn in_memory(
    server: &std::sync::Arc<rustls::ServerConfig>,
    clients: &[TlsClient],
    n: usize,
) -> Result<(Duration, Duration)> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut one = |client: &TlsClient| -> Result<bool> {
        let mut c = rustls::ClientConnection::new(client.config(), name.clone())?;
        let mut s = rustls::ServerConnection::new(std::sync::Arc::clone(server))?;
        // Until the server's ticket has reached the client: the whole exchange a
        // registering TV sees before its first request.
        for _ in 0..16 {
            let a = transfer(&mut c, &mut s, &mut buf)?;
            let b = transfer(&mut s, &mut c, &mut buf)?;
            if !a && !b && !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        ensure!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake stuck"
        );
        Ok(c.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    };
    let n = n.min(clients.len());
    let mut per = [Duration::ZERO; 2];
    for (round, want_resumed) in [(0, false), (1, true)] {
        let cpu = test_support::procfs::thread_cpu();
        for client in &clients[..n] {
            ensure!(one(client)? == want_resumed, "unexpected handshake kind");
        }
        per[round] = (test_support::procfs::thread_cpu() - cpu) / n.max(1) as u32;
    }

    Ok((per[0], per[1]))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = call_proxy_server::server::limits::raise_fd_limit() {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    test_support::process::bench_main("call-proxy-tlsbench", args.threads, bench(args))
}
