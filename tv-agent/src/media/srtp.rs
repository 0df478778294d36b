//! SRTP and SRTCP (RFC 3711; `AES_CM_128_HMAC_SHA1_80`, and `AEAD_AES_128_GCM` of
//! RFC 7714) at the media socket's boundary, on webrtc-srtp's contexts.
//!
//! Keys are exchanged SDES style (RFC 4568): each TV makes a fresh random master key and
//! salt for what it sends in each call and announces it over the authenticated, encrypted
//! control link (`Dial.srtp`, `Answer.srtp`); the server relays it to the other TV. So a
//! call has one key per direction: [`CallKeys::send`] encrypts what this TV sends
//! ([`Protector`]), [`CallKeys::recv`] authenticates and decrypts what the peer sends
//! ([`Unprotector`]). The caller offers [`OFFERED_SUITE`]; the callee answers in the
//! caller's suite.
//!
//! The media engine stays sans-I/O where it was: the session's send task protects each
//! marshalled packet just before `send_to`, its receive task unprotects each datagram just
//! after `recv_from`; the router, the jitter buffer and RTCP see plain packets only.
//!
//! What the receive side refuses (each an [`SrtpError`], the packet dropped):
//! - a packet whose authentication tag does not verify (a flipped bit, a wrong key, a
//!   plain RTP packet) or too short to carry one;
//! - a replay, or a packet older than the replay window ([`REPLAY_WINDOW`]);
//! - an SRTCP packet without the encryption flag (webrtc-srtp 0.15 would hand such a
//!   packet on *unauthenticated*; this module never does);
//! - a stream (SSRC) beyond [`MAX_STREAMS`].
//!
//! A stream's decryption state is kept only once a packet of that stream authenticated:
//! until then each attempt runs on a fresh context, so forged packets can neither grow
//! the state nor set the replay window's start (webrtc-srtp sets it on the first packet
//! it *checks*, authentic or not).
//!
//! [`Keylog`]: with `TV_AGENT_SRTP_KEYLOG=FILE` set (off by default, warned about once
//! in the log), one line per direction of each call is appended to `FILE` (created with
//! mode 0600): `call_id ssrc suite inline:BASE64(key‖salt)`, the SSRC in decimal, as in
//! SDP's `a=ssrc`; the inline value as in SDP's `a=crypto`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use rand::RngCore;
use shared_proto::{CallId, SrtpKey, SrtpSuite};
use tokio::time::Instant;
use webrtc_srtp::context::Context;
use webrtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use webrtc_srtp::protection_profile::ProtectionProfile;

/// The suite a caller offers: the one every SRTP stack has (RFC 3711's default and
/// WebRTC's mandatory one), which ffmpeg, Wireshark and libsrtp read too. A callee
/// answers in whichever known suite the caller offered.
pub const OFFERED_SUITE: SrtpSuite = SrtpSuite::AES_CM_128_HMAC_SHA1_80;

/// Packets (SRTP sequence numbers, SRTCP indexes) of the replay window: 2.5 s of audio
/// at 50 packets/s, beyond the jitter buffer's depth.
pub const REPLAY_WINDOW: usize = 128;

/// Streams (SSRCs) of the peer this call decrypts: audio, video and some room.
pub const MAX_STREAMS: usize = 4;

/// The environment variable naming the key log file.
pub const KEYLOG_ENV: &str = "TV_AGENT_SRTP_KEYLOG";

/// Bytes of the SRTCP index word (E flag and 31-bit index).
const SRTCP_INDEX_LEN: usize = 4;

/// RTCP header and sender SSRC, before the encrypted part of an SRTCP packet.
const RTCP_FIXED_LEN: usize = 8;

/// Why a packet was not protected or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    /// The authentication tag did not verify (tampered, wrong key, or not SRTP at all).
    #[error("SRTP authentication failed")]
    Auth,
    /// A packet seen already, or older than the replay window.
    #[error("SRTP replay")]
    Replay,
    /// Too short or not parseable as SRTP/SRTCP.
    #[error("malformed SRTP packet: {0}")]
    Malformed(&'static str),
    /// A stream beyond [`MAX_STREAMS`].
    #[error("too many SRTP streams from the peer")]
    TooManyStreams,
    /// The key cannot be used (unknown suite, wrong length).
    #[error("unusable SRTP key: {0}")]
    Key(String),
    /// Protecting a packet failed (e.g. the key's packet limit).
    #[error("cannot protect a packet: {0}")]
    Protect(String),
}

impl SrtpError {
    /// Whether the packet failed authentication (counted as such).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, SrtpError::Auth | SrtpError::Malformed(_))
    }
}

/// A fresh random master key and salt for `suite`, from the thread's CSPRNG (ChaCha,
/// seeded and reseeded from the OS). `None` for a suite this build does not know.
pub fn fresh_key(suite: SrtpSuite) -> Option<SrtpKey> {
    let mut key_salt = vec![0u8; suite.key_salt_len()?];
    rand::rng().fill_bytes(&mut key_salt);
    Some(SrtpKey { suite, key_salt })
}

/// A call's SRTP keys: one per direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallKeys {
    /// The call (for the key log).
    pub call_id: CallId,
    /// This TV's sending key (it announced it to the peer).
    pub send: SrtpKey,
    /// The peer's sending key (the server relayed it).
    pub recv: SrtpKey,
}

/// The webrtc-srtp profile of a suite.
fn profile(suite: SrtpSuite) -> Result<ProtectionProfile, SrtpError> {
    match suite {
        SrtpSuite::AES_CM_128_HMAC_SHA1_80 => Ok(ProtectionProfile::Aes128CmHmacSha1_80),
        SrtpSuite::AEAD_AES_128_GCM => Ok(ProtectionProfile::AeadAes128Gcm),
        other => Err(SrtpError::Key(format!("unknown suite {}", other.0))),
    }
}

/// A one-way context for `key`, with replay protection (used only when decrypting).
fn context(key: &SrtpKey) -> Result<Context, SrtpError> {
    let profile = profile(key.suite)?;
    if !key.is_valid() {
        return Err(SrtpError::Key(format!(
            "{} needs {:?} bytes of key and salt, not {}",
            key.suite.name(),
            key.suite.key_salt_len(),
            key.key_salt.len()
        )));
    }
    let (master_key, master_salt) = key.key_salt.split_at(profile.key_len());
    Context::new(
        master_key,
        master_salt,
        profile,
        Some(srtp_replay_protection(REPLAY_WINDOW)),
        Some(srtcp_replay_protection(REPLAY_WINDOW)),
    )
    .map_err(|e| SrtpError::Key(e.to_string()))
}

/// What webrtc-srtp's error means for the packet.
fn classify(e: webrtc_srtp::Error) -> SrtpError {
    use webrtc_srtp::Error as E;
    match e {
        E::SrtpSsrcDuplicated(..) | E::SrtcpSsrcDuplicated(..) | E::ErrDuplicated => {
            SrtpError::Replay
        }
        E::RtpFailedToVerifyAuthTag
        | E::RtcpFailedToVerifyAuthTag
        | E::ErrFailedToVerifyAuthTag
        | E::AesGcm(_) => SrtpError::Auth,
        _ => SrtpError::Malformed("not a valid SRTP/SRTCP packet"),
    }
}

/// The sending direction: encrypts and authenticates this TV's RTP and RTCP.
pub struct Protector {
    /// webrtc-srtp's context, used only to encrypt.
    ctx: Context,
}

impl Protector {
    /// A protector for this TV's sending key.
    pub fn new(key: &SrtpKey) -> Result<Protector, SrtpError> {
        Ok(Protector { ctx: context(key)? })
    }

    /// SRTP for a marshalled RTP packet.
    pub fn rtp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        self.ctx
            .encrypt_rtp(packet)
            .map_err(|e| SrtpError::Protect(e.to_string()))
    }

    /// SRTCP for a marshalled RTCP packet (encrypted, E flag set).
    pub fn rtcp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        if packet.len() < RTCP_FIXED_LEN {
            return Err(SrtpError::Protect("RTCP packet too short".into()));
        }
        self.ctx
            .encrypt_rtcp(packet)
            .map_err(|e| SrtpError::Protect(e.to_string()))
    }
}

/// One of the peer's streams whose packets authenticated.
struct Stream {
    /// Its SSRC.
    ssrc: u32,
    /// SRTP state (rollover counter, replay window), once an RTP packet authenticated.
    rtp: Option<Context>,
    /// SRTCP state (replay window), once an RTCP packet authenticated.
    rtcp: Option<Context>,
}

/// The receiving direction: authenticates and decrypts the peer's SRTP and SRTCP.
pub struct Unprotector {
    /// The peer's sending key.
    key: SrtpKey,
    /// Its streams so far, at most [`MAX_STREAMS`].
    streams: Vec<Stream>,
    /// Bytes after the encrypted part of an SRTCP packet: E flag + index, and the tag
    /// if it comes last (AES-CM); the minimum SRTCP length.
    srtcp_tail: (usize, usize),
    /// Where each new stream's key line goes, if the key log is on.
    keylog: Option<(Keylog, CallId)>,
}

/// Which of a stream's two contexts.
#[derive(Clone, Copy)]
enum Kind {
    Rtp,
    Rtcp,
}

impl Unprotector {
    /// An unprotector for the peer's sending key.
    pub fn new(key: &SrtpKey) -> Result<Unprotector, SrtpError> {
        // Checks the key once, here, rather than at the first packet.
        context(key)?;
        let tag_len = profile(key.suite)?.auth_tag_len();
        let srtcp_tail = match key.suite {
            // | header | encrypted | E+index | tag |
            SrtpSuite::AES_CM_128_HMAC_SHA1_80 => (
                SRTCP_INDEX_LEN + tag_len,
                RTCP_FIXED_LEN + SRTCP_INDEX_LEN + tag_len,
            ),
            // | header | encrypted with the tag | E+index |
            _ => (SRTCP_INDEX_LEN, RTCP_FIXED_LEN + tag_len + SRTCP_INDEX_LEN),
        };
        Ok(Unprotector {
            key: key.clone(),
            streams: Vec::new(),
            srtcp_tail,
            keylog: None,
        })
    }

    /// Records each new stream's key line in `keylog`.
    fn with_keylog(mut self, keylog: Option<Keylog>, call_id: CallId) -> Self {
        self.keylog = keylog.map(|k| (k, call_id));
        self
    }

    /// The plain RTP packet inside an SRTP datagram.
    pub fn rtp(&mut self, datagram: &[u8]) -> Result<Bytes, SrtpError> {
        // webrtc-srtp parses the header before checking the tag, and its parser panics on
        // some malformed ones.
        if !super::rtp_header::well_formed(datagram) {
            return Err(SrtpError::Malformed("malformed RTP header"));
        }
        // The SSRC sits at bytes 8..12 of an RTP header (the library parses it fully).
        let ssrc = be32(datagram, 8).ok_or(SrtpError::Malformed("short RTP header"))?;
        self.unprotect(ssrc, Kind::Rtp, datagram)
    }

    /// The plain RTCP packet inside an SRTCP datagram.
    pub fn rtcp(&mut self, datagram: &[u8]) -> Result<Bytes, SrtpError> {
        let (tail, min_len) = self.srtcp_tail;
        if datagram.len() < min_len {
            return Err(SrtpError::Malformed("SRTCP packet too short"));
        }
        // The E flag: this agent sends only encrypted SRTCP, and webrtc-srtp would pass
        // an unencrypted one on without checking its tag.
        if datagram[datagram.len() - tail] & 0x80 == 0 {
            return Err(SrtpError::Auth);
        }
        let ssrc = be32(datagram, 4).ok_or(SrtpError::Malformed("short RTCP header"))?;
        self.unprotect(ssrc, Kind::Rtcp, datagram)
    }

    fn unprotect(&mut self, ssrc: u32, kind: Kind, datagram: &[u8]) -> Result<Bytes, SrtpError> {
        let decrypt = |ctx: &mut Context| match kind {
            Kind::Rtp => ctx.decrypt_rtp(datagram),
            Kind::Rtcp => ctx.decrypt_rtcp(datagram),
        };
        let known = self.streams.iter().position(|s| s.ssrc == ssrc);
        if let Some(i) = known {
            let slot = match kind {
                Kind::Rtp => &mut self.streams[i].rtp,
                Kind::Rtcp => &mut self.streams[i].rtcp,
            };
            if let Some(ctx) = slot {
                return decrypt(ctx).map_err(classify);
            }
        } else if self.streams.len() >= MAX_STREAMS {
            return Err(SrtpError::TooManyStreams);
        }
        // Not authenticated before: try on a fresh context, kept only if this packet
        // authenticates.
        let mut ctx = context(&self.key)?;
        let plain = decrypt(&mut ctx).map_err(classify)?;
        let i = match known {
            Some(i) => i,
            None => {
                self.streams.push(Stream {
                    ssrc,
                    rtp: None,
                    rtcp: None,
                });
                if let Some((log, call_id)) = &self.keylog {
                    log.record(*call_id, ssrc, &self.key);
                }
                self.streams.len() - 1
            }
        };
        match kind {
            Kind::Rtp => self.streams[i].rtp = Some(ctx),
            Kind::Rtcp => self.streams[i].rtcp = Some(ctx),
        }
        Ok(plain)
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Both directions of a call: the protector for `keys.send` (this TV's stream `ssrc`)
/// and the unprotector for `keys.recv`; with the key log on, the sending direction's
/// line is written now and each of the peer's streams' once it first authenticates.
pub fn for_call(keys: &CallKeys, ssrc: u32) -> Result<(Protector, Unprotector), SrtpError> {
    let protector = Protector::new(&keys.send)?;
    let keylog = Keylog::from_env();
    if let Some(log) = &keylog {
        log.record(keys.call_id, ssrc, &keys.send);
    }
    let unprotector = Unprotector::new(&keys.recv)?.with_keylog(keylog, keys.call_id);
    Ok((protector, unprotector))
}

/// Whether the key log warning was logged already.
static KEYLOG_WARNED: AtomicBool = AtomicBool::new(false);

/// The SRTP key log (`TV_AGENT_SRTP_KEYLOG`, like `SSLKEYLOGFILE`), for debugging and
/// independent checks (ffmpeg, Wireshark).
#[derive(Debug, Clone)]
pub struct Keylog {
    /// The file lines are appended to.
    path: PathBuf,
}

impl Keylog {
    /// The key log named by the environment, if set (warned about once per process).
    pub fn from_env() -> Option<Keylog> {
        let path = std::env::var_os(KEYLOG_ENV).filter(|p| !p.is_empty())?;
        let log = Keylog {
            path: PathBuf::from(path),
        };
        if !KEYLOG_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                file = %log.path.display(),
                "{KEYLOG_ENV} is set: every call's SRTP keys are appended to this file, \
                 and whoever reads it can decrypt the calls; for debugging only"
            );
        }
        Some(log)
    }

    /// A key log writing to `path`.
    pub fn at(path: PathBuf) -> Keylog {
        Keylog { path }
    }

    /// The line for one direction of a call.
    pub fn line(call_id: CallId, ssrc: u32, key: &SrtpKey) -> String {
        format!(
            "{call_id} {ssrc} {} inline:{}\n",
            key.suite.name(),
            base64::engine::general_purpose::STANDARD.encode(&key.key_salt)
        )
    }

    /// Appends one direction's line (one write, so lines of TVs sharing a file do not
    /// interleave). A failure is logged and otherwise ignored: the call goes on.
    pub fn record(&self, call_id: CallId, ssrc: u32, key: &SrtpKey) {
        let line = Self::line(call_id, ssrc, key);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot write the SRTP key log");
        }
    }
}

/// How often at most the "dropped SRTP packets" line is logged.
pub const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits the log line about dropped packets: the first drop is logged at once,
/// later ones at most every [`DROP_LOG_EVERY`], with the number dropped since (pure
/// logic: time is passed in).
#[derive(Debug, Default)]
pub struct DropLog {
    /// When the last line was logged.
    last: Option<Instant>,
    /// Drops since then.
    since: u64,
}

impl DropLog {
    /// Notes one drop at `now`; `Some(n)` when a line is due, for `n` drops.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        match self.last {
            Some(at) if now.saturating_duration_since(at) < DROP_LOG_EVERY => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use webrtc_util::marshal::Marshal;

    fn rtp(ssrc: u32, seq: u16, payload: &[u8]) -> Bytes {
        rtp::packet::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 111,
                sequence_number: seq,
                timestamp: u32::from(seq) * 960,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        }
        .marshal()
        .unwrap()
    }

    fn sender_report(ssrc: u32) -> Bytes {
        rtcp::sender_report::SenderReport {
            ssrc,
            ntp_time: 0x1122_3344_5566_7788,
            rtp_time: 960,
            packet_count: 3,
            octet_count: 180,
            reports: vec![],
            profile_extensions: Bytes::new(),
        }
        .marshal()
        .unwrap()
    }

    fn pair(suite: SrtpSuite) -> (Protector, Unprotector) {
        let key = fresh_key(suite).unwrap();
        (
            Protector::new(&key).unwrap(),
            Unprotector::new(&key).unwrap(),
        )
    }

    const SUITES: [SrtpSuite; 2] = [
        SrtpSuite::AES_CM_128_HMAC_SHA1_80,
        SrtpSuite::AEAD_AES_128_GCM,
    ];

    #[test]
    fn fresh_keys_are_random_and_of_the_suites_length() {
        let a = fresh_key(OFFERED_SUITE).unwrap();
        let b = fresh_key(OFFERED_SUITE).unwrap();
        assert!(a.is_valid() && b.is_valid());
        assert_eq!(a.key_salt.len(), 30);
        assert_ne!(a.key_salt, b.key_salt);
        assert_eq!(
            fresh_key(SrtpSuite::AEAD_AES_128_GCM)
                .unwrap()
                .key_salt
                .len(),
            28
        );
        assert!(fresh_key(SrtpSuite(99)).is_none());
        assert_eq!(
            format!("{a:?}"),
            "SrtpKey(AES_CM_128_HMAC_SHA1_80, 30 bytes)"
        );
    }

    #[test]
    fn rtp_and_rtcp_round_trip_in_both_suites() {
        for suite in SUITES {
            let (mut tx, mut rx) = pair(suite);
            for seq in [65_530u16, 65_535, 0, 1, 2] {
                let plain = rtp(7, seq, b"opus frame");
                let wire = tx.rtp(&plain).unwrap();
                assert_ne!(
                    wire[12..],
                    plain[12..],
                    "{suite:?}: the payload is encrypted"
                );
                assert_eq!(wire[..12], plain[..12], "the header stays readable");
                assert_eq!(rx.rtp(&wire).unwrap(), plain, "{suite:?} seq {seq}");
            }
            let sr = sender_report(7);
            let wire = tx.rtcp(&sr).unwrap();
            assert_ne!(
                wire[8..sr.len()],
                sr[8..],
                "{suite:?}: the report is encrypted"
            );
            assert_eq!(rx.rtcp(&wire).unwrap(), sr, "{suite:?}");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_fails_authentication() {
        for suite in SUITES {
            let (mut tx, mut rx) = pair(suite);
            let wire = tx.rtp(&rtp(7, 100, b"some opus bytes")).unwrap();
            for i in 0..wire.len() {
                let mut bad = wire.to_vec();
                bad[i] ^= 0x01;
                let r = rx.rtp(&bad);
                assert!(r.is_err(), "{suite:?}: byte {i} flipped was accepted");
            }
            // Nothing forged left state behind: the genuine packet still goes through.
            assert!(rx.rtp(&wire).is_ok(), "{suite:?}");
            let sr = tx.rtcp(&sender_report(7)).unwrap();
            for i in 0..sr.len() {
                let mut bad = sr.to_vec();
                bad[i] ^= 0x01;
                assert!(rx.rtcp(&bad).is_err(), "{suite:?}: SRTCP byte {i} flipped");
            }
            assert!(rx.rtcp(&sr).is_ok());
        }
    }

    #[test]
    fn tampering_is_an_authentication_error() {
        let (mut tx, mut rx) = pair(OFFERED_SUITE);
        let mut bad = tx.rtp(&rtp(7, 1, b"payload")).unwrap().to_vec();
        bad[14] ^= 0x80;
        assert_eq!(rx.rtp(&bad), Err(SrtpError::Auth));
        // Plain RTP is not SRTP either.
        assert_eq!(
            rx.rtp(&rtp(7, 2, b"plain payload long enough")),
            Err(SrtpError::Auth)
        );
        // Another key's packets fail too.
        let (mut other, _) = pair(OFFERED_SUITE);
        assert_eq!(
            rx.rtp(&other.rtp(&rtp(7, 3, b"payload")).unwrap()),
            Err(SrtpError::Auth)
        );
    }

    #[test]
    fn replays_and_too_old_packets_are_refused() {
        for suite in SUITES {
            let (mut tx, mut rx) = pair(suite);
            let first = tx.rtp(&rtp(7, 1_000, b"one")).unwrap();
            assert!(rx.rtp(&first).is_ok());
            assert_eq!(rx.rtp(&first), Err(SrtpError::Replay), "{suite:?}");
            // Reordered within the window: fine; once only.
            let later = tx.rtp(&rtp(7, 1_010, b"later")).unwrap();
            let between = tx.rtp(&rtp(7, 1_005, b"between")).unwrap();
            assert!(rx.rtp(&later).is_ok());
            assert!(rx.rtp(&between).is_ok());
            assert_eq!(rx.rtp(&between), Err(SrtpError::Replay));
            // Older than the window.
            let old = tx.rtp(&rtp(7, 1_001, b"old")).unwrap();
            let far = tx
                .rtp(&rtp(7, 1_010 + REPLAY_WINDOW as u16, b"far"))
                .unwrap();
            assert!(rx.rtp(&far).is_ok());
            assert_eq!(rx.rtp(&old), Err(SrtpError::Replay));
            // SRTCP too.
            let sr = tx.rtcp(&sender_report(7)).unwrap();
            assert!(rx.rtcp(&sr).is_ok());
            assert_eq!(rx.rtcp(&sr), Err(SrtpError::Replay), "{suite:?}");
        }
    }

    #[test]
    fn a_forged_first_packet_does_not_move_the_replay_window() {
        let (mut tx, mut rx) = pair(OFFERED_SUITE);
        // A forgery well ahead of the real stream (more than the window, less than half
        // the sequence space), before any genuine packet.
        let mut forged = rtp(7, 20_000, b"forged payload").to_vec();
        forged.extend_from_slice(&[0u8; 10]);
        assert_eq!(rx.rtp(&forged), Err(SrtpError::Auth));
        for seq in 10..20 {
            assert!(rx.rtp(&tx.rtp(&rtp(7, seq, b"real")).unwrap()).is_ok());
        }
    }

    #[test]
    fn unencrypted_srtcp_is_refused() {
        let (mut tx, mut rx) = pair(OFFERED_SUITE);
        let sr = sender_report(7);
        let mut wire = tx.rtcp(&sr).unwrap().to_vec();
        // Clear the E flag and put the plain report back: webrtc-srtp alone would
        // return it without checking the tag.
        let e = wire.len() - 14;
        wire[e] &= 0x7f;
        wire[..sr.len()].copy_from_slice(&sr);
        assert_eq!(rx.rtcp(&wire), Err(SrtpError::Auth));
    }

    #[test]
    fn streams_beyond_the_limit_are_refused() {
        let (mut tx, mut rx) = pair(OFFERED_SUITE);
        for ssrc in 0..MAX_STREAMS as u32 {
            assert!(rx.rtp(&tx.rtp(&rtp(ssrc, 1, b"x")).unwrap()).is_ok());
        }
        assert_eq!(
            rx.rtp(&tx.rtp(&rtp(99, 1, b"x")).unwrap()),
            Err(SrtpError::TooManyStreams)
        );
        // Forgeries for new SSRCs never take a slot.
        let (mut tx, mut rx) = pair(OFFERED_SUITE);
        let (mut stranger, _) = pair(OFFERED_SUITE);
        for ssrc in 0..100 {
            let forged = stranger.rtp(&rtp(1_000 + ssrc, 1, b"x")).unwrap();
            assert_eq!(rx.rtp(&forged), Err(SrtpError::Auth));
        }
        assert!(rx.rtp(&tx.rtp(&rtp(5, 1, b"x")).unwrap()).is_ok());
    }

    #[test]
    fn arbitrary_datagrams_never_panic_either_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for suite in SUITES {
            let (mut tx, mut rx) = pair(suite);
            let good = tx.rtp(&rtp(7, 1, b"payload")).unwrap();
            let good_rtcp = tx.rtcp(&sender_report(7)).unwrap();
            for i in 0..20_000 {
                let mut d: Vec<u8> = match i % 3 {
                    0 => (0..rng.random_range(0..80)).map(|_| rng.random()).collect(),
                    1 => good[..rng.random_range(0..=good.len())].to_vec(),
                    _ => good_rtcp[..rng.random_range(0..=good_rtcp.len())].to_vec(),
                };
                if !d.is_empty() && i % 2 == 0 {
                    let at = rng.random_range(0..d.len());
                    d[at] = rng.random();
                }
                let _ = rx.rtp(&d);
                let _ = rx.rtcp(&d);
            }
        }
    }

    #[test]
    fn keys_of_another_length_or_suite_are_unusable() {
        let short = SrtpKey {
            suite: OFFERED_SUITE,
            key_salt: vec![1; 28],
        };
        assert!(matches!(Protector::new(&short), Err(SrtpError::Key(_))));
        assert!(matches!(Unprotector::new(&short), Err(SrtpError::Key(_))));
        let unknown = SrtpKey {
            suite: SrtpSuite(9),
            key_salt: vec![1; 30],
        };
        assert!(matches!(Unprotector::new(&unknown), Err(SrtpError::Key(_))));
    }

    #[test]
    fn the_key_log_appends_one_line_per_direction_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.log");
        let log = Keylog::at(path.clone());
        let key = SrtpKey {
            suite: OFFERED_SUITE,
            key_salt: (0..30).collect(),
        };
        log.record(42, 3_735_928_559, &key);
        log.record(42, 17, &key);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "42 3735928559 AES_CM_128_HMAC_SHA1_80 inline:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd\n\
             42 17 AES_CM_128_HMAC_SHA1_80 inline:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd\n"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn drop_lines_are_rate_limited() {
        let t0 = Instant::now();
        let mut log = DropLog::default();
        assert_eq!(log.note(t0), Some(1), "the first drop is logged at once");
        for ms in 1..100 {
            assert_eq!(log.note(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.note(t0 + DROP_LOG_EVERY), Some(100));
        assert_eq!(log.note(t0 + DROP_LOG_EVERY + Duration::from_secs(1)), None);
    }
}
