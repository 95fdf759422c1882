//! Environments on this node: admission, loading the image (only the layers
//! the engine lacks), starting the container, waiting until it is ready,
//! deleting it, and rebuilding all of that after a restart.
//!
//! Who owns what:
//! - The Docker engine is the truth for what runs: each environment's
//!   container carries its immutable record in labels (`docker::labels`).
//! - The journal (`<data_dir>/envs/<id>.json`, written temp + fsync +
//!   rename) keeps what labels cannot: the status, the error, `ready_at`, and
//!   environments that have no container yet (pending, loading).
//! - [`State`] (one `parking_lot::Mutex`, never held across an `.await`) holds
//!   the records and the admission [`Ledger`]: check-and-reserve happens
//!   under that one lock, so two requests cannot both take the last slot.
//!
//! Each environment is driven by one spawned task (`drive`), whose abort
//! handle is kept so that a delete can stop a load halfway. Nothing here
//! ever restarts or moves a container: after a crash, a container that runs
//! is adopted as it is, one that stopped is reported failed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::admission::{Capacity, Ledger, Reservation, Shortage};
use crate::archive::held_prefix;
use crate::config::Settings;
use crate::docker::{labels, ContainerSpec, DockerError, Engine};
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
    #[error("host facts: {0}")]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Reservation(#[from] crate::reaper::ReservationError),
    #[error("journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Records and reservations, behind one lock (see the module header).
#[derive(Default)]
struct State {
    envs: BTreeMap<String, EnvRecord>,
    ledger: Ledger,
    tasks: HashMap<String, AbortHandle>,
}

/// The environments of this node.
pub struct Envs {
    settings: Settings,
    engine: Engine,
    store: Store,
    journal_dir: PathBuf,
    state: Mutex<State>,
    /// One load at a time per image, so two environments of a new build do
    /// not both stream its layers: the second finds them held.
    image_locks: Mutex<HashMap<ImageRef, Arc<tokio::sync::Mutex<()>>>>,
    /// Throughput of the last load, bytes/s (for placement).
    last_load_bps: Mutex<Option<u64>>,
    /// Set on shutdown: no new environments are admitted.
    draining: std::sync::atomic::AtomicBool,
    /// Woken on every change of a record or reservation, so the gossip
    /// publisher can tell the cluster at once.
    changed: tokio::sync::Notify,
    /// Bumped with `changed` and on load progress too: a watch, so any
    /// number of readers (event streams, the reaper, the mail watcher) see
    /// every change without taking the publisher's single wake-up.
    version: tokio::sync::watch::Sender<u64>,
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
        let journal_dir = settings.data_dir.join("envs");
        std::fs::create_dir_all(&journal_dir).map_err(|source| EnvError::Journal {
            path: journal_dir.clone(),
            source,
        })?;
        let envs = Arc::new(Envs {
            settings,
            engine,
            store,
            journal_dir,
            state: Mutex::new(State::default()),
            image_locks: Mutex::default(),
            last_load_bps: Mutex::new(None),
            draining: Default::default(),
            changed: Default::default(),
            version: tokio::sync::watch::channel(0).0,
        });
        let mut journal = envs.read_journal();
        let mut watch = Vec::new();
        for cid in envs.engine.env_containers(&envs.settings.name).await? {
            let Some(c) = envs.engine.container(&cid).await? else {
                continue;
            };
            let Some(id) = c.labels.get(labels::ENV_ID).cloned() else {
                continue;
            };
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
            let handle = tokio::spawn(async move { me.await_ready_or_fail(&id2).await });
            envs.state.lock().tasks.insert(id, handle.abort_handle());
        }
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
        if let Err(e) = self.write_journal(&rec) {
            warn!(env = %rec.id, error = %e, "journal write failed");
        }
        st.envs.insert(rec.id.clone(), rec);
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

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
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
        {
            let mut st = self.state.lock();
            st.ledger
                .reserve(&id, spec.memory, spec.aio, &cap)
                .map_err(|shortage| EnvError::Refused {
                    node: self.settings.name.clone(),
                    shortage,
                })?;
            st.envs.insert(id.clone(), rec.clone());
        }
        self.notify();
        if let Err(e) = self.write_journal(&rec) {
            let mut st = self.state.lock();
            st.ledger.release(&id);
            st.envs.remove(&id);
            return Err(e);
        }
        info!(env = %id, image = %spec.image, owner = %spec.owner, memory = spec.memory, aio = spec.aio, "environment admitted");
        let me = self.clone();
        let id2 = id.clone();
        let handle = tokio::spawn(async move { me.drive(&id2, manifest).await });
        self.state.lock().tasks.insert(id, handle.abort_handle());
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
        let rec = {
            let mut st = self.state.lock();
            let rec = st
                .envs
                .get_mut(id)
                .ok_or_else(|| EnvError::NotFound(id.to_string()))?;
            let now = now_s();
            let current = rec.expires_at.unwrap_or(now);
            rec.expires_at = Some(crate::reaper::extend(
                current,
                by,
                now,
                self.settings.max_ttl,
            )?);
            rec.clone()
        };
        self.write_journal(&rec)?;
        self.notify();
        info!(env = %id, owner = %rec.owner, by = %crate::units::format_duration(by), expires_at = ?rec.expires_at, "reservation extended");
        Ok(rec)
    }

    /// Deletes an environment: stops its task (a load stops halfway), removes
    /// its container, frees its room and forgets it. Returns the last record
    /// with status `deleted`.
    pub async fn delete(&self, id: &str) -> Result<EnvRecord, EnvError> {
        let (mut rec, task) = {
            let mut st = self.state.lock();
            let rec = st
                .envs
                .get(id)
                .cloned()
                .ok_or_else(|| EnvError::NotFound(id.to_string()))?;
            (rec, st.tasks.remove(id))
        };
        if let Some(t) = task {
            t.abort();
        }
        // By name, so a container created just before the abort goes too.
        self.engine.remove_container(&container_name(id)).await?;
        if let Some(cid) = &rec.container {
            self.engine.remove_container(cid).await?;
        }
        {
            let mut st = self.state.lock();
            st.ledger.release(id);
            st.envs.remove(id);
        }
        let path = self.journal_path(id);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(EnvError::Journal { path, source: e });
            }
        }
        rec.status = EnvStatus::Deleted;
        self.notify();
        info!(env = %id, "environment deleted");
        Ok(rec)
    }

    /// Checks that environments said to run still do, and fails (and frees
    /// the room of) those whose container stopped or vanished. Returns how
    /// many changed. Called periodically by the daemon.
    pub async fn reconcile(&self) -> usize {
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
                Ok(Some(c)) if c.running => continue,
                Ok(Some(c)) => exit_reason(c.exit_code, c.oom_killed),
                Ok(None) => "the container is gone".to_string(),
                Err(e) => {
                    warn!(env = %id, error = %e, "reconcile: cannot inspect container");
                    continue;
                }
            };
            warn!(env = %id, reason = %reason, "environment stopped");
            self.finish(&id, Err(reason));
            changed += 1;
        }
        changed
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
            if tokio::time::Instant::now() >= deadline {
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
        let Some(rec) = st.envs.get_mut(id) else {
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
        let rec = rec.clone();
        if rec.status == EnvStatus::Failed {
            st.ledger.release(id);
        }
        drop(st);
        self.notify();
        if let Err(e) = self.write_journal(&rec) {
            warn!(env = %id, error = %e, "journal write failed");
        }
    }

    /// Changes a record in place and journals it.
    fn update(&self, id: &str, f: impl FnOnce(&mut EnvRecord)) {
        let rec = {
            let mut st = self.state.lock();
            let Some(rec) = st.envs.get_mut(id) else {
                return;
            };
            let before = rec.status;
            f(rec);
            // Progress alone is not worth an fsync.
            (rec.status != before || rec.container.is_some()).then(|| rec.clone())
        };
        if let Some(rec) = rec {
            self.notify();
            if let Err(e) = self.write_journal(&rec) {
                warn!(env = %id, error = %e, "journal write failed");
            }
        }
    }

    fn journal_path(&self, id: &str) -> PathBuf {
        self.journal_dir.join(format!("{id}.json"))
    }

    fn write_journal(&self, rec: &EnvRecord) -> Result<(), EnvError> {
        let path = self.journal_path(&rec.id);
        let data = serde_json::to_vec_pretty(rec).expect("records serialize");
        write_atomic(&path, &data).map_err(|source| EnvError::Journal { path, source })
    }

    fn read_journal(&self) -> BTreeMap<String, EnvRecord> {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(&self.journal_dir) else {
            return out;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                // Leftover temp file of a write that did not finish.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<EnvRecord>(&b).ok())
            {
                Some(r) if r.node == self.settings.name => {
                    out.insert(r.id.clone(), r);
                }
                Some(_) => {}
                None => warn!(path = %path.display(), "unreadable journal entry skipped"),
            }
        }
        out
    }
}

/// Now, to the second (records carry whole seconds).
fn now_s() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// Writes a file so that a crash leaves the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        uuid::Uuid::new_v4().simple()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
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
