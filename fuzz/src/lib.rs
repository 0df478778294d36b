//! Helpers shared by the fuzz targets in `fuzz_targets/`: how a target splits its input
//! into a mode and bytes, feeding a `tokio-util` decoder the way a socket does (whole,
//! then in chunks, and checking both give the same frames), and a scratch directory for
//! the file targets.
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
