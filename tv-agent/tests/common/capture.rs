//! A capturing UDP relay between two TVs (the wire as an eavesdropper sees it): each TV
//! is told the other's address is a relay port; the relay forwards every datagram as it
//! is, keeps a copy, and can inject datagrams toward a TV from the address that TV knows
//! as its peer's. Plus what the SRTP tests do with the captures: split RTP from RTCP,
//! read the key log, and run ffmpeg on an SDP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

/// SIGINT (libc is not a dependency here).
const SIGINT: i32 = 2;
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 2048;
/// Most datagrams kept per direction (a minute of audio and its reports).
const MAX_KEPT: usize = 4_000;

/// Datagrams seen per direction.
#[derive(Default)]
struct Seen {
    a_to_b: Vec<Vec<u8>>,
    b_to_a: Vec<Vec<u8>>,
}

/// The relay.
pub struct Capture {
    /// The port advertised for TV A (B sends here; A's datagrams reach B from here).
    pub port_a: u16,
    /// The port advertised for TV B.
    pub port_b: u16,
    sock_a: Arc<UdpSocket>,
    sock_b: Arc<UdpSocket>,
    seen: Arc<Mutex<Seen>>,
    /// A→B RTP datagrams still to be tampered with in flight.
    tamper_to_b: Arc<AtomicUsize>,
    /// The real addresses, once started: A's, B's.
    real: Mutex<Option<(SocketAddr, SocketAddr)>>,
}

impl Capture {
    pub async fn new() -> Capture {
        let sock_a = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let sock_b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        Capture {
            port_a: sock_a.local_addr().unwrap().port(),
            port_b: sock_b.local_addr().unwrap().port(),
            sock_a,
            sock_b,
            seen: Arc::default(),
            tamper_to_b: Arc::default(),
            real: Mutex::new(None),
        }
    }

    /// Starts forwarding between the TVs' real media addresses.
    pub fn start(&self, real_a: SocketAddr, real_b: SocketAddr) {
        *self.real.lock().unwrap() = Some((real_a, real_b));
        // A sends to port_b (arrives on sock_b) and B hears it from sock_a, and back.
        for (inbound, outbound, dest, a_to_b) in [
            (
                Arc::clone(&self.sock_b),
                Arc::clone(&self.sock_a),
                real_b,
                true,
            ),
            (
                Arc::clone(&self.sock_a),
                Arc::clone(&self.sock_b),
                real_a,
                false,
            ),
        ] {
            let seen = Arc::clone(&self.seen);
            let tamper = Arc::clone(&self.tamper_to_b);
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                while let Ok((n, _)) = inbound.recv_from(&mut buf).await {
                    let flip = a_to_b
                        && n > 12
                        && !is_rtcp(&buf[..n])
                        && tamper
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| {
                                k.checked_sub(1)
                            })
                            .is_ok();
                    if flip {
                        // The last payload byte before an 80-bit tag.
                        buf[n - 11] ^= 0x01;
                    }
                    {
                        let mut seen = seen.lock().unwrap();
                        let list = if a_to_b {
                            &mut seen.a_to_b
                        } else {
                            &mut seen.b_to_a
                        };
                        if list.len() < MAX_KEPT {
                            list.push(buf[..n].to_vec());
                        }
                    }
                    let _ = outbound.send_to(&buf[..n], dest).await;
                }
            });
        }
    }

    /// Flips one byte of each of the next `n` RTP datagrams from A to B on their way.
    pub fn tamper_next_to_b(&self, n: usize) {
        self.tamper_to_b.store(n, Ordering::Relaxed);
    }

    /// How many of those are still to come.
    pub fn tamper_pending(&self) -> usize {
        self.tamper_to_b.load(Ordering::Relaxed)
    }

    /// Copies of the datagrams A sent B (`a_to_b`) or B sent A, in arrival order.
    pub fn seen(&self, a_to_b: bool) -> Vec<Vec<u8>> {
        let seen = self.seen.lock().unwrap();
        if a_to_b {
            seen.a_to_b.clone()
        } else {
            seen.b_to_a.clone()
        }
    }

    /// Sends `datagram` to B as if A had sent it (from the address B knows as A's).
    pub async fn inject_to_b(&self, datagram: &[u8]) {
        let (_, real_b) = self.real.lock().unwrap().expect("relay started");
        self.sock_a.send_to(datagram, real_b).await.unwrap();
    }
}

/// RFC 5761: RTCP packet types 192..=223 in the second byte.
pub fn is_rtcp(d: &[u8]) -> bool {
    d.len() >= 2 && (192..=223).contains(&d[1])
}

/// The RTP datagrams among `all`.
pub fn rtp_only(all: &[Vec<u8>]) -> Vec<Vec<u8>> {
    all.iter().filter(|d| !is_rtcp(d)).cloned().collect()
}

/// The SSRC of an RTP datagram.
pub fn rtp_ssrc(d: &[u8]) -> u32 {
    u32::from_be_bytes(d[8..12].try_into().unwrap())
}

/// A key log line: call id, SSRC, suite, inline key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLine {
    pub call_id: u64,
    pub ssrc: u32,
    pub suite: String,
    pub inline: String,
}

/// The key log's lines.
pub fn key_lines(path: &Path) -> Vec<KeyLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "key log line {l:?}");
            KeyLine {
                call_id: f[0].parse().unwrap(),
                ssrc: f[1].parse().unwrap(),
                suite: f[2].to_string(),
                inline: f[3].strip_prefix("inline:").expect("inline:").to_string(),
            }
        })
        .collect()
}

/// An SDP for an RTP/Opus stream to 127.0.0.1:`port`, SRTP with `crypto` (suite,
/// inline key) if given (RFC 4568's `a=crypto`).
pub fn sdp(port: u16, crypto: Option<(&str, &str)>) -> String {
    let (proto, line) = match crypto {
        Some((suite, key)) => ("RTP/SAVP", format!("a=crypto:1 {suite} inline:{key}\r\n")),
        None => ("RTP/AVP", String::new()),
    };
    format!(
        "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=capture\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {port} {proto} 111\r\na=rtpmap:111 opus/48000/2\r\n{line}"
    )
}

/// Whether some process has UDP port `port` bound on IPv4 (from /proc/net/udp).
fn udp_bound(port: u16) -> bool {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|local| local.ends_with(&suffix))
}

/// What ffmpeg made of a stream.
pub struct Decoded {
    /// ffmpeg's exit status was success.
    pub ok: bool,
    /// Its stderr.
    pub log: String,
    /// The WAV it wrote (48 kHz mono), if any.
    pub wav: Option<std::path::PathBuf>,
}

/// Plays `packets` (RTP datagrams, 2 ms apart) to ffmpeg reading the SDP `sdp(port,
/// crypto)` and decoding two seconds to a 48 kHz mono WAV in `dir`; an ffmpeg that has
/// not ended 3 s after the last packet is stopped (SIGINT).
pub async fn ffmpeg_decode(
    dir: &Path,
    name: &str,
    packets: &[Vec<u8>],
    crypto: Option<(&str, &str)>,
) -> Decoded {
    let port = test_support::net::free_port().unwrap();
    let sdp_path = dir.join(format!("{name}.sdp"));
    let wav = dir.join(format!("{name}.wav"));
    std::fs::write(&sdp_path, sdp(port, crypto)).unwrap();
    let log_path = dir.join(format!("{name}.ffmpeg.log"));
    let mut child = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "warning"])
        .args(["-protocol_whitelist", "file,udp,rtp,srtp,crypto"])
        .arg("-i")
        .arg(&sdp_path)
        // Two seconds of output, then ffmpeg ends by itself and writes the trailer.
        .args(["-t", "2", "-ac", "1", "-ar", "48000", "-y"])
        .arg(&wav)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("ffmpeg (Debian package ffmpeg) runs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !udp_bound(port) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ffmpeg did not bind port {port}"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for p in packets {
        let _ = out.send_to(p, ("127.0.0.1", port)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut status = test_support::process::wait_exit_async(&mut child, Duration::from_secs(3))
        .await
        .unwrap();
    if status.is_none() {
        // Not two seconds of audio: stop it. After its start ffmpeg takes a second
        // SIGINT to interrupt a read (the first only asks it to stop after the read).
        for _ in 0..2 {
            let _ = test_support::process::signal(child.id(), SIGINT);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        status = test_support::process::wait_exit_async(&mut child, Duration::from_secs(5))
            .await
            .unwrap();
    }
    if status.is_none() {
        test_support::process::kill(&mut child);
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    Decoded {
        ok: status.is_some_and(|s| s.success()),
        log,
        wav: wav.exists().then_some(wav),
    }
}
