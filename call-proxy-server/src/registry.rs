//! The live state of the server: which TVs are connected now (sessions) and which calls
//! are ringing or in progress, with the call state machine.
//!
//! The registry is the in-memory mirror of what is online; `user_property` is written
//! through before a session appears here, so the two never disagree for long. It does no
//! I/O: it changes state under one short lock and pushes events to sessions with
//! non-blocking sends. Methods that end a call return an [`Ended`] describing the record
//! update the caller must write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use shared_proto::{CallId, EndReason, ErrorCode, Event, ServerMsg, UnixMillis, UserId, WireError};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::storage::Outcome;

/// The sending side of a session's push queue. Messages are boxed so each queue slot
/// is one pointer: an idle session's queue costs a few hundred bytes.
pub type PushTx = mpsc::Sender<Box<ServerMsg>>;
/// The receiving side, owned by the session's connection task.
pub type PushRx = mpsc::Receiver<Box<ServerMsg>>;
/// Queued pushes per session before it counts as stuck.
pub const PUSH_QUEUE: usize = 16;

/// A connected TV.
struct Session {
    /// Distinguishes this connection from earlier and later ones of the same user.
    session_id: u64,
    /// The TV's UDP media address (observed IP, reported port).
    media: SocketAddr,
    /// Pushes to the TV's connection task.
    push: PushTx,
    /// The call this TV is in (ringing either way, or answered), if any.
    call: Option<CallId>,
}

/// Where a live call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// Its record is being written; nobody has been told yet. A party that disconnects
    /// now is only flagged, and the dial finishes the call.
    Recording {
        caller_gone: bool,
        callee_gone: bool,
    },
    /// The callee's TV is ringing.
    Ringing,
    /// Answered; media flows.
    Active,
}

/// A call that is ringing or in progress.
struct LiveCall {
    caller: UserId,
    callee: UserId,
    /// The caller's media address, sent to the callee with the ring.
    caller_media: SocketAddr,
    placed_at_ms: UnixMillis,
    answered_at_ms: Option<UnixMillis>,
    state: CallState,
    /// The ring-timeout task, cancelled when the ringing ends another way.
    timer: Option<AbortHandle>,
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

/// What a dial should do, decided under the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialPlan {
    /// Callee online and free: a live call now exists in `Recording` state.
    Ring {
        /// The pre-allocated call id.
        call_id: CallId,
    },
    /// Callee online but in another call.
    Busy {
        /// The pre-allocated call id.
        call_id: CallId,
    },
    /// Callee not connected (or never seen: the record insert finds out).
    Offline {
        /// The pre-allocated call id.
        call_id: CallId,
    },
}

/// How a `Recording` call continued once its record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingStart {
    /// The callee is ringing; media address for the caller.
    Ringing {
        /// The callee's media address.
        callee_media: SocketAddr,
    },
    /// The callee went offline meanwhile: the call is cached for it instead.
    CalleeGone,
    /// The caller went away meanwhile: the call is missed.
    CallerGone,
}

/// The result of registering a session.
#[derive(Debug)]
pub struct Installed {
    /// The session this one replaced (same user, older id): told to close.
    pub replaced: bool,
    /// A call the replaced session was in, now ended.
    pub ended: Option<Ended>,
}

/// Sessions and live calls.
pub struct Registry {
    inner: Mutex<Inner>,
    next_session_id: AtomicU64,
    next_call_id: AtomicU64,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<UserId, Session>,
    calls: HashMap<CallId, LiveCall>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// Sends to a session without waiting; a full or closed queue means the session is
/// stuck or leaving, and its own connection task will clean up.
fn push(session: &Session, msg: ServerMsg) {
    if session.push.try_send(Box::new(msg)).is_err() {
        tracing::debug!(
            session_id = session.session_id,
            "push queue full or closed; dropping"
        );
    }
}

impl Inner {
    fn push_to(&self, user: UserId, event: Event) {
        if let Some(s) = self.sessions.get(&user) {
            push(s, ServerMsg::Event(event));
        }
    }

    fn clear_slot(&mut self, user: UserId, call_id: CallId) {
        if let Some(s) = self.sessions.get_mut(&user) {
            if s.call == Some(call_id) {
                s.call = None;
            }
        }
    }

    /// Removes a call, clears both parties' slots and tells them why it ended.
    fn end(
        &mut self,
        call_id: CallId,
        outcome: Outcome,
        tell_caller: Option<EndReason>,
        tell_callee: Option<EndReason>,
    ) -> Option<Ended> {
        let call = self.calls.remove(&call_id)?;
        if let Some(t) = &call.timer {
            t.abort();
        }
        self.clear_slot(call.caller, call_id);
        self.clear_slot(call.callee, call_id);
        if let Some(reason) = tell_caller {
            self.push_to(call.caller, Event::CallEnded { call_id, reason });
        }
        if let Some(reason) = tell_callee {
            self.push_to(call.callee, Event::CallEnded { call_id, reason });
        }
        Some(Ended {
            call_id,
            caller: call.caller,
            callee: call.callee,
            outcome,
            answered_at_ms: call.answered_at_ms,
        })
    }

    /// A party's session is gone: end or flag its call.
    fn party_lost(&mut self, user: UserId, call_id: CallId) -> Option<Ended> {
        let call = self.calls.get_mut(&call_id)?;
        let is_caller = call.caller == user;
        match &mut call.state {
            CallState::Recording {
                caller_gone,
                callee_gone,
            } => {
                if is_caller {
                    *caller_gone = true;
                } else {
                    *callee_gone = true;
                }
                None
            }
            CallState::Ringing => {
                let (to_caller, to_callee) = if is_caller {
                    (None, Some(EndReason::PeerLost))
                } else {
                    (Some(EndReason::PeerLost), None)
                };
                self.end(call_id, Outcome::Missed, to_caller, to_callee)
            }
            CallState::Active => {
                let (to_caller, to_callee) = if is_caller {
                    (None, Some(EndReason::PeerLost))
                } else {
                    (Some(EndReason::PeerLost), None)
                };
                self.end(call_id, Outcome::Answered, to_caller, to_callee)
            }
        }
    }

    /// The live call `call_id`, checking that `user` (in session `session_id`) is a
    /// party of it in the current session.
    /// The call `call_id` if it is ringing at `user` (the callee), for answer and reject.
    fn ringing_at(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
    ) -> Result<&LiveCall, WireError> {
        let call = self.call_of(user, session_id, call_id)?;
        if call.callee != user || call.state != CallState::Ringing {
            return Err(err(
                ErrorCode::NO_SUCH_CALL,
                format!("call {call_id} is not ringing on this TV"),
            ));
        }
        Ok(call)
    }

    fn call_of(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
    ) -> Result<&LiveCall, WireError> {
        let current = self
            .sessions
            .get(&user)
            .is_some_and(|s| s.session_id == session_id);
        if !current {
            return Err(err(
                ErrorCode::NOT_REGISTERED,
                "this session is no longer current",
            ));
        }
        match self.calls.get(&call_id) {
            Some(c)
                if (c.caller == user || c.callee == user)
                    && !matches!(c.state, CallState::Recording { .. }) =>
            {
                Ok(c)
            }
            _ => Err(err(
                ErrorCode::NO_SUCH_CALL,
                format!("no call {call_id} in progress for user {user}"),
            )),
        }
    }
}

impl Registry {
    /// An empty registry whose new ids start above the given watermarks.
    pub fn new(max_session_id: u64, max_call_id: CallId) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            next_session_id: AtomicU64::new(max_session_id.saturating_add(1)),
            next_call_id: AtomicU64::new(max_call_id.saturating_add(1)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than stopping the whole server would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh session id, larger than every one used before.
    pub fn new_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Number of connected (registered) TVs.
    pub fn online(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Number of calls ringing or in progress.
    pub fn live_calls(&self) -> usize {
        self.lock().calls.len()
    }

    /// Installs a registered session. A session of the same user with a smaller id is
    /// replaced (told to close, its call ended); a larger one wins and this one is
    /// refused.
    pub fn install(
        &self,
        user: UserId,
        session_id: u64,
        media: SocketAddr,
        push_tx: PushTx,
    ) -> Result<Installed, WireError> {
        let mut inner = self.lock();
        let mut installed = Installed {
            replaced: false,
            ended: None,
        };
        if let Some(old) = inner.sessions.get(&user) {
            if old.session_id > session_id {
                return Err(err(
                    ErrorCode::SESSION_REPLACED,
                    "a newer registration of this user is already active",
                ));
            }
            push(
                old,
                ServerMsg::Closing(err(
                    ErrorCode::SESSION_REPLACED,
                    "this TV registered again on another connection",
                )),
            );
            installed.replaced = true;
            if let Some(call_id) = old.call {
                installed.ended = inner.party_lost(user, call_id);
            }
        }
        inner.sessions.insert(
            user,
            Session {
                session_id,
                media,
                push: push_tx,
                call: None,
            },
        );
        Ok(installed)
    }

    /// Removes the session if it is still the user's current one. Returns `None` when
    /// it was not (replaced: nothing to record), else the call it ended, if any.
    pub fn remove(&self, user: UserId, session_id: u64) -> Option<Option<Ended>> {
        let mut inner = self.lock();
        match inner.sessions.get(&user) {
            Some(s) if s.session_id == session_id => {}
            _ => return None,
        }
        let session = inner.sessions.remove(&user)?;
        Some(
            session
                .call
                .and_then(|call_id| inner.party_lost(user, call_id)),
        )
    }

    /// Decides a dial from `caller` (in `session_id`) to `callee`.
    pub fn plan_dial(
        &self,
        caller: UserId,
        session_id: u64,
        callee: UserId,
        now_ms: UnixMillis,
    ) -> Result<DialPlan, WireError> {
        if caller == callee {
            return Err(err(ErrorCode::INVALID_ARGUMENT, "a TV cannot call itself"));
        }
        let mut inner = self.lock();
        let caller_media = match inner.sessions.get(&caller) {
            Some(s) if s.session_id == session_id => {
                if let Some(c) = s.call {
                    return Err(err(
                        ErrorCode::ALREADY_IN_CALL,
                        format!("this TV is already in call {c}"),
                    ));
                }
                s.media
            }
            _ => {
                return Err(err(
                    ErrorCode::NOT_REGISTERED,
                    "this session is no longer current",
                ))
            }
        };
        let call_id = self.next_call_id.fetch_add(1, Ordering::Relaxed);
        let Some(callee_session) = inner.sessions.get_mut(&callee) else {
            return Ok(DialPlan::Offline { call_id });
        };
        if callee_session.call.is_some() {
            return Ok(DialPlan::Busy { call_id });
        }
        callee_session.call = Some(call_id);
        if let Some(s) = inner.sessions.get_mut(&caller) {
            s.call = Some(call_id);
        }
        inner.calls.insert(
            call_id,
            LiveCall {
                caller,
                callee,
                caller_media,
                placed_at_ms: now_ms,
                answered_at_ms: None,
                state: CallState::Recording {
                    caller_gone: false,
                    callee_gone: false,
                },
                timer: None,
            },
        );
        Ok(DialPlan::Ring { call_id })
    }

    /// The record of a `Ring` plan is written: ring the callee now, unless a party left.
    pub fn start_ringing(&self, call_id: CallId) -> RingStart {
        let mut inner = self.lock();
        let Some(call) = inner.calls.get_mut(&call_id) else {
            // Ended by a shutdown while recording.
            return RingStart::CallerGone;
        };
        match call.state {
            CallState::Recording {
                callee_gone: true, ..
            } => {
                inner.end(call_id, Outcome::Cached, None, None);
                RingStart::CalleeGone
            }
            CallState::Recording {
                caller_gone: true, ..
            } => {
                inner.end(call_id, Outcome::Missed, None, None);
                RingStart::CallerGone
            }
            _ => {
                call.state = CallState::Ringing;
                let (caller, callee, caller_media, at) = (
                    call.caller,
                    call.callee,
                    call.caller_media,
                    call.placed_at_ms,
                );
                match inner.sessions.get(&callee) {
                    Some(s) => {
                        let callee_media = s.media;
                        push(
                            s,
                            ServerMsg::Event(Event::IncomingCall {
                                call_id,
                                caller,
                                caller_media,
                                call_date_ms: at,
                            }),
                        );
                        RingStart::Ringing { callee_media }
                    }
                    // Unreachable while the callee's slot holds this call; handled anyway.
                    None => {
                        inner.end(call_id, Outcome::Cached, None, None);
                        RingStart::CalleeGone
                    }
                }
            }
        }
    }

    /// Writing the record of a `Ring` plan failed: forget the call.
    pub fn abandon(&self, call_id: CallId) {
        self.lock().end(call_id, Outcome::Missed, None, None);
    }

    /// Remembers the ring-timeout task of a ringing call (aborted if already over).
    pub fn set_timer(&self, call_id: CallId, timer: AbortHandle) {
        let mut inner = self.lock();
        match inner.calls.get_mut(&call_id) {
            Some(c) if c.state == CallState::Ringing => c.timer = Some(timer),
            _ => timer.abort(),
        }
    }

    /// The callee answers a ringing call. Returns the answer time to record.
    pub fn answer(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
        now_ms: UnixMillis,
    ) -> Result<Ended, WireError> {
        let mut inner = self.lock();
        let call = inner.ringing_at(user, session_id, call_id)?;
        let caller = call.caller;
        let Some(call) = inner.calls.get_mut(&call_id) else {
            return Err(err(ErrorCode::NO_SUCH_CALL, "call vanished"));
        };
        call.state = CallState::Active;
        call.answered_at_ms = Some(now_ms);
        if let Some(t) = call.timer.take() {
            t.abort();
        }
        inner.push_to(caller, Event::CallAnswered { call_id });
        Ok(Ended {
            call_id,
            caller,
            callee: user,
            outcome: Outcome::Answered,
            answered_at_ms: Some(now_ms),
        })
    }

    /// The callee rejects a ringing call.
    pub fn reject(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
    ) -> Result<Ended, WireError> {
        let mut inner = self.lock();
        inner.ringing_at(user, session_id, call_id)?;
        inner
            .end(call_id, Outcome::Rejected, Some(EndReason::Rejected), None)
            .ok_or_else(|| err(ErrorCode::NO_SUCH_CALL, "call vanished"))
    }

    /// A party hangs up. A caller hanging up a ringing call cancels it (missed for the
    /// callee); a callee hanging up a ringing call rejects it.
    pub fn hang_up(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
    ) -> Result<Ended, WireError> {
        let mut inner = self.lock();
        let call = inner.call_of(user, session_id, call_id)?;
        let by_caller = call.caller == user;
        let hung_up = Some(EndReason::HungUp { by: user });
        let ended = match (call.state, by_caller) {
            (CallState::Ringing, true) => inner.end(call_id, Outcome::Missed, None, hung_up),
            (CallState::Ringing, false) => {
                inner.end(call_id, Outcome::Rejected, Some(EndReason::Rejected), None)
            }
            (_, true) => inner.end(call_id, Outcome::Answered, None, hung_up),
            (_, false) => inner.end(call_id, Outcome::Answered, hung_up, None),
        };
        ended.ok_or_else(|| err(ErrorCode::NO_SUCH_CALL, "call vanished"))
    }

    /// The ring timeout of `call_id` expired.
    pub fn ring_timeout(&self, call_id: CallId) -> Option<Ended> {
        let mut inner = self.lock();
        let call = inner.calls.get_mut(&call_id)?;
        if call.state != CallState::Ringing {
            return None;
        }
        // This runs on the timer task itself: do not abort it while it records the end.
        call.timer = None;
        inner.end(
            call_id,
            Outcome::Missed,
            Some(EndReason::NoAnswer),
            Some(EndReason::NoAnswer),
        )
    }

    /// Ends every live call (server shutdown), telling both parties.
    pub fn end_all(&self) -> Vec<Ended> {
        let mut inner = self.lock();
        let ids: Vec<CallId> = inner.calls.keys().copied().collect();
        let mut out = Vec::with_capacity(ids.len());
        for call_id in ids {
            let outcome = match inner.calls.get(&call_id).map(|c| c.state) {
                Some(CallState::Active) => Outcome::Answered,
                Some(CallState::Recording { .. }) => continue, // the dial finishes it
                _ => Outcome::Missed,
            };
            let r = Some(EndReason::ServerShutdown);
            out.extend(inner.end(call_id, outcome, r, r));
        }
        out
    }

    /// Pushes an event to a user's session, if connected.
    pub fn notify(&self, user: UserId, event: Event) {
        self.lock().push_to(user, event);
    }

    /// Whether the user is connected now.
    pub fn is_online(&self, user: UserId) -> bool {
        self.lock().sessions.contains_key(&user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn session(reg: &Registry, user: UserId) -> (u64, PushRx) {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let sid = reg.new_session_id();
        reg.install(user, sid, addr(user as u16), tx)
            .expect("installs");
        (sid, rx)
    }

    fn next_event(rx: &mut PushRx) -> Option<ServerMsg> {
        rx.try_recv().ok().map(|b| *b)
    }

    #[test]
    fn ring_answer_hang_up() {
        let reg = Registry::new(0, 0);
        let (sa, mut ra) = session(&reg, 1);
        let (sb, mut rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert!(
            next_event(&mut rb).is_none(),
            "nothing rings before the record is written"
        );
        assert_eq!(
            reg.start_ringing(call_id),
            RingStart::Ringing {
                callee_media: addr(2)
            }
        );
        assert!(matches!(
            next_event(&mut rb),
            Some(ServerMsg::Event(Event::IncomingCall { caller: 1, .. }))
        ));
        // A third party dialling either is busy.
        let (sc, _rc) = session(&reg, 3);
        assert!(matches!(
            reg.plan_dial(3, sc, 2, 0),
            Ok(DialPlan::Busy { .. })
        ));
        // Only the callee may answer.
        assert_eq!(
            reg.answer(1, sa, call_id, 5).map_err(|e| e.code),
            Err(ErrorCode::NO_SUCH_CALL)
        );
        reg.answer(2, sb, call_id, 5).expect("answer");
        assert_eq!(
            next_event(&mut ra),
            Some(ServerMsg::Event(Event::CallAnswered { call_id }))
        );
        let ended = reg.hang_up(2, sb, call_id).expect("hang up");
        assert_eq!(ended.outcome, Outcome::Answered);
        assert_eq!(
            next_event(&mut ra),
            Some(ServerMsg::Event(Event::CallEnded {
                call_id,
                reason: EndReason::HungUp { by: 2 }
            }))
        );
        assert_eq!(reg.live_calls(), 0);
        assert!(matches!(
            reg.plan_dial(1, sa, 2, 0),
            Ok(DialPlan::Ring { .. })
        ));
    }

    #[test]
    fn callee_leaving_while_recording_turns_call_into_cached() {
        let reg = Registry::new(0, 0);
        let (sa, _ra) = session(&reg, 1);
        let (sb, _rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert_eq!(reg.remove(2, sb), Some(None));
        assert_eq!(reg.start_ringing(call_id), RingStart::CalleeGone);
        assert_eq!(reg.live_calls(), 0);
        // The caller is free again.
        assert!(matches!(
            reg.plan_dial(1, sa, 2, 0),
            Ok(DialPlan::Offline { .. })
        ));
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
        let (tx, _rx) = mpsc::channel(PUSH_QUEUE);
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
        let (tx, _rx) = mpsc::channel(PUSH_QUEUE);
        assert!(reg.install(2, 1, addr(9), tx).is_err());
    }

    #[test]
    fn ring_timeout_only_ends_ringing_calls() {
        let reg = Registry::new(0, 0);
        let (sa, _ra) = session(&reg, 1);
        let (sb, _rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert_eq!(reg.ring_timeout(call_id), None, "not ringing yet");
        reg.start_ringing(call_id);
        reg.answer(2, sb, call_id, 1).expect("answer");
        assert_eq!(
            reg.ring_timeout(call_id),
            None,
            "answered calls do not time out"
        );
    }
}
