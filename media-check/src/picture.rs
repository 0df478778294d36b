//! Pictures: JPEG or PNG, the size read from the header before any pixel is decoded,
//! then the whole image decoded with bounded memory.

use std::io::{BufRead, Read, Seek, SeekFrom};

use crate::{bad, from_io, Error, Limits, Media};

/// Most bytes a PNG decoder may hold (a row, the zlib window, metadata chunks).
const PNG_MEMORY: usize = 16 << 20;

/// Checks a JPEG or PNG picture.
pub(crate) fn check<R: BufRead + Seek>(r: &mut R, limits: &Limits) -> Result<Media, Error> {
    let mut magic = [0u8; 8];
    let n = read_up_to(r, &mut magic)?;
    r.seek(SeekFrom::Start(0))?;
    if magic[..n].starts_with(b"\x89PNG\r\n\x1a\n") {
        png(r, limits)
    } else if magic[..n].starts_with(&[0xff, 0xd8, 0xff]) {
        jpeg(r, limits)
    } else {
        Err(bad("wrong_type", "the picture is neither JPEG nor PNG"))
    }
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, Error> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn side_check(w: u32, h: u32, limits: &Limits) -> Result<(), Error> {
    if w == 0 || h == 0 {
        return Err(bad("corrupt", "the picture has no pixels"));
    }
    if w > limits.max_picture_side || h > limits.max_picture_side {
        return Err(bad(
            "too_large",
            format!(
                "the picture is {w} × {h} pixels; the largest side allowed is {}",
                limits.max_picture_side
            ),
        ));
    }
    Ok(())
}

fn png<R: BufRead + Seek>(r: &mut R, limits: &Limits) -> Result<Media, Error> {
    let png_err = |e: png::DecodingError| match e {
        png::DecodingError::IoError(e) => from_io(e, "picture"),
        png::DecodingError::LimitsExceeded => bad("too_large", "the picture needs too much memory"),
        e => bad("corrupt", format!("the PNG is broken: {e}")),
    };
    let mut decoder = png::Decoder::new_with_limits(r, png::Limits { bytes: PNG_MEMORY });
    decoder.set_ignore_text_chunk(true);
    let (w, h) = {
        let info = decoder.read_header_info().map_err(png_err)?;
        (info.width, info.height)
    };
    side_check(w, h, limits)?;
    let mut reader = decoder.read_info().map_err(png_err)?;
    // Row by row: one row in memory, every IDAT byte inflated and unfiltered.
    while reader.next_row().map_err(png_err)?.is_some() {}
    reader.finish().map_err(png_err)?;
    Ok(Media {
        mime: "image/png",
        duration_ms: None,
        width: Some(w),
        height: Some(h),
    })
}

fn jpeg<R: BufRead + Seek>(r: &mut R, limits: &Limits) -> Result<Media, Error> {
    let jpeg_err = |e: jpeg_decoder::Error| match e {
        jpeg_decoder::Error::Io(e) => from_io(e, "picture"),
        jpeg_decoder::Error::Unsupported(f) => bad("unsupported", format!("the JPEG uses {f:?}")),
        e => bad("corrupt", format!("the JPEG is broken: {e}")),
    };
    let mut decoder = jpeg_decoder::Decoder::new(r);
    decoder.read_info().map_err(jpeg_err)?;
    let info = decoder
        .info()
        .ok_or_else(|| bad("corrupt", "the JPEG has no frame header"))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    side_check(w, h, limits)?;
    // The smallest scale (1/8): each 8 × 8 block becomes one pixel, but every block's
    // coefficients are still entropy-decoded, so a truncated or corrupt scan is caught.
    decoder
        .scale(
            info.width.div_ceil(8).max(1),
            info.height.div_ceil(8).max(1),
        )
        .map_err(jpeg_err)?;
    // A progressive JPEG keeps every coefficient (2 bytes each) while it decodes.
    let side = limits.max_picture_side as usize;
    decoder.set_max_decoding_buffer_size(side.saturating_mul(side).saturating_mul(8));
    decoder.decode().map_err(jpeg_err)?;
    Ok(Media {
        mime: "image/jpeg",
        duration_ms: None,
        width: Some(w),
        height: Some(h),
    })
}
