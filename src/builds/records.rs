//! Build records and logs: the record `GET /v1/builds` shows, kept in
//! memory and persisted one JSON file per build under
//! `<data_dir>/builds/<product>/<build>.json` (temp + fsync + rename), the
//! log beside it (`.log`, its last [`LOG_MAX`] bytes).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::warn;

use super::{Builds, Key};

/// Version of the build record files.
pub const RECORD_FORMAT: u32 = 1;
/// Bytes of build log kept (the end of it).
const LOG_MAX: usize = 1 << 20;

/// Where a build stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Found complete, waiting for its turn.
    Queued,
    Building,
    /// In the catalog.
    Published,
    /// Not built; `error` says why, the log has the details.
    Failed,
    /// Was published, removed by retention.
    Pruned,
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Building => "building",
            BuildStatus::Published => "published",
            BuildStatus::Failed => "failed",
            BuildStatus::Pruned => "pruned",
        })
    }
}

/// How long each part of a build took, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From the marker's modification time to the scan that found it.
    pub detect_ms: Option<u64>,
    /// Waiting in the queue.
    pub queued_ms: Option<u64>,
    /// Loading the base image into the engine, when it lacked it.
    pub base_ms: Option<u64>,
    /// `docker build`, context upload included.
    pub build_ms: Option<u64>,
    /// The privileged install step and the commit.
    pub install_ms: Option<u64>,
    /// `docker save` into the store.
    pub publish_ms: Option<u64>,
}

/// One build, as `GET /v1/builds` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub format: u32,
    pub product: String,
    pub build: String,
    /// `product:build`, the image ref it is (or would be) published as;
    /// `None` when the names are not valid ids.
    #[serde(rename = "ref")]
    pub image: Option<String>,
    /// The build node that has it.
    pub node: String,
    pub status: BuildStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The base build it was built FROM.
    pub base: Option<String>,
    /// Its directory in the drop directory.
    pub dir: PathBuf,
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub timings: Timings,
    /// Layer files the publish added to the store, and their bytes.
    pub layers_added: Option<usize>,
    pub bytes_added: Option<u64>,
    /// Builds started (more than 1 after an interrupted one).
    #[serde(default)]
    pub attempts: u32,
}
/// The build log, kept to its last [`LOG_MAX`] bytes.
#[derive(Default)]
pub(super) struct Log(pub(super) String);

impl Log {
    pub(super) fn push(&mut self, s: &str) {
        self.0.push_str(s);
        if !s.ends_with('\n') {
            self.0.push('\n');
        }
        if self.0.len() > LOG_MAX {
            let mut cut = self.0.len() - LOG_MAX;
            while !self.0.is_char_boundary(cut) {
                cut += 1;
            }
            self.0.replace_range(..cut, "[… earlier output dropped]\n");
        }
    }
}
impl Builds {
    /// This node's builds, newest first.
    pub fn list(&self) -> Vec<BuildRecord> {
        let mut out: Vec<BuildRecord> = self.state.lock().records.values().cloned().collect();
        sort_records(&mut out);
        out
    }

    /// The log of a build of this node; `None` when this node has no such
    /// build.
    pub fn log(&self, product: &str, build: &str) -> Option<String> {
        let key = (product.to_string(), build.to_string());
        let rec = self.state.lock().records.get(&key).cloned()?;
        let path = self.log_path(&rec)?;
        Some(std::fs::read_to_string(path).unwrap_or_default())
    }
    pub(super) fn update(
        &self,
        key: &Key,
        f: impl FnOnce(&mut BuildRecord),
    ) -> Option<BuildRecord> {
        let rec = {
            let mut st = self.state.lock();
            let rec = st.records.get_mut(key)?;
            f(rec);
            rec.clone()
        };
        self.persist(&rec);
        Some(rec)
    }

    fn record_path(&self, rec: &BuildRecord) -> Option<PathBuf> {
        rec.image.as_ref()?;
        Some(
            self.records_dir
                .join(&rec.product)
                .join(format!("{}.json", rec.build)),
        )
    }

    fn log_path(&self, rec: &BuildRecord) -> Option<PathBuf> {
        self.record_path(rec).map(|p| p.with_extension("log"))
    }

    /// Writes a record (only those with valid ids: their names are safe
    /// path components). A failed write is logged: the record stays in
    /// memory, and the worst case after a restart is a rebuild.
    pub(super) fn persist(&self, rec: &BuildRecord) {
        let Some(path) = self.record_path(rec) else {
            return;
        };
        let res = std::fs::create_dir_all(path.parent().expect("has a parent")).and_then(|()| {
            crate::envs::write_atomic(&path, &serde_json::to_vec_pretty(rec).expect("serializes"))
        });
        if let Err(e) = res {
            warn!(path = %path.display(), error = %e, "writing a build record");
        }
    }

    pub(super) fn write_log(&self, rec: &BuildRecord, log: &Log) {
        if let Some(path) = self.log_path(rec) {
            if let Err(e) = crate::envs::write_atomic(&path, log.0.as_bytes()) {
                warn!(path = %path.display(), error = %e, "writing a build log");
            }
        }
    }
}

pub(super) fn sort_records(v: &mut [BuildRecord]) {
    v.sort_by(|a, b| {
        b.detected_at
            .cmp(&a.detected_at)
            .then_with(|| (&a.product, &a.build).cmp(&(&b.product, &b.build)))
    });
}

pub(super) fn read_records(dir: &Path) -> Vec<BuildRecord> {
    let mut out = Vec::new();
    for product in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(product.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<BuildRecord>(&d).map_err(|e| e.to_string()))
            {
                Ok(r) if r.format <= RECORD_FORMAT => out.push(r),
                Ok(r) => {
                    warn!(path = %path.display(), format = r.format, "build record of a newer format: skipped")
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable build record: skipped")
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builds::now;

    #[test]
    fn log_keeps_its_end() {
        let mut l = Log::default();
        for i in 0..(LOG_MAX / 1000 + 10) {
            l.push(&format!("{i:0>999}"));
        }
        assert!(l.0.len() <= LOG_MAX + 100);
        assert!(l.0.starts_with("[… earlier output dropped]"));
        assert!(l.0.ends_with(&format!("{:0>999}\n", LOG_MAX / 1000 + 9)));
    }

    #[test]
    fn records_round_trip() {
        let rec = BuildRecord {
            format: RECORD_FORMAT,
            product: "erp".into(),
            build: "7".into(),
            image: Some("erp:7".into()),
            node: "n".into(),
            status: BuildStatus::Published,
            error: None,
            base: Some("db:3".into()),
            dir: "/drop/erp/7".into(),
            detected_at: now(),
            started_at: Some(now()),
            finished_at: None,
            timings: Timings {
                build_ms: Some(5),
                ..Default::default()
            },
            layers_added: Some(1),
            bytes_added: Some(10),
            attempts: 1,
        };
        let json = serde_json::to_string(&rec).unwrap();
        assert!(json.contains("\"ref\":\"erp:7\""), "{json}");
        assert!(json.contains("\"status\":\"published\""));
        let back: BuildRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }
}
