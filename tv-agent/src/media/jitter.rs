//! The adaptive jitter buffer: puts received RTP packets back in order, drops duplicates
//! and packets that arrive too late to play, and decides for every 20 ms playout tick
//! whether to decode a packet, recover it from the next packet's in-band FEC, or conceal
//! it. Its depth follows the measured interarrival jitter (RFC 3550, 6.4.1) and grows by
//! one frame while packets are being lost, so that FEC has a next packet to recover from.
//!
//! Pure logic: no I/O, and arrival times are passed in.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Samples per 20 ms frame at 48 kHz.
pub const FRAME_SAMPLES: u32 = 960;
/// Frame duration in milliseconds.
pub const FRAME_MS: f64 = 20.0;
/// RTP clock ticks per millisecond (48 kHz).
const TICKS_PER_MS: f64 = 48.0;

/// What to play on this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Nothing buffered yet (call starting, or after a long outage): play silence.
    Waiting,
    /// Decode this packet normally.
    Packet(Bytes),
    /// The packet for this tick is missing, but the next one arrived: decode this
    /// (the next packet) with FEC on to recover the missing frame.
    Fec(Bytes),
    /// The packet is missing and cannot be recovered: conceal (Opus PLC).
    Conceal,
}

/// Counters for call-quality reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets accepted into the buffer.
    pub received: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Packets that arrived after their playout time, dropped.
    pub late: u64,
    /// Frames recovered from FEC.
    pub fec_recovered: u64,
    /// Frames concealed.
    pub concealed: u64,
    /// Frames dropped to shrink the buffer back to its target.
    pub dropped_for_latency: u64,
    /// Frames inserted (concealed) to grow the buffer after late packets.
    pub stretched: u64,
}

/// The buffer.
#[derive(Debug)]
pub struct JitterBuffer {
    /// Buffered packets by extended sequence number.
    packets: BTreeMap<u64, Bytes>,
    /// Extended sequence number to play next; `None` before playout starts.
    next: Option<u64>,
    /// Highest extended sequence number seen.
    highest: Option<u64>,
    /// Interarrival jitter estimate, milliseconds.
    jitter_ms: f64,
    /// Previous packet's (arrival ms, RTP timestamp) for the jitter estimate.
    prev: Option<(f64, u32)>,
    /// Smallest depth in frames.
    min_frames: u64,
    /// Largest depth in frames.
    max_frames: u64,
    /// Ticks since the last frame that had to be recovered or concealed.
    since_loss: u32,
    /// Consecutive ticks with nothing to play.
    empty_ticks: u32,
    /// A packet arrived after its playout time: play one concealed frame without
    /// advancing, which delays playout by a frame (the buffer grows).
    hold: bool,
    stats: JitterStats,
}

impl JitterBuffer {
    /// A buffer holding between `min_frames` and `max_frames` frames.
    pub fn new(min_frames: u64, max_frames: u64) -> Self {
        let min_frames = min_frames.max(1);
        JitterBuffer {
            packets: BTreeMap::new(),
            next: None,
            highest: None,
            jitter_ms: 0.0,
            prev: None,
            min_frames,
            max_frames: max_frames.max(min_frames),
            since_loss: u32::MAX,
            empty_ticks: 0,
            hold: false,
            stats: JitterStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Interarrival jitter estimate in milliseconds.
    pub fn jitter_ms(&self) -> f64 {
        self.jitter_ms
    }

    /// Highest extended sequence number received.
    pub fn highest_seq(&self) -> Option<u64> {
        self.highest
    }

    /// Frames the buffer aims to hold before playing.
    pub fn target_frames(&self) -> u64 {
        let for_jitter = ((2.0 * self.jitter_ms + 5.0) / FRAME_MS).ceil() as u64;
        // While losses are recent, hold one more frame so FEC can recover them.
        let for_fec = u64::from(self.since_loss < 250);
        (for_jitter.max(1) + for_fec).clamp(self.min_frames, self.max_frames)
    }

    /// Frames buffered from the next one to play up to the highest received.
    pub fn depth(&self) -> u64 {
        match (self.next, self.highest) {
            (Some(n), Some(h)) if h >= n => h - n + 1,
            (None, Some(h)) => self.packets.keys().next().map_or(0, |&first| h - first + 1),
            _ => 0,
        }
    }

    /// Whether playout has started (prefill done).
    pub fn is_started(&self) -> bool {
        self.next.is_some()
    }

    /// Whether enough is buffered for playout to start at the next tick.
    pub fn is_ready(&self) -> bool {
        self.next.is_some() || self.depth() >= self.target_frames()
    }

    /// How long after a packet's arrival its playout tick should come, so that normal
    /// jitter does not make the next packet miss its tick.
    pub fn playout_margin_ms(&self) -> f64 {
        (2.0 * self.jitter_ms + 4.0).min(FRAME_MS - 1.0)
    }

    /// Extends a 16-bit sequence number relative to the highest seen.
    fn extend(&self, seq: u16) -> u64 {
        match self.highest {
            None => u64::from(seq) + (1 << 16), // headroom for early reordering
            Some(h) => {
                let delta = i64::from(seq.wrapping_sub(h as u16) as i16);
                (h as i64 + delta).max(0) as u64
            }
        }
    }

    /// Adds a received packet.
    pub fn insert(&mut self, seq: u16, timestamp: u32, payload: Bytes, arrival_ms: f64) {
        let ext = self.extend(seq);
        if let Some(next) = self.next {
            if ext < next {
                self.stats.late += 1;
                // Playout runs too close to arrival for this jitter: add a frame of delay.
                if self.depth() <= self.max_frames {
                    self.hold = true;
                }
                return;
            }
        }
        if self.packets.contains_key(&ext) {
            self.stats.duplicates += 1;
            return;
        }
        if let Some((prev_arrival, prev_ts)) = self.prev {
            let transit_delta = (arrival_ms - prev_arrival)
                - f64::from(timestamp.wrapping_sub(prev_ts) as i32) / TICKS_PER_MS;
            self.jitter_ms += (transit_delta.abs() - self.jitter_ms) / 16.0;
        }
        self.prev = Some((arrival_ms, timestamp));
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        self.packets.insert(ext, payload);
        self.stats.received += 1;
    }

    /// What to play on this 20 ms tick.
    pub fn pop(&mut self) -> Playout {
        let Some(next) = self.next else {
            // Prefill: start once the target depth is buffered.
            if self.depth() >= self.target_frames() {
                self.next = self.packets.keys().next().copied();
                return self.pop();
            }
            return Playout::Waiting;
        };
        // Too deep (a burst arrived, or the jitter calmed down): skip the oldest frames.
        let target = self.target_frames();
        while self.depth() > target + 2 {
            let n = self.next.unwrap_or(next);
            self.packets.remove(&n);
            self.next = Some(n + 1);
            self.stats.dropped_for_latency += 1;
        }
        let next = self.next.unwrap_or(next);
        if std::mem::take(&mut self.hold) && !self.packets.is_empty() {
            self.stats.stretched += 1;
            return Playout::Conceal;
        }
        self.next = Some(next + 1);
        self.since_loss = self.since_loss.saturating_add(1);
        if let Some(p) = self.packets.remove(&next) {
            self.empty_ticks = 0;
            return Playout::Packet(p);
        }
        if self.packets.is_empty() {
            // Nothing after it has arrived either: the packet is most likely late, not
            // lost. Conceal this tick without giving up on it, which adds a frame of
            // delay; a long silence (the far end stopped) starts over with a prefill.
            self.next = Some(next);
            self.empty_ticks += 1;
            if self.empty_ticks > 10 {
                self.next = None;
                self.prev = None;
                return Playout::Waiting;
            }
            self.stats.stretched += 1;
            return Playout::Conceal;
        }
        // Later packets are here, so this one is lost (or hopelessly late).
        self.empty_ticks = 0;
        self.since_loss = 0;
        if let Some(p) = self.packets.get(&(next + 1)) {
            self.stats.fec_recovered += 1;
            return Playout::Fec(p.clone());
        }
        self.stats.concealed += 1;
        Playout::Conceal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn feed(jb: &mut JitterBuffer, seqs: &[u16]) {
        for &s in seqs {
            jb.insert(
                s,
                u32::from(s) * FRAME_SAMPLES,
                pkt(s as u8),
                f64::from(s) * FRAME_MS,
            );
        }
    }

    #[test]
    fn reorders_and_drops_duplicates_and_late_packets() {
        let mut jb = JitterBuffer::new(2, 8);
        feed(&mut jb, &[10, 12, 11, 11]);
        assert_eq!(jb.stats().duplicates, 1);
        assert_eq!(jb.pop(), Playout::Packet(pkt(10)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(11)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(12)));
        feed(&mut jb, &[11]);
        assert_eq!(jb.stats().late, 1);
    }

    #[test]
    fn waits_for_the_target_depth_before_playing() {
        let mut jb = JitterBuffer::new(2, 8);
        assert_eq!(jb.pop(), Playout::Waiting);
        feed(&mut jb, &[1]);
        assert_eq!(jb.pop(), Playout::Waiting);
        feed(&mut jb, &[2]);
        assert_eq!(jb.pop(), Playout::Packet(pkt(1)));
    }

    #[test]
    fn single_loss_is_recovered_from_fec_longer_gaps_concealed() {
        // Deep enough that the gaps below are not trimmed as excess latency.
        let mut jb = JitterBuffer::new(4, 8);
        feed(&mut jb, &[1, 3, 6]);
        assert_eq!(jb.pop(), Playout::Packet(pkt(1)));
        assert_eq!(jb.pop(), Playout::Fec(pkt(3)), "2 recovered from 3's FEC");
        assert_eq!(jb.pop(), Playout::Packet(pkt(3)));
        assert_eq!(jb.pop(), Playout::Conceal, "4 lost, 5 lost too");
        assert_eq!(jb.pop(), Playout::Fec(pkt(6)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(6)));
        let s = jb.stats();
        assert_eq!((s.fec_recovered, s.concealed), (2, 1));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut jb = JitterBuffer::new(4, 8);
        feed(&mut jb, &[65534, 65535, 0, 1]);
        assert_eq!(jb.pop(), Playout::Packet(pkt(254)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(255)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(0)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(1)));
    }

    #[test]
    fn depth_adapts_to_jitter_and_loss() {
        let mut jb = JitterBuffer::new(1, 10);
        // Perfectly paced packets: minimum depth.
        feed(&mut jb, &(0..50).collect::<Vec<_>>());
        assert_eq!(jb.target_frames(), 1);
        // Packets arriving +-30 ms off their pace: the target grows.
        let mut jb = JitterBuffer::new(1, 10);
        for s in 0..200u16 {
            let wobble = if s % 2 == 0 { 30.0 } else { -30.0 };
            jb.insert(
                s,
                u32::from(s) * FRAME_SAMPLES,
                pkt(1),
                f64::from(s) * FRAME_MS + wobble,
            );
        }
        assert!(jb.jitter_ms() > 30.0, "jitter {}", jb.jitter_ms());
        assert!(jb.target_frames() >= 4, "target {}", jb.target_frames());
    }

    #[test]
    fn an_underrun_waits_for_the_late_packet_growing_the_delay() {
        let mut jb = JitterBuffer::new(1, 8);
        feed(&mut jb, &[1]);
        assert_eq!(jb.pop(), Playout::Packet(pkt(1)));
        assert_eq!(jb.pop(), Playout::Conceal, "2 not here in time");
        feed(&mut jb, &[2, 3]);
        assert_eq!(jb.stats().late, 0, "2 was waited for");
        assert_eq!(jb.pop(), Playout::Packet(pkt(2)));
        assert_eq!(jb.pop(), Playout::Packet(pkt(3)));
        assert_eq!(jb.stats().stretched, 1);
        assert_eq!(jb.stats().concealed, 0);
    }

    #[test]
    fn a_packet_given_up_on_then_arriving_adds_a_frame_of_delay() {
        let mut jb = JitterBuffer::new(1, 8);
        feed(&mut jb, &[1, 3]);
        assert_eq!(jb.pop(), Playout::Packet(pkt(1)));
        assert_eq!(jb.pop(), Playout::Fec(pkt(3)), "2 presumed lost");
        feed(&mut jb, &[2]);
        assert_eq!(jb.stats().late, 1);
        assert_eq!(jb.pop(), Playout::Conceal, "held one frame");
        assert_eq!(jb.pop(), Playout::Packet(pkt(3)));
        assert_eq!(jb.stats().stretched, 1);
    }

    #[test]
    fn a_burst_is_trimmed_back_to_the_target() {
        let mut jb = JitterBuffer::new(1, 8);
        feed(&mut jb, &[0]);
        assert_eq!(jb.pop(), Playout::Packet(pkt(0)));
        feed(&mut jb, &(1..20).collect::<Vec<_>>());
        let _ = jb.pop();
        assert!(jb.depth() <= jb.target_frames() + 2);
        assert!(jb.stats().dropped_for_latency > 0);
    }
}
