//! The gossip state as this node's chitchat holds it, for operators
//! debugging "why does node A not see B" (`GET /v1/gossip`, `shoal gossip`):
//! every member (each generation chitchat still keeps), its liveness as
//! chitchat decides it, heartbeat, last seen, phi ([`super::phi`]), every
//! key with its value and version, the tombstones, and the bytes of state.
//!
//! It shows raw key-values and parses none of them (that stays
//! `keys.rs`'s job). Nothing here is secret: environment variables are
//! never gossiped, key material never is; env ids, owners, endpoints,
//! layer prefixes and revoked token ids are, so the route is an
//! operator's (also under `--open-read`, `auth::need`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use chitchat::{Chitchat, ChitchatId, NodeState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;

use super::{keys, SeenMap};

/// `GET /v1/gossip`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GossipState {
    /// The node that answered (whose view this is).
    pub self_name: String,
    /// Its cluster id.
    pub cluster_id: String,
    /// Every member chitchat holds, by name then generation.
    pub members: Vec<Member>,
}

/// How chitchat's failure detector (and the `left` key) sees a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    Alive,
    Dead,
    /// It set `left=1` before stopping (a clean leave).
    Left,
}

impl MemberStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Alive => "alive",
            MemberStatus::Dead => "dead",
            MemberStatus::Left => "left",
        }
    }
}

/// One member's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub name: String,
    /// Generation id of the run (unix ms of its start).
    pub generation: u64,
    /// `ip:port` it gossips from.
    #[schema(value_type = String)]
    pub gossip_addr: SocketAddr,
    pub status: MemberStatus,
    /// The node answering.
    pub is_self: bool,
    /// Its heartbeat counter.
    pub heartbeat: u64,
    /// Seconds since its heartbeat last advanced, as observed here; `null`
    /// until observed.
    pub last_seen: Option<f64>,
    /// Phi of the failure detector (see `docs/gossip.md`); `null` until two
    /// heartbeats were seen, and for this node.
    pub phi: Option<f64>,
    /// Highest version among its keys.
    pub max_version: u64,
    /// Tombstones up to this version were garbage collected.
    pub last_gc_version: u64,
    /// Bytes of its live keys and values (no tombstones, no chitchat
    /// overhead).
    pub state_bytes: u64,
    /// Its live keys, by key.
    pub keys: Vec<KeyEntry>,
    /// Its deleted keys still kept (tombstones), by key.
    pub tombstones: Vec<Tombstone>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyEntry {
    pub key: String,
    pub value: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tombstone {
    pub key: String,
    pub version: u64,
}

/// Bytes of a node state's live keys and values.
pub fn state_bytes(state: &NodeState) -> u64 {
    state
        .key_values()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum()
}

/// The whole state, read under the chitchat lock the caller holds.
pub(super) fn build(
    chitchat: &Chitchat,
    self_id: &ChitchatId,
    seen: &SeenMap,
    prior: Duration,
) -> GossipState {
    let now = Instant::now();
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    let seen = seen.lock();
    let members = chitchat
        .node_states()
        .iter()
        .map(|(id, state)| {
            let is_self = id == self_id;
            let window = seen.get(id);
            let mut keys = Vec::new();
            let mut tombstones = Vec::new();
            for (key, vv) in state.key_values_including_deleted() {
                if vv.is_deleted() {
                    tombstones.push(Tombstone {
                        key: key.to_string(),
                        version: vv.version,
                    });
                } else {
                    keys.push(KeyEntry {
                        key: key.to_string(),
                        value: vv.value.clone(),
                        version: vv.version,
                    });
                }
            }
            let status = if keys::has_left(state.key_values()) {
                MemberStatus::Left
            } else if is_self || live.contains(id) {
                MemberStatus::Alive
            } else {
                MemberStatus::Dead
            };
            Member {
                name: id.node_id.to_string(),
                generation: id.generation_id,
                gossip_addr: id.gossip_advertise_addr,
                status,
                is_self,
                heartbeat: u64::from(state.heartbeat()),
                last_seen: if is_self {
                    Some(0.0)
                } else {
                    window.map(|w| w.last_seen(now).as_secs_f64())
                },
                phi: if is_self {
                    None
                } else {
                    window.and_then(|w| w.phi(now, prior))
                },
                max_version: state.max_version(),
                last_gc_version: state.last_gc_version(),
                state_bytes: state_bytes(state),
                keys,
                tombstones,
            }
        })
        .collect();
    GossipState {
        self_name: self_id.node_id.to_string(),
        cluster_id: chitchat.cluster_id().to_string(),
        members,
    }
}
