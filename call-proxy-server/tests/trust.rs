//! Trust on the control link (issue 12), against a real server over TLS on loopback:
//! unenrolled TVs get nothing, enrollment by code with the operator's approval, impostors
//! cannot take a live session over, a revoked TV is cut off within a second, codes
//! expire, a wrong CA fails, plain TCP to a TLS port fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use call_proxy_server::client::{Client, ClientError};
use call_proxy_server::storage::enroll::{normalise_code, Approval};
use call_proxy_server::storage::operator::OperatorStore;
use call_proxy_server::storage::{self, AnyOperator};
use common::TestServer;
use control_client::{Stream, TlsClient, Transport, TvKey};
use shared_proto::*;

async fn tls_server(tune: impl FnOnce(&mut call_proxy_server::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.insecure_plaintext = false;
        tune(c);
    })
    .await
}

fn ca_of(srv: &TestServer) -> Vec<u8> {
    std::fs::read(srv.db.ca_path()).expect("the server's CA")
}

/// A TV with its own new key, connected over TLS.
async fn tv(srv: &TestServer, key: &TvKey) -> Client<Stream> {
    let tls = TlsClient::new(&ca_of(srv), key).unwrap();
    Client::connect_with(&Transport::Tls(tls), srv.addr, None)
        .await
        .expect("TLS connection")
}

fn operator(srv: &TestServer) -> AnyOperator {
    storage::open_operator(&srv.db.target(), 1)
}

/// Whether the server turned the request down as unauthenticated: refused in its reply,
/// or, for a credential revoked a moment ago, the connection closed with that reason
/// before the reply (the revocation watcher may reach a fresh connection first; CI saw
/// that once). A registration that succeeds is `Ok` either way, so this still fails.
fn unauthenticated<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Err(e @ (ClientError::Server(_) | ClientError::Closed(Some(_))))
        if e.code() == Some(ErrorCode::UNAUTHENTICATED))
}

async fn request(c: &mut Client<Stream>, r: Request) -> Result<Reply, ClientError> {
    c.request(r).await
}

/// Enrolls `key` as `user` through the real flow: the TV asks, the operator approves
/// its code, the TV's poll says enrolled.
async fn enroll(srv: &TestServer, key: &TvKey, user: UserId) {
    let mut c = tv(srv, key).await;
    let code = match request(
        &mut c,
        Request::StartEnrollment {
            agent_version: "test".into(),
        },
    )
    .await
    .unwrap()
    {
        Reply::Enrollment(EnrollmentStatus::Pending { user_code, .. }) => user_code,
        other => panic!("{other:?}"),
    };
    let approval = operator(srv)
        .approve(
            normalise_code(&code).unwrap(),
            user,
            false,
            call_proxy_server::clock::now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(
        approval,
        Approval::Approved {
            user,
            replaced: false
        }
    );
    match request(&mut c, Request::PollEnrollment).await.unwrap() {
        Reply::Enrollment(EnrollmentStatus::Enrolled { user_id }) => assert_eq!(user_id, user),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_tv_gets_nothing_and_an_enrolled_one_everything() {
    let srv = tls_server(|_| {}).await;
    // A call is cached for 2002 by a plain-trusting path: enroll a caller first.
    let caller_key = TvKey::generate().unwrap();
    enroll(&srv, &caller_key, 1001).await;
    let real_key = TvKey::generate().unwrap();
    enroll(&srv, &real_key, 2002).await;
    {
        let mut real = tv(&srv, &real_key).await;
        real.register(2002, 5000).await.unwrap();
        real.bye().await.unwrap();
    }
    let mut caller = tv(&srv, &caller_key).await;
    caller.register(1001, 5000).await.unwrap();
    let Reply::Dial(DialOutcome::Cached { call_id }) = caller
        .request(Request::Dial {
            callee: 2002,
            key: Some(7),
            srtp: None,
            ice: None,
        })
        .await
        .unwrap()
    else {
        panic!("not cached")
    };

    // A stranger with a key of its own claims 2002: refused for every request kind.
    let stranger = TvKey::generate().unwrap();
    let mut s = tv(&srv, &stranger).await;
    let r = s.register(2002, 5000).await;
    assert!(unauthenticated(&r), "{r:?}");
    let refused_before = srv.shared.metrics.auth_failures.get();
    assert!(refused_before >= 1);
    for r in [
        Request::QueryState { users: vec![2002] },
        Request::Dial {
            callee: 1001,
            key: None,
            srtp: None,
            ice: None,
        },
        Request::FetchCached {
            after: 0,
            limit: 10,
        },
        Request::AckCached {
            call_ids: vec![call_id],
        },
        Request::Answer {
            call_id,
            srtp: None,
            ice: None,
        },
        Request::Reject { call_id },
        Request::HangUp { call_id },
        Request::Heartbeat,
    ] {
        let kind = format!("{r:?}");
        match request(&mut s, r).await {
            Err(ClientError::Server(e)) => {
                assert!(e.code == ErrorCode::NOT_REGISTERED, "{kind}: {e:?}")
            }
            other => panic!("{kind} answered {other:?}"),
        }
    }
    // Its poll says it has no enrollment.
    match request(&mut s, Request::PollEnrollment).await.unwrap() {
        Reply::Enrollment(EnrollmentStatus::Refused { reason }) => {
            assert!(reason.contains("no enrollment"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The cached call is still there for the real TV.
    let mut real = tv(&srv, &real_key).await;
    let reg = real.register(2002, 5000).await.unwrap();
    assert_eq!(reg.cached_waiting, 1);
    let calls = real.fetch_all_cached().await.unwrap();
    assert_eq!(
        calls.iter().map(|c| c.call_id).collect::<Vec<_>>(),
        [call_id]
    );

    // The real TV's own key cannot register as someone else either.
    let mut other = tv(&srv, &real_key).await;
    let r = other.register(1001, 5000).await;
    assert!(
        matches!(&r, Err(ClientError::Server(e)) if e.code == ErrorCode::UNAUTHENTICATED && e.message.contains("enrolled as user 2002")),
        "{r:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_cannot_replace_a_live_session_and_a_revoked_tv_is_cut_off_within_a_second() {
    let srv = tls_server(|_| {}).await;
    let key = TvKey::generate().unwrap();
    enroll(&srv, &key, 3003).await;
    let mut real = tv(&srv, &key).await;
    real.register(3003, 5000).await.unwrap();

    let impostor = TvKey::generate().unwrap();
    let mut imp = tv(&srv, &impostor).await;
    assert!(unauthenticated(&imp.register(3003, 6000).await));
    // The real session is untouched: no SESSION_REPLACED, and it still answers.
    assert!(matches!(
        real.request(Request::Heartbeat).await.unwrap(),
        Reply::HeartbeatAck { .. }
    ));
    assert_eq!(srv.shared.metrics.reregistrations.get(), 0);

    // The operator revokes 3003's TV: its session ends within a second.
    let revoked_at = Instant::now();
    assert!(operator(&srv)
        .revoke(3003, call_proxy_server::clock::now_ms())
        .await
        .unwrap());
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match real.next_event().await {
                Err(e) => return e,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the revoked TV's link closed");
    let took = revoked_at.elapsed();
    assert!(
        matches!(&closed, ClientError::Closed(Some(e)) if e.code == ErrorCode::UNAUTHENTICATED),
        "{closed:?}"
    );
    assert!(took < Duration::from_secs(1), "cut off after {took:?}");
    assert_eq!(srv.shared.metrics.revoked_sessions.get(), 1);
    // It cannot come back with that key; re-enrolled (a replaced TV) it can.
    let mut again = tv(&srv, &key).await;
    assert!(unauthenticated(&again.register(3003, 5000).await));
    let replacement = TvKey::generate().unwrap();
    enroll(&srv, &replacement, 3003).await;
    let mut new_tv = tv(&srv, &replacement).await;
    new_tv.register(3003, 5000).await.unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_expire_unknown_codes_fail_and_a_second_tv_needs_replace() {
    let srv = tls_server(|c| c.enrollment_ttl_s = 1).await;
    let ops = operator(&srv);
    let now = call_proxy_server::clock::now_ms;
    assert_eq!(
        ops.approve("BCDFGHJK".into(), 1, false, now())
            .await
            .unwrap(),
        Approval::UnknownCode
    );
    let key = TvKey::generate().unwrap();
    let mut c = tv(&srv, &key).await;
    let Reply::Enrollment(EnrollmentStatus::Pending {
        user_code,
        expires_in_s,
        interval_s,
    }) = request(
        &mut c,
        Request::StartEnrollment {
            agent_version: "t".into(),
        },
    )
    .await
    .unwrap()
    else {
        panic!()
    };
    assert!(expires_in_s <= 1 && interval_s >= 1);
    assert_eq!(user_code.len(), 9, "{user_code}");
    // Asking again gives the same code while it lives.
    match request(
        &mut c,
        Request::StartEnrollment {
            agent_version: "t".into(),
        },
    )
    .await
    .unwrap()
    {
        Reply::Enrollment(EnrollmentStatus::Pending {
            user_code: again, ..
        }) => {
            assert_eq!(again, user_code)
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(matches!(
        request(&mut c, Request::PollEnrollment).await.unwrap(),
        Reply::Enrollment(EnrollmentStatus::Expired)
    ));
    assert_eq!(
        ops.approve(normalise_code(&user_code).unwrap(), 5, false, now())
            .await
            .unwrap(),
        Approval::Expired
    );

    // A user with an enrolled TV gets a second one only with replace.
    let srv2 = tls_server(|_| {}).await;
    let first = TvKey::generate().unwrap();
    enroll(&srv2, &first, 7007).await;
    let second = TvKey::generate().unwrap();
    let mut c2 = tv(&srv2, &second).await;
    let Reply::Enrollment(EnrollmentStatus::Pending { user_code, .. }) = request(
        &mut c2,
        Request::StartEnrollment {
            agent_version: "t".into(),
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    let code = normalise_code(&user_code).unwrap();
    let ops2 = operator(&srv2);
    assert_eq!(
        ops2.approve(code.clone(), 7007, false, now())
            .await
            .unwrap(),
        Approval::UserHasTv
    );
    assert_eq!(
        ops2.approve(code, 7007, true, now()).await.unwrap(),
        Approval::Approved {
            user: 7007,
            replaced: true
        }
    );
    let mut old = tv(&srv2, &first).await;
    let r = old.register(7007, 1).await;
    assert!(unauthenticated(&r), "{r:?}");
    srv.stop().await;
    srv2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_and_plain_tcp_fail_clearly() {
    let srv = tls_server(|_| {}).await;
    let other = tls_server(|_| {}).await;
    let key = TvKey::generate().unwrap();
    // Trusting another server's CA: the handshake fails on the certificate.
    let tls = TlsClient::new(&ca_of(&other), &key).unwrap();
    let r = Client::connect_with(&Transport::Tls(tls), srv.addr, None).await;
    match r {
        Err(ClientError::Io(e)) => {
            let m = e.to_string();
            assert!(
                m.contains("certificate") || m.contains("UnknownIssuer"),
                "{m}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected with the wrong CA"),
    }
    // A plain-TCP client on the TLS port: no preamble comes back, and it is counted.
    let before = srv.shared.metrics.tls_failed.get();
    let r = Client::connect(srv.addr).await;
    assert!(r.is_err(), "a plain client was served on the TLS port");
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.shared.metrics.tls_failed.get() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(srv.shared.metrics.tls_failed.get() > before);
    srv.stop().await;
    other.stop().await;
}

/// Starts an enrollment; its code.
/// An admin API call with the test token (a JSON `body` for a POST): (status, body).
fn admin_call(
    method: &'static str,
    url: String,
    body: Option<&'static str>,
) -> tokio::task::JoinHandle<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let auth = format!("Bearer {}", common::ADMIN_TOKEN);
        let mut r = match (method, body) {
            ("POST", Some(body)) => agent
                .post(&url)
                .header("Authorization", auth)
                .header("Content-Type", "application/json")
                .send(body),
            _ => agent.delete(&url).header("Authorization", auth).call(),
        }
        .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    })
}

/// `call-proxy-server ARGS --db <the server's database>`: (exit code, stdout, stderr).
fn operator_cli(srv: &TestServer, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_call-proxy-server"))
        .args(args)
        .arg("--db")
        .arg(srv.db.db_arg())
        .envs(srv.db.cli_env())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn start_code(c: &mut Client<Stream>) -> String {
    match c
        .request(Request::StartEnrollment {
            agent_version: "cli-test".into(),
        })
        .await
        .unwrap()
    {
        Reply::Enrollment(EnrollmentStatus::Pending { user_code, .. }) => user_code,
        other => panic!("{other:?}"),
    }
}

/// `call-proxy-server approve|revoke|enrollments` on the database file and the admin
/// API's `POST /api/enrollments/{code}`, with their errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_approves_with_the_cli_or_the_admin_api_and_revokes() {
    let mut srv = tls_server(|_| {}).await;
    let admin = srv.start_admin(None).await;
    let cli = |args: &[&str]| operator_cli(&srv, args);
    let key1 = TvKey::generate().unwrap();
    let mut tv1 = tv(&srv, &key1).await;
    let code1 = start_code(&mut tv1).await;
    let (rc, out, _) = tokio::task::block_in_place(|| cli(&["enrollments", "--format", "json"]));
    assert_eq!(rc, 0);
    assert!(
        out.contains(&code1) && out.contains("pending") && out.contains("cli-test"),
        "{out}"
    );
    // Typed the way a person would: lower case, no dash.
    let typed = code1.replace('-', "").to_lowercase();
    let (rc, out, err) =
        tokio::task::block_in_place(|| cli(&["approve", "--code", &typed, "--user", "4004"]));
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("\"user\":4004"), "{out}");
    let (rc, _, err) =
        tokio::task::block_in_place(|| cli(&["approve", "--code", &typed, "--user", "4004"]));
    assert_eq!(rc, 1);
    assert!(err.contains("approved or refused already"), "{err}");
    let (rc, _, err) =
        tokio::task::block_in_place(|| cli(&["approve", "--code", "AEIO-UUUU", "--user", "1"]));
    assert_eq!(rc, 2, "not a code: a usage error ({err})");
    tv1.register(4004, 5000).await.unwrap();

    // A second TV through the admin API.
    let key2 = TvKey::generate().unwrap();
    let mut tv2 = tv(&srv, &key2).await;
    let code2 = start_code(&mut tv2).await;
    let post = |url: String, body: &'static str| admin_call("POST", url, Some(body));
    let (status, body) = post(
        format!("{admin}/api/enrollments/{code2}"),
        r#"{"user": 5005}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(
        format!("{admin}/api/enrollments/{code2}"),
        r#"{"user": 5005}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 409);
    let (status, _) = post(
        format!("{admin}/api/enrollments/BCDF-BCDF"),
        r#"{"user": 5005}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    tv2.register(5005, 5000).await.unwrap();

    // Revoked with the CLI: the live session ends; a second revoke finds nothing.
    let (rc, out, err) = tokio::task::block_in_place(|| cli(&["revoke", "--user", "4004"]));
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("4004"), "{out}");
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Err(e) = tv1.next_event().await {
                return e;
            }
        }
    })
    .await
    .expect("cut off");
    assert!(
        matches!(&closed, ClientError::Closed(Some(e)) if e.code == ErrorCode::UNAUTHENTICATED),
        "{closed:?}"
    );
    let (rc, _, err) = tokio::task::block_in_place(|| cli(&["revoke", "--user", "4004"]));
    assert_eq!(rc, 1);
    assert!(err.contains("no enrolled TV"), "{err}");
    srv.stop().await;
}

/// Bad input around TLS: garbage before the handshake, a handshake that stalls, an
/// oversized enrollment request, and 10,000 failed logins from one address — each closed
/// or refused and counted, while an enrolled TV from another address still registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_stalls_oversized_requests_and_login_floods_are_refused_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = tls_server(|c| {
        c.handshake_timeout_ms = 500;
        c.flood_penalty_ms = 60_000;
    })
    .await;
    let good = TvKey::generate().unwrap();
    enroll(&srv, &good, 8008).await;

    // Garbage where the TLS ClientHello should be: closed, counted.
    let before = srv.shared.metrics.tls_failed.get();
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(&[0x5a; 600]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert!(n < 64, "no protocol answer to garbage");
    // A handshake that stalls (TCP open, nothing sent): closed at the deadline.
    let mut stalled = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "closed before the deadline"
    );
    assert!(srv.shared.metrics.tls_failed.get() >= before + 2);

    // Inside TLS: an enrollment request with an oversized field, then a frame beyond
    // the limit.
    let stranger = TvKey::generate().unwrap();
    let mut c = tv(&srv, &stranger).await;
    let r = c
        .request(Request::StartEnrollment {
            agent_version: "x".repeat(MAX_AGENT_VERSION_LEN + 1),
        })
        .await;
    assert!(
        matches!(&r, Err(ClientError::Server(e)) if e.code == ErrorCode::INVALID_ARGUMENT),
        "{r:?}"
    );
    let huge = shared_proto::envelope::frame(
        shared_proto::envelope::kind::START_ENROLLMENT,
        9,
        &vec![b'y'; MAX_FRAME_LEN + 10],
    );
    let _ = c.send_raw(&huge).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), c.next_event()).await;
    assert!(
        matches!(&closed, Ok(Err(ClientError::Closed(Some(e)))) if e.code == ErrorCode::FRAME_TOO_LARGE),
        "{closed:?}"
    );

    // 10,000 failed logins from 127.0.0.7, 200 at a time: after `auth_failures_per_ip`
    // of them the address is refused at accept; an enrolled TV elsewhere is served.
    let ca = ca_of(&srv);
    let bad = TlsClient::new(&ca, &stranger).unwrap();
    let addr = srv.addr;
    let attempts = futures_attempts(10_000, 200, move |_| {
        let bad = bad.clone();
        async move {
            let local = Some("127.0.0.7:0".parse().unwrap());
            match Client::connect_with(&Transport::Tls(bad), addr, local).await {
                Ok(mut c) => match c.register(8008, 5000).await {
                    Ok(r) => panic!("an unenrolled login was registered: {r:?}"),
                    Err(ClientError::Server(e)) if e.code == ErrorCode::UNAUTHENTICATED => 0u8,
                    // Closed before its turn (the registration deadline under this load).
                    Err(_) => 1u8,
                },
                // Refused at accept (the address is penalised) or the handshake failed.
                Err(_) => 1u8,
            }
        }
    })
    .await;
    let refused: usize = attempts.iter().map(|&r| usize::from(r)).sum();
    let failed_logins = attempts.len() - refused;
    eprintln!("10,000 logins from one address: {failed_logins} reached the server and failed, {refused} refused");
    assert!(failed_logins >= 20, "{failed_logins}");
    assert!(refused > 9_000, "{refused} refused");
    assert!(srv.shared.metrics.auth_failures.get() >= 20);
    let t = Instant::now();
    let mut ok = tv(&srv, &good).await;
    ok.register(8008, 5000)
        .await
        .expect("an enrolled TV elsewhere");
    eprintln!(
        "enrolled TV registered in {:?} right after the flood",
        t.elapsed()
    );
    srv.stop().await;
}

/// Runs `n` attempts, `conc` at a time; their results in completion order.
async fn futures_attempts<F, Fut>(n: usize, conc: usize, f: F) -> Vec<u8>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = u8>,
{
    use futures::stream::{self, StreamExt};
    stream::iter(0..n)
        .map(f)
        .buffer_unordered(conc)
        .collect()
        .await
}

/// A TV waiting for its code's approval keeps its link: each pending answer to its
/// polls pushes the registration deadline on, so an operator may take longer than the
/// deadline; once the code is no longer pending the deadline holds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tv_polling_a_pending_code_keeps_its_link_past_the_registration_deadline() {
    let srv = tls_server(|c| {
        c.handshake_timeout_ms = 400;
        c.enrollment_poll_s = 1;
        c.enrollment_ttl_s = 4;
    })
    .await;
    let key = TvKey::generate().unwrap();
    let mut c = tv(&srv, &key).await;
    let code = start_code(&mut c).await;
    // Three seconds of polls, far past the 400 ms deadline: the link stays.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match request(&mut c, Request::PollEnrollment).await {
            Ok(Reply::Enrollment(EnrollmentStatus::Pending { .. })) => {}
            other => panic!("the polling TV lost its link or its code: {other:?}"),
        }
    }
    // Approved: the same link registers.
    operator(&srv)
        .approve(
            normalise_code(&code).unwrap(),
            77,
            false,
            call_proxy_server::clock::now_ms(),
        )
        .await
        .unwrap();
    match request(&mut c, Request::PollEnrollment).await.unwrap() {
        Reply::Enrollment(EnrollmentStatus::Enrolled { user_id }) => assert_eq!(user_id, 77),
        other => panic!("{other:?}"),
    }
    c.register(77, 5000)
        .await
        .expect("registers on the link it enrolled on");
    assert!(matches!(
        request(&mut c, Request::Heartbeat).await.unwrap(),
        Reply::HeartbeatAck { .. }
    ));

    // A TV that only asked for a code and stopped polling is closed at the deadline
    // (each answer bought it two poll intervals plus a second: 3 s).
    let mut idle = tv(&srv, &TvKey::generate().unwrap()).await;
    start_code(&mut idle).await;
    let started = Instant::now();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // An unregistered TV's heartbeat is answered with an error; a closed link
        // answers nothing.
        match request(&mut idle, Request::Heartbeat).await {
            Err(ClientError::Server(_)) | Ok(_) => {}
            Err(_) => break started.elapsed(),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    };
    assert!(closed >= Duration::from_secs(2), "closed after {closed:?}");
    srv.stop().await;
}

/// The operator refuses a code with the CLI or `DELETE /api/enrollments/{code}`: the
/// TV's next poll says refused, the code can no longer be approved, and refusing twice
/// or an unknown code fails clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_refuses_a_code_with_the_cli_or_the_admin_api() {
    let mut srv = tls_server(|_| {}).await;
    let admin = srv.start_admin(None).await;
    let cli = |args: &[&str]| operator_cli(&srv, args);
    let refused = |r: Reply| matches!(r, Reply::Enrollment(EnrollmentStatus::Refused { .. }));

    let mut tv1 = tv(&srv, &TvKey::generate().unwrap()).await;
    let code1 = start_code(&mut tv1).await;
    let (rc, out, err) = tokio::task::block_in_place(|| cli(&["refuse", "--code", &code1]));
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("\"refused\""), "{out}");
    let poll = request(&mut tv1, Request::PollEnrollment).await.unwrap();
    assert!(refused(poll.clone()), "{poll:?}");
    let (rc, _, err) = tokio::task::block_in_place(|| cli(&["refuse", "--code", &code1]));
    assert_eq!(rc, 1);
    assert!(err.contains("approved or refused already"), "{err}");
    let (rc, _, err) =
        tokio::task::block_in_place(|| cli(&["approve", "--code", &code1, "--user", "6006"]));
    assert_eq!(rc, 1, "a refused code cannot be approved: {err}");
    assert!(matches!(
        tv1.register(6006, 5000).await,
        Err(ClientError::Server(e)) if e.code == ErrorCode::UNAUTHENTICATED
    ));

    let mut tv2 = tv(&srv, &TvKey::generate().unwrap()).await;
    let code2 = start_code(&mut tv2).await;
    let delete = |url: String| admin_call("DELETE", url, None);
    let (status, body) = delete(format!("{admin}/api/enrollments/{code2}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let poll = request(&mut tv2, Request::PollEnrollment).await.unwrap();
    assert!(refused(poll.clone()), "{poll:?}");
    let (status, _) = delete(format!("{admin}/api/enrollments/{code2}"))
        .await
        .unwrap();
    assert_eq!(status, 409);
    let (status, _) = delete(format!("{admin}/api/enrollments/BCDF-BCDF"))
        .await
        .unwrap();
    assert_eq!(status, 404);
    srv.stop().await;
}
