//! The connection preamble: the first 8 bytes each side sends before any frame.
//!
//! Client → server: `b"TVCP"`, protocol version (u16, big-endian), flags (u16, zero).
//! Server → client: `b"TVCP"`, the server's protocol version, a status (u16, an
//! [`ErrorCode`] value; 0 = accepted). A non-zero status is followed by a u16 length and
//! that many bytes of UTF-8 reason, after which the server closes the connection. The
//! preamble never changes shape between versions, so any two versions can always tell
//! each other why they cannot talk.

use crate::messages::ErrorCode;

/// Magic bytes that open every control connection ("TV Call Proxy").
pub const MAGIC: [u8; 4] = *b"TVCP";
/// The protocol version this build speaks. Bump on any incompatible message change.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of a preamble on the wire.
pub const PREAMBLE_LEN: usize = 8;
/// Longest reason text a rejecting server sends after its preamble.
pub const MAX_REASON_LEN: usize = 512;

/// One side's preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Protocol version of the sender.
    pub version: u16,
    /// Client: flags (must be 0 in version 1). Server: status, an [`ErrorCode`] value.
    pub word: u16,
}

/// Why a received preamble was not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// The first four bytes were not [`MAGIC`]: the peer does not speak this protocol.
    #[error("not a TV call-proxy peer (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
}

impl Preamble {
    /// The preamble a client of this build sends.
    pub fn client() -> Self {
        Preamble {
            version: PROTOCOL_VERSION,
            word: 0,
        }
    }

    /// The preamble a server of this build answers with.
    pub fn server(status: ErrorCode) -> Self {
        Preamble {
            version: PROTOCOL_VERSION,
            word: status.0,
        }
    }

    /// Encodes to the 8 wire bytes.
    pub fn encode(self) -> [u8; PREAMBLE_LEN] {
        let v = self.version.to_be_bytes();
        let w = self.word.to_be_bytes();
        [
            MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1], w[0], w[1],
        ]
    }

    /// Decodes 8 wire bytes; fails only on a wrong magic (versions are the caller's call).
    pub fn decode(bytes: [u8; PREAMBLE_LEN]) -> Result<Self, PreambleError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(PreambleError::BadMagic(magic));
        }
        Ok(Preamble {
            version: u16::from_be_bytes([bytes[4], bytes[5]]),
            word: u16::from_be_bytes([bytes[6], bytes[7]]),
        })
    }

    /// The status word of a server preamble.
    pub fn status(self) -> ErrorCode {
        ErrorCode(self.word)
    }
}

/// Encodes the reason a rejecting server appends to its preamble (u16 length + UTF-8),
/// truncated on a character boundary to [`MAX_REASON_LEN`] bytes.
pub fn encode_reason(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let text = &reason.as_bytes()[..end];
    let mut out = Vec::with_capacity(2 + text.len());
    // `end` is at most MAX_REASON_LEN, which fits a u16.
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(text);
    out
}

/// The length of the reason text announced by a rejecting server's 2-byte prefix,
/// bounded by [`MAX_REASON_LEN`] so a peer never allocates what a server claims.
pub fn reason_len(prefix: [u8; 2]) -> usize {
    usize::from(u16::from_be_bytes(prefix)).min(MAX_REASON_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_preamble_golden_bytes() {
        assert_eq!(Preamble::client().encode(), *b"TVCP\x00\x01\x00\x00");
    }

    #[test]
    fn server_preamble_carries_status() {
        let p = Preamble::server(ErrorCode::UNSUPPORTED_VERSION);
        let bytes = p.encode();
        assert_eq!(&bytes[..4], b"TVCP");
        let back = Preamble::decode(bytes).expect("valid preamble");
        assert_eq!(back.status(), ErrorCode::UNSUPPORTED_VERSION);
        assert_eq!(back.version, PROTOCOL_VERSION);
    }

    #[test]
    fn http_request_is_bad_magic() {
        let err = Preamble::decode(*b"GET / HT").expect_err("not our protocol");
        assert_eq!(err, PreambleError::BadMagic(*b"GET "));
    }

    #[test]
    fn reason_is_length_prefixed_and_truncated_on_char_boundary() {
        assert_eq!(encode_reason("full"), b"\x00\x04full".to_vec());
        assert_eq!(reason_len([0, 4]), 4);
        assert_eq!(reason_len([0xff, 0xff]), MAX_REASON_LEN);
        let long = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let enc = encode_reason(&long);
        let len = u16::from_be_bytes([enc[0], enc[1]]) as usize;
        assert!(len <= MAX_REASON_LEN);
        assert!(std::str::from_utf8(&enc[2..]).is_ok());
        assert_eq!(enc.len(), 2 + len);
    }
}
