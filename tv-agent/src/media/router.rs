//! Routes a media session's incoming RTP to its streams, by payload type and SSRC: each
//! payload type names a [`StreamKind`], and the first SSRC seen for a kind is latched as
//! that kind's stream; a packet of an unknown payload type, or of another SSRC for a kind
//! already latched, is rejected. RTCP is told apart before routing (RFC 5761) and is not
//! routed here.
//!
//! Pure logic: no I/O. Audio is the only stream played today; video is routed to its own
//! handler (counted and dropped) so that a peer sending video never disturbs the audio,
//! and video playback lands in that handler.

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Opus voice.
    Audio,
    /// Video (not played yet: counted and dropped).
    Video,
}

/// Where an RTP packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To this kind's stream.
    Stream(StreamKind),
    /// Its payload type names no stream of this session.
    UnknownPayload,
    /// A second source for a kind whose stream is latched to another SSRC.
    OtherSource,
}

/// The payload-type map and the latched SSRCs of one session.
#[derive(Debug, Clone, Default)]
pub struct StreamRouter {
    /// Payload type → kind.
    payload_types: Vec<(u8, StreamKind)>,
    /// Kind → the SSRC its stream is latched to.
    latched: Vec<(StreamKind, u32)>,
}

impl StreamRouter {
    /// A router for these payload types (a payload type listed twice keeps its first kind).
    pub fn new(payload_types: &[(u8, StreamKind)]) -> Self {
        let mut map: Vec<(u8, StreamKind)> = Vec::with_capacity(payload_types.len());
        for &(pt, kind) in payload_types {
            if !map.iter().any(|&(p, _)| p == pt) {
                map.push((pt, kind));
            }
        }
        StreamRouter {
            payload_types: map,
            latched: Vec::new(),
        }
    }

    /// Routes a packet of payload type `pt` from `ssrc`, latching the kind's stream to
    /// `ssrc` if it is the kind's first.
    pub fn route(&mut self, pt: u8, ssrc: u32) -> Route {
        let Some(&(_, kind)) = self.payload_types.iter().find(|&&(p, _)| p == pt) else {
            return Route::UnknownPayload;
        };
        match self.ssrc(kind) {
            None => {
                self.latched.push((kind, ssrc));
                Route::Stream(kind)
            }
            Some(s) if s == ssrc => Route::Stream(kind),
            Some(_) => Route::OtherSource,
        }
    }

    /// The SSRC `kind`'s stream is latched to, once a packet of it arrived.
    pub fn ssrc(&self, kind: StreamKind) -> Option<u32> {
        self.latched
            .iter()
            .find(|&&(k, _)| k == kind)
            .map(|&(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> StreamRouter {
        StreamRouter::new(&[(111, StreamKind::Audio), (96, StreamKind::Video)])
    }

    #[test]
    fn each_kind_latches_its_first_source() {
        let mut r = router();
        assert_eq!(r.ssrc(StreamKind::Audio), None);
        assert_eq!(r.route(111, 7), Route::Stream(StreamKind::Audio));
        assert_eq!(r.route(96, 8), Route::Stream(StreamKind::Video));
        assert_eq!(r.route(111, 7), Route::Stream(StreamKind::Audio));
        assert_eq!(r.route(96, 8), Route::Stream(StreamKind::Video));
        assert_eq!(
            r.route(111, 8),
            Route::OtherSource,
            "video's SSRC on audio's PT"
        );
        assert_eq!(r.route(96, 9), Route::OtherSource);
        assert_eq!(r.ssrc(StreamKind::Audio), Some(7));
        assert_eq!(r.ssrc(StreamKind::Video), Some(8));
    }

    #[test]
    fn unknown_payload_types_latch_nothing() {
        let mut r = router();
        assert_eq!(r.route(0, 5), Route::UnknownPayload);
        assert_eq!(r.ssrc(StreamKind::Audio), None);
        assert_eq!(r.route(111, 6), Route::Stream(StreamKind::Audio));
        let mut twice = StreamRouter::new(&[(111, StreamKind::Audio), (111, StreamKind::Video)]);
        assert_eq!(twice.route(111, 1), Route::Stream(StreamKind::Audio));
    }
}
