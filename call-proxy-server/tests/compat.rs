//! Protocol compatibility: an agent built before protocol version 2 (the frozen
//! `shared_proto::v1` message set and preamble) keeps working against this server, next
//! to version-2 clients; an unknown request kind is answered `UNSUPPORTED` on a link that
//! stays up; the preamble's feature bits decide which pushes a session gets. Over TLS with
//! enrolled TVs, as agents run now: the old agent's frames travel inside TLS unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use call_proxy_server::client::Client;
use call_proxy_server::server::limits::Admission;
use common::{dial, event, TestServer, Tls};
use futures::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use shared_proto::envelope::{self, kind};
use shared_proto::{v1, *};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Framed;

/// A client as agents built from the version-1 code are: the version-1 preamble (flags
/// zero) and whole-message bincode frames of the version-1 message set, inside the TLS
/// link of an enrolled TV.
struct OldClient {
    conn: Framed<Tls, v1::Codec<v1::ServerMsg, v1::ClientMsg>>,
    next_id: u32,
    events: VecDeque<v1::Event>,
}

impl OldClient {
    async fn connect(srv: &TestServer, user: UserId) -> OldClient {
        let mut stream = srv.tvs.raw_tls_as(srv.addr, user).await;
        stream
            .write_all(&v1::client_preamble().encode())
            .await
            .unwrap();
        let mut pre = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut pre).await.unwrap();
        let p = Preamble::decode(pre).unwrap();
        assert_eq!(p.status(), ErrorCode::OK);
        assert_eq!(
            p.version, 1,
            "the server speaks version 1 to a version-1 client"
        );
        OldClient {
            conn: Framed::new(stream, v1::Codec::new()),
            next_id: 1,
            events: VecDeque::new(),
        }
    }

    async fn request(&mut self, request: v1::Request) -> Result<v1::Reply, WireError> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn
            .send(&v1::ClientMsg { id, request })
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.conn.next())
                .await
                .expect("a reply in time")
                .expect("link open")
                .expect("a version-1 frame");
            match msg {
                v1::ServerMsg::Reply { id: rid, result } if rid == id => return result,
                v1::ServerMsg::Reply { .. } => {}
                v1::ServerMsg::Event(e) => self.events.push_back(e),
                v1::ServerMsg::Closing(e) => panic!("closed: {e}"),
            }
        }
    }

    async fn next_event(&mut self) -> v1::Event {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.conn.next())
                .await
                .expect("an event in time")
                .expect("link open")
                .expect("a version-1 frame");
            match msg {
                v1::ServerMsg::Event(e) => return e,
                v1::ServerMsg::Closing(e) => panic!("closed: {e}"),
                v1::ServerMsg::Reply { .. } => {}
            }
        }
    }

    async fn register(&mut self, user: UserId, media_port: u16) -> Registered {
        match self
            .request(v1::Request::Register(Register {
                user_id: user,
                media_port,
                agent_version: "tv-agent/0.1.0".into(),
            }))
            .await
            .unwrap()
        {
            v1::Reply::Registered(r) => r,
            other => panic!("{other:?}"),
        }
    }
}

const OLD: UserId = 1001;
const NEW: UserId = 2002;
const THIRD: UserId = 3003;

#[tokio::test]
async fn an_old_agent_registers_fetches_acks_dials_answers_and_hangs_up() {
    let srv = TestServer::start().await;

    // Registration, then power-off: the old TV is known and offline.
    let mut old = OldClient::connect(&srv, OLD).await;
    let reg = old.register(OLD, 5004).await;
    assert_eq!(reg.cached_waiting, 0);
    assert_eq!(old.request(v1::Request::Bye).await, Ok(v1::Reply::Done));

    // A new client's call to the old TV while it is off is cached.
    let mut new = srv.tv(NEW, 6004).await;
    assert!(matches!(
        dial(&mut new, OLD).await,
        DialOutcome::Cached { .. }
    ));

    // The old TV powers on: the cached call is fetched, acknowledged, and gone.
    let mut old = OldClient::connect(&srv, OLD).await;
    assert_eq!(old.register(OLD, 5004).await.cached_waiting, 1);
    let page = match old
        .request(v1::Request::FetchCached {
            after: 0,
            limit: 256,
        })
        .await
        .unwrap()
    {
        v1::Reply::Cached(page) => page,
        other => panic!("{other:?}"),
    };
    assert_eq!(page.calls.len(), 1);
    assert!(!page.more);
    assert_eq!(page.calls[0].caller, NEW);
    assert_eq!(page.calls[0].reason, MissedReason::Offline);
    let ids = vec![page.calls[0].call_id];
    assert_eq!(
        old.request(v1::Request::AckCached { call_ids: ids }).await,
        Ok(v1::Reply::Acked { count: 1 })
    );
    match old
        .request(v1::Request::FetchCached {
            after: 0,
            limit: 256,
        })
        .await
        .unwrap()
    {
        v1::Reply::Cached(page) => assert!(page.calls.is_empty()),
        other => panic!("{other:?}"),
    }

    // State query and heartbeat.
    match old
        .request(v1::Request::QueryState { users: vec![NEW] })
        .await
        .unwrap()
    {
        v1::Reply::States(s) => assert_eq!(s[0].state, NetState::Online),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        old.request(v1::Request::Heartbeat).await,
        Ok(v1::Reply::HeartbeatAck { .. })
    ));

    // Old dials new: ringing, answered, hung up by the old TV.
    let call_id = match old
        .request(v1::Request::Dial { callee: NEW })
        .await
        .unwrap()
    {
        v1::Reply::Dial(DialOutcome::Ringing {
            call_id,
            callee_media,
        }) => {
            assert_eq!(callee_media.port(), 6004);
            call_id
        }
        other => panic!("{other:?}"),
    };
    match event(&mut new).await {
        Event::IncomingCall {
            call_id: c,
            caller,
            caller_media,
            ..
        } => {
            assert_eq!((c, caller, caller_media.port()), (call_id, OLD, 5004));
        }
        other => panic!("{other:?}"),
    }
    new.request(Request::Answer {
        call_id,
        srtp: None,
        ice: None,
    })
    .await
    .unwrap();
    assert_eq!(old.next_event().await, v1::Event::CallAnswered { call_id });

    // While they talk, a third TV's call to the old TV is busy: the old TV is told
    // missed calls wait (a version-1 event).
    let mut third = srv.tv(THIRD, 7004).await;
    assert!(matches!(
        dial(&mut third, OLD).await,
        DialOutcome::Busy { .. }
    ));
    assert!(matches!(
        old.next_event().await,
        v1::Event::CachedCallsWaiting { count: 1 }
    ));

    assert_eq!(
        old.request(v1::Request::HangUp { call_id }).await,
        Ok(v1::Reply::Done)
    );
    assert_eq!(
        event(&mut new).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: OLD }
        }
    );

    // New dials old: the old TV rings, answers; the new one hangs up.
    let DialOutcome::Ringing {
        call_id,
        callee_media,
    } = dial(&mut new, OLD).await
    else {
        panic!("expected ringing")
    };
    assert_eq!(callee_media.port(), 5004);
    match old.next_event().await {
        v1::Event::IncomingCall {
            call_id: c, caller, ..
        } => assert_eq!((c, caller), (call_id, NEW)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        old.request(v1::Request::Answer { call_id }).await,
        Ok(v1::Reply::Done)
    );
    assert_eq!(
        event(&mut new).await,
        Event::CallAnswered {
            call_id,
            srtp: None,
            ice: None,
        }
    );
    new.request(Request::HangUp { call_id }).await.unwrap();
    assert_eq!(
        old.next_event().await,
        v1::Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: NEW }
        }
    );

    // An error reply in the old encoding.
    let err = old
        .request(v1::Request::Answer { call_id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NO_SUCH_CALL);

    // Power-off is recorded.
    assert_eq!(old.request(v1::Request::Bye).await, Ok(v1::Reply::Done));
    match new
        .request(Request::QueryState { users: vec![OLD] })
        .await
        .unwrap()
    {
        Reply::States(s) => assert_eq!(s[0].state, NetState::Offline),
        other => panic!("{other:?}"),
    }
    srv.stop().await;
}

#[tokio::test]
async fn an_unknown_request_kind_gets_unsupported_and_the_link_stays_up() {
    let srv = TestServer::start().await;

    // Before registering: a kind from the future, with a body.
    let mut c = srv.connect(OLD).await;
    c.send_raw(&envelope::frame(0x0123, 77, b"a future request body"))
        .await
        .unwrap();
    match c.connection().recv().await.unwrap() {
        control_client::Incoming::Reply {
            id: 77,
            result: Err(e),
        } => {
            assert_eq!(e.code, ErrorCode::UNSUPPORTED);
            assert!(e.message.contains("0x0123"), "{}", e.message);
        }
        other => panic!("expected UNSUPPORTED, got {other:?}"),
    }
    // The same link registers and is served.
    c.register(OLD, 5004).await.unwrap();

    // After registering: a kind in the reply range is no request either.
    c.send_raw(&envelope::frame(kind::ACKED, 78, &[]))
        .await
        .unwrap();
    match c.connection().recv().await.unwrap() {
        control_client::Incoming::Reply {
            id: 78,
            result: Err(e),
        } => assert_eq!(e.code, ErrorCode::UNSUPPORTED),
        other => panic!("expected UNSUPPORTED, got {other:?}"),
    }
    match c
        .request(Request::QueryState { users: vec![OLD] })
        .await
        .unwrap()
    {
        Reply::States(s) => assert_eq!(s[0].state, NetState::Online),
        other => panic!("{other:?}"),
    }
    // Still the same session: nothing was torn down.
    assert_eq!(srv.shared.registry.online(), 1);
    c.bye().await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn pushes_follow_the_features_a_session_asked_for() {
    let srv = TestServer::start().await;
    // Asks for call events only, not for cached-call notices.
    let stream = srv.tvs.raw_tls_as(srv.addr, OLD).await;
    let mut calls_only = Client::handshake_with(stream, Features::CALLS)
        .await
        .unwrap();
    calls_only.register(OLD, 5004).await.unwrap();
    let mut everything = srv.tv(NEW, 6004).await;
    let mut third = srv.tv(THIRD, 7004).await;

    // OLD calls NEW; while they talk THIRD's calls to each are busy, which pushes a
    // cached-call notice to the callee; then NEW hangs up (a call event to OLD), then
    // OLD's calls are checked in order.
    let DialOutcome::Ringing { call_id, .. } = dial(&mut calls_only, NEW).await else {
        panic!("expected ringing")
    };
    assert!(matches!(
        event(&mut everything).await,
        Event::IncomingCall { .. }
    ));
    everything
        .request(Request::Answer {
            call_id,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap();
    assert_eq!(
        event(&mut calls_only).await,
        Event::CallAnswered {
            call_id,
            srtp: None,
            ice: None,
        }
    );
    assert!(matches!(
        dial(&mut third, OLD).await,
        DialOutcome::Busy { .. }
    ));
    assert!(matches!(
        dial(&mut third, NEW).await,
        DialOutcome::Busy { .. }
    ));
    everything
        .request(Request::HangUp { call_id })
        .await
        .unwrap();

    // The session that asked for everything got the notice, then the end.
    assert!(matches!(
        event(&mut everything).await,
        Event::CachedCallsWaiting { count: 1 }
    ));
    // The session that asked for calls only gets the end and nothing before it (pushes
    // are delivered in order, and the notice was queued first).
    assert_eq!(
        event(&mut calls_only).await,
        Event::CallEnded {
            call_id,
            reason: EndReason::HungUp { by: NEW }
        }
    );
    // And the missed call is there to fetch all the same.
    assert_eq!(calls_only.fetch_all_cached().await.unwrap().len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn the_server_serves_any_byte_stream() {
    // What the TLS acceptor does, over a stream that is not a TcpStream (here an
    // in-memory pipe): TLS on both ends, then the connection served through the gate
    // with the TV identity the handshake established and the peer's address it was
    // given.
    let srv = TestServer::start().await;
    let (client_end, server_end) = tokio::io::duplex(64 * 1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shared = std::sync::Arc::clone(&srv.shared);
    let peer: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let task = tokio::spawn(async move {
        let acceptor = shared.tls.clone().expect("a TLS server");
        let tls = acceptor.accept(server_end).await.unwrap();
        let identity = call_proxy_server::tls::identity_of(tls.get_ref().1);
        let Admission::Admitted(ticket) = shared.gate.admit(peer.ip()) else {
            panic!("not admitted")
        };
        call_proxy_server::connection::serve_admitted(
            &shared, tls, peer, stop_rx, ticket, identity,
        )
        .await;
    });
    let client_tls = tokio_rustls::TlsConnector::from(srv.tvs.enroll(OLD).config())
        .connect(ServerName::from(peer.ip()), client_end)
        .await
        .unwrap();
    let mut piped = Client::handshake(client_tls).await.unwrap();
    piped.register(OLD, 5004).await.unwrap();

    // A TV over TCP calls the piped one, which rings at the address it was served with.
    let mut tcp = srv.tv(NEW, 6004).await;
    let DialOutcome::Ringing {
        call_id,
        callee_media,
    } = dial(&mut tcp, OLD).await
    else {
        panic!("expected ringing")
    };
    assert_eq!(callee_media, "127.0.0.1:5004".parse().unwrap());
    let ev = tokio::time::timeout(Duration::from_secs(5), piped.next_event())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Event::IncomingCall { caller: NEW, .. }));
    piped.request(Request::Reject { call_id }).await.unwrap();

    // Shutting this connection down says why.
    stop_tx.send(true).unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), piped.next_event())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(closed.code(), Some(ErrorCode::SHUTTING_DOWN));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    srv.stop().await;
}

/// An agent of this release asks `ASSIGN` first wherever `--server` points: a node (this
/// one, and any older one, which knows no such kind either) answers `UNSUPPORTED` and
/// the TV registers on the same link, so a single node needs no dispatcher and no flag.
#[tokio::test]
async fn a_node_answers_assign_unsupported_and_the_agent_registers_on_that_link() {
    use control_client::dispatch::{assign, Assigned};
    let srv = TestServer::start().await;
    let stream = srv.tvs.raw_tls_as(srv.addr, 21).await;
    let ask = shared_proto::dispatch::Assign {
        agent_version: "compat".into(),
        unreachable_node: String::new(),
    };
    let conn = match assign(stream, Features::KNOWN, &ask).await.unwrap() {
        Assigned::AtNode(conn) => conn,
        Assigned::Node(a) => panic!("a node assigned {a:?}"),
    };
    let mut tv = Client::from_connection(conn);
    let r = tv
        .register(21, 5000)
        .await
        .expect("registered on the same link");
    assert!(r.session_id > 0);
    assert!(matches!(
        tv.request(Request::Heartbeat).await,
        Ok(Reply::HeartbeatAck { .. })
    ));
    srv.stop().await;
}
