//! Messages on PostgreSQL (issue 15): `user_message`, the same table and rules as
//! SQLite's (`super::super::sqlite::messages`). An insert is one statement (its CTEs
//! check the sender's key, the recipient and the quota, and insert only if all allow),
//! so it pipelines with the rest of a batch like any other write.
//!
//! The quota holds across nodes: a batch that inserts messages first takes a
//! transaction-scoped advisory lock per recipient ([`LOCK_SQL`], in ascending order, so
//! two nodes' batches cannot deadlock on them). Under READ COMMITTED each later
//! statement takes a new snapshot, so the count an insert checks includes every message
//! another node committed for that recipient before this batch got the lock.

use shared_proto::{MessageId, UserId};
use tokio_postgres::Row;

use super::{key_value, Params, StoreError};
use crate::storage::message::{
    BodyMeta, Mailbox, MessageInsert, MessageQuery, MessageRow, NewMessage, Quota, Settled,
};

/// Migration 6: the messages table (SQLite's migration 7).
pub(super) const MIGRATION: &str = "CREATE TABLE user_message (
        message_id     bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id        bigint   NOT NULL,             -- who left it
        otheruser_id   bigint   NOT NULL,             -- who it is for
        idem_key       bigint   NOT NULL,
        kind           smallint NOT NULL,
        body_text      text     NOT NULL DEFAULT '',
        body_size      bigint   NOT NULL DEFAULT 0,
        body_sha256    bytea,
        body_mime      text,
        duration_ms    integer,
        width          integer,
        height         integer,
        body_path      text,                          -- relative to the body directory
        sent_at        timestamptz NOT NULL,
        delivered      smallint NOT NULL DEFAULT 0 CHECK (delivered IN (0, 1)),
        delivered_at   timestamptz
     );
     CREATE UNIQUE INDEX user_message_key ON user_message (user_id, idem_key);
     CREATE INDEX user_message_inbox ON user_message (otheruser_id, delivered, message_id);
     CREATE INDEX user_message_age ON user_message (sent_at);";

/// Takes the mailbox lock of every recipient in `$1`, in ascending order, until the
/// transaction ends.
pub(super) const LOCK_SQL: &str =
    "SELECT count(pg_advisory_xact_lock(hashtextextended('tvcall-mailbox:' || r::text, 0)))
     FROM (SELECT DISTINCT r FROM unnest($1::bigint[]) AS r ORDER BY r) AS recipients";

/// Stores a message if its key is new, its recipient known and the mailbox has room;
/// answers what it found either way (see [`insert_result`]).
pub(super) const INSERT_SQL: &str = "WITH prior AS (
        SELECT message_id, delivered FROM user_message
        WHERE user_id = $1::bigint AND idem_key = $3::bigint
     ), target AS (
        SELECT EXISTS (SELECT 1 FROM user_property WHERE user_id = $2::bigint) AS known
     ), used AS (
        SELECT count(*) AS n, count(*) FILTER (WHERE delivered = 0) AS waiting,
               coalesce(sum(body_size + octet_length(body_text)), 0)::bigint AS bytes
        FROM user_message WHERE otheruser_id = $2::bigint
     ), ins AS (
        INSERT INTO user_message (user_id, otheruser_id, idem_key, kind, body_text,
            body_size, body_sha256, body_mime, duration_ms, width, height, body_path, sent_at)
        SELECT $1::bigint, $2::bigint, $3::bigint, $4::smallint, $5::text, $6::bigint,
               $7::bytea, $8::text, $9::integer, $10::integer, $11::integer, $12::text,
               tvcall_ts($13::bigint)
        FROM target, used
        WHERE NOT EXISTS (SELECT 1 FROM prior) AND target.known
          AND used.n < $14::bigint
          AND used.bytes + $6::bigint + octet_length($5::text) <= $15::bigint
        ON CONFLICT (user_id, idem_key) DO NOTHING
        RETURNING message_id
     )
     SELECT (SELECT message_id FROM ins), (SELECT message_id FROM prior),
            (SELECT delivered FROM prior), (SELECT known FROM target),
            used.n, used.waiting, used.bytes
     FROM used";

/// Marks `$2` of recipient `$1`'s messages delivered at `$3` (ms).
pub(super) const ACK_SQL: &str = "UPDATE user_message
     SET delivered = 1, delivered_at = tvcall_ts($3::bigint)
     WHERE otheruser_id = $1::bigint AND message_id = ANY($2::bigint[]) AND delivered = 0
     RETURNING message_id, NULL::text";

/// Deletes `$2` of recipient `$1`'s messages.
pub(super) const DELETE_SQL: &str = "DELETE FROM user_message
     WHERE otheruser_id = $1::bigint AND message_id = ANY($2::bigint[])
     RETURNING message_id, body_path";

/// Deletes up to `$2` messages stored before `$1` (ms), oldest first; rows another
/// node is expiring at the same time are skipped, not waited for.
pub(super) const EXPIRE_SQL: &str = "DELETE FROM user_message WHERE message_id IN (
        SELECT message_id FROM user_message WHERE sent_at < tvcall_ts($1::bigint)
        ORDER BY sent_at LIMIT $2::bigint FOR UPDATE SKIP LOCKED)
     RETURNING message_id, body_path";

const COLUMNS: &str = "m.message_id, m.user_id, m.otheruser_id, m.idem_key, m.kind,
     m.body_text, m.body_size, m.body_sha256, m.body_mime, m.duration_ms, m.width,
     m.height, m.body_path, tvcall_ms(m.sent_at), m.delivered, p.user_netstate";

/// The parameters of [`INSERT_SQL`].
pub(super) fn insert_params(m: &NewMessage, quota: Quota) -> Params {
    let body = m.body.as_ref();
    let int = |v: Option<u32>| v.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    vec![
        Box::new(m.sender as i64),
        Box::new(m.recipient as i64),
        Box::new(key_value(m.key)),
        Box::new(i16::from(m.kind)),
        Box::new(m.text.clone()),
        Box::new(body.map_or(0, |b| i64::try_from(b.size).unwrap_or(i64::MAX))),
        Box::new(body.map(|b| b.sha256.to_vec())),
        Box::new(body.map(|b| b.mime.clone())),
        Box::new(int(body.and_then(|b| b.duration_ms))),
        Box::new(int(body.and_then(|b| b.width))),
        Box::new(int(body.and_then(|b| b.height))),
        Box::new(body.map(|b| b.path.clone())),
        Box::new(m.at_ms),
        Box::new(i64::from(quota.max_messages)),
        Box::new(i64::try_from(quota.max_bytes).unwrap_or(i64::MAX)),
    ]
}

/// What the quota counts of `m`: its body's bytes and its text's.
pub(super) fn size(m: &NewMessage) -> u64 {
    m.body
        .as_ref()
        .map_or(0, |b| b.size)
        .saturating_add(m.text.len() as u64)
}

/// What [`INSERT_SQL`] answered for a message of `size` bytes under `quota`, in SQLite's order of checks:
/// the key, the recipient, the quota.
pub(super) fn insert_result(
    rows: &[Row],
    size: u64,
    quota: Quota,
) -> Result<MessageInsert, StoreError> {
    let r = rows
        .first()
        .ok_or_else(|| StoreError::Other("no answer to a message insert".into()))?;
    let inserted: Option<i64> = r.try_get(0)?;
    let prior: Option<i64> = r.try_get(1)?;
    let delivered: Option<i16> = r.try_get(2)?;
    let known: bool = r.try_get(3)?;
    let (n, waiting, bytes): (i64, i64, i64) = (r.try_get(4)?, r.try_get(5)?, r.try_get(6)?);
    let count = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    let (n, bytes) = (count(n), bytes.max(0) as u64);
    Ok(if let Some(id) = inserted {
        MessageInsert::Stored {
            id: id as MessageId,
            waiting: count(waiting).saturating_add(1),
        }
    } else if let Some(id) = prior {
        MessageInsert::AlreadyStored {
            id: id as MessageId,
            delivered: delivered == Some(1),
        }
    } else if !known {
        MessageInsert::UnknownRecipient
    } else if n >= quota.max_messages || bytes.saturating_add(size) > quota.max_bytes {
        MessageInsert::QuotaExceeded { messages: n, bytes }
    } else {
        // A new key, a known recipient and room, yet nothing inserted: the key's row
        // was committed by another node after this statement's snapshot (ON CONFLICT).
        // The sender's retry finds it stored.
        return Err(StoreError::Unavailable(
            "the message was being stored by another node; send it again".into(),
        ));
    })
}

/// Settled messages from `rows` (id, body path), in the order of `ids`, each once.
pub(super) fn settled(rows: &[Row], ids: &[MessageId]) -> Result<Vec<Settled>, StoreError> {
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        let id: i64 = r.try_get(0)?;
        found.insert(id as MessageId, r.try_get::<_, Option<String>>(1)?);
    }
    let mut out = Vec::with_capacity(found.len());
    for id in ids {
        if let Some(body_path) = found.remove(id) {
            out.push(Settled { id: *id, body_path });
        }
    }
    Ok(out)
}

/// Expired messages from `rows` (id, body path), oldest id first.
pub(super) fn expired(rows: &[Row]) -> Result<Vec<Settled>, StoreError> {
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(Settled {
                id: r.try_get::<_, i64>(0)? as MessageId,
                body_path: r.try_get(1)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_by_key(|s| s.id);
    Ok(out)
}

/// Reads messages (see [`MessageQuery`]).
pub(super) async fn read(
    conn: &deadpool_postgres::Object,
    q: MessageQuery,
) -> Result<Vec<MessageRow>, StoreError> {
    let from = "FROM user_message m LEFT JOIN user_property p ON p.user_id = m.user_id";
    let rows = match q {
        MessageQuery::Waiting {
            recipient,
            before,
            limit,
        } => {
            let sql = format!(
                "SELECT {COLUMNS} {from}
                 WHERE m.otheruser_id = $1::bigint AND m.delivered = 0
                   AND m.message_id < $2::bigint
                 ORDER BY m.message_id DESC LIMIT $3::bigint"
            );
            let before = if before == 0 {
                i64::MAX
            } else {
                i64::try_from(before).unwrap_or(i64::MAX)
            };
            let stmt = conn.prepare_cached(&sql).await?;
            conn.query(
                &stmt,
                &[
                    &(recipient as i64),
                    &before,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await?
        }
        MessageQuery::One { recipient, id } => {
            let sql = format!(
                "SELECT {COLUMNS} {from}
                 WHERE m.otheruser_id = $1::bigint AND m.message_id = $2::bigint"
            );
            let stmt = conn.prepare_cached(&sql).await?;
            conn.query(
                &stmt,
                &[&(recipient as i64), &i64::try_from(id).unwrap_or(-1)],
            )
            .await?
        }
        MessageQuery::Keyed { sender, key } => {
            let sql = format!(
                "SELECT {COLUMNS} {from}
                 WHERE m.user_id = $1::bigint AND m.idem_key = $2::bigint"
            );
            let stmt = conn.prepare_cached(&sql).await?;
            conn.query(&stmt, &[&(sender as i64), &key_value(key)])
                .await?
        }
    };
    rows.iter().map(row).collect()
}

fn row(r: &Row) -> Result<MessageRow, StoreError> {
    let sha: Option<Vec<u8>> = r.try_get(7)?;
    let path: Option<String> = r.try_get(12)?;
    let uint = |v: Option<i32>| v.map(|n| u32::try_from(n).unwrap_or(0));
    let body = match (sha.and_then(|v| <[u8; 32]>::try_from(v).ok()), path) {
        (Some(sha256), Some(path)) => Some(BodyMeta {
            size: r.try_get::<_, i64>(6)?.max(0) as u64,
            sha256,
            mime: r.try_get::<_, Option<String>>(8)?.unwrap_or_default(),
            duration_ms: uint(r.try_get(9)?),
            width: uint(r.try_get(10)?),
            height: uint(r.try_get(11)?),
            path,
        }),
        _ => None,
    };
    Ok(MessageRow {
        id: r.try_get::<_, i64>(0)? as MessageId,
        sender: r.try_get::<_, i64>(1)? as UserId,
        recipient: r.try_get::<_, i64>(2)? as UserId,
        key: u64::from_ne_bytes(r.try_get::<_, i64>(3)?.to_ne_bytes()),
        kind: u8::try_from(r.try_get::<_, i16>(4)?).unwrap_or(0),
        text: r.try_get(5)?,
        body,
        at_ms: r.try_get(13)?,
        delivered: r.try_get::<_, i16>(14)? != 0,
        sender_online: r.try_get::<_, Option<i16>>(15)?.map(|n| n == 1),
    })
}

/// `recipient`'s mailbox.
pub(super) async fn mailbox(
    conn: &deadpool_postgres::Object,
    recipient: UserId,
) -> Result<Mailbox, StoreError> {
    let stmt = conn
        .prepare_cached(
            "SELECT count(*) FILTER (WHERE delivered = 0), count(*),
                    coalesce(sum(body_size + octet_length(body_text)), 0)::bigint
             FROM user_message WHERE otheruser_id = $1::bigint",
        )
        .await?;
    let r = conn.query_one(&stmt, &[&(recipient as i64)]).await?;
    let count = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    Ok(Mailbox {
        waiting: count(r.try_get(0)?),
        messages: count(r.try_get(1)?),
        bytes: r.try_get::<_, i64>(2)?.max(0) as u64,
    })
}
