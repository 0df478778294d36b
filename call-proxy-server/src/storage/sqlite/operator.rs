//! The SQLite implementation of the operator reads ([`OperatorStore`]): read-only
//! connections to the database file (which work while the server runs and when it is
//! down), pooled and used on blocking threads ([`SqliteOperator`]), never through the
//! store's writer. [`OperatorDb`] is one such connection, usable synchronously.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use shared_proto::{UnixMillis, UserId};
use tokio::sync::Semaphore;

use crate::clock::{from_db_text, to_db_text};
use crate::storage::operator::{
    call_log_conditions, message_log_conditions, CallQuery, CallRecord, MailboxTotals,
    MessageLogQuery, MessageRecord, OperatorStore, SqlArg, Stats, UserRecord,
};
use crate::storage::{missed_kinds_sql, StoreError, MISSED_KINDS_SQL};

/// A read-only connection to the database for operator queries.
pub struct OperatorDb {
    /// The connection, opened read-only.
    conn: Connection,
}

/// Operator reads on a SQLite file: read-only connections, opened when first needed,
/// reused, used on blocking threads, at most a fixed number at once. Cheap to clone.
#[derive(Clone)]
pub struct SqliteOperator {
    /// The pool, shared by clones.
    inner: Arc<Pool>,
}

/// What [`SqliteOperator`]'s clones share.
struct Pool {
    /// The database file.
    path: PathBuf,
    /// Connections not in use, reused by the next query.
    idle: Mutex<Vec<OperatorDb>>,
    /// Bounds the queries running at once (and so the connections open). A permit
    /// moves into the blocking task, so a caller that stops waiting (a timed-out probe)
    /// does not free its place before the query is really over.
    permits: Arc<Semaphore>,
}

impl SqliteOperator {
    /// Reads on the database at `path`, at most `max_queries` at once. Opens nothing
    /// yet: a missing file fails each query with "no database at …".
    pub fn new(path: PathBuf, max_queries: usize) -> SqliteOperator {
        SqliteOperator {
            inner: Arc::new(Pool {
                path,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(max_queries.max(1))),
            }),
        }
    }

    /// Runs `query` on a blocking thread with a pooled connection.
    async fn run<T: Send + 'static>(
        &self,
        query: impl FnOnce(&OperatorDb) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let idle = pool.idle.lock().ok().and_then(|mut v| v.pop());
            let db = match idle {
                Some(db) => db,
                None => OperatorDb::open(&pool.path)?,
            };
            let result = query(&db);
            // A connection that failed may be broken: open a fresh one next time.
            if result.is_ok() {
                if let Ok(mut v) = pool.idle.lock() {
                    v.push(db);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Other(format!("operator query task failed: {e}")))?
    }
}

impl OperatorStore for SqliteOperator {
    async fn calls(&self, q: CallQuery) -> Result<Vec<CallRecord>, StoreError> {
        self.run(move |db| db.calls(&q)).await
    }

    async fn users(&self, online_only: bool, limit: usize) -> Result<Vec<UserRecord>, StoreError> {
        self.run(move |db| db.users(online_only, limit)).await
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.run(move |db| db.user(id)).await
    }

    async fn stats(&self, now_ms: UnixMillis) -> Result<Stats, StoreError> {
        self.run(move |db| db.stats(now_ms)).await
    }

    async fn messages(&self, q: MessageLogQuery) -> Result<Vec<MessageRecord>, StoreError> {
        self.run(move |db| db.messages(&q)).await
    }

    async fn mailbox_totals(&self, user: Option<UserId>) -> Result<MailboxTotals, StoreError> {
        self.run(move |db| db.mailbox_totals(user)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|db| db.ping()).await
    }

    async fn approve(
        &self,
        code: String,
        user: UserId,
        replace: bool,
        now_ms: UnixMillis,
    ) -> Result<crate::storage::enroll::Approval, StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            super::enroll::approve(&path, &code, user, replace, now_ms)
        })
        .await
        .map_err(|e| StoreError::Other(format!("approval task: {e}")))?
    }

    async fn refuse(
        &self,
        code: String,
        now_ms: UnixMillis,
    ) -> Result<crate::storage::enroll::Refusal, StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || super::enroll::refuse(&path, &code, now_ms))
            .await
            .map_err(|e| StoreError::Other(format!("refusal task: {e}")))?
    }

    async fn revoke(&self, user: UserId, now_ms: UnixMillis) -> Result<bool, StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || super::enroll::revoke(&path, user, now_ms))
            .await
            .map_err(|e| StoreError::Other(format!("revocation task: {e}")))?
    }

    async fn enrollments(
        &self,
        now_ms: UnixMillis,
        limit: usize,
    ) -> Result<Vec<crate::storage::enroll::EnrollmentRecord>, StoreError> {
        self.run(move |db| super::enroll::list(db, now_ms, limit))
            .await
    }

    async fn cached_waiting(&self) -> Result<u64, StoreError> {
        self.run(|db| db.cached_waiting()).await
    }

    async fn usage(
        &self,
        q: crate::storage::operator::UsageQuery,
    ) -> Result<Vec<crate::storage::operator::UsageRecord>, StoreError> {
        self.run(move |db| super::usage::list(db, &q)).await
    }

    async fn set_allowance(
        &self,
        user: UserId,
        bytes: Option<u64>,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || super::usage::set_allowance(&path, user, bytes, now_ms))
            .await
            .map_err(|e| StoreError::Other(format!("allowance task: {e}")))?
    }

    async fn set_phone(
        &self,
        user: UserId,
        phone: Option<String>,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            super::presence::set_phone(&path, user, phone.as_deref(), now_ms)
        })
        .await
        .map_err(|e| StoreError::Other(format!("phone task: {e}")))?
    }

    async fn alarms(
        &self,
        include_cleared: bool,
        limit: usize,
    ) -> Result<Vec<crate::storage::operator::AlarmRecord>, StoreError> {
        self.run(move |db| super::presence::alarms(db, include_cleared, limit))
            .await
    }

    async fn open_alarms(&self) -> Result<u64, StoreError> {
        self.run(super::presence::open_alarms).await
    }

    async fn clear_alarm(&self, id: u64, now_ms: UnixMillis) -> Result<bool, StoreError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || super::presence::clear_alarm(&path, id, now_ms))
            .await
            .map_err(|e| StoreError::Other(format!("alarm task: {e}")))?
    }
}

/// The columns [`user_record`] reads, in its order, from `user_property` joined with
/// [`USER_FROM`].
const USER_COLUMNS: &str = "p.user_id, p.user_ip, p.user_netstate, p.media_port, p.last_seen,
     p.agent_version, ph.phone";

/// The tables [`USER_COLUMNS`] come from.
const USER_FROM: &str = "user_property p LEFT JOIN user_phone ph ON ph.user_id = p.user_id";

/// A log query's parameters as SQLite values (a time as the RFC 3339 text the columns
/// hold).
fn values(args: Vec<SqlArg>) -> Vec<Value> {
    args.into_iter()
        .map(|a| match a {
            SqlArg::Int(v) => Value::Integer(v),
            SqlArg::Text(v) => Value::Text(v),
            SqlArg::Time(t) => Value::Text(to_db_text(t)),
        })
        .collect()
}

fn user_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        user_id: r.get::<_, i64>(0)? as u64,
        user_ip: r.get(1)?,
        user_netstate: r.get::<_, i64>(2)? as u8,
        media_port: r.get::<_, i64>(3)? as u16,
        last_seen: r.get(4)?,
        agent_version: r.get(5)?,
        phone: r.get(6)?,
    })
}

impl OperatorDb {
    /// The read-only connection.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Opens the database file read-only.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "no database at {}",
                path.display()
            )));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(OperatorDb { conn })
    }

    /// A page of the call log.
    pub fn calls(&self, q: &CallQuery) -> Result<Vec<CallRecord>, StoreError> {
        let (conditions, args) = call_log_conditions(q, |n, _| format!("?{n}"));
        let sql = format!(
            "SELECT id, user_id, otheruser_id, call_date, outcome, delivered, answered_at,
                    ended_at, delivered_at, caller_ip
             FROM user_call WHERE 1 = 1{conditions}"
        );
        let args = values(args);
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok(CallRecord {
                id: r.get::<_, i64>(0)? as u64,
                user_id: r.get::<_, i64>(1)? as u64,
                otheruser_id: r.get::<_, i64>(2)? as u64,
                call_date: r.get(3)?,
                outcome: r.get(4)?,
                delivered: r.get::<_, i64>(5)? == 1,
                answered_at: r.get(6)?,
                ended_at: r.get(7)?,
                delivered_at: r.get(8)?,
                caller_ip: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Users, by id; only online ones if asked.
    pub fn users(&self, online_only: bool, limit: usize) -> Result<Vec<UserRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {USER_COLUMNS} FROM {USER_FROM}
             WHERE (?1 = 0 OR p.user_netstate = 1) ORDER BY p.user_id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(
            rusqlite::params![online_only as i64, i64::try_from(limit).unwrap_or(i64::MAX)],
            user_record,
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// One user, if it exists.
    pub fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let Ok(key) = i64::try_from(id) else {
            return Ok(None);
        };
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE p.user_id = ?1"),
                [key],
                user_record,
            )
            .optional()?)
    }

    /// A trivial query that reads the database file: is the database reachable?
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })?;
        Ok(())
    }

    /// Missed/busy/cached calls waiting to be shown on their callee's TV (the offline
    /// cache's depth; counted on its partial index).
    pub fn cached_waiting(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            concat!(
                "SELECT count(*) FROM user_call WHERE delivered = 0 AND ",
                missed_kinds_sql!()
            ),
            [],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// Statistics as of `now_ms`.
    pub fn stats(&self, now_ms: UnixMillis) -> Result<Stats, StoreError> {
        let count = |sql: &str, arg: Option<String>| -> Result<u64, StoreError> {
            let n: i64 = match arg {
                Some(a) => self.conn.query_row(sql, [a], |r| r.get(0))?,
                None => self.conn.query_row(sql, [], |r| r.get(0))?,
            };
            Ok(n.max(0) as u64)
        };
        let hour_ago = to_db_text(now_ms - 3_600_000);
        let day_ago = to_db_text(now_ms - 86_400_000);
        let mut delays: Vec<f64> = {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT call_date, delivered_at FROM user_call
                 WHERE delivered = 1 AND {MISSED_KINDS_SQL} AND delivered_at >= ?1"
            ))?;
            let rows = stmt.query_map([&day_ago], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (placed, delivered) = row?;
                if let (Some(p), Some(d)) = (from_db_text(&placed), from_db_text(&delivered)) {
                    out.push((d - p) as f64 / 1000.0);
                }
            }
            out
        };
        delays.sort_by(f64::total_cmp);
        Ok(Stats {
            users: count("SELECT count(*) FROM user_property", None)?,
            online: count(
                "SELECT count(*) FROM user_property WHERE user_netstate = 1",
                None,
            )?,
            calls_last_hour: count(
                "SELECT count(*) FROM user_call WHERE call_date >= ?1",
                Some(hour_ago),
            )?,
            calls_last_day: count(
                "SELECT count(*) FROM user_call WHERE call_date >= ?1",
                Some(day_ago),
            )?,
            cached_waiting: self.cached_waiting()?,
            delivery_delay_p50_s: delays.get(delays.len() / 2).copied(),
            delivery_delay_max_s: delays.last().copied(),
            mailboxes: self.mailbox_totals(None)?,
        })
    }

    /// A page of the message log: sizes, kinds and delivery, never the contents.
    pub fn messages(&self, q: &MessageLogQuery) -> Result<Vec<MessageRecord>, StoreError> {
        let (conditions, args) = message_log_conditions(q, |n, _| format!("?{n}"));
        let sql = format!(
            "SELECT message_id, user_id, otheruser_id, kind,
                    quota_bytes, body_mime, duration_ms,
                    width, height, sent_at, delivered, delivered_at
             FROM user_message WHERE 1 = 1{conditions}"
        );
        let args = values(args);
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            let kind = u8::try_from(r.get::<_, i64>(3)?).unwrap_or(0);
            Ok(MessageRecord {
                id: r.get::<_, i64>(0)? as u64,
                user_id: r.get::<_, i64>(1)? as u64,
                otheruser_id: r.get::<_, i64>(2)? as u64,
                kind: shared_proto::MessageKind(kind).name().to_string(),
                size: r.get::<_, i64>(4)?.max(0) as u64,
                mime: r.get(5)?,
                duration_ms: r.get(6)?,
                width: r.get(7)?,
                height: r.get(8)?,
                sent_at: r.get(9)?,
                delivered: r.get::<_, i64>(10)? == 1,
                delivered_at: r.get(11)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Messages kept over every mailbox, or `user`'s.
    pub fn mailbox_totals(&self, user: Option<UserId>) -> Result<MailboxTotals, StoreError> {
        let user = user.map(|u| i64::try_from(u).unwrap_or(-1));
        Ok(self.conn.query_row(
            "SELECT count(*), coalesce(sum(delivered = 0), 0),
                    coalesce(sum(quota_bytes), 0)
             FROM user_message WHERE ?1 IS NULL OR otheruser_id = ?1",
            [user],
            |r| {
                Ok(MailboxTotals {
                    messages: r.get::<_, i64>(0)?.max(0) as u64,
                    waiting: r.get::<_, i64>(1)?.max(0) as u64,
                    bytes: r.get::<_, i64>(2)?.max(0) as u64,
                })
            },
        )?)
    }
}

/// Fills a database with `calls` synthetic call records between `users` users, one every
/// 3 s from 2023-11-14 on (benchmarks of the operator queries; never used by the server).
pub fn fill_synthetic(path: &Path, users: u64, calls: u64) -> Result<(), StoreError> {
    super::create_schema(path)?;
    let conn = Connection::open(path)?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")?;
    conn.execute(
        "INSERT INTO user_property (user_id, user_ip, user_netstate, created_at)
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1)
         SELECT 1000000 + i, '10.0.0.1', 0, '2023-11-14T00:00:00.000Z' FROM n
         WHERE true ON CONFLICT DO NOTHING",
        [users as i64],
    )?;
    conn.execute(
        "INSERT INTO user_call (id, user_id, otheruser_id, call_date, outcome, caller_ip,
                                delivered, ended_at)
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
         SELECT i,
                1000000 + (i * 7919) % ?1,
                1000000 + (i * 104729 + 1) % ?1,
                strftime('%Y-%m-%dT%H:%M:%fZ', 1700000000 + i * 3, 'unixepoch'),
                CASE i % 5 WHEN 0 THEN 'cached' WHEN 1 THEN 'missed' WHEN 2 THEN 'rejected'
                           ELSE 'answered' END,
                '10.0.0.1',
                CASE WHEN i % 5 IN (0, 1) AND i % 7 = 0 THEN 0 ELSE 1 END,
                strftime('%Y-%m-%dT%H:%M:%fZ', 1700000000 + i * 3 + 60, 'unixepoch')
         FROM n WHERE true ON CONFLICT DO NOTHING",
        [users as i64, calls as i64],
    )?;
    conn.execute_batch("ANALYZE;")?;
    Ok(())
}
