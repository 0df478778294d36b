//! Presence on PostgreSQL (issue 16): the statements the writer sends in its pipelined
//! batch for a TV's address book (`presence_contact`), its "hide my state"
//! (`presence_setting`) and the operator's alarms (`operator_alarm`); the one read a
//! watcher's subscription needs (`view`); and the operator's phone numbers (`user_phone`)
//! and alarms on its own connections. Migration 5; SQLite's twin is
//! [`crate::storage::sqlite::presence`].

use shared_proto::{UnixMillis, UserId};
use tokio_postgres::Client;

use crate::storage::operator::AlarmRecord;
use crate::storage::{NewAlarm, PresenceBook, PresenceRow, StoreError};

/// An address book's first statement: the old book goes ([`BOOK_INSERT_SQL`] follows in
/// the same write).
pub(super) const BOOK_DELETE_SQL: &str = "DELETE FROM presence_contact WHERE user_id = $1::bigint";

/// An address book's second statement: the new contacts (distinct).
pub(super) const BOOK_INSERT_SQL: &str = "INSERT INTO presence_contact (user_id, contact_id)
     SELECT $1::bigint, c FROM unnest($2::bigint[]) AS t(c)";

/// Sets a TV's "hide my state".
pub(super) const HIDDEN_SQL: &str = "INSERT INTO presence_setting (user_id, hidden, updated_at)
     VALUES ($1::bigint, $2::bool, tvcall_ts($3::bigint))
     ON CONFLICT (user_id) DO UPDATE SET
         hidden = EXCLUDED.hidden, updated_at = EXCLUDED.updated_at";

/// Records an alarm.
pub(super) const ALARM_SQL: &str = "INSERT INTO operator_alarm (user_id, raised_at, reason, count)
     VALUES ($1::bigint, tvcall_ts($2::bigint), $3::text, $4::bigint)";

/// The parameters of [`ALARM_SQL`].
pub(super) fn alarm_params(alarm: &NewAlarm) -> super::Params {
    vec![
        Box::new(alarm.user_id as i64),
        Box::new(alarm.at_ms),
        Box::new(alarm.reason.clone()),
        Box::new(i64::from(alarm.count)),
    ]
}

/// What `$1` (the watcher) may learn of each user in `$2` (distinct ids), in one
/// statement. "Has called the watcher" is an uncorrelated subquery on the watcher's
/// received calls (`user_call_callee`), hashed once for all the users asked rather than
/// looked up once per user; the address book and the settings are primary-key lookups.
const VIEW_SQL: &str = "SELECT a.u, p.user_netstate, tvcall_ms(p.last_seen),
            coalesce(s.hidden, false),
            EXISTS (SELECT 1 FROM user_phone ph WHERE ph.user_id = a.u),
            p.user_id IS NOT NULL AND NOT coalesce(s.hidden, false) AND (
              EXISTS (SELECT 1 FROM presence_contact c
                      WHERE c.user_id = a.u AND c.contact_id = $1::bigint)
              OR a.u IN (SELECT k.user_id FROM user_call k WHERE k.otheruser_id = $1::bigint))
     FROM unnest($2::bigint[]) AS a(u)
     LEFT JOIN user_property p ON p.user_id = a.u
     LEFT JOIN presence_setting s ON s.user_id = a.u";

/// What `watcher` may learn of each of `users` (a [`crate::storage::presence_list`]).
pub(super) async fn view(
    conn: &deadpool_postgres::Object,
    watcher: UserId,
    users: &[UserId],
) -> Result<Vec<PresenceRow>, StoreError> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let asked: Vec<i64> = users.iter().map(|&u| u as i64).collect();
    let stmt = conn.prepare_cached(VIEW_SQL).await?;
    let rows = conn.query(&stmt, &[&(watcher as i64), &asked]).await?;
    rows.iter()
        .map(|r| {
            Ok(PresenceRow {
                user_id: r.try_get::<_, i64>(0)? as UserId,
                online: r.try_get::<_, Option<i16>>(1)?.map(|n| n == 1),
                last_seen_ms: r.try_get(2)?,
                hidden: r.try_get(3)?,
                has_phone: r.try_get(4)?,
                allowed: r.try_get(5)?,
            })
        })
        .collect()
}

/// `user`'s own presence settings.
pub(super) async fn book(
    conn: &deadpool_postgres::Object,
    user: UserId,
) -> Result<PresenceBook, StoreError> {
    let user = user as i64;
    let stmt = conn
        .prepare_cached(
            "SELECT contact_id FROM presence_contact WHERE user_id = $1::bigint
             ORDER BY contact_id",
        )
        .await?;
    let contacts = conn
        .query(&stmt, &[&user])
        .await?
        .iter()
        .map(|r| r.try_get::<_, i64>(0).map(|c| c as UserId))
        .collect::<Result<_, _>>()?;
    let stmt = conn
        .prepare_cached("SELECT hidden FROM presence_setting WHERE user_id = $1::bigint")
        .await?;
    let hidden = match conn.query_opt(&stmt, &[&user]).await? {
        Some(r) => r.try_get(0)?,
        None => false,
    };
    Ok(PresenceBook { contacts, hidden })
}

/// Operator: sets or clears `user`'s phone number, in one transaction; `false`: no such
/// user.
pub(super) async fn set_phone(
    conn: &mut deadpool_postgres::Object,
    user: UserId,
    phone: Option<&str>,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let Ok(key) = i64::try_from(user) else {
        return Ok(false);
    };
    let tx = conn.transaction().await?;
    // Locks the user's row: a user removed meanwhile is not given a number.
    let exists = tx
        .query_opt(
            "SELECT 1 FROM user_property WHERE user_id = $1 FOR SHARE",
            &[&key],
        )
        .await?
        .is_some();
    if !exists {
        return Ok(false);
    }
    match phone {
        Some(p) => {
            tx.execute(
                "INSERT INTO user_phone (user_id, phone, updated_at)
                 VALUES ($1, $2, tvcall_ts($3))
                 ON CONFLICT (user_id) DO UPDATE SET
                     phone = EXCLUDED.phone, updated_at = EXCLUDED.updated_at",
                &[&key, &p, &now_ms],
            )
            .await?
        }
        None => {
            tx.execute("DELETE FROM user_phone WHERE user_id = $1", &[&key])
                .await?
        }
    };
    tx.commit().await?;
    Ok(true)
}

/// Operator: how many alarms are open.
pub(super) async fn open_alarms(conn: &Client) -> Result<u64, StoreError> {
    let row = conn
        .query_one(
            "SELECT count(*) FROM operator_alarm WHERE cleared_at IS NULL",
            &[],
        )
        .await?;
    Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
}

/// Operator: the newest alarms, open ones only unless `include_cleared`.
pub(super) async fn alarms(
    conn: &Client,
    include_cleared: bool,
    limit: usize,
) -> Result<Vec<AlarmRecord>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = conn
        .query(
            "SELECT id, user_id, tvcall_text(raised_at), reason, count, tvcall_text(cleared_at)
             FROM operator_alarm
             WHERE ($1::bool OR cleared_at IS NULL) ORDER BY id DESC LIMIT $2::bigint",
            &[&include_cleared, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(AlarmRecord {
                id: r.try_get::<_, i64>(0)? as u64,
                user_id: r.try_get::<_, i64>(1)? as UserId,
                raised_at: r.try_get(2)?,
                reason: r.try_get(3)?,
                count: u32::try_from(r.try_get::<_, i64>(4)?.max(0)).unwrap_or(u32::MAX),
                cleared_at: r.try_get(5)?,
            })
        })
        .collect()
}

/// Operator: clears alarm `id`; `false`: unknown or cleared already.
pub(super) async fn clear_alarm(
    conn: &Client,
    id: u64,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let Ok(id) = i64::try_from(id) else {
        return Ok(false);
    };
    let n = conn
        .execute(
            "UPDATE operator_alarm SET cleared_at = tvcall_ts($2)
             WHERE id = $1 AND cleared_at IS NULL",
            &[&id, &now_ms],
        )
        .await?;
    Ok(n > 0)
}
