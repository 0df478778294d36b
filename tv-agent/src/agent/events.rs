//! What the agent reports: [`AgentEvent`], in order, to the UI, the control API and the
//! scripted modes, and the one typed list of the words its events carry (call-end
//! outcomes, dial failures, missed-call reasons, call states, presence states).
//!
//! Each word list is an enum declared once by `words!`: the same declaration gives the
//! serde name (so the JSON output is the snake_case word), [`as_str`](EndOutcome::as_str),
//! the `ALL` list, and comparisons with `&str`. The on-screen page reads the same lists from
//! [`outcomes_js`] (served as `/outcomes.js`), so no word is written twice.

use serde::{Deserialize, Serialize};
use shared_proto::{CallId, UserId};

use super::types::MissedCall;
use crate::media::CallQuality;

/// Declares a word enum: each variant with its wire word, serialised as that word.
macro_rules! words {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $word:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $word)] $variant,)+
        }

        impl $name {
            /// Every word, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The word as it appears in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

words! {
    /// How a call ended (`ended` events).
    EndOutcome {
        /// This TV hung up (or cancelled its ringing call).
        HungUp => "hung_up",
        /// The other TV hung up.
        HungUpByPeer => "hung_up_by_peer",
        /// Nobody answered in time.
        NoAnswer => "no_answer",
        /// The callee rejected the call (or this TV rejected it).
        Rejected => "rejected",
        /// The other TV's link went down.
        PeerLost => "peer_lost",
        /// The server shut down.
        ServerShutdown => "server_shutdown",
        /// This TV's control link went down.
        LinkLost => "link_lost",
        /// This TV could not answer (the server refused or did not reply).
        AnswerFailed => "answer_failed",
    }
}

words! {
    /// Why a dial did not ring (`dial_failed` events).
    DialFailure {
        /// The callee is in another call.
        Busy => "busy",
        /// No such user.
        UnknownUser => "unknown_user",
        /// No connection to the server.
        Unreachable => "unreachable",
        /// This TV is already in a call.
        AlreadyInCall => "already_in_call",
        /// The server's storage is full: the call was neither placed nor recorded.
        StorageFull => "storage_full",
        /// Another error from the server.
        Failed => "failed",
    }
}

words! {
    /// Why a call was missed (a missed call's `reason`).
    MissReason {
        /// This TV was off.
        Offline => "offline",
        /// It rang and nobody answered.
        NoAnswer => "no_answer",
        /// This TV was in another call.
        Busy => "busy",
    }
}

words! {
    /// The call state shown to UIs (`status.call_state`).
    CallState {
        /// No call.
        Idle => "idle",
        /// Our call rings at the callee.
        RingingOut => "ringing_out",
        /// A call rings here.
        RingingIn => "ringing_in",
        /// Answered: media flows.
        InCall => "in_call",
    }
}

words! {
    /// A watched user's presence (`presence` events, `tv-agent watch`).
    PresenceWord {
        /// Switched on and free.
        Online => "online",
        /// In a call, or in "do not disturb".
        Busy => "busy",
        /// Switched off.
        Offline => "offline",
        /// Switched off, but the owner is reachable on their phone (SMS).
        Mobile => "mobile",
        /// This user does not let this TV see their state.
        NotAllowed => "not_allowed",
        /// No such user.
        Unknown => "unknown",
    }
}

impl From<shared_proto::PresenceState> for PresenceWord {
    /// A state this agent does not know (a newer server's) shows as offline, as the
    /// protocol says.
    fn from(s: shared_proto::PresenceState) -> Self {
        use shared_proto::PresenceState as P;
        match s {
            P::ONLINE => PresenceWord::Online,
            P::BUSY => PresenceWord::Busy,
            P::MOBILE => PresenceWord::Mobile,
            P::NOT_ALLOWED => PresenceWord::NotAllowed,
            P::UNKNOWN => PresenceWord::Unknown,
            _ => PresenceWord::Offline,
        }
    }
}

impl From<shared_proto::MissedReason> for MissReason {
    fn from(r: shared_proto::MissedReason) -> Self {
        match r {
            shared_proto::MissedReason::Offline => MissReason::Offline,
            shared_proto::MissedReason::NoAnswer => MissReason::NoAnswer,
            shared_proto::MissedReason::Busy => MissReason::Busy,
        }
    }
}

/// Everything the agent reports, in order, to the UI, the control API and scripted modes.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// Registered with the server (at power-on and after every reconnect).
    Registered {
        /// This TV.
        user: UserId,
        /// The IP the server sees.
        observed_ip: String,
        /// The media address registered.
        media_port: u16,
    },
    /// The control link is down; retrying.
    LinkDown {
        /// Why.
        reason: String,
        /// Milliseconds until the next attempt.
        retry_in_ms: u64,
        /// The distribution service assigned no node: this account used its traffic
        /// allowance for the period (the screen says so rather than "network down").
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allowance_exhausted: bool,
    },
    /// Messages taken into the TV's inbox (kept in `--data-dir/messages`), newest first.
    Messages {
        /// The messages new to the TV.
        messages: Vec<super::inbox::KeptMessage>,
    },
    /// Calls cached while this TV could not take them, each with its caller's state now.
    CachedCalls {
        /// Oldest first.
        calls: Vec<MissedCall>,
    },
    /// Someone is calling: ring.
    Incoming {
        /// The call.
        call_id: CallId,
        /// Who.
        caller: UserId,
    },
    /// Our call is ringing at the callee.
    Ringing {
        /// The call.
        call_id: CallId,
        /// Who.
        callee: UserId,
    },
    /// Our call's callee is off: cached, they will see it when their TV is switched on.
    Cached {
        /// The call.
        call_id: CallId,
        /// Who.
        callee: UserId,
    },
    /// A dial did not ring.
    DialFailed {
        /// Who was dialled.
        callee: UserId,
        /// Why.
        outcome: DialFailure,
        /// Detail for people.
        message: String,
    },
    /// Answered: media flows between the TVs.
    Answered {
        /// The call.
        call_id: CallId,
        /// The other TV.
        peer: UserId,
        /// The other TV's media address.
        peer_media: String,
    },
    /// The call is connected but its media cannot reach the other TV: ICE found no path
    /// (a network that blocks UDP, no relay), or the path went away mid-call. Shown to
    /// the viewer instead of silence; the call goes on until someone hangs up.
    NoMedia {
        /// The call.
        call_id: CallId,
        /// For people.
        message: String,
    },
    /// This TV's microphone was muted or unmuted.
    Muted {
        /// The call.
        call_id: CallId,
        /// Muted now.
        muted: bool,
    },
    /// The call is over.
    Ended {
        /// The call.
        call_id: CallId,
        /// The other TV.
        peer: UserId,
        /// How it ended.
        outcome: EndOutcome,
        /// Media quality, if media flowed.
        quality: Option<CallQuality>,
    },
    /// A watched user's state, pushed by the server (or, from a server without presence,
    /// asked once at registration).
    Presence {
        /// Who.
        user: UserId,
        /// Their state now.
        state: PresenceWord,
        /// The notification's sequence number in its subscription (a subscription's full
        /// state carries the sequence number it starts from).
        seq: u64,
        /// Part of a subscription's fresh full state rather than a change.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        full: bool,
    },
    /// The server gave up on a notification (not acknowledged in time, or refused) and
    /// ended the subscription; the agent subscribes again at once.
    PresenceLost {
        /// Why, from the server.
        reason: String,
    },
    /// The viewer's presence settings changed.
    PresenceSettings {
        /// "Do not disturb": shown as busy, calls cached as missed instead of ringing.
        do_not_disturb: bool,
        /// "Hide my state": nobody may watch this TV.
        hidden: bool,
    },
    /// The viewer cleared the missed-call list.
    MissedCleared,
    /// The agent powered off (signal, UI or API command); nothing follows.
    PoweredOff,
}

/// The word lists as a script for the on-screen page (`/outcomes.js`): it defines
/// `OUTCOMES` with one `{KEY: "word"}` object per list, so the page names words through
/// it (`OUTCOMES.end.HUNG_UP`) and never spells them itself.
pub fn outcomes_js() -> String {
    fn list<T: Copy>(all: &[T], word: impl Fn(T) -> &'static str) -> String {
        let fields: Vec<String> = all
            .iter()
            .map(|&w| format!("{}: \"{}\"", word(w).to_ascii_uppercase(), word(w)))
            .collect();
        format!("{{ {} }}", fields.join(", "))
    }
    format!(
        "// Generated by tv-agent from its typed word lists (src/agent/events.rs): do not edit.\n\
         \"use strict\";\n\
         var OUTCOMES = Object.freeze({{\n  \
         end: Object.freeze({}),\n  \
         dial_failed: Object.freeze({}),\n  \
         missed: Object.freeze({}),\n  \
         call_state: Object.freeze({}),\n  \
         presence: Object.freeze({}),\n\
         }});\n\
         if (typeof module !== \"undefined\") module.exports = OUTCOMES;\n",
        list(EndOutcome::ALL, EndOutcome::as_str),
        list(DialFailure::ALL, DialFailure::as_str),
        list(MissReason::ALL, MissReason::as_str),
        list(CallState::ALL, CallState::as_str),
        list(PresenceWord::ALL, PresenceWord::as_str),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_serialise_as_their_snake_case_word() {
        for w in EndOutcome::ALL {
            assert_eq!(
                serde_json::to_value(w).unwrap(),
                serde_json::json!(w.as_str())
            );
        }
        for w in DialFailure::ALL {
            assert_eq!(
                serde_json::to_value(w).unwrap(),
                serde_json::json!(w.as_str())
            );
        }
        for w in MissReason::ALL {
            let back: MissReason = serde_json::from_value(serde_json::json!(w.as_str())).unwrap();
            assert_eq!(back, *w);
        }
        assert_eq!(CallState::RingingOut.as_str(), "ringing_out");
        assert_eq!(EndOutcome::HungUpByPeer, "hung_up_by_peer");
    }

    #[test]
    fn events_are_byte_identical_to_the_documented_json() {
        let ended = AgentEvent::Ended {
            call_id: 7,
            peer: 2002,
            outcome: EndOutcome::HungUpByPeer,
            quality: None,
        };
        assert_eq!(
            serde_json::to_string(&ended).unwrap(),
            r#"{"event":"ended","call_id":7,"peer":2002,"outcome":"hung_up_by_peer","quality":null}"#
        );
        let failed = AgentEvent::DialFailed {
            callee: 9,
            outcome: DialFailure::UnknownUser,
            message: "9 is not a known TV".into(),
        };
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"event":"dial_failed","callee":9,"outcome":"unknown_user","message":"9 is not a known TV"}"#
        );
    }

    /// `assets/outcomes.js` is the generated script, checked in for the page's node tests
    /// (`node --test tv-agent/assets/tests/`); the UI serves the generated one.
    #[test]
    fn the_checked_in_outcomes_js_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/outcomes.js");
        if std::env::var_os("UPDATE_OUTCOMES_JS").is_some() {
            std::fs::write(path, outcomes_js()).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(path).unwrap_or_default(),
            outcomes_js(),
            "tv-agent/assets/outcomes.js is stale: \
             UPDATE_OUTCOMES_JS=1 cargo test -p tv-agent --lib outcomes_js"
        );
    }

    #[test]
    fn the_page_script_lists_every_word() {
        let js = outcomes_js();
        for w in EndOutcome::ALL {
            assert!(js.contains(&format!("\"{}\"", w.as_str())), "{w}");
        }
        assert!(js.contains("ANSWER_FAILED: \"answer_failed\""));
        assert!(js.contains("IN_CALL: \"in_call\""));
        assert!(js.contains("UNKNOWN_USER: \"unknown_user\""));
    }
}
