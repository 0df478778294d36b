//! One TV's control connection: preamble, registration deadline, request loop with a
//! rate limit, heartbeat timeout, server pushes, and the offline record when it ends.
//!
//! A connection's failure never reaches another: bad input ends this connection with a
//! reason (a rejecting preamble, or a `Closing` frame) and nothing else.
//!
//! The connection speaks the protocol version its client chose (1, frozen, or 2, the
//! kind-tagged envelope): an unknown request kind is answered `UNSUPPORTED` and the link
//! stays up, and a push goes out only if the session asked for its feature (a version-1
//! session gets exactly the pushes version 1 had).
//!
//! It runs over any byte stream (`AsyncRead + AsyncWrite`), so a TLS acceptor wraps the
//! TCP stream before handing it here; the peer's address comes as a parameter.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use shared_proto::{
    ClientFrame, ClientMsg, CodecError, ErrorCode, Features, Preamble, ServerCodec, ServerMsg,
    WireError, MIN_PROTOCOL_VERSION, PREAMBLE_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::Framed;

use crate::handler::{self, end_session, ConnState};
use crate::registry::PushRx;
use crate::server::{refuse, Shared};
use crate::storage::Store;

type Conn<T> = Framed<T, ServerCodec>;

/// Serves one accepted connection until it closes. `stream` is the TV's byte stream
/// (plain TCP today, or a TLS stream wrapping it); `peer` is its address.
pub async fn serve<S: Store, T>(
    shared: &Arc<Shared<S>>,
    mut stream: T,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let handshake = shared.config.handshake_timeout();
    let mut pre = [0u8; PREAMBLE_LEN];
    match timeout(handshake, stream.read_exact(&mut pre)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return, // closed before saying anything
        Err(_) => {
            shared.metrics.bad_input.inc();
            refuse(
                stream,
                ErrorCode::HANDSHAKE_TIMEOUT,
                "no preamble received in time",
            )
            .await;
            return;
        }
    }
    let client = match Preamble::decode(pre) {
        Err(e) => {
            shared.metrics.bad_input.inc();
            tracing::debug!(%peer, error = %e, "refused non-protocol client");
            refuse(stream, ErrorCode::BAD_FRAME, &e.to_string()).await;
            return;
        }
        Ok(p) if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&p.version) => {
            shared.metrics.bad_input.inc();
            let reason = format!(
                "protocol version {} is not supported; this server speaks versions \
                 {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                p.version
            );
            refuse(stream, ErrorCode::UNSUPPORTED_VERSION, &reason).await;
            return;
        }
        Ok(p) => p,
    };
    // Pushes this session gets: what it asked for, of what this server knows.
    let features = client.features().intersection(Features::KNOWN);
    let accept = Preamble::server_speaking(client.version, ErrorCode::OK).encode();
    let accepted = timeout(shared.config.write_timeout(), async {
        stream.write_all(&accept).await?;
        stream.flush().await
    })
    .await;
    if accepted.map_or(true, |r| r.is_err()) {
        return;
    }

    // Small buffers: an idle TV then costs only what its few frames needed. A
    // registration fits in the first read.
    let mut conn = Framed::with_capacity(
        stream,
        ServerCodec::with_max_frame_len(client.version, shared.config.max_frame_len),
        64,
    );
    *conn.write_buffer_mut() = BytesMut::new();
    let mut st = ConnState::new(peer);
    let end = request_loop(
        shared,
        &mut conn,
        &mut st,
        features,
        stop,
        started + handshake,
    )
    .await;
    if let Some(reason) = end {
        let _ = timeout(
            shared.config.write_timeout(),
            conn.send(ServerMsg::Closing(reason)),
        )
        .await;
    }
    end_session(shared, &mut st).await;
}

/// A token bucket: `rate` requests per second sustained, `burst` at once.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    /// Requests refused in a row; a client that keeps flooding is disconnected.
    refused_in_a_row: u32,
}

impl RateLimit {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit {
            tokens: burst,
            rate: f64::from(rate.max(1)),
            burst,
            last: Instant::now(),
            refused_in_a_row: 0,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            true
        } else {
            self.refused_in_a_row = self.refused_in_a_row.saturating_add(1);
            false
        }
    }
}

async fn next_push(rx: &mut Option<PushRx>) -> Option<Box<ServerMsg>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether a push goes to a session with these features: events only if it asked for
/// their kind; everything else (a `Closing`) always.
fn wanted(msg: &ServerMsg, features: Features) -> bool {
    match msg {
        ServerMsg::Event(e) => features.contains(Features::of(e)),
        ServerMsg::Reply { .. } | ServerMsg::Closing(_) => true,
    }
}

/// Sends a push the session wants; `false` if the link failed.
async fn push_out<T>(
    conn: &mut Conn<T>,
    msg: &ServerMsg,
    features: Features,
    write_timeout: std::time::Duration,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    if !wanted(msg, features) {
        return true;
    }
    match timeout(write_timeout, conn.send(msg)).await {
        Ok(Ok(())) => true,
        // A message this session's protocol version cannot express: nothing was
        // written, the link is intact.
        Ok(Err(CodecError::NotInVersion { version, what })) => {
            tracing::debug!(version, %what, "push not sent to an older client");
            true
        }
        Ok(Err(_)) | Err(_) => false,
    }
}

/// Runs requests until the connection ends. Returns the reason to send the TV, if the
/// server is the one ending it.
async fn request_loop<S: Store, T>(
    shared: &Arc<Shared<S>>,
    conn: &mut Conn<T>,
    st: &mut ConnState,
    features: Features,
    mut stop: watch::Receiver<bool>,
    register_by: Instant,
) -> Option<WireError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &shared.config;
    let mut deadline = register_by;
    let mut limit = RateLimit::new(cfg.requests_per_sec, cfg.request_burst);
    let write_timeout = cfg.write_timeout();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                // Deliver what is queued (calls ended by the shutdown), then say goodbye.
                if let Some(rx) = st.push_rx.as_mut() {
                    while let Ok(msg) = rx.try_recv() {
                        if !push_out(conn, &msg, features, write_timeout).await {
                            return None;
                        }
                    }
                }
                return Some(WireError::new(ErrorCode::SHUTTING_DOWN, "the server is shutting down"));
            }
            frame = conn.next() => {
                let msg = match frame {
                    None => return None,
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => return bad_frame(shared, e),
                };
                let now = Instant::now();
                if st.session.is_some() {
                    deadline = now + cfg.heartbeat_timeout();
                }
                let (id, result) = if limit.allow(now) {
                    match msg {
                        // Boxed so the idle connection future does not carry the largest
                        // handler's state.
                        ClientFrame::Msg(ClientMsg { id, request }) => {
                            (id, Box::pin(handler::handle(shared, st, request)).await)
                        }
                        ClientFrame::Unknown { id, kind } => (id, Err(handler::unsupported(kind))),
                    }
                } else {
                    shared.metrics.rate_limited.inc();
                    if limit.refused_in_a_row > cfg.request_burst.saturating_mul(2) {
                        return Some(WireError::new(ErrorCode::RATE_LIMITED, "too many requests; disconnected"));
                    }
                    (msg.id(), Err(WireError::new(ErrorCode::RATE_LIMITED, "too many requests; slow down")))
                };
                if st.session.is_some() && deadline == register_by {
                    deadline = now + cfg.heartbeat_timeout();
                }
                let reply = ServerMsg::Reply { id, result };
                if timeout(write_timeout, conn.send(&reply)).await.map_or(true, |r| r.is_err()) {
                    return None;
                }
                if st.closing {
                    return None;
                }
                shrink_buffers(conn);
            }
            push = next_push(&mut st.push_rx) => {
                let msg = push?;
                if !push_out(conn, &msg, features, write_timeout).await {
                    return None;
                }
                if matches!(*msg, ServerMsg::Closing(_)) {
                    return None;
                }
            }
            () = sleep_until(deadline) => {
                shared.metrics.bad_input.inc();
                return Some(if st.session.is_some() {
                    WireError::new(ErrorCode::HEARTBEAT_TIMEOUT, "nothing heard from this TV in time")
                } else {
                    WireError::new(ErrorCode::HANDSHAKE_TIMEOUT, "no registration received in time")
                });
            }
        }
    }
}

fn bad_frame<S: Store>(shared: &Shared<S>, e: CodecError) -> Option<WireError> {
    shared.metrics.bad_input.inc();
    match e {
        CodecError::Io(_) => None,
        CodecError::FrameTooLarge { max } => Some(WireError::new(
            ErrorCode::FRAME_TOO_LARGE,
            format!("frames are limited to {max} bytes"),
        )),
        CodecError::Malformed(m) | CodecError::Encode(m) => Some(WireError::new(
            ErrorCode::BAD_FRAME,
            format!("undecodable frame: {m}"),
        )),
        e @ CodecError::NotInVersion { .. } => Some(WireError::new(
            ErrorCode::BAD_FRAME,
            format!("undecodable frame: {e}"),
        )),
    }
}

/// Releases buffer memory a large frame left behind, so idle TVs stay small.
fn shrink_buffers<T>(conn: &mut Conn<T>) {
    const KEEP: usize = 1024;
    if conn.read_buffer().is_empty() && conn.read_buffer().capacity() > KEEP {
        *conn.read_buffer_mut() = BytesMut::new();
    }
    if conn.write_buffer().is_empty() && conn.write_buffer().capacity() > KEEP {
        *conn.write_buffer_mut() = BytesMut::new();
    }
}
