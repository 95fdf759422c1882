//! The records and requests the HTTP API speaks, shared by the daemon, the
//! CLI client and (later) node-to-node calls. Plain serde data, no logic
//! beyond parsing a request into checked values.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::store::{ImageRef, Manifest, Requirements};
use crate::units::parse_size;

/// Where an environment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EnvStatus {
    /// Accepted and room reserved; nothing done yet.
    Pending,
    /// Image layers are streaming into the engine.
    Loading,
    /// The container runs; waiting for its health check or ports.
    Starting,
    /// Ready to use: healthy, or every exposed port answers.
    Ready,
    /// Did not become ready, or stopped on its own; `error` says why.
    Failed,
    /// Deleted by its owner.
    Deleted,
    /// Its node is unreachable (shown by other nodes; never moved).
    Lost,
}

impl EnvStatus {
    /// Whether the environment holds room on its node.
    pub fn holds_room(self) -> bool {
        matches!(
            self,
            EnvStatus::Pending | EnvStatus::Loading | EnvStatus::Starting | EnvStatus::Ready
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EnvStatus::Pending => "pending",
            EnvStatus::Loading => "loading",
            EnvStatus::Starting => "starting",
            EnvStatus::Ready => "ready",
            EnvStatus::Failed => "failed",
            EnvStatus::Deleted => "deleted",
            EnvStatus::Lost => "lost",
        }
    }
}

impl fmt::Display for EnvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one exposed port of an environment answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Endpoint {
    /// The port inside the container (`EXPOSE`).
    pub port: u16,
    pub host: String,
    pub host_port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.host_port)
    }
}

/// How far loading the image has come.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoadProgress {
    /// Layers in the image.
    pub layers_total: usize,
    /// Layers the engine already held (omitted from the load).
    pub layers_cached: usize,
    /// Uncompressed bytes that had to be loaded.
    pub bytes_needed: u64,
    /// Of those, bytes sent to the engine so far.
    pub bytes_done: u64,
}

/// An environment: one container started from a published build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvRecord {
    pub id: String,
    /// `name:build`.
    #[schema(value_type = String)]
    pub image: ImageRef,
    pub owner: String,
    /// The node it runs on (and that alone changes it).
    pub node: String,
    pub status: EnvStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Memory limit, bytes.
    pub memory: u64,
    /// AIO contexts reserved.
    pub aio: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub ready_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub load: LoadProgress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// When the reservation ends and the owning node's reaper deletes it.
    /// Set on every environment a node creates; `None` only in journal
    /// files written before reservations existed (filled in on recovery)
    /// and in `lost` records rebuilt from gossip.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// `POST /v1/environments`, as sent. Checked into an [`EnvSpec`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvRequest {
    pub image: String,
    /// Who the environment is for. Default: the token's user; a tester may
    /// name only themselves, an operator anyone.
    #[serde(default)]
    pub owner: String,
    /// Bytes (a number) or a size string (`"512MiB"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<MemoryValue>)]
    pub memory: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Node labels the environment's node must have (`{"memory": "256GB"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<BTreeMap<String, String>>,
    /// Reservation length (`"8h"`); the node's `default_ttl` when absent,
    /// never more than its `max_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A memory amount: bytes, or a size string (`"512MiB"`, `"32GiB"`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum MemoryValue {
    Bytes(u64),
    Size(String),
}

/// `POST /v1/environments/{id}/extend`: push the expiry back by `by`
/// (`"4h"`), never past `max_ttl` from now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub by: String,
}

/// `POST /v1/tokens` (operators): a token for `user` with `role`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub user: String,
    pub role: crate::auth::Role,
    /// Lifetime (`"90d"`, at most 5 years). Default 90 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A token just issued. The token text is shown once; revocation names
/// its `id`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenIssued {
    pub token: String,
    pub id: String,
    pub user: String,
    pub role: crate::auth::Role,
    /// Unix seconds.
    pub expires_at: u64,
}

/// `POST /v1/tokens/revoke` (operators): a whole token, or its id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The token text or its 16-hex-digit id.
    pub token: String,
}

/// A revocation: refused on every node from a few gossip rounds on, until
/// the token would have expired anyway.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    pub id: String,
    /// Unix seconds: until when the id is kept.
    pub until: u64,
}

/// Upper bounds on what a request may ask for, checked before any
/// arithmetic (the admission ledger sums memory and AIO).
pub const MAX_MEMORY: u64 = 1 << 50; // 1 PiB
pub const MAX_AIO: u64 = 1 << 32;
pub const MAX_ENV_VARS: usize = 256;
pub const MAX_ENV_NAME_LEN: usize = 256;
pub const MAX_ENV_VALUE_LEN: usize = 32 << 10;
pub const MAX_CONSTRAINTS: usize = 32;

/// A request that failed a check: the message and the field it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// A checked environment request, with the image's requirements applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSpec {
    pub image: ImageRef,
    pub owner: String,
    pub memory: u64,
    pub aio: u64,
    pub env: BTreeMap<String, String>,
    /// Reservation length asked for; `None`: the node's default.
    pub ttl: Option<std::time::Duration>,
}

impl EnvRequest {
    /// The image reference alone, checked (to look up its manifest).
    pub fn image_ref(&self) -> Result<ImageRef, FieldError> {
        self.image
            .parse()
            .map_err(|e: crate::store::manifest::BadRef| FieldError::new("image", e.to_string()))
    }

    /// Checks the request against the image's requirements: memory and AIO
    /// may be raised above them, never lowered. `default_memory` applies to
    /// images that state no memory.
    pub fn check(&self, req: &Requirements, default_memory: u64) -> Result<EnvSpec, FieldError> {
        let image = self.image_ref()?;
        let owner = self.owner.trim();
        if owner.is_empty() || owner.len() > 254 || owner.chars().any(|c| c.is_control()) {
            return Err(FieldError::new(
                "owner",
                "must be 1-254 printable characters",
            ));
        }
        let floor = req.memory.unwrap_or(default_memory);
        let memory = match &self.memory {
            None | Some(serde_json::Value::Null) => floor,
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| FieldError::new("memory", "must be a whole number of bytes"))?,
            Some(serde_json::Value::String(s)) => {
                parse_size(s).map_err(|e| FieldError::new("memory", e.to_string()))?
            }
            Some(_) => {
                return Err(FieldError::new(
                    "memory",
                    "must be bytes or a size string such as \"512MiB\"",
                ))
            }
        };
        if memory < floor {
            return Err(FieldError::new(
                "memory",
                format!(
                    "{} is below what image {image} needs ({})",
                    crate::units::format_size(memory),
                    crate::units::format_size(floor)
                ),
            ));
        }
        if memory > MAX_MEMORY {
            return Err(FieldError::new(
                "memory",
                format!("must be at most {}", crate::units::format_size(MAX_MEMORY)),
            ));
        }
        // Docker refuses limits under 6 MiB.
        if memory < 6 << 20 {
            return Err(FieldError::new("memory", "must be at least 6MiB"));
        }
        let aio = self.aio.unwrap_or(req.aio);
        if aio > MAX_AIO {
            return Err(FieldError::new("aio", format!("must be at most {MAX_AIO}")));
        }
        if aio < req.aio {
            return Err(FieldError::new(
                "aio",
                format!("{aio} is below what image {image} needs ({})", req.aio),
            ));
        }
        let env = self.env.clone().unwrap_or_default();
        if env.len() > MAX_ENV_VARS {
            return Err(FieldError::new(
                "env",
                format!("at most {MAX_ENV_VARS} variables"),
            ));
        }
        if self
            .constraints
            .as_ref()
            .is_some_and(|c| c.len() > MAX_CONSTRAINTS)
        {
            return Err(FieldError::new(
                "constraints",
                format!("at most {MAX_CONSTRAINTS} labels"),
            ));
        }
        for (k, v) in &env {
            if k.len() > MAX_ENV_NAME_LEN || v.len() > MAX_ENV_VALUE_LEN {
                return Err(FieldError::new(
                    "env",
                    format!(
                        "names are at most {MAX_ENV_NAME_LEN} bytes, values {MAX_ENV_VALUE_LEN}"
                    ),
                ));
            }
            let ok = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(FieldError::new(
                    &format!("env.{k}"),
                    "variable names are letters, digits and '_', not starting with a digit",
                ));
            }
            if v.contains('\0') {
                return Err(FieldError::new(
                    &format!("env.{k}"),
                    "value contains a NUL byte",
                ));
            }
        }
        let ttl = match &self.ttl {
            None => None,
            Some(s) => {
                let d = crate::units::parse_duration(s)
                    .map_err(|e| FieldError::new("ttl", e.to_string()))?;
                if d.is_zero() {
                    return Err(FieldError::new("ttl", "must be longer than 0s"));
                }
                Some(d)
            }
        };
        Ok(EnvSpec {
            image,
            owner: owner.to_string(),
            memory,
            aio,
            env,
            ttl,
        })
    }
}

/// `POST /v1/images`: publish an image of the local engine as `name:build`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The image in this node's engine (tag or id).
    pub source: String,
    /// `name:build` to publish it as.
    #[serde(rename = "ref")]
    pub image_ref: String,
}

/// A published build, as `GET /v1/images` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    pub name: String,
    pub build: String,
    #[serde(rename = "ref")]
    pub image_ref: String,
    pub image_id: String,
    /// Uncompressed bytes of all layers.
    pub size: u64,
    /// Bytes of the lz4 layer files.
    pub compressed_size: u64,
    pub layers: usize,
    pub requirements: Requirements,
    pub exposed_ports: Vec<u16>,
    pub healthcheck: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub published_at: OffsetDateTime,
}

impl From<&Manifest> for ImageInfo {
    fn from(m: &Manifest) -> Self {
        ImageInfo {
            name: m.name.clone(),
            build: m.build.clone(),
            image_ref: m.image_ref().to_string(),
            image_id: m.image_id.to_string(),
            size: m.size(),
            compressed_size: m.compressed_size(),
            layers: m.layers.len(),
            requirements: m.requirements,
            exposed_ports: m.exposed_ports.clone(),
            healthcheck: m.healthcheck,
            published_at: m.published_at,
        }
    }
}

/// What `GET /v1/node` says about this node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub name: String,
    pub version: String,
    pub memory_total: u64,
    pub memory_allocatable: u64,
    pub memory_committed: u64,
    pub aio_max: u64,
    pub aio_in_use: u64,
    pub aio_committed: u64,
    pub max_envs: u32,
    pub env_count: u32,
    pub engine_version: String,
    /// Whether the engine answers now: `ok`, `unreachable` or `hung`, since
    /// when, and the last failed probe's short reason.
    #[serde(default)]
    pub engine: crate::health::EngineHealth,
    pub storage_driver: String,
    pub containerd_store: bool,
    /// What the storage driver is known to limit (the seed's overlay could
    /// not write files over 2.5 GB).
    pub storage_notes: Vec<String>,
    /// The image store as this node sees it: `ok`, `read_only` (loads
    /// only) or `unavailable` (with the reason).
    pub store: crate::store::StoreStatus,
    /// How this node's gossip is protected.
    #[serde(default)]
    pub gossip: GossipSecurity,
    /// How node-to-node HTTP calls are checked (`docs/security.md`):
    /// `required` (signed calls only), `transitional` (signs, still honours
    /// unsigned ones) or `off` (no key: nothing signed).
    #[serde(default)]
    pub peer_calls: String,
    /// Whether the node takes new environments: `draining`, the
    /// operator's `maintenance` drain (since, by), `stopping` (SIGTERM).
    #[serde(default)]
    pub drain: crate::drain::NodeDrain,
}

/// How a node's gossip is protected (`docs/security.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GossipSecurity {
    /// `required` (sealed only), `transitional` (seals, still accepts
    /// unsealed) or `off` (unsealed).
    pub mode: String,
    /// Started with `--insecure-gossip` (unsealed gossip allowed).
    pub insecure: bool,
    /// Public ids of the cluster keys, the primary (which seals) first.
    pub key_ids: Vec<String>,
    /// Gossip datagrams since start: sent, opened, dropped and why.
    #[serde(default)]
    pub datagrams: crate::cluster::seal::SealCounters,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For refusals: which resource was short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// For refusals by the cluster: each node and why it could not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<NodeReason>,
    /// The request id (also in the `x-request-id` header): the node's log
    /// has the details of this answer under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Why one node could not take a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeReason {
    pub node: String,
    pub reason: String,
    /// The resource that was short, when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(memory: Option<serde_json::Value>, aio: Option<u64>) -> EnvRequest {
        EnvRequest {
            image: "demo:1".into(),
            owner: "a@example.com".into(),
            memory,
            aio,
            env: None,
            constraints: None,
            ttl: None,
        }
    }

    #[test]
    fn journal_records_from_before_reservations_still_read() {
        let old = r#"{"id":"e1","image":"demo:1","owner":"o","node":"n","status":"ready",
            "memory":1,"aio":0,"created_at":"2025-01-01T00:00:00Z"}"#;
        let rec: EnvRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.expires_at, None);
        let back: EnvRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn memory_and_aio_checks() {
        let image = Requirements {
            memory: Some(64 << 20),
            aio: 100,
        };
        let ok = |r: EnvRequest| r.check(&image, 256 << 20).unwrap();
        let bad = |r: EnvRequest| r.check(&image, 256 << 20).unwrap_err().field;
        assert_eq!(ok(req(None, None)).memory, 64 << 20);
        assert_eq!(ok(req(None, None)).aio, 100);
        assert_eq!(ok(req(Some("512MiB".into()), None)).memory, 512 << 20);
        assert_eq!(ok(req(Some((128u64 << 20).into()), Some(200))).aio, 200);
        assert_eq!(bad(req(Some("lots".into()), None)), "memory");
        assert_eq!(bad(req(Some("1MiB".into()), None)), "memory");
        assert_eq!(bad(req(Some((-5).into()), None)), "memory");
        assert_eq!(bad(req(Some(true.into()), None)), "memory");
        assert_eq!(bad(req(None, Some(10))), "aio");
        let mut r = req(None, None);
        r.image = "nope".into();
        assert_eq!(bad(r), "image");
        let mut r = req(None, None);
        r.owner = " ".into();
        assert_eq!(bad(r), "owner");
        let mut r = req(None, None);
        r.env = Some(BTreeMap::from([("1X".into(), "v".into())]));
        assert_eq!(bad(r), "env.1X");
        let mut r = req(None, None);
        r.ttl = Some("8h".into());
        assert_eq!(ok(r).ttl, Some(std::time::Duration::from_secs(8 * 3600)));
        for t in ["soon", "0s", ""] {
            let mut r = req(None, None);
            r.ttl = Some(t.into());
            assert_eq!(bad(r), "ttl", "{t}");
        }
        assert_eq!(bad(req(Some("2PiB".into()), None)), "memory");
        assert_eq!(bad(req(Some(u64::MAX.into()), None)), "memory");
        assert_eq!(bad(req(None, Some(u64::MAX))), "aio");
        let mut r = req(None, None);
        r.env = Some((0..300).map(|i| (format!("V{i}"), String::new())).collect());
        assert_eq!(bad(r), "env");
        let mut r = req(None, None);
        r.ttl = Some("99999999999h".into());
        assert_eq!(bad(r), "ttl");
        // No memory label: the node's default applies.
        let none = Requirements::default();
        assert_eq!(
            req(None, None).check(&none, 256 << 20).unwrap().memory,
            256 << 20
        );
    }

    proptest::proptest! {
        /// Any request is checked into a bounded spec or refused naming a
        /// field; nothing panics.
        #[test]
        fn any_request_is_checked_or_refused(
            image in "\\PC{0,30}",
            owner in "\\PC{0,30}",
            memory in proptest::option::of(proptest::prelude::any::<u64>()),
            mem_text in proptest::option::of("[0-9.]{0,25}[a-zA-Z]{0,3}"),
            aio in proptest::option::of(proptest::prelude::any::<u64>()),
            env in proptest::collection::btree_map("\\PC{0,10}", "\\PC{0,10}", 0..4),
            ttl in proptest::option::of("[0-9]{0,22}[smhdx]{0,2}"),
            floor in proptest::prelude::any::<u64>(),
        ) {
            let r = EnvRequest {
                image,
                owner,
                memory: mem_text.map(Into::into).or(memory.map(Into::into)),
                aio,
                env: Some(env),
                constraints: None,
                ttl,
            };
            let image = Requirements { memory: Some(floor), aio: 0 };
            match r.check(&image, 256 << 20) {
                Ok(spec) => {
                    proptest::prop_assert!(spec.memory <= MAX_MEMORY && spec.aio <= MAX_AIO);
                    proptest::prop_assert!(spec.ttl.is_none_or(|t| t <= crate::units::MAX_DURATION));
                }
                Err(e) => proptest::prop_assert!(!e.field.is_empty()),
            }
        }
    }
}
