//! Connection admission: limits derived from the process, and the gate every accepted
//! connection passes.
//!
//! The effective connection limit is never above what the descriptor limit allows: the
//! smaller of `max_connections` and the open-file limit less the descriptors open at start
//! and `fd_reserve`, so the server can always accept, refuse with `SERVER_FULL`, write its
//! database and serve its admin listener.
//!
//! A connection is *unregistered* from accept until a `Register` request arrives (later:
//! until enrollment). Unregistered connections are capped in total and per source address,
//! and are the first to go: when the server is full, or a cap is reached, the oldest
//! unregistered connection (of that address, for the per-address cap) is shed to make room
//! for the new one. Only when no unregistered connection is left is a new one refused.
//! Genuine TVs register within milliseconds of connecting, so silent or half-open
//! connections are what gets shed. Registered connections are capped per source address
//! by `max_per_ip` (generous: carrier-grade NAT puts many TVs behind one address).
//!
//! A source address whose connections keep getting closed for flooding
//! ([`FLOOD_STRIKES`] closes within `flood_penalty_ms`) is refused new connections for
//! `flood_penalty_ms`, doubling with each further strike up to 16 times: a flooder that
//! reconnects at once then costs one accept and one refusal per attempt, not a
//! registration. Its TVs already connected are not touched; behind carrier-grade NAT a
//! single misbehaving TV does not block the address, a persistent flooder does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::metrics::Metrics;

/// Most shed connections still closing at once (each holds its descriptor for the moment
/// its goodbye takes); beyond it new connections are refused instead of shedding more.
/// Part of what `fd_reserve` covers.
pub const SHEDDING_IN_FLIGHT: usize = 32;

/// Flood closes of one source address within the penalty window after which its new
/// connections are refused for a while.
pub const FLOOD_STRIKES: u32 = 3;

/// Most source addresses remembered for flooding (expired ones are forgotten first; past
/// this, new flooders are not tracked: the map cannot be grown without bound).
pub const MAX_PENALISED_SOURCES: usize = 65_536;

/// The limits in force, derived once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The process's open-file limit (soft, after raising it to the hard one).
    pub fd_limit: u64,
    /// Descriptors already open when the limits were derived (database, listeners, …).
    pub fds_at_start: u64,
    /// Descriptors kept free for accepting to refuse, the database and the admin listener.
    pub fd_reserve: u64,
    /// Effective limit on TV connections.
    pub max_connections: usize,
    /// Most unregistered connections in total.
    pub max_unregistered: usize,
    /// Most unregistered connections from one source address.
    pub max_unregistered_per_ip: usize,
    /// Most registered connections from one source address; 0 = no limit.
    pub max_per_ip: usize,
    /// How long a flooding source is refused (see [`FLOOD_STRIKES`]); zero: never.
    pub flood_penalty: Duration,
    /// Failed authentications of one source within the penalty window before it is
    /// refused; 0: never.
    pub auth_failures_per_ip: u32,
}

impl Limits {
    /// The limits for `config` in a process that may open `fd_limit` descriptors and has
    /// `fds_in_use` open now: the connection limit is the smaller of the configured one
    /// and what the descriptors allow after the reserve (at least 1).
    pub fn derive(config: &Config, fd_limit: u64, fds_in_use: u64) -> Limits {
        let reserve = config.fd_reserve as u64;
        let room = fd_limit.saturating_sub(fds_in_use).saturating_sub(reserve);
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        let max_connections = config.max_connections.min(room).max(1);
        Limits {
            fd_limit,
            fds_at_start: fds_in_use,
            fd_reserve: reserve,
            max_connections,
            max_unregistered: config.max_unregistered.clamp(1, max_connections),
            max_unregistered_per_ip: config.max_unregistered_per_ip.clamp(1, max_connections),
            max_per_ip: config.max_per_ip,
            flood_penalty: Duration::from_millis(config.flood_penalty_ms),
            auth_failures_per_ip: config.auth_failures_per_ip,
        }
    }

    /// The limits for `config` in this process: raises the soft open-file limit to the
    /// hard one, counts the descriptors open now, and derives.
    pub fn for_process(config: &Config) -> Limits {
        let fd_limit = match raise_fd_limit() {
            Ok((soft, _)) => soft,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-file limit; using max_connections as is");
                u64::MAX
            }
        };
        Limits::derive(config, fd_limit, fds_in_use())
    }

    /// Logs the derived figures (at start), with a warning when the descriptor limit
    /// lowered the configured connection limit.
    pub fn log(&self, configured_max: usize) {
        tracing::info!(
            fd_limit = self.fd_limit,
            fds_at_start = self.fds_at_start,
            fd_reserve = self.fd_reserve,
            configured_max_connections = configured_max,
            max_connections = self.max_connections,
            max_unregistered = self.max_unregistered,
            max_unregistered_per_ip = self.max_unregistered_per_ip,
            max_per_ip = self.max_per_ip,
            "connection limits"
        );
        if self.max_connections < configured_max {
            tracing::warn!(
                configured_max_connections = configured_max,
                max_connections = self.max_connections,
                "max_connections lowered to what the open-file limit allows; raise the limit \
                 (ulimit -n, LimitNOFILE=) to serve more TVs"
            );
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns `(soft, hard)` after.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in, which
    // lives for the whole call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    // `rlim_t` is 64 bits on x86_64 and aarch64, 32 on armv7.
    #[allow(clippy::useless_conversion)]
    Ok((u64::from(lim.rlim_cur), u64::from(lim.rlim_max)))
}

/// Descriptors this process has open now (Linux: the entries of `/proc/self/fd`; 0
/// where that cannot be read).
pub fn fds_in_use() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// What connections are counted by: the IPv4 address, or the IPv6 /64 (one customer's
/// network; an attacker has a whole /64 to pick addresses from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of a peer address.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                SourceKey(IpAddr::V6(bits.into()))
            }
            v4 => SourceKey(v4),
        }
    }
}

impl Gate {
    /// A connection from `ip` was closed for flooding: one strike for its source; at
    /// [`FLOOD_STRIKES`] within the penalty window the source is refused for the
    /// penalty, doubled for each strike beyond (at most 16 times).
    pub fn flooded(&self, ip: IpAddr) {
        self.flooded_at(ip, Instant::now());
    }

    fn flooded_at(&self, ip: IpAddr, now: Instant) {
        self.strike_at(ip, now, FLOOD_STRIKES, false);
    }

    /// A request from `ip` failed to authenticate: one strike for its source; at
    /// `auth_failures_per_ip` within the penalty window the source is refused like a
    /// flooding one (many genuine TVs behind one CGNAT address rarely fail at once).
    pub fn auth_failed(&self, ip: IpAddr) {
        let threshold = self.inner.limits.auth_failures_per_ip;
        self.strike_at(ip, Instant::now(), threshold, true);
    }

    /// A client from `ip` broke the protocol (bytes that are not TLS, an undecodable or
    /// oversized frame, a preamble that is not ours): a strike as for a failed
    /// authentication, so a source that keeps doing it is refused at accept, before it
    /// costs a TLS handshake. Handshakes that merely time out are not counted.
    pub fn misbehaved(&self, ip: IpAddr) {
        self.auth_failed(ip);
    }

    fn strike_at(&self, ip: IpAddr, now: Instant, threshold: u32, auth: bool) {
        let penalty = self.inner.limits.flood_penalty;
        if penalty.is_zero() || threshold == 0 {
            return;
        }
        let key = SourceKey::of(ip);
        let mut guard = self.inner.lock();
        let map = if auth {
            &mut guard.auth_strikes
        } else {
            &mut guard.strikes
        };
        if map.len() >= MAX_PENALISED_SOURCES && !map.contains_key(&key) {
            map.retain(|_, s| s.current(now, penalty));
            if map.len() >= MAX_PENALISED_SOURCES {
                return;
            }
        }
        let fresh = Strikes {
            count: 0,
            last: now,
            until: None,
        };
        let s = map.entry(key).or_insert(fresh);
        if !s.current(now, penalty) {
            // Quiet for a whole window: a new run.
            *s = Strikes {
                count: 0,
                last: now,
                until: None,
            };
        }
        s.count = s.count.saturating_add(1);
        s.last = now;
        if s.count >= threshold {
            let doublings = (s.count - threshold).min(4);
            let until = now + penalty * (1u32 << doublings);
            s.until = Some(until);
            let why = if auth {
                "failed authentications"
            } else {
                "flooding"
            };
            tracing::warn!(source = %key.0, strikes = s.count, refused_for = ?(until - now), "source refused for {why}");
        }
    }
}

/// The outcome of [`Gate::admit`].
pub enum Admission {
    /// Serve it; the ticket holds its slot until dropped.
    Admitted(Ticket),
    /// No room, and no unregistered connection left to shed: refuse with `SERVER_FULL`.
    Full,
    /// The source flooded: refuse with `RATE_LIMITED` for this much longer.
    Penalised(Duration),
}

/// A source address's flood record.
struct Strikes {
    /// Flood closes counted in this run of strikes.
    count: u32,
    /// The last strike.
    last: Instant,
    /// Refused until then.
    until: Option<Instant>,
}

impl Strikes {
    /// Whether a strike at `now` still belongs to this run: one penalty window has not
    /// passed since the last strike or the end of the last refusal.
    fn current(&self, now: Instant, window: Duration) -> bool {
        let quiet_since = self.until.map_or(self.last, |u| u.max(self.last));
        now < quiet_since || now.duration_since(quiet_since) < window
    }
}

/// Why [`Ticket::registering`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// This connection was shed just now to make room.
    Shed,
    /// Its source address has `max_per_ip` registered connections already.
    PerIpLimit,
}

/// An unregistered connection waiting in the gate, oldest first by its sequence number.
struct Pending {
    key: SourceKey,
    /// Tells the connection to close.
    shed: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    /// Connections holding a slot (admitted, not shed, not ended).
    open: usize,
    /// Shed connections whose task has not ended yet.
    shedding: usize,
    /// Sequence number of the next admitted connection.
    next_seq: u64,
    /// Unregistered connections by accept order.
    unregistered: BTreeMap<u64, Pending>,
    /// The same, by source.
    unregistered_by_source: HashMap<SourceKey, BTreeSet<u64>>,
    /// Registered (or registering) connections by source.
    registered_by_source: HashMap<SourceKey, usize>,
    /// Sources closed for flooding lately.
    strikes: HashMap<SourceKey, Strikes>,
    /// Sources that failed to authenticate lately.
    auth_strikes: HashMap<SourceKey, Strikes>,
}

impl State {
    /// Sheds the oldest unregistered connection (of `source`, if given); `false` if
    /// there is none or too many are closing already.
    fn shed_oldest(&mut self, source: Option<SourceKey>, shed: &IntCounter) -> bool {
        if self.shedding >= SHEDDING_IN_FLIGHT {
            return false;
        }
        let seq = match source {
            None => self.unregistered.keys().next().copied(),
            Some(k) => self
                .unregistered_by_source
                .get(&k)
                .and_then(|s| s.iter().next().copied()),
        };
        let Some(pending) = seq.and_then(|seq| self.take_unregistered(seq)) else {
            return false;
        };
        self.open = self.open.saturating_sub(1);
        self.shedding += 1;
        let _ = pending.shed.send(());
        shed.inc();
        true
    }

    fn take_unregistered(&mut self, seq: u64) -> Option<Pending> {
        let p = self.unregistered.remove(&seq)?;
        if let Some(set) = self.unregistered_by_source.get_mut(&p.key) {
            set.remove(&seq);
            if set.is_empty() {
                self.unregistered_by_source.remove(&p.key);
            }
        }
        Some(p)
    }

    fn put_unregistered(&mut self, seq: u64, p: Pending) {
        self.unregistered_by_source
            .entry(p.key)
            .or_default()
            .insert(seq);
        self.unregistered.insert(seq, p);
    }

    fn unregister_source(&mut self, key: SourceKey) {
        if let Some(n) = self.registered_by_source.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.registered_by_source.remove(&key);
            }
        }
    }
}

struct Inner {
    limits: Limits,
    state: Mutex<State>,
    shed: IntCounter,
    unregistered: IntGauge,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere cannot
        // leave it half-changed, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Admission of TV connections within [`Limits`].
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

impl Gate {
    /// A gate enforcing `limits`, counting into `metrics`.
    pub fn new(limits: Limits, metrics: &Metrics) -> Gate {
        metrics
            .connection_limit
            .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
        Gate {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::new(State::default()),
                shed: metrics.shed.clone(),
                unregistered: metrics.unregistered.clone(),
            }),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Connections holding a slot now, and how many of them are unregistered.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        (st.open, st.unregistered.len())
    }

    /// Admits a connection from `ip`, shedding the oldest unregistered one if the
    /// server, the unregistered total or this source's unregistered count is full.
    pub fn admit(&self, ip: IpAddr) -> Admission {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> Admission {
        let key = SourceKey::of(ip);
        let lim = &self.inner.limits;
        let mut st = self.inner.lock();
        let until = [st.strikes.get(&key), st.auth_strikes.get(&key)]
            .into_iter()
            .flatten()
            .filter_map(|s| s.until)
            .max();
        if let Some(until) = until.filter(|u| *u > now) {
            return Admission::Penalised(until - now);
        }
        if (st.open >= lim.max_connections || st.unregistered.len() >= lim.max_unregistered)
            && !st.shed_oldest(None, &self.inner.shed)
        {
            return Admission::Full;
        }
        let from_source = st.unregistered_by_source.get(&key).map_or(0, BTreeSet::len);
        if from_source >= lim.max_unregistered_per_ip
            && !st.shed_oldest(Some(key), &self.inner.shed)
        {
            return Admission::Full;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.open += 1;
        let (tx, rx) = oneshot::channel();
        st.put_unregistered(seq, Pending { key, shed: tx });
        self.inner.unregistered.set(gauge(st.unregistered.len()));
        Admission::Admitted(Ticket {
            inner: Arc::clone(&self.inner),
            seq,
            key,
            phase: Phase::Unregistered,
            shed_rx: Some(rx),
        })
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

enum Phase {
    /// In the gate's unregistered set (or shed from it).
    Unregistered,
    /// Its `Register` is being handled or succeeded: counted per source, not sheddable.
    /// Holds what puts it back if the registration fails.
    Registered(Option<oneshot::Sender<()>>),
}

/// One admitted connection's slot; released when dropped.
pub struct Ticket {
    inner: Arc<Inner>,
    seq: u64,
    key: SourceKey,
    phase: Phase,
    /// Fires when this connection is shed (only while unregistered).
    shed_rx: Option<oneshot::Receiver<()>>,
}

impl Ticket {
    /// Completes when this connection is shed to make room; never while it is
    /// registered.
    pub async fn shed(&mut self) {
        if matches!(self.phase, Phase::Unregistered) {
            if let Some(rx) = self.shed_rx.as_mut() {
                if rx.await.is_ok() {
                    self.shed_rx = None;
                    return;
                }
                self.shed_rx = None;
            }
        }
        std::future::pending().await
    }

    /// Whether this connection has been shed.
    pub fn is_shed(&self) -> bool {
        matches!(self.phase, Phase::Unregistered)
            && !self.inner.lock().unregistered.contains_key(&self.seq)
    }

    /// A `Register` request arrived: takes the connection out of the sheddable set and
    /// counts it against its source's `max_per_ip`.
    pub fn registering(&mut self) -> Result<(), NotAdmitted> {
        if !matches!(self.phase, Phase::Unregistered) {
            return Ok(());
        }
        let max_per_ip = self.inner.limits.max_per_ip;
        let mut st = self.inner.lock();
        let Some(pending) = st.take_unregistered(self.seq) else {
            return Err(NotAdmitted::Shed);
        };
        let registered = st.registered_by_source.get(&self.key).copied().unwrap_or(0);
        if max_per_ip > 0 && registered >= max_per_ip {
            st.put_unregistered(self.seq, pending);
            return Err(NotAdmitted::PerIpLimit);
        }
        *st.registered_by_source.entry(self.key).or_default() += 1;
        self.inner.unregistered.set(gauge(st.unregistered.len()));
        self.phase = Phase::Registered(Some(pending.shed));
        Ok(())
    }

    /// The `Register` failed: the connection is unregistered again (in its original
    /// place, among the oldest).
    pub fn registration_failed(&mut self) {
        let Phase::Registered(shed) = &mut self.phase else {
            return;
        };
        let Some(tx) = shed.take() else { return };
        let mut st = self.inner.lock();
        st.unregister_source(self.key);
        st.put_unregistered(
            self.seq,
            Pending {
                key: self.key,
                shed: tx,
            },
        );
        self.inner.unregistered.set(gauge(st.unregistered.len()));
        self.phase = Phase::Unregistered;
    }

    /// The registration succeeded: nothing can put this connection back in the
    /// unregistered set.
    pub fn registered(&mut self) {
        if let Phase::Registered(shed) = &mut self.phase {
            *shed = None;
            // Never shed now: the channel's allocation goes too.
            self.shed_rx = None;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        match self.phase {
            Phase::Unregistered => {
                if st.take_unregistered(self.seq).is_some() {
                    st.open = st.open.saturating_sub(1);
                } else {
                    // Shed: its slot went to a new connection already.
                    st.shedding = st.shedding.saturating_sub(1);
                }
            }
            Phase::Registered(_) => {
                st.unregister_source(self.key);
                st.open = st.open.saturating_sub(1);
            }
        }
        self.inner.unregistered.set(gauge(st.unregistered.len()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(max_connections: usize) -> Config {
        Config {
            max_connections,
            fd_reserve: 64,
            max_unregistered: 10_000,
            max_unregistered_per_ip: 3,
            max_per_ip: 2,
            ..Config::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn admitted(a: Admission) -> Ticket {
        match a {
            Admission::Admitted(t) => t,
            Admission::Full | Admission::Penalised(_) => panic!("refused"),
        }
    }

    #[test]
    fn the_connection_limit_stays_below_the_descriptor_limit() {
        // 200,000 configured, 20,000 descriptors of which 40 in use: descriptors win,
        // with the reserve left free.
        let l = Limits::derive(&cfg(200_000), 20_000, 40);
        assert_eq!(l.max_connections, 20_000 - 40 - 64);
        assert!(l.max_connections < 20_000);
        // Enough descriptors: the configured limit.
        assert_eq!(Limits::derive(&cfg(500), 20_000, 40).max_connections, 500);
        // Unlimited descriptors.
        assert_eq!(Limits::derive(&cfg(500), u64::MAX, 40).max_connections, 500);
        // Fewer descriptors than the reserve: still one connection, never zero.
        assert_eq!(Limits::derive(&cfg(500), 50, 40).max_connections, 1);
        // The unregistered caps never exceed the connection limit.
        let l = Limits::derive(&cfg(200_000), 1_000, 36);
        assert_eq!(l.max_connections, 900);
        assert_eq!(l.max_unregistered, 900);
    }

    #[test]
    fn the_oldest_unregistered_connection_is_shed_when_full() {
        let m = Metrics::new();
        let gate = Gate::new(Limits::derive(&cfg(3), u64::MAX, 0), &m);
        let mut a = admitted(gate.admit(ip(1)));
        let mut b = admitted(gate.admit(ip(2)));
        let mut c = admitted(gate.admit(ip(3)));
        b.registering().unwrap();
        b.registered();
        // Full: the oldest unregistered (a) goes, not the registered b.
        let d = admitted(gate.admit(ip(4)));
        assert!(a.is_shed() && !c.is_shed());
        assert_eq!(a.registering(), Err(NotAdmitted::Shed));
        assert_eq!(m.shed.get(), 1);
        assert_eq!(gate.counts(), (3, 2));
        drop(a);
        assert_eq!(gate.counts(), (3, 2));
        // Then c; then d; then none is left to shed and a new one is refused.
        c.registering().unwrap();
        c.registered();
        let _e = admitted(gate.admit(ip(5)));
        assert!(d.is_shed());
        drop(d);
        let mut e = _e;
        e.registering().unwrap();
        assert!(matches!(gate.admit(ip(6)), Admission::Full));
        // A registered connection that ends frees its slot.
        drop(b);
        assert_eq!(gate.counts(), (2, 0));
        let _f = admitted(gate.admit(ip(6)));
        assert_eq!(gate.counts(), (3, 1));
    }

    #[test]
    fn per_source_caps_shed_that_source_and_limit_registered_ones() {
        let m = Metrics::new();
        let gate = Gate::new(Limits::derive(&cfg(100), u64::MAX, 0), &m);
        let mut silent: Vec<Ticket> = (0..3).map(|_| admitted(gate.admit(ip(1)))).collect();
        let other = admitted(gate.admit(ip(2)));
        // A 4th unregistered from 10.0.0.1 sheds that address's oldest, not 10.0.0.2's.
        silent.push(admitted(gate.admit(ip(1))));
        assert!(silent[0].is_shed() && !other.is_shed() && !silent[1].is_shed());
        // Registered per source: 2 at most; a failed registration goes back in line.
        silent[1].registering().unwrap();
        silent[2].registering().unwrap();
        assert_eq!(silent[3].registering(), Err(NotAdmitted::PerIpLimit));
        silent[2].registration_failed();
        silent[3].registering().unwrap();
        assert_eq!(gate.counts(), (4, 2));
        // IPv6 addresses of one /64 count as one source.
        let a = SourceKey::of("2001:db8::1".parse().unwrap());
        let b = SourceKey::of("2001:db8::ffff:1".parse().unwrap());
        let c = SourceKey::of("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            SourceKey::of("::ffff:10.0.0.1".parse().unwrap()),
            SourceKey::of(ip(1))
        );
    }

    #[test]
    fn a_source_that_keeps_flooding_is_refused_for_a_while_and_longer_each_time() {
        let m = Metrics::new();
        let config = Config {
            flood_penalty_ms: 10_000,
            ..cfg(100)
        };
        let gate = Gate::new(Limits::derive(&config, u64::MAX, 0), &m);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let refused = |a: Admission| match a {
            Admission::Penalised(left) => Some(left),
            _ => None,
        };
        // Two strikes: still admitted. A third within the window: refused for 10 s.
        gate.flooded_at(ip(1), at(0));
        gate.flooded_at(ip(1), at(100));
        assert_eq!(refused(gate.admit_at(ip(1), at(200))), None);
        gate.flooded_at(ip(1), at(300));
        assert_eq!(
            refused(gate.admit_at(ip(1), at(400))),
            Some(Duration::from_millis(9_900))
        );
        // Other sources are not affected.
        assert_eq!(refused(gate.admit_at(ip(2), at(400))), None);
        // After the penalty it is admitted; flooding again at once doubles it.
        assert_eq!(refused(gate.admit_at(ip(1), at(10_300))), None);
        gate.flooded_at(ip(1), at(10_400));
        assert_eq!(
            refused(gate.admit_at(ip(1), at(10_500))),
            Some(Duration::from_millis(19_900))
        );
        // Quiet for a whole window after the refusal ended: a fresh start (one strike
        // is not enough to be refused).
        gate.flooded_at(ip(1), at(40_500));
        assert_eq!(refused(gate.admit_at(ip(1), at(40_600))), None);
        // Off: no penalty at all.
        let config = Config {
            flood_penalty_ms: 0,
            ..cfg(100)
        };
        let off = Gate::new(Limits::derive(&config, u64::MAX, 0), &m);
        for i in 0..10 {
            off.flooded_at(ip(1), at(i));
        }
        assert_eq!(refused(off.admit_at(ip(1), at(20))), None);
    }

    #[test]
    fn a_source_that_keeps_breaking_the_protocol_is_refused_at_accept() {
        let m = Metrics::new();
        let config = Config {
            auth_failures_per_ip: 5,
            ..cfg(100)
        };
        let gate = Gate::new(Limits::derive(&config, u64::MAX, 0), &m);
        let penalised = |a: Admission| matches!(a, Admission::Penalised(_));
        for _ in 0..4 {
            gate.misbehaved(ip(1));
        }
        assert!(!penalised(gate.admit(ip(1))), "four strikes of five");
        gate.misbehaved(ip(1));
        assert!(penalised(gate.admit(ip(1))));
        assert!(
            !penalised(gate.admit(ip(2))),
            "other sources are not affected"
        );
    }
}
