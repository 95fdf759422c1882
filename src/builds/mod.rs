//! The build watcher (the seed's back end): on a node with role `build`,
//! every complete build in the drop directory is built with its product's
//! recipe, published to the store as `<product>:<build-id>`, and old builds
//! are pruned. On every node, the image GC worker removes `shoal/*` images
//! that are no longer published from the node's own engine.
//!
//! Workers (spawned by [`Builds::spawn`], ended with the daemon):
//! - watcher: scans the drop directory on file system notifications and
//!   every `build_rescan` (network file systems send no notifications), and
//!   queues new complete builds in order of arrival (marker time);
//! - runner: takes queued builds one at a time (`build_concurrency`),
//!   builds, optionally runs the privileged install step, publishes; after
//!   each build, and on every rescan tick, runs a prune;
//! - image GC (every node): untags unpublished `shoal/*` images.
//!
//! State: one `parking_lot::Mutex` over the records and the queue, never held
//! across an `.await`. Records are persisted one JSON file per build under
//! `<data_dir>/builds/<product>/<build>.json` (temp + fsync + rename), the
//! log beside it (`.log`). A build that was `queued` or `building` when the
//! daemon stopped is queued again on start (at most [`MAX_ATTEMPTS`] times,
//! then `failed`): the drop directory still holds it and a build has no
//! side effect until its publish, which is atomic.
//!
//! On one node, publishes and prunes never overlap (`maintenance` lock), so
//! a prune never takes a layer a publish of this node is about to name;
//! other nodes sharing the store are covered by `prune_grace`.
//!
//! Here: the [`Builds`] handle, its workers and the scan that queues
//! builds; `records.rs` has the build records and logs, `run.rs` one
//! build run, `prune.rs` retention and the image GC, `peers.rs` the
//! cluster-wide build list.

pub mod context;
mod peers;
mod prune;
pub mod recipe;
mod records;
pub mod retention;
mod run;
pub mod watch;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::docker::{DockerError, Engine};
use crate::envs::Envs;
use crate::routing::Cluster;
use crate::store::{ImageRef, Store, StoreError};
use recipe::RecipeError;

pub use prune::{execute, prune_input, unpublished_tags};
use records::read_records;
pub use records::{BuildRecord, BuildStatus, Timings, RECORD_FORMAT};
pub use run::{installer_name, work_tag};

/// A build interrupted this many times (daemon stopped mid-build) fails.
pub const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transfer(#[from] crate::transfer::TransferError),
    #[error("docker build failed (see the build log)")]
    DockerBuild,
    #[error("base product `{0}` has no published build")]
    NoBase(String),
    #[error("the privileged installer exited with code {0}")]
    Installer(i64),
    #[error("the build took longer than {0}")]
    Timeout(String),
    #[error("build context: {0}")]
    Context(std::io::Error),
    #[error("build records {path}: {source}")]
    Records {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the built image {0} is missing from the engine")]
    Missing(String),
    #[error("build task failed: {0}")]
    Task(String),
}
type Key = (String, String);

#[derive(Default)]
struct State {
    records: BTreeMap<Key, BuildRecord>,
    queue: VecDeque<Key>,
    /// Refused paths already reported, so each is logged once.
    reported: HashSet<PathBuf>,
    /// Complete builds found already published (by another node).
    skipped: HashSet<Key>,
}

/// The build watcher of this node, and its view of the others'.
pub struct Builds {
    settings: Settings,
    envs: Arc<Envs>,
    records_dir: PathBuf,
    state: Mutex<State>,
    /// Woken when the queue gains a build.
    wake: Notify,
    /// Publishes (read) and prunes (write) of this node never overlap.
    maintenance: RwLock<()>,
    /// Fault injection (tests): called with the build's key as its run
    /// starts. Held only to clone the hook out.
    fault_in_run: Mutex<Option<BuildHook>>,
}

/// A fault-injection hook on a build run: `(product, build)`.
pub type BuildHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn ms(d: Duration) -> Option<u64> {
    Some(d.as_millis() as u64)
}
impl Builds {
    /// Loads the records of earlier runs and queues interrupted builds.
    pub fn open(envs: Arc<Envs>) -> Result<Arc<Builds>, BuildError> {
        let settings = envs.settings().clone();
        let records_dir = settings.data_dir.join("builds");
        std::fs::create_dir_all(&records_dir).map_err(|source| BuildError::Records {
            path: records_dir.clone(),
            source,
        })?;
        let mut state = State::default();
        let mut requeue = Vec::new();
        for rec in read_records(&records_dir) {
            let key = (rec.product.clone(), rec.build.clone());
            let mut rec = rec;
            if matches!(rec.status, BuildStatus::Queued | BuildStatus::Building) {
                if rec.attempts >= MAX_ATTEMPTS {
                    rec.status = BuildStatus::Failed;
                    rec.error = Some(format!(
                        "interrupted {} times by a stop of the daemon",
                        rec.attempts
                    ));
                    rec.finished_at = Some(now());
                } else {
                    info!(product = %rec.product, build = %rec.build, "re-queueing a build interrupted by a stop");
                    rec.status = BuildStatus::Queued;
                    requeue.push((rec.detected_at, key.clone()));
                }
            }
            state.records.insert(key, rec);
        }
        requeue.sort();
        state.queue = requeue.into_iter().map(|(_, k)| k).collect();
        let me = Builds {
            settings,
            envs,
            records_dir,
            state: Mutex::new(state),
            wake: Notify::new(),
            maintenance: RwLock::new(()),
            fault_in_run: Mutex::new(None),
        };
        let records: Vec<BuildRecord> = me.state.lock().records.values().cloned().collect();
        for r in records
            .iter()
            .filter(|r| r.status != BuildStatus::Published)
        {
            me.persist(r);
        }
        Ok(Arc::new(me))
    }

    fn engine(&self) -> &Engine {
        self.envs.engine()
    }

    fn store(&self) -> &Store {
        self.envs.store()
    }

    /// Whether this node watches a drop directory: role `build`, with both
    /// `drop` and `recipes` configured.
    pub fn is_watching(&self) -> bool {
        self.settings.roles.iter().any(|r| r == "build")
            && self.settings.builds.drop.is_some()
            && self.settings.builds.recipes.is_some()
    }
    /// Starts the workers: the watcher and runner on a build node, the
    /// image GC everywhere.
    pub fn spawn(
        self: &Arc<Self>,
        cluster: Arc<Cluster>,
    ) -> Vec<(&'static str, tokio::task::JoinHandle<()>)> {
        let mut tasks = Vec::new();
        // Image GC: keeps the engine's disk from filling with builds that
        // are no longer published.
        {
            let me = self.clone();
            tasks.push((
                "image-gc",
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(me.settings.builds.image_gc_interval);
                    loop {
                        tick.tick().await;
                        if let Err(e) = me.gc_images().await {
                            warn!(error = %e, "image gc");
                        }
                    }
                }),
            ));
        }
        if !self.is_watching() {
            return tasks;
        }
        let me = self.clone();
        let cl = cluster.clone();
        tasks.push((
            "build-watcher",
            tokio::spawn(async move { me.watch_loop(cl).await }),
        ));
        let me = self.clone();
        tasks.push((
            "build-queue",
            tokio::spawn(async move { me.run_loop(cluster).await }),
        ));
        tasks
    }

    /// Scans on notifications and every `build_rescan`; prunes on every
    /// rescan tick (builds in use become prunable when their environments
    /// go, with no event to say so).
    async fn watch_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
        let drop = self.settings.builds.drop.clone().expect("watching");
        let rescan = self.settings.builds.rescan;
        info!(drop = %drop.display(), rescan_secs = rescan.as_secs(), "build watcher started");
        let mut watcher: Option<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>)> =
            None;
        let mut last_prune = Instant::now();
        loop {
            if watcher.is_none() {
                match watch::watcher(&drop) {
                    Ok(w) => watcher = Some(w),
                    Err(e) => {
                        debug!(drop = %drop.display(), error = %e, "no file notifications; rescanning only")
                    }
                }
            }
            self.scan_now().await;
            if last_prune.elapsed() >= rescan {
                last_prune = Instant::now();
                if let Err(e) = self.prune(&cluster).await {
                    warn!(error = %e, "prune");
                }
            }
            let sleep = tokio::time::sleep(rescan);
            match watcher.as_mut() {
                Some((_, rx)) => {
                    tokio::select! {
                        got = rx.recv() => {
                            if got.is_none() {
                                watcher = None;
                            }
                            // Let a burst of events settle into one scan.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if let Some((_, rx)) = watcher.as_mut() {
                                while rx.try_recv().is_ok() {}
                            }
                        }
                        _ = sleep => {}
                    }
                }
                None => sleep.await,
            }
        }
    }

    /// One scan of the drop directory: queues new complete builds, records
    /// refused ones. Returns how many were queued.
    pub async fn scan_now(&self) -> usize {
        let Some(drop) = self.settings.builds.drop.clone() else {
            return 0;
        };
        let marker = self.settings.builds.marker.clone();
        let scanned = tokio::task::spawn_blocking(move || watch::scan(&drop, &marker)).await;
        let scanned = match scanned {
            Ok(Ok(scan)) => {
                // Which builds are published already: a store read, bounded
                // (`Store::call`); with the store unavailable the scan waits
                // for the next round rather than queue builds it cannot check.
                let images: Vec<ImageRef> = scan.found.iter().map(|f| f.image.clone()).collect();
                match self
                    .store()
                    .call(move |st| {
                        Ok(images
                            .iter()
                            .map(|i| st.manifest_path(i).exists())
                            .collect())
                    })
                    .await
                {
                    Ok(published) => Ok(Ok((scan, published))),
                    Err(e) => {
                        warn!(error = %e, "drop directory scan skipped: cannot read the store");
                        return 0;
                    }
                }
            }
            Ok(Err(e)) => Ok(Err(e)),
            Err(e) => Err(e),
        };
        let (scan, published): (_, Vec<bool>) = match scanned {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(error = %e, "scanning the drop directory");
                return 0;
            }
            Err(e) => {
                warn!(error = %e, "scan task");
                return 0;
            }
        };
        let detected = now();
        let mut new = Vec::new();
        {
            let mut st = self.state.lock();
            for r in scan.refused {
                if !st.reported.insert(r.path.clone()) {
                    continue;
                }
                warn!(product = %r.product, build = %r.build, path = %r.path.display(), reason = %r.reason, "build refused");
                let rec = BuildRecord {
                    format: RECORD_FORMAT,
                    product: r.product.clone(),
                    build: r.build.clone(),
                    image: None,
                    node: self.settings.name.clone(),
                    status: BuildStatus::Failed,
                    error: Some(format!("refused: {}", r.reason)),
                    base: None,
                    dir: r.path,
                    detected_at: detected,
                    started_at: None,
                    finished_at: Some(detected),
                    timings: Timings::default(),
                    layers_added: None,
                    bytes_added: None,
                    attempts: 0,
                };
                // Not persisted: the names may not be safe as file names,
                // and the next start's scan reports it again.
                st.records.insert((r.product, r.build), rec);
            }
            for (f, done) in scan.found.into_iter().zip(published) {
                let key = (f.image.name.clone(), f.image.build.clone());
                if st.records.contains_key(&key) || st.skipped.contains(&key) {
                    continue;
                }
                if done {
                    info!(product = %key.0, build = %key.1, "already published: not building it again");
                    st.skipped.insert(key);
                    continue;
                }
                let detect = SystemTime::now()
                    .duration_since(f.marker_time)
                    .unwrap_or_default();
                let rec = BuildRecord {
                    format: RECORD_FORMAT,
                    product: key.0.clone(),
                    build: key.1.clone(),
                    image: Some(f.image.to_string()),
                    node: self.settings.name.clone(),
                    status: BuildStatus::Queued,
                    error: None,
                    base: None,
                    dir: f.dir,
                    detected_at: detected,
                    started_at: None,
                    finished_at: None,
                    timings: Timings {
                        detect_ms: ms(detect),
                        ..Default::default()
                    },
                    layers_added: None,
                    bytes_added: None,
                    attempts: 0,
                };
                info!(product = %key.0, build = %key.1, detect_ms = detect.as_millis() as u64, "build queued");
                st.records.insert(key.clone(), rec.clone());
                st.queue.push_back(key);
                new.push(rec);
            }
        }
        for rec in &new {
            self.persist(rec);
            self.wake.notify_one();
        }
        new.len()
    }
    /// Installs a fault-injection hook on build runs (tests).
    pub fn set_fault_in_run(&self, hook: Option<BuildHook>) {
        *self.fault_in_run.lock() = hook;
    }
}
