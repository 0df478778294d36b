//! The TV's UDP media socket, bound first at power-on and shared by every call's media
//! session.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// Binds the UDP media socket: address reuse, roomy buffers, and the voice DSCP (EF)
/// so home routers prioritise call audio.
pub fn bind_media(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    use anyhow::Context;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    let _ = socket.set_recv_buffer_size(256 * 1024);
    let _ = socket.set_send_buffer_size(256 * 1024);
    if addr.is_ipv4() {
        // DSCP 46 (expedited forwarding) in the upper six bits of the TOS byte.
        let _ = socket.set_tos_v4(46 << 2);
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind the media socket to {addr}"))?;
    Ok(UdpSocket::from_std(socket.into())?)
}
