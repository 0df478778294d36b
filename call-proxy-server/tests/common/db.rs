//! The database a test server runs on, of the backend the test run asks for: a SQLite
//! file in the test's directory, or (with `CALL_PROXY_TEST_BACKEND=postgres`) a fresh
//! database of its own in the PostgreSQL cluster `scripts/pg-cluster.sh` started
//! (`CALL_PROXY_TEST_PG`, `CALL_PROXY_TEST_PG_PASSWORD_FILE`). Also a synchronous way to
//! look into it with SQL both backends understand (results as text), for assertions.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use call_proxy_server::storage::{DbTarget, StorageBackend};
use call_proxy_server::Config;

/// The cluster's URL (its `postgres` database), when a cluster was started.
pub const PG_URL_ENV: &str = "CALL_PROXY_TEST_PG";
/// The cluster's password file.
pub const PG_PASSWORD_ENV: &str = "CALL_PROXY_TEST_PG_PASSWORD_FILE";
/// Which backend test servers use: `sqlite` (default) or `postgres`.
pub const BACKEND_ENV: &str = "CALL_PROXY_TEST_BACKEND";
/// Set (by `scripts/test.sh`): a test that needs PostgreSQL fails rather than skips
/// when no cluster is there.
pub const REQUIRE_PG_ENV: &str = "CALL_PROXY_TEST_REQUIRE_PG";

/// The PostgreSQL cluster of this test run: its URL and password file, or `None` (the
/// caller skips, unless [`REQUIRE_PG_ENV`] is set: then it panics).
pub fn pg_cluster() -> Option<(String, PathBuf)> {
    match (std::env::var(PG_URL_ENV), std::env::var(PG_PASSWORD_ENV)) {
        (Ok(url), Ok(pw)) if !url.is_empty() => Some((url, PathBuf::from(pw))),
        _ => {
            assert!(
                std::env::var_os(REQUIRE_PG_ENV).is_none(),
                "{REQUIRE_PG_ENV} is set but no PostgreSQL cluster is given ({PG_URL_ENV})"
            );
            None
        }
    }
}

/// Whether this run's test servers use PostgreSQL.
pub fn use_postgres() -> bool {
    std::env::var(BACKEND_ENV).is_ok_and(|b| b == "postgres")
}

/// `PGPASSWORD` set to the password in `file`.
fn password_env(file: &Path) -> Vec<(String, String)> {
    vec![(
        "PGPASSWORD".into(),
        std::fs::read_to_string(file).unwrap().trim().to_string(),
    )]
}

/// The environment operator CLIs of this run need for the test databases (the
/// PostgreSQL password, when the run uses PostgreSQL).
pub fn cli_env() -> Vec<(String, String)> {
    match pg_cluster().filter(|_| use_postgres()) {
        Some((_, pw)) => password_env(&pw),
        None => Vec::new(),
    }
}

/// A test server's database.
pub enum TestDb {
    /// A SQLite file; its directory also keeps the server's TLS files.
    Sqlite { path: PathBuf },
    /// A database of its own in the test cluster; `dir` keeps the server's TLS files.
    Postgres {
        url: String,
        password_file: PathBuf,
        dir: PathBuf,
        name: String,
        probe: PgProbe,
        /// This handle made the database (and drops it).
        owner: bool,
    },
}

impl TestDb {
    /// A fresh database named after `name` for a server keeping its files in `dir`: of
    /// the backend this test run uses.
    pub fn new(dir: &Path, name: &str) -> TestDb {
        if use_postgres() {
            let (url, password_file) =
                pg_cluster().expect("CALL_PROXY_TEST_BACKEND=postgres needs CALL_PROXY_TEST_PG");
            Self::postgres(dir, name, &url, &password_file)
        } else {
            TestDb::Sqlite {
                path: dir.join(format!("{name}.sqlite")),
            }
        }
    }

    /// A SQLite file in `dir`, whatever backend the run uses (tests of SQLite itself).
    pub fn sqlite(dir: &Path, name: &str) -> TestDb {
        TestDb::Sqlite {
            path: dir.join(format!("{name}.sqlite")),
        }
    }

    /// A fresh database in the cluster at `cluster_url`.
    pub fn postgres(dir: &Path, name: &str, cluster_url: &str, password_file: &Path) -> TestDb {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let db_name = format!(
            "t_{}_{}_{}",
            name.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(20)
                .collect::<String>()
                .to_ascii_lowercase(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let admin = PgProbe::connect(cluster_url, password_file);
        admin.execute(&format!("CREATE DATABASE {db_name}"));
        drop(admin);
        let url = match cluster_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db_name}"),
            None => panic!("cluster URL without a database: {cluster_url}"),
        };
        let probe = PgProbe::connect(&url, password_file);
        TestDb::Postgres {
            url,
            password_file: password_file.to_path_buf(),
            dir: dir.to_path_buf(),
            name: db_name,
            probe,
            owner: true,
        }
    }

    /// Another handle on the same PostgreSQL database (for a second node), keeping its
    /// files in `dir`; the first handle still owns the database.
    pub fn same_postgres(&self, dir: &Path) -> TestDb {
        match self {
            TestDb::Postgres {
                url,
                password_file,
                name,
                ..
            } => TestDb::Postgres {
                url: url.clone(),
                password_file: password_file.clone(),
                dir: dir.to_path_buf(),
                name: name.clone(),
                probe: PgProbe::connect(url, password_file),
                owner: false,
            },
            TestDb::Sqlite { .. } => panic!("several nodes need PostgreSQL"),
        }
    }

    /// Which backend.
    pub fn backend(&self) -> StorageBackend {
        match self {
            TestDb::Sqlite { .. } => StorageBackend::Sqlite,
            TestDb::Postgres { .. } => StorageBackend::Postgres,
        }
    }

    /// The directory the server keeps its own files in (`tls/`).
    pub fn dir(&self) -> PathBuf {
        match self {
            TestDb::Sqlite { path } => path.parent().unwrap().to_path_buf(),
            TestDb::Postgres { dir, .. } => dir.clone(),
        }
    }

    /// The SQLite file (tests of SQLite itself).
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            TestDb::Sqlite { path } => Some(path),
            TestDb::Postgres { .. } => None,
        }
    }

    /// The server's CA certificate, made at its first start.
    pub fn ca_path(&self) -> PathBuf {
        self.dir().join("tls").join("ca.crt")
    }

    /// Points `config` at this database (and its TLS files at [`TestDb::dir`]).
    pub fn configure(&self, config: &mut Config) {
        match self {
            TestDb::Sqlite { path } => {
                config.backend = StorageBackend::Sqlite;
                config.db = Some(path.clone());
                config.db_url = None;
            }
            TestDb::Postgres {
                url,
                password_file,
                dir,
                ..
            } => {
                config.backend = StorageBackend::Postgres;
                config.db = None;
                config.db_url = Some(url.clone());
                config.db_password_file = Some(password_file.clone());
                config.data_dir = dir.clone();
                // Message bodies beside the test's files (SQLite keeps them beside its
                // database by default).
                config.body_dir = Some(dir.join("bodies"));
            }
        }
    }

    /// Where the database is, as the server's factories take it.
    pub fn target(&self) -> DbTarget {
        let mut config = Config::default();
        self.configure(&mut config);
        DbTarget::of(&config).expect("database target")
    }

    /// The operator CLI's flags for this database (`--db …`).
    pub fn cli_args(&self) -> Vec<String> {
        match self {
            TestDb::Sqlite { path } => vec!["--db".into(), path.to_str().unwrap().into()],
            TestDb::Postgres {
                url, password_file, ..
            } => vec![
                "--db".into(),
                url.clone(),
                "--db-password-file".into(),
                password_file.to_str().unwrap().into(),
            ],
        }
    }

    /// What `--db` says for this database: its file, or its URL (the password then
    /// comes from [`TestDb::cli_env`]).
    pub fn db_arg(&self) -> String {
        match self {
            TestDb::Sqlite { path } => path.to_str().unwrap().into(),
            TestDb::Postgres { url, .. } => url.clone(),
        }
    }

    /// The environment an operator CLI needs beside `--db` [`TestDb::db_arg`]: the
    /// PostgreSQL password in `PGPASSWORD`, as an operator's shell would have it.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        match self {
            TestDb::Sqlite { .. } => Vec::new(),
            TestDb::Postgres { password_file, .. } => password_env(password_file),
        }
    }

    /// `serve`'s flags for this database (and, for PostgreSQL, `--data-dir` for its TLS
    /// files).
    pub fn serve_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.cli_args().into_iter().map(OsString::from).collect();
        if let TestDb::Postgres { dir, .. } = self {
            args.push("--data-dir".into());
            args.push(dir.clone().into_os_string());
        }
        args
    }

    /// The rows of `sql` (SQL both backends read alike), each column as text (`None`:
    /// NULL). Panics if the query fails.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.try_rows(sql)
            .unwrap_or_else(|e| panic!("query {sql:?}: {e}"))
    }

    /// The rows of `sql`, or why the query failed (a database still being created).
    pub fn try_rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        match self {
            TestDb::Sqlite { path } => sqlite_rows(path, sql),
            TestDb::Postgres { probe, .. } => probe.rows(sql),
        }
    }

    /// The first row of `sql`, if any (and the query worked).
    pub fn row(&self, sql: &str) -> Option<Vec<Option<String>>> {
        self.try_rows(sql).ok()?.into_iter().next()
    }

    /// The single number `sql` answers.
    pub fn count(&self, sql: &str) -> i64 {
        let rows = self.rows(sql);
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{sql:?} answered {rows:?}"))
    }

    /// Runs a statement that changes rows.
    pub fn execute(&self, sql: &str) {
        match self {
            TestDb::Sqlite { path } => {
                let conn = rusqlite::Connection::open(path).expect("open the database");
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql:?}: {e}"));
            }
            TestDb::Postgres { probe, .. } => probe.execute(sql),
        }
    }

    /// A byte string as an SQL literal of this backend.
    pub fn bytes_literal(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match self {
            TestDb::Sqlite { .. } => format!("X'{hex}'"),
            TestDb::Postgres { .. } => format!("'\\x{hex}'::bytea"),
        }
    }

    /// A time (ms since the epoch) as an SQL literal of this backend's time columns.
    pub fn time_literal(&self, ms: i64) -> String {
        match self {
            TestDb::Sqlite { .. } => format!("'{}'", call_proxy_server::clock::to_db_text(ms)),
            TestDb::Postgres { .. } => format!("tvcall_ts({ms})"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres {
            name, owner: true, ..
        } = self
        {
            // Best effort: the cluster is thrown away after the run anyway.
            if let Some((url, pw)) = pg_cluster() {
                let admin = PgProbe::connect(&url, &pw);
                let _ = admin.rows(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

/// A SQLite file's rows as text.
fn sqlite_rows(path: &Path, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    use rusqlite::types::ValueRef;
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Null => None,
                        ValueRef::Integer(v) => Some(v.to_string()),
                        ValueRef::Real(v) => Some(v.to_string()),
                        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                        ValueRef::Blob(b) => Some(b.iter().map(|x| format!("{x:02x}")).collect()),
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

type Answer = Result<Vec<Vec<Option<String>>>, String>;

/// One PostgreSQL connection on a thread (and runtime) of its own, so tests can query it
/// synchronously from anywhere, async tests included.
pub struct PgProbe {
    requests: Option<mpsc::Sender<(String, mpsc::Sender<Answer>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PgProbe {
    /// Connects to `url` with the password in `password_file`.
    pub fn connect(url: &str, password_file: &Path) -> PgProbe {
        let mut config: tokio_postgres::Config = url.parse().expect("PostgreSQL URL");
        let password = std::fs::read_to_string(password_file).expect("password file");
        config.password(password.trim());
        let (tx, rx) = mpsc::channel::<(String, mpsc::Sender<Answer>)>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (client, conn) = match rt.block_on(config.connect(tokio_postgres::NoTls)) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            // The connection runs while a query is being answered (`block_on` below).
            rt.spawn(conn);
            let _ = ready_tx.send(Ok(()));
            while let Ok((sql, reply)) = rx.recv() {
                let answer = rt
                    .block_on(client.simple_query(&sql))
                    .map_err(|e| match e.as_db_error() {
                        Some(db) => db.message().to_string(),
                        None => e.to_string(),
                    })
                    .map(|msgs| {
                        msgs.into_iter()
                            .filter_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                                    (0..r.len()).map(|i| r.get(i).map(str::to_string)).collect(),
                                ),
                                _ => None,
                            })
                            .collect()
                    });
                let _ = reply.send(answer);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the probe connects in time")
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        PgProbe {
            requests: Some(tx),
            thread: Some(thread),
        }
    }

    /// The rows of `sql` as text.
    pub fn rows(&self, sql: &str) -> Answer {
        let (tx, rx) = mpsc::channel();
        self.requests
            .as_ref()
            .unwrap()
            .send((sql.to_string(), tx))
            .map_err(|_| "probe stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("no answer to {sql:?} in 30 s"))?
    }

    /// Runs `sql`, panicking if it fails.
    pub fn execute(&self, sql: &str) {
        self.rows(sql).unwrap_or_else(|e| panic!("{sql:?}: {e}"));
    }
}

impl Drop for PgProbe {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
