//! How a TV reaches the server: TLS 1.3 (the default) or, for lab use only, plain TCP;
//! both behind one stream type, so the link code does not care which.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::recorded::Recorded;
use crate::tls::{host_of, TlsClient};

/// A control connection's byte stream: plain TCP or TLS over TCP.
pub type Stream = Either<TcpStream, TlsStream<Recorded<TcpStream>>>;

/// Plain TCP (lab use, `--insecure-plaintext`) or TLS to a server.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Plain TCP: nothing is encrypted or authenticated.
    Plaintext,
    /// TLS 1.3 with the TV's certificate.
    Tls(TlsClient),
}

impl Transport {
    /// Connects to `server` (`host:port`), resolving the name, and completes the TLS
    /// handshake if there is one (the server's certificate must be valid for the host).
    pub async fn connect(
        &self,
        server: &str,
        local: Option<SocketAddr>,
    ) -> std::io::Result<Stream> {
        let addr = tokio::net::lookup_host(server)
            .await?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{server} resolves to no address"),
                )
            })?;
        self.connect_addr(addr, host_of(server), local).await
    }

    /// Connects to `addr`, checking a TLS server's certificate against `name`.
    pub async fn connect_addr(
        &self,
        addr: SocketAddr,
        name: &str,
        local: Option<SocketAddr>,
    ) -> std::io::Result<Stream> {
        match self {
            Transport::Plaintext => {
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                if let Some(local) = local {
                    socket.bind(local)?;
                }
                let stream = socket.connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(Either::Left(stream))
            }
            Transport::Tls(tls) => Ok(Either::Right(tls.connect(addr, name, local).await?)),
        }
    }
}
