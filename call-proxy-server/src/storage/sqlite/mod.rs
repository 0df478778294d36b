//! The embedded user management database: SQLite in WAL mode, through rusqlite.
//!
//! One writer thread owns the only write connection. Writes queue to it; it takes
//! everything queued, applies it in one transaction, commits (one WAL sync for the whole
//! batch: group commit) and only then answers each caller. A few reader threads with
//! read-only connections serve queries concurrently with the writer (WAL readers never
//! block on it). No SQLite call ever runs on the async runtime's threads.
//!
//! Each write of a batch runs inside its own savepoint: a write that fails is rolled
//! back alone and answered with its error, and the rest of the batch still commits.
//! SQLite's errors become [`StoreError`]s here ([`db_error`]); nothing outside this
//! module sees a rusqlite type. [`operator`] holds the operator's read-only queries.

pub mod enroll;
mod messages;
pub mod operator;
pub mod presence;
mod reserve;
pub mod usage;

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction};
use tokio::sync::oneshot;

pub use operator::{OperatorDb, SqliteOperator};
use reserve::Reserve;

use super::*;
use crate::clock::{from_db_text, to_db_text};
use shared_proto::{MessageId, KEY_LIFETIME_MS};

/// Tuning of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `synchronous=FULL` (every commit survives power loss) rather than `NORMAL`
    /// (every commit survives a process crash; the last ones may be lost on power loss).
    pub sync_full: bool,
    /// Reader threads.
    pub readers: usize,
    /// Most writes in one group commit.
    pub max_batch: usize,
    /// Disk space held in reserve beside the database (`<database>-reserve`), released
    /// when the disk fills so that state changes still commit (0: none).
    pub reserve_bytes: u64,
    /// Free space on the database's disk below which the WAL is kept small
    /// ([`WAL_TIGHT`] rather than [`WAL_ROOMY`]).
    pub wal_tight_below: u64,
}

/// The default disk reserve: room for the state changes of a whole fleet (each TV's
/// registration and offline mark rewrite a few pages) and a WAL that grows to its
/// checkpoint size ([`WAL_TIGHT`] on a disk short of space) before it is reused.
pub const DEFAULT_RESERVE_BYTES: u64 = 16 << 20;

/// How the WAL is checkpointed: how many pages it may hold before a commit copies it
/// into the database (and it is reused from its start), and what it is truncated to
/// afterwards, so a burst that grew it does not keep holding the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPolicy {
    /// `wal_autocheckpoint`, in pages (4 KiB).
    pub checkpoint_pages: i64,
    /// `journal_size_limit`, in bytes.
    pub size_limit: i64,
}

/// On a disk with room: checkpoints every 10,000 pages (a 40 MB log), which keeps the
/// writer's group commits short under bursts (cached calls/s about 25 % higher than
/// with [`WAL_TIGHT`] here).
pub const WAL_ROOMY: WalPolicy = WalPolicy {
    checkpoint_pages: 10_000,
    size_limit: 64 << 20,
};

/// On a disk short of space: checkpoints every 1,000 pages (4 MB of log), truncated to
/// 4 MiB.
pub const WAL_TIGHT: WalPolicy = WalPolicy {
    checkpoint_pages: 1_000,
    size_limit: 4 << 20,
};

/// Below this much free space on the database's disk the WAL is kept small
/// ([`WAL_TIGHT`]); the writer looks every [`WAL_POLICY_RECHECK`].
pub const WAL_TIGHT_BELOW_BYTES: u64 = 1 << 30;

/// How often the writer reads the free space to pick its [`WalPolicy`].
const WAL_POLICY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            sync_full: true,
            readers: 2,
            max_batch: 4096,
            reserve_bytes: DEFAULT_RESERVE_BYTES,
            wal_tight_below: WAL_TIGHT_BELOW_BYTES,
        }
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Append only: their text never changes, so the partial index `user_call_waiting`
/// spells the missed-kinds rule out; a unit test checks it says what
/// [`MISSED_KINDS_SQL`] says (a change of the rule is a new migration rebuilding it).
const MIGRATIONS: &[&str] = &[
    // 1: the documents' two tables, with the columns a real product needs.
    "CREATE TABLE user_property (
        user_id        INTEGER PRIMARY KEY,          -- User_id: the TV's calling number
        user_ip        TEXT    NOT NULL DEFAULT '',  -- User_ip: as observed by the server
        user_netstate  INTEGER NOT NULL DEFAULT 0 CHECK (user_netstate IN (0, 1)),
        media_port     INTEGER NOT NULL DEFAULT 0,
        session_id     INTEGER NOT NULL DEFAULT 0,
        agent_version  TEXT    NOT NULL DEFAULT '',
        created_at     TEXT    NOT NULL,
        last_seen      TEXT
     );
     CREATE TABLE user_call (
        id            INTEGER PRIMARY KEY,
        user_id       INTEGER NOT NULL,              -- caller
        otheruser_id  INTEGER NOT NULL,              -- callee
        call_date     TEXT    NOT NULL,              -- RFC 3339, UTC, milliseconds
        outcome       TEXT    NOT NULL CHECK (outcome IN
                        ('ringing','answered','missed','rejected','busy','cached')),
        caller_ip     TEXT    NOT NULL DEFAULT '',
        answered_at   TEXT,
        ended_at      TEXT,
        delivered     INTEGER NOT NULL DEFAULT 0 CHECK (delivered IN (0, 1)),
        delivered_at  TEXT
     );
     CREATE INDEX user_call_waiting ON user_call (otheruser_id, id)
        WHERE delivered = 0 AND outcome IN ('missed', 'busy', 'cached');
     CREATE INDEX user_call_caller ON user_call (user_id, call_date);
     CREATE INDEX user_call_callee ON user_call (otheruser_id, call_date);",
    // 2: calls still live (ringing, or answered and not ended): the few rows the start-up
    // repair must find, without scanning the whole call log.
    "CREATE INDEX user_call_live ON user_call (id)
        WHERE ended_at IS NULL AND outcome IN ('ringing', 'answered');",
    // 3: the caller's idempotency key of a dial (NULL: none). One record per (caller,
    // key): a retried dial finds the first call instead of storing a second. A key past
    // its lifetime is cleared from the old row when a new call takes it over.
    "ALTER TABLE user_call ADD COLUMN idem_key INTEGER;
     CREATE UNIQUE INDEX user_call_idem ON user_call (user_id, idem_key)
        WHERE idem_key IS NOT NULL;",
    // 4: enrolled TVs (issue 12). An enrollment is a TV's certificate waiting under a
    // short code for the operator; a credential binds a certificate's SHA-256 to a user
    // (at most one valid per user); revocations are numbered so the server can follow
    // them. Only public certificates and fingerprints are kept.
    "CREATE TABLE tv_enrollment (
        user_code      TEXT    PRIMARY KEY,          -- 8 consonants, no dash
        fingerprint    BLOB    NOT NULL,             -- SHA-256 of cert
        cert           BLOB    NOT NULL,             -- the TV's self-signed certificate (DER)
        agent_version  TEXT    NOT NULL DEFAULT '',
        source_ip      TEXT    NOT NULL DEFAULT '',
        created_at     TEXT    NOT NULL,
        expires_at     INTEGER NOT NULL,             -- Unix ms
        state          TEXT    NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'approved', 'refused')),
        user_id        INTEGER,
        decided_at     TEXT
     );
     CREATE INDEX tv_enrollment_fingerprint ON tv_enrollment (fingerprint, created_at);
     CREATE TABLE tv_credential (
        fingerprint    BLOB    PRIMARY KEY,
        user_id        INTEGER NOT NULL,
        cert           BLOB    NOT NULL,
        enrolled_at    TEXT    NOT NULL,
        revoked_at     TEXT
     );
     CREATE UNIQUE INDEX tv_credential_user ON tv_credential (user_id) WHERE revoked_at IS NULL;
     CREATE TABLE tv_revocation (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id        INTEGER NOT NULL,
        fingerprint    BLOB    NOT NULL,
        at             TEXT    NOT NULL
     );",
    // 5: traffic accounting (issue 18): each account's usage per period as the nodes
    // report it (added to, never rewritten), and the operator's allowance per period
    // (no row: not limited).
    "CREATE TABLE account_usage (
        user_id        INTEGER NOT NULL,
        period         TEXT    NOT NULL,             -- 2026-12, 2026-W49 or 2026-12-02 (UTC)
        sessions       INTEGER NOT NULL DEFAULT 0,
        session_ms     INTEGER NOT NULL DEFAULT 0,
        control_in     INTEGER NOT NULL DEFAULT 0,   -- bytes from the TV
        control_out    INTEGER NOT NULL DEFAULT 0,   -- bytes to the TV
        body_bytes     INTEGER NOT NULL DEFAULT 0,   -- message bodies
        relay_bytes    INTEGER NOT NULL DEFAULT 0,   -- media through the TURN relay
        first_at       TEXT    NOT NULL,
        last_at        TEXT    NOT NULL,
        PRIMARY KEY (user_id, period)
     );
     CREATE TABLE account_allowance (
        user_id          INTEGER PRIMARY KEY,
        bytes_per_period INTEGER NOT NULL CHECK (bytes_per_period >= 0),
        set_at           TEXT    NOT NULL
     );",
    // 6: presence (issue 16): each TV's address book (who may see its state), its "hide
    // my state", the phone numbers on file (operator-set: offline shows as mobile), and
    // the operator's alarms (open while cleared_at is NULL).
    "CREATE TABLE presence_contact (
        user_id        INTEGER NOT NULL,             -- the TV whose book it is
        contact_id     INTEGER NOT NULL,             -- who may see its state
        PRIMARY KEY (user_id, contact_id)
     ) WITHOUT ROWID;
     CREATE TABLE presence_setting (
        user_id        INTEGER PRIMARY KEY,
        hidden         INTEGER NOT NULL DEFAULT 0 CHECK (hidden IN (0, 1)),
        updated_at     TEXT    NOT NULL
     );
     CREATE TABLE user_phone (
        user_id        INTEGER PRIMARY KEY,
        phone          TEXT    NOT NULL,             -- E.164
        updated_at     TEXT    NOT NULL
     );
     CREATE TABLE operator_alarm (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id        INTEGER NOT NULL,
        raised_at      TEXT    NOT NULL,
        reason         TEXT    NOT NULL,
        count          INTEGER NOT NULL DEFAULT 0,
        cleared_at     TEXT
     );
     CREATE INDEX operator_alarm_open ON operator_alarm (id) WHERE cleared_at IS NULL;",
    // 7: messages (issue 15).
    messages::MIGRATION,
    // 8: each message's size as the quota counts it, in an index with its recipient, so
    // the quota check of an insert reads the index alone.
    messages::QUOTA_MIGRATION,
];

/// The condition of a live call; written exactly as in the partial index `user_call_live`
/// so SQLite can use it.
macro_rules! live {
    () => {
        "ended_at IS NULL AND outcome IN ('ringing', 'answered')"
    };
}

/// The condition that makes a call "cached and undelivered": the missed-kinds rule
/// ([`MISSED_KINDS_SQL`]), written exactly as in the partial index `user_call_waiting` so
/// SQLite can use it (a test checks the index and the plans).
macro_rules! waiting {
    () => {
        concat!("delivered = 0 AND ", crate::storage::missed_kinds_sql!())
    };
}

/// A reply channel for one read.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A rusqlite failure as a [`StoreError`] (the SQLite mapping of the typed errors).
pub fn db_error(e: rusqlite::Error) -> StoreError {
    let text = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::Full(text),
        Some(ErrorCode::ConstraintViolation) => StoreError::Constraint(text),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt(text),
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::PermissionDenied,
        ) => StoreError::Unavailable(text),
        // SQLite reports ENOSPC on a write as SQLITE_FULL; an I/O error may still carry it.
        Some(ErrorCode::SystemIoFailure) if text.contains("No space left") => {
            StoreError::Full(text)
        }
        _ => StoreError::Other(text),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        db_error(e)
    }
}

/// A file-system failure as a [`StoreError`].
fn io_error(what: String, e: &std::io::Error) -> StoreError {
    let text = format!("{what}: {e}");
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::Full(text),
        _ => StoreError::Unavailable(text),
    }
}

/// Operations for the writer thread. Each write carries the [`Slot`] its result waits
/// in until its batch's fate is known; a batch may be applied twice (see
/// [`writer_loop`]), so applying a write only reads its data.
enum WriteJob {
    Register(Registration, Slot<RegisterResult>),
    Offline(UserId, u64, UnixMillis, Slot<()>),
    Insert(NewCall, Option<IdempotencyKey>, Slot<InsertResult>),
    Finish(CallEnd, UserId, Slot<u32>),
    Ack(UserId, Vec<CallId>, UnixMillis, Slot<u32>),
    StartEnrollment(NewEnrollment, Slot<EnrollmentState>),
    Usage(Vec<crate::accounting::UsageDelta>, Slot<()>),
    PresenceBook(UserId, Vec<UserId>, Slot<()>),
    PresenceHidden(UserId, bool, UnixMillis, Slot<()>),
    Alarm(NewAlarm, Slot<()>),
    InsertMessage(NewMessage, Quota, Slot<MessageInsert>),
    SettleMessages(
        UserId,
        Vec<MessageId>,
        Settle,
        UnixMillis,
        Slot<Vec<Settled>>,
    ),
    ExpireMessages(UnixMillis, usize, Slot<Vec<Settled>>),
    Close(oneshot::Sender<()>),
    /// Test only: writes a call row, then fails (a job that fails half-way).
    #[cfg(test)]
    FailAfterInsert(NewCall, Slot<()>),
}

/// One queued write's answer: where it goes, and the write's own result once applied.
struct Slot<T> {
    done: Completion<T>,
    result: Option<Result<T, StoreError>>,
}

impl<T> Slot<T> {
    fn new(done: Completion<T>) -> Slot<T> {
        Slot { done, result: None }
    }

    /// Keeps the write's own result; answers whether it succeeded (a copy of its error
    /// if not).
    fn set(&mut self, result: Result<T, StoreError>) -> Result<(), StoreError> {
        let status = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        };
        self.result = Some(result);
        status
    }

    /// Answers the caller: the batch's failure if it did not commit, else the write's
    /// own result.
    fn answer(self, batch: Option<&StoreError>) {
        self.done.complete(match batch {
            Some(e) => Err(e.clone()),
            None => self
                .result
                .unwrap_or_else(|| Err(StoreError::Other("the write was not applied".into()))),
        })
    }
}

impl WriteJob {
    /// Answers the job once its batch committed (`None`) or failed.
    fn answer(self, batch: Option<&StoreError>) {
        match self {
            WriteJob::Register(_, slot) => slot.answer(batch),
            WriteJob::Offline(.., slot) => slot.answer(batch),
            WriteJob::Insert(_, _, slot) => slot.answer(batch),
            WriteJob::Finish(.., slot) | WriteJob::Ack(.., slot) => slot.answer(batch),
            WriteJob::StartEnrollment(_, slot) => slot.answer(batch),
            WriteJob::Usage(_, slot)
            | WriteJob::PresenceBook(.., slot)
            | WriteJob::PresenceHidden(.., slot)
            | WriteJob::Alarm(_, slot) => slot.answer(batch),
            WriteJob::InsertMessage(.., slot) => slot.answer(batch),
            WriteJob::SettleMessages(.., slot) | WriteJob::ExpireMessages(.., slot) => {
                slot.answer(batch)
            }
            WriteJob::Close(_) => {}
            #[cfg(test)]
            WriteJob::FailAfterInsert(_, slot) => slot.answer(batch),
        }
    }
}

/// Operations for the reader threads.
enum ReadJob {
    Enrollment([u8; 32], UnixMillis, Reply<EnrollmentState>),
    Credential([u8; 32], Reply<Option<Credential>>),
    Revocations(i64, Reply<Vec<Revocation>>),
    Users(Vec<UserId>, Reply<Vec<UserRow>>),
    Cached(UserId, CallId, usize, Reply<Vec<CachedRow>>),
    Keyed(UserId, IdempotencyKey, UnixMillis, Reply<Option<KeyedCall>>),
    PresenceView(UserId, Vec<UserId>, Reply<Vec<PresenceRow>>),
    PresenceBook(UserId, Reply<PresenceBook>),
    Messages(MessageQuery, Reply<Vec<MessageRow>>),
    Mailbox(UserId, Reply<Mailbox>),
}

/// The SQLite-backed [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Queue to the writer thread.
    writes: Sender<WriteJob>,
    /// Queue to the reader threads; dropped (set to `None`) on close to stop them.
    reads: Mutex<Option<Sender<ReadJob>>>,
    /// Set once `close` starts; later calls fail fast with `Closed`.
    closed: AtomicBool,
    /// Ids in use when the store opened.
    watermarks: Watermarks,
    /// The writer and reader threads, joined on close.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Duration of each group commit, recorded by the writer thread.
    metrics: Arc<StoreMetrics>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies migrations, and repairs
    /// what a crash may have left: every user offline (no session survives a restart),
    /// ringing calls become missed, answered calls without an end are ended.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_error(format!("cannot create {}", dir.display()), &e))?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            if opts.sync_full { "FULL" } else { "NORMAL" },
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // A larger page cache keeps the writer's group commits short under bursts (a TV
        // fleet re-registering at once).
        conn.pragma_update(None, "cache_size", -65_536)?;
        migrate(&mut conn)?;
        let metrics = Arc::new(StoreMetrics::default());
        let reserve = Reserve::new(path, opts.reserve_bytes);
        // The WAL's size follows the disk's headroom (`WalPolicy`); the writer re-picks
        // it as the free space changes.
        let wal = wal_policy(reserve.free_bytes(), opts.wal_tight_below);
        apply_wal_policy(&conn, wal)?;
        if let Err(e) = reserve.hold() {
            metrics.set_full(true);
            tracing::error!(error = %e, "ALARM: the database's disk is full at start; new records are refused until space returns");
        }
        if let Err(StoreError::Full(e)) = repair(&conn) {
            // Even the start-up repair found no room: the reserve makes it.
            reserve.release();
            metrics.set_full(true);
            tracing::error!(error = %e, "ALARM: the database's disk is full at start; new records are refused until space returns");
            repair(&conn)?;
        }
        let watermarks = Watermarks {
            max_session_id: conn.query_row(
                "SELECT coalesce(max(session_id), 0) FROM user_property",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64,
            max_call_id: conn.query_row("SELECT coalesce(max(id), 0) FROM user_call", [], |r| {
                r.get::<_, i64>(0)
            })? as u64,
            max_revocation_seq: enroll::max_revocation(&conn)?,
            call_id_stride: 1,
            call_id_offset: 0,
        };

        let (wtx, wrx) = crossbeam_channel::unbounded();
        let (rtx, rrx) = crossbeam_channel::unbounded();
        let mut threads = Vec::new();
        let max_batch = opts.max_batch.max(1);
        let writer_metrics = Arc::clone(&metrics);
        threads.push(
            std::thread::Builder::new()
                .name("db-writer".into())
                .spawn(move || {
                    writer_loop(
                        conn,
                        wrx,
                        max_batch,
                        &writer_metrics,
                        reserve,
                        (wal, opts.wal_tight_below),
                    )
                })
                .map_err(|e| StoreError::Other(format!("cannot start writer thread: {e}")))?,
        );
        for i in 0..opts.readers.max(1) {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            let rx = rrx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("db-reader-{i}"))
                    .spawn(move || reader_loop(conn, rx))
                    .map_err(|e| StoreError::Other(format!("cannot start reader thread: {e}")))?,
            );
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writes: wtx,
                reads: Mutex::new(Some(rtx)),
                closed: AtomicBool::new(false),
                watermarks,
                threads: Mutex::new(threads),
                metrics,
            }),
        })
    }

    /// Queues a write now (so writes apply in the order they were issued) and returns
    /// its [`Pending`] commit.
    fn write<T>(&self, make: impl FnOnce(Slot<T>) -> WriteJob) -> Pending<T> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Pending::ready(Err(StoreError::Closed));
        }
        let (done, pending) = Pending::queued();
        // A send fails only once the writer has stopped; the job (and with it `done`)
        // is dropped then, which completes `pending` with `Closed`.
        let _ = self.inner.writes.send(make(Slot::new(done)));
        pending
    }

    async fn read<T>(&self, make: impl FnOnce(Reply<T>) -> ReadJob) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self.inner.reads.lock().map_err(|_| StoreError::Closed)?;
            let reads = guard.as_ref().ok_or(StoreError::Closed)?;
            reads.send(make(tx)).map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl Store for SqliteStore {
    fn watermarks(&self) -> Watermarks {
        self.inner.watermarks
    }

    fn register(&self, reg: Registration) -> Pending<RegisterResult> {
        self.write(move |tx| WriteJob::Register(reg, tx))
    }

    fn set_offline(&self, user_id: UserId, session_id: u64, at_ms: UnixMillis) -> Pending<()> {
        self.write(move |tx| WriteJob::Offline(user_id, session_id, at_ms, tx))
    }

    async fn users(&self, ids: Vec<UserId>) -> Result<Vec<UserRow>, StoreError> {
        self.read(|tx| ReadJob::Users(ids, tx)).await
    }

    fn insert_keyed_call(
        &self,
        call: NewCall,
        key: Option<IdempotencyKey>,
    ) -> Pending<InsertResult> {
        if self.inner.metrics.is_full() {
            return Pending::ready(Err(full_refusal()));
        }
        self.write(move |tx| WriteJob::Insert(call, key, tx))
    }

    async fn keyed_call(
        &self,
        caller: UserId,
        key: IdempotencyKey,
        now_ms: UnixMillis,
    ) -> Result<Option<KeyedCall>, StoreError> {
        self.read(|tx| ReadJob::Keyed(caller, key, now_ms, tx))
            .await
    }

    fn finish_call(&self, end: CallEnd, callee: UserId) -> Pending<u32> {
        self.write(move |tx| WriteJob::Finish(end, callee, tx))
    }

    async fn cached_calls(
        &self,
        callee: UserId,
        after: CallId,
        limit: usize,
    ) -> Result<Vec<CachedRow>, StoreError> {
        self.read(|tx| ReadJob::Cached(callee, after, limit, tx))
            .await
    }

    fn ack_cached(&self, callee: UserId, ids: Vec<CallId>, at_ms: UnixMillis) -> Pending<u32> {
        self.write(move |tx| WriteJob::Ack(callee, ids, at_ms, tx))
    }

    fn start_enrollment(&self, e: NewEnrollment) -> Pending<EnrollmentState> {
        self.write(move |slot| WriteJob::StartEnrollment(e, slot))
    }

    fn add_usage(&self, rows: Vec<crate::accounting::UsageDelta>) -> Pending<()> {
        self.write(move |slot| WriteJob::Usage(rows, slot))
    }

    async fn enrollment(
        &self,
        fingerprint: [u8; 32],
        now_ms: UnixMillis,
    ) -> Result<EnrollmentState, StoreError> {
        self.read(|tx| ReadJob::Enrollment(fingerprint, now_ms, tx))
            .await
    }

    async fn credential(&self, fingerprint: [u8; 32]) -> Result<Option<Credential>, StoreError> {
        self.read(|tx| ReadJob::Credential(fingerprint, tx)).await
    }

    async fn revocations_after(&self, seq: i64) -> Result<Vec<Revocation>, StoreError> {
        self.read(|tx| ReadJob::Revocations(seq, tx)).await
    }

    async fn presence_view(
        &self,
        watcher: UserId,
        users: Vec<UserId>,
    ) -> Result<Vec<PresenceRow>, StoreError> {
        let users = presence_list(users, "presence view")?;
        self.read(|tx| ReadJob::PresenceView(watcher, users, tx))
            .await
    }

    async fn presence_book(&self, user: UserId) -> Result<PresenceBook, StoreError> {
        self.read(|tx| ReadJob::PresenceBook(user, tx)).await
    }

    fn set_presence_book(&self, user: UserId, contacts: Vec<UserId>) -> Pending<()> {
        match presence_list(contacts, "address book") {
            Ok(contacts) => self.write(move |slot| WriteJob::PresenceBook(user, contacts, slot)),
            Err(e) => Pending::ready(Err(e)),
        }
    }

    fn set_presence_hidden(&self, user: UserId, hidden: bool) -> Pending<()> {
        let at = crate::clock::now_ms();
        self.write(move |slot| WriteJob::PresenceHidden(user, hidden, at, slot))
    }

    fn raise_alarm(&self, alarm: NewAlarm) -> Pending<()> {
        self.write(move |slot| WriteJob::Alarm(alarm, slot))
    }

    fn insert_message(&self, m: NewMessage, quota: Quota) -> Pending<MessageInsert> {
        self.write(move |slot| WriteJob::InsertMessage(m, quota, slot))
    }

    fn settle_messages(
        &self,
        recipient: UserId,
        ids: Vec<MessageId>,
        settle: Settle,
        at_ms: UnixMillis,
    ) -> Pending<Vec<Settled>> {
        self.write(move |slot| WriteJob::SettleMessages(recipient, ids, settle, at_ms, slot))
    }

    fn expire_messages(&self, before_ms: UnixMillis, limit: usize) -> Pending<Vec<Settled>> {
        self.write(move |slot| WriteJob::ExpireMessages(before_ms, limit, slot))
    }

    async fn messages(&self, q: MessageQuery) -> Result<Vec<MessageRow>, StoreError> {
        self.read(|tx| ReadJob::Messages(q, tx)).await
    }

    async fn mailbox(&self, recipient: UserId) -> Result<Mailbox, StoreError> {
        self.read(|tx| ReadJob::Mailbox(recipient, tx)).await
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.writes.send(WriteJob::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Ok(mut reads) = self.inner.reads.lock() {
            reads.take();
        }
        let threads = match self.inner.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => Vec::new(),
        };
        // Joining blocks; the threads are finishing already, so this is short.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Creates (and migrates) the database at `path` by opening a store on it and letting it
/// go: for the tools that fill a database before a server starts (benchmarks).
pub fn create_schema(path: &Path) -> Result<(), StoreError> {
    drop(SqliteStore::open(
        path,
        SqliteOptions {
            sync_full: false,
            readers: 1,
            max_batch: 1,
            reserve_bytes: 0,
            wal_tight_below: WAL_TIGHT_BELOW_BYTES,
        },
    )?);
    Ok(())
}

/// What a crash may have left, repaired at start-up in one transaction: every user
/// offline (no session survives a restart), ringing calls missed, answered calls
/// without an end ended.
fn repair(conn: &Connection) -> Result<(), StoreError> {
    let now = to_db_text(crate::clock::now_ms());
    let tx = Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "UPDATE user_property SET user_netstate = 0, last_seen = ?1 WHERE user_netstate = 1",
        [&now],
    )?;
    tx.execute(
        concat!(
            "UPDATE user_call SET outcome = 'missed', ended_at = ?1 WHERE ",
            live!(),
            " AND outcome = 'ringing'"
        ),
        [&now],
    )?;
    tx.execute(
        concat!(
            "UPDATE user_call SET ended_at = ?1 WHERE ",
            live!(),
            " AND outcome = 'answered'"
        ),
        [&now],
    )?;
    tx.commit()?;
    Ok(())
}

/// The WAL policy for a disk with `free` bytes free (unknown counts as short).
fn wal_policy(free: Option<u64>, tight_below: u64) -> WalPolicy {
    match free {
        Some(free) if free >= tight_below => WAL_ROOMY,
        _ => WAL_TIGHT,
    }
}

fn apply_wal_policy(conn: &Connection, wal: WalPolicy) -> Result<(), StoreError> {
    conn.pragma_update(None, "wal_autocheckpoint", wal.checkpoint_pages)?;
    conn.pragma_update(None, "journal_size_limit", wal.size_limit)?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Other(format!(
            "database schema version {applied} is newer than this server ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}

/// How often a store whose disk is full looks for free space again.
const FULL_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// What a new record is refused with while the disk is full.
fn full_refusal() -> StoreError {
    StoreError::Full("the disk is full: new records are refused until space returns".into())
}

/// The writer thread: takes everything queued (up to `max_batch`), applies it in one
/// transaction, commits, answers each write.
///
/// A full disk is a state, not a crash: the first batch that fails for lack of space
/// turns the store full ([`StoreMetrics::set_full`]), releases the [`Reserve`] and is
/// applied again with new call records refused, so registrations, offline marks, call
/// ends and acknowledgements still commit into the reserve's space. While full, new
/// records are refused ([`StoreError::Full`]) and the writer looks for free space every
/// [`FULL_RECHECK`]; once there is room for the reserve and a margin, it takes the
/// reserve back and the store is no longer full.
fn writer_loop(
    mut conn: Connection,
    jobs: Receiver<WriteJob>,
    max_batch: usize,
    metrics: &StoreMetrics,
    reserve: Reserve,
    (mut wal, wal_tight_below): (WalPolicy, u64),
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut last_check = Instant::now();
    let mut last_wal_check = Instant::now();
    loop {
        if last_wal_check.elapsed() >= WAL_POLICY_RECHECK {
            last_wal_check = Instant::now();
            let now = wal_policy(reserve.free_bytes(), wal_tight_below);
            if now != wal {
                match apply_wal_policy(&conn, now) {
                    Ok(()) => {
                        tracing::info!(
                            checkpoint_pages = now.checkpoint_pages,
                            size_limit = now.size_limit,
                            "WAL policy follows the free disk space"
                        );
                        wal = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot change the WAL policy"),
                }
            }
        }
        let first = if metrics.is_full() {
            match jobs.recv_timeout(FULL_RECHECK) {
                Ok(job) => Some(job),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        };
        if metrics.is_full() && last_check.elapsed() >= FULL_RECHECK {
            last_check = Instant::now();
            if reserve.room_returned() && reserve.hold().is_ok() {
                metrics.set_full(false);
                tracing::warn!("the disk has room again: new records are accepted");
            }
        }
        let Some(first) = first else { continue };
        let mut close = None;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                WriteJob::Close(ack) => close = Some(ack),
                job => batch.push(job),
            }
            if batch.len() < max_batch {
                next = jobs.try_recv().ok();
            }
        }
        let started = Instant::now();
        let mut result = run_batch(&mut conn, &mut batch, metrics.is_full());
        if matches!(result, Err(StoreError::Full(_))) && !metrics.is_full() {
            metrics.set_full(true);
            last_check = Instant::now();
            reserve.release();
            tracing::error!(
                reserve = %reserve.path().display(),
                "ALARM: the database's disk is full; new records are refused, state \
                 changes go on in the released reserve; free space to recover"
            );
            result = run_batch(&mut conn, &mut batch, true);
        }
        metrics.committed(started.elapsed());
        let err = result.err();
        if let Some(e) = &err {
            tracing::error!(error = %e, writes = batch.len(), "group commit failed; writes not acknowledged");
        }
        for job in batch.drain(..) {
            job.answer(err.as_ref());
        }
        if let Some(ack) = close {
            // A clean shutdown leaves no log to replay and no disk held by it: the WAL is
            // copied into the database and truncated to nothing.
            match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
                Ok(0) => {}
                Ok(_) => tracing::warn!("WAL checkpoint at close was blocked by a reader"),
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint at close failed"),
            }
            let _ = ack.send(());
            return;
        }
    }
}

/// Applies `batch` in one transaction, each write in its own savepoint, and commits.
/// A write that fails is rolled back to its savepoint: only it fails. An error returned
/// here (the transaction itself failed) fails every write of the batch. With `full`,
/// new call records are refused without touching the database; without it, a write
/// that fails for lack of space fails the batch (the caller then applies it again
/// with `full`).
fn run_batch(conn: &mut Connection, batch: &mut [WriteJob], full: bool) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db_error)?;
    for job in batch.iter_mut() {
        tx.prepare_cached("SAVEPOINT job")
            .and_then(|mut s| s.execute([]))
            .map_err(db_error)?;
        let status = apply(&tx, job, full);
        if let Err(e @ StoreError::Full(_)) = &status {
            if !full {
                return Err(e.clone());
            }
        }
        let end = if status.is_ok() {
            tx.prepare_cached("RELEASE job")
                .and_then(|mut s| s.execute([]))
        } else {
            tx.prepare_cached("ROLLBACK TO job")
                .and_then(|mut s| s.execute([]))
                .and_then(|_| tx.prepare_cached("RELEASE job"))
                .and_then(|mut s| s.execute([]))
        };
        // The transaction's state is unknown after a failed savepoint step: dropping it
        // rolls it back, and every write of the batch fails.
        end.map_err(db_error)?;
    }
    tx.commit()?;
    Ok(())
}

/// Applies one write inside the batch's transaction, keeping its result in its slot;
/// answers whether it succeeded.
fn apply(tx: &Transaction<'_>, job: &mut WriteJob, full: bool) -> Result<(), StoreError> {
    match job {
        WriteJob::Register(reg, slot) => slot.set(register(tx, reg)),
        WriteJob::Offline(user, session, at, slot) => {
            let r = tx
                .prepare_cached(
                    "UPDATE user_property SET user_netstate = 0, last_seen = ?3
                     WHERE user_id = ?1 AND session_id = ?2",
                )
                .and_then(|mut s| {
                    s.execute(params![*user as i64, *session as i64, to_db_text(*at)])
                })
                .map(|_| ())
                .map_err(db_error);
            slot.set(r)
        }
        WriteJob::Insert(_, _, slot) if full => slot.set(Err(full_refusal())),
        WriteJob::Insert(call, key, slot) => slot.set(insert_call(tx, call, *key)),
        WriteJob::Finish(end, callee, slot) => slot.set(finish_call(tx, end, *callee)),
        WriteJob::Ack(callee, ids, at, slot) => slot.set(ack(tx, *callee, ids, *at)),
        WriteJob::StartEnrollment(e, slot) => slot.set(enroll::start(tx, e)),
        WriteJob::Usage(rows, slot) => slot.set(usage::add(tx, rows)),
        WriteJob::PresenceBook(user, contacts, slot) => {
            slot.set(presence::set_book(tx, *user, contacts))
        }
        WriteJob::PresenceHidden(user, hidden, at, slot) => {
            slot.set(presence::set_hidden(tx, *user, *hidden, *at))
        }
        WriteJob::Alarm(alarm, slot) => slot.set(presence::raise(tx, alarm)),
        WriteJob::InsertMessage(.., slot) if full => slot.set(Err(full_refusal())),
        WriteJob::InsertMessage(m, quota, slot) => slot.set(messages::insert(tx, m, *quota)),
        WriteJob::SettleMessages(recipient, ids, settle, at, slot) => {
            slot.set(messages::settle(tx, *recipient, ids, *settle, *at))
        }
        WriteJob::ExpireMessages(before, limit, slot) => {
            slot.set(messages::expire(tx, *before, *limit))
        }
        WriteJob::Close(_) => Ok(()),
        #[cfg(test)]
        WriteJob::FailAfterInsert(call, slot) => {
            let r = insert_call(tx, call, None)
                .and_then(|_| Err(StoreError::Other("injected failure".into())));
            slot.set(r)
        }
    }
}

fn ip_text(ip: IpAddr) -> String {
    ip.to_canonical().to_string()
}

fn register(tx: &Transaction<'_>, reg: &Registration) -> Result<RegisterResult, StoreError> {
    let now = to_db_text(reg.at_ms);
    let user = reg.user_id as i64;
    let changed = if reg.create_unknown {
        tx.prepare_cached(
            "INSERT INTO user_property
               (user_id, user_ip, user_netstate, media_port, session_id, agent_version,
                created_at, last_seen)
             VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (user_id) DO UPDATE SET
               user_ip = excluded.user_ip, user_netstate = 1, media_port = excluded.media_port,
               session_id = excluded.session_id, agent_version = excluded.agent_version,
               last_seen = excluded.last_seen
             WHERE excluded.session_id > user_property.session_id",
        )?
        .execute(params![
            user,
            ip_text(reg.ip),
            reg.media_port,
            reg.session_id as i64,
            reg.agent_version,
            now
        ])?
    } else {
        tx.prepare_cached(
            "UPDATE user_property SET user_ip = ?2, user_netstate = 1, media_port = ?3,
               session_id = ?4, agent_version = ?5, last_seen = ?6
             WHERE user_id = ?1 AND session_id < ?4",
        )?
        .execute(params![
            user,
            ip_text(reg.ip),
            reg.media_port,
            reg.session_id as i64,
            reg.agent_version,
            now
        ])?
    };
    if changed == 0 {
        let exists = tx
            .prepare_cached("SELECT 1 FROM user_property WHERE user_id = ?1")?
            .query_row([user], |_| Ok(()))
            .optional()?
            .is_some();
        return Ok(if exists {
            RegisterResult::Superseded
        } else {
            RegisterResult::UnknownUser
        });
    }
    Ok(RegisterResult::Online {
        cached_waiting: waiting_count(tx, reg.user_id)?,
    })
}

/// Undelivered missed calls of one callee (`?1`).
const WAITING_COUNT_SQL: &str = concat!(
    "SELECT count(*) FROM user_call WHERE otheruser_id = ?1 AND ",
    waiting!()
);

/// A page of one callee's (`?1`) undelivered missed calls after id `?2`, at most `?3`.
const CACHED_PAGE_SQL: &str = concat!(
    "SELECT c.id, c.user_id, c.call_date, c.outcome, p.user_netstate
     FROM user_call c LEFT JOIN user_property p ON p.user_id = c.user_id
     WHERE c.otheruser_id = ?1 AND c.id > ?2 AND ",
    waiting!(),
    " ORDER BY c.id LIMIT ?3"
);

fn waiting_count(conn: &Connection, callee: UserId) -> Result<u32, StoreError> {
    let n: i64 = conn
        .prepare_cached(WAITING_COUNT_SQL)?
        .query_row([callee as i64], |r| r.get(0))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The key as stored: the same 64 bits, as SQLite's signed integer.
fn key_value(key: IdempotencyKey) -> i64 {
    i64::from_ne_bytes(key.to_ne_bytes())
}

/// The call `caller` recorded under `key`, with when it was placed, whatever its age.
fn keyed_row(
    conn: &Connection,
    caller: UserId,
    key: IdempotencyKey,
) -> Result<Option<KeyedCall>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT id, otheruser_id, outcome, call_date FROM user_call
             WHERE user_id = ?1 AND idem_key = ?2",
        )?
        .query_row(params![caller as i64, key_value(key)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })
        .optional()?;
    let Some((id, callee, outcome, date)) = row else {
        return Ok(None);
    };
    let outcome = Outcome::parse(&outcome)
        .ok_or_else(|| StoreError::Corrupt(format!("call {id} has outcome {outcome:?}")))?;
    let at_ms = from_db_text(&date)
        .ok_or_else(|| StoreError::Corrupt(format!("call {id} has call_date {date:?}")))?;
    Ok(Some(KeyedCall {
        id: id as CallId,
        callee: callee as UserId,
        outcome,
        at_ms,
    }))
}

/// Whether a key recorded at `at_ms` still counts at `now_ms`.
fn key_alive(at_ms: UnixMillis, now_ms: UnixMillis) -> bool {
    now_ms.saturating_sub(at_ms) < KEY_LIFETIME_MS
}

fn keyed_call(
    conn: &Connection,
    caller: UserId,
    key: IdempotencyKey,
    now_ms: UnixMillis,
) -> Result<Option<KeyedCall>, StoreError> {
    Ok(keyed_row(conn, caller, key)?.filter(|c| key_alive(c.at_ms, now_ms)))
}

fn insert_call(
    tx: &Transaction<'_>,
    call: &NewCall,
    key: Option<IdempotencyKey>,
) -> Result<InsertResult, StoreError> {
    if let Some(key) = key {
        match keyed_row(tx, call.caller, key)? {
            Some(first) if key_alive(first.at_ms, call.at_ms) => {
                return Ok(InsertResult::AlreadyRecorded(first));
            }
            // Expired: the old call gives the key up (the unique index allows one).
            Some(old) => {
                tx.prepare_cached("UPDATE user_call SET idem_key = NULL WHERE id = ?1")?
                    .execute([old.id as i64])?;
            }
            None => {}
        }
    }
    let n = tx
        .prepare_cached(
            "INSERT INTO user_call
               (id, user_id, otheruser_id, call_date, outcome, caller_ip, idem_key)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
             WHERE EXISTS (SELECT 1 FROM user_property WHERE user_id = ?3)",
        )?
        .execute(params![
            call.id as i64,
            call.caller as i64,
            call.callee as i64,
            to_db_text(call.at_ms),
            call.outcome.as_str(),
            ip_text(call.caller_ip),
            key.map(key_value),
        ])?;
    if n == 0 {
        return Ok(InsertResult::UnknownCallee);
    }
    let callee_waiting = if call.outcome.is_missed_kind() {
        waiting_count(tx, call.callee)?
    } else {
        0
    };
    Ok(InsertResult::Recorded { callee_waiting })
}

fn finish_call(tx: &Transaction<'_>, end: &CallEnd, callee: UserId) -> Result<u32, StoreError> {
    // Answered and rejected calls were seen by the callee: they are delivered. Missed
    // kinds stay undelivered until the callee's TV acknowledges them.
    let delivered = !end.outcome.is_missed_kind();
    tx.prepare_cached(
        "UPDATE user_call SET outcome = ?2,
           answered_at = coalesce(?3, answered_at),
           ended_at = coalesce(?4, ended_at),
           delivered = ?5,
           delivered_at = CASE WHEN ?5 = 1 THEN coalesce(delivered_at, ?6) ELSE NULL END
         WHERE id = ?1",
    )?
    .execute(params![
        end.id as i64,
        end.outcome.as_str(),
        end.answered_at_ms.map(to_db_text),
        end.ended_at_ms.map(to_db_text),
        delivered as i64,
        to_db_text(end.at_ms),
    ])?;
    if end.outcome.is_missed_kind() {
        waiting_count(tx, callee)
    } else {
        Ok(0)
    }
}

fn ack(
    tx: &Transaction<'_>,
    callee: UserId,
    ids: &[CallId],
    at: UnixMillis,
) -> Result<u32, StoreError> {
    let at = to_db_text(at);
    let mut stmt = tx.prepare_cached(concat!(
        "UPDATE user_call SET delivered = 1, delivered_at = ?3
         WHERE id = ?2 AND otheruser_id = ?1 AND ",
        waiting!()
    ))?;
    let mut count = 0u32;
    for id in ids {
        let Ok(id) = i64::try_from(*id) else { continue };
        count = count.saturating_add(stmt.execute(params![callee as i64, id, at])? as u32);
    }
    Ok(count)
}

fn reader_loop(conn: Connection, jobs: Receiver<ReadJob>) {
    while let Ok(job) = jobs.recv() {
        match job {
            ReadJob::Users(ids, reply) => {
                let _ = reply.send(users(&conn, &ids));
            }
            ReadJob::Cached(callee, after, limit, reply) => {
                let _ = reply.send(cached(&conn, callee, after, limit));
            }
            ReadJob::Keyed(caller, key, now, reply) => {
                let _ = reply.send(keyed_call(&conn, caller, key, now));
            }
            ReadJob::Enrollment(fp, now, reply) => {
                let _ = reply.send(enroll::state(&conn, &fp, now));
            }
            ReadJob::Credential(fp, reply) => {
                let _ = reply.send(enroll::credential(&conn, &fp));
            }
            ReadJob::Revocations(after, reply) => {
                let _ = reply.send(enroll::revocations_after(&conn, after));
            }
            ReadJob::PresenceView(watcher, users, reply) => {
                let _ = reply.send(presence::view(&conn, watcher, &users));
            }
            ReadJob::PresenceBook(user, reply) => {
                let _ = reply.send(presence::book(&conn, user));
            }
            ReadJob::Messages(q, reply) => {
                let _ = reply.send(messages::read(&conn, q));
            }
            ReadJob::Mailbox(recipient, reply) => {
                let _ = reply.send(messages::mailbox(&conn, recipient));
            }
        }
    }
}

fn users(conn: &Connection, ids: &[UserId]) -> Result<Vec<UserRow>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT user_netstate, last_seen FROM user_property WHERE user_id = ?1")?;
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let Ok(key) = i64::try_from(id) else { continue };
        let row = stmt
            .query_row([key], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
            })
            .optional()?;
        if let Some((state, seen)) = row {
            out.push(UserRow {
                user_id: id,
                online: state == 1,
                last_seen_ms: seen.as_deref().and_then(from_db_text),
            });
        }
    }
    Ok(out)
}

fn cached(
    conn: &Connection,
    callee: UserId,
    after: CallId,
    limit: usize,
) -> Result<Vec<CachedRow>, StoreError> {
    let mut stmt = conn.prepare_cached(CACHED_PAGE_SQL)?;
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = stmt.query_map(
        params![
            callee as i64,
            after,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (id, caller, date, outcome, state) = row?;
        let outcome = Outcome::parse(&outcome).ok_or_else(|| {
            StoreError::Corrupt(format!("call {id} has unknown outcome {outcome:?}"))
        })?;
        out.push(CachedRow {
            id: id as u64,
            caller: caller as u64,
            callee,
            at_ms: from_db_text(&date).ok_or_else(|| {
                StoreError::Corrupt(format!("call {id} has bad call_date {date:?}"))
            })?,
            outcome,
            caller_online: state.map(|s| s == 1),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::storage::Store;

    fn call(id: CallId, callee: UserId, outcome: Outcome) -> NewCall {
        NewCall {
            id,
            caller: callee + 1,
            callee,
            at_ms: 1_700_000_000_000 + id as i64,
            outcome,
            caller_ip: [127, 0, 0, 1].into(),
        }
    }

    fn registration(user_id: UserId, session_id: u64) -> Registration {
        Registration {
            user_id,
            ip: [127, 0, 0, 1].into(),
            media_port: 5004,
            session_id,
            agent_version: "test".into(),
            at_ms: 1_700_000_000_000,
            create_unknown: true,
        }
    }

    #[tokio::test]
    async fn a_write_that_fails_half_way_is_rolled_back_alone_and_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.register(registration(1, 1)).await.unwrap();
        let commits_before = store.metrics().commit_count();
        // Hold the write lock so the writer waits in its next batch; the writes queued
        // meanwhile all go into the batch after it.
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = store.set_offline(1, 1, 1_700_000_000_001);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let a = store.insert_call(call(10, 1, Outcome::Cached));
        let b = store.write(|done| WriteJob::FailAfterInsert(call(11, 1, Outcome::Cached), done));
        let c = store.insert_call(call(12, 1, Outcome::Cached));
        let duplicate = store.insert_call(call(10, 1, Outcome::Missed));
        let d = store.ack_cached(1, vec![12], 1_700_000_000_002);
        raw.execute_batch("COMMIT").unwrap();
        first.await.unwrap();
        assert_eq!(a.await, Ok(InsertResult::Recorded { callee_waiting: 1 }));
        assert_eq!(b.await, Err(StoreError::Other("injected failure".into())));
        // Call 11's row, written before its job failed, is not counted: rolled back.
        assert_eq!(c.await, Ok(InsertResult::Recorded { callee_waiting: 2 }));
        assert!(
            matches!(duplicate.await, Err(StoreError::Constraint(_))),
            "a duplicate call id is a constraint error"
        );
        assert_eq!(d.await, Ok(1));
        // At most two commits: the held batch, then the rest together.
        let commits = store.metrics().commit_count() - commits_before;
        assert!((1..=2).contains(&commits), "{commits} commits");
        store.close().await;
        let rows: Vec<(i64, String, i64)> = raw
            .prepare("SELECT id, outcome, delivered FROM user_call ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![(10, "cached".into(), 0), (12, "cached".into(), 1)]
        );
    }

    #[tokio::test]
    async fn sqlite_failures_map_to_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        // Not a database file.
        let junk = dir.path().join("junk.sqlite");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        assert!(matches!(
            SqliteStore::open(&junk, SqliteOptions::default()).map(|_| ()),
            Err(StoreError::Corrupt(_))
        ));
        // A full disk: SQLite's own page limit stands in for it.
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path, SqliteOptions::default())
            .unwrap()
            .close()
            .await;
        let raw = Connection::open(&path).unwrap();
        let pages: i64 = raw
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        raw.pragma_update(None, "max_page_count", pages).unwrap();
        let full = raw
            .execute(
                "INSERT INTO user_property (user_id, agent_version, created_at) VALUES (1, ?1, 'x')",
                [vec![b'x'; 1 << 20]],
            )
            .map_err(db_error);
        assert!(matches!(full, Err(StoreError::Full(_))), "{full:?}");
        // A locked database is unavailable, not corrupt.
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(std::time::Duration::ZERO).unwrap();
        raw.execute_batch("BEGIN IMMEDIATE").unwrap();
        let busy = other.execute_batch("BEGIN IMMEDIATE").map_err(db_error);
        assert!(matches!(busy, Err(StoreError::Unavailable(_))), "{busy:?}");
        // No such directory for the file.
        let missing = operator::OperatorDb::open(&dir.path().join("none/db.sqlite")).map(|_| ());
        assert!(matches!(missing, Err(StoreError::Unavailable(m)) if m.contains("no database")));
    }

    #[tokio::test]
    async fn the_waiting_index_and_its_queries_use_the_missed_kinds_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path, SqliteOptions::default())
            .unwrap()
            .close()
            .await;
        let raw = Connection::open(&path).unwrap();
        // The index (migration 1, whose text never changes) says what the rule says.
        let index: String = raw
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'user_call_waiting'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(index.contains(waiting!()), "{index}");
        assert!(waiting!().contains(MISSED_KINDS_SQL));
        // And the queries that count and page missed calls are answered from it.
        let page_args = [1, 0, 10];
        for (sql, args) in [
            (WAITING_COUNT_SQL, &page_args[..1]),
            (CACHED_PAGE_SQL, &page_args[..]),
        ] {
            let plan: Vec<String> = raw
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(rusqlite::params_from_iter(args), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().any(|p| p.contains("user_call_waiting")),
                "{sql}: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn opening_after_a_crash_ends_live_calls_and_sets_everyone_offline_without_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path, SqliteOptions::default())
            .unwrap()
            .close()
            .await;
        // What a crash leaves: a TV online, a call ringing, one answered and not ended.
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "INSERT INTO user_property (user_id, user_netstate, created_at) VALUES (1, 1, 'x');
             INSERT INTO user_call (id, user_id, otheruser_id, call_date, outcome)
                VALUES (1, 1, 2, 'd1', 'ringing');
             INSERT INTO user_call (id, user_id, otheruser_id, call_date, outcome, answered_at)
                VALUES (2, 1, 2, 'd2', 'answered', 'a2');
             INSERT INTO user_call (id, user_id, otheruser_id, call_date, outcome, answered_at, ended_at)
                VALUES (3, 1, 2, 'd3', 'answered', 'a3', 'e3');
             INSERT INTO user_call (id, user_id, otheruser_id, call_date, outcome)
                VALUES (4, 1, 2, 'd4', 'cached');",
        )
        .unwrap();
        drop(raw);
        SqliteStore::open(&path, SqliteOptions::default())
            .unwrap()
            .close()
            .await;
        let raw = Connection::open(&path).unwrap();
        let calls: Vec<(i64, String, bool)> = raw
            .prepare("SELECT id, outcome, ended_at IS NOT NULL FROM user_call ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            calls,
            vec![
                (1, "missed".into(), true),
                (2, "answered".into(), true),
                (3, "answered".into(), true),
                (4, "cached".into(), false),
            ]
        );
        let state: i64 = raw
            .query_row("SELECT user_netstate FROM user_property", [], |r| r.get(0))
            .unwrap();
        assert_eq!(state, 0);
        // The repair finds live calls through their partial index, not by reading the
        // whole call log (which takes seconds at 10 million calls).
        for outcome in ["ringing", "answered"] {
            let plan: String = raw
                .query_row(
                    &format!(
                        "EXPLAIN QUERY PLAN UPDATE user_call SET ended_at = 1 WHERE {} AND outcome = '{outcome}'",
                        live!()
                    ),
                    [],
                    |r| r.get(3),
                )
                .unwrap();
            assert!(plan.contains("user_call_live"), "{plan}");
        }
    }

    #[tokio::test]
    async fn the_wal_stays_small_under_a_long_run_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        // A disk short of space (every disk is, with this threshold).
        let store = SqliteStore::open(
            &path,
            SqliteOptions {
                sync_full: false,
                wal_tight_below: u64::MAX,
                ..SqliteOptions::default()
            },
        )
        .unwrap();
        // 6,000 commits of a few pages each: ~70 MB went through the WAL, which a
        // checkpoint every 10,000 pages (`WAL_ROOMY`) lets grow to 25 MB.
        let wal = dir.path().join("db.sqlite-wal");
        let mut largest = 0;
        for i in 1..=6_000u64 {
            store.register(registration(i, i)).await.unwrap();
            if i % 500 == 0 {
                largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap());
            }
        }
        let limit = WAL_TIGHT.size_limit as u64 + (1 << 20);
        assert!(
            largest <= limit,
            "WAL grew to {largest} bytes (limit {limit})"
        );
        assert!(largest > 0);
        store.close().await;
    }

    #[tokio::test]
    async fn a_clean_close_checkpoints_and_truncates_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        for i in 1..=50u64 {
            store
                .register(crate::storage::Registration {
                    user_id: i,
                    ip: [127, 0, 0, 1].into(),
                    media_port: 5004,
                    session_id: i,
                    agent_version: "test".into(),
                    at_ms: 1,
                    create_unknown: true,
                })
                .await
                .unwrap();
        }
        // An operator's read-only connection stays open across the shutdown (as the
        // admin listener's do): closing the store is then not the last close, which
        // alone would have folded the WAL away.
        let operator = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let users: i64 = operator
            .query_row("SELECT count(*) FROM user_property", [], |r| r.get(0))
            .unwrap();
        assert_eq!(users, 50);
        let wal = dir.path().join("db.sqlite-wal");
        let before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert!(before > 0, "the writes went to the WAL first");
        store.close().await;
        let after = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert_eq!(
            after, 0,
            "WAL of {before} bytes left {after} bytes after close"
        );
        // And what it held is in the database.
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(store.watermarks().max_session_id, 50);
        store.close().await;
    }
}
