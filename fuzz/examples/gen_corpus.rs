//! Writes the seed corpus in `fuzz/corpus/<target>/` from real messages, encoded by the
//! product's own codecs (and real agent files written by the agent's own writer), so the
//! fuzzer starts from frames a peer really sends. Run it after a protocol change:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus` (a normal build, no
//! fuzzing instrumentation). Seeds are named by content, so running it again only adds.
//!
//! Frame targets take a mode byte first (see `tv_fuzz::split_input`): each message is
//! written once as a bare payload (`0x01`) and once as a framed stream (`0x0e`: fed in
//! 8-byte chunks); a whole session's frames also go in as one stream (`0x00`: byte by byte).

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
            },
        ),
        (
            "dial-keyed",
            Request::Dial {
                callee: 2002,
                key: Some(0x0102_0304_0506_0708),
                srtp: None,
            },
        ),
        (
            "dial-srtp",
            Request::Dial {
                callee: 2002,
                key: Some(7),
                srtp: Some(key(SrtpSuite::AES_CM_128_HMAC_SHA1_80, 30)),
            },
        ),
        (
            "answer",
            Request::Answer {
                call_id: 42,
                srtp: None,
            },
        ),
        (
            "answer-srtp",
            Request::Answer {
                call_id: 42,
                srtp: Some(key(SrtpSuite::AEAD_AES_128_GCM, 28)),
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
            }),
        ),
        (
            "answered",
            ServerMsg::Event(Event::CallAnswered {
                call_id: 42,
                srtp: None,
            }),
        ),
        (
            "answered-srtp",
            ServerMsg::Event(Event::CallAnswered {
                call_id: 42,
                srtp: Some(key(SrtpSuite::AEAD_AES_128_GCM, 28)),
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
    println!("seed corpus written to {}", root.display());
    Ok(())
}
