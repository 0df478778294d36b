//! End to end: a real call-proxy server and real agents on loopback, real UDP media;
//! every TV enrolled, its control link TLS and its media SRTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tv_agent::media::AudioSpec;
use tv_agent::{AgentEvent, DialResult};

const A: u64 = 1001;
const B: u64 = 2002;

fn agent_bin(args: &[&str]) -> (i32, Vec<Value>) {
    // Over TLS: each TV's data directory holds its enrolled identity (Server::tv_dir).
    let (code, lines, _) = run_agent(args);
    (code, lines)
}

/// The data directories of TVs A and B, enrolled with `srv`.
async fn tv_dirs(srv: &Server, dir: &std::path::Path) -> (String, String) {
    let (a, b) = (dir.join("tv-a"), dir.join("tv-b"));
    srv.tv_dir(A, &a).await;
    srv.tv_dir(B, &b).await;
    let s = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
    (s(a), s(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_call_story_through_the_scripted_modes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let server = srv.addr.to_string();
    let (a, b) = tv_dirs(&srv, dir.path()).await;
    let b_id = B.to_string();
    // B's first power-on creates it; nothing is waiting.
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&["missed", "--data-dir", &b, "--server", &server])
    });
    assert_eq!((code, lines.len()), (0, 0));
    // A calls B while B is off: cached (exit 0).
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&[
            "call",
            "--data-dir",
            &a,
            "--server",
            &server,
            "--to",
            &b_id,
            "--audio-in",
            "null",
            "--audio-out",
            "null",
        ])
    });
    assert_eq!(code, 0);
    assert_eq!(lines[0]["outcome"], "cached");
    // B powers on: the missed call, with A's current state (A has powered off).
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&["missed", "--data-dir", &b, "--server", &server])
    });
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let call = &lines[0];
    assert_eq!(call["user_id"], A);
    assert_eq!(call["otheruser_id"], B);
    assert_eq!(call["user_netstate"], 0);
    assert_eq!(call["reason"], "offline");
    let date = call["call_date"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(date, &time::format_description::well_known::Rfc3339).is_ok(),
        "{date}"
    );
    // Acknowledged: not shown again.
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&["missed", "--data-dir", &b, "--server", &server])
    });
    assert_eq!((code, lines.len()), (0, 0));
    // Unknown callee: a clear outcome and a non-zero exit.
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&[
            "call",
            "--data-dir",
            &a,
            "--server",
            &server,
            "--to",
            "777",
            "--audio-in",
            "null",
            "--audio-out",
            "null",
        ])
    });
    assert_eq!(
        (code, lines[0]["outcome"].as_str()),
        (1, Some("unknown_user"))
    );
    srv.stop().await;
    // No server: unreachable, exit 3.
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&[
            "missed",
            "--data-dir",
            &b,
            "--server",
            &server,
            "--connect-timeout",
            "1",
        ])
    });
    assert_eq!(
        (code, lines[0]["outcome"].as_str()),
        (3, Some("unreachable"))
    );
}

/// A calls B, B answers; both send tones; returns the two recordings after `secs`.
async fn tone_call(
    srv: &Server,
    dir: &std::path::Path,
    relay: Option<&Relay>,
    secs: u64,
) -> (f64, f64) {
    let wav_a = dir.join("a-hears.wav");
    let wav_b = dir.join("b-hears.wav");
    let mut cfg_a = srv
        .agent_config(A, AudioSpec::Tone(440.0), AudioSpec::Wav(wav_a.clone()))
        .await;
    let mut cfg_b = srv
        .agent_config(B, AudioSpec::Tone(1000.0), AudioSpec::Wav(wav_b.clone()))
        .await;
    if let Some(r) = relay {
        // Media through the lossy relay, at the addresses the server saw (no ICE: its
        // checks would find the direct loopback path).
        cfg_a.advertise_port = Some(r.port_a);
        cfg_b.advertise_port = Some(r.port_b);
        cfg_a.ice = false;
        cfg_b.ice = false;
    }
    let (a, mut ea) = boot(cfg_a).await;
    let (b, mut eb) = boot(cfg_b).await;
    if let Some(r) = relay {
        r.start(
            a.media_addr(),
            b.media_addr(),
            0.05,
            Duration::from_millis(40),
            7,
        );
    }
    dial_and_answer(&a, &mut ea, A, &b, &mut eb, B).await;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    a.hang_up().await.unwrap();
    let qa = expect_event(&mut ea, 5, "A's end", |e| match e {
        AgentEvent::Ended {
            outcome, quality, ..
        } if outcome == "hung_up" => Some(quality.clone()),
        _ => None,
    })
    .await
    .expect("A's quality");
    let qb = expect_event(&mut eb, 5, "B's end", |e| match e {
        AgentEvent::Ended {
            outcome, quality, ..
        } if outcome == "hung_up_by_peer" => Some(quality.clone()),
        _ => None,
    })
    .await
    .expect("B's quality");
    a.power_off().await;
    b.power_off().await;
    let continuous_a = analyse(&wav_a, 1000.0, 440.0);
    let continuous_b = analyse(&wav_b, 440.0, 1000.0);
    eprintln!("A heard {continuous_a:.3} {qa:?}\nB heard {continuous_b:.3} {qb:?}");
    // The call was set up over TLS, so its media is SRTP both ways, none of it refused.
    for q in [&qa, &qb] {
        assert!(q.srtp, "SRTP: {q:?}");
        assert_eq!(q.srtp_auth_failed, 0, "{q:?}");
    }
    if relay.is_some() {
        assert!(
            qa.packets_lost + qb.packets_lost > 0,
            "the relay lost packets: {qa:?} {qb:?}"
        );
        assert!(
            qa.fec_recovered + qb.fec_recovered > 0,
            "FEC recovered some: {qa:?} {qb:?}"
        );
    } else {
        assert_eq!(qa.packets_lost + qb.packets_lost, 0, "{qa:?} {qb:?}");
    }
    (continuous_a, continuous_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_call_carries_each_sides_tone_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let (ca, cb) = tone_call(&srv, dir.path(), None, 2).await;
    assert!(ca > 0.97 && cb > 0.97, "continuity {ca:.3} {cb:.3}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_through_a_lossy_reordering_network_stays_continuous() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let relay = Relay::new().await;
    let (ca, cb) = tone_call(&srv, dir.path(), Some(&relay), 4).await;
    assert!(ca > 0.97 && cb > 0.97, "continuity {ca:.3} {cb:.3}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_from_either_side_reject_busy_and_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let null = || (AudioSpec::Tone(300.0), AudioSpec::Null);
    let (a, mut ea) = boot(srv.agent_config(A, null().0, null().1).await).await;
    let (b, mut eb) = boot(srv.agent_config(B, null().0, null().1).await).await;
    let (c, mut ec) = boot(srv.agent_config(3003, null().0, null().1).await).await;
    for hang_up_by_callee in [true, false] {
        dial_and_answer(&a, &mut ea, A, &b, &mut eb, B).await;
        // A third TV calling either is told they are busy.
        assert!(matches!(c.dial(B).await, DialResult::Busy(_)));
        // Let some media flow before the hang-up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (quitter, other_events) = if hang_up_by_callee {
            (&b, &mut ea)
        } else {
            (&a, &mut eb)
        };
        quitter.hang_up().await.unwrap();
        let q = expect_event(other_events, 5, "peer hang-up", |e| match e {
            AgentEvent::Ended {
                outcome, quality, ..
            } if outcome == "hung_up_by_peer" => Some(quality.clone()),
            _ => None,
        })
        .await;
        assert!(
            q.is_some_and(|q| q.packets_received > 0),
            "media flowed and stopped"
        );
        assert_eq!(a.status().await.unwrap().call_state, "idle");
        assert_eq!(b.status().await.unwrap().call_state, "idle");
    }
    // Rejected.
    assert!(matches!(a.dial(B).await, DialResult::Ringing(_)));
    expect_event(&mut eb, 5, "incoming", |e| {
        matches!(e, AgentEvent::Incoming { .. }).then_some(())
    })
    .await;
    b.reject().await.unwrap();
    expect_event(&mut ea, 5, "rejected", |e| {
        matches!(e, AgentEvent::Ended { outcome, .. } if outcome == "rejected").then_some(())
    })
    .await;
    // No answer: the server's ring timeout (3 s here) ends it; B then has a missed call.
    assert!(matches!(a.dial(B).await, DialResult::Ringing(_)));
    expect_event(&mut ea, 6, "no answer", |e| {
        matches!(e, AgentEvent::Ended { outcome, .. } if outcome == "no_answer").then_some(())
    })
    .await;
    let missed = expect_event(&mut eb, 5, "missed call", |e| match e {
        AgentEvent::CachedCalls { calls } if !calls.is_empty() => Some(calls.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (missed[0].user_id, missed[0].reason.as_str()),
        (A, "no_answer")
    );
    let _ = &mut ec;
    for x in [a, b, c] {
        x.power_off().await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_started_before_the_server_and_server_restarted_mid_session() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Enrolled before any server runs (its credential written into the new database).
    let trust = Trust::of(&db);
    let cfg = trust
        .agent_config(addr, A, AudioSpec::Null, AudioSpec::Null)
        .await;
    let (a, mut ea) = tv_agent::Agent::power_on(cfg).await.unwrap();
    expect_event(&mut ea, 5, "link down", |e| {
        matches!(e, AgentEvent::LinkDown { .. }).then_some(())
    })
    .await;
    let srv = Server::start(addr, &db).await;
    expect_event(&mut ea, 10, "registered after the server came up", |e| {
        matches!(e, AgentEvent::Registered { .. }).then_some(())
    })
    .await;
    srv.stop().await;
    expect_event(&mut ea, 5, "link down on server stop", |e| {
        matches!(e, AgentEvent::LinkDown { .. }).then_some(())
    })
    .await;
    let srv = Server::start(addr, &db).await;
    expect_event(&mut ea, 15, "re-registered after restart", |e| {
        matches!(e, AgentEvent::Registered { .. }).then_some(())
    })
    .await;
    // Fully working again: a call from another TV reaches it.
    let (b, _eb) = boot(srv.agent_config(B, AudioSpec::Null, AudioSpec::Null).await).await;
    assert!(matches!(b.dial(A).await, DialResult::Ringing(_)));
    expect_event(&mut ea, 5, "incoming after restart", |e| {
        matches!(e, AgentEvent::Incoming { .. }).then_some(())
    })
    .await;
    a.power_off().await;
    b.power_off().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_sends_silence_until_unmuted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    let wav_b = dir.path().join("b-hears.wav");
    let (a, mut ea) = boot(
        srv.agent_config(A, AudioSpec::Tone(440.0), AudioSpec::Null)
            .await,
    )
    .await;
    let (b, mut eb) = boot(
        srv.agent_config(B, AudioSpec::Null, AudioSpec::Wav(wav_b.clone()))
            .await,
    )
    .await;
    // Nothing to mute before a call.
    assert!(a.set_muted(true).await.is_err());
    dial_and_answer(&a, &mut ea, A, &b, &mut eb, B).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.set_muted(true).await.unwrap();
    expect_event(&mut ea, 5, "muted", |e| {
        matches!(e, AgentEvent::Muted { muted: true, .. }).then_some(())
    })
    .await;
    assert!(a.status().await.unwrap().muted);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.set_muted(false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.hang_up().await.unwrap();
    expect_event(&mut eb, 5, "B's end", |e| {
        matches!(e, AgentEvent::Ended { .. }).then_some(())
    })
    .await;
    a.power_off().await;
    b.power_off().await;
    // B heard the tone, then a silence of about the muted time, then the tone again.
    let s = read_wav(&wav_b);
    let sounding: Vec<bool> = s
        .chunks(960)
        .map(|w| (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt() > 1000.0)
        .collect();
    let longest_silence = sounding.split(|&x| x).map(<[bool]>::len).max().unwrap_or(0);
    let first_sound = sounding
        .iter()
        .position(|&x| x)
        .expect("the tone before muting");
    let last_sound = sounding.iter().rposition(|&x| x).unwrap();
    let silence_at = sounding[first_sound..]
        .iter()
        .position(|&x| !x)
        .map(|i| i + first_sound)
        .unwrap();
    assert!(
        (60..=90).contains(&longest_silence),
        "one silence of about 1.5 s (75 windows), got {longest_silence}"
    );
    assert!(silence_at < last_sound, "the tone came back after unmuting");
    srv.stop().await;
}

/// A call the server cannot store (its database's disk is full) is a clear outcome of
/// its own, `storage_full` with exit code 5, not `unreachable`: the server answered and
/// nothing was placed. Once space returns the same call is cached. Needs root (tmpfs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_server_cannot_store_is_storage_full_exit_5() {
    use call_proxy_server::{Config, SqliteOptions, SqliteStore};
    let disk = test_support::fs::Tmpfs::mount(4 << 20).unwrap();
    let db = disk.path().join("db.sqlite");
    let store = SqliteStore::open(
        &db,
        SqliteOptions {
            reserve_bytes: 1 << 20,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        db: Some(db.clone()),
        ..Config::default()
    };
    let srv = Server::start_with(config, store);
    let server = srv.addr.to_string();
    // Enrolled while the disk has room (the CA and the credentials live on it too); the
    // TVs' own files are elsewhere.
    let tvs = tempfile::tempdir().unwrap();
    let (a, b) = tv_dirs(&srv, tvs.path()).await;
    let b_id = B.to_string();
    let (code, _) = tokio::task::block_in_place(|| {
        agent_bin(&["missed", "--data-dir", &b, "--server", &server])
    });
    assert_eq!(code, 0);
    let call = || {
        tokio::task::block_in_place(|| {
            agent_bin(&[
                "call",
                "--data-dir",
                &a,
                "--server",
                &server,
                "--to",
                &b_id,
                "--audio-in",
                "null",
                "--audio-out",
                "null",
            ])
        })
    };
    let filler = test_support::fs::fill(disk.path()).unwrap();
    let (code, lines) = call();
    assert_eq!(code, 5, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "storage_full", "{lines:?}");
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("storage is full"),
        "{lines:?}"
    );
    std::fs::remove_file(filler).unwrap();
    // The store looks for space twice a second.
    let mut cached = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (code, lines) = call();
        if code == 0 {
            cached = Some(lines);
            break;
        }
        assert_eq!(code, 5, "{lines:?}");
    }
    let lines = cached.expect("cached once space returned");
    assert_eq!(lines[0]["outcome"], "cached");
    let (code, lines) = tokio::task::block_in_place(|| {
        agent_bin(&["missed", "--data-dir", &b, "--server", &server])
    });
    assert_eq!(
        (code, lines.len()),
        (0, 1),
        "only the stored call: {lines:?}"
    );
    srv.stop().await;
}
