//! Every gossip key shoal publishes, and its parsing. The ONE place that
//! reads or writes chitchat's raw strings: the rest of the crate sees
//! [`NodeFacts`]. The format is documented key by key in `docs/gossip.md`.
//!
//! Two chitchat limits (0.11.1, as 0.13) shape this module:
//! - a value near 64 KiB cannot be sent, and once such a value is in a
//!   node's state every later update of that node is stuck behind it: every
//!   value here is capped at [`MAX_VALUE_LEN`] bytes, and whatever would not
//!   fit (labels, endpoints, long strings) is truncated or left out;
//! - a key with non-ASCII characters panics chitchat on every node that
//!   receives it: every key is built from validated ASCII (env ids, layer
//!   prefixes), and [`to_kv`] drops anything that is not.
//!
//! Fast-moving numbers are rounded in the conservative direction (free room
//! is never overstated) so that gossip does not churn on every sample.
//!
//! The key format and its encoding and decoding live here; `keys/role.rs`
//! has the node roles, `keys/http_addr.rs` the check of a gossiped `http`
//! address, `keys/diff.rs` the diff of published key-values.

mod diff;
mod http_addr;
mod layer_filter;
mod role;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use crate::health::EngineState;
pub use crate::store::StoreState;
pub use diff::{diff_kv, kv_bytes, KvDiff};
pub use http_addr::check_http_addr;
pub use layer_filter::LayerFilter;
pub use role::{BadRole, Role};

/// Longest value shoal puts in gossip, in bytes.
pub const MAX_VALUE_LEN: usize = 400;
/// Longest key shoal puts in gossip, in bytes.
pub const MAX_KEY_LEN: usize = 80;
/// Hex digits of a chain id carried in a `layer:` key.
pub const LAYER_PREFIX_LEN: usize = 16;
/// Longest environment id, label name or node name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 128;
/// Longest `version` / `driver` value.
pub const MAX_SHORT_TEXT_LEN: usize = 64;
/// Memory figures are gossiped in whole MiB.
pub const MEMORY_QUANTUM: u64 = 1 << 20;
/// `aio_in_use` is gossiped in multiples of this.
pub const AIO_QUANTUM: u64 = 1024;

/// The node's name (also its chitchat node id).
pub const KEY_NAME: &str = "name";
/// `host:port` of the node's HTTP API.
pub const KEY_HTTP: &str = "http";
/// Comma-separated roles.
pub const KEY_ROLES: &str = "roles";
/// Compact JSON object of labels.
pub const KEY_LABELS: &str = "labels";
/// `total,allocatable,committed` bytes.
pub const KEY_MEM: &str = "mem";
/// `max,in_use,committed` AIO contexts.
pub const KEY_AIO: &str = "aio";
/// `running,max` environments.
pub const KEY_ENVS: &str = "envs";
/// `0` or `1`.
pub const KEY_DRAINING: &str = "draining";
/// shoal version.
pub const KEY_VERSION: &str = "version";
/// The engine's storage driver.
pub const KEY_DRIVER: &str = "driver";
/// Measured load throughput, bytes/s; absent until measured.
pub const KEY_LOAD_BPS: &str = "load_bps";
/// `state,since`: the engine's state (`ok`, `unreachable`, `hung`) and
/// the unix second it entered it; absent from shoal before 0.2 (read `ok`).
pub const KEY_ENGINE: &str = "engine";
/// The image store as the node sees it: `ok`, `read_only` or
/// `unavailable`; absent from shoal before 0.2 (read `ok`).
pub const KEY_STORE: &str = "store";
/// Written once, by a node leaving the cluster cleanly.
pub const KEY_LEFT: &str = "left";
/// The Bloom filter of the layers the node holds ([`LayerFilter`]).
pub const KEY_LAYERS: &str = "layers";
/// Prefix of the one-key-per-layer entries shoal gossiped before the
/// `layers` filter; still read (an older peer), never written.
pub const PREFIX_LAYER: &str = "layer:";
/// Longest `env:` value: 8 environments at the cap stay within the state
/// budget (`docs/gossip.md`).
pub const MAX_ENV_VALUE_LEN: usize = 256;
/// Prefix of the one-key-per-environment entries.
pub const PREFIX_ENV: &str = "env:";
/// `revoked:<token id>` = the token's expiry (unix seconds): a user token
/// this node knows revoked (`auth.rs`). Every node gossips every
/// revocation it holds (at most [`crate::auth::MAX_REVOKED`]), so a node
/// that was down hears them from any other.
pub const PREFIX_REVOKED: &str = "revoked:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("missing key `{0}`")]
    Missing(&'static str),
    #[error("key `{key}` has a bad value `{value}`: {reason}")]
    Bad {
        key: String,
        value: String,
        reason: String,
    },
}

fn bad(key: &str, value: &str, reason: impl Into<String>) -> KeyError {
    let mut value = value.to_string();
    truncate_utf8(&mut value, 80);
    KeyError::Bad {
        key: key.to_string(),
        value,
        reason: reason.into(),
    }
}
/// One environment as its node gossips it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvSummary {
    pub id: String,
    /// `name:build`.
    pub image: String,
    pub owner: String,
    pub status: String,
    /// Bytes of memory reserved for it.
    pub memory: u64,
    /// `host:port` endpoints.
    pub endpoints: Vec<String>,
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeFacts {
    pub name: String,
    /// `host:port` of the HTTP API.
    pub http_addr: String,
    /// No roles means every role (see [`Role::effective`]).
    pub roles: BTreeSet<Role>,
    pub labels: BTreeMap<String, String>,
    pub memory_total: u64,
    pub memory_allocatable: u64,
    /// Includes reservations still loading.
    pub memory_committed: u64,
    pub aio_max: u64,
    pub aio_in_use: u64,
    pub aio_committed: u64,
    pub max_envs: u32,
    pub env_count: u32,
    pub draining: bool,
    /// Whether the node's Docker engine answers (placement leaves a node
    /// whose engine is down out).
    pub engine: EngineState,
    /// Unix seconds since the engine has been in `engine`'s state.
    pub engine_since: Option<u64>,
    /// Whether the node can read the image store (placement leaves a node
    /// whose store is unavailable out; a read-only store still loads).
    pub store: StoreState,
    pub version: String,
    pub storage_driver: String,
    /// Measured load throughput, bytes/s of uncompressed layer tar.
    pub load_bps: Option<u64>,
    /// Chain-id prefixes ([`LAYER_PREFIX_LEN`] lowercase hex) the engine
    /// holds: exact, on the node itself (and from a peer older than the
    /// filter); gossip carries them as `layer_filter`.
    pub layers: BTreeSet<String>,
    /// The layers as gossip carries them: a Bloom filter (`None` from a peer
    /// that publishes none). Ask [`NodeFacts::may_hold_layer`].
    /// Shown in JSON as `{"layers": n, "false_positive_rate": r}` (the
    /// bits themselves are no one's business but placement's).
    #[serde(default, skip_deserializing, serialize_with = "ser_layer_filter")]
    pub layer_filter: Option<LayerFilter>,
    pub envs: BTreeMap<String, EnvSummary>,
    /// Revoked user token ids and their expiry (unix seconds).
    #[serde(default)]
    pub revoked: BTreeMap<String, u64>,
}

fn ser_layer_filter<S: serde::Serializer>(
    f: &Option<LayerFilter>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Summary {
        layers: u32,
        false_positive_rate: f64,
    }
    f.as_ref()
        .map(|f| Summary {
            layers: f.layers(),
            false_positive_rate: f.false_positive_rate(),
        })
        .serialize(s)
}

impl NodeFacts {
    /// The facts as peers will see them after a trip through gossip:
    /// rounded, capped, roles filled in. `from_kv(&to_kv(f)) == f.normalized()`.
    pub fn normalized(&self) -> NodeFacts {
        from_kv(to_kv(self).iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .expect("to_kv output always parses")
    }

    /// Whether the node holds the layer with this chain-id prefix: exact
    /// from `layers`, else the filter's answer (false positives at its
    /// stated rate, never a false negative).
    pub fn may_hold_layer(&self, prefix: &str) -> bool {
        self.layers.contains(prefix)
            || self
                .layer_filter
                .as_ref()
                .is_some_and(|f| f.may_contain(prefix))
    }

    /// How many layers the node says it holds.
    pub fn layer_count(&self) -> usize {
        match &self.layer_filter {
            Some(f) => (f.layers() as usize).max(self.layers.len()),
            None => self.layers.len(),
        }
    }

    /// Whether the node has `role` (all roles when none are configured).
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.is_empty() || self.roles.contains(&role)
    }
}

/// A name fit for a gossip key or label name: 1-64 of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}
fn valid_layer_prefix(s: &str) -> bool {
    s.len() == LAYER_PREFIX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Printable ASCII only, no commas (values are comma-separated), capped.
fn short_text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != ',')
        .collect();
    out.truncate(MAX_SHORT_TEXT_LEN);
    out
}

fn round_down(v: u64, q: u64) -> u64 {
    v / q * q
}

fn round_up(v: u64, q: u64) -> u64 {
    v.div_ceil(q).saturating_mul(q)
}

/// Keeps three significant decimal digits, rounding down (throughput is never
/// overstated).
fn round_bps(v: u64) -> u64 {
    let mut q = 1u64;
    while v / q >= 1000 {
        q *= 10;
    }
    round_down(v, q)
}

#[derive(Serialize, Deserialize)]
struct EnvValue {
    #[serde(rename = "i")]
    image: String,
    #[serde(rename = "o")]
    owner: String,
    #[serde(rename = "s")]
    status: String,
    #[serde(rename = "m")]
    memory: u64,
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<String>,
}

/// The compact JSON for an environment, within [`MAX_ENV_VALUE_LEN`]: text fields
/// are shortened to 64 bytes first, then endpoints dropped from the end.
fn env_value(e: &EnvSummary) -> String {
    let mut v = EnvValue {
        image: e.image.clone(),
        owner: e.owner.clone(),
        status: e.status.clone(),
        memory: e.memory,
        endpoints: e.endpoints.clone(),
    };
    let mut shortened = false;
    loop {
        let s = serde_json::to_string(&v).expect("plain struct serializes");
        if s.len() <= MAX_ENV_VALUE_LEN {
            return s;
        }
        if !shortened {
            for f in [&mut v.owner, &mut v.image, &mut v.status] {
                truncate_utf8(f, 64);
            }
            shortened = true;
            continue;
        }
        if v.endpoints.pop().is_none() {
            // Text full of characters JSON escapes: halve it until it fits
            // (empty text always does).
            for f in [&mut v.owner, &mut v.image, &mut v.status] {
                let half = f.len() / 2;
                truncate_utf8(f, half);
            }
        }
    }
}

fn labels_value(labels: &BTreeMap<String, String>) -> String {
    let mut kept = BTreeMap::new();
    for (k, v) in labels {
        if !valid_name(k) {
            tracing::warn!(label = %k, "label name is not 1-64 of A-Z a-z 0-9 . _ -, not gossiped");
            continue;
        }
        let mut v = v.clone();
        truncate_utf8(&mut v, MAX_LABEL_VALUE_LEN);
        kept.insert(k.clone(), v);
        if serde_json::to_string(&kept).expect("map serializes").len() > MAX_VALUE_LEN {
            tracing::warn!(label = %k, "labels exceed the gossip value cap, label not gossiped");
            kept.remove(k);
        }
    }
    serde_json::to_string(&kept).expect("map serializes")
}

/// The key-values a node publishes for `f`. Never fails: what cannot be
/// published safely (bad env ids or layer prefixes, oversized labels) is
/// left out, with a warning.
pub fn to_kv(f: &NodeFacts) -> Vec<(String, String)> {
    let mut kv: Vec<(String, String)> = Vec::with_capacity(16 + f.layers.len() + f.envs.len());
    let mut put = |k: &str, v: String| kv.push((k.to_string(), v));
    put(KEY_NAME, short_text(&f.name));
    put(KEY_HTTP, short_text(&f.http_addr));
    let roles: Vec<&str> = Role::effective(&f.roles).iter().map(Role::as_str).collect();
    put(KEY_ROLES, roles.join(","));
    put(KEY_LABELS, labels_value(&f.labels));
    put(
        KEY_MEM,
        format!(
            "{},{},{}",
            round_down(f.memory_total, MEMORY_QUANTUM),
            round_down(f.memory_allocatable, MEMORY_QUANTUM),
            round_up(f.memory_committed, MEMORY_QUANTUM)
        ),
    );
    put(
        KEY_AIO,
        format!(
            "{},{},{}",
            f.aio_max,
            round_up(f.aio_in_use, AIO_QUANTUM),
            f.aio_committed
        ),
    );
    put(KEY_ENVS, format!("{},{}", f.env_count, f.max_envs));
    put(KEY_DRAINING, if f.draining { "1" } else { "0" }.to_string());
    put(
        KEY_ENGINE,
        match f.engine_since {
            Some(since) => format!("{},{since}", f.engine.as_str()),
            None => f.engine.as_str().to_string(),
        },
    );
    put(KEY_STORE, f.store.as_str().to_string());
    put(KEY_VERSION, short_text(&f.version));
    put(KEY_DRIVER, short_text(&f.storage_driver));
    if let Some(bps) = f.load_bps {
        put(KEY_LOAD_BPS, round_bps(bps).to_string());
    }
    let layers: Vec<&String> = f
        .layers
        .iter()
        .filter(|l| {
            let ok = valid_layer_prefix(l);
            if !ok {
                tracing::warn!(layer = %l, "layer prefix is not 16 lowercase hex digits, not gossiped");
            }
            ok
        })
        .collect();
    // Facts read back from gossip carry only the filter: published as is.
    let filter = match &f.layer_filter {
        Some(lf) if layers.is_empty() => lf.clone(),
        _ => LayerFilter::build(layers),
    };
    kv.push((KEY_LAYERS.to_string(), filter.encode()));
    for (id, e) in &f.envs {
        if valid_name(id) {
            kv.push((format!("{PREFIX_ENV}{id}"), env_value(e)));
        } else {
            tracing::warn!(env_id = %id, "environment id is not 1-64 of A-Z a-z 0-9 . _ -, not gossiped");
        }
    }
    for (tid, exp) in f.revoked.iter().take(crate::auth::MAX_REVOKED) {
        if crate::auth::valid_tid(tid) {
            kv.push((format!("{PREFIX_REVOKED}{tid}"), exp.to_string()));
        }
    }
    debug_assert!(kv.iter().all(|(k, v)| k.is_ascii()
        && k.len() <= MAX_KEY_LEN
        && (v.len() <= MAX_VALUE_LEN || k == KEY_LAYERS)));
    kv
}

fn numbers<const N: usize>(key: &str, value: &str) -> Result<[u64; N], KeyError> {
    let parts: Vec<&str> = value.split(',').collect();
    if parts.len() != N {
        return Err(bad(
            key,
            value,
            format!("expected {N} comma-separated numbers"),
        ));
    }
    let mut out = [0u64; N];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .parse()
            .map_err(|_| bad(key, value, format!("`{p}` is not a number")))?;
    }
    Ok(out)
}

/// Reads a node's facts from its key-values. Unknown keys are ignored (a
/// newer shoal may publish more); a missing mandatory key is an error.
pub fn from_kv<'a>(
    kv: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<NodeFacts, KeyError> {
    let mut f = NodeFacts::default();
    let mut seen: BTreeSet<&'static str> = BTreeSet::new();
    for (k, v) in kv {
        if let Some(prefix) = k.strip_prefix(PREFIX_LAYER) {
            if valid_layer_prefix(prefix) {
                f.layers.insert(prefix.to_string());
            }
            continue;
        }
        if let Some(tid) = k.strip_prefix(PREFIX_REVOKED) {
            // Checked like the publisher checks them; a bad one is skipped.
            if let (true, Ok(exp)) = (crate::auth::valid_tid(tid), v.parse::<u64>()) {
                if f.revoked.len() < crate::auth::MAX_REVOKED {
                    f.revoked.insert(tid.to_string(), exp);
                }
            }
            continue;
        }
        if let Some(id) = k.strip_prefix(PREFIX_ENV) {
            // Ids are checked like the publisher checks them: a forged key
            // never becomes an id a handler or a page uses.
            if !valid_name(id) {
                continue;
            }
            let e: EnvValue = serde_json::from_str(v).map_err(|err| bad(k, v, err.to_string()))?;
            f.envs.insert(
                id.to_string(),
                EnvSummary {
                    id: id.to_string(),
                    image: e.image,
                    owner: e.owner,
                    status: e.status,
                    memory: e.memory,
                    endpoints: e.endpoints,
                },
            );
            continue;
        }
        let known = match k {
            KEY_NAME => {
                f.name = v.to_string();
                KEY_NAME
            }
            KEY_HTTP => {
                f.http_addr = v.to_string();
                KEY_HTTP
            }
            KEY_ROLES => {
                f.roles = v
                    .split(',')
                    .filter(|r| !r.is_empty())
                    // A role this build does not know is some newer shoal's: skip it.
                    .filter_map(|r| r.parse().ok())
                    .collect();
                KEY_ROLES
            }
            KEY_LABELS => {
                f.labels = serde_json::from_str(v).map_err(|err| bad(k, v, err.to_string()))?;
                KEY_LABELS
            }
            KEY_MEM => {
                [f.memory_total, f.memory_allocatable, f.memory_committed] = numbers(k, v)?;
                KEY_MEM
            }
            KEY_AIO => {
                [f.aio_max, f.aio_in_use, f.aio_committed] = numbers(k, v)?;
                KEY_AIO
            }
            KEY_ENVS => {
                let [count, max] = numbers(k, v)?;
                f.env_count = u32::try_from(count).map_err(|_| bad(k, v, "too large"))?;
                f.max_envs = u32::try_from(max).map_err(|_| bad(k, v, "too large"))?;
                KEY_ENVS
            }
            KEY_DRAINING => {
                f.draining = match v {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad(k, v, "expected 0 or 1")),
                };
                KEY_DRAINING
            }
            KEY_ENGINE => {
                let (state, since) = match v.split_once(',') {
                    Some((s, t)) => (s, Some(t)),
                    None => (v, None),
                };
                f.engine = state
                    .parse()
                    .map_err(|_| bad(k, v, "expected ok, unreachable or hung"))?;
                f.engine_since = since
                    .map(|t| t.parse().map_err(|_| bad(k, v, "since is not a number")))
                    .transpose()?;
                KEY_ENGINE
            }
            KEY_STORE => {
                f.store = v
                    .parse()
                    .map_err(|_| bad(k, v, "expected ok, read_only or unavailable"))?;
                KEY_STORE
            }
            KEY_VERSION => {
                f.version = v.to_string();
                KEY_VERSION
            }
            KEY_DRIVER => {
                f.storage_driver = v.to_string();
                KEY_DRIVER
            }
            KEY_LOAD_BPS => {
                f.load_bps = Some(v.parse().map_err(|_| bad(k, v, "not a number"))?);
                KEY_LOAD_BPS
            }
            KEY_LAYERS => {
                // A bad filter is some newer shoal's or a forgery: no
                // layers known (placement predicts a full load), not an
                // unreadable node.
                match LayerFilter::decode(v) {
                    Ok(lf) => f.layer_filter = Some(lf),
                    Err(e) => tracing::debug!(error = %e, "unreadable layer filter, ignored"),
                }
                continue;
            }
            _ => continue,
        };
        seen.insert(known);
    }
    for key in [
        KEY_NAME,
        KEY_HTTP,
        KEY_ROLES,
        KEY_MEM,
        KEY_AIO,
        KEY_ENVS,
        KEY_DRAINING,
    ] {
        if !seen.contains(key) {
            return Err(KeyError::Missing(key));
        }
    }
    Ok(f)
}

/// Whether a node's key-values say it left the cluster cleanly.
pub fn has_left<'a>(kv: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    kv.into_iter().any(|(k, v)| k == KEY_LEFT && v == "1")
}

/// The key-value a leaving node sets before it stops gossiping.
pub fn left_kv() -> (String, String) {
    (KEY_LEFT.to_string(), "1".to_string())
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, btree_set, vec};
    use proptest::prelude::*;

    pub(super) fn sample() -> NodeFacts {
        NodeFacts {
            name: "node-1".into(),
            http_addr: "10.0.0.1:8080".into(),
            roles: [Role::Slave, Role::Build].into(),
            labels: [("memory".to_string(), "256GB".to_string())].into(),
            memory_total: 256 << 30,
            memory_allocatable: 240 << 30,
            memory_committed: (32 << 30) + 5,
            aio_max: 1_048_576,
            aio_in_use: 70_001,
            aio_committed: 131_072,
            max_envs: 8,
            env_count: 1,
            draining: false,
            engine: EngineState::Ok,
            engine_since: Some(1_764_626_400),
            store: StoreState::Ok,
            version: "0.1.0".into(),
            storage_driver: "overlay2".into(),
            load_bps: Some(123_456_789),
            layers: ["0123456789abcdef".to_string()].into(),
            envs: [(
                "e1".to_string(),
                EnvSummary {
                    id: "e1".into(),
                    image: "erp:20150612".into(),
                    owner: "li".into(),
                    status: "running".into(),
                    memory: 32 << 30,
                    endpoints: vec!["10.0.0.1:32768".into()],
                },
            )]
            .into(),
            revoked: BTreeMap::new(),
            layer_filter: None,
        }
    }
    pub(super) fn kv_refs(kv: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
        kv.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    #[test]
    fn sample_round_trips_with_rounding() {
        let f = sample();
        let back = from_kv(kv_refs(&to_kv(&f))).unwrap();
        let mut want = f.clone();
        want.memory_committed = (32 << 30) + MEMORY_QUANTUM;
        want.aio_in_use = 69 * 1024;
        want.load_bps = Some(123_000_000);
        // Layers travel as the filter.
        want.layer_filter = Some(LayerFilter::build(&f.layers));
        want.layers.clear();
        assert_eq!(back, want);
        assert!(back.may_hold_layer("0123456789abcdef"));
        assert_eq!(back.layer_count(), 1);
        assert_eq!(f.normalized(), want);
    }

    #[test]
    fn revocations_round_trip_and_forged_ones_are_skipped() {
        let mut f = sample();
        f.revoked.insert("0123456789abcdef".into(), 1_900_000_000);
        f.revoked.insert("not-a-token-id".into(), 1);
        let kv = to_kv(&f);
        assert!(kv
            .iter()
            .any(|(k, v)| k == "revoked:0123456789abcdef" && v == "1900000000"));
        let back = from_kv(kv_refs(&kv)).unwrap();
        assert_eq!(
            back.revoked.into_iter().collect::<Vec<_>>(),
            vec![("0123456789abcdef".to_string(), 1_900_000_000)]
        );
        let forged = [
            ("revoked:0123456789ABCDEF", "1"),
            ("revoked:0123", "1"),
            ("revoked:0123456789abcdef", "soon"),
        ];
        let back = from_kv(kv_refs(&to_kv(&sample())).chain(forged)).unwrap();
        assert!(back.revoked.is_empty());
    }

    #[test]
    fn no_roles_means_all_roles() {
        let mut f = sample();
        f.roles.clear();
        assert!(f.has_role(Role::Slave));
        let back = f.normalized();
        assert_eq!(back.roles, Role::ALL.into_iter().collect());
        assert_eq!("SLAVE".parse::<Role>().unwrap(), Role::Slave);
        assert!("boss".parse::<Role>().is_err());
    }

    #[test]
    fn unknown_keys_are_ignored_and_missing_keys_rejected() {
        let mut kv = to_kv(&sample());
        kv.push(("gpu".into(), "4".into()));
        kv.push(("layer:XYZ".into(), String::new()));
        assert!(from_kv(kv_refs(&kv)).is_ok());
        kv.retain(|(k, _)| k != KEY_MEM);
        assert_eq!(from_kv(kv_refs(&kv)), Err(KeyError::Missing(KEY_MEM)));
        let bad_mem = [("mem", "1,2")];
        assert!(matches!(from_kv(bad_mem), Err(KeyError::Bad { .. })));
    }

    #[test]
    fn engine_key_table() {
        let base = to_kv(&sample());
        let with = |v: Option<&str>| -> Result<NodeFacts, KeyError> {
            let mut kv: Vec<(String, String)> = base
                .iter()
                .filter(|(k, _)| k != KEY_ENGINE)
                .cloned()
                .collect();
            if let Some(v) = v {
                kv.push((KEY_ENGINE.into(), v.into()));
            }
            from_kv(kv_refs(&kv))
        };
        type Want = Option<(EngineState, Option<u64>)>;
        let cases: [(Option<&str>, Want); 7] = [
            // A node from before the key: its engine counts as ok.
            (None, Some((EngineState::Ok, None))),
            (Some("ok"), Some((EngineState::Ok, None))),
            (Some("ok,100"), Some((EngineState::Ok, Some(100)))),
            (
                Some("unreachable,1764626400"),
                Some((EngineState::Unreachable, Some(1_764_626_400))),
            ),
            (Some("hung,7"), Some((EngineState::Hung, Some(7)))),
            (Some("down"), None),
            (Some("hung,soon"), None),
        ];
        for (value, want) in cases {
            let got = with(value).map(|f| (f.engine, f.engine_since)).ok();
            assert_eq!(got, want, "{value:?}");
        }
        let mut f = sample();
        f.engine = EngineState::Hung;
        let kv = to_kv(&f);
        let (_, v) = kv.iter().find(|(k, _)| k == KEY_ENGINE).unwrap();
        assert_eq!(v, "hung,1764626400");
        assert!(v.is_ascii() && v.len() <= MAX_VALUE_LEN);
    }

    #[test]
    fn store_key_table() {
        let base = to_kv(&sample());
        let with = |v: Option<&str>| -> Option<StoreState> {
            let mut kv: Vec<(String, String)> = base
                .iter()
                .filter(|(k, _)| k != KEY_STORE)
                .cloned()
                .collect();
            if let Some(v) = v {
                kv.push((KEY_STORE.into(), v.into()));
            }
            from_kv(kv_refs(&kv)).map(|f| f.store).ok()
        };
        let cases = [
            // A node from before the key: its store counts as ok.
            (None, Some(StoreState::Ok)),
            (Some("ok"), Some(StoreState::Ok)),
            (Some("read_only"), Some(StoreState::ReadOnly)),
            (Some("unavailable"), Some(StoreState::Unavailable)),
            (Some("gone"), None),
            (Some(""), None),
        ];
        for (value, want) in cases {
            assert_eq!(with(value), want, "{value:?}");
        }
        let mut f = sample();
        f.store = StoreState::Unavailable;
        let kv = to_kv(&f);
        let (_, v) = kv.iter().find(|(k, _)| k == KEY_STORE).unwrap();
        assert_eq!(v, "unavailable");
        assert_eq!(
            from_kv(kv_refs(&kv)).unwrap().store,
            StoreState::Unavailable
        );
    }

    #[test]
    fn unsafe_keys_are_never_published() {
        let mut f = sample();
        f.envs.insert(
            "環境".into(),
            EnvSummary {
                id: "環境".into(),
                image: "x:1".into(),
                owner: "o".into(),
                status: "running".into(),
                memory: 1,
                endpoints: vec![],
            },
        );
        f.layers.insert("NOT-HEX".into());
        f.labels.insert("機房".into(), "1".into());
        f.labels.insert("rack".into(), "x".repeat(10_000));
        let kv = to_kv(&f);
        assert!(kv
            .iter()
            .all(|(k, v)| k.is_ascii() && v.len() <= MAX_VALUE_LEN));
        let back = from_kv(kv_refs(&kv)).unwrap();
        assert_eq!(back.envs.len(), 1);
        assert_eq!(back.layer_count(), 1);
        assert_eq!(back.labels["rack"].len(), MAX_LABEL_VALUE_LEN);
        assert!(!back.labels.contains_key("機房"));
    }

    #[test]
    fn oversized_env_summary_is_capped() {
        let mut f = sample();
        let e = f.envs.get_mut("e1").unwrap();
        e.endpoints = (0..100)
            .map(|i| format!("10.0.0.1:{}", 30000 + i))
            .collect();
        e.owner = "o".repeat(1000);
        let kv = to_kv(&f);
        let (_, v) = kv.iter().find(|(k, _)| k == "env:e1").unwrap();
        assert!(v.len() <= MAX_ENV_VALUE_LEN);
        let back = from_kv(kv_refs(&kv)).unwrap();
        assert!(!back.envs["e1"].endpoints.is_empty());
    }

    /// A lab node as it is: 8 environments, 300 layers, a few labels.
    pub(crate) fn realistic(i: u64) -> NodeFacts {
        let mut f = sample();
        f.labels = [("memory", "256GB"), ("rack", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        f.layers = (0..300u64)
            .map(|l| {
                format!(
                    "{:016x}",
                    (i * 1000 + l).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )
            })
            .collect();
        f.envs = (0..8)
            .map(|e| {
                let id = format!("e-{}", i * 100 + e);
                let s = EnvSummary {
                    id: id.clone(),
                    image: format!("erp:2015061{e}"),
                    owner: "li.wei@lab.example".into(),
                    status: "running".into(),
                    memory: 32 << 30,
                    endpoints: vec![format!("10.0.3.{}:{}", i % 250, 32768 + e)],
                };
                (id, s)
            })
            .collect();
        f.env_count = 8;
        f
    }

    #[test]
    fn state_stays_within_its_budget_with_8_envs_and_300_layers() {
        // Realistic: shoal's share of the 4 KiB budget (docs/gossip.md).
        let kv = to_kv(&realistic(7));
        let bytes = kv_bytes(&kv);
        eprintln!("realistic state: {bytes} bytes in {} keys", kv.len());
        assert!(bytes <= 2048, "{bytes} bytes");
        // Worst case: every field at its cap (40 labels of 100 bytes,
        // 64-char ids, 20 endpoints per env, 300 layers).
        let mut f = sample();
        f.labels = (0..40)
            .map(|i| (format!("label-{i}"), "v".repeat(100)))
            .collect();
        f.layers = realistic(1).layers;
        f.envs = (0..8)
            .map(|i| {
                let id = format!("{:0>64}", i);
                let e = EnvSummary {
                    id: id.clone(),
                    image: format!("{}:{}", "n".repeat(64), "b".repeat(100)),
                    owner: "owner@example.com".repeat(10),
                    status: "running".into(),
                    memory: 40 << 30,
                    endpoints: (0..20)
                        .map(|p| format!("192.168.100.200:{}", 40000 + p))
                        .collect(),
                };
                (id, e)
            })
            .collect();
        let kv = to_kv(&f);
        let bytes = kv_bytes(&kv);
        eprintln!("worst-case state: {bytes} bytes in {} keys", kv.len());
        assert!(bytes <= 4096, "{bytes} bytes");
        let back = from_kv(kv_refs(&kv)).unwrap();
        assert_eq!(back.layer_count(), 300);
        assert!(f.layers.iter().all(|l| back.may_hold_layer(l)));
        assert_eq!(back.envs.len(), 8);
        assert!(back.envs.values().all(|e| !e.endpoints.is_empty()));
    }

    fn arb_text() -> impl Strategy<Value = String> {
        "[ -~]{0,40}"
    }

    fn arb_facts() -> impl Strategy<Value = NodeFacts> {
        let envs = btree_map(
            "[a-z0-9][a-z0-9._-]{0,20}",
            (
                arb_text(),
                arb_text(),
                "[a-z]{1,10}",
                any::<u64>(),
                vec("[0-9.]{7,15}:[0-9]{1,5}", 0..4),
            ),
            0..8,
        );
        (
            (
                "[a-z0-9-]{1,20}",
                "[0-9.]{7,15}:[0-9]{1,5}",
                btree_set(0usize..4, 0..4),
            ),
            btree_map("[a-z][a-z0-9._-]{0,10}", "[ -~]{0,20}", 0..5),
            (any::<u64>(), any::<u64>(), 0u64..u64::MAX / 2),
            (any::<u64>(), 0u64..u64::MAX / 2, any::<u64>()),
            (
                any::<u32>(),
                any::<u32>(),
                any::<bool>(),
                0usize..3,
                proptest::option::of(any::<u64>()),
            ),
            (
                arb_text(),
                "[a-z0-9]{0,12}",
                proptest::option::of(any::<u64>()),
            ),
            btree_set("[0-9a-f]{16}", 0..50),
            envs,
        )
            .prop_map(
                |(id, labels, mem, aio, envs_n, text, layers, envs)| NodeFacts {
                    name: id.0,
                    http_addr: id.1,
                    roles: id.2.into_iter().map(|i| Role::ALL[i]).collect(),
                    labels,
                    memory_total: mem.0,
                    memory_allocatable: mem.1,
                    memory_committed: mem.2,
                    aio_max: aio.0,
                    aio_in_use: aio.1,
                    aio_committed: aio.2,
                    max_envs: envs_n.0,
                    env_count: envs_n.1,
                    draining: envs_n.2,
                    engine: [EngineState::Ok, EngineState::Unreachable, EngineState::Hung]
                        [envs_n.3],
                    engine_since: envs_n.4,
                    store: [
                        StoreState::Ok,
                        StoreState::ReadOnly,
                        StoreState::Unavailable,
                    ][envs_n.3],
                    version: text.0,
                    storage_driver: text.1,
                    load_bps: text.2,
                    layers,
                    envs: envs
                        .into_iter()
                        .map(|(id, (image, owner, status, memory, endpoints))| {
                            let e = EnvSummary {
                                id: id.clone(),
                                image,
                                owner,
                                status,
                                memory,
                                endpoints,
                            };
                            (id, e)
                        })
                        .collect(),
                    revoked: BTreeMap::new(),
                    layer_filter: None,
                },
            )
    }

    proptest! {
        /// Whatever a peer gossips, reading it returns facts or an error.
        #[test]
        fn any_key_values_parse_or_fail_cleanly(
            kv in vec(("(shoal\\.|l/|e/)?\\PC{0,20}", "\\PC{0,60}"), 0..20),
            nums in vec("[0-9,]{0,45}", 3),
        ) {
            let mut kv = kv;
            kv.extend(to_kv(&NodeFacts::default()).into_iter().zip(nums).map(|((k, _), v)| (k, v)));
            if let Ok(f) = from_kv(kv_refs(&kv)) {
                prop_assert!(f.envs.keys().all(|id| valid_name(id)));
            }
        }

        #[test]
        fn round_trip_up_to_rounding(f in arb_facts()) {
            let kv = to_kv(&f);
            prop_assert!(kv.iter().all(|(k, v)| k.is_ascii() && k.len() <= MAX_KEY_LEN && v.len() <= MAX_VALUE_LEN));
            let back = from_kv(kv_refs(&kv)).unwrap();
            // Rounding is conservative and bounded.
            prop_assert!(back.memory_total <= f.memory_total && f.memory_total - back.memory_total < MEMORY_QUANTUM);
            prop_assert!(back.memory_allocatable <= f.memory_allocatable);
            prop_assert!(back.memory_committed >= f.memory_committed && back.memory_committed - f.memory_committed < MEMORY_QUANTUM);
            prop_assert!(back.aio_in_use >= f.aio_in_use && back.aio_in_use - f.aio_in_use < AIO_QUANTUM);
            if let (Some(a), Some(b)) = (f.load_bps, back.load_bps) {
                prop_assert!(b <= a && (a - b) as f64 <= a as f64 * 0.01);
            }
            // Everything else is exact (the generators stay within the caps,
            // commas aside, which `version` drops).
            let mut want = f.clone();
            want.memory_total = back.memory_total;
            want.memory_allocatable = back.memory_allocatable;
            want.memory_committed = back.memory_committed;
            want.aio_in_use = back.aio_in_use;
            want.load_bps = back.load_bps;
            want.roles = Role::effective(&f.roles);
            want.version = short_text(&f.version);
            want.layer_filter = Some(LayerFilter::build(&f.layers));
            want.layers.clear();
            prop_assert!(f.layers.iter().all(|l| back.may_hold_layer(l)));
            prop_assert_eq!(&back, &want);
            // Publishing the gossip form again changes nothing.
            prop_assert_eq!(back.normalized(), back);
        }
    }
}
