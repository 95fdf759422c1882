//! Which published builds to prune, and which layer files go with them.
//! Pure: [`plan`] takes what the store holds and what the cluster uses and
//! returns the steps; `builds/mod.rs` executes them.
//!
//! Rules:
//! - Per product in scope, the newest `keep` valid builds (by
//!   `published_at`) are kept; so is every build a live environment uses
//!   anywhere in the cluster, and, transitively, the base of every kept
//!   build.
//! - Manifests are removed first, then the layer files that no remaining
//!   manifest names. A manifest that does not validate is never removed and
//!   its layers count as used; one whose layer list cannot even be read
//!   blocks layer removal altogether.
//! - Layer files younger than `grace` stay (a publish on another node may
//!   be about to name them).
//!
//! Crash safety: the plan is a function of the store's state, and removing
//! a manifest never changes which layers the remaining ones name. A rerun
//! after a crash halfway therefore plans the rest of the same job, and no
//! plan ever names a layer a kept manifest uses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::archive::Digest;
use crate::store::ImageRef;

/// A manifest file, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The build it publishes and when, if the manifest is valid; `None`
    /// for a manifest that does not validate (never removed).
    pub valid: Option<(ImageRef, OffsetDateTime)>,
    /// Its recorded base build.
    pub base: Option<ImageRef>,
    /// The layers it names; `None` when unreadable.
    pub layers: Option<Vec<Digest>>,
}

/// What the planner needs to know.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub manifests: Vec<ManifestEntry>,
    /// Every layer file with its age.
    pub layer_files: Vec<(Digest, Duration)>,
    /// Products whose builds may be pruned.
    pub products: BTreeSet<String>,
    /// Builds kept per product.
    pub keep: usize,
    /// Builds used by environments anywhere in the cluster.
    pub in_use: BTreeSet<ImageRef>,
    pub grace: Duration,
}

/// One step of a prune, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Step {
    RemoveManifest(ImageRef),
    RemoveLayer(Digest),
}

/// Why a build beyond the newest `keep` stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Held {
    InUse,
    BaseOf(ImageRef),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Manifest removals first, then layer removals.
    pub steps: Vec<Step>,
    /// Builds past the newest `keep` that stay, and why.
    pub held: BTreeMap<ImageRef, Held>,
    /// Some manifest's layer list could not be read: no layer is removed.
    pub layers_blocked: bool,
}

pub fn plan(input: &Input) -> Plan {
    let mut by_product: BTreeMap<&str, Vec<(&ImageRef, OffsetDateTime)>> = BTreeMap::new();
    let mut bases: BTreeMap<&ImageRef, &ImageRef> = BTreeMap::new();
    for m in &input.manifests {
        if let Some((r, at)) = &m.valid {
            by_product.entry(&r.name).or_default().push((r, *at));
            if let Some(b) = &m.base {
                bases.insert(r, b);
            }
        }
    }
    let mut kept: BTreeSet<&ImageRef> = BTreeSet::new();
    let mut candidates: BTreeSet<&ImageRef> = BTreeSet::new();
    for (product, mut builds) in by_product {
        if !input.products.contains(product) {
            kept.extend(builds.iter().map(|(r, _)| *r));
            continue;
        }
        // Newest first; equal times by build id, highest first, so the
        // order is total and the plan deterministic.
        builds.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.build.cmp(&a.0.build)));
        for (i, (r, _)) in builds.iter().enumerate() {
            if i < input.keep {
                kept.insert(r);
            } else {
                candidates.insert(r);
            }
        }
    }
    let mut held = BTreeMap::new();
    for r in &candidates {
        if input.in_use.contains(*r) {
            held.insert((*r).clone(), Held::InUse);
        }
    }
    kept.extend(candidates.iter().filter(|r| held.contains_key(**r)));
    // Bases of kept builds, transitively (a fixpoint: chains are short).
    loop {
        let mut added = false;
        for r in kept.clone() {
            if let Some(b) = bases.get(r) {
                if candidates.contains(*b) && kept.insert(b) {
                    held.insert((*b).clone(), Held::BaseOf(r.clone()));
                    added = true;
                }
            }
        }
        if !added {
            break;
        }
    }
    let removed: BTreeSet<&ImageRef> = candidates.difference(&kept).copied().collect();
    let mut steps: Vec<Step> = removed
        .iter()
        .map(|r| Step::RemoveManifest((*r).clone()))
        .collect();

    let mut used: BTreeSet<Digest> = BTreeSet::new();
    let mut layers_blocked = false;
    for m in &input.manifests {
        if m.valid.as_ref().is_some_and(|(r, _)| removed.contains(r)) {
            continue;
        }
        match &m.layers {
            Some(l) => used.extend(l.iter().copied()),
            None => layers_blocked = true,
        }
    }
    if !layers_blocked {
        let mut gone: Vec<Digest> = input
            .layer_files
            .iter()
            .filter(|(d, age)| !used.contains(d) && *age >= input.grace)
            .map(|(d, _)| *d)
            .collect();
        gone.sort();
        gone.dedup();
        steps.extend(gone.into_iter().map(Step::RemoveLayer));
    }
    Plan {
        steps,
        held,
        layers_blocked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> ImageRef {
        s.parse().unwrap()
    }

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).unwrap()
    }

    fn m(image: &str, secs: i64, layers: &[u8], base: Option<&str>) -> ManifestEntry {
        ManifestEntry {
            valid: Some((r(image), at(secs))),
            base: base.map(r),
            layers: Some(layers.iter().map(|n| d(*n)).collect()),
        }
    }

    fn input(manifests: Vec<ManifestEntry>, keep: usize) -> Input {
        let mut files: Vec<(Digest, Duration)> = manifests
            .iter()
            .flat_map(|m| m.layers.clone().unwrap_or_default())
            .map(|d| (d, Duration::from_secs(3600)))
            .collect();
        files.sort();
        files.dedup();
        let products = manifests
            .iter()
            .filter_map(|m| m.valid.as_ref().map(|(r, _)| r.name.clone()))
            .collect();
        Input {
            manifests,
            layer_files: files,
            products,
            keep,
            in_use: BTreeSet::new(),
            grace: Duration::from_secs(600),
        }
    }

    fn removed(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::RemoveManifest(r) => r.to_string(),
                Step::RemoveLayer(l) => format!("layer {}", &l.hex()[..6]),
            })
            .collect()
    }

    fn layer(n: u8) -> String {
        format!("layer {}", &d(n).hex()[..6])
    }

    #[test]
    fn keeps_newest_per_product_and_drops_unshared_layers() {
        // app builds share layer 1 (a base layer); each has its own too.
        let i = input(
            vec![
                m("app:1", 1, &[1, 11], None),
                m("app:2", 2, &[1, 12], None),
                m("app:3", 3, &[1, 13], None),
                m("db:1", 0, &[2], None),
            ],
            2,
        );
        let p = plan(&i);
        assert_eq!(removed(&p), ["app:1".to_string(), layer(11)]);
        assert!(p.held.is_empty());
    }

    #[test]
    fn in_use_and_bases_are_held() {
        let mut i = input(
            vec![
                m("db:1", 1, &[1], None),
                m("db:2", 2, &[2], None),
                m("db:3", 3, &[3], None),
                m("app:1", 4, &[1, 10], Some("db:1")),
                m("app:2", 5, &[2, 20], Some("db:2")),
                m("app:3", 6, &[3, 30], Some("db:3")),
            ],
            1,
        );
        i.in_use.insert(r("app:2"));
        let p = plan(&i);
        // app:2 is used, so its base db:2 stays; app:1 and db:1 go.
        let mut layers = vec![layer(1), layer(10)];
        layers.sort(); // layer steps come in digest order
        let mut want = vec!["app:1".to_string(), "db:1".into()];
        want.extend(layers);
        assert_eq!(removed(&p), want);
        assert_eq!(p.held[&r("app:2")], Held::InUse);
        assert_eq!(p.held[&r("db:2")], Held::BaseOf(r("app:2")));
    }

    #[test]
    fn out_of_scope_products_and_invalid_manifests_stay() {
        let mut i = input(
            vec![
                m("app:1", 1, &[1], None),
                m("app:2", 2, &[2], None),
                m("other:1", 0, &[3], None),
                m("other:2", 1, &[4], None),
                ManifestEntry {
                    valid: None,
                    base: None,
                    layers: Some(vec![d(1)]),
                },
            ],
            1,
        );
        i.products = ["app".to_string()].into();
        // An orphan layer file, too young to go.
        i.layer_files.push((d(99), Duration::from_secs(5)));
        let p = plan(&i);
        // app:1 goes, but its layer is named by an invalid manifest.
        assert_eq!(removed(&p), ["app:1"]);

        // A manifest whose layers cannot be read blocks layer removal.
        i.manifests.push(ManifestEntry {
            valid: None,
            base: None,
            layers: None,
        });
        i.manifests[4].layers = Some(vec![]);
        let p = plan(&i);
        assert!(p.layers_blocked);
        assert_eq!(removed(&p), ["app:1"]);
    }

    #[test]
    fn grace_protects_young_layer_files() {
        let mut i = input(
            vec![m("app:1", 1, &[1], None), m("app:2", 2, &[2], None)],
            1,
        );
        i.layer_files[0].1 = Duration::from_secs(10);
        assert_eq!(removed(&plan(&i)), ["app:1"]);
        i.grace = Duration::ZERO;
        assert_eq!(removed(&plan(&i)), ["app:1".to_string(), layer(1)]);
    }

    /// Applies steps to a model store: manifests and layer files.
    fn apply(i: &mut Input, steps: &[Step]) {
        for s in steps {
            match s {
                Step::RemoveManifest(r) => i
                    .manifests
                    .retain(|m| m.valid.as_ref().map(|(x, _)| x) != Some(r)),
                Step::RemoveLayer(l) => i.layer_files.retain(|(x, _)| x != l),
            }
        }
    }

    fn arb_input() -> impl Strategy<Value = (Input, usize)> {
        // Up to 12 builds over 3 products, each naming 1-4 of 10 layers,
        // some derived from an earlier build; some in use.
        let build = (
            0..3u8,
            prop::collection::vec(0..10u8, 1..4),
            any::<bool>(),
            any::<bool>(),
        );
        (prop::collection::vec(build, 1..12), 1..4usize, 0..40usize).prop_map(
            |(builds, keep, cut)| {
                let mut ms: Vec<ManifestEntry> = Vec::new();
                let mut in_use = BTreeSet::new();
                for (i, (p, layers, derived, used)) in builds.into_iter().enumerate() {
                    let image = format!("p{p}:{i}");
                    let base = if derived && i > 0 {
                        ms[i - 1].valid.as_ref().map(|(r, _)| r.to_string())
                    } else {
                        None
                    };
                    let mut e = m(&image, i as i64, &layers, base.as_deref());
                    if let (Some(b), Some(l)) = (&base, e.layers.as_mut()) {
                        // A derived build names its base's layers too.
                        let bl = ms
                            .iter()
                            .find(|x| x.valid.as_ref().unwrap().0.to_string() == *b);
                        l.splice(0..0, bl.unwrap().layers.clone().unwrap());
                    }
                    if used {
                        in_use.insert(r(&image));
                    }
                    ms.push(e);
                }
                let mut i = input(ms, keep);
                i.in_use = in_use;
                i.grace = Duration::ZERO;
                (i, cut)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A prune that stops after any step, then reruns, ends where an
        /// uninterrupted prune ends; at no point is a layer of a manifest
        /// still present missing; kept builds are exactly the rules'.
        #[test]
        fn crash_halfway_then_rerun((input, cut) in arb_input()) {
            let full = plan(&input);
            let mut whole = input.clone();
            apply(&mut whole, &full.steps);

            let mut crashed = input.clone();
            let cut = cut.min(full.steps.len());
            for s in &full.steps[..cut] {
                apply(&mut crashed, std::slice::from_ref(s));
                let files: BTreeSet<Digest> = crashed.layer_files.iter().map(|(d, _)| *d).collect();
                for m in &crashed.manifests {
                    for l in m.layers.as_ref().unwrap() {
                        prop_assert!(files.contains(l), "a present manifest lost a layer");
                    }
                }
            }
            let rest = plan(&crashed);
            apply(&mut crashed, &rest.steps);
            prop_assert_eq!(&crashed.manifests, &whole.manifests);
            prop_assert_eq!(&crashed.layer_files, &whole.layer_files);
            // Idempotent: nothing is left to do.
            prop_assert!(plan(&whole).steps.is_empty());

            // Every in-use build, and the base of every kept build, stays.
            let left: BTreeSet<ImageRef> = whole.manifests.iter().filter_map(|m| m.valid.clone().map(|v| v.0)).collect();
            for u in &input.in_use {
                prop_assert!(left.contains(u));
            }
            for m in &whole.manifests {
                if let Some(b) = &m.base {
                    prop_assert!(left.contains(b), "base {} of a kept build was pruned", b);
                }
            }
            // Per product, at least min(keep, count) builds remain.
            for p in 0..3u8 {
                let before = input.manifests.iter().filter(|m| m.valid.as_ref().unwrap().0.name == format!("p{p}")).count();
                let after = left.iter().filter(|r| r.name == format!("p{p}")).count();
                prop_assert!(after >= before.min(input.keep));
            }
        }
    }
}
