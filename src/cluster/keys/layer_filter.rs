//! The compact summary of the layers a node holds, gossiped in the one key
//! `layers` instead of one `layer:<16 hex>` key per layer (300 layers were
//! ~7 KiB of a node's state; the filter is ≤ 700 bytes).
//!
//! A Bloom filter over the 16-hex chain-id prefixes. Hand-written, not a
//! crate's: its bits are a wire format every shoal version must read the
//! same way (the Bloom crates' serializations carry their own hasher keys and
//! change between versions), and its input is already a uniform hash (a
//! SHA-256 prefix), so the bit positions come straight from it (splitmix64
//! seeded with the prefix) with no keyed hasher.
//!
//! Value: `1,<layers>,<hashes>,<base64url bits, no padding>`. The filter has
//! [`BITS_PER_LAYER`] bits per layer (rounded up to 64), at most
//! [`MAX_BITS`]: a false-positive rate of ~0.1 % up to 284 layers, 0.14 % at
//! 300, 2 % at 500 (see [`LayerFilter::false_positive_rate`]). A false
//! positive makes placement think a node holds a layer it lacks (its
//! predicted load is too short); the node's own load counts from its engine,
//! so nothing else is wrong.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Bits per layer: 14.4 gives a 0.1 % false-positive rate.
pub const BITS_PER_LAYER: f64 = 14.4;
/// Largest filter, in bits (512 bytes, 683 base64 characters).
pub const MAX_BITS: usize = 4096;
/// Smallest filter, in bits (32 bytes): a node with a handful of layers
/// still gets a near-zero false-positive rate.
pub const MIN_BITS: usize = 256;
/// Most hash functions a decoded filter may claim.
const MAX_HASHES: u32 = 16;
/// Longest `layers` value: the format version, two counts and the bits.
pub const MAX_FILTER_VALUE_LEN: usize = 2 + 11 + 3 + MAX_BITS.div_ceil(6);

/// A Bloom filter over chain-id prefixes (16 lowercase hex digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFilter {
    /// How many layers went in.
    layers: u32,
    hashes: u32,
    bits: Vec<u8>,
}

/// The 64 bits of a 16-hex prefix; `None` for anything else.
fn prefix_bits(prefix: &str) -> Option<u64> {
    if prefix.len() != 16
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(prefix, 16).ok()
}

impl LayerFilter {
    /// The filter of `prefixes` (anything not 16 hex digits is skipped).
    pub fn build<'a>(prefixes: impl IntoIterator<Item = &'a String>) -> LayerFilter {
        let values: Vec<u64> = prefixes
            .into_iter()
            .filter_map(|p| prefix_bits(p))
            .collect();
        let n = values.len().max(1);
        let bits = ((n as f64 * BITS_PER_LAYER).ceil() as usize)
            .next_multiple_of(64)
            .clamp(MIN_BITS, MAX_BITS);
        let hashes = ((bits as f64 / n as f64) * std::f64::consts::LN_2).round() as u32;
        let mut f = LayerFilter {
            layers: u32::try_from(values.len()).unwrap_or(u32::MAX),
            hashes: hashes.clamp(1, MAX_HASHES),
            bits: vec![0; bits / 8],
        };
        for v in values {
            for i in f.positions(v) {
                f.bits[i / 8] |= 1 << (i % 8);
            }
        }
        f
    }

    /// The bit positions of `v`: the first `hashes` outputs of splitmix64
    /// seeded with it. Independent positions, not double hashing: over a
    /// few hundred bits double hashing repeats its patterns and doubles
    /// the false-positive rate.
    fn positions(&self, v: u64) -> impl Iterator<Item = usize> {
        let m = (self.bits.len() * 8) as u64;
        let mut state = v;
        (0..self.hashes).map(move |_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % m) as usize
        })
    }

    /// Whether the node may hold the layer with this prefix: `false` is
    /// certain, `true` wrong at [`Self::false_positive_rate`].
    pub fn may_contain(&self, prefix: &str) -> bool {
        match prefix_bits(prefix) {
            Some(v) => self
                .positions(v)
                .all(|i| self.bits[i / 8] & (1 << (i % 8)) != 0),
            None => false,
        }
    }

    /// How many layers the node put in.
    pub fn layers(&self) -> u32 {
        self.layers
    }

    /// The expected false-positive rate for the layers it holds.
    pub fn false_positive_rate(&self) -> f64 {
        let m = (self.bits.len() * 8) as f64;
        let k = f64::from(self.hashes);
        (1.0 - (-k * f64::from(self.layers) / m).exp()).powf(k)
    }

    /// The gossip value.
    pub fn encode(&self) -> String {
        format!(
            "1,{},{},{}",
            self.layers,
            self.hashes,
            URL_SAFE_NO_PAD.encode(&self.bits)
        )
    }

    /// Reads a gossip value; total (a peer's value is untrusted): anything
    /// but a well-formed filter within the bounds is an error.
    pub fn decode(value: &str) -> Result<LayerFilter, String> {
        if value.len() > MAX_FILTER_VALUE_LEN {
            return Err(format!("longer than {MAX_FILTER_VALUE_LEN} bytes"));
        }
        let mut parts = value.split(',');
        let (Some(version), Some(layers), Some(hashes), Some(bits), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err("expected `1,<layers>,<hashes>,<bits>`".into());
        };
        if version != "1" {
            return Err(format!("unknown filter version `{version}`"));
        }
        let layers: u32 = layers.parse().map_err(|_| "layers is not a number")?;
        let hashes: u32 = hashes.parse().map_err(|_| "hashes is not a number")?;
        if !(1..=MAX_HASHES).contains(&hashes) {
            return Err(format!("hashes must be 1-{MAX_HASHES}"));
        }
        let bits = URL_SAFE_NO_PAD
            .decode(bits)
            .map_err(|_| "bits are not base64url")?;
        if bits.is_empty() || bits.len() % 8 != 0 {
            return Err("bits must be a positive multiple of 64".into());
        }
        Ok(LayerFilter {
            layers,
            hashes,
            bits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn prefixes(n: u64, salt: u64) -> BTreeSet<String> {
        (0..n)
            .map(|i| {
                format!(
                    "{:016x}",
                    (i ^ salt.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )
            })
            .collect()
    }

    #[test]
    fn holds_every_layer_put_in_and_few_others() {
        for n in [0u64, 1, 10, 100, 300, 500] {
            let held = prefixes(n, 1);
            let f = LayerFilter::build(&held);
            assert!(held.iter().all(|p| f.may_contain(p)), "{n}");
            assert!(f.encode().len() <= MAX_FILTER_VALUE_LEN, "{n}");
            let others = prefixes(20_000, 2);
            let fp = others.iter().filter(|p| f.may_contain(p)).count() as f64 / 20_000.0;
            // The measured rate is near the expected one.
            assert!(
                fp <= f.false_positive_rate() * 1.5 + 0.0005,
                "{n}: {fp} vs {}",
                f.false_positive_rate()
            );
        }
        let f = LayerFilter::build(&prefixes(300, 1));
        assert!(
            f.false_positive_rate() < 0.0015,
            "{}",
            f.false_positive_rate()
        );
        assert_eq!(f.layers(), 300);
    }

    #[test]
    fn decoding_table() {
        let good = LayerFilter::build(&prefixes(3, 1)).encode();
        let cases: [(&str, bool); 9] = [
            (&good, true),
            ("1,0,1,AAAAAAAAAAA", true),
            ("", false),
            ("2,0,1,AAAAAAAAAAA", false),
            ("1,0,0,AAAAAAAAAAA", false),
            ("1,0,17,AAAAAAAAAAA", false),
            ("1,0,1,AAAA", false),
            ("1,x,1,AAAAAAAAAAA", false),
            ("1,0,1,AAAAAAAAAAA,", false),
        ];
        for (v, ok) in cases {
            assert_eq!(LayerFilter::decode(v).is_ok(), ok, "{v:?}");
        }
        assert_eq!(LayerFilter::decode(&good).unwrap().encode(), good);
        assert!(!LayerFilter::decode("1,0,1,AAAAAAAAAAA")
            .unwrap()
            .may_contain("0123456789abcdef"));
    }

    proptest! {
        /// A peer's value never panics the reader, whatever it holds.
        #[test]
        fn any_value_decodes_or_fails_cleanly(v in "\\PC{0,80}", bits in "[A-Za-z0-9_-]{0,700}", k in 0u32..40) {
            let _ = LayerFilter::decode(&v);
            if let Ok(f) = LayerFilter::decode(&format!("1,5,{k},{bits}")) {
                let _ = f.may_contain("0123456789abcdef");
                let _ = f.false_positive_rate();
            }
        }
    }
}
