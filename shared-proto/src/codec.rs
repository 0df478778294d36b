//! Framing and encoding of control messages.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! bincode-encoded message (bincode 2, standard configuration: little-endian varints).
//! Frames longer than the configured maximum are refused before any byte of them is
//! buffered. "Not a whole frame yet" is not an error; it is `Ok(None)` from the decoder.
//!
//! [`encode_message`] and [`decode_message`] are the only places that call bincode, so
//! the serialisation can change in one place.

use std::io;
use std::marker::PhantomData;

use bytes::{BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

/// Largest frame payload this protocol ever needs (a full page of cached calls is ~10 KiB).
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Bytes of the length prefix.
const LEN_PREFIX: usize = 4;

/// bincode configuration; the limit stops a forged length inside a message from
/// allocating more than a frame could ever hold.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A length prefix announced more than the maximum frame size.
    #[error("frame of more than {max} bytes refused")]
    FrameTooLarge {
        /// The maximum in force.
        max: usize,
    },
    /// A whole frame arrived but is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message to send does not encode (or encodes larger than a frame).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes one message to its payload bytes (no length prefix).
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes one message from exactly `bytes` (trailing bytes are an error).
pub fn decode_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after message",
            bytes.len() - used
        )));
    }
    Ok(msg)
}

/// A `tokio-util` codec that decodes frames into `D` and encodes `E` into frames.
/// The server uses `ControlCodec<ClientMsg, ServerMsg>`, the agent the reverse.
#[derive(Debug)]
pub struct ControlCodec<D, E> {
    /// Does the length-prefix framing and its size limit.
    frames: LengthDelimitedCodec,
    /// The frame size limit, kept to report it and to check outgoing frames.
    max_frame_len: usize,
    /// The message types are only markers; `fn` keeps the codec `Send + Sync`.
    _types: PhantomData<fn(E) -> D>,
}

impl<D, E> ControlCodec<D, E> {
    /// A codec with the protocol's maximum frame size.
    pub fn new() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A codec refusing frames longer than `max` bytes (capped at [`MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(max: usize) -> Self {
        let max = max.min(MAX_FRAME_LEN);
        let frames = LengthDelimitedCodec::builder()
            .length_field_length(LEN_PREFIX)
            .big_endian()
            .max_frame_length(max)
            .new_codec();
        ControlCodec {
            frames,
            max_frame_len: max,
            _types: PhantomData,
        }
    }
}

impl<D, E> Default for ControlCodec<D, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: DeserializeOwned, E> Decoder for ControlCodec<D, E> {
    type Item = D;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        match self.frames.decode(src) {
            Ok(Some(frame)) => decode_message(&frame).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(self.map_frame_error(e)),
        }
    }
}

impl<D, E> ControlCodec<D, E> {
    fn map_frame_error(&self, e: io::Error) -> CodecError {
        let too_large = e
            .get_ref()
            .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
        if too_large {
            CodecError::FrameTooLarge {
                max: self.max_frame_len,
            }
        } else {
            CodecError::Io(e)
        }
    }
}

impl<D, E: Serialize> Encoder<E> for ControlCodec<D, E> {
    type Error = CodecError;

    fn encode(&mut self, msg: E, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

impl<D, E: Serialize> Encoder<&E> for ControlCodec<D, E> {
    type Error = CodecError;

    fn encode(&mut self, msg: &E, dst: &mut BytesMut) -> Result<(), CodecError> {
        let payload = encode_message(msg)?;
        if payload.len() > self.max_frame_len {
            return Err(CodecError::Encode(format!(
                "{} byte message exceeds the {} byte frame limit",
                payload.len(),
                self.max_frame_len
            )));
        }
        dst.reserve(LEN_PREFIX + payload.len());
        // Checked above: the length fits in u32.
        dst.put_u32(payload.len() as u32);
        dst.put_slice(&payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    type ServerSide = ControlCodec<ClientMsg, ServerMsg>;
    type ClientSide = ControlCodec<ServerMsg, ClientMsg>;

    fn frame_of(msg: &ClientMsg) -> BytesMut {
        let mut buf = BytesMut::new();
        ClientSide::new().encode(msg, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn golden_heartbeat_frame() {
        let buf = frame_of(&ClientMsg {
            id: 7,
            request: Request::Heartbeat,
        });
        // len=2, id=7 (varint), variant 1 = Heartbeat
        assert_eq!(&buf[..], &[0, 0, 0, 2, 7, 1]);
    }

    #[test]
    fn golden_register_frame() {
        let buf = frame_of(&ClientMsg {
            id: 1,
            request: Request::Register(Register {
                user_id: 1001,
                media_port: 5004,
                agent_version: "a".into(),
            }),
        });
        // id=1, variant 0, user_id 1001 = 0xfb 0xe9 0x03, port 5004 = 0xfb 0x8c 0x13,
        // string: len 1, 'a'
        assert_eq!(
            &buf[..],
            &[0, 0, 0, 10, 1, 0, 0xfb, 0xe9, 0x03, 0xfb, 0x8c, 0x13, 1, b'a']
        );
    }

    #[test]
    fn partial_frame_is_not_an_error() {
        let full = frame_of(&ClientMsg {
            id: 1,
            request: Request::Dial { callee: 2002 },
        });
        // The codec keeps state between calls, as it does on a socket: feed it byte by byte.
        let mut codec = ServerSide::new();
        let mut buf = BytesMut::new();
        for byte in &full[..full.len() - 1] {
            buf.extend_from_slice(&[*byte]);
            assert!(codec.decode(&mut buf).expect("no error").is_none());
        }
        let mut whole = buf;
        whole.extend_from_slice(&full[full.len() - 1..]);
        let msg = codec.decode(&mut whole).expect("ok").expect("a frame");
        assert_eq!(msg.request, Request::Dial { callee: 2002 });
        assert!(whole.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut codec = ServerSide::with_max_frame_len(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]); // 1025
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { max: 1024 }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut codec = ServerSide::new();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut codec = ServerSide::new();
        // Heartbeat frame with one extra byte inside the frame.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 7, 1, 0][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn forged_vec_length_does_not_allocate() {
        // AckCached with a claimed 2^60 ids in an 14-byte frame.
        let mut payload = vec![1u8, 8]; // id 1, variant 8 = AckCached
        payload.push(0xfd); // u64 varint marker
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.put_slice(&payload);
        assert!(matches!(
            ServerSide::new().decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }
}
