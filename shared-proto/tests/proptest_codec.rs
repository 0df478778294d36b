//! Property tests of the codec: every message round-trips through a frame, and no byte
//! sequence makes the decoder panic.

use bytes::BytesMut;
use proptest::prelude::*;
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
        any::<u64>().prop_map(|callee| Request::Dial { callee }),
        any::<u64>().prop_map(|call_id| Request::Answer { call_id }),
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
                call_date_ms
            }
        ),
        any::<u64>().prop_map(|call_id| Event::CallAnswered { call_id }),
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

proptest! {
    #[test]
    fn client_messages_round_trip(id in any::<u32>(), request in request()) {
        let msg = ClientMsg { id, request };
        let mut buf = BytesMut::new();
        ControlCodec::<ServerMsg, ClientMsg>::new().encode(&msg, &mut buf).expect("encodes");
        let back = ControlCodec::<ClientMsg, ServerMsg>::new().decode(&mut buf).expect("decodes");
        prop_assert_eq!(back, Some(msg));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn server_messages_round_trip(msg in server_msg()) {
        let mut buf = BytesMut::new();
        ControlCodec::<ClientMsg, ServerMsg>::new().encode(&msg, &mut buf).expect("encodes");
        let back = ControlCodec::<ServerMsg, ClientMsg>::new().decode(&mut buf).expect("decodes");
        prop_assert_eq!(back, Some(msg));
    }

    #[test]
    fn arbitrary_bytes_never_panic_either_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut a = BytesMut::from(&bytes[..]);
        let mut codec = ControlCodec::<ClientMsg, ServerMsg>::new();
        // Decode until the decoder wants more bytes or reports an error.
        while let Ok(Some(_)) = codec.decode(&mut a) {}
        let mut b = BytesMut::from(&bytes[..]);
        let mut codec = ControlCodec::<ServerMsg, ClientMsg>::new();
        while let Ok(Some(_)) = codec.decode(&mut b) {}
    }

    #[test]
    fn framed_arbitrary_payload_never_panics(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        // A correct length prefix around random bytes exercises the message decoder itself.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&payload);
        let _ = ControlCodec::<ClientMsg, ServerMsg>::new().decode(&mut buf);
        let _ = decode_message::<ServerMsg>(&payload);
    }
}
