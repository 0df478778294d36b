//! Traffic accounting on PostgreSQL (issue 18, section D): a node's usage rows added to
//! `account_usage` in one statement, the operator's reads and allowance changes, and
//! the dispatcher's question "how much of its allowance has this account left"
//! ([`crate::accounting`] says what is counted).

use shared_proto::{UnixMillis, UserId};
use tokio_postgres::Client;

use crate::accounting::{Usage, UsageDelta};
use crate::storage::operator::{UsageQuery, UsageRecord};
use crate::storage::StoreError;

/// A counter as PostgreSQL's bigint.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds each delta to its account's row for the period (made if new), all in one
/// statement over arrays (the writer sends it in its pipelined batch, with
/// [`add_params`]). The rows' (user, period) pairs are distinct
/// ([`crate::accounting::Accountant`] keeps one per pair), as one `ON CONFLICT DO UPDATE`
/// statement needs.
pub(super) const ADD_SQL: &str = "INSERT INTO account_usage AS u (user_id, period, sessions,
         session_ms, control_in, control_out, body_bytes, relay_bytes, first_at, last_at)
     SELECT user_id, period, sessions, session_ms, control_in, control_out, body_bytes,
            relay_bytes, tvcall_ts(at_ms), tvcall_ts(at_ms)
     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                 $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
          AS d(user_id, period, sessions, session_ms, control_in, control_out,
               body_bytes, relay_bytes, at_ms)
     ON CONFLICT (user_id, period) DO UPDATE SET
         sessions    = u.sessions    + EXCLUDED.sessions,
         session_ms  = u.session_ms  + EXCLUDED.session_ms,
         control_in  = u.control_in  + EXCLUDED.control_in,
         control_out = u.control_out + EXCLUDED.control_out,
         body_bytes  = u.body_bytes  + EXCLUDED.body_bytes,
         relay_bytes = u.relay_bytes + EXCLUDED.relay_bytes,
         last_at     = GREATEST(u.last_at, EXCLUDED.last_at)";

/// The parameters of [`ADD_SQL`] for `rows`: one array per column.
pub(super) fn add_params(rows: &[UsageDelta]) -> super::Params {
    let col =
        |f: fn(&Usage) -> u64| -> Vec<i64> { rows.iter().map(|r| clamp(f(&r.usage))).collect() };
    vec![
        Box::new(rows.iter().map(|r| r.user_id as i64).collect::<Vec<i64>>()),
        Box::new(
            rows.iter()
                .map(|r| r.period.clone())
                .collect::<Vec<String>>(),
        ),
        Box::new(col(|u| u.sessions)),
        Box::new(col(|u| u.session_ms)),
        Box::new(col(|u| u.control_in)),
        Box::new(col(|u| u.control_out)),
        Box::new(col(|u| u.body_bytes)),
        Box::new(col(|u| u.relay_bytes)),
        Box::new(rows.iter().map(|r| r.at_ms).collect::<Vec<i64>>()),
    ]
}

/// Operator: usage rows, newest period first, with each account's allowance.
pub(super) async fn list(conn: &Client, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError> {
    let user = q.user.map(|u| u as i64);
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let rows = conn
        .query(
            "SELECT u.user_id, u.period, u.sessions, u.session_ms, u.control_in, u.control_out,
                    u.body_bytes, u.relay_bytes, tvcall_text(u.first_at), tvcall_text(u.last_at),
                    a.bytes_per_period
             FROM account_usage u LEFT JOIN account_allowance a ON a.user_id = u.user_id
             WHERE ($1::bigint IS NULL OR u.user_id = $1) AND ($2::text IS NULL OR u.period = $2)
             ORDER BY u.period DESC, u.user_id ASC LIMIT $3",
            &[&user, &q.period, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let n = |i: usize| r.try_get::<_, i64>(i).map(|v| v.max(0) as u64);
            Ok(UsageRecord::new(
                r.try_get::<_, i64>(0)? as UserId,
                r.try_get(1)?,
                Usage {
                    sessions: n(2)?,
                    session_ms: n(3)?,
                    control_in: n(4)?,
                    control_out: n(5)?,
                    body_bytes: n(6)?,
                    relay_bytes: n(7)?,
                },
                r.try_get(8)?,
                r.try_get(9)?,
                r.try_get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64),
            ))
        })
        .collect()
}

/// Operator: sets (`Some`) or lifts (`None`) an account's allowance per period.
pub(super) async fn set_allowance(
    conn: &Client,
    user: UserId,
    bytes: Option<u64>,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let user = user as i64;
    match bytes {
        Some(b) => {
            conn.execute(
                "INSERT INTO account_allowance (user_id, bytes_per_period, set_at)
                 VALUES ($1, $2, tvcall_ts($3))
                 ON CONFLICT (user_id) DO UPDATE SET
                     bytes_per_period = EXCLUDED.bytes_per_period, set_at = EXCLUDED.set_at",
                &[&user, &clamp(b), &now_ms],
            )
            .await?
        }
        None => {
            conn.execute("DELETE FROM account_allowance WHERE user_id = $1", &[&user])
                .await?
        }
    };
    Ok(())
}

/// An account's allowance per period and what it used in `period`: `None` if it has no
/// allowance (not limited).
pub async fn allowance_left(
    conn: &Client,
    user: UserId,
    period: &str,
) -> Result<Option<(u64, u64)>, StoreError> {
    let row = conn
        .query_opt(
            "SELECT a.bytes_per_period,
                    COALESCE((SELECT u.control_in + u.control_out + u.body_bytes + u.relay_bytes
                              FROM account_usage u
                              WHERE u.user_id = a.user_id AND u.period = $2), 0)
             FROM account_allowance a WHERE a.user_id = $1",
            &[&(user as i64), &period],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let allowance: i64 = row.try_get(0)?;
    let used: i64 = row.try_get(1)?;
    Ok(Some((allowance.max(0) as u64, used.max(0) as u64)))
}
