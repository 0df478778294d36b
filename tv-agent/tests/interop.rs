//! A call's media is standard RTP/Opus: ffmpeg, given an SDP, receives and decodes what
//! an agent sends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tv_agent::media::AudioSpec;
use tv_agent::{AgentEvent, DialResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_decodes_the_agents_rtp_given_an_sdp() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db.sqlite"),
    )
    .await;
    // ffmpeg stands where TV B's media would arrive: B advertises ffmpeg's port.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sdp = dir.path().join("call.sdp");
    std::fs::write(
        &sdp,
        format!(
            "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=TV call\nc=IN IP4 127.0.0.1\nt=0 0\n\
             m=audio {port} RTP/AVP 111\na=rtpmap:111 opus/48000/2\na=rtcp-mux\n"
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
            "file,udp,rtp",
            "-i",
        ])
        .arg(&sdp)
        .args(["-t", "2", "-ac", "1", "-ar", "48000", "-y"])
        .arg(&out)
        .stdin(Stdio::null())
        .spawn()
        .expect("ffmpeg is installed (scripts/setup.sh installs it)");
    tokio::time::sleep(Duration::from_millis(700)).await;

    let (a, mut ea) = boot(agent_config(
        srv.addr,
        1001,
        AudioSpec::Tone(440.0),
        AudioSpec::Null,
    ))
    .await;
    let mut cfg_b = agent_config(srv.addr, 2002, AudioSpec::Null, AudioSpec::Null);
    cfg_b.advertise_port = Some(port);
    let (b, mut eb) = boot(cfg_b).await;
    assert!(matches!(a.dial(2002).await, DialResult::Ringing(_)));
    expect_event(&mut eb, 5, "incoming", |e| {
        matches!(e, AgentEvent::Incoming { .. }).then_some(())
    })
    .await;
    b.answer().await.unwrap();
    expect_event(&mut ea, 5, "answered", |e| {
        matches!(e, AgentEvent::Answered { .. }).then_some(())
    })
    .await;
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
