//! Enrollment and authentication as a TV owner meets them (issue 12): `tv-agent enroll`
//! against a real TLS server shows a code, is approved by the operator's CLI, keeps its
//! credential; the scripted modes then work with `--data-dir` alone; an unenrolled TV
//! exits 4 and a cached call stays for the real TV; a revoked TV exits 4; an expired
//! code fails clearly; a wrong CA fails clearly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use common::EnrollServer as TlsServer;

fn start(ttl_s: u64) -> TlsServer {
    common::enroll_server(ttl_s)
}

fn agent(args: &[&str]) -> (i32, Vec<Value>, String) {
    common::run_agent(args)
}

/// The operator's approvals and revocations on the database file (the same calls as
/// `call-proxy-server approve|revoke`, whose own test is in call-proxy-server/tests).
fn operator(db: &Path, args: &[&str]) -> (i32, String) {
    // On a thread of its own: the caller may be inside the test's runtime.
    std::thread::scope(|s| s.spawn(|| operator_here(db, args)).join().unwrap())
}

fn operator_here(db: &Path, args: &[&str]) -> (i32, String) {
    use call_proxy_server::storage::enroll::{normalise_code, Approval};
    use call_proxy_server::storage::operator::OperatorStore;
    let ops = call_proxy_server::storage::open_operator(
        &call_proxy_server::storage::DbTarget::sqlite(db),
        1,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let now = call_proxy_server::clock::now_ms();
    match args {
        ["approve", "--code", code, "--user", user] => {
            let r = rt
                .block_on(ops.approve(
                    normalise_code(code).unwrap(),
                    user.parse().unwrap(),
                    false,
                    now,
                ))
                .unwrap();
            (
                i32::from(!matches!(r, Approval::Approved { .. })),
                format!("{r:?}"),
            )
        }
        ["revoke", "--user", user] => {
            let r = rt.block_on(ops.revoke(user.parse().unwrap(), now)).unwrap();
            (i32::from(!r), format!("{r}"))
        }
        other => panic!("{other:?}"),
    }
}

/// Runs `tv-agent enroll`, reads the code it shows, lets `decide` act on it (approve it,
/// or not), and returns the exit code and every line it printed.
fn enroll(srv: &TlsServer, data: &Path, decide: impl FnOnce(&str)) -> (i32, Vec<Value>) {
    let server = srv.server.addr.to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tv-agent"))
        .args(["enroll", "--server", &server, "--server-ca"])
        .arg(&srv.ca)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let shown: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
    let code = shown["user_code"]
        .as_str()
        .expect("a user code")
        .to_string();
    assert!(shown["expires_in"].as_u64().is_some(), "{shown}");
    decide(&code);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut lines = vec![shown];
    lines.extend(
        rest.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()),
    );
    (status.code().unwrap_or(-1), lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tv_enrolls_by_code_then_every_mode_works_with_its_data_dir_alone() {
    let srv = start(900);
    let server = srv.server.addr.to_string();
    let dirs = tempfile::tempdir().unwrap();
    let (a, b, stranger) = (
        dirs.path().join("a"),
        dirs.path().join("b"),
        dirs.path().join("stranger"),
    );
    for (dir, user) in [(&a, "1001"), (&b, "2002")] {
        let (code, lines) = tokio::task::block_in_place(|| {
            enroll(&srv, dir, |code| {
                let (rc, out) = operator(&srv.db, &["approve", "--code", code, "--user", user]);
                assert_eq!(rc, 0, "{out}");
            })
        });
        assert_eq!(code, 0, "{lines:?}");
        assert_eq!(lines.last().unwrap()["enrolled"].to_string(), user);
        // The key is the owner's only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("identity/tv.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    let d = |p: &PathBuf| p.to_str().unwrap().to_string();
    // B is known and off; A calls it: cached.
    let (rc, _, err) = tokio::task::block_in_place(|| {
        agent(&["missed", "--server", &server, "--data-dir", &d(&b)])
    });
    assert_eq!(rc, 0, "{err}");
    let (rc, lines, err) = tokio::task::block_in_place(|| {
        agent(&[
            "call",
            "--server",
            &server,
            "--data-dir",
            &d(&a),
            "--to",
            "2002",
            "--audio-in",
            "null",
            "--audio-out",
            "null",
        ])
    });
    assert_eq!(
        (rc, lines[0]["outcome"].as_str()),
        (0, Some("cached")),
        "{err}"
    );

    // A TV that is not enrolled claims to be 2002: exit 4, and it took nothing.
    let ca = srv.ca.to_str().unwrap();
    let (rc, lines, _) = tokio::task::block_in_place(|| {
        agent(&[
            "missed",
            "--server",
            &server,
            "--data-dir",
            &d(&stranger),
            "--user",
            "2002",
            "--server-ca",
            ca,
        ])
    });
    assert_eq!(rc, 4);
    assert_eq!(lines[0]["outcome"], "not_enrolled");
    // With A's credential but B's number: exit 4 before anything is sent.
    let (rc, _, err) = tokio::task::block_in_place(|| {
        agent(&[
            "missed",
            "--server",
            &server,
            "--data-dir",
            &d(&a),
            "--user",
            "2002",
        ])
    });
    assert_eq!(rc, 4);
    assert!(err.contains("enrolled as user 1001"), "{err}");
    // The real TV gets its call.
    let (rc, lines, err) = tokio::task::block_in_place(|| {
        agent(&["missed", "--server", &server, "--data-dir", &d(&b)])
    });
    assert_eq!((rc, lines.len()), (0, 1), "{err}");
    assert_eq!(lines[0]["user_id"], 1001);

    // Revoked: the next power-on is refused by the server, exit 4 at once.
    let (rc, out) = operator(&srv.db, &["revoke", "--user", "2002"]);
    assert_eq!(rc, 0, "{out}");
    let started = std::time::Instant::now();
    let (rc, lines, _) = tokio::task::block_in_place(|| {
        agent(&["missed", "--server", &server, "--data-dir", &d(&b)])
    });
    assert_eq!(rc, 4, "{lines:?}");
    assert!(
        lines[0]["reason"].as_str().unwrap().contains("revoked"),
        "{lines:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refused without waiting for the connect timeout"
    );
    srv.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_and_a_wrong_ca_fail_clearly() {
    let srv = start(1);
    let dir = tempfile::tempdir().unwrap();
    let (rc, lines) = tokio::task::block_in_place(|| enroll(&srv, dir.path(), |_| {}));
    assert_eq!(rc, 4, "{lines:?}");
    assert!(
        lines.last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{lines:?}"
    );
    // A CA that is not the server's: the TLS handshake fails, and says why.
    let other = start(900);
    let server = srv.server.addr.to_string();
    let (rc, lines, _) = tokio::task::block_in_place(|| {
        agent(&[
            "enroll",
            "--server",
            &server,
            "--server-ca",
            other.ca.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
    });
    assert_eq!(rc, 3, "{lines:?}");
    let reason = lines[0]["reason"].as_str().unwrap();
    assert!(reason.contains("certificate"), "{reason}");
    srv.server.stop().await.unwrap();
    other.server.stop().await.unwrap();
}
