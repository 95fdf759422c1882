//! Daemon configuration: a documented TOML file (`--config FILE`), flags on
//! top of it, and the embedded default (a single node on this machine) when
//! neither is given. Pure: parsing and checking only; `Settings` is the
//! checked result the rest of the daemon uses.
//!
//! Every field is documented in `docs/config.md`, and `docs/shoal.example.toml`
//! is parsed by a test so the example can never drift from the code.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{parse_duration, parse_size};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

fn field(field: &'static str, message: impl ToString) -> ConfigError {
    ConfigError::Field {
        field,
        message: message.to_string(),
    }
}

/// The config file, as written. Every field is optional; see
/// `docs/config.md` for each one's meaning and default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name, unique in the cluster. Default: the host name.
    pub name: Option<String>,
    /// HTTP API address. Default: `127.0.0.1:7070`.
    pub listen: Option<SocketAddr>,
    /// Where the daemon keeps its own state. Default: `.shoal` under the
    /// working directory.
    pub data_dir: Option<PathBuf>,
    /// The image store (an NFS mount shared by the nodes in production).
    /// Default: `<data_dir>/store`.
    pub store: Option<PathBuf>,
    /// Memory environments may take in all (`"240GiB"`). Default: total
    /// memory minus `memory_reserve`.
    pub memory: Option<String>,
    /// Memory kept for the host when `memory` is not set. Default `2GiB`.
    pub memory_reserve: Option<String>,
    /// Most environments at once (the seed's `maxpod`). Default 8.
    pub max_envs: Option<u32>,
    /// Memory for images that state none (`shoal.memory`). Default `256MiB`.
    pub default_memory: Option<String>,
    /// Host address environment ports are published on. Default `127.0.0.1`;
    /// `0.0.0.0` makes them reachable from other machines.
    pub publish_addr: Option<IpAddr>,
    /// Host name or address put in endpoints. Default: `publish_addr`, or
    /// the host name when that is `0.0.0.0`.
    pub advertise_host: Option<String>,
    /// How long a started environment may take to become ready. Default `5m`.
    pub ready_timeout: Option<String>,
    /// Cluster id: nodes only gossip with nodes of the same id. Default `shoal`.
    pub cluster_id: Option<String>,
    /// Gossip (UDP) listen address. Default `127.0.0.1:7946`.
    pub gossip: Option<SocketAddr>,
    /// Gossip address other nodes reach this one at. Default: `gossip`.
    pub advertise: Option<SocketAddr>,
    /// Gossip addresses of any existing members (`host:port`). The first node
    /// names none.
    pub seeds: Option<Vec<String>>,
    /// The cluster key file (`shoal key generate > FILE`, mode 0600). Default:
    /// `<data_dir>/cluster.key`, created on first start, for a node with no
    /// seeds; a node with seeds must be given one (or `insecure_gossip`).
    pub cluster_key: Option<PathBuf>,
    /// Gossip sealing: `required` (default: every datagram sealed, unsealed
    /// ones dropped), `transitional` (seal outgoing, still accept unsealed:
    /// for moving a running cluster to sealed), `off` (needs
    /// `insecure_gossip`).
    pub gossip_seal: Option<String>,
    /// Allows unsealed gossip: a node with seeds and no `cluster_key`, or
    /// `gossip_seal = "off"`. Default false.
    pub insecure_gossip: Option<bool>,
    /// `slave` (takes environments), `build`, `master`, `test`. Default: all.
    pub roles: Option<Vec<String>>,
    /// Free-form labels (`memory = "256GB"`, `rack = "3"`).
    pub labels: Option<BTreeMap<String, String>>,
    /// One gossip round every this often (`500ms`, `1s`). Default 500 ms.
    pub gossip_interval: Option<String>,
    /// Failure detector threshold (phi): higher waits longer before calling
    /// a silent node dead. Default 8 (a killed node is seen dead in ~4-8 s).
    pub phi_threshold: Option<u32>,
    /// How long a dead node stays listed (as dead, its environments `lost`)
    /// before it is forgotten. Default `1h`.
    pub dead_node_grace: Option<String>,
    /// Build watcher (role `build`): the drop directory where each build
    /// appears as `<drop>/<product>/<build-id>/`. No watcher without it.
    pub drop: Option<PathBuf>,
    /// Build watcher: one sub-directory per product holding its
    /// `Dockerfile` and optional `recipe.toml` (`docs/recipes.md`).
    pub recipes: Option<PathBuf>,
    /// Published builds kept per product; older ones are pruned. Default 7.
    pub keep: Option<u32>,
    /// File whose presence marks a build directory complete. Default
    /// `BUILD_COMPLETE`.
    pub build_marker: Option<String>,
    /// How often the drop directory is rescanned even without file system
    /// notifications (network file systems send none). Default `30s`.
    pub build_rescan: Option<String>,
    /// Builds run at once on this node. Default 1.
    pub build_concurrency: Option<u32>,
    /// Longest a build may take (a recipe may set its own). Default `1h`.
    pub build_timeout: Option<String>,
    /// Layer files younger than this are never pruned: another node may be
    /// publishing an image that uses them. Default `10m`.
    pub prune_grace: Option<String>,
    /// How often this node removes `shoal/*` images that are no longer
    /// published and that none of its environments use. Default `5m`.
    pub image_gc_interval: Option<String>,
    /// Reservation length of a request that names none. Default `24h`.
    pub default_ttl: Option<String>,
    /// Longest reservation, and how far ahead an extension may reach.
    /// Default `99h`.
    pub max_ttl: Option<String>,
    /// How long before expiry the owner is warned by mail. Default `1h`.
    pub expiry_warning: Option<String>,
    /// Mail server: `smtp://host:port` (plain), `smtp+starttls://host:port`,
    /// `smtps://host:port` (implicit TLS); `user:password@` optional.
    /// Default: none (mails are logged, not sent).
    pub smtp: Option<String>,
    /// Sender address of mails. Default `shoal@<host name>`.
    pub mail_from: Option<String>,
    /// Base URL of this node's web page, used in mail links. Default
    /// `http://<listen address>` (the advertised host when listening on
    /// all addresses).
    pub public_url: Option<String>,
    /// Web page only: the header a reverse proxy names the signed-in user
    /// in (`X-Forwarded-User`), believed only on calls from
    /// `trusted_proxies`. Such users are testers. Default: none.
    pub trusted_user_header: Option<String>,
    /// Addresses of the reverse proxies `trusted_user_header` is believed
    /// from (IP addresses, no ports). Required with the header.
    pub trusted_proxies: Option<Vec<IpAddr>>,
    /// Reads of the catalog (`GET /v1/images*`) and of the cluster view
    /// (`GET /v1/cluster`, `GET /v1/node`) without a token (the cluster
    /// view is otherwise the operators'). Default false: every `/v1/` route
    /// but the OpenAPI document needs a token.
    pub open_read: Option<bool>,
    /// The daemon's log lines: `text` (default) or `json`, one JSON object
    /// per line with the span fields (`docs/operations.md`, "Logs").
    pub log_format: Option<crate::logging::LogFormat>,
}

impl Config {
    /// Reads a config file; unknown fields are an error.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Fields set in `over` replace those in `self` (flags over the file).
    pub fn overlay(mut self, over: Config) -> Config {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            name,
            listen,
            data_dir,
            store,
            memory,
            memory_reserve,
            max_envs,
            default_memory,
            publish_addr,
            advertise_host,
            ready_timeout,
            cluster_id,
            gossip,
            advertise,
            seeds,
            cluster_key,
            gossip_seal,
            insecure_gossip,
            roles,
            labels,
            gossip_interval,
            phi_threshold,
            dead_node_grace,
            drop,
            recipes,
            keep,
            build_marker,
            build_rescan,
            build_concurrency,
            build_timeout,
            prune_grace,
            image_gc_interval,
            open_read,
            default_ttl,
            max_ttl,
            expiry_warning,
            smtp,
            mail_from,
            public_url,
            trusted_user_header,
            trusted_proxies,
            log_format
        );
        self
    }

    /// Checks every field and fills in defaults. `total_memory` and
    /// `hostname` come from the host, so this stays pure.
    pub fn resolve(&self, total_memory: u64, hostname: &str) -> Result<Settings, ConfigError> {
        let name = self.name.clone().unwrap_or_else(|| hostname.to_string());
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !name_ok {
            return Err(field(
                "name",
                format!("`{name}` must be 1-63 characters of a-z, A-Z, 0-9, '-', '_', '.'"),
            ));
        }
        let size =
            |f: &'static str, v: &Option<String>, default: u64| -> Result<u64, ConfigError> {
                v.as_deref()
                    .map_or(Ok(default), |s| parse_size(s).map_err(|e| field(f, e)))
            };
        let reserve = size("memory_reserve", &self.memory_reserve, 2 << 30)?;
        let memory_allocatable =
            size("memory", &self.memory, total_memory.saturating_sub(reserve))?;
        if memory_allocatable == 0 {
            return Err(field("memory", "no memory left for environments"));
        }
        let max_envs = self.max_envs.unwrap_or(8);
        if max_envs == 0 {
            return Err(field("max_envs", "must be at least 1"));
        }
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".shoal"));
        let store = self.store.clone().unwrap_or_else(|| data_dir.join("store"));
        let publish_addr = self.publish_addr.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let advertise_host = match &self.advertise_host {
            Some(h) if h.trim().is_empty() => return Err(field("advertise_host", "is empty")),
            Some(h) => h.clone(),
            None if publish_addr.is_unspecified() => hostname.to_string(),
            None => publish_addr.to_string(),
        };
        let ready_timeout = match &self.ready_timeout {
            None => Duration::from_secs(300),
            Some(s) => parse_duration(s).map_err(|e| field("ready_timeout", e))?,
        };
        let mut roles = Vec::new();
        for r in self.roles.clone().unwrap_or_default() {
            let r = r.trim().to_ascii_lowercase();
            if !["slave", "build", "master", "test"].contains(&r.as_str()) {
                return Err(field(
                    "roles",
                    format!("`{r}` is not one of slave, build, master, test"),
                ));
            }
            if !roles.contains(&r) {
                roles.push(r);
            }
        }
        if roles.is_empty() {
            roles = ["slave", "build", "master", "test"]
                .map(String::from)
                .to_vec();
        }
        let labels = self.labels.clone().unwrap_or_default();
        for (k, v) in &labels {
            let ok = !k.is_empty()
                && k.len() <= 63
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && v.len() <= 128
                && v.is_ascii()
                && !v.contains([',', '=', '\n']);
            if !ok {
                return Err(field(
                    "labels",
                    format!("`{k}={v}`: names are ASCII letters, digits, '-', '_', '.'; values ASCII without ',', '='"),
                ));
            }
        }
        let duration =
            |f: &'static str, v: &Option<String>, default: u64| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(Duration::from_secs(default)),
                    Some(s) => match parse_duration(s) {
                        Ok(d) if d.is_zero() => Err(field(f, "must be longer than 0s")),
                        Ok(d) => Ok(d),
                        Err(e) => Err(field(f, e)),
                    },
                }
            };
        let max_ttl = duration("max_ttl", &self.max_ttl, 99 * 3600)?;
        let default_ttl = duration("default_ttl", &self.default_ttl, 24 * 3600)?;
        if default_ttl > max_ttl {
            return Err(field("default_ttl", "is longer than max_ttl"));
        }
        let expiry_warning = duration("expiry_warning", &self.expiry_warning, 3600)?;
        let smtp = match &self.smtp {
            None => None,
            Some(u) => Some(crate::mail::SmtpUrl::parse(u).map_err(|e| field("smtp", e))?),
        };
        let mail_from = self
            .mail_from
            .clone()
            .unwrap_or_else(|| format!("shoal@{hostname}"));
        crate::mail::check_address(&mail_from).map_err(|e| field("mail_from", e))?;
        let public_url = match &self.public_url {
            None => None,
            Some(u) => {
                let u = u.trim().trim_end_matches('/');
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && !u.contains(char::is_whitespace)
                    && u.split("://").nth(1).is_some_and(|h| !h.is_empty());
                if !ok {
                    return Err(field("public_url", format!("`{u}` is not an http(s) URL")));
                }
                Some(u.to_string())
            }
        };
        let trusted_proxy = self.trusted_proxy()?;
        let gossip = self
            .gossip
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7946)));
        let gossip_interval = match &self.gossip_interval {
            None => Duration::from_millis(500),
            Some(s) => parse_gossip_interval(s).map_err(|e| field("gossip_interval", e))?,
        };
        let dead_node_grace = match &self.dead_node_grace {
            None => Duration::from_secs(3600),
            Some(s) => parse_duration(s).map_err(|e| field("dead_node_grace", e))?,
        };
        let phi_threshold = self.phi_threshold.unwrap_or(8);
        if !(1..=100).contains(&phi_threshold) {
            return Err(field("phi_threshold", "must be 1-100"));
        }
        let builds = self.build_settings()?;
        let seeds = self.seeds.clone().unwrap_or_default();
        let (gossip_seal, cluster_key) = self.gossip_security(&data_dir, &seeds)?;
        Ok(Settings {
            name,
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
            data_dir,
            store,
            memory_allocatable,
            max_envs,
            default_memory: size("default_memory", &self.default_memory, 256 << 20)?,
            publish_addr,
            advertise_host,
            ready_timeout,
            cluster_id: self.cluster_id.clone().unwrap_or_else(|| "shoal".into()),
            gossip,
            advertise: self.advertise.unwrap_or(gossip),
            seeds,
            cluster_key,
            gossip_seal,
            insecure_gossip: self.insecure_gossip.unwrap_or(false),
            roles,
            labels,
            gossip_interval,
            phi_threshold,
            dead_node_grace,
            builds,
            default_ttl,
            max_ttl,
            expiry_warning,
            smtp,
            mail_from,
            public_url,
            trusted_proxy,
            open_read: self.open_read.unwrap_or(false),
        })
    }

    /// The web page's trusted sign-in header and the proxies it is
    /// believed from: both or neither.
    fn trusted_proxy(&self) -> Result<Option<crate::auth::TrustedProxy>, ConfigError> {
        let proxies = self.trusted_proxies.clone().unwrap_or_default();
        match self.trusted_user_header.as_deref().map(str::trim) {
            None if proxies.is_empty() => Ok(None),
            None => Err(field(
                "trusted_proxies",
                "needs trusted_user_header (--trusted-user-header)",
            )),
            Some(h) => {
                let name = axum::http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    field("trusted_user_header", format!("`{h}` is not a header name"))
                })?;
                if proxies.is_empty() {
                    return Err(field(
                        "trusted_proxies",
                        "the trusted header needs the proxies it is believed from (--trusted-proxy ADDR)",
                    ));
                }
                if ["authorization", "cookie", "host"].contains(&name.as_str())
                    || name.as_str().starts_with("x-shoal-")
                {
                    return Err(field(
                        "trusted_user_header",
                        format!("`{h}` cannot name the user"),
                    ));
                }
                Ok(Some(crate::auth::TrustedProxy {
                    header: name.as_str().to_string(),
                    from: proxies,
                }))
            }
        }
    }

    /// The seal mode and where the cluster key comes from (see the fields'
    /// docs): a node that joins others never gossips unsealed unless the
    /// operator said `insecure_gossip`.
    fn gossip_security(
        &self,
        data_dir: &Path,
        seeds: &[String],
    ) -> Result<(SealMode, KeyFile), ConfigError> {
        let insecure = self.insecure_gossip.unwrap_or(false);
        let mode = match self.gossip_seal.as_deref() {
            None => None,
            Some(s) => Some(SealMode::parse(s).map_err(|e| field("gossip_seal", e))?),
        };
        let key = self.cluster_key.clone().map(KeyFile::Given);
        match (key, mode) {
            (_, Some(SealMode::Off)) if !insecure => Err(field(
                "gossip_seal",
                "`off` gossips unsealed: it needs insecure_gossip = true (--insecure-gossip)",
            )),
            (key, Some(SealMode::Off)) => Ok((SealMode::Off, key.unwrap_or(KeyFile::None))),
            (Some(key), mode) => Ok((mode.unwrap_or(SealMode::Required), key)),
            (None, mode) if seeds.is_empty() => Ok((
                mode.unwrap_or(SealMode::Required),
                KeyFile::Default(data_dir.join("cluster.key")),
            )),
            (None, None) if insecure => Ok((SealMode::Off, KeyFile::None)),
            (None, _) => Err(field(
                "cluster_key",
                "this node joins others (seeds) but has no cluster key: give --cluster-key FILE \
                 (a copy of the cluster's key file, mode 0600), or --insecure-gossip to gossip unsealed",
            )),
        }
    }

    fn build_settings(&self) -> Result<BuildSettings, ConfigError> {
        let duration = |f: &'static str, v: &Option<String>, default: u64| match v {
            None => Ok(Duration::from_secs(default)),
            Some(s) => parse_duration(s).map_err(|e| field(f, e)),
        };
        let keep = self.keep.unwrap_or(7);
        if keep == 0 {
            return Err(field("keep", "must be at least 1"));
        }
        let concurrency = self.build_concurrency.unwrap_or(1);
        if concurrency == 0 {
            return Err(field("build_concurrency", "must be at least 1"));
        }
        let marker = self
            .build_marker
            .clone()
            .unwrap_or_else(|| "BUILD_COMPLETE".into());
        let marker_ok = !marker.is_empty()
            && marker.len() <= 255
            && marker != "."
            && marker != ".."
            && !marker.contains(['/', '\0']);
        if !marker_ok {
            return Err(field("build_marker", "must be a plain file name"));
        }
        let rescan = duration("build_rescan", &self.build_rescan, 30)?;
        if rescan.is_zero() {
            return Err(field("build_rescan", "must be positive"));
        }
        let timeout = duration("build_timeout", &self.build_timeout, 3600)?;
        if timeout.is_zero() {
            return Err(field("build_timeout", "must be positive"));
        }
        let image_gc_interval = duration("image_gc_interval", &self.image_gc_interval, 300)?;
        if image_gc_interval.is_zero() {
            return Err(field("image_gc_interval", "must be positive"));
        }
        Ok(BuildSettings {
            drop: self.drop.clone(),
            recipes: self.recipes.clone(),
            keep: keep as usize,
            marker,
            rescan,
            concurrency: concurrency as usize,
            timeout,
            prune_grace: duration("prune_grace", &self.prune_grace, 600)?,
            image_gc_interval,
        })
    }
}

/// The build watcher's checked settings (see `docs/config.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    pub drop: Option<PathBuf>,
    pub recipes: Option<PathBuf>,
    pub keep: usize,
    pub marker: String,
    pub rescan: Duration,
    pub concurrency: usize,
    pub timeout: Duration,
    pub prune_grace: Duration,
    pub image_gc_interval: Duration,
}

/// A gossip interval: a duration, or milliseconds with `ms` (`500ms`).
fn parse_gossip_interval(s: &str) -> Result<Duration, String> {
    let d = match s.trim().strip_suffix("ms") {
        Some(ms) => Duration::from_millis(
            ms.trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a duration"))?,
        ),
        None => parse_duration(s).map_err(|e| e.to_string())?,
    };
    if d < Duration::from_millis(50) || d > Duration::from_secs(60) {
        return Err("must be between 50ms and 60s".into());
    }
    Ok(d)
}

/// How gossip datagrams are sealed (`docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SealMode {
    /// Every datagram sealed; unsealed ones are dropped.
    Required,
    /// Seal outgoing (plus an unsealed copy to peers not yet heard sealed),
    /// accept unsealed: the step between an unsealed and a sealed cluster.
    Transitional,
    /// Unsealed gossip (only with `insecure_gossip`).
    Off,
}

impl SealMode {
    pub fn parse(s: &str) -> Result<SealMode, String> {
        match s.trim() {
            "required" => Ok(SealMode::Required),
            "transitional" => Ok(SealMode::Transitional),
            "off" => Ok(SealMode::Off),
            other => Err(format!(
                "`{other}` is not one of required, transitional, off"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SealMode::Required => "required",
            SealMode::Transitional => "transitional",
            SealMode::Off => "off",
        }
    }
}

/// Where the cluster key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFile {
    /// `cluster_key`: read it (it must exist, mode 0600).
    Given(PathBuf),
    /// `<data_dir>/cluster.key`: created on first start, then read.
    Default(PathBuf),
    /// No key (unsealed gossip, `insecure_gossip`).
    None,
}

/// Checked configuration with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub name: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: PathBuf,
    pub memory_allocatable: u64,
    pub max_envs: u32,
    pub default_memory: u64,
    pub publish_addr: IpAddr,
    pub advertise_host: String,
    pub ready_timeout: Duration,
    pub cluster_id: String,
    pub gossip: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub cluster_key: KeyFile,
    pub gossip_seal: SealMode,
    pub insecure_gossip: bool,
    pub roles: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub gossip_interval: Duration,
    pub phi_threshold: u32,
    pub dead_node_grace: Duration,
    pub builds: BuildSettings,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub expiry_warning: Duration,
    pub smtp: Option<crate::mail::SmtpUrl>,
    pub mail_from: String,
    /// Without a trailing `/`; `None`: derived from the bound address.
    pub public_url: Option<String>,
    /// The web page's trusted sign-in header (lowercase) and its proxies.
    pub trusted_proxy: Option<crate::auth::TrustedProxy>,
    /// Catalog and cluster reads without a token (`open_read`).
    pub open_read: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn embedded_default() {
        let s = Config::default().resolve(24 * GIB, "box1").unwrap();
        assert_eq!(s.name, "box1");
        assert_eq!(s.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(s.store, PathBuf::from(".shoal/store"));
        assert_eq!(s.memory_allocatable, 22 * GIB);
        assert_eq!(s.max_envs, 8);
        assert_eq!(s.advertise_host, "127.0.0.1");
        assert_eq!(s.roles.len(), 4);
        assert_eq!(s.default_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(s.max_ttl, Duration::from_secs(99 * 3600));
        assert_eq!(s.expiry_warning, Duration::from_secs(3600));
        assert_eq!(s.smtp, None);
        assert_eq!(s.mail_from, "shoal@box1");
    }

    #[test]
    fn flags_override_file() {
        let file: Config =
            toml::from_str("name = \"a\"\nmax_envs = 4\nmemory = \"240GiB\"").unwrap();
        let flags = Config {
            max_envs: Some(2),
            ..Default::default()
        };
        let s = file.overlay(flags).resolve(256 * GIB, "h").unwrap();
        assert_eq!(
            (s.name.as_str(), s.max_envs, s.memory_allocatable),
            ("a", 2, 240 * GIB)
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let err = |toml: &str| -> String {
            let c: Config = match toml::from_str(toml) {
                Ok(c) => c,
                Err(e) => return e.to_string(),
            };
            c.resolve(8 * GIB, "h").unwrap_err().to_string()
        };
        assert!(err("memory = \"lots\"").contains("`memory`"));
        assert!(err("max_envs = 0").contains("`max_envs`"));
        assert!(err("roles = [\"boss\"]").contains("`roles`"));
        assert!(err("name = \"a b\"").contains("`name`"));
        assert!(err("ready_timeout = \"soon\"").contains("`ready_timeout`"));
        assert!(err("colour = \"blue\"").contains("unknown field"));
        assert!(err("phi_threshold = 0").contains("`phi_threshold`"));
        assert!(err("gossip_interval = \"1ms\"").contains("`gossip_interval`"));
        assert!(err("dead_node_grace = \"later\"").contains("`dead_node_grace`"));
        assert!(err("labels = { \"mémoire\" = \"1\" }").contains("`labels`"));
        assert!(err("keep = 0").contains("`keep`"));
        assert!(err("build_marker = \"a/b\"").contains("`build_marker`"));
        assert!(err("build_timeout = \"0s\"").contains("`build_timeout`"));
        assert!(err("build_concurrency = 0").contains("`build_concurrency`"));
        assert!(err("default_ttl = \"100h\"").contains("`default_ttl`"));
        assert!(err("max_ttl = \"0s\"").contains("`max_ttl`"));
        assert!(err("expiry_warning = \"later\"").contains("`expiry_warning`"));
        assert!(err("smtp = \"http://mail\"").contains("`smtp`"));
        assert!(err("mail_from = \"nobody\"").contains("`mail_from`"));
        assert!(err("public_url = \"ftp://x\"").contains("`public_url`"));
        assert!(err("trusted_user_header = \"X-User\"").contains("`trusted_proxies`"));
        assert!(err("trusted_proxies = [\"10.0.0.1\"]").contains("`trusted_proxies`"));
        assert!(
            err("trusted_user_header = \"a b\"\ntrusted_proxies = [\"10.0.0.1\"]")
                .contains("`trusted_user_header`")
        );
        assert!(
            err("trusted_user_header = \"Cookie\"\ntrusted_proxies = [\"10.0.0.1\"]")
                .contains("`trusted_user_header`")
        );
    }

    #[test]
    fn trusted_proxy_header() {
        let c: Config = toml::from_str(
            "trusted_user_header = \"X-Forwarded-User\"\ntrusted_proxies = [\"10.0.0.1\", \"::1\"]",
        )
        .unwrap();
        let t = c.resolve(24 * GIB, "box1").unwrap().trusted_proxy.unwrap();
        assert_eq!(t.header, "x-forwarded-user");
        assert_eq!(t.from.len(), 2);
        assert_eq!(
            Config::default()
                .resolve(24 * GIB, "b")
                .unwrap()
                .trusted_proxy,
            None
        );
    }

    #[test]
    fn gossip_security_table() {
        use SealMode::*;
        let dd = PathBuf::from(".shoal/cluster.key");
        let k = PathBuf::from("/etc/shoal/cluster.key");
        // (seeds, cluster_key, gossip_seal, insecure) -> mode, key, or the field in error
        type Want = Result<(SealMode, KeyFile), &'static str>;
        let cases: Vec<(bool, bool, Option<&str>, bool, Want)> = vec![
            (
                false,
                false,
                None,
                false,
                Ok((Required, KeyFile::Default(dd.clone()))),
            ),
            (
                false,
                true,
                None,
                false,
                Ok((Required, KeyFile::Given(k.clone()))),
            ),
            (
                true,
                true,
                None,
                false,
                Ok((Required, KeyFile::Given(k.clone()))),
            ),
            (
                true,
                true,
                Some("transitional"),
                false,
                Ok((Transitional, KeyFile::Given(k.clone()))),
            ),
            (true, false, None, false, Err("cluster_key")),
            (true, false, Some("transitional"), true, Err("cluster_key")),
            (true, false, None, true, Ok((Off, KeyFile::None))),
            (true, false, Some("off"), true, Ok((Off, KeyFile::None))),
            (true, true, Some("off"), false, Err("gossip_seal")),
            (false, false, Some("off"), false, Err("gossip_seal")),
            (false, false, Some("sealed"), false, Err("gossip_seal")),
            (
                false,
                false,
                Some("transitional"),
                false,
                Ok((Transitional, KeyFile::Default(dd.clone()))),
            ),
        ];
        for (seeds, key, seal, insecure, want) in cases {
            let c = Config {
                seeds: seeds.then(|| vec!["10.0.0.1:7946".to_string()]),
                cluster_key: key.then(|| k.clone()),
                gossip_seal: seal.map(String::from),
                insecure_gossip: Some(insecure),
                ..Default::default()
            };
            let got = c
                .resolve(8 * GIB, "h")
                .map(|s| (s.gossip_seal, s.cluster_key))
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{seeds} {key} {seal:?} {insecure}"),
                (Err(e), Err(f)) => assert!(e.contains(&format!("`{f}`")), "{e}"),
                (g, w) => panic!("{seeds} {key} {seal:?} {insecure}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/shoal.example.toml");
        let c = Config::from_file(&path).unwrap();
        c.resolve(256 * GIB, "h").unwrap();
    }
}
