//! The agent: the TV's power-on sequence and its call state, driven by the viewer's
//! commands (UI, control API or a scripted mode) and by the control link's events.
//!
//! Power-on, as the documents give it: bind the UDP media socket first, then open the TCP
//! control link and register with the media port. After every registration the cached
//! calls are fetched, presented (each with its caller's current state) and then
//! acknowledged. Power-off closes the control link first (the server records the TV
//! offline), then the media socket.
//!
//! - [`handle`]: [`Agent`], the handle whose methods are the commands.
//! - [`core`]: the task that owns the state and runs the call machine's actions (I/O).
//! - [`call`]: the call state machine, pure: (state, input, time) → actions.
//! - [`missed`]: the missed-call list and when its calls may be acknowledged.
//! - [`presence`]: whom the TV watches and the rules of its presence subscription, pure.
//! - [`events`]: [`AgentEvent`] and the typed word lists its events carry.
//! - [`types`]: configuration, missed call, status, dial result, errors.
//! - [`media_socket`]: binding the UDP media socket.
//! - [`inbox`]: the messages kept on the TV and how waiting ones are taken in.
//! - [`transfer`]: the transfer link that carries messages and their bodies.
//! - [`messenger`]: what the viewer does with messages (open, delete, leave one).

pub mod call;
mod core;
pub mod events;
mod handle;
pub mod inbox;
pub mod media_socket;
pub mod messenger;
pub mod missed;
pub mod presence;
#[cfg(test)]
mod redial_test;
pub mod transfer;
pub mod types;

pub use events::{
    outcomes_js, AgentEvent, CallState, DialFailure, EndOutcome, MissReason, PresenceWord,
};
pub use handle::Agent;
pub use media_socket::bind_media;
pub use missed::MAX_MISSED_KEPT;
pub use types::{
    netstate, rfc3339, AgentConfig, AgentError, DialResult, MissedCall, MissedKeeping,
    PresenceChange, PresenceSettings, PresenceSetup, Status,
};
