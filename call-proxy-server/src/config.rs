//! Server settings: defaults that work with no configuration, a TOML file, and command
//! line flags that win over the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::storage::StorageBackend;

/// Everything the server can be told. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP control listener.
    pub listen: SocketAddr,
    /// Which database keeps the records: `"sqlite"` (the default, an embedded file) or
    /// `"postgres"` (with [`Config::db_url`]). Any other name is refused with a message
    /// naming it.
    pub backend: StorageBackend,
    /// Data directory; the database defaults to `<data_dir>/call-proxy.sqlite`.
    pub data_dir: PathBuf,
    /// The SQLite database file (overrides `data_dir`).
    pub db: Option<PathBuf>,
    /// The PostgreSQL database, `postgres://USER@HOST:PORT/DBNAME` (no password in it:
    /// see [`Config::db_password_file`]); for `backend = "postgres"`.
    pub db_url: Option<String>,
    /// File whose first line is the PostgreSQL password (else `$PGPASSWORD`, else none).
    pub db_password_file: Option<PathBuf>,
    /// PostgreSQL connections for reads (the writer has one more).
    pub db_pool_size: usize,
    /// This node's name among the nodes sharing one PostgreSQL database (unique; a node
    /// whose name is held by a live node refuses to start).
    pub node_id: String,
    /// This node's slot, 0 to 63, unique among the nodes of one database: its call ids
    /// are those equal to the slot modulo 64, so nodes never hand out the same one.
    pub node_slot: u8,
    /// The address TVs reach this node at, `host:port`, written into `tvcall_node` for
    /// the dispatcher (the host is the name TVs check the certificate for). Unset: the
    /// address the control listener is bound to (a wildcard address such as `0.0.0.0`
    /// then needs this set, or the dispatcher cannot send TVs here).
    pub advertise: Option<String>,
    /// The dispatcher's public key (the `<key>.pub` file it writes: 64 hex digits). Set:
    /// this node registers only TVs presenting a token the dispatcher signed for this
    /// node, this TV and this user, not expired. Unset: any enrolled TV (one node alone).
    pub dispatch_public_key_file: Option<PathBuf>,
    /// The key read from [`Config::dispatch_public_key_file`] at start (not a TOML key).
    #[serde(skip)]
    pub dispatch_public_key: Option<crate::dispatch::PublicKey>,
    /// The dispatcher's signing key (PKCS#8, DER or PEM), made on first start if
    /// absent, with its public key written beside it as `<file>.pub`
    /// [default: `<data_dir>/dispatch.key`]. For the `dispatch` role.
    pub dispatch_key_file: Option<PathBuf>,
    /// How long a dispatcher's token admits a registration, in seconds.
    pub dispatch_token_ttl_s: u64,
    /// A node that has not renewed its heartbeat in the database for this long is dead:
    /// another node marks its TVs offline and ends its calls, and its name and slot may
    /// be taken over.
    pub node_lease_ms: u64,
    /// `true`: every commit is synced to disk (survives power loss). `false`: survives a
    /// process crash only.
    pub sync_full: bool,
    /// Disk space (MiB) held in reserve beside the database and released when its disk
    /// fills, so registrations and offline marks still commit while new records are
    /// refused with `STORAGE_FULL` (0: no reserve).
    pub disk_reserve_mb: u64,
    /// How often a TV must send something (told to it at registration).
    pub heartbeat_interval_ms: u64,
    /// Heartbeat intervals of silence after which a TV is offline.
    pub heartbeat_misses: u32,
    /// Time from accept to a complete registration: a connection that has not
    /// registered by then is closed (`HANDSHAKE_TIMEOUT`). Genuine TVs register within
    /// milliseconds; silent connections hold a descriptor for at most this long.
    pub handshake_timeout_ms: u64,
    /// How long an unanswered call rings before it is missed.
    pub ring_timeout_ms: u64,
    /// Most simultaneous control connections. The server never uses more than its
    /// descriptor limit allows: the effective limit is the smaller of this and the
    /// open-file limit less the descriptors open at start and [`Config::fd_reserve`].
    pub max_connections: usize,
    /// Descriptors kept free beyond those open at start, so the server can always
    /// accept and refuse with `SERVER_FULL`, write its database and serve the admin
    /// listener while the TV connections are at their limit.
    pub fd_reserve: usize,
    /// Most connections that have not registered yet, in total (capped at the effective
    /// connection limit). Beyond it the oldest unregistered connection is shed.
    pub max_unregistered: usize,
    /// Most connections not registered yet from one source address (IPv6: one /64).
    /// Beyond it that address's oldest unregistered connection is shed.
    pub max_unregistered_per_ip: usize,
    /// Most registered connections from one source address (IPv6: one /64); 0 = no
    /// limit. Generous by default: many genuine TVs may share one address behind
    /// carrier-grade NAT.
    pub max_per_ip: usize,
    /// Largest control frame accepted.
    pub max_frame_len: usize,
    /// Sustained requests per second allowed per connection.
    pub requests_per_sec: u32,
    /// Burst of requests allowed per connection above the sustained rate. A connection
    /// that sends more than 3 × this many requests over the limit (without slowing down
    /// until its allowance is whole again) is closed; over-limit requests the client is
    /// not waiting for (more of its frames already arrived) are dropped unanswered.
    pub request_burst: u32,
    /// How long a source address is refused new connections after
    /// [`crate::server::limits::FLOOD_STRIKES`] of its connections were closed for
    /// flooding within this time; doubled for each further strike (at most 16 ×);
    /// 0 = never refuse.
    pub flood_penalty_ms: u64,
    /// Time a write to a TV may take before its connection is dropped.
    pub write_timeout_ms: u64,
    /// Register users the server has never seen (off: only provisioned users).
    pub create_unknown_users: bool,
    /// How long shutdown waits for sessions to close before giving up on them.
    pub shutdown_grace_ms: u64,
    /// Several nodes: how long a stopping node (SIGTERM) waits for its live calls to end
    /// before ending them, while its TVs not in a call move to other nodes; 0 = no drain.
    pub drain_timeout_ms: u64,
    /// Admin HTTP listener (health, readiness, metrics, operator API); off when unset.
    /// Keep it on loopback or a management network: it is plain HTTP.
    pub admin_listen: Option<SocketAddr>,
    /// File holding the admin API's bearer token (else `CALL_PROXY_ADMIN_TOKEN`).
    pub admin_token_file: Option<PathBuf>,
    /// Plain TCP on the control port, for lab use only: nothing is encrypted and a TV is
    /// whoever it says it is (no enrollment). Off: TLS 1.3, enrolled TVs only.
    pub insecure_plaintext: bool,
    /// The server's certificate chain (PEM); with `tls_key`. Unset: the server makes a
    /// private CA and a certificate under [`Config::tls_dir`] on first start.
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Names and addresses the server's own certificate is made for (what TVs put in
    /// `--server`). Used only when the server makes its certificate.
    pub tls_names: Vec<String>,
    /// How long an enrollment code stays valid.
    pub enrollment_ttl_s: u64,
    /// How often a TV may poll its enrollment.
    pub enrollment_poll_s: u32,
    /// Failed authentications from one source address within `flood_penalty_ms` after
    /// which the address is refused for a while (as a flooding one).
    pub auth_failures_per_ip: u32,
    /// Traffic accounting's period (`"month"`, `"week"` or `"day"`, UTC calendar); the
    /// nodes and the dispatcher of one database must agree on it.
    pub accounting_period: crate::accounting::Period,
    /// How often a node writes its TVs' usage to the database (a connection hands its
    /// usage to the node at most this often, and when it ends).
    pub accounting_flush_ms: u64,
    /// The dispatcher assigns no node to an account with an allowance whose remaining
    /// bytes in the period are below this (an account without an allowance is not
    /// limited).
    pub allowance_threshold_bytes: u64,
    /// A presence notification a TV has not acknowledged within this has failed: its
    /// subscription is deleted and the TV told to subscribe again.
    pub presence_ack_timeout_ms: u64,
    /// Failed notifications of one registration within
    /// [`Config::presence_recovery_window_ms`] at which
    /// [`Config::presence_failure_policy`] applies instead of another recovery.
    pub presence_recovery_threshold: u32,
    /// The sliding window failed notifications are counted in.
    pub presence_recovery_window_ms: u64,
    /// `"sign_out"` (close the TV's link, record it offline, alarm) or
    /// `"drop_subscription"` (only drop it, alarm).
    pub presence_failure_policy: crate::registry::presence::FailurePolicy,
    /// Where message bodies are kept: files, written and synced before their message's
    /// row commits. Default: beside the SQLite database (`<database>-bodies`). With
    /// PostgreSQL it must be set (on storage every node of the database shares);
    /// without it such a server takes text messages only.
    pub body_dir: Option<PathBuf>,
    /// Longest text a message may carry, in characters.
    pub max_text_chars: u32,
    /// Largest message body, in MiB.
    pub max_body_mb: u64,
    /// Longest voice message, in seconds.
    pub max_voice_s: u32,
    /// Longest video clip, in seconds.
    pub max_video_s: u32,
    /// Largest side of a picture, in pixels.
    pub max_picture_side: u32,
    /// A TV's mailbox: most bytes kept for it, in MiB.
    pub mailbox_mb: u64,
    /// A TV's mailbox: most messages kept for it.
    pub mailbox_messages: u32,
    /// Messages older than this are deleted with their bodies.
    pub message_retention_days: u32,
    /// How long a sender's `SendMessage` waits for an online recipient to take the
    /// message before it is answered `stored` rather than `delivered`.
    pub message_delivery_wait_ms: u64,
    /// STUN servers TVs gather server-reflexive candidates from (`stun:HOST:PORT`), e.g.
    /// coturn's or this server's own [`Config::stun_listen`]. Empty: none.
    pub stun_urls: Vec<String>,
    /// TURN servers (coturn) TVs may relay through when no direct path works
    /// (`turn:HOST:PORT[?transport=udp|tcp]`). Needs [`Config::turn_secret_file`].
    pub turn_urls: Vec<String>,
    /// File whose first line is coturn's `static-auth-secret` (coturn runs with
    /// `use-auth-secret`): TURN credentials are made from it per call.
    pub turn_secret_file: Option<PathBuf>,
    /// How long a TURN credential handed to a TV for a call stays valid (coturn refuses
    /// to refresh an allocation after it, so it bounds a relayed call's length).
    pub turn_credential_ttl_s: u64,
    /// A UDP address this server answers STUN Binding requests on (its own STUN
    /// service; name it in `stun_urls` as TVs reach it). Unset: none.
    pub stun_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7600)),
            backend: StorageBackend::Sqlite,
            data_dir: PathBuf::from("data"),
            db: None,
            db_url: None,
            db_password_file: None,
            db_pool_size: 4,
            node_id: "node-1".into(),
            node_slot: 0,
            node_lease_ms: 5_000,
            advertise: None,
            dispatch_public_key_file: None,
            dispatch_public_key: None,
            dispatch_key_file: None,
            dispatch_token_ttl_s: 600,
            sync_full: true,
            disk_reserve_mb: crate::storage::sqlite::DEFAULT_RESERVE_BYTES >> 20,
            heartbeat_interval_ms: 30_000,
            heartbeat_misses: 3,
            handshake_timeout_ms: 5_000,
            ring_timeout_ms: 30_000,
            max_connections: 200_000,
            fd_reserve: 128,
            max_unregistered: 10_000,
            max_unregistered_per_ip: 1_024,
            max_per_ip: 8_192,
            max_frame_len: shared_proto::MAX_FRAME_LEN,
            requests_per_sec: 20,
            request_burst: 100,
            flood_penalty_ms: 10_000,
            write_timeout_ms: 10_000,
            create_unknown_users: true,
            shutdown_grace_ms: 5_000,
            drain_timeout_ms: 30_000,
            admin_listen: None,
            admin_token_file: None,
            insecure_plaintext: false,
            tls_cert: None,
            tls_key: None,
            tls_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            enrollment_ttl_s: 900,
            enrollment_poll_s: 2,
            auth_failures_per_ip: 20,
            accounting_period: crate::accounting::Period::Month,
            accounting_flush_ms: 30_000,
            allowance_threshold_bytes: 64 * 1024,
            presence_ack_timeout_ms: 5_000,
            presence_recovery_threshold: 5,
            presence_recovery_window_ms: 600_000,
            presence_failure_policy: crate::registry::presence::FailurePolicy::SignOut,
            body_dir: None,
            max_text_chars: 2_000,
            max_body_mb: 32,
            max_voice_s: 120,
            max_video_s: 60,
            max_picture_side: 4_096,
            mailbox_mb: 200,
            mailbox_messages: 500,
            message_retention_days: 30,
            message_delivery_wait_ms: 2_000,
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret_file: None,
            turn_credential_ttl_s: 12 * 3600,
            stun_listen: None,
        }
    }
}

impl Config {
    /// The presence settings.
    pub fn presence(&self) -> crate::registry::presence::PresenceConfig {
        crate::registry::presence::PresenceConfig {
            ack_timeout: Duration::from_millis(self.presence_ack_timeout_ms),
            threshold: self.presence_recovery_threshold,
            window: Duration::from_millis(self.presence_recovery_window_ms),
            policy: self.presence_failure_policy,
            several_nodes: self.backend == StorageBackend::Postgres,
        }
    }

    /// Where message bodies are kept (see [`Config::body_dir`]); `None`: nowhere (a
    /// PostgreSQL server without `body_dir`).
    pub fn body_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.body_dir {
            return Some(dir.clone());
        }
        (self.backend == StorageBackend::Sqlite).then(|| {
            let mut name = self.db_path().into_os_string();
            name.push("-bodies");
            PathBuf::from(name)
        })
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Config> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Where the server keeps the certificates it makes: `tls/` beside the database.
    pub fn tls_dir(&self) -> PathBuf {
        match &self.db {
            Some(db) => db
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .join("tls"),
            None => self.data_dir.join("tls"),
        }
    }

    /// Points the server at the database a `--db` flag names: a `postgres://` (or
    /// `postgresql://`) URL selects the PostgreSQL backend, anything else is a SQLite file.
    pub fn set_db(&mut self, db: &std::path::Path) {
        match db.to_str() {
            Some(url) if is_postgres_url(url) => {
                self.backend = StorageBackend::Postgres;
                self.db_url = Some(url.to_string());
                self.db = None;
            }
            _ => {
                self.backend = StorageBackend::Sqlite;
                self.db = Some(db.to_path_buf());
                self.db_url = None;
            }
        }
    }

    /// The database file in use.
    pub fn db_path(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| self.data_dir.join("call-proxy.sqlite"))
    }

    /// Silence after which a registered TV is offline: a few heartbeat intervals plus
    /// a little slack for a slow network.
    pub fn heartbeat_timeout(&self) -> Duration {
        let interval = Duration::from_millis(self.heartbeat_interval_ms);
        interval * self.heartbeat_misses.max(1) + interval / 2
    }

    /// [`Config::handshake_timeout_ms`] as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// [`Config::ring_timeout_ms`] as a duration.
    pub fn ring_timeout(&self) -> Duration {
        Duration::from_millis(self.ring_timeout_ms)
    }

    /// [`Config::write_timeout_ms`] as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self.backend {
            StorageBackend::Sqlite => anyhow::ensure!(
                self.db_url.is_none(),
                "db_url is for backend = \"postgres\"; this config's backend is \"sqlite\""
            ),
            StorageBackend::Postgres => {
                let url = self.db_url.as_deref().unwrap_or("");
                anyhow::ensure!(
                    is_postgres_url(url),
                    "backend = \"postgres\" needs db_url = \"postgres://USER@HOST:PORT/DB\""
                );
                anyhow::ensure!(self.db_pool_size >= 1, "db_pool_size must be at least 1");
            }
        }
        anyhow::ensure!(
            self.heartbeat_interval_ms >= 100,
            "heartbeat_interval_ms must be at least 100"
        );
        anyhow::ensure!(
            self.heartbeat_interval_ms <= u64::from(u32::MAX),
            "heartbeat_interval_ms is too large"
        );
        anyhow::ensure!(
            self.ring_timeout_ms >= 100,
            "ring_timeout_ms must be at least 100"
        );
        anyhow::ensure!(
            self.max_connections >= 1,
            "max_connections must be at least 1"
        );
        anyhow::ensure!(
            self.handshake_timeout_ms >= 100,
            "handshake_timeout_ms must be at least 100"
        );
        anyhow::ensure!(
            self.fd_reserve >= 16,
            "fd_reserve must be at least 16 (the database and refusals need descriptors)"
        );
        anyhow::ensure!(
            self.max_unregistered >= 1,
            "max_unregistered must be at least 1"
        );
        anyhow::ensure!(
            self.max_unregistered_per_ip >= 1,
            "max_unregistered_per_ip must be at least 1"
        );
        anyhow::ensure!(
            self.max_frame_len >= 256,
            "max_frame_len must be at least 256"
        );
        anyhow::ensure!(
            (1..=shared_proto::dispatch::MAX_NODE_TEXT_LEN).contains(&self.node_id.len()),
            "node_id must be 1 to {} bytes",
            shared_proto::dispatch::MAX_NODE_TEXT_LEN
        );
        if let Some(a) = &self.advertise {
            anyhow::ensure!(
                !a.is_empty() && a.len() <= shared_proto::dispatch::MAX_NODE_TEXT_LEN,
                "advertise must be a host:port of at most {} bytes",
                shared_proto::dispatch::MAX_NODE_TEXT_LEN
            );
        }
        anyhow::ensure!(
            self.max_text_chars >= 1 && self.max_body_mb >= 1 && self.mailbox_messages >= 1,
            "max_text_chars, max_body_mb and mailbox_messages must be at least 1"
        );
        anyhow::ensure!(
            self.message_retention_days >= 1,
            "message_retention_days must be at least 1"
        );
        anyhow::ensure!(
            self.dispatch_token_ttl_s >= 1,
            "dispatch_token_ttl_s must be at least 1"
        );
        anyhow::ensure!(
            self.requests_per_sec >= 1,
            "requests_per_sec must be at least 1"
        );
        anyhow::ensure!(
            self.accounting_flush_ms >= 10,
            "accounting_flush_ms must be at least 10"
        );
        anyhow::ensure!(
            self.presence_ack_timeout_ms >= 10,
            "presence_ack_timeout_ms must be at least 10"
        );
        anyhow::ensure!(
            self.presence_recovery_threshold >= 1,
            "presence_recovery_threshold must be at least 1"
        );
        Ok(())
    }
}

/// Whether `s` names a PostgreSQL database rather than a file.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nring_timeout_ms = 5000\nadmin_listen = \"127.0.0.1:7680\"\n",
        )
        .expect("parses");
        assert_eq!(
            c.admin_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7680)))
        );
        assert_eq!(c.admin_token_file, None);
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(c.ring_timeout_ms, 5000);
        assert_eq!(c.heartbeat_interval_ms, 30_000);
        assert!(toml::from_str::<Config>("lissen = \"x\"").is_err());
        assert_eq!(c.db_path(), PathBuf::from("data/call-proxy.sqlite"));
    }

    #[test]
    fn the_backend_is_sqlite_by_default_and_an_unknown_one_is_refused_by_name() {
        assert_eq!(Config::default().backend, StorageBackend::Sqlite);
        let c: Config = toml::from_str("backend = \"sqlite\"\ndb = \"x.db\"\n").expect("parses");
        assert_eq!(c.backend, StorageBackend::Sqlite);
        assert_eq!(c.db_path(), PathBuf::from("x.db"));
        let err = toml::from_str::<Config>("backend = \"oracle\"\n")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("unknown storage backend \"oracle\""), "{err}");
        assert!(err.contains("\"sqlite\""), "{err}");
        let pg: Config =
            toml::from_str("backend = \"postgres\"\ndb_url = \"postgres://tv@db/tvcall\"\n")
                .expect("parses");
        pg.validate().expect("valid");
        let no_url: Config = toml::from_str("backend = \"postgres\"\n").expect("parses");
        assert!(no_url.validate().is_err());
        let mut flag = Config::default();
        flag.set_db(std::path::Path::new("postgresql://tv@db:5433/tvcall"));
        assert_eq!(flag.backend, StorageBackend::Postgres);
        assert_eq!(
            flag.db_url.as_deref(),
            Some("postgresql://tv@db:5433/tvcall")
        );
        flag.set_db(std::path::Path::new("x.sqlite"));
        assert_eq!(
            (flag.backend, flag.db_path()),
            (StorageBackend::Sqlite, PathBuf::from("x.sqlite"))
        );
    }

    #[test]
    fn limit_settings_parse_and_are_validated() {
        let c: Config = toml::from_str(
            "fd_reserve = 200\nmax_unregistered = 50\nmax_unregistered_per_ip = 5\nmax_per_ip = 0\n",
        )
        .expect("parses");
        assert_eq!(
            (
                c.fd_reserve,
                c.max_unregistered,
                c.max_unregistered_per_ip,
                c.max_per_ip
            ),
            (200, 50, 5, 0)
        );
        c.validate().expect("valid");
        let d = Config::default();
        assert_eq!(
            (
                d.max_per_ip,
                d.max_unregistered_per_ip,
                d.handshake_timeout_ms
            ),
            (8_192, 1_024, 5_000)
        );
        for bad in [
            Config {
                fd_reserve: 3,
                ..Config::default()
            },
            Config {
                max_unregistered: 0,
                ..Config::default()
            },
            Config {
                max_unregistered_per_ip: 0,
                ..Config::default()
            },
            Config {
                handshake_timeout_ms: 0,
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_accounting_period_is_a_month_by_default_and_named_in_toml() {
        assert_eq!(
            Config::default().accounting_period,
            crate::accounting::Period::Month
        );
        let c: Config = toml::from_str("accounting_period = \"day\"\n").expect("parses");
        assert_eq!(c.accounting_period, crate::accounting::Period::Day);
        assert!(toml::from_str::<Config>("accounting_period = \"year\"\n").is_err());
    }

    #[test]
    fn heartbeat_timeout_allows_misses_plus_slack() {
        let c = Config {
            heartbeat_interval_ms: 1000,
            heartbeat_misses: 3,
            ..Config::default()
        };
        assert_eq!(c.heartbeat_timeout(), Duration::from_millis(3500));
    }
}
