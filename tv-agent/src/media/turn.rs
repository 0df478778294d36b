//! A TURN client over UDP (RFC 8656) for a call's relayed candidate, sans-I/O like
//! [`super::ice`]: it allocates on the server the call-proxy server named (long-term
//! credentials: the 401 challenge's realm and nonce, MESSAGE-INTEGRITY over
//! MD5(username:realm:password), a stale nonce retried once), installs permissions for the
//! peer's addresses, wraps what ICE and the media session send to a peer in Send
//! indications and unwraps Data indications, and refreshes the allocation and the
//! permissions before they expire. Every datagram it emits goes to its TURN server.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use stun_codec::rfc5389::attributes::{
    ErrorCode, MessageIntegrity, Nonce, Realm, Username, XorMappedAddress,
};
use stun_codec::rfc5766::attributes::{
    Data, Lifetime, RequestedTransport, XorPeerAddress, XorRelayAddress,
};
use stun_codec::rfc5766::methods::{ALLOCATE, CREATE_PERMISSION, DATA, REFRESH, SEND};
use stun_codec::{MessageClass, Method, TransactionId};
use tokio::time::Instant;

use super::stun::{self, StunMessage};

/// First retransmission timeout of a request to the TURN server.
pub const RTO: Duration = Duration::from_millis(100);
/// Transmissions of one request before it is given up.
const MAX_ATTEMPTS: u32 = 5;
/// Permissions last five minutes (RFC 8656 §9); renewed after four.
const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// UDP, in REQUESTED-TRANSPORT.
const UDP: u8 = 17;

/// Where the allocation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnState {
    /// Asking (first unauthenticated, then with the challenge's realm and nonce).
    Allocating,
    /// The relay address is ours.
    Allocated,
    /// Refused (bad credentials, no answer, quota): no relayed candidate.
    Failed,
}

#[derive(Debug, Clone)]
struct Pending {
    tid: TransactionId,
    method: Method,
    bytes: Vec<u8>,
    attempts: u32,
    next: Instant,
    /// For CreatePermission: the address it is for.
    peer: Option<IpAddr>,
}

/// One allocation on one TURN server.
pub struct TurnClient {
    server: SocketAddr,
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<String>,
    state: TurnState,
    relayed: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    refresh_at: Option<Instant>,
    /// Peers permitted (or being permitted), and when to renew.
    permissions: Vec<(IpAddr, Option<Instant>)>,
    pending: Vec<Pending>,
    transmits: VecDeque<Vec<u8>>,
    stale_nonce_retries: u32,
    /// Why it failed, for the log.
    failure: Option<String>,
}

impl TurnClient {
    /// Starts allocating on `server` with these credentials.
    pub fn new(server: SocketAddr, username: String, password: String, now: Instant) -> Self {
        let mut c = TurnClient {
            server,
            username,
            password,
            realm: None,
            nonce: None,
            state: TurnState::Allocating,
            relayed: None,
            mapped: None,
            refresh_at: None,
            permissions: Vec::new(),
            pending: Vec::new(),
            transmits: VecDeque::new(),
            stale_nonce_retries: 0,
            failure: None,
        };
        c.allocate(now);
        c
    }

    /// The TURN server.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Where the allocation stands.
    pub fn state(&self) -> TurnState {
        self.state
    }

    /// Why it failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The relayed address (our relayed candidate), once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed.filter(|_| self.state == TurnState::Allocated)
    }

    /// Our address as the TURN server saw it (a server-reflexive candidate).
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    fn fail(&mut self, why: String) {
        self.state = TurnState::Failed;
        self.failure = Some(why);
        self.pending.clear();
    }

    fn request(
        &mut self,
        method: Method,
        attrs: Vec<stun::Attribute>,
        peer: Option<IpAddr>,
        now: Instant,
    ) {
        let tid = stun::transaction_id();
        let mut m = StunMessage::new(MessageClass::Request, method, tid);
        for a in attrs {
            m.add_attribute(a);
        }
        let bytes = match (&self.realm, &self.nonce) {
            (Some(realm), Some(nonce)) => {
                let (Ok(user), Ok(realm), Ok(nonce)) = (
                    Username::new(self.username.clone()),
                    Realm::new(realm.clone()),
                    Nonce::new(nonce.clone()),
                ) else {
                    self.fail("a TURN credential does not fit in STUN".into());
                    return;
                };
                m.add_attribute(user.clone());
                m.add_attribute(realm.clone());
                m.add_attribute(nonce);
                let Ok(mi) =
                    MessageIntegrity::new_long_term_credential(&m, &user, &realm, &self.password)
                else {
                    return;
                };
                m.add_attribute(mi);
                stun::encode(m)
            }
            _ => stun::encode(m),
        };
        let Some(bytes) = bytes else { return };
        self.transmits.push_back(bytes.clone());
        self.pending.push(Pending {
            tid,
            method,
            bytes,
            attempts: 1,
            next: now + RTO,
            peer,
        });
    }

    fn allocate(&mut self, now: Instant) {
        self.request(
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
            None,
            now,
        );
    }

    /// Lets `peer`'s address send to us through the relay (and us to it).
    pub fn permit(&mut self, peer: IpAddr, now: Instant) {
        if self.permissions.iter().any(|(ip, _)| *ip == peer) {
            return;
        }
        self.permissions.push((peer, None));
        if self.state == TurnState::Allocated {
            self.create_permission(peer, now);
        }
    }

    fn create_permission(&mut self, peer: IpAddr, now: Instant) {
        self.request(
            CREATE_PERMISSION,
            vec![XorPeerAddress::new(SocketAddr::new(peer, 0)).into()],
            Some(peer),
            now,
        );
    }

    /// A Send indication carrying `data` to `peer` (to go to the TURN server); `None`
    /// before the allocation or without a permission for `peer`.
    pub fn wrap(&self, peer: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        if self.state != TurnState::Allocated
            || !self.permissions.iter().any(|(ip, _)| *ip == peer.ip())
        {
            return None;
        }
        let mut m = StunMessage::new(MessageClass::Indication, SEND, stun::transaction_id());
        m.add_attribute(XorPeerAddress::new(peer));
        m.add_attribute(Data::new(data.to_vec()).ok()?);
        stun::encode(m)
    }

    /// The peer and the data of a Data indication from the TURN server, if `msg` is one
    /// from a permitted peer.
    pub fn unwrap(&self, msg: &StunMessage) -> Option<(SocketAddr, Vec<u8>)> {
        if msg.class() != MessageClass::Indication || msg.method() != DATA {
            return None;
        }
        let peer = msg.get_attribute::<XorPeerAddress>()?.address();
        if !self.permissions.iter().any(|(ip, _)| *ip == peer.ip()) {
            return None;
        }
        let data = msg.get_attribute::<Data>()?.data().to_vec();
        Some((peer, data))
    }

    /// Takes a response from the TURN server; `true` if it was one of ours.
    pub fn handle_response(&mut self, msg: &StunMessage, now: Instant) -> bool {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.tid == msg.transaction_id() && p.method == msg.method())
        else {
            return false;
        };
        let p = self.pending.remove(i);
        match msg.class() {
            MessageClass::SuccessResponse => self.success(&p, msg, now),
            MessageClass::ErrorResponse => self.error(&p, msg, now),
            _ => {}
        }
        true
    }

    fn success(&mut self, p: &Pending, msg: &StunMessage, now: Instant) {
        // A success must carry integrity with our key once we authenticate.
        if let (Some(realm), true) = (&self.realm, self.nonce.is_some()) {
            let ok = match (
                Username::new(self.username.clone()),
                Realm::new(realm.clone()),
            ) {
                (Ok(u), Ok(r)) => msg.get_attribute::<MessageIntegrity>().is_some_and(|mi| {
                    mi.check_long_term_credential(&u, &r, &self.password)
                        .is_ok()
                }),
                _ => false,
            };
            if !ok {
                return;
            }
        }
        match p.method {
            ALLOCATE => {
                self.relayed = msg.get_attribute::<XorRelayAddress>().map(|a| a.address());
                self.mapped = msg.get_attribute::<XorMappedAddress>().map(|a| a.address());
                if self.relayed.is_none() {
                    self.fail("the TURN server's allocation had no relayed address".into());
                    return;
                }
                self.state = TurnState::Allocated;
                let lifetime = msg
                    .get_attribute::<Lifetime>()
                    .map_or(Duration::from_secs(600), |l| l.lifetime());
                self.refresh_at = Some(now + lifetime / 2);
                let waiting: Vec<IpAddr> = self.permissions.iter().map(|(ip, _)| *ip).collect();
                for ip in waiting {
                    self.create_permission(ip, now);
                }
            }
            CREATE_PERMISSION => {
                if let Some(peer) = p.peer {
                    for perm in self.permissions.iter_mut().filter(|(ip, _)| *ip == peer) {
                        perm.1 = Some(now + PERMISSION_REFRESH);
                    }
                }
            }
            REFRESH => {
                let lifetime = msg
                    .get_attribute::<Lifetime>()
                    .map_or(Duration::from_secs(600), |l| l.lifetime());
                self.refresh_at = Some(now + lifetime / 2);
            }
            _ => {}
        }
    }

    fn error(&mut self, p: &Pending, msg: &StunMessage, now: Instant) {
        let code = msg.get_attribute::<ErrorCode>().map(|e| e.code());
        let realm = msg.get_attribute::<Realm>().map(|r| r.text().to_string());
        let nonce = msg.get_attribute::<Nonce>().map(|n| n.value().to_string());
        match code {
            // The challenge: again, authenticated (only once for the first request).
            Some(401) if self.nonce.is_none() && realm.is_some() && nonce.is_some() => {
                self.realm = realm;
                self.nonce = nonce;
                self.retry(p, now);
            }
            Some(438) if nonce.is_some() && self.stale_nonce_retries < 3 => {
                self.stale_nonce_retries += 1;
                self.nonce = nonce;
                self.retry(p, now);
            }
            _ if p.method == ALLOCATE => {
                let reason = msg
                    .get_attribute::<ErrorCode>()
                    .map(|e| format!("{} {}", e.code(), e.reason_phrase()))
                    .unwrap_or_else(|| "an error".into());
                self.fail(format!("the TURN server refused the allocation: {reason}"));
            }
            _ => {}
        }
    }

    /// Sends request `p`'s method again with the current credentials.
    fn retry(&mut self, p: &Pending, now: Instant) {
        match p.method {
            ALLOCATE => self.allocate(now),
            CREATE_PERMISSION => {
                if let Some(peer) = p.peer {
                    self.create_permission(peer, now);
                }
            }
            REFRESH => self.refresh(now),
            _ => {}
        }
    }

    fn refresh(&mut self, now: Instant) {
        self.request(REFRESH, vec![Lifetime::from_u32(600).into()], None, now);
    }

    /// Retransmissions, refreshes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut give_up = false;
        for p in &mut self.pending {
            if now >= p.next {
                if p.attempts >= MAX_ATTEMPTS {
                    give_up |= p.method == ALLOCATE;
                    p.attempts = u32::MAX;
                    continue;
                }
                self.transmits.push_back(p.bytes.clone());
                p.next = now + RTO * 2u32.pow(p.attempts);
                p.attempts += 1;
            }
        }
        self.pending.retain(|p| p.attempts != u32::MAX);
        if give_up && self.state == TurnState::Allocating {
            self.fail("no answer from the TURN server".into());
        }
        if self.state != TurnState::Allocated {
            return;
        }
        if self.refresh_at.is_some_and(|t| now >= t) {
            self.refresh_at = None;
            self.refresh(now);
        }
        let due: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, at)| at.is_some_and(|t| now >= t))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            for perm in self.permissions.iter_mut().filter(|(p, _)| *p == ip) {
                perm.1 = None;
            }
            self.create_permission(ip, now);
        }
    }

    /// When [`TurnClient::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending
            .iter()
            .map(|p| p.next)
            .chain(self.refresh_at)
            .chain(self.permissions.iter().filter_map(|(_, at)| *at))
            .min()
    }

    /// The next datagram for the TURN server.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_codec::rfc5389::attributes::MessageIntegrity;

    /// A TURN server's side of the exchange, enough to drive the client.
    fn answer(req: &[u8], class: MessageClass, attrs: Vec<stun::Attribute>) -> StunMessage {
        let req = stun::decode(req).expect("a request");
        let mut m = StunMessage::new(class, req.method(), req.transaction_id());
        for a in attrs {
            m.add_attribute(a);
        }
        if class == MessageClass::SuccessResponse {
            let (u, r) = (
                Username::new("1700000000:1001".into()).unwrap(),
                Realm::new("tvcall.test".into()).unwrap(),
            );
            let mi = MessageIntegrity::new_long_term_credential(&m, &u, &r, "pw").unwrap();
            m.add_attribute(mi);
        }
        stun::decode(&stun::encode(m).unwrap()).unwrap()
    }

    #[test]
    fn allocates_after_the_challenge_then_permits_wraps_and_unwraps() {
        let server: SocketAddr = "203.0.113.2:3478".parse().unwrap();
        let t0 = Instant::now();
        let mut c = TurnClient::new(server, "1700000000:1001".into(), "pw".into(), t0);
        c.permit("198.51.100.7".parse().unwrap(), t0);
        let first = c.poll_transmit().expect("an allocate");
        assert!(stun::decode(&first)
            .unwrap()
            .get_attribute::<MessageIntegrity>()
            .is_none());
        let challenge = answer(
            &first,
            MessageClass::ErrorResponse,
            vec![
                ErrorCode::new(401, "Unauthorized".into()).unwrap().into(),
                Realm::new("tvcall.test".into()).unwrap().into(),
                Nonce::new("abcdef".into()).unwrap().into(),
            ],
        );
        assert!(c.handle_response(&challenge, t0));
        let second = c.poll_transmit().expect("an authenticated allocate");
        let m = stun::decode(&second).unwrap();
        let mi = m.get_attribute::<MessageIntegrity>().expect("integrity");
        assert!(mi
            .check_long_term_credential(
                &Username::new("1700000000:1001".into()).unwrap(),
                &Realm::new("tvcall.test".into()).unwrap(),
                "pw"
            )
            .is_ok());
        let relayed: SocketAddr = "203.0.113.2:50000".parse().unwrap();
        let ok = answer(
            &second,
            MessageClass::SuccessResponse,
            vec![
                XorRelayAddress::new(relayed).into(),
                XorMappedAddress::new("203.0.113.11:40000".parse().unwrap()).into(),
                Lifetime::from_u32(600).into(),
            ],
        );
        assert!(c.handle_response(&ok, t0));
        assert_eq!(c.relayed(), Some(relayed));
        // The permission waiting for the allocation goes now.
        let perm = stun::decode(&c.poll_transmit().expect("create permission")).unwrap();
        assert_eq!(perm.method(), CREATE_PERMISSION);
        let peer: SocketAddr = "198.51.100.7:41000".parse().unwrap();
        let wrapped = c.wrap(peer, b"hello").expect("a send indication");
        let sent = stun::decode(&wrapped).unwrap();
        assert_eq!(
            (sent.class(), sent.method()),
            (MessageClass::Indication, SEND)
        );
        assert!(
            c.wrap("192.0.2.66:1".parse().unwrap(), b"x").is_none(),
            "no permission"
        );
        let mut data = StunMessage::new(MessageClass::Indication, DATA, stun::transaction_id());
        data.add_attribute(XorPeerAddress::new(peer));
        data.add_attribute(Data::new(b"back".to_vec()).unwrap());
        let data = stun::decode(&stun::encode(data).unwrap()).unwrap();
        assert_eq!(c.unwrap(&data), Some((peer, b"back".to_vec())));
        // A refresh before the lifetime is over.
        c.handle_timeout(t0 + Duration::from_secs(301));
        let mut methods = Vec::new();
        while let Some(b) = c.poll_transmit() {
            methods.push(stun::decode(&b).unwrap().method());
        }
        assert!(methods.contains(&REFRESH), "{methods:?}");
    }

    #[test]
    fn a_refusal_or_silence_fails_clearly() {
        let server: SocketAddr = "203.0.113.2:3478".parse().unwrap();
        let t0 = Instant::now();
        let mut c = TurnClient::new(server, "u".into(), "p".into(), t0);
        let first = c.poll_transmit().unwrap();
        let refused = answer(
            &first,
            MessageClass::ErrorResponse,
            vec![ErrorCode::new(486, "Allocation Quota Reached".into())
                .unwrap()
                .into()],
        );
        assert!(c.handle_response(&refused, t0));
        assert_eq!(c.state(), TurnState::Failed);
        assert!(c.failure().unwrap().contains("486"));
        let mut silent = TurnClient::new(server, "u".into(), "p".into(), t0);
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_millis(100);
            silent.handle_timeout(now);
            while silent.poll_transmit().is_some() {}
        }
        assert_eq!(silent.state(), TurnState::Failed);
        assert_eq!(silent.relayed(), None);
    }
}
