//! The distribution service's one exchange (issue 18, section D): a TV at power-on asks
//! the dispatcher for a node ([`Assign`], kind [`ASSIGN`]) and is answered with the
//! node's address and a signed temporary token ([`Assignment`], kind [`ASSIGNED`]), or
//! with an error frame (kind [`crate::envelope::kind::ERROR`], a [`crate::WireError`]).
//!
//! Same preamble, frames and envelope as the control link; the two kinds are numbered
//! in the envelope's request and reply ranges but are not [`crate::Request`] or
//! [`crate::Reply`] variants (the version-1 mappings and every server handler match
//! those enums exhaustively; the dispatcher is the only peer that answers `ASSIGN`). A
//! node that is not a dispatcher answers `ASSIGN` like any request kind it does not
//! know (`UNSUPPORTED`, link kept), which is how an agent pointed at a single node
//! learns that it is already at its node.
//!
//! The token is opaque here: the server signs and checks it; the agent only carries it.

use crate::codec::{decode_prefix_counted, encode_into, CodecError};
use crate::envelope::{frame, kind, HEADER_LEN};
use crate::messages::{ErrorCode, RequestId, UnixMillis, WireError, MAX_AGENT_VERSION_LEN};

/// Kind number of [`Assign`] (request range; never reused).
pub const ASSIGN: u16 = 0x000d;
/// Kind number of [`Assignment`] (reply range; never reused).
pub const ASSIGNED: u16 = 0x4009;

/// Largest token accepted anywhere (a token is about 130 bytes).
pub const MAX_TOKEN_LEN: usize = 512;
/// Longest node id or node address carried.
pub const MAX_NODE_TEXT_LEN: usize = 255;

/// A TV asks for a node. Fields may only be appended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assign {
    /// Free-form agent build identifier, at most [`MAX_AGENT_VERSION_LEN`] bytes.
    pub agent_version: String,
    /// The node this TV was last assigned and could not reach (or lost): the
    /// dispatcher does not assign it again while others are live. Empty: none.
    pub unreachable_node: String,
}

/// The dispatcher's answer: where to register and with what. Fields may only be
/// appended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// The node's id (to report it back in [`Assign::unreachable_node`]).
    pub node_id: String,
    /// `host:port` TVs connect to on that node (its TLS name is the host).
    pub node_addr: String,
    /// The signed token the TV presents to that node (opaque to the TV).
    pub token: Vec<u8>,
    /// When the token stops admitting a registration (Unix ms, dispatcher's clock).
    pub expires_at_ms: UnixMillis,
}

impl Assign {
    /// Checks limits on fields from the peer.
    pub fn validate(&self) -> Result<(), String> {
        if self.agent_version.len() > MAX_AGENT_VERSION_LEN {
            return Err("agent_version is too long".into());
        }
        if self.unreachable_node.len() > MAX_NODE_TEXT_LEN {
            return Err("unreachable_node is too long".into());
        }
        Ok(())
    }
}

impl Assignment {
    /// Checks limits on fields from the peer.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id.len() > MAX_NODE_TEXT_LEN || self.node_addr.len() > MAX_NODE_TEXT_LEN {
            return Err("node id or address is too long".into());
        }
        if self.token.is_empty() || self.token.len() > MAX_TOKEN_LEN {
            return Err(format!("a {}-byte token", self.token.len()));
        }
        Ok(())
    }
}

fn body<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// The whole frame (length prefix included) of an [`Assign`] request with id `id`.
pub fn assign_frame(id: RequestId, assign: &Assign) -> Result<Vec<u8>, CodecError> {
    Ok(frame(ASSIGN, id, &body(assign)?))
}

/// The whole frame of the answer `result` to request `id`.
pub fn assigned_frame(
    id: RequestId,
    result: &Result<Assignment, WireError>,
) -> Result<Vec<u8>, CodecError> {
    Ok(match result {
        Ok(a) => frame(ASSIGNED, id, &body(a)?),
        Err(e) => frame(kind::ERROR, id, &body(e)?),
    })
}

/// Splits a payload (no length prefix) into kind, id and body.
pub fn split(payload: &[u8]) -> Result<(u16, RequestId, &[u8]), CodecError> {
    if payload.len() < HEADER_LEN {
        return Err(CodecError::Malformed(
            "frame shorter than its header".into(),
        ));
    }
    let (head, rest) = payload.split_at(HEADER_LEN);
    Ok((
        u16::from_be_bytes([head[0], head[1]]),
        u32::from_be_bytes([head[2], head[3], head[4], head[5]]),
        rest,
    ))
}

/// Decodes an `ASSIGN` request's body (bytes after the known fields are ignored).
pub fn decode_assign(body: &[u8]) -> Result<Assign, CodecError> {
    let (a, _) = decode_prefix_counted::<Assign>(body)?;
    a.validate().map_err(CodecError::Malformed)?;
    Ok(a)
}

/// What a peer answered to `ASSIGN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignReply {
    /// A dispatcher's assignment.
    Assigned(Assignment),
    /// Refused; `UNSUPPORTED` means the peer is a node, not a dispatcher.
    Error(WireError),
}

/// Decodes the answer payload (no length prefix) to an `ASSIGN` request.
pub fn decode_assign_reply(payload: &[u8]) -> Result<(RequestId, AssignReply), CodecError> {
    let (k, id, body) = split(payload)?;
    match k {
        ASSIGNED => {
            let (a, _) = decode_prefix_counted::<Assignment>(body)?;
            a.validate().map_err(CodecError::Malformed)?;
            Ok((id, AssignReply::Assigned(a)))
        }
        kind::ERROR => {
            let (e, _) = decode_prefix_counted::<WireError>(body)?;
            Ok((id, AssignReply::Error(e)))
        }
        kind::CLOSING => {
            let (e, _) = decode_prefix_counted::<WireError>(body)?;
            Ok((id, AssignReply::Error(e)))
        }
        other => Err(CodecError::Malformed(format!(
            "kind {other:#06x} is no answer to ASSIGN"
        ))),
    }
}

/// Whether an error answer to `ASSIGN` says the peer is a node (it does not know the kind).
pub fn is_not_a_dispatcher(e: &WireError) -> bool {
    e.code == ErrorCode::UNSUPPORTED
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::envelope::{decode_client, ClientFrame};

    #[test]
    fn assign_and_assignment_round_trip_and_a_node_sees_an_unknown_kind() {
        let a = Assign {
            agent_version: "tv-agent 2".into(),
            unreachable_node: "node-b".into(),
        };
        let f = assign_frame(9, &a).unwrap();
        let (k, id, body) = split(&f[4..]).unwrap();
        assert_eq!((k, id), (ASSIGN, 9));
        assert_eq!(decode_assign(body).unwrap(), a);
        // A node decodes it as a kind it does not know: it answers UNSUPPORTED.
        assert_eq!(
            decode_client(&f[4..]).unwrap(),
            ClientFrame::Unknown {
                id: 9,
                kind: ASSIGN
            }
        );
        let ok = Assignment {
            node_id: "node-a".into(),
            node_addr: "127.0.0.1:7600".into(),
            token: vec![1; 130],
            expires_at_ms: 5,
        };
        let f = assigned_frame(9, &Ok(ok.clone())).unwrap();
        assert_eq!(
            decode_assign_reply(&f[4..]).unwrap(),
            (9, AssignReply::Assigned(ok))
        );
        let err = WireError::new(ErrorCode::UNSUPPORTED, "no");
        let f = assigned_frame(3, &Err(err.clone())).unwrap();
        let (_, r) = decode_assign_reply(&f[4..]).unwrap();
        assert!(matches!(&r, AssignReply::Error(e) if is_not_a_dispatcher(e)));
        // Limits.
        let long = Assign {
            agent_version: "x".repeat(MAX_AGENT_VERSION_LEN + 1),
            unreachable_node: String::new(),
        };
        let f = assign_frame(1, &long).unwrap();
        assert!(decode_assign(split(&f[4..]).unwrap().2).is_err());
        assert!(split(&[0, 1]).is_err());
    }
}
