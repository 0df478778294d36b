//! The `call-proxy-server` command: `serve` runs the daemon (with the admin listener if
//! asked); `dispatch` runs the distribution service in front of several nodes; `calls`, `users` and `stats` are the operator CLI, on the database file
//! (`--db`) or through a running server's admin API (`--admin URL`); `approve`, `refuse`, `revoke`
//! and `enrollments` manage enrolled TVs on the database file (also while the server
//! runs), `usage` and `allowance` traffic accounting, `phone` the numbers on file and
//! `alarms` / `clear-alarm` the operator's alarms.

use std::path::PathBuf;

use anyhow::Context;
use call_proxy_server::admin::client::{AdminClient, AdminClientError};
use call_proxy_server::admin::{self, api, AdminOptions};
use call_proxy_server::storage::operator::{CallQuery, MessageLogQuery, OperatorStore};
use call_proxy_server::storage::{self, AnyOperator, DbTarget};
use call_proxy_server::{bind, run, Config, Shared};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Call-proxy server for network TVs: presence, call set-up and the offline call cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Run the distribution service: TVs at power-on get a live node and a signed
    /// temporary token for it (PostgreSQL only; nodes are given its public key).
    Dispatch(Box<DispatchArgs>),
    /// The call log, newest first, filtered (from the database file, which works while
    /// the server runs and when it is down, or from a running server with --admin).
    Calls(CallsArgs),
    /// The message log, newest first: who left what kind of message for whom, its size
    /// and whether it was taken; never its text or body (from the database or --admin).
    Messages(MessagesArgs),
    /// Users with their state, IP, media port and last-seen time.
    Users {
        #[command(flatten)]
        source: Source,
        /// Only TVs online now.
        #[arg(long)]
        online: bool,
        /// Most rows.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Output: table (people), json or csv (scripts).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Service statistics: TVs online, calls per hour/day, cached calls waiting, delivery delay.
    Stats {
        #[command(flatten)]
        source: Source,
        /// Output: table (people), json or csv (scripts).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Approves the enrollment code a TV shows, making that TV user ID's.
    Approve {
        #[command(flatten)]
        db: DbArg,
        /// The code on the TV's screen (e.g. BCDF-GHJK; any case, dash optional).
        #[arg(long)]
        code: String,
        /// The user number the TV gets.
        #[arg(long)]
        user: u64,
        /// The user has an enrolled TV already: revoke it (a replaced TV).
        #[arg(long)]
        replace: bool,
    },
    /// Refuses the enrollment code a TV shows: the TV is told, and the code can no
    /// longer be approved.
    Refuse {
        #[command(flatten)]
        db: DbArg,
        /// The code on the TV's screen.
        #[arg(long)]
        code: String,
    },
    /// Withdraws user ID's TV credential; its live session ends within a second.
    Revoke {
        #[command(flatten)]
        db: DbArg,
        /// The user whose TV is revoked.
        #[arg(long)]
        user: u64,
    },
    /// Traffic accounting: each account's usage per period, newest period first, with
    /// its allowance and what is left of it.
    Usage {
        #[command(flatten)]
        db: DbArg,
        /// One account only.
        #[arg(long)]
        user: Option<u64>,
        /// One period only: 2026-12 (month), 2026-W49 (week) or 2026-12-02 (day).
        #[arg(long)]
        period: Option<String>,
        /// Most rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Output: table (people), json or csv (scripts).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Sets an account's traffic allowance per period: once what it used reaches it
    /// (less `allowance_threshold_bytes`), the dispatcher assigns its TV no node.
    Allowance {
        #[command(flatten)]
        db: DbArg,
        /// The account.
        #[arg(long)]
        user: u64,
        /// The allowance per period, in bytes.
        #[arg(long, conflicts_with_all = ["mb", "unlimited"])]
        bytes: Option<u64>,
        /// The allowance per period, in MiB.
        #[arg(long, conflicts_with = "unlimited")]
        mb: Option<u64>,
        /// No allowance: the account is not limited.
        #[arg(long)]
        unlimited: bool,
    },
    /// Sets or clears the phone number on file for user ID (E.164, e.g. +4930123456):
    /// while that TV is off, its contacts see it as reachable by mobile.
    Phone {
        #[command(flatten)]
        db: DbArg,
        /// The user.
        #[arg(long)]
        user: u64,
        /// The number: a + then 8 to 15 digits, country code first.
        #[arg(long, conflicts_with = "clear", required_unless_present = "clear")]
        number: Option<String>,
        /// No number on file any more.
        #[arg(long)]
        clear: bool,
    },
    /// The operator's alarms (a TV signed out after repeated failed presence
    /// notifications, …), newest first: open ones unless --all.
    Alarms {
        #[command(flatten)]
        db: DbArg,
        /// Cleared alarms too.
        #[arg(long)]
        all: bool,
        /// JSON (scripts) rather than a table.
        #[arg(long)]
        json: bool,
        /// Most rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Clears an open alarm (it stays listed with --all).
    ClearAlarm {
        #[command(flatten)]
        db: DbArg,
        /// The alarm's id (from `alarms`).
        #[arg(long)]
        id: u64,
    },
    /// Enrollment requests, newest first (pending, approved, refused, expired).
    Enrollments {
        #[command(flatten)]
        db: DbArg,
        /// Most rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Output: table (people), json or csv (scripts).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// The server's database, for the operator commands that work on it directly.
#[derive(clap::Args)]
struct DbArg {
    /// The server's database: its SQLite file, or a postgres://USER@HOST:PORT/DB URL
    /// (password from --db-password-file or $PGPASSWORD) [default: data/call-proxy.sqlite].
    #[arg(long)]
    db: Option<PathBuf>,
    /// File whose first line is the PostgreSQL password.
    #[arg(long)]
    db_password_file: Option<PathBuf>,
}

impl DbArg {
    /// Where the database is.
    fn target(self) -> anyhow::Result<DbTarget> {
        db_target(self.db, self.db_password_file)
    }
}

/// The database a `--db` (file or URL) and `--db-password-file` name.
fn db_target(db: Option<PathBuf>, password_file: Option<PathBuf>) -> anyhow::Result<DbTarget> {
    let mut config = Config::default();
    if let Some(db) = db {
        config.set_db(&db);
    }
    config.db_password_file = password_file;
    Ok(DbTarget::of(&config)?)
}

/// Where operator queries are answered: the database or a running server.
#[derive(clap::Args)]
struct Source {
    /// The server's database: its SQLite file, or a postgres://USER@HOST:PORT/DB URL
    /// (password from --db-password-file or $PGPASSWORD) [default: data/call-proxy.sqlite].
    #[arg(long, conflicts_with = "admin")]
    db: Option<PathBuf>,
    /// File whose first line is the PostgreSQL password.
    #[arg(long, conflicts_with = "admin")]
    db_password_file: Option<PathBuf>,
    /// A running server's admin API instead of the file, e.g. http://127.0.0.1:7680.
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// The admin API's bearer token [default: $CALL_PROXY_ADMIN_TOKEN].
    #[arg(long, requires = "admin")]
    token: Option<String>,
}

/// An operator query source, opened.
enum Backend {
    /// The database, read-only, through the storage backend's operator reads (run to
    /// completion on a runtime of their own).
    Db(AnyOperator, tokio::runtime::Runtime),
    /// A running server's admin API.
    Admin(AdminClient),
}

/// A mistake in the command line or its filters: exit code 2, like clap's own errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

impl Source {
    fn open(self) -> anyhow::Result<Backend> {
        let Some(url) = self.admin else {
            let target = db_target(self.db, self.db_password_file)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            return Ok(Backend::Db(storage::open_operator(&target, 1), runtime));
        };
        let token = match self.token {
            Some(t) => t,
            None => std::env::var(admin::TOKEN_ENV).map_err(|_| {
                UsageError(format!("--admin needs --token or {}", admin::TOKEN_ENV))
            })?,
        };
        Ok(Backend::Admin(AdminClient::new(&url, token)))
    }
}

impl Backend {
    fn calls(&self, q: &CallQuery) -> anyhow::Result<Vec<api::Call>> {
        Ok(match self {
            Backend::Db(db, rt) => rt
                .block_on(db.calls(q.clone()))?
                .into_iter()
                .map(api::Call::from)
                .collect(),
            Backend::Admin(c) => c.calls(q)?.calls,
        })
    }

    fn messages(&self, q: &MessageLogQuery) -> anyhow::Result<Vec<api::Message>> {
        Ok(match self {
            Backend::Db(db, rt) => rt
                .block_on(db.messages(q.clone()))?
                .into_iter()
                .map(api::Message::from)
                .collect(),
            Backend::Admin(c) => c.messages(q)?.messages,
        })
    }

    fn users(&self, online: bool, limit: usize) -> anyhow::Result<Vec<api::User>> {
        Ok(match self {
            Backend::Db(db, rt) => rt
                .block_on(db.users(online, limit))?
                .into_iter()
                .map(api::User::from)
                .collect(),
            Backend::Admin(c) => c.users(online, limit)?.users,
        })
    }

    fn stats(&self) -> anyhow::Result<api::Stats> {
        Ok(match self {
            Backend::Db(db, rt) => rt
                .block_on(db.stats(call_proxy_server::clock::now_ms()))?
                .into(),
            Backend::Admin(c) => c.stats()?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(clap::Args)]
struct CallsArgs {
    #[command(flatten)]
    source: Source,
    /// Calls with this user on either side.
    #[arg(long)]
    user: Option<u64>,
    /// Calls placed by this user.
    #[arg(long)]
    caller: Option<u64>,
    /// Calls to this user.
    #[arg(long)]
    callee: Option<u64>,
    /// Placed at or after this time (RFC 3339).
    #[arg(long, value_parser = call_proxy_server::clock::parse_rfc3339_ms)]
    since: Option<i64>,
    /// Placed before this time (RFC 3339).
    #[arg(long, value_parser = call_proxy_server::clock::parse_rfc3339_ms)]
    until: Option<i64>,
    /// answered, missed, rejected, busy, cached, undelivered (cached-undelivered) or delivered.
    #[arg(long)]
    outcome: Option<call_proxy_server::storage::operator::OutcomeFilter>,
    /// Page size (1..=10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=10000))]
    limit: u16,
    /// Next page: only calls older than this call id (the last id of the previous page).
    #[arg(long)]
    before: Option<u64>,
    /// Output: table (people), json or csv (scripts).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::Args)]
struct MessagesArgs {
    #[command(flatten)]
    source: Source,
    /// Messages with this user on either side.
    #[arg(long)]
    user: Option<u64>,
    /// Messages left by this user.
    #[arg(long)]
    sender: Option<u64>,
    /// Messages left for this user.
    #[arg(long)]
    recipient: Option<u64>,
    /// text, voice, picture or video.
    #[arg(long, value_parser = call_proxy_server::admin::api::message_kind)]
    kind: Option<u8>,
    /// waiting (not yet taken by the TV) or delivered.
    #[arg(long, value_parser = call_proxy_server::admin::api::message_state)]
    state: Option<bool>,
    /// Page size (1..=10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=10000))]
    limit: u16,
    /// Next page: only messages older than this id (the last id of the previous page).
    #[arg(long)]
    before: Option<u64>,
    /// Output: table (people), json or csv (scripts).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    base: BaseArgs,
    /// This node's unique name among the nodes sharing a PostgreSQL database
    /// [default: node-1].
    #[arg(long)]
    node_id: Option<String>,
    /// This node's slot, 0-63, unique among the nodes of one database [default: 0].
    #[arg(long)]
    node_slot: Option<u8>,
    /// Address TVs reach this node at, host:port, for the dispatcher [default: the
    /// bound listen address].
    #[arg(long)]
    advertise: Option<String>,
    /// The dispatcher's public key file (`<key>.pub`): only TVs with its token register.
    #[arg(long)]
    dispatch_public_key_file: Option<PathBuf>,
    /// Ring timeout in milliseconds [default: 30000].
    #[arg(long)]
    ring_timeout_ms: Option<u64>,
    /// Heartbeat interval told to TVs, in milliseconds [default: 30000].
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Most simultaneous TV connections [default: 200000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Sustained requests per second allowed per TV connection [default: 20].
    #[arg(long)]
    requests_per_sec: Option<u32>,
    /// Burst of requests allowed per TV connection [default: 100].
    #[arg(long)]
    request_burst: Option<u32>,
    /// Descriptors kept free beyond those open at start [default: 128].
    #[arg(long)]
    fd_reserve: Option<usize>,
    /// Most connections not registered yet, in total [default: 10000].
    #[arg(long)]
    max_unregistered: Option<usize>,
    /// Most connections not registered yet from one source address [default: 1024].
    #[arg(long)]
    max_unregistered_per_ip: Option<usize>,
    /// Most registered connections from one source address, 0 = no limit [default: 8192].
    #[arg(long)]
    max_per_ip: Option<usize>,
    /// Time from accept to a complete registration, in milliseconds [default: 5000].
    #[arg(long)]
    handshake_timeout_ms: Option<u64>,
    /// Only registered (provisioned) users may register; unknown ids are refused.
    #[arg(long)]
    provisioned_only: bool,
    /// Commit without syncing to disk: survives a crash of the server, not of the machine.
    #[arg(long)]
    no_sync: bool,
    /// Admin HTTP listener (health, readiness, metrics, operator API), e.g.
    /// 127.0.0.1:7680 [default: off]. Needs a token.
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// File holding the admin bearer token [default: $CALL_PROXY_ADMIN_TOKEN].
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Plain TCP on the control port, for lab use only: nothing encrypted, TVs not
    /// authenticated. The default is TLS 1.3 with enrolled TVs only.
    #[arg(long)]
    insecure_plaintext: bool,
    /// A STUN server TVs gather their outside address from, stun:HOST:PORT (repeatable).
    #[arg(long = "stun-url")]
    stun_urls: Vec<String>,
    /// A TURN server (coturn with use-auth-secret) TVs may relay through,
    /// turn:HOST:PORT[?transport=udp|tcp] (repeatable). Needs --turn-secret-file.
    #[arg(long = "turn-url")]
    turn_urls: Vec<String>,
    /// File whose first line is coturn's static-auth-secret.
    #[arg(long)]
    turn_secret_file: Option<PathBuf>,
    /// Answer STUN Binding requests on this UDP address [default: off].
    #[arg(long)]
    stun_listen: Option<std::net::SocketAddr>,
}

/// The flags `serve` and `dispatch` share: the config file, the listener, the database,
/// the data directory and the TLS certificate.
#[derive(clap::Args)]
struct BaseArgs {
    /// TOML config file (the same format for nodes and the dispatcher); flags given here
    /// win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// TCP listener address (TLS unless a node is --insecure-plaintext) [default: 0.0.0.0:7600].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The database: a SQLite file [default: <data-dir>/call-proxy.sqlite], or a
    /// postgres://USER@HOST:PORT/DB URL (no password in it; the dispatcher needs one).
    #[arg(long)]
    db: Option<PathBuf>,
    /// File whose first line is the PostgreSQL password [default: $PGPASSWORD].
    #[arg(long)]
    db_password_file: Option<PathBuf>,
    /// Data directory (database, TLS files, the dispatcher's key) [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The certificate chain (PEM) [default: the one made in <db dir>/tls].
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A name or address TVs reach this server by, for the certificate it makes
    /// (repeatable) [default: localhost, 127.0.0.1, ::1].
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
}

impl BaseArgs {
    /// The config file (or the defaults) with these flags over it.
    fn config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.db {
            config.set_db(&v);
        }
        if let Some(v) = self.db_password_file {
            config.db_password_file = Some(v);
        }
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        if let Some(v) = self.tls_cert {
            config.tls_cert = Some(v);
        }
        if let Some(v) = self.tls_key {
            config.tls_key = Some(v);
        }
        if !self.tls_names.is_empty() {
            config.tls_names = self.tls_names;
        }
        Ok(config)
    }
}

#[derive(clap::Args)]
struct DispatchArgs {
    #[command(flatten)]
    base: BaseArgs,
    /// The token signing key (PKCS#8), made if absent, its public key written to
    /// `<file>.pub` [default: <data-dir>/dispatch.key].
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// How long a token admits a registration, in seconds [default: 600].
    #[arg(long)]
    token_ttl_s: Option<u64>,
    /// A node silent for this long is not assigned, in milliseconds [default: 5000].
    #[arg(long)]
    node_lease_ms: Option<u64>,
}

fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("call-proxy-server: {e:#}");
            let usage = e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<AdminClientError>()
                    .is_some_and(AdminClientError::is_bad_request);
            std::process::ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn run_cli() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Dispatch(args) => dispatch(*args),
        Command::Calls(args) => calls(args),
        Command::Messages(a) => {
            let rows = a.source.open()?.messages(&MessageLogQuery {
                sender: a.sender,
                recipient: a.recipient,
                party: a.user,
                kind: a.kind,
                delivered: a.state,
                before: a.before,
                limit: usize::from(a.limit),
            })?;
            print_rows(&rows, a.format)
        }
        Command::Users {
            source,
            online,
            limit,
            format,
        } => print_rows(&source.open()?.users(online, limit)?, format),
        Command::Stats { source, format } => print_rows(&[source.open()?.stats()?], format),
        Command::Approve {
            db,
            code,
            user,
            replace,
        } => approve(db, &code, user, replace),
        Command::Refuse { db, code } => refuse(db, &code),
        Command::Revoke { db, user } => revoke(db, user),
        Command::Usage {
            db,
            user,
            period,
            limit,
            format,
        } => {
            let (ops, rt) = operator_db(db)?;
            let rows =
                rt.block_on(ops.usage(call_proxy_server::storage::operator::UsageQuery {
                    user,
                    period,
                    limit: limit.min(call_proxy_server::storage::operator::MAX_PAGE),
                }))?;
            print_rows(&rows, format)
        }
        Command::Allowance {
            db,
            user,
            bytes,
            mb,
            unlimited,
        } => allowance(db, user, bytes, mb, unlimited),
        Command::Phone {
            db,
            user,
            number,
            clear: _,
        } => phone(db, user, number),
        Command::Alarms {
            db,
            all,
            json,
            limit,
        } => {
            let (ops, rt) = operator_db(db)?;
            let rows: Vec<api::Alarm> = rt
                .block_on(ops.alarms(
                    all,
                    limit.min(call_proxy_server::storage::operator::MAX_PAGE),
                ))?
                .into_iter()
                .map(api::Alarm::from)
                .collect();
            print_rows(&rows, if json { Format::Json } else { Format::Table })
        }
        Command::ClearAlarm { db, id } => {
            let (ops, rt) = operator_db(db)?;
            if rt.block_on(ops.clear_alarm(id, call_proxy_server::clock::now_ms()))? {
                println!("{}", serde_json::json!({ "cleared": id }));
                Ok(())
            } else {
                anyhow::bail!("no open alarm {id} (unknown, or cleared already)")
            }
        }
        Command::Enrollments { db, limit, format } => {
            let (ops, rt) = operator_db(db)?;
            let rows = rt.block_on(ops.enrollments(call_proxy_server::clock::now_ms(), limit))?;
            print_rows(&rows, format)
        }
    }
}

/// The operator store on the database, and a runtime to run it on.
fn operator_db(db: DbArg) -> anyhow::Result<(AnyOperator, tokio::runtime::Runtime)> {
    let target = db.target()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok((storage::open_operator(&target, 1), runtime))
}

fn approve(db: DbArg, code: &str, user: u64, replace: bool) -> anyhow::Result<()> {
    use call_proxy_server::storage::enroll::{display_code, normalise_code, Approval};
    let Some(stored) = normalise_code(code) else {
        return Err(UsageError(format!(
            "{code:?} is not an enrollment code (8 letters like BCDF-GHJK)"
        ))
        .into());
    };
    if !shared_proto::valid_user_id(user) {
        return Err(UsageError(format!("user {user} is out of range")).into());
    }
    let (ops, rt) = operator_db(db)?;
    let shown = display_code(&stored);
    match rt.block_on(ops.approve(stored, user, replace, call_proxy_server::clock::now_ms()))? {
        Approval::Approved { user, replaced } => {
            println!(
                "{}",
                serde_json::json!({"approved": shown, "user": user, "replaced": replaced})
            );
            Ok(())
        }
        Approval::UnknownCode => anyhow::bail!("no enrollment has the code {shown}"),
        Approval::Expired => anyhow::bail!("the code {shown} has expired: the TV must ask again"),
        Approval::AlreadyDecided => anyhow::bail!("the code {shown} was approved or refused already"),
        Approval::UserHasTv => anyhow::bail!(
            "user {user} has an enrolled TV already: add --replace to replace it (the old one is revoked)"
        ),
    }
}

fn refuse(db: DbArg, code: &str) -> anyhow::Result<()> {
    use call_proxy_server::storage::enroll::{display_code, normalise_code, Refusal};
    let Some(stored) = normalise_code(code) else {
        return Err(UsageError(format!(
            "{code:?} is not an enrollment code (8 letters like BCDF-GHJK)"
        ))
        .into());
    };
    let (ops, rt) = operator_db(db)?;
    let shown = display_code(&stored);
    match rt.block_on(ops.refuse(stored, call_proxy_server::clock::now_ms()))? {
        Refusal::Refused => {
            println!("{}", serde_json::json!({ "refused": shown }));
            Ok(())
        }
        Refusal::UnknownCode => anyhow::bail!("no enrollment has the code {shown}"),
        Refusal::Expired => anyhow::bail!("the code {shown} has expired already"),
        Refusal::AlreadyDecided => {
            anyhow::bail!("the code {shown} was approved or refused already")
        }
    }
}

fn allowance(
    db: DbArg,
    user: u64,
    bytes: Option<u64>,
    mb: Option<u64>,
    unlimited: bool,
) -> anyhow::Result<()> {
    if !shared_proto::valid_user_id(user) {
        return Err(UsageError(format!("user {user} is out of range")).into());
    }
    let limit = match (bytes, mb, unlimited) {
        (Some(b), None, false) => Some(b),
        (None, Some(m), false) => Some(
            m.checked_mul(1 << 20)
                .ok_or_else(|| UsageError(format!("--mb {m} is too large")))?,
        ),
        (None, None, true) => None,
        _ => {
            return Err(
                UsageError("say the allowance: --bytes N, --mb N or --unlimited".into()).into(),
            )
        }
    };
    let (ops, rt) = operator_db(db)?;
    rt.block_on(ops.set_allowance(user, limit, call_proxy_server::clock::now_ms()))?;
    println!("{}", serde_json::json!({"user": user, "allowance": limit}));
    Ok(())
}

fn phone(db: DbArg, user: u64, number: Option<String>) -> anyhow::Result<()> {
    if !shared_proto::valid_user_id(user) {
        return Err(UsageError(format!("user {user} is out of range")).into());
    }
    if let Some(n) = &number {
        api::check_phone(n).map_err(UsageError)?;
    }
    let (ops, rt) = operator_db(db)?;
    if rt.block_on(ops.set_phone(user, number.clone(), call_proxy_server::clock::now_ms()))? {
        println!("{}", serde_json::json!({ "user": user, "phone": number }));
        Ok(())
    } else {
        anyhow::bail!("no user {user}")
    }
}

fn revoke(db: DbArg, user: u64) -> anyhow::Result<()> {
    let (ops, rt) = operator_db(db)?;
    if rt.block_on(ops.revoke(user, call_proxy_server::clock::now_ms()))? {
        println!("{}", serde_json::json!({"revoked": user}));
        Ok(())
    } else {
        anyhow::bail!("user {user} has no enrolled TV")
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.base.config()?;
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(v) = args.node_slot {
        config.node_slot = v;
    }
    if let Some(v) = args.advertise {
        config.advertise = Some(v);
    }
    if let Some(v) = args.dispatch_public_key_file {
        config.dispatch_public_key_file = Some(v);
    }
    if let Some(v) = args.ring_timeout_ms {
        config.ring_timeout_ms = v;
    }
    if let Some(v) = args.heartbeat_interval_ms {
        config.heartbeat_interval_ms = v;
    }
    if let Some(v) = args.max_connections {
        config.max_connections = v;
    }
    if let Some(v) = args.requests_per_sec {
        config.requests_per_sec = v;
    }
    if let Some(v) = args.request_burst {
        config.request_burst = v;
    }
    if let Some(v) = args.fd_reserve {
        config.fd_reserve = v;
    }
    if let Some(v) = args.max_unregistered {
        config.max_unregistered = v;
    }
    if let Some(v) = args.max_unregistered_per_ip {
        config.max_unregistered_per_ip = v;
    }
    if let Some(v) = args.max_per_ip {
        config.max_per_ip = v;
    }
    if let Some(v) = args.handshake_timeout_ms {
        config.handshake_timeout_ms = v;
    }
    if args.provisioned_only {
        config.create_unknown_users = false;
    }
    if args.no_sync {
        config.sync_full = false;
    }
    if let Some(v) = args.admin_listen {
        config.admin_listen = Some(v);
    }
    if let Some(v) = args.admin_token_file {
        config.admin_token_file = Some(v);
    }
    if args.insecure_plaintext {
        config.insecure_plaintext = true;
    }
    if !args.stun_urls.is_empty() {
        config.stun_urls = args.stun_urls;
    }
    if !args.turn_urls.is_empty() {
        config.turn_urls = args.turn_urls;
    }
    if let Some(v) = args.turn_secret_file {
        config.turn_secret_file = Some(v);
    }
    if let Some(v) = args.stun_listen {
        config.stun_listen = Some(v);
    }
    config.validate()?;
    if let Some(path) = &config.dispatch_public_key_file {
        let key = call_proxy_server::dispatch::PublicKey::load(path)?;
        anyhow::ensure!(
            !config.insecure_plaintext,
            "dispatch_public_key_file needs TLS (the token is bound to the TV's certificate)"
        );
        tracing::info!(key = %key.hex(), "registrations need a dispatcher's token");
        config.dispatch_public_key = Some(key);
    }
    // Refuse to start an admin listener that nobody could authenticate to.
    let admin_token = match config.admin_listen {
        Some(_) => Some(admin::load_token(config.admin_token_file.as_deref())?),
        None => None,
    };
    match call_proxy_server::server::limits::raise_fd_limit() {
        Ok((soft, hard)) => tracing::info!(max_open_files = soft, hard, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the file descriptor limit"),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let db = DbTarget::of(&config)?;
        let store = storage::open(&config)
            .await
            .with_context(|| format!("cannot open database {db} ({})", config.backend))?;
        // TLS is set up (and the server's own CA written) before the port opens: a TV
        // that can connect can find the CA.
        let listen = config.listen;
        let shared = Shared::new(store, config).context("cannot set up the server")?;
        let config = &shared.config;
        let listener = bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
        if let DbTarget::Postgres(target) = &db {
            let bound = listener.local_addr()?;
            let addr = config.advertise.clone().unwrap_or_else(|| bound.to_string());
            if config.advertise.is_none() && bound.ip().is_unspecified() {
                tracing::warn!(%bound, "listening on a wildcard address without `advertise`: the dispatcher cannot send TVs to this node");
            }
            call_proxy_server::storage::postgres::dispatch::advertise(target, &config.node_id, &addr)
                .await
                .context("cannot record this node's address for the dispatcher")?;
        }
        let admin_listener = match (config.admin_listen, admin_token) {
            (Some(addr), Some(token)) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (admin)"))?;
                tracing::info!(admin_listen = %l.local_addr()?, "admin listener ready");
                Some((l, token))
            }
            _ => None,
        };
        tracing::info!(
            listen = %listener.local_addr()?,
            backend = %config.backend,
            db = %db,
            sync_full = config.sync_full,
            "call-proxy-server ready"
        );
        let admin = admin_listener.map(|(l, token)| {
            let opts = AdminOptions {
                token,
                db: db.clone(),
            };
            admin::spawn(l, std::sync::Arc::clone(&shared), opts)
        });
        run(listener, shared, shutdown_signal()).await;
        // The admin listener outlives the control server's drain, then stops too.
        if let Some(admin) = admin {
            admin.stop().await;
        }
        anyhow::Ok(())
    })
}

fn dispatch(args: DispatchArgs) -> anyhow::Result<()> {
    use call_proxy_server::dispatch::{Dispatcher, SigningKey};
    use call_proxy_server::storage::postgres::dispatch::PgDispatch;
    let mut config = args.base.config()?;
    if let Some(v) = args.key_file {
        config.dispatch_key_file = Some(v);
    }
    if let Some(v) = args.token_ttl_s {
        config.dispatch_token_ttl_s = v;
    }
    if let Some(v) = args.node_lease_ms {
        config.node_lease_ms = v;
    }
    config.validate()?;
    let DbTarget::Postgres(target) = DbTarget::of(&config)? else {
        return Err(UsageError(
            "the dispatcher needs the nodes' PostgreSQL database: --db postgres://USER@HOST:PORT/DB"
                .into(),
        )
        .into());
    };
    let key_file = config
        .dispatch_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("dispatch.key"));
    let key = SigningKey::load_or_create(&key_file)?;
    let files = call_proxy_server::tls::server_cert_files(
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        &config.tls_dir(),
        &config.tls_names,
    )?;
    let tls = call_proxy_server::dispatch::tls_acceptor(&files)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let dispatcher = std::sync::Arc::new(Dispatcher {
            db: PgDispatch::new(&target, config.db_pool_size)?,
            key,
            token_ttl: std::time::Duration::from_secs(config.dispatch_token_ttl_s),
            node_lease: std::time::Duration::from_millis(config.node_lease_ms),
            tls,
            period: config.accounting_period,
            allowance_threshold: config.allowance_threshold_bytes,
            tally: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            public_key = %dispatcher.key.public().hex(),
            public_key_file = %call_proxy_server::dispatch::public_key_path(&key_file).display(),
            "dispatcher ready"
        );
        call_proxy_server::dispatch::run(listener, dispatcher, shutdown_signal()).await;
        anyhow::Ok(())
    })
}

fn calls(a: CallsArgs) -> anyhow::Result<()> {
    let rows = a.source.open()?.calls(&CallQuery {
        caller: a.caller,
        callee: a.callee,
        party: a.user,
        since_ms: a.since,
        until_ms: a.until,
        outcome: a.outcome,
        before: a.before,
        limit: usize::from(a.limit),
    })?;
    print_rows(&rows, a.format)
}

/// Prints records as an aligned table, a JSON array or CSV with a header.
fn print_rows<T: serde::Serialize>(rows: &[T], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(std::io::stdout());
            for r in rows {
                w.serialize(r)?;
            }
            w.flush()?;
        }
        Format::Table => {
            let values: Vec<serde_json::Map<String, serde_json::Value>> = rows
                .iter()
                .filter_map(|r| match serde_json::to_value(r) {
                    Ok(serde_json::Value::Object(m)) => Some(m),
                    _ => None,
                })
                .collect();
            let Some(first) = values.first() else {
                println!("(none)");
                return Ok(());
            };
            let cols: Vec<&String> = first.keys().collect();
            let cell = |v: Option<&serde_json::Value>| match v {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Null) | None => "-".into(),
                Some(other) => other.to_string(),
            };
            let widths: Vec<usize> = cols
                .iter()
                .map(|c| {
                    values
                        .iter()
                        .map(|v| cell(v.get(*c)).len())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            println!("{}", line(cols.iter().map(|c| c.to_string()).collect()));
            for v in &values {
                println!("{}", line(cols.iter().map(|c| cell(v.get(*c))).collect()));
            }
        }
    }
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}
