//! The box, once: every file and unit a new node needs, whatever format
//! describes it. Pure: built from [`Inputs`], no I/O.

use std::net::IpAddr;

use super::config::KeyContents;
use super::{BootstrapError, Inputs};

/// The unit and sysctl files of the repository, never copied.
pub const SHOAL_SERVICE: &str = include_str!("../../systemd/shoal.service");
pub const AIO_SYSCTL: &str = include_str!("../../systemd/shoal-aio.conf");

/// Where things go on the box.
pub const CONFIG_PATH: &str = "/etc/shoal/shoal.toml";
pub const KEY_PATH: &str = "/etc/shoal/cluster.key";
pub const SYSCTL_PATH: &str = "/etc/sysctl.d/90-shoal-aio.conf";
pub const NETWORK_PATH: &str = "/etc/systemd/network/10-shoal-static.network";
pub const STORE_MOUNT: &str = "/mnt/shoal-store";
/// The mount unit's name: the escaped path of [`STORE_MOUNT`].
pub const STORE_UNIT: &str = "mnt-shoal\\x2dstore.mount";
pub const DATA_DIR: &str = "/var/lib/shoal";
pub const API_PORT: u16 = 7070;
pub const GOSSIP_PORT: u16 = 7946;

/// shoal.toml keys the bootstrap sets itself; `[shoal]` may not.
const FIXED_KEYS: &[&str] = &[
    "name",
    "listen",
    "gossip",
    "advertise",
    "data_dir",
    "store",
    "cluster_key",
];

/// The two box layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Flatcar Container Linux: `/usr` is read-only, binaries under
    /// `/opt/bin`, Docker ships with the OS, provisioned by Ignition.
    Flatcar,
    /// Debian/Ubuntu with cloud-init: binary under `/usr/local/bin`, Docker
    /// and the NFS client from the distribution.
    Debian,
}

impl Layout {
    /// Where the shoal binary goes.
    pub fn binary_path(self) -> &'static str {
        match self {
            Layout::Flatcar => "/opt/bin/shoal",
            Layout::Debian => "/usr/local/bin/shoal",
        }
    }
}

/// What a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Written as given.
    Inline(String),
    /// Downloaded at first boot; `sha512` (hex) is checked when given.
    Remote { url: String, sha512: Option<String> },
}

/// A file on the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub mode: u32,
    pub contents: Contents,
    /// Holds a secret (the output that carries it inline is one too).
    pub secret: bool,
}

/// A systemd unit: its text (none: a unit the OS ships), drop-ins, and
/// whether it is enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    pub contents: Option<String>,
    /// (name, text) of each drop-in under `<unit>.d/`.
    pub dropins: Vec<(String, String)>,
    pub enabled: bool,
}

/// The whole box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub layout: Layout,
    pub hostname: String,
    pub ssh_keys: Vec<String>,
    /// Files in the order they are written; the binary first.
    pub files: Vec<FileEntry>,
    /// Units in the order they are started.
    pub units: Vec<Unit>,
}

impl Model {
    /// The box that `inputs` describes, laid out for `layout`.
    pub fn build(inputs: &Inputs, layout: Layout) -> Result<Model, BootstrapError> {
        let c = &inputs.config;
        check_hostname(&c.hostname)?;
        if c.ssh_authorized_keys.is_empty() {
            return Err(BootstrapError::field(
                "ssh_authorized_keys",
                "give at least one key",
            ));
        }
        let (ip, prefix) = parse_cidr(&c.network.address)?;
        check_interface(&c.network.interface)?;
        if c.network.dns.is_empty() {
            return Err(BootstrapError::field("network.dns", "give at least one"));
        }
        let sha = &inputs.binary_sha512;
        if sha.len() != 128 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BootstrapError::field(
                "binary.sha512",
                "128 hex digits (`sha512sum shoal`)",
            ));
        }
        check_url("binary.url", &c.binary.url, &["https://", "http://"])?;
        let nfs = &c.store.nfs;
        if !nfs.contains(":/") {
            return Err(BootstrapError::field("store.nfs", "SERVER:/EXPORT"));
        }

        let mut files = vec![
            FileEntry {
                path: layout.binary_path().into(),
                mode: 0o755,
                contents: Contents::Remote {
                    url: c.binary.url.clone(),
                    sha512: Some(sha.clone()),
                },
                secret: false,
            },
            text(CONFIG_PATH, 0o644, shoal_toml(inputs, ip)?),
            FileEntry {
                path: KEY_PATH.into(),
                mode: 0o600,
                contents: match &inputs.key {
                    KeyContents::Inline(t) => Contents::Inline(t.clone()),
                    KeyContents::Remote(url) => {
                        check_url("cluster_key.source", url, &["https://"])?;
                        Contents::Remote {
                            url: url.clone(),
                            sha512: None,
                        }
                    }
                },
                secret: true,
            },
            text(SYSCTL_PATH, 0o644, AIO_SYSCTL.into()),
            text(NETWORK_PATH, 0o644, network_file(inputs, ip, prefix)),
        ];
        if layout == Layout::Flatcar {
            // cloud-init sets the host name itself (`hostname:`).
            files.insert(1, text("/etc/hostname", 0o644, format!("{}\n", c.hostname)));
        }
        let units = vec![
            Unit {
                name: "docker.service".into(),
                contents: None,
                dropins: Vec::new(),
                enabled: true,
            },
            Unit {
                name: STORE_UNIT.into(),
                contents: Some(mount_unit(nfs, &c.store.options)),
                dropins: Vec::new(),
                enabled: true,
            },
            Unit {
                name: "shoal.service".into(),
                contents: Some(shoal_service(layout)),
                dropins: vec![(
                    "10-store.conf".into(),
                    format!("[Unit]\nRequiresMountsFor={STORE_MOUNT}\n"),
                )],
                enabled: true,
            },
        ];
        Ok(Model {
            layout,
            hostname: c.hostname.clone(),
            ssh_keys: c.ssh_authorized_keys.clone(),
            files,
            units,
        })
    }

    /// The file at `path`.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

fn text(path: &str, mode: u32, contents: String) -> FileEntry {
    FileEntry {
        path: path.into(),
        mode,
        contents: Contents::Inline(contents),
        secret: false,
    }
}

/// systemd/shoal.service with the binary where the layout puts it.
pub fn shoal_service(layout: Layout) -> String {
    SHOAL_SERVICE.replace(Layout::Debian.binary_path(), layout.binary_path())
}

/// A URL the box downloads from: one of `schemes`, and nothing a shell
/// command line (cloud-init's `curl '...'`) would read differently.
fn check_url(field: &str, url: &str, schemes: &[&str]) -> Result<(), BootstrapError> {
    if !schemes.iter().any(|s| url.starts_with(s)) {
        return Err(BootstrapError::field(
            field,
            format!("a URL starting with {}", schemes.join(" or ")),
        ));
    }
    if url.contains(|c: char| c.is_whitespace() || c.is_control() || "'\"\\`$".contains(c)) {
        return Err(BootstrapError::field(
            field,
            "no blanks, quotes, backslashes, ` or $",
        ));
    }
    Ok(())
}

fn check_hostname(h: &str) -> Result<(), BootstrapError> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(BootstrapError::field(
            "hostname",
            "1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
        ))
    }
}

fn check_interface(i: &str) -> Result<(), BootstrapError> {
    if !i.is_empty()
        && i.len() <= 15
        && i.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.*".contains(&b))
    {
        Ok(())
    } else {
        Err(BootstrapError::field(
            "network.interface",
            "an interface name, e.g. eno1",
        ))
    }
}

/// `ADDRESS/PREFIX` into its parts.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), BootstrapError> {
    let bad = || BootstrapError::field("network.address", "ADDRESS/PREFIX, e.g. 192.0.2.11/24");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let p: u8 = p.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if p == 0 || p > max {
        return Err(bad());
    }
    Ok((ip, p))
}

fn network_file(inputs: &Inputs, ip: IpAddr, prefix: u8) -> String {
    let n = &inputs.config.network;
    let mut s = format!(
        "[Match]\nName={}\n\n[Network]\nAddress={ip}/{prefix}\nGateway={}\n",
        n.interface, n.gateway
    );
    for d in &n.dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    s
}

fn mount_unit(nfs: &str, options: &str) -> String {
    format!(
        "[Unit]\nDescription=shoal image store (NFS)\nAfter=network-online.target\n\
         Wants=network-online.target\n\n[Mount]\nWhat={nfs}\nWhere={STORE_MOUNT}\nType=nfs\n\
         Options={options}\n\n[Install]\nWantedBy=multi-user.target\n"
    )
}

/// The node's shoal.toml: the keys the bootstrap fixes, then `[shoal]` as
/// given. Checked by parsing it as the daemon's own config.
fn shoal_toml(inputs: &Inputs, ip: IpAddr) -> Result<String, BootstrapError> {
    let c = &inputs.config;
    for k in c.shoal.keys() {
        if FIXED_KEYS.contains(&k.as_str()) {
            return Err(BootstrapError::field(
                &format!("shoal.{k}"),
                "set by the bootstrap itself; remove it",
            ));
        }
    }
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let advertise = std::net::SocketAddr::new(ip, GOSSIP_PORT).to_string();
    let mut s = String::from(
        "# shoal node configuration, written by `shoal bootstrap render`\n\
         # (docs/config.md explains every field).\n",
    );
    s.push_str(&format!("name = {}\n", q(&c.hostname)));
    s.push_str(&format!("listen = {}\n", q(&format!("0.0.0.0:{API_PORT}"))));
    s.push_str(&format!("data_dir = {}\n", q(DATA_DIR)));
    s.push_str(&format!("store = {}\n", q(STORE_MOUNT)));
    s.push_str(&format!(
        "gossip = {}\n",
        q(&format!("0.0.0.0:{GOSSIP_PORT}"))
    ));
    s.push_str(&format!("advertise = {}\n", q(&advertise)));
    s.push_str("# Mode 0600, the same file on every node; gossip is sealed with it.\n");
    s.push_str(&format!("cluster_key = {}\n", q(KEY_PATH)));
    // The first node of a cluster has no one to join: seeds = [].
    if !c.shoal.contains_key("seeds") {
        s.push_str("seeds = []\n");
    } else {
        s.push_str("# The cluster's first node has no one to join: it has seeds = [].\n");
    }
    s.push_str(
        &toml::to_string(&c.shoal)
            .map_err(|e| BootstrapError::Render(format!("shoal.toml: {e}")))?,
    );
    toml::from_str::<crate::config::Config>(&s)
        .map_err(|e| BootstrapError::field("shoal", e.to_string()))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_table() {
        let cases: &[(&str, Option<(&str, u8)>)] = &[
            ("192.0.2.11/24", Some(("192.0.2.11", 24))),
            ("2001:db8::5/64", Some(("2001:db8::5", 64))),
            ("192.0.2.11", None),
            ("192.0.2.11/33", None),
            ("192.0.2.11/0", None),
            ("host/24", None),
        ];
        for (s, want) in cases {
            let got = parse_cidr(s).ok().map(|(ip, p)| (ip.to_string(), p));
            assert_eq!(got, want.map(|(a, p)| (a.to_string(), p)), "{s}");
        }
    }

    #[test]
    fn the_unit_follows_the_layout() {
        let f = shoal_service(Layout::Flatcar);
        assert!(f.contains("ExecStart=/opt/bin/shoal daemon --config /etc/shoal/shoal.toml"));
        assert!(!f.contains("/usr/local/bin"));
        assert_eq!(shoal_service(Layout::Debian), SHOAL_SERVICE);
    }

    #[test]
    fn hostname_table() {
        for (h, ok) in [
            ("worker-1", true),
            ("w", true),
            ("-w", false),
            ("w-", false),
            ("a.b", false),
            ("", false),
        ] {
            assert_eq!(check_hostname(h).is_ok(), ok, "{h}");
        }
    }
}
