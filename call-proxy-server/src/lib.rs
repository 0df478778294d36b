//! `call-proxy-server`: the user call-proxy server for network TVs.
//!
//! TVs connect over TCP and register at power-on; the server records who is online and
//! at which IP in `user_property`, records every call in `user_call`, connects calls
//! between online TVs by handing each the other's UDP media address, and caches calls to
//! TVs that are off until they fetch and acknowledge them at their next power-on.
//!
//! Map of the crate:
//! - [`server`]: listener, connection limit, per-connection tasks, two-phase shutdown.
//! - [`connection`]: one TV's link: preamble, frames, rate limit, heartbeat timeout, pushes.
//! - [`handler`]: one module per request kind (register, query, dial, call control,
//!   fetch and acknowledge cached calls).
//! - [`registry`]: in-memory sessions and the live-call state machine (no I/O).
//! - [`cluster`]: messages between nodes on one database (calls between their TVs).
//! - [`storage`]: the backend-neutral [`storage::Store`] and
//!   [`storage::operator::OperatorStore`] interfaces, chosen by `backend` in the config
//!   through [`storage::open`], and the SQLite and PostgreSQL implementations (the only
//!   code that knows SQL).
//! - [`admin`]: the admin HTTP listener (health, readiness, Prometheus metrics, the
//!   operator API) and its JSON types.
//! - [`config`], [`metrics`], [`clock`]: settings, counters, timestamps.
//! - [`tls`]: TLS 1.3 on the control port, the server's own CA, TV identities.
//! - [`dispatch`]: the distribution service (`dispatch` role) and its node tokens.
//! - [`accounting`]: traffic accounting per account and period (usage, allowances).
//! - [`embedded`]: a server running inside the calling process (tests, embedders).
//! - [`client`]: a small async client of the protocol, used by the load generator and tests.

pub mod accounting;
pub mod admin;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod dispatch;
pub mod embedded;
pub mod handler;
pub mod ice;
pub mod messages;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod storage;
pub mod tls;

pub use config::Config;
pub use server::{bind, run, Shared};
pub use storage::sqlite::{SqliteOptions, SqliteStore};
