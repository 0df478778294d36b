//! Protocol version 1, frozen: the message set and encoding that agents built before
//! version 2 speak. A server keeps accepting it; nothing here ever changes.
//!
//! Version 1 encodes each frame's payload as one whole message in bincode 2 (standard
//! configuration: little-endian varints), enum variants by declaration index, so these
//! enums must stay exactly as they are. They are copies of the version-1 top-level
//! messages; the types nested in their bodies ([`Register`], [`Registered`],
//! [`DialOutcome`], …) are shared with the current set, which never changes their shape.
//!
//! Conversions: every version-1 message is a current one (`From`); a current message is
//! a version-1 one only if version 1 had its kind (`TryFrom`, failing with [`NotInV1`]).
//! [`Codec`] is the version-1 `tokio-util` codec, generic over the message types (a
//! version-1 client is `Codec<ServerMsg, ClientMsg>`).

use std::marker::PhantomData;
use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::{decode_message, encode_into, CodecError, Frames, MAX_FRAME_LEN};
use crate::messages::{
    self as current, CachedPage, CallId, DialOutcome, EndReason, Register, Registered, RequestId,
    UnixMillis, UserId, UserState, WireError,
};
use crate::preamble::Preamble;

/// The version number of this encoding.
pub const PROTOCOL_VERSION: u16 = 1;

/// The preamble a version-1 client sends (flags zero).
pub fn client_preamble() -> Preamble {
    Preamble {
        version: PROTOCOL_VERSION,
        word: 0,
    }
}

/// Every frame a version-1 client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMsg {
    /// Echoed in the reply.
    pub id: RequestId,
    /// What the client asks for.
    pub request: Request,
}

/// Every frame a server sends to a version-1 client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The answer to the request with this id.
    Reply {
        /// The request's id.
        id: RequestId,
        /// Success, or a typed error.
        result: Result<Reply, WireError>,
    },
    /// An unsolicited push.
    Event(Event),
    /// The server is closing this connection.
    Closing(WireError),
}

/// Version-1 requests (variant order is the wire format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // Documented on the current `crate::Request`.
pub enum Request {
    Register(Register),
    Heartbeat,
    QueryState { users: Vec<UserId> },
    Dial { callee: UserId },
    Answer { call_id: CallId },
    Reject { call_id: CallId },
    HangUp { call_id: CallId },
    FetchCached { after: CallId, limit: u16 },
    AckCached { call_ids: Vec<CallId> },
    Bye,
}

/// Version-1 replies (variant order is the wire format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // Documented on the current `crate::Reply`.
pub enum Reply {
    Registered(Registered),
    HeartbeatAck { server_time_ms: UnixMillis },
    States(Vec<UserState>),
    Dial(DialOutcome),
    Done,
    Cached(CachedPage),
    Acked { count: u32 },
}

/// Version-1 events (variant order is the wire format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // Documented on the current `crate::Event`.
pub enum Event {
    IncomingCall {
        call_id: CallId,
        caller: UserId,
        caller_media: SocketAddr,
        call_date_ms: UnixMillis,
    },
    CallAnswered {
        call_id: CallId,
    },
    CallEnded {
        call_id: CallId,
        reason: EndReason,
    },
    CachedCallsWaiting {
        count: u32,
    },
}

/// A current message that version 1 has no encoding for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} did not exist in protocol version 1")]
pub struct NotInV1(pub &'static str);

impl From<Request> for current::Request {
    fn from(r: Request) -> Self {
        match r {
            Request::Register(r) => current::Request::Register(r),
            Request::Heartbeat => current::Request::Heartbeat,
            Request::QueryState { users } => current::Request::QueryState { users },
            Request::Dial { callee } => current::Request::Dial {
                callee,
                key: None,
                srtp: None,
                ice: None,
            },
            Request::Answer { call_id } => current::Request::Answer {
                call_id,
                srtp: None,
                ice: None,
            },
            Request::Reject { call_id } => current::Request::Reject { call_id },
            Request::HangUp { call_id } => current::Request::HangUp { call_id },
            Request::FetchCached { after, limit } => current::Request::FetchCached { after, limit },
            Request::AckCached { call_ids } => current::Request::AckCached { call_ids },
            Request::Bye => current::Request::Bye,
        }
    }
}

impl TryFrom<current::Request> for Request {
    type Error = NotInV1;

    fn try_from(r: current::Request) -> Result<Self, NotInV1> {
        Ok(match r {
            current::Request::Register(r) => Request::Register(r),
            current::Request::Heartbeat => Request::Heartbeat,
            current::Request::QueryState { users } => Request::QueryState { users },
            current::Request::Dial { callee, .. } => Request::Dial { callee },
            current::Request::Answer { call_id, .. } => Request::Answer { call_id },
            current::Request::Reject { call_id } => Request::Reject { call_id },
            current::Request::HangUp { call_id } => Request::HangUp { call_id },
            current::Request::FetchCached { after, limit } => Request::FetchCached { after, limit },
            current::Request::AckCached { call_ids } => Request::AckCached { call_ids },
            current::Request::Bye => Request::Bye,
            current::Request::StartEnrollment { .. } => {
                return Err(NotInV1("StartEnrollment"));
            }
            current::Request::PollEnrollment => return Err(NotInV1("PollEnrollment")),
            current::Request::Subscribe { .. } => return Err(NotInV1("Subscribe")),
            current::Request::PresenceAck { .. } => return Err(NotInV1("PresenceAck")),
            current::Request::SetPresence { .. } => return Err(NotInV1("SetPresence")),
            current::Request::OpenTransfer { .. }
            | current::Request::SendMessage(_)
            | current::Request::PutChunk { .. }
            | current::Request::ListMessages { .. }
            | current::Request::GetChunk { .. }
            | current::Request::AckMessages { .. }
            | current::Request::DeleteMessages { .. } => return Err(NotInV1("messages")),
            current::Request::IceServers => return Err(NotInV1("IceServers")),
        })
    }
}

impl From<ClientMsg> for current::ClientMsg {
    fn from(m: ClientMsg) -> Self {
        current::ClientMsg {
            id: m.id,
            request: m.request.into(),
        }
    }
}

impl TryFrom<current::ClientMsg> for ClientMsg {
    type Error = NotInV1;

    fn try_from(m: current::ClientMsg) -> Result<Self, NotInV1> {
        Ok(ClientMsg {
            id: m.id,
            request: m.request.try_into()?,
        })
    }
}

impl From<Reply> for current::Reply {
    fn from(r: Reply) -> Self {
        match r {
            Reply::Registered(r) => current::Reply::Registered(r),
            Reply::HeartbeatAck { server_time_ms } => {
                current::Reply::HeartbeatAck { server_time_ms }
            }
            Reply::States(s) => current::Reply::States(s),
            Reply::Dial(d) => current::Reply::Dial(d),
            Reply::Done => current::Reply::Done,
            Reply::Cached(p) => current::Reply::Cached(p),
            Reply::Acked { count } => current::Reply::Acked { count },
        }
    }
}

impl TryFrom<current::Reply> for Reply {
    type Error = NotInV1;

    fn try_from(r: current::Reply) -> Result<Self, NotInV1> {
        Ok(match r {
            current::Reply::Registered(r) => Reply::Registered(r),
            current::Reply::HeartbeatAck { server_time_ms } => {
                Reply::HeartbeatAck { server_time_ms }
            }
            current::Reply::States(s) => Reply::States(s),
            current::Reply::Dial(d) => Reply::Dial(d),
            current::Reply::Done => Reply::Done,
            current::Reply::Cached(p) => Reply::Cached(p),
            current::Reply::Acked { count } => Reply::Acked { count },
            current::Reply::Enrollment(_) => return Err(NotInV1("Enrollment")),
            current::Reply::Subscribed(_) => return Err(NotInV1("Subscribed")),
            current::Reply::TransferOpen { .. }
            | current::Reply::MessageSent(_)
            | current::Reply::UploadFrom { .. }
            | current::Reply::ChunkStored { .. }
            | current::Reply::Messages(_)
            | current::Reply::Chunk { .. }
            | current::Reply::Deleted { .. } => return Err(NotInV1("messages")),
            current::Reply::IceServers(_) => return Err(NotInV1("IceServers")),
        })
    }
}

impl From<Event> for current::Event {
    fn from(e: Event) -> Self {
        match e {
            Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
            } => current::Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
                srtp: None,
                ice: None,
            },
            Event::CallAnswered { call_id } => current::Event::CallAnswered {
                call_id,
                srtp: None,
                ice: None,
            },
            Event::CallEnded { call_id, reason } => current::Event::CallEnded { call_id, reason },
            Event::CachedCallsWaiting { count } => current::Event::CachedCallsWaiting { count },
        }
    }
}

impl TryFrom<current::Event> for Event {
    type Error = NotInV1;

    fn try_from(e: current::Event) -> Result<Self, NotInV1> {
        Ok(match e {
            current::Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
                ..
            } => Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
            },
            current::Event::CallAnswered { call_id, .. } => Event::CallAnswered { call_id },
            current::Event::CallEnded { call_id, reason } => Event::CallEnded { call_id, reason },
            current::Event::CachedCallsWaiting { count } => Event::CachedCallsWaiting { count },
            current::Event::PresenceChanged { .. } => return Err(NotInV1("PresenceChanged")),
            current::Event::PresenceLost { .. } => return Err(NotInV1("PresenceLost")),
            current::Event::MessagesWaiting { .. } => return Err(NotInV1("MessagesWaiting")),
        })
    }
}

impl From<ServerMsg> for current::ServerMsg {
    fn from(m: ServerMsg) -> Self {
        match m {
            ServerMsg::Reply { id, result } => current::ServerMsg::Reply {
                id,
                result: result.map(Into::into),
            },
            ServerMsg::Event(e) => current::ServerMsg::Event(e.into()),
            ServerMsg::Closing(e) => current::ServerMsg::Closing(e),
        }
    }
}

impl TryFrom<current::ServerMsg> for ServerMsg {
    type Error = NotInV1;

    fn try_from(m: current::ServerMsg) -> Result<Self, NotInV1> {
        Ok(match m {
            current::ServerMsg::Reply { id, result } => ServerMsg::Reply {
                id,
                result: match result {
                    Ok(r) => Ok(r.try_into()?),
                    Err(e) => Err(e),
                },
            },
            current::ServerMsg::Event(e) => ServerMsg::Event(e.try_into()?),
            current::ServerMsg::Closing(e) => ServerMsg::Closing(e),
        })
    }
}

/// The version-1 `tokio-util` codec: decodes frames into `D` and encodes `E` into
/// frames, each payload one whole bincode message.
#[derive(Debug)]
pub struct Codec<D, E> {
    /// Length-prefix framing and its limit.
    frames: Frames,
    /// The message types are only markers; `fn` keeps the codec `Send + Sync`.
    _types: PhantomData<fn(E) -> D>,
}

impl<D, E> Codec<D, E> {
    /// A codec with the protocol's maximum frame size.
    pub fn new() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A codec refusing frames longer than `max` bytes (capped at [`MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(max: usize) -> Self {
        Codec {
            frames: Frames::new(max),
            _types: PhantomData,
        }
    }
}

impl<D, E> Default for Codec<D, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: DeserializeOwned, E> Decoder for Codec<D, E> {
    type Item = D;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        match self.frames.next(src)? {
            Some(frame) => decode_message(&frame).map(Some),
            None => Ok(None),
        }
    }
}

impl<D, E: Serialize> Encoder<E> for Codec<D, E> {
    type Error = CodecError;

    fn encode(&mut self, msg: E, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&msg, dst)
    }
}

impl<D, E: Serialize> Encoder<&E> for Codec<D, E> {
    type Error = CodecError;

    fn encode(&mut self, msg: &E, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.frames
            .put(dst, |out| encode_into(msg, &mut out.writer()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ServerCodec;
    use crate::envelope::ClientFrame;

    type ServerSide = Codec<ClientMsg, ServerMsg>;
    type ClientSide = Codec<ServerMsg, ClientMsg>;

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
    fn the_server_codec_reads_version_1_frames() {
        let mut buf = frame_of(&ClientMsg {
            id: 3,
            request: Request::Dial { callee: 2002 },
        });
        let got = ServerCodec::new(PROTOCOL_VERSION)
            .decode(&mut buf)
            .expect("decodes");
        assert_eq!(
            got,
            Some(ClientFrame::Msg(current::ClientMsg {
                id: 3,
                request: current::Request::Dial {
                    callee: 2002,
                    key: None,
                    srtp: None,
                    ice: None
                }
            }))
        );
    }

    #[test]
    fn the_server_codec_writes_version_1_frames() {
        let msg = current::ServerMsg::Event(current::Event::CallAnswered {
            call_id: 5,
            srtp: None,
            ice: None,
        });
        let mut buf = BytesMut::new();
        ServerCodec::new(PROTOCOL_VERSION)
            .encode(&msg, &mut buf)
            .expect("encodes");
        // len 3, variant 1 = Event, variant 1 = CallAnswered, call id 5
        assert_eq!(&buf[..], &[0, 0, 0, 3, 1, 1, 5]);
        let back = ClientSide::new().decode(&mut buf).expect("decodes");
        assert_eq!(
            back,
            Some(ServerMsg::Event(Event::CallAnswered { call_id: 5 }))
        );
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
