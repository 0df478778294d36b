//! Fuzz target: a client's decoding of server frames in protocol version 2: the
//! length-prefixed [`ClientCodec`] stream and [`envelope::decode_server`] on one payload
//! (replies including `Enrollment`, errors, events with the appended SRTP keys,
//! closings). Input layout: see `tv_fuzz::split_input`.
//!
//! Invariants beyond "does not panic": the stream decodes the same whole and in chunks;
//! a payload fails to decode only when it is shorter than the envelope header (anything
//! else is a message or `Skipped`); a skipped frame keeps its kind's class; a decoded
//! message re-encodes (as the server sends it) and decodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shared_proto::envelope::{self, HEADER_LEN};
use shared_proto::{ClientCodec, KindClass, ServerCodec, ServerFrame, PROTOCOL_VERSION};
use tokio_util::codec::{Decoder, Encoder};
use tv_fuzz::{decode_stream, split_input, Mode};

fn check(frame: &ServerFrame) {
    match frame {
        ServerFrame::Msg(msg) => {
            let mut wire = BytesMut::new();
            ServerCodec::new(PROTOCOL_VERSION)
                .encode(msg, &mut wire)
                .expect("a decoded server message re-encodes");
            let again = ClientCodec::new()
                .decode(&mut wire)
                .expect("a re-encoded server message decodes");
            assert_eq!(
                again.as_ref(),
                Some(frame),
                "re-encoding changed the message"
            );
            assert!(wire.is_empty());
        }
        ServerFrame::Skipped { kind, class, .. } => {
            assert_eq!(*class, KindClass::of(*kind));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split_input(data) else {
        return;
    };
    match mode {
        Mode::Payload => match envelope::decode_server(bytes) {
            Ok(frame) => check(&frame),
            Err(e) => assert!(
                bytes.len() < HEADER_LEN,
                "a {}-byte payload failed: {e}",
                bytes.len()
            ),
        },
        Mode::Stream { chunk } => {
            for frame in decode_stream(ClientCodec::new, bytes, chunk)
                .iter()
                .flatten()
            {
                check(frame);
            }
        }
    }
});
