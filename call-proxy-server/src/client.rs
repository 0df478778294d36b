//! A minimal async client of the control protocol: connect with the preamble, send
//! requests and match their replies, queue the events that arrive in between.
//!
//! The load generator and the tests use it to play TVs over real TCP. It is the
//! `control-client` crate's [`Client`] (the one implementation of the protocol's client
//! side, shared with the TV agent), re-exported here so their paths stay the same.

pub use control_client::{Client, ClientError};
