//! `tv-agent`: the daemon on each network TV.
//!
//! At power-on it binds its UDP media socket, opens the TCP control link to the
//! call-proxy server and registers; it then fetches and presents the calls that were
//! cached while the TV was off, and lets the viewer dial, answer, reject and hang up.
//! Voice flows directly between the two TVs as RTP/Opus over UDP.
//!
//! - [`link`]: the control link task (register, heartbeats, reconnect with backoff).
//! - [`agent`]: the agent: power-on sequence, the call state machine (pure), the
//!   missed-call list, and the core task that runs them.
//! - [`media`]: the media engine (audio I/O, Opus, RTP/RTCP, stream routing, jitter
//!   buffer).
//! - [`api`]: the local control API (JSON lines on loopback) for the TV's UI.
//! - [`ui`]: the on-screen remote-control UI (HTTP and server-sent events on loopback).
//! - [`contacts`]: the TV's address book, kept in its data directory.
//! - [`files`]: atomic, size-limited JSON files for what the TV keeps.

pub mod agent;
pub mod api;
pub mod contacts;
pub mod files;
pub mod identity;
pub mod link;
pub mod media;
pub mod ui;

pub use agent::{Agent, AgentConfig, AgentEvent, DialResult};
