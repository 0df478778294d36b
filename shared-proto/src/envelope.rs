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
    CallId, ClientMsg, EndReason, Event, IdempotencyKey, Reply, Request, RequestId, ServerMsg,
    UnixMillis, UserId, WireError,
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
    }
}

/// The kind number of an event.
pub fn event_kind(event: &Event) -> u16 {
    match event {
        Event::IncomingCall { .. } => kind::INCOMING_CALL,
        Event::CallAnswered { .. } => kind::CALL_ANSWERED,
        Event::CallEnded { .. } => kind::CALL_ENDED,
        Event::CachedCallsWaiting { .. } => kind::CACHED_CALLS_WAITING,
    }
}

fn header<W: io::Write>(out: &mut W, kind: u16, id: RequestId) -> Result<(), CodecError> {
    out.write_all(&kind.to_be_bytes())?;
    out.write_all(&id.to_be_bytes())?;
    Ok(())
}

/// Writes a client message's payload (header and body, no length prefix).
pub fn encode_client<W: io::Write>(msg: &ClientMsg, out: &mut W) -> Result<(), CodecError> {
    header(out, request_kind(&msg.request), msg.id)?;
    match &msg.request {
        Request::Register(r) => encode_into(r, out),
        Request::Heartbeat | Request::Bye => Ok(()),
        Request::QueryState { users } => encode_into(users, out),
        Request::Dial { callee, key } => encode_into(&(callee, key), out),
        Request::Answer { call_id } | Request::Reject { call_id } | Request::HangUp { call_id } => {
            encode_into(call_id, out)
        }
        Request::FetchCached { after, limit } => encode_into(&(after, limit), out),
        Request::AckCached { call_ids } => encode_into(call_ids, out),
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
        },
        ServerMsg::Event(e) => {
            header(out, event_kind(e), 0)?;
            match e {
                Event::IncomingCall {
                    call_id,
                    caller,
                    caller_media,
                    call_date_ms,
                } => encode_into(&(call_id, caller, caller_media, call_date_ms), out),
                Event::CallAnswered { call_id } => encode_into(call_id, out),
                Event::CallEnded { call_id, reason } => encode_into(&(call_id, reason), out),
                Event::CachedCallsWaiting { count } => encode_into(count, out),
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
            // `key` was appended later: a body that ends after `callee` has none.
            let (callee, used) = decode_prefix_counted::<UserId>(body)?;
            let rest = body.get(used..).unwrap_or_default();
            let key = if rest.is_empty() {
                None
            } else {
                decode_prefix::<Option<IdempotencyKey>>(rest)?
            };
            Request::Dial { callee, key }
        }
        kind::ANSWER => Request::Answer {
            call_id: decode_prefix(body)?,
        },
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
        _ => return Ok(ClientFrame::Unknown { id, kind }),
    };
    Ok(ClientFrame::Msg(ClientMsg { id, request }))
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
        kind::ERROR => Some(ServerMsg::Reply {
            id,
            result: Err(decode_prefix::<WireError>(body)?),
        }),
        kind::INCOMING_CALL => {
            let (call_id, caller, caller_media, call_date_ms) =
                decode_prefix::<(CallId, UserId, SocketAddr, UnixMillis)>(body)?;
            Some(ServerMsg::Event(Event::IncomingCall {
                call_id,
                caller,
                caller_media,
                call_date_ms,
            }))
        }
        kind::CALL_ANSWERED => Some(ServerMsg::Event(Event::CallAnswered {
            call_id: decode_prefix(body)?,
        })),
        kind::CALL_ENDED => {
            let (call_id, reason) = decode_prefix::<(CallId, EndReason)>(body)?;
            Some(ServerMsg::Event(Event::CallEnded { call_id, reason }))
        }
        kind::CACHED_CALLS_WAITING => Some(ServerMsg::Event(Event::CachedCallsWaiting {
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
