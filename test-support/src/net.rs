//! Loopback ports for tests: a free one, and waiting until a listener is up.

use std::net::SocketAddr;
use std::time::Duration;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts TCP connections at `addr` (polling every 10 ms), for
/// at most `limit`. Returns whether it did.
pub async fn wait_listening(addr: SocketAddr, limit: Duration) -> bool {
    let every = Duration::from_millis(10);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`wait_listening`] for a port on 127.0.0.1.
pub async fn wait_listening_port(port: u16, limit: Duration) -> bool {
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), limit).await
}
