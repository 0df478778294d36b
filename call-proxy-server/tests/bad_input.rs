//! Hostile and broken clients: each gets a clear error or a closed connection, and a
//! well-behaved TV on the same server keeps being served throughout. All of it inside
//! TLS, where the control protocol lives, but for a silent plain-TCP connection (more
//! garbage and stalls before or instead of the TLS handshake are in `trust.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use call_proxy_server::client::ClientError;
use common::{TestServer, Tv};
use shared_proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Reads what the server sends until it closes (bounded).
async fn read_until_close(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// The status and reason of a rejecting preamble.
fn refusal(bytes: &[u8]) -> (ErrorCode, String) {
    assert!(bytes.len() >= 10, "preamble + reason, got {bytes:?}");
    let p = Preamble::decode(bytes[..8].try_into().unwrap()).unwrap();
    let len = u16::from_be_bytes([bytes[8], bytes[9]]) as usize;
    (
        p.status(),
        String::from_utf8_lossy(&bytes[10..10 + len]).into_owned(),
    )
}

/// The `Closing` reason a server sends on an established link.
async fn closing_reason(c: &mut Tv) -> WireError {
    match tokio::time::timeout(Duration::from_secs(5), c.next_event()).await {
        Ok(Err(ClientError::Closed(Some(e)))) => e,
        other => panic!("expected a Closing frame, got {other:?}"),
    }
}

/// A TV that must keep working while the others misbehave.
async fn still_served(good: &mut Tv) {
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        good.request(Request::QueryState { users: vec![1001] }),
    )
    .await
    .expect("served in time")
    .expect("served");
    assert!(matches!(reply, Reply::States(_)));
}

#[tokio::test]
async fn garbage_wrong_version_oversized_malformed_and_stalled_clients() {
    let srv = TestServer::start_with(|c| {
        c.handshake_timeout_ms = 500;
        c.max_frame_len = 4096;
    })
    .await;
    let mut good = srv.tv(1001, 5004).await;

    // Not our protocol at all.
    let mut http = srv.raw_tls().await;
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (code, reason) = refusal(&read_until_close(&mut http).await);
    assert_eq!(code, ErrorCode::BAD_FRAME);
    assert!(reason.contains("bad magic"), "{reason}");
    still_served(&mut good).await;

    // A future protocol version.
    let mut v9 = srv.raw_tls().await;
    v9.write_all(
        &Preamble {
            version: 9,
            word: 0,
        }
        .encode(),
    )
    .await
    .unwrap();
    let (code, reason) = refusal(&read_until_close(&mut v9).await);
    assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);
    assert!(reason.contains("version 9"), "{reason}");
    still_served(&mut good).await;

    // A frame announcing 1 GiB.
    let mut big = srv.stranger().await.unwrap();
    big.send_raw(&(1u32 << 30).to_be_bytes()).await.unwrap();
    assert_eq!(
        closing_reason(&mut big).await.code,
        ErrorCode::FRAME_TOO_LARGE
    );
    still_served(&mut good).await;

    // A frame of random bytes.
    let mut junk = srv.stranger().await.unwrap();
    junk.send_raw(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0xff])
        .await
        .unwrap();
    assert_eq!(closing_reason(&mut junk).await.code, ErrorCode::BAD_FRAME);
    still_served(&mut good).await;

    // Half a frame, then silence: cut off at the registration deadline.
    let mut stall = srv.stranger().await.unwrap();
    stall.send_raw(&[0, 0, 0, 40, 1, 0]).await.unwrap();
    still_served(&mut good).await;
    assert_eq!(
        closing_reason(&mut stall).await.code,
        ErrorCode::HANDSHAKE_TIMEOUT
    );

    // Connects (TLS done) and never says anything; and, meanwhile, one that never
    // even starts TLS (plain TCP: the attack below the control protocol), closed at the
    // same deadline without a word, as a failed TLS handshake.
    let tls_failed = srv.shared.metrics.tls_failed.get();
    let mut mute = srv.raw_tls().await;
    let mut mute_tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (said, said_tcp) =
        tokio::join!(read_until_close(&mut mute), read_until_close(&mut mute_tcp));
    let (code, _) = refusal(&said);
    assert_eq!(code, ErrorCode::HANDSHAKE_TIMEOUT);
    assert!(said_tcp.is_empty(), "{said_tcp:?}");
    assert_eq!(srv.shared.metrics.tls_failed.get(), tls_failed + 1);

    still_served(&mut good).await;
    assert!(srv.shared.metrics.bad_input.get() >= 6);
    srv.stop().await;
}

#[tokio::test]
async fn a_flood_is_rate_limited_without_hurting_others() {
    let srv = TestServer::start_with(|c| {
        c.requests_per_sec = 10;
        c.request_burst = 20;
    })
    .await;
    let mut good = srv.tv(1001, 5004).await;
    let mut flood = srv.tv(2002, 6004).await;
    let mut limited = 0;
    let mut closed = None;
    for _ in 0..200 {
        match flood.request(Request::Heartbeat).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::RATE_LIMITED) => {
                if let ClientError::Closed(_) = e {
                    closed = Some(e);
                    break;
                }
                limited += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(limited > 0, "the flood was limited");
    assert!(
        closed.is_some(),
        "a client that keeps flooding is disconnected"
    );
    still_served(&mut good).await;
    srv.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_with_a_reason() {
    let srv = TestServer::start_with(|c| c.max_connections = 2).await;
    let _a = srv.tv(1001, 5004).await;
    let mut b = srv.tv(2002, 6004).await;
    match srv.stranger().await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::SERVER_FULL),
        Err(e) => panic!("expected SERVER_FULL, got {e}"),
        Ok(_) => panic!("expected SERVER_FULL, got a connection"),
    }
    b.request(Request::Heartbeat).await.unwrap();
    srv.stop().await;
}
