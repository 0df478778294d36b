//! Property tests of the codecs: every message round-trips through a frame in both
//! protocol versions, unknown kinds are skipped rather than failed, and no byte sequence
//! makes a decoder panic.

use bytes::BytesMut;
use proptest::prelude::*;
use shared_proto::envelope::{self, KindClass};
use shared_proto::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio_util::codec::{Decoder, Encoder};

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

fn sockaddr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn net_state() -> impl Strategy<Value = NetState> {
    prop_oneof![
        Just(NetState::Offline),
        Just(NetState::Online),
        Just(NetState::Unknown)
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u64>(), any::<u16>(), ".{0,64}").prop_map(|(user_id, media_port, v)| {
            Request::Register(Register {
                user_id,
                media_port,
                agent_version: v,
            })
        }),
        Just(Request::Heartbeat),
        prop::collection::vec(any::<u64>(), 0..300).prop_map(|users| Request::QueryState { users }),
        (any::<u64>(), any::<Option<u64>>()).prop_map(|(callee, key)| Request::Dial {
            callee,
            key,
            srtp: None,
            ice: None
        }),
        any::<u64>().prop_map(|call_id| Request::Answer {
            call_id,
            srtp: None,
            ice: None
        }),
        any::<u64>().prop_map(|call_id| Request::Reject { call_id }),
        any::<u64>().prop_map(|call_id| Request::HangUp { call_id }),
        (any::<u64>(), any::<u16>())
            .prop_map(|(after, limit)| Request::FetchCached { after, limit }),
        prop::collection::vec(any::<u64>(), 0..300)
            .prop_map(|call_ids| Request::AckCached { call_ids }),
        Just(Request::Bye),
    ]
}

fn end_reason() -> impl Strategy<Value = EndReason> {
    prop_oneof![
        any::<u64>().prop_map(|by| EndReason::HungUp { by }),
        Just(EndReason::NoAnswer),
        Just(EndReason::Rejected),
        Just(EndReason::PeerLost),
        Just(EndReason::ServerShutdown),
    ]
}

fn missed_reason() -> impl Strategy<Value = MissedReason> {
    prop_oneof![
        Just(MissedReason::Offline),
        Just(MissedReason::NoAnswer),
        Just(MissedReason::Busy)
    ]
}

fn cached_call() -> impl Strategy<Value = CachedCall> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        missed_reason(),
        net_state(),
    )
        .prop_map(
            |(call_id, caller, callee, call_date_ms, reason, caller_state)| CachedCall {
                call_id,
                caller,
                callee,
                call_date_ms,
                reason,
                caller_state,
            },
        )
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u64>(), ip(), any::<u32>(), any::<i64>(), any::<u32>()).prop_map(
            |(session_id, observed_ip, hb, t, c)| Reply::Registered(Registered {
                session_id,
                observed_ip,
                heartbeat_interval_ms: hb,
                server_time_ms: t,
                cached_waiting: c,
            })
        ),
        any::<i64>().prop_map(|server_time_ms| Reply::HeartbeatAck { server_time_ms }),
        prop::collection::vec(
            (any::<u64>(), net_state(), any::<Option<i64>>()).prop_map(|(user_id, state, l)| {
                UserState {
                    user_id,
                    state,
                    last_seen_ms: l,
                }
            }),
            0..50
        )
        .prop_map(Reply::States),
        (any::<u64>(), sockaddr()).prop_map(|(call_id, callee_media)| Reply::Dial(
            DialOutcome::Ringing {
                call_id,
                callee_media
            }
        )),
        any::<u64>().prop_map(|call_id| Reply::Dial(DialOutcome::Cached { call_id })),
        any::<u64>().prop_map(|call_id| Reply::Dial(DialOutcome::Busy { call_id })),
        Just(Reply::Done),
        (prop::collection::vec(cached_call(), 0..40), any::<bool>())
            .prop_map(|(calls, more)| Reply::Cached(CachedPage { calls, more })),
        any::<u32>().prop_map(|count| Reply::Acked { count }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), sockaddr(), any::<i64>()).prop_map(
            |(call_id, caller, caller_media, call_date_ms)| Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
                srtp: None,
                ice: None
            }
        ),
        any::<u64>().prop_map(|call_id| Event::CallAnswered {
            call_id,
            srtp: None,
            ice: None
        }),
        (any::<u64>(), end_reason())
            .prop_map(|(call_id, reason)| Event::CallEnded { call_id, reason }),
        any::<u32>().prop_map(|count| Event::CachedCallsWaiting { count }),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    (any::<u16>(), ".{0,80}").prop_map(|(c, m)| WireError::new(ErrorCode(c), m))
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<u32>(), reply()).prop_map(|(id, r)| ServerMsg::Reply { id, result: Ok(r) }),
        (any::<u32>(), wire_error()).prop_map(|(id, e)| ServerMsg::Reply { id, result: Err(e) }),
        event().prop_map(ServerMsg::Event),
        wire_error().prop_map(ServerMsg::Closing),
    ]
}

/// Kinds of each class that this build does not know.
fn unknown_kind(class: KindClass) -> impl Strategy<Value = u16> {
    let base: u16 = match class {
        KindClass::Request => 0x0000,
        KindClass::Reply => 0x4000,
        KindClass::Event => 0x8000,
        KindClass::Control => 0xc000,
    };
    // Known kinds sit at the bottom of each range (and ERROR at 0x7fff).
    (0x0100u16..0x3ffe).prop_map(move |k| base | k)
}

proptest! {
    #[test]
    fn client_messages_round_trip(id in any::<u32>(), request in request()) {
        let msg = ClientMsg { id, request };
        let mut buf = BytesMut::new();
        ClientCodec::new().encode(&msg, &mut buf).expect("encodes");
        let back = ServerCodec::new(PROTOCOL_VERSION).decode(&mut buf).expect("decodes");
        prop_assert_eq!(back, Some(ClientFrame::Msg(msg)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn server_messages_round_trip(msg in server_msg()) {
        let mut buf = BytesMut::new();
        ServerCodec::new(PROTOCOL_VERSION).encode(&msg, &mut buf).expect("encodes");
        let back = ClientCodec::new().decode(&mut buf).expect("decodes");
        prop_assert_eq!(back, Some(ServerFrame::Msg(msg)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn version_1_client_messages_round_trip(id in any::<u32>(), request in request()) {
        let msg = ClientMsg { id, request };
        let old = v1::ClientMsg::try_from(msg.clone()).expect("every request existed in v1");
        let mut buf = BytesMut::new();
        v1::Codec::<v1::ServerMsg, v1::ClientMsg>::new().encode(&old, &mut buf).expect("encodes");
        let back = ServerCodec::new(v1::PROTOCOL_VERSION).decode(&mut buf).expect("decodes");
        // Version 1 has no idempotency key: a v1 dial arrives without one.
        let mut expected = msg;
        if let Request::Dial { key, .. } = &mut expected.request {
            *key = None;
        }
        prop_assert_eq!(back, Some(ClientFrame::Msg(expected)));
    }

    #[test]
    fn version_1_server_messages_round_trip(msg in server_msg()) {
        let mut buf = BytesMut::new();
        ServerCodec::new(v1::PROTOCOL_VERSION).encode(&msg, &mut buf).expect("encodes");
        let back = v1::Codec::<v1::ServerMsg, v1::ClientMsg>::new()
            .decode(&mut buf)
            .expect("decodes")
            .expect("a frame");
        prop_assert_eq!(ServerMsg::from(back), msg);
    }

    #[test]
    fn unknown_request_kinds_are_answerable(kind in unknown_kind(KindClass::Request),
                                           id in any::<u32>(),
                                           body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = BytesMut::from(&envelope::frame(kind, id, &body)[..]);
        let got = ServerCodec::new(PROTOCOL_VERSION).decode(&mut buf).expect("decodes");
        prop_assert_eq!(got, Some(ClientFrame::Unknown { id, kind }));
    }

    #[test]
    fn unknown_server_kinds_are_skipped(kind in prop_oneof![
                                            unknown_kind(KindClass::Reply),
                                            unknown_kind(KindClass::Event),
                                            unknown_kind(KindClass::Control),
                                        ],
                                        id in any::<u32>(),
                                        body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = BytesMut::from(&envelope::frame(kind, id, &body)[..]);
        match ClientCodec::new().decode(&mut buf).expect("decodes") {
            Some(ServerFrame::Skipped { kind: k, id: i, class, .. }) => {
                prop_assert_eq!(k, kind);
                prop_assert_eq!(i, id);
                prop_assert_eq!(class, KindClass::of(kind));
            }
            other => prop_assert!(false, "expected a skipped frame, got {:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        // Decode until the decoder wants more bytes or reports an error.
        let mut a = BytesMut::from(&bytes[..]);
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        while let Ok(Some(_)) = codec.decode(&mut a) {}
        let mut b = BytesMut::from(&bytes[..]);
        let mut codec = ServerCodec::new(v1::PROTOCOL_VERSION);
        while let Ok(Some(_)) = codec.decode(&mut b) {}
        let mut c = BytesMut::from(&bytes[..]);
        let mut codec = ClientCodec::new();
        while let Ok(Some(_)) = codec.decode(&mut c) {}
        let mut d = BytesMut::from(&bytes[..]);
        let mut codec = v1::Codec::<v1::ServerMsg, v1::ClientMsg>::new();
        while let Ok(Some(_)) = codec.decode(&mut d) {}
    }

    #[test]
    fn framed_arbitrary_payload_never_panics(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        // A correct length prefix around random bytes exercises the message decoders.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&payload);
        let _ = ServerCodec::new(PROTOCOL_VERSION).decode(&mut buf.clone());
        let _ = ServerCodec::new(v1::PROTOCOL_VERSION).decode(&mut buf.clone());
        let _ = ClientCodec::new().decode(&mut buf);
        let _ = envelope::decode_server(&payload);
        let _ = envelope::decode_client(&payload);
        let _ = decode_message::<v1::ServerMsg>(&payload);
    }
}
