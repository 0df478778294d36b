//! Calls between TVs on two nodes (several nodes on one database): the registry's side.
//!
//! The caller's node holds the live call and runs its state machine, ring timer and
//! records, as for a call between two of its own TVs. Before it plans the call it asks
//! the callee's node to reserve the callee ([`Registry::reserve`]: the callee's node is
//! the one that knows whether it is free, and its session's call slot is taken with the
//! owner's slot in `call_owner`). The callee then has a stand-in in the owner's sessions
//! table ([`RemoteParty`]) whose pushes go to its node; the callee's answer, reject or
//! hang-up is sent to the owner ([`Registry::remote_owner`]) and applied there to the
//! stand-in as if the TV were connected here.
//!
//! What one node must tell another leaves as a [`Notice`] through the [`Outbox`] (a
//! non-blocking send, like a push): a TV here in a call another node holds is gone
//! (`Lost`: the owner ends the call as `PeerLost`), or a stand-in here was dropped
//! (`Release`: the callee's node frees its slot; sent for every stand-in that goes, so a
//! call abandoned before it rang never leaves the callee stuck "in a call"). A node that
//! stops or whose lease runs out ends every call with its TVs ([`Registry::node_gone`]).
//!
//! Like the rest of the registry: no I/O, no awaits, one short lock.

use std::net::SocketAddr;

use shared_proto::{CallId, EndReason, ErrorCode, Event, ServerMsg, UnixMillis, UserId, WireError};

use super::sessions::Session;
use super::{DialPlan, Ended, Inner, MediaOffer, PushTx, Registry};

/// Where notices to other nodes go: (the node's slot, the notice).
pub type Outbox = tokio::sync::mpsc::UnboundedSender<(u8, Notice)>;

/// What this node tells another about a call between them (carried as it is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Notice {
    /// `user`'s session here (`session_id`), in call `call_id` that the other node holds,
    /// is gone: the call is over for it.
    Lost {
        /// The TV.
        user: UserId,
        /// Its session here.
        session_id: u64,
        /// The call.
        call_id: CallId,
    },
    /// This node dropped its stand-in for `user` (in call `call_id`): free its call slot
    /// if it still holds that call.
    Release {
        /// The TV, connected to the other node.
        user: UserId,
        /// The call.
        call_id: CallId,
    },
}

/// A TV connected to another node, as a party of a call this node holds.
#[derive(Debug)]
pub struct RemoteParty {
    /// Its node's slot.
    pub slot: u8,
    /// Its session there.
    pub session_id: u64,
    /// Its media address.
    pub media: SocketAddr,
    /// Pushes to it (carried to its node).
    pub push: PushTx,
}

/// What a node answers when asked to reserve one of its TVs for another node's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reserve {
    /// Reserved: its session and media address.
    Free {
        /// Its session here.
        session_id: u64,
        /// Its media address.
        media: SocketAddr,
    },
    /// In another call.
    Busy,
    /// Not connected here.
    Offline,
}

impl Inner {
    /// Sends `notice` to the node in `slot`, if this node has other nodes.
    fn tell(&self, slot: u8, notice: Notice) {
        if let Some(outbox) = &self.outbox {
            let _ = outbox.send((slot, notice));
        }
    }

    /// A stand-in was dropped: its TV's node frees its slot.
    pub(super) fn released(&self, user: UserId, stand_in: &Session, call_id: CallId) {
        if let Some(slot) = stand_in.remote {
            self.tell(slot, Notice::Release { user, call_id });
        }
    }

    /// `user`'s session `old` left the table (closed, replaced): end or flag its call
    /// here, or tell the node that holds it.
    pub(super) fn session_gone(&mut self, user: UserId, old: &Session) -> Option<Ended> {
        let call_id = old.call?;
        if let Some(owner) = old.call_owner {
            self.tell(
                owner,
                Notice::Lost {
                    user,
                    session_id: old.session_id,
                    call_id,
                },
            );
            return None;
        }
        if old.remote.is_some() {
            self.released(user, old, call_id);
        }
        self.party_lost(user, call_id)
    }
}

impl Registry {
    /// Where this registry's notices to other nodes go (set once, at start).
    pub fn set_outbox(&self, outbox: Outbox) {
        self.lock().outbox = Some(outbox);
    }

    /// Another node (`owner`) asks for `callee` in its call `call_id`: a session here
    /// that is in no call is reserved (its slot holds the call, owned there). A draining
    /// node's TVs not in a call are moving: `Offline`.
    pub fn reserve(&self, callee: UserId, call_id: CallId, owner: u8) -> Reserve {
        let mut inner = self.lock();
        let Some(s) = inner.sessions.get(callee).filter(|s| s.remote.is_none()) else {
            return Reserve::Offline;
        };
        if s.call.is_some() {
            return Reserve::Busy;
        }
        if inner.draining {
            return Reserve::Offline;
        }
        let session_id = s.session_id;
        let media = s.media;
        if let Some(s) = inner.sessions.current_mut(callee, session_id) {
            s.call = Some(call_id);
            s.call_owner = Some(owner);
        }
        Reserve::Free { session_id, media }
    }

    /// Decides a dial from `caller` (here, in its session `session_id`) to `callee`, reserved on its
    /// node as `callee` ([`Registry::reserve`] answered `Free`), under the id `call_id`
    /// that reservation was made for. The callee gets a stand-in and the plan is `Ring`;
    /// if the callee connected here meanwhile, the plan is made with that session and the
    /// reservation released; if the caller may no longer dial, the reservation is
    /// released and the caller told why.
    pub fn plan_dial_to_remote(
        &self,
        (caller, session_id): (UserId, u64),
        callee: UserId,
        call_id: CallId,
        remote: RemoteParty,
        offer: MediaOffer,
        now_ms: UnixMillis,
    ) -> Result<DialPlan, WireError> {
        let mut inner = self.lock();
        let release = Notice::Release {
            user: callee,
            call_id,
        };
        if let Err(e) = inner.caller_free(caller, session_id) {
            inner.tell(remote.slot, release);
            return Err(e);
        }
        if inner.sessions.get(callee).is_some() {
            inner.tell(remote.slot, release);
        } else {
            // In no call until `plan` (under this same lock) puts it in this one.
            let stand_in =
                Session::stand_in(remote.session_id, remote.media, remote.push, remote.slot);
            if inner.sessions.install(callee, stand_in).is_err() {
                inner.tell(remote.slot, release);
            }
        }
        inner.plan(caller, session_id, callee, offer, now_ms, || call_id)
    }

    /// The node that holds call `call_id` of `user` (in its current session here
    /// `session_id`), when another node does: its answer, reject or hang-up goes there.
    pub fn remote_owner(&self, user: UserId, session_id: u64, call_id: CallId) -> Option<u8> {
        let inner = self.lock();
        let s = inner.sessions.current(user, session_id)?;
        s.call_owner.filter(|_| s.call == Some(call_id))
    }

    /// Frees `user`'s call slot of call `call_id` held by another node (that node ended
    /// the call or dropped its stand-in).
    pub fn release_remote(&self, user: UserId, call_id: CallId) {
        let mut inner = self.lock();
        if inner
            .sessions
            .get(user)
            .is_some_and(|s| s.remote.is_none() && s.call_owner.is_some())
        {
            inner.sessions.clear_call(user, call_id);
        }
    }

    /// Another node pushes `event` to `user`'s session `session_id` here. A call's end
    /// frees the slot the call held. `false`: that session is not here (any more).
    pub fn deliver(&self, user: UserId, session_id: u64, event: Event) -> bool {
        let mut inner = self.lock();
        let Some(held_elsewhere) = inner
            .sessions
            .current(user, session_id)
            .filter(|s| s.remote.is_none())
            .map(|s| s.call_owner.is_some())
        else {
            return false;
        };
        if let (true, Event::CallEnded { call_id, .. }) = (held_elsewhere, &event) {
            inner.sessions.clear_call(user, *call_id);
        }
        inner.sessions.push_event(user, event)
    }

    /// `user`'s session on another node (`session_id`), a party of call `call_id` here
    /// through its stand-in, is gone: its stand-in goes and the call ends or is flagged
    /// as for a TV of this node.
    pub fn remote_party_lost(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
    ) -> Option<Ended> {
        let mut inner = self.lock();
        let s = inner.sessions.current(user, session_id)?;
        if s.remote.is_none() || s.call != Some(call_id) {
            return None;
        }
        inner.sessions.remove_current(user, session_id)?;
        inner.party_lost(user, call_id)
    }

    /// This node is draining (stopping, with other nodes to take its TVs): no new call
    /// starts here (a dial is refused `SHUTTING_DOWN`, another node's reservation finds
    /// the TV offline), and every TV connected here that is in no call is told to move
    /// (`Closing` with `SHUTTING_DOWN`: it connects again, through the dispatcher to
    /// another node). Called again, it tells the TVs whose calls ended since. Returns how
    /// many calls are still live here or with a TV here.
    pub fn drain(&self) -> usize {
        let mut inner = self.lock();
        inner.draining = true;
        inner
            .sessions
            .push_to_idle(ServerMsg::Closing(WireError::new(
                ErrorCode::SHUTTING_DOWN,
                "this server is draining: connect again, to another one",
            )));
        inner.calls.len() + inner.sessions.in_calls_held_elsewhere()
    }

    /// The node in `slot` is gone: every call here with one of its TVs ends (`PeerLost`
    /// for the TV here), and every TV here in a call it held is told the call is over.
    /// Returns the ends to record (calls this node held).
    pub fn node_gone(&self, slot: u8) -> Vec<Ended> {
        let mut inner = self.lock();
        let mut ended = Vec::new();
        for (user, session_id) in inner.sessions.tied_to(slot) {
            let Some(s) = inner.sessions.current(user, session_id) else {
                continue;
            };
            let (call, remote) = (s.call, s.remote.is_some());
            if remote {
                let _ = inner.sessions.remove_current(user, session_id);
                ended.extend(call.and_then(|c| inner.party_lost(user, c)));
            } else if let Some(call_id) = call {
                inner.sessions.clear_call(user, call_id);
                inner.sessions.push_event(
                    user,
                    Event::CallEnded {
                        call_id,
                        reason: EndReason::PeerLost,
                    },
                );
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use shared_proto::{ErrorCode, ServerMsg};

    use super::super::testing::{addr, next_event, session};
    use super::super::{PushRx, RingStart};
    use super::*;
    use crate::storage::Outcome;

    /// A registry with an outbox, and the outbox's other end.
    fn registry() -> (Registry, tokio::sync::mpsc::UnboundedReceiver<(u8, Notice)>) {
        let reg = Registry::new(0, 0);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        reg.set_outbox(tx);
        (reg, rx)
    }

    /// Plans and rings a call from local `caller` to `callee` on node `slot`; returns the
    /// call and the stand-in's queue (what would be carried to that node).
    fn ring_remote(
        reg: &Registry,
        caller: u64,
        sid: u64,
        callee: u64,
        slot: u8,
    ) -> (CallId, PushRx) {
        let DialPlan::Offline { call_id } = reg.plan_dial(caller, sid, callee, 0).unwrap() else {
            panic!("not connected here")
        };
        let (push, rx) = crate::registry::push_channel();
        let remote = RemoteParty {
            slot,
            session_id: 77,
            media: addr(9),
            push,
        };
        let plan = reg
            .plan_dial_to_remote(
                (caller, sid),
                callee,
                call_id,
                remote,
                MediaOffer::default(),
                0,
            )
            .unwrap();
        assert_eq!(plan, DialPlan::Ring { call_id });
        assert_eq!(
            reg.start_ringing(call_id),
            RingStart::Ringing {
                callee_media: addr(9)
            }
        );
        (call_id, rx)
    }

    #[test]
    fn a_stand_in_is_rung_answers_is_not_online_and_goes_with_its_call() {
        let (reg, mut outbox) = registry();
        let (sa, mut ra) = session(&reg, 1);
        let (call_id, mut carried) = ring_remote(&reg, 1, sa, 2, 5);
        assert!(matches!(
            next_event(&mut carried),
            Some(ServerMsg::Event(Event::IncomingCall { caller: 1, .. }))
        ));
        assert_eq!(reg.online(), 1, "a stand-in is not a TV connected here");
        assert!(!reg.is_online(2));
        // Busy to a third TV here, without asking the other node.
        let (sc, _rc) = session(&reg, 3);
        assert!(matches!(
            reg.plan_dial(3, sc, 2, 0),
            Ok(DialPlan::Busy { .. })
        ));
        // Its answer (carried from its node) reaches the caller.
        reg.answer(2, 77, call_id, 5).unwrap();
        assert!(matches!(
            next_event(&mut ra),
            Some(ServerMsg::Event(Event::CallAnswered { .. }))
        ));
        // The caller hangs up: the stand-in hears it, goes, and its node is told.
        reg.hang_up(1, sa, call_id).unwrap();
        assert!(matches!(
            next_event(&mut carried),
            Some(ServerMsg::Event(Event::CallEnded { .. }))
        ));
        assert_eq!(
            outbox.try_recv().ok(),
            Some((5, Notice::Release { user: 2, call_id }))
        );
        assert!(matches!(
            reg.plan_dial(1, sa, 2, 0),
            Ok(DialPlan::Offline { .. })
        ));
    }

    #[test]
    fn a_reserved_tv_is_busy_here_and_its_loss_is_told_to_the_owner() {
        let (reg, mut outbox) = registry();
        let (sb, mut rb) = session(&reg, 2);
        assert_eq!(
            reg.reserve(2, 640, 7),
            Reserve::Free {
                session_id: sb,
                media: addr(2)
            }
        );
        assert_eq!(reg.reserve(2, 704, 8), Reserve::Busy);
        assert_eq!(reg.reserve(9, 704, 8), Reserve::Offline);
        let (sc, _rc) = session(&reg, 3);
        assert!(matches!(
            reg.plan_dial(3, sc, 2, 0),
            Ok(DialPlan::Busy { .. })
        ));
        assert_eq!(reg.remote_owner(2, sb, 640), Some(7));
        assert_eq!(reg.remote_owner(2, sb, 641), None);
        // The owner's ring arrives and is pushed; a stale session's is refused.
        let ring = Event::IncomingCall {
            call_id: 640,
            caller: 1,
            caller_media: addr(1),
            call_date_ms: 0,
            srtp: None,
            ice: None,
        };
        assert!(reg.deliver(2, sb, ring.clone()));
        assert!(!reg.deliver(2, sb + 1, ring));
        assert!(next_event(&mut rb).is_some());
        // The TV goes: the owner is told, nothing is ended here.
        assert_eq!(reg.remove(2, sb), Some(None));
        assert_eq!(
            outbox.try_recv().ok(),
            Some((
                7,
                Notice::Lost {
                    user: 2,
                    session_id: sb,
                    call_id: 640
                }
            ))
        );
    }

    #[test]
    fn a_call_ended_or_released_by_its_owner_frees_the_tv() {
        let (reg, _outbox) = registry();
        let (sb, mut rb) = session(&reg, 2);
        reg.reserve(2, 640, 7);
        let ended = Event::CallEnded {
            call_id: 640,
            reason: EndReason::HungUp { by: 1 },
        };
        assert!(reg.deliver(2, sb, ended));
        assert!(next_event(&mut rb).is_some());
        assert!(matches!(reg.reserve(2, 704, 7), Reserve::Free { .. }));
        reg.release_remote(2, 703);
        assert_eq!(reg.reserve(2, 768, 7), Reserve::Busy, "only its own call");
        reg.release_remote(2, 704);
        assert!(matches!(reg.reserve(2, 768, 7), Reserve::Free { .. }));
    }

    #[test]
    fn a_node_gone_ends_the_calls_with_its_tvs_on_both_sides() {
        let (reg, _outbox) = registry();
        // A call held here with a TV of node 5, answered.
        let (sa, mut ra) = session(&reg, 1);
        let (call_id, _carried) = ring_remote(&reg, 1, sa, 2, 5);
        reg.answer(2, 77, call_id, 5).unwrap();
        let _ = next_event(&mut ra);
        // A TV here in a call node 5 holds.
        let (sd, mut rd) = session(&reg, 4);
        reg.reserve(4, 901, 5);
        // A call with node 6 is untouched.
        let (se, _re) = session(&reg, 6);
        let (other, _c6) = ring_remote(&reg, 6, se, 8, 6);
        let ended = reg.node_gone(5);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].call_id, call_id);
        assert_eq!(ended[0].outcome, Outcome::Answered);
        assert_eq!(
            next_event(&mut ra),
            Some(ServerMsg::Event(Event::CallEnded {
                call_id,
                reason: EndReason::PeerLost
            }))
        );
        assert_eq!(
            next_event(&mut rd),
            Some(ServerMsg::Event(Event::CallEnded {
                call_id: 901,
                reason: EndReason::PeerLost
            }))
        );
        assert!(matches!(
            reg.plan_dial(4, sd, 1, 0),
            Ok(DialPlan::Ring { .. })
        ));
        assert_eq!(reg.live_calls(), 2, "the new call and node 6's");
        assert_eq!(
            reg.hang_up(6, se, other)
                .map(|e| e.outcome)
                .map_err(|e| e.code),
            Ok(Outcome::Missed)
        );
    }

    #[test]
    fn a_caller_that_can_no_longer_dial_releases_the_reservation() {
        let (reg, mut outbox) = registry();
        let (sa, _ra) = session(&reg, 1);
        let (push, _rx) = crate::registry::push_channel();
        let remote = RemoteParty {
            slot: 5,
            session_id: 77,
            media: addr(9),
            push,
        };
        let e = reg
            .plan_dial_to_remote((1, sa + 1), 2, 64, remote, MediaOffer::default(), 0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NOT_REGISTERED);
        assert_eq!(
            outbox.try_recv().ok(),
            Some((
                5,
                Notice::Release {
                    user: 2,
                    call_id: 64
                }
            ))
        );
        assert_eq!(reg.online(), 1);
    }
}
