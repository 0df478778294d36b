//! The path between nodes on one PostgreSQL database: which other nodes are alive (a
//! bit per slot, kept by the heartbeat), which node holds a TV's live session, and a
//! message to another node (`NOTIFY` on its channel, which it `LISTEN`s on).
//!
//! Why `LISTEN/NOTIFY` and not NATS: the nodes share the database already, so it adds
//! no service to run, secure or watch; a notification is delivered only if its
//! transaction commits (the `replaced` notices ride in the registration's own
//! transaction); and the messages between nodes are small (a call's set-up, a push)
//! and few (a handful per cross-node call), far below what one `NOTIFY` channel
//! carries. A payload is capped at 8,000 bytes; ours are below 1,000.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use shared_proto::UserId;

use super::{connection, node_channel};
use crate::storage::StoreError;

/// The largest payload sent (PostgreSQL refuses above 8,000 bytes).
pub const MAX_PAYLOAD: usize = 7_900;

/// This node's view of the others, and its way to reach them. Cheap to clone.
#[derive(Clone)]
pub struct NodeLink {
    pool: Pool,
    slot: u8,
    lease_ms: i64,
    /// Bit `s` set: the node in slot `s` (not this one) was alive at the last beat.
    live: Arc<AtomicU64>,
}

impl NodeLink {
    pub(super) fn new(pool: Pool, slot: u8, lease: Duration, live: Arc<AtomicU64>) -> Self {
        NodeLink {
            pool,
            slot,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            live,
        }
    }

    /// This node's slot.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// Whether any other node was alive at the last heartbeat (no other node: a TV not
    /// connected here is offline, and nothing is asked of the database).
    pub fn others_alive(&self) -> bool {
        self.live.load(Ordering::Relaxed) != 0
    }

    /// The slot of the live node (not this one) that holds `user`'s live session, if
    /// any.
    pub async fn locate(&self, user: UserId) -> Result<Option<u8>, StoreError> {
        let conn = connection(&self.pool).await?;
        let stmt = conn
            .prepare_cached(
                "SELECT n.slot FROM user_property p JOIN tvcall_node n ON n.node_id = p.node_id
                 WHERE p.user_id = $1 AND p.user_netstate = 1 AND n.slot <> $2
                   AND n.stopped_at IS NULL
                   AND n.heartbeat_at >= now() - $3::bigint * interval '1 millisecond'",
            )
            .await?;
        let row = conn
            .query_opt(
                &stmt,
                &[&(user as i64), &i16::from(self.slot), &self.lease_ms],
            )
            .await?;
        Ok(row
            .map(|r| r.try_get::<_, i16>(0))
            .transpose()?
            .and_then(|s| u8::try_from(s).ok()))
    }

    /// Takes this node out of the dispatcher's choice: the dispatcher assigns only nodes
    /// with an address (`tvcall_node.listen`), and a draining node's is cleared.
    pub async fn withdraw(&self) -> Result<(), StoreError> {
        let conn = connection(&self.pool).await?;
        conn.execute(
            "UPDATE tvcall_node SET listen = '' WHERE slot = $1 AND stopped_at IS NULL",
            &[&i16::from(self.slot)],
        )
        .await?;
        Ok(())
    }

    /// Sends `payload` to the node in `slot` (delivered once this statement commits,
    /// which is at once: it runs alone).
    pub async fn send(&self, slot: u8, payload: &str) -> Result<(), StoreError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(StoreError::Other(format!(
                "a message to another node of {} bytes is over the {MAX_PAYLOAD}-byte limit",
                payload.len()
            )));
        }
        let conn = connection(&self.pool).await?;
        let stmt = conn.prepare_cached("SELECT pg_notify($1, $2)").await?;
        conn.execute(&stmt, &[&node_channel(slot), &payload])
            .await?;
        Ok(())
    }
}

/// The slots newly gone between two beats' masks.
pub(super) fn gone(before: u64, now: u64) -> impl Iterator<Item = u8> {
    let lost = before & !now;
    (0..64u8).filter(move |s| lost & (1 << s) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slots_alive_before_and_not_now_are_gone() {
        let before = (1 << 1) | (1 << 5) | (1 << 63);
        let now = (1 << 5) | (1 << 7);
        assert_eq!(gone(before, now).collect::<Vec<_>>(), vec![1, 63]);
        assert_eq!(gone(0, now).count(), 0);
    }
}
