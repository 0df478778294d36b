//! Helpers shared by the fuzz targets in `fuzz_targets/`: how a target splits its input
//! into a mode and bytes, feeding a `tokio-util` decoder the way a socket does (whole,
//! then in chunks, and checking both give the same frames), and a scratch directory for
//! the file targets, and the record layout of the media target.
//!
//! Input layout of the frame targets: the first byte chooses the mode, the rest is the
//! data. Bit 0 set: the data is one frame payload given straight to the payload decoder
//! (`decode_client`, `decode_server`, bincode), no length prefix. Bit 0 clear: the data
//! is a byte stream for the length-prefixed codec, and `(byte >> 1) + 1` is the chunk
//! size it is also fed in.

use std::fmt::{Debug, Display};
use std::path::PathBuf;

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Most frames taken from one input: every frame consumes at least its 4-byte length
/// prefix, so this is never reached by a correct decoder; it bounds the loop if one is not.
const MAX_FRAMES: usize = 1 << 16;

/// What a frame target's input asks for.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// One payload, no length prefix.
    Payload,
    /// A byte stream, also fed in chunks of this many bytes.
    Stream {
        /// Chunk size, 1..=128.
        chunk: usize,
    },
}

/// Splits a frame target's input into its mode and its data (`None`: empty input).
pub fn split_input(data: &[u8]) -> Option<(Mode, &[u8])> {
    let (&first, rest) = data.split_first()?;
    let mode = if first & 1 == 1 {
        Mode::Payload
    } else {
        Mode::Stream {
            chunk: usize::from(first >> 1) + 1,
        }
    };
    Some((mode, rest))
}

/// One decoder step's outcome, comparable across runs (errors by their text).
pub type Step<T> = Result<T, String>;

/// Runs `decoder` over `bytes` as if they had all arrived at once: frames until it wants
/// more bytes or fails (a failure ends a connection, so nothing after it is read).
fn run_whole<D>(decoder: &mut D, bytes: &[u8]) -> Vec<Step<D::Item>>
where
    D: Decoder,
    D::Error: Display,
{
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    drain(decoder, &mut buf, bytes.len(), &mut out);
    out
}

/// Decodes frames from `buf` into `out` until the decoder wants more bytes or fails;
/// `true` if it failed. `fed` is how many bytes were put into `buf` so far in all: every
/// frame must have consumed at least its length prefix (the codec may take a prefix in
/// one call and its payload in a later one).
fn drain<D>(decoder: &mut D, buf: &mut BytesMut, fed: usize, out: &mut Vec<Step<D::Item>>) -> bool
where
    D: Decoder,
    D::Error: Display,
{
    for _ in 0..MAX_FRAMES {
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                out.push(Ok(frame));
                let consumed = fed - buf.len();
                assert!(
                    consumed >= 4 * out.len(),
                    "{} frames from {consumed} bytes: a frame consumed less than its length prefix",
                    out.len()
                );
            }
            Ok(None) => return false,
            Err(e) => {
                out.push(Err(e.to_string()));
                return true;
            }
        }
    }
    panic!("more than {MAX_FRAMES} frames from one input");
}

/// Decodes `bytes` with a fresh decoder from `make`, once whole and once fed in chunks of
/// `chunk` bytes (as a socket delivers them), asserts both give the same frames and
/// errors, and returns them.
pub fn decode_stream<D>(
    mut make: impl FnMut() -> D,
    bytes: &[u8],
    chunk: usize,
) -> Vec<Step<D::Item>>
where
    D: Decoder,
    D::Error: Display,
    D::Item: PartialEq + Debug,
{
    let whole = run_whole(&mut make(), bytes);
    let mut decoder = make();
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    let mut fed = 0;
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        if drain(&mut decoder, &mut buf, fed, &mut chunked) {
            break;
        }
    }
    assert_eq!(
        whole, chunked,
        "fed whole and fed in {chunk}-byte chunks, the decoder disagrees"
    );
    whole
}

/// A scratch directory for one file target in this process: on tmpfs (`/dev/shm`) when
/// there is one, since the loaders fsync; `TV_FUZZ_TMP` overrides it.
pub fn scratch_dir(target: &str) -> PathBuf {
    let base = std::env::var_os("TV_FUZZ_TMP")
        .map(PathBuf::from)
        .or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            shm.is_dir().then_some(shm)
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("tv-fuzz-{target}-{}", std::process::id()))
}

/// Empties (or creates) `dir`, so every input starts from nothing.
pub fn reset_dir(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot clear the scratch directory {}: {e}", dir.display()),
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        panic!("cannot create the scratch directory {}: {e}", dir.display());
    }
}

/// The media targets' fixed SRTP master key and salt (30 bytes: `AES_CM_128_HMAC_SHA1_80`;
/// `AEAD_AES_128_GCM` takes the first 28), shared by the target's sender and receiver and
/// by the seed generator, so a seed may carry packets already protected under it.
pub const MEDIA_KEY_SALT: [u8; 30] = [
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
    0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd,
];

/// What a record of the `media_receive` input does with its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaOp {
    /// Deliver the bytes as they are (garbage, or a packet protected under
    /// [`MEDIA_KEY_SALT`] already).
    Raw,
    /// The bytes are a plain RTP or RTCP packet: the peer's sender protects it (SRTP or
    /// SRTCP), and what it sends is delivered. Nothing is delivered if it cannot be
    /// protected (the sender would not send it). Plain sessions deliver the bytes.
    Genuine,
    /// The first two bytes are a position and an XOR mask (0 means 1), the rest a plain
    /// packet: it is protected (by a throwaway sender, so the peer's sender state does not
    /// move) and the byte at that position (modulo the length) is changed before delivery.
    Tampered,
    /// The last datagram delivered, again (the bytes are ignored).
    Replay,
}

/// One record of the `media_receive` input.
#[derive(Debug, Clone, Copy)]
pub struct MediaRecord<'a> {
    /// What to do with `bytes`.
    pub op: MediaOp,
    /// Milliseconds the clock moves on before the datagram arrives.
    pub advance_ms: f64,
    /// 20 ms playout ticks after it, 0..=7.
    pub ticks: u8,
    /// The record's bytes.
    pub bytes: &'a [u8],
}

/// Clock steps a record can take before its datagram, in milliseconds: on time, early,
/// late, a burst, an outage.
pub const MEDIA_ADVANCE_MS: [f64; 8] = [0.0, 0.5, 3.0, 10.0, 19.0, 21.0, 45.0, 250.0];

/// Most records taken from one input.
pub const MAX_MEDIA_RECORDS: usize = 512;

/// The session configuration in the first byte of a `media_receive` input.
#[derive(Debug, Clone, Copy)]
pub struct MediaConfig {
    /// 0: plain RTP; 1 and 3: `AES_CM_128_HMAC_SHA1_80`; 2: `AEAD_AES_128_GCM`.
    pub suite: u8,
    /// The session also routes a video stream (payload type 96).
    pub video: bool,
    /// Jitter buffer depth bounds, in frames.
    pub jitter_frames: (u64, u64),
}

impl MediaConfig {
    /// Reads the configuration byte: bits 0-1 the suite, bit 2 set: no video stream,
    /// bits 3-4 the jitter buffer's minimum depth minus one, bits 5-7 half the frames its
    /// maximum adds to that.
    pub fn from_byte(b: u8) -> MediaConfig {
        let min = 1 + u64::from((b >> 3) & 3);
        MediaConfig {
            suite: b & 3,
            video: b & 4 == 0,
            jitter_frames: (min, min + 2 * u64::from(b >> 5)),
        }
    }

    /// The configuration byte for `suite` (0..=2) with video and the default depths
    /// (1 to 9 frames).
    pub fn byte(suite: u8) -> u8 {
        (suite & 3) | (4 << 5)
    }
}

/// Splits a `media_receive` input into its configuration and records: after the
/// configuration byte, each record is a control byte (bits 0-1 the [`MediaOp`], bits 2-4
/// the ticks after it, bits 5-7 an index into [`MEDIA_ADVANCE_MS`]), a length byte and that
/// many bytes (fewer if the input ends first). At most [`MAX_MEDIA_RECORDS`] records.
pub fn media_records(data: &[u8]) -> Option<(MediaConfig, Vec<MediaRecord<'_>>)> {
    let (&config, mut rest) = data.split_first()?;
    let mut records = Vec::new();
    while let [ctl, len, tail @ ..] = rest {
        if records.len() >= MAX_MEDIA_RECORDS {
            break;
        }
        let n = usize::from(*len).min(tail.len());
        let (bytes, after) = tail.split_at(n);
        rest = after;
        records.push(MediaRecord {
            op: match ctl & 3 {
                0 => MediaOp::Raw,
                1 => MediaOp::Genuine,
                2 => MediaOp::Tampered,
                _ => MediaOp::Replay,
            },
            advance_ms: MEDIA_ADVANCE_MS[usize::from(ctl >> 5)],
            ticks: (ctl >> 2) & 7,
            bytes,
        });
    }
    Some((MediaConfig::from_byte(config), records))
}

/// Encodes one `media_receive` record (the inverse of [`media_records`]; `bytes` longer
/// than 255 are cut, `ticks` above 7 and `advance` above 7 are masked).
pub fn media_record(op: MediaOp, advance: u8, ticks: u8, bytes: &[u8]) -> Vec<u8> {
    let op = match op {
        MediaOp::Raw => 0,
        MediaOp::Genuine => 1,
        MediaOp::Tampered => 2,
        MediaOp::Replay => 3,
    };
    let n = bytes.len().min(255);
    let mut v = vec![op | ((ticks & 7) << 2) | ((advance & 7) << 5), n as u8];
    v.extend_from_slice(&bytes[..n]);
    v
}
