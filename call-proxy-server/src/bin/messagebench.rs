//! Benchmark of messages (issue 15) against a spawned `call-proxy-server` on TLS 1.3 with
//! enrolled TVs and a durable SQLite database (`synchronous = FULL`), all on loopback:
//! - texts: `--senders` TVs leave 1 KB texts for switched-off TVs, each keeping
//!   `--window` sends in flight on its transfer link, for `--texts-secs`; messages
//!   answered `stored` per second (each after its commit), and the server's CPU;
//! - power-on: a switched-off TV with 20 texts waiting connects, registers, opens its
//!   transfer link and lists them (time to the page); another with 20 voice messages of
//!   about 100 KB (`--voice`) also fetches every body, writes each to a file, fsyncs it
//!   and acknowledges (time to all saved), `--rounds` times each;
//! - one 10 MB clip (`--clip`) uploaded (8 chunks of 48 KiB in flight, as the agent
//!   does) and downloaded: MB/s, and the server's CPU seconds per MB;
//! - `--concurrent` TVs uploading that clip at once: the server's peak RSS against its
//!   idle RSS;
//! - ring latency (dial → `Ringing`) to a TV while that TV uploads the clip on its
//!   transfer link (at `--uplink-mbit`, and as fast as loopback allows), against the
//!   same dials with no upload, `--dials` each.
//!
//! The rate limit per connection is raised for the text phase (a real TV sends a few
//! messages, not thousands a second; the figure is the server's capacity). Bodies are
//! real media (the server checks each).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use control_client::{Client, Incoming, TlsClient, TvKey};
use futures::stream::{self, StreamExt};
use shared_proto::{
    BodyRef, DialOutcome, MessageKind, MessageSent, Reply, Request, SendMessage, SendOutcome,
    UserId, MAX_CHUNK,
};
use test_support::process::KillOnDrop;
use test_support::procfs::{rss_bytes, CpuMeter};
use test_support::stats::{ms, pct};

#[derive(Parser, Debug)]
#[command(
    about = "Messages: texts stored/s, power-on listing and fetching, 10 MB bodies, memory, ring latency during uploads"
)]
struct Args {
    /// TVs leaving texts at once.
    #[arg(long, default_value_t = 50)]
    senders: usize,
    /// Sends each sender keeps in flight.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Length of the text phase.
    #[arg(long, default_value_t = 5)]
    texts_secs: u64,
    /// Switched-off TVs the texts are for.
    #[arg(long, default_value_t = 500)]
    recipients: u64,
    /// A voice message of about 100 KB (Ogg Opus).
    #[arg(long)]
    voice: PathBuf,
    /// A clip of about 10 MB (MP4, H.264).
    #[arg(long)]
    clip: PathBuf,
    /// Power-on rounds.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// TVs uploading the clip at once, for the memory figure.
    #[arg(long, default_value_t = 100)]
    concurrent: usize,
    /// The uplink of the uploading TV in the paced ring-latency series, in Mbit/s.
    #[arg(long, default_value_t = 50.0)]
    uplink_mbit: f64,
    /// Dials in each ring-latency series.
    #[arg(long, default_value_t = 200)]
    dials: usize,
    /// Where the server keeps bodies [default: beside its database, in a temporary
    /// directory] (another file system separates their fsyncs from the database's).
    #[arg(long)]
    body_dir: Option<PathBuf>,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The server binary [default: call-proxy-server next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

type Tv = Client<control_client::Stream>;

/// The switched-off TVs of the text phase: the synthetic users of `fill_synthetic`.
const FIRST_RECIPIENT: UserId = 1_000_000;
/// The TVs of the later phases.
const LISTER: UserId = 900_001;
const FETCHER: UserId = 900_002;
const CALLER: UserId = 900_003;
const UPLOADER: UserId = 900_004;
const FIRST_SENDER: UserId = 1;
const FIRST_UPLOADER: UserId = 800_000;

/// Every TV's key, by user.
struct Keys {
    ca: Vec<u8>,
    tls: std::collections::HashMap<UserId, TlsClient>,
}

impl Keys {
    fn client(&self, user: UserId) -> Result<&TlsClient> {
        self.tls.get(&user).context("no key for that TV")
    }
}

async fn bench(args: Args) -> Result<()> {
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("call-proxy-server"),
    };
    let voice = std::fs::read(&args.voice).context("--voice")?;
    let clip = std::fs::read(&args.clip).context("--clip")?;
    println!(
        "machine: {} CPUs ({}); load generator on {} thread(s); voice message {} KB, clip {:.1} MB",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        test_support::procfs::cpu_model(),
        args.threads,
        voice.len() / 1000,
        clip.len() as f64 / 1e6
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.sqlite");
    call_proxy_server::storage::sqlite::operator::fill_synthetic(&db, args.recipients, 0)?;
    let mut users: Vec<UserId> = (0..args.senders as u64).map(|i| FIRST_SENDER + i).collect();
    users.extend([LISTER, FETCHER, CALLER, UPLOADER]);
    users.extend((0..args.concurrent as u64).map(|i| FIRST_UPLOADER + i));
    let keys: Vec<TvKey> = users
        .iter()
        .map(|_| TvKey::generate())
        .collect::<Result<_, _>>()?;
    let seeds: Vec<(Vec<u8>, UserId)> = keys
        .iter()
        .zip(&users)
        .map(|(k, &u)| (k.cert.to_vec(), u))
        .collect();
    call_proxy_server::storage::sqlite::enroll::seed_credentials(&db, &seeds)?;
    let mut toml =
        "requests_per_sec = 1000000\nrequest_burst = 1000000\nmailbox_messages = 1000000\n\
         mailbox_mb = 1000000\nmax_connections = 10000\n"
            .to_string();
    if let Some(b) = &args.body_dir {
        toml.push_str(&format!("body_dir = {:?}\n", b.display().to_string()));
    }
    std::fs::write(dir.path().join("bench.toml"), toml)?;
    let (child, addr) = spawn_server(&bin, dir.path()).await?;
    let ca = std::fs::read(dir.path().join("tls/ca.crt")).context("the server's CA")?;
    let tls = keys
        .iter()
        .zip(&users)
        .map(|(k, &u)| Ok((u, TlsClient::new(&ca, k)?)))
        .collect::<Result<_>>()?;
    let keys = Keys { ca, tls };
    let _ = &keys.ca;
    // Every TV that is ever a recipient exists, switched off.
    for tv in [LISTER, FETCHER, UPLOADER] {
        let mut c = connect(&keys, addr, tv).await?;
        c.register(tv, 5000).await?;
        c.bye().await?;
    }

    texts(&args, &keys, addr, child.id()).await?;
    power_on(&args, &keys, addr, &voice, dir.path()).await?;
    // Ring latency before the phases that write gigabytes (their writeback would land
    // in the quiet series).
    ring_during_upload(&args, &keys, addr, &clip).await?;
    bodies(&keys, addr, &clip, child.id()).await?;
    memory(&args, &keys, addr, &clip, child.id()).await?;
    drop(child);
    Ok(())
}

/// The text phase.
async fn texts(args: &Args, keys: &Keys, addr: SocketAddr, server: u32) -> Result<()> {
    let mut links: Vec<Tv> = stream::iter(0..args.senders as u64)
        .map(|i| async move { transfer(keys, addr, FIRST_SENDER + i).await })
        .buffered(32)
        .collect::<Vec<Result<Tv>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let text: String = "x".repeat(1024);
    let stored = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let meter = CpuMeter::start(Some(server));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut link) in links.drain(..).enumerate() {
        let (stored, stop, text) = (Arc::clone(&stored), Arc::clone(&stop), text.clone());
        let (window, recipients) = (args.window, args.recipients);
        tasks.push(tokio::spawn(async move {
            let conn = link.connection();
            let mut key = 0u64;
            let mut in_flight = 0usize;
            loop {
                while in_flight < window && !stop.load(Ordering::Relaxed) {
                    key += 1;
                    let to = FIRST_RECIPIENT + (i as u64 * 7919 + key) % recipients;
                    conn.send(send_text(to, key, &text)).await?;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return anyhow::Ok(());
                }
                if let Incoming::Reply { result, .. } = conn.recv().await? {
                    in_flight -= 1;
                    match result {
                        Ok(Reply::MessageSent(MessageSent {
                            outcome: SendOutcome::STORED,
                            ..
                        })) => {
                            stored.fetch_add(1, Ordering::Relaxed);
                        }
                        other => bail!("a text was not stored: {other:?}"),
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.texts_secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let wall = started.elapsed();
    let n = stored.load(Ordering::Relaxed);
    println!(
        "texts: {} senders × {} in flight, 1 KB each, durable: {n} stored in {:.1} s = {:.0} messages/s",
        args.senders,
        args.window,
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
    println!("  CPU: {}", meter.line(wall));
    Ok(())
}

fn send_text(to: UserId, key: u64, text: &str) -> Request {
    Request::SendMessage(SendMessage {
        to,
        key,
        kind: MessageKind::TEXT,
        text: text.to_string(),
        body: None,
    })
}

/// The power-on phase.
async fn power_on(
    args: &Args,
    keys: &Keys,
    addr: SocketAddr,
    voice: &[u8],
    dir: &Path,
) -> Result<()> {
    let mut sender = transfer(keys, addr, CALLER).await?;
    let (mut listed, mut saved) = (Vec::new(), Vec::new());
    let mut key = 1_000_000u64;
    for round in 0..args.rounds {
        for _ in 0..20 {
            key += 1;
            let r = sender
                .request(send_text(LISTER, key, "call me back"))
                .await?;
            ensure!(matches!(r, Reply::MessageSent(_)), "{r:?}");
            key += 1;
            upload(&mut sender, FETCHER, key, MessageKind::VOICE, voice).await?;
        }
        // Power-on, then the page of 20.
        let t0 = Instant::now();
        let mut tv = connect(keys, addr, LISTER).await?;
        tv.register(LISTER, 5000).await?;
        let mut link = transfer(keys, addr, LISTER).await?;
        let page = list(&mut link).await?;
        listed.push(t0.elapsed());
        ensure!(page.len() == 20, "round {round}: {} listed", page.len());
        settle(&mut link, &page, true).await?;
        drop((tv, link));

        // Power-on, the page, every body saved and synced, acknowledged.
        let t0 = Instant::now();
        let mut tv = connect(keys, addr, FETCHER).await?;
        tv.register(FETCHER, 5000).await?;
        let mut link = transfer(keys, addr, FETCHER).await?;
        let page = list(&mut link).await?;
        ensure!(page.len() == 20, "round {round}: {} listed", page.len());
        let inbox = dir.join(format!("inbox-{round}"));
        std::fs::create_dir_all(&inbox)?;
        for m in &page {
            let b = m
                .body
                .as_ref()
                .context("a voice message without its body")?;
            let body = download(&mut link, m.message_id, b.size).await?;
            let sha = ring::digest::digest(&ring::digest::SHA256, &body);
            ensure!(
                sha.as_ref() == b.sha256.as_slice(),
                "a body's SHA-256 differs"
            );
            let path = inbox.join(format!("{}.opus", m.message_id));
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, &body)?;
            f.sync_all()?;
        }
        std::fs::File::open(&inbox)?.sync_all()?;
        settle(&mut link, &page, true).await?;
        saved.push(t0.elapsed());
        // Deleted, so the next round's page is 20 again.
        settle(&mut link, &page, false).await?;
        drop((tv, link));
    }
    listed.sort_unstable();
    saved.sort_unstable();
    println!(
        "power-on (TLS connect, register, transfer link) to 20 waiting messages listed, {} rounds: p50 {:.2} ms, max {:.2} ms",
        args.rounds,
        ms(pct(&listed, 0.5)),
        ms(pct(&listed, 1.0))
    );
    println!(
        "power-on to 20 voice messages of {} KB fetched, each checked against its SHA-256, written and fsynced, acknowledged: p50 {:.2} ms, max {:.2} ms",
        voice.len() / 1000,
        ms(pct(&saved, 0.5)),
        ms(pct(&saved, 1.0))
    );
    Ok(())
}

/// One 10 MB body up and down.
async fn bodies(keys: &Keys, addr: SocketAddr, clip: &[u8], server: u32) -> Result<()> {
    let mut up = transfer(keys, addr, CALLER).await?;
    let meter = CpuMeter::start(Some(server));
    let t0 = Instant::now();
    let id = upload(&mut up, UPLOADER, 2_000_000, MessageKind::VIDEO, clip).await?;
    let took_up = t0.elapsed();
    let cpu_up = meter.used().server.unwrap_or(f64::NAN);
    let mut link = transfer(keys, addr, UPLOADER).await?;
    let meter = CpuMeter::start(Some(server));
    let t0 = Instant::now();
    let body = download(&mut link, id, clip.len() as u64).await?;
    let took_down = t0.elapsed();
    let cpu_down = meter.used().server.unwrap_or(f64::NAN);
    ensure!(body == clip, "the clip came back different");
    link.request(Request::DeleteMessages {
        message_ids: vec![id],
    })
    .await?;
    let mb = clip.len() as f64 / 1e6;
    println!(
        "10 MB body: upload (stored, checked, synced) {:.0} MB/s ({:.0} ms), server CPU {:.1} ms/MB; download {:.0} MB/s ({:.0} ms), server CPU {:.1} ms/MB",
        mb / took_up.as_secs_f64(),
        ms(took_up),
        cpu_up * 1e3 / mb,
        mb / took_down.as_secs_f64(),
        ms(took_down),
        cpu_down * 1e3 / mb
    );
    Ok(())
}

/// `--concurrent` uploads of the clip at once: the server's memory.
async fn memory(
    args: &Args,
    keys: &Keys,
    addr: SocketAddr,
    clip: &[u8],
    server: u32,
) -> Result<()> {
    let links: Vec<Tv> = stream::iter(0..args.concurrent as u64)
        .map(|i| async move { transfer(keys, addr, FIRST_UPLOADER + i).await })
        .buffered(32)
        .collect::<Vec<Result<Tv>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_bytes(server)?;
    let clip = Arc::new(clip.to_vec());
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut peak = 0u64;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(server).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let t0 = Instant::now();
    let tasks: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(i, mut link)| {
            let clip = Arc::clone(&clip);
            tokio::spawn(async move {
                upload(
                    &mut link,
                    UPLOADER,
                    3_000_000 + i as u64,
                    MessageKind::VIDEO,
                    &clip,
                )
                .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await??);
    }
    let wall = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await?;
    println!(
        "{} concurrent uploads of {:.1} MB ({:.0} MB in {:.1} s): server RSS idle {:.1} MiB, peak {:.1} MiB (+{:.1} MiB, {:.0} KiB per upload)",
        args.concurrent,
        clip.len() as f64 / 1e6,
        (clip.len() * args.concurrent) as f64 / 1e6,
        wall.as_secs_f64(),
        idle as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        peak.saturating_sub(idle) as f64 / 1048576.0,
        peak.saturating_sub(idle) as f64 / 1024.0 / args.concurrent as f64
    );
    let mut link = transfer(keys, addr, UPLOADER).await?;
    for chunk in ids.chunks(100) {
        link.request(Request::DeleteMessages {
            message_ids: chunk.to_vec(),
        })
        .await?;
    }
    Ok(())
}

/// Ring latency to a TV with no upload, while it uploads the clip at `--uplink-mbit`
/// (a home uplink), and while it uploads as fast as loopback allows.
async fn ring_during_upload(args: &Args, keys: &Keys, addr: SocketAddr, clip: &[u8]) -> Result<()> {
    let mut caller = connect(keys, addr, CALLER).await?;
    caller.register(CALLER, 5000).await?;
    let mut callee = connect(keys, addr, UPLOADER).await?;
    callee.register(UPLOADER, 5002).await?;
    // The callee's events are drained in the background (its rings), and it sends its
    // heartbeats, as a TV does.
    let drain = tokio::spawn(async move {
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                e = callee.next_event() => if e.is_err() { return },
                _ = beat.tick() => {
                    if callee.connection().send(Request::Heartbeat).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let quiet = dials(&mut caller, args.dials).await?;
    println!(
        "ring latency (dial → Ringing) to a TV, {} dials per series: no upload p50 {:.2} ms, p99 {:.2} ms",
        args.dials,
        ms(pct(&quiet, 0.5)),
        ms(pct(&quiet, 0.99)),
    );
    let mut key = 4_000_000u64;
    for rate in [Some(args.uplink_mbit * 1e6 / 8.0), None] {
        // Its transfer link uploads the clip again and again while the caller dials it.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut link = transfer(keys, addr, UPLOADER).await?;
        let first = key;
        key += 1_000;
        let uploader = {
            let (stop, sent, clip) = (Arc::clone(&stop), Arc::clone(&sent), clip.to_vec());
            tokio::spawn(async move {
                let mut key = first;
                let mut ids = Vec::new();
                while !stop.load(Ordering::Relaxed) && key < first + 1_000 {
                    key += 1;
                    let upload =
                        upload_paced(&mut link, LISTER, key, MessageKind::VIDEO, &clip, rate);
                    // Stopped mid-upload when the dials are done.
                    tokio::select! {
                        id = upload => ids.push(id?),
                        _ = wait_for(&stop) => break,
                    }
                    sent.fetch_add(clip.len() as u64, Ordering::Relaxed);
                }
                anyhow::Ok(ids)
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        let busy = dials(&mut caller, args.dials).await?;
        let wall = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let ids = uploader.await??;
        let mut settle_link = transfer(keys, addr, LISTER).await?;
        for chunk in ids.chunks(100) {
            settle_link
                .request(Request::DeleteMessages {
                    message_ids: chunk.to_vec(),
                })
                .await?;
        }
        println!(
            "  while it uploads the clip {}: p50 {:.2} ms, p99 {:.2} ms ({} uploads finished during the series, {:.1} MB/s)",
            match rate {
                Some(r) => format!("at {:.0} Mbit/s", r * 8.0 / 1e6),
                None => "as fast as loopback allows".to_string(),
            },
            ms(pct(&busy, 0.5)),
            ms(pct(&busy, 0.99)),
            ids.len(),
            sent.load(Ordering::Relaxed) as f64 / 1e6 / wall.as_secs_f64(),
        );
    }
    drain.abort();
    Ok(())
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` dials to the uploader, each hung up at once, 50 ms apart; sorted latencies.
async fn dials(caller: &mut Tv, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            caller.request(Request::Dial {
                callee: UPLOADER,
                key: None,
                srtp: None,
                ice: None,
            }),
        )
        .await
        .context("dial: no answer in 10 s")??;
        out.push(t0.elapsed());
        let Reply::Dial(DialOutcome::Ringing { call_id, .. }) = reply else {
            bail!("dial: {reply:?}");
        };
        caller.request(Request::HangUp { call_id }).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out.sort_unstable();
    Ok(out)
}

/// Leaves a message with `body` for `to`: announced, sent in 48 KiB chunks with eight in
/// flight, sealed. Its id.
async fn upload(
    link: &mut Tv,
    to: UserId,
    key: u64,
    kind: MessageKind,
    body: &[u8],
) -> Result<u64> {
    upload_paced(link, to, key, kind, body, None).await
}

/// [`upload`], at most `bytes_per_sec` when given (a TV's uplink).
async fn upload_paced(
    link: &mut Tv,
    to: UserId,
    key: u64,
    kind: MessageKind,
    body: &[u8],
    bytes_per_sec: Option<f64>,
) -> Result<u64> {
    let sha = ring::digest::digest(&ring::digest::SHA256, body)
        .as_ref()
        .to_vec();
    let req = Request::SendMessage(SendMessage {
        to,
        key,
        kind,
        text: String::new(),
        body: Some(BodyRef {
            size: body.len() as u64,
            sha256: sha,
        }),
    });
    let have = match link.request(req.clone()).await? {
        Reply::UploadFrom { have } => have as usize,
        other => bail!("announcing a body: {other:?}"),
    };
    let conn = link.connection();
    let (mut at, mut in_flight) = (have, 0usize);
    let started = tokio::time::Instant::now();
    while at < body.len() || in_flight > 0 {
        while at < body.len() && in_flight < 8 {
            if let Some(rate) = bytes_per_sec {
                let due = started + Duration::from_secs_f64((at - have) as f64 / rate);
                tokio::time::sleep_until(due).await;
            }
            let end = (at + MAX_CHUNK).min(body.len());
            conn.send(Request::PutChunk {
                key,
                offset: at as u64,
                bytes: body[at..end].to_vec(),
            })
            .await?;
            at = end;
            in_flight += 1;
        }
        if let Incoming::Reply { result, .. } = conn.recv().await? {
            in_flight -= 1;
            match result {
                Ok(Reply::ChunkStored { .. }) => {}
                other => bail!("a chunk: {other:?}"),
            }
        }
    }
    match link.request(req).await? {
        Reply::MessageSent(MessageSent { message_id, .. }) => Ok(message_id),
        other => bail!("sealing a body: {other:?}"),
    }
}

/// A body fetched in 48 KiB chunks, eight in flight.
async fn download(link: &mut Tv, id: u64, size: u64) -> Result<Vec<u8>> {
    let mut out = vec![0u8; usize::try_from(size)?];
    let conn = link.connection();
    let mut pending = std::collections::HashMap::new();
    let (mut at, mut got) = (0u64, 0u64);
    while got < size {
        while at < size && pending.len() < 8 {
            let len = (size - at).min(MAX_CHUNK as u64) as u32;
            let rid = conn
                .send(Request::GetChunk {
                    message_id: id,
                    offset: at,
                    len,
                })
                .await?;
            pending.insert(rid, at);
            at += u64::from(len);
        }
        if let Incoming::Reply { id: rid, result } = conn.recv().await? {
            let offset = pending.remove(&rid).context("an unasked chunk")? as usize;
            match result {
                Ok(Reply::Chunk { bytes, .. }) => {
                    out[offset..offset + bytes.len()].copy_from_slice(&bytes);
                    got += bytes.len() as u64;
                }
                other => bail!("a chunk: {other:?}"),
            }
        }
    }
    Ok(out)
}

async fn list(link: &mut Tv) -> Result<Vec<shared_proto::MessageInfo>> {
    match link
        .request(Request::ListMessages {
            before: 0,
            limit: 20,
        })
        .await?
    {
        Reply::Messages(p) => Ok(p.messages),
        other => bail!("listing: {other:?}"),
    }
}

/// Acknowledges (`ack`) or deletes what `page` lists.
async fn settle(link: &mut Tv, page: &[shared_proto::MessageInfo], ack: bool) -> Result<()> {
    let message_ids: Vec<u64> = page.iter().map(|m| m.message_id).collect();
    let req = if ack {
        Request::AckMessages { message_ids }
    } else {
        Request::DeleteMessages { message_ids }
    };
    link.request(req).await?;
    Ok(())
}

/// `user`'s TV connected over TLS (not registered).
async fn connect(keys: &Keys, addr: SocketAddr, user: UserId) -> Result<Tv> {
    let stream = keys.client(user)?.connect(addr, "127.0.0.1", None).await?;
    Ok(Client::handshake(tokio_util::either::Either::Right(stream)).await?)
}

/// `user`'s TV's transfer link.
async fn transfer(keys: &Keys, addr: SocketAddr, user: UserId) -> Result<Tv> {
    let mut c = connect(keys, addr, user).await?;
    match c.request(Request::OpenTransfer { user_id: user }).await? {
        Reply::TransferOpen { .. } => Ok(c),
        other => bail!("OpenTransfer: {other:?}"),
    }
}

async fn spawn_server(bin: &Path, dir: &Path) -> Result<(KillOnDrop, SocketAddr)> {
    let port = test_support::net::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.join("bench.toml"))
        .args(["--listen", &addr.to_string()])
        .arg("--db")
        .arg(dir.join("bench.sqlite"))
        .args(["--max-per-ip", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log"))?);
    let child = test_support::process::spawn_listening(&mut cmd, addr, Duration::from_secs(10))
        .await
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((child, addr))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = call_proxy_server::server::limits::raise_fd_limit() {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    test_support::process::bench_main("call-proxy-messagebench", args.threads, bench(args))
}
