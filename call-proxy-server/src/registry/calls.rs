//! The live-call state machine: `Recording → Ringing → Active`, ended by a hang-up, a
//! reject, the caller cancelling, the ring timeout, a party's session being lost, or
//! server shutdown.
//!
//! Pure logic, like `tv-agent/src/media/jitter.rs`: [`LiveCall::step`] maps (the call, an
//! [`Input`]) to a [`Step`] (the next state or the end, and the events to push to each
//! party), or refuses the input. No I/O, no locks, no clock: an input that needs a time
//! (the answer) carries it. The registry façade (`registry/mod.rs`) applies steps under
//! its lock, pushes the events and keeps the sessions' call slots and the ring timers in
//! step; the handlers write the resulting [`Ended`] to the database.
//!
//! Each side's [`MediaOffer`] (its SRTP sending key, SDES style, and its ICE credentials
//! and candidates) rides along as data: the caller's is kept with the live call
//! ([`LiveCall::caller_offer`]) and goes to the callee in the ring; the callee's comes in
//! with its answer ([`Input::Answer`]) and goes to the caller. Offers live only here, in
//! memory, and go when the call is forgotten; neither `SrtpKey`'s nor `IceParams`' `Debug`
//! shows a key or password, so neither does this module's.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shared_proto::{CallId, EndReason, Event, IceParams, SrtpKey, UnixMillis, UserId};

use crate::storage::Outcome;

/// What one side of a call offers for its media, relayed to the other side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaOffer {
    /// Its SRTP sending key (`None`: plain RTP, an older agent).
    pub srtp: Option<SrtpKey>,
    /// Its ICE credentials and candidates (`None`: an agent without ICE; media goes to
    /// the address the server saw). Absent in a message from a node built before ICE.
    #[serde(default)]
    pub ice: Option<Box<IceParams>>,
}

/// Which side of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    /// The TV that dialled.
    Caller,
    /// The TV that was dialled.
    Callee,
}

/// Where a live call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Its record is being written; nobody has been told yet, so to the parties the call
    /// does not exist. A party that disconnects now is only flagged, and the dial
    /// finishes the call once the record is written.
    Recording {
        /// The caller's session went away meanwhile.
        caller_gone: bool,
        /// The callee's session went away meanwhile.
        callee_gone: bool,
    },
    /// The callee's TV is ringing (a ring timer runs).
    Ringing,
    /// Answered; media flows between the TVs.
    Active {
        /// When the callee answered.
        answered_at_ms: UnixMillis,
    },
}

/// Something that happens to a live call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The call's record is written: ring the callee, unless a party left meanwhile.
    Recorded {
        /// Whether the callee's session that the call was planned with is still current.
        callee_online: bool,
    },
    /// Writing the call's record failed: forget the call, telling nobody.
    RecordFailed,
    /// A party answers.
    Answer {
        /// Who.
        by: Party,
        /// When (the answer time to record).
        at_ms: UnixMillis,
        /// The callee's media offer, relayed to the caller.
        offer: MediaOffer,
    },
    /// A party rejects.
    Reject {
        /// Who.
        by: Party,
    },
    /// A party hangs up.
    HangUp {
        /// Who.
        by: Party,
    },
    /// The ring timer expired.
    RingTimeout,
    /// A party's session is gone (link lost, powered off, or replaced by a newer one).
    Lost(Party),
    /// The server is shutting down.
    Shutdown,
}

/// Why an input does not apply to the call in its current state. The call is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The call is still `Recording`: to the parties it does not exist yet (answer,
    /// reject, hang-up), and shutdown leaves it for the dial to finish.
    NotAnnounced,
    /// The input needs a call ringing at the callee (answer, reject, ring timeout).
    NotRinging,
    /// The record was already written (a second `Recorded` or `RecordFailed`).
    AlreadyAnnounced,
}

/// What becomes of the call after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// It goes on in this state.
    Live(CallState),
    /// It is over: forget it and record this.
    Over {
        /// The record's final outcome.
        outcome: Outcome,
        /// When it was answered, if it was.
        answered_at_ms: Option<UnixMillis>,
    },
}

/// The result of an accepted input: the next state and the events to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The new state, or the end.
    pub next: Next,
    /// Event for the caller's session, if any.
    pub to_caller: Option<Event>,
    /// Event for the callee's session, if any.
    pub to_callee: Option<Event>,
}

impl Step {
    fn live(state: CallState) -> Self {
        Step {
            next: Next::Live(state),
            to_caller: None,
            to_callee: None,
        }
    }

    fn over(outcome: Outcome, answered_at_ms: Option<UnixMillis>) -> Self {
        Step {
            next: Next::Over {
                outcome,
                answered_at_ms,
            },
            to_caller: None,
            to_callee: None,
        }
    }

    fn tell(mut self, party: Party, event: Event) -> Self {
        match party {
            Party::Caller => self.to_caller = Some(event),
            Party::Callee => self.to_callee = Some(event),
        }
        self
    }
}

/// A call that ended: the record update to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The call.
    pub call_id: CallId,
    /// Caller.
    pub caller: UserId,
    /// Callee.
    pub callee: UserId,
    /// Final outcome.
    pub outcome: Outcome,
    /// When it was answered, if it was.
    pub answered_at_ms: Option<UnixMillis>,
}

/// A call that is being recorded, ringing or in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCall {
    /// Its id (also the `user_call` row's).
    pub id: CallId,
    /// Who dialled.
    pub caller: UserId,
    /// Who was dialled.
    pub callee: UserId,
    /// The caller's media address, sent to the callee with the ring.
    pub caller_media: SocketAddr,
    /// The callee's media address when the call was planned, sent to the caller with the
    /// ringing reply (the callee's session cannot change without ending the call).
    pub callee_media: SocketAddr,
    /// When it was dialled; the ring shows it as the call's date.
    pub placed_at_ms: UnixMillis,
    /// The caller's media offer (SRTP key, ICE), relayed to the callee with the ring.
    /// Only in memory; gone with the call.
    pub caller_offer: MediaOffer,
    /// Where it is in its life.
    pub state: CallState,
}

impl LiveCall {
    /// A call just planned: `Recording`, nobody gone.
    pub fn new(
        id: CallId,
        (caller, caller_media): (UserId, SocketAddr),
        (callee, callee_media): (UserId, SocketAddr),
        placed_at_ms: UnixMillis,
        caller_offer: MediaOffer,
    ) -> Self {
        LiveCall {
            id,
            caller,
            callee,
            caller_media,
            callee_media,
            placed_at_ms,
            caller_offer,
            state: CallState::Recording {
                caller_gone: false,
                callee_gone: false,
            },
        }
    }

    /// Which party `user` is, if either.
    pub fn party_of(&self, user: UserId) -> Option<Party> {
        if user == self.caller {
            Some(Party::Caller)
        } else if user == self.callee {
            Some(Party::Callee)
        } else {
            None
        }
    }

    fn user(&self, party: Party) -> UserId {
        match party {
            Party::Caller => self.caller,
            Party::Callee => self.callee,
        }
    }

    fn ended(&self, reason: EndReason) -> Event {
        Event::CallEnded {
            call_id: self.id,
            reason,
        }
    }

    /// The record update for this call ending as `next` says (`None` if it goes on).
    pub fn ended_by(&self, next: Next) -> Option<Ended> {
        match next {
            Next::Live(_) => None,
            Next::Over {
                outcome,
                answered_at_ms,
            } => Some(Ended {
                call_id: self.id,
                caller: self.caller,
                callee: self.callee,
                outcome,
                answered_at_ms,
            }),
        }
    }

    /// The pure transition function: what `input` does to this call. Changes nothing;
    /// the caller applies the returned step.
    pub fn step(&self, input: Input) -> Result<Step, Refused> {
        use CallState::{Active, Recording, Ringing};
        match (self.state, input) {
            // Recording: only the dial (record written or failed) and lost parties count.
            (
                Recording {
                    caller_gone,
                    callee_gone,
                },
                Input::Recorded { callee_online },
            ) => Ok(if callee_gone || !callee_online {
                // Cached for the callee, whoever else left.
                Step::over(Outcome::Cached, None)
            } else if caller_gone {
                Step::over(Outcome::Missed, None)
            } else {
                Step::live(Ringing).tell(
                    Party::Callee,
                    Event::IncomingCall {
                        call_id: self.id,
                        caller: self.caller,
                        caller_media: self.caller_media,
                        call_date_ms: self.placed_at_ms,
                        srtp: self.caller_offer.srtp.clone(),
                        ice: self.caller_offer.ice.clone(),
                    },
                )
            }),
            (Recording { .. }, Input::RecordFailed) => Ok(Step::over(Outcome::Missed, None)),
            (_, Input::Recorded { .. } | Input::RecordFailed) => Err(Refused::AlreadyAnnounced),
            (
                Recording {
                    caller_gone,
                    callee_gone,
                },
                Input::Lost(party),
            ) => Ok(Step::live(Recording {
                caller_gone: caller_gone || party == Party::Caller,
                callee_gone: callee_gone || party == Party::Callee,
            })),
            (Recording { .. }, _) => Err(Refused::NotAnnounced),

            // Ringing: the callee decides, the caller may cancel, the timer may expire.
            (
                Ringing,
                Input::Answer {
                    by: Party::Callee,
                    at_ms,
                    offer,
                },
            ) => Ok(Step::live(Active {
                answered_at_ms: at_ms,
            })
            .tell(
                Party::Caller,
                Event::CallAnswered {
                    call_id: self.id,
                    srtp: offer.srtp,
                    ice: offer.ice,
                },
            )),
            // A callee hanging up a ringing call rejects it.
            (Ringing, Input::Reject { by: Party::Callee })
            | (Ringing, Input::HangUp { by: Party::Callee }) => {
                Ok(Step::over(Outcome::Rejected, None)
                    .tell(Party::Caller, self.ended(EndReason::Rejected)))
            }
            (_, Input::Answer { .. } | Input::Reject { .. }) => Err(Refused::NotRinging),
            // A caller hanging up a ringing call cancels it: missed for the callee.
            (Ringing, Input::HangUp { by: Party::Caller }) => Ok(Step::over(Outcome::Missed, None)
                .tell(
                    Party::Callee,
                    self.ended(EndReason::HungUp { by: self.caller }),
                )),
            (Ringing, Input::RingTimeout) => Ok(Step::over(Outcome::Missed, None)
                .tell(Party::Caller, self.ended(EndReason::NoAnswer))
                .tell(Party::Callee, self.ended(EndReason::NoAnswer))),
            (_, Input::RingTimeout) => Err(Refused::NotRinging),
            (Ringing, Input::Lost(party)) => Ok(Step::over(Outcome::Missed, None)
                .tell(other(party), self.ended(EndReason::PeerLost))),
            (Ringing, Input::Shutdown) => Ok(Step::over(Outcome::Missed, None)
                .tell(Party::Caller, self.ended(EndReason::ServerShutdown))
                .tell(Party::Callee, self.ended(EndReason::ServerShutdown))),

            // Active: any end is an answered call.
            (Active { answered_at_ms }, Input::HangUp { by }) => {
                Ok(Step::over(Outcome::Answered, Some(answered_at_ms)).tell(
                    other(by),
                    self.ended(EndReason::HungUp { by: self.user(by) }),
                ))
            }
            (Active { answered_at_ms }, Input::Lost(party)) => {
                Ok(Step::over(Outcome::Answered, Some(answered_at_ms))
                    .tell(other(party), self.ended(EndReason::PeerLost)))
            }
            (Active { answered_at_ms }, Input::Shutdown) => {
                Ok(Step::over(Outcome::Answered, Some(answered_at_ms))
                    .tell(Party::Caller, self.ended(EndReason::ServerShutdown))
                    .tell(Party::Callee, self.ended(EndReason::ServerShutdown)))
            }
        }
    }
}

fn other(party: Party) -> Party {
    match party {
        Party::Caller => Party::Callee,
        Party::Callee => Party::Caller,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: CallId = 7;
    const A: UserId = 1;
    const B: UserId = 2;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn call(state: CallState) -> LiveCall {
        let mut c = LiveCall::new(
            ID,
            (A, addr(1)),
            (B, addr(2)),
            100,
            MediaOffer {
                srtp: Some(key(1)),
                ice: None,
            },
        );
        c.state = state;
        c
    }

    /// An SRTP key whose bytes are all `b`.
    fn key(b: u8) -> SrtpKey {
        SrtpKey {
            suite: shared_proto::SrtpSuite::AES_CM_128_HMAC_SHA1_80,
            key_salt: vec![b; 30],
        }
    }

    fn recording(caller_gone: bool, callee_gone: bool) -> LiveCall {
        call(CallState::Recording {
            caller_gone,
            callee_gone,
        })
    }

    fn ringing() -> LiveCall {
        call(CallState::Ringing)
    }

    fn active() -> LiveCall {
        call(CallState::Active { answered_at_ms: 50 })
    }

    fn ended(reason: EndReason) -> Option<Event> {
        Some(Event::CallEnded {
            call_id: ID,
            reason,
        })
    }

    fn over(outcome: Outcome, answered_at_ms: Option<UnixMillis>) -> Next {
        Next::Over {
            outcome,
            answered_at_ms,
        }
    }

    /// Every input, for the "refused in this state" checks.
    fn all_inputs() -> Vec<Input> {
        let mut v = vec![
            Input::Recorded {
                callee_online: true,
            },
            Input::Recorded {
                callee_online: false,
            },
            Input::RecordFailed,
            Input::RingTimeout,
            Input::Shutdown,
        ];
        for by in [Party::Caller, Party::Callee] {
            v.extend([
                Input::Answer {
                    by,
                    at_ms: 9,
                    offer: MediaOffer::default(),
                },
                Input::Reject { by },
                Input::HangUp { by },
                Input::Lost(by),
            ]);
        }
        v
    }

    #[test]
    fn new_calls_are_recording_and_know_their_parties() {
        let c = LiveCall::new(ID, (A, addr(1)), (B, addr(2)), 100, MediaOffer::default());
        assert_eq!(
            c.state,
            CallState::Recording {
                caller_gone: false,
                callee_gone: false
            }
        );
        assert_eq!(c.party_of(A), Some(Party::Caller));
        assert_eq!(c.party_of(B), Some(Party::Callee));
        assert_eq!(c.party_of(3), None);
    }

    #[test]
    fn recorded_rings_the_callee_with_the_callers_media() {
        let step = recording(false, false)
            .step(Input::Recorded {
                callee_online: true,
            })
            .unwrap();
        assert_eq!(step.next, Next::Live(CallState::Ringing));
        assert_eq!(
            step.to_caller, None,
            "the caller learns from the dial reply"
        );
        assert_eq!(
            step.to_callee,
            Some(Event::IncomingCall {
                call_id: ID,
                caller: A,
                caller_media: addr(1),
                call_date_ms: 100,
                srtp: Some(key(1)),
                ice: None,
            }),
            "the ring carries the caller's SRTP key"
        );
    }

    #[test]
    fn recorded_after_the_callee_left_is_cached_silently() {
        for (caller_gone, callee_gone, online) in [
            (false, true, true),
            (false, false, false),
            (true, true, true),
            (true, false, false),
        ] {
            let step = recording(caller_gone, callee_gone)
                .step(Input::Recorded {
                    callee_online: online,
                })
                .unwrap();
            assert_eq!(step.next, over(Outcome::Cached, None));
            assert_eq!((step.to_caller, step.to_callee), (None, None));
        }
    }

    #[test]
    fn recorded_after_the_caller_left_is_missed_silently() {
        let step = recording(true, false)
            .step(Input::Recorded {
                callee_online: true,
            })
            .unwrap();
        assert_eq!(step.next, over(Outcome::Missed, None));
        assert_eq!((step.to_caller, step.to_callee), (None, None));
    }

    #[test]
    fn record_failed_forgets_a_recording_call_silently() {
        for (cg, eg) in [(false, false), (true, false), (false, true)] {
            let step = recording(cg, eg).step(Input::RecordFailed).unwrap();
            assert_eq!(step.next, over(Outcome::Missed, None));
            assert_eq!((step.to_caller, step.to_callee), (None, None));
        }
    }

    #[test]
    fn lost_parties_while_recording_are_only_flagged() {
        let c = recording(false, false);
        let step = c.step(Input::Lost(Party::Caller)).unwrap();
        assert_eq!(
            step.next,
            Next::Live(CallState::Recording {
                caller_gone: true,
                callee_gone: false
            })
        );
        assert_eq!((step.to_caller, step.to_callee), (None, None));
        let step = recording(true, false)
            .step(Input::Lost(Party::Callee))
            .unwrap();
        assert_eq!(
            step.next,
            Next::Live(CallState::Recording {
                caller_gone: true,
                callee_gone: true
            }),
            "flags accumulate"
        );
    }

    #[test]
    fn a_recording_call_does_not_exist_for_its_parties_or_shutdown() {
        let c = recording(false, false);
        for input in all_inputs() {
            let expected = match input {
                Input::Recorded { .. } | Input::RecordFailed | Input::Lost(_) => continue,
                _ => Refused::NotAnnounced,
            };
            assert_eq!(c.step(input.clone()), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn the_callee_answers_a_ringing_call() {
        let step = ringing()
            .step(Input::Answer {
                by: Party::Callee,
                at_ms: 150,
                offer: MediaOffer {
                    srtp: Some(key(2)),
                    ice: None,
                },
            })
            .unwrap();
        assert_eq!(
            step.next,
            Next::Live(CallState::Active {
                answered_at_ms: 150
            })
        );
        assert_eq!(
            step.to_caller,
            Some(Event::CallAnswered {
                call_id: ID,
                srtp: Some(key(2)),
                ice: None,
            }),
            "the answer carries the callee's SRTP key"
        );
        assert_eq!(step.to_callee, None);
    }

    #[test]
    fn the_callee_rejects_or_hangs_up_a_ringing_call() {
        for input in [
            Input::Reject { by: Party::Callee },
            Input::HangUp { by: Party::Callee },
        ] {
            let step = ringing().step(input.clone()).unwrap();
            assert_eq!(step.next, over(Outcome::Rejected, None), "{input:?}");
            assert_eq!(step.to_caller, ended(EndReason::Rejected));
            assert_eq!(step.to_callee, None);
        }
    }

    #[test]
    fn the_caller_cancelling_a_ringing_call_makes_it_missed() {
        let step = ringing().step(Input::HangUp { by: Party::Caller }).unwrap();
        assert_eq!(step.next, over(Outcome::Missed, None));
        assert_eq!(step.to_caller, None);
        assert_eq!(step.to_callee, ended(EndReason::HungUp { by: A }));
    }

    #[test]
    fn the_caller_cannot_answer_or_reject() {
        for input in [
            Input::Answer {
                by: Party::Caller,
                at_ms: 1,
                offer: MediaOffer::default(),
            },
            Input::Reject { by: Party::Caller },
        ] {
            assert_eq!(ringing().step(input), Err(Refused::NotRinging));
        }
    }

    #[test]
    fn ring_timeout_tells_both_no_answer() {
        let step = ringing().step(Input::RingTimeout).unwrap();
        assert_eq!(step.next, over(Outcome::Missed, None));
        assert_eq!(step.to_caller, ended(EndReason::NoAnswer));
        assert_eq!(step.to_callee, ended(EndReason::NoAnswer));
    }

    #[test]
    fn a_party_lost_while_ringing_makes_it_missed_for_the_other() {
        let step = ringing().step(Input::Lost(Party::Caller)).unwrap();
        assert_eq!(step.next, over(Outcome::Missed, None));
        assert_eq!(
            (step.to_caller, step.to_callee),
            (None, ended(EndReason::PeerLost))
        );
        let step = ringing().step(Input::Lost(Party::Callee)).unwrap();
        assert_eq!(step.next, over(Outcome::Missed, None));
        assert_eq!(
            (step.to_caller, step.to_callee),
            (ended(EndReason::PeerLost), None)
        );
    }

    #[test]
    fn shutdown_ends_ringing_and_active_calls_telling_both() {
        for (c, next) in [
            (ringing(), over(Outcome::Missed, None)),
            (active(), over(Outcome::Answered, Some(50))),
        ] {
            let step = c.step(Input::Shutdown).unwrap();
            assert_eq!(step.next, next);
            assert_eq!(step.to_caller, ended(EndReason::ServerShutdown));
            assert_eq!(step.to_callee, ended(EndReason::ServerShutdown));
        }
    }

    #[test]
    fn either_party_hangs_up_an_active_call() {
        let step = active().step(Input::HangUp { by: Party::Caller }).unwrap();
        assert_eq!(step.next, over(Outcome::Answered, Some(50)));
        assert_eq!(
            (step.to_caller, step.to_callee),
            (None, ended(EndReason::HungUp { by: A }))
        );
        let step = active().step(Input::HangUp { by: Party::Callee }).unwrap();
        assert_eq!(step.next, over(Outcome::Answered, Some(50)));
        assert_eq!(
            (step.to_caller, step.to_callee),
            (ended(EndReason::HungUp { by: B }), None)
        );
    }

    #[test]
    fn a_party_lost_in_an_active_call_tells_the_other() {
        let step = active().step(Input::Lost(Party::Callee)).unwrap();
        assert_eq!(step.next, over(Outcome::Answered, Some(50)));
        assert_eq!(
            (step.to_caller, step.to_callee),
            (ended(EndReason::PeerLost), None)
        );
        let step = active().step(Input::Lost(Party::Caller)).unwrap();
        assert_eq!(
            (step.to_caller, step.to_callee),
            (None, ended(EndReason::PeerLost))
        );
    }

    #[test]
    fn announced_calls_refuse_what_does_not_apply() {
        for c in [ringing(), active()] {
            for input in all_inputs() {
                let expected = match (c.state, &input) {
                    (_, Input::Recorded { .. } | Input::RecordFailed) => Refused::AlreadyAnnounced,
                    (CallState::Active { .. }, Input::Answer { .. })
                    | (CallState::Active { .. }, Input::Reject { .. })
                    | (CallState::Active { .. }, Input::RingTimeout) => Refused::NotRinging,
                    (
                        CallState::Ringing,
                        Input::Answer {
                            by: Party::Caller, ..
                        }
                        | Input::Reject { by: Party::Caller },
                    ) => Refused::NotRinging,
                    _ => {
                        assert!(c.step(input.clone()).is_ok(), "{:?} {input:?}", c.state);
                        continue;
                    }
                };
                assert_eq!(
                    c.step(input.clone()),
                    Err(expected),
                    "{:?} {input:?}",
                    c.state
                );
            }
        }
    }

    #[test]
    fn steps_change_nothing_and_ends_carry_the_record() {
        let c = active();
        let step = c.step(Input::HangUp { by: Party::Callee }).unwrap();
        assert_eq!(c, active(), "step is pure");
        assert_eq!(
            c.ended_by(step.next),
            Some(Ended {
                call_id: ID,
                caller: A,
                callee: B,
                outcome: Outcome::Answered,
                answered_at_ms: Some(50),
            })
        );
        assert_eq!(c.ended_by(Next::Live(CallState::Ringing)), None);
    }
}
