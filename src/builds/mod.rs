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

pub mod context;
pub mod recipe;
pub mod retention;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock, Semaphore};
use tracing::{debug, error, info, warn};

use crate::archive::held_prefix;
use crate::client::Client;
use crate::cluster::Role;
use crate::config::Settings;
use crate::docker::{DockerError, Engine};
use crate::envs::Envs;
use crate::model::EnvStatus;
use crate::routing::Cluster;
use crate::store::{ImageRef, Manifest, PublishHint, Store, StoreError};
use recipe::{Recipe, RecipeError};
use retention::{ManifestEntry, Step};

/// Version of the build record files.
pub const RECORD_FORMAT: u32 = 1;
/// A build interrupted this many times (daemon stopped mid-build) fails.
pub const MAX_ATTEMPTS: u32 = 3;
/// Bytes of build log kept (the end of it).
const LOG_MAX: usize = 1 << 20;
/// How long a call to another node may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

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

/// Where a build stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Found complete, waiting for its turn.
    Queued,
    Building,
    /// In the catalog.
    Published,
    /// Not built; `error` says why, the log has the details.
    Failed,
    /// Was published, removed by retention.
    Pruned,
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Building => "building",
            BuildStatus::Published => "published",
            BuildStatus::Failed => "failed",
            BuildStatus::Pruned => "pruned",
        })
    }
}

/// How long each part of a build took, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From the marker's modification time to the scan that found it.
    pub detect_ms: Option<u64>,
    /// Waiting in the queue.
    pub queued_ms: Option<u64>,
    /// Loading the base image into the engine, when it lacked it.
    pub base_ms: Option<u64>,
    /// `docker build`, context upload included.
    pub build_ms: Option<u64>,
    /// The privileged install step and the commit.
    pub install_ms: Option<u64>,
    /// `docker save` into the store.
    pub publish_ms: Option<u64>,
}

/// One build, as `GET /v1/builds` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub format: u32,
    pub product: String,
    pub build: String,
    /// `product:build`, the image ref it is (or would be) published as;
    /// `None` when the names are not valid ids.
    #[serde(rename = "ref")]
    pub image: Option<String>,
    /// The build node that has it.
    pub node: String,
    pub status: BuildStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The base build it was built FROM.
    pub base: Option<String>,
    /// Its directory in the drop directory.
    pub dir: PathBuf,
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub timings: Timings,
    /// Layer files the publish added to the store, and their bytes.
    pub layers_added: Option<usize>,
    pub bytes_added: Option<u64>,
    /// Builds started (more than 1 after an interrupted one).
    #[serde(default)]
    pub attempts: u32,
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

/// The build log, kept to its last [`LOG_MAX`] bytes.
#[derive(Default)]
struct Log(String);

impl Log {
    fn push(&mut self, s: &str) {
        self.0.push_str(s);
        if !s.ends_with('\n') {
            self.0.push('\n');
        }
        if self.0.len() > LOG_MAX {
            let mut cut = self.0.len() - LOG_MAX;
            while !self.0.is_char_boundary(cut) {
                cut += 1;
            }
            self.0.replace_range(..cut, "[… earlier output dropped]\n");
        }
    }
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

    /// This node's builds, newest first.
    pub fn list(&self) -> Vec<BuildRecord> {
        let mut out: Vec<BuildRecord> = self.state.lock().records.values().cloned().collect();
        sort_records(&mut out);
        out
    }

    /// The log of a build of this node; `None` when this node has no such
    /// build.
    pub fn log(&self, product: &str, build: &str) -> Option<String> {
        let key = (product.to_string(), build.to_string());
        let rec = self.state.lock().records.get(&key).cloned()?;
        let path = self.log_path(&rec)?;
        Some(std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Every build the build nodes know: this node's, and each live build
    /// node's own list. A node that does not answer is left out (logged).
    pub async fn cluster_list(&self, cluster: &Cluster) -> Vec<BuildRecord> {
        let mut out = self.list();
        let calls = build_peers(cluster)
            .into_iter()
            .map(|(name, client)| async move {
                match client.get::<Vec<BuildRecord>>("/v1/builds").await {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(node = %name, error = %e, "build node did not list its builds");
                        Vec::new()
                    }
                }
            });
        for l in crate::routing::fan_out(calls.collect())
            .await
            .into_iter()
            .flatten()
        {
            out.extend(l);
        }
        sort_records(&mut out);
        out
    }

    /// The log of a build, from whichever build node has it.
    pub async fn cluster_log(
        &self,
        cluster: &Cluster,
        product: &str,
        build: &str,
    ) -> Option<String> {
        if let Some(l) = self.log(product, build) {
            return Some(l);
        }
        let path = format!("/v1/builds/{product}/{build}/log");
        let ask = async {
            for (name, client) in build_peers(cluster) {
                match client.send_raw(hyper::Method::GET, &path, None).await {
                    Ok((status, body)) if status.is_success() => {
                        return Some(String::from_utf8_lossy(&body).into_owned())
                    }
                    Ok(_) => {}
                    Err(e) => warn!(node = %name, error = %e, "build node did not answer"),
                }
            }
            None
        };
        // One by one (the first that has it answers), within the fan-out
        // deadline however many build nodes there are.
        tokio::time::timeout(crate::routing::FANOUT_DEADLINE, ask)
            .await
            .ok()
            .flatten()
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

    /// Takes queued builds in order, `build_concurrency` at once.
    async fn run_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
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

    fn update(&self, key: &Key, f: impl FnOnce(&mut BuildRecord)) -> Option<BuildRecord> {
        let rec = {
            let mut st = self.state.lock();
            let rec = st.records.get_mut(key)?;
            f(rec);
            rec.clone()
        };
        self.persist(&rec);
        Some(rec)
    }

    fn record_path(&self, rec: &BuildRecord) -> Option<PathBuf> {
        rec.image.as_ref()?;
        Some(
            self.records_dir
                .join(&rec.product)
                .join(format!("{}.json", rec.build)),
        )
    }

    fn log_path(&self, rec: &BuildRecord) -> Option<PathBuf> {
        self.record_path(rec).map(|p| p.with_extension("log"))
    }

    /// Writes a record (only those with valid ids: their names are safe
    /// path components). A failed write is logged: the record stays in
    /// memory, and the worst case after a restart is a rebuild.
    fn persist(&self, rec: &BuildRecord) {
        let Some(path) = self.record_path(rec) else {
            return;
        };
        let res = std::fs::create_dir_all(path.parent().expect("has a parent")).and_then(|()| {
            crate::envs::write_atomic(&path, &serde_json::to_vec_pretty(rec).expect("serializes"))
        });
        if let Err(e) = res {
            warn!(path = %path.display(), error = %e, "writing a build record");
        }
    }

    fn write_log(&self, rec: &BuildRecord, log: &Log) {
        if let Some(path) = self.log_path(rec) {
            if let Err(e) = crate::envs::write_atomic(&path, log.0.as_bytes()) {
                warn!(path = %path.display(), error = %e, "writing a build log");
            }
        }
    }

    /// Installs a fault-injection hook on build runs (tests).
    pub fn set_fault_in_run(&self, hook: Option<BuildHook>) {
        *self.fault_in_run.lock() = hook;
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

fn sort_records(v: &mut [BuildRecord]) {
    v.sort_by(|a, b| {
        b.detected_at
            .cmp(&a.detected_at)
            .then_with(|| (&a.product, &a.build).cmp(&(&b.product, &b.build)))
    });
}

fn read_records(dir: &Path) -> Vec<BuildRecord> {
    let mut out = Vec::new();
    for product in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(product.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<BuildRecord>(&d).map_err(|e| e.to_string()))
            {
                Ok(r) if r.format <= RECORD_FORMAT => out.push(r),
                Ok(r) => {
                    warn!(path = %path.display(), format = r.format, "build record of a newer format: skipped")
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable build record: skipped")
                }
            }
        }
    }
    out
}

/// Live build nodes other than this one, with a client for each.
fn build_peers(cluster: &Cluster) -> Vec<(String, Client)> {
    cluster
        .view()
        .nodes
        .into_iter()
        .filter(|n| !n.is_self && n.alive && !n.left)
        .filter_map(|n| {
            let f = n.facts.as_ref()?;
            if !f.roles.contains(&Role::Build) {
                return None;
            }
            let c = cluster.peer_client(&n, PEER_TIMEOUT)?;
            Some((n.name.clone(), c))
        })
        .collect()
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

    #[test]
    fn log_keeps_its_end() {
        let mut l = Log::default();
        for i in 0..(LOG_MAX / 1000 + 10) {
            l.push(&format!("{i:0>999}"));
        }
        assert!(l.0.len() <= LOG_MAX + 100);
        assert!(l.0.starts_with("[… earlier output dropped]"));
        assert!(l.0.ends_with(&format!("{:0>999}\n", LOG_MAX / 1000 + 9)));
    }

    #[test]
    fn records_round_trip() {
        let rec = BuildRecord {
            format: RECORD_FORMAT,
            product: "erp".into(),
            build: "7".into(),
            image: Some("erp:7".into()),
            node: "n".into(),
            status: BuildStatus::Published,
            error: None,
            base: Some("db:3".into()),
            dir: "/drop/erp/7".into(),
            detected_at: now(),
            started_at: Some(now()),
            finished_at: None,
            timings: Timings {
                build_ms: Some(5),
                ..Default::default()
            },
            layers_added: Some(1),
            bytes_added: Some(10),
            attempts: 1,
        };
        let json = serde_json::to_string(&rec).unwrap();
        assert!(json.contains("\"ref\":\"erp:7\""), "{json}");
        assert!(json.contains("\"status\":\"published\""));
        let back: BuildRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }

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
