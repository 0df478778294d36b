//! The `call-proxy-server` command: `serve` runs the daemon.

use std::path::PathBuf;

use anyhow::Context;
use call_proxy_server::{bind, run, Config, Shared, SqliteOptions, SqliteStore};
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
    Serve(ServeArgs),
    /// Print the newest calls of the call log (reads the database file directly).
    Calls {
        /// SQLite database file.
        #[arg(long, default_value = "data/call-proxy.sqlite")]
        db: PathBuf,
        /// Most rows to print.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; flags given here win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// TCP control listener address [default: 0.0.0.0:7600].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// SQLite database file [default: <data-dir>/call-proxy.sqlite].
    #[arg(long)]
    db: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
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
    /// Only registered (provisioned) users may register; unknown ids are refused.
    #[arg(long)]
    provisioned_only: bool,
    /// Commit without syncing to disk: survives a crash of the server, not of the machine.
    #[arg(long)]
    no_sync: bool,
}

fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("call-proxy-server: {e:#}");
            std::process::ExitCode::FAILURE
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
        Command::Serve(args) => serve(args),
        Command::Calls { db, limit } => print_calls(&db, limit),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.db {
        config.db = Some(v);
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
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
    if args.provisioned_only {
        config.create_unknown_users = false;
    }
    if args.no_sync {
        config.sync_full = false;
    }
    config.validate()?;
    raise_fd_limit();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let db = config.db_path();
        let store = SqliteStore::open(
            &db,
            SqliteOptions {
                sync_full: config.sync_full,
                ..SqliteOptions::default()
            },
        )
        .with_context(|| format!("cannot open database {}", db.display()))?;
        let listener =
            bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            db = %db.display(),
            sync_full = config.sync_full,
            "call-proxy-server ready"
        );
        let shared = Shared::new(store, config);
        run(listener, shared, shutdown_signal()).await;
        anyhow::Ok(())
    })
}

fn print_calls(db: &std::path::Path, limit: usize) -> anyhow::Result<()> {
    anyhow::ensure!(db.exists(), "no database at {}", db.display());
    let rows = call_proxy_server::storage::sqlite::read_call_log(db, limit)
        .with_context(|| format!("cannot read the call log in {}", db.display()))?;
    println!(
        "{:>6}  {:>10}  {:>10}  {:<24}  {:<8}  {:<24}  {:<24}  delivered",
        "id", "caller", "callee", "call_date", "outcome", "answered_at", "ended_at"
    );
    for r in rows {
        println!(
            "{:>6}  {:>10}  {:>10}  {:<24}  {:<8}  {:<24}  {:<24}  {}",
            r.id,
            r.caller,
            r.callee,
            r.call_date,
            r.outcome,
            r.answered_at.as_deref().unwrap_or("-"),
            r.ended_at.as_deref().unwrap_or("-"),
            if r.delivered { "yes" } else { "no" }
        );
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

/// A server holds one descriptor per TV: raise the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    tracing::info!(max_open_files = lim.rlim_cur, "file descriptor limit");
}
