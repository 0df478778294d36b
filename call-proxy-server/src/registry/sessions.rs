//! Who is online: user → the current session (its id, the TV's media address, its push
//! queue, the call it is in). Install, replace by a newer session, and drop only if
//! still current.
//!
//! Plain data under the registry's lock; no I/O. Session ids grow with every
//! registration, so "newer" is "larger id": an older connection's late registration or
//! cleanup can never displace or drop a newer one.
//!
//! Several nodes: a TV connected to another node that is in a call this node holds has a
//! stand-in here (`remote`: its node's slot; its pushes go to that node), for that call
//! only; it is not counted or reported online. A TV connected here that is in a call
//! another node holds has that node in `call_owner`.

use std::collections::HashMap;
use std::net::SocketAddr;

use shared_proto::{CallId, Event, ServerMsg, UserId};

use super::presence::Conn;
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
    /// A stand-in for a TV connected to the node in this slot (see the module doc).
    pub remote: Option<u8>,
    /// The node (slot) that holds `call`, when another node does.
    pub call_owner: Option<u8>,
    /// Told to move to another node (this node is draining).
    pub told_to_move: bool,
    /// "Do not disturb": shown busy, and calls to it are missed instead of ringing.
    pub dnd: bool,
}

impl Session {
    /// A session in no call.
    pub fn new(session_id: u64, media: SocketAddr, push: PushTx) -> Self {
        Session {
            session_id,
            media,
            push,
            call: None,
            remote: None,
            call_owner: None,
            told_to_move: false,
            dnd: false,
        }
    }

    /// A stand-in for a TV connected to the node in `slot` (put in its call next).
    pub fn stand_in(session_id: u64, media: SocketAddr, push: PushTx, slot: u8) -> Self {
        Session {
            remote: Some(slot),
            ..Session::new(session_id, media, push)
        }
    }

    /// Pushes `msg` to this session without waiting.
    pub fn push(&self, msg: ServerMsg) -> Pushed {
        push::send(&self.push, self.session_id, msg)
    }

    /// Another sender of this session's push queue (presence keeps one).
    pub fn push_tx(&self) -> PushTx {
        self.push.clone()
    }

    /// Its presence: busy in a call or in "do not disturb", else online.
    pub fn conn(&self) -> Conn {
        if self.call.is_some() || self.dnd {
            Conn::Busy
        } else {
            Conn::Online
        }
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
    /// How many of them are stand-ins for TVs on other nodes.
    stand_ins: usize,
    /// Users connected here whose presence may have changed since the registry's lock
    /// was taken (it publishes them when it releases the lock).
    pub touched: Vec<UserId>,
}

impl Sessions {
    /// Number of users connected here.
    pub fn len(&self) -> usize {
        self.by_user.len() - self.stand_ins
    }

    /// Whether `user` is connected here.
    pub fn contains(&self, user: UserId) -> bool {
        self.by_user.get(&user).is_some_and(|s| s.remote.is_none())
    }

    /// Keeps the stand-in count right as `added` enters and `removed` leaves.
    fn count(&mut self, added: Option<&Session>, removed: Option<&Session>) {
        if added.is_some_and(|s| s.remote.is_some()) {
            self.stand_ins += 1;
        }
        if removed.is_some_and(|s| s.remote.is_some()) {
            self.stand_ins -= 1;
        }
    }

    /// Every stand-in for a TV of the node in `slot`, and every session here in a call
    /// that node holds: (user, session id).
    pub fn tied_to(&self, slot: u8) -> Vec<(UserId, u64)> {
        self.by_user
            .iter()
            .filter(|(_, s)| s.remote == Some(slot) || s.call_owner == Some(slot))
            .map(|(u, s)| (*u, s.session_id))
            .collect()
    }

    /// Pushes `msg` to every session connected here that is in no call (each once: a
    /// session told to close is gone from its queue's view after it reads this).
    pub fn push_to_idle(&mut self, msg: ServerMsg) {
        for s in self.by_user.values_mut() {
            if s.remote.is_none() && s.call.is_none() && !s.told_to_move {
                s.told_to_move = true;
                s.push(msg.clone());
            }
        }
    }

    /// Sessions connected here in a call another node holds.
    pub fn in_calls_held_elsewhere(&self) -> usize {
        self.by_user
            .values()
            .filter(|s| s.call_owner.is_some())
            .count()
    }

    /// Mutable access to the user's session if it is `session_id`.
    pub fn current_mut(&mut self, user: UserId, session_id: u64) -> Option<&mut Session> {
        self.by_user
            .get_mut(&user)
            .filter(|s| s.session_id == session_id)
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
        let added = session.remote.is_some();
        if !added {
            self.touched.push(user);
        }
        let old = self.by_user.insert(user, session);
        self.stand_ins += usize::from(added);
        self.count(None, old.as_ref());
        Ok(old)
    }

    /// Drops the user's session if it is still `session_id`.
    pub fn remove_current(&mut self, user: UserId, session_id: u64) -> Option<Session> {
        self.current(user, session_id)?;
        let old = self.by_user.remove(&user);
        if old.as_ref().is_some_and(|s| s.remote.is_none()) {
            self.touched.push(user);
        }
        self.count(None, old.as_ref());
        old
    }

    /// Puts `user`'s session in call `call_id`.
    pub fn set_call(&mut self, user: UserId, call_id: CallId) {
        if let Some(s) = self.by_user.get_mut(&user) {
            s.call = Some(call_id);
            if s.remote.is_none() {
                self.touched.push(user);
            }
        }
    }

    /// Sets "do not disturb" on `user`'s session `session_id`; whether it is current.
    pub fn set_dnd(&mut self, user: UserId, session_id: u64, on: bool) -> bool {
        match self.by_user.get_mut(&user) {
            Some(s) if s.session_id == session_id && s.remote.is_none() => {
                s.dnd = on;
                self.touched.push(user);
                true
            }
            _ => false,
        }
    }

    /// The presence of `user` as connected here (stand-ins do not count).
    pub fn conn(&self, user: UserId) -> Conn {
        match self.by_user.get(&user) {
            Some(s) if s.remote.is_none() => s.conn(),
            _ => Conn::Offline,
        }
    }

    /// Frees `user`'s session of call `call_id` (and of no other). A stand-in, there
    /// for that call only, goes, and is returned.
    pub fn clear_call(&mut self, user: UserId, call_id: CallId) -> Option<Session> {
        let s = self.by_user.get_mut(&user)?;
        if s.call != Some(call_id) {
            return None;
        }
        s.call = None;
        s.call_owner = None;
        if s.remote.is_none() {
            self.touched.push(user);
        }
        s.remote?;
        let old = self.by_user.remove(&user);
        self.count(None, old.as_ref());
        old
    }

    /// Pushes an event to the user's session, if connected (here, or through its
    /// stand-in). Whether there was a session to push to.
    pub fn push_event(&self, user: UserId, event: Event) -> bool {
        match self.by_user.get(&user) {
            Some(s) => {
                s.push(ServerMsg::Event(event));
                true
            }
            None => false,
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
