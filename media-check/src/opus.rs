//! Voice messages: Ogg Opus files (RFC 7845) checked page by page and packet by packet.

use std::io::{Read, Seek};

use ogg::{OggReadError, PacketReader};

use crate::{bad, from_io, millis, Error, Limits, Media};

/// Opus always counts granules at 48 kHz.
const RATE: u64 = 48_000;
/// The most samples one packet may hold (120 ms, RFC 6716 §3.2.5).
const MAX_PACKET_SAMPLES: u64 = 5_760;
/// The longest frame (RFC 6716 §3.2.1).
const MAX_FRAME_BYTES: usize = 1_275;

/// Checks an Ogg Opus file.
pub(crate) fn check<R: Read + Seek>(r: R, limits: &Limits) -> Result<Media, Error> {
    let mut pages = PacketReader::new(r);
    let head = next(&mut pages)?.ok_or_else(|| bad("wrong_type", "the voice message is empty"))?;
    let serial = head.stream_serial();
    if !head.first_in_stream() || !head.last_in_page() || head.absgp_page() != 0 {
        return Err(bad(
            "wrong_type",
            "the voice message's first page is not an Opus identification header",
        ));
    }
    let pre_skip = opus_head(&head.data)?;
    let tags =
        next(&mut pages)?.ok_or_else(|| bad("truncated", "the voice message has no OpusTags"))?;
    if tags.stream_serial() != serial || !tags.data.starts_with(b"OpusTags") {
        return Err(bad(
            "corrupt",
            "the voice message's second packet is not OpusTags",
        ));
    }
    opus_tags(&tags.data)?;
    if !tags.last_in_page() {
        return Err(bad("corrupt", "audio shares the OpusTags page"));
    }
    // At most this many samples of audio (with the pre-skip, and one packet's slack for
    // end trimming) before the message is known to be too long.
    let limit = u64::from(limits.max_voice_ms) * RATE / 1000 + pre_skip + MAX_PACKET_SAMPLES;
    let mut samples: u64 = 0;
    let mut granule: Option<u64> = None;
    let mut ended = false;
    let mut packets = 0u64;
    while let Some(p) = next(&mut pages)? {
        if p.stream_serial() != serial {
            return Err(bad(
                "unsupported",
                "the voice message holds more than one stream",
            ));
        }
        if ended {
            return Err(bad(
                "corrupt",
                "the voice message goes on after its end of stream",
            ));
        }
        let n = packet_samples(&p.data).map_err(|why| bad("corrupt", why))?;
        samples += u64::from(n);
        packets += 1;
        if samples > limit {
            return Err(Error::TooLong(format!(
                "the voice message is longer than {} s",
                limits.max_voice_ms / 1000
            )));
        }
        if p.last_in_page() {
            let g = p.absgp_page();
            // A page's granule counts the samples of the packets finished on it; it may
            // be less than them only by end trimming (within the last packet).
            if g > samples {
                return Err(bad(
                    "corrupt",
                    "a page's granule position is past its audio",
                ));
            }
            granule = Some(g);
        }
        ended = p.last_in_stream();
    }
    if packets == 0 {
        return Err(bad("truncated", "the voice message holds no audio"));
    }
    if !ended {
        return Err(bad(
            "truncated",
            "the voice message ends without its last page",
        ));
    }
    let end =
        granule.ok_or_else(|| bad("corrupt", "no page of the voice message ends a packet"))?;
    if samples - end > MAX_PACKET_SAMPLES || end < pre_skip {
        return Err(bad(
            "corrupt",
            "the voice message's last granule position does not match its audio",
        ));
    }
    let duration_ms = millis(end - pre_skip, RATE);
    if duration_ms > limits.max_voice_ms {
        return Err(Error::TooLong(format!(
            "the voice message lasts {:.1} s, longer than {} s",
            f64::from(duration_ms) / 1000.0,
            limits.max_voice_ms / 1000
        )));
    }
    Ok(Media {
        mime: "audio/ogg",
        duration_ms: Some(duration_ms),
        width: None,
        height: None,
    })
}

/// The next packet, with the ogg crate's errors as refusals.
fn next<R: Read + Seek>(pages: &mut PacketReader<R>) -> Result<Option<ogg::Packet>, Error> {
    pages.read_packet().map_err(|e| match e {
        OggReadError::ReadError(e) => from_io(e, "voice message"),
        OggReadError::HashMismatch(..) => bad("corrupt", "an Ogg page's CRC is wrong"),
        OggReadError::NoCapturePatternFound => {
            bad("wrong_type", "the voice message is not an Ogg file")
        }
        e => bad(
            "corrupt",
            format!("the voice message's Ogg pages are broken: {e}"),
        ),
    })
}

/// The identification header (RFC 7845 §5.1): its pre-skip.
fn opus_head(h: &[u8]) -> Result<u64, Error> {
    let not = || bad("wrong_type", "the voice message is not Opus");
    if h.len() < 19 || !h.starts_with(b"OpusHead") {
        return Err(not());
    }
    // Major version 0 (the upper four bits) is the only one a decoder may accept.
    if h[8] >> 4 != 0 {
        return Err(bad("unsupported", format!("Opus header version {}", h[8])));
    }
    let channels = h[9];
    let pre_skip = u16::from_le_bytes([h[10], h[11]]);
    let family = h[18];
    match (family, channels) {
        (0, 1 | 2) => {}
        (0, _) => {
            return Err(bad(
                "corrupt",
                format!("{channels} channels with mapping family 0"),
            ))
        }
        _ => {
            return Err(bad(
                "unsupported",
                format!("Opus channel mapping family {family} (only mono or stereo voice)"),
            ))
        }
    }
    Ok(u64::from(pre_skip))
}

/// The comment header (RFC 7845 §5.2): its lengths must fit inside it.
fn opus_tags(t: &[u8]) -> Result<(), Error> {
    let broken = || bad("corrupt", "the voice message's OpusTags is broken");
    let mut rest = t.get(8..).ok_or_else(broken)?;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        if rest.len() < n {
            return Err(broken());
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let vendor = le(take(4)?);
    take(vendor)?;
    let count = le(take(4)?);
    for _ in 0..count {
        let n = le(take(4)?);
        take(n)?;
    }
    Ok(())
}

/// Samples (at 48 kHz) in one Opus packet, after checking its framing (RFC 6716 §3.4,
/// requirements R1–R7).
pub(crate) fn packet_samples(p: &[u8]) -> Result<u32, &'static str> {
    let (&toc, rest) = p.split_first().ok_or("an empty Opus packet")?;
    let config = toc >> 3;
    let frame: u32 = match config {
        0..=11 => [480, 960, 1_920, 2_880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames: u32 = match toc & 3 {
        0 => {
            if rest.len() > MAX_FRAME_BYTES {
                return Err("an Opus frame longer than 1275 bytes");
            }
            1
        }
        1 => {
            if rest.len() % 2 != 0 || rest.len() / 2 > MAX_FRAME_BYTES {
                return Err("an Opus packet of two equal frames with an odd length");
            }
            2
        }
        2 => {
            let (first, used) = frame_length(rest)?;
            let left = rest.len() - used;
            if first > left || left - first > MAX_FRAME_BYTES {
                return Err("an Opus packet whose first frame is longer than the packet");
            }
            2
        }
        _ => {
            let (&m, mut rest) = rest
                .split_first()
                .ok_or("an Opus packet without its frame count")?;
            let count = u32::from(m & 0x3f);
            if count == 0 || u64::from(count * frame) > MAX_PACKET_SAMPLES {
                return Err("an Opus packet with no frames or more than 120 ms");
            }
            let mut padding = 0usize;
            if m & 0x40 != 0 {
                loop {
                    let (&b, r) = rest
                        .split_first()
                        .ok_or("an Opus packet's padding runs out")?;
                    rest = r;
                    if b == 255 {
                        padding += 254;
                    } else {
                        padding += usize::from(b);
                        break;
                    }
                }
            }
            if m & 0x80 != 0 {
                // Variable bitrate: every frame's length but the last.
                let mut total = 0usize;
                for _ in 1..count {
                    let (n, used) = frame_length(rest)?;
                    rest = &rest[used..];
                    total += n;
                }
                let last = rest
                    .len()
                    .checked_sub(total + padding)
                    .ok_or("an Opus packet's frames are longer than the packet")?;
                if last > MAX_FRAME_BYTES {
                    return Err("an Opus frame longer than 1275 bytes");
                }
            } else {
                let data = rest
                    .len()
                    .checked_sub(padding)
                    .ok_or("an Opus packet's padding is longer than the packet")?;
                let count = count as usize;
                if data % count != 0 || data / count > MAX_FRAME_BYTES {
                    return Err("an Opus packet's equal frames do not divide it");
                }
            }
            count
        }
    };
    Ok(frames * frame)
}

/// A frame length (RFC 6716 §3.2.1) and how many bytes it took.
fn frame_length(b: &[u8]) -> Result<(usize, usize), &'static str> {
    match b {
        [] => Err("an Opus packet ends before a frame length"),
        [x @ 0..=251, ..] => Ok((usize::from(*x), 1)),
        [x, y, ..] => Ok((usize::from(*y) * 4 + usize::from(*x), 2)),
        [_] => Err("an Opus packet ends inside a frame length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_counted_and_misframed_ones_refused() {
        // Config 1 (SILK NB 20 ms), code 0: one frame.
        assert_eq!(packet_samples(&[1 << 3, 1, 2, 3]), Ok(960));
        // CELT FB 2.5 ms (config 28), code 1: two equal frames.
        assert_eq!(packet_samples(&[28 << 3 | 1, 1, 2]), Ok(240));
        assert!(packet_samples(&[28 << 3 | 1, 1, 2, 3]).is_err());
        // Code 2: first frame 2 bytes, second the rest.
        assert_eq!(packet_samples(&[31 << 3 | 2, 2, 9, 9, 9]), Ok(1_920));
        assert!(packet_samples(&[31 << 3 | 2, 9, 9]).is_err());
        // Code 3, CBR, 3 frames of 2 bytes with 1 byte of padding.
        assert_eq!(
            packet_samples(&[31 << 3 | 3, 0x40 | 3, 1, 0, 0, 0, 0, 0, 0, 0]),
            Ok(2_880)
        );
        // Code 3 with 0 frames, or more than 120 ms (7 × 20 ms).
        assert!(packet_samples(&[31 << 3 | 3, 0]).is_err());
        assert!(packet_samples(&[31 << 3 | 3, 7]).is_err());
        // VBR: frames of 1 and 2 bytes.
        assert_eq!(
            packet_samples(&[31 << 3 | 3, 0x80 | 2, 1, 7, 8, 8]),
            Ok(1_920)
        );
        assert!(packet_samples(&[31 << 3 | 3, 0x80 | 2, 9, 7]).is_err());
        assert!(packet_samples(&[]).is_err());
    }
}
