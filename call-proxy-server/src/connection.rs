//! One TV's control connection: preamble, registration deadline, request loop with a
//! rate limit, heartbeat timeout, server pushes, and the offline record when it ends.
//!
//! A connection's failure never reaches another: bad input ends this connection with a
//! reason (a rejecting preamble, or a `Closing` frame) and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use shared_proto::{
    ClientMsg, CodecError, ControlCodec, ErrorCode, Preamble, ServerMsg, WireError, PREAMBLE_LEN,
    PROTOCOL_VERSION,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::Framed;

use crate::handler::{self, end_session, ConnState};
use crate::registry::PushRx;
use crate::server::{refuse, Shared};
use crate::storage::Store;

type Conn = Framed<TcpStream, ControlCodec<ClientMsg, ServerMsg>>;

/// Serves one accepted connection until it closes.
pub async fn serve<S: Store>(
    shared: &Arc<Shared<S>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
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
    match Preamble::decode(pre) {
        Err(e) => {
            shared.metrics.bad_input.inc();
            tracing::debug!(%peer, error = %e, "refused non-protocol client");
            refuse(stream, ErrorCode::BAD_FRAME, &e.to_string()).await;
            return;
        }
        Ok(p) if p.version != PROTOCOL_VERSION => {
            shared.metrics.bad_input.inc();
            let reason = format!(
                "protocol version {} is not supported; this server speaks version {PROTOCOL_VERSION}",
                p.version
            );
            refuse(stream, ErrorCode::UNSUPPORTED_VERSION, &reason).await;
            return;
        }
        Ok(_) => {}
    }
    if timeout(
        shared.config.write_timeout(),
        tokio::io::AsyncWriteExt::write_all(&mut stream, &Preamble::server(ErrorCode::OK).encode()),
    )
    .await
    .map_or(true, |r| r.is_err())
    {
        return;
    }

    // Small buffers: an idle TV then costs only what its few frames needed. A
    // registration fits in the first read.
    let mut conn = Framed::with_capacity(
        stream,
        ControlCodec::with_max_frame_len(shared.config.max_frame_len),
        64,
    );
    *conn.write_buffer_mut() = BytesMut::new();
    let mut st = ConnState::new(peer);
    let end = request_loop(shared, &mut conn, &mut st, stop, started + handshake).await;
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

/// Runs requests until the connection ends. Returns the reason to send the TV, if the
/// server is the one ending it.
async fn request_loop<S: Store>(
    shared: &Arc<Shared<S>>,
    conn: &mut Conn,
    st: &mut ConnState,
    mut stop: watch::Receiver<bool>,
    register_by: Instant,
) -> Option<WireError> {
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
                        if timeout(write_timeout, conn.send(&*msg)).await.map_or(true, |r| r.is_err()) {
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
                let ClientMsg { id, request } = msg;
                let result = if limit.allow(now) {
                    // Boxed so the idle connection future does not carry the largest
                    // handler's state.
                    Box::pin(handler::handle(shared, st, request)).await
                } else {
                    shared.metrics.rate_limited.inc();
                    if limit.refused_in_a_row > cfg.request_burst.saturating_mul(2) {
                        return Some(WireError::new(ErrorCode::RATE_LIMITED, "too many requests; disconnected"));
                    }
                    Err(WireError::new(ErrorCode::RATE_LIMITED, "too many requests; slow down"))
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
                if timeout(write_timeout, conn.send(&*msg)).await.map_or(true, |r| r.is_err()) {
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
    }
}

/// Releases buffer memory a large frame left behind, so idle TVs stay small.
fn shrink_buffers(conn: &mut Conn) {
    const KEEP: usize = 1024;
    if conn.read_buffer().is_empty() && conn.read_buffer().capacity() > KEEP {
        *conn.read_buffer_mut() = BytesMut::new();
    }
    if conn.write_buffer().is_empty() && conn.write_buffer().capacity() > KEEP {
        *conn.write_buffer_mut() = BytesMut::new();
    }
}
