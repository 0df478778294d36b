//! The connection preamble: the first 8 bytes each side sends before any frame.
//!
//! Client → server: `b"TVCP"`, protocol version (u16, big-endian), flags (u16): in
//! version 1 zero, from version 2 the [`Features`] the client wants pushed to it.
//! Server → client: `b"TVCP"`, the protocol version it will speak on this connection
//! (the client's, when it accepts), a status (u16, an [`ErrorCode`] value; 0 =
//! accepted). A non-zero status is followed by a u16 length and that many bytes of UTF-8
//! reason, after which the server closes the connection. The preamble never changes
//! shape between versions, so any two versions can always tell each other why they
//! cannot talk.
//!
//! Versions: 1 is the frozen original encoding ([`crate::v1`]); 2 is the kind-tagged
//! envelope ([`crate::envelope`]). A server of this build accepts both.

use crate::messages::{ErrorCode, Event};

/// Magic bytes that open every control connection ("TV Call Proxy").
pub const MAGIC: [u8; 4] = *b"TVCP";
/// The protocol version this build's clients speak: the kind-tagged envelope.
/// Bump only if the envelope itself changes; new message kinds do not need it.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest version a server of this build still accepts (the frozen [`crate::v1`]).
pub const MIN_PROTOCOL_VERSION: u16 = crate::v1::PROTOCOL_VERSION;
/// Size of a preamble on the wire.
pub const PREAMBLE_LEN: usize = 8;
/// Longest reason text a rejecting server sends after its preamble.
pub const MAX_REASON_LEN: usize = 512;

/// One side's preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Protocol version of the sender.
    pub version: u16,
    /// Client: flags (0 in version 1; [`Features`] from version 2). Server: status, an
    /// [`ErrorCode`] value.
    pub word: u16,
}

/// Feature bits a version-2 client sets in its preamble's flags: the kinds of server
/// pushes it wants. The server pushes an event only to sessions that asked for its
/// feature, so a new event kind (with a new bit) never reaches a client that cannot
/// decode it. Bits the server does not know are ignored. Never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u16);

impl Features {
    /// No pushes at all.
    pub const NONE: Features = Features(0);
    /// Call events: [`Event::IncomingCall`], [`Event::CallAnswered`], [`Event::CallEnded`].
    pub const CALLS: Features = Features(1 << 0);
    /// [`Event::CachedCallsWaiting`]: new missed calls arrived while registered.
    pub const CACHED_NOTICES: Features = Features(1 << 1);
    /// Presence: [`Event::PresenceChanged`] and [`Event::PresenceLost`].
    pub const PRESENCE: Features = Features(1 << 2);
    /// [`Event::MessagesWaiting`]: messages wait to be fetched on a transfer link.
    pub const MESSAGES: Features = Features(1 << 3);
    /// Every feature this build knows.
    pub const KNOWN: Features =
        Features(Self::CALLS.0 | Self::CACHED_NOTICES.0 | Self::PRESENCE.0 | Self::MESSAGES.0);
    /// What a version-1 session gets: the pushes that existed when version 1 was frozen.
    pub const V1: Features = Features(Self::CALLS.0 | Self::CACHED_NOTICES.0);

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits set in both.
    pub fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// The feature a session must have asked for to be pushed `event`.
    pub fn of(event: &Event) -> Features {
        match event {
            Event::IncomingCall { .. } | Event::CallAnswered { .. } | Event::CallEnded { .. } => {
                Features::CALLS
            }
            Event::CachedCallsWaiting { .. } => Features::CACHED_NOTICES,
            Event::PresenceChanged { .. } | Event::PresenceLost { .. } => Features::PRESENCE,
            Event::MessagesWaiting { .. } => Features::MESSAGES,
        }
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;

    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

/// Why a received preamble was not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// The first four bytes were not [`MAGIC`]: the peer does not speak this protocol.
    #[error("not a TV call-proxy peer (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
}

impl Preamble {
    /// The preamble a client of this build sends, asking for every known feature.
    pub fn client() -> Self {
        Self::client_with(Features::KNOWN)
    }

    /// The preamble of a client of this build that wants only `features` pushed.
    pub fn client_with(features: Features) -> Self {
        Preamble {
            version: PROTOCOL_VERSION,
            word: features.0,
        }
    }

    /// The preamble a server of this build answers with (speaking its newest version).
    pub fn server(status: ErrorCode) -> Self {
        Self::server_speaking(PROTOCOL_VERSION, status)
    }

    /// A server preamble announcing the version it speaks on this connection.
    pub fn server_speaking(version: u16, status: ErrorCode) -> Self {
        Preamble {
            version,
            word: status.0,
        }
    }

    /// The flags of a client preamble, as features (version 1 clients get [`Features::V1`]).
    pub fn features(self) -> Features {
        if self.version == crate::v1::PROTOCOL_VERSION {
            Features::V1
        } else {
            Features(self.word)
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
        // Version 1 (what agents built before version 2 send).
        assert_eq!(
            crate::v1::client_preamble().encode(),
            *b"TVCP\x00\x01\x00\x00"
        );
        // Version 2 asking for call events, cached-call notices, presence and messages.
        assert_eq!(Preamble::client().encode(), *b"TVCP\x00\x02\x00\x0f");
        assert_eq!(
            Preamble::client_with(Features::CALLS).encode(),
            *b"TVCP\x00\x02\x00\x01"
        );
    }

    #[test]
    fn features_of_a_preamble() {
        assert_eq!(crate::v1::client_preamble().features(), Features::V1);
        let p = Preamble::client_with(Features::CACHED_NOTICES);
        assert!(p.features().contains(Features::CACHED_NOTICES));
        assert!(!p.features().contains(Features::CALLS));
        assert_eq!(
            Features(0xffff).intersection(Features::KNOWN),
            Features::KNOWN
        );
        let call = Event::CallAnswered {
            call_id: 1,
            srtp: None,
            ice: None,
        };
        assert_eq!(Features::of(&call), Features::CALLS);
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
