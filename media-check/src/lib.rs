//! The check of a message body before the server stores it.
//!
//! A TV may send anything as a "voice message", "picture" or "clip"; the server keeps
//! only what the receiving TV can actually play or show. [`check`] reads a complete body
//! (already on disk, its length and SHA-256 verified) and answers what it is — MIME type,
//! duration, dimensions — or why it is refused, with a short stable [`Error::reason`]
//! word for the server's metrics.
//!
//! - Voice: Ogg Opus (RFC 7845) — page CRCs, the `OpusHead` and `OpusTags` headers, every
//!   packet's TOC byte and frame lengths (RFC 6716 §3), granule positions consistent with
//!   the packets, the end-of-stream page; duration from the last granule minus pre-skip.
//! - Pictures: JPEG or PNG — dimensions from the header first (a "PNG bomb" declaring
//!   100000 × 100000 pixels is refused before a pixel is decoded), then the whole image
//!   decoded (a truncated or corrupt file is refused).
//! - Clips: MP4 whose top-level boxes tile the file exactly, with an H.264 video track;
//!   duration from the track's media header and sample table (the longer of the two).
//!
//! Invariant: memory is bounded whatever the input — no allocation is sized by a length
//! read from the body without a cap, pictures are decoded row by row (PNG) or at 1/8
//! scale (JPEG: every coefficient is still entropy-decoded), and Ogg packets are as long
//! as the bytes that hold them. Fuzzed by the `media_check` target in `fuzz/`.

use std::io::{self, BufReader, Read, Seek};

mod mp4;
mod opus;
mod picture;

/// What a body claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A voice message: Ogg Opus.
    Voice,
    /// A picture: JPEG or PNG.
    Picture,
    /// A clip: MP4 with H.264 video.
    Video,
}

/// The limits a body is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest voice message, in milliseconds.
    pub max_voice_ms: u32,
    /// Longest clip, in milliseconds.
    pub max_video_ms: u32,
    /// Largest picture (or clip) side, in pixels.
    pub max_picture_side: u32,
}

/// What the check learned of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// MIME type.
    pub mime: &'static str,
    /// Length of a voice message or clip.
    pub duration_ms: Option<u32>,
    /// Width of a picture or clip.
    pub width: Option<u32>,
    /// Height of a picture or clip.
    pub height: Option<u32>,
}

/// Why a body is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It is not a well-formed file of its kind.
    #[error("{message}")]
    Bad {
        /// A short stable word (a metric's label).
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// It is a good file, longer than its kind allows.
    #[error("{0}")]
    TooLong(String),
    /// Reading it failed (not the body's fault).
    #[error("reading the body: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// A short stable word for metrics: `wrong_type`, `truncated`, `corrupt`,
    /// `unsupported`, `too_large`, `too_long` or `io`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Bad { reason, .. } => reason,
            Error::TooLong(_) => "too_long",
            Error::Io(_) => "io",
        }
    }
}

/// A refusal with `reason` and a message for people.
pub(crate) fn bad(reason: &'static str, message: impl Into<String>) -> Error {
    Error::Bad {
        reason,
        message: message.into(),
    }
}

/// An I/O error from a decoder: the end of the file inside a structure is the body's
/// fault (truncated); anything else is the reader's.
pub(crate) fn from_io(e: io::Error, what: &str) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        bad("truncated", format!("the {what} ends early"))
    } else {
        Error::Io(e)
    }
}

/// Checks a body of `kind`, `len` bytes long, read from `body` (positioned at its start).
pub fn check<R: Read + Seek>(
    kind: Kind,
    body: R,
    len: u64,
    limits: &Limits,
) -> Result<Media, Error> {
    let mut body = BufReader::new(body);
    match kind {
        Kind::Voice => opus::check(&mut body, limits),
        Kind::Picture => picture::check(&mut body, limits),
        Kind::Video => mp4::check(&mut body, len, limits),
    }
}

/// Milliseconds of `units` at `per_second`, saturating at `u32::MAX`.
pub(crate) fn millis(units: u64, per_second: u64) -> u32 {
    if per_second == 0 {
        return u32::MAX;
    }
    let ms = u128::from(units) * 1000 / u128::from(per_second);
    u32::try_from(ms).unwrap_or(u32::MAX)
}
