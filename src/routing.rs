//! The cluster side of a node: what it tells the others about itself, and
//! how a request that reaches it finds the node that should serve it.
//!
//! - The publisher worker gossips this node's [`NodeFacts`] (memory, AIO,
//!   slots, layers held, environments) at once after every change of a
//!   record or reservation, and every few seconds anyway.
//! - A new environment is ranked by [`placement::rank`] on the gossiped
//!   view, then offered to the candidates in [`placement::attempt_order`]
//!   (near-equal candidates in random order, so concurrent requests at
//!   different nodes spread out). Each candidate re-checks its real local
//!   state before it reserves: stale gossip costs a refusal, never an
//!   overcommit. A candidate that does not answer costs one short timeout.
//! - Reads and deletes of an environment go to the node that owns it. A
//!   node that stopped answering gossip has its environments shown `lost`;
//!   nothing is ever started elsewhere in their place.
//!
//! Requests between nodes carry [`LOCAL_HEADER`]: "handle this here", so a
//! forwarded request is never forwarded again. Every one of them is signed
//! with the cluster's HTTP key ([`Cluster::peer_client`], `peer_auth.rs`):
//! the receiver honours the header only on a call it verified. Peers are
//! called only at an `http` address that passed the gossip checks
//! ([`NodeView::http_addr`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::client::Client;
use crate::cluster::keys::EnvSummary;
use crate::cluster::seal::{SealControl, SealStats, Sealer};
use crate::cluster::{ClusterError, ClusterView, Gossip, GossipConfig, NodeFacts, NodeView, Role};
use crate::config::{SealMode, Settings};
use crate::envs::{EnvError, Envs};
use crate::keyring::Keyring;
use crate::model::{EnvRecord, EnvRequest, EnvSpec, EnvStatus, GossipSecurity, NodeReason};
use crate::peer_auth::{NonceCache, PeerPolicy, NONCE_CACHE_CAP};
use crate::placement::{self, Placement, PlacementRequest};
use crate::store::Manifest;

/// Header on node-to-node requests: serve locally, do not route.
pub const LOCAL_HEADER: &str = "x-shoal-local";

/// Header on a forwarded create: how many milliseconds the sender still
/// waits for the answer. The receiver counts them on its own monotonic
/// clock from when it read the request, plus any stall it just came out of
/// ([`StallWatch`]), so two hosts' wall clocks are never compared. A node
/// that reads the request too late (it was frozen or slow) refuses it
/// rather than start an environment nobody knows of.
pub const BUDGET_HEADER: &str = "x-shoal-budget-ms";

/// Kept out of the budget a sender gives: the answer's way back.
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// Whether a forwarded create with `budget` is too late to serve: it may
/// have waited `stalled` unread before this node read it, and the node has
/// spent `elapsed` on it since (pure).
pub fn too_late(budget: Duration, stalled: Duration, elapsed: Duration) -> bool {
    stalled + elapsed >= budget
}

/// How often the stall watch ticks.
const STALL_TICK: Duration = Duration::from_millis(100);
/// A gap between ticks shorter than this is scheduling noise, not a stall.
const STALL_MIN: Duration = Duration::from_millis(500);
/// Requests that queued up during a stall are read within this after it.
const STALL_WINDOW: Duration = Duration::from_secs(1);

/// Notices when this process could not run (frozen by SIGSTOP, starved):
/// a request read right after such a stall may have waited in the kernel's
/// queue as long as the stall lasted, which no clock of the request shows.
/// A std mutex: held only to read or record the last tick.
pub struct StallWatch {
    ticks: Mutex<(
        tokio::time::Instant,
        Option<(tokio::time::Instant, Duration)>,
    )>,
}

impl Default for StallWatch {
    fn default() -> Self {
        StallWatch {
            ticks: Mutex::new((tokio::time::Instant::now(), None)),
        }
    }
}

impl StallWatch {
    fn tick(&self, now: tokio::time::Instant) {
        let mut t = self.ticks.lock();
        let gap = now.saturating_duration_since(t.0);
        if gap >= STALL_MIN {
            t.1 = Some((now, gap));
        }
        t.0 = now;
    }

    /// How long a request read at `now` may have waited unread: the stall
    /// going on (no tick for a while), or one that ended just before.
    pub fn stalled(&self, now: tokio::time::Instant) -> Duration {
        let t = self.ticks.lock();
        let ongoing = now.saturating_duration_since(t.0);
        let ongoing = if ongoing >= STALL_MIN {
            ongoing
        } else {
            Duration::ZERO
        };
        let recent = match t.1 {
            Some((end, len)) if now.saturating_duration_since(end) < STALL_WINDOW => {
                len + now.saturating_duration_since(end)
            }
            _ => Duration::ZERO,
        };
        ongoing.max(recent)
    }

    /// The watch's loop (the `stall-watch` worker).
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(STALL_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick(tokio::time::Instant::now());
        }
    }
}

/// Load throughput assumed for a node that has not measured its own:
/// bytes/s (the seed's lz4 + `docker load` did about 100 MB/s).
pub const DEFAULT_LOAD_BPS: u64 = 100_000_000;

/// How long a node-to-node call may take before the next candidate.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// At most this many peer calls of one fan-out (a cluster-wide list, an
/// unknown id asked of everyone) are in flight at once...
pub const FANOUT_CONCURRENCY: usize = 16;

/// ...and a whole fan-out ends by this deadline: a peer that has not
/// answered by then counts as not answering.
pub const FANOUT_DEADLINE: Duration = Duration::from_secs(5);

/// Runs peer calls with bounded concurrency and one deadline for all;
/// results in the order of `calls`, `None` for a call cut by the deadline.
pub async fn fan_out<T, F>(calls: Vec<F>) -> Vec<Option<T>>
where
    F: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + FANOUT_DEADLINE;
    let permits = tokio::sync::Semaphore::new(FANOUT_CONCURRENCY);
    let bounded: Vec<_> = calls
        .into_iter()
        .map(|c| bounded_call(&permits, deadline, c))
        .collect();
    futures::future::join_all(bounded).await
}

async fn bounded_call<F: std::future::Future>(
    permits: &tokio::sync::Semaphore,
    deadline: tokio::time::Instant,
    call: F,
) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, async {
        let _permit = permits.acquire().await.ok()?;
        Some(call.await)
    })
    .await
    .ok()
    .flatten()
}

/// How often held layers are re-read from the engine.
const LAYER_REFRESH: Duration = Duration::from_secs(10);

/// The gossiping side of this node.
pub struct Cluster {
    /// `None` after shutdown. A tokio mutex: `publish` awaits inside.
    gossip: tokio::sync::Mutex<Option<Gossip>>,
    /// The latest view, updated by the gossip observer on every change;
    /// read without locking by request handlers.
    view: watch::Receiver<ClusterView>,
    envs: Arc<Envs>,
    /// `host:port` other nodes reach this node's API at.
    http_addr: String,
    storage_driver: String,
    roles: BTreeSet<Role>,
    /// Short chain-id prefixes of the layers the engine holds.
    layers: Mutex<BTreeSet<String>>,
    /// This process's recent stalls, for the budget of forwarded creates.
    stalls: Arc<StallWatch>,
    /// The cluster keyring (`None`: unsealed gossip, `--insecure-gossip`);
    /// replaced by [`Cluster::reload_keys`]. A std lock, held only to clone.
    keyring: std::sync::RwLock<Option<Arc<Keyring>>>,
    seal: SealControl,
    cluster_id: String,
    insecure: bool,
    /// Signs this node's calls to others and says which calls it honours
    /// (from the keyring's HTTP keys and the seal mode).
    /// Replaced on `SIGHUP` with the keyring; a std lock held only to
    /// clone or swap it.
    peer_policy: std::sync::RwLock<PeerPolicy>,
    /// The replay cache, kept across reloads (a call accepted before a
    /// reload is still a replay after it).
    peer_nonces: Arc<Mutex<NonceCache>>,
    seal_stats: Arc<SealStats>,
    /// Creates this node forwarded that gossip may not show yet
    /// ([`Placements`]). A std mutex: held only to look up or record.
    placed: Mutex<Placements>,
    /// The revoked token ids this node gossips (`auth.rs`), set by the
    /// revocation worker.
    revoked: Mutex<BTreeMap<String, u64>>,
}

/// Why a request could not be routed or served.
#[derive(Debug)]
pub struct RouteError {
    pub status: StatusCode,
    pub error: String,
    pub reasons: Vec<NodeReason>,
}

/// What a node answered, passed through as it is.
pub struct Forwarded {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Cluster {
    /// Joins the cluster (or starts it, with no seeds) over UDP.
    pub async fn start(
        settings: &Settings,
        envs: Arc<Envs>,
        http_addr: String,
        storage_driver: String,
        keyring: Option<Arc<Keyring>>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let mut cfg = GossipConfig::new(&settings.cluster_id, &settings.name, settings.gossip);
        cfg.advertise_addr = settings.advertise;
        cfg.seeds = settings.seeds.clone();
        cfg.gossip_interval = settings.gossip_interval;
        cfg.phi_threshold = settings.phi_threshold as f64;
        cfg.dead_node_grace_period = settings.dead_node_grace;
        let roles = settings
            .roles
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect();
        let peer_nonces = Arc::new(Mutex::new(NonceCache::new(NONCE_CACHE_CAP)));
        let me = Cluster {
            gossip: tokio::sync::Mutex::new(None),
            view: watch::channel(ClusterView::default()).1,
            envs,
            http_addr,
            storage_driver,
            roles,
            layers: Mutex::default(),
            stalls: Arc::default(),
            peer_policy: std::sync::RwLock::new(PeerPolicy::with_cache(
                &settings.name,
                keyring.as_deref(),
                settings.gossip_seal,
                peer_nonces.clone(),
            )),
            peer_nonces,
            seal: SealControl::new(
                settings.gossip_seal,
                keyring
                    .as_ref()
                    .map(|k| Sealer::new(&k.gossip_keys(), &settings.cluster_id)),
            ),
            keyring: std::sync::RwLock::new(keyring),
            cluster_id: settings.cluster_id.clone(),
            insecure: settings.insecure_gossip,
            seal_stats: Arc::default(),
            placed: Mutex::new(Placements::default()),
            revoked: Mutex::default(),
        };
        me.refresh_layers().await;
        let gossip =
            Gossip::start_udp(cfg, &me.facts(), me.seal.clone(), me.seal_stats.clone()).await?;
        let view = gossip.changes();
        *me.gossip.lock().await = Some(gossip);
        Ok(Arc::new(Cluster { view, ..me }))
    }

    /// The cluster keyring, primary first (`None` with unsealed gossip).
    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the keyring and the seal mode while gossip runs (`SIGHUP`):
    /// the next datagram is sealed with the new primary, and every key of
    /// the new keyring opens. Peers never stop hearing this node.
    pub fn reload_keys(&self, mode: SealMode, keyring: Option<Arc<Keyring>>) {
        self.seal.set(
            mode,
            keyring
                .as_ref()
                .map(|k| Sealer::new(&k.gossip_keys(), &self.cluster_id)),
        );
        let policy = PeerPolicy::with_cache(
            self.envs.settings().name.as_str(),
            keyring.as_deref(),
            mode,
            self.peer_nonces.clone(),
        );
        tracing::info!(
            peer_calls = policy.mode(),
            "node-to-node call keys reloaded"
        );
        *self.peer_policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = keyring;
    }

    /// How this node's gossip is protected, for `GET /v1/node`.
    pub fn gossip_security(&self) -> GossipSecurity {
        GossipSecurity {
            mode: self.seal.mode().as_str().to_string(),
            insecure: self.insecure,
            key_ids: self
                .keyring()
                .as_ref()
                .map(|k| k.ids().iter().map(|i| i.to_string()).collect())
                .unwrap_or_default(),
            datagrams: self.seal_stats.snapshot(),
        }
    }

    /// The chain-id prefixes of the layers the engine holds, as last read
    /// (`GET /v1/node/layers`).
    pub fn layers(&self) -> BTreeSet<String> {
        self.layers.lock().clone()
    }

    /// This node's facts as they stand now.
    pub fn facts(&self) -> NodeFacts {
        let s = self.envs.settings();
        let c = self.envs.committed();
        let (aio_max, aio_in_use) = crate::host::aio().unwrap_or((0, 0));
        let envs = self
            .envs
            .list()
            .into_iter()
            .map(|r| {
                (
                    r.id.clone(),
                    EnvSummary {
                        id: r.id,
                        image: r.image.to_string(),
                        owner: r.owner,
                        status: r.status.to_string(),
                        memory: r.memory,
                        endpoints: r.endpoints.iter().map(|e| e.to_string()).collect(),
                    },
                )
            })
            .collect();
        let engine = self.envs.engine_health();
        NodeFacts {
            engine: engine.state,
            engine_since: u64::try_from(engine.since.unix_timestamp()).ok(),
            store: self.envs.store().status().state,
            name: s.name.clone(),
            http_addr: self.http_addr.clone(),
            roles: self.roles.clone(),
            labels: s.labels.clone(),
            memory_total: crate::host::total_memory(),
            memory_allocatable: s.memory_allocatable,
            memory_committed: c.memory,
            aio_max,
            aio_in_use,
            aio_committed: c.aio,
            max_envs: s.max_envs,
            env_count: c.envs,
            draining: self.envs.is_draining(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            storage_driver: self.storage_driver.clone(),
            load_bps: self.envs.last_load_bps(),
            layers: self.layers.lock().clone(),
            layer_filter: None,
            envs,
            revoked: self.revoked.lock().clone(),
        }
    }

    /// The revoked token ids to gossip from now on.
    pub fn set_revoked(&self, revoked: &crate::auth::Revocations) {
        *self.revoked.lock() = revoked.iter().map(|(k, v)| (k.to_string(), v)).collect();
    }

    /// Every revocation the cluster's nodes gossip (alive or not).
    pub fn gossiped_revocations(&self) -> crate::auth::Revocations {
        let view = self.view();
        let now = crate::auth::now_secs();
        let mut all = crate::auth::Revocations::default();
        for n in &view.nodes {
            if let Some(f) = &n.facts {
                all.merge(
                    &crate::auth::Revocations::from_pairs(
                        f.revoked.iter().map(|(k, v)| (k.as_str(), *v)),
                        now,
                    ),
                    now,
                );
            }
        }
        all
    }

    /// Re-reads the layers the engine holds. Skipped while the engine is
    /// down: the last list stands (the layers are still on disk).
    async fn refresh_layers(&self) {
        if !self.envs.engine_health().state.is_ok() {
            return;
        }
        match self.envs.engine().held_chain_ids().await {
            Ok(held) => {
                let held: Vec<_> = held.into_iter().collect();
                *self.layers.lock() = placement::layer_prefixes(&held);
            }
            Err(e) => warn!(error = %e, "cannot list the engine's layers"),
        }
    }

    /// Gossips the current facts (only changed keys go out).
    pub async fn publish(&self) {
        let facts = self.facts();
        if let Some(g) = self.gossip.lock().await.as_ref() {
            g.publish(&facts).await;
        }
    }

    /// The `gossip-server` worker: ends (failed, with why) when the gossip
    /// server does. `None` after shutdown.
    pub async fn spawn_gossip_watch(&self) -> Option<tokio::task::JoinHandle<Result<(), String>>> {
        let ended = self.gossip.lock().await.as_ref()?.ended();
        Some(tokio::spawn(ended))
    }

    /// The stall watch's worker (see [`StallWatch`]).
    pub fn spawn_stall_watch(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.stalls.clone().run())
    }

    /// How long a request read at `now` may have waited unread.
    pub fn stalled(&self, now: tokio::time::Instant) -> Duration {
        self.stalls.stalled(now)
    }

    /// Publishes after every change, and at least every 2 s (memory and AIO
    /// in use move on their own); re-reads held layers every 10 s, and at
    /// once when the engine answers again.
    pub fn spawn_publisher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last_layers = tokio::time::Instant::now();
            let mut engine = me.envs.watch_engine();
            let mut engine_was_ok = engine.borrow().state.is_ok();
            loop {
                tokio::select! {
                    _ = me.envs.changed().notified() => {}
                    _ = engine.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let engine_ok = engine.borrow_and_update().state.is_ok();
                let back = engine_ok && !engine_was_ok;
                engine_was_ok = engine_ok;
                if back || last_layers.elapsed() >= LAYER_REFRESH {
                    // An engine that stops answering mid-refresh would hold
                    // the publisher for a whole call limit: publish that at
                    // once instead (the last layer list stands).
                    let mut down = me.envs.watch_engine();
                    tokio::select! {
                        _ = me.refresh_layers() => {}
                        _ = down.wait_for(|h| !h.state.is_ok()) => {}
                    }
                    last_layers = tokio::time::Instant::now();
                }
                me.publish().await;
            }
        })
    }

    /// `Ok` while this node gossips (for `/healthz`).
    pub async fn gossip_running(&self) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(1), self.gossip.lock()).await {
            Err(_) => Err("the gossip state is locked for over 1s".into()),
            Ok(g) => match g.as_ref() {
                None => Err("the node left the cluster".into()),
                Some(g) => g.running(),
            },
        }
    }

    /// The cluster as gossip shows it now (fresh, with heartbeat ages).
    pub async fn view_now(&self) -> ClusterView {
        match self.gossip.lock().await.as_ref() {
            Some(g) => g.view().await,
            None => self.view.borrow().clone(),
        }
    }

    /// The raw gossip state (`GET /v1/gossip`); `None` after shutdown.
    pub async fn gossip_state(&self) -> Option<crate::cluster::inspect::GossipState> {
        Some(self.gossip.lock().await.as_ref()?.state().await)
    }

    /// The latest view without waiting for the gossip lock.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// Ranks the nodes for an environment of `m`.
    pub fn placement(&self, req: &PlacementRequest, m: &Manifest) -> Placement {
        let mut view = self.view();
        // Our own facts fresh, not as last gossiped.
        if let Some(me) = view.nodes.iter_mut().find(|n| n.is_self) {
            me.facts = Some(self.facts().normalized());
        }
        placement::rank(&view.nodes, req, &placement::layers_of(m), DEFAULT_LOAD_BPS)
    }

    /// How this node signs and checks node-to-node calls.
    pub fn peer_policy(&self) -> PeerPolicy {
        self.peer_policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A client for node-to-node calls to `node`: at its checked `http`
    /// address, with [`LOCAL_HEADER`], every request signed. `None` when
    /// the node has no usable address.
    pub fn peer_client(&self, node: &NodeView, timeout: Duration) -> Option<Client> {
        let addr = node.http_addr()?;
        let c = Client::new(&format!("http://{addr}"), timeout)
            .ok()?
            .with_header(LOCAL_HEADER, "1");
        Some(match self.peer_policy().signer() {
            Some(auth) => c.signed(auth.clone(), &node.name),
            None => c,
        })
    }

    /// The headers of a node-to-node call to node `to` made without
    /// [`Client`] (the event relay): [`LOCAL_HEADER`] and the signature.
    pub fn peer_headers(&self, method: &str, path: &str, to: &str) -> Vec<(&'static str, String)> {
        let mut out = vec![(LOCAL_HEADER, "1".to_string())];
        if let Some(auth) = self.peer_policy().signer() {
            let s = auth.sign(method, path, b"", to);
            out.extend(s.headers().map(|(k, v)| (k, v.to_string())));
        }
        out
    }

    fn peer(&self, node: &NodeView) -> Option<Client> {
        self.peer_client(node, PEER_TIMEOUT)
    }

    /// Places a new environment: tries the ranked candidates in turn until
    /// one reserves. `body` is the request as received, forwarded as is.
    /// `spec` is the request checked against the image (what nodes reserve).
    pub async fn create(
        &self,
        body: &Bytes,
        req: &EnvRequest,
        spec: EnvSpec,
        manifest: Manifest,
    ) -> Result<Forwarded, RouteError> {
        let preq = PlacementRequest {
            memory: spec.memory,
            aio: spec.aio,
            constraints: req.constraints.clone().unwrap_or_default(),
        };
        let placed = self.placement(&preq, &manifest);
        for (_, r) in &placed.rejected {
            self.envs.metrics().placement_refused(r.kind());
        }
        let mut reasons: Vec<NodeReason> = placed
            .rejected
            .iter()
            .map(|(node, r)| NodeReason {
                node: node.clone(),
                reason: r.to_string(),
                resource: r.resource().map(String::from),
            })
            .collect();
        let seed: u64 = rand::thread_rng().gen();
        let view = self.view();
        for cand in placement::attempt_order(&placed.ranked, seed) {
            let Some(node) = view.node(&cand.node) else {
                continue;
            };
            if node.is_self {
                match self.envs.create(spec.clone(), manifest.clone()) {
                    Ok(rec) => {
                        return Ok(Forwarded {
                            status: StatusCode::ACCEPTED,
                            body: serde_json::to_vec(&rec).expect("serializes").into(),
                        })
                    }
                    Err(
                        e @ (EnvError::Refused { .. }
                        | EnvError::Draining(_)
                        | EnvError::DiskFull { .. }
                        | EnvError::EngineDown { .. }
                        | EnvError::Store(crate::store::StoreError::Unavailable { .. })),
                    ) => {
                        let resource = match &e {
                            EnvError::Refused { shortage, .. } => shortage.resource(),
                            EnvError::DiskFull { .. } => "disk",
                            EnvError::EngineDown { .. } => "engine",
                            EnvError::Store(_) => "store",
                            _ => "draining",
                        };
                        reasons.push(NodeReason {
                            node: cand.node.clone(),
                            reason: e.to_string(),
                            resource: Some(resource.into()),
                        });
                        continue;
                    }
                    Err(e) => {
                        return Err(RouteError {
                            status: StatusCode::INTERNAL_SERVER_ERROR,
                            error: e.to_string(),
                            reasons,
                        })
                    }
                }
            }
            let Some(client) = self.peer(node) else {
                continue;
            };
            let budget = PEER_TIMEOUT.saturating_sub(ANSWER_MARGIN);
            let client = client.with_header(BUDGET_HEADER, &budget.as_millis().to_string());
            match client
                .send_raw(hyper::Method::POST, "/v1/environments", Some(body.to_vec()))
                .await
            {
                Ok((status, answer)) if status == StatusCode::ACCEPTED => {
                    debug!(node = %cand.node, "placed");
                    self.remember(&cand.node, &answer);
                    return Ok(Forwarded {
                        status,
                        body: answer,
                    });
                }
                Ok((status, answer)) if status == StatusCode::SERVICE_UNAVAILABLE => {
                    let (why, resource) =
                        match serde_json::from_slice::<crate::model::ErrorBody>(&answer) {
                            Ok(b) => (b.error, b.resource),
                            Err(_) => (String::from_utf8_lossy(&answer).into_owned(), None),
                        };
                    reasons.push(NodeReason {
                        node: cand.node.clone(),
                        reason: why,
                        resource,
                    });
                }
                // The candidate does not take this node's signature (another
                // cluster key): it is not one of ours, try the next.
                Ok((status, answer)) if status == StatusCode::UNAUTHORIZED => {
                    let why = serde_json::from_slice::<crate::model::ErrorBody>(&answer)
                        .map(|b| b.error)
                        .unwrap_or_default();
                    warn!(node = %cand.node, error = %why, "candidate refused this node's signed call");
                    reasons.push(NodeReason {
                        node: cand.node.clone(),
                        reason: format!("refused this node's signed call: {why}"),
                        resource: None,
                    });
                }
                // Anything else (a bad request) would be the same anywhere.
                Ok((status, answer)) => {
                    return Ok(Forwarded {
                        status,
                        body: answer,
                    })
                }
                Err(e) => {
                    warn!(node = %cand.node, error = %e, "candidate unreachable");
                    reasons.push(NodeReason {
                        node: cand.node.clone(),
                        reason: format!("unreachable: {e}"),
                        resource: None,
                    });
                }
            }
        }
        info!(image = %spec.image, refusals = reasons.len(), "no node could take the environment");
        Err(RouteError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: format!(
                "no node can take an environment of {} ({} memory, {} aio)",
                spec.image,
                crate::units::format_size(spec.memory),
                spec.aio
            ),
            reasons,
        })
    }

    /// The node that gossips environment `id`, with its summary.
    pub fn owner_of(&self, id: &str) -> Option<(NodeView, EnvSummary)> {
        let view = self.view();
        view.nodes.into_iter().find_map(|n| {
            let s = n.facts.as_ref()?.envs.get(id)?.clone();
            Some((n, s))
        })
    }

    /// Sends a read or delete of environment `id` to its owner. `None` when
    /// no node gossips it.
    pub async fn forward_env(
        &self,
        method: hyper::Method,
        id: &str,
    ) -> Option<Result<Forwarded, RouteError>> {
        self.forward_env_call(method, id, "", None).await
    }

    /// Sends a call on environment `id` (`/v1/environments/{id}{suffix}`,
    /// with an optional JSON body) to its owner. `None` when no node
    /// gossips it.
    pub async fn forward_env_call(
        &self,
        method: hyper::Method,
        id: &str,
        suffix: &str,
        body: Option<Vec<u8>>,
    ) -> Option<Result<Forwarded, RouteError>> {
        // An id from a client goes into a peer's URL: only well-formed ones.
        if !crate::cluster::keys::valid_name(id) {
            return None;
        }
        let view = self.view();
        let gossiped = self.owner_of(id);
        let remembered = match &gossiped {
            // Gossip shows it: the entry's memory is no longer needed.
            Some(_) => {
                self.placed.lock().forget(id);
                None
            }
            None => self.placed.lock().get(id, std::time::Instant::now()),
        };
        let route = route_env(
            gossiped
                .as_ref()
                .map(|(n, _)| (n.name.as_str(), liveness(Some(n)))),
            remembered
                .as_ref()
                .map(|r| (r.node.as_str(), liveness(view.node(&r.node)))),
        );
        let node = match route {
            EnvRoute::AskEveryone => return self.ask_everyone(method, id, suffix, body).await,
            EnvRoute::Lost(node) => {
                if method == hyper::Method::GET && suffix.is_empty() {
                    let rec = match (&gossiped, &remembered) {
                        (Some((_, summary)), _) => lost_record(&node, summary),
                        (None, Some(r)) => r.lost(),
                        (None, None) => return None,
                    };
                    return Some(Ok(Forwarded {
                        status: StatusCode::OK,
                        body: serde_json::to_vec(&rec).expect("serializes").into(),
                    }));
                }
                return Some(Err(RouteError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    error: format!("environment {id} is on node {node}, which is unreachable"),
                    reasons: Vec::new(),
                }));
            }
            EnvRoute::Ask(name) => match gossiped {
                Some((n, _)) => n,
                None => view.node(&name)?.clone(),
            },
        };
        let client = self.peer(&node)?;
        Some(
            client
                .send_raw(method, &format!("/v1/environments/{id}{suffix}"), body)
                .await
                .map_err(|e| e.to_string())
                .and_then(|(status, body)| refused_by_peer(status, &body))
                .map(|(status, body)| Forwarded { status, body })
                .map_err(|e| RouteError {
                    status: StatusCode::BAD_GATEWAY,
                    error: format!(
                        "node {} owns environment {id} but did not answer: {e}",
                        node.name
                    ),
                    reasons: Vec::new(),
                }),
        )
    }

    /// For an environment gossip does not show yet (created a moment ago
    /// on another node): asks every live node, and the one that has it
    /// answers.
    async fn ask_everyone(
        &self,
        method: hyper::Method,
        id: &str,
        suffix: &str,
        call_body: Option<Vec<u8>>,
    ) -> Option<Result<Forwarded, RouteError>> {
        let view = self.view();
        let path = format!("/v1/environments/{id}");
        let peers: Vec<Client> = view
            .nodes
            .iter()
            .filter(|n| !n.is_self && n.alive && !n.left)
            .filter_map(|n| self.peer(n))
            .collect();
        let asks = peers
            .iter()
            .map(|c| c.send_raw(hyper::Method::GET, &path, None));
        let found = fan_out(asks.collect())
            .await
            .into_iter()
            .zip(&peers)
            .find_map(|(r, c)| match r {
                Some(Ok((StatusCode::OK, body))) => Some((c.clone(), body)),
                _ => None,
            });
        let (client, body) = found?;
        let lost = serde_json::from_slice::<EnvRecord>(&body)
            .ok()
            .filter(|r| r.status == EnvStatus::Lost);
        if let (Some(r), false) = (&lost, method == hyper::Method::GET && suffix.is_empty()) {
            return Some(Err(RouteError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: format!(
                    "environment {id} is on node {}, which is unreachable",
                    r.node
                ),
                reasons: Vec::new(),
            }));
        }
        if method == hyper::Method::GET && suffix.is_empty() {
            return Some(Ok(Forwarded {
                status: StatusCode::OK,
                body,
            }));
        }
        Some(
            client
                .send_raw(method, &format!("{path}{suffix}"), call_body)
                .await
                .map_err(|e| e.to_string())
                .and_then(|(status, body)| refused_by_peer(status, &body))
                .map(|(status, body)| Forwarded { status, body })
                .map_err(|e| RouteError {
                    status: StatusCode::BAD_GATEWAY,
                    error: format!("the node that owns environment {id} did not answer: {e}"),
                    reasons: Vec::new(),
                }),
        )
    }

    /// Every environment in the cluster: this node's records, each live
    /// node's own list, and, for nodes that do not answer, what gossip last
    /// said of their environments, shown `lost` when the node is dead.
    pub async fn all_envs(&self) -> Vec<EnvRecord> {
        let mut out = self.envs.list();
        let view = self.view();
        let others: Vec<_> = view.nodes.iter().filter(|n| !n.is_self).collect();
        let calls = others.iter().map(|n| async move {
            let from_gossip = |status: Option<EnvStatus>| -> Vec<EnvRecord> {
                n.facts
                    .iter()
                    .flat_map(|f| f.envs.values())
                    .map(|s| {
                        let mut r = lost_record(&n.name, s);
                        if let Some(st) = status {
                            r.status = st;
                        } else if let Ok(st) =
                            serde_json::from_value(serde_json::Value::String(s.status.clone()))
                        {
                            r.status = st;
                        }
                        r
                    })
                    .collect()
            };
            if !n.alive || n.left {
                return from_gossip(Some(EnvStatus::Lost));
            }
            let Some(client) = self.peer(n) else {
                return Vec::new();
            };
            match client.get::<Vec<EnvRecord>>("/v1/environments").await {
                Ok(list) => list,
                Err(e) => {
                    warn!(node = %n.name, error = %e, "node did not list its environments");
                    from_gossip(None)
                }
            }
        });
        for (list, n) in fan_out(calls.collect()).await.into_iter().zip(&others) {
            match list {
                Some(list) => out.extend(list),
                None => {
                    warn!(node = %n.name, "node did not list its environments in time");
                    out.extend(
                        n.facts
                            .iter()
                            .flat_map(|f| f.envs.values())
                            .map(|s| lost_record(&n.name, s)),
                    );
                }
            }
        }
        for rec in self.remembered_lost_all(&view) {
            if !out.iter().any(|r| r.id == rec.id) {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// Remembers a create forwarded to `node` that it accepted (`answer`:
    /// its 202 body), until gossip shows it ([`Placements`]).
    fn remember(&self, node: &str, answer: &Bytes) {
        let Ok(rec) = serde_json::from_slice::<EnvRecord>(answer) else {
            warn!(node = %node, "accepted create without a readable record, not remembered");
            return;
        };
        let view = self.view();
        let now = std::time::Instant::now();
        let mut placed = self.placed.lock();
        placed.prune(now, |id| {
            view.nodes
                .iter()
                .any(|n| n.facts.as_ref().is_some_and(|f| f.envs.contains_key(id)))
        });
        placed.insert(node, rec, now);
    }

    /// Environment `id` as this node remembers placing it, shown `lost`
    /// when its node is down and gossip never listed it (what this node
    /// answers a peer's local read of it; `None` otherwise).
    pub fn remembered_lost(&self, id: &str) -> Option<EnvRecord> {
        let r = self.placed.lock().get(id, std::time::Instant::now())?;
        let view = self.view();
        match route_env(None, Some((&r.node, liveness(view.node(&r.node))))) {
            EnvRoute::Lost(_) if self.owner_of(id).is_none() => Some(r.lost()),
            _ => None,
        }
    }

    fn remembered_lost_all(&self, view: &ClusterView) -> Vec<EnvRecord> {
        let now = std::time::Instant::now();
        let placed = self.placed.lock().all(now);
        placed
            .into_iter()
            .filter(|r| liveness(view.node(&r.node)) != Liveness::Alive)
            .filter(|r| {
                !view.nodes.iter().any(|n| {
                    n.facts
                        .as_ref()
                        .is_some_and(|f| f.envs.contains_key(&r.rec.id))
                })
            })
            .map(|r| r.lost())
            .collect()
    }

    /// Says goodbye to the cluster.
    pub async fn shutdown(&self) {
        if let Some(g) = self.gossip.lock().await.take() {
            if let Err(e) = g.shutdown().await {
                warn!(error = %e, "leaving the cluster");
            }
        }
    }
}

/// How the view shows a node, for [`route_env`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Dead per the failure detector, or left.
    Down,
    /// Not in the view at all (dropped after its dead grace period).
    Unknown,
}

fn liveness(n: Option<&NodeView>) -> Liveness {
    match n {
        None => Liveness::Unknown,
        Some(n) if n.alive && !n.left => Liveness::Alive,
        Some(_) => Liveness::Down,
    }
}

/// Where a call on an environment goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvRoute {
    /// To this node, which owns it.
    Ask(String),
    /// Nowhere: its node (named) is down; a read shows it `lost`.
    Lost(String),
    /// Nobody is known to have it: ask every live node.
    AskEveryone,
}

/// Routes a call on an environment (pure). `gossiped`: the node whose
/// gossip lists it; `remembered`: the node this node forwarded its create
/// to ([`Placements`]), for an environment gossip does not show yet. Gossip
/// wins; a remembered node is asked directly while it is alive, and its
/// environment is `lost` once it is down or gone from the view (it
/// accepted the create, so the environment may run there).
pub fn route_env(
    gossiped: Option<(&str, Liveness)>,
    remembered: Option<(&str, Liveness)>,
) -> EnvRoute {
    match (gossiped, remembered) {
        (Some((n, Liveness::Alive)), _) => EnvRoute::Ask(n.to_string()),
        (Some((n, _)), _) => EnvRoute::Lost(n.to_string()),
        (None, Some((n, Liveness::Alive))) => EnvRoute::Ask(n.to_string()),
        (None, Some((n, _))) => EnvRoute::Lost(n.to_string()),
        (None, None) => EnvRoute::AskEveryone,
    }
}

/// At most this many forwarded creates are remembered (the oldest go).
pub const PLACED_CAP: usize = 1024;
/// How long a forwarded create is remembered when its answer names no
/// expiry: gossip lists a new environment within seconds, so this only
/// matters for a node that died before it did.
pub const PLACED_TTL: Duration = Duration::from_secs(3600);

/// One create this node forwarded and the other node accepted.
#[derive(Debug, Clone)]
pub struct PlacedEnv {
    pub node: String,
    /// The accepting node's 202 answer (id, owner, image, created_at, …).
    pub rec: EnvRecord,
    /// Forgotten after this.
    pub until: std::time::Instant,
}

impl PlacedEnv {
    /// The record shown while its node is down.
    pub fn lost(&self) -> EnvRecord {
        let mut r = self.rec.clone();
        r.node = self.node.clone();
        r.status = EnvStatus::Lost;
        r.error = Some(format!(
            "node {} is unreachable (it accepted this environment before it went down)",
            self.node
        ));
        r
    }
}

/// The entry node's memory of the creates it forwarded, for the moment
/// between a node's 202 and its gossip listing the environment: a node
/// killed in that moment would otherwise leave its environment unknown to
/// every other node (404 instead of `lost`). In memory only, bounded by
/// [`PLACED_CAP`], each entry kept until gossip shows the environment, or
/// until its expiry ([`PLACED_TTL`] when it has none): it is a hint for a
/// short window, and a journal write on every forward would put the
/// entry's disk in the path of every create. A crash of the entry node
/// loses it (the owner's own journal still has the environment, which
/// shows again when the owner is back).
#[derive(Debug, Default)]
pub struct Placements {
    /// Oldest first.
    entries: std::collections::VecDeque<PlacedEnv>,
}

impl Placements {
    pub fn insert(&mut self, node: &str, rec: EnvRecord, now: std::time::Instant) {
        let ttl = rec
            .expires_at
            .map(|e| {
                let left = e - time::OffsetDateTime::now_utc();
                Duration::try_from(left).unwrap_or(Duration::ZERO)
            })
            .unwrap_or(PLACED_TTL)
            .max(Duration::from_secs(60));
        self.entries.retain(|e| e.rec.id != rec.id);
        self.entries.push_back(PlacedEnv {
            node: node.to_string(),
            rec,
            until: now + ttl,
        });
        while self.entries.len() > PLACED_CAP {
            self.entries.pop_front();
        }
    }

    /// Drops the expired entries and those `gossiped` says gossip lists.
    pub fn prune(&mut self, now: std::time::Instant, gossiped: impl Fn(&str) -> bool) {
        self.entries
            .retain(|e| e.until > now && !gossiped(e.rec.id.as_str()));
    }

    pub fn forget(&mut self, id: &str) {
        self.entries.retain(|e| e.rec.id != id);
    }

    pub fn get(&self, id: &str, now: std::time::Instant) -> Option<PlacedEnv> {
        self.entries
            .iter()
            .find(|e| e.rec.id == id && e.until > now)
            .cloned()
    }

    pub fn all(&self, now: std::time::Instant) -> Vec<PlacedEnv> {
        self.entries
            .iter()
            .filter(|e| e.until > now)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A peer's answer, unless it refused this node's signed call (401): that
/// is no answer to pass on to the client (who is not the one refused).
fn refused_by_peer(status: StatusCode, body: &Bytes) -> Result<(StatusCode, Bytes), String> {
    if status == StatusCode::UNAUTHORIZED {
        let why = serde_json::from_slice::<crate::model::ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_default();
        return Err(format!("it refused this node's signed call: {why}"));
    }
    Ok((status, body.clone()))
}

/// An environment as gossip last described it, on a node that does not
/// answer: status `lost`. Fields gossip does not carry are left empty
/// (`created_at` is the epoch).
pub fn lost_record(node: &str, s: &EnvSummary) -> EnvRecord {
    EnvRecord {
        id: s.id.clone(),
        image: s
            .image
            .parse()
            .unwrap_or_else(|_| crate::store::ImageRef::new("unknown", "unknown").expect("valid")),
        owner: s.owner.clone(),
        node: node.to_string(),
        status: EnvStatus::Lost,
        error: Some(format!("node {node} is unreachable")),
        memory: s.memory,
        aio: 0,
        env: Default::default(),
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        ready_at: None,
        endpoints: s
            .endpoints
            .iter()
            .filter_map(|e| {
                let (host, port) = e.rsplit_once(':')?;
                Some(crate::model::Endpoint {
                    port: 0,
                    host: host.to_string(),
                    host_port: port.parse().ok()?,
                })
            })
            .collect(),
        load: Default::default(),
        container: None,
        expires_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_cases() {
        let ms = Duration::from_millis;
        let check = |budget, stalled, elapsed, want| {
            assert_eq!(
                too_late(ms(budget), ms(stalled), ms(elapsed)),
                want,
                "{budget} {stalled} {elapsed}"
            );
        };
        check(2500, 0, 5, false);
        check(2500, 0, 2499, false);
        check(2500, 0, 2500, true);
        // Read right after a 10 s freeze: it may have waited all along.
        check(2500, 10_000, 1, true);
        check(2500, 2000, 400, false);
        check(2500, 2000, 600, true);
        check(0, 0, 0, true);
    }

    #[test]
    fn env_route_table() {
        use Liveness::*;
        let ask = |n: &str| EnvRoute::Ask(n.into());
        let lost = |n: &str| EnvRoute::Lost(n.into());
        type Seen<'a> = Option<(&'a str, Liveness)>;
        let cases: Vec<(Seen, Seen, EnvRoute)> = vec![
            (None, None, EnvRoute::AskEveryone),
            (Some(("a", Alive)), None, ask("a")),
            (Some(("a", Down)), None, lost("a")),
            // Gossip wins over the entry's memory.
            (Some(("a", Alive)), Some(("b", Down)), ask("a")),
            (Some(("a", Down)), Some(("a", Alive)), lost("a")),
            // Accepted a moment ago, not gossiped yet: ask it directly...
            (None, Some(("b", Alive)), ask("b")),
            // ...and once it is down (killed before its gossip went out),
            // or dropped from the view, it is lost, not unknown.
            (None, Some(("b", Down)), lost("b")),
            (None, Some(("b", Unknown)), lost("b")),
        ];
        for (g, r, want) in cases {
            assert_eq!(route_env(g, r), want, "{g:?} {r:?}");
        }
    }

    fn rec(id: &str) -> EnvRecord {
        let s = EnvSummary {
            id: id.into(),
            image: "demo:1".into(),
            owner: "a@example.com".into(),
            status: "pending".into(),
            memory: 1 << 20,
            endpoints: vec![],
        };
        let mut r = lost_record("n1", &s);
        r.status = EnvStatus::Pending;
        r.error = None;
        r
    }

    #[test]
    fn placements_are_bounded_pruned_and_expire() {
        let t0 = std::time::Instant::now();
        let mut p = Placements::default();
        p.insert("n1", rec("e1"), t0);
        let got = p.get("e1", t0).expect("remembered");
        assert_eq!(got.node, "n1");
        let lost = got.lost();
        assert_eq!(lost.status, EnvStatus::Lost);
        assert_eq!(
            (lost.id.as_str(), lost.owner.as_str()),
            ("e1", "a@example.com")
        );
        assert!(lost.error.unwrap().contains("n1"));
        // Re-inserting an id replaces it.
        p.insert("n2", rec("e1"), t0);
        assert_eq!(p.len(), 1);
        assert_eq!(p.get("e1", t0).unwrap().node, "n2");
        // Expired: not returned, pruned.
        let later = t0 + PLACED_TTL + Duration::from_secs(1);
        assert!(p.get("e1", later).is_none());
        p.prune(later, |_| false);
        assert!(p.is_empty());
        // Gossip lists it: pruned.
        p.insert("n1", rec("e2"), t0);
        p.insert("n1", rec("e3"), t0);
        p.prune(t0, |id| id == "e2");
        assert!(p.get("e2", t0).is_none() && p.get("e3", t0).is_some());
        p.forget("e3");
        assert!(p.is_empty());
        // Bounded: the oldest go first.
        for i in 0..PLACED_CAP + 5 {
            p.insert("n1", rec(&format!("x{i}")), t0);
        }
        assert_eq!(p.len(), PLACED_CAP);
        assert!(p.get("x0", t0).is_none() && p.get("x4", t0).is_none());
        assert!(p.get("x5", t0).is_some());
        assert_eq!(p.all(t0).len(), PLACED_CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freeze_shows_as_a_stall_for_a_moment_after_it() {
        let watch = Arc::new(StallWatch::default());
        let task = tokio::spawn(watch.clone().run());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(watch.stalled(tokio::time::Instant::now()), Duration::ZERO);
        // The whole process stops for 10 s (SIGSTOP): no tick runs.
        let frozen_at = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        // Read before the watch ticked again: the stall is going on.
        assert!(watch.stalled(tokio::time::Instant::now()) >= Duration::from_secs(10));
        // And just after it ticked: it just ended.
        watch.tick(frozen_at + Duration::from_secs(10));
        assert!(watch.stalled(tokio::time::Instant::now()) >= Duration::from_secs(10));
        // A moment later it is history.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(watch.stalled(tokio::time::Instant::now()), Duration::ZERO);
        task.abort();
    }
}
