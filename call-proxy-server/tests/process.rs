//! The server as a process: durability across SIGKILL, and clean shutdown on SIGTERM.
//! TLS with the CA it makes beside its database, and TVs enrolled in that database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, Tvs};
use shared_proto::*;
use test_support::net::free_port;
use test_support::process::{spawn_listening, KillOnDrop};

struct Server {
    /// Killed (SIGKILL) when dropped.
    child: KillOnDrop,
    addr: SocketAddr,
}

impl Server {
    async fn start(db: &TestDb, port: u16) -> Server {
        // TVs are limited to a few requests a second; these test callers are not.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = common::serve_command(
            db,
            "server",
            "requests_per_sec = 1000000\nrequest_burst = 1000000\n",
            port,
        );
        let child = spawn_listening(&mut cmd, addr, Duration::from_secs(5))
            .await
            .expect("server listening");
        Server { child, addr }
    }

    fn kill(&mut self) {
        test_support::process::kill(&mut self.child); // SIGKILL
    }

    fn signal(&self, sig: i32) {
        test_support::process::signal(self.child.id(), sig).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_cached_calls_survive_sigkill_and_are_delivered_at_next_boot() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new(dir.path(), "durable"));
    let port = free_port().unwrap();
    let mut server = Server::start(&db, port).await;
    let addr = server.addr;
    let tvs = Arc::new(Tvs::new(&db));
    const CALLEE: UserId = 9000;
    tvs.tv(addr, CALLEE, 4000).await.bye().await.unwrap();
    // Eight TVs keep calling the switched-off TV; every "cached" reply is an
    // acknowledgement that must survive.
    let acked = Arc::new(Mutex::new(Vec::<CallId>::new()));
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let acked = Arc::clone(&acked);
        let tvs = Arc::clone(&tvs);
        tasks.push(tokio::spawn(async move {
            let mut c = tvs.tv(addr, 100 + i, 5000).await;
            loop {
                match c
                    .request(Request::Dial {
                        callee: CALLEE,
                        key: None,
                        srtp: None,
                        ice: None,
                    })
                    .await
                {
                    Ok(Reply::Dial(DialOutcome::Cached { call_id })) => {
                        acked.lock().unwrap().push(call_id)
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => return, // the server died under us
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 2000 {
        assert!(tokio::time::Instant::now() < deadline, "callers stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let acked: HashSet<CallId> = acked.lock().unwrap().iter().copied().collect();
    assert!(acked.len() >= 2000);

    let server = Server::start(&db, port).await;
    let mut tv = tvs.connect(server.addr, CALLEE).await;
    let reg = tv.register(CALLEE, 4000).await.unwrap();
    assert!(reg.cached_waiting as usize >= acked.len());
    let delivered: HashSet<CallId> = tv
        .fetch_all_cached()
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!(c.reason, MissedReason::Offline);
            c.call_id
        })
        .collect();
    let lost: Vec<_> = acked.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged calls lost: {lost:?}",
        lost.len()
    );
    // The callers were recorded online before the crash; the restart repaired that.
    let states = tv
        .request(Request::QueryState {
            users: vec![100, 101],
        })
        .await
        .unwrap();
    let Reply::States(states) = states else {
        panic!()
    };
    assert!(states.iter().all(|s| s.state == NetState::Offline));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_calls_closes_sessions_records_offline_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new(dir.path(), "term"));
    let mut server = Server::start(&db, free_port().unwrap()).await;
    let tvs = Tvs::new(&db);
    let mut a = tvs.tv(server.addr, 1, 5000).await;
    let mut b = tvs.tv(server.addr, 2, 6000).await;
    let Reply::Dial(DialOutcome::Ringing { call_id, .. }) = a
        .request(Request::Dial {
            callee: 2,
            key: None,
            srtp: None,
            ice: None,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let _ = b.next_event().await.unwrap();
    b.request(Request::Answer {
        call_id,
        srtp: None,
        ice: None,
    })
    .await
    .unwrap();
    let _ = a.next_event().await.unwrap(); // answered

    server.signal(libc::SIGTERM);
    for c in [&mut a, &mut b] {
        let ended = tokio::time::timeout(Duration::from_secs(5), c.next_event())
            .await
            .unwrap();
        assert_eq!(
            ended.unwrap(),
            Event::CallEnded {
                call_id,
                reason: EndReason::ServerShutdown
            }
        );
        let closing = tokio::time::timeout(Duration::from_secs(5), c.next_event())
            .await
            .unwrap();
        assert_eq!(closing.unwrap_err().code(), Some(ErrorCode::SHUTTING_DOWN));
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");

    let online = db.count("SELECT count(*) FROM user_property WHERE user_netstate = 1");
    assert_eq!(online, 0);
    let row = db
        .row(&format!(
            "SELECT outcome, ended_at FROM user_call WHERE id = {call_id}"
        ))
        .expect("the call's row");
    assert_eq!(row[0].as_deref(), Some("answered"));
    assert!(row[1].is_some());
}

/// The durability bar of issue 11, kept: 20 SIGKILLs at random moments under 8 callers
/// dialling a switched-off TV with idempotency keys. A caller whose reply was lost in a
/// crash retries the same dial (same key) after the restart, as the agent does. In the
/// end the TV receives every acknowledged call exactly once and nothing else: 0 lost, 0
/// duplicated; the database passes `integrity_check` after every crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_random_sigkills_lose_nothing_acknowledged_and_duplicate_nothing() {
    use rand::Rng;
    const KILLS: usize = 20;
    const CALLERS: u64 = 8;
    const CALLEE: UserId = 9100;
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new(dir.path(), "kills"));
    let port = free_port().unwrap();
    let mut server = Server::start(&db, port).await;
    let tvs = Arc::new(Tvs::new(&db));
    tvs.tv(server.addr, CALLEE, 4000).await.bye().await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::<CallId>::new()));
    // Each caller's dial whose answer was lost: retried with its key after the restart.
    let mut unanswered: Vec<Option<IdempotencyKey>> = vec![None; CALLERS as usize];
    let mut retried_answers = 0usize;
    let mut rng = rand::rng();
    for round in 0..KILLS {
        let mut tasks = Vec::new();
        // The kill's random moment counts from when every caller is registered (a TLS
        // handshake to a freshly started server in a debug build takes a while).
        let registered = Arc::new(tokio::sync::Barrier::new(CALLERS as usize + 1));
        for (i, pending) in unanswered.iter_mut().enumerate() {
            let acked = Arc::clone(&acked);
            let addr = server.addr;
            let tvs = Arc::clone(&tvs);
            let registered = Arc::clone(&registered);
            let mut key = pending.take();
            tasks.push(tokio::spawn(async move {
                let mut c = tvs.tv(addr, 200 + i as u64, 5000).await;
                registered.wait().await;
                // A dial carried over from the crash is the first one sent.
                let mut retried = 0usize;
                let mut carried = key.is_some();
                loop {
                    let k = *key.get_or_insert_with(rand::random);
                    match c
                        .request(Request::Dial {
                            callee: CALLEE,
                            key: Some(k),
                            srtp: None,
                            ice: None,
                        })
                        .await
                    {
                        Ok(Reply::Dial(DialOutcome::Cached { call_id })) => {
                            acked.lock().unwrap().push(call_id);
                            retried += usize::from(std::mem::take(&mut carried));
                            key = None;
                        }
                        Ok(other) => panic!("unexpected {other:?}"),
                        // The server died under us: this dial's fate is unknown.
                        Err(_) => return (key, retried),
                    }
                }
            }));
        }
        tokio::time::timeout(Duration::from_secs(30), registered.wait())
            .await
            .expect("the callers registered in time");
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        server.kill();
        for (i, t) in tasks.into_iter().enumerate() {
            let (key, retried) = t.await.unwrap();
            unanswered[i] = key;
            retried_answers += retried;
        }
        if db.sqlite_path().is_some() {
            let check = db.rows("PRAGMA integrity_check");
            assert_eq!(
                check,
                vec![vec![Some("ok".to_string())]],
                "after kill {round}"
            );
        } else {
            // PostgreSQL recovers its own WAL; the tables must still read.
            db.count("SELECT count(*) FROM user_call");
        }
        server = Server::start(&db, port).await;
    }
    // The dials still unanswered after the last crash are retried once more.
    let mut c = tvs.stranger_client(server.addr).await.unwrap();
    for (i, key) in unanswered.into_iter().enumerate() {
        let Some(key) = key else { continue };
        c.bye().await.unwrap();
        c = tvs.tv(server.addr, 200 + i as u64, 5000).await;
        match c
            .request(Request::Dial {
                callee: CALLEE,
                key: Some(key),
                srtp: None,
                ice: None,
            })
            .await
            .unwrap()
        {
            Reply::Dial(DialOutcome::Cached { call_id }) => acked.lock().unwrap().push(call_id),
            other => panic!("{other:?}"),
        }
    }
    let mut acked = acked.lock().unwrap().clone();
    let mut tv = tvs.tv(server.addr, CALLEE, 4000).await;
    let delivered = common::cached_ids(&mut tv).await;
    acked.sort_unstable();
    let distinct: HashSet<CallId> = delivered.iter().copied().collect();
    assert_eq!(distinct.len(), delivered.len(), "a call delivered twice");
    let acked_set: HashSet<CallId> = acked.iter().copied().collect();
    assert_eq!(
        acked_set.len(),
        acked.len(),
        "one call id acknowledged twice"
    );
    let lost: Vec<_> = acked_set.difference(&distinct).collect();
    let extra: Vec<_> = distinct.difference(&acked_set).collect();
    eprintln!(
        "{KILLS} kills: {} acknowledged cached calls ({} answers to retried dials), {} delivered, {} lost, {} stored but never acknowledged",
        acked_set.len(),
        retried_answers,
        distinct.len(),
        lost.len(),
        extra.len()
    );
    assert!(lost.is_empty(), "{} acknowledged calls lost", lost.len());
    assert!(
        extra.is_empty(),
        "{} calls stored twice or never acknowledged",
        extra.len()
    );
    assert!(acked_set.len() > 1_000, "the callers made progress");
}

/// Messages under SIGKILL: four TVs keep leaving messages (texts, and voice messages with
/// a body) for a switched-off TV over their transfer links while the server is killed
/// at a random moment, five times. A sender whose answer was lost sends the same message
/// again (same key) after the restart, as the agent does. In the end the TV lists every
/// message whose `stored` was answered, each once, and every voice body byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stored_before_a_sigkill_are_all_there_once_after_it() {
    use common::messages::*;
    use rand::Rng;
    const KILLS: usize = 5;
    const SENDERS: u64 = 4;
    const VIEWER: UserId = 9200;
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new(dir.path(), "messages"));
    let port = free_port().unwrap();
    let config = format!(
        "requests_per_sec = 1000000\nrequest_burst = 1000000\nmailbox_messages = 100000\n\
         mailbox_mb = 10000\nbody_dir = {:?}\n",
        dir.path().join("bodies")
    );
    let start = |db: Arc<TestDb>, config: String| async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = common::serve_command(&db, "messages", &config, port);
        let child = spawn_listening(&mut cmd, addr, Duration::from_secs(5))
            .await
            .expect("server listening");
        Server { child, addr }
    };
    let mut server = start(Arc::clone(&db), config.clone()).await;
    let tvs = Arc::new(Tvs::new(&db));
    tvs.tv(server.addr, VIEWER, 4000).await.bye().await.unwrap();
    let voice = Arc::new(fixture("voice.opus"));
    let acked = Arc::new(Mutex::new(Vec::<MessageId>::new()));
    // Each sender's message whose answer was lost: (key, with a body).
    let mut unanswered: Vec<Option<(u64, bool)>> = vec![None; SENDERS as usize];
    let mut rng = rand::rng();
    /// Leaves one message (a voice message when `voice`), resuming its upload.
    async fn leave(c: &mut common::Tv, key: u64, body: Option<&[u8]>) -> Option<MessageId> {
        let reply = match body {
            Some(b) => send_body(c, VIEWER, key, MessageKind::VOICE, b).await,
            None => {
                let text = format!("message {key:016x}");
                c.request(message(VIEWER, key, MessageKind::TEXT, &text, None))
                    .await
            }
        };
        match reply {
            Ok(Reply::MessageSent(MessageSent { message_id, .. })) => Some(message_id),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => None,
        }
    }
    for round in 0..=KILLS {
        let mut tasks = Vec::new();
        let opened = Arc::new(tokio::sync::Barrier::new(SENDERS as usize + 1));
        for (i, pending) in unanswered.iter_mut().enumerate() {
            let (acked, tvs, opened, voice) = (
                Arc::clone(&acked),
                Arc::clone(&tvs),
                Arc::clone(&opened),
                Arc::clone(&voice),
            );
            let addr = server.addr;
            let mut pending = pending.take();
            let last = round == KILLS;
            tasks.push(tokio::spawn(async move {
                let user = 300 + i as u64;
                let mut c = tvs.connect(addr, user).await;
                open_transfer(&mut c, user).await;
                opened.wait().await;
                let mut n = 0u64;
                loop {
                    // A message carried over from the crash is the first one sent; the
                    // last round only finishes those.
                    if last && pending.is_none() {
                        return None;
                    }
                    let (key, with_body) =
                        *pending.get_or_insert_with(|| (rand::random(), n % 3 == 0));
                    n += 1;
                    let body = with_body.then_some(&voice[..]);
                    match leave(&mut c, key, body).await {
                        Some(id) => {
                            acked.lock().unwrap().push(id);
                            pending = None;
                        }
                        None => return pending,
                    }
                }
            }));
        }
        tokio::time::timeout(Duration::from_secs(30), opened.wait())
            .await
            .expect("the senders connected in time");
        if round < KILLS {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
            server.kill();
        }
        for (i, t) in tasks.into_iter().enumerate() {
            unanswered[i] = t.await.unwrap();
        }
        if round < KILLS {
            server = start(Arc::clone(&db), config.clone()).await;
        }
    }
    assert!(unanswered.iter().all(Option::is_none));
    // The viewer's TV lists everything, page by page, and fetches the voice bodies.
    let mut c = tvs.connect(server.addr, VIEWER).await;
    open_transfer(&mut c, VIEWER).await;
    let mut listed = Vec::new();
    let mut before = 0;
    loop {
        let page = match c
            .request(Request::ListMessages { before, limit: 100 })
            .await
            .unwrap()
        {
            Reply::Messages(p) => p,
            other => panic!("{other:?}"),
        };
        let Some(last) = page.messages.last() else {
            break;
        };
        before = last.message_id;
        listed.extend(page.messages);
        if !page.more {
            break;
        }
    }
    let mut bodies = 0;
    for m in &listed {
        if let Some(b) = &m.body {
            assert_eq!(fetch_body(&mut c, m.message_id, b.size).await, *voice);
            bodies += 1;
        }
    }
    let acked = acked.lock().unwrap().clone();
    let acked_set: HashSet<MessageId> = acked.iter().copied().collect();
    assert_eq!(
        acked_set.len(),
        acked.len(),
        "one message id answered twice"
    );
    let listed_ids: Vec<MessageId> = listed.iter().map(|m| m.message_id).collect();
    let listed_set: HashSet<MessageId> = listed_ids.iter().copied().collect();
    assert_eq!(listed_set.len(), listed_ids.len(), "a message listed twice");
    let lost = acked_set.difference(&listed_set).count();
    let extra = listed_set.difference(&acked_set).count();
    eprintln!(
        "{KILLS} kills: {} messages answered stored ({bodies} with a voice body), {} listed, {lost} lost, {extra} stored but never answered",
        acked_set.len(),
        listed_set.len()
    );
    assert_eq!((lost, extra), (0, 0));
    assert!(
        bodies > 0 && acked_set.len() > 50,
        "the senders made progress"
    );
}
