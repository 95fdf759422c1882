//! The bootstrap config (TOML, cloud-config/bootstrap.example.toml) and the
//! one I/O step before the pure model: reading the key file and hashing the
//! binary when the config names local files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha512};

use super::BootstrapError;

/// The bootstrap config, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// The box's host name, also its shoal node name.
    pub hostname: String,
    /// Public keys the operators log in with (user `core` on Flatcar, the
    /// default user on Debian/Ubuntu).
    pub ssh_authorized_keys: Vec<String>,
    pub network: Network,
    pub binary: Binary,
    pub cluster_key: ClusterKey,
    pub store: Store,
    /// The node's shoal.toml beyond what the bootstrap fixes (name, listen,
    /// gossip, advertise, data_dir, store, cluster_key): cluster_id, seeds,
    /// roles, labels, max_envs, open_read, …
    #[serde(default)]
    pub shoal: toml::Table,
}

/// Static network of one interface (systemd-networkd).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The NIC, e.g. `eno1`.
    pub interface: String,
    /// `ADDRESS/PREFIX`, e.g. `192.0.2.11/24`.
    pub address: String,
    pub gateway: IpAddr,
    pub dns: Vec<IpAddr>,
}

/// The shoal binary: where the box downloads it and its SHA-512, given
/// (`sha512`) or computed from a local copy of the same file (`file`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    pub url: String,
    pub sha512: Option<String>,
    pub file: Option<PathBuf>,
}

/// The cluster key: `file` (its line is written into the output, which is
/// then a secret) or `source` (an https URL the box fetches at first boot;
/// the output holds no secret).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterKey {
    pub file: Option<PathBuf>,
    pub source: Option<String>,
}

/// The image store: an NFS export mounted at /mnt/shoal-store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `SERVER:/EXPORT`.
    pub nfs: String,
    #[serde(default = "default_nfs_options")]
    pub options: String,
}

fn default_nfs_options() -> String {
    "rw,hard,noatime,nfsvers=4.1".into()
}

/// Where the cluster key comes from, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyContents {
    /// The key file's text, written inline.
    Inline(String),
    /// Fetched by the box from this URL.
    Remote(String),
}

/// Everything the model needs, read and checked: the config, the key and
/// the binary's hash (lower-case hex).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub config: BootstrapConfig,
    pub key: KeyContents,
    pub binary_sha512: String,
    /// Where the config came from (for messages).
    pub path: PathBuf,
}

impl Inputs {
    /// Reads the bootstrap config at `path`; relative `file` paths in it are
    /// taken from the config's directory.
    pub fn load(path: &Path) -> Result<Inputs, BootstrapError> {
        let text = read(path)?;
        let config: BootstrapConfig = toml::from_str(&text).map_err(|e| BootstrapError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let key = match (&config.cluster_key.file, &config.cluster_key.source) {
            (Some(f), None) => {
                let f = base.join(f);
                let text = read(&f)?;
                crate::keyring::Keyring::parse(&text).map_err(|e| {
                    BootstrapError::field("cluster_key.file", format!("{}: {e}", f.display()))
                })?;
                KeyContents::Inline(text)
            }
            (None, Some(url)) => KeyContents::Remote(url.clone()),
            _ => {
                return Err(BootstrapError::field(
                    "cluster_key",
                    "give exactly one of `file` and `source`",
                ))
            }
        };
        let binary_sha512 = match (&config.binary.sha512, &config.binary.file) {
            (Some(h), None) => h.to_ascii_lowercase(),
            (None, Some(f)) => sha512_file(&base.join(f))?,
            _ => {
                return Err(BootstrapError::field(
                    "binary",
                    "give exactly one of `sha512` and `file`",
                ))
            }
        };
        Ok(Inputs {
            config,
            key,
            binary_sha512,
            path: path.to_path_buf(),
        })
    }
}

fn read(path: &Path) -> Result<String, BootstrapError> {
    std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The SHA-512 of a file, lower-case hex (streamed: the binary is large).
pub fn sha512_file(path: &Path) -> Result<String, BootstrapError> {
    let err = |source| BootstrapError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut h = Sha512::new();
    std::io::copy(&mut f, &mut h).map_err(err)?;
    Ok(hex::encode(h.finalize()))
}
