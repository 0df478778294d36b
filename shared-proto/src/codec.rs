//! Framing and encoding of control messages.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one message.
//! Frames longer than the configured maximum are refused before any byte of them is
//! buffered. "Not a whole frame yet" is not an error; it is `Ok(None)` from a decoder.
//! What is inside a frame depends on the connection's protocol version (from the
//! [`crate::preamble`]): version 2 is the kind-tagged [`crate::envelope`], version 1 the
//! frozen whole-message bincode of [`crate::v1`].
//!
//! The two `tokio-util` codecs of the link:
//! - [`ServerCodec`], the server's side, speaks either version (chosen per connection):
//!   it decodes [`ClientFrame`]s (an unknown request kind is a [`ClientFrame::Unknown`],
//!   not an error) and encodes [`ServerMsg`]s.
//! - [`ClientCodec`], a client's side, speaks version 2: it decodes [`ServerFrame`]s
//!   (an event or reply it cannot use is a [`ServerFrame::Skipped`], not an error) and
//!   encodes [`ClientMsg`]s.
//!
//! [`encode_message`], [`decode_message`], [`encode_into`] and [`decode_prefix`] are the
//! only places that call bincode, so the serialisation can change in one place.

use std::io;

use bytes::{BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::envelope::{self, ClientFrame, ServerFrame};
use crate::messages::{ClientMsg, ServerMsg};
use crate::preamble::PROTOCOL_VERSION;
use crate::v1;

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
    /// The message has no encoding in the connection's protocol version (a kind newer
    /// than the peer). Nothing was written; the link is intact.
    #[error("not expressible in protocol version {version}: {what}")]
    NotInVersion {
        /// The connection's version.
        version: u16,
        /// What could not be expressed.
        what: String,
    },
}

/// Encodes one value to its bincode bytes (no length prefix).
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends one value's bincode bytes to `out`.
pub fn encode_into<T: Serialize, W: io::Write>(msg: &T, out: &mut W) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(msg, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes one value from exactly `bytes` (trailing bytes are an error).
pub fn decode_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(malformed)?;
    if used != bytes.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after message",
            bytes.len() - used
        )));
    }
    Ok(msg)
}

/// Decodes one value from the start of `bytes`, ignoring what follows (fields a newer
/// peer appended to a version-2 body).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    bincode::serde::decode_from_slice(bytes, config())
        .map(|(msg, _)| msg)
        .map_err(malformed)
}

/// Like [`decode_prefix`], and also says how many bytes the value took (to read a
/// field appended after it only if the body goes on).
pub fn decode_prefix_counted<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(malformed)
}

/// A decoding failure as the peer is told it.
fn malformed(e: bincode::error::DecodeError) -> CodecError {
    match e {
        bincode::error::DecodeError::LimitExceeded => CodecError::Malformed(format!(
            "a list or text in the message decodes to more than the {MAX_FRAME_LEN} bytes a \
             frame may hold (far over the protocol's own limits)"
        )),
        e => CodecError::Malformed(e.to_string()),
    }
}

/// The length-prefix framing every codec shares, with its size limit.
#[derive(Debug)]
pub(crate) struct Frames {
    /// Does the length-prefix framing and its size limit on input.
    codec: LengthDelimitedCodec,
    /// The frame size limit, kept to report it and to check outgoing frames.
    max: usize,
}

impl Frames {
    /// Framing refusing frames longer than `max` bytes (capped at [`MAX_FRAME_LEN`]).
    pub(crate) fn new(max: usize) -> Self {
        let max = max.min(MAX_FRAME_LEN);
        let codec = LengthDelimitedCodec::builder()
            .length_field_length(LEN_PREFIX)
            .big_endian()
            .max_frame_length(max)
            .new_codec();
        Frames { codec, max }
    }

    /// The next whole frame's payload, if one is buffered.
    pub(crate) fn next(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        self.codec.decode(src).map_err(|e| {
            let too_large = e
                .get_ref()
                .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
            if too_large {
                CodecError::FrameTooLarge { max: self.max }
            } else {
                CodecError::Io(e)
            }
        })
    }

    /// Appends one frame whose payload `write` produces; on any failure (including a
    /// payload over the limit) `dst` is left as it was.
    pub(crate) fn put(
        &self,
        dst: &mut BytesMut,
        write: impl FnOnce(&mut BytesMut) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        if let Err(e) = write(dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start - LEN_PREFIX;
        if len > self.max {
            dst.truncate(start);
            return Err(CodecError::Encode(format!(
                "{len} byte message exceeds the {} byte frame limit",
                self.max
            )));
        }
        // Checked above: the length is at most MAX_FRAME_LEN, which fits in u32.
        dst[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// The server's codec: decodes what a client sends, encodes what the server sends, in
/// the protocol version agreed in the preamble.
#[derive(Debug)]
pub struct ServerCodec {
    /// Length-prefix framing and its limit.
    frames: Frames,
    /// [`PROTOCOL_VERSION`] or [`v1::PROTOCOL_VERSION`].
    version: u16,
}

impl ServerCodec {
    /// A codec for a connection speaking `version`, with the protocol's maximum frame
    /// size. Versions other than 1 are treated as 2 (the server refuses them earlier).
    pub fn new(version: u16) -> Self {
        Self::with_max_frame_len(version, MAX_FRAME_LEN)
    }

    /// As [`ServerCodec::new`], refusing frames longer than `max` bytes (capped at
    /// [`MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(version: u16, max: usize) -> Self {
        let version = if version == v1::PROTOCOL_VERSION {
            version
        } else {
            PROTOCOL_VERSION
        };
        ServerCodec {
            frames: Frames::new(max),
            version,
        }
    }

    /// The protocol version this codec speaks.
    pub fn version(&self) -> u16 {
        self.version
    }
}

impl Decoder for ServerCodec {
    type Item = ClientFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientFrame>, CodecError> {
        let Some(frame) = self.frames.next(src)? else {
            return Ok(None);
        };
        if self.version == v1::PROTOCOL_VERSION {
            let msg: v1::ClientMsg = decode_message(&frame)?;
            Ok(Some(ClientFrame::Msg(msg.into())))
        } else {
            envelope::decode_client(&frame).map(Some)
        }
    }
}

impl Encoder<&ServerMsg> for ServerCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &ServerMsg, dst: &mut BytesMut) -> Result<(), CodecError> {
        if self.version == v1::PROTOCOL_VERSION {
            let old =
                v1::ServerMsg::try_from(msg.clone()).map_err(|e| CodecError::NotInVersion {
                    version: v1::PROTOCOL_VERSION,
                    what: e.to_string(),
                })?;
            self.frames
                .put(dst, |out| encode_into(&old, &mut out.writer()))
        } else {
            self.frames
                .put(dst, |out| envelope::encode_server(msg, &mut out.writer()))
        }
    }
}

impl Encoder<ServerMsg> for ServerCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: ServerMsg, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

/// A client's codec (protocol version 2): decodes what the server sends, encodes
/// requests.
#[derive(Debug)]
pub struct ClientCodec {
    /// Length-prefix framing and its limit.
    frames: Frames,
}

impl ClientCodec {
    /// A codec with the protocol's maximum frame size.
    pub fn new() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A codec refusing frames longer than `max` bytes (capped at [`MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(max: usize) -> Self {
        ClientCodec {
            frames: Frames::new(max),
        }
    }
}

impl Default for ClientCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for ClientCodec {
    type Item = ServerFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerFrame>, CodecError> {
        match self.frames.next(src)? {
            Some(frame) => envelope::decode_server(&frame).map(Some),
            None => Ok(None),
        }
    }
}

impl Encoder<&ClientMsg> for ClientCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &ClientMsg, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.frames
            .put(dst, |out| envelope::encode_client(msg, &mut out.writer()))
    }
}

impl Encoder<ClientMsg> for ClientCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: ClientMsg, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::kind;
    use crate::messages::*;

    fn frame_of(msg: &ClientMsg) -> BytesMut {
        let mut buf = BytesMut::new();
        ClientCodec::new().encode(msg, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn golden_heartbeat_frame() {
        let buf = frame_of(&ClientMsg {
            id: 7,
            request: Request::Heartbeat,
        });
        // len=6, kind 0x0002 = Heartbeat, id 7 (u32 BE), empty body
        assert_eq!(&buf[..], &[0, 0, 0, 6, 0, 2, 0, 0, 0, 7]);
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
        // kind 0x0001, id 1, body: user_id 1001 = 0xfb 0xe9 0x03, port 5004 =
        // 0xfb 0x8c 0x13, string: len 1, 'a'
        assert_eq!(
            &buf[..],
            &[0, 0, 0, 14, 0, 1, 0, 0, 0, 1, 0xfb, 0xe9, 0x03, 0xfb, 0x8c, 0x13, 1, b'a']
        );
    }

    fn server_frame_of(msg: &ServerMsg) -> BytesMut {
        let mut buf = BytesMut::new();
        ServerCodec::new(PROTOCOL_VERSION)
            .encode(msg, &mut buf)
            .expect("encodes");
        buf
    }

    #[test]
    fn golden_server_frames() {
        // An event: kind 0x8002 = CallAnswered, id 0, body call id 5.
        let ev = server_frame_of(&ServerMsg::Event(Event::CallAnswered {
            call_id: 5,
            srtp: None,
            ice: None,
        }));
        assert_eq!(&ev[..], &[0, 0, 0, 7, 0x80, 0x02, 0, 0, 0, 0, 5]);
        // An error reply: kind 0x7fff, id 3, body code 17 (varint), message "x".
        let err = server_frame_of(&ServerMsg::Reply {
            id: 3,
            result: Err(WireError::new(ErrorCode::UNSUPPORTED, "x")),
        });
        assert_eq!(&err[..], &[0, 0, 0, 9, 0x7f, 0xff, 0, 0, 0, 3, 17, 1, b'x']);
        // A reply: kind 0x4007 = Acked, id 9, body count 2.
        let ok = server_frame_of(&ServerMsg::Reply {
            id: 9,
            result: Ok(Reply::Acked { count: 2 }),
        });
        assert_eq!(&ok[..], &[0, 0, 0, 7, 0x40, 0x07, 0, 0, 0, 9, 2]);
        // Closing: kind 0xc001, id 0, body code 14, message "".
        let bye = server_frame_of(&ServerMsg::Closing(WireError::new(
            ErrorCode::SHUTTING_DOWN,
            "",
        )));
        assert_eq!(&bye[..], &[0, 0, 0, 8, 0xc0, 0x01, 0, 0, 0, 0, 14, 0]);
    }

    #[test]
    fn partial_frame_is_not_an_error() {
        let full = frame_of(&ClientMsg {
            id: 1,
            request: Request::Dial {
                callee: 2002,
                key: Some(u64::MAX),
                srtp: None,
                ice: None,
            },
        });
        // The codec keeps state between calls, as it does on a socket: feed it byte by byte.
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        let mut buf = BytesMut::new();
        for byte in &full[..full.len() - 1] {
            buf.extend_from_slice(&[*byte]);
            assert!(codec.decode(&mut buf).expect("no error").is_none());
        }
        let mut whole = buf;
        whole.extend_from_slice(&full[full.len() - 1..]);
        let msg = codec.decode(&mut whole).expect("ok").expect("a frame");
        assert_eq!(
            msg,
            ClientFrame::Msg(ClientMsg {
                id: 1,
                request: Request::Dial {
                    callee: 2002,
                    key: Some(u64::MAX),
                    srtp: None,
                    ice: None
                }
            })
        );
        assert!(whole.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut codec = ServerCodec::with_max_frame_len(PROTOCOL_VERSION, 1024);
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]); // 1025
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { max: 1024 }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn short_header_is_malformed() {
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_request_kind_is_a_frame_not_an_error() {
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        let mut buf = BytesMut::from(&envelope::frame(0x0123, 42, b"future body")[..]);
        assert_eq!(
            codec.decode(&mut buf).expect("decodes"),
            Some(ClientFrame::Unknown {
                id: 42,
                kind: 0x0123
            })
        );
    }

    #[test]
    fn known_request_kind_with_a_bad_body_is_malformed() {
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        // A Dial whose body is a truncated varint.
        let mut buf = BytesMut::from(&envelope::frame(kind::DIAL, 1, &[0xfd, 1])[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn appended_body_fields_are_ignored() {
        // A newer client appended a field to Dial's body (after `ice`, the last field
        // this build knows: callee 7, key None, srtp None, ice None, then two bytes).
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        let mut buf =
            BytesMut::from(&envelope::frame(kind::DIAL, 4, &[7, 0, 0, 0, 0xaa, 0xbb])[..]);
        assert_eq!(
            codec.decode(&mut buf).expect("decodes"),
            Some(ClientFrame::Msg(ClientMsg {
                id: 4,
                request: Request::Dial {
                    callee: 7,
                    key: None,
                    srtp: None,
                    ice: None
                }
            }))
        );
    }

    #[test]
    fn golden_dial_frames() {
        // kind 0x0004, id 2, body: callee 2002 = 0xfb 0xd2 0x07, then the key:
        // Option tag 1 (Some), key 5 (varint).
        let keyed = frame_of(&ClientMsg {
            id: 2,
            request: Request::Dial {
                callee: 2002,
                key: Some(5),
                srtp: None,
                ice: None,
            },
        });
        assert_eq!(
            &keyed[..],
            &[0, 0, 0, 11, 0, 4, 0, 0, 0, 2, 0xfb, 0xd2, 0x07, 1, 5]
        );
        // No key: tag 0.
        let unkeyed = frame_of(&ClientMsg {
            id: 2,
            request: Request::Dial {
                callee: 2002,
                key: None,
                srtp: None,
                ice: None,
            },
        });
        assert_eq!(
            &unkeyed[..],
            &[0, 0, 0, 10, 0, 4, 0, 0, 0, 2, 0xfb, 0xd2, 0x07, 0]
        );
        // A large key: varint marker 0xfd then 8 bytes little-endian.
        let big = frame_of(&ClientMsg {
            id: 2,
            request: Request::Dial {
                callee: 7,
                key: Some(0x0102_0304_0506_0708),
                srtp: None,
                ice: None,
            },
        });
        assert_eq!(
            &big[..],
            &[0, 0, 0, 17, 0, 4, 0, 0, 0, 2, 7, 1, 0xfd, 8, 7, 6, 5, 4, 3, 2, 1]
        );
    }

    #[test]
    fn a_dial_body_from_before_the_key_decodes_without_one() {
        // An agent one release behind sends only the callee.
        let mut codec = ServerCodec::new(PROTOCOL_VERSION);
        let mut buf = BytesMut::from(&envelope::frame(kind::DIAL, 3, &[0xfb, 0xd2, 0x07])[..]);
        assert_eq!(
            codec.decode(&mut buf).expect("decodes"),
            Some(ClientFrame::Msg(ClientMsg {
                id: 3,
                request: Request::Dial {
                    callee: 2002,
                    key: None,
                    srtp: None,
                    ice: None
                }
            }))
        );
        // A key whose bytes are cut short is a broken peer, not an older one.
        let mut cut = BytesMut::from(&envelope::frame(kind::DIAL, 3, &[7, 1, 0xfd, 1])[..]);
        assert!(matches!(
            codec.decode(&mut cut),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_event_kind_is_skipped_by_the_client() {
        let mut codec = ClientCodec::new();
        let mut buf = BytesMut::from(&envelope::frame(0x80ff, 0, b"presence")[..]);
        match codec.decode(&mut buf).expect("decodes") {
            Some(ServerFrame::Skipped {
                kind: 0x80ff,
                class: envelope::KindClass::Event,
                ..
            }) => {}
            other => panic!("expected a skipped event, got {other:?}"),
        }
    }

    #[test]
    fn forged_vec_length_does_not_allocate() {
        // AckCached with a claimed 2^60 ids in a small frame.
        let mut body = vec![0xfd]; // u64 varint marker
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut buf = BytesMut::from(&envelope::frame(kind::ACK_CACHED, 1, &body)[..]);
        assert!(matches!(
            ServerCodec::new(PROTOCOL_VERSION).decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_outgoing_message_leaves_the_buffer_alone() {
        let mut codec = ServerCodec::with_max_frame_len(PROTOCOL_VERSION, 16);
        let mut buf = BytesMut::from(&b"kept"[..]);
        let big = ServerMsg::Closing(WireError::new(ErrorCode::INTERNAL, "x".repeat(100)));
        assert!(matches!(
            codec.encode(&big, &mut buf),
            Err(CodecError::Encode(_))
        ));
        assert_eq!(&buf[..], b"kept");
    }
}
