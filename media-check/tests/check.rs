//! The media check against real files made by ffmpeg (tests/fixtures/README.md) and
//! against broken, forged and over-long versions of them.

use std::io::Cursor;

use media_check::{check, Error, Kind, Limits, Media};

const LIMITS: Limits = Limits {
    max_voice_ms: 120_000,
    max_video_ms: 60_000,
    max_picture_side: 4_096,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(kind: Kind, bytes: &[u8], limits: &Limits) -> Result<Media, Error> {
    check(kind, Cursor::new(bytes), bytes.len() as u64, limits)
}

fn reason(r: Result<Media, Error>) -> &'static str {
    match r {
        Ok(m) => panic!("accepted: {m:?}"),
        Err(e) => e.reason(),
    }
}

#[test]
fn real_files_are_accepted_with_what_they_are() {
    let voice = run(Kind::Voice, &fixture("voice.opus"), &LIMITS).unwrap();
    assert_eq!(voice.mime, "audio/ogg");
    let ms = voice.duration_ms.unwrap();
    assert!((3_990..=4_020).contains(&ms), "{ms} ms");
    for (name, mime) in [("picture.png", "image/png"), ("picture.jpg", "image/jpeg")] {
        let p = run(Kind::Picture, &fixture(name), &LIMITS).unwrap();
        assert_eq!(
            (p.mime, p.width, p.height),
            (mime, Some(320), Some(240)),
            "{name}"
        );
        assert_eq!(p.duration_ms, None);
    }
    let clip = run(Kind::Video, &fixture("clip.mp4"), &LIMITS).unwrap();
    assert_eq!(
        (clip.mime, clip.width, clip.height),
        ("video/mp4", Some(320), Some(240))
    );
    let ms = clip.duration_ms.unwrap();
    assert!((2_900..=3_100).contains(&ms), "{ms} ms");
}

#[test]
fn a_file_of_another_kind_is_refused() {
    for (kind, other) in [
        (Kind::Voice, "picture.png"),
        (Kind::Voice, "clip.mp4"),
        (Kind::Picture, "voice.opus"),
        (Kind::Picture, "clip.mp4"),
        (Kind::Video, "picture.jpg"),
        (Kind::Video, "voice.opus"),
    ] {
        assert_eq!(
            reason(run(kind, &fixture(other), &LIMITS)),
            "wrong_type",
            "{kind:?} {other}"
        );
    }
    for kind in [Kind::Voice, Kind::Picture, Kind::Video] {
        assert!(run(kind, b"", &LIMITS).is_err());
        assert!(run(kind, b"hello, this is text", &LIMITS).is_err());
    }
}

#[test]
fn every_truncation_is_refused() {
    for (kind, name) in [
        (Kind::Voice, "voice.opus"),
        (Kind::Picture, "picture.png"),
        (Kind::Picture, "picture.jpg"),
        (Kind::Video, "clip.mp4"),
    ] {
        let full = fixture(name);
        // Cuts through every part of the file: headers, data, the last bytes.
        let mut cuts: Vec<usize> = (1..40).map(|i| full.len() * i / 40).collect();
        cuts.extend([1, 2, 8, 30, full.len() - 2, full.len() - 1]);
        for cut in cuts {
            let r = run(kind, &full[..cut], &LIMITS);
            assert!(r.is_err(), "{name} cut at {cut} of {}: {r:?}", full.len());
        }
    }
}

#[test]
fn a_flipped_bit_in_a_voice_message_fails_its_page_crc() {
    let mut voice = fixture("voice.opus");
    let at = voice.len() / 2;
    voice[at] ^= 0x10;
    assert_eq!(reason(run(Kind::Voice, &voice, &LIMITS)), "corrupt");
}

#[test]
fn over_long_media_are_refused_as_too_long() {
    let short = Limits {
        max_voice_ms: 2_000,
        max_video_ms: 1_000,
        ..LIMITS
    };
    let e = run(Kind::Voice, &fixture("voice.opus"), &short).unwrap_err();
    assert!(matches!(e, Error::TooLong(_)), "{e:?}");
    let e = run(Kind::Video, &fixture("clip.mp4"), &short).unwrap_err();
    assert!(matches!(e, Error::TooLong(_)), "{e:?}");
}

#[test]
fn pictures_larger_than_the_limit_are_refused_before_decoding() {
    let small = Limits {
        max_picture_side: 256,
        ..LIMITS
    };
    for name in ["picture.png", "picture.jpg"] {
        assert_eq!(
            reason(run(Kind::Picture, &fixture(name), &small)),
            "too_large",
            "{name}"
        );
    }
    assert_eq!(
        reason(run(Kind::Video, &fixture("clip.mp4"), &small)),
        "too_large"
    );
    // A PNG that declares 100000 × 100000 pixels in a valid header.
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 6, 0, 0, 0]);
    png_chunk(&mut bomb, b"IHDR", &ihdr);
    png_chunk(
        &mut bomb,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut bomb, b"IEND", &[]);
    assert_eq!(reason(run(Kind::Picture, &bomb, &LIMITS)), "too_large");
}

#[test]
fn a_jpeg_that_is_only_its_magic_is_refused() {
    let mut fake = vec![0xff, 0xd8, 0xff, 0xe0];
    fake.extend(std::iter::repeat_n(0x41, 5_000));
    assert!(run(Kind::Picture, &fake, &LIMITS).is_err());
    // The real JPEG with its Huffman tables emptied: a header, no decodable picture.
    let mut jpeg = fixture("picture.jpg");
    let mut at = 2;
    let mut emptied = 0;
    while at + 4 < jpeg.len() && jpeg[at] == 0xff && jpeg[at + 1] != 0xda {
        let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        if jpeg[at + 1] == 0xc4 {
            // Class/id, then 16 code counts: all zero.
            jpeg[at + 5..at + 21].fill(0);
            emptied += 1;
        }
        at += 2 + len;
    }
    assert!(emptied > 0, "the fixture has Huffman tables");
    assert!(run(Kind::Picture, &jpeg, &LIMITS).is_err());
}

#[test]
fn a_clip_whose_boxes_do_not_tile_the_file_is_refused() {
    let mut clip = fixture("clip.mp4");
    clip.extend(b"trailing bytes that are no box");
    assert!(run(Kind::Video, &clip, &LIMITS).is_err());
}

#[test]
fn a_forged_last_granule_cannot_make_a_long_voice_message_look_short() {
    let mut voice = fixture("voice.opus");
    // The last page: its granule position says 0.5 s of a 4 s message.
    let last = voice
        .windows(4)
        .rposition(|w| w == b"OggS")
        .expect("an Ogg page");
    voice[last + 6..last + 14].copy_from_slice(&(312u64 + 24_000).to_le_bytes());
    fix_ogg_crc(&mut voice[last..]);
    assert_eq!(reason(run(Kind::Voice, &voice, &LIMITS)), "corrupt");
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let mut crc = !0u32;
    for &b in &out[start..] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    out.extend((!crc).to_be_bytes());
}

/// Recomputes the CRC of the Ogg page `page` starts with (RFC 3533: polynomial
/// 0x04c11db7, not reflected, over the page with its CRC field zeroed).
fn fix_ogg_crc(page: &mut [u8]) {
    let segments = usize::from(page[26]);
    let body: usize = page[27..27 + segments]
        .iter()
        .map(|&b| usize::from(b))
        .sum();
    let page = &mut page[..27 + segments + body];
    page[22..26].fill(0);
    let mut crc = 0u32;
    for &b in page.iter() {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    page[22..26].copy_from_slice(&crc.to_le_bytes());
}
