//! `tv-agent-bench`: benchmark programs for the TV agent (run by `scripts/bench-agent.sh`).
//!
//! - `boot`: time from `Agent::power_on` until the agent has registered and shown its
//!   cached calls, against a running call-proxy server (each sample a fresh user with K
//!   cached calls made for it first).
//! - `latency`: the media engine's own mouth-to-ear latency. Two `MediaSession`s on two
//!   loopback UDP sockets; A's source is silence with a loud burst every 400 ms, B's sink
//!   detects each burst's onset. Latency = play instant − capture instant per burst.
//!   Sound-card buffers are not included (there is no sound card).
//!
//! - `media-cpu`: CPU of both ends of one call in this process, plain RTP and SRTP side
//!   by side (`--srtp off,on`).
//! - `srtp-cipher`: protect + unprotect cost per packet of each SRTP suite (no I/O).
//!
//! All use a 2-worker Tokio runtime, as the `tv-agent` binary does.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::sync::broadcast;
use tokio::time::{timeout_at, Instant};
use tv_agent::agent::{
    bind_media, Agent, AgentConfig, AgentEvent, DialResult, MissedCall, MissedKeeping,
};
use tv_agent::media::audio::{AudioSink, AudioSource, FRAME, SAMPLE_RATE};
use tv_agent::media::srtp::{fresh_key, Protector, Unprotector};
use tv_agent::media::{AudioSpec, CallKeys, MediaParams, MediaSession};

#[derive(Parser)]
#[command(about = "Benchmarks for the TV agent")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Power-on to registered-and-cached-calls-shown, against a running server.
    Boot {
        /// The call-proxy server, host:port.
        #[arg(long)]
        server: String,
        /// Number of measured power-ons (each a fresh user).
        #[arg(long, default_value_t = 20)]
        samples: usize,
        /// Cached calls waiting for each user at power-on.
        #[arg(long, default_value_t = 1)]
        cached: usize,
        /// Seconds allowed for each step (power-on, each dial).
        #[arg(long, default_value_t = 10.0)]
        step_timeout: f64,
    },
    /// Software mouth-to-ear latency of two media sessions over loopback UDP.
    Latency {
        /// Seconds of audio.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Clicks captured in the first this many seconds are not counted (start-up).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// CPU of the media engine alone: both ends of one call in this process, each
    /// sending a looped WAV file (speech), at the given Opus encoder complexities.
    MediaCpu {
        /// 48 kHz 16-bit WAV file sent by both ends.
        #[arg(long)]
        wav: std::path::PathBuf,
        /// Seconds measured per complexity (after one second of warm-up).
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        /// Opus encoder complexities to measure (the agent uses 5).
        #[arg(long, value_delimiter = ',', default_value = "5,10")]
        complexity: Vec<i32>,
        /// Media protection to measure, each at every complexity: `off` (plain RTP, a
        /// peer that offered no key) and `on` (SRTP/SRTCP, AES_CM_128_HMAC_SHA1_80, as
        /// every call between current agents).
        #[arg(long, value_delimiter = ',', default_value = "off,on")]
        srtp: Vec<Protection>,
    },
    /// SRTP protect + unprotect per packet for each suite, in one thread, no I/O.
    SrtpCipher {
        /// Packets protected and unprotected per suite.
        #[arg(long, default_value_t = 200_000)]
        packets: u32,
        /// RTP payload bytes (a 24 kb/s Opus frame is about 60).
        #[arg(long, default_value_t = 60)]
        payload: usize,
    },
}

/// Plain RTP or SRTP, for `media-cpu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Protection {
    /// Plain RTP.
    Off,
    /// SRTP/SRTCP.
    On,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Bench::Boot {
                server,
                samples,
                cached,
                step_timeout,
            } => boot(server, samples, cached, step_timeout).await,
            Bench::Latency { seconds, warmup } => latency(seconds, warmup).await,
            Bench::MediaCpu {
                wav,
                seconds,
                complexity,
                srtp,
            } => media_cpu(&wav, seconds, &complexity, &srtp).await,
            Bench::SrtpCipher { packets, payload } => srtp_cipher(packets, payload),
        }
    })
}

/// `p` in 0..=1 of sorted `v` (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "n={} min={:.2} p50={:.2} p90={:.2} p95={:.2} max={:.2} ms",
        v.len(),
        percentile(v, 0.0),
        percentile(v, 0.5),
        percentile(v, 0.9),
        percentile(v, 0.95),
        percentile(v, 1.0)
    )
}

// ---------------------------------------------------------------------------------
// boot
// ---------------------------------------------------------------------------------

fn agent_config(server: &str, user: u64) -> AgentConfig {
    AgentConfig {
        user,
        server: server.to_string(),
        media_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise_port: None,
        ice: true,
        audio_in: AudioSpec::Null,
        audio_out: AudioSpec::Null,
        missed: MissedKeeping::Memory,
        transport: control_client::Transport::Plaintext,
        presence: None,
        inbox: None,
    }
}

/// Waits for the `CachedCalls` event; returns when `Registered` came and the calls.
async fn wait_cached(
    events: &mut broadcast::Receiver<AgentEvent>,
    deadline: Instant,
) -> anyhow::Result<(Option<Instant>, Vec<MissedCall>)> {
    let mut registered = None;
    let mut last_down = String::from("no event");
    loop {
        match timeout_at(deadline, events.recv()).await {
            Ok(Ok(AgentEvent::Registered { .. })) => registered = Some(Instant::now()),
            Ok(Ok(AgentEvent::CachedCalls { calls })) => return Ok((registered, calls)),
            Ok(Ok(AgentEvent::LinkDown { reason, .. })) => last_down = reason,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => bail!("event stream ended: {e}"),
            Err(_) => bail!("no cached calls shown in time (last link error: {last_down})"),
        }
    }
}

/// Powers `user` on, waits until it has shown its cached calls, powers it off.
async fn power_cycle(server: &str, user: u64, step: Duration) -> anyhow::Result<()> {
    let (agent, mut events) = Agent::power_on(agent_config(server, user)).await?;
    let r = wait_cached(&mut events, Instant::now() + step).await;
    agent.power_off().await;
    r.map(|_| ())
        .with_context(|| format!("power-on of user {user}"))
}

/// Makes `count` cached calls from `caller` to the (offline) `callee`.
async fn make_cached(
    server: &str,
    caller: u64,
    callee: u64,
    count: usize,
    step: Duration,
) -> anyhow::Result<()> {
    let (agent, mut events) = Agent::power_on(agent_config(server, caller)).await?;
    let result = async {
        wait_cached(&mut events, Instant::now() + step).await?;
        let mut made = 0;
        let mut deadline = Instant::now() + step;
        while made < count {
            if Instant::now() > deadline {
                bail!("dial {made} of {count} from {caller} to {callee} took too long");
            }
            match agent.dial(callee).await {
                DialResult::Cached(_) => {
                    made += 1;
                    deadline = Instant::now() + step;
                }
                DialResult::Ringing(_) => {
                    // The callee's power-off has not been recorded yet.
                    let _ = agent.hang_up().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                DialResult::Failed(m)
                    if m.contains("rate_limited") || m.contains("too many requests") =>
                {
                    // The server allows 20 requests/s per connection (burst 100).
                    tokio::time::sleep(Duration::from_millis(60)).await;
                }
                other => bail!("dial from {caller} to {callee}: {other:?}"),
            }
        }
        Ok(())
    }
    .await;
    agent.power_off().await;
    result
}

async fn boot(
    server: String,
    samples: usize,
    cached: usize,
    step_timeout: f64,
) -> anyhow::Result<()> {
    let step = Duration::from_secs_f64(step_timeout.max(0.1));
    // Fresh users on every run, even against a database that has seen earlier runs.
    let base: u64 = 1_000_000_000 + rand::random_range(0..1_000_000u64) * 100_000;
    let mut registered_ms = Vec::with_capacity(samples);
    let mut shown_ms = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let callee = base + 2 * i;
        let caller = callee + 1;
        power_cycle(&server, callee, step).await?;
        make_cached(&server, caller, callee, cached, step).await?;
        // Let the caller's power-off settle before timing.
        tokio::time::sleep(Duration::from_millis(20)).await;

        let start = Instant::now();
        let (agent, mut events) = Agent::power_on(agent_config(&server, callee)).await?;
        let waited = wait_cached(&mut events, start + step).await;
        let shown = Instant::now();
        agent.power_off().await;
        let (registered, calls) = waited.with_context(|| format!("timed power-on {i}"))?;
        if calls.len() != cached {
            bail!(
                "user {callee} was shown {} cached calls, expected {cached}",
                calls.len()
            );
        }
        if calls.iter().any(|c| c.user_id != caller) {
            bail!("user {callee} was shown a call from someone else");
        }
        let total = (shown - start).as_secs_f64() * 1000.0;
        if let Some(r) = registered {
            registered_ms.push((r - start).as_secs_f64() * 1000.0);
        }
        shown_ms.push(total);
        println!("boot sample {i}: cached={cached} shown_ms={total:.2}");
    }
    println!(
        "boot cached={cached} power_on->registered: {}",
        summary(&mut registered_ms)
    );
    println!(
        "boot cached={cached} power_on->cached_calls_shown: {}",
        summary(&mut shown_ms)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// latency
// ---------------------------------------------------------------------------------

/// One burst every this many frames (400 ms).
const CLICK_EVERY_FRAMES: u64 = 20;
/// Burst length: 10 ms.
const BURST_SAMPLES: usize = 480;
/// Burst amplitude (about −6 dBFS) and tone.
const BURST_AMPLITUDE: f64 = 16_000.0;
const BURST_HZ: f64 = 1_000.0;
/// An onset is the first sample at or above this...
const ONSET_LEVEL: i32 = 4_000;
/// ...after at least this many samples (100 ms) below this.
const QUIET_SAMPLES: usize = SAMPLE_RATE as usize / 10;
const QUIET_LEVEL: i32 = 300;
/// How soon after the silence ends the onset level must be reached (5 ms).
const RISE_SAMPLES: usize = 240;

fn frame_duration() -> Duration {
    Duration::from_secs_f64(FRAME as f64 / f64::from(SAMPLE_RATE))
}

fn samples_duration(n: usize) -> Duration {
    Duration::from_secs_f64(n as f64 / f64::from(SAMPLE_RATE))
}

#[derive(Default)]
struct Marks {
    /// Capture instants of each burst's first sample.
    captured: Mutex<Vec<std::time::Instant>>,
    /// Play instants of each detected onset.
    played: Mutex<Vec<std::time::Instant>>,
    /// Loudest sample played, and longest quiet run (diagnostics).
    loudest: std::sync::atomic::AtomicUsize,
    longest_quiet: std::sync::atomic::AtomicUsize,
}

fn push(list: &Mutex<Vec<std::time::Instant>>, at: std::time::Instant) -> anyhow::Result<()> {
    list.lock()
        .map_err(|_| anyhow::anyhow!("marks poisoned"))?
        .push(at);
    Ok(())
}

/// Silence with a 10 ms 1 kHz burst every 400 ms, starting at a random sample of the
/// frame. Called once per 20 ms frame when the frame is complete: sample k of a frame
/// read at instant t was captured at t − 20 ms + k/48000 s.
struct ClickSource {
    marks: Arc<Marks>,
    frame_no: u64,
    remaining: usize,
    phase: usize,
}

impl AudioSource for ClickSource {
    fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()> {
        let now = std::time::Instant::now();
        out.fill(0);
        let mut from = 0;
        if self.frame_no % CLICK_EVERY_FRAMES == 0 {
            from = rand::random_range(0..out.len());
            self.remaining = BURST_SAMPLES;
            self.phase = 0;
            if let Some(frame_start) = now.checked_sub(frame_duration()) {
                push(&self.marks.captured, frame_start + samples_duration(from))?;
            }
        }
        for s in out[from..].iter_mut() {
            if self.remaining == 0 {
                break;
            }
            let x = (std::f64::consts::TAU * BURST_HZ * self.phase as f64 / f64::from(SAMPLE_RATE))
                .cos();
            *s = (x * BURST_AMPLITUDE) as i16;
            self.phase += 1;
            self.remaining -= 1;
        }
        self.frame_no += 1;
        Ok(())
    }
}

struct SilenceSource;

impl AudioSource for SilenceSource {
    fn read_frame(&mut self, out: &mut [i16]) -> anyhow::Result<()> {
        out.fill(0);
        Ok(())
    }
}

/// Detects burst onsets: the first sample at or above [`ONSET_LEVEL`] within
/// [`RISE_SAMPLES`] of the end of at least 100 ms of near-silence (the decoded burst
/// rises over a few samples, and those must not count as the end of the silence only).
/// A frame handed over at instant t' plays sample j at t' + j/48000 s.
struct OnsetSink {
    marks: Arc<Marks>,
    /// Consecutive near-silent samples so far.
    quiet: usize,
    /// Samples left in which an onset counts (after a long enough silence ended).
    armed: usize,
}

impl AudioSink for OnsetSink {
    fn write_frame(&mut self, pcm: &[i16]) -> anyhow::Result<()> {
        let now = std::time::Instant::now();
        for (j, &s) in pcm.iter().enumerate() {
            let level = i32::from(s).abs();
            self.marks.loudest.fetch_max(level as usize, Relaxed);
            self.marks.longest_quiet.fetch_max(self.quiet, Relaxed);
            if level < QUIET_LEVEL {
                self.quiet = self.quiet.saturating_add(1);
                continue;
            }
            if self.quiet >= QUIET_SAMPLES {
                self.armed = RISE_SAMPLES;
            }
            self.quiet = 0;
            if self.armed > 0 {
                if level >= ONSET_LEVEL {
                    push(&self.marks.played, now + samples_duration(j))?;
                    self.armed = 0;
                } else {
                    self.armed -= 1;
                }
            }
        }
        Ok(())
    }
}

struct Discard;

impl AudioSink for Discard {
    fn write_frame(&mut self, _pcm: &[i16]) -> anyhow::Result<()> {
        Ok(())
    }
}

async fn latency(seconds: f64, warmup: f64) -> anyhow::Result<()> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let sock_a = Arc::new(bind_media(loopback)?);
    let sock_b = Arc::new(bind_media(loopback)?);
    let (addr_a, addr_b) = (sock_a.local_addr()?, sock_b.local_addr()?);
    let marks = Arc::new(Marks::default());
    let started = std::time::Instant::now();
    let a = MediaSession::start(
        sock_a,
        MediaParams::voice(addr_b),
        Box::new(ClickSource {
            marks: Arc::clone(&marks),
            frame_no: 0,
            remaining: 0,
            phase: 0,
        }),
        Box::new(Discard),
    )?;
    let b = MediaSession::start(
        sock_b,
        MediaParams::voice(addr_a),
        Box::new(SilenceSource),
        Box::new(OnsetSink {
            marks: Arc::clone(&marks),
            quiet: 0,
            armed: 0,
        }),
    )?;
    tokio::time::sleep(Duration::from_secs_f64(seconds.max(1.0))).await;
    let qa = a.stop().await?;
    let qb = b.stop().await?;

    let captured = marks
        .captured
        .lock()
        .map_err(|_| anyhow::anyhow!("marks poisoned"))?
        .clone();
    let played = marks
        .played
        .lock()
        .map_err(|_| anyhow::anyhow!("marks poisoned"))?
        .clone();
    let counted_from = started + Duration::from_secs_f64(warmup.max(0.0));
    // Pair each onset with the latest burst captured before it (bursts are 400 ms apart;
    // a pairing further apart than 300 ms is not a real one).
    let mut used = vec![false; captured.len()];
    let mut lat_ms = Vec::new();
    let mut spurious = 0usize;
    for p in &played {
        let idx = captured.iter().rposition(|c| c <= p);
        match idx {
            Some(i) if !used[i] && (*p - captured[i]) < Duration::from_millis(300) => {
                used[i] = true;
                if captured[i] >= counted_from {
                    lat_ms.push((*p - captured[i]).as_secs_f64() * 1000.0);
                }
            }
            _ => spurious += 1,
        }
    }
    // Bursts captured late enough to have been played before the sessions stopped.
    let end = std::time::Instant::now();
    let expected = captured
        .iter()
        .filter(|c| **c >= counted_from && end.duration_since(**c) > Duration::from_millis(300))
        .count();
    println!(
        "latency A->B: bursts captured={expected} detected={} spurious_onsets={spurious} loudest_sample={} longest_quiet_ms={:.0}",
        lat_ms.len(),
        marks.loudest.load(Relaxed),
        marks.longest_quiet.load(Relaxed) as f64 * 1000.0 / f64::from(SAMPLE_RATE)
    );
    println!(
        "latency A->B: media packets A sent={} B received={} loss={:.1}% jitter={:.2} ms concealed={} late_or_dup={}",
        qa.packets_sent, qb.packets_received, qb.loss_pct, qb.jitter_ms, qb.concealed, qb.late_or_duplicate
    );
    println!(
        "latency A->B mouth-to-ear (software only): {}",
        summary(&mut lat_ms)
    );
    if lat_ms.is_empty() {
        bail!("no burst was detected at B");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// media-cpu
// ---------------------------------------------------------------------------------

/// This process's user + system CPU time so far, in seconds.
fn process_cpu_seconds() -> anyhow::Result<f64> {
    test_support::procfs::cpu_secs("self").context("cannot read /proc/self/stat")
}

async fn media_cpu(
    wav: &std::path::Path,
    seconds: f64,
    complexities: &[i32],
    protections: &[Protection],
) -> anyhow::Result<()> {
    use tv_agent::media::audio::WavSource;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    for &complexity in complexities {
        for &protection in protections {
            let sock_a = Arc::new(bind_media(loopback)?);
            let sock_b = Arc::new(bind_media(loopback)?);
            let (addr_a, addr_b) = (sock_a.local_addr()?, sock_b.local_addr()?);
            // One fresh key per direction, as the agents exchange them.
            let suite = tv_agent::media::srtp::OFFERED_SUITE;
            let (key_a, key_b) = (
                fresh_key(suite).context("key")?,
                fresh_key(suite).context("key")?,
            );
            let keys = |send: &shared_proto::SrtpKey, recv: &shared_proto::SrtpKey| {
                (protection == Protection::On).then(|| CallKeys {
                    call_id: 1,
                    send: send.clone(),
                    recv: recv.clone(),
                })
            };
            let params = |peer, srtp| MediaParams {
                complexity,
                srtp,
                ..MediaParams::voice(peer)
            };
            let a = MediaSession::start(
                sock_a,
                params(addr_b, keys(&key_a, &key_b)),
                Box::new(WavSource::open(wav.to_path_buf())?),
                Box::new(Discard),
            )?;
            let b = MediaSession::start(
                sock_b,
                params(addr_a, keys(&key_b, &key_a)),
                Box::new(WavSource::open(wav.to_path_buf())?),
                Box::new(Discard),
            )?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (c0, t0) = (process_cpu_seconds()?, std::time::Instant::now());
            tokio::time::sleep(Duration::from_secs_f64(seconds.max(1.0))).await;
            let (c1, t1) = (process_cpu_seconds()?, std::time::Instant::now());
            let qa = a.stop().await?;
            let qb = b.stop().await?;
            let both = (c1 - c0) / (t1 - t0).as_secs_f64() * 100.0;
            if protection == Protection::On && !(qa.srtp && qb.srtp) {
                bail!("the SRTP run was not SRTP");
            }
            println!(
            "media-cpu complexity={complexity} srtp={}: both ends {both:.2}% of one core, {:.2}% per end over {:.1} s (packets A->B {}/{}, B->A {}/{}, srtp drops {})",
            if protection == Protection::On { "on" } else { "off" },
            both / 2.0,
            (t1 - t0).as_secs_f64(),
            qa.packets_sent,
            qb.packets_received,
            qb.packets_sent,
            qa.packets_received,
            qa.srtp_auth_failed + qa.srtp_replayed + qb.srtp_auth_failed + qb.srtp_replayed
        );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// srtp-cipher
// ---------------------------------------------------------------------------------

fn srtp_cipher(packets: u32, payload: usize) -> anyhow::Result<()> {
    use shared_proto::SrtpSuite;
    use webrtc_util::marshal::Marshal;
    let body = vec![0x5au8; payload.min(1_400)];
    for suite in [
        SrtpSuite::AES_CM_128_HMAC_SHA1_80,
        SrtpSuite::AEAD_AES_128_GCM,
    ] {
        let key = fresh_key(suite).context("key")?;
        let mut tx = Protector::new(&key)?;
        let mut rx = Unprotector::new(&key)?;
        let started = std::time::Instant::now();
        for i in 0..packets {
            let plain = rtp::packet::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: 111,
                    sequence_number: i as u16,
                    timestamp: i.wrapping_mul(960),
                    ssrc: 7,
                    ..Default::default()
                },
                payload: bytes::Bytes::copy_from_slice(&body),
            }
            .marshal()?;
            let wire = tx.rtp(&plain)?;
            let back = rx.rtp(&wire)?;
            if back != plain {
                bail!("{}: round trip changed packet {i}", suite.name());
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "srtp-cipher {}: {packets} packets of {} payload bytes protected and unprotected in {secs:.3} s: {:.0} packets/s, {:.2} us per packet (both sides); one TV's 50 packets/s each way cost {:.4}% of a core",
            suite.name(),
            body.len(),
            f64::from(packets) / secs,
            secs * 1e6 / f64::from(packets),
            100.0 * 50.0 * secs / f64::from(packets)
        );
    }
    Ok(())
}
