//! Fuzz target: a version-1 client's decoding of server frames (the frozen
//! `v1::Codec<v1::ServerMsg, _>` stream, and one `v1::ServerMsg` bincode payload through
//! `decode_message`), as agents one release behind read them. Input layout: see
//! `tv_fuzz::split_input`.
//!
//! Invariants beyond "does not panic": the stream decodes the same whole and in chunks;
//! a decoded message converts to the current message set and back unchanged; the
//! server's version-1 codec encodes that current message to exactly the bytes the v1
//! codec writes for it, and they decode to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shared_proto::codec::decode_message;
use shared_proto::{v1, ServerCodec};
use tokio_util::codec::{Decoder, Encoder};
use tv_fuzz::{decode_stream, split_input, Mode};

/// A version-1 client's codec: decodes server messages.
type V1Client = v1::Codec<v1::ServerMsg, v1::ClientMsg>;
/// The version-1 codec of a server built before version 2: encodes server messages.
type V1Server = v1::Codec<v1::ClientMsg, v1::ServerMsg>;

fn check(old: &v1::ServerMsg) {
    let current = shared_proto::ServerMsg::from(old.clone());
    let back = v1::ServerMsg::try_from(current.clone()).expect("a v1 message is in v1");
    assert_eq!(&back, old, "v1 -> current -> v1 changed the message");
    let mut by_v1 = BytesMut::new();
    V1Server::new()
        .encode(old, &mut by_v1)
        .expect("a decoded v1 message re-encodes");
    let mut by_server = BytesMut::new();
    ServerCodec::new(v1::PROTOCOL_VERSION)
        .encode(&current, &mut by_server)
        .expect("the server encodes it in v1");
    assert_eq!(
        by_v1, by_server,
        "the server's v1 bytes differ from v1's own"
    );
    let again = V1Client::new().decode(&mut by_v1).expect("decodes");
    assert_eq!(again.as_ref(), Some(old));
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split_input(data) else {
        return;
    };
    match mode {
        Mode::Payload => {
            if let Ok(old) = decode_message::<v1::ServerMsg>(bytes) {
                check(&old);
            }
        }
        Mode::Stream { chunk } => {
            for old in decode_stream(V1Client::new, bytes, chunk).iter().flatten() {
                check(old);
            }
        }
    }
});
