//! Fuzz target: the server's decoding of client frames in the frozen protocol version 1
//! ([`ServerCodec`] for version 1, and the raw `v1::ClientMsg` bincode payload through
//! `decode_message`). Input layout: see `tv_fuzz::split_input`.
//!
//! Invariants beyond "does not panic": the stream decodes the same whole and in chunks;
//! `Request::validate` runs on every request; a decoded request is expressible in
//! version 1 again and its version-1 encoding decodes to the same request; the v1
//! client codec (`v1::Codec`) and the server codec agree on every frame; the request
//! also round-trips through version 2 (every v1 request exists there).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shared_proto::codec::decode_message;
use shared_proto::{v1, ClientCodec, ClientFrame, ServerCodec, PROTOCOL_VERSION};
use tokio_util::codec::{Decoder, Encoder};
use tv_fuzz::{decode_stream, split_input, Mode};

fn check(old: &v1::ClientMsg) {
    let current: shared_proto::ClientMsg = old.clone().into();
    let _ = current.request.validate();
    // Back to version 1: the same message, and its bytes decode to it again.
    let back = v1::ClientMsg::try_from(current.clone()).expect("a v1 request is in v1");
    assert_eq!(&back, old, "v1 -> current -> v1 changed the request");
    let mut wire = BytesMut::new();
    v1::Codec::<v1::ServerMsg, v1::ClientMsg>::new()
        .encode(&back, &mut wire)
        .expect("a decoded v1 request re-encodes");
    let again = ServerCodec::new(v1::PROTOCOL_VERSION)
        .decode(&mut wire)
        .expect("a re-encoded v1 request decodes");
    assert_eq!(again, Some(ClientFrame::Msg(current.clone())));
    // The same request over version 2.
    let mut v2 = BytesMut::new();
    ClientCodec::new()
        .encode(&current, &mut v2)
        .expect("encodes in v2");
    let in_v2 = ServerCodec::new(PROTOCOL_VERSION)
        .decode(&mut v2)
        .expect("decodes in v2");
    assert_eq!(in_v2, Some(ClientFrame::Msg(current)));
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split_input(data) else {
        return;
    };
    match mode {
        Mode::Payload => {
            if let Ok(old) = decode_message::<v1::ClientMsg>(bytes) {
                check(&old);
            }
        }
        Mode::Stream { chunk } => {
            let server = decode_stream(|| ServerCodec::new(v1::PROTOCOL_VERSION), bytes, chunk);
            let plain = decode_stream(v1::Codec::<v1::ClientMsg, v1::ServerMsg>::new, bytes, chunk);
            assert_eq!(server.len(), plain.len(), "the two v1 decoders disagree");
            for (s, p) in server.iter().zip(&plain) {
                match (s, p) {
                    (Ok(ClientFrame::Msg(m)), Ok(old)) => {
                        assert_eq!(m, &shared_proto::ClientMsg::from(old.clone()));
                        check(old);
                    }
                    (Err(_), Err(_)) => {}
                    other => panic!("the two v1 decoders disagree: {other:?}"),
                }
            }
        }
    }
});
