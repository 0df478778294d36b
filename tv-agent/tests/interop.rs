//! A call's media is standard SRTP/Opus: ffmpeg, given an SDP with the sending key from
//! the agent's key log (`TV_AGENT_SRTP_KEYLOG`, RFC 4568 `a=crypto`), receives and decodes
//! what an agent sends. The TVs are enrolled and set the call up over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tv_agent::media::AudioSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_decodes_the_agents_rtp_given_an_sdp() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    // The only test of this binary: the key log is set before any agent starts.
    let keylog = dir.path().join("srtp-keys.log");
    std::env::set_var(tv_agent::media::srtp::KEYLOG_ENV, &keylog);
    // ffmpeg stands where TV B's media would arrive: B advertises ffmpeg's port.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let (a, mut ea) = boot(
        srv.agent_config(1001, AudioSpec::Tone(440.0), AudioSpec::Null)
            .await,
    )
    .await;
    let mut cfg_b = srv
        .agent_config(2002, AudioSpec::Null, AudioSpec::Null)
        .await;
    cfg_b.advertise_port = Some(port);
    // B without ICE (like an agent one release behind): A, which has it, falls back to
    // the address the server saw, ffmpeg's.
    cfg_b.ice = false;
    let (b, mut eb) = boot(cfg_b).await;
    dial_and_answer(&a, &mut ea, 1001, &b, &mut eb, 2002).await;
    // A's sending key: the second line. B (answering) starts its media, and logs its
    // sending key, before it tells the server; A starts its own once told. (A never
    // logs B's stream: it comes from B's socket, not the advertised port.)
    let mut lines: Vec<Vec<String>> = Vec::new();
    for _ in 0..250 {
        lines = std::fs::read_to_string(&keylog)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(String::from).collect())
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let a_line = &lines[1];
    let sdp = dir.path().join("call.sdp");
    std::fs::write(
        &sdp,
        format!(
            "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=TV call\nc=IN IP4 127.0.0.1\nt=0 0\n\
             m=audio {port} RTP/SAVP 111\na=rtpmap:111 opus/48000/2\na=rtcp-mux\n\
             a=crypto:1 {} {}\n",
            a_line[2], a_line[3]
        ),
    )
    .unwrap();
    let out = dir.path().join("ffmpeg.wav");
    let mut ffmpeg = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-protocol_whitelist",
            "file,udp,rtp,srtp",
            "-i",
        ])
        .arg(&sdp)
        .args(["-t", "2", "-ac", "1", "-ar", "48000", "-y"])
        .arg(&out)
        .stdin(Stdio::null())
        .spawn()
        .expect("ffmpeg is installed (scripts/setup.sh installs it)");
    let status = test_support::process::wait_exit_async(&mut ffmpeg, Duration::from_secs(10))
        .await
        .unwrap();
    test_support::process::kill(&mut ffmpeg);
    assert!(
        status.is_some_and(|s| s.success()),
        "ffmpeg finished decoding: {status:?}"
    );
    a.hang_up().await.unwrap();
    a.power_off().await;
    b.power_off().await;
    let samples = read_wav(&out);
    assert!(
        samples.len() >= 90_000,
        "ffmpeg decoded about 2 s, got {}",
        samples.len()
    );
    let p440 = tone_power(&samples, 440.0);
    let p1000 = tone_power(&samples, 1000.0);
    assert!(
        p440 > 20.0 * p1000,
        "440 Hz {p440:.0} vs 1000 Hz {p1000:.0}"
    );
    srv.stop().await;
}
