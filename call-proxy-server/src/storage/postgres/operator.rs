//! The PostgreSQL implementation of the operator reads ([`OperatorStore`]) and of the
//! operator's enrollment decisions, on a small pool of its own (never the server's
//! writer), so the admin API and the CLI work while the server runs and when it is down.
//! Times come out as the same RFC 3339 text SQLite stores (`tvcall_text`).

use deadpool_postgres::Pool;
use shared_proto::{UnixMillis, UserId};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{connection, PgTarget};
use crate::storage::enroll::{Approval, EnrollmentRecord, Refusal};
use crate::storage::operator::{
    call_log_conditions, message_log_conditions, CallQuery, CallRecord, MailboxTotals,
    MessageLogQuery, MessageRecord, OperatorStore, SqlArg, Stats, UserRecord,
};
use crate::storage::{missed_kinds_sql, StoreError};

/// Operator reads on a PostgreSQL database, at most a fixed number at once. Connects
/// when first needed: a database that is down fails each query. Cheap to clone.
#[derive(Clone)]
pub struct PostgresOperator {
    /// Or why it could not be set up (answered to every query).
    pool: Result<Pool, StoreError>,
}

impl PostgresOperator {
    /// Reads on the database at `target`, at most `max_queries` at once.
    pub fn new(target: &PgTarget, max_queries: usize) -> PostgresOperator {
        PostgresOperator {
            pool: target.pool(max_queries.max(1), true),
        }
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        match &self.pool {
            Ok(pool) => connection(pool).await,
            Err(e) => Err(e.clone()),
        }
    }
}

/// The columns [`user_record`] reads, in its order, from `user_property` joined with
/// [`USER_FROM`].
const USER_COLUMNS: &str = "p.user_id, p.user_ip, p.user_netstate, p.media_port,
     tvcall_text(p.last_seen), p.agent_version, ph.phone";

/// The tables [`USER_COLUMNS`] come from.
const USER_FROM: &str = "user_property p LEFT JOIN user_phone ph ON ph.user_id = p.user_id";

fn user_record(r: &Row) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        user_id: r.try_get::<_, i64>(0)? as u64,
        user_ip: r.try_get(1)?,
        user_netstate: r.try_get::<_, i16>(2)? as u8,
        media_port: r.try_get::<_, i32>(3)? as u16,
        last_seen: r.try_get(4)?,
        agent_version: r.try_get(5)?,
        phone: r.try_get(6)?,
    })
}

/// The statistics as of now: counts since `$1` (an hour ago) and `$2` (a day ago), and
/// the delivery delays of missed calls delivered since `$2`, in seconds (the median as
/// SQLite's store takes it: the element at half the count of the sorted delays).
const STATS_SQL: &str = concat!(
    "WITH delays AS (
       SELECT (tvcall_ms(delivered_at) - tvcall_ms(call_date)) / 1000.0::float8 AS d
       FROM user_call
       WHERE delivered = 1 AND ",
    missed_kinds_sql!(),
    " AND delivered_at >= tvcall_ts($2::bigint))
     SELECT (SELECT count(*) FROM user_property),
            (SELECT count(*) FROM user_property WHERE user_netstate = 1),
            (SELECT count(*) FROM user_call WHERE call_date >= tvcall_ts($1::bigint)),
            (SELECT count(*) FROM user_call WHERE call_date >= tvcall_ts($2::bigint)),
            (SELECT count(*) FROM user_call WHERE delivered = 0 AND ",
    missed_kinds_sql!(),
    "),
            (SELECT (array_agg(d ORDER BY d))[(count(*) / 2 + 1)::int] FROM delays),
            (SELECT max(d) FROM delays)"
);

/// How a log query's `n`th parameter is written in PostgreSQL's SQL.
fn placeholder(n: usize, arg: &SqlArg) -> String {
    match arg {
        SqlArg::Int(_) => format!("${n}::bigint"),
        SqlArg::Text(_) => format!("${n}::text"),
        SqlArg::Time(_) => format!("tvcall_ts(${n}::bigint)"),
    }
}

/// A log query's parameters, bound in PostgreSQL's types (a time as Unix ms).
fn params(args: Vec<SqlArg>) -> Vec<Box<dyn ToSql + Sync + Send>> {
    args.into_iter()
        .map(|a| -> Box<dyn ToSql + Sync + Send> {
            match a {
                SqlArg::Int(v) | SqlArg::Time(v) => Box::new(v),
                SqlArg::Text(v) => Box::new(v),
            }
        })
        .collect()
}

/// The SQL and parameters of a call-log page.
fn calls_sql(q: &CallQuery) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let (conditions, args) = call_log_conditions(q, placeholder);
    let sql = format!(
        "SELECT id, user_id, otheruser_id, tvcall_text(call_date), outcome, delivered,
                tvcall_text(answered_at), tvcall_text(ended_at), tvcall_text(delivered_at),
                caller_ip
         FROM user_call WHERE true{conditions}"
    );
    (sql, params(args))
}

impl OperatorStore for PostgresOperator {
    async fn calls(&self, q: CallQuery) -> Result<Vec<CallRecord>, StoreError> {
        use futures::TryStreamExt;
        let conn = self.conn().await?;
        let (sql, args) = calls_sql(&q);
        let rows: Vec<Row> = conn.query_raw(&sql, args).await?.try_collect().await?;
        rows.iter()
            .map(|r| {
                Ok(CallRecord {
                    id: r.try_get::<_, i64>(0)? as u64,
                    user_id: r.try_get::<_, i64>(1)? as u64,
                    otheruser_id: r.try_get::<_, i64>(2)? as u64,
                    call_date: r.try_get(3)?,
                    outcome: r.try_get(4)?,
                    delivered: r.try_get::<_, i16>(5)? == 1,
                    answered_at: r.try_get(6)?,
                    ended_at: r.try_get(7)?,
                    delivered_at: r.try_get(8)?,
                    caller_ip: r.try_get(9)?,
                })
            })
            .collect()
    }

    async fn users(&self, online_only: bool, limit: usize) -> Result<Vec<UserRecord>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {USER_COLUMNS} FROM {USER_FROM}
                     WHERE (NOT $1::bool OR p.user_netstate = 1) ORDER BY p.user_id
                     LIMIT $2::bigint"
                ),
                &[&online_only, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await?;
        rows.iter().map(user_record).collect()
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let Ok(key) = i64::try_from(id) else {
            return Ok(None);
        };
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                &format!("SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE p.user_id = $1::bigint"),
                &[&key],
            )
            .await?;
        row.as_ref().map(user_record).transpose()
    }

    async fn stats(&self, now_ms: UnixMillis) -> Result<Stats, StoreError> {
        let conn = self.conn().await?;
        let hour_ago = now_ms - 3_600_000;
        let day_ago = now_ms - 86_400_000;
        let row = conn.query_one(STATS_SQL, &[&hour_ago, &day_ago]).await?;
        let count =
            |i: usize| -> Result<u64, StoreError> { Ok(row.try_get::<_, i64>(i)?.max(0) as u64) };
        let seconds = |i: usize| -> Result<Option<f64>, StoreError> { Ok(row.try_get(i)?) };
        Ok(Stats {
            users: count(0)?,
            online: count(1)?,
            calls_last_hour: count(2)?,
            calls_last_day: count(3)?,
            cached_waiting: count(4)?,
            delivery_delay_p50_s: seconds(5)?,
            delivery_delay_max_s: seconds(6)?,
            mailboxes: mailbox_totals(&conn, None).await?,
        })
    }

    async fn messages(&self, q: MessageLogQuery) -> Result<Vec<MessageRecord>, StoreError> {
        use futures::TryStreamExt;
        let conn = self.conn().await?;
        let (conditions, args) = message_log_conditions(&q, placeholder);
        let sql = format!(
            "SELECT message_id, user_id, otheruser_id, kind,
                    body_size + octet_length(body_text), body_mime, duration_ms, width,
                    height, tvcall_text(sent_at), delivered, tvcall_text(delivered_at)
             FROM user_message WHERE true{conditions}"
        );
        let rows: Vec<Row> = conn
            .query_raw(&sql, params(args))
            .await?
            .try_collect()
            .await?;
        let uint = |v: Option<i32>| v.map(|n| u32::try_from(n).unwrap_or(0));
        rows.iter()
            .map(|r| {
                let kind = u8::try_from(r.try_get::<_, i16>(3)?).unwrap_or(0);
                Ok(MessageRecord {
                    id: r.try_get::<_, i64>(0)? as u64,
                    user_id: r.try_get::<_, i64>(1)? as u64,
                    otheruser_id: r.try_get::<_, i64>(2)? as u64,
                    kind: shared_proto::MessageKind(kind).name().to_string(),
                    size: r.try_get::<_, i64>(4)?.max(0) as u64,
                    mime: r.try_get(5)?,
                    duration_ms: uint(r.try_get(6)?),
                    width: uint(r.try_get(7)?),
                    height: uint(r.try_get(8)?),
                    sent_at: r.try_get(9)?,
                    delivered: r.try_get::<_, i16>(10)? == 1,
                    delivered_at: r.try_get(11)?,
                })
            })
            .collect()
    }

    async fn mailbox_totals(&self, user: Option<UserId>) -> Result<MailboxTotals, StoreError> {
        let conn = self.conn().await?;
        mailbox_totals(&conn, user).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.query_one("SELECT count(*) FROM tvcall_schema", &[])
            .await?;
        Ok(())
    }

    async fn cached_waiting(&self) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        let n: i64 = conn
            .query_one(
                concat!(
                    "SELECT count(*) FROM user_call WHERE delivered = 0 AND ",
                    missed_kinds_sql!()
                ),
                &[],
            )
            .await?
            .try_get(0)?;
        Ok(n.max(0) as u64)
    }

    async fn approve(
        &self,
        code: String,
        user: UserId,
        replace: bool,
        now_ms: UnixMillis,
    ) -> Result<Approval, StoreError> {
        let mut conn = self.conn().await?;
        super::enroll::approve(&mut conn, &code, user, replace, now_ms).await
    }

    async fn refuse(&self, code: String, now_ms: UnixMillis) -> Result<Refusal, StoreError> {
        let mut conn = self.conn().await?;
        super::enroll::refuse(&mut conn, &code, now_ms).await
    }

    async fn revoke(&self, user: UserId, now_ms: UnixMillis) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        super::enroll::revoke(&mut conn, user, now_ms).await
    }

    async fn enrollments(
        &self,
        now_ms: UnixMillis,
        limit: usize,
    ) -> Result<Vec<EnrollmentRecord>, StoreError> {
        let conn = self.conn().await?;
        super::enroll::list(&conn, now_ms, limit).await
    }

    async fn usage(
        &self,
        q: crate::storage::operator::UsageQuery,
    ) -> Result<Vec<crate::storage::operator::UsageRecord>, StoreError> {
        let conn = self.conn().await?;
        super::usage::list(&conn, &q).await
    }

    async fn set_allowance(
        &self,
        user: UserId,
        bytes: Option<u64>,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        super::usage::set_allowance(&conn, user, bytes, now_ms).await
    }

    async fn set_phone(
        &self,
        user: UserId,
        phone: Option<String>,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        super::presence::set_phone(&mut conn, user, phone.as_deref(), now_ms).await
    }

    async fn alarms(
        &self,
        include_cleared: bool,
        limit: usize,
    ) -> Result<Vec<crate::storage::operator::AlarmRecord>, StoreError> {
        let conn = self.conn().await?;
        super::presence::alarms(&conn, include_cleared, limit).await
    }

    async fn open_alarms(&self) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        super::presence::open_alarms(&conn).await
    }

    async fn clear_alarm(&self, id: u64, now_ms: UnixMillis) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        super::presence::clear_alarm(&conn, id, now_ms).await
    }
}

/// Messages kept over every mailbox, or `user`'s, on `conn`.
async fn mailbox_totals(
    conn: &tokio_postgres::Client,
    user: Option<UserId>,
) -> Result<MailboxTotals, StoreError> {
    let user = user.map(|u| i64::try_from(u).unwrap_or(-1));
    let r = conn
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE delivered = 0),
                    coalesce(sum(body_size + octet_length(body_text)), 0)::bigint
             FROM user_message
             WHERE $1::bigint IS NULL OR otheruser_id = $1::bigint",
            &[&user],
        )
        .await?;
    let n = |i: usize| -> Result<u64, StoreError> { Ok(r.try_get::<_, i64>(i)?.max(0) as u64) };
    Ok(MailboxTotals {
        messages: n(0)?,
        waiting: n(1)?,
        bytes: n(2)?,
    })
}
