//! How a node treats node-to-node calls, following the gossip seal mode
//! (`required`, `transitional`, `off`), and what the receiver does with an
//! incoming call from its headers alone ([`admit`]).

use std::sync::Arc;

use parking_lot::Mutex;

use super::{NonceCache, PeerAuth, PeerKeys, NONCE_CACHE_CAP};

/// How this node treats node-to-node calls; follows the gossip sealing
/// mode, so a cluster moves to signed calls the way it moves to sealed
/// gossip (every node signing first, then every node requiring it).
#[derive(Debug, Clone)]
pub enum PeerPolicy {
    /// Calls are signed; a call with an `x-shoal-*` header is honoured only
    /// with a valid signature.
    Required(std::sync::Arc<PeerAuth>),
    /// Calls are signed and signed calls checked, but unsigned calls of
    /// nodes not moved yet are still honoured.
    Transitional(std::sync::Arc<PeerAuth>),
    /// No cluster key (insecure mode): nothing is signed, any caller's
    /// `x-shoal-*` headers are honoured.
    Off,
}

impl PeerPolicy {
    /// The policy of node `me`: none without a keyring; with one, it
    /// follows the gossip seal mode (`required` requires signed calls,
    /// `transitional` and `off` sign but still honour unsigned ones).
    pub fn new(
        me: &str,
        keyring: Option<&crate::keyring::Keyring>,
        seal: crate::config::SealMode,
    ) -> PeerPolicy {
        let cache = Arc::new(Mutex::new(NonceCache::new(NONCE_CACHE_CAP)));
        PeerPolicy::with_cache(me, keyring, seal, cache)
    }

    /// [`PeerPolicy::new`] with the replay cache of the policy it replaces.
    pub fn with_cache(
        me: &str,
        keyring: Option<&crate::keyring::Keyring>,
        seal: crate::config::SealMode,
        nonces: Arc<Mutex<NonceCache>>,
    ) -> PeerPolicy {
        use crate::config::SealMode;
        let Some(keyring) = keyring else {
            return PeerPolicy::Off;
        };
        let auth = Arc::new(PeerAuth::with_cache(
            me,
            PeerKeys::from_keyring(keyring),
            nonces,
        ));
        match seal {
            SealMode::Required => PeerPolicy::Required(auth),
            SealMode::Transitional | SealMode::Off => PeerPolicy::Transitional(auth),
        }
    }

    /// The signer of outgoing calls.
    pub fn signer(&self) -> Option<&std::sync::Arc<PeerAuth>> {
        match self {
            PeerPolicy::Required(a) | PeerPolicy::Transitional(a) => Some(a),
            PeerPolicy::Off => None,
        }
    }

    /// `required`, `transitional` or `off`, as `GET /v1/node` shows it.
    pub fn mode(&self) -> &'static str {
        match self {
            PeerPolicy::Required(_) => "required",
            PeerPolicy::Transitional(_) => "transitional",
            PeerPolicy::Off => "off",
        }
    }
}

/// What the receiver does with an incoming call (see [`admit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// No signature and no `x-shoal-*` header: an ordinary client call.
    Plain,
    /// Signed: check the signature (reading the body), then honour it.
    Verify,
    /// Honour its `x-shoal-*` headers without a check (transitional or off).
    Trust,
    /// Refuse it: it carries this `x-shoal-*` header without a signature.
    Refuse(String),
}

/// Decides from the headers alone. `shoal_header` is the first `x-shoal-*`
/// header of the call other than the signature's own, if any.
pub fn admit(policy: &PeerPolicy, signed: bool, shoal_header: Option<&str>) -> Admission {
    match (policy, signed, shoal_header) {
        (PeerPolicy::Off, false, None) => Admission::Plain,
        (PeerPolicy::Off, _, _) => Admission::Trust,
        (_, true, _) => Admission::Verify,
        (_, false, None) => Admission::Plain,
        (PeerPolicy::Transitional(_), false, Some(_)) => Admission::Trust,
        (PeerPolicy::Required(_), false, Some(h)) => Admission::Refuse(h.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_auth::tests::{keys, presented};
    use crate::peer_auth::{AuthError, HttpKey};

    #[test]
    fn the_policy_follows_the_keyring_and_the_seal_mode() {
        use crate::config::SealMode;
        let ring = crate::keyring::Keyring::from_keys(vec![[1; 32], [2; 32]]).unwrap();
        let cases = [
            (Some(&ring), SealMode::Required, "required"),
            (Some(&ring), SealMode::Transitional, "transitional"),
            (Some(&ring), SealMode::Off, "transitional"),
            (None, SealMode::Off, "off"),
            (None, SealMode::Required, "off"),
        ];
        for (ring, seal, want) in cases {
            assert_eq!(PeerPolicy::new("n", ring, seal).mode(), want, "{seal:?}");
        }
        // Signed with the keyring's primary under its public id; a node
        // holding the keys in the other order (mid-rotation) verifies it.
        let p = PeerPolicy::new("a", Some(&ring), SealMode::Required);
        let auth = p.signer().unwrap();
        assert_eq!(
            auth.key_ids(),
            ring.ids().iter().map(|i| i.to_string()).collect::<Vec<_>>()
        );
        let s = auth.sign("GET", "/x", b"", "b");
        assert!(s.sig.starts_with(&format!("v1:{}:", ring.primary_id())));
        let swapped = crate::keyring::Keyring::from_keys(vec![[2; 32], [1; 32]]).unwrap();
        let b = PeerPolicy::new("b", Some(&swapped), SealMode::Required);
        assert_eq!(
            b.signer()
                .unwrap()
                .verify(&presented(&s), "GET", "/x", b"")
                .as_deref(),
            Ok("a")
        );
        // The HTTP key is a subkey: the raw cluster key does not verify.
        let raw = PeerKeys {
            keys: vec![HttpKey::with_id(&ring.primary_id().to_string(), [1; 32])],
        };
        let raw = PeerAuth::new("b", raw);
        assert_eq!(
            raw.verify(&presented(&s), "GET", "/x", b""),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn a_reload_keeps_the_replay_cache() {
        use crate::config::SealMode;
        let old = crate::keyring::Keyring::from_keys(vec![[1; 32]]).unwrap();
        let both = crate::keyring::Keyring::from_keys(vec![[2; 32], [1; 32]]).unwrap();
        let a = PeerPolicy::new("a", Some(&old), SealMode::Required);
        let cache = Arc::new(Mutex::new(NonceCache::new(16)));
        let before = PeerPolicy::with_cache("b", Some(&old), SealMode::Required, cache.clone());
        let s = a.signer().unwrap().sign("POST", "/x", b"{}", "b");
        let verify = |p: &PeerPolicy| {
            p.signer()
                .unwrap()
                .verify(&presented(&s), "POST", "/x", b"{}")
        };
        assert_eq!(verify(&before).as_deref(), Ok("a"));
        // SIGHUP: a new primary, the old key still verifies, same cache.
        let after = PeerPolicy::with_cache("b", Some(&both), SealMode::Required, cache);
        assert_eq!(verify(&after), Err(AuthError::Replay));
        let fresh = PeerPolicy::new("b", Some(&both), SealMode::Required);
        assert_eq!(
            verify(&fresh).as_deref(),
            Ok("a"),
            "a fresh cache would let it in"
        );
    }

    #[test]
    fn admission_by_policy() {
        let auth = std::sync::Arc::new(PeerAuth::new("b", keys(&[1])));
        let req = PeerPolicy::Required(auth.clone());
        let tra = PeerPolicy::Transitional(auth);
        let off = PeerPolicy::Off;
        let local = Some("x-shoal-local");
        use Admission::*;
        let cases = [
            (&req, false, None, Plain),
            (&req, true, None, Verify),
            (&req, true, local, Verify),
            (&req, false, local, Refuse("x-shoal-local".into())),
            (&tra, false, None, Plain),
            (&tra, true, local, Verify),
            (&tra, false, local, Trust),
            (&off, false, None, Plain),
            (&off, false, local, Trust),
            (&off, true, None, Trust),
        ];
        for (policy, signed, header, want) in cases {
            assert_eq!(
                admit(policy, signed, header),
                want,
                "{} {signed} {header:?}",
                policy.mode()
            );
        }
        assert!(req.signer().is_some() && tra.signer().is_some() && off.signer().is_none());
    }
}
