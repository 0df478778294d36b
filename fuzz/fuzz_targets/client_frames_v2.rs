//! Fuzz target: the server's decoding of client frames in protocol version 2: the
//! length-prefixed [`ServerCodec`] stream and [`envelope::decode_client`] on one
//! payload (every request kind, including the enrollment kinds 0x000b/0x000c and the
//! SRTP keys appended to Dial and Answer). Input layout: see `tv_fuzz::split_input`.
//!
//! Invariants beyond "does not panic": the stream decodes the same whole and in chunks;
//! no frame consumes less than its prefix; `Request::validate` runs on every request; a
//! decoded request re-encodes (as a client of this build sends it) and decodes to the
//! same request; an unknown kind is never one of the known request kinds.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shared_proto::envelope::{self, request_kind};
use shared_proto::{ClientCodec, ClientFrame, ClientMsg, Request, ServerCodec, PROTOCOL_VERSION};
use tokio_util::codec::{Decoder, Encoder};
use tv_fuzz::{decode_stream, split_input, Mode};

/// Every request kind this build knows (one value of each variant).
fn known_kinds() -> [u16; 16] {
    [
        Request::Register(shared_proto::Register {
            user_id: 1,
            media_port: 1,
            agent_version: String::new(),
        }),
        Request::Heartbeat,
        Request::QueryState { users: vec![] },
        Request::Dial {
            callee: 1,
            key: None,
            srtp: None,
            ice: None,
        },
        Request::Answer {
            call_id: 1,
            srtp: None,
            ice: None,
        },
        Request::Reject { call_id: 1 },
        Request::HangUp { call_id: 1 },
        Request::FetchCached { after: 0, limit: 1 },
        Request::AckCached { call_ids: vec![] },
        Request::Bye,
        Request::StartEnrollment {
            agent_version: String::new(),
        },
        Request::PollEnrollment,
        Request::Subscribe {
            contacts: vec![],
            others: vec![],
        },
        Request::PresenceAck {
            subscription: 0,
            seq: 0,
            status: shared_proto::ErrorCode::OK,
        },
        Request::SetPresence {
            do_not_disturb: false,
            hidden: false,
        },
        Request::IceServers,
    ]
    .map(|r| request_kind(&r))
}

fn check(frame: &ClientFrame) {
    match frame {
        ClientFrame::Msg(msg) => {
            let _ = msg.request.validate();
            // What a client of this build sends for it decodes to the same message.
            let mut wire = BytesMut::new();
            ClientCodec::new()
                .encode(msg, &mut wire)
                .expect("a decoded request re-encodes");
            let again = ServerCodec::new(PROTOCOL_VERSION)
                .decode(&mut wire)
                .expect("a re-encoded request decodes");
            assert_eq!(
                again.as_ref(),
                Some(frame),
                "re-encoding changed the request"
            );
            assert!(wire.is_empty());
            let mut payload = Vec::new();
            envelope::encode_client(msg, &mut payload).expect("encodes");
            assert_eq!(
                envelope::decode_client(&payload).expect("decodes"),
                ClientFrame::Msg(ClientMsg::clone(msg))
            );
        }
        ClientFrame::Unknown { kind, .. } => {
            assert!(
                !known_kinds().contains(kind),
                "a known kind {kind:#06x} decoded as unknown"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split_input(data) else {
        return;
    };
    match mode {
        Mode::Payload => {
            if let Ok(frame) = envelope::decode_client(bytes) {
                check(&frame);
            }
        }
        Mode::Stream { chunk } => {
            for frame in decode_stream(|| ServerCodec::new(PROTOCOL_VERSION), bytes, chunk)
                .iter()
                .flatten()
            {
                check(frame);
            }
        }
    }
});
