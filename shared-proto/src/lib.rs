//! The wire contract between `tv-agent` (on the TV) and `call-proxy-server`.
//!
//! Everything that crosses the TCP control link is defined here and nowhere else:
//!
//! - [`preamble`]: the fixed 8-byte handshake (magic + protocol version) each side sends
//!   first, so a non-protocol client or a wrong version gets a clear status and a close.
//! - [`messages`]: one request enum ([`Request`]), the replies ([`Reply`]) and the
//!   unsolicited server pushes ([`Event`]), with typed, stable error codes ([`ErrorCode`]).
//! - [`codec`]: length-prefixed frames with a hard maximum size, each carrying one
//!   bincode-encoded message; a `tokio-util` codec on top of plain encode/decode functions.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and knows no database.
//! Only its types cross the control link.

pub mod codec;
pub mod messages;
pub mod preamble;

pub use codec::{decode_message, encode_message, CodecError, ControlCodec, MAX_FRAME_LEN};
pub use messages::*;
pub use preamble::{Preamble, PreambleError, MAGIC, PREAMBLE_LEN, PROTOCOL_VERSION};
