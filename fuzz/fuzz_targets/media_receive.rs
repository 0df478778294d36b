//! Fuzz target: what the agent does with each datagram that reaches its media socket from
//! the peer, and on each 20 ms playout tick: [`Receiver`], the code the call's receive
//! task runs (SRTP/SRTCP unprotect with the call's key, RTCP statistics, RTP parse and
//! routing by payload type and SSRC, the jitter buffer, Opus decode with FEC and
//! concealment). Input layout: see `tv_fuzz::media_records` (a configuration byte, then
//! records, each a datagram and the clock's steps around it).
//!
//! With SRTP on, the peer's sender is modelled too, with a fixed key: a record's bytes can
//! be delivered raw (garbage, or a packet protected under that key already), protected
//! first by the peer's sender (so the fuzzer reaches past authentication: RTCP parsing,
//! routing, the jitter buffer and Opus get decrypted packets), protected and then tampered
//! with, or the last datagram replayed.
//!
//! Invariants beyond "does not panic": a lone [`Unprotector`] fed the same datagrams
//! agrees with how the receiver classified each one; a genuine packet that decrypts gives
//! back exactly what was protected, and the first genuine packet of a stream (RTP or RTCP)
//! with room for the stream always does; a tampered packet never authenticates; the
//! receiver's drop counters equal the drops it reported; every audio packet routed is
//! counted once by the jitter buffer (received, duplicate or late); once a tick says
//! "play", every later tick does.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use shared_proto::{SrtpKey, SrtpSuite};
use tv_agent::media::audio::FRAME;
use tv_agent::media::rtp_header::well_formed;
use tv_agent::media::session::{is_rtcp, MediaParams, ReceiveCounts, Received, Receiver};
use tv_agent::media::srtp::{Protector, SrtpError, Unprotector, MAX_STREAMS};
use tv_fuzz::{media_records, MediaOp, MEDIA_KEY_SALT};

/// The fixed key of a suite.
fn key(suite: SrtpSuite) -> SrtpKey {
    let len = suite.key_salt_len().expect("a known suite");
    SrtpKey {
        suite,
        key_salt: MEDIA_KEY_SALT[..len].to_vec(),
    }
}

/// Protects a plain packet as the peer's sender does (SRTCP for RTCP). A sender marshals
/// its own packets: a malformed RTP header is not sent (webrtc-srtp would panic on it).
fn protect(p: &mut Protector, plain: &[u8]) -> Option<Vec<u8>> {
    let r = if is_rtcp(plain) {
        p.rtcp(plain)
    } else if well_formed(plain) {
        p.rtp(plain)
    } else {
        return None;
    };
    r.ok().map(|b| b.to_vec())
}

/// The SSRC an SRTP (bytes 8..12) or SRTCP (bytes 4..8) datagram names.
fn ssrc_of(datagram: &[u8], rtcp: bool) -> Option<u32> {
    let at = if rtcp { 4 } else { 8 };
    let b = datagram.get(at..at + 4)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The SRTP side of the model: the peer's sender, a lone receiver in lockstep with the
/// session's, and which streams each has seen.
struct Srtp {
    key: SrtpKey,
    sender: Protector,
    lone: Unprotector,
    /// (SSRC, is RTCP) the sender protected a packet of.
    sent: HashSet<(u32, bool)>,
    /// (SSRC, is RTCP) a packet of which authenticated.
    authenticated: HashSet<(u32, bool)>,
    /// SSRCs holding one of the receiver's stream slots.
    streams: HashSet<u32>,
}

fuzz_target!(|data: &[u8]| {
    let Some((config, records)) = media_records(data) else {
        return;
    };
    let suite = match config.suite {
        0 => None,
        2 => Some(SrtpSuite::AEAD_AES_128_GCM),
        _ => Some(SrtpSuite::AES_CM_128_HMAC_SHA1_80),
    };
    let mut srtp = suite.map(|suite| {
        let key = key(suite);
        Srtp {
            sender: Protector::new(&key).expect("the fixed key is valid"),
            lone: Unprotector::new(&key).expect("the fixed key is valid"),
            key,
            sent: HashSet::new(),
            authenticated: HashSet::new(),
            streams: HashSet::new(),
        }
    });
    let mut params = MediaParams::voice(([127, 0, 0, 1], 9).into());
    params.jitter_frames = config.jitter_frames;
    if !config.video {
        params.video_payload_type = None;
    }
    let unprotector = srtp
        .as_ref()
        .map(|s| Unprotector::new(&s.key).expect("the fixed key is valid"));
    let mut rx = Receiver::new(&params, unprotector).expect("a receiver");

    let mut now_ms = 0.0;
    let mut last: Option<Vec<u8>> = None;
    let mut reported = ReceiveCounts::default();
    let mut audio = 0u64;
    let mut playing = false;
    let mut pcm = vec![0i16; FRAME];
    for record in &records {
        now_ms += record.advance_ms;
        // The datagram, and for a genuine packet what was protected (and whether it was
        // the sender's first of its stream); for a tampered one, that it was changed.
        let mut genuine: Option<(&[u8], bool)> = None;
        let mut tampered = false;
        let datagram: Option<Vec<u8>> = match record.op {
            MediaOp::Raw => Some(record.bytes.to_vec()),
            MediaOp::Replay => last.clone(),
            MediaOp::Genuine => match &mut srtp {
                None => Some(record.bytes.to_vec()),
                Some(s) => {
                    let wire = protect(&mut s.sender, record.bytes);
                    if wire.is_some() {
                        let rtcp = is_rtcp(record.bytes);
                        let first = ssrc_of(record.bytes, rtcp)
                            .is_some_and(|ssrc| s.sent.insert((ssrc, rtcp)));
                        genuine = Some((record.bytes, first));
                    }
                    wire
                }
            },
            MediaOp::Tampered => match record.bytes {
                [pos, mask, plain @ ..] => {
                    let mut wire = match &srtp {
                        None => Some(plain.to_vec()),
                        Some(s) => {
                            let mut throwaway = Protector::new(&s.key).expect("valid key");
                            protect(&mut throwaway, plain)
                        }
                    };
                    if let Some(w) = wire.as_mut().filter(|w| !w.is_empty()) {
                        let at = usize::from(*pos) % w.len();
                        w[at] ^= if *mask == 0 { 1 } else { *mask };
                        tampered = true;
                    }
                    wire
                }
                _ => None,
            },
        };

        if let Some(datagram) = &datagram {
            let rtcp = is_rtcp(datagram);
            // What the lone receiver makes of it, and so what the session's must report.
            let expected = srtp.as_mut().map(|s| {
                let r = if rtcp {
                    s.lone.rtcp(datagram)
                } else {
                    s.lone.rtp(datagram)
                };
                let ssrc = ssrc_of(datagram, rtcp);
                if let (Some((plain, first)), Some(ssrc)) = (genuine, ssrc) {
                    match &r {
                        Ok(back) => assert_eq!(&back[..], plain, "decrypted is not what was sent"),
                        Err(e) => {
                            let room = s.streams.contains(&ssrc) || s.streams.len() < MAX_STREAMS;
                            assert!(
                                !(first && room && !s.authenticated.contains(&(ssrc, rtcp))),
                                "the first genuine packet of stream {ssrc} (rtcp {rtcp}) was refused: {e}"
                            );
                        }
                    }
                }
                if tampered {
                    assert!(r.is_err(), "a tampered packet authenticated");
                }
                if let (Ok(_), Some(ssrc)) = (&r, ssrc) {
                    s.authenticated.insert((ssrc, rtcp));
                    s.streams.insert(ssrc);
                }
                r
            });
            let got = rx.datagram(datagram, now_ms);
            match got {
                Received::Rejected => reported.rejected += 1,
                Received::SrtpAuthFailed => reported.auth_failed += 1,
                Received::SrtpReplayed => reported.replayed += 1,
                Received::Audio => audio += 1,
                Received::Video | Received::Rtcp => {}
            }
            assert_eq!(
                got == Received::Rtcp,
                rtcp && !matches!(
                    got,
                    Received::Rejected | Received::SrtpAuthFailed | Received::SrtpReplayed
                )
            );
            if let Some(r) = expected {
                let consistent = match &r {
                    Ok(_) => matches!(
                        got,
                        Received::Audio | Received::Video | Received::Rtcp | Received::Rejected
                    ),
                    Err(SrtpError::Replay) => got == Received::SrtpReplayed,
                    Err(e) if e.is_auth_failure() => got == Received::SrtpAuthFailed,
                    Err(_) => got == Received::Rejected,
                };
                assert!(
                    consistent,
                    "the lone unprotector said {r:?}, the receiver {got:?}"
                );
            }
            last = Some(datagram.clone());
        }
        for _ in 0..record.ticks {
            now_ms += 20.0;
            let play = rx.tick(&mut pcm);
            assert!(play || !playing, "playback stopped once started");
            playing = play;
        }
    }
    assert_eq!(
        rx.counts(),
        reported,
        "the drop counters disagree with the drops"
    );
    let js = rx.jitter().stats();
    assert_eq!(
        js.received + js.duplicates + js.late,
        audio,
        "audio packets routed vs counted by the jitter buffer: {js:?}"
    );
});
