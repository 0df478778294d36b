//! The wire contract between `tv-agent` (on the TV) and `call-proxy-server`.
//!
//! Everything that crosses the TCP control link is defined here and nowhere else:
//!
//! - [`preamble`]: the fixed 8-byte handshake (magic, protocol version, flags/status)
//!   each side sends first, so a non-protocol client or a wrong version gets a clear
//!   status and a close; a client's flags are the [`Features`] (kinds of pushes) it wants.
//! - [`messages`]: one request enum ([`Request`]), the replies ([`Reply`]) and the
//!   unsolicited server pushes ([`Event`]), with typed, stable error codes ([`ErrorCode`]).
//! - [`envelope`]: protocol version 2: each message is a stable kind number and a request
//!   id, then the variant's body, so a peer can skip (or answer `UNSUPPORTED` to) a kind
//!   it does not know and keep the link.
//! - [`v1`]: protocol version 1, frozen: the original message set, encoded as whole
//!   bincode messages; servers keep speaking it to older agents.
//! - [`dispatch`]: the distribution service's exchange (a node and a token for a TV).
//! - [`codec`]: length-prefixed frames with a hard maximum size; the server's and the
//!   client's `tokio-util` codecs on top of plain encode/decode functions.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and knows no database.
//! Only its types cross the control link.

pub mod codec;
pub mod dispatch;
pub mod envelope;
pub mod messages;
pub mod preamble;
pub mod v1;

pub use codec::{
    decode_message, encode_message, ClientCodec, CodecError, ServerCodec, MAX_FRAME_LEN,
};
pub use envelope::{ClientFrame, KindClass, ServerFrame};
pub use messages::*;
pub use preamble::{
    Features, Preamble, PreambleError, MAGIC, MIN_PROTOCOL_VERSION, PREAMBLE_LEN, PROTOCOL_VERSION,
};
