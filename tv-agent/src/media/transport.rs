//! One call's transport on the TV's UDP media socket: the only reader of the socket from
//! candidate gathering to the call's end. It tells datagrams apart by their first byte
//! (RFC 7983): STUN goes to the [`Gatherer`] or the [`IceAgent`], (S)RTP/RTCP from the
//! peer to the media session's receive task, anything else is dropped and counted; and it
//! sends the media session's packets to the pair ICE selected.
//!
//! With a TURN server (coturn) named for the call, the transport holds the allocation
//! ([`TurnClient`]): the relayed address is a candidate, datagrams ICE or the media session
//! send through the relay go out as Send indications, and Data indications from the TURN
//! server are unwrapped and handled as if they had come from the peer through the relay.
//!
//! Two modes: ICE (both TVs offered candidates) and fixed (a peer without ICE, an older
//! agent: media to and from the address the server saw, as before issue 13). In either,
//! media goes only to a confirmed address and is accepted only from it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use shared_proto::{CandidateKind, IceParams};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::gather::Gatherer;
use super::ice::{Base, IceAgent, IceCounters, IceState, Path, Role, Selected};
use super::stun::{self, Demux};
use super::turn::{TurnClient, TurnState};

/// A TURN server to allocate on for a call, and its credentials.
#[derive(Clone)]
pub struct TurnServerAddr {
    /// Where (UDP).
    pub addr: SocketAddr,
    /// The username (coturn's `EXPIRY:USER`).
    pub username: String,
    /// The password.
    pub password: String,
}

/// Datagrams queued for the media session's receive task before the newest are dropped.
const MEDIA_QUEUE: usize = 256;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 1500;

enum Mode {
    /// Media to and from this address (a peer without ICE).
    Fixed(SocketAddr),
    /// ICE decides.
    Ice(Box<IceAgent>),
}

struct State {
    mode: Mode,
    gatherer: Option<Gatherer>,
    turn: Option<TurnClient>,
}

/// Counters of the transport (beside ICE's own).
#[derive(Debug, Default)]
struct Counts {
    /// Datagrams from addresses media is not accepted from, or of no known kind.
    strangers: AtomicU64,
    /// STUN that did not decode (truncated, oversized, bad FINGERPRINT).
    bad_stun: AtomicU64,
    /// Media datagrams dropped because the receive task fell behind.
    overflow: AtomicU64,
    /// Media datagrams sent through the relay, and received from it.
    relayed_out: AtomicU64,
    relayed_in: AtomicU64,
}

struct Shared {
    /// ICE's state as it changes (the agent tells the viewer when no path works).
    ice_state: watch::Sender<Option<IceState>>,
    socket: Arc<UdpSocket>,
    state: Mutex<State>,
    /// Wakes the task when its deadlines changed (remote candidates set).
    wake: Notify,
    counts: Counts,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a call's transport reports at its end.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TransportReport {
    /// The path media took (`None`: fixed mode, or ICE never connected).
    pub path: Option<Path>,
    /// ICE's state at the end (`None`: fixed mode).
    pub ice_state: Option<&'static str>,
    /// ICE's counters (`None`: fixed mode).
    pub ice: Option<Box<IceCounters>>,
    /// Datagrams dropped: from addresses media is not accepted from, of no known kind,
    /// or STUN that did not decode.
    pub strangers: u64,
    /// Media datagrams sent through the TURN relay, and received through it.
    pub relayed: (u64, u64),
}

/// One call's transport. Dropping it stops its task.
pub struct CallTransport {
    shared: Arc<Shared>,
    media_rx: Option<mpsc::Receiver<Bytes>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Sends the media session's datagrams.
#[derive(Clone)]
pub struct MediaSender {
    shared: Arc<Shared>,
}

impl MediaSender {
    /// Sends `datagram` to the peer on the selected path; `false` if there is none yet
    /// (ICE still checking, or consent lost) or the send failed (that packet is lost).
    pub async fn send(&self, datagram: &[u8]) -> bool {
        let out = {
            let st = self.shared.state();
            match &st.mode {
                Mode::Fixed(peer) => Some((*peer, None)),
                Mode::Ice(agent) => match agent.selected() {
                    Some(s) if s.via == Base::Socket => Some((s.remote, None)),
                    Some(s) => st
                        .turn
                        .as_ref()
                        .and_then(|t| Some((t.server(), Some(t.wrap(s.remote, datagram)?)))),
                    None => None,
                },
            }
        };
        match out {
            Some((to, None)) => self.shared.socket.send_to(datagram, to).await.is_ok(),
            Some((to, Some(wrapped))) => {
                let ok = self.shared.socket.send_to(&wrapped, to).await.is_ok();
                if ok {
                    self.shared.counts.relayed_out.fetch_add(1, Relaxed);
                }
                ok
            }
            None => false,
        }
    }
}

impl CallTransport {
    fn spawn(socket: Arc<UdpSocket>, state: State) -> Self {
        let shared = Arc::new(Shared {
            ice_state: watch::channel(None).0,
            socket,
            state: Mutex::new(state),
            wake: Notify::new(),
            counts: Counts::default(),
        });
        let (media_tx, media_rx) = mpsc::channel(MEDIA_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(Arc::clone(&shared), media_tx, stop_rx));
        CallTransport {
            shared,
            media_rx: Some(media_rx),
            stop,
            task: Some(task),
        }
    }

    /// Media to and from `peer` only (a peer without ICE).
    pub fn fixed(socket: Arc<UdpSocket>, peer: SocketAddr) -> Self {
        Self::spawn(
            socket,
            State {
                mode: Mode::Fixed(peer),
                gatherer: None,
                turn: None,
            },
        )
    }

    /// An ICE transport in `role` with host candidates `hosts` (the socket's own
    /// addresses) and `extra_srflx` (an outside address known without STUN, such as a
    /// forwarded port), gathering server-reflexive candidates from `stun_servers` (at
    /// most [`super::gather::GATHER_TIMEOUT`]) and a relayed one from `turn`. Our checks
    /// never go to `refused`.
    pub async fn gather(
        socket: Arc<UdpSocket>,
        role: Role,
        hosts: &[SocketAddr],
        extra_srflx: &[SocketAddr],
        stun_servers: &[SocketAddr],
        turn: Option<TurnServerAddr>,
        refused: &[SocketAddr],
    ) -> Self {
        let mut agent = IceAgent::new(role);
        for &h in hosts {
            agent.add_local(CandidateKind::HOST, h, Base::Socket);
        }
        for &r in refused.iter().chain(stun_servers) {
            agent.refuse(r);
        }
        if let Some(t) = &turn {
            agent.refuse(t.addr);
        }
        let now = Instant::now();
        let gatherer = (!stun_servers.is_empty()).then(|| Gatherer::new(stun_servers, now));
        let turn = turn.map(|t| TurnClient::new(t.addr, t.username, t.password, now));
        let deadline = now + super::gather::GATHER_TIMEOUT;
        let t = Self::spawn(
            socket,
            State {
                mode: Mode::Ice(Box::new(agent)),
                gatherer,
                turn,
            },
        );
        t.shared.wake.notify_one();
        // Wait for the answers (the task reads them), then add what was learned.
        loop {
            let done = {
                let st = t.shared.state();
                let now = Instant::now();
                let stun_done = st.gatherer.as_ref().is_none_or(|g| g.done_at(now));
                let turn_done = st
                    .turn
                    .as_ref()
                    .is_none_or(|c| c.state() != TurnState::Allocating);
                (stun_done && turn_done) || now >= deadline
            };
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        {
            let mut st = t.shared.state();
            let mut mapped = st.gatherer.take().map(|g| g.mapped()).unwrap_or_default();
            let relayed = st.turn.as_ref().and_then(TurnClient::relayed);
            if let Some(c) = &st.turn {
                mapped.extend(c.mapped());
                if let Some(why) = c.failure() {
                    tracing::warn!(server = %c.server(), %why, "no relayed candidate for this call");
                }
            }
            if relayed.is_none() {
                st.turn = None;
            }
            if let Mode::Ice(agent) = &mut st.mode {
                for m in mapped.iter().chain(extra_srflx) {
                    if !hosts.contains(m) {
                        agent.add_local(CandidateKind::SERVER_REFLEXIVE, *m, Base::Socket);
                    }
                }
                if let Some(r) = relayed {
                    agent.add_local(CandidateKind::RELAYED, r, Base::Relay);
                }
            }
        }
        t
    }

    /// What to signal to the peer (`None` in fixed mode).
    pub fn local_params(&self) -> Option<IceParams> {
        match &self.shared.state().mode {
            Mode::Ice(agent) => Some(agent.local_params()),
            Mode::Fixed(_) => None,
        }
    }

    /// The peer's candidates: checks start. `None` (a peer without ICE): fixed mode to
    /// `fallback`, the address the server saw.
    pub fn set_remote(&self, params: Option<&IceParams>, fallback: SocketAddr) {
        {
            let mut st = self.shared.state();
            let st = &mut *st;
            match (params, &mut st.mode) {
                (Some(p), Mode::Ice(agent)) => {
                    let now = Instant::now();
                    // The relay passes on only what permitted addresses send.
                    if let Some(turn) = st.turn.as_mut() {
                        for c in &p.candidates {
                            turn.permit(c.addr.ip(), now);
                        }
                    }
                    agent.set_remote(p, now);
                }
                _ => {
                    st.mode = Mode::Fixed(fallback);
                    st.turn = None;
                }
            }
        }
        self.shared.wake.notify_one();
    }

    /// The path media takes now.
    pub fn selected(&self) -> Option<Selected> {
        match &self.shared.state().mode {
            Mode::Ice(agent) => agent.selected(),
            Mode::Fixed(_) => None,
        }
    }

    /// ICE's state (`None` in fixed mode).
    pub fn ice_state(&self) -> Option<IceState> {
        match &self.shared.state().mode {
            Mode::Ice(agent) => Some(agent.state()),
            Mode::Fixed(_) => None,
        }
    }

    /// ICE's state as it changes (`None` in fixed mode or before the checks).
    pub fn watch_state(&self) -> watch::Receiver<Option<IceState>> {
        self.shared.ice_state.subscribe()
    }

    /// The sender for the media session.
    pub fn sender(&self) -> MediaSender {
        MediaSender {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The media session's incoming datagrams (once).
    pub fn take_media(&mut self) -> Option<mpsc::Receiver<Bytes>> {
        self.media_rx.take()
    }

    /// Stops the task and reports.
    pub async fn stop(mut self) -> TransportReport {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.report()
    }

    /// The figures so far.
    pub fn report(&self) -> TransportReport {
        let c = &self.shared.counts;
        let strangers =
            c.strangers.load(Relaxed) + c.bad_stun.load(Relaxed) + c.overflow.load(Relaxed);
        match &self.shared.state().mode {
            Mode::Ice(agent) => TransportReport {
                path: agent.selected().map(|s| s.path),
                ice_state: Some(agent.state().name()),
                ice: Some(Box::new(agent.counters())),
                strangers,
                relayed: (c.relayed_out.load(Relaxed), c.relayed_in.load(Relaxed)),
            },
            Mode::Fixed(_) => TransportReport {
                strangers,
                ..TransportReport::default()
            },
        }
    }
}

impl Drop for CallTransport {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The task: reads the socket, runs the timers, sends what STUN wants sent.
async fn run(shared: Arc<Shared>, media_tx: mpsc::Sender<Bytes>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let deadline = {
            let st = shared.state();
            let ice = match &st.mode {
                Mode::Ice(a) => a.poll_timeout(),
                Mode::Fixed(_) => None,
            };
            let gather = st.gatherer.as_ref().and_then(Gatherer::poll_timeout);
            let turn = st.turn.as_ref().and_then(TurnClient::poll_timeout);
            ice.into_iter().chain(gather).chain(turn).min()
        };
        let sleep = tokio::time::sleep_until(
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        );
        tokio::select! {
            _ = stop.changed() => break,
            r = shared.socket.recv_from(&mut buf) => {
                // ICMP errors from earlier sends surface here on Linux: not fatal.
                if let Ok((n, from)) = r {
                    datagram(&shared, &media_tx, &buf[..n], from);
                }
            }
            () = sleep => {
                let now = Instant::now();
                let mut st = shared.state();
                if let Mode::Ice(a) = &mut st.mode {
                    a.handle_timeout(now);
                }
                if let Some(g) = st.gatherer.as_mut() {
                    g.handle_timeout(now);
                }
                if let Some(t) = st.turn.as_mut() {
                    t.handle_timeout(now);
                }
            }
            () = shared.wake.notified() => {}
        }
        flush(&shared).await;
        let now_state = match &shared.state().mode {
            Mode::Ice(a) => Some(a.state()),
            Mode::Fixed(_) => None,
        };
        shared.ice_state.send_if_modified(|s| {
            let changed = *s != now_state;
            *s = now_state;
            changed
        });
    }
}

/// Sends every datagram ICE and the gatherer queued (outside the lock).
async fn flush(shared: &Shared) {
    let mut out: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    {
        let mut st = shared.state();
        if let Some(g) = st.gatherer.as_mut() {
            while let Some(t) = g.poll_transmit() {
                out.push(t);
            }
        }
        let st = &mut *st;
        if let Mode::Ice(a) = &mut st.mode {
            while let Some(t) = a.poll_transmit() {
                match (t.via, st.turn.as_ref()) {
                    (Base::Socket, _) => out.push((t.to, t.bytes)),
                    (Base::Relay, Some(turn)) => {
                        if let Some(w) = turn.wrap(t.to, &t.bytes) {
                            out.push((turn.server(), w));
                        }
                    }
                    (Base::Relay, None) => {}
                }
            }
        }
        if let Some(turn) = st.turn.as_mut() {
            let server = turn.server();
            while let Some(b) = turn.poll_transmit() {
                out.push((server, b));
            }
        }
    }
    for (to, bytes) in out {
        let _ = shared.socket.send_to(&bytes, to).await;
    }
}

/// One datagram from `from`.
fn datagram(shared: &Shared, media_tx: &mpsc::Sender<Bytes>, bytes: &[u8], from: SocketAddr) {
    let counts = &shared.counts;
    match stun::demux(bytes) {
        Demux::Stun => {
            let Some(msg) = stun::decode(bytes) else {
                counts.bad_stun.fetch_add(1, Relaxed);
                return;
            };
            let mut guard = shared.state();
            let st = &mut *guard;
            if st
                .gatherer
                .as_mut()
                .is_some_and(|g| g.handle_stun(&msg, from))
            {
                return;
            }
            let now = Instant::now();
            if let Some(turn) = st.turn.as_mut().filter(|t| t.server() == from) {
                if turn.handle_response(&msg, now) {
                    return;
                }
                // Relayed from the peer: handled as if it came through the relay.
                let Some((peer, inner)) = turn.unwrap(&msg) else {
                    counts.strangers.fetch_add(1, Relaxed);
                    return;
                };
                relayed(st, media_tx, counts, &inner, peer, now);
                return;
            }
            match &mut st.mode {
                Mode::Ice(a) => a.handle_stun(&msg, from, Base::Socket, now),
                Mode::Fixed(_) => {
                    counts.strangers.fetch_add(1, Relaxed);
                }
            }
        }
        Demux::Rtp => {
            let ok = match &shared.state().mode {
                Mode::Fixed(peer) => *peer == from,
                Mode::Ice(a) => a.is_confirmed_peer(from, Base::Socket),
            };
            if ok {
                to_media(media_tx, counts, bytes);
            } else {
                counts.strangers.fetch_add(1, Relaxed);
            }
        }
        Demux::ChannelData | Demux::Other => {
            counts.strangers.fetch_add(1, Relaxed);
        }
    }
}

/// Passes a peer's (S)RTP/RTCP datagram to the media session's receive task (counted as
/// an overflow when that task has fallen behind).
fn to_media(media_tx: &mpsc::Sender<Bytes>, counts: &Counts, bytes: &[u8]) {
    if media_tx.try_send(Bytes::copy_from_slice(bytes)).is_err() {
        counts.overflow.fetch_add(1, Relaxed);
    }
}

/// A datagram the TURN server relayed from `peer`.
fn relayed(
    st: &mut State,
    media_tx: &mpsc::Sender<Bytes>,
    counts: &Counts,
    bytes: &[u8],
    peer: SocketAddr,
    now: Instant,
) {
    let Mode::Ice(a) = &mut st.mode else {
        counts.strangers.fetch_add(1, Relaxed);
        return;
    };
    match stun::demux(bytes) {
        Demux::Stun => match stun::decode(bytes) {
            Some(msg) => a.handle_stun(&msg, peer, Base::Relay, now),
            None => {
                counts.bad_stun.fetch_add(1, Relaxed);
            }
        },
        Demux::Rtp if a.is_confirmed_peer(peer, Base::Relay) => {
            counts.relayed_in.fetch_add(1, Relaxed);
            to_media(media_tx, counts, bytes);
        }
        _ => {
            counts.strangers.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn socket() -> Arc<UdpSocket> {
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap())
    }

    #[tokio::test]
    async fn two_transports_on_loopback_connect_and_carry_media_only_from_the_peer() {
        let (sa, sb) = (socket().await, socket().await);
        let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let a = CallTransport::gather(
            Arc::clone(&sa),
            Role::Controlling,
            &[aa],
            &[],
            &[],
            None,
            &[],
        )
        .await;
        let mut b = CallTransport::gather(
            Arc::clone(&sb),
            Role::Controlled,
            &[ab],
            &[],
            &[],
            None,
            &[],
        )
        .await;
        assert!(
            !a.sender().send(&[0x80, 111, 0, 1]).await,
            "no path before the checks"
        );
        let (pa, pb) = (a.local_params().unwrap(), b.local_params().unwrap());
        a.set_remote(Some(&pb), ab);
        b.set_remote(Some(&pa), aa);
        let deadline = Instant::now() + Duration::from_secs(2);
        while a.selected().is_none_or(|s| !s.nominated) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let s = a.selected().expect("connected");
        assert_eq!((s.remote, s.path), (ab, Path::Host));
        let mut rx = b.take_media().unwrap();
        assert!(a.sender().send(&[0x80, 111, 0, 1]).await);
        let got = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &[0x80, 111, 0, 1]);
        // A stranger's RTP is dropped and counted.
        let stranger = socket().await;
        stranger.send_to(&[0x80, 111, 0, 2], ab).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err());
        let report = b.stop().await;
        assert_eq!(report.strangers, 1);
        assert_eq!(report.path, Some(Path::Host));
        assert!(report.ice.unwrap().checks_sent >= 1);
        drop(a);
    }
}
