//! Messages left for a switched-off TV, end to end with the real `tv-agent` binary over
//! TLS: `tv-agent send` leaves a text, a voice message recorded from a tone, a picture and
//! a clip (made by ffmpeg); `tv-agent missed` at the TV's next power-on prints each with
//! its sender and the file it saved, and the files are checked independently (ffmpeg
//! decodes the voice message and finds the caller's tone, the picture is byte for byte
//! what was sent, the clip has the sent duration). A TV SIGKILLed while it downloads a
//! body gets the message again at the next power-on, and once only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use call_proxy_server::storage::Store;
use common::{run_agent, Server};
use serde_json::Value;

const SENDER: u64 = 8101;
const VIEWER: u64 = 8102;

/// Makes a file with ffmpeg (`args` between the inputs and the output).
fn ffmpeg(args: &[&str], out: &Path) {
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .arg(out)
        .status()
        .expect("ffmpeg is installed (scripts/setup.sh installs it)");
    assert!(status.success(), "ffmpeg made {}", out.display());
}

/// ffprobe's value of `entry` (e.g. `format=duration`) for `file`.
fn probe(file: &Path, entry: &str) -> String {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            entry,
        ])
        .args(["-of", "default=nw=1:nk=1"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "ffprobe {}: {out:?}", file.display());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn send(server: SocketAddr, data: &Path, to: u64, body: &[&str]) -> (i32, Value) {
    let (server, to) = (server.to_string(), to.to_string());
    let mut args = vec!["send", "--server", &server, "--to", &to];
    args.extend_from_slice(&["--data-dir", data.to_str().unwrap()]);
    args.extend_from_slice(body);
    let (code, lines, stderr) = run_agent(&args);
    assert_eq!(lines.len(), 1, "one JSON line: {lines:?} {stderr}");
    (code, lines[0].clone())
}

fn missed(server: SocketAddr, data: &Path) -> Vec<Value> {
    let addr = server.to_string();
    let (code, lines, stderr) = run_agent(&[
        "missed",
        "--server",
        &addr,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "missed: {stderr}");
    lines
}

fn messages_only(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["kind"] != "call")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_left_for_a_switched_off_tv_is_delivered_at_power_on() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db"),
    )
    .await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    srv.tv_dir(SENDER, &a).await;
    srv.tv_dir(VIEWER, &b).await;
    // The viewer's TV was on once (the server knows it), and is off now.
    assert!(missed(srv.addr, &b).is_empty());
    let picture = dir.path().join("holiday.jpg");
    ffmpeg(
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=640x480",
            "-frames:v",
            "1",
        ],
        &picture,
    );
    let clip = dir.path().join("clip.mp4");
    ffmpeg(
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25:duration=3",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=3",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "libopus",
            "-shortest",
        ],
        &clip,
    );

    let mut ids = Vec::new();
    for body in [
        vec!["--text", "Ring me when you are home"],
        vec!["--voice", "tone:440", "--seconds", "3"],
        vec![
            "--picture",
            picture.to_str().unwrap(),
            "--caption",
            "the beach",
        ],
        vec!["--video", clip.to_str().unwrap()],
    ] {
        let (code, line) = send(srv.addr, &a, VIEWER, &body);
        assert_eq!(code, 0, "{body:?}: {line}");
        assert_eq!(line["outcome"], "stored", "{line}");
        ids.push(line["message_id"].as_u64().expect("a message id"));
    }
    // Refusals: clear, exit 1, nothing stored.
    let long = "x".repeat(5_000);
    let (code, line) = send(srv.addr, &a, VIEWER, &["--text", &long]);
    assert_eq!(
        (code, line["outcome"].as_str()),
        (1, Some("too_large")),
        "{line}"
    );
    let (code, line) = send(srv.addr, &a, 9_999_999, &["--text", "hello?"]);
    assert_eq!(
        (code, line["outcome"].as_str()),
        (1, Some("unknown_user")),
        "{line}"
    );
    let not_a_picture = dir.path().join("notes.jpg");
    std::fs::write(&not_a_picture, b"\xff\xd8\xff\xe0 this is not a picture").unwrap();
    let (code, line) = send(
        srv.addr,
        &a,
        VIEWER,
        &["--picture", not_a_picture.to_str().unwrap()],
    );
    assert_eq!(
        (code, line["outcome"].as_str()),
        (1, Some("bad_media")),
        "{line}"
    );

    // The viewer's TV powers on: four messages, newest first, from the sender.
    let got = messages_only(&missed(srv.addr, &b));
    let kinds: Vec<&str> = got.iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["video", "picture", "voice", "text"], "{got:?}");
    let got_ids: Vec<u64> = got
        .iter()
        .map(|m| m["message_id"].as_u64().unwrap())
        .collect();
    assert_eq!(got_ids, ids.iter().rev().copied().collect::<Vec<_>>());
    for m in &got {
        assert_eq!(m["from"], SENDER, "{m}");
    }
    let file = |m: &Value| PathBuf::from(m["file"].as_str().expect("a saved file"));
    assert_eq!(got[3]["text"], "Ring me when you are home");
    assert!(got[3]["file"].is_null());

    // The voice message: ffmpeg decodes it, and it is the caller's 440 Hz tone, 3 s.
    let voice = file(&got[2]);
    let wav = dir.path().join("voice.wav");
    ffmpeg(
        &["-i", voice.to_str().unwrap(), "-ac", "1", "-ar", "48000"],
        &wav,
    );
    let samples = common::read_wav(&wav);
    assert!(
        (samples.len() as i64 - 144_000).abs() < 2_000,
        "{} samples",
        samples.len()
    );
    let (p440, p1000) = (
        common::tone_power(&samples, 440.0),
        common::tone_power(&samples, 1_000.0),
    );
    assert!(
        p440 > 50.0 * p1000,
        "440 Hz {p440:.0} vs 1000 Hz {p1000:.0}"
    );
    assert_eq!(got[2]["mime"], "audio/ogg");

    // The picture: the very bytes sent, 640 x 480.
    let pic = file(&got[1]);
    assert_eq!(
        std::fs::read(&pic).unwrap(),
        std::fs::read(&picture).unwrap()
    );
    assert_eq!(probe(&pic, "stream=width,height"), "640\n480");
    assert_eq!(got[1]["text"], "the beach");

    // The clip decodes and lasts the 3 s sent.
    let saved = file(&got[0]);
    let secs: f64 = probe(&saved, "format=duration").parse().unwrap();
    assert!((secs - 3.0).abs() < 0.1, "the clip lasts {secs} s");
    let decode = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&saved)
        .args(["-f", "null", "-"])
        .status()
        .unwrap();
    assert!(decode.success(), "ffmpeg decodes the clip");

    // Kept, so the next power-on shows nothing new; the files are still there.
    assert!(messages_only(&missed(srv.addr, &b)).is_empty());
    assert!(saved.exists() && voice.exists() && pic.exists());
    srv.stop().await;
}

/// Runs `tv-agent missed` for `data`, SIGKILLed as soon as a body's `.part` file holds
/// some bytes; returns whether it was killed so (rather than running to its end).
fn missed_killed_mid_download(server: SocketAddr, data: &Path) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tv-agent"))
        .args(["missed", "--server", &server.to_string()])
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let inbox = data.join("messages");
    let deadline = Instant::now() + Duration::from_secs(20);
    let killed = loop {
        let partial = std::fs::read_dir(&inbox).ok().is_some_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().ends_with(".part")
                    && e.metadata().is_ok_and(|m| m.len() > 0)
            })
        });
        if partial {
            let _ = child.kill();
            break true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    child.wait().unwrap();
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tv_killed_mid_download_gets_its_message_again_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.path().join("db"),
    )
    .await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    srv.tv_dir(SENDER, &a).await;
    srv.tv_dir(VIEWER, &b).await;
    // The viewer's TV was on once (the server knows it), and is off now.
    assert!(missed(srv.addr, &b).is_empty());
    // A picture of noise at high quality: megabytes that take a while to come down.
    let picture = dir.path().join("noise.png");
    ffmpeg(
        &[
            "-f",
            "lavfi",
            "-i",
            "nullsrc=size=1600x1200,geq=random(1)*255:128:128",
            "-frames:v",
            "1",
        ],
        &picture,
    );
    let size = std::fs::metadata(&picture).unwrap().len();
    assert!(size > 1_000_000, "a big picture: {size} bytes");
    let (code, line) = send(
        srv.addr,
        &a,
        VIEWER,
        &["--picture", picture.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{line}");
    let id = line["message_id"].as_u64().unwrap();

    let addr = srv.addr;
    let data = b.clone();
    let killed = tokio::task::spawn_blocking(move || missed_killed_mid_download(addr, &data))
        .await
        .unwrap();
    assert!(killed, "the TV was switched off while the body came down");
    // Not acknowledged: the server still holds it for the TV.
    let waiting = srv.shared().store.mailbox(VIEWER).await.unwrap();
    assert_eq!(waiting.waiting, 1, "{waiting:?}");

    // Next power-on: the message, once, with the whole body (the download resumed).
    let got = messages_only(&missed(srv.addr, &b));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["message_id"], id);
    let saved = PathBuf::from(got[0]["file"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        std::fs::read(&picture).unwrap()
    );
    assert_eq!(srv.shared().store.mailbox(VIEWER).await.unwrap().waiting, 0);
    let leftovers: Vec<_> = std::fs::read_dir(b.join("messages"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "no partial file left: {leftovers:?}");
    assert!(
        messages_only(&missed(srv.addr, &b)).is_empty(),
        "delivered once"
    );
    srv.stop().await;
}
