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
    /// TLS on the control port (`None`: `insecure_plaintext`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Fingerprints of TV credentials revoked while running: every connection of that
    /// TV closes ([`watch_revocations`] feeds it from the database).
    pub revoked: tokio::sync::broadcast::Sender<crate::tls::Fingerprint>,
    /// The path to the other nodes on the same database (`None`: this node is alone on
    /// its database, as on SQLite).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// This node's traffic accounting not yet written ([`flush_usage`] writes it).
    pub accountant: crate::accounting::Accountant,
    /// Messages: the body directory, uploads in progress, senders waiting.
    pub messages: crate::messages::Messages,
    /// The STUN and TURN servers TVs are told about, and the TURN secret.
    pub ice: crate::ice::IceConfig,
}

impl<S: Store> Shared<S> {
    /// Shared state over an opened store, with TLS as `config` says (the server's own
    /// certificates are made on first start; see [`crate::tls`]).
    pub fn new(store: S, config: Config) -> anyhow::Result<Arc<Self>> {
        let ice = crate::ice::IceConfig::load(&config)?;
        let tls = if config.insecure_plaintext {
            tracing::warn!(
                "INSECURE: plain TCP on the control port: nothing is encrypted and TVs are \
                 not authenticated (lab use only)"
            );
            None
        } else {
            let files = crate::tls::server_cert_files(
                config.tls_cert.as_deref(),
                config.tls_key.as_deref(),
                &config.tls_dir(),
                &config.tls_names,
            )?;
            if let Some(ca) = &files.ca {
                tracing::info!(ca = %ca.display(), "TLS with the server's own CA: TVs trust this file");
            }
            Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                &files,
            )?))
        };
        let w = store.watermarks();
        let cluster = store
            .node_link()
            .map(|link| Arc::new(crate::cluster::Cluster::new(link)));
        let metrics = Metrics::default();
        let gate = Gate::new(limits::Limits::for_process(&config), &metrics);
        let accountant = crate::accounting::Accountant::new(config.accounting_period);
        let messages = crate::messages::Messages::new(&config);
        Ok(Arc::new(Shared {
            store,
            registry: Registry::with_watermarks(&w).with_presence(config.presence()),
            config,
            metrics,
            gate,
            tls,
            revoked: tokio::sync::broadcast::channel(REVOCATIONS_QUEUED).0,
            cluster,
            accountant,
            messages,
            ice,
        }))
    }
}

/// The own STUN responder on `stun_listen`, if set (see [`crate::ice::serve_stun`]).
async fn stun_responder<S: Store>(shared: &Shared<S>) {
    let Some(addr) = shared.config.stun_listen else {
        return;
    };
    match tokio::net::UdpSocket::bind(addr).await {
        Ok(socket) => {
            tracing::info!(%addr, "answering STUN binding requests");
            crate::ice::serve_stun(socket, &shared.metrics).await;
        }
        Err(e) => tracing::error!(%addr, error = %e, "cannot bind stun_listen: no STUN service"),
    }
}

/// Revocations told to connections at once before a slow one misses some (it then
/// checks its own credential in the database).
const REVOCATIONS_QUEUED: usize = 1024;

/// How often the database is asked for new revocations (the operator CLI revokes on
/// the file, from another process): a revoked TV is cut off within this plus a
/// round trip.
pub const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// Follows the revocations recorded in the database and tells every connection
/// ([`Shared::revoked`]). Runs until the server stops.
pub async fn watch_revocations<S: Store>(shared: &Arc<Shared<S>>) {
    if shared.tls.is_none() {
        return std::future::pending().await;
    }
    let mut after = shared.store.watermarks().max_revocation_seq;
    loop {
        tokio::time::sleep(REVOCATION_POLL).await;
        match shared.store.revocations_after(after).await {
            Ok(revs) => {
                for r in revs {
                    after = after.max(r.seq);
                    tracing::info!(user = r.user_id, tv = %crate::tls::Fingerprint(r.fingerprint), "credential revoked; ending its sessions");
                    let _ = shared.revoked.send(crate::tls::Fingerprint(r.fingerprint));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read revocations"),
        }
    }
}

/// Carries out what other nodes on the same database tell this one: a TV of this node
/// registered on another (its session here is replaced), a message about a call between
/// the nodes ([`crate::cluster`]), a node gone (calls with its TVs end). Runs until the
/// server stops.
pub async fn watch_nodes<S: Store + 'static>(shared: &Arc<Shared<S>>) {
    let Some(mut events) = shared.store.node_events() else {
        return std::future::pending().await;
    };
    crate::cluster::start(shared);
    while let Some(event) = events.recv().await {
        match event {
            crate::storage::NodeEvent::Replaced { user, session_id } => {
                if let Some(ended) = shared.registry.replaced_elsewhere(user, session_id) {
                    tracing::info!(user, "session replaced by a registration on another node");
                    if let Some(ended) = ended {
                        if let Err(e) = record_end(shared, ended).await {
                            tracing::error!(error = %e, "cannot record a call ended by a move to another node");
                        }
                    }
                }
            }
            crate::storage::NodeEvent::Message(payload) => {
                crate::cluster::handle(shared, &payload).await;
            }
            crate::storage::NodeEvent::NodeGone { slot } => {
                for ended in shared.registry.node_gone(slot) {
                    if let Err(e) = record_end(shared, ended).await {
                        tracing::error!(error = %e, "cannot record a call ended by a node's loss");
                    }
                }
            }
        }
    }
    std::future::pending().await
}

/// Writes the usage the node's connections accounted since the last write, in one
/// database write; kept for the next try if it fails.
pub async fn flush_usage<S: Store>(shared: &Shared<S>) {
    let rows = shared.accountant.take();
    if rows.is_empty() {
        return;
    }
    let n = rows.len();
    match shared.store.add_usage(rows.clone()).await {
        Ok(()) => shared.metrics.usage_rows_written.inc_by(n as u64),
        Err(e) => {
            shared.metrics.usage_write_failures.inc();
            tracing::warn!(accounts = n, error = %e, "cannot write traffic accounting; will retry");
            shared.accountant.restore(rows);
        }
    }
}

/// Writes the accounted usage every `accounting_flush_ms`. Runs until the server stops
/// (which writes what is left once its sessions have ended).
async fn write_usage<S: Store>(shared: &Arc<Shared<S>>) {
    let every = Duration::from_millis(shared.config.accounting_flush_ms.max(10));
    loop {
        tokio::time::sleep(every).await;
        flush_usage(shared).await;
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
    // What other nodes and the operator tell this node is followed until the very end
    // (through the drain, too).
    let watchers = [
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { watch_revocations(&shared).await }
        }),
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { watch_nodes(&shared).await }
        }),
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { write_usage(&shared).await }
        }),
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { crate::handler::presence::sweep(&shared).await }
        }),
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { crate::messages::sweep(&shared).await }
        }),
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { stun_responder(&shared).await }
        }),
    ];
    tokio::select! {
        () = accept_loop(&listener, &shared, &tracker, &stop_rx) => {}
        () = shutdown => {}
    }
    drop(listener);
    drain(&shared).await;
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
    for w in watchers {
        w.abort();
    }
    // The sessions' last usage (they hand it over as they end).
    flush_usage(&shared).await;
    shared.store.close().await;
    tracing::info!("stopped");
}

/// How often a draining node looks whether its calls have ended.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// Several nodes, another one alive: before stopping, this node drains. The dispatcher
/// stops sending TVs here, its TVs not in a call are told to move (they connect again,
/// through the dispatcher, to another node), and its live calls go on (their media is TV
/// to TV) until they end or `drain_timeout_ms` runs out; each TV whose call ends is told
/// to move then. Alone on its database, a node stops as before.
async fn drain<S: Store>(shared: &Arc<Shared<S>>) {
    let Some(cluster) = shared.cluster.as_ref().filter(|c| c.others_alive()) else {
        return;
    };
    let limit = Duration::from_millis(shared.config.drain_timeout_ms);
    if limit.is_zero() {
        return;
    }
    cluster.withdraw().await;
    let started = tokio::time::Instant::now();
    tracing::info!(
        online = shared.registry.online(),
        calls = shared.registry.live_calls(),
        "draining: TVs move to other nodes, live calls go on"
    );
    loop {
        let live = shared.registry.drain();
        if live == 0 {
            tracing::info!(took = ?started.elapsed(), "drained: no call left");
            return;
        }
        if started.elapsed() >= limit {
            tracing::warn!(calls = live, "drain time over: ending the calls left");
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
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
                // Two kinds of task, each as large as it needs (a task's future is as
                // large as its largest state, and the TLS states are larger).
                match shared.tls.clone() {
                    None => tracker.spawn(async move {
                        shared.metrics.connections.inc();
                        crate::connection::serve_admitted(
                            &shared, stream, peer, stop, ticket, None,
                        )
                        .await;
                        shared.metrics.connections.dec();
                    }),
                    Some(acceptor) => tracker.spawn(async move {
                        shared.metrics.connections.inc();
                        serve_tls(&shared, &acceptor, stream, peer, stop, ticket).await;
                        shared.metrics.connections.dec();
                    }),
                };
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

/// Completes the TLS handshake (within the handshake deadline, shed like any
/// unregistered connection), then serves the connection with the identity it
/// established. The handshake and then the stream are boxed: rustls's connection is
/// about 1.2 KB and a generic future keeps several copies of its stream, which every
/// idle TV would pay for.
async fn serve_tls<S: Store>(
    shared: &Arc<Shared<S>>,
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    mut ticket: limits::Ticket,
) {
    // Boxed: its state (rustls's connection and the TCP stream) lives only until the
    // handshake ends, not in the task for the TV's whole session. And the stream is
    // boxed inside a block: a local holding it (the handshake's result) would
    // otherwise keep its room in the task across the session's await.
    let tls = {
        let handshake = Box::pin(tokio::time::timeout(
            shared.config.handshake_timeout(),
            acceptor.accept(stream),
        ));
        let done = tokio::select! {
            r = handshake => r,
            () = ticket.shed() => return,
        };
        match done {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(e)) => {
                shared.metrics.tls_failed.inc();
                // Not TLS, or a TLS client we cannot talk to.
                shared.gate.misbehaved(peer.ip());
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                shared.metrics.tls_failed.inc();
                tracing::debug!(%peer, "TLS handshake did not complete in time");
                return;
            }
        }
    };
    let identity = crate::tls::identity_of(tls.get_ref().1);
    Box::pin(crate::connection::serve_admitted(
        shared, tls, peer, stop, ticket, identity,
    ))
    .await;
}

/// How long a connection from a flooding source is held before it is refused.
const TARPIT_HOLD: Duration = Duration::from_secs(1);

/// Refuses a just-accepted connection without holding its descriptor: one
/// non-blocking write of the rejecting preamble (a fresh socket's send buffer always
/// has room for it), whatever the client sent already read away so the close is a
/// clean FIN, then closed. On the TLS port the refusal comes before any TLS: the
/// client sees this preamble where it expected a ServerHello.
fn refuse_now(stream: TcpStream, status: ErrorCode, reason: &str) {
    let mut out = Preamble::server(status).encode().to_vec();
    out.extend_from_slice(&encode_reason(reason));
    let _ = stream.try_write(&out);
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    // Room for a whole ClientHello (one carrying a resumption ticket is ~600 bytes):
    // unread bytes would make the close a reset, which can overtake the refusal.
    let mut sink = [0u8; 2048];
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
