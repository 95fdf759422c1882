//! The Docker image archive formats shoal reads and writes, and the layer
//! identities that tie them together. Pure: readers and writers in, no
//! network, no Docker client.
//!
//! - [`Digest`]: a sha256 content digest, printed `sha256:<hex>`.
//! - [`chain_ids`]: a layer's chain id names the layer *and everything below
//!   it*; the engine de-duplicates by chain id, so "which layers does the
//!   engine already hold" is always a question about chain ids, never diff ids.
//! - [`save`]: reads a `docker save` tar stream (legacy and OCI layouts).
//! - [`load`]: writes a (thin) `docker load` tar stream.

pub mod load;
pub mod save;

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A sha256 digest. Printed and parsed as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a digest: expected sha256:<64 hex digits>")]
pub struct BadDigest(pub String);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first `n` hex digits: enough to tell layers apart in gossip.
    pub fn short(&self, n: usize) -> String {
        let mut h = self.hex();
        h.truncate(n);
        h
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.short(12))
    }
}

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        if h.len() != 64
            || !h
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(BadDigest(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out).map_err(|_| BadDigest(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A running sha256 over bytes as they stream past.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// The chain ids of a layer list given bottom-up by diff id:
/// `chain[0] = diff[0]`, `chain[i] = sha256(chain[i-1] + " " + diff[i])`,
/// as the OCI image spec and Docker's layer store define them.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => *d,
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// How many leading layers are held, given the chain ids of an image and
/// the set of chain ids an engine holds: the length of the longest prefix
/// whose last chain id is held. A chain id names the whole stack below it,
/// so a held chain id at position `i` implies every layer up to `i` is held.
pub fn held_prefix(chain_ids: &[Digest], held: &HashSet<Digest>) -> usize {
    chain_ids
        .iter()
        .rposition(|c| held.contains(c))
        .map_or(0, |i| i + 1)
}

/// Like [`held_prefix`], but against short hex prefixes of chain ids (as
/// gossip carries them, see `docs/gossip.md`).
pub fn held_prefix_short(chain_ids: &[Digest], held: &HashSet<String>, n: usize) -> usize {
    chain_ids
        .iter()
        .rposition(|c| held.contains(&c.short(n)))
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digest_text_round_trip() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(d.hex().parse::<Digest>().unwrap(), d);
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(s.to_uppercase().parse::<Digest>().is_err());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn chain_ids_match_docker() {
        // Docker's layer/layer.go CreateChainID, checked by hand with sha256sum.
        let a: Digest = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .parse()
            .unwrap();
        let b: Digest = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
            .parse()
            .unwrap();
        let c = chain_ids(&[a, b]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::of(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    fn digests(n: usize) -> Vec<Digest> {
        (0..n).map(|i| Digest::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn held_prefix_cases() {
        let diffs = digests(4);
        let chain = chain_ids(&diffs);
        let held = |idx: &[usize]| idx.iter().map(|&i| chain[i]).collect::<HashSet<_>>();
        assert_eq!(held_prefix(&chain, &held(&[])), 0);
        assert_eq!(held_prefix(&chain, &held(&[0])), 1);
        assert_eq!(held_prefix(&chain, &held(&[0, 1, 2])), 3);
        // Chain id 2 implies 0 and 1 even if they are not listed.
        assert_eq!(held_prefix(&chain, &held(&[2])), 3);
        assert_eq!(held_prefix(&chain, &held(&[0, 1, 2, 3])), 4);
        // A diff id that is held as the *top* of another stack is not a prefix.
        let other = chain_ids(&[diffs[1]]);
        assert_eq!(held_prefix(&chain, &other.into_iter().collect()), 0);
        let short: HashSet<String> = [chain[1].short(16)].into();
        assert_eq!(held_prefix_short(&chain, &short, 16), 2);
    }

    proptest! {
        #[test]
        fn chain_prefix_is_prefix(n in 0usize..12, cut in 0usize..12) {
            let diffs = digests(n);
            let cut = cut.min(n);
            let full = chain_ids(&diffs);
            // The chain ids of a prefix are a prefix of the chain ids.
            prop_assert_eq!(&chain_ids(&diffs[..cut])[..], &full[..cut]);
            // An engine holding exactly the prefix reports it.
            let held: HashSet<Digest> = full[..cut].iter().copied().collect();
            prop_assert_eq!(held_prefix(&full, &held), cut);
        }
    }
}
