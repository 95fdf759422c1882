//! Authentication of node-to-node HTTP calls (forwards, reads from the
//! owner, event relays, build logs): an HMAC-SHA256 with the cluster's HTTP
//! key over the call, checked by the receiver before it honours any
//! `x-shoal-*` header. Pure apart from [`PeerAuth`], which adds the clock,
//! the random nonce and the replay cache's lock.
//!
//! The signed string ([`canonical`]) binds the method, the path with its
//! query, a SHA-256 digest of the body, a timestamp (unix ms), a random
//! 128-bit nonce, the sender's node name and the receiver's node name (so a
//! call captured on its way to one node cannot be replayed to another).
//!
//! The receiver accepts a call when:
//! - its key id names a key of the receiver's keyring (the primary signs,
//!   every key verifies: that is how a key is rotated on a live cluster),
//! - the MAC matches (compared in constant time by `hmac`),
//! - its timestamp is within [`MAX_SKEW_MS`] of the receiver's clock (the
//!   clock skew tolerated between hosts, the same as gossip's),
//! - and its `(timestamp, nonce)` was never seen: the [`NonceCache`] holds
//!   every accepted pair of the window, bounded in size; when full it drops
//!   the oldest and refuses anything not newer than what it dropped, so a
//!   replay is never accepted, even under load.
//!
//! Only requests are signed; answers (the event stream above all) come
//! back on the connection the sender opened.
//!
//! Here: the signed string, signing and verifying, and [`PeerAuth`];
//! `peer_auth/keys.rs` has the HTTP keys, `peer_auth/nonces.rs` the replay
//! cache, `peer_auth/policy.rs` the policy per seal mode and what the
//! receiver does with a call.

mod keys;
mod nonces;
mod policy;

use std::sync::Arc;

use parking_lot::Mutex;

use hmac::Mac;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use keys::{HttpKey, PeerKeys};
pub use nonces::NonceCache;
pub use policy::{admit, Admission, PeerPolicy};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The sending node's name.
pub const PEER_HEADER: &str = "x-shoal-peer";
/// When the call was signed: unix time in milliseconds.
pub const TS_HEADER: &str = "x-shoal-ts";
/// 16 random bytes, hex.
pub const NONCE_HEADER: &str = "x-shoal-nonce";
/// `v1:<key id>:<hex HMAC-SHA256>`.
pub const SIG_HEADER: &str = "x-shoal-sig";
/// Every header of this prefix is for node-to-node calls only: without a
/// valid signature a call carrying one is refused.
pub const HEADER_PREFIX: &str = "x-shoal-";

/// Clock skew tolerated between hosts (either way), in milliseconds.
pub const MAX_SKEW_MS: u64 = 120_000;

/// Most `(timestamp, nonce)` pairs the replay cache holds (~4 MB at most).
pub const NONCE_CACHE_CAP: usize = 100_000;

const VERSION: &str = "v1";
const NONCE_LEN: usize = 16;
/// A node-to-node call as both ends see it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// `GET`, `POST`, ... as sent.
    pub method: &'a str,
    /// The request target: path and query (`/v1/environments?x=1`).
    pub path: &'a str,
    pub body: &'a [u8],
    /// The sender's node name.
    pub from: &'a str,
    /// The receiver's node name.
    pub to: &'a str,
}

/// The string the MAC is computed over. No field can hold a newline (HTTP
/// forbids them in request targets and header values; node names are
/// `A-Z a-z 0-9 . _ -`), so the fields cannot be shifted into each other.
pub fn canonical(call: &Call, ts_ms: u64, nonce_hex: &str) -> Vec<u8> {
    let body = hex::encode(Sha256::digest(call.body));
    format!(
        "shoal-peer-{VERSION}\n{}\n{}\n{body}\n{ts_ms}\n{nonce_hex}\n{}\n{}",
        call.method, call.path, call.from, call.to
    )
    .into_bytes()
}

/// The four headers of a signed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub peer: String,
    pub ts: String,
    pub nonce: String,
    pub sig: String,
}

impl Signed {
    pub fn headers(&self) -> [(&'static str, &str); 4] {
        [
            (PEER_HEADER, &self.peer),
            (TS_HEADER, &self.ts),
            (NONCE_HEADER, &self.nonce),
            (SIG_HEADER, &self.sig),
        ]
    }
}

/// Signs `call` with the primary key.
pub fn sign(keys: &PeerKeys, call: &Call, ts_ms: u64, nonce: [u8; NONCE_LEN]) -> Signed {
    let nonce = hex::encode(nonce);
    let key = keys.primary();
    let mac = key
        .mac(&canonical(call, ts_ms, &nonce))
        .finalize()
        .into_bytes();
    Signed {
        peer: call.from.to_string(),
        ts: ts_ms.to_string(),
        nonce,
        sig: format!("{VERSION}:{}:{}", key.id, hex::encode(mac)),
    }
}

/// The signature headers a call arrived with (each `None` when absent or
/// not text).
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    pub peer: Option<&'a str>,
    pub ts: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub sig: Option<&'a str>,
}

/// Why a call was not accepted as coming from a node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {0} is malformed")]
    Malformed(&'static str),
    #[error("the call is signed with a key this node does not hold")]
    UnknownKey,
    #[error("the signature does not match the call")]
    BadSignature,
    #[error("the call's timestamp is more than {}s away from this node's clock", MAX_SKEW_MS / 1000)]
    Skew,
    #[error("the call was already received (a replay)")]
    Replay,
    #[error("the call is older than this node's replay cache reaches back")]
    TooOld,
}

impl AuthError {
    /// The header the refusal is about.
    pub fn header(&self) -> &'static str {
        match self {
            AuthError::Missing(h) | AuthError::Malformed(h) => h,
            AuthError::UnknownKey | AuthError::BadSignature => SIG_HEADER,
            AuthError::Skew | AuthError::TooOld => TS_HEADER,
            AuthError::Replay => NONCE_HEADER,
        }
    }
}

fn need<'a>(v: Option<&'a str>, name: &'static str) -> Result<&'a str, AuthError> {
    v.ok_or(AuthError::Missing(name))
}

/// Checks a call. `call.from` is ignored: the sender is the one named in
/// [`PEER_HEADER`], which the MAC covers; it is returned on success.
/// The nonce is recorded only once the MAC matched, so forged calls cannot
/// fill the cache.
pub fn verify(
    keys: &PeerKeys,
    presented: &Presented,
    call: &Call,
    now_ms: u64,
    nonces: &mut NonceCache,
) -> Result<String, AuthError> {
    let peer = need(presented.peer, PEER_HEADER)?;
    let ts_text = need(presented.ts, TS_HEADER)?;
    let nonce_text = need(presented.nonce, NONCE_HEADER)?;
    let sig = need(presented.sig, SIG_HEADER)?;
    if !crate::cluster::keys::valid_name(peer) {
        return Err(AuthError::Malformed(PEER_HEADER));
    }
    let ts: u64 = match ts_text.parse() {
        Ok(t) if ts_text.bytes().all(|b| b.is_ascii_digit()) => t,
        _ => return Err(AuthError::Malformed(TS_HEADER)),
    };
    let nonce: [u8; NONCE_LEN] = hex::decode(nonce_text)
        .ok()
        .filter(|_| {
            nonce_text
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
        .and_then(|n| n.try_into().ok())
        .ok_or(AuthError::Malformed(NONCE_HEADER))?;
    let mut parts = sig.splitn(3, ':');
    let (Some(VERSION), Some(key_id), Some(mac_hex)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(SIG_HEADER));
    };
    let mac = hex::decode(mac_hex).map_err(|_| AuthError::Malformed(SIG_HEADER))?;
    if now_ms.abs_diff(ts) > MAX_SKEW_MS {
        return Err(AuthError::Skew);
    }
    let key = keys.find(key_id).ok_or(AuthError::UnknownKey)?;
    let signed = Call {
        from: peer,
        ..*call
    };
    key.mac(&canonical(&signed, ts, nonce_text))
        .verify_slice(&mac)
        .map_err(|_| AuthError::BadSignature)?;
    nonces.insert(ts, nonce, now_ms)?;
    Ok(peer.to_string())
}
/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One node's signer and verifier: its name, its HTTP keys, its replay
/// cache.
#[derive(Debug)]
pub struct PeerAuth {
    me: String,
    keys: PeerKeys,
    /// A std mutex: held only for one cache update, never across an await.
    /// Shared with the node's next `PeerAuth` when keys are reloaded.
    nonces: Arc<Mutex<NonceCache>>,
}

impl PeerAuth {
    pub fn new(me: &str, keys: PeerKeys) -> PeerAuth {
        let cache = Arc::new(Mutex::new(NonceCache::new(NONCE_CACHE_CAP)));
        PeerAuth::with_cache(me, keys, cache)
    }

    /// With a replay cache shared with the auth it replaces (key reload).
    pub fn with_cache(me: &str, keys: PeerKeys, nonces: Arc<Mutex<NonceCache>>) -> PeerAuth {
        PeerAuth {
            me: me.to_string(),
            keys,
            nonces,
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// Ids of the keys, primary first.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.ids()
    }

    /// The headers that sign a call from this node to node `to`.
    pub fn sign(&self, method: &str, path: &str, body: &[u8], to: &str) -> Signed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let call = Call {
            method,
            path,
            body,
            from: &self.me,
            to,
        };
        sign(&self.keys, &call, unix_ms(), nonce)
    }

    /// Checks a call made to this node; returns the sender's name.
    pub fn verify(
        &self,
        presented: &Presented,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, AuthError> {
        let call = Call {
            method,
            path,
            body,
            from: "",
            to: &self.me,
        };
        let now = unix_ms();
        let mut nonces = self.nonces.lock();
        verify(&self.keys, presented, &call, now, &mut nonces)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) const NOW: u64 = 1_800_000_000_000;

    pub(super) fn keys(seeds: &[u8]) -> PeerKeys {
        PeerKeys::new(seeds.iter().map(|s| [*s; 32]).collect()).unwrap()
    }

    fn call<'a>(body: &'a [u8]) -> Call<'a> {
        Call {
            method: "POST",
            path: "/v1/environments",
            body,
            from: "node-a",
            to: "node-b",
        }
    }

    pub(super) fn presented(s: &Signed) -> Presented<'_> {
        Presented {
            peer: Some(&s.peer),
            ts: Some(&s.ts),
            nonce: Some(&s.nonce),
            sig: Some(&s.sig),
        }
    }

    /// Verifies `s` as node-b would receive `c`, at `now`, with `k`.
    fn check(k: &PeerKeys, s: &Signed, c: &Call, now: u64) -> Result<String, AuthError> {
        let mut cache = NonceCache::new(16);
        let at_b = Call { from: "", ..*c };
        verify(k, &presented(s), &at_b, now, &mut cache)
    }

    #[test]
    fn a_signed_call_verifies_and_names_its_sender() {
        let k = keys(&[1]);
        let s = sign(&k, &call(b"{}"), NOW, [7; 16]);
        assert_eq!(s.peer, "node-a");
        assert!(s.sig.starts_with(&format!("v1:{}:", k.primary().id())));
        assert_eq!(check(&k, &s, &call(b"{}"), NOW).as_deref(), Ok("node-a"));
    }

    #[test]
    fn every_part_of_the_call_is_covered() {
        let k = keys(&[1]);
        let s = sign(&k, &call(b"{\"memory\":1}"), NOW, [7; 16]);
        let c = call(b"{\"memory\":1}");
        let cases: Vec<(&str, Call, Result<String, AuthError>)> = vec![
            ("as sent", c, Ok("node-a".into())),
            (
                "other body",
                call(b"{\"memory\":2}"),
                Err(AuthError::BadSignature),
            ),
            ("no body", call(b""), Err(AuthError::BadSignature)),
            (
                "other method",
                Call {
                    method: "DELETE",
                    ..c
                },
                Err(AuthError::BadSignature),
            ),
            (
                "other path",
                Call {
                    path: "/v1/environments/x",
                    ..c
                },
                Err(AuthError::BadSignature),
            ),
            (
                "query added",
                Call {
                    path: "/v1/environments?x=1",
                    ..c
                },
                Err(AuthError::BadSignature),
            ),
            (
                "other receiver",
                Call { to: "node-c", ..c },
                Err(AuthError::BadSignature),
            ),
        ];
        for (name, c, want) in cases {
            assert_eq!(check(&k, &s, &c, NOW), want, "{name}");
        }
    }

    #[test]
    fn headers_are_checked() {
        let k = keys(&[1]);
        let c = call(b"");
        let s = sign(&k, &c, NOW, [0xab; 16]);
        let with = |f: &dyn Fn(&mut Signed)| {
            let mut s = s.clone();
            f(&mut s);
            check(&k, &s, &c, NOW)
        };
        use AuthError::*;
        let cases: Vec<(&str, Result<String, AuthError>)> = vec![
            ("sender renamed", with(&|s| s.peer = "node-z".into())),
            ("sender not a name", with(&|s| s.peer = "a b".into())),
            ("ts +1", with(&|s| s.ts = (NOW + 1).to_string())),
            ("ts signed", with(&|s| s.ts = format!("+{NOW}"))),
            ("ts text", with(&|s| s.ts = "soon".into())),
            ("nonce changed", with(&|s| s.nonce = hex::encode([8u8; 16]))),
            ("nonce short", with(&|s| s.nonce = hex::encode([7u8; 15]))),
            ("nonce upper", with(&|s| s.nonce = s.nonce.to_uppercase())),
            (
                "version",
                with(&|s| s.sig = s.sig.replacen("v1:", "v2:", 1)),
            ),
            ("no key id", with(&|s| s.sig = "v1".into())),
            (
                "unknown key id",
                with(&|s| s.sig = format!("v1:00000000:{}", &s.sig[12..])),
            ),
            ("mac not hex", with(&|s| s.sig.push('z'))),
            (
                "mac cut",
                with(&|s| {
                    s.sig.truncate(s.sig.len() - 2);
                }),
            ),
        ];
        let want = [
            BadSignature,
            Malformed(PEER_HEADER),
            BadSignature,
            Malformed(TS_HEADER),
            Malformed(TS_HEADER),
            BadSignature,
            Malformed(NONCE_HEADER),
            Malformed(NONCE_HEADER),
            Malformed(SIG_HEADER),
            Malformed(SIG_HEADER),
            UnknownKey,
            Malformed(SIG_HEADER),
            BadSignature,
        ];
        for ((name, got), want) in cases.into_iter().zip(want) {
            assert_eq!(got, Err(want), "{name}");
        }
        let mut cache = NonceCache::new(4);
        for missing in [PEER_HEADER, TS_HEADER, NONCE_HEADER, SIG_HEADER] {
            let mut p = presented(&s);
            match missing {
                PEER_HEADER => p.peer = None,
                TS_HEADER => p.ts = None,
                NONCE_HEADER => p.nonce = None,
                _ => p.sig = None,
            }
            let got = verify(&k, &p, &Call { from: "", ..c }, NOW, &mut cache);
            assert_eq!(got, Err(Missing(missing)));
            assert_eq!(got.unwrap_err().header(), missing);
        }
        assert!(cache.is_empty(), "refused calls leave no nonce behind");
    }

    #[test]
    fn the_skew_window_is_inclusive_both_ways() {
        let k = keys(&[1]);
        let c = call(b"");
        let s = sign(&k, &c, NOW, [1; 16]);
        for (now, ok) in [
            (NOW, true),
            (NOW + MAX_SKEW_MS, true),
            (NOW - MAX_SKEW_MS, true),
            (NOW + MAX_SKEW_MS + 1, false),
            (NOW - MAX_SKEW_MS - 1, false),
            (0, false),
            (u64::MAX, false),
        ] {
            let got = check(&k, &s, &c, now);
            assert_eq!(got.is_ok(), ok, "now {now}: {got:?}");
            if !ok {
                assert_eq!(got, Err(AuthError::Skew));
            }
        }
    }

    #[test]
    fn rotation_primary_signs_every_key_verifies() {
        let old = keys(&[1]);
        let both_new_first = keys(&[2, 1]);
        let both_old_first = keys(&[1, 2]);
        let new = keys(&[2]);
        let c = call(b"x");
        // Mid-rotation, nodes holding either order talk to each other and
        // to nodes holding only the old key until the new one is primary.
        let by_old = sign(&old, &c, NOW, [1; 16]);
        let by_new = sign(&both_new_first, &c, NOW, [2; 16]);
        assert!(check(&both_new_first, &by_old, &c, NOW).is_ok());
        assert!(check(&both_old_first, &by_new, &c, NOW).is_ok());
        assert!(check(&new, &by_new, &c, NOW).is_ok());
        assert_eq!(check(&old, &by_new, &c, NOW), Err(AuthError::UnknownKey));
        assert_eq!(check(&new, &by_old, &c, NOW), Err(AuthError::UnknownKey));
    }

    #[test]
    fn a_key_of_another_cluster_with_a_known_id_still_fails() {
        // A forger who copies a key id learns nothing from it.
        let ours = keys(&[1]);
        let theirs = PeerKeys {
            keys: vec![HttpKey {
                id: ours.primary().id().to_string(),
                key: [9; 32],
            }],
        };
        let c = call(b"");
        let forged = sign(&theirs, &c, NOW, [3; 16]);
        assert_eq!(check(&ours, &forged, &c, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn replays_are_refused() {
        let k = keys(&[1]);
        let c = call(b"{}");
        let s = sign(&k, &c, NOW, [5; 16]);
        let at_b = Call { from: "", ..c };
        let mut cache = NonceCache::new(16);
        assert!(verify(&k, &presented(&s), &at_b, NOW, &mut cache).is_ok());
        let again = verify(&k, &presented(&s), &at_b, NOW + 10, &mut cache);
        assert_eq!(again, Err(AuthError::Replay));
        assert_eq!(again.unwrap_err().header(), NONCE_HEADER);
        // After the window the skew check refuses it.
        let late = verify(&k, &presented(&s), &at_b, NOW + MAX_SKEW_MS + 1, &mut cache);
        assert_eq!(late, Err(AuthError::Skew));
    }
    #[test]
    fn peer_auth_round_trip_with_the_real_clock() {
        let a = PeerAuth::new("node-a", keys(&[4]));
        let b = PeerAuth::new("node-b", keys(&[4]));
        let s = a.sign("GET", "/v1/environments", b"", "node-b");
        let p = presented(&s);
        assert_eq!(
            b.verify(&p, "GET", "/v1/environments", b"").as_deref(),
            Ok("node-a")
        );
        assert_eq!(
            b.verify(&p, "GET", "/v1/environments", b""),
            Err(AuthError::Replay)
        );
        // Signed for node-b: node-a itself (same key) refuses it.
        let s = a.sign("GET", "/v1/environments", b"", "node-b");
        assert_eq!(
            a.verify(&presented(&s), "GET", "/v1/environments", b""),
            Err(AuthError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn sign_then_verify_holds_and_any_flipped_body_bit_fails(
            method in "(GET|POST|DELETE)",
            path in "/[a-z0-9/?=&%-]{0,60}",
            body in proptest::collection::vec(any::<u8>(), 0..300),
            ts in (MAX_SKEW_MS..u64::MAX / 2),
            nonce in any::<[u8; 16]>(),
            flip in any::<proptest::sample::Index>(),
            key_seeds in proptest::collection::vec(any::<u8>(), 1..4),
        ) {
            let k = keys(&key_seeds);
            let c = Call { method: &method, path: &path, body: &body, from: "a", to: "b" };
            let s = sign(&k, &c, ts, nonce);
            prop_assert_eq!(check(&k, &s, &c, ts), Ok("a".to_string()));
            if !body.is_empty() {
                let mut bad = body.clone();
                let i = flip.index(bad.len());
                bad[i] ^= 1;
                let c2 = Call { body: &bad, ..c };
                prop_assert_eq!(check(&k, &s, &c2, ts), Err(AuthError::BadSignature));
            }
        }

        #[test]
        fn verify_never_panics_on_arbitrary_headers(
            peer in proptest::option::of(".{0,40}"),
            ts in proptest::option::of(".{0,30}"),
            nonce in proptest::option::of(".{0,40}"),
            sig in proptest::option::of(".{0,90}"),
        ) {
            let k = keys(&[1]);
            let p = Presented {
                peer: peer.as_deref(),
                ts: ts.as_deref(),
                nonce: nonce.as_deref(),
                sig: sig.as_deref(),
            };
            let mut cache = NonceCache::new(4);
            prop_assert!(verify(&k, &p, &call(b""), NOW, &mut cache).is_err());
            prop_assert!(cache.is_empty());
        }
    }
}
