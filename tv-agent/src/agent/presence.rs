//! Presence on the TV, pure: whom this TV watches, the states it knows, and the rules of
//! its subscription (sections C and E of the source documents), as (state, input) →
//! what to send and what to show. The core ([`super::core`]) does the I/O.
//!
//! - At every registration the TV subscribes to its address book (`contacts`, who may
//!   also see this TV) and the users it watches without listing them (`others`: its
//!   missed callers, and the users a scripted `watch` names); again whenever that list
//!   changes. The answer carries every state afresh and replaces what was known.
//! - Each notification is applied once, in order, and acknowledged cumulatively. One that
//!   arrives before the answer to the subscription it belongs to (the reply and the push
//!   travel separately inside the agent) waits here, a few at most, and is applied after
//!   the answer; one of a replaced subscription is ignored (the server has forgotten it).
//! - `PresenceLost` (the server gave up on a notification: section E's instant message)
//!   makes the TV subscribe again at once.
//! - A server one release behind answers `UNSUPPORTED`: the TV stops asking until its next
//!   registration (the core then asks each state once with `QueryState`).

use std::collections::HashMap;

use shared_proto::{Presence, Subscribed, UserId, MAX_SUBSCRIPTIONS};

/// Notifications kept while the answer to their subscription is on its way.
pub const MAX_EARLY: usize = 32;

/// A subscription to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// The address book (who may see this TV), at most [`MAX_SUBSCRIPTIONS`].
    pub contacts: Vec<UserId>,
    /// The others watched, so that both lists hold at most [`MAX_SUBSCRIPTIONS`].
    pub others: Vec<UserId>,
}

/// What a notification (or the answer to a subscription) asks the TV to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// States to show, each with the sequence number it came with; `full` when they are a
    /// subscription's fresh full state.
    pub shown: Vec<(Presence, u64)>,
    /// The states are a fresh full state (the answer to a subscription).
    pub full: bool,
    /// Acknowledge `(subscription, seq)`.
    pub ack: Option<(u64, u64)>,
    /// Subscribe again (the list changed while a subscription was on its way).
    pub subscribe: Option<Subscribe>,
}

/// The TV's presence: its watch list, its subscription and the states it knows.
#[derive(Debug, Default)]
pub struct Watching {
    /// The address book.
    contacts: Vec<UserId>,
    /// The other users watched (the scripted watch's, then missed callers).
    others: Vec<UserId>,
    /// Registered now (subscriptions are made only then).
    registered: bool,
    /// The subscription in force: its id and the last sequence number applied.
    current: Option<(u64, u64)>,
    /// A `Subscribe` is on its way.
    subscribing: bool,
    /// The list changed while one was on its way: send another when it is answered.
    again: bool,
    /// The server does not do presence (until the next registration).
    unsupported: bool,
    /// Notifications for a subscription not answered yet: (subscription, seq, changes).
    early: Vec<(u64, u64, Vec<Presence>)>,
    /// The states known, by user.
    states: HashMap<UserId, Presence>,
}

/// `list` without duplicates or users in `skip`, at most `max`.
fn distinct(list: &[UserId], skip: &[UserId], max: usize) -> Vec<UserId> {
    let mut seen = std::collections::HashSet::new();
    list.iter()
        .copied()
        .filter(|u| !skip.contains(u) && seen.insert(*u))
        .take(max)
        .collect()
}

impl Watching {
    /// Watching `contacts` (the address book) and `others`.
    pub fn new(contacts: &[UserId], others: &[UserId]) -> Watching {
        let mut w = Watching::default();
        w.set_lists(contacts, others);
        w
    }

    fn set_lists(&mut self, contacts: &[UserId], others: &[UserId]) -> bool {
        let contacts = distinct(contacts, &[], MAX_SUBSCRIPTIONS);
        let others = distinct(others, &contacts, MAX_SUBSCRIPTIONS - contacts.len());
        let changed = contacts != self.contacts || others != self.others;
        self.contacts = contacts;
        self.others = others;
        changed
    }

    /// Everyone watched: contacts, then others.
    pub fn watched(&self) -> impl Iterator<Item = UserId> + '_ {
        self.contacts.iter().chain(&self.others).copied()
    }

    /// The states known, in watch-list order (users not heard of yet left out).
    pub fn states(&self) -> Vec<Presence> {
        self.watched()
            .filter_map(|u| self.states.get(&u).copied())
            .collect()
    }

    /// The subscription in force, if any.
    pub fn subscription(&self) -> Option<u64> {
        self.current.map(|(id, _)| id)
    }

    /// A subscription to send now, if one may go.
    fn start(&mut self) -> Option<Subscribe> {
        if !self.registered || self.unsupported {
            return None;
        }
        if self.subscribing {
            self.again = true;
            return None;
        }
        self.subscribing = true;
        self.again = false;
        Some(Subscribe {
            contacts: self.contacts.clone(),
            others: self.others.clone(),
        })
    }

    /// Registered (again): subscribe.
    pub fn registered(&mut self) -> Option<Subscribe> {
        self.registered = true;
        self.unsupported = false;
        self.current = None;
        self.subscribing = false;
        self.early.clear();
        self.start()
    }

    /// The link went down: the subscription went with the session on the server. The
    /// states stay as last known until the next subscription replaces them.
    pub fn link_down(&mut self) {
        self.registered = false;
        self.current = None;
        self.subscribing = false;
        self.again = false;
        self.early.clear();
    }

    /// The watch list is now `contacts` and `others`: subscribe again if it changed.
    pub fn set_watch_list(&mut self, contacts: &[UserId], others: &[UserId]) -> Option<Subscribe> {
        if self.set_lists(contacts, others) {
            self.start()
        } else {
            None
        }
    }

    /// Adds `users` (missed callers) to the others watched: subscribe again if any is new.
    pub fn watch_also(&mut self, users: &[UserId]) -> Option<Subscribe> {
        let mut others = self.others.clone();
        others.extend_from_slice(users);
        let contacts = self.contacts.clone();
        self.set_watch_list(&contacts, &others)
    }

    /// The server answered a subscription.
    pub fn subscribed(&mut self, s: Subscribed) -> Applied {
        self.subscribing = false;
        if !self.registered {
            // Answered just before the link went: nothing holds on the server any more.
            return Applied::default();
        }
        self.current = Some((s.subscription, s.seq));
        self.states = s.states.iter().map(|p| (p.user_id, *p)).collect();
        let mut out = Applied {
            shown: s.states.iter().map(|p| (*p, s.seq)).collect(),
            full: true,
            ..Applied::default()
        };
        // What came before the answer, in order; older subscriptions' are dropped.
        let mut early = std::mem::take(&mut self.early);
        early.retain(|(id, _, _)| *id == s.subscription);
        early.sort_by_key(|(_, seq, _)| *seq);
        for (id, seq, changes) in early {
            let later = self.changed(id, seq, &changes);
            out.shown.extend(later.shown);
            out.ack = later.ack.or(out.ack);
        }
        if self.again {
            out.subscribe = self.start();
        }
        out
    }

    /// The server refused a subscription. `unsupported`: it does not do presence (one
    /// release behind), so the TV stops asking until its next registration; otherwise
    /// (a timeout, the rate limit) the core tries again a little later.
    pub fn refused(&mut self, unsupported: bool) {
        self.subscribing = false;
        self.again = false;
        self.unsupported = unsupported;
    }

    /// Whether a subscription should be retried after a refusal (registered, the server
    /// does presence, none in force or on its way).
    pub fn wants_retry(&self) -> bool {
        self.registered && !self.unsupported && !self.subscribing && self.current.is_none()
    }

    /// A notification: `changes` of `subscription`, numbered `seq`.
    pub fn changed(&mut self, subscription: u64, seq: u64, changes: &[Presence]) -> Applied {
        match self.current {
            Some((id, last)) if id == subscription => {
                let mut out = Applied::default();
                if seq > last {
                    for p in changes {
                        if self.watched().any(|u| u == p.user_id) {
                            self.states.insert(p.user_id, *p);
                            out.shown.push((*p, seq));
                        }
                    }
                    self.current = Some((id, seq));
                }
                // A repeat is acknowledged again (its acknowledgement may have been lost).
                out.ack = Some((id, seq.max(last)));
                out
            }
            _ if self.subscribing && self.early.len() < MAX_EARLY => {
                self.early.push((subscription, seq, changes.to_vec()));
                Applied::default()
            }
            // A replaced subscription's (or too many early ones: that notification times
            // out on the server, which then sends PresenceLost and the TV starts afresh).
            _ => Applied::default(),
        }
    }

    /// Remembers states learnt another way (a query to a server without presence).
    pub fn remember(&mut self, shown: &[(Presence, u64)]) {
        for (p, _) in shown {
            self.states.insert(p.user_id, *p);
        }
    }

    /// The server ended `subscription` (a notification failed): subscribe again.
    pub fn lost(&mut self, subscription: u64) -> Option<Subscribe> {
        match self.current {
            Some((id, _)) if id == subscription => {
                self.current = None;
                self.start()
            }
            // An older one (already replaced), or one still on its way (its answer comes).
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::PresenceState as P;

    fn p(user: UserId, state: P) -> Presence {
        Presence {
            user_id: user,
            state,
            since_ms: None,
        }
    }

    fn answer(subscription: u64, seq: u64, states: &[Presence]) -> Subscribed {
        Subscribed {
            subscription,
            seq,
            states: states.to_vec(),
        }
    }

    #[test]
    fn subscribes_at_registration_and_applies_notifications_in_order() {
        let mut w = Watching::new(&[2, 3, 2], &[3, 4]);
        assert_eq!(
            w.registered(),
            Some(Subscribe {
                contacts: vec![2, 3],
                others: vec![4]
            }),
            "duplicates dropped, contacts first"
        );
        let a = w.subscribed(answer(7, 0, &[p(2, P::ONLINE), p(3, P::OFFLINE)]));
        assert!(a.full);
        assert_eq!(a.shown.len(), 2);
        assert_eq!(a.ack, None, "a subscription's answer is not acknowledged");
        let a = w.changed(7, 1, &[p(2, P::BUSY)]);
        assert_eq!(a.shown, vec![(p(2, P::BUSY), 1)]);
        assert_eq!(a.ack, Some((7, 1)));
        let again = w.changed(7, 1, &[p(2, P::BUSY)]);
        assert!(again.shown.is_empty(), "a repeat is not shown twice");
        assert_eq!(again.ack, Some((7, 1)), "but acknowledged again");
        assert!(
            w.changed(6, 9, &[p(2, P::OFFLINE)]).shown.is_empty(),
            "not ours"
        );
        assert_eq!(w.states(), vec![p(2, P::BUSY), p(3, P::OFFLINE)]);
    }

    #[test]
    fn a_notification_before_its_answer_waits_for_it() {
        let mut w = Watching::new(&[2], &[]);
        w.registered().expect("subscribe");
        assert_eq!(w.changed(5, 1, &[p(2, P::BUSY)]), Applied::default());
        let a = w.subscribed(answer(5, 0, &[p(2, P::ONLINE)]));
        assert_eq!(
            a.shown,
            vec![(p(2, P::ONLINE), 0), (p(2, P::BUSY), 1)],
            "the full state, then what came early"
        );
        assert_eq!(a.ack, Some((5, 1)));
        assert_eq!(w.states(), vec![p(2, P::BUSY)]);
    }

    #[test]
    fn a_lost_subscription_is_made_again_and_its_answer_replaces_the_states() {
        let mut w = Watching::new(&[2], &[]);
        w.registered().expect("subscribe");
        w.subscribed(answer(1, 0, &[p(2, P::ONLINE)]));
        assert_eq!(w.lost(9), None, "not the one in force");
        assert!(w.lost(1).is_some(), "subscribes again");
        assert!(
            w.changed(1, 1, &[p(2, P::BUSY)]).ack.is_none(),
            "the old one's are not acknowledged"
        );
        let a = w.subscribed(answer(2, 4, &[p(2, P::OFFLINE)]));
        assert!(a.full);
        assert_eq!(w.states(), vec![p(2, P::OFFLINE)]);
        assert_eq!(w.subscription(), Some(2));
    }

    #[test]
    fn a_list_change_while_subscribing_subscribes_once_more_after() {
        let mut w = Watching::new(&[2], &[]);
        assert_eq!(w.set_watch_list(&[2, 3], &[]), None, "not registered yet");
        w.registered().expect("subscribe");
        assert_eq!(w.watch_also(&[4]), None, "one on its way");
        assert_eq!(w.watch_also(&[4, 2]), None, "nothing new");
        let a = w.subscribed(answer(1, 0, &[]));
        assert_eq!(
            a.subscribe,
            Some(Subscribe {
                contacts: vec![2, 3],
                others: vec![4]
            })
        );
    }

    #[test]
    fn an_old_server_is_not_asked_again_until_the_next_registration() {
        let mut w = Watching::new(&[2], &[]);
        w.registered().expect("subscribe");
        w.refused(true);
        assert!(!w.wants_retry());
        assert_eq!(w.set_watch_list(&[3], &[]), None);
        assert!(w.registered().is_some());
        w.refused(false);
        assert!(w.wants_retry(), "a transient refusal is retried");
    }

    #[test]
    fn the_lists_hold_at_most_the_servers_limit() {
        let contacts: Vec<UserId> = (1..=300).collect();
        let others: Vec<UserId> = (200..=700).collect();
        let mut w = Watching::new(&contacts, &others);
        let s = w.registered().expect("subscribe");
        assert_eq!(s.contacts.len(), 300);
        assert_eq!(s.contacts.len() + s.others.len(), MAX_SUBSCRIPTIONS);
        assert!(
            !s.others.contains(&250),
            "a contact is not repeated in others"
        );
    }

    #[test]
    fn an_answer_after_the_link_went_is_ignored() {
        let mut w = Watching::new(&[2], &[]);
        w.registered().expect("subscribe");
        w.link_down();
        assert_eq!(
            w.subscribed(answer(1, 0, &[p(2, P::ONLINE)])),
            Applied::default()
        );
        assert_eq!(w.subscription(), None);
    }
}
