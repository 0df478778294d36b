//! Presence: who watches whom, every change pushed to the watchers, acknowledgements
//! awaited, and the recovery of section E when a notification fails.
//!
//! Its own table under its own short lock. The registry computes a user's connection
//! state (`Conn`: offline, online, busy) under its lock, numbers each change (`version`,
//! one counter for the node) and hands the changes here after releasing it
//! ([`Presence::publish`]); a change older than what an entry holds is dropped, so pushes
//! leaving in any order across threads never undo a newer state. A subscription's
//! starting states are taken with this lock held and the registry's taken inside it
//! ([`Presence::subscribe`]): every change numbered before that snapshot is in it, every
//! later one is published after. Lock order: this lock, then the registry's, never the
//! reverse (the registry publishes only after releasing its own).
//!
//! Each subscription (one per TV session) numbers its notifications and has at most one
//! in flight: changes made while one waits for its acknowledgement gather (the newest
//! per user) and go together when it comes, so a TV is never sent faster than it
//! acknowledges and a burst costs one round trip, not one per change (RFC 6665 lets a
//! notifier throttle the same way). A push that finds the TV's queue full stays here and
//! goes with the next sweep. A TV acknowledges cumulatively. A notification not acknowledged within the ack timeout,
//! or refused, fails the subscription ([`Presence::sweep`], [`Presence::ack`]): it is
//! deleted and the TV is sent [`Event::PresenceLost`] (section E's instant message), to
//! which it answers by subscribing again. The failures of one registration are counted
//! in a sliding window; the one that reaches the threshold applies the policy instead
//! (sign the TV out, or only drop the subscription) and raises an alarm ([`Failure`]).
//!
//! No I/O, no awaiting, no database: the store reads a subscription needs (privacy,
//! phone numbers, states of TVs not connected here) are done by the handler before, and
//! alarms are written by the caller of [`Presence::sweep`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shared_proto::{
    ErrorCode, Event, Presence as PresenceEntry, PresenceState, ServerMsg, Subscribed, UnixMillis,
    UserId, WireError,
};

use super::push::{self, PushTx};
use crate::storage::PresenceRow;

/// A user's connection state as this node's registry knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    /// Not connected here.
    Offline,
    /// Connected and free.
    Online,
    /// Connected, in a call or in "do not disturb".
    Busy,
}

/// A change the registry hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Whose state.
    pub user: UserId,
    /// The new state.
    pub conn: Conn,
    /// The registry's change number: larger is newer.
    pub version: u64,
    /// When.
    pub at_ms: UnixMillis,
}

/// What to do with a TV whose notifications keep failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Delete its registration: close its link with a reason (it is recorded offline),
    /// and raise an alarm.
    #[default]
    SignOut,
    /// Only drop its subscription (no recovery message), and raise an alarm.
    DropSubscription,
}

impl std::str::FromStr for FailurePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sign_out" => Ok(FailurePolicy::SignOut),
            "drop_subscription" => Ok(FailurePolicy::DropSubscription),
            other => Err(format!(
                "unknown presence failure policy {other:?} (sign_out or drop_subscription)"
            )),
        }
    }
}

/// The presence settings.
#[derive(Debug, Clone, Copy)]
pub struct PresenceConfig {
    /// A notification not acknowledged within this fails.
    pub ack_timeout: Duration,
    /// Failures of one registration within `window` at which `policy` applies.
    pub threshold: u32,
    /// The sliding window failures are counted in.
    pub window: Duration,
    /// What the threshold does.
    pub policy: FailurePolicy,
    /// Whether TVs may be on other nodes (a state read from the database then counts
    /// for a TV not connected here; on one node alone, not connected here is offline).
    pub several_nodes: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            ack_timeout: Duration::from_secs(5),
            threshold: 5,
            window: Duration::from_secs(600),
            policy: FailurePolicy::SignOut,
            several_nodes: false,
        }
    }
}

/// A failed notification, for the caller to log, count and (at the threshold) alarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The TV.
    pub user: UserId,
    /// Its session.
    pub session_id: u64,
    /// Why it failed.
    pub reason: String,
    /// Failures of this registration within the window, this one included.
    pub count: u32,
    /// What was done.
    pub action: FailureAction,
}

/// What a failure led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// Below the threshold: the TV was sent the recovery message.
    Recovered,
    /// The threshold, policy `sign_out`: the TV's link was told to close.
    SignedOut,
    /// The threshold, policy `drop_subscription`: the subscription was only dropped.
    Dropped,
}

/// What an acknowledgement was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckResult {
    /// Taken (or a repeat of one taken).
    Taken,
    /// For no subscription of this session, or a sequence number never sent: ignored.
    Unknown,
    /// The TV refused the notification: the subscription failed.
    Refused(Failure),
}

/// Counters the metrics read.
#[derive(Debug, Default)]
pub struct PresenceCounts {
    /// Notifications queued to TVs.
    pub notifications: AtomicU64,
    /// Changes carried in them (one notification may carry several).
    pub changes: AtomicU64,
}

/// The presence table.
pub struct Presence {
    table: Mutex<Table>,
    next_subscription: AtomicU64,
    cfg: PresenceConfig,
    /// Whether anyone watches anyone: a change is dropped without the lock when not.
    any: AtomicBool,
    /// For the metrics.
    pub counts: PresenceCounts,
}

/// One watched user.
struct Watched {
    /// Its connection state and the change number it is from (0: read from the
    /// database, older than any change).
    conn: Conn,
    version: u64,
    since_ms: Option<UnixMillis>,
    /// Offline shows as mobile.
    has_phone: bool,
    /// "Hide my state": every watcher is shown `not_allowed`.
    hidden: bool,
    /// Its subscribers.
    watchers: Vec<Watcher>,
}

/// One subscriber of a watched user.
#[derive(Debug, Clone, Copy)]
struct Watcher {
    /// The subscription.
    sub: u64,
    /// Allowed to see the state (not only refused because the user is hidden).
    allowed: bool,
}

/// One TV session's subscription.
struct Sub {
    user: UserId,
    session_id: u64,
    push: PushTx,
    /// Whom it watches.
    users: Vec<UserId>,
    /// Whom it asked for but may not see (told `not_allowed`): if one of them lets it
    /// later, it is asked to subscribe again ([`Presence::permissions_changed`]).
    refused: Vec<UserId>,
    /// The last notification's number, and the highest acknowledged.
    seq: u64,
    acked: u64,
    /// Changes not yet queued to the TV (its queue was full, or a burst still building).
    unsent: Vec<PresenceEntry>,
}

/// What a session's failures are counted against.
struct Recoveries {
    session_id: u64,
    at: VecDeque<Instant>,
}

#[derive(Default)]
struct Table {
    watched: HashMap<UserId, Watched>,
    subs: HashMap<u64, Sub>,
    /// user → its session's subscription (one per user: its current session).
    by_user: HashMap<UserId, u64>,
    /// Notifications awaiting acknowledgement: (deadline, subscription, seq), in
    /// deadline order (one fixed timeout).
    deadlines: VecDeque<(Instant, u64, u64)>,
    /// Subscriptions with changes left unsent.
    backlog: Vec<u64>,
    recoveries: HashMap<UserId, Recoveries>,
    /// Watched pairs, for the memory figure.
    pairs: usize,
}

impl Presence {
    /// An empty table.
    pub fn new(cfg: PresenceConfig) -> Self {
        Presence {
            table: Mutex::new(Table::default()),
            next_subscription: AtomicU64::new(1),
            cfg,
            any: AtomicBool::new(false),
            counts: PresenceCounts::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many subscriptions and (watcher, watched) pairs there are.
    pub fn sizes(&self) -> (usize, usize) {
        let t = self.lock();
        (t.subs.len(), t.pairs)
    }

    /// Starts (or replaces) the subscription of `user`'s session `session_id` to the
    /// users of `rows` (in order, duplicates dropped), whose privacy and phone facts
    /// the store just read. `local` gives, under this lock, the states of those users
    /// connected here and the registry's change number they are as of.
    pub fn subscribe(
        &self,
        user: UserId,
        session_id: u64,
        push: PushTx,
        rows: &[PresenceRow],
        now_ms: UnixMillis,
        local: impl FnOnce(&[UserId]) -> (HashMap<UserId, Conn>, u64),
    ) -> Subscribed {
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let mut t = self.lock();
        t.drop_user(user);
        // Before the snapshot: a change the registry makes after it must be published.
        self.any.store(true, Ordering::Relaxed);
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        let rows: Vec<&PresenceRow> = rows
            .iter()
            .filter(|r| r.user_id != user && seen.insert(r.user_id))
            .collect();
        let watchable: Vec<UserId> = rows
            .iter()
            .filter(|r| r.online.is_some() && (r.allowed || r.hidden))
            .map(|r| r.user_id)
            .collect();
        let (here, version) = local(&watchable);
        let mut states = Vec::with_capacity(rows.len());
        let mut users = Vec::with_capacity(watchable.len());
        let mut refused = Vec::new();
        for row in rows {
            let Some(online) = row.online else {
                states.push(entry(row.user_id, PresenceState::UNKNOWN, None));
                continue;
            };
            if !row.allowed && !row.hidden {
                states.push(entry(row.user_id, PresenceState::NOT_ALLOWED, None));
                refused.push(row.user_id);
                continue;
            }
            let w = t.watched.entry(row.user_id).or_insert_with(|| Watched {
                conn: Conn::Offline,
                version: 0,
                since_ms: None,
                has_phone: false,
                // A new entry starts as the store says; after that, `set_hidden` keeps
                // it (a subscription reading the store meanwhile must not pre-empt the
                // change that tells the other watchers).
                hidden: row.hidden,
                watchers: Vec::new(),
            });
            w.has_phone = row.has_phone;
            match here.get(&row.user_id) {
                Some(conn) => {
                    if w.conn != *conn || w.version == 0 {
                        w.since_ms = w.since_ms.or(Some(now_ms));
                    }
                    w.conn = *conn;
                    w.version = w.version.max(version);
                }
                // Not connected here. What this node saw last holds over the database
                // (which may not have the offline mark yet); else on one node alone it
                // is offline, with several the database says (another node's TV).
                None if w.version > 0 => {}
                None => {
                    w.conn = if online && self.cfg.several_nodes {
                        Conn::Online
                    } else {
                        Conn::Offline
                    };
                    w.since_ms = row.last_seen_ms;
                    // Every change numbered up to the snapshot is in it.
                    w.version = version;
                }
            }
            w.watchers.push(Watcher {
                sub: id,
                allowed: row.allowed,
            });
            let shown = if row.allowed {
                w.state()
            } else {
                PresenceState::NOT_ALLOWED
            };
            states.push(entry(row.user_id, shown, w.since_ms));
            users.push(row.user_id);
        }
        t.pairs += users.len();
        t.subs.insert(
            id,
            Sub {
                user,
                session_id,
                push,
                users,
                refused,
                seq: 0,
                acked: 0,
                unsent: Vec::new(),
            },
        );
        t.by_user.insert(user, id);
        self.any.store(!t.watched.is_empty(), Ordering::Relaxed);
        Subscribed {
            subscription: id,
            seq: 0,
            states,
        }
    }

    /// Ends the subscription of `user`'s session `session_id`, if it has one, and forgets
    /// the failures counted against that registration.
    pub fn unsubscribe(&self, user: UserId, session_id: u64) {
        let mut t = self.lock();
        if let Some(sub) = t.by_user.get(&user).and_then(|id| t.subs.get(id)) {
            if sub.session_id == session_id {
                t.drop_user(user);
            }
        }
        if t.recoveries
            .get(&user)
            .is_some_and(|r| r.session_id == session_id)
        {
            t.recoveries.remove(&user);
        }
        self.any.store(!t.watched.is_empty(), Ordering::Relaxed);
    }

    /// Whether anyone watches anything now (a hint: no lock taken).
    pub fn watching(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// The registry's changes: each watched user's entry takes a change newer than
    /// what it holds, and its allowed watchers are notified.
    pub fn publish(&self, changes: &[Change], now: Instant) {
        if changes.is_empty() || !self.watching() {
            return;
        }
        let mut t = self.lock();
        let mut touched = Vec::new();
        for c in changes {
            let Some(w) = t.watched.get_mut(&c.user) else {
                continue;
            };
            if c.version <= w.version {
                continue;
            }
            w.version = c.version;
            if w.conn == c.conn {
                continue;
            }
            w.conn = c.conn;
            w.since_ms = Some(c.at_ms);
            let shown = if w.hidden {
                continue;
            } else {
                entry(c.user, w.state(), w.since_ms)
            };
            let watchers: Vec<u64> = w
                .watchers
                .iter()
                .filter(|x| x.allowed)
                .map(|x| x.sub)
                .collect();
            for sub in watchers {
                t.queue_change(sub, shown, &mut touched);
            }
        }
        self.flush_subs(&mut t, touched, now);
    }

    /// `user` turned "hide my state" on or off: its watchers see `not_allowed`, or its
    /// state again. Returns the subscriptions refused only because it was hidden
    /// (subscription, watcher), for the caller to check again with the store
    /// ([`Presence::permit`]).
    pub fn set_hidden(&self, user: UserId, hidden: bool, now: Instant) -> Vec<(u64, UserId)> {
        let mut t = self.lock();
        let mut touched = Vec::new();
        let mut recheck = Vec::new();
        let Some(w) = t.watched.get_mut(&user) else {
            return recheck;
        };
        if w.hidden == hidden {
            return recheck;
        }
        w.hidden = hidden;
        let shown = if hidden {
            entry(user, PresenceState::NOT_ALLOWED, None)
        } else {
            entry(user, w.state(), w.since_ms)
        };
        let watchers = w.watchers.clone();
        for x in watchers {
            if x.allowed {
                t.queue_change(x.sub, shown, &mut touched);
            } else if !hidden {
                if let Some(s) = t.subs.get(&x.sub) {
                    recheck.push((x.sub, s.user));
                }
            }
        }
        self.flush_subs(&mut t, touched, now);
        recheck
    }

    /// Subscription `sub` may see `user` after all (checked again after `user` came out
    /// of hiding): it is told the state.
    pub fn permit(&self, sub: u64, user: UserId, now: Instant) {
        let mut t = self.lock();
        let Some(w) = t.watched.get_mut(&user) else {
            return;
        };
        let Some(x) = w.watchers.iter_mut().find(|x| x.sub == sub) else {
            return;
        };
        if x.allowed || w.hidden {
            return;
        }
        x.allowed = true;
        let shown = entry(user, w.state(), w.since_ms);
        let mut touched = Vec::new();
        t.queue_change(sub, shown, &mut touched);
        self.flush_subs(&mut t, touched, now);
    }

    /// Whether `user` has a phone number on file, as the store says now (read when it
    /// subscribes, so a number the operator set while it was off counts from its next
    /// power-on): watchers are then told `mobile`, not `offline`, when it goes.
    pub fn set_has_phone(&self, user: UserId, has_phone: bool) {
        if let Some(w) = self.lock().watched.get_mut(&user) {
            w.has_phone = has_phone;
        }
    }

    /// `owner`'s address book gained or lost `users`: those of them subscribed now that
    /// asked for `owner` (and were refused) or watch it are sent `PresenceLost` (not
    /// counted as a failure) so they subscribe again and learn what they may see now.
    /// Returns how many were asked.
    pub fn permissions_changed(&self, owner: UserId, users: &[UserId]) -> usize {
        let mut t = self.lock();
        let mut asked = 0;
        for u in users {
            let Some(&id) = t.by_user.get(u) else {
                continue;
            };
            let Some(s) = t.subs.get(&id) else {
                continue;
            };
            if !s.refused.contains(&owner) && !s.users.contains(&owner) {
                continue;
            }
            let (push, session_id) = (s.push.clone(), s.session_id);
            t.drop_user(*u);
            push::send(
                &push,
                session_id,
                ServerMsg::Event(Event::PresenceLost {
                    subscription: id,
                    reason: format!("user {owner} changed who may see them; subscribe again"),
                }),
            );
            asked += 1;
        }
        asked
    }

    /// An acknowledgement from `user`'s session `session_id`.
    pub fn ack(
        &self,
        user: UserId,
        session_id: u64,
        subscription: u64,
        seq: u64,
        status: ErrorCode,
        now: Instant,
    ) -> AckResult {
        let mut t = self.lock();
        let Some(sub) = t.subs.get_mut(&subscription) else {
            return AckResult::Unknown;
        };
        if sub.user != user || sub.session_id != session_id || seq > sub.seq || seq == 0 {
            return AckResult::Unknown;
        }
        if status != ErrorCode::OK {
            let reason = format!("the TV refused notification {seq} ({})", status.name());
            let failure = self.fail(&mut t, subscription, reason, now);
            self.any.store(!t.watched.is_empty(), Ordering::Relaxed);
            return failure.map_or(AckResult::Unknown, AckResult::Refused);
        }
        sub.acked = sub.acked.max(seq);
        // The one notification in flight is acknowledged: what gathered meanwhile goes.
        if sub.acked == sub.seq && !sub.unsent.is_empty() {
            self.flush_subs(&mut t, vec![subscription], now);
        }
        AckResult::Taken
    }

    /// Sends what waited for room in TVs' queues, and fails every subscription with a
    /// notification past its deadline. Run a few times a second.
    pub fn sweep(&self, now: Instant) -> Vec<Failure> {
        let mut t = self.lock();
        let backlog = std::mem::take(&mut t.backlog);
        self.flush_subs(&mut t, backlog, now);
        let mut failures = Vec::new();
        while let Some(&(deadline, sub, seq)) = t.deadlines.front() {
            if deadline > now {
                break;
            }
            t.deadlines.pop_front();
            let late = t.subs.get(&sub).is_some_and(|s| s.acked < seq);
            if late {
                let secs = self.cfg.ack_timeout.as_secs_f64();
                let reason = format!("notification {seq} was not acknowledged within {secs} s");
                failures.extend(self.fail(&mut t, sub, reason, now));
            }
        }
        self.any.store(!t.watched.is_empty(), Ordering::Relaxed);
        failures
    }

    /// Subscription `sub` failed: deleted, and the recovery message sent, or at the
    /// threshold the policy applied.
    fn fail(&self, t: &mut Table, sub: u64, reason: String, now: Instant) -> Option<Failure> {
        let s = t.subs.get(&sub)?;
        let (user, session_id, push) = (s.user, s.session_id, s.push.clone());
        t.drop_user(user);
        let r = t.recoveries.entry(user).or_insert_with(|| Recoveries {
            session_id,
            at: VecDeque::new(),
        });
        if r.session_id != session_id {
            r.session_id = session_id;
            r.at.clear();
        }
        while r
            .at
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= self.cfg.window)
        {
            r.at.pop_front();
        }
        r.at.push_back(now);
        let count = u32::try_from(r.at.len()).unwrap_or(u32::MAX);
        let action = if count < self.cfg.threshold {
            let mut lost = reason.clone();
            truncate(&mut lost, shared_proto::MAX_PRESENCE_REASON_LEN);
            push::send(
                &push,
                session_id,
                ServerMsg::Event(Event::PresenceLost {
                    subscription: sub,
                    reason: lost,
                }),
            );
            FailureAction::Recovered
        } else {
            match self.cfg.policy {
                FailurePolicy::SignOut => {
                    push::send(
                        &push,
                        session_id,
                        ServerMsg::Closing(WireError::new(
                            ErrorCode::NOTIFICATIONS_FAILED,
                            format!(
                                "signed out: {count} presence notifications to this TV failed \
                                 within {} s",
                                self.cfg.window.as_secs()
                            ),
                        )),
                    );
                    FailureAction::SignedOut
                }
                FailurePolicy::DropSubscription => FailureAction::Dropped,
            }
        };
        Some(Failure {
            user,
            session_id,
            reason,
            count,
            action,
        })
    }

    /// Queues one notification to each subscription in `subs` that has unsent changes;
    /// one whose TV queue is full keeps them for the next sweep.
    fn flush_subs(&self, t: &mut Table, mut subs: Vec<u64>, now: Instant) {
        subs.sort_unstable();
        subs.dedup();
        let deadline = now + self.cfg.ack_timeout;
        for id in subs {
            let Some(s) = t.subs.get_mut(&id) else {
                continue;
            };
            // One notification in flight per subscription: changes made before it is
            // acknowledged go together in the next (a TV is never sent faster than it
            // acknowledges, and a burst costs one round trip, not one per change).
            if s.unsent.is_empty() || s.acked < s.seq {
                continue;
            }
            let changes = std::mem::take(&mut s.unsent);
            let n = changes.len() as u64;
            let msg = ServerMsg::Event(Event::PresenceChanged {
                subscription: id,
                seq: s.seq + 1,
                changes,
            });
            match push::send_or_keep(&s.push, msg) {
                Ok(()) => {
                    s.seq += 1;
                    let seq = s.seq;
                    t.deadlines.push_back((deadline, id, seq));
                    self.counts.notifications.fetch_add(1, Ordering::Relaxed);
                    self.counts.changes.fetch_add(n, Ordering::Relaxed);
                }
                // The TV's queue is full: the changes wait for the next sweep (newer
                // ones about the same users replace them meanwhile).
                Err(Some(ServerMsg::Event(Event::PresenceChanged { changes, .. }))) => {
                    s.unsent = changes;
                    t.backlog.push(id);
                }
                // Its connection is leaving; its session's end drops the subscription.
                Err(_) => {}
            }
        }
    }
}

impl Table {
    /// Ends `user`'s subscription, if any: its entries leave every watched user.
    fn drop_user(&mut self, user: UserId) {
        let Some(id) = self.by_user.remove(&user) else {
            return;
        };
        let Some(sub) = self.subs.remove(&id) else {
            return;
        };
        self.pairs = self.pairs.saturating_sub(sub.users.len());
        for u in sub.users {
            if let Some(w) = self.watched.get_mut(&u) {
                if let Some(i) = w.watchers.iter().position(|x| x.sub == id) {
                    w.watchers.swap_remove(i);
                }
                if w.watchers.is_empty() {
                    self.watched.remove(&u);
                }
            }
        }
    }

    /// Adds a change to subscription `sub`'s unsent ones (replacing an older one about
    /// the same user) and notes it for the flush.
    fn queue_change(&mut self, sub: u64, change: PresenceEntry, touched: &mut Vec<u64>) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        match s.unsent.iter_mut().find(|e| e.user_id == change.user_id) {
            Some(e) => *e = change,
            None => s.unsent.push(change),
        }
        touched.push(sub);
    }
}

impl Watched {
    /// The state a watcher allowed to see it is shown.
    fn state(&self) -> PresenceState {
        match self.conn {
            Conn::Online => PresenceState::ONLINE,
            Conn::Busy => PresenceState::BUSY,
            Conn::Offline if self.has_phone => PresenceState::MOBILE,
            Conn::Offline => PresenceState::OFFLINE,
        }
    }
}

fn entry(user_id: UserId, state: PresenceState, since_ms: Option<UnixMillis>) -> PresenceEntry {
    PresenceEntry {
        user_id,
        state,
        since_ms,
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use shared_proto::{Event, PresenceState as P, ServerMsg};

    use super::*;
    use crate::registry::testing::{next_event, session};
    use crate::registry::{DialPlan, PushRx, Registry, RingStart};

    fn row(user_id: UserId, online: bool, allowed: bool) -> PresenceRow {
        PresenceRow {
            user_id,
            online: Some(online),
            last_seen_ms: Some(7),
            hidden: false,
            allowed,
            has_phone: false,
        }
    }

    fn cfg() -> PresenceConfig {
        PresenceConfig {
            ack_timeout: Duration::from_secs(5),
            threshold: 3,
            window: Duration::from_secs(600),
            policy: FailurePolicy::SignOut,
            several_nodes: false,
        }
    }

    /// The states of a subscription's answer, by user.
    fn states(s: &Subscribed) -> Vec<(UserId, P)> {
        s.states.iter().map(|e| (e.user_id, e.state)).collect()
    }

    /// Every presence change queued to `rx` of `user`'s session `sid`, each acknowledged
    /// as it is read (the next is sent only then), as (seq, [(user, state)]).
    fn changes(
        p: &Presence,
        user: UserId,
        sid: u64,
        rx: &mut PushRx,
    ) -> Vec<(u64, Vec<(UserId, P)>)> {
        let mut out = Vec::new();
        while let Some(msg) = next_event(rx) {
            if let ServerMsg::Event(Event::PresenceChanged {
                subscription,
                seq,
                changes,
            }) = msg
            {
                out.push((seq, changes.iter().map(|c| (c.user_id, c.state)).collect()));
                let taken = p.ack(user, sid, subscription, seq, ErrorCode::OK, Instant::now());
                assert_eq!(taken, AckResult::Taken);
            }
        }
        out
    }

    /// Registry with `watcher` (1) subscribed to `rows`; its session id and queue.
    fn watching(reg: &Registry, rows: &[PresenceRow]) -> (u64, PushRx, Subscribed) {
        let (sid, rx) = session(reg, 1);
        let sub = reg.subscribe(1, sid, rows, 100).expect("current");
        (sid, rx, sub)
    }

    #[test]
    fn a_watcher_let_in_or_out_is_asked_to_subscribe_again() {
        let reg = Registry::new(0, 0).with_presence(cfg());
        let (_s2, _r2) = session(&reg, 2);
        let (_s1, mut r1, sub) = watching(&reg, &[row(2, true, false), row(3, true, true)]);
        assert_eq!(states(&sub), vec![(2, P::NOT_ALLOWED), (3, P::OFFLINE)]);
        let p = reg.presence();
        assert_eq!(p.permissions_changed(4, &[1]), 0, "1 never asked for 4");
        assert_eq!(p.permissions_changed(2, &[5]), 0, "5 has no subscription");
        while next_event(&mut r1).is_some() {}
        assert_eq!(p.permissions_changed(2, &[1]), 1, "2 let 1 in");
        match next_event(&mut r1) {
            Some(ServerMsg::Event(Event::PresenceLost { subscription, .. })) => {
                assert_eq!(subscription, sub.subscription);
            }
            other => panic!("expected PresenceLost, got {other:?}"),
        }
        assert_eq!(
            p.permissions_changed(2, &[1]),
            0,
            "the subscription is gone"
        );
        // Watching 3 (allowed): 3 letting 1 out asks it too.
        let (tx, _rx) = crate::registry::push_channel();
        p.subscribe(1, 100, tx, &[row(3, true, true)], 0, |_| {
            (HashMap::new(), 0)
        });
        assert_eq!(p.permissions_changed(3, &[1]), 1, "3 let 1 out");
        assert_eq!(p.permissions_changed(3, &[1]), 0);
    }

    #[test]
    fn a_subscription_starts_with_every_state_and_then_gets_each_change_once() {
        let reg = Registry::new(0, 0).with_presence(cfg());
        let (s2, _r2) = session(&reg, 2);
        let mut phone = row(4, false, true);
        phone.has_phone = true;
        let mut hidden = row(6, true, false);
        hidden.hidden = true;
        let unknown = PresenceRow {
            online: None,
            ..row(7, false, false)
        };
        let rows = [
            row(2, true, true),
            row(3, false, true),
            phone,
            row(5, true, false),
            hidden,
            unknown,
            row(2, true, true),
        ];
        let (s1, mut r1, sub) = watching(&reg, &rows);
        let p = reg.presence();
        assert_eq!(
            states(&sub),
            vec![
                (2, P::ONLINE),
                (3, P::OFFLINE),
                (4, P::MOBILE),
                (5, P::NOT_ALLOWED),
                (6, P::NOT_ALLOWED),
                (7, P::UNKNOWN),
            ],
            "in order, duplicates dropped, a refusal instead of a state where not allowed"
        );
        assert_eq!(sub.seq, 0);
        let _ = changes(p, 1, s1, &mut r1);
        // 2 goes into DND: busy; 3 and 5 come online (5 may not be seen).
        assert!(reg.set_dnd(2, s2, true));
        let (_s3, _r3) = session(&reg, 3);
        let (_s5, _r5) = session(&reg, 5);
        assert_eq!(
            changes(p, 1, s1, &mut r1),
            vec![(1, vec![(2, P::BUSY)]), (2, vec![(3, P::ONLINE)])]
        );
        // Out of DND, and 2 goes: online, then offline; 4 registers (online, not mobile).
        assert!(reg.set_dnd(2, s2, false));
        assert!(reg.remove(2, s2).is_some());
        let (s4, _r4) = session(&reg, 4);
        assert!(reg.remove(4, s4).is_some());
        assert_eq!(
            changes(p, 1, s1, &mut r1),
            vec![
                (3, vec![(2, P::ONLINE)]),
                // Made while 3 waited for its acknowledgement: together, the newest each.
                (4, vec![(2, P::OFFLINE), (4, P::MOBILE)]),
            ]
        );
    }

    #[test]
    fn a_call_shows_both_parties_busy_until_it_ends() {
        let reg = Registry::new(0, 0).with_presence(cfg());
        let (s2, _r2) = session(&reg, 2);
        let (_s3, mut r3) = session(&reg, 3);
        let (s1, mut r1, _) = watching(&reg, &[row(2, true, true), row(3, true, true)]);
        let p = reg.presence();
        let DialPlan::Ring { call_id } = reg.plan_dial(2, s2, 3, 0).expect("plan") else {
            panic!("expected ring")
        };
        assert_eq!(
            changes(p, 1, s1, &mut r1),
            vec![(1, vec![(2, P::BUSY), (3, P::BUSY)])],
            "one notification for both parties of one step"
        );
        assert!(matches!(
            reg.start_ringing(call_id),
            RingStart::Ringing { .. }
        ));
        let _ = next_event(&mut r3);
        reg.hang_up(2, s2, call_id).expect("hang up");
        assert_eq!(
            changes(p, 1, s1, &mut r1),
            vec![(2, vec![(2, P::ONLINE), (3, P::ONLINE)])]
        );
    }

    #[test]
    fn do_not_disturb_makes_a_dial_busy_instead_of_ringing() {
        let reg = Registry::new(0, 0);
        let (s1, _r1) = session(&reg, 1);
        let (s2, mut r2) = session(&reg, 2);
        assert!(reg.set_dnd(2, s2, true));
        assert!(matches!(
            reg.plan_dial(1, s1, 2, 0),
            Ok(DialPlan::Busy { .. })
        ));
        assert!(next_event(&mut r2).is_none(), "nothing rings");
        assert!(reg.set_dnd(2, s2, false));
        assert!(matches!(
            reg.plan_dial(1, s1, 2, 0),
            Ok(DialPlan::Ring { .. })
        ));
        assert!(!reg.set_dnd(2, s2 + 100, true), "not that session");
    }

    #[test]
    fn an_older_change_never_undoes_a_newer_one() {
        let p = Presence::new(cfg());
        let (tx, mut rx) = crate::registry::push_channel();
        let sub = p.subscribe(1, 1, tx, &[row(2, false, true)], 0, |_| {
            (HashMap::new(), 10)
        });
        assert_eq!(states(&sub), vec![(2, P::OFFLINE)]);
        let at = |conn, version| Change {
            user: 2,
            conn,
            version,
            at_ms: 1,
        };
        let now = Instant::now();
        // Numbered before the snapshot: already in it.
        p.publish(&[at(Conn::Online, 9)], now);
        assert!(changes(&p, 1, 1, &mut rx).is_empty());
        p.publish(&[at(Conn::Busy, 12)], now);
        p.publish(&[at(Conn::Online, 11)], now);
        assert_eq!(changes(&p, 1, 1, &mut rx), vec![(1, vec![(2, P::BUSY)])]);
    }

    #[test]
    fn acknowledgements_are_cumulative_and_unknown_ones_are_ignored() {
        let p = Presence::new(cfg());
        let (tx, rx) = crate::registry::push_channel();
        let sub = p
            .subscribe(1, 1, tx, &[row(2, false, true)], 0, |_| (HashMap::new(), 0))
            .subscription;
        let t0 = Instant::now();
        for (v, conn) in [(1, Conn::Online), (2, Conn::Busy), (3, Conn::Online)] {
            p.publish(
                &[Change {
                    user: 2,
                    conn,
                    version: v,
                    at_ms: 0,
                }],
                t0,
            );
        }
        // One in flight: the second and third gathered (the newest kept).
        let first: Vec<ServerMsg> = rx.try_iter().map(|b| *b).collect();
        assert_eq!(first.len(), 1);
        assert_eq!(
            p.ack(1, 1, sub, 4, ErrorCode::OK, t0),
            AckResult::Unknown,
            "never sent"
        );
        assert_eq!(
            p.ack(1, 1, sub + 1, 1, ErrorCode::OK, t0),
            AckResult::Unknown
        );
        assert_eq!(
            p.ack(9, 1, sub, 1, ErrorCode::OK, t0),
            AckResult::Unknown,
            "not its own"
        );
        assert_eq!(p.ack(1, 1, sub, 1, ErrorCode::OK, t0), AckResult::Taken);
        match rx.try_iter().map(|b| *b).collect::<Vec<_>>().as_slice() {
            [ServerMsg::Event(Event::PresenceChanged {
                seq: 2, changes, ..
            })] => {
                assert_eq!(changes.len(), 1);
                assert_eq!(changes[0].state, P::ONLINE, "the newest of the two");
            }
            other => panic!("expected the gathered notification, got {other:?}"),
        }
        assert_eq!(p.ack(1, 1, sub, 2, ErrorCode::OK, t0), AckResult::Taken);
        assert_eq!(
            p.ack(1, 1, sub, 1, ErrorCode::OK, t0),
            AckResult::Taken,
            "a repeat"
        );
        let later = t0 + Duration::from_secs(6);
        assert!(
            p.sweep(later).is_empty(),
            "all acknowledged by the cumulative ack"
        );
    }

    #[test]
    fn a_late_notification_fails_recovers_and_at_the_threshold_signs_the_tv_out() {
        let p = Presence::new(cfg());
        let t0 = Instant::now();
        let mut version = 0;
        let mut fail_once = |p: &Presence, at: Instant| -> (Vec<Failure>, Vec<ServerMsg>) {
            let (tx, rx) = crate::registry::push_channel();
            p.subscribe(1, 1, tx, &[row(2, false, true)], 0, |_| {
                (HashMap::new(), version)
            });
            version += 1;
            // Each failure deleted the entry: it starts offline again.
            let conn = Conn::Online;
            p.publish(
                &[Change {
                    user: 2,
                    conn,
                    version,
                    at_ms: 0,
                }],
                at,
            );
            assert!(
                p.sweep(at + Duration::from_millis(4_900)).is_empty(),
                "not yet late"
            );
            let failures = p.sweep(at + Duration::from_secs(5));
            let msgs: Vec<ServerMsg> = rx.try_iter().map(|b| *b).collect();
            (failures, msgs)
        };
        let (f, msgs) = fail_once(&p, t0);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].count, f[0].action), (1, FailureAction::Recovered));
        assert!(matches!(
            msgs.last(),
            Some(ServerMsg::Event(Event::PresenceLost { .. }))
        ));
        assert_eq!(p.sizes(), (0, 0), "the subscription is deleted");
        let (f, _) = fail_once(&p, t0 + Duration::from_secs(10));
        assert_eq!((f[0].count, f[0].action), (2, FailureAction::Recovered));
        let (f, msgs) = fail_once(&p, t0 + Duration::from_secs(20));
        assert_eq!((f[0].count, f[0].action), (3, FailureAction::SignedOut));
        assert!(matches!(
            msgs.last(),
            Some(ServerMsg::Closing(e)) if e.code == ErrorCode::NOTIFICATIONS_FAILED
        ));
        // A new registration counts afresh.
        p.unsubscribe(1, 1);
        let (f, _) = fail_once(&p, t0 + Duration::from_secs(30));
        assert_eq!(f[0].count, 1, "forgotten with the session");
    }

    #[test]
    fn a_refused_notification_fails_at_once_and_drop_policy_sends_nothing() {
        let p = Presence::new(PresenceConfig {
            threshold: 1,
            policy: FailurePolicy::DropSubscription,
            ..cfg()
        });
        let (tx, rx) = crate::registry::push_channel();
        let sub = p
            .subscribe(1, 1, tx, &[row(2, false, true)], 0, |_| (HashMap::new(), 0))
            .subscription;
        let now = Instant::now();
        p.publish(
            &[Change {
                user: 2,
                conn: Conn::Online,
                version: 1,
                at_ms: 0,
            }],
            now,
        );
        let _ = rx.try_recv();
        match p.ack(1, 1, sub, 1, ErrorCode::INTERNAL, now) {
            AckResult::Refused(f) => assert_eq!(f.action, FailureAction::Dropped),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            rx.try_recv().is_err(),
            "policy drop_subscription: no message"
        );
        assert_eq!(p.sizes(), (0, 0));
    }

    #[test]
    fn changes_wait_while_the_tv_queue_is_full_and_go_together() {
        let p = Presence::new(cfg());
        let (tx, rx) = crate::registry::push_channel();
        let rows: Vec<PresenceRow> = (2..40).map(|u| row(u, false, true)).collect();
        p.subscribe(1, 1, tx.clone(), &rows, 0, |_| (HashMap::new(), 0));
        // The TV is not reading: its queue fills with other pushes.
        while crate::registry::push::send_or_keep(
            &tx,
            ServerMsg::Event(Event::CachedCallsWaiting { count: 0 }),
        )
        .is_ok()
        {}
        let now = Instant::now();
        for (i, u) in (2..40).enumerate() {
            let c = Change {
                user: u,
                conn: Conn::Online,
                version: i as u64 + 1,
                at_ms: 0,
            };
            p.publish(&[c], now);
        }
        while rx.try_recv().is_ok() {}
        assert!(p.sweep(now).is_empty());
        let pushed: Vec<ServerMsg> = rx.try_iter().map(|b| *b).collect();
        match pushed.as_slice() {
            [ServerMsg::Event(Event::PresenceChanged {
                seq: 1, changes, ..
            })] => {
                assert_eq!(changes.len(), 38, "every change, in one notification")
            }
            other => panic!("expected one notification, got {other:?}"),
        }
    }

    #[test]
    fn hiding_shows_not_allowed_and_coming_out_shows_the_state_again() {
        let p = Presence::new(cfg());
        let (tx, mut rx) = crate::registry::push_channel();
        let sub = p
            .subscribe(1, 1, tx, &[row(2, false, true)], 0, |_| {
                (HashMap::from([(2, Conn::Online)]), 0)
            })
            .subscription;
        let now = Instant::now();
        assert!(p.set_hidden(2, true, now).is_empty());
        assert_eq!(
            changes(&p, 1, 1, &mut rx),
            vec![(1, vec![(2, P::NOT_ALLOWED)])]
        );
        // A watcher subscribing while 2 is hidden is refused, and kept to check again.
        let (tx9, mut rx9) = crate::registry::push_channel();
        let mut hidden = row(2, false, false);
        hidden.hidden = true;
        let sub9 = p.subscribe(9, 1, tx9, &[hidden], 0, |_| {
            (HashMap::from([(2, Conn::Online)]), 0)
        });
        assert_eq!(states(&sub9), vec![(2, P::NOT_ALLOWED)]);
        let sub9 = sub9.subscription;
        assert_eq!(
            p.set_hidden(2, false, now),
            vec![(sub9, 9)],
            "to check again"
        );
        assert_eq!(changes(&p, 1, 1, &mut rx), vec![(2, vec![(2, P::ONLINE)])]);
        assert!(
            changes(&p, 9, 1, &mut rx9).is_empty(),
            "not before it is checked"
        );
        p.permit(sub9, 2, now);
        assert_eq!(changes(&p, 9, 1, &mut rx9), vec![(1, vec![(2, P::ONLINE)])]);
        p.unsubscribe(1, 1);
        p.unsubscribe(9, 1);
        assert_eq!(p.sizes(), (0, 0));
        let _ = sub;
    }
}
