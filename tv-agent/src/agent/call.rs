//! The call state machine, with no I/O and no clock of its own: [`CallMachine::handle`]
//! takes the state, one [`Input`] (a viewer's command, a server push, or the result of
//! an action the core ran) and the time, moves to the next state and returns the
//! [`Action`]s for the core ([`super::core`]) to run, in order. Actions that can fail
//! (dialling, starting media, answering) feed their result back as the next input.
//!
//! ```text
//! Idle ──dial─→ (Dialling) ──ringing─→ RingingOut ──peer answered─→ (Connecting) ──media─→ Active
//! Idle ──incoming call──→ RingingIn ──answer─→ (Answering) ──media, answered─→ Active
//! any call ──hang up / reject / ended by server / link down──→ Idle
//! ```
//!
//! The states in brackets last one action of the core; UIs see them as the state before.
//!
//! A dial carries an idempotency key the core picked at random ([`Input::Dial`]). When its
//! reply is lost (the link went down or the reply timed out: the server may have placed
//! the call), the machine waits (`Redialling`) and sends the same dial with the same key
//! again: when the link is registered again, or every [`DIAL_RETRY_INTERVAL_MS`], for at
//! most [`DIAL_RETRY_MS`] after the first send. The server answers a retry with the
//! first dial's outcome, so a lost reply never makes a second call record.

use std::net::SocketAddr;

use shared_proto::{CallId, EndReason, IdempotencyKey, UserId};

use super::events::{AgentEvent, CallState, DialFailure, EndOutcome};
use super::types::{AgentError, DialResult};

/// How long after the first send a dial whose reply was lost is still retried (with its
/// key); after that it fails as unreachable.
pub const DIAL_RETRY_MS: i64 = 30_000;
/// How often a dial whose reply was lost is retried while the link is not back.
pub const DIAL_RETRY_INTERVAL_MS: u64 = 1_000;

/// The call, as far as the state machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// No call.
    Idle,
    /// Our dial request is with the server.
    Dialling {
        /// Who.
        callee: UserId,
        /// The dial's idempotency key (the same for each send of this dial).
        key: IdempotencyKey,
        /// When it was first sent.
        first_ms: i64,
    },
    /// The reply to our dial was lost; the same dial goes again (see the module doc).
    Redialling {
        /// Who.
        callee: UserId,
        /// The dial's idempotency key.
        key: IdempotencyKey,
        /// When it was first sent.
        first_ms: i64,
    },
    /// Our call rings at the callee.
    RingingOut {
        /// The call.
        call_id: CallId,
        /// Who.
        callee: UserId,
        /// The callee's media address.
        callee_media: SocketAddr,
    },
    /// A call rings here.
    RingingIn {
        /// The call.
        call_id: CallId,
        /// Who.
        caller: UserId,
        /// The caller's media address.
        caller_media: SocketAddr,
    },
    /// The viewer answered: media starts, then the server is told.
    Answering {
        /// The call.
        call_id: CallId,
        /// Who.
        caller: UserId,
        /// The caller's media address.
        caller_media: SocketAddr,
    },
    /// The callee answered our call: media starts.
    Connecting {
        /// The call.
        call_id: CallId,
        /// Who.
        callee: UserId,
        /// The callee's media address.
        callee_media: SocketAddr,
    },
    /// Answered: media flows.
    Active {
        /// The call.
        call_id: CallId,
        /// The other TV.
        peer: UserId,
        /// The other TV's media address.
        peer_media: SocketAddr,
        /// This TV's microphone is muted.
        muted: bool,
    },
}

/// The server's answer to a dial, as the state machine needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum DialReply {
    /// Ringing at the callee, whose media address this is.
    Ringing(CallId, SocketAddr),
    /// Anything else: cached, busy, refused, unreachable.
    Other(DialResult),
}

/// What happens to the call.
#[derive(Debug, Clone)]
pub enum Input {
    /// The viewer dials this user; the core picked the dial's (random) key.
    Dial(UserId, IdempotencyKey),
    /// Time to send a dial whose reply was lost again: the link is registered again, or
    /// the retry timer ([`Action::RetryDialIn`]) fired.
    RetryDial,
    /// The server answered our dial.
    Dialled(DialReply),
    /// The viewer answers the ringing call.
    Answer,
    /// Media started (after [`Action::StartMedia`]).
    MediaStarted,
    /// Media could not start.
    MediaFailed(String),
    /// The server's reply to our answer (after [`Action::SendAnswer`]).
    AnswerSent(Result<(), AgentError>),
    /// The viewer rejects the ringing call.
    Reject,
    /// The viewer hangs up (or cancels, or rejects).
    HangUp,
    /// The viewer mutes or unmutes.
    Mute(bool),
    /// The server: someone calls.
    Incoming {
        /// The call.
        call_id: CallId,
        /// Who.
        caller: UserId,
        /// Their media address.
        caller_media: SocketAddr,
    },
    /// The server: our callee answered.
    PeerAnswered(CallId),
    /// The server: the call ended.
    Ended(CallId, EndReason),
    /// The control link went down (the server ends our call too).
    LinkDown,
}

/// Who the server should hear from when a call ends here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tell {
    /// `Reject`; its reply answers the viewer's command.
    Reject,
    /// `HangUp`; its reply answers the viewer's command (a call the server has already
    /// ended counts as hung up).
    HangUp,
}

/// What the core does, in order.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send this event.
    Emit(AgentEvent),
    /// Ask the server to dial; feed back [`Input::Dialled`].
    SendDial {
        /// Who.
        callee: UserId,
        /// The dial's idempotency key.
        key: IdempotencyKey,
    },
    /// Feed back [`Input::RetryDial`] after this many milliseconds (without holding up
    /// anything else).
    RetryDialIn(u64),
    /// Start media with this peer; feed back [`Input::MediaStarted`] or
    /// [`Input::MediaFailed`].
    StartMedia(SocketAddr),
    /// Tell the server we answer; feed back [`Input::AnswerSent`].
    SendAnswer(CallId),
    /// Mute or unmute the running media.
    SetMuted(bool),
    /// End the call here: stop media (if any), tell the server if asked (its reply
    /// answers the pending command), then emit `Ended` with the media's quality.
    EndCall {
        /// The call.
        call_id: CallId,
        /// The other TV.
        peer: UserId,
        /// How it ended.
        outcome: EndOutcome,
        /// The request to send first.
        tell: Option<Tell>,
    },
    /// Reject a second incoming call (one call at a time), without waiting.
    RejectOther(CallId),
    /// Answer the pending dial.
    ReplyDial(DialResult),
    /// Answer the pending command.
    Reply(Result<(), AgentError>),
}

/// The call state and when it began.
#[derive(Debug, Clone)]
pub struct CallMachine {
    /// This TV (to tell "we hung up" from "the peer hung up").
    me: UserId,
    /// The call.
    call: Call,
    /// When the state UIs see began, Unix ms (a UI opened mid-call shows the duration).
    since_ms: i64,
}

impl CallMachine {
    /// An idle machine for user `me`, at `now_ms`.
    pub fn new(me: UserId, now_ms: i64) -> Self {
        CallMachine {
            me,
            call: Call::Idle,
            since_ms: now_ms,
        }
    }

    /// The call.
    pub fn call(&self) -> Call {
        self.call
    }

    /// When the current state began, Unix ms.
    pub fn since_ms(&self) -> i64 {
        self.since_ms
    }

    /// The state UIs see, the call and the other TV.
    pub fn view(&self) -> (CallState, Option<CallId>, Option<UserId>) {
        match self.call {
            Call::Idle | Call::Dialling { .. } | Call::Redialling { .. } => {
                (CallState::Idle, None, None)
            }
            Call::RingingOut {
                call_id, callee, ..
            }
            | Call::Connecting {
                call_id, callee, ..
            } => (CallState::RingingOut, Some(call_id), Some(callee)),
            Call::RingingIn {
                call_id, caller, ..
            }
            | Call::Answering {
                call_id, caller, ..
            } => (CallState::RingingIn, Some(call_id), Some(caller)),
            Call::Active { call_id, peer, .. } => (CallState::InCall, Some(call_id), Some(peer)),
        }
    }

    /// Muted in the current call.
    pub fn muted(&self) -> bool {
        matches!(self.call, Call::Active { muted: true, .. })
    }

    fn set(&mut self, call: Call, now_ms: i64) {
        self.call = call;
        self.since_ms = now_ms;
    }

    /// Ends the current call (if any) here, telling the server as `tell` says.
    fn end(&mut self, outcome: EndOutcome, tell: Option<Tell>, now_ms: i64) -> Vec<Action> {
        let (_, call_id, peer) = self.view();
        self.set(Call::Idle, now_ms);
        match (call_id, peer) {
            (Some(call_id), Some(peer)) => vec![Action::EndCall {
                call_id,
                peer,
                outcome,
                tell,
            }],
            _ => Vec::new(),
        }
    }

    /// One step: the next state and what to do.
    pub fn handle(&mut self, input: Input, now_ms: i64) -> Vec<Action> {
        use Action::{Emit, Reply, ReplyDial};
        match (self.call, input) {
            (Call::Idle, Input::Dial(callee, key)) => {
                self.call = Call::Dialling {
                    callee,
                    key,
                    first_ms: now_ms,
                };
                vec![Action::SendDial { callee, key }]
            }
            (_, Input::Dial(..)) => vec![ReplyDial(DialResult::AlreadyInCall)],
            // No reply (link down, or none in time): the server may have placed the call.
            (
                Call::Dialling {
                    callee,
                    key,
                    first_ms,
                },
                Input::Dialled(DialReply::Other(DialResult::Unreachable(_))),
            ) if now_ms.saturating_sub(first_ms) < DIAL_RETRY_MS => {
                self.call = Call::Redialling {
                    callee,
                    key,
                    first_ms,
                };
                vec![Action::RetryDialIn(DIAL_RETRY_INTERVAL_MS)]
            }
            (
                Call::Redialling {
                    callee,
                    key,
                    first_ms,
                },
                Input::RetryDial,
            ) => {
                self.call = Call::Dialling {
                    callee,
                    key,
                    first_ms,
                };
                vec![Action::SendDial { callee, key }]
            }
            // The viewer gives up on a dial being retried.
            (Call::Redialling { callee, .. }, Input::HangUp) => {
                self.call = Call::Idle;
                let r = DialResult::Unreachable(
                    "cancelled while waiting to retry a dial whose reply was lost".into(),
                );
                vec![
                    Emit(AgentEvent::DialFailed {
                        callee,
                        outcome: DialFailure::Unreachable,
                        message: "dial cancelled".into(),
                    }),
                    ReplyDial(r),
                    Reply(Ok(())),
                ]
            }
            // The link coming and going does not end a dial waiting to be retried.
            (Call::Dialling { .. } | Call::Redialling { .. }, Input::LinkDown) => Vec::new(),
            (Call::Dialling { callee, .. }, Input::Dialled(reply)) => {
                self.call = Call::Idle;
                match reply {
                    DialReply::Ringing(call_id, callee_media) => {
                        self.set(
                            Call::RingingOut {
                                call_id,
                                callee,
                                callee_media,
                            },
                            now_ms,
                        );
                        vec![
                            Emit(AgentEvent::Ringing { call_id, callee }),
                            ReplyDial(DialResult::Ringing(call_id)),
                        ]
                    }
                    DialReply::Other(r @ DialResult::Cached(call_id)) => {
                        vec![Emit(AgentEvent::Cached { call_id, callee }), ReplyDial(r)]
                    }
                    DialReply::Other(r) => {
                        let message = match &r {
                            DialResult::Busy(_) => format!("{callee} is in another call"),
                            DialResult::UnknownUser => format!("{callee} is not a known TV"),
                            DialResult::StorageFull => {
                                format!("the server's storage is full: {callee} was not called")
                            }
                            DialResult::Unreachable(m) | DialResult::Failed(m) => m.clone(),
                            _ => String::new(),
                        };
                        vec![
                            Emit(AgentEvent::DialFailed {
                                callee,
                                outcome: r.failure().unwrap_or(DialFailure::Failed),
                                message,
                            }),
                            ReplyDial(r),
                        ]
                    }
                }
            }
            (
                Call::RingingIn {
                    call_id,
                    caller,
                    caller_media,
                },
                Input::Answer,
            ) => {
                // Media first, so the first words of the caller are not lost.
                self.call = Call::Answering {
                    call_id,
                    caller,
                    caller_media,
                };
                vec![Action::StartMedia(caller_media)]
            }
            (Call::Answering { call_id, .. }, Input::MediaStarted) => {
                vec![Action::SendAnswer(call_id)]
            }
            (
                Call::Answering {
                    call_id,
                    caller,
                    caller_media,
                },
                Input::MediaFailed(e),
            ) => {
                // Still ringing: the viewer may try again or reject.
                self.call = Call::RingingIn {
                    call_id,
                    caller,
                    caller_media,
                };
                vec![Reply(Err(AgentError::Media(e)))]
            }
            (
                Call::Answering {
                    call_id,
                    caller,
                    caller_media,
                },
                Input::AnswerSent(r),
            ) => match r {
                Ok(()) => {
                    self.set(
                        Call::Active {
                            call_id,
                            peer: caller,
                            peer_media: caller_media,
                            muted: false,
                        },
                        now_ms,
                    );
                    vec![
                        Emit(AgentEvent::Answered {
                            call_id,
                            peer: caller,
                            peer_media: caller_media.to_string(),
                        }),
                        Reply(Ok(())),
                    ]
                }
                Err(e) => {
                    let mut actions = self.end(EndOutcome::AnswerFailed, None, now_ms);
                    actions.push(Reply(Err(e)));
                    actions
                }
            },
            (Call::RingingIn { .. }, Input::Reject | Input::HangUp) => {
                self.end(EndOutcome::Rejected, Some(Tell::Reject), now_ms)
            }
            (Call::RingingOut { .. } | Call::Active { .. }, Input::HangUp) => {
                self.end(EndOutcome::HungUp, Some(Tell::HangUp), now_ms)
            }
            (_, Input::Reject | Input::HangUp | Input::Answer) => {
                vec![Reply(Err(AgentError::NoCall))]
            }
            (
                Call::Active {
                    call_id,
                    peer,
                    peer_media,
                    ..
                },
                Input::Mute(muted),
            ) => {
                self.call = Call::Active {
                    call_id,
                    peer,
                    peer_media,
                    muted,
                };
                vec![
                    Action::SetMuted(muted),
                    Emit(AgentEvent::Muted { call_id, muted }),
                    Reply(Ok(())),
                ]
            }
            (_, Input::Mute(_)) => vec![Reply(Err(AgentError::NoCall))],
            (
                Call::Idle,
                Input::Incoming {
                    call_id,
                    caller,
                    caller_media,
                },
            ) => {
                self.set(
                    Call::RingingIn {
                        call_id,
                        caller,
                        caller_media,
                    },
                    now_ms,
                );
                vec![Emit(AgentEvent::Incoming { call_id, caller })]
            }
            // One call at a time.
            (_, Input::Incoming { call_id, .. }) => vec![Action::RejectOther(call_id)],
            (
                Call::RingingOut {
                    call_id,
                    callee,
                    callee_media,
                },
                Input::PeerAnswered(id),
            ) if id == call_id => {
                self.call = Call::Connecting {
                    call_id,
                    callee,
                    callee_media,
                };
                vec![Action::StartMedia(callee_media)]
            }
            (
                Call::Connecting {
                    call_id,
                    callee,
                    callee_media,
                },
                Input::MediaStarted,
            ) => {
                self.set(
                    Call::Active {
                        call_id,
                        peer: callee,
                        peer_media: callee_media,
                        muted: false,
                    },
                    now_ms,
                );
                vec![Emit(AgentEvent::Answered {
                    call_id,
                    peer: callee,
                    peer_media: callee_media.to_string(),
                })]
            }
            (Call::Connecting { .. }, Input::MediaFailed(e)) => {
                tracing::error!(error = %e, "cannot start media; hanging up");
                self.end(EndOutcome::HungUp, Some(Tell::HangUp), now_ms)
            }
            (_, Input::Ended(id, reason)) if self.view().1 == Some(id) => {
                let outcome = match reason {
                    EndReason::HungUp { by } if by == self.me => EndOutcome::HungUp,
                    EndReason::HungUp { .. } => EndOutcome::HungUpByPeer,
                    EndReason::NoAnswer => EndOutcome::NoAnswer,
                    EndReason::Rejected => EndOutcome::Rejected,
                    EndReason::PeerLost => EndOutcome::PeerLost,
                    EndReason::ServerShutdown => EndOutcome::ServerShutdown,
                };
                self.end(outcome, None, now_ms)
            }
            (_, Input::LinkDown) => self.end(EndOutcome::LinkLost, None, now_ms),
            // Stale: a push about another call, or a result the state has moved past.
            (
                _,
                Input::Ended(..)
                | Input::PeerAnswered(_)
                | Input::Dialled(_)
                | Input::RetryDial
                | Input::MediaStarted
                | Input::MediaFailed(_)
                | Input::AnswerSent(_),
            ) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Compares by their debug text (errors carry no equality).
    macro_rules! eq {
        ($a:expr, $b:expr $(,)?) => {
            assert_eq!(format!("{:?}", $a), format!("{:?}", $b))
        };
        ($a:expr, $b:expr, $($msg:tt)+) => {
            assert_eq!(format!("{:?}", $a), format!("{:?}", $b), $($msg)+)
        };
    }

    use super::*;

    const ME: UserId = 1001;
    const PEER: UserId = 2002;

    fn media() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 7], 5004))
    }

    fn ringing_in(m: &mut CallMachine) {
        let a = m.handle(
            Input::Incoming {
                call_id: 5,
                caller: PEER,
                caller_media: media(),
            },
            10,
        );
        eq!(
            a,
            vec![Action::Emit(AgentEvent::Incoming {
                call_id: 5,
                caller: PEER
            })]
        );
    }

    #[test]
    fn dial_rings_then_the_peer_answers_then_media_flows() {
        let mut m = CallMachine::new(ME, 0);
        eq!(
            m.handle(Input::Dial(PEER, 1), 1),
            vec![Action::SendDial {
                callee: PEER,
                key: 1
            }]
        );
        eq!(
            m.view().0,
            CallState::Idle,
            "a dial in flight shows as idle"
        );
        let a = m.handle(Input::Dialled(DialReply::Ringing(9, media())), 2);
        eq!(
            a,
            vec![
                Action::Emit(AgentEvent::Ringing {
                    call_id: 9,
                    callee: PEER
                }),
                Action::ReplyDial(DialResult::Ringing(9)),
            ]
        );
        eq!(m.view(), (CallState::RingingOut, Some(9), Some(PEER)));
        eq!(m.since_ms(), 2);
        // A push about another call changes nothing.
        assert!(m.handle(Input::PeerAnswered(8), 3).is_empty());
        eq!(
            m.handle(Input::PeerAnswered(9), 4),
            vec![Action::StartMedia(media())]
        );
        let a = m.handle(Input::MediaStarted, 5);
        eq!(
            a,
            vec![Action::Emit(AgentEvent::Answered {
                call_id: 9,
                peer: PEER,
                peer_media: media().to_string()
            })]
        );
        eq!(m.view().0, CallState::InCall);
        eq!(m.since_ms(), 5);
        let a = m.handle(Input::Ended(9, EndReason::HungUp { by: PEER }), 6);
        eq!(
            a,
            vec![Action::EndCall {
                call_id: 9,
                peer: PEER,
                outcome: EndOutcome::HungUpByPeer,
                tell: None
            }]
        );
        eq!(m.call(), Call::Idle);
    }

    #[test]
    fn a_second_dial_while_in_a_call_is_refused_without_an_event() {
        let mut m = CallMachine::new(ME, 0);
        ringing_in(&mut m);
        eq!(
            m.handle(Input::Dial(3003, 2), 1),
            vec![Action::ReplyDial(DialResult::AlreadyInCall)]
        );
    }

    #[test]
    fn failed_dials_are_reported_with_their_outcome_word() {
        for (result, word, message) in [
            (
                DialResult::Busy(4),
                DialFailure::Busy,
                "2002 is in another call",
            ),
            (
                DialResult::UnknownUser,
                DialFailure::UnknownUser,
                "2002 is not a known TV",
            ),
            (
                DialResult::Unreachable("down".into()),
                DialFailure::Unreachable,
                "down",
            ),
            (
                DialResult::StorageFull,
                DialFailure::StorageFull,
                "the server's storage is full: 2002 was not called",
            ),
            (DialResult::Failed("odd".into()), DialFailure::Failed, "odd"),
        ] {
            let mut m = CallMachine::new(ME, 0);
            m.handle(Input::Dial(PEER, 1), 0);
            // (An unreachable dial fails once its retry window is over.)
            let a = m.handle(
                Input::Dialled(DialReply::Other(result.clone())),
                DIAL_RETRY_MS,
            );
            eq!(
                a,
                vec![
                    Action::Emit(AgentEvent::DialFailed {
                        callee: PEER,
                        outcome: word,
                        message: message.into()
                    }),
                    Action::ReplyDial(result)
                ]
            );
            eq!(m.call(), Call::Idle);
        }
        let mut m = CallMachine::new(ME, 0);
        m.handle(Input::Dial(PEER, 1), 0);
        let a = m.handle(Input::Dialled(DialReply::Other(DialResult::Cached(3))), 1);
        eq!(
            a,
            vec![
                Action::Emit(AgentEvent::Cached {
                    call_id: 3,
                    callee: PEER
                }),
                Action::ReplyDial(DialResult::Cached(3))
            ]
        );
        eq!(m.call(), Call::Idle);
    }

    #[test]
    fn answering_starts_media_before_telling_the_server() {
        let mut m = CallMachine::new(ME, 0);
        ringing_in(&mut m);
        eq!(
            m.handle(Input::Answer, 11),
            vec![Action::StartMedia(media())]
        );
        eq!(m.view().0, CallState::RingingIn);
        eq!(
            m.handle(Input::MediaStarted, 12),
            vec![Action::SendAnswer(5)]
        );
        let a = m.handle(Input::AnswerSent(Ok(())), 13);
        eq!(a.len(), 2);
        assert!(matches!(a[0], Action::Emit(AgentEvent::Answered { .. })));
        assert!(matches!(a[1], Action::Reply(Ok(()))));
        eq!(m.view(), (CallState::InCall, Some(5), Some(PEER)));
        // Mute, then hang up: the server is told, the call ends as hung up.
        let a = m.handle(Input::Mute(true), 14);
        eq!(a[0], Action::SetMuted(true));
        assert!(m.muted());
        eq!(
            m.handle(Input::HangUp, 15),
            vec![Action::EndCall {
                call_id: 5,
                peer: PEER,
                outcome: EndOutcome::HungUp,
                tell: Some(Tell::HangUp)
            }]
        );
        assert!(!m.muted());
        eq!(m.since_ms(), 15);
    }

    #[test]
    fn media_that_cannot_start_leaves_the_call_ringing() {
        let mut m = CallMachine::new(ME, 0);
        ringing_in(&mut m);
        m.handle(Input::Answer, 11);
        let a = m.handle(Input::MediaFailed("no sound card".into()), 12);
        assert!(matches!(&a[..], [Action::Reply(Err(AgentError::Media(_)))]));
        eq!(m.view().0, CallState::RingingIn);
        eq!(m.since_ms(), 10, "still the same ringing");
    }

    #[test]
    fn a_refused_answer_ends_the_call_as_answer_failed() {
        let mut m = CallMachine::new(ME, 0);
        ringing_in(&mut m);
        m.handle(Input::Answer, 11);
        m.handle(Input::MediaStarted, 12);
        let a = m.handle(Input::AnswerSent(Err(AgentError::NoCall)), 13);
        assert!(matches!(
            &a[..],
            [
                Action::EndCall {
                    outcome: EndOutcome::AnswerFailed,
                    tell: None,
                    ..
                },
                Action::Reply(Err(AgentError::NoCall))
            ]
        ));
        eq!(m.call(), Call::Idle);
    }

    #[test]
    fn hang_up_while_ringing_here_rejects() {
        let mut m = CallMachine::new(ME, 0);
        ringing_in(&mut m);
        eq!(
            m.handle(Input::HangUp, 11),
            vec![Action::EndCall {
                call_id: 5,
                peer: PEER,
                outcome: EndOutcome::Rejected,
                tell: Some(Tell::Reject)
            }]
        );
        assert!(matches!(
            &m.handle(Input::Reject, 12)[..],
            [Action::Reply(Err(AgentError::NoCall))]
        ));
    }

    #[test]
    fn one_call_at_a_time_and_the_link_going_down_ends_the_call() {
        let mut m = CallMachine::new(ME, 0);
        ringing_in(&mut m);
        eq!(
            m.handle(
                Input::Incoming {
                    call_id: 6,
                    caller: 3003,
                    caller_media: media()
                },
                11
            ),
            vec![Action::RejectOther(6)]
        );
        eq!(m.view().1, Some(5));
        assert!(matches!(
            &m.handle(Input::LinkDown, 12)[..],
            [Action::EndCall {
                call_id: 5,
                outcome: EndOutcome::LinkLost,
                tell: None,
                ..
            }]
        ));
        assert!(m.handle(Input::LinkDown, 13).is_empty(), "no call, nothing");
    }

    #[test]
    fn server_end_reasons_map_to_outcomes() {
        for (reason, outcome) in [
            (EndReason::HungUp { by: ME }, EndOutcome::HungUp),
            (EndReason::HungUp { by: PEER }, EndOutcome::HungUpByPeer),
            (EndReason::NoAnswer, EndOutcome::NoAnswer),
            (EndReason::Rejected, EndOutcome::Rejected),
            (EndReason::PeerLost, EndOutcome::PeerLost),
            (EndReason::ServerShutdown, EndOutcome::ServerShutdown),
        ] {
            let mut m = CallMachine::new(ME, 0);
            ringing_in(&mut m);
            assert!(m.handle(Input::Ended(4, reason), 1).is_empty());
            eq!(
                m.handle(Input::Ended(5, reason), 2),
                vec![Action::EndCall {
                    call_id: 5,
                    peer: PEER,
                    outcome,
                    tell: None
                }]
            );
        }
    }

    #[test]
    fn media_failing_after_the_peer_answered_hangs_up() {
        let mut m = CallMachine::new(ME, 0);
        m.handle(Input::Dial(PEER, 1), 0);
        m.handle(Input::Dialled(DialReply::Ringing(9, media())), 1);
        m.handle(Input::PeerAnswered(9), 2);
        eq!(
            m.handle(Input::MediaFailed("x".into()), 3),
            vec![Action::EndCall {
                call_id: 9,
                peer: PEER,
                outcome: EndOutcome::HungUp,
                tell: Some(Tell::HangUp)
            }]
        );
    }

    #[test]
    fn a_dial_whose_reply_is_lost_goes_again_with_its_key_until_the_window_ends() {
        let mut m = CallMachine::new(ME, 0);
        let lost = || Input::Dialled(DialReply::Other(DialResult::Unreachable("gone".into())));
        eq!(
            m.handle(Input::Dial(PEER, 77), 100),
            vec![Action::SendDial {
                callee: PEER,
                key: 77
            }]
        );
        // Lost: wait, nothing told to the viewer yet; the link coming and going (and a
        // stale push) leave the dial waiting.
        eq!(
            m.handle(lost(), 200),
            vec![Action::RetryDialIn(DIAL_RETRY_INTERVAL_MS)]
        );
        assert!(m.handle(Input::LinkDown, 300).is_empty());
        assert!(m.handle(Input::PeerAnswered(4), 300).is_empty());
        eq!(m.view(), (CallState::Idle, None::<CallId>, None::<UserId>));
        eq!(
            m.handle(Input::Dial(3003, 78), 350),
            vec![Action::ReplyDial(DialResult::AlreadyInCall)]
        );
        // The same dial, same key, goes again.
        eq!(
            m.handle(Input::RetryDial, 400),
            vec![Action::SendDial {
                callee: PEER,
                key: 77
            }]
        );
        // A retry timer firing while the dial is out changes nothing.
        assert!(m.handle(Input::RetryDial, 450).is_empty());
        eq!(
            m.handle(lost(), 500),
            vec![Action::RetryDialIn(DIAL_RETRY_INTERVAL_MS)]
        );
        m.handle(Input::RetryDial, 600);
        // The first outcome comes back: an ordinary ringing call.
        let a = m.handle(Input::Dialled(DialReply::Ringing(9, media())), 700);
        eq!(
            a,
            vec![
                Action::Emit(AgentEvent::Ringing {
                    call_id: 9,
                    callee: PEER
                }),
                Action::ReplyDial(DialResult::Ringing(9)),
            ]
        );
        // Past the window a lost reply fails the dial as unreachable.
        let mut m = CallMachine::new(ME, 0);
        m.handle(Input::Dial(PEER, 5), 1_000);
        m.handle(lost(), 2_000);
        m.handle(Input::RetryDial, 3_000);
        let a = m.handle(lost(), 1_000 + DIAL_RETRY_MS);
        eq!(
            a,
            vec![
                Action::Emit(AgentEvent::DialFailed {
                    callee: PEER,
                    outcome: DialFailure::Unreachable,
                    message: "gone".into()
                }),
                Action::ReplyDial(DialResult::Unreachable("gone".into())),
            ]
        );
        eq!(m.call(), Call::Idle);
    }

    #[test]
    fn hanging_up_a_dial_waiting_to_be_retried_cancels_it() {
        let mut m = CallMachine::new(ME, 0);
        m.handle(Input::Dial(PEER, 1), 0);
        m.handle(
            Input::Dialled(DialReply::Other(DialResult::Unreachable("slow".into()))),
            1,
        );
        eq!(
            m.handle(Input::HangUp, 2),
            vec![
                Action::Emit(AgentEvent::DialFailed {
                    callee: PEER,
                    outcome: DialFailure::Unreachable,
                    message: "dial cancelled".into()
                }),
                Action::ReplyDial(DialResult::Unreachable(
                    "cancelled while waiting to retry a dial whose reply was lost".into()
                )),
                Action::Reply(Ok(())),
            ]
        );
        eq!(m.call(), Call::Idle);
        // Its timer firing later sends nothing.
        assert!(m.handle(Input::RetryDial, 1_000).is_empty());
    }
}
