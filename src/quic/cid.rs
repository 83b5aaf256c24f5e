//! Connection IDs: the pluggable generator, and the keyed derivation of stateless reset tokens.

use boring::hash::hmac_sha256;

/// Makes the source connection IDs an endpoint hands out.
///
/// A load balancer in front of several servers can route by connection ID when the IDs
/// encode which server issued them: implement this trait to produce such IDs. All IDs of an
/// endpoint have the same length, because QUIC short headers do not carry it.
pub trait ConnectionIdGenerator: Send + Sync + 'static {
    /// The length of every ID, from 4 to 20 bytes. Defaults to 8: 64 random bits do not
    /// collide among any number of connections a server holds, and a server's transport
    /// parameters carry two of its IDs in the 128 bytes quiche 0.30 has for them (with
    /// the client's first ID of up to 20 bytes, a Retry and datagrams, 16-byte IDs do not
    /// fit; a listener refuses a configuration that could overflow, saying so).
    fn id_len(&self) -> usize {
        8
    }

    /// Fills `out` (exactly [`id_len`](Self::id_len) bytes) with a new, unguessable ID.
    fn generate(&self, out: &mut [u8]);
}

/// Random IDs from BoringSSL's CSPRNG; the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomConnectionIdGenerator;

impl ConnectionIdGenerator for RandomConnectionIdGenerator {
    fn generate(&self, out: &mut [u8]) {
        fill_random(out);
    }
}

pub(crate) fn fill_random(out: &mut [u8]) {
    // BoringSSL's RAND_bytes does not fail; abort-free fallback keeps the type total.
    if boring::rand::rand_bytes(out).is_err() {
        out.fill(0x5a);
    }
}

pub(crate) fn new_id(generator: &dyn ConnectionIdGenerator) -> quiche::ConnectionId<'static> {
    let mut id = vec![0; generator.id_len().clamp(4, quiche::MAX_CONN_ID_LEN)];
    generator.generate(&mut id);
    quiche::ConnectionId::from_vec(id)
}

/// Derives stateless reset tokens from connection IDs with a per-endpoint key (RFC 9000
/// §10.3.2), so the router can answer a packet for a forgotten connection with the token the
/// connection advertised, without remembering anything per connection.
pub(crate) struct ResetKey([u8; 32]);

/// A secret: configurations that hold one print without it.
impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    pub(crate) fn random() -> Self {
        let mut key = [0; 32];
        fill_random(&mut key);
        ResetKey(key)
    }

    /// A key the user chose (`ServerConfigBuilder::stateless_reset_key`).
    pub(crate) fn new(key: [u8; 32]) -> Self {
        ResetKey(key)
    }

    pub(crate) fn token(&self, cid: &[u8]) -> u128 {
        let mac = hmac_sha256(&self.0, cid).unwrap_or([0; 32]);
        let mut token = [0; 16];
        token.copy_from_slice(&mac[..16]);
        u128::from_be_bytes(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_tokens_are_keyed_and_stable() {
        let a = ResetKey::random();
        let b = ResetKey::random();
        assert_eq!(a.token(b"cid-1"), a.token(b"cid-1"));
        assert_ne!(a.token(b"cid-1"), a.token(b"cid-2"));
        assert_ne!(a.token(b"cid-1"), b.token(b"cid-1"));
    }

    #[test]
    fn random_ids_have_the_generator_length() {
        let id = new_id(&RandomConnectionIdGenerator);
        assert_eq!(id.len(), 8);
        assert_ne!(new_id(&RandomConnectionIdGenerator), id);
    }
}
