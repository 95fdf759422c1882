//! Butane YAML, variant flatcar, version 1.0.0 (cloud-config/flatcar.bu):
//! the human-edited form of the Ignition config. `butane --pretty --strict
//! flatcar.bu` gives cloud-config/flatcar.ign (docs/bootstrap.md names the
//! one known difference: Butane gzips some inline files).

use serde::Serialize;

use super::model::{Contents, Model};
use super::BootstrapError;

#[derive(Serialize)]
struct Config<'a> {
    variant: &'static str,
    version: &'static str,
    passwd: Passwd<'a>,
    storage: Storage<'a>,
    systemd: Systemd<'a>,
}

#[derive(Serialize)]
struct Passwd<'a> {
    users: Vec<User<'a>>,
}

#[derive(Serialize)]
struct User<'a> {
    name: &'static str,
    ssh_authorized_keys: &'a [String],
}

#[derive(Serialize)]
struct Storage<'a> {
    files: Vec<File<'a>>,
}

#[derive(Serialize)]
struct File<'a> {
    path: &'a str,
    /// Decimal: YAML 1.2 has no `0644`, and Butane reads either.
    mode: u32,
    contents: Resource<'a>,
}

#[derive(Serialize)]
struct Resource<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    inline: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<Verification>,
}

#[derive(Serialize)]
struct Verification {
    hash: String,
}

#[derive(Serialize)]
struct Systemd<'a> {
    units: Vec<Unit<'a>>,
}

#[derive(Serialize)]
struct Unit<'a> {
    name: &'a str,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dropins: Vec<Dropin<'a>>,
}

#[derive(Serialize)]
struct Dropin<'a> {
    name: &'a str,
    contents: &'a str,
}

const HEADER: &str = "\
# Butane config (variant flatcar) for one new shoal node on Flatcar
# Container Linux. Rendered by
#   shoal bootstrap render --format butane cloud-config/bootstrap.example.toml
# from the same model as flatcar.ign and shoal.yaml: edit the bootstrap
# config and render again rather than editing this file (docs/bootstrap.md).
";

pub fn render(m: &Model) -> Result<String, BootstrapError> {
    let files = m
        .files
        .iter()
        .map(|f| File {
            path: &f.path,
            mode: f.mode,
            contents: match &f.contents {
                Contents::Inline(t) => Resource {
                    inline: Some(t),
                    source: None,
                    verification: None,
                },
                Contents::Remote { url, sha512 } => Resource {
                    inline: None,
                    source: Some(url),
                    verification: sha512.as_ref().map(|h| Verification {
                        hash: format!("sha512-{h}"),
                    }),
                },
            },
        })
        .collect();
    let units = m
        .units
        .iter()
        .map(|u| Unit {
            name: &u.name,
            enabled: u.enabled,
            contents: u.contents.as_deref(),
            dropins: u
                .dropins
                .iter()
                .map(|(name, contents)| Dropin { name, contents })
                .collect(),
        })
        .collect();
    let c = Config {
        variant: "flatcar",
        version: "1.0.0",
        passwd: Passwd {
            users: vec![User {
                name: "core",
                ssh_authorized_keys: &m.ssh_keys,
            }],
        },
        storage: Storage { files },
        systemd: Systemd { units },
    };
    let yaml = serde_yaml_ng::to_string(&c).map_err(|e| BootstrapError::Render(e.to_string()))?;
    Ok(format!("{HEADER}{yaml}"))
}
