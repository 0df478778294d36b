//! The control client against a scripted server on loopback TCP: what a newer server may
//! send (event kinds, reply kinds this build does not know) is dropped or fails only its
//! own request, and the link stays up; refusals carry their reason; paging walks every
//! page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use control_client::{fetch_all_cached, Client, ClientError, Features, PagingError};
use futures::{SinkExt, StreamExt};
use shared_proto::envelope::{self, kind};
use shared_proto::preamble::encode_reason;
use shared_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// A scripted server's side of one connection.
struct FakeServer {
    conn: Framed<TcpStream, ServerCodec>,
}

impl FakeServer {
    /// Accepts one client, checks its preamble asks for `want`, and accepts it.
    async fn accept(listener: &TcpListener, want: Features) -> FakeServer {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut pre = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut pre).await.unwrap();
        let p = Preamble::decode(pre).unwrap();
        assert_eq!(p.version, PROTOCOL_VERSION);
        assert_eq!(p.features(), want);
        stream
            .write_all(&Preamble::server(ErrorCode::OK).encode())
            .await
            .unwrap();
        FakeServer {
            conn: Framed::new(stream, ServerCodec::new(PROTOCOL_VERSION)),
        }
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.conn.get_mut().write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, msg: ServerMsg) {
        self.conn.send(&msg).await.unwrap();
    }

    /// The next request (bounded wait).
    async fn request(&mut self) -> ClientMsg {
        let frame = tokio::time::timeout(Duration::from_secs(5), self.conn.next())
            .await
            .expect("a request in time")
            .expect("link open")
            .expect("decodes");
        match frame {
            ClientFrame::Msg(m) => m,
            other => panic!("{other:?}"),
        }
    }

    async fn reply(&mut self, id: RequestId, reply: Reply) {
        self.send(ServerMsg::Reply {
            id,
            result: Ok(reply),
        })
        .await;
    }
}

async fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

#[tokio::test]
async fn unknown_events_are_logged_and_dropped_and_the_link_stays_up() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut s = FakeServer::accept(&l, Features::KNOWN).await;
        // An event kind from a newer server, then a known kind whose body this build
        // cannot read, then one it knows.
        s.raw(&envelope::frame(0x80ff, 0, b"presence: 1001 away"))
            .await;
        s.raw(&envelope::frame(kind::CALL_ENDED, 0, &[0xff, 0xff]))
            .await;
        s.raw(&envelope::frame(0xc0ff, 0, b"a future control message"))
            .await;
        s.send(ServerMsg::Event(Event::CallAnswered {
            call_id: 9,
            srtp: None,
            ice: None,
        }))
        .await;
        let m = s.request().await;
        assert_eq!(m.request, Request::Heartbeat);
        s.reply(m.id, Reply::HeartbeatAck { server_time_ms: 42 })
            .await;
        s
    });
    let mut c = Client::connect(addr).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), c.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        e,
        Event::CallAnswered {
            call_id: 9,
            srtp: None,
            ice: None,
        }
    );
    assert_eq!(c.skipped(), 3);
    assert_eq!(
        c.request(Request::Heartbeat).await.unwrap(),
        Reply::HeartbeatAck { server_time_ms: 42 }
    );
    server.await.unwrap();
}

#[tokio::test]
async fn an_unreadable_reply_fails_only_its_request() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut s = FakeServer::accept(&l, Features::CALLS).await;
        let first = s.request().await;
        assert!(matches!(first.request, Request::QueryState { .. }));
        // A reply kind this build does not know, for the first request.
        s.raw(&envelope::frame(0x40ff, first.id, b"a newer reply"))
            .await;
        let second = s.request().await;
        s.reply(second.id, Reply::Done).await;
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut c = Client::handshake_with(stream, Features::CALLS)
        .await
        .unwrap();
    match c.request(Request::QueryState { users: vec![1] }).await {
        Err(ClientError::Codec(CodecError::Malformed(reason))) => {
            assert!(reason.contains("0x40ff"), "{reason}")
        }
        other => panic!("expected an unreadable reply, got {other:?}"),
    }
    assert_eq!(
        c.request(Request::HangUp { call_id: 1 }).await.unwrap(),
        Reply::Done
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_refusal_carries_its_status_and_reason() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let (mut stream, _) = l.accept().await.unwrap();
        let mut pre = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut pre).await.unwrap();
        let mut out = Preamble::server(ErrorCode::SERVER_FULL).encode().to_vec();
        out.extend_from_slice(&encode_reason("server is full, retry later"));
        stream.write_all(&out).await.unwrap();
    });
    match Client::connect(addr).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::SERVER_FULL);
            assert_eq!(e.message, "server is full, retry later");
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }
    server.await.unwrap();
}

fn cached(call_id: CallId) -> CachedCall {
    CachedCall {
        call_id,
        caller: 7,
        callee: 8,
        call_date_ms: 1,
        reason: MissedReason::Offline,
        caller_state: NetState::Online,
    }
}

#[tokio::test]
async fn paging_walks_every_page_and_acknowledges_in_pages() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut s = FakeServer::accept(&l, Features::KNOWN).await;
        // 600 calls, ids 1..=600, in pages of the size asked for.
        for _ in 0..3 {
            let m = s.request().await;
            let Request::FetchCached { after, limit } = m.request else {
                panic!("{:?}", m.request)
            };
            let end = (after + u64::from(limit)).min(600);
            let calls: Vec<CachedCall> = (after + 1..=end).map(cached).collect();
            // An event between pages is queued, not lost.
            s.send(ServerMsg::Event(Event::CachedCallsWaiting { count: 600 }))
                .await;
            s.reply(
                m.id,
                Reply::Cached(CachedPage {
                    calls,
                    more: end < 600,
                }),
            )
            .await;
        }
        let mut acked = 0;
        while acked < 600 {
            let m = s.request().await;
            let Request::AckCached { call_ids } = m.request else {
                panic!("{:?}", m.request)
            };
            assert!(call_ids.len() <= MAX_PAGE);
            acked += call_ids.len();
            s.reply(
                m.id,
                Reply::Acked {
                    count: call_ids.len() as u32,
                },
            )
            .await;
        }
    });
    let mut c = Client::connect(addr).await.unwrap();
    let calls = c.fetch_all_cached().await.unwrap();
    let ids: Vec<CallId> = calls.iter().map(|c| c.call_id).collect();
    assert_eq!(ids, (1..=600).collect::<Vec<_>>());
    assert_eq!(c.queued_events().len(), 3);
    assert_eq!(c.ack_cached(&ids).await.unwrap(), 600);
    server.await.unwrap();
}

#[tokio::test]
async fn the_paging_helper_runs_over_any_request_function() {
    // As the agent uses it: over a request function of its own (here, canned pages).
    let pages = std::cell::RefCell::new(vec![
        Reply::Cached(CachedPage {
            calls: vec![cached(3)],
            more: false,
        }),
        Reply::Cached(CachedPage {
            calls: vec![cached(1), cached(2)],
            more: true,
        }),
    ]);
    let asked = std::cell::RefCell::new(Vec::new());
    let calls = fetch_all_cached(|req| {
        asked.borrow_mut().push(req);
        let next = pages.borrow_mut().pop();
        async move { next.ok_or("no more pages") }
    })
    .await
    .unwrap();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        asked.into_inner(),
        vec![
            Request::FetchCached {
                after: 0,
                limit: MAX_PAGE as u16
            },
            Request::FetchCached {
                after: 2,
                limit: MAX_PAGE as u16
            },
        ]
    );
    // A failing request stops the fetch with its error.
    let r = fetch_all_cached(|_| async { Err::<Reply, _>("link down") }).await;
    assert!(matches!(r, Err(PagingError::Request("link down"))));
}
