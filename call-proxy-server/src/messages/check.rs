//! The media check of a body before it is stored: the adapter between the body store and
//! the `media-check` crate (which check each kind gets, its limits, its errors).

use std::io::{Read, Seek};

use shared_proto::MessageKind;

use super::bodies::{MediaLimits, SealError};

pub use media_check::Media as Checked;

/// Checks a body of `kind`, `len` bytes long.
/// (The handler runs it on the blocking pool, one per core at a time: `Messages::checks`.)
pub fn body<R: Read + Seek>(
    kind: MessageKind,
    body: R,
    len: u64,
    limits: &MediaLimits,
) -> Result<Checked, SealError> {
    let kind = match kind {
        MessageKind::VOICE => media_check::Kind::Voice,
        MessageKind::PICTURE => media_check::Kind::Picture,
        MessageKind::VIDEO => media_check::Kind::Video,
        other => {
            return Err(SealError::BadMedia {
                reason: "wrong_type",
                message: format!("a {} message has no body", other.name()),
            })
        }
    };
    media_check::check(kind, body, len, limits).map_err(|e| match e {
        media_check::Error::TooLong(why) => SealError::TooLong(why),
        media_check::Error::Io(e) => SealError::Io(e),
        e @ media_check::Error::Bad { .. } => SealError::BadMedia {
            reason: e.reason(),
            message: e.to_string(),
        },
    })
}
