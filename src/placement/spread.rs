//! Spreading: the near-equal head of a ranking, and the order in which to
//! ask candidates to reserve, picked with a caller-given seed so concurrent
//! requests entering at different nodes do not all try the same node first.

use super::Ranked;

/// Candidates whose predicted time is within this fraction of the best...
pub const NEAR_EQUAL_FRACTION: f64 = 0.10;
/// ...or within this many seconds of it, are near-equal.
pub const NEAR_EQUAL_SECS: f64 = 2.0;
/// At most this many near-equal candidates share the first attempts, so
/// packing (tightest fit first) still mostly holds.
pub const NEAR_EQUAL_MAX: usize = 3;

/// How many leading candidates of a ranking are near-equal to the best.
pub fn near_equal_band(ranked: &[Ranked]) -> usize {
    let Some(best) = ranked.first() else { return 0 };
    let limit = best.predicted_load_secs
        + (best.predicted_load_secs * NEAR_EQUAL_FRACTION).max(NEAR_EQUAL_SECS);
    ranked
        .iter()
        .take(NEAR_EQUAL_MAX)
        .take_while(|r| r.predicted_load_secs <= limit)
        .count()
}

/// The order in which to ask candidates to reserve: the near-equal band
/// rotated by `seed` (e.g. a hash of the request id), then the rest in rank
/// order. Deterministic for a given seed.
pub fn attempt_order(ranked: &[Ranked], seed: u64) -> Vec<&Ranked> {
    let band = near_equal_band(ranked);
    let mut out: Vec<&Ranked> = Vec::with_capacity(ranked.len());
    if band > 0 {
        let start = (mix(seed) % band as u64) as usize;
        out.extend(ranked[..band].iter().cycle().skip(start).take(band));
    }
    out.extend(&ranked[band..]);
    out
}

/// The candidate to ask first: the head of [`attempt_order`].
pub fn choose(ranked: &[Ranked], seed: u64) -> Option<&Ranked> {
    attempt_order(ranked, seed).into_iter().next()
}

/// splitmix64: spreads consecutive seeds over the band.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ranked(name: &str, secs: f64) -> Ranked {
        Ranked {
            node: name.into(),
            http_addr: String::new(),
            predicted_load_secs: secs,
            missing_bytes: 0,
            memory_free_after: 0,
            aio_free_after: 0,
        }
    }

    #[test]
    fn near_equal_band_cases() {
        let cases: Vec<(Vec<f64>, usize)> = vec![
            (vec![], 0),
            (vec![0.0], 1),
            (vec![0.0, 0.0, 0.0, 0.0], 3),  // capped at NEAR_EQUAL_MAX
            (vec![0.0, 1.9, 2.1], 2),       // 2 s absolute slack
            (vec![100.0, 109.0, 111.0], 2), // 10% relative slack
            (vec![0.0, 130.0], 1),          // cached vs cold: not equal
        ];
        for (secs, want) in cases {
            let r: Vec<Ranked> = secs
                .iter()
                .enumerate()
                .map(|(i, s)| ranked(&format!("n{i}"), *s))
                .collect();
            assert_eq!(near_equal_band(&r), want, "{secs:?}");
        }
    }

    #[test]
    fn attempt_order_spreads_and_keeps_everyone() {
        let r: Vec<Ranked> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| ranked(n, 0.0))
            .collect();
        let mut firsts = BTreeSet::new();
        for seed in 0..64 {
            let o: Vec<&str> = attempt_order(&r, seed)
                .iter()
                .map(|x| x.node.as_str())
                .collect();
            assert_eq!(o.len(), 4);
            assert_eq!(o[3], "d", "outside the band stays last");
            let mut sorted = o.clone();
            sorted.sort();
            assert_eq!(sorted, ["a", "b", "c", "d"]);
            firsts.insert(o[0].to_string());
            // Deterministic.
            assert_eq!(choose(&r, seed).unwrap().node, o[0]);
        }
        assert_eq!(
            firsts.len(),
            3,
            "the first attempt spreads over the whole band"
        );
        assert!(choose(&[], 1).is_none());
    }
}
