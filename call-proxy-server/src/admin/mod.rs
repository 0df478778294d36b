//! The admin listener: a separate HTTP port (loopback or a management network) with
//! liveness (`/healthz`), readiness (`/readyz`), Prometheus metrics (`/metrics`) and the
//! operator API (`/api/calls`, `/api/users`, `/api/users/{id}`, `/api/stats`).
//!
//! Everything except `/healthz` and `/readyz` needs `Authorization: Bearer <token>`.
//! Database queries run on blocking threads through read-only connections of their
//! own (at most [`MAX_QUERIES`] at once), never on the async runtime and never through
//! the writer. [`serve`] stops when its shutdown future completes; the daemon completes
//! it after the control server has shut down, so metrics stay readable while it drains.

pub mod api;
pub mod client;
pub mod prometheus;
mod routes;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::server::Shared;
use crate::storage::operator::OperatorDb;
use crate::storage::{Outcome, Store, StoreError};

/// The environment variable that holds the admin token when no token file is given.
pub const TOKEN_ENV: &str = "CALL_PROXY_ADMIN_TOKEN";

/// Most admin database queries running at once (the rest wait their turn).
pub const MAX_QUERIES: usize = 4;

/// How long `/readyz` and `/metrics` wait for the database before answering without it.
const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin listener needs besides the server's shared state.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// The bearer token every protected request must carry.
    pub token: String,
    /// The database file, opened read-only for queries.
    pub db_path: PathBuf,
}

/// Why the admin token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No file given and the environment variable is unset.
    #[error("the admin listener needs a token: give --admin-token-file PATH (admin_token_file in the config) or set {TOKEN_ENV}")]
    Missing,
    /// The token file could not be read.
    #[error("cannot read admin token file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token is empty (after trimming white space).
    #[error("the admin token from {0} is empty")]
    Empty(String),
}

/// Reads the admin token: from `file` if given, else from [`TOKEN_ENV`]. Surrounding
/// white space (a file's final newline) is not part of the token.
pub fn load_token(file: Option<&Path>) -> Result<String, TokenError> {
    let (token, from) = match file {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|source| TokenError::Unreadable {
                path: path.to_path_buf(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (
            std::env::var(TOKEN_ENV).map_err(|_| TokenError::Missing)?,
            TOKEN_ENV.to_string(),
        ),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(from));
    }
    Ok(token.to_string())
}

/// What the handlers share.
struct AdminState<S> {
    /// The server's state: counters, registry, store (for its commit latency).
    shared: Arc<Shared<S>>,
    /// The expected bearer token.
    token: String,
    /// Read-only database access for queries.
    db: Arc<QueryPool>,
}

/// Read-only database connections for admin queries, used on blocking threads.
struct QueryPool {
    /// The database file.
    path: PathBuf,
    /// Connections not in use, reused by the next query.
    idle: Mutex<Vec<OperatorDb>>,
    /// Bounds the queries running at once (and so the connections open). A permit
    /// moves into the blocking task, so a caller that stops waiting (a timed-out probe)
    /// does not free its place before the query is really over.
    permits: Arc<Semaphore>,
}

impl QueryPool {
    /// Runs `query` on a blocking thread with a pooled connection.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        query: impl FnOnce(&OperatorDb) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = Arc::clone(self);
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
        .map_err(|e| StoreError::Db(format!("admin query task failed: {e}")))?
    }

    /// [`QueryPool::run`] bounded by [`DB_PROBE_TIMEOUT`].
    async fn probe<T: Send + 'static>(
        self: &Arc<Self>,
        query: impl FnOnce(&OperatorDb) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(DB_PROBE_TIMEOUT, self.run(query))
            .await
            .map_err(|_| StoreError::Db("database did not answer in time".into()))?
    }
}

/// The admin API's routes over the server's shared state.
pub fn router<S: Store>(shared: Arc<Shared<S>>, opts: AdminOptions) -> Router {
    let state = Arc::new(AdminState {
        shared,
        token: opts.token,
        db: Arc::new(QueryPool {
            path: opts.db_path,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_QUERIES)),
        }),
    });
    let protected = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/api/calls", get(routes::calls::<S>))
        .route("/api/users", get(routes::users::<S>))
        .route("/api/users/{id}", get(routes::user::<S>))
        .route("/api/stats", get(routes::stats::<S>))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token::<S>,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` completes, then lets requests
/// in progress finish.
pub async fn serve<S: Store>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    opts: AdminOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(shared, opts))
        .with_graceful_shutdown(shutdown)
        .await
}

/// How long the admin listener may take to finish its requests once told to stop.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A running admin listener (see [`spawn`]).
pub struct AdminHandle {
    /// Completes the listener's shutdown future.
    stop: tokio::sync::oneshot::Sender<()>,
    /// The listener's task.
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts [`serve`] on its own task; stop it with [`AdminHandle::stop`] once the control
/// server has shut down.
pub fn spawn<S: Store>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    opts: AdminOptions,
) -> AdminHandle {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, shared, opts, async move {
        let _ = stopped.await;
    }));
    AdminHandle { stop, task }
}

impl AdminHandle {
    /// Stops accepting, lets requests in progress finish (within a short grace period),
    /// and returns.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(STOP_GRACE, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin listener failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "admin listener task failed"),
            Err(_) => tracing::warn!("admin requests still running after the grace period"),
        }
    }
}

/// An error response with a JSON body.
fn error(status: StatusCode, message: &str) -> Response {
    let body = api::ErrorBody {
        error: message.to_string(),
        parameter: None,
        value: None,
    };
    (status, Json(body)).into_response()
}

/// Lets a request through only with the right bearer token (compared in constant time).
async fn require_token<S: Store>(
    State(state): State<Arc<AdminState<S>>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let (message, challenge) = match given {
        None => ("missing bearer token", "Bearer realm=\"call-proxy-admin\""),
        Some(token) if bool::from(token.as_bytes().ct_eq(state.token.as_bytes())) => {
            return next.run(req).await;
        }
        Some(_) => (
            "invalid bearer token",
            "Bearer realm=\"call-proxy-admin\", error=\"invalid_token\"",
        ),
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

/// Liveness: the process answers.
async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Readiness: a trivial query reaches the database through a read-only connection.
async fn readyz<S: Store>(State(state): State<Arc<AdminState<S>>>) -> Response {
    match state.db.probe(|db| db.ping()).await {
        Ok(()) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {e}")),
    }
}

/// Prometheus metrics: the server's counters, the registry's gauges, the offline
/// cache's depth (from the database) and the group-commit latency histogram.
async fn metrics<S: Store>(State(state): State<Arc<AdminState<S>>>) -> Response {
    let cache_depth = state.db.probe(|db| db.cached_waiting()).await;
    let shared = &state.shared;
    let m = &shared.metrics;
    let mut e = prometheus::Exposition::default();
    e.gauge(
        "call_proxy_connections",
        "TV control connections open now.",
        m.connections.load(Relaxed),
    );
    let counters: [(&str, &str, &AtomicU64); 6] = [
        (
            "call_proxy_connections_accepted_total",
            "TV control connections accepted.",
            &m.accepted,
        ),
        (
            "call_proxy_connections_refused_full_total",
            "Connections refused because the server was full.",
            &m.rejected_full,
        ),
        (
            "call_proxy_bad_input_total",
            "Connections closed for a bad preamble, bad or oversized frame, or a timeout.",
            &m.bad_input,
        ),
        (
            "call_proxy_rate_limited_total",
            "Requests refused by the per-connection rate limit.",
            &m.rate_limited,
        ),
        (
            "call_proxy_registrations_total",
            "Successful registrations.",
            &m.registrations,
        ),
        (
            "call_proxy_reregistrations_total",
            "Registrations that replaced a live session of the same user.",
            &m.reregistrations,
        ),
    ];
    for (name, help, value) in counters {
        e.counter(name, help, value.load(Relaxed));
    }
    let outcomes = [
        Outcome::Answered,
        Outcome::Missed,
        Outcome::Rejected,
        Outcome::Busy,
        Outcome::Cached,
    ]
    .map(|o| (o.as_str(), m.calls_by(o)));
    e.counter_by(
        "call_proxy_calls_total",
        "Calls by final outcome.",
        "outcome",
        &outcomes,
    );
    e.gauge(
        "call_proxy_tvs_online",
        "TVs registered on this server now.",
        shared.registry.online() as u64,
    );
    e.gauge(
        "call_proxy_live_calls",
        "Calls ringing or in progress now.",
        shared.registry.live_calls() as u64,
    );
    e.gauge(
        "call_proxy_db_up",
        "1 if the database answered this scrape's query, else 0.",
        u64::from(cache_depth.is_ok()),
    );
    match cache_depth {
        Ok(n) => e.gauge(
            "call_proxy_cached_calls_waiting",
            "Missed, busy and cached calls waiting to be delivered to their callee's TV.",
            n,
        ),
        Err(err) => tracing::warn!(error = %err, "metrics: cannot count cached calls"),
    }
    e.histogram(
        "call_proxy_db_commit_seconds",
        "Duration of each database group commit (one transaction, one sync).",
        &shared.store.commit_latency().snapshot(),
    );
    (
        [(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
        e.finish(),
    )
        .into_response()
}
