//! The hash of the tables keyed by QUIC IDs: stream IDs (maps of the per-request path) and
//! connection IDs (a socket's route table, looked up for every datagram).
//!
//! The standard library's SipHash guards a map against keys chosen to collide, at about
//! 140 instructions a lookup for a stream ID and 210 for a connection ID (callgrind); the
//! per-request path does about ten stream-ID lookups, the router one connection-ID lookup
//! per datagram. These keys need little of that guard:
//! - a peer may only open streams below the limit it was granted, so a map keyed by stream
//!   ID holds at most the concurrent-stream limit of entries, and colliding keys only
//!   lengthen probes within that bound;
//! - the route table holds only IDs this endpoint issued (random, or its generator's), so
//!   no peer can fill it with keys chosen to collide: a datagram's ID only decides where
//!   one lookup probes.
//!
//! Still, a peer chooses which of its streams stay open, and a generator's IDs may be alike
//! but for a counter, so each 8-byte word is folded in with a 64×64→128-bit multiplication
//! whose halves are XORed (as foldhash does), from a seed drawn once per process: which IDs
//! would collide is not the same in every process. (quiche keys its own stream map with a
//! plain identity hash.)

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::OnceLock;

/// A map keyed by stream ID.
pub(crate) type StreamIdMap<V> = HashMap<u64, V, IdHash>;
/// A set of stream IDs.
pub(crate) type StreamIdSet = HashSet<u64, IdHash>;

/// Builds [`IdHasher`]s with this process's seed.
#[derive(Clone, Copy)]
pub(crate) struct IdHash(u64);

impl Default for IdHash {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        IdHash(*SEED.get_or_init(|| RandomState::new().hash_one(0x5eed_u64)))
    }
}

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

/// Hashes a stream ID (one `u64`) or a connection ID (its length, then its bytes, 8 at a
/// time): see the module's docs.
pub(crate) struct IdHasher(u64);

impl IdHasher {
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

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, id: u64) {
        self.mix(id);
    }

    /// A slice's length comes first (`write_usize`): IDs of different lengths never hash
    /// alike by their zero padding.
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
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
        let buckets: StreamIdSet = (0..64u64).map(|i| IdHash::default().hash_one(i * 4) & 63).collect();
        // 64 keys thrown at random into 64 buckets land in about 40; 24 is 5 deviations off.
        assert!(buckets.len() > 24, "{} of 64 buckets used", buckets.len());
        // And so do their control bytes (the top 7 bits).
        let tags: StreamIdSet = (0..64u64).map(|i| IdHash::default().hash_one(i * 4) >> 57).collect();
        assert!(tags.len() > 32, "{} of 128 tags used", tags.len());
    }

    /// The seed changes where IDs land, so which ones collide is not the same everywhere.
    #[test]
    fn the_seed_moves_every_id() {
        let (one, other) = (IdHash(1), IdHash(2));
        assert!((0..64u64).all(|i| one.hash_one(i * 4) != other.hash_one(i * 4)));
    }

    fn hash(seed: u64, id: &[u8]) -> u64 {
        IdHash(seed).hash_one(id)
    }

    /// IDs that differ in any byte, or only in length (zero padding), hash apart; the
    /// seed moves every ID; a table keyed by boxed IDs finds them by slice.
    #[test]
    fn connection_ids_hash_apart_by_every_byte_and_by_length() {
        let id = [7u8; 20];
        for at in 0..id.len() {
            let mut other = id;
            other[at] ^= 1;
            assert_ne!(hash(1, &id), hash(1, &other), "byte {at}");
        }
        assert_ne!(hash(1, &[1]), hash(1, &[1, 0]));
        assert_ne!(hash(1, &[0; 8]), hash(1, &[0; 16]));
        assert!((0u64..64).all(|i| hash(1, &i.to_le_bytes()) != hash(2, &i.to_le_bytes())));

        let mut table: std::collections::HashMap<Box<[u8]>, u64, IdHash> = Default::default();
        for i in 0u64..1000 {
            table.insert(Box::from(&i.to_be_bytes()[..]), i);
        }
        assert!((0u64..1000).all(|i| table.get(&i.to_be_bytes()[..]) == Some(&i)));
        assert_eq!(table.get(&[0u8; 9][..]), None);
    }

    /// IDs a generator makes alike but for a counter (as a load balancer's IDs may be)
    /// spread over the buckets and the control bytes of a table.
    #[test]
    fn ids_alike_but_for_a_counter_spread_over_a_table() {
        let ids: Vec<[u8; 8]> = (0u16..256)
            .map(|i| {
                let mut id = [0xab; 8];
                id[6..].copy_from_slice(&i.to_be_bytes());
                id
            })
            .collect();
        let buckets: StreamIdSet = ids.iter().map(|id| hash(3, id) & 255).collect();
        // 256 keys thrown at random into 256 buckets land in about 162.
        assert!(buckets.len() > 120, "{} of 256 buckets used", buckets.len());
        let tags: StreamIdSet = ids.iter().map(|id| hash(3, id) >> 57).collect();
        assert!(tags.len() > 100, "{} of 128 tags used", tags.len());
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
