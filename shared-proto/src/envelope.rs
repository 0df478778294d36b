//! The version-2 envelope: every frame's payload is a fixed header, then a body.
//!
//! ```text
//! kind: u16 big-endian | id: u32 big-endian | body: the variant's fields (bincode)
//! ```
//!
//! `kind` names the message variant with a stable number ([`kind`]); its top two bits
//! say what class of message it is ([`KindClass`]), so a peer knows what to do with a
//! kind it has never heard of: the server answers an unknown request kind with
//! [`ErrorCode::UNSUPPORTED`] and keeps the link; a client drops an unknown event (and
//! fails only the one request whose reply it cannot read). `id` is the request id for
//! requests and replies, 0 for events and closings. The body is the variant's fields in
//! bincode 2 (standard configuration), in declaration order; a peer ignores bytes after
//! the fields it knows, so fields can be appended to a body.
//!
//! Kind numbers are never reused or renumbered.

use std::io;
use std::net::SocketAddr;

use crate::codec::{decode_prefix, decode_prefix_counted, encode_into, CodecError};
use crate::messages::{
    CallId, ClientMsg, EndReason, ErrorCode, Event, IceParams, IdempotencyKey, MessageId, Presence,
    Reply, Request, RequestId, ServerMsg, SrtpKey, UnixMillis, UserId, WireError,
};

/// Bytes of the header (kind + id).
pub const HEADER_LEN: usize = 6;

/// The stable kind numbers.
pub mod kind {
    /// [`crate::Request::Register`].
    pub const REGISTER: u16 = 0x0001;
    /// [`crate::Request::Heartbeat`].
    pub const HEARTBEAT: u16 = 0x0002;
    /// [`crate::Request::QueryState`].
    pub const QUERY_STATE: u16 = 0x0003;
    /// [`crate::Request::Dial`].
    pub const DIAL: u16 = 0x0004;
    /// [`crate::Request::Answer`].
    pub const ANSWER: u16 = 0x0005;
    /// [`crate::Request::Reject`].
    pub const REJECT: u16 = 0x0006;
    /// [`crate::Request::HangUp`].
    pub const HANG_UP: u16 = 0x0007;
    /// [`crate::Request::FetchCached`].
    pub const FETCH_CACHED: u16 = 0x0008;
    /// [`crate::Request::AckCached`].
    pub const ACK_CACHED: u16 = 0x0009;
    /// [`crate::Request::Bye`].
    pub const BYE: u16 = 0x000a;
    /// [`crate::Request::StartEnrollment`].
    pub const START_ENROLLMENT: u16 = 0x000b;
    /// [`crate::Request::PollEnrollment`].
    pub const POLL_ENROLLMENT: u16 = 0x000c;
    /// The dispatcher's `ASSIGN` ([`crate::dispatch::Assign`]; not a [`crate::Request`]).
    pub const ASSIGN: u16 = crate::dispatch::ASSIGN;
    /// [`crate::Request::Subscribe`].
    pub const SUBSCRIBE: u16 = 0x000e;
    /// [`crate::Request::PresenceAck`].
    pub const PRESENCE_ACK: u16 = 0x000f;
    /// [`crate::Request::SetPresence`].
    pub const SET_PRESENCE: u16 = 0x0010;
    /// [`crate::Request::OpenTransfer`].
    pub const OPEN_TRANSFER: u16 = 0x0011;
    /// [`crate::Request::SendMessage`].
    pub const SEND_MESSAGE: u16 = 0x0012;
    /// [`crate::Request::PutChunk`].
    pub const PUT_CHUNK: u16 = 0x0013;
    /// [`crate::Request::ListMessages`].
    pub const LIST_MESSAGES: u16 = 0x0014;
    /// [`crate::Request::GetChunk`].
    pub const GET_CHUNK: u16 = 0x0015;
    /// [`crate::Request::AckMessages`].
    pub const ACK_MESSAGES: u16 = 0x0016;
    /// [`crate::Request::DeleteMessages`].
    pub const DELETE_MESSAGES: u16 = 0x0017;
    /// [`crate::Request::IceServers`].
    pub const ICE_SERVERS: u16 = 0x0018;

    /// [`crate::Reply::Registered`].
    pub const REGISTERED: u16 = 0x4001;
    /// [`crate::Reply::HeartbeatAck`].
    pub const HEARTBEAT_ACK: u16 = 0x4002;
    /// [`crate::Reply::States`].
    pub const STATES: u16 = 0x4003;
    /// [`crate::Reply::Dial`].
    pub const DIAL_OUTCOME: u16 = 0x4004;
    /// [`crate::Reply::Done`].
    pub const DONE: u16 = 0x4005;
    /// [`crate::Reply::Cached`].
    pub const CACHED: u16 = 0x4006;
    /// [`crate::Reply::Acked`].
    pub const ACKED: u16 = 0x4007;
    /// [`crate::Reply::Enrollment`].
    pub const ENROLLMENT: u16 = 0x4008;
    /// The dispatcher's `ASSIGNED` ([`crate::dispatch::Assignment`]; not a [`crate::Reply`]).
    pub const ASSIGNED: u16 = crate::dispatch::ASSIGNED;
    /// [`crate::Reply::Subscribed`].
    pub const SUBSCRIBED: u16 = 0x400a;
    /// [`crate::Reply::TransferOpen`].
    pub const TRANSFER_OPEN: u16 = 0x400b;
    /// [`crate::Reply::MessageSent`].
    pub const MESSAGE_SENT: u16 = 0x400c;
    /// [`crate::Reply::UploadFrom`].
    pub const UPLOAD_FROM: u16 = 0x400d;
    /// [`crate::Reply::ChunkStored`].
    pub const CHUNK_STORED: u16 = 0x400e;
    /// [`crate::Reply::Messages`].
    pub const MESSAGES: u16 = 0x400f;
    /// [`crate::Reply::Chunk`].
    pub const CHUNK: u16 = 0x4010;
    /// [`crate::Reply::Deleted`].
    pub const DELETED: u16 = 0x4011;
    /// [`crate::Reply::IceServers`].
    pub const ICE_SERVER_LIST: u16 = 0x4012;
    /// A request failed: the body is a [`crate::WireError`].
    pub const ERROR: u16 = 0x7fff;

    /// [`crate::Event::IncomingCall`].
    pub const INCOMING_CALL: u16 = 0x8001;
    /// [`crate::Event::CallAnswered`].
    pub const CALL_ANSWERED: u16 = 0x8002;
    /// [`crate::Event::CallEnded`].
    pub const CALL_ENDED: u16 = 0x8003;
    /// [`crate::Event::CachedCallsWaiting`].
    pub const CACHED_CALLS_WAITING: u16 = 0x8004;
    /// [`crate::Event::PresenceChanged`].
    pub const PRESENCE_CHANGED: u16 = 0x8005;
    /// [`crate::Event::PresenceLost`].
    pub const PRESENCE_LOST: u16 = 0x8006;
    /// [`crate::Event::MessagesWaiting`].
    pub const MESSAGES_WAITING: u16 = 0x8007;

    /// [`crate::ServerMsg::Closing`]: the body is a [`crate::WireError`].
    pub const CLOSING: u16 = 0xc001;
}

/// What a kind number is, from its top two bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindClass {
    /// `0x0000..=0x3fff`: a request (client to server).
    Request,
    /// `0x4000..=0x7fff`: a reply to the request with the frame's id.
    Reply,
    /// `0x8000..=0xbfff`: an unsolicited event.
    Event,
    /// `0xc000..=0xffff`: about the link itself (closing).
    Control,
}

impl KindClass {
    /// The class of `kind`.
    pub fn of(kind: u16) -> KindClass {
        match kind >> 14 {
            0 => KindClass::Request,
            1 => KindClass::Reply,
            2 => KindClass::Event,
            _ => KindClass::Control,
        }
    }
}

/// A decoded client frame, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// A request this build knows.
    Msg(ClientMsg),
    /// A well-framed message of a kind this build does not know (a newer client, or a
    /// kind that is not a request): answer `UNSUPPORTED` to `id` and carry on.
    Unknown {
        /// The request id, to answer.
        id: RequestId,
        /// The kind number.
        kind: u16,
    },
}

impl ClientFrame {
    /// The request id, to answer.
    pub fn id(&self) -> RequestId {
        match self {
            ClientFrame::Msg(m) => m.id,
            ClientFrame::Unknown { id, .. } => *id,
        }
    }
}

/// A decoded server frame, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// A message this build knows.
    Msg(ServerMsg),
    /// A well-framed message this build cannot use: an unknown kind, or a body it
    /// cannot decode. The link is intact: drop an event, fail the request of a reply.
    Skipped {
        /// The kind number.
        kind: u16,
        /// The frame's id (the request id of a reply).
        id: RequestId,
        /// What kind of message it was.
        class: KindClass,
        /// Why it could not be used, for the log.
        reason: String,
    },
}

/// The kind number of a request.
pub fn request_kind(request: &Request) -> u16 {
    match request {
        Request::Register(_) => kind::REGISTER,
        Request::Heartbeat => kind::HEARTBEAT,
        Request::QueryState { .. } => kind::QUERY_STATE,
        Request::Dial { .. } => kind::DIAL,
        Request::Answer { .. } => kind::ANSWER,
        Request::Reject { .. } => kind::REJECT,
        Request::HangUp { .. } => kind::HANG_UP,
        Request::FetchCached { .. } => kind::FETCH_CACHED,
        Request::AckCached { .. } => kind::ACK_CACHED,
        Request::Bye => kind::BYE,
        Request::StartEnrollment { .. } => kind::START_ENROLLMENT,
        Request::PollEnrollment => kind::POLL_ENROLLMENT,
        Request::Subscribe { .. } => kind::SUBSCRIBE,
        Request::PresenceAck { .. } => kind::PRESENCE_ACK,
        Request::SetPresence { .. } => kind::SET_PRESENCE,
        Request::OpenTransfer { .. } => kind::OPEN_TRANSFER,
        Request::SendMessage(_) => kind::SEND_MESSAGE,
        Request::PutChunk { .. } => kind::PUT_CHUNK,
        Request::ListMessages { .. } => kind::LIST_MESSAGES,
        Request::GetChunk { .. } => kind::GET_CHUNK,
        Request::AckMessages { .. } => kind::ACK_MESSAGES,
        Request::DeleteMessages { .. } => kind::DELETE_MESSAGES,
        Request::IceServers => kind::ICE_SERVERS,
    }
}

/// The kind number of an event.
pub fn event_kind(event: &Event) -> u16 {
    match event {
        Event::IncomingCall { .. } => kind::INCOMING_CALL,
        Event::CallAnswered { .. } => kind::CALL_ANSWERED,
        Event::CallEnded { .. } => kind::CALL_ENDED,
        Event::CachedCallsWaiting { .. } => kind::CACHED_CALLS_WAITING,
        Event::PresenceChanged { .. } => kind::PRESENCE_CHANGED,
        Event::PresenceLost { .. } => kind::PRESENCE_LOST,
        Event::MessagesWaiting { .. } => kind::MESSAGES_WAITING,
    }
}

fn header<W: io::Write>(out: &mut W, kind: u16, id: RequestId) -> Result<(), CodecError> {
    out.write_all(&kind.to_be_bytes())?;
    out.write_all(&id.to_be_bytes())?;
    Ok(())
}

/// Writes the last, appended optional field of a body: nothing at all when it is `None`,
/// so a message that does not use it is byte for byte what it was before the field
/// existed (its decoder reads a missing field as `None`, see `appended`).
fn append<T: serde::Serialize, W: io::Write>(
    field: &Option<T>,
    out: &mut W,
) -> Result<(), CodecError> {
    match field {
        Some(_) => encode_into(field, out),
        None => Ok(()),
    }
}

/// Writes the last two appended optional fields of a body: as [`append`] when the last is
/// `None`, else both in full (an absent first one as an explicit `None`).
fn append2<A: serde::Serialize, B: serde::Serialize, W: io::Write>(
    first: &Option<A>,
    last: &Option<B>,
    out: &mut W,
) -> Result<(), CodecError> {
    match last {
        None => append(first, out),
        Some(_) => {
            encode_into(first, out)?;
            encode_into(last, out)
        }
    }
}

/// Writes a client message's payload (header and body, no length prefix).
pub fn encode_client<W: io::Write>(msg: &ClientMsg, out: &mut W) -> Result<(), CodecError> {
    header(out, request_kind(&msg.request), msg.id)?;
    match &msg.request {
        Request::Register(r) => encode_into(r, out),
        Request::Heartbeat | Request::Bye | Request::PollEnrollment | Request::IceServers => Ok(()),
        Request::QueryState { users } => encode_into(users, out),
        Request::Dial {
            callee,
            key,
            srtp,
            ice,
        } => {
            encode_into(&(callee, key), out)?;
            append2(srtp, ice, out)
        }
        Request::Answer { call_id, srtp, ice } => {
            encode_into(call_id, out)?;
            append2(srtp, ice, out)
        }
        Request::Reject { call_id } | Request::HangUp { call_id } => encode_into(call_id, out),
        Request::StartEnrollment { agent_version } => encode_into(agent_version, out),
        Request::FetchCached { after, limit } => encode_into(&(after, limit), out),
        Request::AckCached { call_ids } => encode_into(call_ids, out),
        Request::Subscribe { contacts, others } => encode_into(&(contacts, others), out),
        Request::PresenceAck {
            subscription,
            seq,
            status,
        } => encode_into(&(subscription, seq, status), out),
        Request::SetPresence {
            do_not_disturb,
            hidden,
        } => encode_into(&(do_not_disturb, hidden), out),
        Request::OpenTransfer { user_id } => encode_into(user_id, out),
        Request::SendMessage(m) => encode_into(m, out),
        Request::PutChunk { key, offset, bytes } => {
            encode_into(&(key, offset, serde_bytes::Bytes::new(bytes)), out)
        }
        Request::ListMessages { before, limit } => encode_into(&(before, limit), out),
        Request::GetChunk {
            message_id,
            offset,
            len,
        } => encode_into(&(message_id, offset, len), out),
        Request::AckMessages { message_ids } | Request::DeleteMessages { message_ids } => {
            encode_into(message_ids, out)
        }
    }
}

/// Writes a server message's payload (header and body, no length prefix).
pub fn encode_server<W: io::Write>(msg: &ServerMsg, out: &mut W) -> Result<(), CodecError> {
    match msg {
        ServerMsg::Reply { id, result: Err(e) } => {
            header(out, kind::ERROR, *id)?;
            encode_into(e, out)
        }
        ServerMsg::Reply { id, result: Ok(r) } => match r {
            Reply::Registered(r) => {
                header(out, kind::REGISTERED, *id)?;
                encode_into(r, out)
            }
            Reply::HeartbeatAck { server_time_ms } => {
                header(out, kind::HEARTBEAT_ACK, *id)?;
                encode_into(server_time_ms, out)
            }
            Reply::States(states) => {
                header(out, kind::STATES, *id)?;
                encode_into(states, out)
            }
            Reply::Dial(outcome) => {
                header(out, kind::DIAL_OUTCOME, *id)?;
                encode_into(outcome, out)
            }
            Reply::Done => header(out, kind::DONE, *id),
            Reply::Cached(page) => {
                header(out, kind::CACHED, *id)?;
                encode_into(page, out)
            }
            Reply::Acked { count } => {
                header(out, kind::ACKED, *id)?;
                encode_into(count, out)
            }
            Reply::Enrollment(status) => {
                header(out, kind::ENROLLMENT, *id)?;
                encode_into(status, out)
            }
            Reply::Subscribed(s) => {
                header(out, kind::SUBSCRIBED, *id)?;
                encode_into(s, out)
            }
            Reply::TransferOpen { max_chunk } => {
                header(out, kind::TRANSFER_OPEN, *id)?;
                encode_into(max_chunk, out)
            }
            Reply::MessageSent(m) => {
                header(out, kind::MESSAGE_SENT, *id)?;
                encode_into(m, out)
            }
            Reply::UploadFrom { have } => {
                header(out, kind::UPLOAD_FROM, *id)?;
                encode_into(have, out)
            }
            Reply::ChunkStored { have } => {
                header(out, kind::CHUNK_STORED, *id)?;
                encode_into(have, out)
            }
            Reply::Messages(page) => {
                header(out, kind::MESSAGES, *id)?;
                encode_into(page, out)
            }
            Reply::Chunk { bytes } => {
                header(out, kind::CHUNK, *id)?;
                encode_into(&serde_bytes::Bytes::new(bytes), out)
            }
            Reply::Deleted { count } => {
                header(out, kind::DELETED, *id)?;
                encode_into(count, out)
            }
            Reply::IceServers(servers) => {
                header(out, kind::ICE_SERVER_LIST, *id)?;
                encode_into(servers, out)
            }
        },
        ServerMsg::Event(e) => {
            header(out, event_kind(e), 0)?;
            match e {
                Event::IncomingCall {
                    call_id,
                    caller,
                    caller_media,
                    call_date_ms,
                    srtp,
                    ice,
                } => {
                    encode_into(&(call_id, caller, caller_media, call_date_ms), out)?;
                    append2(srtp, ice, out)
                }
                Event::CallAnswered { call_id, srtp, ice } => {
                    encode_into(call_id, out)?;
                    append2(srtp, ice, out)
                }
                Event::CallEnded { call_id, reason } => encode_into(&(call_id, reason), out),
                Event::CachedCallsWaiting { count } => encode_into(count, out),
                Event::PresenceChanged {
                    subscription,
                    seq,
                    changes,
                } => encode_into(&(subscription, seq, changes), out),
                Event::PresenceLost {
                    subscription,
                    reason,
                } => encode_into(&(subscription, reason), out),
                Event::MessagesWaiting { count } => encode_into(count, out),
            }
        }
        ServerMsg::Closing(e) => {
            header(out, kind::CLOSING, 0)?;
            encode_into(e, out)
        }
    }
}

/// Splits a payload into kind, id and body.
fn split(payload: &[u8]) -> Result<(u16, RequestId, &[u8]), CodecError> {
    if payload.len() < HEADER_LEN {
        return Err(CodecError::Malformed(format!(
            "a {}-byte frame is shorter than the {HEADER_LEN}-byte envelope header",
            payload.len()
        )));
    }
    let (head, body) = payload.split_at(HEADER_LEN);
    let kind = u16::from_be_bytes([head[0], head[1]]);
    let id = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
    Ok((kind, id, body))
}

/// Decodes a client frame's payload. An unknown kind is [`ClientFrame::Unknown`]; a
/// known kind whose body does not decode, or a payload shorter than the header, is an
/// error (the peer is broken, not newer).
pub fn decode_client(payload: &[u8]) -> Result<ClientFrame, CodecError> {
    let (kind, id, body) = split(payload)?;
    let request = match kind {
        kind::REGISTER => Request::Register(decode_prefix(body)?),
        kind::HEARTBEAT => Request::Heartbeat,
        kind::QUERY_STATE => Request::QueryState {
            users: decode_prefix::<Vec<UserId>>(body)?,
        },
        kind::DIAL => {
            // `key`, then `srtp`, were appended later: a body that ends before one has none.
            let (callee, used) = decode_prefix_counted::<UserId>(body)?;
            let mut rest = body.get(used..).unwrap_or_default();
            let key = appended::<IdempotencyKey>(&mut rest)?;
            let srtp = appended::<SrtpKey>(&mut rest)?;
            let ice = appended::<Box<IceParams>>(&mut rest)?;
            Request::Dial {
                callee,
                key,
                srtp,
                ice,
            }
        }
        kind::ANSWER => {
            let (call_id, used) = decode_prefix_counted::<CallId>(body)?;
            let mut rest = body.get(used..).unwrap_or_default();
            let srtp = appended::<SrtpKey>(&mut rest)?;
            let ice = appended::<Box<IceParams>>(&mut rest)?;
            Request::Answer { call_id, srtp, ice }
        }
        kind::ICE_SERVERS => Request::IceServers,
        kind::REJECT => Request::Reject {
            call_id: decode_prefix(body)?,
        },
        kind::HANG_UP => Request::HangUp {
            call_id: decode_prefix(body)?,
        },
        kind::FETCH_CACHED => {
            let (after, limit) = decode_prefix::<(CallId, u16)>(body)?;
            Request::FetchCached { after, limit }
        }
        kind::ACK_CACHED => Request::AckCached {
            call_ids: decode_prefix::<Vec<CallId>>(body)?,
        },
        kind::BYE => Request::Bye,
        kind::START_ENROLLMENT => Request::StartEnrollment {
            agent_version: decode_prefix(body)?,
        },
        kind::POLL_ENROLLMENT => Request::PollEnrollment,
        kind::SUBSCRIBE => {
            let (contacts, others) = decode_prefix::<(Vec<UserId>, Vec<UserId>)>(body)?;
            Request::Subscribe { contacts, others }
        }
        kind::PRESENCE_ACK => {
            let (subscription, seq, status) = decode_prefix::<(u64, u64, ErrorCode)>(body)?;
            Request::PresenceAck {
                subscription,
                seq,
                status,
            }
        }
        kind::SET_PRESENCE => {
            let (do_not_disturb, hidden) = decode_prefix::<(bool, bool)>(body)?;
            Request::SetPresence {
                do_not_disturb,
                hidden,
            }
        }
        kind::OPEN_TRANSFER => Request::OpenTransfer {
            user_id: decode_prefix(body)?,
        },
        kind::SEND_MESSAGE => Request::SendMessage(decode_prefix(body)?),
        kind::PUT_CHUNK => {
            let (key, offset, bytes) =
                decode_prefix::<(IdempotencyKey, u64, serde_bytes::ByteBuf)>(body)?;
            Request::PutChunk {
                key,
                offset,
                bytes: bytes.into_vec(),
            }
        }
        kind::LIST_MESSAGES => {
            let (before, limit) = decode_prefix::<(MessageId, u16)>(body)?;
            Request::ListMessages { before, limit }
        }
        kind::GET_CHUNK => {
            let (message_id, offset, len) = decode_prefix::<(MessageId, u64, u32)>(body)?;
            Request::GetChunk {
                message_id,
                offset,
                len,
            }
        }
        kind::ACK_MESSAGES => Request::AckMessages {
            message_ids: decode_prefix(body)?,
        },
        kind::DELETE_MESSAGES => Request::DeleteMessages {
            message_ids: decode_prefix(body)?,
        },
        _ => return Ok(ClientFrame::Unknown { id, kind }),
    };
    Ok(ClientFrame::Msg(ClientMsg { id, request }))
}

/// An optional field appended to a body after `rest`'s start: `None` when the body ends
/// there (an older peer), else decoded, and `rest` moves past it.
fn appended<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Result<Option<T>, CodecError> {
    if rest.is_empty() {
        return Ok(None);
    }
    let (value, used) = decode_prefix_counted::<Option<T>>(rest)?;
    *rest = rest.get(used..).unwrap_or_default();
    Ok(value)
}

/// Decodes a server frame's payload. Only a payload shorter than the header is an error;
/// anything else this build cannot use is [`ServerFrame::Skipped`].
pub fn decode_server(payload: &[u8]) -> Result<ServerFrame, CodecError> {
    let (kind, id, body) = split(payload)?;
    let skipped = |reason: String| ServerFrame::Skipped {
        kind,
        id,
        class: KindClass::of(kind),
        reason,
    };
    match decode_known_server(kind, id, body) {
        Ok(Some(msg)) => Ok(ServerFrame::Msg(msg)),
        Ok(None) => Ok(skipped(format!("unknown message kind {kind:#06x}"))),
        Err(e) => Ok(skipped(format!("kind {kind:#06x}: {e}"))),
    }
}

fn decode_known_server(
    kind: u16,
    id: RequestId,
    body: &[u8],
) -> Result<Option<ServerMsg>, CodecError> {
    let reply = |r: Reply| Some(ServerMsg::Reply { id, result: Ok(r) });
    Ok(match kind {
        kind::REGISTERED => reply(Reply::Registered(decode_prefix(body)?)),
        kind::HEARTBEAT_ACK => reply(Reply::HeartbeatAck {
            server_time_ms: decode_prefix(body)?,
        }),
        kind::STATES => reply(Reply::States(decode_prefix(body)?)),
        kind::DIAL_OUTCOME => reply(Reply::Dial(decode_prefix(body)?)),
        kind::DONE => reply(Reply::Done),
        kind::CACHED => reply(Reply::Cached(decode_prefix(body)?)),
        kind::ACKED => reply(Reply::Acked {
            count: decode_prefix(body)?,
        }),
        kind::ENROLLMENT => reply(Reply::Enrollment(decode_prefix(body)?)),
        kind::SUBSCRIBED => reply(Reply::Subscribed(decode_prefix(body)?)),
        kind::TRANSFER_OPEN => reply(Reply::TransferOpen {
            max_chunk: decode_prefix(body)?,
        }),
        kind::MESSAGE_SENT => reply(Reply::MessageSent(decode_prefix(body)?)),
        kind::UPLOAD_FROM => reply(Reply::UploadFrom {
            have: decode_prefix(body)?,
        }),
        kind::CHUNK_STORED => reply(Reply::ChunkStored {
            have: decode_prefix(body)?,
        }),
        kind::MESSAGES => reply(Reply::Messages(decode_prefix(body)?)),
        kind::CHUNK => reply(Reply::Chunk {
            bytes: decode_prefix::<serde_bytes::ByteBuf>(body)?.into_vec(),
        }),
        kind::ICE_SERVER_LIST => reply(Reply::IceServers(decode_prefix(body)?)),
        kind::DELETED => reply(Reply::Deleted {
            count: decode_prefix(body)?,
        }),
        kind::ERROR => Some(ServerMsg::Reply {
            id,
            result: Err(decode_prefix::<WireError>(body)?),
        }),
        kind::INCOMING_CALL => {
            let ((call_id, caller, caller_media, call_date_ms), used) =
                decode_prefix_counted::<(CallId, UserId, SocketAddr, UnixMillis)>(body)?;
            let mut rest = body.get(used..).unwrap_or_default();
            let srtp = appended::<SrtpKey>(&mut rest)?;
            let ice = appended::<Box<IceParams>>(&mut rest)?;
            Some(ServerMsg::Event(Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
                srtp,
                ice,
            }))
        }
        kind::CALL_ANSWERED => {
            let (call_id, used) = decode_prefix_counted::<CallId>(body)?;
            let mut rest = body.get(used..).unwrap_or_default();
            let srtp = appended::<SrtpKey>(&mut rest)?;
            let ice = appended::<Box<IceParams>>(&mut rest)?;
            Some(ServerMsg::Event(Event::CallAnswered { call_id, srtp, ice }))
        }
        kind::CALL_ENDED => {
            let (call_id, reason) = decode_prefix::<(CallId, EndReason)>(body)?;
            Some(ServerMsg::Event(Event::CallEnded { call_id, reason }))
        }
        kind::CACHED_CALLS_WAITING => Some(ServerMsg::Event(Event::CachedCallsWaiting {
            count: decode_prefix(body)?,
        })),
        kind::PRESENCE_CHANGED => {
            let (subscription, seq, changes) = decode_prefix::<(u64, u64, Vec<Presence>)>(body)?;
            Some(ServerMsg::Event(Event::PresenceChanged {
                subscription,
                seq,
                changes,
            }))
        }
        kind::PRESENCE_LOST => {
            let (subscription, reason) = decode_prefix::<(u64, String)>(body)?;
            Some(ServerMsg::Event(Event::PresenceLost {
                subscription,
                reason,
            }))
        }
        kind::MESSAGES_WAITING => Some(ServerMsg::Event(Event::MessagesWaiting {
            count: decode_prefix(body)?,
        })),
        kind::CLOSING => Some(ServerMsg::Closing(decode_prefix(body)?)),
        _ => None,
    })
}

/// A whole frame (length prefix included) of any kind with a raw body: for tests and
/// tools that must speak kinds this build does not know.
pub fn frame(kind: u16, id: RequestId, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(4 + len);
    // Test and tool input; a body beyond u32 is not a frame anyone could send.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_and_srtp_fields_round_trip() {
        let key = SrtpKey {
            suite: crate::SrtpSuite::AES_CM_128_HMAC_SHA1_80,
            key_salt: (0..30).collect(),
        };
        assert!(key.is_valid());
        assert!(
            !format!("{key:?}").contains("29"),
            "Debug never shows the key"
        );
        let ice = IceParams {
            ufrag: "abcd".into(),
            pwd: "p".repeat(22),
            candidates: vec![crate::IceCandidate {
                kind: crate::CandidateKind::SERVER_REFLEXIVE,
                addr: "203.0.113.7:40000".parse().unwrap(),
                priority: 1_694_498_815,
                foundation: "2".into(),
            }],
        };
        assert!(ice.check().is_ok());
        assert!(
            !format!("{ice:?}").contains("ppp"),
            "Debug never shows the password"
        );
        for request in [
            Request::Dial {
                callee: 9,
                key: None,
                srtp: Some(key.clone()),
                ice: None,
            },
            Request::Dial {
                callee: 9,
                key: Some(3),
                srtp: None,
                ice: Some(Box::new(ice.clone())),
            },
            Request::Answer {
                call_id: 4,
                srtp: Some(key.clone()),
                ice: Some(Box::new(ice.clone())),
            },
            Request::Answer {
                call_id: 4,
                srtp: None,
                ice: Some(Box::new(ice.clone())),
            },
            Request::IceServers,
            Request::StartEnrollment {
                agent_version: "tv-agent 1".into(),
            },
            Request::PollEnrollment,
            Request::Subscribe {
                contacts: vec![1001, 2002],
                others: vec![3003],
            },
            Request::PresenceAck {
                subscription: 9,
                seq: 12,
                status: ErrorCode::OK,
            },
            Request::SetPresence {
                do_not_disturb: true,
                hidden: false,
            },
        ] {
            let msg = ClientMsg { id: 7, request };
            let mut out = Vec::new();
            encode_client(&msg, &mut out).unwrap();
            assert_eq!(decode_client(&out).unwrap(), ClientFrame::Msg(msg));
        }
        for msg in [
            ServerMsg::Event(Event::IncomingCall {
                call_id: 1,
                caller: 2,
                caller_media: "192.0.2.1:5004".parse().unwrap(),
                call_date_ms: 3,
                srtp: Some(key.clone()),
                ice: None,
            }),
            ServerMsg::Event(Event::IncomingCall {
                call_id: 1,
                caller: 2,
                caller_media: "192.0.2.1:5004".parse().unwrap(),
                call_date_ms: 3,
                srtp: Some(key.clone()),
                ice: Some(Box::new(ice.clone())),
            }),
            ServerMsg::Event(Event::CallAnswered {
                call_id: 1,
                srtp: Some(key.clone()),
                ice: None,
            }),
            ServerMsg::Event(Event::CallAnswered {
                call_id: 1,
                srtp: None,
                ice: Some(Box::new(ice)),
            }),
            ServerMsg::Reply {
                id: 5,
                result: Ok(Reply::IceServers(crate::IceServers {
                    stun: vec!["stun:192.0.2.9:3478".into()],
                    turn: vec![crate::TurnServer {
                        urls: vec!["turn:192.0.2.9:3478?transport=udp".into()],
                        username: "1700000000:1001".into(),
                        credential: "c2VjcmV0".into(),
                        expires_ms: 1_700_000_000_000,
                    }],
                })),
            },
            ServerMsg::Reply {
                id: 2,
                result: Ok(Reply::Enrollment(crate::EnrollmentStatus::Pending {
                    user_code: "BCDF-GHJK".into(),
                    expires_in_s: 600,
                    interval_s: 1,
                })),
            },
            ServerMsg::Reply {
                id: 3,
                result: Ok(Reply::Enrollment(crate::EnrollmentStatus::Enrolled {
                    user_id: 5,
                })),
            },
            ServerMsg::Reply {
                id: 4,
                result: Ok(Reply::Subscribed(crate::Subscribed {
                    subscription: 3,
                    seq: 0,
                    states: vec![Presence {
                        user_id: 1001,
                        state: crate::PresenceState::MOBILE,
                        since_ms: Some(5),
                    }],
                })),
            },
            ServerMsg::Event(Event::PresenceChanged {
                subscription: 3,
                seq: 1,
                changes: vec![Presence {
                    user_id: 1001,
                    state: crate::PresenceState::BUSY,
                    since_ms: None,
                }],
            }),
            ServerMsg::Event(Event::PresenceLost {
                subscription: 3,
                reason: "no acknowledgement within 5 s".into(),
            }),
        ] {
            let mut out = Vec::new();
            encode_server(&msg, &mut out).unwrap();
            assert_eq!(decode_server(&out).unwrap(), ServerFrame::Msg(msg));
        }
    }

    #[test]
    fn message_kinds_round_trip_and_a_full_chunk_fits_a_frame() {
        let body = crate::BodyRef {
            size: 10 << 20,
            sha256: vec![7; 32],
        };
        let requests = [
            Request::OpenTransfer { user_id: 1001 },
            Request::SendMessage(crate::SendMessage {
                to: 2002,
                key: 99,
                kind: crate::MessageKind::VOICE,
                text: "caption ✓".into(),
                body: Some(body),
            }),
            Request::PutChunk {
                key: 99,
                offset: 4096,
                bytes: vec![0xab; crate::MAX_CHUNK],
            },
            Request::ListMessages {
                before: 0,
                limit: 20,
            },
            Request::GetChunk {
                message_id: 5,
                offset: 1,
                len: 48 * 1024,
            },
            Request::AckMessages {
                message_ids: vec![5, 6],
            },
            Request::DeleteMessages {
                message_ids: vec![5],
            },
        ];
        for request in requests {
            request.validate().unwrap();
            let msg = ClientMsg { id: 9, request };
            let mut out = Vec::new();
            encode_client(&msg, &mut out).unwrap();
            assert!(out.len() + 4 <= crate::MAX_FRAME_LEN);
            assert_eq!(decode_client(&out).unwrap(), ClientFrame::Msg(msg));
        }
        let info = crate::MessageInfo {
            message_id: 5,
            sender: 1001,
            sent_ms: 1_700_000_000_000,
            kind: crate::MessageKind::PICTURE,
            text: String::new(),
            body: Some(crate::BodyInfo {
                size: 1234,
                sha256: vec![1; 32],
                mime: "image/png".into(),
                duration_ms: None,
                width: Some(320),
                height: Some(240),
            }),
            sender_state: crate::NetState::Online,
        };
        let replies = [
            Reply::TransferOpen { max_chunk: 49152 },
            Reply::MessageSent(crate::MessageSent {
                message_id: 5,
                outcome: crate::SendOutcome::DELIVERED,
            }),
            Reply::UploadFrom { have: 0 },
            Reply::ChunkStored { have: 49152 },
            Reply::Messages(crate::MessagePage {
                messages: vec![info],
                more: true,
            }),
            Reply::Chunk {
                bytes: vec![3; crate::MAX_CHUNK],
            },
            Reply::Deleted { count: 1 },
        ];
        for reply in replies {
            let msg = ServerMsg::Reply {
                id: 9,
                result: Ok(reply),
            };
            let mut out = Vec::new();
            encode_server(&msg, &mut out).unwrap();
            assert!(out.len() + 4 <= crate::MAX_FRAME_LEN);
            assert_eq!(decode_server(&out).unwrap(), ServerFrame::Msg(msg));
        }
        let waiting = ServerMsg::Event(Event::MessagesWaiting { count: 3 });
        let mut out = Vec::new();
        encode_server(&waiting, &mut out).unwrap();
        assert_eq!(decode_server(&out).unwrap(), ServerFrame::Msg(waiting));
        // A chunk carries its bytes raw (a length, then the bytes), not one field each.
        let mut out = Vec::new();
        encode_server(
            &ServerMsg::Reply {
                id: 1,
                result: Ok(Reply::Chunk {
                    bytes: vec![0xff; 1000],
                }),
            },
            &mut out,
        )
        .unwrap();
        assert!(out.len() < 1000 + 16, "{} bytes", out.len());
    }

    #[test]
    fn kind_classes_by_top_bits() {
        assert_eq!(KindClass::of(kind::BYE), KindClass::Request);
        assert_eq!(KindClass::of(kind::ACKED), KindClass::Reply);
        assert_eq!(KindClass::of(kind::ERROR), KindClass::Reply);
        assert_eq!(KindClass::of(kind::CALL_ENDED), KindClass::Event);
        assert_eq!(KindClass::of(kind::CLOSING), KindClass::Control);
    }

    #[test]
    fn an_undecodable_reply_keeps_its_id() {
        // A Registered reply with a body this build cannot read.
        let payload = &frame(kind::REGISTERED, 77, &[0xff])[4..];
        match decode_server(payload).expect("header is fine") {
            ServerFrame::Skipped {
                id: 77,
                class: KindClass::Reply,
                ..
            } => {}
            other => panic!("expected a skipped reply, got {other:?}"),
        }
    }

    #[test]
    fn unknown_control_kind_is_skipped() {
        let payload = &frame(0xc0ff, 0, &[])[4..];
        assert!(matches!(
            decode_server(payload),
            Ok(ServerFrame::Skipped {
                class: KindClass::Control,
                ..
            })
        ));
    }
}
