//! Requests in flight, matched to their replies by id, each with a deadline.
//!
//! For a client that keeps several requests outstanding on one connection (the TV
//! agent's link: a dial, a heartbeat and a state query may all be in flight). The waiter
//! type is the caller's (a reply channel, or nothing for a heartbeat).

use std::collections::HashMap;

use shared_proto::RequestId;
use tokio::time::Instant;

/// Outstanding requests by id.
#[derive(Debug)]
pub struct Pending<T> {
    /// Who waits for each id's reply, and until when.
    waiting: HashMap<RequestId, (T, Instant)>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            waiting: HashMap::new(),
        }
    }
}

impl<T> Pending<T> {
    /// No requests in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `waiter` waits for the reply to `id` until `deadline`.
    pub fn insert(&mut self, id: RequestId, waiter: T, deadline: Instant) {
        self.waiting.insert(id, (waiter, deadline));
    }

    /// The waiter of `id`, removed; `None` for a stale or unknown id.
    pub fn take(&mut self, id: RequestId) -> Option<T> {
        self.waiting.remove(&id).map(|(w, _)| w)
    }

    /// Removes and returns every waiter whose deadline is not after `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let ids: Vec<RequestId> = self
            .waiting
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| self.take(id)).collect()
    }

    /// Removes and returns every waiter (the connection is gone).
    pub fn drain(&mut self) -> Vec<T> {
        self.waiting.drain().map(|(_, (w, _))| w).collect()
    }

    /// How many requests are in flight.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether no request is in flight.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn replies_find_their_waiter_and_deadlines_expire() {
        let now = Instant::now();
        let mut p = Pending::new();
        p.insert(1, "dial", now + Duration::from_secs(10));
        p.insert(2, "heartbeat", now + Duration::from_secs(1));
        assert_eq!(p.take(7), None, "a stale id has no waiter");
        assert_eq!(p.expire(now), Vec::<&str>::new());
        assert_eq!(p.expire(now + Duration::from_secs(1)), vec!["heartbeat"]);
        assert_eq!(p.take(1), Some("dial"));
        assert!(p.is_empty());
        p.insert(3, "query", now);
        assert_eq!(p.drain(), vec!["query"]);
    }
}
