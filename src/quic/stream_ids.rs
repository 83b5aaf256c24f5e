//! Maps and sets keyed by QUIC stream ID, with a hash fit for them.
//!
//! The standard library's SipHash guards a map against keys chosen to collide, at about
//! 140 instructions a lookup; the per-request path does ten such lookups (about 2.5 % of a
//! small request's instructions, callgrind). Stream IDs need little of that guard: a peer
//! may only open streams below the limit it was granted, so such a map holds at most the
//! concurrent-stream limit of entries, and colliding keys only lengthen probes within that
//! bound. Still, a peer chooses which of its streams stay open, so the hash is seeded per
//! process: which IDs collide differs from one server process to the next. (quiche keys
//! its own stream map with a plain identity hash.)
//!
//! Connection IDs are not hashed here: the route table also holds the IDs clients chose
//! for their first Initials (up to the handshake cap of them), which an attacker picks
//! freely, and it keeps SipHash.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::OnceLock;

/// A map keyed by stream ID.
pub(crate) type StreamIdMap<V> = HashMap<u64, V, StreamIdHash>;
/// A set of stream IDs.
pub(crate) type StreamIdSet = HashSet<u64, StreamIdHash>;

/// Builds [`StreamIdHasher`]s with this process's seed.
#[derive(Clone, Copy)]
pub(crate) struct StreamIdHash(u64);

impl Default for StreamIdHash {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        StreamIdHash(*SEED.get_or_init(|| RandomState::new().hash_one(0x5eed_u64)))
    }
}

impl BuildHasher for StreamIdHash {
    type Hasher = StreamIdHasher;

    fn build_hasher(&self) -> StreamIdHasher {
        StreamIdHasher(self.0)
    }
}

/// Hashes one stream ID (a `u64`): see the module's docs.
pub(crate) struct StreamIdHasher(u64);

impl StreamIdHasher {
    /// An odd constant with bits spread over the word (the golden ratio's fraction).
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

    /// Folds `word` in: the product's high half brings the high bits down to the low ones
    /// (a table's bucket index), its low half keeps the low bits' spread up to the high
    /// ones (its control bytes). Consecutive stream IDs of one type differ by 4, which a
    /// bare multiplication would leave in the low two bits.
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.0 ^ word) * u128::from(Self::MULTIPLIER);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, id: u64) {
        self.mix(id);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input is still hashed, 8 bytes at a
        // time.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IDs of one stream type (4 apart) spread over the buckets of a small table: the
    /// low bits of their hashes differ.
    #[test]
    fn consecutive_stream_ids_of_one_type_hash_apart_in_the_low_bits() {
        let buckets: StreamIdSet = (0..64u64)
            .map(|i| StreamIdHash::default().hash_one(i * 4) & 63)
            .collect();
        // 64 keys thrown at random into 64 buckets land in about 40; 24 is 5 deviations off.
        assert!(buckets.len() > 24, "{} of 64 buckets used", buckets.len());
        // And so do their control bytes (the top 7 bits).
        let tags: StreamIdSet = (0..64u64)
            .map(|i| StreamIdHash::default().hash_one(i * 4) >> 57)
            .collect();
        assert!(tags.len() > 32, "{} of 128 tags used", tags.len());
    }

    /// The seed changes where IDs land, so which ones collide is not the same everywhere.
    #[test]
    fn the_seed_moves_every_id() {
        let (one, other) = (StreamIdHash(1), StreamIdHash(2));
        assert!((0..64u64).all(|i| one.hash_one(i * 4) != other.hash_one(i * 4)));
    }

    #[test]
    fn a_map_finds_what_it_holds() {
        let mut map = StreamIdMap::default();
        for id in (0..1000u64).step_by(4) {
            map.insert(id, id * 2);
        }
        assert!((0..1000u64).step_by(4).all(|id| map.get(&id) == Some(&(id * 2))));
        assert_eq!(map.get(&1), None);
    }
}
