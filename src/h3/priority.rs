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

    /// Applies it to a stream's place in quiche's send order.
    pub(crate) fn apply(self, conn: &mut QuicheConnection, id: u64) {
        // Fails only for a stream quiche no longer has: nothing left to order.
        let _ = conn.stream_priority(id, self.urgency, self.incremental);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> (u8, bool) {
        let p = Priority::parse([value.as_bytes()]);
        (p.urgency, p.incremental)
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
}
