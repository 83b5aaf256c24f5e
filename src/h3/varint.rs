//! QUIC variable-length integers (RFC 9000 §16), as HTTP datagrams (the quarter stream ID)
//! and capsules (type and length) frame their payloads.

use bytes::BufMut;

/// The largest value a variable-length integer holds: 2^62 - 1 (QUIC's error codes are
/// such integers, hence the name there).
pub(crate) const MAX: u64 = crate::quic::MAX_CODE;

/// Reads a variable-length integer from the front of `buf`: its value and how many bytes it
/// took, or `None` when `buf` ends before it does.
pub(crate) fn decode(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        value = (value << 8) | u64::from(b);
    }
    Some((value, len))
}

/// How many bytes `value` takes as a variable-length integer (values above [`MAX`] are not
/// encodable; callers never have one).
pub(crate) fn len(value: u64) -> usize {
    match value {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// Appends `value` (at most [`MAX`]) in its shortest encoding.
pub(crate) fn encode(value: u64, out: &mut impl BufMut) {
    debug_assert!(value <= MAX, "not a QUIC varint: {value}");
    match len(value) {
        1 => out.put_u8(value as u8),
        2 => out.put_u16(value as u16 | 0x4000),
        4 => out.put_u32(value as u32 | 0x8000_0000),
        _ => out.put_u64(value | 0xc000_0000_0000_0000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_rfc_examples_decode() {
        // RFC 9000 §A.1.
        assert_eq!(
            decode(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(decode(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
        assert_eq!(decode(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(decode(&[0x25]), Some((37, 1)));
        // Not the shortest encoding, but valid.
        assert_eq!(decode(&[0x40, 0x25]), Some((37, 2)));
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x40]), None);
    }

    proptest! {
        #[test]
        fn every_value_round_trips(value in 0..=MAX) {
            let mut out = Vec::new();
            encode(value, &mut out);
            prop_assert_eq!(out.len(), len(value));
            prop_assert_eq!(decode(&out), Some((value, out.len())));
        }
    }
}
