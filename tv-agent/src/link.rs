//! The control link to the call-proxy server (TLS, or plain TCP in the lab), as a task:
//! the agent's policy of
//! reconnecting and heartbeating around the protocol client of `control-client`
//! (handshake, requests matched to replies, events). It connects, registers, sends
//! heartbeats, forwards server events — and when the link breaks or the server is
//! unreachable, reconnects and re-registers forever with capped exponential backoff and
//! jitter.
//!
//! `--server` may be a node or the distribution service: over TLS, every connection
//! first asks `ASSIGN` ([`control_client::dispatch`]). A node answers `UNSUPPORTED` and
//! the TV registers on that same link (a single node needs no other setting); a
//! dispatcher answers with a node and a token, and the TV registers at that node
//! presenting the token in its TLS handshake. After losing its node (or failing to reach
//! it) the TV goes back to the dispatcher, naming that node, for a new assignment.

use std::time::Duration;

use control_client::dispatch::{assign, Assigned};
use control_client::{
    handshake, ClientError, Connection, Features, Incoming, Pending, Stream, Transport,
};
use rand::Rng;
use shared_proto::dispatch::Assign;
use shared_proto::{ErrorCode, Event, Register, Registered, Reply, Request, UserId, WireError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The server, `host:port`.
    pub server: String,
    /// This TV's user number.
    pub user: UserId,
    /// The media port to register (the bound one, or the one advertised).
    pub media_port: u16,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long a request may wait for its reply.
    pub request_timeout: Duration,
    /// TLS with the TV's key, or plain TCP.
    pub transport: Transport,
}

/// How a [`LinkEvent::Down`] reason starts when the server refused this TV's credential
/// (not enrolled, revoked, another user's): retrying does not help until it is enrolled.
pub const UNAUTHENTICATED_REASON: &str = "not authenticated:";

/// How a [`LinkEvent::Down`] reason starts when the distribution service assigns this
/// TV no node because its account used its traffic allowance for the period (retried
/// with the usual backoff: the operator may raise it, or the period ends).
pub const ALLOWANCE_REASON: &str = "service allowance used up:";

impl LinkConfig {
    /// Defaults for `user` at `server`.
    pub fn new(server: impl Into<String>, user: UserId, media_port: u16) -> Self {
        LinkConfig {
            server: server.into(),
            user,
            media_port,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            transport: Transport::Plaintext,
        }
    }
}

/// What the link tells the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Registered (again): cached calls can be fetched now.
    Registered(Registered),
    /// The link is down (or could not come up); it retries after `retry_in`.
    Down {
        /// Why.
        reason: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// A server push.
    Server(Event),
}

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// Not registered with the server right now.
    #[error("not connected to the server")]
    NotConnected,
    /// The server answered with an error.
    #[error("{0}")]
    Server(WireError),
    /// No reply in time.
    #[error("the server did not answer in time")]
    Timeout,
    /// The link task is gone (powered off).
    #[error("the link is closed")]
    Closed,
}

impl LinkError {
    /// The server's error code, if it gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            LinkError::Server(e) => Some(e.code),
            _ => None,
        }
    }
}

enum Command {
    Request(Request, oneshot::Sender<Result<Reply, LinkError>>),
    /// A request the server does not answer (a presence acknowledgement).
    Send(Request),
    PowerOff(oneshot::Sender<()>),
}

/// Sends requests over the link. Cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    tx: mpsc::Sender<Command>,
}

impl LinkHandle {
    /// Sends a request and waits for its reply.
    pub async fn request(&self, request: Request) -> Result<Reply, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Request(request, tx))
            .await
            .map_err(|_| LinkError::Closed)?;
        rx.await.map_err(|_| LinkError::Closed)?
    }

    /// Sends a request the server does not answer (`PresenceAck`), if the link is up;
    /// dropped otherwise (the subscription it belonged to went with the session).
    pub async fn send(&self, request: Request) -> Result<(), LinkError> {
        self.tx
            .send(Command::Send(request))
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Powers off: says `Bye` (the server records the TV offline) and closes the link.
    pub async fn power_off(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::PowerOff(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the link task.
pub fn spawn(cfg: LinkConfig) -> (LinkHandle, mpsc::Receiver<LinkEvent>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (ev_tx, ev_rx) = mpsc::channel(256);
    tokio::spawn(run(cfg, cmd_rx, ev_tx));
    (LinkHandle { tx: cmd_tx }, ev_rx)
}

type Conn = Connection<Stream>;

/// How a registered session ended.
enum SessionEnd {
    Lost(String),
    PoweredOff,
}

async fn run(cfg: LinkConfig, mut cmds: mpsc::Receiver<Command>, events: mpsc::Sender<LinkEvent>) {
    let mut backoff = cfg.backoff_min;
    // The dispatcher's node this TV last lost or could not reach ("": none).
    let mut lost_node = String::new();
    loop {
        let mut at_node = None;
        let reason = match connect(&cfg, &lost_node, &mut at_node).await {
            Ok((conn, registered)) => {
                backoff = cfg.backoff_min;
                let hb =
                    Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
                if events
                    .send(LinkEvent::Registered(registered))
                    .await
                    .is_err()
                {
                    return;
                }
                match session(&cfg, conn, hb, &mut cmds, &events).await {
                    SessionEnd::PoweredOff => return,
                    SessionEnd::Lost(reason) => reason,
                }
            }
            Err(reason) => reason,
        };
        lost_node = at_node.unwrap_or_default();
        // Full jitter on the upper half, so a thousand TVs rebooting after a power cut
        // do not reconnect in lockstep.
        let wait = {
            let half = backoff / 2;
            half + rand::rng().random_range(Duration::ZERO..=half)
        };
        backoff = (backoff * 2).min(cfg.backoff_max);
        tracing::info!(%reason, retry_in = ?wait, "control link down");
        if events
            .send(LinkEvent::Down {
                reason,
                retry_in: wait,
            })
            .await
            .is_err()
        {
            return;
        }
        let until = Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Command::Request(_, reply)) => { let _ = reply.send(Err(LinkError::NotConnected)); }
                    Some(Command::Send(_)) => {}
                    Some(Command::PowerOff(done)) => { let _ = done.send(()); return; }
                },
            }
        }
    }
}

/// Why the server closed the link, marked as [`UNAUTHENTICATED_REASON`] when it was for
/// want of a valid credential (a revoked TV).
fn closed_reason(what: &str, e: &WireError) -> String {
    if e.code == ErrorCode::UNAUTHENTICATED {
        format!("{UNAUTHENTICATED_REASON} {}", e.message)
    } else {
        format!("{what}: {e}")
    }
}

fn refused_text(e: ClientError) -> String {
    match e {
        ClientError::Refused(w) => {
            format!("server refused: {} ({})", w.code.name(), w.message)
        }
        ClientError::Io(e) => format!("no preamble from the server: {e}"),
        e => e.to_string(),
    }
}

/// The registered-to-be connection: at `--server` itself (a node), or at the node the
/// dispatcher at `--server` assigned (its id set in `at_node`).
async fn reach_node(
    cfg: &LinkConfig,
    lost_node: &str,
    at_node: &mut Option<String>,
) -> Result<Conn, String> {
    let stream = cfg
        .transport
        .connect(&cfg.server, None)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", cfg.server))?;
    let Transport::Tls(tls) = &cfg.transport else {
        // Plain TCP (lab use): no dispatcher, whose tokens are bound to a TLS certificate.
        return handshake(stream, Features::KNOWN)
            .await
            .map_err(refused_text);
    };
    let ask = Assign {
        agent_version: AGENT_VERSION.into(),
        unreachable_node: lost_node.into(),
    };
    let assignment = match assign(stream, Features::KNOWN, &ask).await {
        Ok(Assigned::AtNode(conn)) => return Ok(conn),
        Ok(Assigned::Node(a)) => a,
        Err(ClientError::Server(e)) if e.code == ErrorCode::UNAUTHENTICATED => {
            return Err(format!("{UNAUTHENTICATED_REASON} {}", e.message))
        }
        Err(ClientError::Server(e)) if e.code == ErrorCode::ALLOWANCE_EXHAUSTED => {
            return Err(format!("{ALLOWANCE_REASON} {}", e.message))
        }
        Err(ClientError::Server(e)) => return Err(format!("the dispatcher refused: {e}")),
        Err(e) => return Err(refused_text(e)),
    };
    tracing::info!(node = %assignment.node_id, addr = %assignment.node_addr, "assigned a node");
    *at_node = Some(assignment.node_id.clone());
    let node_tls = tls
        .with_token(&assignment.token)
        .map_err(|e| format!("cannot present the dispatcher's token: {e}"))?;
    let stream = Transport::Tls(node_tls)
        .connect(&assignment.node_addr, None)
        .await
        .map_err(|e| format!("cannot connect to node {}: {e}", assignment.node_addr))?;
    handshake(stream, Features::KNOWN)
        .await
        .map_err(refused_text)
}

/// A transfer link's connection (messages): at the node the TV registers on, through
/// the dispatcher as a registration goes; no registration follows.
pub(crate) async fn reach_transfer_node(cfg: &LinkConfig) -> Result<Conn, String> {
    let mut at_node = None;
    reach_node(cfg, "", &mut at_node).await
}

/// Sent in `Register` and `ASSIGN`.
const AGENT_VERSION: &str = concat!("tv-agent/", env!("CARGO_PKG_VERSION"));

/// Connects (through the dispatcher, if `--server` is one), exchanges preambles and
/// registers. `at_node` is set to the dispatcher's node once one is assigned.
async fn connect(
    cfg: &LinkConfig,
    lost_node: &str,
    at_node: &mut Option<String>,
) -> Result<(Conn, Registered), String> {
    let attempt = async {
        let mut conn = reach_node(cfg, lost_node, at_node).await?;
        let register = Request::Register(Register {
            user_id: cfg.user,
            media_port: cfg.media_port,
            agent_version: AGENT_VERSION.into(),
        });
        // Nothing is pushed before registration; an event would be dropped here.
        match conn.call(register, |_| {}).await {
            Ok(Reply::Registered(r)) => Ok((conn, r)),
            Ok(other) => Err(format!("unexpected reply to register: {other:?}")),
            Err(ClientError::Server(e)) if e.code == ErrorCode::UNAUTHENTICATED => {
                Err(format!("{UNAUTHENTICATED_REASON} {}", e.message))
            }
            Err(ClientError::Server(e)) => Err(format!("registration refused: {e}")),
            Err(ClientError::Closed(Some(e))) => Err(closed_reason("server closed", &e)),
            Err(ClientError::Closed(None)) => Err("server closed the connection".into()),
            Err(e) => Err(e.to_string()),
        }
    };
    timeout(cfg.request_timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {} in time", cfg.server)))
}

/// Where a reply goes: the requester's channel, or nowhere (a heartbeat).
type Waiter = Option<oneshot::Sender<Result<Reply, LinkError>>>;

async fn session(
    cfg: &LinkConfig,
    mut conn: Conn,
    heartbeat: Duration,
    cmds: &mut mpsc::Receiver<Command>,
    events: &mpsc::Sender<LinkEvent>,
) -> SessionEnd {
    let mut pending: Pending<Waiter> = Pending::new();
    let mut last_heard = Instant::now();
    let dead_after = heartbeat * 3 + heartbeat / 2;
    let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let end = loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => break SessionEnd::PoweredOff,
                Some(Command::Request(request, reply)) => match conn.send(request).await {
                    Ok(id) => pending.insert(id, Some(reply), Instant::now() + cfg.request_timeout),
                    Err(e) => {
                        let _ = reply.send(Err(LinkError::NotConnected));
                        break SessionEnd::Lost(format!("send failed: {e}"));
                    }
                },
                Some(Command::Send(request)) => {
                    if let Err(e) = conn.send(request).await {
                        break SessionEnd::Lost(format!("send failed: {e}"));
                    }
                }
                Some(Command::PowerOff(done)) => {
                    // Wait (briefly) for the server to record us offline.
                    let _ = timeout(Duration::from_secs(2), conn.call(Request::Bye, |_| {})).await;
                    let _ = done.send(());
                    break SessionEnd::PoweredOff;
                }
            },
            incoming = conn.recv() => {
                last_heard = Instant::now();
                match incoming {
                    Ok(Incoming::Reply { id, result }) => {
                        if let Some(Some(reply)) = pending.take(id) {
                            let _ = reply.send(result.map_err(LinkError::Server));
                        }
                    }
                    Ok(Incoming::Unreadable { id, reason }) => {
                        if let Some(Some(reply)) = pending.take(id) {
                            let _ = reply.send(Err(LinkError::Server(WireError::new(
                                ErrorCode::BAD_FRAME,
                                format!("reply not understood: {reason}"),
                            ))));
                        }
                    }
                    Ok(Incoming::Event(e)) => {
                        if events.send(LinkEvent::Server(e)).await.is_err() {
                            break SessionEnd::PoweredOff;
                        }
                    }
                    Err(ClientError::Closed(Some(e))) => break SessionEnd::Lost(closed_reason("server closed the link", &e)),
                    Err(ClientError::Closed(None)) => break SessionEnd::Lost("server closed the connection".into()),
                    Err(e) => break SessionEnd::Lost(format!("link error: {e}")),
                }
            }
            _ = beat.tick() => {
                if last_heard.elapsed() > dead_after {
                    break SessionEnd::Lost("server stopped answering heartbeats".into());
                }
                let now = Instant::now();
                for reply in pending.expire(now).into_iter().flatten() {
                    let _ = reply.send(Err(LinkError::Timeout));
                }
                match conn.send(Request::Heartbeat).await {
                    Ok(id) => pending.insert(id, None, now + cfg.request_timeout),
                    Err(_) => break SessionEnd::Lost("heartbeat send failed".into()),
                }
            }
        }
    };
    for reply in pending.drain().into_iter().flatten() {
        let _ = reply.send(Err(LinkError::NotConnected));
    }
    end
}
