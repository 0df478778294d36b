//! Fuzz target: the connection preamble (`shared_proto::preamble`), the first bytes
//! either side reads from a new connection, and the reason text a rejecting server
//! appends to it.
//!
//! Invariants beyond "does not panic": decoding fails exactly when the magic is wrong;
//! a decoded preamble encodes back to the same 8 bytes; a version-1 preamble asks for
//! [`Features::V1`]; the announced reason length never exceeds `MAX_REASON_LEN`; an
//! encoded reason is a length-prefixed, UTF-8, character-boundary prefix of its text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::preamble::{encode_reason, reason_len, MAX_REASON_LEN};
use shared_proto::{v1, Features, Preamble, PreambleError, MAGIC, PREAMBLE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(head) = data.get(..PREAMBLE_LEN) else {
        return;
    };
    let mut bytes = [0u8; PREAMBLE_LEN];
    bytes.copy_from_slice(head);
    match Preamble::decode(bytes) {
        Ok(p) => {
            assert_eq!(bytes[..4], MAGIC, "accepted a wrong magic");
            assert_eq!(p.encode(), bytes, "decode/encode is not the identity");
            if p.version == v1::PROTOCOL_VERSION {
                assert_eq!(p.features(), Features::V1);
            } else {
                assert_eq!(p.features(), Features(p.word));
            }
            assert_eq!(p.status().0, p.word);
        }
        Err(PreambleError::BadMagic(m)) => {
            assert_ne!(m, MAGIC, "refused the right magic");
            assert_eq!(m[..], bytes[..4]);
        }
    }

    // A rejecting server's reason: a 2-byte length, then that many bytes of UTF-8.
    let rest = &data[PREAMBLE_LEN..];
    if let Some(prefix) = rest.get(..2) {
        let len = reason_len([prefix[0], prefix[1]]);
        assert!(len <= MAX_REASON_LEN);
        let text = String::from_utf8_lossy(&rest[2..]);
        let enc = encode_reason(&text);
        let n = usize::from(u16::from_be_bytes([enc[0], enc[1]]));
        assert_eq!(enc.len(), 2 + n);
        assert!(n <= MAX_REASON_LEN);
        assert_eq!(reason_len([enc[0], enc[1]]), n);
        let sent = std::str::from_utf8(&enc[2..]).expect("the reason is UTF-8");
        assert!(text.starts_with(sent), "the reason is a prefix of its text");
        assert!(
            n == text.len() || text.len() > MAX_REASON_LEN,
            "truncated needlessly"
        );
    }
});
