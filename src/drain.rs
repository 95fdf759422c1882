//! Maintenance drain: an operator takes a node out of placement without
//! stopping it (`shoal drain`, `POST /v1/node/drain`). The node takes no new
//! environments (it gossips `draining`, placement answers reason
//! `draining`), while its running ones stay and can still be read, deleted
//! and extended. Undone by `shoal drain --undo`.
//!
//! The drain survives a restart of the daemon (an upgrade must not put a
//! node under maintenance back into service): it is kept in
//! `<data_dir>/drain.json`, versioned, written as temp file + fsync +
//! rename; no file means not drained. A SIGTERM drain (shutdown) is a
//! different thing and never persisted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The file under the data dir.
pub const FILE: &str = "drain.json";
/// The on-disk format's version.
pub const VERSION: u32 = 1;

/// A maintenance drain: since when, and who asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Maintenance {
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The operator who drained the node (the token's user).
    pub by: String,
}

/// Whether the node takes new environments, as `GET /v1/node` (`drain`)
/// and `POST /v1/node/drain` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeDrain {
    /// True when the node takes no new environments (maintenance or
    /// shutdown): what the cluster sees in gossip.
    pub draining: bool,
    /// The operator's maintenance drain, if any (kept across restarts).
    #[serde(default)]
    pub maintenance: Option<Maintenance>,
    /// The daemon is shutting down (SIGTERM).
    #[serde(default)]
    pub stopping: bool,
}

/// `POST /v1/node/drain`'s body.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// `true`: take no new environments; `false`: take them again.
    pub drain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("cannot read or write the drain file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the drain file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    maintenance: Maintenance,
}

/// `<data_dir>/drain.json`.
pub fn file(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The persisted drain, `None` when there is no file.
pub fn load(data_dir: &Path) -> Result<Option<Maintenance>, DrainError> {
    let path = file(data_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DrainError::Io { path, source }),
    };
    parse(&text)
        .map(Some)
        .map_err(|message| DrainError::Parse { path, message })
}

fn parse(text: &[u8]) -> Result<Maintenance, String> {
    let d: OnDisk = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if d.version != VERSION {
        return Err(format!(
            "version {} (this shoal reads {VERSION})",
            d.version
        ));
    }
    Ok(d.maintenance)
}

/// Persists `state` (`None` removes the file). Blocking.
pub fn save(data_dir: &Path, state: Option<&Maintenance>) -> Result<(), DrainError> {
    let path = file(data_dir);
    let r = match state {
        Some(m) => {
            let body = serde_json::to_vec_pretty(&OnDisk {
                version: VERSION,
                maintenance: m.clone(),
            })
            .expect("plain data serializes");
            crate::envs::write_atomic(&path, &body)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    };
    r.map_err(|source| DrainError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn round_trip_and_undo() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let m = Maintenance {
            since: datetime!(2026-12-02 05:00 UTC),
            by: "ops@lab".into(),
        };
        save(dir.path(), Some(&m)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(m));
        save(dir.path(), None).unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        // Undo twice is fine.
        save(dir.path(), None).unwrap();
    }

    #[test]
    fn parse_table() {
        let ok = br#"{"version":1,"since":"2026-12-02T05:00:00Z","by":"ops@lab"}"#;
        assert_eq!(parse(ok).unwrap().by, "ops@lab");
        for (bad, says) in [
            (
                &br#"{"version":2,"since":"2026-12-02T05:00:00Z","by":"a"}"#[..],
                "version 2",
            ),
            (&br#"{"version":1,"by":"a"}"#[..], "since"),
            (&b"not json"[..], "expected"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
