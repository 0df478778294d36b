//! Fuzz target: the server's check of a message body (`media_check::check`), which reads
//! whatever a TV uploaded as a voice message, picture or clip. The first byte picks the
//! kind; the rest is the body.
//!
//! Invariants beyond "does not panic" (and, under the script's address-space limit, no
//! allocation sized by a forged length): an accepted body has the MIME type of its kind,
//! a duration within the limit for voice and clips, and sides within the limit.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use media_check::{check, Kind, Limits};

/// Small limits, so the fuzzer reaches the limit checks with small inputs.
const LIMITS: Limits = Limits {
    max_voice_ms: 10_000,
    max_video_ms: 10_000,
    max_picture_side: 1_024,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let kind = match mode % 3 {
        0 => Kind::Voice,
        1 => Kind::Picture,
        _ => Kind::Video,
    };
    let Ok(media) = check(kind, Cursor::new(body), body.len() as u64, &LIMITS) else {
        return;
    };
    match kind {
        Kind::Voice => {
            assert_eq!(media.mime, "audio/ogg");
            assert!(media.duration_ms.is_some_and(|d| d <= LIMITS.max_voice_ms));
        }
        Kind::Picture => {
            assert!(media.mime == "image/png" || media.mime == "image/jpeg");
            assert_eq!(media.duration_ms, None);
        }
        Kind::Video => {
            assert_eq!(media.mime, "video/mp4");
            assert!(media.duration_ms.is_some_and(|d| d <= LIMITS.max_video_ms));
        }
    }
    if kind != Kind::Voice {
        for side in [media.width, media.height] {
            assert!(side.is_some_and(|s| (1..=LIMITS.max_picture_side).contains(&s)));
        }
    }
});
