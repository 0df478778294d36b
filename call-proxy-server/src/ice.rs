//! NAT traversal support (issue 13): which STUN and TURN servers a TV may gather ICE
//! candidates from, TURN credentials per call, and an optional STUN responder of the
//! server's own.
//!
//! The relay is coturn, not ours. A TV asks for [`shared_proto::Request::IceServers`]
//! before it places or answers a call and gets `stun_urls`, `turn_urls` and, for TURN,
//! credentials in coturn's shared-secret scheme (`use-auth-secret` /
//! `static-auth-secret`, the "TURN REST API"): the username is `EXPIRY:USER` (Unix
//! seconds), the password `base64(HMAC-SHA1(secret, username))`. coturn checks both with
//! the same secret and refuses the username after its expiry; the server keeps no state
//! per credential and logs no credential.
//!
//! [`serve_stun`] answers STUN Binding requests (RFC 8489) on a UDP port with the source
//! address it saw (XOR-MAPPED-ADDRESS), so a deployment without coturn still gives its TVs
//! server-reflexive candidates. It answers only well-formed Binding requests, one
//! response per request of no more than the request's size plus an address (no
//! amplification), and counts what it drops.

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine as _;
use bytecodec::{DecodeExt, EncodeExt};
use shared_proto::{IceServers, TurnServer, UnixMillis, UserId};
use stun_codec::rfc5389::attributes::{Software, XorMappedAddress};
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder};

/// The servers TVs are told about and the TURN secret, as configured.
#[derive(Default)]
pub struct IceConfig {
    stun_urls: Vec<String>,
    turn_urls: Vec<String>,
    /// coturn's `static-auth-secret` (only in memory; never logged).
    turn_secret: Option<Vec<u8>>,
    /// How long a TURN credential handed out stays valid.
    turn_ttl_s: u64,
}

impl std::fmt::Debug for IceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceConfig")
            .field("stun_urls", &self.stun_urls)
            .field("turn_urls", &self.turn_urls)
            .field("turn_secret", &self.turn_secret.as_ref().map(|_| "…"))
            .field("turn_ttl_s", &self.turn_ttl_s)
            .finish()
    }
}

/// Whether `url` is a STUN (`stun:HOST:PORT`) or TURN (`turn:`/`turns:HOST:PORT[?transport=udp|tcp]`) URL the agent can use.
fn check_url(url: &str, schemes: &[&str]) -> anyhow::Result<()> {
    let Some(parsed) = shared_proto::IceUrl::parse(url) else {
        anyhow::bail!(
            "{url:?} is not a URL (scheme:host:port, the only parameter transport=udp or transport=tcp)"
        );
    };
    anyhow::ensure!(
        schemes.contains(&parsed.scheme),
        "{url:?}: the scheme must be one of {schemes:?}"
    );
    anyhow::ensure!(
        parsed.transport.is_none_or(|t| t == "udp" || t == "tcp"),
        "{url:?}: the only parameter is transport=udp or transport=tcp"
    );
    anyhow::ensure!(
        parsed.port().is_some(),
        "{url:?}: give the port (host:port)"
    );
    anyhow::ensure!(
        url.len() <= shared_proto::MAX_ICE_SERVER_FIELD_LEN,
        "{url:?} is too long"
    );
    Ok(())
}

impl IceConfig {
    /// From the settings: the URLs checked, the TURN secret read from its file (its
    /// first line).
    pub fn load(config: &crate::config::Config) -> anyhow::Result<IceConfig> {
        use anyhow::Context;
        for url in &config.stun_urls {
            check_url(url, &["stun"])?;
        }
        for url in &config.turn_urls {
            check_url(url, &["turn", "turns"])?;
        }
        let n = shared_proto::MAX_ICE_SERVERS;
        anyhow::ensure!(
            config.stun_urls.len() <= n && config.turn_urls.len() <= n,
            "at most {n} stun_urls and {n} turn_urls"
        );
        let turn_secret = match &config.turn_secret_file {
            Some(path) => Some(
                read_secret(path)
                    .with_context(|| format!("cannot read turn_secret_file {}", path.display()))?,
            ),
            None => None,
        };
        anyhow::ensure!(
            config.turn_urls.is_empty() || turn_secret.is_some(),
            "turn_urls need turn_secret_file (coturn's static-auth-secret)"
        );
        anyhow::ensure!(
            config.turn_credential_ttl_s >= 60,
            "turn_credential_ttl_s must be at least 60"
        );
        Ok(IceConfig {
            stun_urls: config.stun_urls.clone(),
            turn_urls: config.turn_urls.clone(),
            turn_secret,
            turn_ttl_s: config.turn_credential_ttl_s,
        })
    }

    /// What `user` may gather candidates from now: the STUN URLs, and each TURN URL with a
    /// fresh credential valid for `turn_credential_ttl_s`.
    pub fn servers_for(&self, user: UserId, now_ms: UnixMillis) -> IceServers {
        let turn = match &self.turn_secret {
            Some(secret) if !self.turn_urls.is_empty() => {
                let expires_s = now_ms.div_euclid(1000) + self.turn_ttl_s as i64;
                let username = format!("{expires_s}:{user}");
                vec![TurnServer {
                    urls: self.turn_urls.clone(),
                    credential: turn_password(secret, &username),
                    username,
                    expires_ms: expires_s * 1000,
                }]
            }
            _ => Vec::new(),
        };
        IceServers {
            stun: self.stun_urls.clone(),
            turn,
        }
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)?;
    let line = text.lines().next().unwrap_or("").trim();
    anyhow::ensure!(!line.is_empty(), "the file's first line is empty");
    Ok(line.as_bytes().to_vec())
}

/// coturn's REST-API password for `username`: base64 of HMAC-SHA1 keyed with the shared
/// secret (SHA-1 is what coturn's `use-auth-secret` uses; the HMAC, not a bare hash).
pub fn turn_password(secret: &[u8], username: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = ring::hmac::sign(&key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// Largest datagram the STUN responder reads; a Binding request is 20 bytes plus a few
/// attributes.
const MAX_STUN_REQUEST: usize = 548;

/// The answer to one datagram from `from`: a Binding success response carrying `from`
/// as XOR-MAPPED-ADDRESS, or `None` (dropped) for anything but a well-formed Binding
/// request.
pub fn stun_answer(datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    // A STUN message starts with two zero bits and has the magic cookie (RFC 8489 §5).
    if datagram.len() < 20 || datagram.len() > MAX_STUN_REQUEST || datagram[0] & 0xc0 != 0 {
        return None;
    }
    let decoded = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(datagram)
        .ok()?
        .ok()?;
    if decoded.class() != MessageClass::Request || decoded.method() != BINDING {
        return None;
    }
    let mut response = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        decoded.transaction_id(),
    );
    response.add_attribute(XorMappedAddress::new(from));
    if let Ok(sw) = Software::new("call-proxy-server".into()) {
        response.add_attribute(sw);
    }
    MessageEncoder::new().encode_into_bytes(response).ok()
}

/// Answers STUN Binding requests on `socket` until the task is dropped, counting into
/// `metrics` (`call_proxy_stun_answered_total`, `call_proxy_stun_dropped_total`).
pub async fn serve_stun(socket: tokio::net::UdpSocket, metrics: &crate::metrics::Metrics) {
    let mut buf = vec![0u8; MAX_STUN_REQUEST + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(v) => v,
            // ICMP errors from earlier answers surface here: not fatal.
            Err(_) => continue,
        };
        match stun_answer(&buf[..n], from) {
            Some(answer) => {
                if socket.send_to(&answer, from).await.is_ok() {
                    metrics.stun_answered.inc();
                }
            }
            None => metrics.stun_dropped.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_passwords_are_coturns() {
        // coturn's REST API: base64(HMAC-SHA1(secret, "expiry:user")); the value checked
        // with `openssl dgst -sha1 -hmac north -binary | base64` on "1700000600:1001".
        assert_eq!(
            turn_password(b"north", "1700000600:1001"),
            "SfbVxSpFClLMD0Rvedq4kmsn97E="
        );
        assert_eq!(turn_password(b"north", "1700000600:1001").len(), 28);
        assert_ne!(
            turn_password(b"north", "1700000600:1001"),
            turn_password(b"south", "1700000600:1001")
        );
    }

    #[test]
    fn credentials_carry_their_expiry_and_user() {
        let ice = IceConfig {
            stun_urls: vec!["stun:192.0.2.1:3478".into()],
            turn_urls: vec!["turn:192.0.2.1:3478?transport=udp".into()],
            turn_secret: Some(b"s3cret".to_vec()),
            turn_ttl_s: 600,
        };
        let s = ice.servers_for(1001, 1_700_000_000_123);
        assert_eq!(s.stun, vec!["stun:192.0.2.1:3478".to_string()]);
        assert_eq!(s.turn.len(), 1);
        assert_eq!(s.turn[0].username, "1700000600:1001");
        assert_eq!(s.turn[0].expires_ms, 1_700_000_600_000);
        assert_eq!(
            s.turn[0].credential,
            turn_password(b"s3cret", "1700000600:1001")
        );
        assert!(!format!("{ice:?}").contains("s3cret"));
        assert!(s.check().is_ok());
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("stun:192.0.2.1:3478", &["stun"]).is_ok());
        assert!(check_url("stun:stun.example.net:3478", &["stun"]).is_ok());
        assert!(check_url("turn:[2001:db8::1]:3478?transport=tcp", &["turn"]).is_ok());
        assert!(check_url("stun:192.0.2.1", &["stun"]).is_err());
        assert!(check_url("http://192.0.2.1:80", &["stun"]).is_err());
        assert!(check_url("turn:192.0.2.1:3478?transport=sctp", &["turn"]).is_err());
    }

    #[test]
    fn the_responder_answers_binding_requests_only() {
        let from: SocketAddr = "203.0.113.5:40123".parse().unwrap();
        let tid = stun_codec::TransactionId::new([7; 12]);
        let req = Message::<Attribute>::new(MessageClass::Request, BINDING, tid);
        let bytes = MessageEncoder::new().encode_into_bytes(req).unwrap();
        let answer = stun_answer(&bytes, from).expect("answered");
        assert!(
            answer.len() <= bytes.len() + 12 + 24 + 8,
            "no amplification"
        );
        let decoded = MessageDecoder::<Attribute>::new()
            .decode_from_bytes(&answer)
            .unwrap()
            .unwrap();
        assert_eq!(decoded.class(), MessageClass::SuccessResponse);
        assert_eq!(decoded.transaction_id(), tid);
        let mapped = decoded.get_attribute::<XorMappedAddress>().unwrap();
        assert_eq!(mapped.address(), from);
        // Not a request, truncated, RTP, oversized: dropped.
        let ind = Message::<Attribute>::new(MessageClass::Indication, BINDING, tid);
        let ind = MessageEncoder::new().encode_into_bytes(ind).unwrap();
        assert!(stun_answer(&ind, from).is_none());
        assert!(stun_answer(&bytes[..19], from).is_none());
        assert!(stun_answer(&[0x80; 40], from).is_none());
        assert!(stun_answer(&vec![0; 2000], from).is_none());
        let mut bad_len = bytes.clone();
        bad_len[3] = 200;
        assert!(stun_answer(&bad_len, from).is_none());
    }
}
