//! Environments on this node: admission, loading the image (only the layers
//! the engine lacks), starting the container, waiting until it is ready,
//! deleting it, and rebuilding all of that after a restart.
//!
//! Who owns what:
//! - The Docker engine is the truth for what runs: each environment's
//!   container carries its immutable record in labels (`docker::labels`).
//! - The journal (`journal.rs`: `<data_dir>/envs/<id>.json`, written temp +
//!   fsync + rename) keeps what labels cannot: the status, the error,
//!   `ready_at`, environments that have no container yet (pending, loading),
//!   and tombstones of deleted ones. Every write carries a sequence number
//!   taken under the state lock with its snapshot, so writes land in order
//!   and none lands after a delete.
//! - [`State`] (one `parking_lot::Mutex`, never held across an `.await`) holds
//!   the records and the admission [`Ledger`]: check-and-reserve happens
//!   under that one lock, so two requests cannot both take the last slot.
//!
//! Each environment is driven by one spawned task (`drive`), whose handle
//! is kept so that a delete can stop a load halfway and wait until it is
//! gone. The task is supervised: a panic in it fails the environment with a
//! reason, frees its room and removes its container. Nothing here
//! ever restarts or moves a container: after a crash, a container that runs
//! is adopted as it is, one that stopped is reported failed.
//!
//! An engine that does not answer (`health.rs`: unreachable or hung) says
//! nothing about the containers: while it is down no new environment is
//! admitted and deletes are refused at once, but no environment is failed
//! for it (reconcile and the ready wait skip it); when it answers again the
//! containers are re-adopted as they are.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::admission::{Capacity, Ledger, Reservation, Shortage};
use crate::archive::held_prefix;
use crate::config::Settings;
use crate::docker::{labels, ContainerSpec, DockerError, Engine};
use crate::journal::{Journal, JournalError, TOMBSTONE_KEEP};
use crate::model::{EnvRecord, EnvSpec, EnvStatus, LoadProgress};
use crate::store::{ImageRef, Manifest, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("no room on node {node}: {shortage}")]
    Refused { node: String, shortage: Shortage },
    #[error("environment {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Transfer(#[from] crate::transfer::TransferError),
    #[error("node {0} is draining and takes no new environments")]
    Draining(String),
    /// The node's engine does not answer (`detail`: state, since, reason).
    #[error("node {node}: {detail}")]
    EngineDown {
        node: String,
        state: crate::health::EngineState,
        detail: String,
    },
    #[error("host facts: {0}")]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Reservation(#[from] crate::reaper::ReservationError),
    #[error("the data directory of node {node} is full: no new environments until there is room")]
    DiskFull { node: String },
    #[error("journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<JournalError> for EnvError {
    fn from(e: JournalError) -> Self {
        EnvError::Journal {
            path: e.path,
            source: e.source,
        }
    }
}

/// A fault-injection hook: called with the record concerned.
pub type Hook = Arc<dyn Fn(&EnvRecord) + Send + Sync>;

/// Faults a test injects into real code paths (none in production).
#[derive(Default, Clone)]
pub struct Faults {
    /// Called after a record's journal snapshot was taken and before it is
    /// written (outside the state lock): lets a test interleave writes.
    pub before_journal_write: Option<Hook>,
    /// Called at the start of every environment task (drive, recovery
    /// watcher): lets a test make one panic.
    pub in_task: Option<Hook>,
}

/// Records and reservations, behind one lock (see the module header).
#[derive(Default)]
struct State {
    envs: BTreeMap<String, EnvRecord>,
    ledger: Ledger,
    /// The task driving each environment still on its way to ready.
    tasks: HashMap<String, JoinHandle<()>>,
    /// Journal sequence, bumped with every snapshot taken for the journal.
    seq: u64,
}

impl State {
    /// A record's snapshot for the journal, with its sequence number.
    fn snapshot(&mut self, id: &str) -> Option<(EnvRecord, u64)> {
        let rec = self.envs.get(id)?.clone();
        self.seq += 1;
        Some((rec, self.seq))
    }
}

/// The environments of this node.
pub struct Envs {
    settings: Settings,
    engine: Engine,
    store: Store,
    journal: Journal,
    state: Mutex<State>,
    /// One load at a time per image, so two environments of a new build do
    /// not both stream its layers: the second finds them held.
    image_locks: Mutex<HashMap<ImageRef, Arc<tokio::sync::Mutex<()>>>>,
    /// Throughput of the last load, bytes/s (for placement).
    last_load_bps: Mutex<Option<u64>>,
    /// Set on shutdown: no new environments are admitted.
    draining: std::sync::atomic::AtomicBool,
    /// An operator's maintenance drain (`drain.rs`): no new environments
    /// either, running ones stay. Held only to copy or replace.
    maintenance: Mutex<Option<crate::drain::Maintenance>>,
    /// The engine's health, written by the `engine-health` worker and read
    /// by admission, reconcile, the API and the gossip publisher.
    engine_health: tokio::sync::watch::Sender<crate::health::EngineHealth>,
    /// Woken on every change of a record or reservation, so the gossip
    /// publisher can tell the cluster at once.
    changed: tokio::sync::Notify,
    /// Bumped with `changed` and on load progress too: a watch, so any
    /// number of readers (event streams, the reaper, the mail watcher) see
    /// every change without taking the publisher's single wake-up.
    version: tokio::sync::watch::Sender<u64>,
    /// Injected faults (tests); held only to clone a hook out.
    faults: Mutex<Faults>,
    /// When old tombstones were last dropped.
    journal_pruned: Mutex<Instant>,
}

fn new_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(12);
    id
}

/// The container name of an environment: deterministic, so a delete can
/// find a container whose id was never recorded.
pub fn container_name(env_id: &str) -> String {
    format!("shoal-{env_id}")
}

impl Envs {
    /// Opens the journal and rebuilds every environment of this node from
    /// the engine's containers and the journal. Environments whose container
    /// still starts up are watched again; nothing is restarted.
    pub async fn recover(
        settings: Settings,
        engine: Engine,
        store: Store,
    ) -> Result<Arc<Envs>, EnvError> {
        let journal = Journal::open(settings.data_dir.join("envs"))?;
        let envs = Arc::new(Envs {
            settings,
            engine,
            store,
            journal,
            state: Mutex::new(State::default()),
            image_locks: Mutex::default(),
            last_load_bps: Mutex::new(None),
            draining: Default::default(),
            maintenance: Mutex::default(),
            engine_health: tokio::sync::watch::channel(crate::health::EngineHealth::ok_since(
                OffsetDateTime::now_utc(),
            ))
            .0,
            changed: Default::default(),
            version: tokio::sync::watch::channel(0).0,
            faults: Mutex::default(),
            journal_pruned: Mutex::new(Instant::now()),
        });
        let mut journal = envs.read_journal();
        let deleted = envs.journal.tombstones();
        let mut watch = Vec::new();
        for cid in envs.engine.env_containers(&envs.settings.name).await? {
            let Some(c) = envs.engine.container(&cid).await? else {
                continue;
            };
            let Some(id) = c.labels.get(labels::ENV_ID).cloned() else {
                continue;
            };
            if deleted.contains(&id) {
                // Created by the engine after the environment was deleted
                // (the create was already on its way): never adopted.
                warn!(env = %id, container = %cid, "container of a deleted environment removed");
                envs.engine.remove_container(&cid).await?;
                continue;
            }
            let mut rec = match journal.remove(&id) {
                Some(r) => r,
                None => match record_from_labels(&c.labels, &envs.settings.name) {
                    Some(r) => r,
                    None => {
                        warn!(container = %cid, "container with unreadable shoal labels, left alone");
                        continue;
                    }
                },
            };
            rec.container = Some(c.id.clone());
            if c.running {
                if rec.status != EnvStatus::Ready {
                    rec.status = EnvStatus::Starting;
                    watch.push(rec.id.clone());
                }
                rec.endpoints = envs.endpoints(&c.ports);
            } else if rec.status != EnvStatus::Failed {
                rec.status = EnvStatus::Failed;
                rec.error = Some(exit_reason(c.exit_code, c.oom_killed));
            }
            envs.adopt(rec);
        }
        // Journal entries without a container: interrupted before the
        // container existed, or the container was removed behind our back.
        for (_, mut rec) in journal {
            if rec.status.holds_room() {
                rec.error = Some(match rec.status {
                    EnvStatus::Pending | EnvStatus::Loading => {
                        "interrupted: the daemon stopped before the container was created".into()
                    }
                    _ => "the container is gone".into(),
                });
                rec.status = EnvStatus::Failed;
            }
            envs.adopt(rec);
        }
        for id in watch {
            let me = envs.clone();
            let id2 = id.clone();
            envs.spawn_task(&id, async move { me.await_ready_or_fail(&id2).await });
        }
        envs.journal.prune_tombstones(TOMBSTONE_KEEP);
        let n = envs.state.lock().envs.len();
        info!(node = %envs.settings.name, environments = n, "environments recovered");
        Ok(envs)
    }

    /// Takes a recovered record into state (and its room into the ledger).
    /// A record from before reservations existed gets a fresh default
    /// reservation from now, so an upgrade never reaps at once.
    fn adopt(&self, mut rec: EnvRecord) {
        if rec.expires_at.is_none() {
            rec.expires_at = Some(now_s() + self.settings.default_ttl);
        }
        let mut st = self.state.lock();
        if rec.status.holds_room() {
            st.ledger.restore(
                &rec.id,
                Reservation {
                    memory: rec.memory,
                    aio: rec.aio,
                    started: rec.container.is_some(),
                },
            );
        }
        st.envs.insert(rec.id.clone(), rec.clone());
        st.seq += 1;
        let seq = st.seq;
        drop(st);
        if let Err(e) = self.write_journal(&rec, seq) {
            warn!(env = %rec.id, error = %e, "journal write failed");
        }
    }

    /// Installs fault-injection hooks (tests).
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock() = faults;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This node's capacity as measured now.
    pub fn capacity(&self) -> Result<Capacity, EnvError> {
        let (aio_max, aio_in_use) = crate::host::aio()?;
        Ok(Capacity {
            memory_allocatable: self.settings.memory_allocatable,
            max_envs: self.settings.max_envs,
            aio_max,
            aio_in_use,
        })
    }

    /// Totals of the ledger: (memory, aio, envs holding room).
    pub fn committed(&self) -> crate::admission::Committed {
        self.state.lock().ledger.committed()
    }

    /// Stops admitting new environments (shutdown).
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify();
    }

    /// Takes no new environments: shutting down or under maintenance.
    pub fn is_draining(&self) -> bool {
        self.is_stopping() || self.maintenance.lock().is_some()
    }

    /// Shutting down (SIGTERM).
    pub fn is_stopping(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets or clears the maintenance drain (persisting is the caller's).
    pub fn set_maintenance(&self, m: Option<crate::drain::Maintenance>) {
        *self.maintenance.lock() = m;
        self.notify();
    }

    pub fn drain_state(&self) -> crate::drain::NodeDrain {
        crate::drain::NodeDrain {
            draining: self.is_draining(),
            maintenance: self.maintenance.lock().clone(),
            stopping: self.is_stopping(),
        }
    }

    /// The engine's health as the monitor last saw it.
    pub fn engine_health(&self) -> crate::health::EngineHealth {
        self.engine_health.borrow().clone()
    }

    /// A receiver woken on every change of the engine's state.
    pub fn watch_engine(&self) -> tokio::sync::watch::Receiver<crate::health::EngineHealth> {
        self.engine_health.subscribe()
    }

    /// Records the monitor's latest view; `changed` (the state changed)
    /// wakes the gossip publisher and every watcher.
    pub fn set_engine_health(&self, health: crate::health::EngineHealth, changed: bool) {
        self.engine_health.send_if_modified(|h| {
            *h = health;
            changed
        });
        if changed {
            self.notify();
        }
    }

    /// `Err(EngineDown)` while the engine does not answer: what needs it
    /// fails at once rather than after a timeout.
    pub fn engine_ready(&self) -> Result<(), EnvError> {
        let h = self.engine_health.borrow();
        if h.state.is_ok() {
            return Ok(());
        }
        Err(EnvError::EngineDown {
            node: self.settings.name.clone(),
            state: h.state,
            detail: h.describe(),
        })
    }

    /// Whether the state lock can be taken within `within` (for
    /// `/healthz`): a lock held that long is a wedged node (parking_lot: never poisoned).
    pub async fn state_lock_ok(&self, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // The guard is dropped in this statement, before any await.
            let held = self.state.try_lock().is_none();
            if !held {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the state lock has been held for over {}",
                    crate::units::format_duration(within)
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// After the engine answers again: checks every environment said to
    /// run against its container at once (running ones are kept as they
    /// are, with their published ports read again; stopped ones fail).
    pub async fn readopt(&self) {
        let changed = self.reconcile().await;
        info!(node = %self.settings.name, changed, "environments re-adopted after the engine came back");
    }

    /// Completes after the next change of any record or reservation.
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    /// A receiver that sees every change of a record (load progress
    /// included); many may watch at once.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Tells the publisher and every watcher that something changed.
    fn notify(&self) {
        self.changed.notify_one();
        self.version.send_modify(|v| *v += 1);
    }

    /// Environments still on their way to ready (pending, loading, starting).
    pub fn in_flight(&self) -> usize {
        let st = self.state.lock();
        st.envs
            .values()
            .filter(|r| {
                matches!(
                    r.status,
                    EnvStatus::Pending | EnvStatus::Loading | EnvStatus::Starting
                )
            })
            .count()
    }

    /// The node's metrics handle (the engine's, `metrics.rs`).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.engine.metrics()
    }

    pub fn last_load_bps(&self) -> Option<u64> {
        *self.last_load_bps.lock()
    }

    /// Admits a checked request: reserves room (or refuses with the
    /// resource that is short), records it, and starts driving it.
    pub fn create(
        self: &Arc<Self>,
        spec: EnvSpec,
        manifest: Manifest,
    ) -> Result<EnvRecord, EnvError> {
        if self.is_draining() {
            return Err(EnvError::Draining(self.settings.name.clone()));
        }
        // A full data dir cannot journal the environment: refuse before
        // reserving (the journal write below catches what this misses).
        match crate::host::disk_free(self.journal.dir()) {
            Ok(free) if free < DATA_DIR_MIN_FREE => {
                warn!(node = %self.settings.name, free, "data directory full: refusing new environments");
                return Err(EnvError::DiskFull {
                    node: self.settings.name.clone(),
                });
            }
            _ => {}
        }
        self.engine_ready()?;
        // Its image is loaded from the store: refuse while the store is
        // unavailable here (placement elsewhere reads `store` in gossip).
        self.store.usable()?;
        let cap = self.capacity()?;
        let id = new_id();
        let created_at = now_s();
        let expires_at = crate::reaper::initial_expiry(
            created_at,
            spec.ttl,
            self.settings.default_ttl,
            self.settings.max_ttl,
        )?;
        let rec = EnvRecord {
            id: id.clone(),
            image: spec.image.clone(),
            owner: spec.owner.clone(),
            node: self.settings.name.clone(),
            status: EnvStatus::Pending,
            error: None,
            memory: spec.memory,
            aio: spec.aio,
            env: spec.env.clone(),
            created_at,
            ready_at: None,
            endpoints: Vec::new(),
            load: LoadProgress {
                layers_total: manifest.layers.len(),
                ..Default::default()
            },
            container: None,
            expires_at: Some(expires_at),
        };
        let seq = {
            let mut st = self.state.lock();
            st.ledger
                .reserve(&id, spec.memory, spec.aio, &cap)
                .map_err(|shortage| EnvError::Refused {
                    node: self.settings.name.clone(),
                    shortage,
                })?;
            st.envs.insert(id.clone(), rec.clone());
            st.seq += 1;
            st.seq
        };
        self.notify();
        if let Err(e) = self.write_journal(&rec, seq) {
            let mut st = self.state.lock();
            st.ledger.release(&id);
            st.envs.remove(&id);
            return Err(e);
        }
        info!(env = %id, image = %spec.image, owner = %spec.owner, memory = spec.memory, aio = spec.aio, "environment admitted");
        let me = self.clone();
        let id2 = id.clone();
        self.spawn_task(&id, async move { me.drive(&id2, manifest).await });
        Ok(rec)
    }

    pub fn list(&self) -> Vec<EnvRecord> {
        let st = self.state.lock();
        let mut v: Vec<EnvRecord> = st.envs.values().cloned().collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Option<EnvRecord> {
        self.state.lock().envs.get(id).cloned()
    }

    /// Pushes an environment's expiry back by `by`, never past `max_ttl`
    /// from now (the refusal names the limit). Journaled before it returns.
    pub fn extend(&self, id: &str, by: Duration) -> Result<EnvRecord, EnvError> {
        let (rec, seq) = {
            let mut st = self.state.lock();
            let rec = st
                .envs
                .get_mut(id)
                .filter(|r| r.status != EnvStatus::Deleted)
                .ok_or_else(|| EnvError::NotFound(id.to_string()))?;
            let now = now_s();
            let current = rec.expires_at.unwrap_or(now);
            rec.expires_at = Some(crate::reaper::extend(
                current,
                by,
                now,
                self.settings.max_ttl,
            )?);
            let rec = rec.clone();
            st.seq += 1;
            (rec, st.seq)
        };
        self.write_journal(&rec, seq)?;
        self.notify();
        info!(env = %id, owner = %rec.owner, by = %crate::units::format_duration(by), expires_at = ?rec.expires_at, "reservation extended");
        Ok(rec)
    }

    /// Deletes an environment: stops its task (a load stops halfway) and
    /// waits until it is gone, writes its tombstone, removes every container
    /// of it, frees its room and forgets it. Returns the last record with
    /// status `deleted`.
    pub async fn delete(&self, id: &str) -> Result<EnvRecord, EnvError> {
        let rec = self.delete_if(id, |_| true, |_| {}).await?;
        rec.ok_or_else(|| EnvError::NotFound(id.to_string()))
    }

    /// Deletes an environment if `still` holds for its record, checked under
    /// the state lock at the moment the delete is decided (the reaper's
    /// "still expired?"); from then on its record shows `deleted` and
    /// refuses extensions. `on_claimed` runs once it is decided, before the
    /// container goes. `Ok(None)`: `still` said no, nothing changed.
    pub async fn delete_if(
        &self,
        id: &str,
        still: impl FnOnce(&EnvRecord) -> bool,
        on_claimed: impl FnOnce(&EnvRecord),
    ) -> Result<Option<EnvRecord>, EnvError> {
        // Refused before anything changes: with the engine down the
        // container could not be removed.
        self.engine_ready()?;
        let (rec, task) = {
            let mut st = self.state.lock();
            let rec = st
                .envs
                .get_mut(id)
                .ok_or_else(|| EnvError::NotFound(id.to_string()))?;
            if !still(rec) {
                return Ok(None);
            }
            // The drive task's updates and finish leave a deleted record
            // alone; an extension is refused.
            rec.status = EnvStatus::Deleted;
            let rec = rec.clone();
            (rec, st.tasks.remove(id))
        };
        on_claimed(&rec);
        self.notify();
        // The tombstone first: whatever happens next, no restart adopts a
        // container of it, and no stale write brings the record back.
        let journal = self.journal.tombstone(id);
        if let Err(e) = &journal {
            warn!(env = %id, error = %e, "writing the tombstone failed");
        }
        if let Some(t) = task {
            t.abort();
            // Until it is gone: it may be between two awaits right now.
            let _ = t.await;
        }
        // A container created just before the abort goes too; one the
        // engine creates even later is swept by `reconcile`.
        self.remove_containers_of(id, rec.container.as_deref())
            .await?;
        {
            let mut st = self.state.lock();
            st.ledger.release(id);
            st.envs.remove(id);
        }
        self.notify();
        journal?;
        info!(env = %id, "environment deleted");
        Ok(Some(rec))
    }

    /// Removes every container of environment `id`: by its label, by its
    /// name and by the id on record.
    async fn remove_containers_of(&self, id: &str, recorded: Option<&str>) -> Result<(), EnvError> {
        let mut doomed: Vec<String> = self
            .engine
            .env_containers_by_env(&self.settings.name)
            .await?
            .into_iter()
            .filter(|(_, env)| env.as_deref() == Some(id))
            .map(|(cid, _)| cid)
            .collect();
        doomed.push(container_name(id));
        doomed.extend(recorded.map(String::from));
        for cid in doomed {
            self.engine.remove_container(&cid).await?;
        }
        Ok(())
    }

    /// Removes containers labelled as environments of this node that no
    /// record owns: created by the engine after their environment was
    /// deleted (or after it failed before it had a container). Returns how
    /// many.
    async fn sweep_orphans(&self) -> usize {
        let list = match self.engine.env_containers_by_env(&self.settings.name).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "reconcile: cannot list containers");
                return 0;
            }
        };
        let mut removed = 0;
        for (cid, env) in list {
            let Some(env) = env else { continue };
            let owned = {
                let st = self.state.lock();
                st.envs.get(&env).is_some_and(|r| {
                    r.status != EnvStatus::Failed || r.container.as_deref() == Some(cid.as_str())
                })
            };
            if owned {
                continue;
            }
            match self.engine.remove_container(&cid).await {
                Ok(()) => {
                    warn!(env = %env, container = %cid, "orphan container removed");
                    removed += 1;
                }
                Err(e) => {
                    warn!(env = %env, container = %cid, error = %e, "cannot remove orphan container")
                }
            }
        }
        removed
    }

    /// Checks that environments said to run still do, and fails (and frees
    /// the room of) those whose container stopped or vanished; a running
    /// one whose published ports changed (an engine restart) gets them read
    /// again. Returns how many changed. Called periodically by the daemon.
    ///
    /// "Gone" or "stopped" is what the engine answers; an engine that does
    /// not answer fails nothing: the round is skipped while the monitor
    /// says it is down, and ends at the first call it does not answer.
    pub async fn reconcile(&self) -> usize {
        if !self.engine_health().state.is_ok() {
            return 0;
        }
        let ready: Vec<(String, Option<String>)> = {
            let st = self.state.lock();
            st.envs
                .values()
                .filter(|r| r.status == EnvStatus::Ready)
                .map(|r| (r.id.clone(), r.container.clone()))
                .collect()
        };
        let mut changed = 0;
        for (id, cid) in ready {
            let cid = cid.unwrap_or_else(|| container_name(&id));
            let reason = match self.engine.container(&cid).await {
                Ok(Some(c)) if c.running => {
                    let endpoints = self.endpoints(&c.ports);
                    let moved = self.get(&id).is_some_and(|r| r.endpoints != endpoints);
                    if moved && !endpoints.is_empty() {
                        info!(env = %id, container = %cid, "published ports read again");
                        self.set_endpoints(&id, endpoints);
                        changed += 1;
                    }
                    continue;
                }
                Ok(Some(c)) => exit_reason(c.exit_code, c.oom_killed),
                Ok(None) => "the container is gone".to_string(),
                Err(e) if e.no_answer().is_some() => {
                    warn!(env = %id, error = %e, "reconcile: the engine does not answer, round skipped");
                    break;
                }
                Err(e) => {
                    warn!(env = %id, error = %e, "reconcile: cannot inspect container");
                    continue;
                }
            };
            warn!(env = %id, reason = %reason, "environment stopped");
            self.finish(&id, Err(reason));
            changed += 1;
        }
        changed += self.sweep_orphans().await;
        let prune = {
            let mut last = self.journal_pruned.lock();
            let due = last.elapsed() > Duration::from_secs(3600);
            if due {
                *last = Instant::now();
            }
            due
        };
        if prune {
            self.journal.prune_tombstones(TOMBSTONE_KEEP);
        }
        changed
    }

    /// Spawns the task of environment `id`, supervised: a panic in it fails
    /// the environment with the panic's message, frees its room and removes
    /// its container. Not spawned when the environment is already gone.
    fn spawn_task(
        self: &Arc<Self>,
        id: &str,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let me = self.clone();
        let id2 = id.to_string();
        let supervised = async move {
            let hook = me.faults.lock().in_task.clone();
            let (me2, id3) = (me.clone(), id2.clone());
            let work = async move {
                if let (Some(hook), Some(rec)) = (hook, me2.get(&id3)) {
                    hook(&rec);
                }
                work.await
            };
            if let Err(panic) = std::panic::AssertUnwindSafe(work).catch_unwind().await {
                let msg = crate::workers::panic_message(&*panic);
                error!(env = %id2, error = %msg, "environment task panicked");
                if let Err(e) = me.remove_containers_of(&id2, None).await {
                    warn!(env = %id2, error = %e, "cannot remove the container of a failed environment");
                }
                me.finish(&id2, Err(format!("internal error: {msg}")));
            }
        };
        let mut st = self.state.lock();
        if st
            .envs
            .get(id)
            .is_some_and(|r| r.status != EnvStatus::Deleted)
        {
            // Every line of the task carries the environment's id (a span
            // field: `spans[].env_id` in JSON logs).
            let span = tracing::info_span!("env", env_id = %id);
            st.tasks.insert(
                id.to_string(),
                tokio::spawn(tracing::Instrument::instrument(supervised, span)),
            );
        }
    }

    /// The whole life of a new environment, from pending to ready or failed.
    async fn drive(self: Arc<Self>, id: &str, manifest: Manifest) {
        if let Err(e) = self.load(id, &manifest).await {
            warn!(env = %id, image = %manifest.image_ref(), error = %e, "load failed");
            self.finish(
                id,
                Err(format!("loading image {}: {e}", manifest.image_ref())),
            );
            return;
        }
        if let Err(e) = self.start(id, &manifest).await {
            warn!(env = %id, error = %e, "start failed");
            let _ = self.engine.remove_container(&container_name(id)).await;
            self.finish(id, Err(format!("starting container: {e}")));
            return;
        }
        self.await_ready_or_fail(id).await;
    }

    /// Makes the image present in the engine, loading only the layers after
    /// the longest chain the engine already holds.
    async fn load(self: &Arc<Self>, id: &str, m: &Manifest) -> Result<(), EnvError> {
        self.update(id, |r| r.status = EnvStatus::Loading);
        let lock = self
            .image_locks
            .lock()
            .entry(m.image_ref())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let tag = m.image_ref().docker_tag();
        if let Some(img) = self.engine.image(&tag).await? {
            if img.id == m.image_id.to_string() {
                self.update(id, |r| {
                    r.load.layers_cached = m.layers.len();
                });
                info!(env = %id, image = %m.image_ref(), "image already loaded");
                return Ok(());
            }
        }
        let held = self.engine.held_chain_ids().await?;
        let skip = held_prefix(&m.chain_ids(), &held);
        let needed = m
            .layers
            .get(skip..)
            .unwrap_or_default()
            .iter()
            .fold(0u64, |t, l| t.saturating_add(l.size));
        self.update(id, |r| {
            r.load.layers_cached = skip;
            r.load.bytes_needed = needed;
        });
        info!(env = %id, image = %m.image_ref(), layers = m.layers.len(), cached = skip, bytes = needed, "loading image");

        let started = Instant::now();
        let mut progress = ProgressSink::new(self, id);
        let stats = crate::transfer::load(
            &self.engine,
            &self.store,
            m,
            skip,
            Box::new(move |n| progress.report(n)),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        if stats.bytes_sent > 16 << 20 && secs > 0.0 {
            *self.last_load_bps.lock() = Some((stats.bytes_sent as f64 / secs) as u64);
        }
        self.update(id, |r| r.load.bytes_done = needed);
        info!(env = %id, image = %m.image_ref(), layers_sent = stats.layers_sent, bytes = stats.bytes_sent, secs = format!("{secs:.2}"), "image loaded");
        Ok(())
    }

    async fn start(&self, id: &str, m: &Manifest) -> Result<(), EnvError> {
        let rec = self
            .get(id)
            .filter(|r| r.status != EnvStatus::Deleted)
            .ok_or_else(|| EnvError::NotFound(id.to_string()))?;
        self.update(id, |r| r.status = EnvStatus::Starting);
        let mut env = rec.env.clone();
        env.insert("SHOAL_ENV_ID".into(), id.to_string());
        env.insert("SHOAL_IMAGE".into(), rec.image.to_string());
        let mut lbl = HashMap::from([
            (labels::NODE.to_string(), self.settings.name.clone()),
            (labels::ENV_ID.to_string(), id.to_string()),
            (labels::OWNER.to_string(), rec.owner.clone()),
            (labels::IMAGE.to_string(), rec.image.to_string()),
            (labels::MEMORY.to_string(), rec.memory.to_string()),
            (labels::AIO.to_string(), rec.aio.to_string()),
            (
                labels::CREATED_AT.to_string(),
                rec.created_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            ),
        ]);
        // The first expiry, so a node that lost its journal still reaps
        // the environment (extensions live in the journal only).
        if let Some(exp) = rec.expires_at {
            lbl.insert(
                labels::EXPIRES_AT.to_string(),
                exp.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            );
        }
        let spec = ContainerSpec {
            name: container_name(id),
            image: m.image_ref().docker_tag(),
            memory: rec.memory,
            env,
            labels: lbl,
            ports: m.exposed_ports.clone(),
            publish_addr: self.settings.publish_addr.to_string(),
        };
        let cid = self.engine.run(&spec).await?;
        {
            let mut st = self.state.lock();
            st.ledger.mark_started(id);
        }
        self.update(id, |r| r.container = Some(cid.clone()));
        info!(env = %id, container = %cid, "container started");
        Ok(())
    }

    /// Polls the container until it is ready (healthy, or every published
    /// port accepts a connection when the image has no health check), it
    /// stops, or `ready_timeout` passes. A failed start removes the container.
    async fn await_ready_or_fail(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        let cid = self
            .get(id)
            .and_then(|r| r.container)
            .unwrap_or_else(|| container_name(id));
        let outcome: Result<Vec<(u16, u16)>, String> = loop {
            match self.engine.container(&cid).await {
                Ok(None) => break Err("the container is gone".into()),
                Ok(Some(c)) if !c.running => {
                    let logs = self.engine.logs_tail(&cid, 5).await;
                    let mut reason = exit_reason(c.exit_code, c.oom_killed);
                    if !logs.trim().is_empty() {
                        reason.push_str(&format!("; last output: {}", logs.trim()));
                    }
                    break Err(reason);
                }
                Ok(Some(c)) => match c.health.as_deref() {
                    Some("healthy") => break Ok(c.ports),
                    Some("unhealthy") => {
                        break Err("the image's health check reports unhealthy".into())
                    }
                    Some(_) => {}
                    None => {
                        if self.ports_answer(&c).await {
                            break Ok(c.ports);
                        }
                    }
                },
                Err(e) => warn!(env = %id, error = %e, "inspect failed while waiting for ready"),
            }
            // An engine that does not answer says nothing about the
            // container: wait for it rather than fail the environment.
            if tokio::time::Instant::now() >= deadline && self.engine_health().state.is_ok() {
                break Err(format!(
                    "not ready within {}",
                    crate::units::format_duration(self.settings.ready_timeout)
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        match outcome {
            Ok(ports) => {
                let endpoints = self.endpoints(&ports);
                self.update(id, |r| r.endpoints = endpoints);
                self.finish(id, Ok(()));
            }
            Err(reason) => {
                warn!(env = %id, reason = %reason, "environment failed to become ready");
                let _ = self.engine.remove_container(&cid).await;
                self.finish(id, Err(reason));
            }
        }
    }

    /// Whether every published port accepts a connection. Checked at the
    /// container's own address: Docker's userland proxy accepts on the host
    /// port even while nothing listens inside.
    async fn ports_answer(&self, c: &crate::docker::ContainerFacts) -> bool {
        let host_ip = if self.settings.publish_addr.is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            self.settings.publish_addr
        };
        for &(cport, hport) in &c.ports {
            let target = match c.ip {
                Some(ip) => (ip, cport),
                None => (host_ip, hport),
            };
            let connect = tokio::net::TcpStream::connect(target);
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok(_)) => {}
                _ => return false,
            }
        }
        true
    }

    fn endpoints(&self, ports: &[(u16, u16)]) -> Vec<crate::model::Endpoint> {
        ports
            .iter()
            .map(|&(port, host_port)| crate::model::Endpoint {
                port,
                host: self.settings.advertise_host.clone(),
                host_port,
            })
            .collect()
    }

    /// Ends the drive of an environment: ready, or failed (freeing its room).
    fn finish(&self, id: &str, outcome: Result<(), String>) {
        let mut st = self.state.lock();
        st.tasks.remove(id);
        let Some(rec) = st
            .envs
            .get_mut(id)
            .filter(|r| r.status != EnvStatus::Deleted)
        else {
            return;
        };
        match outcome {
            Ok(()) => {
                rec.status = EnvStatus::Ready;
                rec.ready_at = Some(OffsetDateTime::now_utc());
                info!(env = %id, endpoints = ?rec.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(), "environment ready");
            }
            Err(reason) => {
                rec.status = EnvStatus::Failed;
                rec.error = Some(reason);
            }
        }
        let failed = rec.status == EnvStatus::Failed;
        if failed {
            st.ledger.release(id);
        }
        let snap = st.snapshot(id);
        drop(st);
        self.notify();
        if let Some((rec, seq)) = snap {
            if let Err(e) = self.write_journal(&rec, seq) {
                tracing::error!(env = %id, error = %e, "journal write failed");
            }
        }
    }

    /// Sets a record's endpoints and journals it.
    fn set_endpoints(&self, id: &str, endpoints: Vec<crate::model::Endpoint>) {
        let rec = {
            let mut st = self.state.lock();
            let Some(rec) = st
                .envs
                .get_mut(id)
                .filter(|r| r.status != EnvStatus::Deleted)
            else {
                return;
            };
            rec.endpoints = endpoints;
            st.snapshot(id)
        };
        self.notify();
        if let Some((rec, seq)) = rec {
            if let Err(e) = self.write_journal(&rec, seq) {
                tracing::error!(env = %id, error = %e, "journal write failed");
            }
        }
    }

    /// Changes a record in place and journals it.
    fn update(&self, id: &str, f: impl FnOnce(&mut EnvRecord)) {
        let snap = {
            let mut st = self.state.lock();
            let Some(rec) = st
                .envs
                .get_mut(id)
                .filter(|r| r.status != EnvStatus::Deleted)
            else {
                return;
            };
            let before = rec.status;
            f(rec);
            // Progress alone is not worth an fsync.
            let worth = rec.status != before || rec.container.is_some();
            if worth {
                st.snapshot(id)
            } else {
                None
            }
        };
        if let Some((rec, seq)) = snap {
            self.notify();
            if let Err(e) = self.write_journal(&rec, seq) {
                tracing::error!(env = %id, error = %e, "journal write failed");
            }
        }
    }

    /// Writes a snapshot taken under the state lock as of `seq`; a write
    /// overtaken by a newer one (or by the delete) is dropped. A failed
    /// write leaves the old file whole; a full disk is `DiskFull`.
    fn write_journal(&self, rec: &EnvRecord, seq: u64) -> Result<(), EnvError> {
        let hook = self.faults.lock().before_journal_write.clone();
        if let Some(hook) = hook {
            hook(rec);
        }
        match self.journal.write(rec, seq) {
            Ok(true) => Ok(()),
            Ok(false) => {
                info!(env = %rec.id, "journal write overtaken by a newer one: dropped");
                Ok(())
            }
            Err(e) => {
                tracing::error!(env = %rec.id, path = %e.path.display(), error = %e.source, "journal write failed");
                if crate::host::is_disk_full(&e.source) {
                    Err(EnvError::DiskFull {
                        node: self.settings.name.clone(),
                    })
                } else {
                    Err(e.into())
                }
            }
        }
    }

    fn read_journal(&self) -> BTreeMap<String, EnvRecord> {
        self.journal.read(&self.settings.name)
    }
}

/// Now, to the second (records carry whole seconds).
fn now_s() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// Free bytes the data dir must keep for a new environment to be admitted
/// (its journal record is a few KiB; mails and status changes follow).
pub const DATA_DIR_MIN_FREE: u64 = 1 << 20;

/// Writes a file so that a crash leaves the old or the new content, and a
/// failed write (a full disk) leaves the old file and no temp file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        uuid::Uuid::new_v4().simple()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

fn exit_reason(code: Option<i64>, oom: bool) -> String {
    match (code, oom) {
        (_, true) => "the container ran out of memory and was killed".into(),
        (Some(c), _) => format!("the container exited with code {c}"),
        (None, _) => "the container is not running".into(),
    }
}

/// Rebuilds a record from a container's labels (when the journal lost it).
fn record_from_labels(l: &HashMap<String, String>, node: &str) -> Option<EnvRecord> {
    Some(EnvRecord {
        id: l.get(labels::ENV_ID)?.clone(),
        image: l.get(labels::IMAGE)?.parse().ok()?,
        owner: l.get(labels::OWNER)?.clone(),
        node: node.to_string(),
        status: EnvStatus::Starting,
        error: None,
        memory: l.get(labels::MEMORY)?.parse().ok()?,
        aio: l.get(labels::AIO)?.parse().ok()?,
        env: BTreeMap::new(),
        created_at: OffsetDateTime::parse(
            l.get(labels::CREATED_AT)?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?,
        ready_at: None,
        endpoints: Vec::new(),
        load: LoadProgress::default(),
        container: None,
        expires_at: l.get(labels::EXPIRES_AT).and_then(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        }),
    })
}

/// Reports load progress into the record, at most every 4 MiB.
struct ProgressSink {
    envs: std::sync::Weak<Envs>,
    id: String,
    last: u64,
}

impl ProgressSink {
    fn new(envs: &Arc<Envs>, id: &str) -> ProgressSink {
        ProgressSink {
            envs: Arc::downgrade(envs),
            id: id.to_string(),
            last: 0,
        }
    }

    fn report(&mut self, done: u64) {
        if done < self.last + (4 << 20) {
            return;
        }
        self.last = done;
        if let Some(envs) = self.envs.upgrade() {
            let mut st = envs.state.lock();
            if let Some(r) = st.envs.get_mut(&self.id) {
                r.load.bytes_done = done;
            }
            drop(st);
            // Watchers only: progress is not worth a gossip round or an fsync.
            envs.version.send_modify(|v| *v += 1);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An `Envs` on the real engine under a node name of its own (no
    /// container carries it), with its data dir and store in `dir`.
    pub(crate) async fn test_envs(dir: &Path) -> Arc<Envs> {
        let settings = crate::config::Config {
            name: Some(format!("t{}", new_id())),
            data_dir: Some(dir.join("data")),
            store: Some(dir.join("store")),
            ..Default::default()
        }
        .resolve(8 << 30, "h")
        .unwrap();
        let engine = Engine::connect().await.expect("the docker engine");
        let store = Store::open(&settings.store).unwrap();
        Envs::recover(settings, engine, store).await.unwrap()
    }

    /// Recovers the same node again (a restart after kill -9).
    async fn restart(envs: &Envs) -> Arc<Envs> {
        Envs::recover(
            envs.settings().clone(),
            envs.engine().clone(),
            envs.store().clone(),
        )
        .await
        .unwrap()
    }

    fn ready(envs: &Envs, id: &str) -> EnvRecord {
        EnvRecord {
            id: id.into(),
            image: "demo:1".parse().unwrap(),
            owner: "o@example.com".into(),
            node: envs.settings().name.clone(),
            status: EnvStatus::Ready,
            error: None,
            memory: 1 << 20,
            aio: 0,
            env: Default::default(),
            created_at: now_s(),
            ready_at: Some(now_s()),
            endpoints: vec![],
            load: Default::default(),
            container: None,
            expires_at: Some(now_s() + time::Duration::hours(1)),
        }
    }

    /// A hook that blocks the first write of `id` until `go` is sent, and
    /// says when it got there.
    fn block_first_write(
        id: &str,
    ) -> (
        Hook,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (reached_tx, reached) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let armed = AtomicBool::new(true);
        let id = id.to_string();
        let hook: Hook = Arc::new(move |rec: &EnvRecord| {
            if rec.id == id && armed.swap(false, Ordering::SeqCst) {
                let _ = reached_tx.send(());
                let _ = go_rx.lock().recv_timeout(Duration::from_secs(30));
            }
        });
        (hook, reached, go)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_write_overtaken_by_a_delete_never_resurrects_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        let envs = test_envs(tmp.path()).await;
        let id = "0123456789ab";
        envs.adopt(ready(&envs, id));
        let (hook, reached, go) = block_first_write(id);
        envs.set_faults(Faults {
            before_journal_write: Some(hook),
            ..Default::default()
        });
        // An extension takes its snapshot, then its write stalls; the delete
        // runs to the end meanwhile; then the stale write goes on.
        let e2 = envs.clone();
        let ext = std::thread::spawn(move || e2.extend(id, Duration::from_secs(3600)).is_ok());
        reached.recv_timeout(Duration::from_secs(10)).unwrap();
        envs.delete(id).await.unwrap();
        go.send(()).unwrap();
        ext.join().unwrap();
        assert!(envs.get(id).is_none());
        assert!(
            !envs.read_journal().contains_key(id),
            "a stale write put the deleted record back in the journal"
        );
        let again = restart(&envs).await;
        assert!(again.get(id).is_none(), "the deleted environment came back");
    }

    /// A one-layer image published straight into the node's store.
    fn tiny_manifest(envs: &Envs) -> Manifest {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
        let tars = vec![b.into_inner().unwrap()];
        let config = crate::store::tests::config_for(&tars, "16MiB");
        let save = crate::store::tests::oci_save(&config, &tars, "x:1");
        envs.store()
            .publish_derived(
                &save[..],
                &"tiny:1".parse().unwrap(),
                &Default::default(),
                None,
            )
            .unwrap()
            .0
    }

    async fn settled(envs: &Envs, id: &str) -> EnvRecord {
        for _ in 0..200 {
            let r = envs.get(id).unwrap();
            if !matches!(
                r.status,
                EnvStatus::Pending | EnvStatus::Loading | EnvStatus::Starting
            ) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} never settled: {:?}", envs.get(id));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_an_environment_task_fails_it_and_frees_its_room() {
        let tmp = tempfile::tempdir().unwrap();
        let envs = test_envs(tmp.path()).await;
        let m = tiny_manifest(&envs);
        envs.set_faults(Faults {
            in_task: Some(Arc::new(|_: &EnvRecord| panic!("injected fault"))),
            ..Default::default()
        });
        let spec = EnvSpec {
            image: m.image_ref(),
            owner: "o@example.com".into(),
            memory: 16 << 20,
            aio: 0,
            env: Default::default(),
            ttl: None,
        };
        let rec = envs.create(spec, m).unwrap();
        let after = settled(&envs, &rec.id).await;
        assert_eq!(after.status, EnvStatus::Failed);
        let why = after.error.unwrap_or_default();
        assert!(
            why.contains("internal error") && why.contains("injected fault"),
            "{why}"
        );
        assert_eq!(envs.committed().envs, 0, "the panic kept its reservation");
        // The journal says so too: a restart does not bring it back pending.
        let again = restart(&envs).await;
        assert_eq!(again.get(&rec.id).unwrap().status, EnvStatus::Failed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reapers_delete_rechecks_and_an_extension_after_it_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let envs = test_envs(tmp.path()).await;
        let id = "ba9876543210";
        let mut r = ready(&envs, id);
        r.expires_at = Some(now_s() - time::Duration::minutes(1));
        envs.adopt(r);
        // Extended after the reaper's snapshot: the delete finds it not due.
        envs.extend(id, Duration::from_secs(3600)).unwrap();
        let due = |r: &EnvRecord| crate::reaper::is_due(r, now_s());
        let kept = envs
            .delete_if(id, due, |_| panic!("not claimed"))
            .await
            .unwrap();
        assert!(kept.is_none());
        assert_eq!(envs.get(id).unwrap().status, EnvStatus::Ready);
        // Once a delete is decided, an extension is refused, not lost.
        let e2 = envs.clone();
        let gone = envs
            .delete_if(
                id,
                |_| true,
                move |_| {
                    assert!(matches!(
                        e2.extend(id, Duration::from_secs(60)),
                        Err(EnvError::NotFound(_))
                    ));
                },
            )
            .await
            .unwrap();
        assert_eq!(gone.unwrap().status, EnvStatus::Deleted);
        assert!(envs.get(id).is_none());
    }
}

#[cfg(test)]
mod write_tests {
    use super::*;

    #[test]
    fn a_failed_atomic_write_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        write_atomic(&path, b"old").unwrap();
        // The rename cannot replace a directory: the write fails late.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, b"new").is_err());
        write_atomic(&path, b"new").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "rec.json"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn disk_full_errors_are_told_apart() {
        let full = std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
        assert!(crate::host::is_disk_full(&full));
        let quota = std::io::Error::from_raw_os_error(nix::libc::EDQUOT);
        assert!(crate::host::is_disk_full(&quota));
        let other = std::io::Error::from_raw_os_error(nix::libc::EACCES);
        assert!(!crate::host::is_disk_full(&other));
    }
}
