//! Placement: which nodes could take an environment, best first, and why
//! every other node cannot. Pure: no I/O, no async, no clock, no chitchat;
//! it reads the typed cluster view ([`NodeView`]) and the image's layers.
//!
//! Filters, in this order (a node is rejected with the first that fails):
//! 1. alive (not dead, not left) and its facts readable;
//! 2. not draining;
//! 3. its Docker engine answers (gossip key `engine`: not `unreachable`
//!    or `hung`), and it can read the image store (gossip key `store`:
//!    not `unavailable`; a read-only store still loads);
//! 4. has role `slave` (a node with no roles configured has every role);
//! 5. every request constraint `k=v` equals the node's label `k`;
//! 6. a free environment slot: `env_count < max_envs`;
//! 7. memory headroom `allocatable − committed` ≥ request (committed
//!    includes reservations still loading);
//! 8. AIO headroom `aio_max − max(aio_in_use, aio_committed)` ≥ request.
//!
//! Why `max` for AIO: `aio_in_use` is the host-wide count of AIO contexts
//! (`fs.aio-nr`: host processes and every container), `aio_committed` the
//! sum of what shoal's environments declared (including ones still loading
//! that have not opened theirs yet). Each alone can miss part of the truth;
//! their sum would count the contexts of running environments twice and
//! refuse hosts that have room. `max` is never below either figure, and
//! gossip only guides: the chosen node re-checks with its exact local
//! accounting before it reserves (the admission module), so a too-hopeful
//! guess costs one refusal, never an overcommit.
//!
//! Ranking, best first: predicted time to ready (bytes of the image's
//! layers the node lacks ÷ its measured load throughput, or the default),
//! then the tightest memory fit (least memory free after placement, to pack
//! environments), then the node name. "Lacks" skips the longest prefix of
//! the image's chain ids whose last id the node holds (a chain id names the
//! whole stack below it).
//!
//! Spreading: [`attempt_order`] picks among the near-equal head of the
//! ranking with a caller-given seed, so concurrent requests entering at
//! different nodes do not all try the same node first.
//!
//! Here: the request, the filters and the ranking; `placement/reason.rs`
//! has why a node is left out, `placement/spread.rs` the near-equal band
//! and the order of attempts.

mod reason;
mod spread;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::archive::Digest;
use crate::cluster::keys::StoreState;
use crate::cluster::keys::LAYER_PREFIX_LEN;
use crate::cluster::{NodeFacts, NodeView, Role};
use crate::store::Manifest;
pub use reason::Reason;
pub use spread::{
    attempt_order, choose, near_equal_band, NEAR_EQUAL_FRACTION, NEAR_EQUAL_MAX, NEAR_EQUAL_SECS,
};

/// What an environment needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlacementRequest {
    /// Bytes of memory.
    pub memory: u64,
    /// Linux AIO contexts.
    pub aio: u64,
    /// Node labels that must match exactly (`memory=256GB`).
    pub constraints: BTreeMap<String, String>,
}

/// One node that can take the environment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub node: String,
    /// Its HTTP API, `host:port`.
    pub http_addr: String,
    /// Seconds to load the layers it lacks (0 when it holds the image).
    pub predicted_load_secs: f64,
    /// Bytes of layers it lacks.
    pub missing_bytes: u64,
    /// Memory headroom left after this environment.
    pub memory_free_after: u64,
    /// AIO headroom left after this environment.
    pub aio_free_after: u64,
}
/// The answer: who can take it, best first, and why the others cannot.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Placement {
    pub ranked: Vec<Ranked>,
    pub rejected: Vec<(String, Reason)>,
}

/// The image's layers as placement needs them: chain id and uncompressed
/// size (what a load writes), bottom-up.
pub fn layers_of(m: &Manifest) -> Vec<(Digest, u64)> {
    m.layers.iter().map(|l| (l.chain_id, l.size)).collect()
}

/// Ranks `nodes` for `req`. `layers` are the image's (chain id, bytes),
/// bottom-up; `default_load_bps` stands in for nodes that have not measured
/// their load throughput yet.
pub fn rank(
    nodes: &[NodeView],
    req: &PlacementRequest,
    layers: &[(Digest, u64)],
    default_load_bps: u64,
) -> Placement {
    let chain: Vec<Digest> = layers.iter().map(|(d, _)| *d).collect();
    let mut out = Placement::default();
    for n in nodes {
        match check(n, req, &chain, layers, default_load_bps) {
            Ok(r) => out.ranked.push(r),
            Err(reason) => out.rejected.push((n.name.clone(), reason)),
        }
    }
    out.ranked.sort_by(compare);
    out.rejected.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn compare(a: &Ranked, b: &Ranked) -> Ordering {
    a.predicted_load_secs
        .total_cmp(&b.predicted_load_secs)
        .then(a.memory_free_after.cmp(&b.memory_free_after))
        .then_with(|| a.node.cmp(&b.node))
}

fn check(
    n: &NodeView,
    req: &PlacementRequest,
    chain: &[Digest],
    layers: &[(Digest, u64)],
    default_load_bps: u64,
) -> Result<Ranked, Reason> {
    if n.left && !n.alive {
        return Err(Reason::Left);
    }
    if !n.alive {
        return Err(Reason::Dead);
    }
    let f = match (&n.facts, &n.facts_error) {
        (Some(f), _) => f,
        (None, e) => {
            return Err(Reason::UnreadableFacts {
                error: e.clone().unwrap_or_else(|| "no facts".into()),
            })
        }
    };
    if n.left {
        return Err(Reason::Left);
    }
    // This node serves itself without HTTP; any other is called there.
    if let (Some(error), false) = (&n.http_error, n.is_self) {
        return Err(Reason::BadHttpAddr {
            error: error.clone(),
        });
    }
    if f.draining {
        return Err(Reason::Draining);
    }
    if !f.engine.is_ok() {
        return Err(Reason::EngineDown { engine: f.engine });
    }
    if f.store == StoreState::Unavailable {
        return Err(Reason::StoreUnavailable);
    }
    if !f.has_role(Role::Slave) {
        return Err(Reason::NotSlave {
            roles: f.roles.iter().copied().collect(),
        });
    }
    for (label, wanted) in &req.constraints {
        let has = f.labels.get(label);
        if has != Some(wanted) {
            return Err(Reason::LabelMismatch {
                label: label.clone(),
                wanted: wanted.clone(),
                has: has.cloned(),
            });
        }
    }
    if f.env_count >= f.max_envs {
        return Err(Reason::MaxEnvs {
            running: f.env_count,
            max: f.max_envs,
        });
    }
    let mem_free = f.memory_allocatable.saturating_sub(f.memory_committed);
    if mem_free < req.memory {
        return Err(Reason::MemoryShort {
            short: req.memory - mem_free,
            need: req.memory,
            free: mem_free,
        });
    }
    let aio_free = f.aio_max.saturating_sub(f.aio_in_use.max(f.aio_committed));
    if aio_free < req.aio {
        return Err(Reason::AioShort {
            short: req.aio - aio_free,
            need: req.aio,
            free: aio_free,
        });
    }
    let have = held_layers(f, chain);
    let missing_bytes = layers
        .get(have..)
        .unwrap_or_default()
        .iter()
        .fold(0u64, |t, (_, s)| t.saturating_add(*s));
    let bps = f
        .load_bps
        .filter(|b| *b > 0)
        .unwrap_or(default_load_bps)
        .max(1);
    Ok(Ranked {
        node: n.name.clone(),
        http_addr: f.http_addr.clone(),
        predicted_load_secs: missing_bytes as f64 / bps as f64,
        missing_bytes,
        memory_free_after: mem_free - req.memory,
        aio_free_after: aio_free - req.aio,
    })
}
/// How many leading layers of `chain` the node holds. From an exact list
/// (the node itself, a peer older than the filter): the longest prefix whose
/// last chain id is held (a chain id names the stack below it). From the
/// gossiped Bloom filter: the leading chain ids that are all in it (an
/// engine lists every level of its images' chains), so a false positive
/// only counts when it extends the truly held run: `missing_bytes` is then
/// too small by a layer or so, at the filter's rate (~0.14 % per node at
/// 300 layers); the chosen node loads from what its engine really holds.
fn held_layers(f: &NodeFacts, chain: &[Digest]) -> usize {
    let exact = chain
        .iter()
        .rposition(|c| f.layers.contains(&c.short(LAYER_PREFIX_LEN)))
        .map_or(0, |i| i + 1);
    let filtered = f.layer_filter.as_ref().map_or(0, |lf| {
        chain
            .iter()
            .take_while(|c| lf.may_contain(&c.short(LAYER_PREFIX_LEN)))
            .count()
    });
    exact.max(filtered)
}

/// The chain-id prefixes a node gossips for the layers it holds.
pub fn layer_prefixes(chain_ids: &[Digest]) -> BTreeSet<String> {
    chain_ids
        .iter()
        .map(|c| c.short(LAYER_PREFIX_LEN))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::chain_ids;
    use crate::cluster::keys::EngineState;

    const GIB: u64 = 1 << 30;
    const BPS: u64 = 100 << 20; // default: 100 MiB/s

    fn image() -> Vec<(Digest, u64)> {
        let diffs: Vec<Digest> = (0..3u8).map(|i| Digest::of(&[i])).collect();
        let chain = chain_ids(&diffs);
        // base 10 GiB, middle 2 GiB, top 1 GiB
        chain.into_iter().zip([10 * GIB, 2 * GIB, GIB]).collect()
    }

    /// A healthy 256 GiB slave with room for everything and no layers.
    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            facts: Some(NodeFacts {
                name: name.into(),
                http_addr: format!("{name}:8080"),
                roles: [Role::Slave].into(),
                labels: [("memory".to_string(), "256GB".to_string())].into(),
                memory_total: 256 * GIB,
                memory_allocatable: 240 * GIB,
                memory_committed: 0,
                aio_max: 1_048_576,
                aio_in_use: 0,
                aio_committed: 0,
                max_envs: 8,
                env_count: 0,
                ..Default::default()
            }),
            facts_error: None,
            http_error: None,
            alive: true,
            left: false,
            is_self: false,
            generation: 1,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            heartbeat: 10,
            last_seen: None,
            phi: None,
            state_bytes: 0,
        }
    }

    fn with(name: &str, edit: impl FnOnce(&mut NodeView, &mut NodeFacts)) -> NodeView {
        let mut n = node(name);
        let mut f = n.facts.take().unwrap();
        edit(&mut n, &mut f);
        n.facts = Some(f);
        n
    }

    fn req(memory: u64, aio: u64) -> PlacementRequest {
        PlacementRequest {
            memory,
            aio,
            constraints: BTreeMap::new(),
        }
    }

    /// Expected outcome per node: `Ok(())` ranked, `Err(reason)` rejected.
    fn check(nodes: Vec<NodeView>, r: PlacementRequest, expect: &[(&str, Result<(), Reason>)]) {
        let p = rank(&nodes, &r, &image(), BPS);
        for (name, want) in expect {
            let ranked = p.ranked.iter().any(|x| x.node == *name);
            let rejected = p.rejected.iter().find(|(n, _)| n == name).map(|(_, r)| r);
            match want {
                Ok(()) => assert!(ranked, "{name} should be ranked, got {rejected:?}"),
                Err(reason) => assert_eq!(rejected, Some(reason), "{name}"),
            }
        }
    }

    fn order(nodes: Vec<NodeView>, r: PlacementRequest) -> Vec<String> {
        rank(&nodes, &r, &image(), BPS)
            .ranked
            .into_iter()
            .map(|r| r.node)
            .collect()
    }

    /// Nodes, request, expected outcome per node.
    type Case = (
        Vec<NodeView>,
        PlacementRequest,
        Vec<(&'static str, Result<(), Reason>)>,
    );

    #[test]
    fn every_filter_rule() {
        let mut constrained = req(32 * GIB, 0);
        constrained
            .constraints
            .insert("memory".into(), "256GB".into());
        let mut rack = constrained.clone();
        rack.constraints.insert("rack".into(), "3".into());
        let cases: Vec<Case> = vec![
            (vec![node("ok")], req(32 * GIB, 1000), vec![("ok", Ok(()))]),
            (
                vec![with("d", |n, _| n.alive = false)],
                req(0, 0),
                vec![("d", Err(Reason::Dead))],
            ),
            (
                vec![with("l", |n, _| {
                    n.alive = false;
                    n.left = true
                })],
                req(0, 0),
                vec![("l", Err(Reason::Left))],
            ),
            (
                vec![{
                    let mut n = node("u");
                    n.facts = None;
                    n.facts_error = Some("missing key `mem`".into());
                    n
                }],
                req(0, 0),
                vec![(
                    "u",
                    Err(Reason::UnreadableFacts {
                        error: "missing key `mem`".into(),
                    }),
                )],
            ),
            (
                vec![with("h", |n, _| n.http_error = Some("bad host".into()))],
                req(0, 0),
                vec![(
                    "h",
                    Err(Reason::BadHttpAddr {
                        error: "bad host".into(),
                    }),
                )],
            ),
            // This node is served without HTTP: its own address is not used.
            (
                vec![with("me", |n, _| {
                    n.is_self = true;
                    n.http_error = Some("bad host".into())
                })],
                req(0, 0),
                vec![("me", Ok(()))],
            ),
            (
                vec![with("dr", |_, f| f.draining = true)],
                req(0, 0),
                vec![("dr", Err(Reason::Draining))],
            ),
            (
                vec![
                    with("gone", |_, f| f.engine = EngineState::Unreachable),
                    with("frozen", |_, f| f.engine = EngineState::Hung),
                    with("fine", |_, f| f.engine = EngineState::Ok),
                ],
                req(0, 0),
                vec![
                    (
                        "gone",
                        Err(Reason::EngineDown {
                            engine: EngineState::Unreachable,
                        }),
                    ),
                    (
                        "frozen",
                        Err(Reason::EngineDown {
                            engine: EngineState::Hung,
                        }),
                    ),
                    ("fine", Ok(())),
                ],
            ),
            // The store: unavailable leaves the node out (with its reason,
            // resource `store`); read-only still loads, so it places.
            (
                vec![
                    with("nostore", |_, f| f.store = StoreState::Unavailable),
                    with("ro", |_, f| f.store = StoreState::ReadOnly),
                    // The engine is reported before the store.
                    with("both", |_, f| {
                        f.engine = EngineState::Unreachable;
                        f.store = StoreState::Unavailable
                    }),
                    // The store before any shortage.
                    with("nostore-full", |_, f| {
                        f.store = StoreState::Unavailable;
                        f.env_count = 8
                    }),
                ],
                req(GIB, 0),
                vec![
                    ("nostore", Err(Reason::StoreUnavailable)),
                    ("ro", Ok(())),
                    (
                        "both",
                        Err(Reason::EngineDown {
                            engine: EngineState::Unreachable,
                        }),
                    ),
                    ("nostore-full", Err(Reason::StoreUnavailable)),
                ],
            ),
            // Draining is reported before the engine; the engine before
            // any shortage.
            (
                vec![
                    with("dr-down", |_, f| {
                        f.draining = true;
                        f.engine = EngineState::Unreachable
                    }),
                    with("down-full", |_, f| {
                        f.engine = EngineState::Hung;
                        f.env_count = 8;
                        f.memory_committed = 240 * GIB
                    }),
                ],
                req(GIB, 0),
                vec![
                    ("dr-down", Err(Reason::Draining)),
                    (
                        "down-full",
                        Err(Reason::EngineDown {
                            engine: EngineState::Hung,
                        }),
                    ),
                ],
            ),
            (
                vec![with("b", |_, f| {
                    f.roles = [Role::Build, Role::Master].into()
                })],
                req(0, 0),
                vec![(
                    "b",
                    Err(Reason::NotSlave {
                        roles: vec![Role::Build, Role::Master],
                    }),
                )],
            ),
            // No roles configured: every role, slave included.
            (
                vec![with("all", |_, f| f.roles.clear())],
                req(0, 0),
                vec![("all", Ok(()))],
            ),
            (vec![node("m")], constrained.clone(), vec![("m", Ok(()))]),
            (
                vec![with("small", |_, f| {
                    f.labels.insert("memory".into(), "128GB".into());
                })],
                constrained,
                vec![(
                    "small",
                    Err(Reason::LabelMismatch {
                        label: "memory".into(),
                        wanted: "256GB".into(),
                        has: Some("128GB".into()),
                    }),
                )],
            ),
            (
                vec![node("norack")],
                rack,
                vec![(
                    "norack",
                    Err(Reason::LabelMismatch {
                        label: "rack".into(),
                        wanted: "3".into(),
                        has: None,
                    }),
                )],
            ),
            (
                vec![with("full", |_, f| f.env_count = 8)],
                req(0, 0),
                vec![("full", Err(Reason::MaxEnvs { running: 8, max: 8 }))],
            ),
            (
                vec![with("zero", |_, f| f.max_envs = 0)],
                req(0, 0),
                vec![("zero", Err(Reason::MaxEnvs { running: 0, max: 0 }))],
            ),
            // 240 allocatable − 220 committed = 20 free; 32 needed.
            (
                vec![with("mem", |_, f| f.memory_committed = 220 * GIB)],
                req(32 * GIB, 0),
                vec![(
                    "mem",
                    Err(Reason::MemoryShort {
                        short: 12 * GIB,
                        need: 32 * GIB,
                        free: 20 * GIB,
                    }),
                )],
            ),
            // Exactly fits.
            (
                vec![with("exact", |_, f| f.memory_committed = 208 * GIB)],
                req(32 * GIB, 0),
                vec![("exact", Ok(()))],
            ),
            // Overcommitted node: headroom 0, no underflow.
            (
                vec![with("over", |_, f| f.memory_committed = 300 * GIB)],
                req(GIB, 0),
                vec![(
                    "over",
                    Err(Reason::MemoryShort {
                        short: GIB,
                        need: GIB,
                        free: 0,
                    }),
                )],
            ),
            // AIO: in_use dominates.
            (
                vec![with("aio1", |_, f| {
                    f.aio_max = 65_536;
                    f.aio_in_use = 60_000;
                    f.aio_committed = 10_000
                })],
                req(0, 10_000),
                vec![(
                    "aio1",
                    Err(Reason::AioShort {
                        short: 4_464,
                        need: 10_000,
                        free: 5_536,
                    }),
                )],
            ),
            // AIO: committed dominates (a reservation still loading).
            (
                vec![with("aio2", |_, f| {
                    f.aio_max = 65_536;
                    f.aio_in_use = 1_000;
                    f.aio_committed = 60_000
                })],
                req(0, 10_000),
                vec![(
                    "aio2",
                    Err(Reason::AioShort {
                        short: 4_464,
                        need: 10_000,
                        free: 5_536,
                    }),
                )],
            ),
            // The first failing rule is the one reported.
            (
                vec![with("first", |n, f| {
                    n.alive = true;
                    f.draining = true;
                    f.env_count = 8
                })],
                req(0, 0),
                vec![("first", Err(Reason::Draining))],
            ),
        ];
        for (nodes, r, expect) in cases {
            check(nodes, r, &expect);
        }
    }
    #[test]
    fn missing_bytes_skip_the_longest_held_prefix() {
        let img = image();
        let chain: Vec<Digest> = img.iter().map(|(d, _)| *d).collect();
        let cases: [(&[usize], u64); 5] = [
            (&[], 13 * GIB),
            (&[0], 3 * GIB),
            (&[1], GIB), // chain id 1 implies layer 0
            (&[2], 0),
            (&[0, 2], 0),
        ];
        for (held, want) in cases {
            let n = with("n", |_, f| {
                f.layers = held.iter().map(|&i| chain[i].short(16)).collect()
            });
            let p = rank(std::slice::from_ref(&n), &req(0, 0), &img, BPS);
            assert_eq!(p.ranked[0].missing_bytes, want, "held {held:?}");
            assert_eq!(p.ranked[0].predicted_load_secs, want as f64 / BPS as f64);
            // The same through gossip, where the layers are a Bloom filter,
            // held as an engine lists them (every level up to the top).
            let top = held.iter().max().map_or(0, |&i| i + 1);
            let g = with("n", |_, f| {
                f.layers = (0..top).map(|i| chain[i].short(16)).collect();
                *f = f.normalized();
            });
            let f = g.facts.as_ref().unwrap();
            assert!(f.layers.is_empty() && f.layer_filter.is_some());
            let p = rank(&[g], &req(0, 0), &img, BPS);
            assert_eq!(p.ranked[0].missing_bytes, want, "held {held:?} (filter)");
        }
    }

    #[test]
    fn ranking_order() {
        let chain: Vec<Digest> = image().iter().map(|(d, _)| *d).collect();
        let cached = |f: &mut NodeFacts| f.layers = [chain[2].short(16)].into();
        // A node with the image cached beats a tighter fit without it.
        let nodes = vec![
            with("tight-cold", |_, f| f.memory_committed = 200 * GIB),
            with("loose-warm", |_, f| cached(f)),
        ];
        assert_eq!(order(nodes, req(32 * GIB, 0)), ["loose-warm", "tight-cold"]);
        // Equal load cost: the tightest fit first (pack), then by name.
        let nodes = vec![
            with("c", |_, f| f.memory_committed = 64 * GIB),
            with("b", |_, f| f.memory_committed = 160 * GIB),
            with("a", |_, f| f.memory_committed = 64 * GIB),
        ];
        assert_eq!(order(nodes, req(32 * GIB, 0)), ["b", "a", "c"]);
        // A measured fast loader beats the default throughput.
        let nodes = vec![
            node("slow"),
            with("fast", |_, f| f.load_bps = Some(1000 << 20)),
        ];
        assert_eq!(order(nodes, req(0, 0)), ["fast", "slow"]);
        // A base-only node beats a node with nothing.
        let nodes = vec![
            node("none"),
            with("base", |_, f| f.layers = [chain[0].short(16)].into()),
        ];
        assert_eq!(order(nodes, req(0, 0)), ["base", "none"]);
    }
}
