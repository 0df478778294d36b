//! A minimal async client of the control protocol: connect with the preamble, send
//! requests and match their replies, queue the events that arrive in between.
//!
//! The load generator and the tests use it to play TVs over real TCP.

use std::collections::VecDeque;
use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use shared_proto::{
    CachedCall, ClientMsg, CodecError, ControlCodec, ErrorCode, Event, Preamble, Register,
    Registered, Reply, Request, ServerMsg, UserId, WireError, PREAMBLE_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the connection in its preamble.
    #[error("refused: {0}")]
    Refused(WireError),
    /// The server answered the request with an error.
    #[error("server error: {0}")]
    Server(WireError),
    /// The server closed the connection (with its reason, if it gave one).
    #[error("connection closed: {0:?}")]
    Closed(Option<WireError>),
    /// A frame could not be read or written.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// A reply of the wrong kind.
    #[error("unexpected reply: {0:?}")]
    Unexpected(Box<Reply>),
}

impl ClientError {
    /// The server's error code, if the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(e) | ClientError::Server(e) => Some(e.code),
            ClientError::Closed(Some(e)) => Some(e.code),
            _ => None,
        }
    }
}

/// One control connection.
pub struct Client {
    conn: Framed<TcpStream, ControlCodec<ServerMsg, ClientMsg>>,
    next_id: u32,
    events: VecDeque<Event>,
}

impl Client {
    /// Connects and exchanges preambles.
    pub async fn connect(server: SocketAddr) -> Result<Client, ClientError> {
        Self::connect_from(None, server).await
    }

    /// Connects from a chosen local address (to spread many TVs over source IPs).
    pub async fn connect_from(
        local: Option<SocketAddr>,
        server: SocketAddr,
    ) -> Result<Client, ClientError> {
        let socket = if server.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(local) = local {
            socket.bind(local)?;
        }
        let mut stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&Preamble::client().encode()).await?;
        let mut pre = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut pre).await?;
        let p = Preamble::decode(pre).map_err(|e| {
            ClientError::Refused(WireError::new(ErrorCode::BAD_FRAME, e.to_string()))
        })?;
        if p.status() != ErrorCode::OK {
            let mut len = [0u8; 2];
            let mut reason = String::new();
            if stream.read_exact(&mut len).await.is_ok() {
                let mut buf = vec![0u8; shared_proto::preamble::reason_len(len)];
                if stream.read_exact(&mut buf).await.is_ok() {
                    reason = String::from_utf8_lossy(&buf).into_owned();
                }
            }
            return Err(ClientError::Refused(WireError::new(p.status(), reason)));
        }
        Ok(Client {
            conn: Framed::new(stream, ControlCodec::new()),
            next_id: 1,
            events: VecDeque::new(),
        })
    }

    /// Sends a request and waits for its reply, queueing events that come first.
    pub async fn request(&mut self, request: Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.conn.send(&ClientMsg { id, request }).await?;
        loop {
            match self.read().await? {
                ServerMsg::Reply { id: rid, result } if rid == id => {
                    return result.map_err(ClientError::Server)
                }
                ServerMsg::Reply { .. } => {} // a stale reply; ignore
                ServerMsg::Event(e) => self.events.push_back(e),
                ServerMsg::Closing(e) => return Err(ClientError::Closed(Some(e))),
            }
        }
    }

    async fn read(&mut self) -> Result<ServerMsg, ClientError> {
        match self.conn.next().await {
            Some(Ok(msg)) => Ok(msg),
            Some(Err(e)) => Err(e.into()),
            None => Err(ClientError::Closed(None)),
        }
    }

    /// The next event (queued, or read from the link).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            match self.read().await? {
                ServerMsg::Event(e) => return Ok(e),
                ServerMsg::Closing(e) => return Err(ClientError::Closed(Some(e))),
                ServerMsg::Reply { .. } => {}
            }
        }
    }

    /// Events received so far and not taken yet.
    pub fn queued_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Sends raw bytes (for tests of bad input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.conn.get_mut().write_all(bytes).await?;
        Ok(())
    }

    /// Registers as `user` with this media port.
    pub async fn register(
        &mut self,
        user: UserId,
        media_port: u16,
    ) -> Result<Registered, ClientError> {
        match self
            .request(Request::Register(Register {
                user_id: user,
                media_port,
                agent_version: concat!("loadgen/", env!("CARGO_PKG_VERSION")).into(),
            }))
            .await?
        {
            Reply::Registered(r) => Ok(r),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Fetches every cached call (all pages), without acknowledging.
    pub async fn fetch_all_cached(&mut self) -> Result<Vec<CachedCall>, ClientError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            match self
                .request(Request::FetchCached {
                    after,
                    limit: shared_proto::MAX_PAGE as u16,
                })
                .await?
            {
                Reply::Cached(page) => {
                    if let Some(last) = page.calls.last() {
                        after = last.call_id;
                    }
                    out.extend(page.calls);
                    if !page.more {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::Unexpected(Box::new(other))),
            }
        }
    }

    /// Acknowledges cached calls in pages; returns how many were newly marked delivered.
    pub async fn ack_cached(&mut self, ids: &[u64]) -> Result<u32, ClientError> {
        let mut total = 0;
        for chunk in ids.chunks(shared_proto::MAX_PAGE) {
            match self
                .request(Request::AckCached {
                    call_ids: chunk.to_vec(),
                })
                .await?
            {
                Reply::Acked { count } => total += count,
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
}
