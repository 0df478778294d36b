//! Clips: MP4 (ISO BMFF) files whose top-level boxes tile the file, with H.264 video.

use std::io::{Read, Seek, SeekFrom};

use mp4parse::{CodecType, SampleEntry, TrackType};

use crate::{bad, from_io, millis, Error, Limits, Media};

/// Checks an MP4 clip `len` bytes long.
pub(crate) fn check<R: Read + Seek>(r: &mut R, len: u64, limits: &Limits) -> Result<Media, Error> {
    tiles(r, len)?;
    r.seek(SeekFrom::Start(0))?;
    let ctx = mp4parse::read_mp4(r).map_err(|e| match e {
        mp4parse::Error::Io(e) => from_io(e, "clip"),
        mp4parse::Error::UnexpectedEOF => bad("truncated", "the clip ends early"),
        mp4parse::Error::OutOfMemory => bad("too_large", "the clip's tables are too large"),
        mp4parse::Error::Unsupported(what) => bad("unsupported", format!("the clip uses {what}")),
        e => bad("corrupt", format!("the clip's boxes are broken: {e:?}")),
    })?;
    if ctx.mvex.is_some() {
        return Err(bad("unsupported", "the clip is a fragmented MP4"));
    }
    let video = ctx
        .tracks
        .iter()
        .find(|t| t.track_type == TrackType::Video)
        .ok_or_else(|| bad("wrong_type", "the clip has no video track"))?;
    let entry = video
        .stsd
        .as_ref()
        .and_then(|d| d.descriptions.first())
        .and_then(|e| match e {
            SampleEntry::Video(v) => Some(v),
            _ => None,
        })
        .ok_or_else(|| {
            bad(
                "corrupt",
                "the clip's video track has no sample description",
            )
        })?;
    if entry.codec_type != CodecType::H264 {
        return Err(bad(
            "unsupported",
            format!("the clip's video is {:?}, not H.264", entry.codec_type),
        ));
    }
    let (w, h) = (u32::from(entry.width), u32::from(entry.height));
    if w == 0 || h == 0 || w > limits.max_picture_side || h > limits.max_picture_side {
        return Err(bad("too_large", format!("the clip is {w} × {h} pixels")));
    }
    let scale = video
        .timescale
        .map(|t| t.0)
        .filter(|&t| t > 0)
        .ok_or_else(|| bad("corrupt", "the clip's video track has no time scale"))?;
    // The media header's duration and the sample table's sum: the longer counts, so a
    // header cannot make a long clip look short.
    let header = video.duration.map_or(0, |d| d.0);
    let table: u64 = video.stts.as_ref().map_or(0, |t| {
        t.samples.iter().fold(0u64, |sum, s| {
            sum.saturating_add(u64::from(s.sample_count).saturating_mul(u64::from(s.sample_delta)))
        })
    });
    let units = header.max(table);
    if units == 0 {
        return Err(bad("corrupt", "the clip has no duration"));
    }
    let duration_ms = millis(units, scale);
    if duration_ms > limits.max_video_ms {
        return Err(Error::TooLong(format!(
            "the clip lasts {:.1} s, longer than {} s",
            f64::from(duration_ms) / 1000.0,
            limits.max_video_ms / 1000
        )));
    }
    Ok(Media {
        mime: "video/mp4",
        duration_ms: Some(duration_ms),
        width: Some(w),
        height: Some(h),
    })
}

/// The top-level boxes: `ftyp` first, then boxes that end exactly at the end of the
/// file, with a `moov` and an `mdat` among them.
fn tiles<R: Read + Seek>(r: &mut R, len: u64) -> Result<(), Error> {
    let mut at = 0u64;
    let (mut moov, mut mdat) = (false, false);
    while at < len {
        if len - at < 8 {
            return Err(bad("corrupt", "the clip ends inside a box header"));
        }
        r.seek(SeekFrom::Start(at))?;
        let mut head = [0u8; 8];
        r.read_exact(&mut head).map_err(|e| from_io(e, "clip"))?;
        let kind = [head[4], head[5], head[6], head[7]];
        let mut size = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
        let mut header = 8;
        if size == 1 {
            let mut large = [0u8; 8];
            r.read_exact(&mut large).map_err(|e| from_io(e, "clip"))?;
            size = u64::from_be_bytes(large);
            header = 16;
        } else if size == 0 {
            size = len - at;
        }
        if at == 0 && &kind != b"ftyp" {
            return Err(bad("wrong_type", "the clip is not an MP4 file"));
        }
        if size < header {
            return Err(bad(
                "corrupt",
                "a box of the clip is shorter than its header",
            ));
        }
        if size > len - at {
            return Err(bad("truncated", "the clip ends inside a box"));
        }
        moov |= &kind == b"moov";
        mdat |= &kind == b"mdat" && size > header;
        at += size;
    }
    if !moov {
        return Err(bad("corrupt", "the clip has no movie box"));
    }
    if !mdat {
        return Err(bad("corrupt", "the clip has no media data"));
    }
    Ok(())
}
