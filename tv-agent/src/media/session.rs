//! One call's media over the TV's UDP media socket: a send task (source → Opus with
//! in-band FEC → RTP, RFC 3550/7587 → UDP, every 20 ms) and a receive task (UDP → RTP
//! validation → jitter buffer → Opus decode with FEC and concealment → sink, every 20 ms).
//! RTCP sender/receiver reports share the port (RFC 5761 multiplexing) and give loss,
//! jitter and round-trip time. The call's [`CallTransport`] reads the socket and passes
//! on only the peer's packets from the path ICE confirmed (or, for a peer without ICE,
//! from the address the server gave), and sends to that path; the peer's RTP is routed to its streams by payload type and SSRC
//! ([`super::router`]): the audio stream is played, a video stream is counted and dropped
//! (`other_streams`) until video lands, anything else is rejected.
//!
//! With [`MediaParams::srtp`] set (every call between two current agents) the session is
//! SRTP/SRTCP at the socket's boundary ([`super::srtp`]): each packet is protected just
//! before `send_to` and unprotected just after `recv_from`; a datagram that fails
//! authentication or is a replay is dropped and counted (`srtp_auth_failed`,
//! `srtp_replayed`), with a rate-limited log line. Everything between (router, jitter
//! buffer, RTCP statistics) sees plain packets. Without it (a peer that offered no key,
//! an older agent) the call is plain RTP.
//!
//! What the receive task does with a datagram and on a playout tick is [`Receiver`],
//! sans-I/O (the task only adds the socket, the peer-address check and the clock), so the
//! `media_receive` fuzz target runs the same code on arbitrary datagrams.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{interval, Instant, MissedTickBehavior};
use webrtc_util::marshal::{Marshal, Unmarshal};

use super::audio::{AudioSink, AudioSource, FRAME};
use super::ice::{IceCounters, Path};
use super::jitter::{JitterBuffer, Playout, FRAME_SAMPLES};
use super::router::{Route, StreamKind, StreamRouter};
use super::srtp::{self, CallKeys, DropLog, Protector, SrtpError, Unprotector};
use super::transport::{CallTransport, MediaSender};

/// Largest Opus packet produced.
const MAX_OPUS: usize = 400;
/// Interval between RTCP reports.
const RTCP_EVERY: Duration = Duration::from_secs(5);

/// How to run a call's media.
#[derive(Debug, Clone)]
pub struct MediaParams {
    /// The other TV's media address (from the server).
    pub peer: SocketAddr,
    /// RTP payload type for Opus (dynamic; 111 by convention).
    pub payload_type: u8,
    /// RTP payload type of the peer's video stream, if it may send one (dynamic; 96 by
    /// convention): routed to the video handler, which counts and drops it for now.
    pub video_payload_type: Option<u8>,
    /// Opus bitrate in bits per second.
    pub bitrate: i32,
    /// Expected packet loss told to the encoder (in-band FEC needs it above 0).
    pub expected_loss_pct: i32,
    /// Opus encoder complexity, 0..=10.
    pub complexity: i32,
    /// Jitter buffer depth bounds, in 20 ms frames.
    pub jitter_frames: (u64, u64),
    /// The call's SRTP keys, one per direction; `None`: plain RTP (the peer offered no
    /// key). Their `Debug` never shows the keys.
    pub srtp: Option<CallKeys>,
}

impl MediaParams {
    /// The payload types this session routes, and their kinds.
    fn streams(&self) -> Vec<(u8, StreamKind)> {
        let mut s = vec![(self.payload_type, StreamKind::Audio)];
        s.extend(self.video_payload_type.map(|pt| (pt, StreamKind::Video)));
        s
    }

    /// Defaults for a voice call to `peer`.
    pub fn voice(peer: SocketAddr) -> Self {
        MediaParams {
            peer,
            payload_type: 111,
            video_payload_type: Some(96),
            bitrate: 24_000,
            expected_loss_pct: 10,
            complexity: 5,
            jitter_frames: (1, 10),
            srtp: None,
        }
    }
}

/// Call quality, logged and reported at hang-up.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CallQuality {
    /// Seconds of media.
    pub seconds: f64,
    /// RTP packets sent.
    pub packets_sent: u64,
    /// RTP packets received from the peer and accepted.
    pub packets_received: u64,
    /// Packets the peer sent that never arrived (from sequence numbers).
    pub packets_lost: u64,
    /// `packets_lost` as a percentage of those expected.
    pub loss_pct: f64,
    /// Interarrival jitter, milliseconds.
    pub jitter_ms: f64,
    /// Round-trip time from RTCP, milliseconds (after the first report exchange).
    pub rtt_ms: Option<f64>,
    /// Frames recovered from in-band FEC.
    pub fec_recovered: u64,
    /// Frames concealed.
    pub concealed: u64,
    /// Packets dropped as late or duplicate.
    pub late_or_duplicate: u64,
    /// Datagrams dropped because they came from elsewhere or were not valid RTP of one
    /// of the session's streams.
    pub rejected: u64,
    /// RTP packets of the peer's other streams (video), routed to their handler and not
    /// played yet. Left out of the JSON while zero.
    #[serde(skip_serializing_if = "is_zero")]
    pub other_streams: u64,
    /// Loss the peer reported about our stream (RTCP), percent.
    pub peer_reported_loss_pct: Option<f64>,
    /// The media was SRTP/SRTCP both ways (`false`: plain RTP with a peer that offered
    /// no key).
    pub srtp: bool,
    /// Datagrams from the peer's address dropped because they failed SRTP/SRTCP
    /// authentication (tampered, forged, or not SRTP).
    pub srtp_auth_failed: u64,
    /// Datagrams from the peer's address dropped as SRTP/SRTCP replays (or older than
    /// the replay window).
    pub srtp_replayed: u64,
    /// The path the media took (ICE): `host`, `srflx` or `relay`; absent for a peer
    /// without ICE (media to the address the server saw) or when no path worked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<Path>,
    /// ICE's state at the end (`connected`, `failed`, `disconnected`, …); absent
    /// without ICE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ice_state: Option<&'static str>,
    /// ICE's counters (checks sent; STUN dropped for bad integrity, unknown attributes,
    /// no matching check; the peer's candidates refused); absent without ICE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ice: Option<Box<IceCounters>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// State shared by the send and receive tasks.
#[derive(Default)]
struct Shared {
    /// The viewer muted the microphone: frames are still read (so the source does not
    /// back up) but silence is encoded, which keeps the stream and NAT bindings alive.
    muted: AtomicBool,
    sent_packets: AtomicU64,
    sent_octets: AtomicU64,
    rx: Mutex<RxState>,
}

#[derive(Default)]
struct RxState {
    /// Routes the peer's RTP to its streams; its audio SSRC is the one reports are about.
    router: StreamRouter,
    /// Packets of the peer's video stream, counted and dropped (no video playback yet).
    video_packets: u64,
    /// First and highest extended sequence numbers, and packets received.
    first_seq: Option<u64>,
    highest_seq: Option<u64>,
    received: u64,
    jitter_ms: f64,
    /// Middle 32 bits of the peer's last SR NTP time, and when it arrived.
    last_sr: Option<(u32, Instant)>,
    /// Middle 32 bits of our last SR NTP time (to compute RTT from their reports).
    our_last_sr: Option<u32>,
    rtt_ms: Option<f64>,
    peer_loss_pct: Option<f64>,
    /// For the fraction-lost field: expected and received at the previous report.
    prior_expected: u64,
    prior_received: u64,
}

impl Shared {
    /// Shared state for a session routing `params`' streams.
    fn new(params: &MediaParams) -> Self {
        let shared = Shared::default();
        if let Ok(mut rx) = shared.rx.lock() {
            rx.router = StreamRouter::new(&params.streams());
        }
        shared
    }
}

impl RxState {
    /// The peer's audio SSRC, once latched.
    fn remote_ssrc(&self) -> Option<u32> {
        self.router.ssrc(StreamKind::Audio)
    }

    fn expected(&self) -> u64 {
        match (self.first_seq, self.highest_seq) {
            (Some(f), Some(h)) if h >= f => h - f + 1,
            _ => 0,
        }
    }
}

/// A running call's media. Stop it to get the call quality.
pub struct MediaSession {
    transport: CallTransport,
    stop: watch::Sender<bool>,
    send: JoinHandle<anyhow::Result<()>>,
    recv: JoinHandle<anyhow::Result<ReceiveEnd>>,
    shared: Arc<Shared>,
    started: Instant,
    /// The session runs SRTP.
    srtp: bool,
}

struct ReceiveEnd {
    jitter: JitterBuffer,
    rejected: u64,
    /// SRTP drops: failed authentication, replays.
    auth_failed: u64,
    replayed: u64,
}

fn ntp_now() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() + 2_208_988_800;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

fn ntp_mid32(ntp: u64) -> u32 {
    (ntp >> 16) as u32
}

impl MediaSession {
    /// Starts sending and receiving on `socket` (the TV's media socket) with
    /// `params.peer` only (no ICE).
    pub fn start(
        socket: Arc<UdpSocket>,
        params: MediaParams,
        source: Box<dyn AudioSource>,
        sink: Box<dyn AudioSink>,
    ) -> anyhow::Result<MediaSession> {
        let transport = CallTransport::fixed(socket, params.peer);
        Self::start_on(transport, params, source, sink)
    }

    /// Starts sending and receiving through `transport` (ICE's selected path, or a
    /// fixed peer); `params.peer` is not used.
    pub fn start_on(
        mut transport: CallTransport,
        params: MediaParams,
        source: Box<dyn AudioSource>,
        sink: Box<dyn AudioSink>,
    ) -> anyhow::Result<MediaSession> {
        let media_rx = transport
            .take_media()
            .context("the call's transport has no media queue left")?;
        let mut encoder = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)
            .context("cannot create Opus encoder")?;
        encoder.set_bitrate(opus::Bitrate::Bits(params.bitrate))?;
        encoder.set_inband_fec(true)?;
        encoder.set_packet_loss_perc(params.expected_loss_pct)?;
        encoder.set_complexity(params.complexity)?;
        let ssrc: u32 = rand::random();
        let (protector, unprotector) = match &params.srtp {
            Some(keys) => {
                let (p, u) = srtp::for_call(keys, ssrc).context("cannot set up SRTP")?;
                (Some(p), Some(u))
            }
            None => (None, None),
        };
        let srtp = protector.is_some();
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(&params));
        let receiver = Receiver::with_shared(Arc::clone(&shared), &params, unprotector)?;
        let started = Instant::now();
        let send = tokio::spawn(send_loop(
            transport.sender(),
            params.clone(),
            Outbound { ssrc, protector },
            source,
            encoder,
            Arc::clone(&shared),
            stop_rx.clone(),
        ));
        let recv = tokio::spawn(receive_loop(media_rx, receiver, sink, stop_rx, started));
        Ok(MediaSession {
            transport,
            stop,
            send,
            recv,
            shared,
            started,
            srtp,
        })
    }

    /// ICE's state as it changes (see [`CallTransport::watch_state`]).
    pub fn watch_ice(&self) -> watch::Receiver<Option<super::ice::IceState>> {
        self.transport.watch_state()
    }

    /// Mutes or unmutes what this TV sends.
    pub fn set_muted(&self, muted: bool) {
        self.shared.muted.store(muted, Relaxed);
    }

    /// Whether what this TV sends is muted.
    pub fn muted(&self) -> bool {
        self.shared.muted.load(Relaxed)
    }

    /// Stops both directions and returns the call quality.
    pub async fn stop(self) -> anyhow::Result<CallQuality> {
        let _ = self.stop.send(true);
        self.send.await.context("send task")??;
        let end = self.recv.await.context("receive task")??;
        let report = self.transport.stop().await;
        tracing::debug!(?report, "the call's transport");
        let js = end.jitter.stats();
        let rx = self
            .shared
            .rx
            .lock()
            .map_err(|_| anyhow::anyhow!("media state poisoned"))?;
        let expected = rx.expected();
        let lost = expected.saturating_sub(rx.received);
        Ok(CallQuality {
            seconds: self.started.elapsed().as_secs_f64(),
            packets_sent: self.shared.sent_packets.load(Relaxed),
            packets_received: rx.received,
            packets_lost: lost,
            loss_pct: if expected > 0 {
                100.0 * lost as f64 / expected as f64
            } else {
                0.0
            },
            jitter_ms: end.jitter.jitter_ms(),
            rtt_ms: rx.rtt_ms,
            fec_recovered: js.fec_recovered,
            concealed: js.concealed,
            late_or_duplicate: js.late + js.duplicates,
            rejected: end.rejected + report.strangers,
            other_streams: rx.video_packets,
            peer_reported_loss_pct: rx.peer_loss_pct,
            srtp: self.srtp,
            srtp_auth_failed: end.auth_failed,
            srtp_replayed: end.replayed,
            path: report.path,
            ice_state: report.ice_state,
            ice: report.ice,
        })
    }
}

/// What the send task puts on the wire: its stream's SSRC, and SRTP if on.
struct Outbound {
    ssrc: u32,
    protector: Option<Protector>,
}

impl Outbound {
    /// The datagram for a marshalled RTP (or, with `rtcp`, RTCP) packet; `None` if it
    /// cannot be protected (that packet is not sent).
    fn wire(&mut self, packet: Bytes, rtcp: bool) -> Option<Bytes> {
        let Some(p) = &mut self.protector else {
            return Some(packet);
        };
        let r = if rtcp {
            p.rtcp(&packet)
        } else {
            p.rtp(&packet)
        };
        match r {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "cannot protect a media packet; not sent");
                None
            }
        }
    }
}

async fn send_loop(
    socket: MediaSender,
    params: MediaParams,
    mut out: Outbound,
    mut source: Box<dyn AudioSource>,
    mut encoder: opus::Encoder,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ssrc = out.ssrc;
    let mut seq: u16 = rand::random();
    let mut ts: u32 = rand::random();
    let mut pcm = vec![0i16; FRAME];
    let mut opus_buf = vec![0u8; MAX_OPUS];
    let mut tick = interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut next_rtcp = Instant::now() + Duration::from_millis(500);
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        source.read_frame(&mut pcm)?;
        if shared.muted.load(Relaxed) {
            pcm.fill(0);
        }
        let n = encoder.encode(&pcm, &mut opus_buf).context("Opus encode")?;
        let packet = rtp::packet::Packet {
            header: rtp::header::Header {
                version: 2,
                marker: first,
                payload_type: params.payload_type,
                sequence_number: seq,
                timestamp: ts,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(&opus_buf[..n]),
        };
        first = false;
        let plain = packet.marshal().context("RTP marshal")?;
        // A send error (peer's port closed, network down) loses this packet only.
        if let Some(wire) = out.wire(plain, false) {
            if socket.send(&wire).await {
                shared.sent_packets.fetch_add(1, Relaxed);
                shared.sent_octets.fetch_add(n as u64, Relaxed);
            }
        }
        seq = seq.wrapping_add(1);
        ts = ts.wrapping_add(FRAME_SAMPLES);
        if Instant::now() >= next_rtcp {
            next_rtcp += RTCP_EVERY;
            if let Some(report) = sender_report(&shared, ssrc, ts)
                .ok()
                .and_then(|r| out.wire(r, true))
            {
                let _ = socket.send(&report).await;
            }
        }
    }
    // A last report so the peer's quality figures are complete.
    if let Some(report) = sender_report(&shared, ssrc, ts)
        .ok()
        .and_then(|r| out.wire(r, true))
    {
        let _ = socket.send(&report).await;
    }
    Ok(())
}

fn sender_report(shared: &Shared, ssrc: u32, rtp_time: u32) -> anyhow::Result<Bytes> {
    let ntp = ntp_now();
    let mut rx = shared
        .rx
        .lock()
        .map_err(|_| anyhow::anyhow!("media state poisoned"))?;
    rx.our_last_sr = Some(ntp_mid32(ntp));
    let mut reports = Vec::new();
    if let (Some(remote), Some(highest)) = (rx.remote_ssrc(), rx.highest_seq) {
        let expected = rx.expected();
        let interval_expected = expected.saturating_sub(rx.prior_expected);
        let interval_received = rx.received.saturating_sub(rx.prior_received);
        let interval_lost = interval_expected.saturating_sub(interval_received);
        let fraction_lost = (interval_lost << 8)
            .checked_div(interval_expected)
            .map_or(0, |f| f.min(255) as u8);
        rx.prior_expected = expected;
        rx.prior_received = rx.received;
        let (lsr, dlsr) = match rx.last_sr {
            Some((mid, at)) => (mid, (at.elapsed().as_secs_f64() * 65536.0) as u32),
            None => (0, 0),
        };
        reports.push(rtcp::reception_report::ReceptionReport {
            ssrc: remote,
            fraction_lost,
            total_lost: expected.saturating_sub(rx.received).min(0x7f_ffff) as u32,
            last_sequence_number: highest as u32,
            jitter: (rx.jitter_ms * 48.0) as u32,
            last_sender_report: lsr,
            delay: dlsr,
        });
    }
    let sr = rtcp::sender_report::SenderReport {
        ssrc,
        ntp_time: ntp,
        rtp_time,
        packet_count: shared.sent_packets.load(Relaxed) as u32,
        octet_count: shared.sent_octets.load(Relaxed) as u32,
        reports,
        profile_extensions: Bytes::new(),
    };
    Ok(sr.marshal()?)
}

/// Whether a datagram on the media port is RTCP rather than RTP (RFC 5761: RTCP packet
/// types 192..=223 in the second byte, where RTP would carry a payload type with the
/// marker bit). Decides which of SRTP and SRTCP protects and unprotects it.
pub fn is_rtcp(datagram: &[u8]) -> bool {
    datagram.len() >= 2 && (192..=223).contains(&datagram[1])
}

/// Counters of the datagrams a [`Receiver`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveCounts {
    /// Not valid RTP of one of the session's streams, or a stream beyond SRTP's limit.
    pub rejected: u64,
    /// Failed SRTP/SRTCP authentication (or were not SRTP at all).
    pub auth_failed: u64,
    /// SRTP/SRTCP replays, or older than the replay window.
    pub replayed: u64,
}

/// The receive task's logic, sans-I/O: what the agent does with each datagram from the
/// peer ([`Receiver::datagram`]: SRTP/SRTCP unprotect, RTCP statistics, RTP validation
/// and routing, the jitter buffer) and on each 20 ms playout tick ([`Receiver::tick`]:
/// jitter buffer, Opus decode with FEC and concealment). The session's receive task owns
/// one and feeds it from the socket and its clock; the `media_receive` fuzz target feeds
/// it arbitrary datagrams and ticks.
pub struct Receiver {
    /// State shared with the send task (its RTCP reports are about what arrives here).
    shared: Arc<Shared>,
    /// `None`: plain RTP.
    unprotector: Option<Unprotector>,
    jitter: JitterBuffer,
    decoder: opus::Decoder,
    counts: ReceiveCounts,
    drop_log: DropLog,
    /// A frame other than [`Playout::Waiting`] was played: the sink gets every frame.
    playing: bool,
}

impl Receiver {
    /// A receiver for a session with `params`, unprotecting with `unprotector` (`None`:
    /// plain RTP), on its own state (for a session, the receive task shares it with the
    /// send task).
    pub fn new(params: &MediaParams, unprotector: Option<Unprotector>) -> anyhow::Result<Self> {
        Self::with_shared(Arc::new(Shared::new(params)), params, unprotector)
    }

    fn with_shared(
        shared: Arc<Shared>,
        params: &MediaParams,
        unprotector: Option<Unprotector>,
    ) -> anyhow::Result<Self> {
        let decoder = opus::Decoder::new(48_000, opus::Channels::Mono)
            .context("cannot create Opus decoder")?;
        Ok(Receiver {
            shared,
            unprotector,
            jitter: JitterBuffer::new(params.jitter_frames.0, params.jitter_frames.1),
            decoder,
            counts: ReceiveCounts::default(),
            drop_log: DropLog::default(),
            playing: false,
        })
    }

    /// Takes one datagram from the peer's address that arrived at `arrival_ms` (the
    /// session's clock, milliseconds): unprotects it (SRTP/SRTCP), then updates the RTCP
    /// statistics or routes the RTP packet to its stream (audio into the jitter buffer).
    pub fn datagram(&mut self, datagram: &[u8], arrival_ms: f64) -> Received {
        let rtcp = is_rtcp(datagram);
        let plain = match self.plain(datagram, rtcp) {
            Ok(p) => p,
            Err(dropped) => return dropped,
        };
        if rtcp {
            handle_rtcp(&self.shared, &plain);
            return Received::Rtcp;
        }
        let routed = receive_rtp(&self.shared, &plain, &mut self.jitter, arrival_ms);
        if routed == Received::Rejected {
            self.counts.rejected += 1;
        }
        routed
    }

    /// The plain packet in `datagram`, or what became of it if it was dropped (counted).
    fn plain<'a>(&mut self, datagram: &'a [u8], rtcp: bool) -> Result<Cow<'a, [u8]>, Received> {
        let Some(u) = &mut self.unprotector else {
            return Ok(Cow::Borrowed(datagram));
        };
        let r = if rtcp {
            u.rtcp(datagram)
        } else {
            u.rtp(datagram)
        };
        let e = match r {
            // (The decrypted buffer is not shared: no copy.)
            Ok(plain) => return Ok(Cow::Owned(Vec::from(plain))),
            Err(e) => e,
        };
        let dropped = match e {
            SrtpError::Replay => {
                self.counts.replayed += 1;
                Received::SrtpReplayed
            }
            ref e if e.is_auth_failure() => {
                self.counts.auth_failed += 1;
                Received::SrtpAuthFailed
            }
            _ => {
                self.counts.rejected += 1;
                Received::Rejected
            }
        };
        if let Some(n) = self.drop_log.note(Instant::now()) {
            tracing::warn!(
                dropped_since_last_line = n,
                auth_failed = self.counts.auth_failed,
                replayed = self.counts.replayed,
                last = %e,
                "dropping media packets that fail SRTP checks"
            );
        }
        Err(dropped)
    }

    /// One 20 ms playout tick: decodes what the jitter buffer gives into `pcm` (one
    /// frame, [`FRAME`] samples: a packet, a frame recovered from the next packet's FEC,
    /// or a concealed one; a corrupt payload is concealed). `true` if `pcm` is to be
    /// played: from the first frame that was not silence waiting for the stream on.
    pub fn tick(&mut self, pcm: &mut [i16]) -> bool {
        let playout = self.jitter.pop();
        let result = match &playout {
            Playout::Waiting => {
                pcm.fill(0);
                Ok(pcm.len())
            }
            Playout::Packet(p) => self.decoder.decode(p, pcm, false),
            Playout::Fec(next) => self.decoder.decode(next, pcm, true),
            Playout::Conceal => self.decoder.decode(&[], pcm, false),
        };
        match result {
            // A shorter packet (a 10 ms frame): silence for the rest of the tick, not the
            // previous frame's samples.
            Ok(n) => {
                let len = pcm.len();
                pcm[n.min(len)..].fill(0);
            }
            // A corrupt payload: conceal instead.
            Err(_) => {
                if self.decoder.decode(&[], pcm, false).is_err() {
                    pcm.fill(0);
                }
            }
        }
        if !matches!(playout, Playout::Waiting) {
            self.playing = true;
        }
        // Before the first packet, nothing is written: the recording starts with the
        // call's audio.
        self.playing
    }

    /// The audio jitter buffer.
    pub fn jitter(&self) -> &JitterBuffer {
        &self.jitter
    }

    /// The datagrams dropped so far.
    pub fn counts(&self) -> ReceiveCounts {
        self.counts
    }
}

async fn receive_loop(
    mut media: mpsc::Receiver<Bytes>,
    mut rx: Receiver,
    mut sink: Box<dyn AudioSink>,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) -> anyhow::Result<ReceiveEnd> {
    let mut pcm = vec![0i16; FRAME];
    let mut tick = interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            // The transport passes on only the peer's (S)RTP/RTCP, from the confirmed
            // path (it counts the rest).
            d = media.recv() => {
                let Some(datagram) = d else { break };
                let arrival_ms = started.elapsed().as_secs_f64() * 1000.0;
                let was_ready = rx.jitter().is_ready();
                let routed = rx.datagram(&datagram, arrival_ms);
                if routed == Received::Audio && !was_ready && rx.jitter().is_ready() {
                    // Align the playout clock to the stream: play this frame a small
                    // margin after its arrival, and every 20 ms after that.
                    let margin =
                        Duration::from_secs_f64(rx.jitter().playout_margin_ms() / 1000.0);
                    tick.reset_at(Instant::now() + margin);
                }
            }
            _ = tick.tick() => {
                if rx.tick(&mut pcm) {
                    sink.write_frame(&pcm)?;
                }
            }
        }
    }
    sink.finish()?;
    let counts = rx.counts();
    Ok(ReceiveEnd {
        jitter: rx.jitter,
        rejected: counts.rejected,
        auth_failed: counts.auth_failed,
        replayed: counts.replayed,
    })
}

/// What became of a datagram from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Into the audio jitter buffer.
    Audio,
    /// To the video stream's handler.
    Video,
    /// RTCP, into the call's statistics (if it parsed).
    Rtcp,
    /// Not valid RTP of one of the session's streams (or a stream beyond SRTP's limit).
    Rejected,
    /// Dropped: failed SRTP/SRTCP authentication, or was not SRTP at all.
    SrtpAuthFailed,
    /// Dropped: an SRTP/SRTCP replay, or older than the replay window.
    SrtpReplayed,
}

/// Parses an RTP datagram and routes it to its stream's handler.
fn receive_rtp(
    shared: &Shared,
    datagram: &[u8],
    jitter: &mut JitterBuffer,
    arrival_ms: f64,
) -> Received {
    if !super::rtp_header::well_formed(datagram) {
        return Received::Rejected;
    }
    let Ok(packet) = rtp::packet::Packet::unmarshal(&mut &datagram[..]) else {
        return Received::Rejected;
    };
    let h = &packet.header;
    if h.version != 2 || packet.payload.is_empty() {
        return Received::Rejected;
    }
    let Ok(mut rx) = shared.rx.lock() else {
        return Received::Rejected;
    };
    match rx.router.route(h.payload_type, h.ssrc) {
        Route::Stream(StreamKind::Audio) => {
            audio_packet(&mut rx, &packet, jitter, arrival_ms);
            Received::Audio
        }
        Route::Stream(StreamKind::Video) => {
            // The video stream's handler: counted and dropped until video playback lands
            // here (its own jitter buffer and decoder, fed like audio's).
            rx.video_packets += 1;
            Received::Video
        }
        Route::UnknownPayload | Route::OtherSource => Received::Rejected,
    }
}

/// The audio stream's handler: into the jitter buffer, and the receive statistics.
fn audio_packet(
    rx: &mut RxState,
    packet: &rtp::packet::Packet,
    jitter: &mut JitterBuffer,
    arrival_ms: f64,
) {
    let h = &packet.header;
    jitter.insert(
        h.sequence_number,
        h.timestamp,
        packet.payload.clone(),
        arrival_ms,
    );
    if let Some(highest) = jitter.highest_seq() {
        rx.highest_seq = Some(highest);
        if rx.first_seq.is_none_or(|f| highest < f) {
            rx.first_seq = Some(highest);
        }
    }
    rx.received = jitter.stats().received;
    rx.jitter_ms = jitter.jitter_ms();
}

/// A report the session reads from the peer's RTCP.
enum RtcpReport {
    Sender(rtcp::sender_report::SenderReport),
    Receiver(rtcp::receiver_report::ReceiverReport),
}

/// The sender and receiver reports in a compound RTCP packet (RFC 3550, 6.1), the only
/// kinds the session reads. The compound packet is split by each packet's own header
/// (version 2, length in 32-bit words); other packet types (SDES, BYE, APP, XR,
/// feedback) are skipped without being parsed, so their decoders never see a peer's
/// bytes (rtcp 0.13's XR decoder overflows on a block length above 16383 words). A
/// malformed packet ends the walk; the reports before it count, a malformed report is
/// skipped.
fn rtcp_reports(datagram: &[u8]) -> Vec<RtcpReport> {
    let mut reports = Vec::new();
    let mut rest = datagram;
    while let [first, pt, l0, l1, ..] = *rest {
        let len = (usize::from(u16::from_be_bytes([l0, l1])) + 1) * 4;
        let Some(packet) = rest.get(..len) else { break };
        if first >> 6 != 2 {
            break;
        }
        rest = &rest[len..];
        let mut buf = packet;
        match pt {
            200 => {
                if let Ok(sr) = rtcp::sender_report::SenderReport::unmarshal(&mut buf) {
                    reports.push(RtcpReport::Sender(sr));
                }
            }
            201 => {
                if let Ok(rr) = rtcp::receiver_report::ReceiverReport::unmarshal(&mut buf) {
                    reports.push(RtcpReport::Receiver(rr));
                }
            }
            _ => {}
        }
    }
    reports
}

fn handle_rtcp(shared: &Shared, datagram: &[u8]) {
    let packets = rtcp_reports(datagram);
    if packets.is_empty() {
        return;
    }
    let Ok(mut rx) = shared.rx.lock() else { return };
    let now_mid = ntp_mid32(ntp_now());
    for p in packets {
        let reports = match p {
            RtcpReport::Sender(sr) => {
                if rx.remote_ssrc().is_none_or(|s| s == sr.ssrc) {
                    rx.last_sr = Some((ntp_mid32(sr.ntp_time), Instant::now()));
                }
                sr.reports
            }
            RtcpReport::Receiver(rr) => rr.reports,
        };
        for r in reports {
            if r.last_sender_report != 0 && Some(r.last_sender_report) == rx.our_last_sr {
                let rtt = now_mid
                    .wrapping_sub(r.last_sender_report)
                    .wrapping_sub(r.delay);
                if rtt < 65536 * 10 {
                    rx.rtt_ms = Some(f64::from(rtt) * 1000.0 / 65536.0);
                }
            }
            rx.peer_loss_pct = Some(f64::from(r.fraction_lost) * 100.0 / 256.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn params() -> MediaParams {
        MediaParams::voice(SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    #[test]
    fn arbitrary_datagrams_never_panic_the_receive_path() {
        let shared = Shared::new(&params());
        let mut jitter = JitterBuffer::new(1, 10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for i in 0..20_000 {
            let len = rng.random_range(0..200);
            let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // Half of them look like RTP or RTCP headers, to get past the first checks.
            if i % 2 == 0 && d.len() >= 2 {
                d[0] = 0x80 | (d[0] & 0x3f);
                d[1] = if i % 4 == 0 {
                    111
                } else {
                    rng.random_range(192..=223)
                };
            }
            if is_rtcp(&d) {
                handle_rtcp(&shared, &d);
            } else {
                let _ = receive_rtp(&shared, &d, &mut jitter, f64::from(i) * 20.0);
            }
            let _ = jitter.pop();
        }
    }

    fn packet(ssrc: u32, seq: u16, pt: u8) -> Bytes {
        rtp::packet::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: pt,
                sequence_number: seq,
                timestamp: u32::from(seq) * 960,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::from_static(&[1, 2, 3]),
        }
        .marshal()
        .expect("marshal")
    }

    #[test]
    fn only_the_first_stream_is_accepted() {
        let shared = Shared::new(&params());
        let mut jitter = JitterBuffer::new(1, 10);
        let mut rx = |d: Bytes, at: f64| receive_rtp(&shared, &d, &mut jitter, at);
        assert_eq!(rx(packet(7, 1, 111), 0.0), Received::Audio);
        assert_eq!(
            rx(packet(8, 2, 111), 20.0),
            Received::Rejected,
            "second SSRC"
        );
        assert_eq!(
            rx(packet(7, 2, 0), 20.0),
            Received::Rejected,
            "wrong payload type"
        );
        assert_eq!(rx(packet(7, 2, 111), 20.0), Received::Audio);
        assert_eq!(jitter.stats().received, 2);
    }

    #[test]
    fn an_interleaved_video_stream_goes_to_its_handler_and_leaves_audio_alone() {
        let with_video = Shared::new(&params());
        let alone = Shared::new(&params());
        let mut jitter = JitterBuffer::new(1, 10);
        let mut reference = JitterBuffer::new(1, 10);
        let mut played = Vec::new();
        let mut played_alone = Vec::new();
        for seq in 1..=50u16 {
            let at = f64::from(seq) * 20.0;
            assert_eq!(
                receive_rtp(&with_video, &packet(7, seq, 111), &mut jitter, at),
                Received::Audio
            );
            // A video stream from the same peer: another SSRC and payload type, several
            // packets per audio frame, its sequence numbers unrelated to audio's.
            for k in 0..3u16 {
                assert_eq!(
                    receive_rtp(
                        &with_video,
                        &packet(
                            99,
                            seq.wrapping_mul(3).wrapping_add(k).wrapping_add(40_000),
                            96
                        ),
                        &mut jitter,
                        at + 1.0
                    ),
                    Received::Video
                );
            }
            // A second video source is another stream: rejected.
            assert_eq!(
                receive_rtp(&with_video, &packet(100, seq, 96), &mut jitter, at + 2.0),
                Received::Rejected
            );
            receive_rtp(&alone, &packet(7, seq, 111), &mut reference, at);
            played.push(jitter.pop());
            played_alone.push(reference.pop());
        }
        assert_eq!(
            played, played_alone,
            "audio plays as if video were not there"
        );
        assert_eq!(jitter.stats(), reference.stats());
        let rx = with_video.rx.lock().unwrap();
        assert_eq!(rx.video_packets, 150);
        assert_eq!(rx.remote_ssrc(), Some(7));
        assert_eq!(rx.router.ssrc(StreamKind::Video), Some(99));
        assert_eq!(rx.received, 50);
        assert_eq!(
            rx.expected(),
            50,
            "video's sequence numbers count no audio loss"
        );
    }

    #[test]
    fn without_a_video_payload_type_video_is_rejected() {
        let shared = Shared::new(&MediaParams {
            video_payload_type: None,
            ..params()
        });
        let mut jitter = JitterBuffer::new(1, 10);
        assert_eq!(
            receive_rtp(&shared, &packet(9, 1, 96), &mut jitter, 0.0),
            Received::Rejected
        );
        assert_eq!(
            receive_rtp(&shared, &packet(7, 1, 111), &mut jitter, 0.0),
            Received::Audio
        );
    }

    /// Over real loopback sockets: a peer that interleaves a video stream (and a stray
    /// second video source) with its audio is heard in full, its video counted apart.
    #[tokio::test]
    async fn a_peer_sending_video_too_is_heard_and_its_video_counted() {
        use super::super::audio::{open_sink, open_source, AudioSpec};
        let tv = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let session = MediaSession::start(
            Arc::clone(&tv),
            MediaParams::voice(peer.local_addr().unwrap()),
            open_source(&AudioSpec::Null).unwrap(),
            open_sink(&AudioSpec::Null).unwrap(),
        )
        .unwrap();
        let to = tv.local_addr().unwrap();
        let mut encoder =
            opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut opus_buf = vec![0u8; MAX_OPUS];
        let silence = vec![0i16; FRAME];
        const FRAMES: u16 = 25;
        for seq in 0..FRAMES {
            let n = encoder.encode(&silence, &mut opus_buf).unwrap();
            let audio = rtp::packet::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: 111,
                    sequence_number: seq,
                    timestamp: u32::from(seq) * FRAME_SAMPLES,
                    ssrc: 7,
                    ..Default::default()
                },
                payload: Bytes::copy_from_slice(&opus_buf[..n]),
            }
            .marshal()
            .unwrap();
            peer.send_to(&audio, to).await.unwrap();
            for k in 0..2 {
                peer.send_to(&packet(99, seq * 2 + k, 96), to)
                    .await
                    .unwrap();
            }
            peer.send_to(&packet(100, seq, 96), to).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the last datagrams be read before stopping.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let q = session.stop().await.unwrap();
        assert_eq!(q.packets_received, u64::from(FRAMES), "{q:?}");
        assert_eq!(q.packets_lost, 0, "{q:?}");
        assert_eq!(q.other_streams, u64::from(FRAMES) * 2, "{q:?}");
        assert_eq!(
            q.rejected,
            u64::from(FRAMES),
            "the second video source: {q:?}"
        );
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["other_streams"], 50);
    }

    /// Found by the `media_receive` fuzz target: rtcp 0.13's XR decoder multiplies a
    /// report block's 16-bit length by 4 without a check, a panic with overflow checks
    /// on. Only sender and receiver reports are parsed now; the others are skipped by
    /// their header, and a report after them still counts.
    #[test]
    fn rtcp_of_other_kinds_is_skipped_and_reports_after_it_count() {
        let shared = Shared::new(&params());
        // XR (207): sender SSRC, then a block claiming 0xc802 words.
        let mut compound = vec![0x80, 207, 0, 2, 0, 0, 0, 7, 0, 0, 0xc8, 0x02];
        let sr = rtcp::sender_report::SenderReport {
            ssrc: 7,
            ntp_time: 0x1122_3344_5566_7788,
            reports: vec![rtcp::reception_report::ReceptionReport {
                ssrc: 9,
                fraction_lost: 64,
                ..Default::default()
            }],
            ..Default::default()
        };
        compound.extend_from_slice(&sr.marshal().unwrap());
        // A packet of another kind after it, and a truncated one.
        compound.extend_from_slice(&[0x81, 203, 0, 1, 0, 0, 0, 7, 0x80, 200, 0, 6]);
        handle_rtcp(&shared, &compound);
        let rx = shared.rx.lock().unwrap();
        assert_eq!(rx.peer_loss_pct, Some(25.0));
        assert_eq!(rx.last_sr.map(|(mid, _)| mid), Some(0x3344_5566));
    }

    /// Found by the `media_receive` fuzz target: an RTP header extension element longer
    /// than the datagram made rtp 0.13's header decoder panic, before authentication
    /// with SRTP on (webrtc-srtp parses the header first). Such a datagram is dropped.
    #[test]
    fn a_header_extension_running_past_the_datagram_is_dropped_not_a_panic() {
        let mut d = packet(7, 1, 111).to_vec();
        d[0] |= 0x10;
        d.truncate(12);
        // Two-byte extension profile, one word: ID 1 claiming 200 bytes.
        d.extend_from_slice(&[0x10, 0x00, 0, 1, 1, 200, 0, 0]);
        let mut plain = Receiver::new(&params(), None).unwrap();
        assert_eq!(plain.datagram(&d, 0.0), Received::Rejected);
        let key = srtp::fresh_key(srtp::OFFERED_SUITE).unwrap();
        let mut rx = Receiver::new(&params(), Some(Unprotector::new(&key).unwrap())).unwrap();
        d.extend_from_slice(&[0; 10]);
        assert_eq!(rx.datagram(&d, 0.0), Received::SrtpAuthFailed);
    }

    /// The receive task's logic on its own: SRTP drops are reported and counted by
    /// kind, decrypted packets reach the jitter buffer and are played.
    #[test]
    fn the_receiver_counts_srtp_drops_and_plays_what_authenticates() {
        let key = srtp::fresh_key(srtp::OFFERED_SUITE).unwrap();
        let mut tx = Protector::new(&key).unwrap();
        let mut rx = Receiver::new(&params(), Some(Unprotector::new(&key).unwrap())).unwrap();
        let first = tx.rtp(&packet(7, 1, 111)).unwrap();
        assert_eq!(rx.datagram(&first, 0.0), Received::Audio);
        assert_eq!(rx.datagram(&first, 1.0), Received::SrtpReplayed);
        let mut bad = tx.rtp(&packet(7, 2, 111)).unwrap().to_vec();
        bad[13] ^= 0x40;
        assert_eq!(rx.datagram(&bad, 20.0), Received::SrtpAuthFailed);
        assert_eq!(
            rx.datagram(&packet(7, 3, 111), 40.0),
            Received::SrtpAuthFailed,
            "plain RTP"
        );
        let sr = tx
            .rtcp(&sender_report(&Shared::new(&params()), 9, 0).unwrap())
            .unwrap();
        assert_eq!(rx.datagram(&sr, 50.0), Received::Rtcp);
        assert_eq!(
            rx.counts(),
            ReceiveCounts {
                rejected: 0,
                auth_failed: 2,
                replayed: 1
            }
        );
        assert_eq!(rx.jitter().stats().received, 1);
        let mut pcm = vec![0i16; FRAME];
        assert!(rx.tick(&mut pcm), "the packet is played");
    }

    #[test]
    fn call_quality_json_is_unchanged_without_other_streams() {
        let json = serde_json::to_value(CallQuality::default()).unwrap();
        assert!(json.get("other_streams").is_none(), "{json}");
        assert_eq!(json["rejected"], 0);
    }
}
