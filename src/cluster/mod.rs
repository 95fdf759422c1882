//! Cluster membership over chitchat gossip. The only module that imports
//! chitchat: it starts the gossip server, publishes this node's
//! [`NodeFacts`] (through [`keys`], which owns every key) and turns what the
//! node hears into a typed [`ClusterView`] of every node, alive or dead.
//!
//! There is no master: every node runs the same [`Gossip`] and sees the
//! whole cluster on its own. The view is a guide (it can be a few gossip
//! rounds stale); a node that is asked to take an environment re-checks its
//! real local state before it reserves anything.
//!
//! Dead nodes stay in the view, marked dead, for
//! [`GossipConfig::dead_node_grace_period`] so that their environments can
//! be shown `lost` rather than vanish. Nothing here ever moves work.

pub mod inspect;
pub mod keys;
pub mod phi;
pub mod seal;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::Transport;
use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use keys::{EnvSummary, KeyError, NodeFacts, Role};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad gossip config: {0}")]
    Config(String),
    #[error("cannot start gossip on {addr}: {reason}")]
    Start { addr: SocketAddr, reason: String },
    #[error("gossip server stopped: {0}")]
    Stopped(String),
}

/// How a node gossips. Built with [`GossipConfig::new`], which fills in the
/// defaults below; the daemon's config layer overrides fields from flags.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// Nodes only talk to nodes with the same cluster id.
    pub cluster_id: String,
    /// This node's name, unique in the cluster (1-64 of `A-Z a-z 0-9 . _ -`).
    pub node_name: String,
    /// UDP address the gossip socket binds.
    pub listen_addr: SocketAddr,
    /// UDP address peers use to reach this node (differs from `listen_addr`
    /// when binding 0.0.0.0).
    pub advertise_addr: SocketAddr,
    /// `host:port` of any members; empty for the first node.
    pub seeds: Vec<String>,
    /// One gossip round every this often. Default 500 ms.
    pub gossip_interval: Duration,
    /// Phi accrual threshold: a node is dead once the time since its last
    /// heartbeat exceeds `phi_threshold` × its mean heartbeat interval.
    /// Default 8 (with 500 ms rounds: ~4 s, at most ~8 s early on).
    pub phi_threshold: f64,
    /// Prior mean heartbeat interval used before enough samples exist.
    /// Default 1 s, so a node that dies right after joining is still seen
    /// dead within ~8 s (chitchat's default of 5 s would make that ~40 s).
    pub initial_interval: Duration,
    /// How long a dead node stays visible (as dead) before it is forgotten.
    /// Default 1 h (chitchat's is 24 h).
    pub dead_node_grace_period: Duration,
    /// How long deleted keys (tombstones) are kept so that peers learn of
    /// the deletion. Default 1 h.
    pub marked_for_deletion_grace_period: Duration,
    /// Generation id of this start; `None` takes unix time in milliseconds
    /// (strictly increasing within a process). Must grow on every start, or
    /// peers push the previous run's state back to the node.
    pub generation: Option<u64>,
    /// Keep [`Gossip::changes`] current (the observer task: every round it
    /// rebuilds the view when anything but heartbeats moved). Default on;
    /// off only in simulations of many members in one process
    /// (`benches/scale.rs`), where every member re-reading every member's
    /// facts on every change is n² work the protocol does not do.
    pub watch_views: bool,
}

/// Heartbeat intervals the failure detector keeps per peer.
pub const SAMPLING_WINDOW: usize = 100;

impl GossipConfig {
    pub fn new(cluster_id: &str, node_name: &str, listen_addr: SocketAddr) -> GossipConfig {
        GossipConfig {
            cluster_id: cluster_id.to_string(),
            node_name: node_name.to_string(),
            listen_addr,
            advertise_addr: listen_addr,
            seeds: Vec::new(),
            gossip_interval: Duration::from_millis(500),
            phi_threshold: 8.0,
            initial_interval: Duration::from_secs(1),
            dead_node_grace_period: Duration::from_secs(3600),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            generation: None,
            watch_views: true,
        }
    }

    /// Checks the config; the error names the bad field.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::Config(m));
        if !keys::valid_name(&self.node_name) {
            return bad(format!(
                "node name `{}` must be 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
                self.node_name
            ));
        }
        if self.cluster_id.is_empty() || !self.cluster_id.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(format!(
                "cluster id `{}` must be printable ascii",
                self.cluster_id
            ));
        }
        if self.gossip_interval.is_zero() {
            return bad("gossip interval must be positive".into());
        }
        if self.phi_threshold.is_nan() || self.phi_threshold <= 0.0 {
            return bad("phi threshold must be positive".into());
        }
        if self.advertise_addr.ip().is_unspecified() {
            return bad(format!(
                "advertise address {} is unspecified: give the address peers reach this node at",
                self.advertise_addr
            ));
        }
        Ok(())
    }

    fn chitchat_config(&self, generation: u64) -> ChitchatConfig {
        ChitchatConfig {
            chitchat_id: ChitchatId::new(self.node_name.as_str(), generation, self.advertise_addr),
            cluster_id: self.cluster_id.clone(),
            gossip_interval: self.gossip_interval,
            listen_addr: self.listen_addr,
            seed_nodes: self.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: self.phi_threshold,
                // Heartbeat intervals kept per peer: 100 is plenty for the
                // phi estimate, and at 1000 nodes chitchat's 1000 would be
                // 8 KB per peer per node (8 GB for a million peer states).
                sampling_window_size: SAMPLING_WINDOW,
                max_interval: phi::MAX_INTERVAL,
                initial_interval: self.initial_interval,
                dead_node_grace_period: self.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: self.marked_for_deletion_grace_period,
            catchup_callback: None,
            extra_liveness_predicate: None,
        }
    }
}

/// A generation id for a new start: unix milliseconds, bumped so that two
/// starts in one process (tests, restarts within a millisecond) differ.
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// One node as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub name: String,
    /// Its facts; `None` when they could not be read (see `facts_error`).
    pub facts: Option<NodeFacts>,
    pub facts_error: Option<String>,
    /// Why its gossiped `http` address is not used (see
    /// [`keys::check_http_addr`]); no node-to-node call goes to it then.
    pub http_error: Option<String>,
    /// Alive per the failure detector (this node is always alive).
    pub alive: bool,
    /// It said goodbye before it stopped (a clean leave, not a crash).
    pub left: bool,
    pub is_self: bool,
    /// Generation id of the run we hear from (unix ms of its start).
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    /// Its gossip heartbeat counter.
    pub heartbeat: u64,
    /// Time since its heartbeat last advanced, as observed here; `None`
    /// until observed once.
    #[serde(serialize_with = "ser_opt_secs")]
    pub last_seen: Option<Duration>,
    /// Phi of the failure detector as observed here ([`phi`]); `None`
    /// for this node and until two heartbeats were seen.
    pub phi: Option<f64>,
    /// Bytes of its gossiped keys and values ([`inspect::state_bytes`]).
    pub state_bytes: u64,
}

impl NodeView {
    /// Its HTTP API (`host:port`) when gossip told one that passed the
    /// checks; `None` otherwise. Every node-to-node call takes it from here.
    pub fn http_addr(&self) -> Option<&str> {
        if self.http_error.is_some() {
            return None;
        }
        self.facts.as_ref().map(|f| f.http_addr.as_str())
    }
}

fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// The cluster as this node sees it, one entry per node name, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct ClusterView {
    pub self_name: String,
    pub nodes: Vec<NodeView>,
}

impl ClusterView {
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The view without the fields that change on every heartbeat, for
    /// change detection.
    fn without_clock(&self) -> ClusterView {
        let mut v = self.clone();
        for n in &mut v.nodes {
            n.heartbeat = 0;
            n.last_seen = None;
            n.phi = None;
        }
        v
    }
}

/// When each node's heartbeat advanced, as observed here (for `last_seen`
/// and `phi`). Shared by [`Gossip::view`] and the observer task; a
/// parking_lot mutex because it is held only for map updates, never across
/// an await.
type SeenMap = Arc<Mutex<HashMap<ChitchatId, phi::HeartbeatWindow>>>;

/// A running gossip member.
pub struct Gossip {
    handle: ChitchatHandle,
    self_id: ChitchatId,
    gossip_interval: Duration,
    /// The failure detector's prior mean interval (for `phi`).
    prior: Duration,
    seen: SeenMap,
    changes: watch::Receiver<ClusterView>,
    /// The observer: every gossip round it records heartbeats (for
    /// `last_seen`) and sends the view on `changes` when membership,
    /// liveness or facts changed. Aborted on shutdown.
    observer: JoinHandle<()>,
}

impl Gossip {
    /// Starts gossiping on `cfg.listen_addr` through `transport` (the daemon
    /// passes `UdpTransport`, tests a `ChannelTransport`), publishing
    /// `initial`. The node's name in the facts is forced to `cfg.node_name`.
    pub async fn start(
        cfg: GossipConfig,
        initial: &NodeFacts,
        transport: &dyn Transport,
    ) -> Result<Gossip, ClusterError> {
        cfg.validate()?;
        let generation = cfg.generation.unwrap_or_else(next_generation);
        let mut facts = initial.clone();
        facts.name = cfg.node_name.clone();
        let handle = spawn_chitchat(
            cfg.chitchat_config(generation),
            keys::to_kv(&facts),
            transport,
        )
        .await
        .map_err(|e| ClusterError::Start {
            addr: cfg.listen_addr,
            reason: format!("{e:#}"),
        })?;
        let self_id = handle.chitchat_id().clone();
        tracing::info!(node = %cfg.node_name, generation, gossip = %cfg.advertise_addr, seeds = ?cfg.seeds, "gossip started");
        let seen: SeenMap = Arc::default();
        let chitchat = handle.chitchat();
        let first = {
            let guard = chitchat.lock().await;
            build_view(&guard, &self_id, &seen, cfg.initial_interval)
        };
        let (tx, changes) = watch::channel(first);
        let observer = if cfg.watch_views {
            tokio::spawn(observe(
                chitchat,
                self_id.clone(),
                seen.clone(),
                (cfg.gossip_interval, cfg.initial_interval),
                tx,
            ))
        } else {
            tokio::spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await
            })
        };
        Ok(Gossip {
            handle,
            self_id,
            gossip_interval: cfg.gossip_interval,
            prior: cfg.initial_interval,
            seen,
            changes,
            observer,
        })
    }

    /// Starts gossip over real UDP on `cfg.listen_addr`, sealed as `control`
    /// says (what the daemon uses; tests of the
    /// protocol use [`Gossip::start`] with a channel or a [`seal::MemWire`]).
    pub async fn start_udp(
        cfg: GossipConfig,
        initial: &NodeFacts,
        control: seal::SealControl,
        stats: Arc<seal::SealStats>,
    ) -> Result<Gossip, ClusterError> {
        let transport = seal::SealTransport::with_control(Arc::new(seal::UdpWire), control, stats)
            .advertising(cfg.advertise_addr);
        Gossip::start(cfg, initial, &transport).await
    }

    /// Completes when the gossip server ends: `Err` with why when it
    /// failed or panicked (a node that stops gossiping looks dead to the
    /// others while its API still answers), `Ok` after [`Gossip::shutdown`].
    pub fn ended(&self) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let server = self.handle.termination_watcher();
        async move {
            server
                .await
                .map_err(|e| format!("the gossip server stopped: {e:#}"))
        }
    }

    /// `Ok` while the gossip server and its observer run; else what ended.
    pub fn running(&self) -> Result<(), String> {
        use futures::FutureExt;
        if let Some(ended) = self.handle.termination_watcher().now_or_never() {
            return Err(match ended {
                Ok(()) => "the gossip server stopped".into(),
                Err(e) => format!("the gossip server stopped: {e}"),
            });
        }
        if self.observer.is_finished() {
            return Err("the gossip observer stopped".into());
        }
        Ok(())
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.self_id.node_id
    }

    /// This run's generation id.
    pub fn generation(&self) -> u64 {
        self.self_id.generation_id
    }

    /// Publishes `facts` as this node's state: only changed keys are set,
    /// removed envs and layers are deleted (tombstoned, so peers drop them).
    pub async fn publish(&self, facts: &NodeFacts) {
        let mut facts = facts.clone();
        facts.name = self.name().to_string();
        let new = keys::to_kv(&facts);
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        let state = guard.self_node_state();
        let diff = keys::diff_kv(state.key_values(), &new);
        if diff.is_empty() {
            return;
        }
        tracing::debug!(
            set = diff.set.len(),
            delete = diff.delete.len(),
            "publishing facts"
        );
        for (k, v) in diff.set {
            state.set(k, v);
        }
        for k in &diff.delete {
            state.delete(k);
        }
    }

    /// Every node this node knows, alive or dead.
    pub async fn view(&self) -> ClusterView {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        build_view(&guard, &self.self_id, &self.seen, self.prior)
    }

    /// The raw gossip state: every member chitchat holds, with its keys,
    /// versions and tombstones (`GET /v1/gossip`).
    pub async fn state(&self) -> inspect::GossipState {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        // Note the heartbeats first, so last_seen and phi are fresh.
        record_heartbeats(&guard, &self.self_id, &self.seen);
        inspect::build(&guard, &self.self_id, &self.seen, self.prior)
    }

    /// How many members this node's failure detector holds alive (itself
    /// included): cheap, for probes that need no facts.
    pub async fn alive_count(&self) -> usize {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        guard.live_nodes().count()
    }

    /// One node as this node sees it (its newest generation), without
    /// reading every other node's facts.
    pub async fn view_of(&self, name: &str) -> Option<NodeView> {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let id = guard
            .node_states()
            .keys()
            .filter(|id| &*id.node_id == name)
            .max_by_key(|id| id.generation_id)?
            .clone();
        let alive = guard.live_nodes().any(|l| *l == id);
        node_view(
            &guard,
            &id,
            &self.self_id,
            alive,
            &mut self.seen.lock(),
            (Instant::now(), self.prior),
        )
    }

    /// A stream of views: a new value whenever a node joins, dies, comes
    /// back or changes its facts (not on mere heartbeats).
    pub fn changes(&self) -> watch::Receiver<ClusterView> {
        self.changes.clone()
    }

    /// Leaves the cluster: says goodbye (`left`), gives peers two gossip
    /// rounds to hear it, then stops the gossip server. Peers show the node
    /// dead and left; its environments are untouched.
    pub async fn shutdown(self) -> Result<(), ClusterError> {
        {
            let chitchat = self.handle.chitchat();
            let mut guard = chitchat.lock().await;
            let (k, v) = keys::left_kv();
            guard.self_node_state().set(k, v);
        }
        tokio::time::sleep(self.gossip_interval * 2).await;
        self.observer.abort();
        tracing::info!(node = %self.self_id.node_id, "gossip stopped, left the cluster");
        self.handle
            .shutdown()
            .await
            .map_err(|e| ClusterError::Stopped(format!("{e:#}")))
    }

    /// Stops gossiping at once, without a goodbye: what peers see of a
    /// crash. For tests and fatal errors.
    pub async fn abort(self) {
        self.observer.abort();
        let _ = self.handle.shutdown().await;
    }
}

/// The observer task body (see [`Gossip::observer`]).
async fn observe(
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    self_id: ChitchatId,
    seen: SeenMap,
    (every, prior): (Duration, Duration),
    tx: watch::Sender<ClusterView>,
) {
    let mut tick = tokio::time::interval(every);
    let mut last: Option<u64> = None;
    loop {
        tick.tick().await;
        let view = {
            let guard = chitchat.lock().await;
            // Nothing but heartbeats moved: record them (for `last_seen`
            // and `phi`) and skip reading every node's facts again (at 1000
            // nodes a full view costs milliseconds, every round).
            let print = fingerprint(&guard);
            if last == Some(print) {
                record_heartbeats(&guard, &self_id, &seen);
                continue;
            }
            last = Some(print);
            build_view(&guard, &self_id, &seen, prior)
        };
        tx.send_if_modified(|old| {
            if old.without_clock() == view.without_clock() {
                false
            } else {
                *old = view;
                true
            }
        });
    }
}

/// One member's entry in the view; records its heartbeat in `seen`.
fn node_view(
    chitchat: &Chitchat,
    id: &ChitchatId,
    self_id: &ChitchatId,
    alive: bool,
    seen: &mut HashMap<ChitchatId, phi::HeartbeatWindow>,
    (now, prior): (Instant, Duration),
) -> Option<NodeView> {
    let state = chitchat.node_state(id)?;
    let heartbeat = u64::from(state.heartbeat());
    let is_self = id == self_id;
    let (last_seen, phi) = if is_self {
        (Some(Duration::ZERO), None)
    } else {
        let w = seen
            .entry(id.clone())
            .or_insert_with(|| phi::HeartbeatWindow::new(heartbeat, now));
        w.observe(heartbeat, now);
        (Some(w.last_seen(now)), w.phi(now, prior))
    };
    let (facts, facts_error) = match keys::from_kv(state.key_values()) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let http_error = facts
        .as_ref()
        .and_then(|f| keys::check_http_addr(&f.http_addr, id.gossip_advertise_addr.ip()).err());
    Some(NodeView {
        name: id.node_id.to_string(),
        facts,
        facts_error,
        http_error,
        alive,
        left: keys::has_left(state.key_values()),
        is_self,
        generation: id.generation_id,
        gossip_addr: id.gossip_advertise_addr,
        heartbeat,
        last_seen,
        phi,
        state_bytes: inspect::state_bytes(state),
    })
}

/// A hash of what the view shows besides heartbeats: every member's id and
/// state version, and which are alive.
fn fingerprint(chitchat: &Chitchat) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (id, state) in chitchat.node_states() {
        id.hash(&mut h);
        state.max_version().hash(&mut h);
    }
    for id in chitchat.live_nodes() {
        id.hash(&mut h);
    }
    h.finish()
}

/// Notes, for `last_seen` and `phi`, every other member's heartbeat.
fn record_heartbeats(chitchat: &Chitchat, self_id: &ChitchatId, seen: &SeenMap) {
    let now = Instant::now();
    let mut seen = seen.lock();
    for (id, state) in chitchat.node_states() {
        if id == self_id {
            continue;
        }
        let heartbeat = u64::from(state.heartbeat());
        seen.entry(id.clone())
            .or_insert_with(|| phi::HeartbeatWindow::new(heartbeat, now))
            .observe(heartbeat, now);
    }
}

fn build_view(
    chitchat: &Chitchat,
    self_id: &ChitchatId,
    seen: &SeenMap,
    prior: Duration,
) -> ClusterView {
    let now = Instant::now();
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    // One entry per node name: the newest generation. An older generation
    // of a restarted node lingers in chitchat (dead) until its grace period
    // ends; it is the past, not a second node.
    let mut newest: BTreeMap<&str, &ChitchatId> = BTreeMap::new();
    for id in chitchat.node_states().keys() {
        let e = newest.entry(&id.node_id).or_insert(id);
        if id.generation_id > e.generation_id {
            *e = id;
        }
    }
    newest.insert(&self_id.node_id, self_id);
    let mut seen = seen.lock();
    seen.retain(|id, _| chitchat.node_states().contains_key(id));
    let nodes = newest
        .into_values()
        .filter_map(|id| {
            let alive = live.contains(id);
            node_view(chitchat, id, self_id, alive, &mut seen, (now, prior))
        })
        .collect();
    ClusterView {
        self_name: self_id.node_id.to_string(),
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_grow() {
        let a = next_generation();
        let b = next_generation();
        assert!(b > a);
        assert!(a > 1_400_000_000_000);
    }

    #[test]
    fn config_validation_names_the_field() {
        let addr: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        assert!(GossipConfig::new("c", "node-1", addr).validate().is_ok());
        let err = GossipConfig::new("c", "nœud", addr).validate().unwrap_err();
        assert!(err.to_string().contains("node name"), "{err}");
        let mut cfg = GossipConfig::new("c", "n", "0.0.0.0:7946".parse().unwrap());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("advertise"));
        cfg.advertise_addr = addr;
        assert!(cfg.validate().is_ok());
    }
}
