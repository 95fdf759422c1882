//! The HTTP keys of a node: each 32 bytes with a short id safe to log, the
//! keyring's HTTP subkeys primary first (the primary signs, every key
//! verifies, so a key is rotated on a live cluster).

use std::fmt;

use hmac::Mac;
use sha2::{Digest, Sha256};

use super::HmacSha256;

/// One HTTP key: 32 bytes and a short id derived from them (safe to log).
#[derive(Clone)]
pub struct HttpKey {
    pub(super) id: String,
    pub(super) key: [u8; 32],
}

impl HttpKey {
    pub fn new(key: [u8; 32]) -> HttpKey {
        let mut h = Sha256::new();
        h.update(b"shoal-http-key-id\0");
        h.update(key);
        let id = hex::encode(&h.finalize()[..4]);
        HttpKey { id, key }
    }

    /// A key with the id it is known by elsewhere (the keyring's).
    pub fn with_id(id: &str, key: [u8; 32]) -> HttpKey {
        HttpKey {
            id: id.to_string(),
            key,
        }
    }

    /// The key's id, as sent in [`SIG_HEADER`].
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn mac(&self, data: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(data);
        m
    }
}

impl fmt::Debug for HttpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpKey({}, <redacted>)", self.id)
    }
}

/// The HTTP keys of a keyring: the first signs, all verify.
#[derive(Debug, Clone)]
pub struct PeerKeys {
    pub(super) keys: Vec<HttpKey>,
}

impl PeerKeys {
    /// `keys` primary first; `None` when empty.
    pub fn new(keys: Vec<[u8; 32]>) -> Option<PeerKeys> {
        if keys.is_empty() {
            return None;
        }
        Some(PeerKeys {
            keys: keys.into_iter().map(HttpKey::new).collect(),
        })
    }

    /// The keyring's HTTP subkeys, primary first, under the keyring's ids.
    pub fn from_keyring(keyring: &crate::keyring::Keyring) -> PeerKeys {
        PeerKeys {
            keys: keyring
                .http_keys()
                .iter()
                .map(|k| HttpKey::with_id(&k.id.to_string(), *k.secret.bytes()))
                .collect(),
        }
    }

    pub fn primary(&self) -> &HttpKey {
        &self.keys[0]
    }

    /// Ids of every key, primary first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    pub(super) fn find(&self, id: &str) -> Option<&HttpKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_auth::tests::keys;

    #[test]
    fn key_ids_are_short_stable_and_the_key_is_never_printed() {
        let k = HttpKey::new([0xab; 32]);
        assert_eq!(k.id().len(), 8);
        assert_eq!(k.id(), HttpKey::new([0xab; 32]).id());
        assert_ne!(k.id(), HttpKey::new([0xac; 32]).id());
        let shown = format!("{k:?} {:?}", keys(&[0xab]));
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert!(PeerKeys::new(Vec::new()).is_none());
    }
}
