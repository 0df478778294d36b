//! The live state of the server: which TVs are connected now (sessions) and which calls
//! are being placed, ringing or in progress.
//!
//! The registry is the in-memory mirror of what is online; `user_property` is written
//! through before a session appears here, so the two never disagree for long. It does no
//! I/O and never awaits: every method takes the one short lock, changes state and pushes
//! events to sessions with non-blocking sends. Methods that end a call return an
//! [`Ended`] describing the record update the caller (a handler) must write.
//!
//! By job:
//! - `sessions.rs`: who is online (user → session id, media address, push queue, call
//!   slot); install, replace by a newer session, drop if still current.
//! - `calls.rs`: the live-call state machine (`Recording → Ringing → Active`) as a pure
//!   function of (call, input) returning the next state and the events to push.
//! - `push.rs`: the push queue's types and depth, and the one non-blocking send.
//! - `timers.rs`: the ring timers' handles and the rules that keep them in step.
//! - this file: the [`Registry`] façade, which owns the lock, turns requests into
//!   machine inputs and carries out each step (pushes, call slots, timers) in one place,
//!   `Inner::carry_out`.
//!
//! SRTP keys (SDES style, RFC 4568): a dial's key is kept with its live call and rides
//! in the callee's `IncomingCall`; an answer's key rides in the caller's `CallAnswered`.
//! They are held in memory only, never written, never logged, and dropped with the call.
//!
//! # Presence
//!
//! `presence.rs` has its own table and its own short lock: watched user → subscribers
//! (each a subscription with a clone of its session's [`PushTx`]), so delivering a change
//! needs no sessions lookup. The sessions table stays the only source of "who is
//! online": every façade method takes the lock through `Locked`, and the sessions it
//! installed, removed, put in or out of a call or into "do not disturb" are noted
//! (`Sessions::touched`); when the lock is released their states are numbered (still
//! under it) and handed to presence (after it). A change older than what presence holds
//! is dropped, so the order pushes leave in across threads does not matter. A new
//! subscription's states are read under presence's lock with this one taken inside it
//! (the only nesting, always in that order). Stand-ins for TVs on other nodes publish
//! nothing: a TV's own node publishes its states. Presence never touches calls or
//! timers and, like the rest, never awaits or touches the database.

mod calls;
pub mod presence;
mod push;
mod remote;
mod sessions;
mod timers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use shared_proto::{CallId, ErrorCode, Event, ServerMsg, UnixMillis, UserId, WireError};
use tokio::task::AbortHandle;

use crate::storage::Outcome;
pub use calls::MediaOffer;
use calls::{CallState, Input, LiveCall, Next, Party, Refused, Step};
use presence::{Change, Presence, PresenceConfig};
use sessions::{Session, Sessions};
use timers::RingTimers;

pub use calls::Ended;
pub use push::{channel as push_channel, PushRx, PushTx, PUSH_QUEUE};
pub use remote::{Notice, Outbox, RemoteParty, Reserve};

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
    /// Everything that changes together, behind the one short lock.
    inner: Mutex<Inner>,
    /// The next session id to hand out (above every id ever stored).
    next_session_id: AtomicU64,
    /// The next call id to hand out (above every id ever stored).
    next_call_id: AtomicU64,
    /// How far apart this node's call ids are (other nodes on the database take the
    /// ids between).
    call_id_stride: u64,
    /// Session ids follow the wall clock (a database shared by several nodes).
    session_ids_follow_clock: bool,
    /// Who watches whom (its own lock; see `presence.rs`).
    presence: Arc<Presence>,
}

/// The registry's lock, held: when it is released, the presence changes the operation
/// made are numbered (still under it) and handed to presence (after it).
struct Locked<'a> {
    guard: Option<MutexGuard<'a, Inner>>,
    presence: &'a Presence,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        // Present until drop.
        self.guard
            .as_deref()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.guard
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut inner) = self.guard.take() else {
            return;
        };
        if inner.sessions.touched.is_empty() {
            return;
        }
        let mut touched = std::mem::take(&mut inner.sessions.touched);
        if !self.presence.watching() {
            return;
        }
        touched.sort_unstable();
        touched.dedup();
        let at_ms = crate::clock::now_ms();
        let changes: Vec<Change> = touched
            .into_iter()
            .map(|user| {
                inner.version += 1;
                Change {
                    user,
                    conn: inner.sessions.conn(user),
                    version: inner.version,
                    at_ms,
                }
            })
            .collect();
        drop(inner);
        self.presence.publish(&changes, std::time::Instant::now());
    }
}

/// The state under the lock.
#[derive(Default)]
struct Inner {
    /// Who is online.
    sessions: Sessions,
    /// Calls being recorded, ringing or in progress.
    calls: HashMap<CallId, LiveCall>,
    /// Ring timers of ringing calls.
    timers: RingTimers,
    /// Where notices to other nodes go (several nodes only; see `remote.rs`).
    outbox: Option<remote::Outbox>,
    /// This node is draining: no new call starts here ([`Registry::drain`]).
    draining: bool,
    /// The number of the last presence change handed to presence.
    version: u64,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// A refused answer, reject or hang-up as the TV sees it.
fn refusal(r: Refused, user: UserId, call_id: CallId) -> WireError {
    match r {
        Refused::NotRinging => err(
            ErrorCode::NO_SUCH_CALL,
            format!("call {call_id} is not ringing on this TV"),
        ),
        Refused::NotAnnounced | Refused::AlreadyAnnounced => no_call(user, call_id),
    }
}

fn no_call(user: UserId, call_id: CallId) -> WireError {
    err(
        ErrorCode::NO_SUCH_CALL,
        format!("no call {call_id} in progress for user {user}"),
    )
}

fn not_current() -> WireError {
    err(
        ErrorCode::NOT_REGISTERED,
        "this session is no longer current",
    )
}

impl Inner {
    /// Carries out a step of call `call_id`: the new state or the end (the call removed,
    /// both parties' slots freed), the timer disarmed unless still ringing, and the
    /// step's events pushed. Returns the record update if the call ended.
    fn carry_out(&mut self, call_id: CallId, step: Step) -> Option<Ended> {
        let Step {
            next,
            to_caller,
            to_callee,
        } = step;
        let call = self.calls.get_mut(&call_id)?;
        let (caller, callee) = (call.caller, call.callee);
        let ended = call.ended_by(next);
        if let Next::Live(state) = next {
            call.state = state;
            if state != CallState::Ringing {
                self.timers.disarm(call_id);
            }
        }
        // Pushed before the slots are freed: a party on another node is reached
        // through its stand-in, which goes with the call.
        if let Some(event) = to_caller {
            self.sessions.push_event(caller, event);
        }
        if let Some(event) = to_callee {
            self.sessions.push_event(callee, event);
        }
        if let Next::Over { .. } = next {
            self.calls.remove(&call_id);
            self.timers.disarm(call_id);
            for user in [caller, callee] {
                if let Some(stand_in) = self.sessions.clear_call(user, call_id) {
                    self.released(user, &stand_in, call_id);
                }
            }
        }
        ended
    }

    /// Feeds `input` to call `call_id` and carries out the step; `None` if there is no
    /// such call or the input was refused.
    fn feed(&mut self, call_id: CallId, input: Input) -> Option<Ended> {
        let step = self.calls.get(&call_id)?.step(input).ok()?;
        self.carry_out(call_id, step)
    }

    /// A party's session is gone: end or flag its call.
    fn party_lost(&mut self, user: UserId, call_id: CallId) -> Option<Ended> {
        let party = self.calls.get(&call_id)?.party_of(user)?;
        self.feed(call_id, Input::Lost(party))
    }

    /// The live call `call_id` and `user`'s side of it, checking that `user` is in its
    /// current session `session_id` and a party of the call.
    fn party_in(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
    ) -> Result<(&LiveCall, Party), WireError> {
        if self.sessions.current(user, session_id).is_none() {
            return Err(not_current());
        }
        self.calls
            .get(&call_id)
            .and_then(|c| Some((c, c.party_of(user)?)))
            .ok_or_else(|| no_call(user, call_id))
    }

    /// Feeds a request of `user` about its call to the machine.
    fn request(
        &mut self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
        input: impl FnOnce(Party) -> Input,
    ) -> Result<(Step, UserId), WireError> {
        let (call, party) = self.party_in(user, session_id, call_id)?;
        let step = call
            .step(input(party))
            .map_err(|r| refusal(r, user, call_id))?;
        Ok((step, call.caller))
    }

    /// Decides a dial (see [`Registry::plan_dial_with_key`]); `call_id` makes the id once
    /// the caller may dial.
    fn plan(
        &mut self,
        caller: UserId,
        session_id: u64,
        callee: UserId,
        offer: MediaOffer,
        now_ms: UnixMillis,
        call_id: impl FnOnce() -> CallId,
    ) -> Result<DialPlan, WireError> {
        let caller_media = self.caller_free(caller, session_id)?;
        if self.draining {
            return Err(err(
                ErrorCode::SHUTTING_DOWN,
                "this server is draining: connect again, to another one, and call from there",
            ));
        }
        let call_id = call_id();
        let callee_media = match self.sessions.get(callee) {
            None => return Ok(DialPlan::Offline { call_id }),
            // In a call, or "do not disturb": the call is missed (busy), not rung.
            Some(s) if s.call.is_some() || s.dnd => return Ok(DialPlan::Busy { call_id }),
            Some(s) => s.media,
        };
        self.sessions.set_call(callee, call_id);
        self.sessions.set_call(caller, call_id);
        self.calls.insert(
            call_id,
            LiveCall::new(
                call_id,
                (caller, caller_media),
                (callee, callee_media),
                now_ms,
                offer,
            ),
        );
        Ok(DialPlan::Ring { call_id })
    }

    /// The caller's media address, if it is in its current session `session_id` and in
    /// no call.
    fn caller_free(&self, caller: UserId, session_id: u64) -> Result<SocketAddr, WireError> {
        let caller_session = self
            .sessions
            .current(caller, session_id)
            .ok_or_else(not_current)?;
        if let Some(c) = caller_session.call {
            return Err(err(
                ErrorCode::ALREADY_IN_CALL,
                format!("this TV is already in call {c}"),
            ));
        }
        Ok(caller_session.media)
    }
}

impl Registry {
    /// An empty registry whose new ids start above the given watermarks.
    pub fn new(max_session_id: u64, max_call_id: CallId) -> Self {
        Self::with_watermarks(&crate::storage::Watermarks {
            max_session_id,
            max_call_id,
            ..crate::storage::Watermarks::default()
        })
    }

    /// An empty registry handing out the store's ids: call ids from
    /// [`crate::storage::Watermarks::first_call_id`] in steps of its stride (several
    /// nodes on one database never collide), session ids above every stored one.
    pub fn with_watermarks(w: &crate::storage::Watermarks) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            next_session_id: AtomicU64::new(w.max_session_id.saturating_add(1)),
            next_call_id: AtomicU64::new(w.first_call_id()),
            call_id_stride: w.call_id_stride.max(1),
            session_ids_follow_clock: w.call_id_stride > 1,
            presence: Arc::new(Presence::new(PresenceConfig {
                several_nodes: w.call_id_stride > 1,
                ..PresenceConfig::default()
            })),
        }
    }

    /// The same registry with presence configured by `cfg`.
    pub fn with_presence(mut self, cfg: PresenceConfig) -> Self {
        self.presence = Arc::new(Presence::new(cfg));
        self
    }

    /// Who watches whom.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    fn raw_lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than stopping the whole server would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> Locked<'_> {
        Locked {
            guard: Some(self.raw_lock()),
            presence: &self.presence,
        }
    }

    /// Starts (or replaces) the presence subscription of `user`'s current session
    /// `session_id` to the users of `rows` (read from the store just before); `None` if
    /// that session is no longer current.
    pub fn subscribe(
        &self,
        user: UserId,
        session_id: u64,
        rows: &[crate::storage::PresenceRow],
        now_ms: UnixMillis,
    ) -> Option<shared_proto::Subscribed> {
        let push = self
            .raw_lock()
            .sessions
            .current(user, session_id)?
            .push_tx();
        Some(
            self.presence
                .subscribe(user, session_id, push, rows, now_ms, |users| {
                    // Under presence's lock (its order: presence, then this one). Nothing here
                    // changes, so nothing is published from under it.
                    let inner = self.raw_lock();
                    let here = users
                        .iter()
                        .filter(|u| inner.sessions.contains(**u))
                        .map(|u| (*u, inner.sessions.conn(*u)))
                        .collect();
                    (here, inner.version)
                }),
        )
    }

    /// Sets "do not disturb" on `user`'s session `session_id`; whether it is current.
    pub fn set_dnd(&self, user: UserId, session_id: u64, on: bool) -> bool {
        self.lock().sessions.set_dnd(user, session_id, on)
    }

    /// A fresh session id, larger than every one this node used before. On a database
    /// several nodes may share, also larger than any made earlier in time by another
    /// node: at least the wall clock in milliseconds times 1,024 (below 2^53 until the
    /// year 2248), so "the newer registration wins" holds when a TV moves between nodes.
    pub fn new_session_id(&self) -> u64 {
        let floor = if self.session_ids_follow_clock {
            u64::try_from(crate::clock::now_ms()).unwrap_or(0) << 10
        } else {
            0
        };
        let mut current = self.next_session_id.load(Ordering::Relaxed);
        loop {
            let id = current.max(floor);
            match self.next_session_id.compare_exchange_weak(
                current,
                id.saturating_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return id,
                Err(seen) => current = seen,
            }
        }
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
        let old = inner
            .sessions
            .install(user, Session::new(session_id, media, push_tx))
            .map_err(|_| {
                err(
                    ErrorCode::SESSION_REPLACED,
                    "a newer registration of this user is already active",
                )
            })?;
        let Some(old) = old else {
            return Ok(Installed {
                replaced: false,
                ended: None,
            });
        };
        old.push(ServerMsg::Closing(err(
            ErrorCode::SESSION_REPLACED,
            "this TV registered again on another connection",
        )));
        let ended = inner.session_gone(user, &old);
        Ok(Installed {
            replaced: true,
            ended,
        })
    }

    /// `user` registered on another node with `newer`: its session here, if older, is
    /// told `SESSION_REPLACED` and removed (its link's end then records nothing). Returns
    /// `None` if there was none to replace, else the call it ended, if any.
    pub fn replaced_elsewhere(&self, user: UserId, newer: u64) -> Option<Option<Ended>> {
        let mut inner = self.lock();
        let current = inner.sessions.get(user)?.session_id;
        if current >= newer {
            return None;
        }
        let old = inner.sessions.remove_current(user, current)?;
        // It is online on the other node: not an offline change to publish from here.
        inner.sessions.touched.retain(|u| *u != user);
        old.push(ServerMsg::Closing(err(
            ErrorCode::SESSION_REPLACED,
            "this TV registered again on another node",
        )));
        Some(inner.session_gone(user, &old))
    }

    /// Removes the session if it is still the user's current one. Returns `None` when
    /// it was not (replaced: nothing to record), else the call it ended, if any.
    pub fn remove(&self, user: UserId, session_id: u64) -> Option<Option<Ended>> {
        let mut inner = self.lock();
        let session = inner.sessions.remove_current(user, session_id)?;
        Some(inner.session_gone(user, &session))
    }

    /// Decides a dial from `caller` (in `session_id`) to `callee` that carries no SRTP
    /// key (plain RTP, an older agent): [`Registry::plan_dial_with_key`] with `None`.
    pub fn plan_dial(
        &self,
        caller: UserId,
        session_id: u64,
        callee: UserId,
        now_ms: UnixMillis,
    ) -> Result<DialPlan, WireError> {
        self.plan_dial_with_key(caller, session_id, callee, MediaOffer::default(), now_ms)
    }

    /// Decides a dial from `caller` (in `session_id`) to `callee`. A live call keeps the
    /// caller's media offer (SRTP sending key, ICE) for the ring
    /// ([`Registry::start_ringing`]); a busy or offline plan drops it.
    pub fn plan_dial_with_key(
        &self,
        caller: UserId,
        session_id: u64,
        callee: UserId,
        offer: MediaOffer,
        now_ms: UnixMillis,
    ) -> Result<DialPlan, WireError> {
        if caller == callee {
            return Err(err(ErrorCode::INVALID_ARGUMENT, "a TV cannot call itself"));
        }
        self.lock()
            .plan(caller, session_id, callee, offer, now_ms, || {
                self.new_call_id()
            })
    }

    /// A fresh call id, never used by this node or any other on its database.
    fn new_call_id(&self) -> CallId {
        self.next_call_id
            .fetch_add(self.call_id_stride, Ordering::Relaxed)
    }

    /// The record of a `Ring` plan is written: ring the callee now, unless a party left.
    /// Called once per plan; a repeated call changes nothing and answers `Ringing`.
    pub fn start_ringing(&self, call_id: CallId) -> RingStart {
        let mut inner = self.lock();
        let Some(call) = inner.calls.get(&call_id) else {
            // Forgotten while recording (abandoned).
            return RingStart::CallerGone;
        };
        let callee_media = call.callee_media;
        // The callee's session that was planned with is still current (and so still
        // holds this call in its slot).
        let callee_online = inner
            .sessions
            .get(call.callee)
            .is_some_and(|s| s.call == Some(call_id));
        let step = match call.step(Input::Recorded { callee_online }) {
            Ok(step) => step,
            Err(_) => return RingStart::Ringing { callee_media },
        };
        match inner.carry_out(call_id, step).map(|e| e.outcome) {
            None => RingStart::Ringing { callee_media },
            Some(Outcome::Cached) => RingStart::CalleeGone,
            Some(_) => RingStart::CallerGone,
        }
    }

    /// Writing the record of a `Ring` plan failed: forget the call (if still
    /// `Recording`; a call that rang already is not the dial's to forget).
    pub fn abandon(&self, call_id: CallId) {
        self.lock().feed(call_id, Input::RecordFailed);
    }

    /// Remembers the ring-timeout task of a ringing call (aborted if already over).
    pub fn set_timer(&self, call_id: CallId, timer: AbortHandle) {
        let mut inner = self.lock();
        match inner.calls.get(&call_id) {
            Some(c) if c.state == CallState::Ringing => inner.timers.arm(call_id, timer),
            _ => timer.abort(),
        }
    }

    /// The callee answers a ringing call without an SRTP key (plain RTP):
    /// [`Registry::answer_with_key`] with `None`.
    pub fn answer(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
        now_ms: UnixMillis,
    ) -> Result<Ended, WireError> {
        self.answer_with_key(user, session_id, call_id, MediaOffer::default(), now_ms)
    }

    /// The callee answers a ringing call; its media offer (SRTP sending key, ICE) goes
    /// to the caller in `CallAnswered`. Returns the answer time to record.
    pub fn answer_with_key(
        &self,
        user: UserId,
        session_id: u64,
        call_id: CallId,
        offer: MediaOffer,
        now_ms: UnixMillis,
    ) -> Result<Ended, WireError> {
        let mut inner = self.lock();
        let (step, caller) = inner.request(user, session_id, call_id, |by| Input::Answer {
            by,
            at_ms: now_ms,
            offer,
        })?;
        inner.carry_out(call_id, step);
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
        let (step, _) = inner.request(user, session_id, call_id, |by| Input::Reject { by })?;
        inner
            .carry_out(call_id, step)
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
        let (step, _) = inner.request(user, session_id, call_id, |by| Input::HangUp { by })?;
        inner
            .carry_out(call_id, step)
            .ok_or_else(|| err(ErrorCode::NO_SUCH_CALL, "call vanished"))
    }

    /// The ring timeout of `call_id` expired.
    pub fn ring_timeout(&self, call_id: CallId) -> Option<Ended> {
        let mut inner = self.lock();
        let step = inner.calls.get(&call_id)?.step(Input::RingTimeout).ok()?;
        // This runs on the timer task itself: do not abort it while it records the end.
        inner.timers.fired(call_id);
        inner.carry_out(call_id, step)
    }

    /// Ends every live call (server shutdown), telling both parties. Calls still being
    /// recorded are left for their dial to finish.
    pub fn end_all(&self) -> Vec<Ended> {
        let mut inner = self.lock();
        let ids: Vec<CallId> = inner.calls.keys().copied().collect();
        ids.into_iter()
            .filter_map(|call_id| inner.feed(call_id, Input::Shutdown))
            .collect()
    }

    /// Pushes an event to a user's session, if connected (here, or in a call with a
    /// TV here). Whether it was.
    pub fn notify(&self, user: UserId, event: Event) -> bool {
        self.lock().sessions.push_event(user, event)
    }

    /// Whether the user is connected now.
    pub fn is_online(&self, user: UserId) -> bool {
        self.lock().sessions.contains(user)
    }
}

/// Helpers for the registry's unit tests, shared by its modules.
#[cfg(test)]
mod testing {
    use std::net::SocketAddr;

    use shared_proto::{CallId, ServerMsg, UserId};

    use super::{DialPlan, PushRx, Registry, RingStart};

    /// A loopback address with this port.
    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Registers `user` in a fresh session whose media port is the user id.
    pub fn session(reg: &Registry, user: UserId) -> (u64, PushRx) {
        let (tx, rx) = crate::registry::push_channel();
        let sid = reg.new_session_id();
        reg.install(user, sid, addr(user as u16), tx)
            .expect("installs");
        (sid, rx)
    }

    /// The next queued push, if any.
    pub fn next_event(rx: &mut PushRx) -> Option<ServerMsg> {
        rx.try_recv().ok().map(|b| *b)
    }

    /// Registers both users and makes `caller` ring `callee`, the ring already taken
    /// off the callee's queue.
    pub fn ringing_call(
        reg: &Registry,
        caller: UserId,
        callee: UserId,
    ) -> (CallId, PushRx, PushRx) {
        let (sa, ra) = session(reg, caller);
        let (_sb, mut rb) = session(reg, callee);
        let DialPlan::Ring { call_id } = reg.plan_dial(caller, sa, callee, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert!(matches!(
            reg.start_ringing(call_id),
            RingStart::Ringing { .. }
        ));
        assert!(next_event(&mut rb).is_some(), "the callee rings");
        (call_id, ra, rb)
    }
}

#[cfg(test)]
mod tests {
    use shared_proto::EndReason;

    use super::testing::{addr, next_event, ringing_call, session};
    use super::*;

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
            Some(ServerMsg::Event(Event::CallAnswered {
                call_id,
                srtp: None,
                ice: None,
            }))
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
    fn media_offers_are_relayed_both_ways_kept_once_and_never_shown() {
        let key = |b: u8| shared_proto::SrtpKey {
            suite: shared_proto::SrtpSuite::AES_CM_128_HMAC_SHA1_80,
            key_salt: vec![b; 30],
        };
        let ice = |ufrag: &str| shared_proto::IceParams {
            ufrag: ufrag.into(),
            pwd: "secretsecretsecretsecret".into(),
            candidates: vec![shared_proto::IceCandidate {
                kind: shared_proto::CandidateKind::SERVER_REFLEXIVE,
                addr: "203.0.113.9:40000".parse().unwrap(),
                priority: 1,
                foundation: "1".into(),
            }],
        };
        let offer = |b: u8| MediaOffer {
            srtp: Some(key(b)),
            ice: Some(Box::new(ice(&format!("u{b:02x}x")))),
        };
        let reg = Registry::new(0, 0);
        let (sa, mut ra) = session(&reg, 1);
        let (sb, mut rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg
            .plan_dial_with_key(1, sa, 2, offer(0xA1), 0)
            .expect("plan")
        else {
            panic!("expected ring")
        };
        // What a log line or a panic message could show of the registry's state.
        let shown = format!("{:?}", reg.lock().calls);
        assert!(
            shown.contains("SrtpKey(AES_CM_128_HMAC_SHA1_80, 30 bytes)"),
            "{shown}"
        );
        assert!(!shown.contains("161"), "the key's bytes: {shown}");
        assert!(!shown.contains("secret"), "the ICE password: {shown}");
        assert!(matches!(
            reg.start_ringing(call_id),
            RingStart::Ringing { .. }
        ));
        match next_event(&mut rb) {
            Some(ServerMsg::Event(Event::IncomingCall { srtp, ice: i, .. })) => {
                assert_eq!(srtp, Some(key(0xA1)), "the ring carries the caller's key");
                assert_eq!(i, Some(Box::new(ice("ua1x"))), "and its candidates");
            }
            other => panic!("expected the ring, got {other:?}"),
        }
        // A retried dial starts ringing again: nothing new goes out.
        assert!(matches!(
            reg.start_ringing(call_id),
            RingStart::Ringing { .. }
        ));
        assert_eq!(next_event(&mut rb), None);
        reg.answer_with_key(2, sb, call_id, offer(0xB2), 5)
            .expect("answer");
        assert_eq!(
            next_event(&mut ra),
            Some(ServerMsg::Event(Event::CallAnswered {
                call_id,
                srtp: Some(key(0xB2)),
                ice: Some(Box::new(ice("ub2x"))),
            })),
            "the answer carries the callee's key and candidates"
        );
        reg.hang_up(1, sa, call_id).expect("hang up");
        assert!(reg.lock().calls.is_empty(), "the keys went with the call");
        // A busy dial keeps no key.
        let (_sc, _rc) = session(&reg, 3);
        let (sd, _rd) = session(&reg, 4);
        let DialPlan::Ring { call_id } = reg
            .plan_dial_with_key(1, sa, 2, offer(0xC3), 0)
            .expect("plan")
        else {
            panic!("expected ring")
        };
        assert!(matches!(
            reg.plan_dial_with_key(4, sd, 2, offer(0xD4), 0),
            Ok(DialPlan::Busy { .. })
        ));
        assert_eq!(reg.lock().calls.len(), 1);
        assert_eq!(reg.lock().calls[&call_id].caller_offer, offer(0xC3));
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
    fn caller_leaving_while_recording_turns_call_into_missed() {
        let reg = Registry::new(0, 0);
        let (sa, _ra) = session(&reg, 1);
        let (_sb, mut rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert_eq!(
            reg.remove(1, sa),
            Some(None),
            "only flagged: nothing to record yet"
        );
        assert_eq!(reg.start_ringing(call_id), RingStart::CallerGone);
        assert_eq!(next_event(&mut rb), None, "the callee never rang");
        assert_eq!(reg.live_calls(), 0);
        let (sc, _rc) = session(&reg, 3);
        assert!(
            matches!(reg.plan_dial(3, sc, 2, 0), Ok(DialPlan::Ring { .. })),
            "the callee is free again"
        );
    }

    #[test]
    fn requests_check_the_session_and_the_party_first() {
        let reg = Registry::new(0, 0);
        let (call_id, _ra, _rb) = ringing_call(&reg, 1, 2);
        let (sc, _rc) = session(&reg, 3);
        assert_eq!(
            reg.hang_up(3, sc, call_id).map_err(|e| e.code),
            Err(ErrorCode::NO_SUCH_CALL),
            "not a party"
        );
        assert_eq!(
            reg.answer(2, 999, call_id, 1).map_err(|e| e.code),
            Err(ErrorCode::NOT_REGISTERED),
            "not the current session"
        );
        assert_eq!(
            reg.reject(1, 1, call_id).map_err(|e| e.code),
            Err(ErrorCode::NO_SUCH_CALL),
            "the caller cannot reject"
        );
        assert_eq!(reg.live_calls(), 1, "refusals change nothing");
    }

    #[test]
    fn a_recording_call_is_invisible_to_its_parties_and_to_shutdown() {
        let reg = Registry::new(0, 0);
        let (sa, _ra) = session(&reg, 1);
        let (sb, _rb) = session(&reg, 2);
        let DialPlan::Ring { call_id } = reg.plan_dial(1, sa, 2, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert_eq!(
            reg.hang_up(1, sa, call_id).map_err(|e| e.code),
            Err(ErrorCode::NO_SUCH_CALL)
        );
        assert_eq!(
            reg.answer(2, sb, call_id, 1).map_err(|e| e.code),
            Err(ErrorCode::NO_SUCH_CALL)
        );
        assert!(reg.end_all().is_empty(), "the dial finishes it");
        assert_eq!(
            reg.plan_dial(1, sa, 3, 0).map_err(|e| e.code),
            Err(ErrorCode::ALREADY_IN_CALL)
        );
        reg.abandon(call_id);
        assert_eq!(reg.live_calls(), 0);
        assert_eq!(reg.start_ringing(call_id), RingStart::CallerGone);
    }

    #[test]
    fn starting_to_ring_twice_changes_nothing() {
        let reg = Registry::new(0, 0);
        let (call_id, _ra, mut rb) = ringing_call(&reg, 1, 2);
        assert_eq!(
            reg.start_ringing(call_id),
            RingStart::Ringing {
                callee_media: addr(2)
            }
        );
        assert_eq!(next_event(&mut rb), None, "no second ring");
        reg.abandon(call_id);
        assert_eq!(
            reg.live_calls(),
            1,
            "a ringing call is not the dial's to forget"
        );
    }

    #[test]
    fn shutdown_ends_ringing_and_active_calls() {
        let reg = Registry::new(0, 0);
        let (ringing, mut ra, _rb) = ringing_call(&reg, 1, 2);
        let (active, _rc, mut rd) = ringing_call(&reg, 3, 4);
        reg.answer(4, 4, active, 9).expect("answer");
        let mut ended = reg.end_all();
        ended.sort_by_key(|e| e.call_id);
        assert_eq!(
            ended
                .iter()
                .map(|e| (e.call_id, e.outcome, e.answered_at_ms))
                .collect::<Vec<_>>(),
            vec![
                (ringing, Outcome::Missed, None),
                (active, Outcome::Answered, Some(9))
            ]
        );
        let shutdown = |call_id| {
            Some(ServerMsg::Event(Event::CallEnded {
                call_id,
                reason: EndReason::ServerShutdown,
            }))
        };
        assert_eq!(next_event(&mut ra), shutdown(ringing));
        assert_eq!(next_event(&mut rd), shutdown(active));
        assert_eq!(reg.live_calls(), 0);
    }
}
