//! Address-validation tokens for Retry (RFC 9000 §8.1.2).
//!
//! A token is `key_id(4) || nonce(12) || AES-128-GCM(expiry || original DCID) || tag(16)`,
//! with the client's address and the Retry's source connection ID as additional
//! authenticated data:
//! it cannot be forged without the endpoint's key, it expires, and it is bound to the address
//! it was sent to and to the connection ID the server chose in that Retry, which the client
//! must use as the DCID of its next Initial (RFC 9000 §7.2, §17.2.5). So one token opens one
//! connection, under that ID, rather than any number of them under fresh IDs. The server
//! keeps no state between sending a Retry and receiving the token back.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boring::symm::{Cipher, decrypt_aead, encrypt_aead};

use super::cid::fill_random;

/// Marks the tokens of one key, so that a token from elsewhere (a NEW_TOKEN token of
/// another server under the same name) is told from one of ours that fails: only ours
/// answer a Retry of ours. Random, so a foreign token looks like ours once in 2^32.
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// How long a Retry token stays valid. The client echoes it within one round trip, so a few
/// seconds are plenty; longer only widens the replay window.
pub(crate) const RETRY_TOKEN_LIFETIME: Duration = Duration::from_secs(10);

pub(crate) struct TokenKey {
    key: [u8; 16],
    id: [u8; KEY_ID_LEN],
}

/// The additional authenticated data: the peer's address, then the Retry's source connection
/// ID.
fn bound_to(addr: &SocketAddr, retry_scid: &[u8]) -> Option<([u8; 18 + quiche::MAX_CONN_ID_LEN], usize)> {
    if retry_scid.len() > quiche::MAX_CONN_ID_LEN {
        return None;
    }
    let mut out = [0; 18 + quiche::MAX_CONN_ID_LEN];
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
    out[len..len + retry_scid.len()].copy_from_slice(retry_scid);
    Some((out, len + retry_scid.len()))
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
        let mut id = [0; KEY_ID_LEN];
        fill_random(&mut id);
        TokenKey { key, id }
    }

    /// Whether `token` was minted with this key (valid or not): only such a token answers a
    /// Retry of ours. Any other is treated as no token at all (RFC 9000 §8.1.3).
    pub(crate) fn is_ours(&self, token: &[u8]) -> bool {
        token.starts_with(&self.id)
    }

    /// Mints a token for a client at `peer` whose first Initial had `odcid` as its DCID, sent
    /// in a Retry whose source connection ID is `retry_scid`.
    pub(crate) fn mint(&self, peer: &SocketAddr, odcid: &[u8], retry_scid: &[u8]) -> Vec<u8> {
        self.mint_at(peer, odcid, retry_scid, unix_now() + RETRY_TOKEN_LIFETIME.as_secs())
    }

    fn mint_at(&self, peer: &SocketAddr, odcid: &[u8], retry_scid: &[u8], expiry: u64) -> Vec<u8> {
        let Some((aad, aad_len)) = bound_to(peer, retry_scid) else {
            return Vec::new();
        };
        let mut plain = Vec::with_capacity(8 + odcid.len());
        plain.extend_from_slice(&expiry.to_be_bytes());
        plain.extend_from_slice(odcid);
        let mut nonce = [0; NONCE_LEN];
        fill_random(&mut nonce);
        let mut tag = [0; TAG_LEN];
        let Ok(sealed) = encrypt_aead(
            Cipher::aes_128_gcm(),
            &self.key,
            Some(&nonce),
            &aad[..aad_len],
            &plain,
            &mut tag,
        ) else {
            return Vec::new();
        };
        let mut token = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + sealed.len() + TAG_LEN);
        token.extend_from_slice(&self.id);
        token.extend_from_slice(&nonce);
        token.extend_from_slice(&sealed);
        token.extend_from_slice(&tag);
        token
    }

    /// Returns the original DCID the token was minted for, or `None` when the token is forged,
    /// expired, was issued to another address, or arrives in an Initial whose DCID is not the
    /// ID our Retry chose.
    pub(crate) fn validate(&self, peer: &SocketAddr, dcid: &[u8], token: &[u8]) -> Option<Vec<u8>> {
        let token = token.strip_prefix(&self.id)?;
        // What a token of ours can hold (an original DCID is 20 bytes at most): a longer
        // one is refused before any AES runs over it (an Initial's token may be tens of KB).
        if !(NONCE_LEN + 8 + TAG_LEN..=NONCE_LEN + 8 + quiche::MAX_CONN_ID_LEN + TAG_LEN).contains(&token.len()) {
            return None;
        }
        let (nonce, rest) = token.split_at(NONCE_LEN);
        let (sealed, tag) = rest.split_at(rest.len() - TAG_LEN);
        let (aad, aad_len) = bound_to(peer, dcid)?;
        let plain = decrypt_aead(
            Cipher::aes_128_gcm(),
            &self.key,
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

    const RETRY_SCID: &[u8] = b"retry-scid-16byt";

    #[test]
    fn a_minted_token_validates_for_its_address_and_retry_id() {
        let key = TokenKey::random();
        let token = key.mint(&peer(), b"original-dcid", RETRY_SCID);
        assert_eq!(
            key.validate(&peer(), RETRY_SCID, &token).as_deref(),
            Some(&b"original-dcid"[..])
        );
    }

    /// The longest token of ours (a 20-byte original DCID) still validates: the length
    /// bound checked before decryption leaves no valid token out.
    #[test]
    fn the_longest_token_of_ours_validates() {
        let key = TokenKey::random();
        let odcid = [7; quiche::MAX_CONN_ID_LEN];
        let token = key.mint(&peer(), &odcid, RETRY_SCID);
        assert_eq!(key.validate(&peer(), RETRY_SCID, &token).as_deref(), Some(&odcid[..]));
        let mut longer = token.clone();
        longer.push(0);
        assert_eq!(key.validate(&peer(), RETRY_SCID, &longer), None);
    }

    #[test]
    fn a_key_knows_its_own_tokens_valid_or_not() {
        let key = TokenKey::random();
        let mut token = key.mint(&peer(), b"odcid", RETRY_SCID);
        assert!(key.is_ours(&token));
        let last = token.len() - 1;
        token[last] ^= 1;
        assert!(key.is_ours(&token), "refused, but still ours");
        assert!(!TokenKey::random().is_ours(&token), "another key's");
        assert!(!key.is_ours(b"a NEW_TOKEN token of some other server"));
        assert!(!key.is_ours(&[]));
    }

    #[test]
    fn a_token_used_under_another_connection_id_is_refused() {
        let key = TokenKey::random();
        let token = key.mint(&peer(), b"original-dcid", RETRY_SCID);
        assert_eq!(key.validate(&peer(), b"fresh-dcid-16byt", &token), None);
        assert_eq!(key.validate(&peer(), &RETRY_SCID[..8], &token), None, "a prefix");
        assert_eq!(key.validate(&peer(), &[0; 21], &token), None, "too long to be an ID");
    }

    #[test]
    fn forged_expired_and_misaddressed_tokens_are_refused() {
        let key = TokenKey::random();
        let mut token = key.mint(&peer(), b"odcid", RETRY_SCID);
        let other: SocketAddr = "127.0.0.1:4434".parse().unwrap();
        assert_eq!(key.validate(&other, RETRY_SCID, &token), None, "another port");
        assert_eq!(
            TokenKey::random().validate(&peer(), RETRY_SCID, &token),
            None,
            "another key"
        );
        let last = token.len() - 1;
        token[last] ^= 1;
        assert_eq!(key.validate(&peer(), RETRY_SCID, &token), None, "flipped bit");
        let expired = key.mint_at(&peer(), b"odcid", RETRY_SCID, unix_now() - 1);
        assert_eq!(key.validate(&peer(), RETRY_SCID, &expired), None, "expired");
        assert_eq!(key.validate(&peer(), RETRY_SCID, b"short"), None, "truncated");
        assert_eq!(key.validate(&peer(), RETRY_SCID, &[]), None, "empty");
    }
}
