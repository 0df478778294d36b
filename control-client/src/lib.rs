//! `control-client`: the client side of the TV control protocol, over any byte stream.
//!
//! Both the TV agent's link and the server's load generator and tests talk to the
//! server through this crate, so the protocol's client logic exists once:
//!
//! - [`connection`]: the preamble handshake (asking for [`Features`]) and a
//!   [`Connection`] that sends requests with fresh ids, reads replies and events, logs
//!   and drops what this build cannot use (an unknown event kind from a newer server),
//!   and waits for one request's reply ([`Connection::call`]).
//! - [`pending`]: requests in flight matched to their replies by id, with deadlines, for
//!   a client that keeps several outstanding (the agent's link).
//! - [`paging`]: fetching every cached call page by page and acknowledging in pages,
//!   independent of the transport (a pure pager plus an async loop over any request
//!   function).
//! - [`client`]: [`Client`], one request at a time with events queued in between; what
//!   the load generator and the tests use.
//!
//! - [`dispatch`]: asking the distribution service for a node and a token (or
//!   learning that `--server` is a node itself).
//!
//! - [`tls`]: the TV's key pair and certificate, trust in the server's CA, TLS 1.3
//!   connections that resume; [`transport`]: plain TCP or TLS behind one stream type.
//!
//! Everything is generic over `AsyncRead + AsyncWrite + Unpin + Send`, so TLS is a
//! wrapper around the stream, not a change to the protocol code. No reconnect or
//! heartbeat policy lives here: that is the caller's.

pub mod client;
pub mod connection;
pub mod dispatch;
pub mod error;
pub mod paging;
pub mod pending;
pub mod recorded;
pub mod tls;
pub mod transport;

pub use client::Client;
pub use connection::{handshake, Connection, Incoming};
pub use error::ClientError;
pub use paging::{ack_requests, fetch_all_cached, CachedPager, PagingError};
pub use pending::Pending;
pub use shared_proto::Features;
pub use tls::{TlsClient, TlsSetupError, TvKey};
pub use transport::{Stream, Transport};
