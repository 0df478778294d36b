//! [`Client`]: one request at a time, events queued in between. The load generator and
//! the tests use it to play TVs; it runs over TCP ([`Client::connect`]) or any stream
//! ([`Client::handshake`]).

use std::collections::VecDeque;
use std::net::SocketAddr;

use shared_proto::{
    CachedCall, CallId, Event, Features, Register, Registered, Reply, Request, UserId,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

use crate::connection::{handshake, Connection, Incoming};
use crate::error::ClientError;
use crate::paging::{ack_requests, CachedPager, PagingError};

/// The agent version a [`Client`] registers with unless told otherwise.
pub const DEFAULT_AGENT_VERSION: &str = concat!("control-client/", env!("CARGO_PKG_VERSION"));

/// One control connection, used one request at a time.
pub struct Client<S = TcpStream> {
    /// The connection.
    conn: Connection<S>,
    /// Events that arrived while waiting for a reply, oldest first.
    events: VecDeque<Event>,
    /// Sent in [`Client::register`].
    agent_version: String,
}

impl Client<TcpStream> {
    /// Connects over TCP and exchanges preambles, asking for every known feature.
    pub async fn connect(server: SocketAddr) -> Result<Self, ClientError> {
        Self::connect_from(None, server).await
    }

    /// Connects from a chosen local address (to spread many TVs over source IPs).
    pub async fn connect_from(
        local: Option<SocketAddr>,
        server: SocketAddr,
    ) -> Result<Self, ClientError> {
        Self::handshake(tcp_connect(server, local).await?).await
    }
}

/// A TCP connection to `server` (from `local`, if given) with Nagle off: what every
/// control connection, plain or under TLS, starts as.
pub async fn tcp_connect(
    server: SocketAddr,
    local: Option<SocketAddr>,
) -> std::io::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(local) = local {
        socket.bind(local)?;
    }
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Client<crate::Stream> {
    /// Connects over `transport` to `server` (an address; a TLS server's certificate
    /// must be valid for its IP) and exchanges preambles, asking for every known feature.
    pub async fn connect_with(
        transport: &crate::Transport,
        server: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<Self, ClientError> {
        let name = server.ip().to_string();
        let stream = transport
            .connect_addr(server, &name, local)
            .await
            .map_err(ClientError::from_connect)?;
        Self::handshake(stream).await
    }
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Exchanges preambles on an open stream, asking for every known feature.
    pub async fn handshake(stream: S) -> Result<Self, ClientError> {
        Self::handshake_with(stream, Features::KNOWN).await
    }

    /// Exchanges preambles on an open stream, asking for `features` only.
    pub async fn handshake_with(stream: S, features: Features) -> Result<Self, ClientError> {
        Ok(Client {
            conn: handshake(stream, features).await?,
            events: VecDeque::new(),
            agent_version: DEFAULT_AGENT_VERSION.into(),
        })
    }

    /// A client over a connection already set up (e.g. handed back by
    /// [`crate::dispatch::assign`] when `--server` is a node).
    pub fn from_connection(conn: Connection<S>) -> Self {
        Client {
            conn,
            events: VecDeque::new(),
            agent_version: DEFAULT_AGENT_VERSION.into(),
        }
    }

    /// Registers with this agent version from now on.
    pub fn with_agent_version(mut self, version: impl Into<String>) -> Self {
        self.agent_version = version.into();
        self
    }

    /// Sends a request and waits for its reply, queueing events that come first.
    pub async fn request(&mut self, request: Request) -> Result<Reply, ClientError> {
        let events = &mut self.events;
        self.conn.call(request, |e| events.push_back(e)).await
    }

    /// The next event (queued, or read from the link).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            if let Incoming::Event(e) = self.conn.recv().await? {
                return Ok(e);
            }
        }
    }

    /// Events received so far and not taken yet.
    pub fn queued_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Sends raw bytes (for tests of bad input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.conn.send_raw(bytes).await
    }

    /// How many frames this client dropped because it cannot use them.
    pub fn skipped(&self) -> u64 {
        self.conn.skipped()
    }

    /// Registers as `user` with this media port.
    pub async fn register(
        &mut self,
        user: UserId,
        media_port: u16,
    ) -> Result<Registered, ClientError> {
        let request = Request::Register(Register {
            user_id: user,
            media_port,
            agent_version: self.agent_version.clone(),
        });
        match self.request(request).await? {
            Reply::Registered(r) => Ok(r),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Fetches every cached call (all pages), without acknowledging.
    pub async fn fetch_all_cached(&mut self) -> Result<Vec<CachedCall>, ClientError> {
        let mut pager = CachedPager::new();
        let mut out = Vec::new();
        while let Some(request) = pager.next_request() {
            let reply = self.request(request).await?;
            out.extend(pager.on_reply(reply).map_err(|e| match e {
                PagingError::<ClientError>::Request(e) => e,
                PagingError::Unexpected(r) => ClientError::Unexpected(r),
                e @ PagingError::NoProgress { .. } => ClientError::Protocol(e.to_string()),
            })?);
        }
        Ok(out)
    }

    /// Acknowledges cached calls in pages; returns how many were newly marked delivered.
    pub async fn ack_cached(&mut self, ids: &[CallId]) -> Result<u32, ClientError> {
        let mut total: u32 = 0;
        for request in ack_requests(ids) {
            match self.request(request).await? {
                Reply::Acked { count } => total = total.saturating_add(count),
                other => return Err(ClientError::Unexpected(Box::new(other))),
            }
        }
        Ok(total)
    }

    /// Closes the link the way a TV powering off does.
    pub async fn bye(mut self) -> Result<(), ClientError> {
        self.request(Request::Bye).await?;
        Ok(())
    }

    /// The connection underneath.
    pub fn connection(&mut self) -> &mut Connection<S> {
        &mut self.conn
    }
}
