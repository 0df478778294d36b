//! Reading a refusal sent in place of TLS: a server that refuses a connection at accept
//! (full, or the source flooded) sends its rejecting preamble and reason in plain text
//! before any TLS, where the client expects a ServerHello. [`Recorded`] keeps a copy of
//! the first bytes read until the handshake is done, and [`refusal_instead_of_tls`]
//! reads the status and reason out of them with the protocol's own preamble reader, so
//! a TV refused on the TLS port learns why, as it would on plain TCP.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use shared_proto::{Features, Preamble, WireError, PREAMBLE_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::error::ClientError;

/// How much of what a server sends first is kept (a preamble and a reason of at most a
/// few hundred bytes).
const RECORDED: usize = 1024;

/// How long the rest of a refusal's reason may take to arrive.
const REASON_WAIT: Duration = Duration::from_secs(2);

/// A stream that keeps a copy of the first bytes read from it until [`Recorded::stop`].
#[derive(Debug)]
pub struct Recorded<S> {
    inner: S,
    /// The first bytes read, until recording stops (then `None`).
    seen: Option<Vec<u8>>,
}

impl<S> Recorded<S> {
    /// Starts recording what is read from `inner`.
    pub fn new(inner: S) -> Recorded<S> {
        Recorded {
            inner,
            seen: Some(Vec::new()),
        }
    }

    /// Stops recording and frees what was kept.
    pub fn stop(&mut self) {
        self.seen = None;
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(seen)) = (&r, this.seen.as_mut()) {
            let new = buf.filled().get(before..).unwrap_or_default();
            let room = RECORDED.saturating_sub(seen.len());
            seen.extend_from_slice(&new[..new.len().min(room)]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The refusal a server sent in place of its side of the TLS handshake, if it did: the
/// recorded bytes start with a server preamble, and its status and reason are read as
/// the plain-TCP handshake reads them (with whatever of the reason is still to come).
pub async fn refusal_instead_of_tls<S: AsyncRead + Unpin + Send>(
    stream: Recorded<S>,
) -> Option<WireError> {
    let seen = stream.seen?;
    let first: [u8; PREAMBLE_LEN] = seen.get(..PREAMBLE_LEN)?.try_into().ok()?;
    Preamble::decode(first).ok()?;
    let rest = std::io::Cursor::new(seen).chain(stream.inner);
    let replayed = tokio::io::join(rest, tokio::io::sink());
    match tokio::time::timeout(
        REASON_WAIT,
        crate::connection::handshake(replayed, Features::KNOWN),
    )
    .await
    {
        Ok(Err(ClientError::Refused(w))) => Some(w),
        _ => None,
    }
}

/// An I/O error saying the server refused the connection before TLS, with its reason
/// (see [`ClientError::from_connect`]).
#[derive(Debug, thiserror::Error)]
#[error("server refused: {} ({})", .0.code.name(), .0.message)]
pub struct RefusedBeforeTls(pub WireError);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shared_proto::{preamble::encode_reason, ErrorCode};

    #[tokio::test]
    async fn a_refusal_in_place_of_tls_is_read_with_its_reason_and_tls_is_not() {
        let mut refusal = Preamble::server(ErrorCode::SERVER_FULL).encode().to_vec();
        refusal.extend_from_slice(&encode_reason("server is full, retry later"));
        // What the TLS client read before it gave up: one read, as rustls does.
        let mut sink = [0u8; 4096];
        let mut r = Recorded::new(&refusal[..]);
        assert!(r.read(&mut sink).await.unwrap() > 0);
        let w = refusal_instead_of_tls(r).await.unwrap();
        assert_eq!(w.code, ErrorCode::SERVER_FULL);
        assert_eq!(w.message, "server is full, retry later");

        // A TLS record (a ServerHello or an alert) is not a refusal.
        let tls = [0x16u8, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28, 0, 0, 0];
        let mut r = Recorded::new(&tls[..]);
        assert!(r.read(&mut sink).await.unwrap() > 0);
        assert!(refusal_instead_of_tls(r).await.is_none());

        // Stopped: nothing kept.
        let mut r = Recorded::new(&refusal[..]);
        assert!(r.read(&mut sink).await.unwrap() > 0);
        r.stop();
        assert!(refusal_instead_of_tls(r).await.is_none());
    }
}
