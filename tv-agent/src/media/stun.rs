//! STUN messages on the media socket (RFC 8489), through `stun_codec`: the attribute set
//! the agent reads and writes (base STUN, ICE's PRIORITY/USE-CANDIDATE/ICE-CONTROLLING/
//! ICE-CONTROLLED, TURN's), telling STUN apart from (S)RTP by the first byte (RFC 7983),
//! and short-term MESSAGE-INTEGRITY with FINGERPRINT.
//!
//! Pure: no I/O.

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5245::attributes::{IceControlled, IceControlling, Priority, UseCandidate};
use stun_codec::rfc5389::attributes::{
    AlternateServer, ErrorCode, Fingerprint, MappedAddress, MessageIntegrity, Nonce, Realm,
    Software, UnknownAttributes, Username, XorMappedAddress,
};
use stun_codec::rfc5766::attributes::{
    ChannelNumber, Data, DontFragment, Lifetime, RequestedTransport, ReservationToken,
    XorPeerAddress, XorRelayAddress,
};
use stun_codec::{Message, MessageDecoder, MessageEncoder, TransactionId};

stun_codec::define_attribute_enums!(
    Attribute,
    AttributeDecoder,
    AttributeEncoder,
    [
        MappedAddress,
        Username,
        MessageIntegrity,
        ErrorCode,
        UnknownAttributes,
        Realm,
        Nonce,
        XorMappedAddress,
        Software,
        AlternateServer,
        Fingerprint,
        Priority,
        UseCandidate,
        IceControlled,
        IceControlling,
        ChannelNumber,
        Lifetime,
        XorPeerAddress,
        Data,
        XorRelayAddress,
        RequestedTransport,
        DontFragment,
        ReservationToken
    ]
);

/// A STUN message with the agent's attributes.
pub type StunMessage = Message<Attribute>;

/// STUN's magic cookie (RFC 8489 §5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// Largest STUN message the agent reads.
pub const MAX_STUN: usize = 1280;

/// What a datagram on the media socket is, by its first byte (RFC 7983 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demux {
    /// 0..=3: STUN (with the magic cookie).
    Stun,
    /// 64..=79: TURN ChannelData (RFC 8656 §12.4).
    ChannelData,
    /// 128..=191: RTP or RTCP (SRTP/SRTCP).
    Rtp,
    /// Anything else (DTLS, ZRTP, garbage).
    Other,
}

/// Classifies a datagram.
pub fn demux(datagram: &[u8]) -> Demux {
    match datagram.first() {
        Some(0..=3) if datagram.len() >= 20 && datagram[4..8] == MAGIC_COOKIE => Demux::Stun,
        Some(64..=79) => Demux::ChannelData,
        Some(128..=191) => Demux::Rtp,
        _ => Demux::Other,
    }
}

/// Decodes a STUN message; `None` for anything malformed (wrong length, bad
/// FINGERPRINT, a broken attribute) or larger than [`MAX_STUN`].
pub fn decode(datagram: &[u8]) -> Option<StunMessage> {
    if datagram.len() > MAX_STUN || demux(datagram) != Demux::Stun {
        return None;
    }
    MessageDecoder::<Attribute>::new()
        .decode_from_bytes(datagram)
        .ok()?
        .ok()
}

/// Whether the message carries an attribute it must be understood for (types below
/// 0x8000) that this agent does not know.
pub fn has_unknown_required(msg: &StunMessage) -> bool {
    msg.unknown_attributes()
        .any(|a| stun_codec::Attribute::get_type(a).is_comprehension_required())
}

/// Encodes `msg`; `None` if it cannot be (an attribute out of range).
pub fn encode(msg: StunMessage) -> Option<Vec<u8>> {
    MessageEncoder::new().encode_into_bytes(msg).ok()
}

/// Encodes `msg` with MESSAGE-INTEGRITY for the short-term credential `password` (ICE
/// checks), then FINGERPRINT.
pub fn encode_with_integrity(mut msg: StunMessage, password: &str) -> Option<Vec<u8>> {
    let mi = MessageIntegrity::new_short_term_credential(&msg, password).ok()?;
    msg.add_attribute(mi);
    let fp = Fingerprint::new(&msg).ok()?;
    msg.add_attribute(fp);
    encode(msg)
}

/// Whether `msg` carries a MESSAGE-INTEGRITY valid for the short-term `password`.
pub fn integrity_ok(msg: &StunMessage, password: &str) -> bool {
    msg.get_attribute::<MessageIntegrity>()
        .is_some_and(|mi| mi.check_short_term_credential(password).is_ok())
}

/// A fresh random transaction id.
pub fn transaction_id() -> TransactionId {
    TransactionId::new(rand::random())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_codec::rfc5389::methods::BINDING;
    use stun_codec::MessageClass;

    #[test]
    fn first_bytes_tell_stun_channel_data_and_rtp_apart() {
        let mut stun = vec![0u8; 20];
        stun[4..8].copy_from_slice(&MAGIC_COOKIE);
        assert_eq!(demux(&stun), Demux::Stun);
        assert_eq!(demux(&stun[..19]), Demux::Other, "too short for STUN");
        stun[4] = 0;
        assert_eq!(demux(&stun), Demux::Other, "no magic cookie");
        assert_eq!(demux(&[0x40, 0, 0, 0]), Demux::ChannelData);
        assert_eq!(demux(&[0x80, 111]), Demux::Rtp);
        assert_eq!(demux(&[22, 254]), Demux::Other, "DTLS");
        assert_eq!(demux(&[]), Demux::Other);
    }

    #[test]
    fn integrity_is_checked_and_tampering_breaks_the_fingerprint() {
        let mut m = StunMessage::new(MessageClass::Request, BINDING, transaction_id());
        m.add_attribute(Username::new("a:b".into()).unwrap());
        m.add_attribute(Priority::new(7));
        let bytes = encode_with_integrity(m, "passwordpasswordpasswd").unwrap();
        let back = decode(&bytes).expect("decodes");
        assert!(integrity_ok(&back, "passwordpasswordpasswd"));
        assert!(!integrity_ok(&back, "wrong"));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 30] ^= 1; // inside the HMAC
        assert!(decode(&bad).is_none(), "the fingerprint no longer matches");
        assert!(decode(&bytes[..bytes.len() - 4]).is_none(), "truncated");
        assert!(!has_unknown_required(&back));
    }
}
