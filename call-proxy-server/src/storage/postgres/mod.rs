//! The user management database on PostgreSQL, through tokio-postgres and a small
//! deadpool pool: the backend for deployments that outgrow one embedded file (several
//! nodes on one database, issue 18). Same tables, same rules and the same write contract
//! as [`super::sqlite`] (`tests/store_contract.rs` runs both).
//!
//! One writer task takes everything queued (up to `max_batch` writes), sends `BEGIN`,
//! every write's statements and `COMMIT` down one connection without waiting between
//! them (pipelining: one round trip per batch, however many writes it carries), and
//! answers each write only once the commit is acknowledged (group commit; with
//! `synchronous_commit = on`, the server has flushed its WAL). Each write is a fixed
//! sequence of prepared statements whose parameters do not depend on earlier answers, so
//! the whole batch can be sent before the first answer arrives; statements run in the
//! order sent, so writes apply in call order.
//!
//! If any statement of a pipelined batch fails, PostgreSQL has aborted the transaction
//! (its `COMMIT` became a rollback): the batch is applied again one write at a time,
//! each inside its own savepoint, so the failing write fails alone and the rest commit
//! (the slow path, also used for batches with an enrollment, whose steps depend on what
//! they read). Reads use pooled connections and prepared statements cached per
//! connection. PostgreSQL's errors become [`StoreError`]s here ([`pg_error`]); nothing
//! outside this module sees a tokio-postgres type. Times are `timestamptz` columns,
//! converted by three SQL functions of the schema (`tvcall_ts`, `tvcall_ms`,
//! `tvcall_text`) so the rows carry the same instants as SQLite's RFC 3339 text.
//!
//! Several nodes share one database: each holds advisory locks on its name and slot for
//! its life (`lock_node`, which also `LISTEN`s for other nodes' notifications), claims
//! its `tvcall_node` row and repairs what it or dead nodes left (`claim_node`), renews
//! its heartbeat lease and reaps nodes whose lease ran out (`heartbeat_loop`), and
//! writes its name on the rows of its TVs and live calls. Notifications to another node
//! are `pg_notify`s inside the transaction that makes them true.

pub mod dispatch;
pub mod enroll;
mod group;
pub mod link;
mod messages;
pub mod operator;
pub mod presence;
pub mod usage;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

pub use operator::PostgresOperator;

use super::*;
use shared_proto::KEY_LIFETIME_MS;

/// Where the PostgreSQL database is and how to log in: a `postgres://` URL without a
/// password, and the password read from a file or the environment.
#[derive(Clone)]
pub struct PgTarget {
    /// The URL as given (no password in it).
    pub url: String,
    /// The parsed connection settings, password included.
    config: tokio_postgres::Config,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PgTarget").field("url", &self.url).finish()
    }
}

/// The environment variable a password is read from when no file is given (libpq's).
pub const PASSWORD_ENV: &str = "PGPASSWORD";

impl PgTarget {
    /// The database at `url`, logging in with the password in `password_file` (first
    /// line), else in `$PGPASSWORD`, else none (trust or peer authentication). A URL that
    /// carries a password is refused: passwords do not belong on command lines or in
    /// process listings.
    pub fn new(url: &str, password_file: Option<&Path>) -> Result<PgTarget, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Other(format!(
                "invalid PostgreSQL URL {url:?}: {e} (expected postgres://USER@HOST:PORT/DB)"
            ))
        })?;
        if config.get_password().is_some() {
            return Err(StoreError::Other(
                "the PostgreSQL URL carries a password: give it in db_password_file \
                 (--db-password-file) or PGPASSWORD instead"
                    .into(),
            ));
        }
        let password = match password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot read the database password file {}: {e}",
                        path.display()
                    ))
                })?;
                let line = text.lines().next().unwrap_or("").trim_end().to_string();
                if line.is_empty() {
                    return Err(StoreError::Other(format!(
                        "the database password file {} is empty",
                        path.display()
                    )));
                }
                Some(line)
            }
            None => std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()),
        };
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("call-proxy-server");
        Ok(PgTarget {
            url: url.to_string(),
            config,
        })
    }

    /// A pool of at most `size` connections; with `sync_full` off, commits do not wait
    /// for PostgreSQL's WAL flush (`synchronous_commit = off`: an acknowledged write
    /// survives a crash of this server, not of PostgreSQL's machine).
    fn pool(&self, size: usize, sync_full: bool) -> Result<Pool, StoreError> {
        let mut config = self.config.clone();
        let sync = if sync_full { "on" } else { "off" };
        config.options(format!(
            "-c synchronous_commit={sync} -c statement_timeout=30000 -c TimeZone=UTC"
        ));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Other(format!("cannot set up the database pool: {e}")))
    }
}

/// Node slots: call ids are spread over this many nodes (a node's ids are its slot
/// modulo this).
pub const NODE_SLOTS: u8 = 64;

/// Who this server is among the nodes sharing the database.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Its unique name (`tvcall_node.node_id`, `user_property.node_id`).
    pub id: String,
    /// Its slot, below [`NODE_SLOTS`].
    pub slot: u8,
    /// Its heartbeat lease: not renewed for this long, the node is dead to the others.
    pub lease: Duration,
    /// Where its TVs connect (for the operator and, later, the dispatcher).
    pub listen: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            id: "node-1".into(),
            slot: 0,
            lease: Duration::from_secs(5),
            listen: String::new(),
        }
    }
}

/// Tuning of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Commits wait for PostgreSQL's WAL flush (`synchronous_commit = on`).
    pub sync_full: bool,
    /// Connections for reads (the writer has one more).
    pub readers: usize,
    /// Most writes in one group commit.
    pub max_batch: usize,
    /// This node.
    pub node: NodeOptions,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            sync_full: true,
            readers: 4,
            max_batch: 1024,
            node: NodeOptions::default(),
        }
    }
}

/// Schema migrations, applied in order; the table `tvcall_schema` records those
/// applied. Append only, like SQLite's: the same tables and columns, in PostgreSQL's
/// types (`timestamptz` times, `bytea` keys).
const MIGRATIONS: &[&str] = &[
    // 1: the documents' two tables, the live-call and idempotency indexes, and the
    // enrollment tables: SQLite's migrations 1-4 in one.
    "CREATE FUNCTION tvcall_ts(ms bigint) RETURNS timestamptz
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT timestamptz 'epoch' + ms * interval '1 millisecond' $$;
     CREATE FUNCTION tvcall_ms(t timestamptz) RETURNS bigint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT floor(extract(epoch FROM t) * 1000)::bigint $$;
     CREATE FUNCTION tvcall_text(t timestamptz) RETURNS text
        LANGUAGE sql STABLE STRICT PARALLEL SAFE
        AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') $$;
     CREATE TABLE user_property (
        user_id        bigint   PRIMARY KEY,          -- User_id: the TV's calling number
        user_ip        text     NOT NULL DEFAULT '',  -- User_ip: as observed by the server
        user_netstate  smallint NOT NULL DEFAULT 0 CHECK (user_netstate IN (0, 1)),
        media_port     integer  NOT NULL DEFAULT 0,
        session_id     bigint   NOT NULL DEFAULT 0,
        agent_version  text     NOT NULL DEFAULT '',
        created_at     timestamptz NOT NULL,
        last_seen      timestamptz
     );
     CREATE TABLE user_call (
        id            bigint   PRIMARY KEY,
        user_id       bigint   NOT NULL,              -- caller
        otheruser_id  bigint   NOT NULL,              -- callee
        call_date     timestamptz NOT NULL,
        outcome       text     NOT NULL CHECK (outcome IN
                        ('ringing','answered','missed','rejected','busy','cached')),
        caller_ip     text     NOT NULL DEFAULT '',
        answered_at   timestamptz,
        ended_at      timestamptz,
        delivered     smallint NOT NULL DEFAULT 0 CHECK (delivered IN (0, 1)),
        delivered_at  timestamptz,
        idem_key      bigint
     );
     CREATE INDEX user_call_waiting ON user_call (otheruser_id, id)
        WHERE delivered = 0 AND outcome IN ('missed', 'busy', 'cached');
     CREATE INDEX user_call_caller ON user_call (user_id, call_date);
     CREATE INDEX user_call_callee ON user_call (otheruser_id, call_date);
     CREATE INDEX user_call_live ON user_call (id)
        WHERE ended_at IS NULL AND outcome IN ('ringing', 'answered');
     CREATE UNIQUE INDEX user_call_idem ON user_call (user_id, idem_key)
        WHERE idem_key IS NOT NULL;
     CREATE TABLE tv_enrollment (
        user_code      text     PRIMARY KEY,
        fingerprint    bytea    NOT NULL,
        cert           bytea    NOT NULL,
        agent_version  text     NOT NULL DEFAULT '',
        source_ip      text     NOT NULL DEFAULT '',
        created_at     timestamptz NOT NULL,
        expires_at     bigint   NOT NULL,             -- Unix ms
        state          text     NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'approved', 'refused')),
        user_id        bigint,
        decided_at     timestamptz,
        seq            bigint   GENERATED ALWAYS AS IDENTITY
     );
     CREATE INDEX tv_enrollment_fingerprint ON tv_enrollment (fingerprint, created_at);
     CREATE TABLE tv_credential (
        fingerprint    bytea    PRIMARY KEY,
        user_id        bigint   NOT NULL,
        cert           bytea    NOT NULL,
        enrolled_at    timestamptz NOT NULL,
        revoked_at     timestamptz
     );
     CREATE UNIQUE INDEX tv_credential_user ON tv_credential (user_id) WHERE revoked_at IS NULL;
     CREATE TABLE tv_revocation (
        seq            bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id        bigint   NOT NULL,
        fingerprint    bytea    NOT NULL,
        at             timestamptz NOT NULL
     );",
    // 2: several nodes on one database. Each node's row and heartbeat; the node that holds
    // each TV's live session, and the node on which each live call was placed.
    "CREATE TABLE tvcall_node (
        node_id        text     PRIMARY KEY,
        slot           smallint NOT NULL UNIQUE CHECK (slot >= 0 AND slot < 64),
        listen         text     NOT NULL DEFAULT '',
        started_at     timestamptz NOT NULL,
        heartbeat_at   timestamptz NOT NULL,
        stopped_at     timestamptz              -- clean stop, or reaped after its lease
     );
     ALTER TABLE user_property ADD COLUMN node_id text;
     ALTER TABLE user_call ADD COLUMN node_id text;
     CREATE INDEX user_property_node ON user_property (node_id) WHERE user_netstate = 1;",
    // 3: traffic accounting (SQLite's migration 5): each account's usage per period as
    // the nodes report it, and the operator's allowance per period (no row: not limited).
    "CREATE TABLE account_usage (
        user_id        bigint   NOT NULL,
        period         text     NOT NULL,
        sessions       bigint   NOT NULL DEFAULT 0,
        session_ms     bigint   NOT NULL DEFAULT 0,
        control_in     bigint   NOT NULL DEFAULT 0,
        control_out    bigint   NOT NULL DEFAULT 0,
        body_bytes     bigint   NOT NULL DEFAULT 0,
        relay_bytes    bigint   NOT NULL DEFAULT 0,
        first_at       timestamptz NOT NULL,
        last_at        timestamptz NOT NULL,
        PRIMARY KEY (user_id, period)
     );
     CREATE TABLE account_allowance (
        user_id          bigint PRIMARY KEY,
        bytes_per_period bigint NOT NULL CHECK (bytes_per_period >= 0),
        set_at           timestamptz NOT NULL
     );",
    // 4: each node's TVs online, as of its last heartbeat, for the dispatcher's choice
    // of the least loaded node (counting `user_property` at every assignment cost
    // O(TVs online) each).
    "ALTER TABLE tvcall_node ADD COLUMN online bigint NOT NULL DEFAULT 0;",
    // 5: presence (issue 16; SQLite's migration 6): each TV's address book (who may see
    // its state), its "hide my state", the phone numbers on file (operator-set: offline
    // shows as mobile), and the operator's alarms (open while cleared_at is NULL).
    "CREATE TABLE presence_contact (
        user_id        bigint   NOT NULL,
        contact_id     bigint   NOT NULL,
        PRIMARY KEY (user_id, contact_id)
     );
     CREATE TABLE presence_setting (
        user_id        bigint   PRIMARY KEY,
        hidden         boolean  NOT NULL DEFAULT false,
        updated_at     timestamptz NOT NULL
     );
     CREATE TABLE user_phone (
        user_id        bigint   PRIMARY KEY,
        phone          text     NOT NULL,
        updated_at     timestamptz NOT NULL
     );
     CREATE TABLE operator_alarm (
        id             bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id        bigint   NOT NULL,
        raised_at      timestamptz NOT NULL,
        reason         text     NOT NULL,
        count          bigint   NOT NULL DEFAULT 0,
        cleared_at     timestamptz
     );
     CREATE INDEX operator_alarm_open ON operator_alarm (id) WHERE cleared_at IS NULL;",
    // 6: messages (issue 15; SQLite's migration 7).
    messages::MIGRATION,
];

/// The advisory lock nodes take while migrating, so two starting at once do not both
/// apply a migration.
const MIGRATION_LOCK: i64 = 0x7476_6361_6c6c; // "tvcall"

/// The condition of a live call, as in the partial index `user_call_live`.
macro_rules! live {
    () => {
        "ended_at IS NULL AND outcome IN ('ringing', 'answered')"
    };
}

/// The condition that makes a call "cached and undelivered" (the missed-kinds rule), as
/// in the partial index `user_call_waiting`.
macro_rules! waiting {
    () => {
        concat!("delivered = 0 AND ", crate::storage::missed_kinds_sql!())
    };
}

/// A tokio-postgres failure as a [`StoreError`] (the PostgreSQL mapping of the typed
/// errors).
pub fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed, or a value did not convert.
        return if e.is_closed() || text.contains("connect") || text.contains("timed out") {
            StoreError::Unavailable(text)
        } else {
            StoreError::Other(text)
        };
    };
    let class = &code.code()[..2.min(code.code().len())];
    if *code == SqlState::DISK_FULL {
        StoreError::Full(text)
    } else if class == "23" {
        StoreError::Constraint(text)
    } else if *code == SqlState::DATA_CORRUPTED || *code == SqlState::INDEX_CORRUPTED {
        StoreError::Corrupt(text)
    } else if matches!(class, "08" | "53" | "57" | "40" | "28" | "3D") {
        // Connection, resources, operator intervention, rollback (serialization,
        // deadlock), login, no such database: try again later.
        StoreError::Unavailable(text)
    } else {
        StoreError::Other(text)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg_error(e)
    }
}

/// A pool failure as a [`StoreError`].
fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        PoolError::Closed => StoreError::Closed,
        PoolError::Timeout(t) => StoreError::Unavailable(format!(
            "no database connection in time ({t:?}): is PostgreSQL up?"
        )),
        other => StoreError::Unavailable(format!("database pool: {other}")),
    }
}

/// A pooled connection.
async fn connection(pool: &Pool) -> Result<Object, StoreError> {
    pool.get().await.map_err(pool_error)
}

/// Operations for the writer task.
enum WriteJob {
    Register(Registration, Completion<RegisterResult>),
    Offline(UserId, u64, UnixMillis, Completion<()>),
    Insert(NewCall, Option<IdempotencyKey>, Completion<InsertResult>),
    Finish(CallEnd, UserId, Completion<u32>),
    Ack(UserId, Vec<CallId>, UnixMillis, Completion<u32>),
    StartEnrollment(NewEnrollment, Completion<EnrollmentState>),
    Usage(Vec<crate::accounting::UsageDelta>, Completion<()>),
    PresenceBook(UserId, Vec<UserId>, Completion<()>),
    PresenceHidden(UserId, bool, UnixMillis, Completion<()>),
    Alarm(NewAlarm, Completion<()>),
    InsertMessage(NewMessage, Quota, Completion<MessageInsert>),
    SettleMessages(
        UserId,
        Vec<shared_proto::MessageId>,
        Settle,
        UnixMillis,
        Completion<Vec<Settled>>,
    ),
    ExpireMessages(UnixMillis, usize, Completion<Vec<Settled>>),
    Close(oneshot::Sender<()>),
}

/// A write's own result, kept until its batch's fate is known.
#[derive(Debug)]
enum Done {
    Register(RegisterResult),
    Unit,
    Insert(InsertResult),
    Count(u32),
    Enrollment(EnrollmentState),
    Message(MessageInsert),
    Settled(Vec<Settled>),
}

impl WriteJob {
    /// Answers the job: the batch's failure if it did not commit, else its own result.
    fn answer(self, result: Result<Done, StoreError>) {
        fn pick<T>(
            r: Result<Done, StoreError>,
            f: impl FnOnce(Done) -> Option<T>,
        ) -> Result<T, StoreError> {
            r.and_then(|d| {
                f(d).ok_or_else(|| {
                    StoreError::Other("a write was answered with another's result".into())
                })
            })
        }
        match self {
            WriteJob::Register(_, c) => c.complete(pick(result, |d| match d {
                Done::Register(r) => Some(r),
                _ => None,
            })),
            WriteJob::Offline(.., c)
            | WriteJob::Usage(_, c)
            | WriteJob::PresenceBook(.., c)
            | WriteJob::PresenceHidden(.., c)
            | WriteJob::Alarm(_, c) => c.complete(pick(result, |d| match d {
                Done::Unit => Some(()),
                _ => None,
            })),
            WriteJob::Insert(.., c) => c.complete(pick(result, |d| match d {
                Done::Insert(r) => Some(r),
                _ => None,
            })),
            WriteJob::Finish(.., c) | WriteJob::Ack(.., c) => {
                c.complete(pick(result, |d| match d {
                    Done::Count(n) => Some(n),
                    _ => None,
                }))
            }
            WriteJob::StartEnrollment(_, c) => c.complete(pick(result, |d| match d {
                Done::Enrollment(s) => Some(s),
                _ => None,
            })),
            WriteJob::InsertMessage(.., c) => c.complete(pick(result, |d| match d {
                Done::Message(r) => Some(r),
                _ => None,
            })),
            WriteJob::SettleMessages(.., c) | WriteJob::ExpireMessages(.., c) => {
                c.complete(pick(result, |d| match d {
                    Done::Settled(r) => Some(r),
                    _ => None,
                }))
            }
            WriteJob::Close(_) => {}
        }
    }
}

/// The PostgreSQL-backed [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Queue to the writer task.
    writes: mpsc::UnboundedSender<WriteJob>,
    /// Connections for reads.
    pool: Pool,
    /// Set once `close` starts; later calls fail fast with `Closed`.
    closed: AtomicBool,
    /// Ids in use when the store opened.
    watermarks: Watermarks,
    /// The writer task, awaited on close.
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The heartbeat task (renews this node's lease, reaps dead nodes), stopped on close.
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The locks that say this node is alive, released on close.
    locks: Mutex<Option<NodeLocks>>,
    /// What other nodes tell this one, until the server takes it.
    events: Mutex<Option<mpsc::UnboundedReceiver<NodeEvent>>>,
    /// The path to the other nodes.
    link: link::NodeLink,
    /// This node.
    node: NodeOptions,
    /// Duration of each group commit, recorded by the writer task.
    metrics: Arc<StoreMetrics>,
}

impl PostgresStore {
    /// Connects to the database at `target`, applies migrations, and repairs what a crash
    /// may have left (every user offline, ringing calls missed, answered calls without an
    /// end ended), as SQLite's store does at open. The writer runs on the calling
    /// runtime.
    pub async fn open(
        target: &PgTarget,
        opts: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let pool = target.pool(opts.readers.max(1), opts.sync_full)?;
        let writer_pool = target.pool(1, opts.sync_full)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let locks = lock_node(target, &opts.node, events_tx.clone()).await?;
        {
            let mut conn = connection(&writer_pool).await?;
            migrate(&mut conn).await?;
            // This node's row is claimed, and what it left when it last stopped or
            // crashed is repaired, with what nodes whose lease ran out left.
            claim_node(&mut conn, &opts.node).await?;
        }
        let conn = connection(&pool).await?;
        let row = conn
            .query_one(
                "SELECT (SELECT coalesce(max(session_id), 0) FROM user_property),
                        (SELECT coalesce(max(id), 0) FROM user_call),
                        (SELECT coalesce(max(seq), 0) FROM tv_revocation)",
                &[],
            )
            .await?;
        drop(conn);
        let watermarks = Watermarks {
            max_session_id: row.try_get::<_, i64>(0)?.max(0) as u64,
            max_call_id: row.try_get::<_, i64>(1)?.max(0) as u64,
            max_revocation_seq: row.try_get(2)?,
            call_id_stride: u64::from(NODE_SLOTS),
            call_id_offset: u64::from(opts.node.slot),
        };
        let metrics = Arc::new(StoreMetrics::default());
        let (wtx, wrx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_loop(
            writer_pool,
            wrx,
            opts.max_batch.max(1),
            Arc::clone(&metrics),
            opts.node.id.clone(),
        ));
        let live = Arc::new(AtomicU64::new(0));
        let heartbeat = tokio::spawn(heartbeat_loop(
            pool.clone(),
            opts.node.clone(),
            Arc::clone(&live),
            events_tx,
        ));
        let link = link::NodeLink::new(pool.clone(), opts.node.slot, opts.node.lease, live);
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                writes: wtx,
                pool,
                closed: AtomicBool::new(false),
                watermarks,
                writer: Mutex::new(Some(writer)),
                heartbeat: Mutex::new(Some(heartbeat)),
                locks: Mutex::new(Some(locks)),
                events: Mutex::new(Some(events_rx)),
                link,
                node: opts.node,
                metrics,
            }),
        })
    }

    /// Queues a write now (writes apply in the order they were issued) and returns its
    /// [`Pending`] commit.
    fn write<T>(&self, make: impl FnOnce(Completion<T>) -> WriteJob) -> Pending<T> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Pending::ready(Err(StoreError::Closed));
        }
        let (done, pending) = Pending::queued();
        // A send fails only once the writer has stopped; the job (and with it `done`) is
        // dropped then, which completes `pending` with `Closed`.
        let _ = self.inner.writes.send(make(done));
        pending
    }

    /// A pooled read connection, unless the store is closed.
    async fn reader(&self) -> Result<Object, StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        connection(&self.inner.pool).await
    }
}

impl Store for PostgresStore {
    fn watermarks(&self) -> Watermarks {
        self.inner.watermarks
    }

    fn register(&self, reg: Registration) -> Pending<RegisterResult> {
        self.write(move |c| WriteJob::Register(reg, c))
    }

    fn set_offline(&self, user_id: UserId, session_id: u64, at_ms: UnixMillis) -> Pending<()> {
        self.write(move |c| WriteJob::Offline(user_id, session_id, at_ms, c))
    }

    async fn users(&self, ids: Vec<UserId>) -> Result<Vec<UserRow>, StoreError> {
        let conn = self.reader().await?;
        let keys: Vec<i64> = ids
            .iter()
            .filter_map(|&id| i64::try_from(id).ok())
            .collect();
        let stmt = conn
            .prepare_cached(
                "SELECT user_id, user_netstate, tvcall_ms(last_seen) FROM user_property
                 WHERE user_id = ANY($1::bigint[])",
            )
            .await?;
        let rows = conn.query(&stmt, &[&keys]).await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get(0)?;
            let state: i16 = r.try_get(1)?;
            let seen: Option<i64> = r.try_get(2)?;
            found.insert(id as UserId, (state == 1, seen));
        }
        // In the order asked, as SQLite answers.
        Ok(ids
            .into_iter()
            .filter_map(|id| {
                found.get(&id).map(|&(online, seen)| UserRow {
                    user_id: id,
                    online,
                    last_seen_ms: seen,
                })
            })
            .collect())
    }

    fn insert_keyed_call(
        &self,
        call: NewCall,
        key: Option<IdempotencyKey>,
    ) -> Pending<InsertResult> {
        if self.inner.metrics.is_full() {
            return Pending::ready(Err(full_refusal()));
        }
        self.write(move |c| WriteJob::Insert(call, key, c))
    }

    async fn keyed_call(
        &self,
        caller: UserId,
        key: IdempotencyKey,
        now_ms: UnixMillis,
    ) -> Result<Option<KeyedCall>, StoreError> {
        let conn = self.reader().await?;
        let stmt = conn.prepare_cached(KEYED_ROW_SQL).await?;
        let rows = conn
            .query(&stmt, &[&(caller as i64), &key_value(key)])
            .await?;
        Ok(keyed_from(&rows)?.filter(|c| key_alive(c.at_ms, now_ms)))
    }

    fn finish_call(&self, end: CallEnd, callee: UserId) -> Pending<u32> {
        self.write(move |c| WriteJob::Finish(end, callee, c))
    }

    async fn cached_calls(
        &self,
        callee: UserId,
        after: CallId,
        limit: usize,
    ) -> Result<Vec<CachedRow>, StoreError> {
        let conn = self.reader().await?;
        let stmt = conn.prepare_cached(CACHED_PAGE_SQL).await?;
        let rows = conn
            .query(
                &stmt,
                &[
                    &(callee as i64),
                    &i64::try_from(after).unwrap_or(i64::MAX),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get(0)?;
            let outcome: String = r.try_get(3)?;
            let outcome = Outcome::parse(&outcome).ok_or_else(|| {
                StoreError::Corrupt(format!("call {id} has unknown outcome {outcome:?}"))
            })?;
            out.push(CachedRow {
                id: id as CallId,
                caller: r.try_get::<_, i64>(1)? as UserId,
                callee,
                at_ms: r.try_get(2)?,
                outcome,
                caller_online: r.try_get::<_, Option<i16>>(4)?.map(|s| s == 1),
            });
        }
        Ok(out)
    }

    fn ack_cached(&self, callee: UserId, ids: Vec<CallId>, at_ms: UnixMillis) -> Pending<u32> {
        self.write(move |c| WriteJob::Ack(callee, ids, at_ms, c))
    }

    fn start_enrollment(&self, e: NewEnrollment) -> Pending<EnrollmentState> {
        self.write(move |c| WriteJob::StartEnrollment(e, c))
    }

    fn add_usage(&self, rows: Vec<crate::accounting::UsageDelta>) -> Pending<()> {
        self.write(move |c| WriteJob::Usage(rows, c))
    }

    async fn enrollment(
        &self,
        fingerprint: [u8; 32],
        now_ms: UnixMillis,
    ) -> Result<EnrollmentState, StoreError> {
        let conn = self.reader().await?;
        enroll::state(&conn, &fingerprint, now_ms).await
    }

    async fn credential(&self, fingerprint: [u8; 32]) -> Result<Option<Credential>, StoreError> {
        let conn = self.reader().await?;
        enroll::credential(&conn, &fingerprint).await
    }

    async fn revocations_after(&self, seq: i64) -> Result<Vec<Revocation>, StoreError> {
        let conn = self.reader().await?;
        enroll::revocations_after(&conn, seq).await
    }

    async fn presence_view(
        &self,
        watcher: UserId,
        users: Vec<UserId>,
    ) -> Result<Vec<PresenceRow>, StoreError> {
        let users = presence_list(users, "presence view")?;
        let conn = self.reader().await?;
        presence::view(&conn, watcher, &users).await
    }

    async fn presence_book(&self, user: UserId) -> Result<PresenceBook, StoreError> {
        let conn = self.reader().await?;
        presence::book(&conn, user).await
    }

    fn insert_message(&self, m: NewMessage, quota: Quota) -> Pending<MessageInsert> {
        if self.inner.metrics.is_full() {
            return Pending::ready(Err(full_refusal()));
        }
        self.write(move |c| WriteJob::InsertMessage(m, quota, c))
    }

    fn settle_messages(
        &self,
        recipient: UserId,
        ids: Vec<shared_proto::MessageId>,
        settle: Settle,
        at_ms: UnixMillis,
    ) -> Pending<Vec<Settled>> {
        self.write(move |c| WriteJob::SettleMessages(recipient, ids, settle, at_ms, c))
    }

    fn expire_messages(&self, before_ms: UnixMillis, limit: usize) -> Pending<Vec<Settled>> {
        self.write(move |c| WriteJob::ExpireMessages(before_ms, limit, c))
    }

    async fn messages(&self, q: MessageQuery) -> Result<Vec<MessageRow>, StoreError> {
        let conn = self.reader().await?;
        messages::read(&conn, q).await
    }

    async fn mailbox(&self, recipient: UserId) -> Result<Mailbox, StoreError> {
        let conn = self.reader().await?;
        messages::mailbox(&conn, recipient).await
    }

    fn set_presence_book(&self, user: UserId, contacts: Vec<UserId>) -> Pending<()> {
        match presence_list(contacts, "address book") {
            Ok(contacts) => self.write(move |c| WriteJob::PresenceBook(user, contacts, c)),
            Err(e) => Pending::ready(Err(e)),
        }
    }

    fn set_presence_hidden(&self, user: UserId, hidden: bool) -> Pending<()> {
        let at = crate::clock::now_ms();
        self.write(move |c| WriteJob::PresenceHidden(user, hidden, at, c))
    }

    fn raise_alarm(&self, alarm: NewAlarm) -> Pending<()> {
        self.write(move |c| WriteJob::Alarm(alarm, c))
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    fn node_events(&self) -> Option<mpsc::UnboundedReceiver<NodeEvent>> {
        self.inner.events.lock().ok().and_then(|mut e| e.take())
    }

    fn node_link(&self) -> Option<link::NodeLink> {
        Some(self.inner.link.clone())
    }

    async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.writes.send(WriteJob::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        let writer = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.await;
        }
        let heartbeat = self.inner.heartbeat.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = heartbeat {
            h.abort();
            let _ = h.await;
        }
        // A clean stop: the node's TVs were set offline by the server's shutdown.
        let stopped = match connection(&self.inner.pool).await {
            Ok(conn) => conn
                .execute(
                    "UPDATE tvcall_node SET stopped_at = now() WHERE node_id = $1",
                    &[&self.inner.node.id],
                )
                .await
                .map_err(pg_error),
            Err(e) => Err(e),
        };
        if let Err(e) = stopped {
            tracing::warn!(error = %e, "cannot record this node's stop");
        }
        let locks = self.inner.locks.lock().ok().and_then(|mut l| l.take());
        drop(locks);
        self.inner.pool.close();
    }
}

/// Applies the migrations this database lacks, each in its own transaction, under an
/// advisory lock (nodes starting together apply each once).
async fn migrate(conn: &mut Object) -> Result<(), StoreError> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS tvcall_schema (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .or_else(|e| {
        // Two nodes creating it at once: one wins, the other finds it made.
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    loop {
        let tx = conn.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let applied: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM tvcall_schema", &[])
            .await?
            .try_get(0)?;
        let applied = usize::try_from(applied).unwrap_or(0);
        if applied > MIGRATIONS.len() {
            return Err(StoreError::Other(format!(
                "database schema version {applied} is newer than this server ({})",
                MIGRATIONS.len()
            )));
        }
        let Some(sql) = MIGRATIONS.get(applied) else {
            tx.commit().await?;
            return Ok(());
        };
        tx.batch_execute(sql).await?;
        let version = i32::try_from(applied + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO tvcall_schema (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "applied schema migration (PostgreSQL)");
    }
}

/// The nodes whose rows a repair covers: this node (`$1`), rows from before nodes had
/// names, and nodes (never this one) whose lease (`$2`, in milliseconds) ran out
/// without a clean stop.
macro_rules! repaired_nodes {
    () => {
        "(node_id IS NULL OR node_id = $1 OR node_id IN (
            SELECT node_id FROM tvcall_node
            WHERE node_id <> $1 AND stopped_at IS NULL
              AND heartbeat_at < now() - $2::bigint * interval '1 millisecond'))"
    };
}

/// The nodes (never this one, `$1`) whose lease (`$2`, in milliseconds) ran out
/// without a clean stop.
macro_rules! dead_nodes {
    () => {
        "node_id IN (
            SELECT node_id FROM tvcall_node
            WHERE node_id <> $1 AND stopped_at IS NULL
              AND heartbeat_at < now() - $2::bigint * interval '1 millisecond')"
    };
}

/// What a crash may have left, repaired in one transaction: offline the users of the
/// nodes `scope` names (no session survives its node), their ringing calls missed, their
/// answered calls without an end ended; then the dead nodes are marked stopped (so a
/// node is reaped once). At start-up the scope is this node, rows from before nodes had
/// names, and dead nodes ([`repaired_nodes`]); while running, dead nodes only
/// ([`dead_nodes`]). Returns how many TVs it set offline.
async fn repair_scope(
    conn: &mut Object,
    node: &NodeOptions,
    scope: &'static [&'static str; 3],
) -> Result<u64, StoreError> {
    let tx = conn.transaction().await?;
    let offline = repairs_in(&tx, node, scope).await?;
    tx.commit().await?;
    Ok(offline)
}

/// [`repair_scope`]'s statements inside the transaction `tx`.
async fn repairs_in(
    tx: &deadpool_postgres::Transaction<'_>,
    node: &NodeOptions,
    scope: &'static [&'static str; 3],
) -> Result<u64, StoreError> {
    let now = crate::clock::now_ms();
    let lease = i64::try_from(node.lease.as_millis()).unwrap_or(i64::MAX);
    let offline = tx.execute(scope[0], &[&node.id, &lease, &now]).await?;
    tx.execute(scope[1], &[&node.id, &lease, &now]).await?;
    tx.execute(scope[2], &[&node.id, &lease, &now]).await?;
    let reaped = tx
        .execute(
            "UPDATE tvcall_node SET stopped_at = now()
             WHERE node_id <> $1 AND stopped_at IS NULL
               AND heartbeat_at < now() - $2::bigint * interval '1 millisecond'",
            &[&node.id, &lease],
        )
        .await?;
    if reaped > 0 {
        tracing::warn!(
            nodes = reaped,
            tvs_offline = offline,
            "nodes whose lease ran out were reaped: their TVs are offline, their calls ended"
        );
    }
    Ok(offline)
}

/// The three repairs of [`repair_scope`] over `$scope`: users offline, ringing calls
/// missed, answered calls ended (`$3`: now).
macro_rules! repairs {
    ($scope:ident) => {
        [
            concat!(
                "UPDATE user_property SET user_netstate = 0, last_seen = tvcall_ts($3)
                 WHERE user_netstate = 1 AND ",
                $scope!()
            ),
            concat!(
                "UPDATE user_call SET outcome = 'missed', ended_at = tvcall_ts($3) WHERE ",
                live!(),
                " AND outcome = 'ringing' AND ",
                $scope!()
            ),
            concat!(
                "UPDATE user_call SET ended_at = tvcall_ts($3) WHERE ",
                live!(),
                " AND outcome = 'answered' AND ",
                $scope!()
            ),
        ]
    };
}

/// Start-up repairs: this node, unnamed rows, dead nodes.
const START_REPAIRS: [&str; 3] = repairs!(repaired_nodes);
/// Running repairs: dead nodes only.
const REAP_REPAIRS: [&str; 3] = repairs!(dead_nodes);

/// The session-level advisory locks that prove a node alive: taken on a connection of
/// their own and held for the node's life. PostgreSQL releases them the moment that
/// connection ends, so a node that crashed (SIGKILL, power cut: the kernel or a TCP
/// keepalive closes it) can be started again at once, while a second process with a
/// live node's name or slot is refused.
struct NodeLocks {
    /// Holds the locks; dropping it ends the session.
    _client: tokio_postgres::Client,
    /// Drives the connection.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NodeLocks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Base of the slot locks' keys (the name locks use a hash of the name).
const SLOT_LOCK_BASE: i64 = 0x7476_6361_0000; // "tvca" + slot

/// The channel other nodes notify this one on (`NOTIFY`): one per slot.
fn node_channel(slot: u8) -> String {
    format!("tvcall_node_{slot}")
}

/// Reads one notification's payload: `replaced USER SESSION` (sent by the database in a
/// registration's transaction), or a JSON message from another node (for
/// [`crate::cluster`]).
fn node_event(payload: &str) -> Option<NodeEvent> {
    if payload.starts_with('{') {
        return Some(NodeEvent::Message(payload.to_owned()));
    }
    let mut words = payload.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("replaced"), Some(user), Some(session), None) => Some(NodeEvent::Replaced {
            user: user.parse().ok()?,
            session_id: session.parse().ok()?,
        }),
        _ => None,
    }
}

/// Takes this node's name and slot locks, or says which live node holds them; and
/// listens on the node's channel on the same connection, its notifications sent to
/// `events`.
async fn lock_node(
    target: &PgTarget,
    node: &NodeOptions,
    events: mpsc::UnboundedSender<NodeEvent>,
) -> Result<NodeLocks, StoreError> {
    use futures::StreamExt;
    let (client, mut conn) = target.config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    match node_event(n.payload()) {
                        Some(event) => {
                            let _ = events.send(event);
                        }
                        None => tracing::warn!(payload = n.payload(), "unknown node notification"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "the connection holding this node's locks ended: \
                        another process may now take this node's name");
                    return;
                }
            }
        }
    });
    let locks = NodeLocks {
        _client: client,
        task,
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, node.id.as_bytes());
    let mut name = [0u8; 8];
    name.copy_from_slice(&digest.as_ref()[..8]);
    let name_key = i64::from_be_bytes(name);
    let slot_key = SLOT_LOCK_BASE + i64::from(node.slot);
    let row = locks
        ._client
        .query_one(
            "SELECT pg_try_advisory_lock($1), pg_try_advisory_lock($2)",
            &[&name_key, &slot_key],
        )
        .await?;
    let (got_name, got_slot): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
    if !got_name {
        return Err(StoreError::Other(format!(
            "node_id {:?} is held by a live node (a running server holds its lock): give \
             each node its own node_id",
            node.id
        )));
    }
    if got_name && got_slot {
        locks
            ._client
            .batch_execute(&format!("LISTEN {}", node_channel(node.slot)))
            .await?;
    }
    if !got_slot {
        let holder: Option<String> = locks
            ._client
            .query_opt(
                "SELECT node_id FROM tvcall_node WHERE slot = $1",
                &[&i16::from(node.slot)],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        return Err(StoreError::Other(format!(
            "node_slot {} is held by live node {:?}: give each node its own node_slot",
            node.slot,
            holder.unwrap_or_default()
        )));
    }
    Ok(locks)
}

/// Claims this node's row, its name and slot (once [`lock_node`] proved no live node
/// holds either), and in the same transaction repairs what this node left when it last
/// stopped or crashed, and what dead nodes left ([`START_REPAIRS`]).
async fn claim_node(conn: &mut Object, node: &NodeOptions) -> Result<(), StoreError> {
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    repairs_in(&tx, node, &START_REPAIRS).await?;
    // A node that held this slot is dead (its slot lock was free), whatever its lease
    // says: what it left is repaired too before its row goes, or its TVs would stay
    // online under a node nobody reaps.
    let holder: Option<String> = tx
        .query_opt(
            "SELECT node_id FROM tvcall_node WHERE slot = $2 AND node_id <> $1",
            &[&node.id, &i16::from(node.slot)],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    if let Some(holder) = holder {
        let dead = NodeOptions {
            id: holder,
            ..node.clone()
        };
        let offline = repairs_in(&tx, &dead, &START_REPAIRS).await?;
        tracing::warn!(node = %dead.id, tvs_offline = offline, "took over the slot of a dead node");
        tx.execute("DELETE FROM tvcall_node WHERE node_id = $1", &[&dead.id])
            .await?;
    }
    tx.execute(
        "INSERT INTO tvcall_node (node_id, slot, listen, started_at, heartbeat_at)
         VALUES ($1, $2, $3, now(), now())
         ON CONFLICT (node_id) DO UPDATE SET slot = excluded.slot, listen = excluded.listen,
           started_at = now(), heartbeat_at = now(), stopped_at = NULL",
        &[&node.id, &i16::from(node.slot), &node.listen],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(node = %node.id, slot = node.slot, "node registered in the database");
    Ok(())
}

/// Renews this node's lease every fifth of it, and reaps nodes whose lease ran out
/// (their TVs offline, their calls ended), so a node that died is noticed within about
/// one lease and a fifth.
async fn heartbeat_loop(
    pool: Pool,
    node: NodeOptions,
    live: Arc<AtomicU64>,
    events: mpsc::UnboundedSender<NodeEvent>,
) {
    let period = (node.lease / 5).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease = i64::try_from(node.lease.as_millis()).unwrap_or(i64::MAX);
    loop {
        tick.tick().await;
        let mut conn = match connection(&pool).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew this node's lease");
                continue;
            }
        };
        // One statement a beat: the renewal (with this node's TVs online, which the
        // dispatcher reads), whether any other node is dead (the
        // reaping transaction runs only then), and which other nodes are alive (a bit
        // per slot: a node gone since the last beat ends this node's calls with it).
        let beat = conn
            .query_one(
                concat!(
                    "WITH beat AS (UPDATE tvcall_node SET heartbeat_at = now(),
                                     online = (SELECT count(*) FROM user_property
                                               WHERE node_id = $1 AND user_netstate = 1)
                                   WHERE node_id = $1 AND stopped_at IS NULL RETURNING 1)
                     SELECT (SELECT count(*) FROM beat),
                            EXISTS (SELECT 1 FROM tvcall_node WHERE ",
                    dead_nodes!(),
                    "),
                            (SELECT coalesce(bit_or(1::bigint << slot), 0) FROM tvcall_node
                             WHERE node_id <> $1 AND stopped_at IS NULL
                               AND heartbeat_at >= now() - $2::bigint * interval '1 millisecond')"
                ),
                &[&node.id, &lease],
            )
            .await
            .and_then(|r| {
                Ok((
                    r.try_get::<_, i64>(0)?,
                    r.try_get::<_, bool>(1)?,
                    r.try_get::<_, i64>(2)?,
                ))
            });
        let dead = match beat {
            Ok((renewed, dead, alive)) => {
                if renewed != 1 {
                    tracing::error!(
                        node = %node.id,
                        "this node's lease was taken (it was silent for longer than its \
                         lease): other nodes consider its TVs offline"
                    );
                }
                let alive = alive as u64;
                let before = live.swap(alive, Ordering::Relaxed);
                for slot in link::gone(before, alive) {
                    tracing::warn!(slot, "another node is gone (stopped, or its lease ran out)");
                    let _ = events.send(NodeEvent::NodeGone { slot });
                }
                dead
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew this node's lease");
                false
            }
        };
        if !dead {
            continue;
        }
        if let Err(e) = repair_scope(&mut conn, &node, &REAP_REPAIRS).await {
            tracing::warn!(error = %e, "cannot look for dead nodes");
        }
    }
}

/// What a new record is refused with while the database reports its disk full.
fn full_refusal() -> StoreError {
    StoreError::Full(
        "the database's disk is full: new records are refused until space returns".into(),
    )
}

/// How long new records are refused after the database reported its disk full, before
/// the next one is tried again.
const FULL_RECHECK: Duration = Duration::from_secs(2);

/// The writer task: takes everything queued (up to `max_batch`), applies it in one
/// transaction, commits, answers each write. A batch that fails for lack of space turns
/// the store full ([`StoreMetrics::set_full`]) and is applied again with new call records
/// refused, so state changes still commit; new records are tried again after
/// [`FULL_RECHECK`].
async fn writer_loop(
    pool: Pool,
    mut jobs: mpsc::UnboundedReceiver<WriteJob>,
    max_batch: usize,
    metrics: Arc<StoreMetrics>,
    node: String,
) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(max_batch);
    let mut full_since: Option<Instant> = None;
    loop {
        let Some(first) = jobs.recv().await else {
            return;
        };
        if full_since.is_some_and(|t| t.elapsed() >= FULL_RECHECK) {
            full_since = None;
            metrics.set_full(false);
            tracing::warn!("trying new records again after the database's disk was full");
        }
        let mut close = None;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                WriteJob::Close(ack) => close = Some(ack),
                job => batch.push(job),
            }
            if batch.len() < max_batch && close.is_none() {
                next = jobs.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let started = Instant::now();
            let mut results = run_batch(&pool, &batch, metrics.is_full(), &node).await;
            let ran_out = match &results {
                Err(StoreError::Full(_)) => true,
                Ok(r) => r.iter().any(|x| matches!(x, Err(StoreError::Full(_)))),
                Err(_) => false,
            };
            if ran_out && !metrics.is_full() {
                metrics.set_full(true);
                full_since = Some(Instant::now());
                tracing::error!(
                    "ALARM: the database's disk is full; new records are refused, state \
                     changes go on; free space on the PostgreSQL server to recover"
                );
                results = run_batch(&pool, &batch, true, &node).await;
            }
            metrics.committed(started.elapsed());
            match results {
                Ok(results) => {
                    for (job, r) in batch.drain(..).zip(results) {
                        job.answer(r);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, writes = batch.len(), "group commit failed; writes not acknowledged");
                    for job in batch.drain(..) {
                        job.answer(Err(e.clone()));
                    }
                }
            }
        }
        if let Some(ack) = close {
            let _ = ack.send(());
            return;
        }
    }
}

/// Applies `batch` in one transaction: pipelined if every write succeeds, else one
/// write at a time with savepoints. `Ok` holds each write's own result, and means the
/// transaction committed; `Err` means nothing of the batch was committed.
async fn run_batch(
    pool: &Pool,
    batch: &[WriteJob],
    full: bool,
    node: &str,
) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
    let conn = connection(pool).await?;
    let stmts = Statements::prepare(&conn).await?;
    let pipelined = !batch
        .iter()
        .any(|j| matches!(j, WriteJob::StartEnrollment(..)));
    if pipelined {
        match pipeline(&conn, &stmts, batch, full, node).await {
            Ok(Some(results)) => return Ok(results),
            // A statement failed: PostgreSQL rolled the transaction back.
            Ok(None) => tracing::debug!(
                writes = batch.len(),
                "a pipelined batch failed; applying it one write at a time"
            ),
            Err(e) => return Err(e),
        }
    }
    one_by_one(&conn, &stmts, batch, full, node).await
}

/// The statements the writer sends, prepared once per connection (deadpool caches them).
struct Statements {
    register_upsert: Statement,
    register_update: Statement,
    user_state: Statement,
    offline: Statement,
    key_expire: Statement,
    insert: Statement,
    keyed_row: Statement,
    waiting: Statement,
    finish: Statement,
    ack: Statement,
    register_many: Statement,
    replaced_elsewhere: Statement,
    replaced_elsewhere_many: Statement,
    user_state_many: Statement,
    waiting_many: Statement,
    key_expire_many: Statement,
    insert_many: Statement,
    keyed_many: Statement,
    add_usage: Statement,
    book_delete: Statement,
    book_insert: Statement,
    presence_hidden: Statement,
    raise_alarm: Statement,
    message_lock: Statement,
    message_insert: Statement,
    message_ack: Statement,
    message_delete: Statement,
    message_expire: Statement,
}

/// The key of a call as stored: the same 64 bits, as a signed integer.
fn key_value(key: IdempotencyKey) -> i64 {
    i64::from_ne_bytes(key.to_ne_bytes())
}

/// Whether a key recorded at `at_ms` still counts at `now_ms`.
fn key_alive(at_ms: UnixMillis, now_ms: UnixMillis) -> bool {
    now_ms.saturating_sub(at_ms) < KEY_LIFETIME_MS
}

/// The call recorded under a caller's (`$1`) key (`$2`), whatever its age.
const KEYED_ROW_SQL: &str = "SELECT id, otheruser_id, outcome, tvcall_ms(call_date) FROM user_call
     WHERE user_id = $1::bigint AND idem_key = $2::bigint";

/// A page of one callee's (`$1`) undelivered missed calls after id `$2`, at most `$3`.
const CACHED_PAGE_SQL: &str = concat!(
    "SELECT c.id, c.user_id, tvcall_ms(c.call_date), c.outcome, p.user_netstate
     FROM user_call c LEFT JOIN user_property p ON p.user_id = c.user_id
     WHERE c.otheruser_id = $1::bigint AND c.id > $2::bigint AND ",
    waiting!(),
    " ORDER BY c.id LIMIT $3::bigint"
);

fn keyed_from(rows: &[Row]) -> Result<Option<KeyedCall>, StoreError> {
    rows.first().map(|r| keyed_at(r, 0)).transpose()
}

/// A keyed call from columns `first..first + 4` of `r`: id, callee, outcome, placed (ms).
fn keyed_at(r: &Row, first: usize) -> Result<KeyedCall, StoreError> {
    let id: i64 = r.try_get(first)?;
    let outcome: String = r.try_get(first + 2)?;
    Ok(KeyedCall {
        id: id as CallId,
        callee: r.try_get::<_, i64>(first + 1)? as UserId,
        outcome: Outcome::parse(&outcome)
            .ok_or_else(|| StoreError::Corrupt(format!("call {id} has outcome {outcome:?}")))?,
        at_ms: r.try_get(first + 3)?,
    })
}

impl Statements {
    async fn prepare(conn: &Object) -> Result<Statements, StoreError> {
        Ok(Statements {
            register_upsert: conn
                .prepare_cached(
                    "INSERT INTO user_property
                       (user_id, user_ip, user_netstate, media_port, session_id, agent_version,
                        created_at, last_seen, node_id)
                     VALUES ($1::bigint, $2::text, 1, $3::bigint, $4::bigint, $5::text,
                             tvcall_ts($6::bigint), tvcall_ts($6::bigint), $7::text)
                     ON CONFLICT (user_id) DO UPDATE SET
                       user_ip = excluded.user_ip, user_netstate = 1,
                       media_port = excluded.media_port, session_id = excluded.session_id,
                       agent_version = excluded.agent_version, last_seen = excluded.last_seen,
                       node_id = excluded.node_id
                     WHERE excluded.session_id > user_property.session_id",
                )
                .await?,
            register_update: conn
                .prepare_cached(
                    "UPDATE user_property SET user_ip = $2::text, user_netstate = 1,
                       media_port = $3::bigint, session_id = $4::bigint,
                       agent_version = $5::text, last_seen = tvcall_ts($6::bigint),
                       node_id = $7::text
                     WHERE user_id = $1::bigint AND session_id < $4::bigint",
                )
                .await?,
            user_state: conn
                .prepare_cached(concat!(
                    "SELECT EXISTS (SELECT 1 FROM user_property WHERE user_id = $1::bigint),
                            (SELECT count(*) FROM user_call WHERE otheruser_id = $1::bigint AND ",
                    waiting!(),
                    ")"
                ))
                .await?,
            offline: conn
                .prepare_cached(
                    "UPDATE user_property SET user_netstate = 0, last_seen = tvcall_ts($3::bigint)
                     WHERE user_id = $1::bigint AND session_id = $2::bigint",
                )
                .await?,
            key_expire: conn
                .prepare_cached(
                    "UPDATE user_call SET idem_key = NULL
                     WHERE user_id = $1::bigint AND idem_key = $2::bigint
                       AND call_date <= tvcall_ts($3::bigint)",
                )
                .await?,
            insert: conn
                .prepare_cached(
                    "INSERT INTO user_call
                       (id, user_id, otheruser_id, call_date, outcome, caller_ip, idem_key, node_id)
                     SELECT $1::bigint, $2::bigint, $3::bigint, tvcall_ts($4::bigint), $5::text,
                            $6::text, $7::bigint, $8::text
                     WHERE EXISTS (SELECT 1 FROM user_property WHERE user_id = $3::bigint)
                       AND ($7::bigint IS NULL OR NOT EXISTS (
                             SELECT 1 FROM user_call WHERE user_id = $2::bigint
                                                       AND idem_key = $7::bigint))",
                )
                .await?,
            keyed_row: conn.prepare_cached(KEYED_ROW_SQL).await?,
            waiting: conn
                .prepare_cached(concat!(
                    "SELECT count(*) FROM user_call WHERE otheruser_id = $1::bigint AND ",
                    waiting!()
                ))
                .await?,
            finish: conn
                .prepare_cached(
                    "UPDATE user_call SET outcome = $2::text,
                       answered_at = coalesce(tvcall_ts($3::bigint), answered_at),
                       ended_at = coalesce(tvcall_ts($4::bigint), ended_at),
                       delivered = $5::bigint,
                       delivered_at = CASE WHEN $5::bigint = 1
                                           THEN coalesce(delivered_at, tvcall_ts($6::bigint))
                                           ELSE NULL END
                     WHERE id = $1::bigint",
                )
                .await?,
            replaced_elsewhere: conn
                .prepare_cached(
                    "SELECT pg_notify('tvcall_node_' || n.slot, 'replaced ' || p.user_id || ' ' || $2::bigint)
                     FROM user_property p JOIN tvcall_node n ON n.node_id = p.node_id
                     WHERE p.user_id = $1::bigint AND p.user_netstate = 1
                       AND p.node_id <> $3::text AND p.session_id < $2::bigint
                       AND n.stopped_at IS NULL",
                )
                .await?,
            replaced_elsewhere_many: conn
                .prepare_cached(
                    "SELECT pg_notify('tvcall_node_' || n.slot, 'replaced ' || p.user_id || ' ' || t.sess)
                     FROM unnest($1::bigint[], $2::bigint[]) AS t(u, sess)
                     JOIN user_property p ON p.user_id = t.u
                     JOIN tvcall_node n ON n.node_id = p.node_id
                     WHERE p.user_netstate = 1 AND p.node_id <> $3::text
                       AND p.session_id < t.sess AND n.stopped_at IS NULL",
                )
                .await?,
            register_many: conn
                .prepare_cached(
                    "INSERT INTO user_property
                       (user_id, user_ip, user_netstate, media_port, session_id, agent_version,
                        created_at, last_seen, node_id)
                     SELECT u, ip, 1, port, sess, ver, tvcall_ts(at), tvcall_ts(at), $7::text
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[],
                                 $5::text[], $6::bigint[]) AS t(u, ip, port, sess, ver, at)
                     ON CONFLICT (user_id) DO UPDATE SET
                       user_ip = excluded.user_ip, user_netstate = 1,
                       media_port = excluded.media_port, session_id = excluded.session_id,
                       agent_version = excluded.agent_version, last_seen = excluded.last_seen,
                       node_id = excluded.node_id
                     WHERE excluded.session_id > user_property.session_id
                     RETURNING user_id",
                )
                .await?,
            user_state_many: conn
                .prepare_cached(concat!(
                    "SELECT t.u,
                            EXISTS (SELECT 1 FROM user_property p WHERE p.user_id = t.u),
                            (SELECT count(*) FROM user_call WHERE otheruser_id = t.u AND ",
                    waiting!(),
                    ")
                     FROM unnest($1::bigint[]) AS t(u)"
                ))
                .await?,
            waiting_many: conn
                .prepare_cached(concat!(
                    "SELECT t.c, (SELECT count(*) FROM user_call WHERE otheruser_id = t.c AND ",
                    waiting!(),
                    ")
                     FROM unnest($1::bigint[]) AS t(c)"
                ))
                .await?,
            key_expire_many: conn
                .prepare_cached(
                    "UPDATE user_call u SET idem_key = NULL
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS t(caller, k, cutoff)
                     WHERE u.user_id = t.caller AND u.idem_key = t.k
                       AND u.call_date <= tvcall_ts(t.cutoff)",
                )
                .await?,
            insert_many: conn
                .prepare_cached(
                    "INSERT INTO user_call
                       (id, user_id, otheruser_id, call_date, outcome, caller_ip, idem_key, node_id)
                     SELECT t.id, t.caller, t.callee, tvcall_ts(t.at), t.outcome, t.ip, t.k,
                            $8::text
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                 $5::text[], $6::text[], $7::bigint[])
                          AS t(id, caller, callee, at, outcome, ip, k)
                     WHERE EXISTS (SELECT 1 FROM user_property p WHERE p.user_id = t.callee)
                       AND (t.k IS NULL OR NOT EXISTS (
                             SELECT 1 FROM user_call c WHERE c.user_id = t.caller
                                                         AND c.idem_key = t.k))
                     RETURNING id",
                )
                .await?,
            keyed_many: conn
                .prepare_cached(
                    "SELECT c.user_id, c.idem_key, c.id, c.otheruser_id, c.outcome,
                            tvcall_ms(c.call_date)
                     FROM user_call c
                     JOIN unnest($1::bigint[], $2::bigint[]) AS t(caller, k)
                       ON c.user_id = t.caller AND c.idem_key = t.k",
                )
                .await?,
            add_usage: conn.prepare_cached(usage::ADD_SQL).await?,
            book_delete: conn.prepare_cached(presence::BOOK_DELETE_SQL).await?,
            book_insert: conn.prepare_cached(presence::BOOK_INSERT_SQL).await?,
            presence_hidden: conn.prepare_cached(presence::HIDDEN_SQL).await?,
            raise_alarm: conn.prepare_cached(presence::ALARM_SQL).await?,
            message_lock: conn.prepare_cached(messages::LOCK_SQL).await?,
            message_insert: conn.prepare_cached(messages::INSERT_SQL).await?,
            message_ack: conn.prepare_cached(messages::ACK_SQL).await?,
            message_delete: conn.prepare_cached(messages::DELETE_SQL).await?,
            message_expire: conn.prepare_cached(messages::EXPIRE_SQL).await?,
            ack: conn
                .prepare_cached(concat!(
                    "UPDATE user_call SET delivered = 1, delivered_at = tvcall_ts($3::bigint)
                     WHERE otheruser_id = $1::bigint AND id = ANY($2::bigint[]) AND ",
                    waiting!()
                ))
                .await?,
        })
    }
}

/// Boxed parameters of one statement.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// A statement already sent to PostgreSQL (its request is on the wire, in order), whose
/// answer is read later.
enum Sent<'a, T> {
    /// Waiting for the answer.
    Waiting(Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>>),
    /// Answered at once (an error before anything was sent).
    Answered(Result<T, tokio_postgres::Error>),
}

impl<'a, T> Sent<'a, T> {
    /// Polls `fut` once, which sends its request (tokio-postgres writes a statement's
    /// request on its first poll), and keeps it for its answer.
    async fn send(
        mut fut: Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>>,
    ) -> Sent<'a, T> {
        match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
            Poll::Ready(r) => Sent::Answered(r),
            Poll::Pending => Sent::Waiting(fut),
        }
    }

    /// The answer.
    async fn answer(self) -> Result<T, tokio_postgres::Error> {
        match self {
            Sent::Waiting(fut) => fut.await,
            Sent::Answered(r) => r,
        }
    }

    /// The answer of a statement that may not have been sent.
    async fn answer_opt(sent: Option<Self>) -> Option<Result<T, tokio_postgres::Error>> {
        match sent {
            Some(s) => Some(s.answer().await),
            None => None,
        }
    }
}

/// Sends a statement that changes rows; its answer is the number changed.
async fn send_exec<'a>(conn: &'a Object, stmt: &Statement, params: Params) -> Sent<'a, u64> {
    let stmt = stmt.clone();
    let client: &'a tokio_postgres::Client = conn;
    Sent::send(Box::pin(
        async move { client.execute_raw(&stmt, params).await },
    ))
    .await
}

/// Sends a query; its answer is its rows.
async fn send_query<'a>(conn: &'a Object, stmt: &Statement, params: Params) -> Sent<'a, Vec<Row>> {
    use futures::TryStreamExt;
    let stmt = stmt.clone();
    let client: &'a tokio_postgres::Client = conn;
    Sent::send(Box::pin(async move {
        client.query_raw(&stmt, params).await?.try_collect().await
    }))
    .await
}

/// Sends a plain SQL command (`BEGIN`, `COMMIT`, savepoints).
async fn send_command<'a>(conn: &'a Object, sql: &'static str) -> Sent<'a, ()> {
    let client: &'a tokio_postgres::Client = conn;
    Sent::send(Box::pin(async move { client.batch_execute(sql).await })).await
}

/// One write's statements, sent; [`Step::finish`] reads their answers into its result.
enum Step<'a> {
    Register {
        elsewhere: Sent<'a, Vec<Row>>,
        change: Sent<'a, u64>,
        state: Sent<'a, Vec<Row>>,
    },
    /// One statement whose answer says only that it succeeded (an offline mark, a
    /// node's usage, a presence setting, an alarm).
    Unit(Sent<'a, u64>),
    /// Several such statements, all of one write (an address book: the old one deleted,
    /// the new one inserted).
    Units(Vec<Sent<'a, u64>>),
    Insert {
        expire: Option<Sent<'a, u64>>,
        insert: Sent<'a, u64>,
        keyed: Option<Sent<'a, Vec<Row>>>,
        waiting: Option<Sent<'a, Vec<Row>>>,
    },
    Finish {
        update: Sent<'a, u64>,
        waiting: Option<Sent<'a, Vec<Row>>>,
    },
    Ack(Sent<'a, u64>),
    /// A message insert: its answer, the message's size and the quota it was held to.
    Message(Sent<'a, Vec<Row>>, u64, Quota),
    /// Messages acknowledged or deleted (in the order of these ids), or expired (`None`).
    Settled(Sent<'a, Vec<Row>>, Option<Vec<shared_proto::MessageId>>),
    /// Known without the database (a record refused while the disk is full).
    Known(Result<Done, StoreError>),
}

/// What a registration found: recorded online (`changed`) with `waiting` cached calls,
/// else superseded by a newer session of an existing user, else an unknown user (the
/// one reading of a registration's statements, for a write alone and for a run).
fn register_result(changed: bool, exists: bool, waiting: i64) -> RegisterResult {
    if changed {
        RegisterResult::Online {
            cached_waiting: u32::try_from(waiting.max(0)).unwrap_or(u32::MAX),
        }
    } else if exists {
        RegisterResult::Superseded
    } else {
        RegisterResult::UnknownUser
    }
}

/// The first row's first column as a count.
fn count_of(rows: &[Row]) -> Result<u32, StoreError> {
    let n: i64 = match rows.first() {
        Some(r) => r.try_get(0)?,
        None => 0,
    };
    Ok(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

fn ip_text(ip: IpAddr) -> String {
    ip.to_canonical().to_string()
}

/// Sends the statements of `job` (not an enrollment: see [`one_by_one`]).
async fn send_job<'a>(
    conn: &'a Object,
    s: &Statements,
    job: &WriteJob,
    full: bool,
    node: &str,
) -> Step<'a> {
    match job {
        WriteJob::Register(reg, _) => {
            let params: Params = vec![
                Box::new(reg.user_id as i64),
                Box::new(ip_text(reg.ip)),
                Box::new(i64::from(reg.media_port)),
                Box::new(reg.session_id as i64),
                Box::new(reg.agent_version.clone()),
                Box::new(reg.at_ms),
                Box::new(node.to_string()),
            ];
            let stmt = if reg.create_unknown {
                &s.register_upsert
            } else {
                &s.register_update
            };
            // Tells the node holding an older session of this TV (sent at commit).
            let elsewhere = send_query(
                conn,
                &s.replaced_elsewhere,
                vec![
                    Box::new(reg.user_id as i64),
                    Box::new(reg.session_id as i64),
                    Box::new(node.to_string()),
                ],
            )
            .await;
            let change = send_exec(conn, stmt, params).await;
            let state = send_query(conn, &s.user_state, vec![Box::new(reg.user_id as i64)]).await;
            Step::Register {
                elsewhere,
                change,
                state,
            }
        }
        WriteJob::Offline(user, session, at, _) => Step::Unit(
            send_exec(
                conn,
                &s.offline,
                vec![
                    Box::new(*user as i64),
                    Box::new(*session as i64),
                    Box::new(*at),
                ],
            )
            .await,
        ),
        WriteJob::Insert(..) if full => Step::Known(Err(full_refusal())),
        WriteJob::Insert(call, key, _) => {
            let key = key.map(key_value);
            let expire = match key {
                Some(k) => Some(
                    send_exec(
                        conn,
                        &s.key_expire,
                        vec![
                            Box::new(call.caller as i64),
                            Box::new(k),
                            Box::new(call.at_ms.saturating_sub(KEY_LIFETIME_MS)),
                        ],
                    )
                    .await,
                ),
                None => None,
            };
            let insert = send_exec(
                conn,
                &s.insert,
                vec![
                    Box::new(call.id as i64),
                    Box::new(call.caller as i64),
                    Box::new(call.callee as i64),
                    Box::new(call.at_ms),
                    Box::new(call.outcome.as_str()),
                    Box::new(ip_text(call.caller_ip)),
                    Box::new(key),
                    Box::new(node.to_string()),
                ],
            )
            .await;
            let keyed = match key {
                Some(k) => Some(
                    send_query(
                        conn,
                        &s.keyed_row,
                        vec![Box::new(call.caller as i64), Box::new(k)],
                    )
                    .await,
                ),
                None => None,
            };
            let waiting = if call.outcome.is_missed_kind() {
                Some(send_query(conn, &s.waiting, vec![Box::new(call.callee as i64)]).await)
            } else {
                None
            };
            Step::Insert {
                expire,
                insert,
                keyed,
                waiting,
            }
        }
        WriteJob::Finish(end, callee, _) => {
            let delivered = !end.outcome.is_missed_kind();
            let update = send_exec(
                conn,
                &s.finish,
                vec![
                    Box::new(end.id as i64),
                    Box::new(end.outcome.as_str()),
                    Box::new(end.answered_at_ms),
                    Box::new(end.ended_at_ms),
                    Box::new(i64::from(delivered)),
                    Box::new(end.at_ms),
                ],
            )
            .await;
            let waiting = if end.outcome.is_missed_kind() {
                Some(send_query(conn, &s.waiting, vec![Box::new(*callee as i64)]).await)
            } else {
                None
            };
            Step::Finish { update, waiting }
        }
        WriteJob::Ack(callee, ids, at, _) => {
            let ids: Vec<i64> = ids
                .iter()
                .filter_map(|&id| i64::try_from(id).ok())
                .collect();
            Step::Ack(
                send_exec(
                    conn,
                    &s.ack,
                    vec![Box::new(*callee as i64), Box::new(ids), Box::new(*at)],
                )
                .await,
            )
        }
        WriteJob::Usage(rows, _) => {
            Step::Unit(send_exec(conn, &s.add_usage, usage::add_params(rows)).await)
        }
        WriteJob::PresenceBook(user, contacts, _) => {
            let user = *user as i64;
            let contacts: Vec<i64> = contacts.iter().map(|&c| c as i64).collect();
            let delete = send_exec(conn, &s.book_delete, vec![Box::new(user)]).await;
            let insert = send_exec(
                conn,
                &s.book_insert,
                vec![Box::new(user), Box::new(contacts)],
            )
            .await;
            Step::Units(vec![delete, insert])
        }
        WriteJob::PresenceHidden(user, hidden, at, _) => Step::Unit(
            send_exec(
                conn,
                &s.presence_hidden,
                vec![Box::new(*user as i64), Box::new(*hidden), Box::new(*at)],
            )
            .await,
        ),
        WriteJob::Alarm(alarm, _) => {
            Step::Unit(send_exec(conn, &s.raise_alarm, presence::alarm_params(alarm)).await)
        }
        WriteJob::InsertMessage(..) if full => Step::Known(Err(full_refusal())),
        WriteJob::InsertMessage(m, quota, _) => Step::Message(
            send_query(conn, &s.message_insert, messages::insert_params(m, *quota)).await,
            messages::size(m),
            *quota,
        ),
        WriteJob::SettleMessages(recipient, ids, settle, at, _) => {
            let keys: Vec<i64> = ids
                .iter()
                .filter_map(|&id| i64::try_from(id).ok())
                .collect();
            let sent = match settle {
                Settle::Ack => {
                    send_query(
                        conn,
                        &s.message_ack,
                        vec![Box::new(*recipient as i64), Box::new(keys), Box::new(*at)],
                    )
                    .await
                }
                Settle::Delete => {
                    send_query(
                        conn,
                        &s.message_delete,
                        vec![Box::new(*recipient as i64), Box::new(keys)],
                    )
                    .await
                }
            };
            Step::Settled(sent, Some(ids.clone()))
        }
        WriteJob::ExpireMessages(before, limit, _) => Step::Settled(
            send_query(
                conn,
                &s.message_expire,
                vec![
                    Box::new(*before),
                    Box::new(i64::try_from(*limit).unwrap_or(i64::MAX)),
                ],
            )
            .await,
            None,
        ),
        WriteJob::StartEnrollment(..) | WriteJob::Close(_) => Step::Known(Err(StoreError::Other(
            "this write is not sent as a pipelined step".into(),
        ))),
    }
}

impl Step<'_> {
    /// Reads the answers of this write's statements (every one of them, in order) and
    /// makes its result.
    async fn finish(self) -> Result<Done, StoreError> {
        match self {
            Step::Register {
                elsewhere,
                change,
                state,
            } => {
                let elsewhere = elsewhere.answer().await;
                let changed = change.answer().await;
                let state = state.answer().await;
                elsewhere?;
                let (changed, state) = (changed?, state?);
                let row = state
                    .first()
                    .ok_or_else(|| StoreError::Other("no answer to a user's state".into()))?;
                let exists: bool = row.try_get(0)?;
                let waiting: i64 = row.try_get(1)?;
                Ok(Done::Register(register_result(
                    changed > 0,
                    exists,
                    waiting,
                )))
            }
            Step::Unit(update) => {
                update.answer().await?;
                Ok(Done::Unit)
            }
            Step::Units(updates) => {
                let mut answers = Vec::with_capacity(updates.len());
                for u in updates {
                    answers.push(u.answer().await);
                }
                for a in answers {
                    a?;
                }
                Ok(Done::Unit)
            }
            Step::Insert {
                expire,
                insert,
                keyed,
                waiting,
            } => {
                let expired = Sent::answer_opt(expire).await;
                let inserted = insert.answer().await;
                let keyed = Sent::answer_opt(keyed).await;
                let waiting = Sent::answer_opt(waiting).await;
                if let Some(e) = expired {
                    e?;
                }
                let inserted = inserted?;
                let keyed = keyed.transpose()?;
                let waiting = waiting.transpose()?;
                if inserted > 0 {
                    let callee_waiting = match waiting {
                        Some(rows) => count_of(&rows)?,
                        None => 0,
                    };
                    return Ok(Done::Insert(InsertResult::Recorded { callee_waiting }));
                }
                match keyed.as_deref().map(keyed_from).transpose()?.flatten() {
                    Some(first) => Ok(Done::Insert(InsertResult::AlreadyRecorded(first))),
                    None => Ok(Done::Insert(InsertResult::UnknownCallee)),
                }
            }
            Step::Finish { update, waiting } => {
                let updated = update.answer().await;
                let waiting = Sent::answer_opt(waiting).await;
                updated?;
                Ok(Done::Count(match waiting.transpose()? {
                    Some(rows) => count_of(&rows)?,
                    None => 0,
                }))
            }
            Step::Ack(update) => {
                let n = update.answer().await?;
                Ok(Done::Count(u32::try_from(n).unwrap_or(u32::MAX)))
            }
            Step::Message(sent, size, quota) => {
                let rows = sent.answer().await?;
                Ok(Done::Message(messages::insert_result(&rows, size, quota)?))
            }
            Step::Settled(sent, ids) => {
                let rows = sent.answer().await?;
                Ok(Done::Settled(match ids {
                    Some(ids) => messages::settled(&rows, &ids)?,
                    None => messages::expired(&rows)?,
                }))
            }
            Step::Known(r) => r,
        }
    }
}

/// The recipients of the batch's message inserts (none while the disk is full: they
/// are refused), whose mailbox locks the batch takes first ([`messages::LOCK_SQL`]).
fn mailbox_locks(batch: &[WriteJob], full: bool) -> Option<Vec<i64>> {
    if full {
        return None;
    }
    let recipients: Vec<i64> = batch
        .iter()
        .filter_map(|j| match j {
            WriteJob::InsertMessage(m, ..) => Some(m.recipient as i64),
            _ => None,
        })
        .collect();
    (!recipients.is_empty()).then_some(recipients)
}

/// The fast path: `BEGIN`, every write's statements and `COMMIT`, all sent before the
/// first answer is read. `Ok(None)`: a statement failed, so PostgreSQL rolled the whole
/// transaction back (the caller applies the batch again one write at a time).
async fn pipeline(
    conn: &Object,
    s: &Statements,
    batch: &[WriteJob],
    full: bool,
    node: &str,
) -> Result<Option<Vec<Result<Done, StoreError>>>, StoreError> {
    let begin = send_command(conn, "BEGIN").await;
    let locks = match mailbox_locks(batch, full) {
        Some(r) => Some(send_query(conn, &s.message_lock, vec![Box::new(r)]).await),
        None => None,
    };
    // Runs of like writes go as one statement over arrays ([`group`]); the rest one by
    // one, all before the first answer is read.
    enum Sending<'a> {
        One(Step<'a>),
        Run(group::Run<'a>, usize),
    }
    let mut sent = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        let rest = &batch[i..];
        let (registers, inserts) = (group::registers_run(rest), group::inserts_run(rest));
        if registers > 1 {
            sent.push(Sending::Run(
                group::send_registers(conn, s, &rest[..registers], node).await,
                registers,
            ));
            i += registers;
        } else if inserts > 1 && !full {
            sent.push(Sending::Run(
                group::send_inserts(conn, s, &rest[..inserts], node).await,
                inserts,
            ));
            i += inserts;
        } else {
            sent.push(Sending::One(send_job(conn, s, &batch[i], full, node).await));
            i += 1;
        }
    }
    let commit = send_command(conn, "COMMIT").await;
    // Every answer is read, in the order sent, whatever failed before it.
    let began = begin.answer().await;
    let locked = Sent::answer_opt(locks).await;
    let mut results = Vec::with_capacity(batch.len());
    let mut run_failed = false;
    for step in sent {
        match step {
            Sending::One(step) => results.push(step.finish().await),
            Sending::Run(run, n) => match run.finish().await {
                Ok(done) if done.len() == n => results.extend(done.into_iter().map(Ok)),
                Ok(_) | Err(_) => run_failed = true,
            },
        }
    }
    let committed = commit.answer().await;
    began?;
    committed?;
    if let Some(Err(e)) = locked {
        tracing::debug!(error = %e, "the batch's mailbox locks failed");
        return Ok(None);
    }
    // A refusal known without the database (a full disk) is not a statement's failure.
    let statement_failed = run_failed
        || results.iter().zip(batch).any(|(r, job)| {
            r.is_err()
                && !(full && matches!(job, WriteJob::Insert(..) | WriteJob::InsertMessage(..)))
        });
    if statement_failed {
        return Ok(None);
    }
    Ok(Some(results))
}

/// The slow path: one transaction, each write in its own savepoint and awaited before
/// the next, so a write that fails is rolled back alone.
async fn one_by_one(
    conn: &Object,
    s: &Statements,
    batch: &[WriteJob],
    full: bool,
    node: &str,
) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
    send_command(conn, "BEGIN").await.answer().await?;
    if let Some(recipients) = mailbox_locks(batch, full) {
        let locked = send_query(conn, &s.message_lock, vec![Box::new(recipients)])
            .await
            .answer()
            .await;
        if let Err(e) = locked {
            let _ = send_command(conn, "ROLLBACK").await.answer().await;
            return Err(e.into());
        }
    }
    let mut results = Vec::with_capacity(batch.len());
    let outcome: Result<(), StoreError> = async {
        for job in batch {
            send_command(conn, "SAVEPOINT job").await.answer().await?;
            let result = match job {
                WriteJob::StartEnrollment(e, _) => {
                    enroll::start(conn, e).await.map(Done::Enrollment)
                }
                job => send_job(conn, s, job, full, node).await.finish().await,
            };
            if let Err(e @ StoreError::Full(_)) = &result {
                if !full {
                    // The caller applies the batch again with records refused.
                    return Err(e.clone());
                }
            }
            if result.is_ok() {
                send_command(conn, "RELEASE job").await.answer().await?;
            } else {
                send_command(conn, "ROLLBACK TO job").await.answer().await?;
                send_command(conn, "RELEASE job").await.answer().await?;
            }
            results.push(result);
        }
        Ok(())
    }
    .await;
    match outcome {
        Ok(()) => {
            send_command(conn, "COMMIT").await.answer().await?;
            Ok(results)
        }
        Err(e) => {
            let _ = send_command(conn, "ROLLBACK").await.answer().await;
            Err(e)
        }
    }
}

/// Creates (and migrates) the database at `target` by opening a store on it and letting
/// it go: for the tools that fill a database before a server starts (benchmarks).
pub async fn create_schema(target: &PgTarget) -> Result<(), StoreError> {
    let store = PostgresStore::open(
        target,
        PostgresOptions {
            sync_full: false,
            readers: 1,
            max_batch: 1,
            node: NodeOptions::default(),
        },
    )
    .await?;
    store.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_notifications_parse_or_are_ignored() {
        assert_eq!(
            node_event("replaced 1001 123456789"),
            Some(NodeEvent::Replaced {
                user: 1001,
                session_id: 123_456_789
            })
        );
        for bad in [
            "replaced 1001",
            "replaced x 1",
            "replaced 1 2 3",
            "hello",
            "",
        ] {
            assert_eq!(node_event(bad), None, "{bad:?}");
        }
        assert_eq!(node_channel(7), "tvcall_node_7");
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_one_from_a_file_is_used_but_never_shown() {
        let err = PgTarget::new("postgres://tv:secret@db/tvcall", None).unwrap_err();
        assert!(err.to_string().contains("db_password_file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let t = PgTarget::new("postgres://tv@db:5433/tvcall", Some(&file)).unwrap();
        assert_eq!(t.config.get_password(), Some(&b"s3cret"[..]));
        assert!(!format!("{t:?}").contains("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(PgTarget::new("postgres://tv@db/tvcall", Some(&file)).is_err());
        let missing = PgTarget::new("postgres://tv@db/tvcall", Some(&dir.path().join("none")));
        assert!(
            matches!(missing, Err(StoreError::Unavailable(_))),
            "{missing:?}"
        );
        assert!(PgTarget::new("not a url", None).is_err());
    }
}
