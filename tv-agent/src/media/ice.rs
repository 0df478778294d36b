//! ICE (RFC 8445) for one call's single media component (RTP and RTCP share the port),
//! sans-I/O and time-driven like the jitter buffer: the caller feeds it STUN messages
//! from the media socket ([`IceAgent::handle_stun`]) and the time
//! ([`IceAgent::handle_timeout`]), and sends what [`IceAgent::poll_transmit`] gives.
//!
//! - Candidates: this TV's host and relayed candidates are paired with the peer's; a
//!   server-reflexive candidate is signalled but not paired (its base is the host
//!   socket, RFC 8445 §6.1.2.4), so a pair is (base: the socket or the relay, the peer's
//!   address).
//! - Checks: one new check every [`PACING`] (triggered checks first), retransmitted after
//!   [`RTO`] doubling, a pair failing after [`MAX_ATTEMPTS`]. Requests are answered only
//!   with the right USERNAME and MESSAGE-INTEGRITY (our password); responses count only
//!   from the address the check went to, for a transaction we sent, with the peer's
//!   password. A check from an address not among the peer's candidates adds a
//!   peer-reflexive candidate.
//! - Nomination (regular, by the controlling side, the caller): the best succeeded pair
//!   once no pair above it is still being checked, or after [`NOMINATION_WAIT`]
//!   ([`RELAY_NOMINATION_WAIT`] when the best is relayed), gets a check with
//!   USE-CANDIDATE; its success selects it on both sides. Direct pairs (host, reflexive)
//!   outrank relayed ones by their type preferences, so the relay is used only when no
//!   direct pair works in time.
//! - Media goes only to a pair the checks confirmed ([`IceAgent::selected`]: the
//!   nominated pair, or until then the best succeeded one), never to an address a
//!   candidate merely names: no reflection or amplification through a forged candidate.
//! - Consent freshness (RFC 7675): a check on the selected pair every
//!   [`CONSENT_INTERVAL`]; none answered for [`CONSENT_TIMEOUT`] and the pair is dropped
//!   ([`IceState::Disconnected`]).
//! - The peer's candidates that cannot be meant (unspecified, multicast, port 0,
//!   loopback unless this TV has a loopback candidate itself, or an address the agent
//!   was told to refuse, such as its servers') are ignored and counted.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use shared_proto::{CandidateKind, IceCandidate, IceParams, MAX_ICE_CANDIDATES};
use stun_codec::rfc5245::attributes::{IceControlled, IceControlling, Priority, UseCandidate};
use stun_codec::rfc5389::attributes::{ErrorCode, Username, XorMappedAddress};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::{MessageClass, TransactionId};
use tokio::time::Instant;

use super::stun::{self, StunMessage};

/// Time between two new checks (RFC 8445's Ta; one media stream, so 20 ms is ample).
pub const PACING: Duration = Duration::from_millis(20);
/// First retransmission timeout of a check.
pub const RTO: Duration = Duration::from_millis(100);
/// Transmissions of one check before its pair fails: at 0, 100, 300, 700 and 1,500 ms,
/// failed at 3,100 ms without an answer.
pub const MAX_ATTEMPTS: u32 = 5;
/// How long the controlling side waits for a better pair after a direct one succeeded.
pub const NOMINATION_WAIT: Duration = Duration::from_millis(100);
/// … and after a relayed one succeeded, while direct pairs are still being checked.
pub const RELAY_NOMINATION_WAIT: Duration = Duration::from_millis(250);
/// A consent check on the selected pair this often (RFC 7675: 5 s on average).
pub const CONSENT_INTERVAL: Duration = Duration::from_secs(5);
/// No consent answer for this long and the pair is dropped (RFC 7675: 30 s).
pub const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
/// No pair working this long after the checks started: the call has no media path.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most candidate pairs checked.
pub const MAX_PAIRS: usize = 64;
/// RFC 8445's local preference for the one interface (address) we gather on.
const LOCAL_PREFERENCE: u32 = 65_535;

/// Who nominates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The caller: it nominates.
    Controlling,
    /// The callee.
    Controlled,
}

/// What a local candidate's packets go out through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Base {
    /// The TV's media socket, directly.
    Socket,
    /// The TURN allocation (wrapped for the relay).
    Relay,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: SocketAddr,
    /// Through what.
    pub via: Base,
    /// The STUN message.
    pub bytes: Vec<u8>,
}

/// How the checks stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceState {
    /// Waiting for the peer's candidates.
    New,
    /// Checking; no pair works yet.
    Checking,
    /// A pair works (media flows on it).
    Connected,
    /// No pair worked in time.
    Failed,
    /// The selected pair lost consent (the peer or the path went away).
    Disconnected,
}

impl IceState {
    /// Its name in the call's quality figures.
    pub fn name(self) -> &'static str {
        match self {
            IceState::New => "new",
            IceState::Checking => "checking",
            IceState::Connected => "connected",
            IceState::Failed => "failed",
            IceState::Disconnected => "disconnected",
        }
    }
}

/// The path media takes: a pair the checks confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Through the socket or the relay.
    pub via: Base,
    /// How it is reached, for the call log: `host` (both ends' own addresses), `srflx`
    /// (across a NAT, hole punched) or `relay`.
    pub path: Path,
    /// The pair is nominated (until then it is the best that succeeded).
    pub nominated: bool,
}

/// The kind of path a call's media takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Directly between the TVs' own addresses (one network).
    Host,
    /// Directly, through a NAT binding (server- or peer-reflexive).
    Srflx,
    /// Through the TURN relay.
    Relay,
}

impl Path {
    /// Its name as in the JSON and the call log.
    pub fn name(self) -> &'static str {
        match self {
            Path::Host => "host",
            Path::Srflx => "srflx",
            Path::Relay => "relay",
        }
    }
}

/// What the agent dropped or refused, for the call's quality figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IceCounters {
    /// Connectivity checks sent (retransmissions included).
    pub checks_sent: u64,
    /// STUN messages with a wrong or missing MESSAGE-INTEGRITY or USERNAME.
    pub bad_integrity: u64,
    /// STUN messages with an attribute we must understand and do not (answered 420).
    pub unknown_attributes: u64,
    /// Responses to no check of ours, or from another address than the check went to.
    pub unmatched: u64,
    /// The peer's candidates refused (loopback, unspecified, our servers', …).
    pub refused_candidates: u64,
    /// Role conflicts resolved (RFC 8445 §7.3.1.1).
    pub role_conflicts: u64,
}

/// A local candidate and its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCandidate {
    /// As signalled.
    pub candidate: IceCandidate,
    /// What its packets go through.
    pub base: Base,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckState {
    Waiting,
    InProgress {
        tid: TransactionId,
        attempts: u32,
        next: Instant,
        nominating: bool,
    },
    Succeeded,
    Failed,
}

#[derive(Debug, Clone)]
struct Pair {
    /// Index into `locals` (a host or relayed candidate).
    local: usize,
    remote: SocketAddr,
    remote_kind: CandidateKind,
    priority: u64,
    state: CheckState,
    /// When it succeeded.
    succeeded_at: Option<Instant>,
    /// Our address as the peer saw it (XOR-MAPPED-ADDRESS of the success).
    mapped: Option<SocketAddr>,
    nominated: bool,
    /// The controlled side got USE-CANDIDATE before the pair succeeded.
    nominate_on_success: bool,
}

impl Pair {
    /// A check on it succeeded and it has not failed since (a check in flight on it, a
    /// nomination or a consent check, leaves it valid).
    fn valid(&self) -> bool {
        self.succeeded_at.is_some() && self.state != CheckState::Failed
    }
}

/// A consent check in flight.
#[derive(Debug, Clone, Copy)]
struct Consent {
    tid: TransactionId,
    sent_at: Instant,
}

/// One call's ICE agent.
pub struct IceAgent {
    role: Role,
    tie_breaker: u64,
    ufrag: String,
    pwd: String,
    locals: Vec<LocalCandidate>,
    remote: Option<(String, String)>,
    /// The peer's candidates (signalled and peer-reflexive).
    remotes: Vec<IceCandidate>,
    pairs: Vec<Pair>,
    triggered: VecDeque<usize>,
    transmits: VecDeque<Transmit>,
    /// Addresses never used as a peer's candidate.
    refused: Vec<SocketAddr>,
    state: IceState,
    checking_since: Option<Instant>,
    next_check: Option<Instant>,
    nominate_at: Option<Instant>,
    /// Consent: the last answer on the selected pair, the next check, the one in flight.
    consent_ok_at: Option<Instant>,
    next_consent: Option<Instant>,
    consent: Option<Consent>,
    counters: IceCounters,
}

fn random_ice_string(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// A candidate's priority (RFC 8445 §5.1.2.1), for one component.
pub fn candidate_priority(kind: CandidateKind) -> u32 {
    (kind.type_preference() << 24) + (LOCAL_PREFERENCE << 8) + 255
}

/// A pair's priority (RFC 8445 §6.1.2.3) from the controlling (`g`) and controlled
/// (`d`) candidates' priorities.
pub fn pair_priority(g: u32, d: u32) -> u64 {
    let (g, d) = (u64::from(g), u64::from(d));
    (1 << 32) * g.min(d) + 2 * g.max(d) + u64::from(g > d)
}

impl IceAgent {
    /// An agent with fresh credentials (a 8-character ufrag, a 24-character password).
    pub fn new(role: Role) -> Self {
        Self::with_credentials(role, random_ice_string(8), random_ice_string(24))
    }

    /// An agent with these credentials (the fuzz target signs its input with them).
    pub fn with_credentials(role: Role, ufrag: String, pwd: String) -> Self {
        IceAgent {
            role,
            tie_breaker: rand::random(),
            ufrag,
            pwd,
            locals: Vec::new(),
            remote: None,
            remotes: Vec::new(),
            pairs: Vec::new(),
            triggered: VecDeque::new(),
            transmits: VecDeque::new(),
            refused: Vec::new(),
            state: IceState::New,
            checking_since: None,
            next_check: None,
            nominate_at: None,
            consent_ok_at: None,
            next_consent: None,
            consent: None,
            counters: IceCounters::default(),
        }
    }

    /// Adds a local candidate of `kind` at `addr` with base `base` (a server-reflexive
    /// one is signalled only). At most [`MAX_ICE_CANDIDATES`]; a duplicate is ignored.
    pub fn add_local(&mut self, kind: CandidateKind, addr: SocketAddr, base: Base) {
        if self.locals.len() >= MAX_ICE_CANDIDATES
            || self
                .locals
                .iter()
                .any(|l| l.candidate.addr == addr && l.candidate.kind == kind)
        {
            return;
        }
        let foundation = format!("{}{}", kind.0 + 1, self.locals.len());
        self.locals.push(LocalCandidate {
            candidate: IceCandidate {
                kind,
                addr,
                priority: candidate_priority(kind),
                foundation,
            },
            base,
        });
    }

    /// Never treat `addr` as a peer's candidate (the control server, STUN and TURN
    /// servers: a forged candidate must not aim our checks at them).
    pub fn refuse(&mut self, addr: SocketAddr) {
        self.refused.push(addr);
    }

    /// What to signal to the peer.
    pub fn local_params(&self) -> IceParams {
        IceParams {
            ufrag: self.ufrag.clone(),
            pwd: self.pwd.clone(),
            candidates: self.locals.iter().map(|l| l.candidate.clone()).collect(),
        }
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// How the checks stand.
    pub fn state(&self) -> IceState {
        self.state
    }

    /// What was dropped and refused.
    pub fn counters(&self) -> IceCounters {
        self.counters
    }

    /// The peer's credentials and candidates: checks start.
    pub fn set_remote(&mut self, params: &IceParams, now: Instant) {
        if params.check().is_err() {
            self.counters.refused_candidates += params.candidates.len() as u64;
            return;
        }
        self.remote = Some((params.ufrag.clone(), params.pwd.clone()));
        for c in &params.candidates {
            self.add_remote(c.clone());
        }
        self.state = IceState::Checking;
        self.checking_since = Some(now);
        self.next_check = Some(now);
    }

    fn acceptable(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip();
        let we_loop = self
            .locals
            .iter()
            .any(|l| l.candidate.addr.ip().is_loopback());
        !(addr.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || (ip.is_loopback() && !we_loop)
            || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
            || self.refused.contains(&addr))
    }

    /// Adds a peer's candidate and its pairs; `None` if refused. Returns the index of
    /// a pair with `base`, if one was made or exists.
    fn add_remote(&mut self, c: IceCandidate) -> Option<()> {
        if !self.acceptable(c.addr) || self.remotes.len() >= 2 * MAX_ICE_CANDIDATES {
            self.counters.refused_candidates += 1;
            return None;
        }
        if let Some(known) = self.remotes.iter_mut().find(|r| r.addr == c.addr) {
            // A peer-reflexive candidate learnt from a check that came before the
            // peer's signalling is the signalled one: it takes its kind (RFC 8445
            // §7.3.1.3), which says what the path is.
            if known.kind == CandidateKind::PEER_REFLEXIVE && c.kind != known.kind {
                known.kind = c.kind;
                for p in self.pairs.iter_mut().filter(|p| p.remote == c.addr) {
                    p.remote_kind = c.kind;
                }
            }
            return Some(());
        }
        for (i, l) in self.locals.iter().enumerate() {
            // Our relay is paired with the peer's reflexive addresses only: the peer's
            // socket reaches our relayed address itself (relay to relay adds nothing),
            // and a host address behind the peer's NAT is out of the relay's reach (a
            // TURN server that cannot send to a peer, coturn, ends the allocation).
            let relay_to_relay = l.base == Base::Relay
                && (c.kind == CandidateKind::RELAYED || c.kind == CandidateKind::HOST);
            if l.candidate.kind == CandidateKind::SERVER_REFLEXIVE
                || l.candidate.addr.is_ipv4() != c.addr.is_ipv4()
                || self.pairs.len() >= MAX_PAIRS
                || relay_to_relay
            {
                continue;
            }
            let (g, d) = match self.role {
                Role::Controlling => (l.candidate.priority, c.priority),
                Role::Controlled => (c.priority, l.candidate.priority),
            };
            self.pairs.push(Pair {
                local: i,
                remote: c.addr,
                remote_kind: c.kind,
                priority: pair_priority(g, d),
                state: CheckState::Waiting,
                succeeded_at: None,
                mapped: None,
                nominated: false,
                nominate_on_success: false,
            });
        }
        self.remotes.push(c);
        Some(())
    }

    fn pair_index(&self, base: Base, remote: SocketAddr) -> Option<usize> {
        self.pairs
            .iter()
            .position(|p| p.remote == remote && self.locals[p.local].base == base)
    }

    /// Where media goes now, if anywhere: the nominated pair, else the best that
    /// succeeded; `None` while no pair works or after consent was lost.
    pub fn selected(&self) -> Option<Selected> {
        if matches!(self.state, IceState::Disconnected | IceState::Failed) {
            return None;
        }
        let best = self
            .pairs
            .iter()
            .filter(|p| p.nominated)
            .max_by_key(|p| p.priority)
            .or_else(|| {
                self.pairs
                    .iter()
                    .filter(|p| p.valid())
                    .max_by_key(|p| p.priority)
            })?;
        let local = &self.locals[best.local];
        let path = if local.base == Base::Relay || best.remote_kind == CandidateKind::RELAYED {
            Path::Relay
        } else if best.remote_kind == CandidateKind::HOST
            && best.mapped.is_none_or(|m| m == local.candidate.addr)
        {
            Path::Host
        } else {
            Path::Srflx
        };
        Some(Selected {
            remote: best.remote,
            via: local.base,
            path,
            nominated: best.nominated,
        })
    }

    /// Whether a datagram from `from` through `via` comes from the peer on a pair the
    /// checks confirmed (media from anywhere else is dropped).
    pub fn is_confirmed_peer(&self, from: SocketAddr, via: Base) -> bool {
        self.pair_index(via, from)
            .is_some_and(|i| self.pairs[i].valid())
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`IceAgent::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retransmits = self.pairs.iter().filter_map(|p| match p.state {
            CheckState::InProgress { next, .. } => Some(next),
            _ => None,
        });
        let pending_new = self
            .next_check
            .filter(|_| !self.triggered.is_empty() || self.has_waiting());
        let connect_deadline = self
            .checking_since
            .filter(|_| self.state == IceState::Checking)
            .map(|t| t + CONNECT_TIMEOUT);
        let consent_deadline = self
            .consent_ok_at
            .filter(|_| self.state == IceState::Connected)
            .map(|t| t + CONSENT_TIMEOUT);
        retransmits
            .chain(pending_new)
            .chain(self.nominate_at)
            .chain(self.next_consent)
            .chain(connect_deadline)
            .chain(consent_deadline)
            .chain(self.consent.map(|c| c.sent_at + RTO * 4))
            .min()
    }

    fn has_waiting(&self) -> bool {
        self.pairs.iter().any(|p| p.state == CheckState::Waiting)
    }

    /// Advances the clock to `now`: retransmissions, failures, the next check,
    /// nomination, consent.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.remote.is_none() {
            return;
        }
        // Retransmit or fail checks in flight.
        for i in 0..self.pairs.len() {
            if let CheckState::InProgress {
                tid,
                attempts,
                next,
                nominating,
            } = self.pairs[i].state
            {
                if now < next {
                    continue;
                }
                if attempts >= MAX_ATTEMPTS {
                    self.pairs[i].state = if self.pairs[i].succeeded_at.is_some() {
                        // A nomination check that went unanswered: the pair still works.
                        CheckState::Succeeded
                    } else {
                        CheckState::Failed
                    };
                    continue;
                }
                self.pairs[i].state = CheckState::InProgress {
                    tid,
                    attempts: attempts + 1,
                    next: now + RTO * 2u32.pow(attempts),
                    nominating,
                };
                self.send_check(i, tid, nominating);
            }
        }
        // One new check per pacing interval, triggered ones first.
        if self.next_check.is_some_and(|t| now >= t) {
            let next = self.triggered.pop_front().or_else(|| {
                self.pairs
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.state == CheckState::Waiting)
                    .max_by_key(|(_, p)| p.priority)
                    .map(|(i, _)| i)
            });
            if let Some(i) = next {
                self.start_check(i, false, now);
            }
            self.next_check = Some(now + PACING);
        }
        if self.role == Role::Controlling && self.nominate_at.is_some_and(|t| now >= t) {
            self.nominate_at = None;
            self.nominate_best(now);
        }
        self.consent_tick(now);
        if self.state == IceState::Checking
            && self
                .checking_since
                .is_some_and(|t| now >= t + CONNECT_TIMEOUT)
            && self.selected().is_none()
        {
            self.state = IceState::Failed;
        }
        if self.state == IceState::Checking
            && !self.pairs.is_empty()
            && self.pairs.iter().all(|p| p.state == CheckState::Failed)
            && self.triggered.is_empty()
        {
            self.state = IceState::Failed;
        }
    }

    fn consent_tick(&mut self, now: Instant) {
        if self.state != IceState::Connected {
            return;
        }
        if self
            .consent_ok_at
            .is_some_and(|t| now >= t + CONSENT_TIMEOUT)
        {
            self.state = IceState::Disconnected;
            self.consent = None;
            self.next_consent = None;
            return;
        }
        if self.next_consent.is_some_and(|t| now >= t) {
            if self.selected().is_some() {
                self.send_consent(stun::transaction_id(), now);
            }
            self.next_consent = Some(now + CONSENT_INTERVAL);
        }
        // An unanswered consent check is sent again (it is a plain STUN transaction).
        if let Some(c) = self.consent.filter(|c| now >= c.sent_at + RTO * 4) {
            self.send_consent(c.tid, now);
        }
    }

    /// Sends the consent check `tid` on the selected pair and keeps it as in flight.
    fn send_consent(&mut self, tid: TransactionId, now: Instant) {
        if let Some(i) = self
            .selected()
            .and_then(|s| self.pair_index(s.via, s.remote))
        {
            self.send_check(i, tid, false);
        }
        self.consent = Some(Consent { tid, sent_at: now });
    }

    /// Whether `msg` carries the peer's MESSAGE-INTEGRITY (an answer to our check).
    fn peer_signed(&self, msg: &StunMessage) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|(_, pwd)| stun::integrity_ok(msg, pwd))
    }

    fn start_check(&mut self, i: usize, nominating: bool, now: Instant) {
        let tid = stun::transaction_id();
        self.pairs[i].state = CheckState::InProgress {
            tid,
            attempts: 1,
            next: now + RTO,
            nominating,
        };
        self.send_check(i, tid, nominating);
    }

    fn send_check(&mut self, i: usize, tid: TransactionId, nominating: bool) {
        let Some((remote_ufrag, remote_pwd)) = &self.remote else {
            return;
        };
        let pair = &self.pairs[i];
        let local = &self.locals[pair.local];
        let mut m = StunMessage::new(MessageClass::Request, BINDING, tid);
        let Ok(username) = Username::new(format!("{remote_ufrag}:{}", self.ufrag)) else {
            return;
        };
        m.add_attribute(username);
        m.add_attribute(Priority::new(candidate_priority(
            CandidateKind::PEER_REFLEXIVE,
        )));
        match self.role {
            Role::Controlling => {
                m.add_attribute(IceControlling::new(self.tie_breaker));
                if nominating {
                    m.add_attribute(UseCandidate::new());
                }
            }
            Role::Controlled => m.add_attribute(IceControlled::new(self.tie_breaker)),
        }
        if let Some(bytes) = stun::encode_with_integrity(m, remote_pwd) {
            self.counters.checks_sent += 1;
            self.transmits.push_back(Transmit {
                to: pair.remote,
                via: local.base,
                bytes,
            });
        }
    }

    /// Takes a STUN message that arrived from `from` through `via`. Binding requests are
    /// checks from the peer (answered); responses complete our checks.
    pub fn handle_stun(&mut self, msg: &StunMessage, from: SocketAddr, via: Base, now: Instant) {
        if msg.method() != BINDING {
            self.counters.unmatched += 1;
            return;
        }
        match msg.class() {
            MessageClass::Request => self.handle_request(msg, from, via, now),
            MessageClass::SuccessResponse | MessageClass::ErrorResponse => {
                self.handle_response(msg, from, via, now)
            }
            MessageClass::Indication => {}
        }
    }

    fn respond_error(&mut self, msg: &StunMessage, from: SocketAddr, via: Base, code: u16) {
        let mut r = StunMessage::new(MessageClass::ErrorResponse, BINDING, msg.transaction_id());
        let reason = match code {
            420 => "Unknown Attribute",
            487 => "Role Conflict",
            _ => "Bad Request",
        };
        if let Ok(e) = ErrorCode::new(code, reason.into()) {
            r.add_attribute(e);
        }
        if let Some(bytes) = stun::encode_with_integrity(r, &self.pwd) {
            self.transmits.push_back(Transmit {
                to: from,
                via,
                bytes,
            });
        }
    }

    fn handle_request(&mut self, msg: &StunMessage, from: SocketAddr, via: Base, now: Instant) {
        let expected = format!("{}:", self.ufrag);
        let user_ok = msg
            .get_attribute::<Username>()
            .is_some_and(|u| u.name().starts_with(&expected));
        if !user_ok || !stun::integrity_ok(msg, &self.pwd) {
            // RFC 8489: a request that fails authentication is answered 400/401 or
            // dropped; dropping leaves nothing to reflect.
            self.counters.bad_integrity += 1;
            return;
        }
        if stun::has_unknown_required(msg) {
            self.counters.unknown_attributes += 1;
            self.respond_error(msg, from, via, 420);
            return;
        }
        // Role conflict (RFC 8445 §7.3.1.1).
        match (
            self.role,
            msg.get_attribute::<IceControlling>(),
            msg.get_attribute::<IceControlled>(),
        ) {
            (Role::Controlling, Some(theirs), _) => {
                self.counters.role_conflicts += 1;
                if self.tie_breaker >= theirs.prio() {
                    self.respond_error(msg, from, via, 487);
                    return;
                }
                self.switch_role(Role::Controlled);
            }
            (Role::Controlled, _, Some(theirs)) => {
                self.counters.role_conflicts += 1;
                if self.tie_breaker >= theirs.prio() {
                    self.switch_role(Role::Controlling);
                } else {
                    self.respond_error(msg, from, via, 487);
                    return;
                }
            }
            _ => {}
        }
        // Answer: the address we saw, integrity with our password.
        let mut r = StunMessage::new(MessageClass::SuccessResponse, BINDING, msg.transaction_id());
        r.add_attribute(XorMappedAddress::new(from));
        if let Some(bytes) = stun::encode_with_integrity(r, &self.pwd) {
            self.transmits.push_back(Transmit {
                to: from,
                via,
                bytes,
            });
        }
        // A check from an address not among the peer's candidates: peer-reflexive.
        if self.pair_index(via, from).is_none() {
            let priority = msg
                .get_attribute::<Priority>()
                .map_or(candidate_priority(CandidateKind::PEER_REFLEXIVE), |p| {
                    p.prio()
                });
            let foundation = format!("p{}", self.remotes.len());
            let added = self.add_remote(IceCandidate {
                kind: CandidateKind::PEER_REFLEXIVE,
                addr: from,
                priority,
                foundation,
            });
            if added.is_none() {
                return;
            }
        }
        let Some(i) = self.pair_index(via, from) else {
            return;
        };
        let use_candidate =
            self.role == Role::Controlled && msg.get_attribute::<UseCandidate>().is_some();
        match self.pairs[i].state {
            CheckState::Succeeded if use_candidate => self.nominated(i, now),
            CheckState::Succeeded => {}
            _ => {
                if use_candidate {
                    self.pairs[i].nominate_on_success = true;
                }
                // Triggered check (RFC 8445 §7.3.1.4), once the peer's password is known.
                if !matches!(self.pairs[i].state, CheckState::InProgress { .. })
                    && !self.triggered.contains(&i)
                {
                    self.pairs[i].state = CheckState::Waiting;
                    self.triggered.push_back(i);
                }
            }
        }
    }

    fn switch_role(&mut self, role: Role) {
        self.role = role;
        // Pair priorities depend on who controls.
        for p in &mut self.pairs {
            let l = self.locals[p.local].candidate.priority;
            let r = self
                .remotes
                .iter()
                .find(|c| c.addr == p.remote)
                .map_or(0, |c| c.priority);
            let (g, d) = match role {
                Role::Controlling => (l, r),
                Role::Controlled => (r, l),
            };
            p.priority = pair_priority(g, d);
        }
    }

    fn handle_response(&mut self, msg: &StunMessage, from: SocketAddr, via: Base, now: Instant) {
        let tid = msg.transaction_id();
        // A consent answer.
        if self.consent.is_some_and(|c| c.tid == tid) {
            let on_selected = self
                .selected()
                .is_some_and(|s| s.remote == from && s.via == via);
            if on_selected && self.peer_signed(msg) && msg.class() == MessageClass::SuccessResponse
            {
                self.consent = None;
                self.consent_ok_at = Some(now);
            } else {
                self.counters.unmatched += 1;
            }
            return;
        }
        let Some(i) = self
            .pairs
            .iter()
            .position(|p| matches!(p.state, CheckState::InProgress { tid: t, .. } if t == tid))
        else {
            self.counters.unmatched += 1;
            return;
        };
        // Symmetric: the answer must come from where the check went, the same way.
        if self.pairs[i].remote != from || self.locals[self.pairs[i].local].base != via {
            self.counters.unmatched += 1;
            return;
        }
        if !self.peer_signed(msg) {
            self.counters.bad_integrity += 1;
            return;
        }
        let CheckState::InProgress { nominating, .. } = self.pairs[i].state else {
            return;
        };
        if msg.class() == MessageClass::ErrorResponse {
            let code = msg.get_attribute::<ErrorCode>().map(|e| e.code());
            if code == Some(487) {
                // Role conflict: take the other role and check again.
                self.counters.role_conflicts += 1;
                let other = match self.role {
                    Role::Controlling => Role::Controlled,
                    Role::Controlled => Role::Controlling,
                };
                self.switch_role(other);
                self.pairs[i].state = CheckState::Waiting;
                self.triggered.push_back(i);
            } else {
                self.pairs[i].state = CheckState::Failed;
            }
            return;
        }
        let mapped = msg.get_attribute::<XorMappedAddress>().map(|m| m.address());
        tracing::debug!(
            remote = %self.pairs[i].remote,
            via = ?via,
            kind = self.pairs[i].remote_kind.name(),
            nominating,
            "ICE check succeeded"
        );
        let p = &mut self.pairs[i];
        p.state = CheckState::Succeeded;
        p.mapped = mapped;
        if p.succeeded_at.is_none() {
            p.succeeded_at = Some(now);
        }
        if nominating || p.nominate_on_success {
            self.nominated(i, now);
            return;
        }
        if self.state == IceState::Checking {
            self.state = IceState::Connected;
            self.consent_ok_at = Some(now);
            self.next_consent = Some(now + CONSENT_INTERVAL);
        }
        if self.role == Role::Controlling && !self.pairs.iter().any(|p| p.nominated) {
            self.schedule_nomination(now);
        }
    }

    /// The controlling side: nominate now if nothing better is still being checked,
    /// else after a short wait.
    fn schedule_nomination(&mut self, now: Instant) {
        let Some(best) = self
            .pairs
            .iter()
            .filter(|p| p.state == CheckState::Succeeded)
            .max_by_key(|p| p.priority)
        else {
            return;
        };
        let better_pending = self.pairs.iter().any(|p| {
            p.priority > best.priority
                && matches!(p.state, CheckState::Waiting | CheckState::InProgress { .. })
        });
        if !better_pending {
            self.nominate_best(now);
            return;
        }
        let wait = if self.locals[best.local].base == Base::Relay
            || best.remote_kind == CandidateKind::RELAYED
        {
            RELAY_NOMINATION_WAIT
        } else {
            NOMINATION_WAIT
        };
        if self.nominate_at.is_none() {
            self.nominate_at = Some(now + wait);
        }
    }

    fn nominate_best(&mut self, now: Instant) {
        if self.pairs.iter().any(|p| p.nominated) {
            return;
        }
        let Some(i) = self
            .pairs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == CheckState::Succeeded)
            .max_by_key(|(_, p)| p.priority)
            .map(|(i, _)| i)
        else {
            return;
        };
        self.nominate_at = None;
        self.start_check(i, true, now);
    }

    fn nominated(&mut self, i: usize, now: Instant) {
        tracing::debug!(
            remote = %self.pairs[i].remote,
            via = ?self.locals[self.pairs[i].local].base,
            "ICE pair nominated"
        );
        for p in &mut self.pairs {
            p.nominated = false;
        }
        self.pairs[i].nominated = true;
        self.pairs[i].state = CheckState::Succeeded;
        self.nominate_at = None;
        if matches!(self.state, IceState::Checking | IceState::New) {
            self.state = IceState::Connected;
        }
        self.consent_ok_at = Some(now);
        if self.next_consent.is_none() {
            self.next_consent = Some(now + CONSENT_INTERVAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A network between two agents: `drop` says which (from, to) datagrams are lost.
    struct Net {
        a: IceAgent,
        b: IceAgent,
        /// Where each agent's packets appear to come from (a NAT's outside address).
        a_seen_as: SocketAddr,
        b_seen_as: SocketAddr,
        /// How datagrams reach each agent (through its relay, or its socket).
        a_in: Base,
        b_in: Base,
        now: Instant,
        drop: Box<dyn Fn(&Transmit) -> bool>,
    }

    impl Net {
        /// Each agent told the other's parameters at `t0`; both reached at their socket.
        fn start(
            mut a: IceAgent,
            mut b: IceAgent,
            (a_seen_as, b_seen_as): (&str, &str),
            t0: Instant,
            drop: Box<dyn Fn(&Transmit) -> bool>,
        ) -> Net {
            let (pa, pb) = (a.local_params(), b.local_params());
            a.set_remote(&pb, t0);
            b.set_remote(&pa, t0);
            Net {
                a,
                b,
                a_seen_as: addr(a_seen_as),
                b_seen_as: addr(b_seen_as),
                a_in: Base::Socket,
                b_in: Base::Socket,
                now: t0,
                drop,
            }
        }

        fn run(&mut self, until: Duration) {
            let end = self.now + until;
            while self.now < end {
                for _ in 0..100 {
                    let mut moved = false;
                    while let Some(t) = self.a.poll_transmit() {
                        moved = true;
                        if !(self.drop)(&t) && (t.to == self.b_seen_as || t.via == Base::Relay) {
                            let m = stun::decode(&t.bytes).expect("valid STUN");
                            self.b.handle_stun(&m, self.a_seen_as, self.b_in, self.now);
                        }
                    }
                    while let Some(t) = self.b.poll_transmit() {
                        moved = true;
                        if !(self.drop)(&t) && (t.to == self.a_seen_as || t.via == Base::Relay) {
                            let m = stun::decode(&t.bytes).expect("valid STUN");
                            self.a.handle_stun(&m, self.b_seen_as, self.a_in, self.now);
                        }
                    }
                    if !moved {
                        break;
                    }
                }
                self.now += Duration::from_millis(5);
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
            }
        }
    }

    fn pair_of_agents(a_host: &str, b_host: &str) -> (IceAgent, IceAgent) {
        let mut a = IceAgent::new(Role::Controlling);
        let mut b = IceAgent::new(Role::Controlled);
        a.add_local(CandidateKind::HOST, addr(a_host), Base::Socket);
        b.add_local(CandidateKind::HOST, addr(b_host), Base::Socket);
        (a, b)
    }

    #[test]
    fn priorities_follow_rfc_8445() {
        assert_eq!(candidate_priority(CandidateKind::HOST), 2_130_706_431);
        assert_eq!(
            candidate_priority(CandidateKind::SERVER_REFLEXIVE),
            1_694_498_815
        );
        assert!(
            candidate_priority(CandidateKind::PEER_REFLEXIVE)
                > candidate_priority(CandidateKind::SERVER_REFLEXIVE)
        );
        assert!(candidate_priority(CandidateKind::RELAYED) < 1 << 24);
        assert_eq!(pair_priority(2, 1), (1 << 32) + 4 + 1);
        assert_eq!(pair_priority(1, 2), (1 << 32) + 4);
    }

    #[test]
    fn two_hosts_connect_and_the_controlling_side_nominates() {
        let (a, b) = pair_of_agents("192.0.2.10:5004", "192.0.2.20:5004");
        let t0 = Instant::now();
        assert_eq!(a.selected(), None);
        let hosts = ("192.0.2.10:5004", "192.0.2.20:5004");
        let mut net = Net::start(a, b, hosts, t0, Box::new(|_| false));
        net.run(Duration::from_millis(200));
        let sa = net.a.selected().expect("a has a path");
        let sb = net.b.selected().expect("b has a path");
        assert!(sa.nominated && sb.nominated);
        assert_eq!(sa.remote, addr("192.0.2.20:5004"));
        assert_eq!(sb.remote, addr("192.0.2.10:5004"));
        assert_eq!((sa.path, sb.path), (Path::Host, Path::Host));
        assert_eq!(net.a.state(), IceState::Connected);
        assert!(net
            .a
            .is_confirmed_peer(addr("192.0.2.20:5004"), Base::Socket));
        assert!(!net
            .a
            .is_confirmed_peer(addr("192.0.2.99:5004"), Base::Socket));
    }

    #[test]
    fn behind_nats_the_checks_punch_through_as_peer_reflexive() {
        // Each TV signals its host and its NAT's outside address; only the outside ones
        // are reachable. The peer's checks arrive from the NAT's address.
        let (mut a, mut b) = pair_of_agents("10.0.1.2:5004", "10.0.2.2:5004");
        a.add_local(
            CandidateKind::SERVER_REFLEXIVE,
            addr("198.51.100.1:40000"),
            Base::Socket,
        );
        b.add_local(
            CandidateKind::SERVER_REFLEXIVE,
            addr("203.0.113.1:40000"),
            Base::Socket,
        );
        let t0 = Instant::now();
        let mut net = Net::start(
            a,
            b,
            ("198.51.100.1:40000", "203.0.113.1:40000"),
            t0,
            Box::new(|t| t.to.ip().to_string().starts_with("10.")),
        );
        net.run(Duration::from_millis(500));
        let sa = net.a.selected().expect("connected");
        assert!(sa.nominated);
        assert_eq!(sa.remote, addr("203.0.113.1:40000"));
        assert_eq!(sa.path, Path::Srflx);
        assert_eq!(net.b.selected().map(|s| s.path), Some(Path::Srflx));
    }

    #[test]
    fn the_relay_is_used_only_when_no_direct_pair_works() {
        let mut a = IceAgent::new(Role::Controlling);
        let mut b = IceAgent::new(Role::Controlled);
        a.add_local(CandidateKind::HOST, addr("10.0.1.2:5004"), Base::Socket);
        a.add_local(
            CandidateKind::RELAYED,
            addr("192.0.2.50:50000"),
            Base::Relay,
        );
        b.add_local(CandidateKind::HOST, addr("10.0.2.2:5004"), Base::Socket);
        // b's NAT address: what our relay pairs with (not b's host address behind it).
        b.add_local(
            CandidateKind::SERVER_REFLEXIVE,
            addr("203.0.113.12:40000"),
            Base::Socket,
        );
        // Direct: everything lost. Through the relay: delivered (the test's network
        // hands relayed datagrams over as if from the relay address).
        let t0 = Instant::now();
        let mut net = Net::start(
            a,
            b,
            ("192.0.2.50:50000", "203.0.113.12:40000"),
            t0,
            Box::new(|t| t.via == Base::Socket && t.to == addr("203.0.113.12:40000")),
        );
        net.a_in = Base::Relay;
        // b answers a's relayed check to the relay address; our Net delivers a's
        // packets through the relay and b's to a's relay address.
        net.run(Duration::from_millis(1_000));
        let sa = net.a.selected().expect("relayed");
        assert_eq!(sa.path, Path::Relay);
        assert_eq!(sa.via, Base::Relay);
        assert!(sa.nominated);
    }

    #[test]
    fn forged_and_unauthenticated_messages_are_ignored_and_counted() {
        let (mut a, b) = pair_of_agents("192.0.2.10:5004", "192.0.2.20:5004");
        let t0 = Instant::now();
        a.set_remote(&b.local_params(), t0);
        // A check with the wrong password.
        let mut m = StunMessage::new(MessageClass::Request, BINDING, stun::transaction_id());
        m.add_attribute(Username::new(format!("{}:x", a.ufrag)).unwrap());
        let bytes = stun::encode_with_integrity(m, "not-the-password-at-all").unwrap();
        let m = stun::decode(&bytes).unwrap();
        a.handle_stun(&m, addr("192.0.2.66:1234"), Base::Socket, t0);
        assert_eq!(a.counters().bad_integrity, 1);
        assert_eq!(a.poll_transmit(), None, "nothing answered to a forger");
        // A response to no check of ours.
        let r = StunMessage::new(
            MessageClass::SuccessResponse,
            BINDING,
            stun::transaction_id(),
        );
        let r = stun::decode(&stun::encode_with_integrity(r, &b.pwd).unwrap()).unwrap();
        a.handle_stun(&r, addr("192.0.2.20:5004"), Base::Socket, t0);
        assert_eq!(a.counters().unmatched, 1);
        assert_eq!(a.selected(), None, "no media to an unconfirmed address");
        assert!(!a.is_confirmed_peer(addr("192.0.2.20:5004"), Base::Socket));
    }

    #[test]
    fn candidates_aimed_at_loopback_servers_or_nothing_are_refused() {
        let mut a = IceAgent::new(Role::Controlling);
        a.add_local(CandidateKind::HOST, addr("192.0.2.10:5004"), Base::Socket);
        a.refuse(addr("192.0.2.1:7600"));
        let cand = |s: &str| IceCandidate {
            kind: CandidateKind::HOST,
            addr: addr(s),
            priority: 1,
            foundation: "1".into(),
        };
        let params = IceParams {
            ufrag: "abcd".into(),
            pwd: "p".repeat(22),
            candidates: vec![
                cand("127.0.0.1:5004"),
                cand("0.0.0.0:5004"),
                cand("224.0.0.1:5004"),
                cand("192.0.2.1:7600"),
                cand("192.0.2.20:0"),
                cand("255.255.255.255:9"),
                cand("192.0.2.20:5004"),
            ],
        };
        a.set_remote(&params, Instant::now());
        assert_eq!(a.counters().refused_candidates, 6);
        assert_eq!(a.pairs.len(), 1);
        // On loopback (a TV that is itself on loopback) loopback is fine.
        let mut l = IceAgent::new(Role::Controlled);
        l.add_local(CandidateKind::HOST, addr("127.0.0.1:5004"), Base::Socket);
        l.set_remote(
            &IceParams {
                candidates: vec![cand("127.0.0.1:5006")],
                ..params
            },
            Instant::now(),
        );
        assert_eq!(l.counters().refused_candidates, 0);
    }

    #[test]
    fn consent_lost_stops_media_and_no_answer_at_all_fails() {
        let (a, b) = pair_of_agents("192.0.2.10:5004", "192.0.2.20:5004");
        let t0 = Instant::now();
        let cut = std::rc::Rc::new(std::cell::Cell::new(false));
        let c2 = std::rc::Rc::clone(&cut);
        let hosts = ("192.0.2.10:5004", "192.0.2.20:5004");
        let mut net = Net::start(a, b, hosts, t0, Box::new(move |_| c2.get()));
        net.run(Duration::from_millis(300));
        assert!(net.a.selected().is_some());
        // Consent checks keep it alive while answered…
        net.run(Duration::from_secs(40));
        assert_eq!(net.a.state(), IceState::Connected);
        // … and the path is dropped 30 s after the peer went silent.
        cut.set(true);
        net.run(Duration::from_secs(25));
        assert_eq!(net.a.state(), IceState::Connected);
        net.run(Duration::from_secs(10));
        assert_eq!(net.a.state(), IceState::Disconnected);
        assert_eq!(net.a.selected(), None);

        // Nobody answers from the start: failed once every pair has failed.
        let (mut a, b) = pair_of_agents("192.0.2.10:5004", "192.0.2.20:5004");
        a.set_remote(&b.local_params(), t0);
        let mut now = t0;
        for _ in 0..1000 {
            now += Duration::from_millis(10);
            a.handle_timeout(now);
            while a.poll_transmit().is_some() {}
        }
        assert_eq!(a.state(), IceState::Failed);
        assert_eq!(a.counters().checks_sent, u64::from(MAX_ATTEMPTS));
    }
}
