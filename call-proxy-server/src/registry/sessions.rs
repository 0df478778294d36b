//! Who is online: user → the current session (its id, the TV's media address, its push
//! queue, the call it is in). Install, replace by a newer session, and drop only if
//! still current.
//!
//! Plain data under the registry's lock; no I/O. Session ids grow with every
//! registration, so "newer" is "larger id": an older connection's late registration or
//! cleanup can never displace or drop a newer one.

use std::collections::HashMap;
use std::net::SocketAddr;

use shared_proto::{CallId, Event, ServerMsg, UserId};

use super::push::{self, PushTx, Pushed};

/// A connected TV.
#[derive(Debug)]
pub struct Session {
    /// Distinguishes this connection from earlier and later ones of the same user.
    pub session_id: u64,
    /// The TV's UDP media address (observed IP, reported port).
    pub media: SocketAddr,
    /// Pushes to the TV's connection task.
    push: PushTx,
    /// The call this TV is in (being recorded, ringing either way, or answered), if any.
    pub call: Option<CallId>,
}

impl Session {
    /// A session in no call.
    pub fn new(session_id: u64, media: SocketAddr, push: PushTx) -> Self {
        Session {
            session_id,
            media,
            push,
            call: None,
        }
    }

    /// Pushes `msg` to this session without waiting.
    pub fn push(&self, msg: ServerMsg) -> Pushed {
        push::send(&self.push, self.session_id, msg)
    }
}

/// A newer session of the user holds its place; the install is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewerSession;

/// The current session of every connected user.
#[derive(Debug, Default)]
pub struct Sessions {
    /// By user; one session each.
    by_user: HashMap<UserId, Session>,
}

impl Sessions {
    /// Number of connected users.
    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    /// Whether `user` is connected.
    pub fn contains(&self, user: UserId) -> bool {
        self.by_user.contains_key(&user)
    }

    /// The user's session, whichever it is.
    pub fn get(&self, user: UserId) -> Option<&Session> {
        self.by_user.get(&user)
    }

    /// The user's session if it is `session_id` (the requester is still current).
    pub fn current(&self, user: UserId, session_id: u64) -> Option<&Session> {
        self.by_user
            .get(&user)
            .filter(|s| s.session_id == session_id)
    }

    /// Makes `session` the user's. An older (or the same) session id is replaced and
    /// returned, for the caller to tell it to close and end its call; a newer one wins.
    pub fn install(
        &mut self,
        user: UserId,
        session: Session,
    ) -> Result<Option<Session>, NewerSession> {
        if self
            .by_user
            .get(&user)
            .is_some_and(|old| old.session_id > session.session_id)
        {
            return Err(NewerSession);
        }
        Ok(self.by_user.insert(user, session))
    }

    /// Drops the user's session if it is still `session_id`.
    pub fn remove_current(&mut self, user: UserId, session_id: u64) -> Option<Session> {
        self.current(user, session_id)?;
        self.by_user.remove(&user)
    }

    /// Puts `user`'s session in call `call_id`.
    pub fn set_call(&mut self, user: UserId, call_id: CallId) {
        if let Some(s) = self.by_user.get_mut(&user) {
            s.call = Some(call_id);
        }
    }

    /// Frees `user`'s session of call `call_id` (and of no other).
    pub fn clear_call(&mut self, user: UserId, call_id: CallId) {
        if let Some(s) = self.by_user.get_mut(&user) {
            if s.call == Some(call_id) {
                s.call = None;
            }
        }
    }

    /// Pushes an event to the user's session, if connected.
    pub fn push_event(&self, user: UserId, event: Event) {
        if let Some(s) = self.by_user.get(&user) {
            s.push(ServerMsg::Event(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use shared_proto::{EndReason, ErrorCode, WireError};

    use super::super::testing::{addr, next_event, session};
    use super::super::{DialPlan, Registry};
    use super::*;
    use crate::registry::PushRx;
    use crate::storage::Outcome;

    fn fresh(id: u64) -> (Session, PushRx) {
        let (tx, rx) = crate::registry::push_channel();
        (Session::new(id, addr(id as u16), tx), rx)
    }

    #[test]
    fn newer_sessions_replace_older_ones_and_never_the_reverse() {
        let mut s = Sessions::default();
        let (one, _r1) = fresh(1);
        let (three, _r3) = fresh(3);
        let (two, _r2) = fresh(2);
        assert!(s.install(9, one).unwrap().is_none());
        let old = s.install(9, three).unwrap().expect("replaced");
        assert_eq!(old.session_id, 1);
        assert_eq!(s.install(9, two).unwrap_err(), NewerSession);
        assert_eq!(s.get(9).map(|x| x.session_id), Some(3));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn only_the_current_session_is_removed() {
        let mut s = Sessions::default();
        let (one, _r1) = fresh(1);
        s.install(9, one).unwrap();
        assert!(s.remove_current(9, 2).is_none());
        assert!(s.contains(9));
        assert_eq!(s.remove_current(9, 1).map(|x| x.session_id), Some(1));
        assert!(!s.contains(9));
    }

    #[test]
    fn call_slots_are_cleared_only_for_their_call() {
        let mut s = Sessions::default();
        let (one, _r1) = fresh(1);
        s.install(9, one).unwrap();
        s.set_call(9, 40);
        s.clear_call(9, 41);
        assert_eq!(s.current(9, 1).and_then(|x| x.call), Some(40));
        s.clear_call(9, 40);
        assert_eq!(s.current(9, 1).and_then(|x| x.call), None);
    }

    #[test]
    fn events_reach_only_connected_users() {
        let mut s = Sessions::default();
        let (one, mut r1) = fresh(1);
        s.install(9, one).unwrap();
        let e = Event::CachedCallsWaiting { count: 2 };
        s.push_event(9, e.clone());
        s.push_event(8, e.clone());
        assert_eq!(next_event(&mut r1), Some(ServerMsg::Event(e)));
        assert_eq!(next_event(&mut r1), None);
    }

    #[test]
    fn reregistration_replaces_and_ends_the_call() {
        let reg = Registry::new(0, 0);
        let (sa, mut ra) = session(&reg, 1);
        let (_sb, mut rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        reg.start_ringing(call_id);
        let _ = next_event(&mut rb);
        let (tx, _rx) = crate::registry::push_channel();
        let newer = reg.new_session_id();
        let installed = reg.install(2, newer, addr(9), tx).expect("install");
        assert!(installed.replaced);
        assert_eq!(installed.ended.map(|e| e.outcome), Some(Outcome::Missed));
        assert!(matches!(
            next_event(&mut rb),
            Some(ServerMsg::Closing(WireError {
                code: ErrorCode::SESSION_REPLACED,
                ..
            }))
        ));
        assert!(matches!(
            next_event(&mut ra),
            Some(ServerMsg::Event(Event::CallEnded {
                reason: EndReason::PeerLost,
                ..
            }))
        ));
        // The old session's cleanup does not remove the new one.
        assert_eq!(reg.remove(2, newer - 1), None);
        assert!(reg.is_online(2));
        // An older session id cannot displace a newer one.
        let (tx, _rx) = crate::registry::push_channel();
        assert!(reg.install(2, 1, addr(9), tx).is_err());
    }
}
