//! Presence on SQLite (issue 16): each TV's address book (`presence_contact`) and "hide
//! my state" (`presence_setting`) written in the writer's batch, the one read a watcher's
//! subscription needs (`view`), the phone numbers on file (`user_phone`, set by the
//! operator) and the operator's alarms (`operator_alarm`: raised in the writer's batch,
//! listed and cleared by the operator on the database file). Migration 6.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use shared_proto::{UnixMillis, UserId};

use super::enroll::open_rw;
use super::operator::OperatorDb;
use super::{db_error, StoreError};
use crate::clock::{from_db_text, to_db_text};
use crate::storage::operator::AlarmRecord;
use crate::storage::{NewAlarm, PresenceBook, PresenceRow};

/// Replaces `user`'s address book with `contacts` (a [`crate::storage::presence_list`]).
pub(super) fn set_book(
    tx: &Transaction<'_>,
    user: UserId,
    contacts: &[UserId],
) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM presence_contact WHERE user_id = ?1")
        .and_then(|mut s| s.execute([user as i64]))
        .map_err(db_error)?;
    let mut insert = tx
        .prepare_cached("INSERT INTO presence_contact (user_id, contact_id) VALUES (?1, ?2)")
        .map_err(db_error)?;
    for &c in contacts {
        insert
            .execute(params![user as i64, c as i64])
            .map_err(db_error)?;
    }
    Ok(())
}

/// Sets `user`'s "hide my state".
pub(super) fn set_hidden(
    tx: &Transaction<'_>,
    user: UserId,
    hidden: bool,
    at_ms: UnixMillis,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO presence_setting (user_id, hidden, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id) DO UPDATE SET
             hidden = excluded.hidden, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| s.execute(params![user as i64, i64::from(hidden), to_db_text(at_ms)]))
    .map(|_| ())
    .map_err(db_error)
}

/// Records an alarm for the operator.
pub(super) fn raise(tx: &Transaction<'_>, alarm: &NewAlarm) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO operator_alarm (user_id, raised_at, reason, count) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut s| {
        s.execute(params![
            alarm.user_id as i64,
            to_db_text(alarm.at_ms),
            alarm.reason,
            i64::from(alarm.count)
        ])
    })
    .map(|_| ())
    .map_err(db_error)
}

/// What `?1` (the watcher) may learn of each user in `?2` (a JSON array of distinct
/// ids), in one statement. "Has called the watcher" is one lookup of the watcher's
/// received calls on `user_call_callee` (read once for all the users asked, not once
/// per user on `user_call_caller`: a TV's received calls are fewer than the calls its
/// 500 contacts made); the address book and the settings are primary-key lookups.
pub(super) const VIEW_SQL: &str = "WITH asked(u) AS (SELECT value FROM json_each(?2))
     SELECT a.u, p.user_netstate, p.last_seen, coalesce(s.hidden, 0),
            EXISTS (SELECT 1 FROM user_phone ph WHERE ph.user_id = a.u),
            p.user_id IS NOT NULL AND coalesce(s.hidden, 0) = 0 AND (
              EXISTS (SELECT 1 FROM presence_contact c
                      WHERE c.user_id = a.u AND c.contact_id = ?1)
              OR a.u IN (SELECT k.user_id FROM user_call k WHERE k.otheruser_id = ?1))
     FROM asked a
     LEFT JOIN user_property p ON p.user_id = a.u
     LEFT JOIN presence_setting s ON s.user_id = a.u";

/// What `watcher` may learn of each of `users` (a [`crate::storage::presence_list`]).
pub(super) fn view(
    conn: &Connection,
    watcher: UserId,
    users: &[UserId],
) -> Result<Vec<PresenceRow>, StoreError> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let asked = format!(
        "[{}]",
        users
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut s = conn.prepare_cached(VIEW_SQL).map_err(db_error)?;
    let rows = s
        .query_map(params![watcher as i64, asked], |r| {
            Ok(PresenceRow {
                user_id: r.get::<_, i64>(0)? as UserId,
                online: r.get::<_, Option<i64>>(1)?.map(|n| n == 1),
                last_seen_ms: r
                    .get::<_, Option<String>>(2)?
                    .as_deref()
                    .and_then(from_db_text),
                hidden: r.get::<_, i64>(3)? != 0,
                has_phone: r.get(4)?,
                allowed: r.get(5)?,
            })
        })
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// `user`'s own presence settings.
pub(super) fn book(conn: &Connection, user: UserId) -> Result<PresenceBook, StoreError> {
    let mut s = conn
        .prepare_cached(
            "SELECT contact_id FROM presence_contact WHERE user_id = ?1 ORDER BY contact_id",
        )
        .map_err(db_error)?;
    let contacts = s
        .query_map([user as i64], |r| r.get::<_, i64>(0).map(|c| c as UserId))
        .map_err(db_error)?
        .collect::<Result<_, _>>()
        .map_err(db_error)?;
    let hidden = conn
        .prepare_cached("SELECT hidden FROM presence_setting WHERE user_id = ?1")
        .and_then(|mut s| {
            s.query_row([user as i64], |r| r.get::<_, i64>(0))
                .optional()
        })
        .map_err(db_error)?
        .is_some_and(|h| h != 0);
    Ok(PresenceBook { contacts, hidden })
}

/// Operator: sets or clears `user`'s phone number on the database file; `false`: no such
/// user.
pub fn set_phone(
    path: &Path,
    user: UserId,
    phone: Option<&str>,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let Ok(key) = i64::try_from(user) else {
        return Ok(false);
    };
    let mut conn = open_rw(path)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    let exists = tx
        .query_row(
            "SELECT 1 FROM user_property WHERE user_id = ?1",
            [key],
            |_| Ok(()),
        )
        .optional()
        .map_err(db_error)?
        .is_some();
    if !exists {
        return Ok(false);
    }
    match phone {
        Some(p) => tx.execute(
            "INSERT INTO user_phone (user_id, phone, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id) DO UPDATE SET
                 phone = excluded.phone, updated_at = excluded.updated_at",
            params![key, p, to_db_text(now_ms)],
        ),
        None => tx.execute("DELETE FROM user_phone WHERE user_id = ?1", [key]),
    }
    .map_err(db_error)?;
    tx.commit().map_err(db_error)?;
    Ok(true)
}

/// Operator: how many alarms are open.
pub fn open_alarms(db: &OperatorDb) -> Result<u64, StoreError> {
    db.conn()
        .query_row(
            "SELECT count(*) FROM operator_alarm WHERE cleared_at IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n.max(0) as u64)
        .map_err(db_error)
}

/// Operator: the newest alarms, open ones only unless `include_cleared`.
pub fn alarms(
    db: &OperatorDb,
    include_cleared: bool,
    limit: usize,
) -> Result<Vec<AlarmRecord>, StoreError> {
    let mut s = db
        .conn()
        .prepare(
            "SELECT id, user_id, raised_at, reason, count, cleared_at FROM operator_alarm
             WHERE (?1 = 1 OR cleared_at IS NULL) ORDER BY id DESC LIMIT ?2",
        )
        .map_err(db_error)?;
    let rows = s
        .query_map(
            params![
                i64::from(include_cleared),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok(AlarmRecord {
                    id: r.get::<_, i64>(0)? as u64,
                    user_id: r.get::<_, i64>(1)? as UserId,
                    raised_at: r.get(2)?,
                    reason: r.get(3)?,
                    count: u32::try_from(r.get::<_, i64>(4)?.max(0)).unwrap_or(u32::MAX),
                    cleared_at: r.get(5)?,
                })
            },
        )
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// Operator: clears alarm `id` on the database file; `false`: unknown or cleared already.
pub fn clear_alarm(path: &Path, id: u64, now_ms: UnixMillis) -> Result<bool, StoreError> {
    let Ok(id) = i64::try_from(id) else {
        return Ok(false);
    };
    let conn = open_rw(path)?;
    let n = conn
        .execute(
            "UPDATE operator_alarm SET cleared_at = ?2 WHERE id = ?1 AND cleared_at IS NULL",
            params![id, to_db_text(now_ms)],
        )
        .map_err(db_error)?;
    Ok(n > 0)
}

/// Writes address-book entries `(owner, contact)` straight into the database at `path`
/// (created with the schema if new), as if each owner had subscribed with them: for
/// benchmarks that start a server on many TVs that may watch each other.
pub fn seed_contacts(path: &Path, rows: &[(UserId, UserId)]) -> Result<(), StoreError> {
    super::create_schema(path)?;
    let mut conn = Connection::open(path).map_err(db_error)?;
    let tx = conn.transaction().map_err(db_error)?;
    {
        let mut s = tx
            .prepare("INSERT OR IGNORE INTO presence_contact (user_id, contact_id) VALUES (?1, ?2)")
            .map_err(db_error)?;
        for (owner, contact) in rows {
            s.execute(params![*owner as i64, *contact as i64])
                .map_err(db_error)?;
        }
    }
    tx.commit().map_err(db_error)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::storage::sqlite::{SqliteOptions, SqliteStore};
    use crate::storage::Store;

    #[tokio::test]
    async fn the_view_reads_each_table_through_an_index_and_the_calls_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path, SqliteOptions::default())
            .unwrap()
            .close()
            .await;
        let raw = Connection::open(&path).unwrap();
        let plan: Vec<String> = raw
            .prepare(&format!("EXPLAIN QUERY PLAN {VIEW_SQL}"))
            .unwrap()
            .query_map(params![1, "[2,3]"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // The calls are searched on the callee index, never scanned, and in a subquery
        // that does not depend on the user asked (evaluated once).
        assert!(
            plan.iter()
                .any(|p| p.contains("SEARCH k USING") && p.contains("user_call_callee")),
            "{plan:?}"
        );
        assert!(plan.iter().any(|p| p.contains("LIST SUBQUERY")), "{plan:?}");
        assert!(
            !plan.iter().any(|p| p.contains("CORRELATED LIST SUBQUERY")),
            "{plan:?}"
        );
        for table in ["p", "s", "c", "ph", "k"] {
            assert!(
                !plan.iter().any(|p| p.starts_with(&format!("SCAN {table}"))),
                "{table} scanned: {plan:?}"
            );
        }
    }
}
