//! What can go wrong talking to the server.

use shared_proto::{CodecError, ErrorCode, Reply, WireError};

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the connection in its preamble.
    #[error("refused: {0}")]
    Refused(WireError),
    /// The server answered the request with an error.
    #[error("server error: {0}")]
    Server(WireError),
    /// The server closed the connection (with its reason, if it gave one).
    #[error("connection closed: {0:?}")]
    Closed(Option<WireError>),
    /// A frame could not be read or written (or a reply could not be decoded).
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// A reply of the wrong kind.
    #[error("unexpected reply: {0:?}")]
    Unexpected(Box<Reply>),
    /// The server broke the protocol in a way no frame shows (a page that does not
    /// advance).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// A failed connection attempt: the server's refusal if it sent one in place of
    /// TLS (see [`crate::recorded`]), else the I/O error.
    pub fn from_connect(e: std::io::Error) -> ClientError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<crate::recorded::RefusedBeforeTls>())
        {
            Some(refused) => ClientError::Refused(refused.0.clone()),
            None => ClientError::Io(e),
        }
    }

    /// The server's error code, if the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(e) | ClientError::Server(e) => Some(e.code),
            ClientError::Closed(Some(e)) => Some(e.code),
            _ => None,
        }
    }
}
