//! Writes the seed corpus in `fuzz/corpus/<target>/` from real messages, encoded by the
//! product's own codecs (and real agent files written by the agent's own writer), so the
//! fuzzer starts from frames a peer really sends. Run it after a protocol change:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus` (a normal build, no
//! fuzzing instrumentation). Seeds are named by content, so running it again only adds.
//!
//! Frame targets take a mode byte first (see `tv_fuzz::split_input`): each message is
//! written once as a bare payload (`0x01`) and once as a framed stream (`0x0e`: fed in
//! 8-byte chunks); a whole session's frames also go in as one stream (`0x00`: byte by byte).
//!
//! The media target's seeds are calls as a peer sends them (Opus from the real encoder in
//! RTP, sender reports), plain and in both SRTP suites (see `tv_fuzz::media_records`); the
//! identity target's fixtures (`fuzz/fixtures/identity/`, a valid identity the target
//! builds in) are written by the agent's own `IdentityDir`, with a CA made like the
//! server's private one. The fixtures are rewritten on each run (a new key): run it only
//! when their format changes.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use shared_proto::envelope::{self};
use shared_proto::*;
use tokio_util::codec::Encoder;
use tv_agent::agent::events::MissReason;
use tv_agent::agent::types::MissedCall;
use tv_agent::contacts::Contact;

type Res = Result<(), Box<dyn std::error::Error>>;

/// The FNV-1a hash of `bytes`, to name a seed by its content.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn put(dir: &Path, label: &str, bytes: &[u8]) -> Res {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{label}-{:016x}", fnv(bytes))), bytes)?;
    Ok(())
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

fn key(suite: SrtpSuite, len: u8) -> SrtpKey {
    SrtpKey {
        suite,
        key_salt: (0..len).collect(),
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        (
            "register",
            Request::Register(Register {
                user_id: 1001,
                media_port: 5004,
                agent_version: "tv-agent 0.1.0".into(),
            }),
        ),
        ("heartbeat", Request::Heartbeat),
        (
            "query",
            Request::QueryState {
                users: vec![1001, 2002, u64::MAX >> 1],
            },
        ),
        (
            "dial",
            Request::Dial {
                callee: 2002,
                key: None,
                srtp: None,
                ice: None,
            },
        ),
        (
            "dial-keyed",
            Request::Dial {
                callee: 2002,
                key: Some(0x0102_0304_0506_0708),
                srtp: None,
                ice: None,
            },
        ),
        (
            "dial-srtp",
            Request::Dial {
                callee: 2002,
                key: Some(7),
                srtp: Some(key(SrtpSuite::AES_CM_128_HMAC_SHA1_80, 30)),
                ice: None,
            },
        ),
        (
            "answer",
            Request::Answer {
                call_id: 42,
                srtp: None,
                ice: None,
            },
        ),
        (
            "answer-srtp",
            Request::Answer {
                call_id: 42,
                srtp: Some(key(SrtpSuite::AEAD_AES_128_GCM, 28)),
                ice: None,
            },
        ),
        ("reject", Request::Reject { call_id: 43 }),
        ("hangup", Request::HangUp { call_id: 44 }),
        (
            "fetch",
            Request::FetchCached {
                after: 0,
                limit: 50,
            },
        ),
        (
            "ack",
            Request::AckCached {
                call_ids: vec![1, 2, 300, 70_000],
            },
        ),
        ("bye", Request::Bye),
        (
            "start-enrollment",
            Request::StartEnrollment {
                agent_version: "tv-agent 0.1.0".into(),
            },
        ),
        ("poll-enrollment", Request::PollEnrollment),
        (
            "subscribe",
            Request::Subscribe {
                contacts: vec![1001, 2002],
                others: vec![3003],
            },
        ),
        (
            "presence-ack",
            Request::PresenceAck {
                subscription: 1,
                seq: 4,
                status: ErrorCode::OK,
            },
        ),
        (
            "set-presence",
            Request::SetPresence {
                do_not_disturb: true,
                hidden: false,
            },
        ),
    ]
}

fn server_msgs() -> Vec<(&'static str, ServerMsg)> {
    let reply = |id, r| ServerMsg::Reply { id, result: Ok(r) };
    vec![
        (
            "registered",
            reply(
                1,
                Reply::Registered(Registered {
                    session_id: 9,
                    observed_ip: "192.0.2.7".parse().expect("an IP"),
                    heartbeat_interval_ms: 15_000,
                    server_time_ms: 1_764_590_000_000,
                    cached_waiting: 2,
                }),
            ),
        ),
        (
            "registered-v6",
            reply(
                1,
                Reply::Registered(Registered {
                    session_id: 10,
                    observed_ip: "2001:db8::1".parse().expect("an IP"),
                    heartbeat_interval_ms: 15_000,
                    server_time_ms: 1,
                    cached_waiting: 0,
                }),
            ),
        ),
        (
            "heartbeat-ack",
            reply(
                2,
                Reply::HeartbeatAck {
                    server_time_ms: 1_764_590_000_123,
                },
            ),
        ),
        (
            "states",
            reply(
                3,
                Reply::States(vec![
                    UserState {
                        user_id: 2002,
                        state: NetState::Online,
                        last_seen_ms: Some(1_764_590_000_000),
                    },
                    UserState {
                        user_id: 3003,
                        state: NetState::Unknown,
                        last_seen_ms: None,
                    },
                ]),
            ),
        ),
        (
            "dial-ringing",
            reply(
                4,
                Reply::Dial(DialOutcome::Ringing {
                    call_id: 42,
                    callee_media: "192.0.2.8:5004".parse().expect("an address"),
                }),
            ),
        ),
        (
            "dial-cached",
            reply(4, Reply::Dial(DialOutcome::Cached { call_id: 43 })),
        ),
        (
            "dial-busy",
            reply(4, Reply::Dial(DialOutcome::Busy { call_id: 44 })),
        ),
        ("done", reply(5, Reply::Done)),
        (
            "cached",
            reply(
                6,
                Reply::Cached(CachedPage {
                    calls: vec![
                        CachedCall {
                            call_id: 7,
                            caller: 1001,
                            callee: 2002,
                            call_date_ms: 1_764_590_000_000,
                            reason: MissedReason::Offline,
                            caller_state: NetState::Online,
                        },
                        CachedCall {
                            call_id: 8,
                            caller: 3003,
                            callee: 2002,
                            call_date_ms: 1_764_590_100_000,
                            reason: MissedReason::Busy,
                            caller_state: NetState::Offline,
                        },
                    ],
                    more: true,
                }),
            ),
        ),
        ("acked", reply(7, Reply::Acked { count: 2 })),
        (
            "enrollment-pending",
            reply(
                8,
                Reply::Enrollment(EnrollmentStatus::Pending {
                    user_code: "BCDF-GHJK".into(),
                    expires_in_s: 600,
                    interval_s: 5,
                }),
            ),
        ),
        (
            "enrollment-enrolled",
            reply(
                8,
                Reply::Enrollment(EnrollmentStatus::Enrolled { user_id: 2002 }),
            ),
        ),
        (
            "enrollment-expired",
            reply(8, Reply::Enrollment(EnrollmentStatus::Expired)),
        ),
        (
            "enrollment-refused",
            reply(
                8,
                Reply::Enrollment(EnrollmentStatus::Refused {
                    reason: "revoked".into(),
                }),
            ),
        ),
        (
            "error",
            ServerMsg::Reply {
                id: 9,
                result: Err(WireError::new(ErrorCode::UNAUTHENTICATED, "no credential")),
            },
        ),
        (
            "incoming",
            ServerMsg::Event(Event::IncomingCall {
                call_id: 42,
                caller: 1001,
                caller_media: "192.0.2.7:5004".parse().expect("an address"),
                call_date_ms: 1_764_590_000_000,
                srtp: None,
                ice: None,
            }),
        ),
        (
            "incoming-srtp",
            ServerMsg::Event(Event::IncomingCall {
                call_id: 42,
                caller: 1001,
                caller_media: "[2001:db8::7]:5004".parse().expect("an address"),
                call_date_ms: 1_764_590_000_000,
                srtp: Some(key(SrtpSuite::AES_CM_128_HMAC_SHA1_80, 30)),
                ice: None,
            }),
        ),
        (
            "answered",
            ServerMsg::Event(Event::CallAnswered {
                call_id: 42,
                srtp: None,
                ice: None,
            }),
        ),
        (
            "answered-srtp",
            ServerMsg::Event(Event::CallAnswered {
                call_id: 42,
                srtp: Some(key(SrtpSuite::AEAD_AES_128_GCM, 28)),
                ice: None,
            }),
        ),
        (
            "ended",
            ServerMsg::Event(Event::CallEnded {
                call_id: 42,
                reason: EndReason::HungUp { by: 1001 },
            }),
        ),
        (
            "ended-noanswer",
            ServerMsg::Event(Event::CallEnded {
                call_id: 42,
                reason: EndReason::NoAnswer,
            }),
        ),
        (
            "cached-waiting",
            ServerMsg::Event(Event::CachedCallsWaiting { count: 3 }),
        ),
        (
            "subscribed",
            reply(
                9,
                Reply::Subscribed(shared_proto::Subscribed {
                    subscription: 1,
                    seq: 0,
                    states: vec![
                        shared_proto::Presence {
                            user_id: 1001,
                            state: shared_proto::PresenceState::ONLINE,
                            since_ms: Some(1_764_000_000_000),
                        },
                        shared_proto::Presence {
                            user_id: 2002,
                            state: shared_proto::PresenceState::NOT_ALLOWED,
                            since_ms: None,
                        },
                    ],
                }),
            ),
        ),
        (
            "presence-changed",
            ServerMsg::Event(Event::PresenceChanged {
                subscription: 1,
                seq: 1,
                changes: vec![shared_proto::Presence {
                    user_id: 1001,
                    state: shared_proto::PresenceState::BUSY,
                    since_ms: Some(1_764_000_000_500),
                }],
            }),
        ),
        (
            "presence-lost",
            ServerMsg::Event(Event::PresenceLost {
                subscription: 1,
                reason: "notification 1 was not acknowledged within 5 s".into(),
            }),
        ),
        (
            "closing",
            ServerMsg::Closing(WireError::new(ErrorCode::SESSION_REPLACED, "replaced")),
        ),
    ]
}

/// Writes one message's seeds (payload mode and stream mode) and appends its frame to
/// `session`.
fn seeds_of(dir: &Path, label: &str, frame: &[u8], session: &mut Vec<u8>) -> Res {
    let payload = frame.get(4..).ok_or("a frame has a length prefix")?;
    put(dir, &format!("{label}-payload"), &with_mode(0x01, payload))?;
    put(dir, &format!("{label}-stream"), &with_mode(0x0e, frame))?;
    session.extend_from_slice(frame);
    Ok(())
}

fn main() -> Res {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");

    // The preamble, and a rejecting server's preamble with its reason.
    let dir = root.join("preamble");
    put(&dir, "client-v2", &Preamble::client().encode())?;
    put(&dir, "client-v1", &v1::client_preamble().encode())?;
    let mut refused = Preamble::server(ErrorCode::UNSUPPORTED_VERSION)
        .encode()
        .to_vec();
    refused.extend(preamble::encode_reason(
        "this server speaks versions 1 to 2",
    ));
    put(&dir, "server-refused", &refused)?;
    put(&dir, "http", b"GET / HTTP/1.1\r\n\r\n")?;

    // Client frames, version 2 and version 1.
    let (v2_dir, v1_dir) = (root.join("client_frames_v2"), root.join("client_frames_v1"));
    let (mut v2_session, mut v1_session) = (Vec::new(), Vec::new());
    for (id, (label, request)) in (1u32..).zip(requests()) {
        let msg = ClientMsg { id, request };
        let mut frame = BytesMut::new();
        ClientCodec::new().encode(&msg, &mut frame)?;
        seeds_of(&v2_dir, label, &frame, &mut v2_session)?;
        if let Ok(old) = v1::ClientMsg::try_from(msg) {
            let mut frame = BytesMut::new();
            v1::Codec::<v1::ServerMsg, v1::ClientMsg>::new().encode(&old, &mut frame)?;
            seeds_of(&v1_dir, label, &frame, &mut v1_session)?;
        }
    }
    // A kind from the future, and a Dial with fields appended after the ones known.
    let mut ignored = Vec::new();
    seeds_of(
        &v2_dir,
        "unknown-kind",
        &envelope::frame(0x0123, 99, b"future"),
        &mut ignored,
    )?;
    seeds_of(
        &v2_dir,
        "dial-appended",
        &envelope::frame(envelope::kind::DIAL, 5, &[7, 0, 0, 0xaa, 0xbb]),
        &mut ignored,
    )?;
    put(&v2_dir, "session", &with_mode(0x00, &v2_session))?;
    put(&v1_dir, "session", &with_mode(0x00, &v1_session))?;

    // Server frames, version 2 and version 1.
    let (v2_dir, v1_dir) = (root.join("server_frames_v2"), root.join("server_frames_v1"));
    let (mut v2_session, mut v1_session) = (Vec::new(), Vec::new());
    for (label, msg) in server_msgs() {
        let mut frame = BytesMut::new();
        ServerCodec::new(PROTOCOL_VERSION).encode(&msg, &mut frame)?;
        seeds_of(&v2_dir, label, &frame, &mut v2_session)?;
        let mut frame = BytesMut::new();
        if ServerCodec::new(v1::PROTOCOL_VERSION)
            .encode(&msg, &mut frame)
            .is_ok()
        {
            seeds_of(&v1_dir, label, &frame, &mut v1_session)?;
        }
    }
    seeds_of(
        &v2_dir,
        "unknown-event",
        &envelope::frame(0x80ff, 0, b"presence"),
        &mut ignored,
    )?;
    put(&v2_dir, "session", &with_mode(0x00, &v2_session))?;
    put(&v1_dir, "session", &with_mode(0x00, &v1_session))?;

    // The agent's files, as its own writer writes them.
    let scratch = tv_fuzz::scratch_dir("gen");
    tv_fuzz::reset_dir(&scratch);
    let file = scratch.join("f.json");
    let missed = vec![
        MissedCall {
            call_id: 7,
            user_id: 1001,
            otheruser_id: 2002,
            call_date: "2026-12-01T10:00:00Z".into(),
            user_netstate: Some(1),
            reason: MissReason::Offline,
        },
        MissedCall {
            call_id: 8,
            user_id: 3003,
            otheruser_id: 2002,
            call_date: "2026-12-01T10:05:00Z".into(),
            user_netstate: None,
            reason: MissReason::Busy,
        },
    ];
    tv_agent::files::write_json(&file, &missed)?;
    put(&root.join("missed_file"), "two", &std::fs::read(&file)?)?;
    put(&root.join("missed_file"), "empty", b"[]")?;
    let contacts = vec![
        Contact {
            user_id: 3003,
            name: "anna".into(),
        },
        Contact {
            user_id: 2002,
            name: "Grandma".into(),
        },
        Contact {
            user_id: 4004,
            name: "Zoë".into(),
        },
    ];
    tv_agent::files::write_json(&file, &contacts)?;
    put(&root.join("contacts_file"), "three", &std::fs::read(&file)?)?;
    put(&root.join("contacts_file"), "empty", b"[]")?;
    std::fs::remove_dir_all(&scratch)?;

    media_seeds(&root.join("media_receive"))?;
    identity_seeds(&root)?;
    media_check_seeds(&root.join("media_check"))?;
    println!("seed corpus written to {}", root.display());
    Ok(())
}

/// A marshalled RTP packet (version 2, no CSRC, no extension).
fn rtp(pt: u8, marker: bool, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, pt | if marker { 0x80 } else { 0 }];
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&ts.to_be_bytes());
    v.extend_from_slice(&ssrc.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A marshalled RTCP sender report with one reception block.
fn sender_report(ssrc: u32, about: u32) -> Vec<u8> {
    let mut v = vec![0x81, 200, 0, 12];
    for word in [
        ssrc,
        0xe8a1_2b3c,
        0x4d5e_6f70,
        48_000,
        50,
        3_000,
        about,
        0x0a00_0003,
        1_050,
        12,
        0x2b3c_4d5e,
        65_536,
    ] {
        v.extend_from_slice(&word.to_be_bytes());
    }
    v
}

/// Seeds for `media_receive`: a second of a call (Opus frames of a tone, a sender
/// report, a reordered pair, a duplicate, a lost packet, a video packet), plain and in
/// both SRTP suites; with SRTP also a tampered packet, a replay, and the call's packets
/// already protected under the fixed key (delivered raw).
fn media_seeds(dir: &Path) -> Res {
    use tv_fuzz::{media_record, MediaConfig, MediaOp, MEDIA_KEY_SALT};
    let mut encoder = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)?;
    encoder.set_bitrate(opus::Bitrate::Bits(24_000))?;
    encoder.set_inband_fec(true)?;
    encoder.set_packet_loss_perc(10)?;
    let mut packets = Vec::new();
    let mut out = vec![0u8; 400];
    for i in 0..50u16 {
        let pcm: Vec<i16> = (0..960u32)
            .map(|n| {
                let t = f64::from(u32::from(i) * 960 + n) / 48_000.0;
                (8_000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect();
        let n = encoder.encode(&pcm, &mut out)?;
        packets.push(rtp(
            111,
            i == 0,
            60_000u16.wrapping_add(i * 137), // wraps within the call
            u32::from(i) * 960,
            0x1234_5678,
            &out[..n],
        ));
    }
    // Arrival order: a reordered pair, a duplicate, a lost packet.
    let mut order: Vec<usize> = (0..50).filter(|&i| i != 30).collect();
    order.swap(10, 11);
    order.insert(20, 19);
    let video = rtp(96, false, 7, 90_000, 0x9abc_def0, &[0x10, 0x20, 0x30, 0x40]);
    let sr = sender_report(0x1234_5678, 0x0bad_cafe);

    for suite in 0u8..3 {
        let mut plain_call = vec![MediaConfig::byte(suite)];
        for (k, &i) in order.iter().enumerate() {
            // On time, then a little early or late; one tick per frame.
            let advance = if k == 0 { 0 } else { [4, 5, 4, 3][k % 4] };
            plain_call.extend(media_record(MediaOp::Genuine, advance, 1, &packets[i]));
            if k == 25 {
                plain_call.extend(media_record(MediaOp::Genuine, 0, 0, &sr));
                plain_call.extend(media_record(MediaOp::Genuine, 0, 0, &video));
            }
        }
        let label = ["plain", "aes-cm", "aead-gcm"][usize::from(suite)];
        put(dir, &format!("{label}-call"), &plain_call)?;
        if suite == 0 {
            continue;
        }
        // Tampered with and replayed, in the middle of a call.
        let mut attacked = vec![MediaConfig::byte(suite)];
        for (k, p) in packets.iter().take(12).enumerate() {
            attacked.extend(media_record(MediaOp::Genuine, 4, 1, p));
            if k == 5 {
                attacked.extend(media_record(MediaOp::Replay, 0, 0, &[]));
                let mut t = vec![20, 0x04];
                t.extend_from_slice(&packets[k + 1]);
                attacked.extend(media_record(MediaOp::Tampered, 0, 0, &t));
            }
        }
        attacked.extend(media_record(MediaOp::Genuine, 0, 2, &sr));
        attacked.extend(media_record(MediaOp::Replay, 0, 2, &[]));
        put(dir, &format!("{label}-attacked"), &attacked)?;
        // Packets as protected on the wire, delivered raw.
        let suite_id = if suite == 2 {
            SrtpSuite::AEAD_AES_128_GCM
        } else {
            SrtpSuite::AES_CM_128_HMAC_SHA1_80
        };
        let len = suite_id.key_salt_len().ok_or("a known suite")?;
        let mut sender = tv_agent::media::srtp::Protector::new(&SrtpKey {
            suite: suite_id,
            key_salt: MEDIA_KEY_SALT[..len].to_vec(),
        })?;
        let mut wire = vec![MediaConfig::byte(suite)];
        for p in packets.iter().take(10) {
            wire.extend(media_record(MediaOp::Raw, 4, 1, &sender.rtp(p)?));
        }
        wire.extend(media_record(MediaOp::Raw, 0, 1, &sender.rtcp(&sr)?));
        put(dir, &format!("{label}-wire"), &wire)?;
    }
    Ok(())
}

/// The identity target's fixtures (a valid identity, as `IdentityDir` writes it) and
/// its seeds (each file as the data, all four at once, the CA on the command line, a
/// missing file, a CA bundle).
fn identity_seeds(root: &Path) -> Res {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use tv_agent::identity::{Enrolled, IdentityDir};
    let make_ca = |tag: &str| -> Result<String, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("call-proxy-server CA {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        Ok(params.self_signed(&key)?.pem())
    };
    let ca = make_ca("0fa2c3d4")?;
    let scratch = tv_fuzz::scratch_dir("gen-identity");
    tv_fuzz::reset_dir(&scratch);
    let id = IdentityDir::new(&scratch);
    id.key_or_new()?;
    id.save_enrolled(
        ca.as_bytes(),
        &Enrolled {
            user_id: 2002,
            server: "192.0.2.10:7600".into(),
        },
    )?;
    let fixtures = root.join("../fixtures/identity");
    std::fs::create_dir_all(&fixtures)?;
    let names = ["enrolled.json", "tv.key", "tv.crt", "server-ca.crt"];
    let mut bodies = Vec::new();
    for name in names {
        let body = std::fs::read(scratch.join("identity").join(name))?;
        std::fs::write(fixtures.join(name), &body)?;
        bodies.push(body);
    }
    std::fs::remove_dir_all(&scratch)?;

    let dir = root.join("identity_files");
    for (which, name) in (0u8..).zip(names) {
        put(&dir, name, &with_mode(which, &bodies[usize::from(which)]))?;
    }
    let mut all = vec![4u8];
    for body in &bodies {
        all.extend_from_slice(&u16::try_from(body.len())?.to_be_bytes());
        all.extend_from_slice(body);
    }
    put(&dir, "all-four", &all)?;
    put(
        &dir,
        "ca-argument-user",
        &with_mode(3 | 8 | 0x10, &bodies[3]),
    )?;
    put(&dir, "no-enrollment", &with_mode(3 | 0x20, &bodies[3]))?;
    let bundle = format!("{}{ca}", make_ca("1b2c3d4e")?);
    put(&dir, "ca-bundle", &with_mode(3, bundle.as_bytes()))?;
    put(
        &dir,
        "enrolled-extra-field",
        &with_mode(
            0,
            br#"{"user_id": 18446744073709551615, "server": "[::1]:7600", "x": []}"#,
        ),
    )?;
    Ok(())
}

/// The media check's seeds: each fixture (real files made by ffmpeg) behind its kind byte.
fn media_check_seeds(dir: &Path) -> Res {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../media-check/tests/fixtures");
    for (kind, name) in [
        (0u8, "voice.opus"),
        (1, "picture.png"),
        (1, "picture.jpg"),
        (2, "clip.mp4"),
    ] {
        let label = name.replace('.', "-");
        put(
            dir,
            &label,
            &with_mode(kind, &std::fs::read(fixtures.join(name))?),
        )?;
    }
    Ok(())
}
