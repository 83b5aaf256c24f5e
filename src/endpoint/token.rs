//! Address-validation tokens for Retry (RFC 9000 §8.1.2).
//!
//! A token is `nonce(12) || AES-128-GCM(expiry || original DCID) || tag(16)`, with the
//! client's address as additional authenticated data: it cannot be forged without the
//! endpoint's key, it is bound to the address it was sent to, and it expires. The server keeps
//! no state between sending a Retry and receiving the token back.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boring::symm::{Cipher, decrypt_aead, encrypt_aead};

use super::cid::fill_random;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// How long a Retry token stays valid. The client echoes it within one round trip, so a few
/// seconds are plenty; longer only widens the replay window.
pub(crate) const RETRY_TOKEN_LIFETIME: Duration = Duration::from_secs(10);

pub(crate) struct TokenKey([u8; 16]);

fn address_bytes(addr: &SocketAddr) -> ([u8; 18], usize) {
    let mut out = [0; 18];
    let len = match addr {
        SocketAddr::V4(a) => {
            out[..4].copy_from_slice(&a.ip().octets());
            out[4..6].copy_from_slice(&a.port().to_be_bytes());
            6
        }
        SocketAddr::V6(a) => {
            out[..16].copy_from_slice(&a.ip().octets());
            out[16..18].copy_from_slice(&a.port().to_be_bytes());
            18
        }
    };
    (out, len)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenKey {
    pub(crate) fn random() -> Self {
        let mut key = [0; 16];
        fill_random(&mut key);
        TokenKey(key)
    }

    /// Mints a token for a client at `peer` whose first Initial had `odcid` as its DCID.
    pub(crate) fn mint(&self, peer: &SocketAddr, odcid: &[u8]) -> Vec<u8> {
        self.mint_at(peer, odcid, unix_now() + RETRY_TOKEN_LIFETIME.as_secs())
    }

    fn mint_at(&self, peer: &SocketAddr, odcid: &[u8], expiry: u64) -> Vec<u8> {
        let mut plain = Vec::with_capacity(8 + odcid.len());
        plain.extend_from_slice(&expiry.to_be_bytes());
        plain.extend_from_slice(odcid);
        let mut nonce = [0; NONCE_LEN];
        fill_random(&mut nonce);
        let (aad, aad_len) = address_bytes(peer);
        let mut tag = [0; TAG_LEN];
        let Ok(sealed) = encrypt_aead(
            Cipher::aes_128_gcm(),
            &self.0,
            Some(&nonce),
            &aad[..aad_len],
            &plain,
            &mut tag,
        ) else {
            return Vec::new();
        };
        let mut token = Vec::with_capacity(NONCE_LEN + sealed.len() + TAG_LEN);
        token.extend_from_slice(&nonce);
        token.extend_from_slice(&sealed);
        token.extend_from_slice(&tag);
        token
    }

    /// Returns the original DCID the token was minted for, or `None` when the token is forged,
    /// expired, or was issued to another address.
    pub(crate) fn validate(&self, peer: &SocketAddr, token: &[u8]) -> Option<Vec<u8>> {
        if token.len() < NONCE_LEN + 8 + TAG_LEN {
            return None;
        }
        let (nonce, rest) = token.split_at(NONCE_LEN);
        let (sealed, tag) = rest.split_at(rest.len() - TAG_LEN);
        let (aad, aad_len) = address_bytes(peer);
        let plain = decrypt_aead(
            Cipher::aes_128_gcm(),
            &self.0,
            Some(nonce),
            &aad[..aad_len],
            sealed,
            tag,
        )
        .ok()?;
        let (expiry, odcid) = plain.split_at(8);
        let expiry = u64::from_be_bytes(expiry.try_into().ok()?);
        if expiry < unix_now() || odcid.len() > quiche::MAX_CONN_ID_LEN {
            return None;
        }
        Some(odcid.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:4433".parse().unwrap()
    }

    #[test]
    fn a_minted_token_validates_for_its_address() {
        let key = TokenKey::random();
        let token = key.mint(&peer(), b"original-dcid");
        assert_eq!(key.validate(&peer(), &token).as_deref(), Some(&b"original-dcid"[..]));
    }

    #[test]
    fn forged_expired_and_misaddressed_tokens_are_refused() {
        let key = TokenKey::random();
        let mut token = key.mint(&peer(), b"odcid");
        let other: SocketAddr = "127.0.0.1:4434".parse().unwrap();
        assert_eq!(key.validate(&other, &token), None, "another port");
        assert_eq!(TokenKey::random().validate(&peer(), &token), None, "another key");
        let last = token.len() - 1;
        token[last] ^= 1;
        assert_eq!(key.validate(&peer(), &token), None, "flipped bit");
        let expired = key.mint_at(&peer(), b"odcid", unix_now() - 1);
        assert_eq!(key.validate(&peer(), &expired), None, "expired");
        assert_eq!(key.validate(&peer(), b"short"), None, "truncated");
        assert_eq!(key.validate(&peer(), &[]), None, "empty");
    }
}
