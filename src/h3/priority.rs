//! Extensible priorities (RFC 9218): the `priority` field and PRIORITY_UPDATE values, parsed
//! into what quiche's stream scheduler takes (an urgency and an incremental flag).

use crate::quic::QuicheConnection;

/// The `priority` field's name, made once: looking a field up by a `&str` parses the name
/// on every request.
#[cfg(feature = "server")]
pub(crate) const FIELD: http::HeaderName = http::HeaderName::from_static("priority");

/// A stream's priority: urgency 0 (most urgent) to 7, and whether its data may be
/// interleaved with other streams of the same urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Priority {
    pub(crate) urgency: u8,
    pub(crate) incremental: bool,
}

impl Default for Priority {
    /// `u=3`, not incremental (RFC 9218 §4.1, §4.2).
    fn default() -> Self {
        Priority {
            urgency: 3,
            incremental: false,
        }
    }
}

impl Priority {
    /// Parses a Structured Fields dictionary (RFC 8941 §3.2) as RFC 9218 §4 reads it: `u`
    /// an integer 0-7, `i` a boolean (bare `i` is true); unknown members, parameters and
    /// out-of-range or ill-typed values are ignored, each leaving its default. Several
    /// `priority` lines are one dictionary joined with commas, later members winning.
    pub(crate) fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Priority {
        let mut priority = Priority::default();
        for value in values {
            for member in value.split(|&b| b == b',') {
                // A member's own parameters (`;a=b`) do not concern us.
                let member = member.split(|&b| b == b';').next().unwrap_or_default();
                let member = member.trim_ascii();
                let (key, value) = match member.iter().position(|&b| b == b'=') {
                    Some(at) => (&member[..at], Some(&member[at + 1..])),
                    None => (member, None),
                };
                match (key, value) {
                    (b"u", Some([d @ b'0'..=b'7'])) => priority.urgency = d - b'0',
                    (b"i", None) | (b"i", Some(b"?1")) => priority.incremental = true,
                    (b"i", Some(b"?0")) => priority.incremental = false,
                    _ => {}
                }
            }
        }
        priority
    }

    /// Applies it to a stream's place in quiche's send order. quiche's HTTP/3 layer keeps
    /// request streams at [`QUICHE_URGENCY_OFFSET`] plus their urgency (its control and
    /// QPACK streams at 0, before any, GREASE at 255): a raw urgency would put a `u=7`
    /// response ahead of every other.
    pub(crate) fn apply(self, conn: &mut QuicheConnection, id: u64) {
        // Fails only for a stream quiche no longer has: nothing left to order.
        let _ = conn.stream_priority(id, QUICHE_URGENCY_OFFSET + self.urgency.min(7), self.incremental);
    }

    /// As quiche's HTTP/3 layer takes it with a response head (which would otherwise set
    /// the default, `u=3`, whatever the stream had).
    pub(crate) fn to_quiche(self) -> quiche::h3::Priority {
        quiche::h3::Priority::new(self.urgency, self.incremental)
    }

    /// Packed into a byte, to be kept in an atomic: the urgency in the low bits, the
    /// incremental flag in the top one.
    pub(crate) fn to_bits(self) -> u8 {
        self.urgency.min(7) | (u8::from(self.incremental) << 7)
    }

    pub(crate) fn from_bits(bits: u8) -> Priority {
        Priority {
            urgency: bits & 0x7,
            incremental: bits & 0x80 != 0,
        }
    }
}

/// Where quiche's HTTP/3 layer puts urgency 0 of a request stream in its `stream_priority`
/// space (quiche's `PRIORITY_URGENCY_OFFSET`, which it does not export).
const QUICHE_URGENCY_OFFSET: u8 = 124;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> (u8, bool) {
        let p = Priority::parse([value.as_bytes()]);
        (p.urgency, p.incremental)
    }

    #[test]
    fn a_priority_packs_into_a_byte_and_back() {
        for urgency in 0..=7 {
            for incremental in [false, true] {
                let p = Priority { urgency, incremental };
                assert_eq!(Priority::from_bits(p.to_bits()), p);
            }
        }
    }

    #[test]
    fn urgency_and_incremental_as_rfc_9218_reads_them() {
        assert_eq!(parse(""), (3, false));
        assert_eq!(parse("u=0"), (0, false));
        assert_eq!(parse("u=7, i"), (7, true));
        assert_eq!(parse("i=?1,u=5"), (5, true));
        assert_eq!(parse("u=2;x=y, i=?0"), (2, false));
        // Out of range, ill-typed or unknown: the default for that member.
        assert_eq!(parse("u=8"), (3, false));
        assert_eq!(parse("u=-1, i=1"), (3, false));
        assert_eq!(parse("u=12"), (3, false));
        assert_eq!(parse("foo=bar, u=1"), (1, false));
        // Later members win, also across field lines.
        let p = Priority::parse([&b"u=1"[..], &b"u=6, i"[..]]);
        assert_eq!((p.urgency, p.incremental), (6, true));
    }

    /// A priority set on a stream lands in the space where quiche's HTTP/3 layer puts the
    /// streams it answers: a `u=7` stream goes after one answered at `u=3`, and a `u=0`
    /// one before it. quiche lists writable streams most urgent first. (Found by review:
    /// raw urgencies put every reprioritized stream ahead of all answered ones.)
    #[test]
    fn a_priority_orders_its_stream_among_those_quiche_answered() {
        use crate::testing::{Pipe, client_config, server_config};
        let mut pipe = Pipe::handshaken(&server_config("h3", |t| t), &client_config("h3", |t| t));
        let config = quiche::h3::Config::new().unwrap();
        let mut client = quiche::h3::Connection::with_transport(&mut pipe.client, &config).unwrap();
        let mut server = quiche::h3::Connection::with_transport(&mut pipe.server, &config).unwrap();
        let head = [
            quiche::h3::Header::new(b":method", b"GET"),
            quiche::h3::Header::new(b":scheme", b"https"),
            quiche::h3::Header::new(b":authority", b"localhost"),
            quiche::h3::Header::new(b":path", b"/"),
        ];
        let ids: Vec<u64> = (0..3)
            .map(|_| client.send_request(&mut pipe.client, &head, true).unwrap())
            .collect();
        pipe.flush();
        while server.poll(&mut pipe.server).is_ok() {}
        let status = [quiche::h3::Header::new(b":status", b"200")];
        // Each answered with a head and no FIN yet, so each stays writable.
        for &id in &ids {
            let answered_at = Priority::default().to_quiche();
            server
                .send_response_with_priority(&mut pipe.server, id, &status, &answered_at, false)
                .unwrap();
        }
        let (lower, higher) = (ids[1], ids[2]);
        Priority {
            urgency: 7,
            incremental: false,
        }
        .apply(&mut pipe.server, lower);
        Priority {
            urgency: 0,
            incremental: false,
        }
        .apply(&mut pipe.server, higher);
        let order: Vec<u64> = pipe.server.writable().filter(|id| ids.contains(id)).collect();
        assert_eq!(order, [higher, ids[0], lower]);
    }
}
