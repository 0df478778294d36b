//! A structural check of an RTP header from the peer, made before any library parses it:
//! rtp 0.13's `Header::unmarshal` trusts the length of each RFC 8285 header extension
//! element and panics (out-of-bounds `copy_to_bytes`) on one that runs past the datagram,
//! and webrtc-srtp parses the header that way before it checks the authentication tag.
//! Found by the `media_receive` fuzz target. Pure logic: no I/O.

/// RFC 8285's one-byte header extension profile.
const ONE_BYTE_PROFILE: u16 = 0xBEDE;

/// Whether `datagram` starts with a well-formed RTP header (RFC 3550, 5.1): version 2,
/// its CSRC list and its header extension within the datagram, and each element of an
/// RFC 8285 extension (one-byte profile `0xBEDE`, two-byte profile `0x100X`) within the
/// extension. Only a datagram that passes is given to the RTP and SRTP decoders.
pub fn well_formed(datagram: &[u8]) -> bool {
    let [b0, ..] = *datagram else {
        return false;
    };
    if b0 >> 6 != 2 {
        return false;
    }
    let csrc_end = 12 + 4 * usize::from(b0 & 0x0f);
    if datagram.len() < csrc_end {
        return false;
    }
    if b0 & 0x10 == 0 {
        return true;
    }
    let Some(&[p0, p1, l0, l1]) = datagram.get(csrc_end..csrc_end + 4) else {
        return false;
    };
    let start = csrc_end + 4;
    let end = start + 4 * usize::from(u16::from_be_bytes([l0, l1]));
    let Some(block) = datagram.get(start..end) else {
        return false;
    };
    match u16::from_be_bytes([p0, p1]) {
        ONE_BYTE_PROFILE => elements_fit(block, |b| {
            // ID 15 ends the extension (RFC 8285, 4.2); the length is one less.
            let id = b[0] >> 4;
            (id != 15).then(|| Some(1 + usize::from(b[0] & 0x0f) + 1))
        }),
        p if p & 0xfff0 == 0x1000 => elements_fit(block, |b| {
            // ID, length byte, data.
            Some(b.get(1).map(|&len| 2 + usize::from(len)))
        }),
        _ => true,
    }
}

/// Whether the extension elements in `block` each fit in it: `element` gives the size
/// of the element starting at its first byte (`None`: the walk stops there, fine;
/// `Some(None)`: it does not fit). Zero bytes are padding.
fn elements_fit(block: &[u8], element: impl Fn(&[u8]) -> Option<Option<usize>>) -> bool {
    let mut rest = block;
    while let [first, ..] = *rest {
        if first == 0 {
            rest = &rest[1..];
            continue;
        }
        match element(rest) {
            None => return true,
            Some(Some(n)) if n <= rest.len() => rest = &rest[n..],
            Some(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use webrtc_util::marshal::Unmarshal;

    fn header(b0: u8, tail: &[u8]) -> Vec<u8> {
        let mut v = vec![b0, 111, 0, 1, 0, 0, 3, 192, 0, 0, 0, 7];
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn plain_headers_csrcs_and_extensions_that_fit_pass() {
        assert!(well_formed(&header(0x80, b"payload")));
        assert!(well_formed(&header(0x81, &[0, 0, 0, 9])));
        assert!(
            !well_formed(&header(0x82, &[0, 0, 0, 9])),
            "2 CSRCs, 1 there"
        );
        assert!(!well_formed(&header(0x40, b"payload")), "version 1");
        assert!(!well_formed(&[0x80, 111, 0]));
        // One-byte elements: ID 1 with 2 bytes, padding, ID 2 with 1 byte.
        let ok = header(
            0x90,
            &[0xbe, 0xde, 0, 2, 0x11, 1, 2, 0, 0x20, 9, 0, 0, 0xaa],
        );
        assert!(well_formed(&ok));
        assert!(rtp::packet::Packet::unmarshal(&mut &ok[..]).is_ok());
        // Two-byte elements: ID 1 with 3 bytes.
        let ok = header(0x90, &[0x10, 0x00, 0, 2, 1, 3, 7, 7, 7, 0, 0, 0]);
        assert!(well_formed(&ok));
        // An extension block longer than the datagram; an RFC 3550 one that fits.
        assert!(!well_formed(&header(0x90, &[0x12, 0x34, 0, 3, 0, 0])));
        assert!(well_formed(&header(0x90, &[0x12, 0x34, 0, 1, 1, 2, 3, 4])));
    }

    /// The datagrams that made rtp 0.13's header decoder panic (found by the
    /// `media_receive` fuzz target): an element longer than what is left.
    #[test]
    fn elements_running_past_the_extension_are_refused() {
        // Two-byte: ID 1 claims 200 bytes in a 4-byte block at the end of the datagram.
        let two = header(0x90, &[0x10, 0x00, 0, 1, 1, 200, 0, 0]);
        // Two-byte: an ID at the block's last byte, its length byte missing.
        let no_len = header(0x90, &[0x10, 0x00, 0, 1, 0, 0, 0, 5]);
        // One-byte: ID 1 claims 16 bytes.
        let one = header(0x90, &[0xbe, 0xde, 0, 1, 0x1f, 0, 0, 0]);
        for d in [&two, &no_len, &one] {
            assert!(!well_formed(d), "{d:?}");
        }
        // An element that overruns the block but not the datagram is refused too (rtp
        // would take the rest of it as payload).
        assert!(!well_formed(&header(
            0x90,
            &[0xbe, 0xde, 0, 1, 0x17, 0, 0, 0, 1, 2, 3, 4, 5]
        )));
        // ID 15 ends the walk.
        assert!(well_formed(&header(
            0x90,
            &[0xbe, 0xde, 0, 1, 0xff, 0, 0, 0]
        )));
    }
}
