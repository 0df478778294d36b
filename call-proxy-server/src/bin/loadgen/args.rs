//! The load generator's command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Load generator for call-proxy-server: simulated TVs over real TCP.
#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Load generator for call-proxy-server: drives simulated TVs over real TCP and \
             prints registrations/s, memory per idle TV, call set-up latency, cached calls/s \
             and boot-fetch time"
)]
pub(crate) struct Args {
    /// Target a running server at this address instead of spawning one.
    #[arg(long)]
    pub(crate) server: Option<SocketAddr>,
    /// Another node on the same database: the TVs of odd index register there, so every
    /// call of the dial phase is between two nodes (caller on one, callee on the other).
    #[arg(long)]
    pub(crate) other_server: Option<SocketAddr>,
    /// Process id of the server given with --server (enables the memory figures).
    #[arg(long, requires = "server")]
    pub(crate) server_pid: Option<u32>,
    /// Spawn `call-proxy-server` from next to this executable (the default when --server
    /// is not given).
    #[arg(long, conflicts_with = "server")]
    pub(crate) spawn: bool,
    /// The server binary to spawn [default: call-proxy-server next to this executable].
    #[arg(long)]
    pub(crate) server_bin: Option<PathBuf>,
    /// The spawned server's database: a postgres://USER@HOST:PORT/DB URL (it must be
    /// empty) [default: a new SQLite file in the server's temporary directory].
    #[arg(long)]
    pub(crate) db: Option<String>,
    /// File whose first line is the PostgreSQL password (passed to the server).
    #[arg(long)]
    pub(crate) db_password_file: Option<PathBuf>,
    /// Extra argument for the spawned `serve` command (repeatable), e.g. --server-arg=--no-sync.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub(crate) server_args: Vec<String>,
    /// Directory in which the spawned server's temporary directory (database, log) is
    /// made [default: the system temporary directory].
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    /// Keep the spawned server's temporary directory (database and log) at the end.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Simulated TVs connected and registered at once.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) tvs: usize,
    /// Connects + registrations in flight.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Calls set up (dial, ringing, hang up) with all TVs online.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) dials: usize,
    /// Concurrent caller tasks in the dial phase.
    #[arg(long, default_value_t = 64)]
    pub(crate) dial_pairs: usize,
    /// Pace the dial phase at this many dials per second in all (each caller dials on a
    /// fixed schedule; dials that start over 2 ms after their slot are counted as late);
    /// 0 = every caller dials again as soon as its previous call is torn down (closed
    /// loop, the most load the callers can offer).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) dial_rate: f64,
    /// Calls to offline users (cached) in the cached-call phase.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) cached: usize,
    /// Concurrent callers in the cached-call phase.
    #[arg(long, default_value_t = 256)]
    pub(crate) cached_concurrency: usize,
    /// Offline users the cached calls are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) offline_targets: usize,
    /// Cached calls waiting for each boot-fetch sample's TV.
    #[arg(long, default_value_t = 100)]
    pub(crate) boot_calls: usize,
    /// Boot-fetch samples.
    #[arg(long, default_value_t = 20)]
    pub(crate) boot_samples: usize,
    /// Most connections from one loopback source address. Each run draws fresh source
    /// addresses (127.X.0.2, 127.X.0.3, ... with X random) so that sockets a previous run
    /// left in TIME_WAIT do not exhaust the ephemeral ports of a source address.
    #[arg(long, default_value_t = 5_000)]
    pub(crate) per_source_ip: usize,
    /// First user id of the registered TVs.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) user_base: u64,
    /// Time limit of each phase, in seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) phase_timeout_secs: u64,
    /// Time limit of one request, in seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) request_timeout_secs: u64,
    /// Worker threads of the load generator (the rest of the machine is the server's).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// After the idle-memory reading, keep every TV connected this many seconds,
    /// each heartbeating every 30 s as a TV does (several load generators against
    /// several nodes then hold their TVs at once; see scripts/bench-100k.sh).
    #[arg(long, default_value_t = 0)]
    pub(crate) hold_secs: u64,
    /// Stop after the registrations, the idle memory and the hold: no dial, cached-call
    /// or boot phase.
    #[arg(long)]
    pub(crate) idle_only: bool,
    /// Also print one JSON summary line.
    #[arg(long)]
    pub(crate) json: bool,
}
