//! One TV's control connection: preamble, registration deadline, request loop with a
//! rate limit, heartbeat timeout, server pushes, and the offline record when it ends.
//!
//! Until its `Register` arrives, a connection may be shed by the admission gate
//! ([`crate::server::limits`]) to make room for a newer one. The rate limit costs a
//! flooding client, not the server: requests over the limit it is not waiting for
//! (more of its frames already arrived) are dropped unanswered, and a client that keeps
//! sending over the limit is closed. `Bye`, and one heartbeat per half interval, are
//! always honoured.
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
//!
//! Traffic accounting: the stream is counted ([`Counted`]); a registered connection
//! hands its account's usage (session, time, bytes both ways) to the node's
//! [`crate::accounting::Accountant`] when it registers, at most every
//! `accounting_flush_ms` as frames arrive, and when it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use shared_proto::{
    ClientFrame, ClientMsg, CodecError, EnrollmentStatus, ErrorCode, Features, Preamble, Reply,
    Request, ServerCodec, ServerMsg, WireError, MIN_PROTOCOL_VERSION, PREAMBLE_LEN,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::Framed;

use crate::accounting::{Counted, Reported, Usage};
use crate::clock::now_ms;
use crate::handler::{self, end_session, ConnState};
use crate::registry::PushRx;
use crate::server::limits::{NotAdmitted, Ticket};
use crate::server::{refuse, Shared};
use crate::storage::Store;
use crate::tls::TvIdentity;

type Conn<T> = Framed<T, ServerCodec>;

/// How long the goodbye to a shed or flooding connection may take: it must not hold
/// its descriptor (the attacker need not read).
const QUICK_GOODBYE: Duration = Duration::from_millis(250);

/// Read-buffer room reserved once a client goes over its rate limit: its pipelined
/// frames are then read many per system call and dropped from the buffer.
const FLOOD_READ: usize = 16 * 1024;

/// Serves one connection until it closes, outside the admission gate (embedders and
/// tests that hand it a stream themselves). `stream` is the TV's byte stream (plain TCP
/// today, or a TLS stream wrapping it); `peer` is its address.
pub fn serve<'a, S: Store, T>(
    shared: &'a Arc<Shared<S>>,
    stream: T,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'a
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    serve_inner(shared, stream, peer, stop, None, None)
}

/// Serves one connection the gate admitted; `ticket` holds its slot and sheds it if a
/// newer connection needs the room before this one registered. `identity` is the TV
/// certificate its TLS handshake established (`None` on plain TCP).
///
/// Not an `async fn` (nor is [`serve`]): a wrapping `async fn` would store its
/// arguments a second time in every idle TV's task.
pub fn serve_admitted<'a, S: Store, T>(
    shared: &'a Arc<Shared<S>>,
    stream: T,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    ticket: Ticket,
    identity: Option<TvIdentity>,
) -> impl Future<Output = ()> + Send + 'a
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    serve_inner(shared, stream, peer, stop, Some(ticket), identity)
}

/// The next revoked fingerprint (never, without a subscription or once the server
/// dropped the sender); an error says some were missed.
async fn next_revoked(
    rx: &mut Option<tokio::sync::broadcast::Receiver<crate::tls::Fingerprint>>,
) -> Result<crate::tls::Fingerprint, ()> {
    use tokio::sync::broadcast::error::RecvError;
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    match r.recv().await {
        Ok(fp) => Ok(fp),
        Err(RecvError::Lagged(_)) => Err(()),
        Err(RecvError::Closed) => {
            *rx = None;
            std::future::pending().await
        }
    }
}

/// Completes when the connection is shed (never without a ticket).
async fn shed(ticket: &mut Option<Ticket>) {
    match ticket {
        Some(t) => t.shed().await,
        None => std::future::pending().await,
    }
}

fn shed_reason() -> WireError {
    WireError::new(
        ErrorCode::SERVER_FULL,
        "server is full; connections that do not register promptly are closed first",
    )
}

async fn serve_inner<S: Store, T>(
    shared: &Arc<Shared<S>>,
    stream: T,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    mut ticket: Option<Ticket>,
    identity: Option<TvIdentity>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let mut stream = Counted::new(stream);
    let handshake = shared.config.handshake_timeout();
    let mut pre = [0u8; PREAMBLE_LEN];
    let read = tokio::select! {
        r = timeout(handshake, stream.read_exact(&mut pre)) => Some(r),
        () = shed(&mut ticket) => None,
    };
    let Some(read) = read else {
        let _ = timeout(
            QUICK_GOODBYE,
            refuse(stream, ErrorCode::SERVER_FULL, &shed_reason().message),
        )
        .await;
        return;
    };
    match read {
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
            shared.gate.misbehaved(peer.ip());
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
    st.identity = identity;
    st.wants_presence = features.contains(Features::PRESENCE);
    let mut reported = Reported::new(started);
    let end = request_loop(
        shared,
        &mut conn,
        &mut st,
        features,
        stop,
        started + handshake,
        &mut ticket,
        &mut reported,
    )
    .await;
    if let Some((reason, quick)) = end {
        let limit = if quick {
            QUICK_GOODBYE.min(shared.config.write_timeout())
        } else {
            shared.config.write_timeout()
        };
        let _ = timeout(limit, conn.send(ServerMsg::Closing(reason))).await;
    }
    account(shared, &conn, &mut reported, Instant::now());
    // Boxed, as every large await that an idle TV's task never reaches: a task's future
    // is as large as its largest state, and ending a session (recording a call's end,
    // telling another node) is 2.4 KB of state that every idle TV would otherwise carry.
    Box::pin(end_session(shared, &mut st)).await;
    drop(ticket);
}

/// What the rate limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Within the allowance: handle it.
    Allow,
    /// Over the allowance: not handled (answered `RATE_LIMITED` only if the client is
    /// waiting for it).
    Over,
    /// Over the allowance too often: close the connection.
    Close,
}

/// A token bucket: `rate` requests per second sustained, `burst` at once; plus the count
/// of requests over it, after which the connection is closed.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    /// Requests over the limit since the allowance was last whole; a client that keeps
    /// flooding (never slowing down long enough to refill it) is disconnected beyond
    /// `close_after`.
    over: u32,
    /// How many requests over the limit are tolerated: 3 × burst.
    close_after: u32,
    /// When the last heartbeat exempt from the allowance arrived.
    free_heartbeat_at: Option<Instant>,
    /// How often a heartbeat is exempt: half the heartbeat interval, so a TV's own
    /// heartbeats always are.
    free_heartbeat_every: Duration,
}

impl RateLimit {
    fn new(rate: u32, burst: u32, heartbeat_interval: Duration) -> Self {
        let burst_n = burst.max(1);
        let burst = f64::from(burst_n);
        RateLimit {
            tokens: burst,
            rate: f64::from(rate.max(1)),
            burst,
            last: Instant::now(),
            over: 0,
            close_after: burst_n.saturating_mul(3),
            free_heartbeat_at: None,
            free_heartbeat_every: heartbeat_interval / 2,
        }
    }

    fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= self.burst {
            // Slowed down until the allowance is whole: past excess is forgiven.
            self.over = 0;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Verdict::Allow
        } else {
            self.over = self.over.saturating_add(1);
            if self.over > self.close_after {
                Verdict::Close
            } else {
                Verdict::Over
            }
        }
    }

    /// Whether a heartbeat arriving now is honoured outside the allowance (at most one
    /// per half heartbeat interval).
    fn free_heartbeat(&mut self, now: Instant) -> bool {
        let due = self
            .free_heartbeat_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.free_heartbeat_every);
        if due {
            self.free_heartbeat_at = Some(now);
        }
        due
    }
}

async fn next_push(rx: &mut Option<PushRx>) -> Option<Box<ServerMsg>> {
    match rx {
        Some(rx) => rx.recv_async().await.ok(),
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

/// Hands the account's usage since the last report to the node's accountant (nothing
/// before the connection registered: unauthenticated traffic is nobody's). The account
/// is the one the connection registered as, also once its session ended (`Bye`).
fn account<S: Store, T>(
    shared: &Shared<S>,
    conn: &Conn<Counted<T>>,
    reported: &mut Reported,
    now: Instant,
) {
    let Some(user) = reported.user else { return };
    let usage = reported.since(conn.get_ref().counts(), now);
    shared.metrics.accounted_in.inc_by(usage.control_in);
    shared.metrics.accounted_out.inc_by(usage.control_out);
    shared.accountant.note(user, &usage, now_ms());
}

/// Runs requests until the connection ends. Returns the reason to send the TV, if the
/// server is the one ending it, and whether that goodbye must be quick (a shed or
/// flooding connection).
#[allow(clippy::too_many_arguments)]
async fn request_loop<S: Store, T>(
    shared: &Arc<Shared<S>>,
    conn: &mut Conn<Counted<T>>,
    st: &mut ConnState,
    features: Features,
    mut stop: watch::Receiver<bool>,
    register_by: Instant,
    ticket: &mut Option<Ticket>,
    reported: &mut Reported,
) -> Option<(WireError, bool)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &shared.config;
    let mut deadline = register_by;
    // Until it registers, the connection lives by `deadline` as the registration
    // deadline (pushed on while an enrollment it polls is pending).
    let mut unregistered = true;
    let mut limit = RateLimit::new(
        cfg.requests_per_sec,
        cfg.request_burst,
        Duration::from_millis(cfg.heartbeat_interval_ms),
    );
    let write_timeout = cfg.write_timeout();
    let account_every = Duration::from_millis(cfg.accounting_flush_ms);
    // Only a connection with a TV certificate can be revoked.
    let mut revoked = st.identity.as_ref().map(|_| shared.revoked.subscribe());
    loop {
        tokio::select! {
            biased;
            r = next_revoked(&mut revoked) => {
                let Some(identity) = st.identity.as_ref() else { continue };
                let mine = match r {
                    Ok(fp) => fp == identity.fingerprint,
                    // Missed some: ask the database about this TV's own credential.
                    Err(_) => !matches!(
                        Box::pin(shared.store.credential(identity.fingerprint.0)).await,
                        Ok(Some(c)) if !c.revoked
                    ),
                };
                if mine {
                    shared.metrics.revoked_sessions.inc();
                    return Some((WireError::new(ErrorCode::UNAUTHENTICATED, "this TV's credential was revoked"), true));
                }
            }
            _ = stop.changed() => {
                // Deliver what is queued (calls ended by the shutdown), then say goodbye.
                if let Some(rx) = st.push_rx.as_mut() {
                    while let Ok(msg) = rx.try_recv() {
                        if !push_out(conn, &msg, features, write_timeout).await {
                            return None;
                        }
                    }
                }
                return Some((WireError::new(ErrorCode::SHUTTING_DOWN, "the server is shutting down"), false));
            }
            () = shed(ticket) => return Some((shed_reason(), true)),
            frame = conn.next() => {
                let msg = match frame {
                    None => return None,
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => return bad_frame(shared, st.peer.ip(), e).map(|r| (r, false)),
                };
                let now = Instant::now();
                if st.session.is_some() || st.transfer.is_some() {
                    deadline = now + cfg.heartbeat_timeout();
                }
                // After a heartbeat (what an idle TV sends) or its registration (after
                // which a TV is mostly idle) the read buffer goes too: the next frame is
                // likely a heartbeat interval away.
                let goes_idle = matches!(
                    &msg,
                    ClientFrame::Msg(ClientMsg {
                        request: Request::Heartbeat | Request::Register(_),
                        ..
                    })
                );
                // Acknowledgements are taken at once and never answered. One that
                // acknowledges a notification sent is free (a TV watching many busy users
                // acknowledges more often than the request rate allows, and the server
                // sends no faster than it acknowledges); one for nothing costs the
                // allowance like any request.
                if let ClientFrame::Msg(ClientMsg {
                    request: Request::PresenceAck { subscription, seq, status },
                    ..
                }) = &msg
                {
                    if !handler::presence::ack(shared, st, *subscription, *seq, *status)
                        && limit.check(now) == Verdict::Close
                    {
                        shared.metrics.rate_limited.inc();
                        shared.metrics.flood_closed.inc();
                        shared.gate.flooded(st.peer.ip());
                        return Some((WireError::new(ErrorCode::RATE_LIMITED, "too many requests; disconnected"), true));
                    }
                    continue;
                }
                let (always, registering) = match &msg {
                    ClientFrame::Msg(ClientMsg { request: Request::Bye, .. }) => (true, false),
                    // A transfer link's chunks are paced by TCP and by one being handled
                    // at a time, not by the request rate (a 10 MB body is 200 of them).
                    ClientFrame::Msg(ClientMsg {
                        request: Request::PutChunk { .. } | Request::GetChunk { .. },
                        ..
                    }) => (st.transfer.is_some(), false),
                    ClientFrame::Msg(ClientMsg { request: Request::OpenTransfer { .. }, .. }) => {
                        (false, st.session.is_none() && st.transfer.is_none())
                    }
                    ClientFrame::Msg(ClientMsg { request: Request::Heartbeat, .. }) => {
                        (limit.free_heartbeat(now), false)
                    }
                    ClientFrame::Msg(ClientMsg { request: Request::Register(_), .. }) => {
                        (false, st.session.is_none())
                    }
                    ClientFrame::Unknown { .. } | ClientFrame::Msg(_) => (false, false),
                };
                let verdict = if always { Verdict::Allow } else { limit.check(now) };
                let (id, result) = match verdict {
                    Verdict::Allow => {
                        if registering {
                            if let Some(t) = ticket.as_mut() {
                                match t.registering() {
                                    Ok(()) => {}
                                    Err(NotAdmitted::Shed) => return Some((shed_reason(), true)),
                                    Err(NotAdmitted::PerIpLimit) => {
                                        shared.metrics.refused_per_ip.inc();
                                        return Some((WireError::new(
                                            ErrorCode::SERVER_FULL,
                                            "too many TVs registered from this address; retry later",
                                        ), true));
                                    }
                                }
                            }
                        }
                        let handled = match msg {
                            // Boxed so the idle connection future does not carry the largest
                            // handler's state.
                            ClientFrame::Msg(ClientMsg { id, request }) => {
                                (id, Box::pin(handler::handle(shared, st, request)).await)
                            }
                            ClientFrame::Unknown { id, kind } => (id, Err(handler::unsupported(kind))),
                        };
                        if registering {
                            if let Some(t) = ticket.as_mut() {
                                if st.session.is_some() || st.transfer.is_some() {
                                    t.registered();
                                } else {
                                    t.registration_failed();
                                }
                            }
                        }
                        handled
                    }
                    Verdict::Over => {
                        shared.metrics.rate_limited.inc();
                        let waiting = conn.read_buffer().is_empty();
                        // Read what else it sent in one go from now on (the small idle
                        // buffer would read about a frame per call), so frames it sent
                        // without waiting show up as already buffered.
                        conn.read_buffer_mut().reserve(FLOOD_READ);
                        if !waiting {
                            // More of its frames arrived already: it is not waiting for
                            // this answer. Dropping it costs the server nothing.
                            shared.metrics.rate_limited_dropped.inc();
                            continue;
                        }
                        (msg.id(), Err(WireError::new(ErrorCode::RATE_LIMITED, "too many requests; slow down")))
                    }
                    Verdict::Close => {
                        shared.metrics.rate_limited.inc();
                        shared.metrics.flood_closed.inc();
                        shared.gate.flooded(st.peer.ip());
                        return Some((WireError::new(ErrorCode::RATE_LIMITED, "too many requests; disconnected"), true));
                    }
                };
                if (st.session.is_some() || st.transfer.is_some()) && unregistered {
                    unregistered = false;
                    deadline = now + cfg.heartbeat_timeout();
                    // A session starts: its time counts from now, its bytes from the
                    // connection's first (the handshake and the registration). A
                    // transfer link's bytes count for its TV, but it is no session.
                    if let Some(key) = st.session {
                        reported.user = Some(key.user);
                        reported.at = now;
                        let start = Usage { sessions: 1, ..Usage::default() };
                        shared.accountant.note(key.user, &start, now_ms());
                    } else if let Some(user) = st.transfer {
                        reported.user = Some(user);
                        reported.transfer = true;
                        reported.at = now;
                    }
                } else if unregistered {
                    if let Ok(Reply::Enrollment(EnrollmentStatus::Pending { interval_s, .. })) = &result {
                        // A TV waiting for its code's approval polls this link: it stays
                        // open for as long as the code is pending (an operator takes
                        // minutes), each answer buying it two more poll intervals. Still
                        // unregistered, so it is shed first when the server is full.
                        let wait = Duration::from_secs(u64::from(*interval_s).saturating_mul(2) + 1);
                        deadline = deadline.max(now + wait.max(cfg.handshake_timeout()));
                    }
                }
                let reply = ServerMsg::Reply { id, result };
                if timeout(write_timeout, conn.send(&reply)).await.map_or(true, |r| r.is_err()) {
                    return None;
                }
                if st.closing {
                    return None;
                }
                if now.saturating_duration_since(reported.at) >= account_every {
                    account(shared, conn, reported, now);
                }
                if verdict == Verdict::Allow {
                    // Over the limit, the larger read buffer stays: the client's next
                    // frames are read in one go and dropped.
                    shrink_buffers(conn, goes_idle);
                }
            }
            push = next_push(&mut st.push_rx) => {
                let msg = push?;
                if !push_out(conn, &msg, features, write_timeout).await {
                    return None;
                }
                if matches!(*msg, ServerMsg::Closing(_)) {
                    return None;
                }
                release_write_buffer(conn);
            }
            () = sleep_until(deadline) => {
                shared.metrics.bad_input.inc();
                return Some((if st.session.is_some() {
                    WireError::new(ErrorCode::HEARTBEAT_TIMEOUT, "nothing heard from this TV in time")
                } else {
                    WireError::new(ErrorCode::HANDSHAKE_TIMEOUT, "no registration received in time")
                }, false));
            }
        }
    }
}

fn bad_frame<S: Store>(
    shared: &Shared<S>,
    peer: std::net::IpAddr,
    e: CodecError,
) -> Option<WireError> {
    shared.metrics.bad_input.inc();
    if !matches!(e, CodecError::Io(_)) {
        shared.gate.misbehaved(peer);
    }
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

/// Releases buffer memory a frame left behind, so idle TVs stay small: a read buffer
/// grown past [`KEEP_READ`] by a large frame, or any once the TV is `idle` (it just sent a
/// heartbeat or registered), and the write buffer whenever it is empty (an idle TV is
/// written to every heartbeat interval at most: one small allocation per reply costs less
/// than holding the largest reply's room in every idle session).
fn shrink_buffers<T>(conn: &mut Conn<T>, idle: bool) {
    let keep = if idle { 0 } else { KEEP_READ };
    if conn.read_buffer().is_empty() && conn.read_buffer().capacity() > keep {
        *conn.read_buffer_mut() = BytesMut::new();
    }
    release_write_buffer(conn);
}

/// Frees the write buffer once everything in it was written.
fn release_write_buffer<T>(conn: &mut Conn<T>) {
    if conn.write_buffer().is_empty() && conn.write_buffer().capacity() > 0 {
        *conn.write_buffer_mut() = BytesMut::new();
    }
}

/// Read-buffer room kept between frames (a registration or a heartbeat fits).
const KEEP_READ: usize = 1024;
