//! Fuzz target: STUN on the media socket during a call (issue 13): `stun::decode`, then
//! the call's ICE agent ([`IceAgent::handle_stun`]) and the candidate gatherer, with the
//! clock moving between datagrams.
//!
//! Input layout: records, each a header byte and a 2-byte big-endian length, then that
//! many bytes. Header bits 0-1: the source (the peer's host candidate, another address,
//! the STUN server, a loopback address); bit 2: arrived through the relay; bit 3: the
//! bytes are re-signed with the agent's own password (MESSAGE-INTEGRITY, FINGERPRINT) when
//! they decode, so the fuzzer reaches past authentication with any attributes; bits 4-7:
//! the clock steps 0-15 × 10 ms before the datagram.
//!
//! Invariants beyond "does not panic": no pair is confirmed and nothing is selected for
//! media (none of our checks can have been answered: their transaction ids are random);
//! everything the agent sends goes to a signalled candidate or back to where a request
//! came from; the gatherer learns an address only from the STUN server.
#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use shared_proto::{CandidateKind, IceCandidate, IceParams};
use tokio::time::{Duration, Instant};
use tv_agent::media::gather::Gatherer;
use tv_agent::media::ice::{Base, IceAgent, Role};
use tv_agent::media::stun;

const PWD: &str = "fuzzfuzzfuzzfuzzfuzzfuzz";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("an address")
}

fuzz_target!(|data: &[u8]| {
    let peer = addr("198.51.100.7:40000");
    let stun_server = addr("203.0.113.1:3478");
    let sources = [
        peer,
        addr("192.0.2.99:5004"),
        stun_server,
        addr("127.0.0.1:9"),
    ];
    let mut agent = IceAgent::with_credentials(Role::Controlled, "fuzz".into(), PWD.into());
    agent.add_local(CandidateKind::HOST, addr("192.0.2.10:5004"), Base::Socket);
    agent.refuse(stun_server);
    let t0 = Instant::now();
    let mut now = t0;
    agent.set_remote(
        &IceParams {
            ufrag: "peer".into(),
            pwd: "peerpeerpeerpeerpeerpeer".into(),
            candidates: vec![IceCandidate {
                kind: CandidateKind::SERVER_REFLEXIVE,
                addr: peer,
                priority: 1_694_498_815,
                foundation: "2".into(),
            }],
        },
        now,
    );
    let mut gatherer = Gatherer::new(&[stun_server], now);
    while gatherer.poll_transmit().is_some() {}
    let mut allowed: HashSet<SocketAddr> = HashSet::from([peer]);
    let mut rest = data;
    while rest.len() >= 3 {
        let head = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let body = &rest[3..];
        let take = len.min(body.len());
        let (datagram, after) = body.split_at(take);
        rest = after;
        now += Duration::from_millis(10 * u64::from(head >> 4));
        agent.handle_timeout(now);
        gatherer.handle_timeout(now);
        let from = sources[usize::from(head & 3)];
        let via = if head & 4 != 0 {
            Base::Relay
        } else {
            Base::Socket
        };
        let Some(mut msg) = stun::decode(datagram) else {
            continue;
        };
        if head & 8 != 0 {
            if let Some(signed) = stun::encode_with_integrity(msg.clone(), PWD) {
                match stun::decode(&signed) {
                    Some(m) => msg = m,
                    None => continue,
                }
            }
        }
        if gatherer.handle_stun(&msg, from) {
            assert_eq!(from, stun_server, "learnt only from the STUN server");
            continue;
        }
        if msg.class() == stun_codec::MessageClass::Request {
            allowed.insert(from);
        }
        agent.handle_stun(&msg, from, via, now);
        while let Some(t) = agent.poll_transmit() {
            assert!(
                allowed.contains(&t.to),
                "sent to {} which nobody named",
                t.to
            );
        }
        assert!(agent.selected().is_none(), "no check of ours was answered");
        assert!(!agent.is_confirmed_peer(from, via));
    }
});
