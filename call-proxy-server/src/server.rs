//! The TCP control listener: accepts TVs, admits them within limits derived from the
//! process (the descriptor limit less a reserve), sheds unregistered connections first
//! when full, runs one task per connection, and shuts down in two phases (stop accepting
//! and end calls; then let sessions close and the database flush, within a deadline).
//!
//! The accept loop is where a TLS acceptor goes: it wraps the accepted `TcpStream` and
//! hands the wrapped stream to [`crate::connection::serve`], which takes any
//! `AsyncRead + AsyncWrite` stream and the peer's address.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shared_proto::{preamble::encode_reason, ErrorCode, Preamble};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::handler::record_end;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::storage::Store;
use limits::{Admission, Gate};

pub mod limits;

/// What every connection task shares.
pub struct Shared<S> {
    /// The user management database.
    pub store: S,
    /// Live sessions and calls.
    pub registry: Registry,
    /// Settings.
    pub config: Config,
    /// Counters.
    pub metrics: Metrics,
    /// Connection admission: the limits derived at start and who holds a slot.
    pub gate: Gate,
}

impl<S: Store> Shared<S> {
    /// Shared state over an opened store.
    pub fn new(store: S, config: Config) -> Arc<Self> {
        let w = store.watermarks();
        let metrics = Metrics::default();
        let gate = Gate::new(limits::Limits::for_process(&config), &metrics);
        Arc::new(Shared {
            store,
            registry: Registry::new(w.max_session_id, w.max_call_id),
            config,
            metrics,
            gate,
        })
    }
}

/// Binds the control listener with a deep accept backlog (TVs reconnect in bursts
/// after a power cut or a server restart).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Serves TVs on `listener` until `shutdown` completes, then shuts down cleanly: no new
/// connections, live calls ended and recorded, every session told and recorded
/// offline, the database flushed and closed.
pub async fn run<S: Store>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    shared.gate.limits().log(shared.config.max_connections);
    tokio::select! {
        () = accept_loop(&listener, &shared, &tracker, &stop_rx) => {}
        () = shutdown => {}
    }
    drop(listener);
    tracing::info!(
        online = shared.registry.online(),
        calls = shared.registry.live_calls(),
        "shutting down"
    );
    for ended in shared.registry.end_all() {
        if let Err(e) = record_end(&shared, ended).await {
            tracing::error!(error = %e, "cannot record a call ended by shutdown");
        }
    }
    let _ = stop_tx.send(true);
    tracker.close();
    let grace = Duration::from_millis(shared.config.shutdown_grace_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "sessions still open after the grace period; they are recorded offline at next start"
        );
    }
    shared.store.close().await;
    tracing::info!("stopped");
}

async fn accept_loop<S: Store>(
    listener: &TcpListener,
    shared: &Arc<Shared<S>>,
    tracker: &TaskTracker,
    stop: &watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(1);
    // Connections of flooding sources held before their refusal (a tarpit): a flooder
    // that reconnects at once then waits instead of costing an accept and a refusal in a
    // tight loop. Few, so they fit in the descriptor reserve; beyond them the refusal is
    // immediate.
    let tarpit = Arc::new(tokio::sync::Semaphore::new(
        (shared.gate.limits().fd_reserve / 2).max(16) as usize,
    ));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => {
                backoff = Duration::from_millis(1);
                conn
            }
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: wait and retry,
                // never spin, and keep serving the TVs already connected. With the
                // derived limit this is rare: the reserve keeps descriptors free.
                shared.metrics.accept_errors.inc();
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        shared.metrics.accepted.inc();
        let _ = stream.set_nodelay(true);
        match shared.gate.admit(peer.ip()) {
            Admission::Admitted(ticket) => {
                let shared = Arc::clone(shared);
                let stop = stop.clone();
                tracker.spawn(async move {
                    shared.metrics.connections.inc();
                    // A TLS acceptor would wrap `stream` here (within the handshake
                    // timeout); `serve` takes any byte stream.
                    crate::connection::serve_admitted(&shared, stream, peer, stop, ticket).await;
                    shared.metrics.connections.dec();
                });
            }
            Admission::Penalised(left) => {
                shared.metrics.refused_flooding.inc();
                let reason = format!(
                    "this address flooded the server: new connections are refused for {} s more",
                    left.as_secs().max(1)
                );
                match Arc::clone(&tarpit).try_acquire_owned() {
                    Ok(held) => {
                        tracker.spawn(async move {
                            tokio::time::sleep(left.min(TARPIT_HOLD)).await;
                            refuse(stream, ErrorCode::RATE_LIMITED, &reason).await;
                            drop(held);
                        });
                    }
                    Err(_) => refuse_now(stream, ErrorCode::RATE_LIMITED, &reason),
                }
            }
            Admission::Full => {
                shared.metrics.rejected_full.inc();
                refuse_now(
                    stream,
                    ErrorCode::SERVER_FULL,
                    "server is full, retry later",
                );
            }
        }
    }
}

/// How long a connection from a flooding source is held before it is refused.
const TARPIT_HOLD: Duration = Duration::from_secs(1);

/// Refuses a just-accepted connection without holding its descriptor: one
/// non-blocking write of the rejecting preamble (a fresh socket's send buffer always
/// has room for it), whatever the client sent already read away so the close is a
/// clean FIN, then closed.
fn refuse_now(stream: TcpStream, status: ErrorCode, reason: &str) {
    let mut out = Preamble::server(status).encode().to_vec();
    out.extend_from_slice(&encode_reason(reason));
    let _ = stream.try_write(&out);
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 256];
    let _ = stream.try_read(&mut sink);
}

/// Tells a client why it cannot be served (a rejecting preamble) and closes.
pub async fn refuse<T: AsyncWrite + Unpin>(mut stream: T, status: ErrorCode, reason: &str) {
    let mut out = Preamble::server(status).encode().to_vec();
    out.extend_from_slice(&encode_reason(reason));
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
