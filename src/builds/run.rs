//! One build run: the recipe loaded, the base build loaded into the engine
//! when it lacks it, `docker build`, the optional privileged install step
//! and its commit, the publish into the store; the runner worker that takes
//! queued builds `build_concurrency` at once, each run supervised so a
//! panic fails the build instead of leaving it `building`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use super::recipe::{self, Recipe};
use super::records::Log;
use super::{context, ms, now, BuildError, BuildStatus, Builds, Key, Timings};
use crate::archive::held_prefix;
use crate::docker::DockerError;
use crate::routing::Cluster;
use crate::store::{ImageRef, Manifest, PublishHint};

impl Builds {
    /// Takes queued builds in order, `build_concurrency` at once.
    pub(super) async fn run_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
        let slots = Arc::new(Semaphore::new(self.settings.builds.concurrency));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let key = loop {
                let next = self.state.lock().queue.pop_front();
                match next {
                    Some(k) => break k,
                    None => self.wake.notified().await,
                }
            };
            let me = self.clone();
            let cl = cluster.clone();
            tokio::spawn(async move {
                me.run_supervised(key).await;
                drop(permit);
                if let Err(e) = me.prune(&cl).await {
                    warn!(error = %e, "prune");
                }
            });
        }
    }
    /// [`Builds::run_one`], supervised: a panic in it fails the build with
    /// the panic's message instead of leaving it `building` forever (its
    /// slot is freed by the caller either way).
    async fn run_supervised(&self, key: Key) {
        let run = std::panic::AssertUnwindSafe(self.run_one(key.clone()));
        if let Err(panic) = futures::FutureExt::catch_unwind(run).await {
            let msg = crate::workers::panic_message(&*panic);
            error!(product = %key.0, build = %key.1, error = %msg, "build run panicked");
            self.update(&key, |r| {
                r.status = BuildStatus::Failed;
                r.error = Some(format!("internal error: {msg}"));
                r.finished_at = Some(now());
            });
        }
    }

    /// Builds, installs and publishes one queued build, and records how it
    /// went.
    async fn run_one(&self, key: Key) {
        let Some(rec) = self.update(&key, |r| {
            r.status = BuildStatus::Building;
            r.started_at = Some(now());
            r.attempts += 1;
            r.error = None;
            r.timings.queued_ms = ms((now() - r.detected_at).try_into().unwrap_or_default());
        }) else {
            return;
        };
        let hook = self.fault_in_run.lock().clone();
        if let Some(hook) = hook {
            hook(&key.0, &key.1);
        }
        let Some(image) = rec.image.as_ref().and_then(|i| i.parse::<ImageRef>().ok()) else {
            return;
        };
        info!(product = %image.name, build = %image.build, image = %image, "build started");
        let mut log = Log::default();
        let mut timings = rec.timings.clone();
        let recipes = self.settings.builds.recipes.clone().expect("watching");
        let product = image.name.clone();
        let recipe = tokio::task::spawn_blocking(move || recipe::load(&recipes, &product))
            .await
            .map_err(|e| BuildError::Task(e.to_string()))
            .and_then(|r| r.map_err(BuildError::from));
        let result = match recipe {
            Err(e) => Err(e),
            Ok(recipe) => {
                let limit = recipe.timeout.unwrap_or(self.settings.builds.timeout);
                match tokio::time::timeout(
                    limit,
                    self.build_steps(&image, &rec.dir, &recipe, &mut log, &mut timings),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(BuildError::Timeout(crate::units::format_duration(limit))),
                }
            }
        };
        let work = work_tag(&image);
        if result.is_err() {
            // Whatever a failed or timed-out build left: its installer
            // container and its work tag. Nothing else is shoal's.
            let _ = self
                .engine()
                .remove_container(&installer_name(&image))
                .await;
        }
        let _ = self.engine().remove_image(&work).await;
        match result {
            Ok(done) => {
                info!(
                    product = %image.name, build = %image.build, image = %image,
                    layers_added = done.layers_added, bytes_added = done.bytes_added,
                    "build published"
                );
                log.push(&format!(
                    "published {image}: {} layer files ({} bytes) added to the store",
                    done.layers_added, done.bytes_added
                ));
                // The log first: whoever sees the record finished finds it.
                self.write_log(&rec, &log);
                self.update(&key, |r| {
                    r.status = BuildStatus::Published;
                    r.finished_at = Some(now());
                    r.timings = timings;
                    r.base = done.base.map(|b| b.to_string());
                    r.layers_added = Some(done.layers_added);
                    r.bytes_added = Some(done.bytes_added);
                });
            }
            Err(e) => {
                warn!(product = %image.name, build = %image.build, image = %image, error = %e, "build failed");
                log.push(&format!("build failed: {e}"));
                self.write_log(&rec, &log);
                self.update(&key, |r| {
                    r.status = BuildStatus::Failed;
                    r.finished_at = Some(now());
                    r.timings = timings;
                    r.error = Some(e.to_string());
                });
            }
        }
    }

    async fn build_steps(
        &self,
        image: &ImageRef,
        dir: &Path,
        recipe: &Recipe,
        log: &mut Log,
        t: &mut Timings,
    ) -> Result<Done, BuildError> {
        let engine = self.engine();
        let work = work_tag(image);
        let mut base = None;
        let mut base_tag = String::new();
        if let Some(bp) = &recipe.base {
            let started = Instant::now();
            let name = bp.clone();
            // Bounded like every store read (`Store::call`): a hung store
            // fails the build instead of holding the watcher.
            let newest = self
                .store()
                .call(move |st| st.list().map(|l| l.into_iter().find(|m| m.name == name)))
                .await?
                .ok_or_else(|| BuildError::NoBase(bp.clone()))?;
            self.ensure_loaded(&newest, log).await?;
            base_tag = newest.image_ref().docker_tag();
            base = Some(newest.image_ref());
            t.base_ms = ms(started.elapsed());
            log.push(&format!("BASE_IMAGE={base_tag}"));
        }

        let started = Instant::now();
        let (ctx, ctx_task) = context::stream(recipe.dir.clone(), dir.to_path_buf());
        let args = HashMap::from([
            ("PRODUCT".to_string(), image.name.clone()),
            ("BUILD_ID".to_string(), image.build.clone()),
            ("BASE_IMAGE".to_string(), base_tag),
        ]);
        let labels = HashMap::from([("shoal.build".to_string(), image.to_string())]);
        let built = engine.build_stream(ctx, &work, args, labels).await;
        let ctx_res = ctx_task
            .await
            .map_err(|e| BuildError::Task(e.to_string()))?;
        match built {
            Ok(out) => log.push(&out),
            Err(DockerError::Build(out)) => {
                log.push(&out);
                return Err(match ctx_res {
                    Err(e) => BuildError::Context(e),
                    Ok(_) => BuildError::DockerBuild,
                });
            }
            Err(e) => return Err(e.into()),
        }
        t.build_ms = ms(started.elapsed());

        if let Some(step) = &recipe.install {
            let started = Instant::now();
            match &step.capabilities {
                None => log.push(&format!("privileged install: {:?}", step.command)),
                Some(c) => log.push(&format!(
                    "install with capabilities {c:?}: {:?}",
                    step.command
                )),
            }
            let name = installer_name(image);
            engine.remove_container(&name).await?; // a crashed run's leftover
            let id = engine
                .run_privileged(
                    &name,
                    &work,
                    &step.command,
                    &step.env,
                    step.capabilities.as_deref(),
                )
                .await?;
            let res = self.finish_install(&id, image, &work, log).await;
            let _ = engine.remove_container(&id).await;
            res?;
            t.install_ms = ms(started.elapsed());
        }

        let started = Instant::now();
        let img = engine
            .image(&work)
            .await?
            .ok_or_else(|| BuildError::Missing(work.clone()))?;
        let hint = PublishHint {
            diff_ids: img.diff_ids.clone(),
        };
        let (_m, stats) = {
            let _no_prune = self.maintenance.read().await;
            crate::transfer::publish_derived(
                engine,
                self.store(),
                &img.id,
                image,
                hint,
                base.clone(),
            )
            .await?
        };
        // Keep the image in this engine under its shoal tag: environments
        // here and builds derived from it need not load it again.
        let repo = format!("shoal/{}", image.name);
        engine.tag(&img.id, &repo, &image.build).await?;
        t.publish_ms = ms(started.elapsed());
        Ok(Done {
            base,
            layers_added: stats.layers_added,
            bytes_added: stats.bytes_added,
        })
    }

    /// Waits for the installer, keeps its output, commits on success.
    async fn finish_install(
        &self,
        id: &str,
        image: &ImageRef,
        work: &str,
        log: &mut Log,
    ) -> Result<(), BuildError> {
        let engine = self.engine();
        let code = engine.wait_exit(id).await?;
        log.push(&engine.logs_all(id).await);
        log.push(&format!("installer exited with code {code}"));
        if code != 0 {
            return Err(BuildError::Installer(code));
        }
        let like = engine
            .image(work)
            .await?
            .ok_or_else(|| BuildError::Missing(work.to_string()))?;
        let (repo, tag) = work.split_once(':').expect("work tags have a tag");
        let committed = engine.commit_like(id, &like.id, repo, tag).await?;
        info!(image = %image, committed = %committed, "privileged install committed");
        Ok(())
    }

    /// Makes the engine hold `m` under its shoal tag (a base image).
    async fn ensure_loaded(&self, m: &Manifest, log: &mut Log) -> Result<(), BuildError> {
        let engine = self.engine();
        let tag = m.image_ref().docker_tag();
        if let Some(img) = engine.image(&tag).await? {
            if img.id == m.image_id.to_string() {
                return Ok(());
            }
        }
        let held = engine.held_chain_ids().await?;
        let skip = held_prefix(&m.chain_ids(), &held);
        let stats = crate::transfer::load(engine, self.store(), m, skip, Box::new(|_| {})).await?;
        log.push(&format!(
            "loaded base {tag}: {} of {} layers sent",
            stats.layers_sent, stats.layers_total
        ));
        Ok(())
    }
}

/// What a successful build produced.
struct Done {
    base: Option<ImageRef>,
    layers_added: usize,
    bytes_added: u64,
}

/// The engine tag a build is made under until it is published.
pub fn work_tag(r: &ImageRef) -> String {
    format!("shoal-build/{}:{}", r.name, r.build)
}

/// The name of a build's installer container.
pub fn installer_name(r: &ImageRef) -> String {
    format!("shoal-install-{}-{}", r.name, r.build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builds::BuildRecord;
    use crate::builds::RECORD_FORMAT;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_a_build_run_fails_the_build() {
        let tmp = tempfile::tempdir().unwrap();
        let envs = crate::envs::tests::test_envs(tmp.path()).await;
        let builds = Builds::open(envs).unwrap();
        let key = ("app".to_string(), "7".to_string());
        let rec = BuildRecord {
            format: RECORD_FORMAT,
            product: key.0.clone(),
            build: key.1.clone(),
            image: Some("app:7".into()),
            node: "n".into(),
            status: BuildStatus::Queued,
            error: None,
            base: None,
            dir: tmp.path().join("drop/app/7"),
            detected_at: now(),
            started_at: None,
            finished_at: None,
            timings: Default::default(),
            layers_added: None,
            bytes_added: None,
            attempts: 0,
        };
        builds.state.lock().records.insert(key.clone(), rec);
        builds.set_fault_in_run(Some(Arc::new(|_: &str, _: &str| panic!("injected fault"))));
        builds.run_supervised(key.clone()).await;
        let r = builds.state.lock().records[&key].clone();
        assert_eq!(r.status, BuildStatus::Failed, "{r:?}");
        let why = r.error.unwrap_or_default();
        assert!(
            why.contains("internal error") && why.contains("injected fault"),
            "{why}"
        );
        // The record on disk says so too (a restart does not rebuild it
        // as interrupted).
        let again = Builds::open(builds.envs.clone()).unwrap();
        assert_eq!(again.state.lock().records[&key].status, BuildStatus::Failed);
    }
}
