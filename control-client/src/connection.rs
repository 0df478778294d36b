//! One control connection: the preamble handshake, then requests out and replies and
//! events in, over any byte stream.
//!
//! Frames this build cannot use ([`ServerFrame::Skipped`]) never break the link: an
//! unknown event is logged and dropped (and counted, [`Connection::skipped`]); a reply
//! it cannot decode becomes [`Incoming::Unreadable`] for that one request.

use futures::{SinkExt, StreamExt};
use shared_proto::{
    preamble::reason_len, ClientCodec, ClientMsg, ErrorCode, Event, Features, KindClass, Preamble,
    Reply, Request, RequestId, ServerFrame, ServerMsg, WireError, PREAMBLE_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;

use crate::error::ClientError;

/// Exchanges preambles on `stream`, asking for `features`, and returns the connection.
/// A refusing server's status and reason come back as [`ClientError::Refused`].
pub async fn handshake<S>(mut stream: S, features: Features) -> Result<Connection<S>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    stream
        .write_all(&Preamble::client_with(features).encode())
        .await?;
    stream.flush().await?;
    read_accept(&mut stream).await?;
    Ok(Connection::handshaken(stream))
}

/// Reads the server's preamble, once the client's is sent: `Ok` if it accepts this
/// protocol version; a refusing server's status and reason as [`ClientError::Refused`].
pub(crate) async fn read_accept<S>(stream: &mut S) -> Result<(), ClientError>
where
    S: AsyncRead + Unpin,
{
    let mut pre = [0u8; PREAMBLE_LEN];
    stream.read_exact(&mut pre).await?;
    let p = Preamble::decode(pre)
        .map_err(|e| ClientError::Refused(WireError::new(ErrorCode::BAD_FRAME, e.to_string())))?;
    if p.status() != ErrorCode::OK {
        let mut len = [0u8; 2];
        let mut reason = String::new();
        if stream.read_exact(&mut len).await.is_ok() {
            let mut buf = vec![0u8; reason_len(len)];
            if stream.read_exact(&mut buf).await.is_ok() {
                reason = String::from_utf8_lossy(&buf).into_owned();
            }
        }
        return Err(ClientError::Refused(WireError::new(p.status(), reason)));
    }
    if p.version != PROTOCOL_VERSION {
        return Err(ClientError::Refused(WireError::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "the server accepted with protocol version {}, this client speaks {PROTOCOL_VERSION}",
                p.version
            ),
        )));
    }
    Ok(())
}

/// What arrived from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The reply to the request with this id.
    Reply {
        /// The request's id.
        id: RequestId,
        /// Success, or the server's typed error.
        result: Result<Reply, WireError>,
    },
    /// A reply to the request with this id that this build cannot decode (a newer
    /// server). The request may have taken effect.
    Unreadable {
        /// The request's id.
        id: RequestId,
        /// Why, for the log.
        reason: String,
    },
    /// A server push.
    Event(Event),
}

/// An established control connection (after the handshake).
pub struct Connection<S> {
    /// The stream, framed by the version-2 client codec.
    framed: Framed<S, ClientCodec>,
    /// The id the next request gets; never 0.
    next_id: RequestId,
    /// Frames dropped because this build cannot use them.
    skipped: u64,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// A connection over `stream` whose preambles were exchanged already (and nothing
    /// of a frame read: the stream is at a frame boundary).
    pub(crate) fn handshaken(stream: S) -> Connection<S> {
        Connection {
            framed: Framed::new(stream, ClientCodec::new()),
            next_id: 1,
            skipped: 0,
        }
    }

    /// Sends a request with a fresh id and returns that id.
    pub async fn send(&mut self, request: Request) -> Result<RequestId, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.framed.send(&ClientMsg { id, request }).await?;
        Ok(id)
    }

    /// The next reply or event. A `Closing` frame is [`ClientError::Closed`] with the
    /// server's reason; end of stream is `Closed(None)`. Frames this build cannot use
    /// are logged and skipped. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            let frame = match self.framed.next().await {
                Some(frame) => frame?,
                None => return Err(ClientError::Closed(None)),
            };
            match frame {
                ServerFrame::Msg(ServerMsg::Reply { id, result }) => {
                    return Ok(Incoming::Reply { id, result })
                }
                ServerFrame::Msg(ServerMsg::Event(e)) => return Ok(Incoming::Event(e)),
                ServerFrame::Msg(ServerMsg::Closing(e)) => {
                    return Err(ClientError::Closed(Some(e)))
                }
                ServerFrame::Skipped {
                    kind,
                    id,
                    class,
                    reason,
                } => {
                    self.skipped = self.skipped.saturating_add(1);
                    if class == KindClass::Reply {
                        tracing::warn!(kind, id, %reason, "reply not understood");
                        return Ok(Incoming::Unreadable { id, reason });
                    }
                    tracing::info!(kind, ?class, %reason, "dropped a message this build does not know");
                }
            }
        }
    }

    /// Sends `request` and waits for its reply, handing events that arrive first to
    /// `on_event` and ignoring replies to other (stale) requests.
    pub async fn call(
        &mut self,
        request: Request,
        mut on_event: impl FnMut(Event),
    ) -> Result<Reply, ClientError> {
        let id = self.send(request).await?;
        loop {
            match self.recv().await? {
                Incoming::Reply { id: rid, result } if rid == id => {
                    return result.map_err(ClientError::Server)
                }
                Incoming::Unreadable { id: rid, reason } if rid == id => {
                    return Err(ClientError::Codec(shared_proto::CodecError::Malformed(
                        reason,
                    )))
                }
                Incoming::Reply { .. } | Incoming::Unreadable { .. } => {}
                Incoming::Event(e) => on_event(e),
            }
        }
    }

    /// Writes raw bytes to the stream (for tests of bad input and of unknown kinds).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        // `send` flushes every frame, so nothing of the codec's is still buffered.
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    /// How many frames were dropped (or replies failed) because this build cannot use them.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }
}
