//! Ignition JSON, spec 3.3.0: what `butane --pretty --strict` makes of
//! cloud-config/flatcar.bu (variant flatcar, version 1.0.0). The structs
//! follow Ignition's Go types field by field, in their order, so that the
//! JSON has Butane's key order; empty fields are left out as Butane does.
//!
//! Known difference: Butane gzips an inline file when the base64 of the
//! gzip is shorter than the plain data URL (`"compression": "gzip"`); shoal
//! never does (the bytes of Go's compress/gzip are not reproducible here),
//! so such files are plain `data:,` or `data:;base64,` URLs with
//! `"compression": ""`. The files Ignition writes are the same.

use base64::Engine as _;
use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use super::model::{Contents, Model};
use super::BootstrapError;

/// The spec version Butane's flatcar 1.0.0 variant emits.
pub const VERSION: &str = "3.3.0";

#[derive(Debug, Serialize, Deserialize)]
pub struct Config {
    pub ignition: Ignition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passwd: Option<Passwd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<Systemd>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Ignition {
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Passwd {
    pub users: Vec<User>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(rename = "sshAuthorizedKeys")]
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Storage {
    pub files: Vec<File>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct File {
    pub path: String,
    pub contents: Resource,
    pub mode: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Resource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Verification {
    pub hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Systemd {
    pub units: Vec<Unit>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Unit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contents: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropins: Vec<Dropin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Dropin {
    pub contents: String,
    pub name: String,
}

/// The model as Ignition's config.
pub fn config(m: &Model) -> Config {
    let files = m
        .files
        .iter()
        .map(|f| File {
            path: f.path.clone(),
            contents: match &f.contents {
                Contents::Inline(t) => Resource {
                    // Butane sets "" explicitly for inline contents.
                    compression: Some(String::new()),
                    source: data_url(t.as_bytes()),
                    verification: None,
                },
                Contents::Remote { url, sha512 } => Resource {
                    compression: None,
                    source: url.clone(),
                    verification: sha512.as_ref().map(|h| Verification {
                        hash: format!("sha512-{h}"),
                    }),
                },
            },
            mode: f.mode,
        })
        .collect();
    let units = m
        .units
        .iter()
        .map(|u| Unit {
            contents: u.contents.clone(),
            dropins: u
                .dropins
                .iter()
                .map(|(name, contents)| Dropin {
                    contents: contents.clone(),
                    name: name.clone(),
                })
                .collect(),
            enabled: Some(u.enabled),
            name: u.name.clone(),
        })
        .collect();
    Config {
        ignition: Ignition {
            version: VERSION.into(),
        },
        passwd: Some(Passwd {
            users: vec![User {
                name: "core".into(),
                ssh_authorized_keys: m.ssh_keys.clone(),
            }],
        }),
        storage: Some(Storage { files }),
        systemd: Some(Systemd { units }),
    }
}

/// The Ignition JSON text, as `butane --pretty` writes it (Go's
/// json.MarshalIndent with two spaces, HTML characters escaped, one
/// newline at the end).
pub fn render(m: &Model) -> Result<String, BootstrapError> {
    let json = serde_json::to_string_pretty(&config(m))
        .map_err(|e| BootstrapError::Render(e.to_string()))?;
    // Go escapes these inside strings; outside strings JSON has none.
    let mut out = json
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    out.push('\n');
    Ok(out)
}

/// What RFC 2396 leaves unescaped (Butane's dataurl.Escape): letters,
/// digits and `-_.!~*'()`.
const RFC2396: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// A data URL of `bytes`, Butane's choice without compression: the
/// percent-escaped form, or base64 when that is shorter.
pub fn data_url(bytes: &[u8]) -> String {
    let escaped = format!(",{}", percent_encode(bytes, RFC2396));
    let b64 = format!(
        ";base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    if b64.len() < escaped.len() {
        format!("data:{b64}")
    } else {
        format!("data:{escaped}")
    }
}

/// The bytes of a `data:` URL (plain or base64; media type ignored).
pub fn decode_data_url(url: &str) -> Option<Vec<u8>> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    if meta.split(';').any(|p| p == "base64") {
        base64::engine::general_purpose::STANDARD
            .decode(percent_decode_str(data).collect::<Vec<u8>>())
            .ok()
    } else {
        Some(percent_decode_str(data).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_as_butane_writes_them() {
        let cases: &[(&[u8], &str)] = &[
            (b"worker-1\n", "data:,worker-1%0A"),
            (b"a b", "data:,a%20b"),
            (b"x=1 # (ok)!", "data:,x%3D1%20%23%20(ok)!"),
            // base64 is shorter for mostly-escaped bytes.
            (b"\n\n\n\n\n\n", "data:;base64,CgoKCgoK"),
        ];
        for (bytes, want) in cases {
            assert_eq!(data_url(bytes), *want);
            assert_eq!(decode_data_url(want).as_deref(), Some(*bytes));
        }
    }
}
