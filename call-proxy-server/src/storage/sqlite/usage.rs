//! Traffic accounting on SQLite (issue 18, section D): the node's usage rows added to
//! `account_usage` in the writer's batch, and the operator's reads and allowance
//! changes on the database file ([`crate::accounting`] says what is counted).

use std::path::Path;

use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use shared_proto::{UnixMillis, UserId};

use super::enroll::open_rw;
use super::operator::OperatorDb;
use super::{db_error, StoreError};
use crate::accounting::UsageDelta;
use crate::clock::to_db_text;
use crate::storage::operator::{UsageQuery, UsageRecord};

/// Adds each delta to its account's row for the period (made if new).
pub(super) fn add(tx: &Transaction<'_>, rows: &[UsageDelta]) -> Result<(), StoreError> {
    let mut s = tx
        .prepare_cached(
            "INSERT INTO account_usage (user_id, period, sessions, session_ms, control_in,
                 control_out, body_bytes, relay_bytes, first_at, last_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
             ON CONFLICT (user_id, period) DO UPDATE SET
                 sessions    = sessions    + excluded.sessions,
                 session_ms  = session_ms  + excluded.session_ms,
                 control_in  = control_in  + excluded.control_in,
                 control_out = control_out + excluded.control_out,
                 body_bytes  = body_bytes  + excluded.body_bytes,
                 relay_bytes = relay_bytes + excluded.relay_bytes,
                 last_at     = max(last_at, excluded.last_at)",
        )
        .map_err(db_error)?;
    for r in rows {
        let u = &r.usage;
        s.execute(params![
            r.user_id as i64,
            r.period,
            clamp(u.sessions),
            clamp(u.session_ms),
            clamp(u.control_in),
            clamp(u.control_out),
            clamp(u.body_bytes),
            clamp(u.relay_bytes),
            to_db_text(r.at_ms),
        ])
        .map_err(db_error)?;
    }
    Ok(())
}

/// A counter as SQLite's integer.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Operator: usage rows, newest period first, with each account's allowance.
pub fn list(db: &OperatorDb, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError> {
    let mut s = db
        .conn()
        .prepare(
            "SELECT u.user_id, u.period, u.sessions, u.session_ms, u.control_in, u.control_out,
                    u.body_bytes, u.relay_bytes, u.first_at, u.last_at, a.bytes_per_period
             FROM account_usage u LEFT JOIN account_allowance a ON a.user_id = u.user_id
             WHERE (?1 IS NULL OR u.user_id = ?1) AND (?2 IS NULL OR u.period = ?2)
             ORDER BY u.period DESC, u.user_id ASC LIMIT ?3",
        )
        .map_err(db_error)?;
    let rows = s
        .query_map(
            params![
                q.user.map(|u| u as i64),
                q.period.as_deref(),
                q.limit as i64
            ],
            |r| {
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(UsageRecord::new(
                    r.get::<_, i64>(0)? as UserId,
                    r.get(1)?,
                    crate::accounting::Usage {
                        sessions: n(2)?,
                        session_ms: n(3)?,
                        control_in: n(4)?,
                        control_out: n(5)?,
                        body_bytes: n(6)?,
                        relay_bytes: n(7)?,
                    },
                    r.get(8)?,
                    r.get(9)?,
                    r.get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64),
                ))
            },
        )
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// Operator: one account's allowance per period (`None`: not limited).
pub fn allowance(db: &OperatorDb, user: UserId) -> Result<Option<u64>, StoreError> {
    db.conn()
        .query_row(
            "SELECT bytes_per_period FROM account_allowance WHERE user_id = ?1",
            [user as i64],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.map(|b| b.max(0) as u64))
        .map_err(db_error)
}

/// Operator: sets (`Some`) or lifts (`None`) an account's allowance per period, on the
/// database file (works while the server runs).
pub fn set_allowance(
    path: &Path,
    user: UserId,
    bytes: Option<u64>,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let mut conn = open_rw(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    match bytes {
        Some(b) => tx.execute(
            "INSERT INTO account_allowance (user_id, bytes_per_period, set_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id) DO UPDATE SET
                 bytes_per_period = excluded.bytes_per_period, set_at = excluded.set_at",
            params![user as i64, clamp(b), to_db_text(now_ms)],
        ),
        None => tx.execute(
            "DELETE FROM account_allowance WHERE user_id = ?1",
            [user as i64],
        ),
    }
    .map_err(db_error)?;
    tx.commit().map_err(db_error)
}
