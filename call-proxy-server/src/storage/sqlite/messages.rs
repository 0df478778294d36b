//! Messages on SQLite (issue 15): `user_message`, one row per message a TV left for
//! another, written in the writer's batch (the quota and the sender's key are checked
//! in the insert's own savepoint, so a batch answers each insert as if it ran alone),
//! read by the reader threads. Bodies are files the server keeps beside the database;
//! a row only names its body's path. Migrations 7 and 8.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use shared_proto::{MessageId, UnixMillis, UserId};

use super::{key_value, StoreError};
use crate::clock::{from_db_text, to_db_text};
use crate::storage::message::{
    BodyMeta, Mailbox, MessageInsert, MessageQuery, MessageRow, NewMessage, Quota, Settle, Settled,
};

/// Migration 7: the messages table. The sender's key is unique (a message is stored at
/// most once per key); `user_message_inbox` serves a TV's listing, its quota sums and
/// the acknowledgements; `user_message_age` serves retention.
pub(super) const MIGRATION: &str = "CREATE TABLE user_message (
        message_id     INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id        INTEGER NOT NULL,             -- who left it
        otheruser_id   INTEGER NOT NULL,             -- who it is for
        idem_key       INTEGER NOT NULL,
        kind           INTEGER NOT NULL,
        body_text      TEXT    NOT NULL DEFAULT '',
        body_size      INTEGER NOT NULL DEFAULT 0,
        body_sha256    BLOB,
        body_mime      TEXT,
        duration_ms    INTEGER,
        width          INTEGER,
        height         INTEGER,
        body_path      TEXT,                         -- relative to the body directory
        sent_at        TEXT    NOT NULL,
        delivered      INTEGER NOT NULL DEFAULT 0 CHECK (delivered IN (0, 1)),
        delivered_at   TEXT
     );
     CREATE UNIQUE INDEX user_message_key ON user_message (user_id, idem_key);
     CREATE INDEX user_message_inbox ON user_message (otheruser_id, delivered, message_id);
     CREATE INDEX user_message_age ON user_message (sent_at);";

/// Migration 8: `quota_bytes` (body and text bytes, what the mailbox quota counts) and
/// the index `user_message_quota` on (recipient, quota_bytes) that answers the quota
/// check without reading the table (before it, each insert read every row of the
/// recipient's mailbox: 7,600 texts/s instead of 10,000 at 80 messages per mailbox).
pub(super) const QUOTA_MIGRATION: &str =
    "ALTER TABLE user_message ADD COLUMN quota_bytes INTEGER NOT NULL DEFAULT 0;
     UPDATE user_message SET quota_bytes = body_size + length(CAST(body_text AS BLOB));
     CREATE INDEX user_message_quota ON user_message (otheruser_id, quota_bytes);";

const COLUMNS: &str = "m.message_id, m.user_id, m.otheruser_id, m.idem_key, m.kind, m.body_text,
     m.body_size, m.body_sha256, m.body_mime, m.duration_ms, m.width, m.height, m.body_path,
     m.sent_at, m.delivered, p.user_netstate";

/// Stores a message (see [`crate::storage::Store::insert_message`]).
pub(super) fn insert(
    tx: &Transaction<'_>,
    m: &NewMessage,
    quota: Quota,
) -> Result<MessageInsert, StoreError> {
    let prior = tx
        .prepare_cached(
            "SELECT message_id, delivered FROM user_message WHERE user_id = ?1 AND idem_key = ?2",
        )?
        .query_row(params![m.sender as i64, key_value(m.key)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    if let Some((id, delivered)) = prior {
        return Ok(MessageInsert::AlreadyStored {
            id: id as MessageId,
            delivered: delivered != 0,
        });
    }
    let exists: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM user_property WHERE user_id = ?1)")?
        .query_row([m.recipient as i64], |r| r.get(0))?;
    if !exists {
        return Ok(MessageInsert::UnknownRecipient);
    }
    let (count, bytes) = usage(tx, m.recipient)?;
    let size = m
        .body
        .as_ref()
        .map_or(0, |b| b.size)
        .saturating_add(m.text.len() as u64);
    if count >= u64::from(quota.max_messages) || bytes.saturating_add(size) > quota.max_bytes {
        return Ok(MessageInsert::QuotaExceeded {
            messages: u32::try_from(count).unwrap_or(u32::MAX),
            bytes,
        });
    }
    let body = m.body.as_ref();
    tx.prepare_cached(
        "INSERT INTO user_message (user_id, otheruser_id, idem_key, kind, body_text, body_size,
             body_sha256, body_mime, duration_ms, width, height, body_path, sent_at,
             quota_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        m.sender as i64,
        m.recipient as i64,
        key_value(m.key),
        i64::from(m.kind),
        m.text,
        body.map_or(0, |b| b.size as i64),
        body.map(|b| b.sha256.to_vec()),
        body.map(|b| b.mime.as_str()),
        body.and_then(|b| b.duration_ms),
        body.and_then(|b| b.width),
        body.and_then(|b| b.height),
        body.map(|b| b.path.as_str()),
        to_db_text(m.at_ms),
        i64::try_from(size).unwrap_or(i64::MAX),
    ])?;
    let id = tx.last_insert_rowid() as MessageId;
    Ok(MessageInsert::Stored {
        id,
        waiting: waiting(tx, m.recipient)?,
    })
}

/// Messages and bytes kept for `recipient`.
fn usage(conn: &Connection, recipient: UserId) -> Result<(u64, u64), StoreError> {
    conn.prepare_cached(
        "SELECT count(*), coalesce(sum(quota_bytes), 0)
         FROM user_message WHERE otheruser_id = ?1",
    )?
    .query_row([recipient as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })
    .map_err(Into::into)
}

/// `recipient`'s mailbox.
pub(super) fn mailbox(conn: &Connection, recipient: UserId) -> Result<Mailbox, StoreError> {
    let (messages, bytes) = usage(conn, recipient)?;
    Ok(Mailbox {
        waiting: waiting(conn, recipient)?,
        messages: u32::try_from(messages).unwrap_or(u32::MAX),
        bytes,
    })
}

/// Messages waiting for `recipient`.
fn waiting(conn: &Connection, recipient: UserId) -> Result<u32, StoreError> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM user_message WHERE otheruser_id = ?1 AND delivered = 0",
        )?
        .query_row([recipient as i64], |r| r.get(0))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// Acknowledges or deletes `ids` of `recipient`'s messages.
pub(super) fn settle(
    tx: &Transaction<'_>,
    recipient: UserId,
    ids: &[MessageId],
    settle: Settle,
    at_ms: UnixMillis,
) -> Result<Vec<Settled>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let Ok(id) = i64::try_from(id) else { continue };
        let found = match settle {
            Settle::Ack => tx
                .prepare_cached(
                    "UPDATE user_message SET delivered = 1, delivered_at = ?3
                     WHERE message_id = ?1 AND otheruser_id = ?2 AND delivered = 0
                     RETURNING body_path",
                )?
                .query_row(params![id, recipient as i64, to_db_text(at_ms)], |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()?
                // An acknowledgement removes no body.
                .map(|_| None),
            Settle::Delete => tx
                .prepare_cached(
                    "DELETE FROM user_message WHERE message_id = ?1 AND otheruser_id = ?2
                     RETURNING body_path",
                )?
                .query_row(params![id, recipient as i64], |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()?,
        };
        if let Some(body_path) = found {
            out.push(Settled {
                id: id as MessageId,
                body_path,
            });
        }
    }
    Ok(out)
}

/// Deletes up to `limit` messages stored before `before_ms`.
pub(super) fn expire(
    tx: &Transaction<'_>,
    before_ms: UnixMillis,
    limit: usize,
) -> Result<Vec<Settled>, StoreError> {
    let mut s = tx.prepare_cached(
        "DELETE FROM user_message WHERE message_id IN (
             SELECT message_id FROM user_message WHERE sent_at < ?1 ORDER BY sent_at LIMIT ?2)
         RETURNING message_id, body_path",
    )?;
    let rows = s.query_map(
        params![
            to_db_text(before_ms),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok(Settled {
                id: r.get::<_, i64>(0)? as MessageId,
                body_path: r.get(1)?,
            })
        },
    )?;
    rows.collect::<Result<_, _>>().map_err(Into::into)
}

/// Reads messages (see [`MessageQuery`]).
pub(super) fn read(conn: &Connection, q: MessageQuery) -> Result<Vec<MessageRow>, StoreError> {
    let (sql, a, b, c) = match q {
        MessageQuery::Waiting {
            recipient,
            before,
            limit,
        } => (
            format!(
                "SELECT {COLUMNS} FROM user_message m
                 LEFT JOIN user_property p ON p.user_id = m.user_id
                 WHERE m.otheruser_id = ?1 AND m.delivered = 0 AND m.message_id < ?2
                 ORDER BY m.message_id DESC LIMIT ?3"
            ),
            recipient as i64,
            if before == 0 {
                i64::MAX
            } else {
                i64::try_from(before).unwrap_or(i64::MAX)
            },
            i64::try_from(limit).unwrap_or(i64::MAX),
        ),
        MessageQuery::One { recipient, id } => (
            format!(
                "SELECT {COLUMNS} FROM user_message m
                 LEFT JOIN user_property p ON p.user_id = m.user_id
                 WHERE m.otheruser_id = ?1 AND m.message_id = ?2 AND ?3 = ?3"
            ),
            recipient as i64,
            i64::try_from(id).unwrap_or(-1),
            0,
        ),
        MessageQuery::Keyed { sender, key } => (
            format!(
                "SELECT {COLUMNS} FROM user_message m
                 LEFT JOIN user_property p ON p.user_id = m.user_id
                 WHERE m.user_id = ?1 AND m.idem_key = ?2 AND ?3 = ?3"
            ),
            sender as i64,
            key_value(key),
            0,
        ),
    };
    let mut s = conn.prepare_cached(&sql)?;
    let rows = s.query_map(params![a, b, c], row)?;
    rows.collect::<Result<_, _>>().map_err(Into::into)
}

fn row(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    let sha: Option<Vec<u8>> = r.get(7)?;
    let body = match (
        sha.and_then(|v| <[u8; 32]>::try_from(v).ok()),
        r.get::<_, Option<String>>(12)?,
    ) {
        (Some(sha256), Some(path)) => Some(BodyMeta {
            size: r.get::<_, i64>(6)? as u64,
            sha256,
            mime: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
            duration_ms: r.get(9)?,
            width: r.get(10)?,
            height: r.get(11)?,
            path,
        }),
        _ => None,
    };
    Ok(MessageRow {
        id: r.get::<_, i64>(0)? as MessageId,
        sender: r.get::<_, i64>(1)? as UserId,
        recipient: r.get::<_, i64>(2)? as UserId,
        key: u64::from_ne_bytes(r.get::<_, i64>(3)?.to_ne_bytes()),
        kind: u8::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
        text: r.get(5)?,
        body,
        at_ms: r
            .get::<_, String>(13)
            .ok()
            .as_deref()
            .and_then(from_db_text)
            .unwrap_or(0),
        delivered: r.get::<_, i64>(14)? != 0,
        sender_online: r.get::<_, Option<i64>>(15)?.map(|n| n == 1),
    })
}
