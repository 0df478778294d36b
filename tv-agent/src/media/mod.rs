//! The media engine: capture → Opus → RTP → UDP → jitter buffer → Opus → playback, with
//! RTCP reports for call quality. Media flows directly between the two TVs.
//!
//! - [`audio`]: sources and sinks (sound card, tone, WAV, null).
//! - [`gather`]: server-reflexive candidates from STUN servers (pure logic).
//! - [`ice`]: ICE connectivity checks, nomination and consent for a call (pure logic).
//! - [`stun`]: STUN messages on the media socket and the first-byte demultiplexing.
//! - [`jitter`]: the adaptive jitter buffer (pure logic).
//! - [`rtp_header`]: a structural check of an RTP header before any decoder sees it.
//! - [`router`]: routes a session's incoming RTP to its streams (audio, video) by payload
//!   type and SSRC (pure logic).
//! - [`session`]: one call's media over the TV's UDP media socket.
//! - [`srtp`]: SRTP/SRTCP at that socket's boundary, the call's keys and the key log.
//! - [`transport`]: a call's use of the media socket: demultiplexing, ICE and the
//!   selected path, or a fixed peer for agents without ICE.
//! - [`turn`]: a TURN client (RFC 8656) for the relayed candidate (pure logic).
//! - [`voice_note`]: voice messages, recorded into and played from Ogg Opus files.

pub mod audio;
pub mod gather;
pub mod ice;
pub mod jitter;
pub mod router;
pub mod rtp_header;
pub mod session;
pub mod srtp;
pub mod stun;
pub mod transport;
pub mod turn;
pub mod voice_note;

pub use audio::{open_sink, open_source, AudioSink, AudioSource, AudioSpec};
pub use router::StreamKind;
pub use session::{CallQuality, MediaParams, MediaSession};
pub use srtp::CallKeys;
