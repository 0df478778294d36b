//! The distribution service's SQL (issue 18, section D): which TV a certificate is,
//! which live node a TV goes to, and the address a node tells the dispatcher TVs reach
//! it at. The dispatcher role runs on PostgreSQL only, so these are functions on a
//! [`PgDispatch`] of its own rather than [`crate::storage::Store`] methods.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::{connection, PgTarget};
use crate::storage::StoreError;

/// A TV's credential as the dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchCredential {
    /// The user the certificate was enrolled as.
    pub user_id: u64,
    /// Withdrawn by the operator (or replaced by a newer TV).
    pub revoked: bool,
}

/// A node picked for a TV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickedNode {
    /// Its id.
    pub node_id: String,
    /// The address TVs reach it at.
    pub addr: String,
    /// TVs online on it when picked.
    pub load: i64,
}

/// The dispatcher's connections to the shared database.
#[derive(Clone)]
pub struct PgDispatch {
    /// Pooled read connections.
    pool: Pool,
}

impl PgDispatch {
    /// A pool of `size` connections to `target` (nothing is written, no migration run:
    /// the nodes own the schema).
    pub fn new(target: &PgTarget, size: usize) -> Result<PgDispatch, StoreError> {
        Ok(PgDispatch {
            pool: target.pool(size.max(1), true)?,
        })
    }

    /// The credential of the certificate with this SHA-256 fingerprint, if any.
    pub async fn credential(
        &self,
        fingerprint: &[u8; 32],
    ) -> Result<Option<DispatchCredential>, StoreError> {
        let conn = connection(&self.pool).await?;
        let row = conn
            .query_opt(
                "SELECT user_id, revoked_at IS NOT NULL FROM tv_credential WHERE fingerprint = $1",
                &[&fingerprint.as_slice()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user: i64 = row.try_get(0)?;
        Ok(Some(DispatchCredential {
            user_id: u64::try_from(user).unwrap_or(0),
            revoked: row.try_get(1)?,
        }))
    }

    /// The live nodes `user` may be sent to: heartbeat within `lease`, an address
    /// recorded, not stopped; each with its TVs online as of its last heartbeat, whether
    /// it is `avoid` (a node the TV could not reach) and whether it held `user`'s session
    /// last. The dispatcher chooses among them (`crate::dispatch::choose`).
    pub async fn live_nodes(
        &self,
        user: u64,
        lease: Duration,
        avoid: &str,
    ) -> Result<Vec<NodeCandidate>, StoreError> {
        let conn = connection(&self.pool).await?;
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let user = i64::try_from(user).unwrap_or(i64::MAX);
        let rows = conn
            .query(
                "SELECT n.node_id, n.listen, n.online, n.node_id = $3,
                        n.node_id IS NOT DISTINCT FROM
                          (SELECT node_id FROM user_property WHERE user_id = $1)
                 FROM tvcall_node n
                 WHERE n.stopped_at IS NULL
                   AND n.heartbeat_at >= now() - $2::bigint * interval '1 millisecond'
                   AND n.listen <> '' AND n.listen NOT LIKE '%:0'",
                &[&user, &lease_ms, &avoid],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeCandidate {
                    node_id: r.try_get(0)?,
                    addr: r.try_get(1)?,
                    online: r.try_get(2)?,
                    avoided: r.try_get(3)?,
                    sticky: r.try_get(4)?,
                })
            })
            .collect()
    }
}

/// A live node the dispatcher may send a TV to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCandidate {
    /// Its id.
    pub node_id: String,
    /// The address TVs reach it at.
    pub addr: String,
    /// Its TVs online as of its last heartbeat.
    pub online: i64,
    /// The TV said it could not reach it.
    pub avoided: bool,
    /// It held the TV's session last.
    pub sticky: bool,
}

impl PgDispatch {
    /// `user`'s allowance per period and what it used in `period` (`None`: not limited).
    pub async fn allowance_left(
        &self,
        user: u64,
        period: &str,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let conn = connection(&self.pool).await?;
        super::usage::allowance_left(&conn, user, period).await
    }
}

/// Records the address TVs reach node `node_id` at (`tvcall_node.listen`), once the node
/// knows it (its bound port, or its configured `advertise` address). Returns whether
/// the node's row was there.
pub async fn advertise(target: &PgTarget, node_id: &str, addr: &str) -> Result<bool, StoreError> {
    let pool = target.pool(1, true)?;
    let conn = connection(&pool).await?;
    let n = conn
        .execute(
            "UPDATE tvcall_node SET listen = $2 WHERE node_id = $1",
            &[&node_id, &addr],
        )
        .await?;
    Ok(n == 1)
}

/// Benchmarks and tests: how many users with ids in `users` are online on `node_id`.
pub async fn online_on(
    target: &PgTarget,
    node_id: &str,
    users: std::ops::Range<u64>,
) -> Result<i64, StoreError> {
    let pool = target.pool(1, true)?;
    let conn = connection(&pool).await?;
    let row = conn
        .query_one(
            "SELECT count(*) FROM user_property
             WHERE user_id >= $1 AND user_id < $2 AND user_netstate = 1 AND node_id = $3",
            &[&(users.start as i64), &(users.end as i64), &node_id],
        )
        .await?;
    Ok(row.try_get(0)?)
}
