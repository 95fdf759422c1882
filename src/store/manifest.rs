//! The per-build manifest: what a published `name:build` is made of. Pure
//! data and its derivations; reading and writing live in `store/mod.rs`.
//! The format is documented in `docs/store-format.md`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::archive::{chain_ids, Digest};
use crate::units::parse_size;

/// The manifest format this build writes. Readers refuse newer formats.
pub const MANIFEST_FORMAT: u32 = 1;

/// Image label that states the memory an environment of the image needs.
pub const LABEL_MEMORY: &str = "shoal.memory";
/// Image label that states the Linux AIO contexts an environment needs.
pub const LABEL_AIO: &str = "shoal.aio";

/// A published build: `name:build`. Names are lowercase (they become Docker
/// repository names), builds are Docker tag characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    pub name: String,
    pub build: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRef {
    #[error("`{0}` is not name:build")]
    Shape(String),
    #[error("image name `{0}` must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    Name(String),
    #[error("build `{0}` must be 1-100 characters of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    Build(String),
}

impl ImageRef {
    pub fn new(name: &str, build: &str) -> Result<ImageRef, BadRef> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            return Err(BadRef::Name(name.to_string()));
        }
        let build_ok = !build.is_empty()
            && build.len() <= 100
            && build.as_bytes()[0].is_ascii_alphanumeric()
            && build
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !build_ok {
            return Err(BadRef::Build(build.to_string()));
        }
        Ok(ImageRef {
            name: name.to_string(),
            build: build.to_string(),
        })
    }

    /// The tag a loaded image carries in a node's engine.
    pub fn docker_tag(&self) -> String {
        format!("shoal/{}:{}", self.name, self.build)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.build)
    }
}

impl FromStr for ImageRef {
    type Err = BadRef;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, build) = s
            .split_once(':')
            .ok_or_else(|| BadRef::Shape(s.to_string()))?;
        ImageRef::new(name, build)
    }
}

impl Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What an environment of the image needs at least, from its labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Requirements {
    /// Bytes of memory (`shoal.memory`); `None` when the image does not say.
    pub memory: Option<u64>,
    /// AIO contexts (`shoal.aio`); 0 when the image does not say.
    #[serde(default)]
    pub aio: u64,
}

/// One layer of a published image, bottom-up order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// sha256 of the uncompressed layer tar; names the layer file.
    pub diff_id: Digest,
    /// Chain id of this layer and all below it.
    pub chain_id: Digest,
    /// Bytes of the uncompressed layer tar.
    pub size: u64,
    /// Bytes of the lz4 layer file.
    pub compressed_size: u64,
}

/// A published build. Written last, after every layer file it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub build: String,
    /// sha256 of `config`: the image id the engine shows after loading.
    pub image_id: Digest,
    /// The image config JSON, byte for byte as `docker save` wrote it.
    pub config: String,
    pub layers: Vec<LayerEntry>,
    pub requirements: Requirements,
    /// TCP ports the image exposes (`EXPOSE`), ascending.
    pub exposed_ports: Vec<u16>,
    /// Whether the image declares a `HEALTHCHECK` (other than `NONE`).
    pub healthcheck: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub published_at: OffsetDateTime,
    /// The published build this image was built FROM (a recipe's `base`),
    /// so retention keeps it while this build is kept. Absent in manifests
    /// of images that were not built by the build watcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<ImageRef>,
}

/// What the manifest needs from the image config JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFacts {
    pub diff_ids: Vec<Digest>,
    pub requirements: Requirements,
    pub exposed_ports: Vec<u16>,
    pub healthcheck: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadConfig {
    #[error("image config is not JSON: {0}")]
    Json(String),
    #[error("image label {label}: {reason}")]
    Label { label: &'static str, reason: String },
}

/// Reads the facts shoal needs from an image config (the JSON whose digest is
/// the image id).
pub fn config_facts(config: &[u8]) -> Result<ConfigFacts, BadConfig> {
    #[derive(Deserialize)]
    struct Img {
        #[serde(default)]
        config: Option<Cfg>,
        rootfs: RootFs,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Cfg {
        #[serde(default)]
        labels: Option<std::collections::BTreeMap<String, String>>,
        #[serde(default)]
        exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
        #[serde(default)]
        healthcheck: Option<Health>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Health {
        #[serde(default)]
        test: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<Digest>,
    }
    let img: Img = serde_json::from_slice(config).map_err(|e| BadConfig::Json(e.to_string()))?;
    let cfg = img.config.unwrap_or_default();
    let labels = cfg.labels.unwrap_or_default();
    let memory = match labels.get(LABEL_MEMORY) {
        None => None,
        Some(v) => Some(parse_size(v).map_err(|e| BadConfig::Label {
            label: LABEL_MEMORY,
            reason: e.to_string(),
        })?),
    };
    let aio = match labels.get(LABEL_AIO) {
        None => 0,
        Some(v) => v.trim().parse::<u64>().map_err(|_| BadConfig::Label {
            label: LABEL_AIO,
            reason: format!("`{v}` is not a whole number"),
        })?,
    };
    let mut exposed_ports: Vec<u16> = cfg
        .exposed_ports
        .unwrap_or_default()
        .keys()
        .filter_map(|k| {
            let (port, proto) = k.split_once('/').unwrap_or((k, "tcp"));
            (proto == "tcp").then(|| port.parse().ok()).flatten()
        })
        .collect();
    exposed_ports.sort_unstable();
    exposed_ports.dedup();
    let healthcheck = cfg
        .healthcheck
        .and_then(|h| h.test)
        .is_some_and(|t| !t.is_empty() && t[0] != "NONE");
    Ok(ConfigFacts {
        diff_ids: img.rootfs.diff_ids,
        requirements: Requirements { memory, aio },
        exposed_ports,
        healthcheck,
    })
}

impl Manifest {
    pub fn image_ref(&self) -> ImageRef {
        ImageRef {
            name: self.name.clone(),
            build: self.build.clone(),
        }
    }

    /// Uncompressed bytes of all layers.
    pub fn size(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |t, l| t.saturating_add(l.size))
    }

    /// Bytes of all layer files in the store.
    pub fn compressed_size(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |t, l| t.saturating_add(l.compressed_size))
    }

    pub fn chain_ids(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| l.chain_id).collect()
    }

    /// Checks what a reader must be able to rely on: a known format, chain
    /// ids that follow from the diff ids, a config whose digest is the image
    /// id and whose layers are the manifest's.
    pub fn validate(&self) -> Result<(), String> {
        if self.format > MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is newer than this shoal ({MANIFEST_FORMAT})",
                self.format
            ));
        }
        ImageRef::new(&self.name, &self.build).map_err(|e| e.to_string())?;
        if Digest::of(self.config.as_bytes()) != self.image_id {
            return Err("config digest is not the image id".into());
        }
        let diffs: Vec<Digest> = self.layers.iter().map(|l| l.diff_id).collect();
        let facts = config_facts(self.config.as_bytes()).map_err(|e| e.to_string())?;
        if facts.diff_ids != diffs {
            return Err("layers differ from the config's rootfs".into());
        }
        if chain_ids(&diffs) != self.chain_ids() {
            return Err("chain ids do not follow from the diff ids".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs() {
        let ok = |s: &str| assert!(s.parse::<ImageRef>().is_ok(), "{s}");
        let bad = |s: &str| assert!(s.parse::<ImageRef>().is_err(), "{s}");
        ok("erp-db:20151103.1");
        ok("demo:1");
        ok("a:B_2-x");
        bad("demo");
        bad("Demo:1");
        bad("demo:");
        bad(":1");
        bad("demo:../x");
        bad("demo:a/b");
        bad("de mo:1");
        bad("demo:-1");
        bad("démo:1");
        bad(&format!("demo:{}", "x".repeat(101)));
        let r: ImageRef = "erp-db:42".parse().unwrap();
        assert_eq!(r.docker_tag(), "shoal/erp-db:42");
        assert_eq!(r.to_string(), "erp-db:42");
    }

    #[test]
    fn facts_from_config() {
        let d = Digest::of(b"x");
        let cfg = format!(
            r#"{{"config":{{"Labels":{{"shoal.memory":"32GiB","shoal.aio":"65536"}},
            "ExposedPorts":{{"8080/tcp":{{}},"53/udp":{{}},"22/tcp":{{}}}},
            "Healthcheck":{{"Test":["CMD","/demo","--check"]}}}},
            "rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let f = config_facts(cfg.as_bytes()).unwrap();
        assert_eq!(f.diff_ids, vec![d]);
        assert_eq!(
            f.requirements,
            Requirements {
                memory: Some(32 << 30),
                aio: 65536
            }
        );
        assert_eq!(f.exposed_ports, vec![22, 8080]);
        assert!(f.healthcheck);

        let none = r#"{"config":{"Healthcheck":{"Test":["NONE"]}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let f = config_facts(none.as_bytes()).unwrap();
        assert!(!f.healthcheck);
        assert_eq!(f.requirements, Requirements::default());

        let bad = r#"{"config":{"Labels":{"shoal.memory":"lots"}},"rootfs":{"diff_ids":[]}}"#;
        assert!(matches!(
            config_facts(bad.as_bytes()),
            Err(BadConfig::Label {
                label: LABEL_MEMORY,
                ..
            })
        ));
    }
}
