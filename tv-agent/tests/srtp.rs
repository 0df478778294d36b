//! SRTP between TVs, over real loopback sockets with a real server and real agents: the
//! media on the wire is SRTP/SRTCP both ways (ffmpeg cannot decode it as plain RTP/Opus,
//! and decodes it with the keys from `TV_AGENT_SRTP_KEYLOG`); a tampered packet is
//! dropped and counted while the audio goes on; an agent that offers no key (one release
//! behind) still gets a plain-RTP call; the server relays each side's key, and a retried
//! dial keeps the first dial's.
//!
//! Needs `ffmpeg` (Debian package `ffmpeg`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use call_proxy_server::client::Client;
use capture::{ffmpeg_decode, is_rtcp, key_lines, rtp_only, rtp_ssrc, Capture, Decoded};
use common::{analyse, boot, dial_and_answer, expect_event, Server};
use shared_proto::{DialOutcome, Event, Reply, Request, SrtpKey, SrtpSuite};
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tv_agent::media::srtp::Unprotector;
use tv_agent::media::{AudioSpec, CallQuality};
use tv_agent::{Agent, AgentEvent};
use webrtc_util::marshal::{Marshal, Unmarshal};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The key log every agent of this test binary writes to (set once, before any agent
/// starts; each test finds its own lines by SSRC).
fn keylog() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("srtp-keys.log");
        std::env::set_var(tv_agent::media::srtp::KEYLOG_ENV, &path);
        path
    })
}

/// The quality an agent reports when its call ends with `outcome`, and the call id.
async fn ended(
    events: &mut broadcast::Receiver<AgentEvent>,
    who: &str,
    outcome: &str,
) -> (u64, CallQuality) {
    expect_event(events, 5, who, |e| match e {
        AgentEvent::Ended {
            call_id,
            outcome: o,
            quality,
            ..
        } if o.as_str() == outcome => Some((*call_id, quality.clone().expect("quality"))),
        _ => None,
    })
    .await
}

/// Whether ffmpeg's output carries `tone` Hz (a second of it at least), not `other`.
fn decodes_tone(d: &Decoded, tone: f64, other: f64) -> bool {
    let Some(wav) = &d.wav else { return false };
    let Ok(mut r) = hound::WavReader::open(wav) else {
        return false;
    };
    let s: Vec<f64> = r
        .samples::<i16>()
        .filter_map(Result::ok)
        .map(f64::from)
        .collect();
    if s.len() < 48_000 {
        return false;
    }
    // Per sample: `tone_power` grows with the length. A tone at a quarter of full scale
    // has a power of about 1e7 per sample here (2.6e7 measured); Opus decoding the
    // encrypted payloads as if plain gives noise of up to about 1e5 per sample, which
    // may lean towards either frequency (a ratio of 39 was seen).
    let per_sample = |f| common::tone_power(&s, f) / s.len() as f64;
    let (p, q) = (per_sample(tone), per_sample(other));
    p > 1e6 && p > 20.0 * q
}

/// Two agents, A (440 Hz) and B (1000 Hz), with the capturing relay between them.
struct Pair {
    a: Agent,
    ea: broadcast::Receiver<AgentEvent>,
    b: Agent,
    eb: broadcast::Receiver<AgentEvent>,
    cap: Capture,
    wav_a: PathBuf,
    wav_b: PathBuf,
}

const A: u64 = 7001;
const B: u64 = 7002;

async fn pair(srv: &Server, dir: &Path, a_id: u64, b_id: u64) -> Pair {
    let cap = Capture::new().await;
    let wav_a = dir.join("a-hears.wav");
    let wav_b = dir.join("b-hears.wav");
    let mut cfg_a = srv
        .agent_config(a_id, AudioSpec::Tone(440.0), AudioSpec::Wav(wav_a.clone()))
        .await;
    let mut cfg_b = srv
        .agent_config(b_id, AudioSpec::Tone(1000.0), AudioSpec::Wav(wav_b.clone()))
        .await;
    // Media through the capture, at the addresses the server saw (no ICE: its checks
    // would find the direct loopback path around the capture).
    cfg_a.advertise_port = Some(cap.port_a);
    cfg_b.advertise_port = Some(cap.port_b);
    cfg_a.ice = false;
    cfg_b.ice = false;
    let (a, ea) = boot(cfg_a).await;
    let (b, eb) = boot(cfg_b).await;
    cap.start(a.media_addr(), b.media_addr());
    Pair {
        a,
        ea,
        b,
        eb,
        cap,
        wav_a,
        wav_b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_between_two_agents_is_srtp_both_ways_and_only_the_keylog_decodes_it() {
    let keylog = keylog();
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(loopback(), &dir.path().join("calls.db")).await;
    let mut p = pair(&srv, dir.path(), A, B).await;
    dial_and_answer(&p.a, &mut p.ea, A, &p.b, &mut p.eb, B).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.a.hang_up().await.unwrap();
    let (call_id, qa) = ended(&mut p.ea, "A's end", "hung_up").await;
    let (_, qb) = ended(&mut p.eb, "B's end", "hung_up_by_peer").await;
    p.a.power_off().await;
    p.b.power_off().await;
    srv.stop().await;
    for q in [&qa, &qb] {
        assert!(q.srtp, "SRTP both ways: {q:?}");
        assert_eq!((q.srtp_auth_failed, q.srtp_replayed), (0, 0), "{q:?}");
        assert!(q.packets_received > 100, "{q:?}");
    }
    // Both heard the other (decrypted), continuously.
    assert!(analyse(&p.wav_a, 1000.0, 440.0) > 0.9);
    assert!(analyse(&p.wav_b, 440.0, 1000.0) > 0.9);

    let lines = key_lines(keylog);
    for (a_to_b, tone, other) in [(true, 440.0, 1000.0), (false, 1000.0, 440.0)] {
        let dir_name = if a_to_b { "a-to-b" } else { "b-to-a" };
        let all = p.cap.seen(a_to_b);
        let rtp = rtp_only(&all);
        assert!(rtp.len() > 100, "{dir_name}: {} RTP datagrams", rtp.len());
        let ssrc = rtp_ssrc(&rtp[0]);
        assert!(rtp.iter().all(|d| rtp_ssrc(d) == ssrc), "one stream");
        let line = lines
            .iter()
            .find(|l| l.ssrc == ssrc)
            .unwrap_or_else(|| panic!("{dir_name}: no key log line for SSRC {ssrc}: {lines:?}"));
        assert_eq!(line.call_id, call_id);
        assert_eq!(line.suite, "AES_CM_128_HMAC_SHA1_80");
        // Each line once (the sender's), and once more by the receiver once the stream
        // authenticated: the same key.
        let same: Vec<_> = lines.iter().filter(|l| l.ssrc == ssrc).collect();
        assert_eq!(same.len(), 2, "{same:?}");
        assert_eq!(same[0], same[1]);

        // The helper's check: every datagram is SRTP/SRTCP under the logged key, and
        // none of them is plain RTCP.
        use base64::Engine;
        let key = SrtpKey {
            suite: SrtpSuite::AES_CM_128_HMAC_SHA1_80,
            key_salt: base64::engine::general_purpose::STANDARD
                .decode(&line.inline)
                .unwrap(),
        };
        let mut rx = Unprotector::new(&key).unwrap();
        let mut reports = 0;
        for d in &all {
            if is_rtcp(d) {
                assert!(
                    rtcp::packet::unmarshal(&mut Bytes::copy_from_slice(d)).is_err()
                        || d[d.len() - 14] & 0x80 != 0,
                    "{dir_name}: plain RTCP on the wire"
                );
                let plain = rx.rtcp(d).expect("SRTCP under the logged key");
                let sr = rtcp::sender_report::SenderReport::unmarshal(&mut &plain[..]).unwrap();
                assert_eq!(sr.ssrc, ssrc);
                reports += 1;
            } else {
                let plain = rx.rtp(d).expect("SRTP under the logged key");
                assert_eq!(plain.len() + 10, d.len(), "an 80-bit tag");
                assert_ne!(plain[12..], d[12..plain.len()], "the payload is encrypted");
            }
        }
        assert!(reports >= 1, "{dir_name}: SRTCP reports");

        // ffmpeg: as plain RTP/Opus, no tone comes out; as SRTP with the key log's key
        // (RFC 4568 a=crypto in the SDP), it does.
        let plain = ffmpeg_decode(dir.path(), &format!("{dir_name}-plain"), &rtp, None).await;
        assert!(
            !decodes_tone(&plain, tone, other),
            "{dir_name}: ffmpeg decoded the captured media as plain RTP/Opus: {}",
            plain.log
        );
        let srtp = ffmpeg_decode(
            dir.path(),
            &format!("{dir_name}-srtp"),
            &rtp,
            Some((&line.suite, &line.inline)),
        )
        .await;
        assert!(
            decodes_tone(&srtp, tone, other),
            "{dir_name}: ffmpeg did not decode the media with the logged key (ok={}): {}",
            srtp.ok,
            srtp.log
        );
        eprintln!(
            "{dir_name}: plain attempt ok={} log: {}",
            plain.ok,
            plain.log.lines().take(3).collect::<Vec<_>>().join(" | ")
        );
    }
}

/// The same packet with its sequence number moved 1,000 ahead (mod 2^16): a forged header
/// that the replay check lets through to authentication, whatever sequence number the
/// stream started at. (An earlier version flipped one clear bit of the high byte and had
/// nothing to flip, about one run in 150, when the stream's random start put that byte
/// at 0x7f or 0xff.)
fn sequence_ahead(packet: &[u8]) -> Vec<u8> {
    let seq = u16::from_be_bytes([packet[2], packet[3]]).wrapping_add(1_000);
    let mut p = packet.to_vec();
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_srtp_packet_is_dropped_and_counted_and_audio_still_flows() {
    keylog();
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(loopback(), &dir.path().join("calls.db")).await;
    let (a_id, b_id) = (7011, 7012);
    let mut p = pair(&srv, dir.path(), a_id, b_id).await;
    dial_and_answer(&p.a, &mut p.ea, a_id, &p.b, &mut p.eb, b_id).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // What A sent so far, taken before the tampering starts so that none of it is tampered.
    let captured = rtp_only(&p.cap.seen(true));
    // In flight: three of A's packets reach B with one byte flipped.
    p.cap.tamper_next_to_b(3);
    // Re-injected toward B from A's address: two captured packets with a forged sequence
    // number, and two captured packets as they were (replays).
    let forged: Vec<Vec<u8>> = captured
        .iter()
        .rev()
        .take(2)
        .map(|d| sequence_ahead(d))
        .collect();
    assert_eq!(forged.len(), 2);
    for d in &forged {
        p.cap.inject_to_b(d).await;
    }
    for d in captured.iter().rev().take(2) {
        p.cap.inject_to_b(d).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        p.cap.tamper_pending(),
        0,
        "the relay tampered with 3 packets"
    );
    p.a.hang_up().await.unwrap();
    let (_, qa) = ended(&mut p.ea, "A's end", "hung_up").await;
    let (_, qb) = ended(&mut p.eb, "B's end", "hung_up_by_peer").await;
    p.a.power_off().await;
    p.b.power_off().await;
    srv.stop().await;
    eprintln!("A {qa:?}\nB {qb:?}");
    assert!(qb.srtp);
    assert_eq!(
        qb.srtp_auth_failed,
        3 + 2,
        "tampered in flight and re-injected: {qb:?}"
    );
    assert_eq!(qb.srtp_replayed, 2, "{qb:?}");
    assert_eq!(
        qb.late_or_duplicate, 0,
        "nothing dropped reached the jitter buffer"
    );
    assert_eq!(
        qb.packets_received + 3,
        qa.packets_sent,
        "B played all of A's packets but the three tampered ones: {qa:?} {qb:?}"
    );
    assert_eq!((qa.srtp_auth_failed, qa.srtp_replayed), (0, 0));
    // The audio went on through it.
    assert!(analyse(&p.wav_b, 440.0, 1000.0) > 0.9);
}

/// An older agent's media on `sock`: plain RTP/Opus of a 440 Hz tone to `peer` every
/// 20 ms for `frames` frames, while reading what `peer` sends. Returns how many plain
/// RTP/Opus packets came and their decoded audio.
async fn old_agent_media(sock: &UdpSocket, peer: SocketAddr, frames: u16) -> (usize, Vec<f64>) {
    use tv_agent::media::audio::{AudioSource, Tone, FRAME};
    let mut encoder =
        opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut tone = Tone::new(440.0);
    let (mut pcm, mut opus_buf, mut heard_pcm) =
        (vec![0i16; FRAME], vec![0u8; 400], vec![0i16; FRAME]);
    let mut buf = vec![0u8; 1500];
    let (mut packets, mut heard) = (0, Vec::new());
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for seq in 0..frames {
        tick.tick().await;
        tone.read_frame(&mut pcm).unwrap();
        let n = encoder.encode(&pcm, &mut opus_buf).unwrap();
        let packet = rtp::packet::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 111,
                sequence_number: seq,
                timestamp: u32::from(seq) * 960,
                ssrc: 0x01d_a9e7,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(&opus_buf[..n]),
        };
        sock.send_to(&packet.marshal().unwrap(), peer)
            .await
            .unwrap();
        while let Ok((n, from)) = sock.try_recv_from(&mut buf) {
            if from != peer || is_rtcp(&buf[..n]) {
                continue;
            }
            let got = rtp::packet::Packet::unmarshal(&mut &buf[..n]).unwrap();
            assert_eq!(got.header.payload_type, 111);
            if let Ok(k) = decoder.decode(&got.payload, &mut heard_pcm, false) {
                packets += 1;
                heard.extend(heard_pcm[..k].iter().map(|&s| f64::from(s)));
            }
        }
    }
    (packets, heard)
}

/// The next event of a raw client, within 5 s.
async fn next_event(c: &mut Client<control_client::Stream>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), c.next_event())
        .await
        .expect("an event in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_offers_no_key_gets_a_plain_rtp_call_either_way() {
    keylog();
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(loopback(), &dir.path().join("calls.db")).await;
    const OLD: u64 = 7021;
    const NEW: u64 = 7022;
    let wav = dir.path().join("new-hears.wav");
    let (new, mut events) = boot(
        srv.agent_config(NEW, AudioSpec::Tone(1000.0), AudioSpec::Wav(wav.clone()))
            .await,
    )
    .await;
    // The older agent: the control protocol with no SRTP fields, plain RTP.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Over TLS with an enrolled key too: what it lacks is the SRTP fields.
    let mut old = srv.client(OLD).await;
    old.register(OLD, sock.local_addr().unwrap().port())
        .await
        .unwrap();

    // 1. The older agent calls the current one.
    let Reply::Dial(DialOutcome::Ringing {
        call_id,
        callee_media,
    }) = old
        .request(Request::Dial {
            callee: NEW,
            key: None,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap()
    else {
        panic!("expected ringing")
    };
    expect_event(&mut events, 5, "the ring", |e| {
        matches!(e, AgentEvent::Incoming { caller, .. } if *caller == OLD).then_some(())
    })
    .await;
    new.answer().await.unwrap();
    match next_event(&mut old).await {
        Event::CallAnswered {
            call_id: c, srtp, ..
        } => {
            assert_eq!(c, call_id);
            assert_eq!(srtp, None, "a caller that offered no key gets none back");
        }
        other => panic!("expected the answer, got {other:?}"),
    }
    let (packets, heard) = old_agent_media(&sock, callee_media, 100).await;
    old.request(Request::HangUp { call_id }).await.unwrap();
    let (_, q) = ended(&mut events, "the current agent's end", "hung_up_by_peer").await;
    assert!(!q.srtp, "plain RTP: {q:?}");
    assert!(q.packets_received > 50, "{q:?}");
    assert_eq!(q.srtp_auth_failed, 0);
    assert!(
        packets > 50,
        "the older agent got {packets} plain RTP/Opus packets"
    );
    assert!(
        common::tone_power(&heard, 1000.0) > 20.0 * common::tone_power(&heard, 440.0),
        "the older agent heard the current one's tone"
    );
    assert!(analyse(&wav, 440.0, 1000.0) > 0.5, "and the other way");

    // 2. The current agent calls the older one: it offers a key, gets none back.
    let tv_agent::DialResult::Ringing(call_id) = new.dial(OLD).await else {
        panic!("expected ringing")
    };
    let caller_media = match next_event(&mut old).await {
        Event::IncomingCall {
            call_id: c,
            caller_media,
            srtp,
            ..
        } => {
            assert_eq!(c, call_id);
            let key = srtp.expect("the current agent offers its key");
            assert_eq!(key.suite, SrtpSuite::AES_CM_128_HMAC_SHA1_80);
            assert!(key.is_valid());
            caller_media
        }
        other => panic!("expected the ring, got {other:?}"),
    };
    old.request(Request::Answer {
        call_id,
        srtp: None,
        ice: None,
    })
    .await
    .unwrap();
    expect_event(&mut events, 5, "answered", |e| {
        matches!(e, AgentEvent::Answered { .. }).then_some(())
    })
    .await;
    let (packets, heard) = old_agent_media(&sock, caller_media, 100).await;
    new.hang_up().await.unwrap();
    let (_, q) = ended(&mut events, "the current agent's end", "hung_up").await;
    assert!(!q.srtp, "plain RTP: {q:?}");
    assert!(q.packets_received > 50, "{q:?}");
    assert!(
        packets > 50,
        "the older agent got {packets} plain RTP/Opus packets"
    );
    assert!(common::tone_power(&heard, 1000.0) > 20.0 * common::tone_power(&heard, 440.0));
    new.power_off().await;
    srv.stop().await;
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_relays_each_sides_key_keeps_the_first_on_a_retried_dial_and_stores_none() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("calls.db");
    let srv = Server::start(loopback(), &db).await;
    let key = |b: u8| SrtpKey {
        suite: SrtpSuite::AES_CM_128_HMAC_SHA1_80,
        key_salt: vec![b; 30],
    };
    let mut caller = srv.client(7031).await;
    caller.register(7031, 40_001).await.unwrap();
    let mut callee = srv.client(7032).await;
    callee.register(7032, 40_002).await.unwrap();
    let dial = |srtp| Request::Dial {
        callee: 7032,
        key: Some(0x5eed),
        srtp: Some(srtp),
        ice: None,
    };
    let Reply::Dial(DialOutcome::Ringing { call_id, .. }) =
        caller.request(dial(key(0x11))).await.unwrap()
    else {
        panic!("expected ringing")
    };
    match next_event(&mut callee).await {
        Event::IncomingCall { srtp, .. } => assert_eq!(srtp, Some(key(0x11))),
        other => panic!("expected the ring, got {other:?}"),
    }
    // The same dial again (its reply lost, say), with another key: the same call, no
    // second ring, and the callee keeps the key it was rung with.
    assert_eq!(
        caller.request(dial(key(0x22))).await.unwrap(),
        Reply::Dial(DialOutcome::Ringing {
            call_id,
            callee_media: SocketAddr::from(([127, 0, 0, 1], 40_002)),
        })
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), callee.next_event())
            .await
            .is_err(),
        "no second ring"
    );
    assert_eq!(
        callee
            .request(Request::Answer {
                call_id,
                srtp: Some(key(0x33)),
                ice: None,
            })
            .await
            .unwrap(),
        Reply::Done
    );
    assert_eq!(
        next_event(&mut caller).await,
        Event::CallAnswered {
            call_id,
            srtp: Some(key(0x33)),
            ice: None,
        }
    );
    // A key of the wrong length is refused.
    let mut short = key(0x44);
    short.key_salt.pop();
    let refused = callee
        .request(Request::Dial {
            callee: 7031,
            key: None,
            srtp: Some(short),
            ice: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(shared_proto::ErrorCode::INVALID_ARGUMENT)
    );
    caller.request(Request::HangUp { call_id }).await.unwrap();
    srv.stop().await;
    // Nothing the server wrote holds a key: the database and its files, and the
    // certificates it made under tls/.
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .chain(std::fs::read_dir(dir.path().join("tls")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        for b in [0x11, 0x22, 0x33] {
            assert!(
                !contains(&bytes, &[b; 30]),
                "{} holds a media key",
                path.display()
            );
        }
    }
}
