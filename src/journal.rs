//! The journal of this node's environments: `<data_dir>/envs/<id>.json`,
//! one record per environment (what container labels cannot hold), and
//! tombstones `<data_dir>/envs/deleted/<id>` of deleted environments.
//!
//! Writes are ordered. Each record write carries a sequence number that
//! `Envs` takes under its state lock together with the snapshot it writes;
//! the journal drops a write older than the last one it made of that
//! environment. Writes are serialized (one std mutex held across the file
//! write, never across an `.await`), so two snapshots of a record cannot
//! land out of order, and nothing written after a tombstone brings a
//! deleted record back.
//!
//! A tombstone outlives the record: a create the engine finishes after the
//! delete (the request was already on its way) leaves a container with the
//! environment's labels, which recovery then removes instead of adopting.
//! Tombstones older than [`TOMBSTONE_KEEP`] are dropped.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use tracing::warn;

use crate::envs::write_atomic;
use crate::model::EnvRecord;

/// How long the tombstone of a deleted environment is kept.
pub const TOMBSTONE_KEEP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
#[error("journal {path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// One node's journal directory.
pub struct Journal {
    dir: PathBuf,
    deleted: PathBuf,
    /// The sequence of the last write of each environment (`u64::MAX`
    /// once it has a tombstone). Held across the file write: see the
    /// module header.
    written: Mutex<HashMap<String, u64>>,
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    /// Opens (creating) the journal in `dir`.
    pub fn open(dir: PathBuf) -> Result<Journal, JournalError> {
        let deleted = dir.join("deleted");
        std::fs::create_dir_all(&deleted).map_err(io(&deleted))?;
        Ok(Journal {
            dir,
            deleted,
            written: Mutex::default(),
        })
    }

    /// The journal directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `rec` as of sequence `seq`, unless a newer write of it (or
    /// its tombstone) was made already: then nothing is written and the
    /// answer is `false`.
    pub fn write(&self, rec: &EnvRecord, seq: u64) -> Result<bool, JournalError> {
        let mut written = self.written.lock();
        if written.get(&rec.id).is_some_and(|&last| last >= seq) {
            return Ok(false);
        }
        let path = self.path(&rec.id);
        let data = serde_json::to_vec_pretty(rec).map_err(|e| JournalError {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomic(&path, &data).map_err(io(&path))?;
        written.insert(rec.id.clone(), seq);
        Ok(true)
    }

    /// Marks environment `id` deleted: its tombstone is written (so no
    /// later write of its record lands), then its record is removed.
    pub fn tombstone(&self, id: &str) -> Result<(), JournalError> {
        let mut written = self.written.lock();
        written.insert(id.to_string(), u64::MAX);
        let mark = self.deleted.join(id);
        write_atomic(&mark, b"").map_err(io(&mark))?;
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The ids with a tombstone.
    pub fn tombstones(&self) -> HashSet<String> {
        let Ok(dir) = std::fs::read_dir(&self.deleted) else {
            return HashSet::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    /// Drops tombstones older than `keep`; returns how many.
    pub fn prune_tombstones(&self, keep: Duration) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.deleted) else {
            return 0;
        };
        let mut n = 0;
        for e in dir.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if old && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Every readable record of node `node`, tombstoned ones left out (and
    /// their stale record files removed).
    pub fn read(&self, node: &str) -> BTreeMap<String, EnvRecord> {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        let dead = self.tombstones();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                // Leftover temp file of a write that did not finish.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<EnvRecord>(&b).ok())
            {
                Some(r) if dead.contains(&r.id) => {
                    let _ = std::fs::remove_file(&path);
                }
                Some(r) if r.node == node => {
                    out.insert(r.id.clone(), r);
                }
                Some(_) => {}
                None => warn!(path = %path.display(), "unreadable journal entry skipped"),
            }
        }
        out
    }
}
