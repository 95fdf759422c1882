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
//! forwarded request is never forwarded again.

use std::collections::BTreeSet;
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
use crate::cluster::{ClusterError, ClusterView, Gossip, GossipConfig, NodeFacts, NodeView, Role};
use crate::config::Settings;
use crate::envs::{EnvError, Envs};
use crate::model::{EnvRecord, EnvRequest, EnvSpec, EnvStatus, NodeReason};
use crate::placement::{self, Placement, PlacementRequest};
use crate::store::Manifest;

/// Header on node-to-node requests: serve locally, do not route.
pub const LOCAL_HEADER: &str = "x-shoal-local";

/// Header on a forwarded create: unix milliseconds after which the sender
/// has given up waiting. A node that reads the request later (it was frozen
/// or slow) refuses it rather than start an environment nobody knows of.
pub const DEADLINE_HEADER: &str = "x-shoal-deadline";

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        let me = Cluster {
            gossip: tokio::sync::Mutex::new(None),
            view: watch::channel(ClusterView::default()).1,
            envs,
            http_addr,
            storage_driver,
            roles,
            layers: Mutex::default(),
        };
        me.refresh_layers().await;
        let gossip = Gossip::start_udp(cfg, &me.facts()).await?;
        let view = gossip.changes();
        *me.gossip.lock().await = Some(gossip);
        Ok(Arc::new(Cluster { view, ..me }))
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
        NodeFacts {
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
            envs,
        }
    }

    async fn refresh_layers(&self) {
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

    /// Publishes after every change, and at least every 2 s (memory and AIO
    /// in use move on their own); re-reads held layers every 10 s.
    pub fn spawn_publisher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last_layers = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = me.envs.changed().notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                if last_layers.elapsed() >= LAYER_REFRESH {
                    me.refresh_layers().await;
                    last_layers = tokio::time::Instant::now();
                }
                me.publish().await;
            }
        })
    }

    /// The cluster as gossip shows it now (fresh, with heartbeat ages).
    pub async fn view_now(&self) -> ClusterView {
        match self.gossip.lock().await.as_ref() {
            Some(g) => g.view().await,
            None => self.view.borrow().clone(),
        }
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

    fn peer(&self, node: &NodeView) -> Option<Client> {
        let addr = &node.facts.as_ref()?.http_addr;
        Client::new(&format!("http://{addr}"), PEER_TIMEOUT)
            .ok()
            .map(|c| c.with_header(LOCAL_HEADER, "1"))
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
                    Err(e @ (EnvError::Refused { .. } | EnvError::Draining(_))) => {
                        let resource = match &e {
                            EnvError::Refused { shortage, .. } => shortage.resource(),
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
            let deadline = unix_ms() + PEER_TIMEOUT.as_millis() as u64;
            let client = client.with_header(DEADLINE_HEADER, &deadline.to_string());
            match client
                .send_raw(hyper::Method::POST, "/v1/environments", Some(body.to_vec()))
                .await
            {
                Ok((status, answer)) if status == StatusCode::ACCEPTED => {
                    debug!(node = %cand.node, "placed");
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
        let Some((node, summary)) = self.owner_of(id) else {
            return self.ask_everyone(method, id, suffix, body).await;
        };
        if !node.alive || node.left {
            if method == hyper::Method::GET {
                let rec = lost_record(&node.name, &summary);
                return Some(Ok(Forwarded {
                    status: StatusCode::OK,
                    body: serde_json::to_vec(&rec).expect("serializes").into(),
                }));
            }
            return Some(Err(RouteError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: format!(
                    "environment {id} is on node {}, which is unreachable",
                    node.name
                ),
                reasons: Vec::new(),
            }));
        }
        let client = self.peer(&node)?;
        Some(
            client
                .send_raw(method, &format!("/v1/environments/{id}{suffix}"), body)
                .await
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
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        out
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
