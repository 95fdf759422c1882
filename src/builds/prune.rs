//! Pruning: retention (`retention.rs`, pure) applied to the store over the
//! products this node has recipes for, never while this node publishes,
//! postponed while some node's environments are unknown; and the image GC
//! that untags unpublished `shoal/*` images from this node's engine.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use tracing::{debug, info};

use super::retention::{self, ManifestEntry, Step};
use super::{recipe, BuildError, BuildStatus, Builds};
use crate::model::EnvStatus;
use crate::routing::Cluster;
use crate::store::{ImageRef, Store, StoreError};

impl Builds {
    /// Images the environments of the cluster use, or `None` when some
    /// node's facts are unknown (then nothing is pruned this time).
    fn in_use(&self, cluster: &Cluster) -> Option<BTreeSet<ImageRef>> {
        let mut used: BTreeSet<ImageRef> = self
            .envs
            .list()
            .into_iter()
            .filter(|e| !matches!(e.status, EnvStatus::Failed | EnvStatus::Deleted))
            .map(|e| e.image)
            .collect();
        for n in cluster.view().nodes.iter().filter(|n| !n.is_self) {
            // Dead nodes count too: their containers may still run.
            let f = n.facts.as_ref()?;
            for e in f.envs.values() {
                if e.status == "failed" || e.status == "deleted" {
                    continue;
                }
                if let Ok(r) = e.image.parse() {
                    used.insert(r);
                }
            }
        }
        Some(used)
    }

    /// Runs retention over the products this node has recipes for.
    pub async fn prune(&self, cluster: &Cluster) -> Result<usize, BuildError> {
        let Some(in_use) = self.in_use(cluster) else {
            info!("prune postponed: some node's environments are unknown");
            return Ok(0);
        };
        let Some(recipes) = self.settings.builds.recipes.clone() else {
            return Ok(0);
        };
        let _exclusive = self.maintenance.write().await;
        // Pruning writes: refused at once while the store is unavailable or
        // read-only (a long prune is not cut by a call limit).
        self.store().writable()?;
        let store = self.store().clone();
        let keep = self.settings.builds.keep;
        let grace = self.settings.builds.prune_grace;
        let plan = tokio::task::spawn_blocking(move || -> Result<retention::Plan, StoreError> {
            let products = recipe::products(&recipes).into_iter().collect();
            let input = prune_input(&store, products, keep, in_use, grace)?;
            let plan = retention::plan(&input);
            for step in &plan.steps {
                execute(&store, step)?;
            }
            Ok(plan)
        })
        .await
        .map_err(|e| BuildError::Task(e.to_string()))??;
        for (r, why) in &plan.held {
            debug!(image = %r, reason = ?why, "kept past retention");
        }
        let mut n = 0;
        for step in &plan.steps {
            if let Step::RemoveManifest(r) = step {
                n += 1;
                self.update(&(r.name.clone(), r.build.clone()), |rec| {
                    rec.status = BuildStatus::Pruned;
                });
            }
        }
        Ok(n)
    }

    /// Untags the `shoal/<product>:<build>` images of this engine whose
    /// product the store knows but whose build is no longer published, and
    /// that no environment of this node uses. Other images are never
    /// touched (not even `shoal/` ones of products the store never had).
    pub async fn gc_images(&self) -> Result<usize, BuildError> {
        let tags = self.engine().shoal_tags().await?;
        let used: HashSet<String> = self
            .envs
            .list()
            .into_iter()
            .filter(|e| !matches!(e.status, EnvStatus::Failed | EnvStatus::Deleted))
            .map(|e| e.image.docker_tag())
            .collect();
        let doomed = unpublished_tags(self.store(), tags).await?;
        let mut removed = 0;
        for t in doomed.iter().filter(|t| !used.contains(*t)) {
            if self.engine().untag(t).await? {
                info!(image = %t, "removed an unpublished image from the engine");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// What the retention planner needs, read from the store.
pub fn prune_input(
    store: &Store,
    products: BTreeSet<String>,
    keep: usize,
    in_use: BTreeSet<ImageRef>,
    grace: Duration,
) -> Result<retention::Input, StoreError> {
    let manifests = store
        .manifest_files()?
        .into_iter()
        .map(|f| ManifestEntry {
            valid: f.manifest.as_ref().map(|m| (m.image_ref(), m.published_at)),
            base: f.manifest.as_ref().and_then(|m| m.base.clone()),
            layers: f.layers,
        })
        .collect();
    let now = SystemTime::now();
    let layer_files = store
        .layer_files()?
        .into_iter()
        .map(|(d, t)| (d, now.duration_since(t).unwrap_or_default()))
        .collect();
    Ok(retention::Input {
        manifests,
        layer_files,
        products,
        keep,
        in_use,
        grace,
    })
}

/// Executes one step of a prune plan.
pub fn execute(store: &Store, step: &Step) -> Result<(), StoreError> {
    match step {
        Step::RemoveManifest(r) => {
            if store.remove_manifest(r)? {
                info!(image = %r, product = %r.name, build = %r.build, "pruned");
            }
        }
        Step::RemoveLayer(d) => {
            if store.remove_layer(d)? {
                debug!(layer = %d, "pruned layer file");
            }
        }
    }
    Ok(())
}

/// Of `tags` (`shoal/<product>:<build>` images of the engine), those whose
/// product the store knows but whose build it no longer has. One bounded
/// store call (`Store::call`): a hung or unavailable store is an error,
/// never a wait.
pub async fn unpublished_tags(store: &Store, tags: Vec<String>) -> Result<Vec<String>, StoreError> {
    store
        .call(move |store| {
            let products: HashSet<String> = store.products()?.into_iter().collect();
            Ok(tags
                .into_iter()
                .filter(|t| {
                    let Some(r) = t
                        .strip_prefix("shoal/")
                        .and_then(|r| r.parse::<ImageRef>().ok())
                    else {
                        return false;
                    };
                    products.contains(&r.name)
                        && matches!(store.get(&r), Err(StoreError::NotFound(_)))
                })
                .collect())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Manifest, PublishHint};

    #[tokio::test]
    async fn unpublished_tags_reads_the_store_once_and_never_waits_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        publish(&store, "erp:2", &[b"a"], None);
        let tags = vec![
            "shoal/erp:1".to_string(),   // unpublished build of a known product
            "shoal/erp:2".to_string(),   // published
            "shoal/other:1".to_string(), // a product the store never had
            "erp:1".to_string(),         // not a shoal tag
        ];
        assert_eq!(
            unpublished_tags(&store, tags.clone()).await.unwrap(),
            vec!["shoal/erp:1".to_string()]
        );
        // A store that stopped answering: refused at once, nothing untagged.
        store.not_answering(std::time::Duration::from_secs(10));
        assert!(matches!(
            unpublished_tags(&store, tags).await,
            Err(StoreError::Unavailable { .. })
        ));
    }

    /// A tiny image published straight into a store (no engine): one
    /// layer tar per entry of `layers`.
    fn publish(store: &Store, r: &str, layers: &[&[u8]], base: Option<&str>) -> Manifest {
        let tars: Vec<Vec<u8>> = layers
            .iter()
            .map(|content| {
                let mut b = tar::Builder::new(Vec::new());
                let mut h = tar::Header::new_gnu();
                h.set_size(content.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, "f", *content).unwrap();
                b.into_inner().unwrap()
            })
            .collect();
        let config = crate::store::tests::config_for(&tars, "1GiB");
        let save = crate::store::tests::oci_save(&config, &tars, "x:1");
        std::thread::sleep(Duration::from_millis(5));
        store
            .publish_derived(
                &save[..],
                &r.parse().unwrap(),
                &PublishHint::default(),
                base.map(|b| b.parse().unwrap()),
            )
            .unwrap()
            .0
    }

    /// Retention against a real store directory, with a crash after every
    /// possible step: the rerun finishes the job, and at every point each
    /// manifest still present has all its layer files.
    #[test]
    fn prune_survives_a_crash_at_any_step() {
        let run = |crash_after: Option<usize>| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            publish(&store, "db:1", &[b"db-base", b"db-1"], None);
            publish(&store, "db:2", &[b"db-base", b"db-2"], None);
            publish(&store, "db:3", &[b"db-base", b"db-3"], None);
            publish(
                &store,
                "app:1",
                &[b"db-base", b"db-1", b"app-1"],
                Some("db:1"),
            );
            publish(
                &store,
                "app:2",
                &[b"db-base", b"db-3", b"app-2"],
                Some("db:3"),
            );
            publish(
                &store,
                "app:3",
                &[b"db-base", b"db-3", b"app-3"],
                Some("db:3"),
            );
            let products: BTreeSet<String> = ["db".into(), "app".into()].into();
            let in_use: BTreeSet<ImageRef> = ["app:1".parse().unwrap()].into();
            let input = || {
                prune_input(&store, products.clone(), 1, in_use.clone(), Duration::ZERO).unwrap()
            };
            let plan = retention::plan(&input());
            let steps = match crash_after {
                Some(n) => &plan.steps[..n.min(plan.steps.len())],
                None => &plan.steps[..],
            };
            for s in steps {
                execute(&store, s).unwrap();
                for f in store.manifest_files().unwrap() {
                    for l in f.layers.unwrap() {
                        assert!(store.layer_path(&l).exists(), "{crash_after:?}: {s:?}");
                    }
                }
            }
            // The rerun.
            for s in &retention::plan(&input()).steps {
                execute(&store, s).unwrap();
            }
            assert!(retention::plan(&input()).steps.is_empty());
            let mut left: Vec<String> = store
                .list()
                .unwrap()
                .iter()
                .map(|m| m.image_ref().to_string())
                .collect();
            left.sort();
            let layers = store.layer_files().unwrap().len();
            (plan.steps.len(), left, layers)
        };
        let (n, left, layers) = run(None);
        // app:3 newest, app:1 in use; their bases db:3 and db:1 stay.
        assert_eq!(left, ["app:1", "app:3", "db:1", "db:3"]);
        // db-base, db-1, db-3, app-1, app-3.
        assert_eq!(layers, 5);
        assert_eq!(
            n, 4,
            "two manifests (db:2, app:2) and two layers (db-2, app-2)"
        );
        for cut in 0..=n {
            assert_eq!(
                run(Some(cut)),
                (n, left.clone(), layers),
                "crash after {cut} steps"
            );
        }
    }
}
