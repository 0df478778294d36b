//! Server-reflexive candidate gathering (RFC 8445 §5.1.1.2): a STUN Binding request from
//! the media socket to each STUN server the call-proxy server named, retransmitted after
//! [`RTO`] doubling, and the XOR-MAPPED-ADDRESS of each answer. Sans-I/O like
//! [`super::ice`]: the transport feeds it the STUN answers and the time.

use std::net::SocketAddr;
use std::time::Duration;

use stun_codec::rfc5389::attributes::{MappedAddress, XorMappedAddress};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::{MessageClass, TransactionId};
use tokio::time::Instant;

use super::stun::{self, StunMessage};

/// First retransmission timeout of a Binding request.
pub const RTO: Duration = Duration::from_millis(100);
/// Gathering gives up on a server after this (a call must not wait long for it).
pub const GATHER_TIMEOUT: Duration = Duration::from_millis(700);

#[derive(Debug, Clone)]
struct Request {
    server: SocketAddr,
    tid: TransactionId,
    next: Instant,
    rto: Duration,
    mapped: Option<SocketAddr>,
}

/// Binding requests to the STUN servers and their answers.
#[derive(Debug, Clone)]
pub struct Gatherer {
    requests: Vec<Request>,
    deadline: Instant,
    transmits: Vec<(SocketAddr, Vec<u8>)>,
}

impl Gatherer {
    /// Starts asking `servers` at `now`.
    pub fn new(servers: &[SocketAddr], now: Instant) -> Self {
        let mut g = Gatherer {
            requests: servers
                .iter()
                .map(|&server| Request {
                    server,
                    tid: stun::transaction_id(),
                    next: now,
                    rto: RTO,
                    mapped: None,
                })
                .collect(),
            deadline: now + GATHER_TIMEOUT,
            transmits: Vec::new(),
        };
        g.handle_timeout(now);
        g
    }

    /// Sends what is due at `now` (first requests and retransmissions).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.deadline {
            return;
        }
        for r in &mut self.requests {
            if r.mapped.is_none() && now >= r.next {
                let m = StunMessage::new(MessageClass::Request, BINDING, r.tid);
                if let Some(bytes) = stun::encode(m) {
                    self.transmits.push((r.server, bytes));
                }
                r.next = now + r.rto;
                r.rto *= 2;
            }
        }
    }

    /// The next datagram to send (to a STUN server).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop()
    }

    /// When [`Gatherer::handle_timeout`] is next due; `None` when done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.requests.iter().all(|r| r.mapped.is_some()) {
            return None;
        }
        self.requests
            .iter()
            .filter(|r| r.mapped.is_none())
            .map(|r| r.next.min(self.deadline))
            .min()
    }

    /// Takes a STUN message from `from`; `true` if it answered one of our requests.
    pub fn handle_stun(&mut self, msg: &StunMessage, from: SocketAddr) -> bool {
        if msg.class() != MessageClass::SuccessResponse || msg.method() != BINDING {
            return false;
        }
        let Some(r) = self
            .requests
            .iter_mut()
            .find(|r| r.tid == msg.transaction_id() && r.server == from)
        else {
            return false;
        };
        let mapped = msg
            .get_attribute::<XorMappedAddress>()
            .map(|a| a.address())
            .or_else(|| msg.get_attribute::<MappedAddress>().map(|a| a.address()));
        r.mapped = mapped;
        mapped.is_some()
    }

    /// Every server answered, or the time is up.
    pub fn done_at(&self, now: Instant) -> bool {
        now >= self.deadline || self.requests.iter().all(|r| r.mapped.is_some())
    }

    /// The mapped addresses learned, each once.
    pub fn mapped(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for m in self.requests.iter().filter_map(|r| r.mapped) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }
}

/// The `HOST:PORT` of a `stun:` or `turn:` URL (RFC 7064/7065), without parameters.
pub fn url_host_port<'a>(url: &'a str, schemes: &[&str]) -> Option<&'a str> {
    shared_proto::IceUrl::parse(url)
        .filter(|u| schemes.contains(&u.scheme))
        .map(|u| u.host_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_again_until_answered_and_keeps_the_mapped_address() {
        let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let t0 = Instant::now();
        let mut g = Gatherer::new(&[server], t0);
        let (to, first) = g.poll_transmit().expect("a request");
        assert_eq!(to, server);
        assert!(g.poll_transmit().is_none());
        g.handle_timeout(t0 + RTO);
        let (_, again) = g.poll_transmit().expect("retransmitted");
        assert_eq!(first, again, "the same transaction");
        let req = stun::decode(&first).unwrap();
        let mapped: SocketAddr = "203.0.113.9:41000".parse().unwrap();
        let mut ok = StunMessage::new(MessageClass::SuccessResponse, BINDING, req.transaction_id());
        ok.add_attribute(XorMappedAddress::new(mapped));
        let ok = stun::decode(&stun::encode(ok).unwrap()).unwrap();
        assert!(
            !g.handle_stun(&ok, "192.0.2.2:3478".parse().unwrap()),
            "another sender"
        );
        assert!(g.handle_stun(&ok, server));
        assert!(g.done_at(t0 + RTO));
        assert_eq!(g.mapped(), vec![mapped]);
        assert_eq!(g.poll_timeout(), None);
    }

    #[test]
    fn gives_up_at_the_deadline() {
        let t0 = Instant::now();
        let mut g = Gatherer::new(&["192.0.2.1:3478".parse().unwrap()], t0);
        let mut sent = 0;
        let mut now = t0;
        while let Some(t) = g.poll_timeout() {
            now = t;
            g.handle_timeout(now);
            while g.poll_transmit().is_some() {
                sent += 1;
            }
            if now >= t0 + GATHER_TIMEOUT {
                break;
            }
        }
        assert!(g.done_at(t0 + GATHER_TIMEOUT));
        assert_eq!(sent, 3, "at 0, 100 and 300 ms; the next would be at 700");
        assert!(g.mapped().is_empty());
        assert!(now <= t0 + GATHER_TIMEOUT);
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_host_port("stun:192.0.2.1:3478", &["stun"]),
            Some("192.0.2.1:3478")
        );
        assert_eq!(
            url_host_port("turn:h.example:3478?transport=tcp", &["turn"]),
            Some("h.example:3478")
        );
        assert_eq!(url_host_port("turn:h:1", &["stun"]), None);
    }
}
