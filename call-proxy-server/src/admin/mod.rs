//! The admin listener: a separate HTTP port (loopback or a management network) with
//! liveness (`/healthz`), readiness (`/readyz`), Prometheus metrics (`/metrics`) and the
//! operator API (`/api/calls`, `/api/users`, `/api/users/{id}`, `/api/stats`, enrollments
//! and revocations, traffic accounting: `/api/usage`, `PUT /api/allowances/{id}`, the
//! operator's alarms: `/api/alarms`, `POST /api/alarms/{id}/clear`, and phone numbers on
//! file: `PUT /api/users/{id}/phone`).
//!
//! Everything except `/healthz` and `/readyz` needs `Authorization: Bearer <token>`.
//! Database queries go through the backend's [`OperatorStore`] (at most [`MAX_QUERIES`]
//! at once), never through the server's writer; the admin listener does not know which
//! backend answers them. [`serve`] stops when its shutdown future completes; the daemon completes
//! it after the control server has shut down, so metrics stay readable while it drains.

pub mod api;
pub mod client;
mod routes;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::server::Shared;
use crate::storage::operator::OperatorStore;
use crate::storage::{self, Store, StoreError};

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
    /// The database the operator queries read (the server's own; a SQLite file is
    /// opened read-only).
    pub db: storage::DbTarget,
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
struct AdminState<S, O> {
    /// The server's state: counters, registry, store (for its commit metrics).
    shared: Arc<Shared<S>>,
    /// The expected bearer token.
    token: String,
    /// The operator's reads.
    ops: O,
}

impl<S, O: OperatorStore> AdminState<S, O> {
    /// `query` bounded by [`DB_PROBE_TIMEOUT`] (readiness and metrics answer without
    /// the database rather than hang).
    async fn probe<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(DB_PROBE_TIMEOUT, query)
            .await
            .map_err(|_| StoreError::Unavailable("database did not answer in time".into()))?
    }
}

/// The admin API's routes over the server's shared state, reading the database of the
/// database at `opts.db` (built by [`storage::open_operator`]).
pub fn router<S: Store>(shared: Arc<Shared<S>>, opts: AdminOptions) -> Router {
    let ops = storage::open_operator(&opts.db, MAX_QUERIES);
    router_with(shared, opts.token, ops)
}

/// The admin API's routes over the server's shared state and these operator reads.
pub fn router_with<S: Store, O: OperatorStore>(
    shared: Arc<Shared<S>>,
    token: String,
    ops: O,
) -> Router {
    let state = Arc::new(AdminState { shared, token, ops });
    let protected = Router::new()
        .route("/metrics", get(metrics::<S, O>))
        .route("/api/calls", get(routes::calls::<S, O>))
        .route("/api/users", get(routes::users::<S, O>))
        .route("/api/users/{id}", get(routes::user::<S, O>))
        .route("/api/stats", get(routes::stats::<S, O>))
        .route("/api/messages", get(routes::messages::<S, O>))
        .route("/api/enrollments", get(routes::enrollments::<S, O>))
        .route(
            "/api/enrollments/{code}",
            axum::routing::post(routes::approve::<S, O>).delete(routes::refuse::<S, O>),
        )
        .route(
            "/api/users/{id}/revoke",
            axum::routing::post(routes::revoke::<S, O>),
        )
        .route("/api/usage", get(routes::usage::<S, O>))
        .route(
            "/api/allowances/{id}",
            axum::routing::put(routes::set_allowance::<S, O>),
        )
        .route("/api/alarms", get(routes::alarms::<S, O>))
        .route(
            "/api/alarms/{id}/clear",
            axum::routing::post(routes::clear_alarm::<S, O>),
        )
        .route(
            "/api/users/{id}/phone",
            axum::routing::put(routes::set_phone::<S, O>),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token::<S, O>,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S, O>))
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
async fn require_token<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
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

/// Readiness: a trivial query reaches the database through the operator's reads, and
/// the database's disk has room for new records (503 while it is full: a load balancer
/// should send new TVs elsewhere, though the ones here keep working).
async fn readyz<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
) -> Response {
    if state.shared.store.metrics().is_full() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the database's disk is full; new calls are refused until space returns",
        );
    }
    match state.probe(state.ops.ping()).await {
        Ok(()) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {e}")),
    }
}

/// Prometheus metrics: the server's counters, the registry's gauges, the offline
/// cache's depth and the mailboxes' totals (from the database) and the group-commit
/// latency histogram.
async fn metrics<S: Store, O: OperatorStore>(
    State(state): State<Arc<AdminState<S, O>>>,
) -> Response {
    let cache_depth = state.probe(state.ops.cached_waiting()).await;
    match state.probe(state.ops.open_alarms()).await {
        Ok(n) => state
            .shared
            .metrics
            .alarms_open
            .set(i64::try_from(n).unwrap_or(i64::MAX)),
        Err(err) => tracing::warn!(error = %err, "metrics: cannot count open alarms"),
    }
    let shared = &state.shared;
    let m = &shared.metrics;
    m.tvs_online.set(gauge_value(shared.registry.online()));
    m.live_calls.set(gauge_value(shared.registry.live_calls()));
    m.sync_presence(shared.registry.presence());
    m.db_up.set(i64::from(cache_depth.is_ok()));
    m.storage_full
        .set(i64::from(shared.store.metrics().is_full()));
    match cache_depth {
        Ok(n) => m.cached_waiting.set(i64::try_from(n).unwrap_or(i64::MAX)),
        Err(err) => tracing::warn!(error = %err, "metrics: cannot count cached calls"),
    }
    match state.probe(state.ops.mailbox_totals(None)).await {
        Ok(t) => {
            let v = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            m.mailbox_messages.set(v(t.messages));
            m.mailbox_waiting.set(v(t.waiting));
            m.mailbox_bytes.set(v(t.bytes));
        }
        Err(err) => {
            tracing::warn!(error = %err, "metrics: cannot count the mailboxes");
            m.db_up.set(0);
        }
    }
    let text = m.encode(&[shared.store.metrics().commit_histogram()]);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// A count as a gauge's value.
fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
