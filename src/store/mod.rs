//! The image store: a directory (local disk, or an NFS mount shared by the
//! nodes) holding one lz4-frame file per layer, named by the layer's diff id
//! and shared by every image that has it, and one small manifest per
//! published `name:build`. Format: `docs/store-format.md`.
//!
//! Crash safety: every file is written to `tmp/`, fsynced and renamed into
//! place, and a manifest is written only after every layer it names, so a
//! crash leaves the old or the new state, never a manifest that points at a
//! missing or partial layer.
//!
//! This file holds the handle ([`Store`]), its errors and the directory
//! layout; `catalog.rs` reads and removes what the store holds,
//! `publish.rs` writes images into it, `load.rs` writes load archives out.

mod catalog;
#[cfg(test)]
pub(crate) mod fixtures;
mod health;
mod load;
pub mod manifest;
pub mod marker;
mod publish;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use catalog::ManifestFile;
pub use health::{StoreState, StoreStatus, CALL_TIMEOUT, CHECK_EVERY};
pub use load::LoadStats;
pub use manifest::{ImageRef, LayerEntry, Manifest, Requirements};
pub use publish::{PublishHint, PublishStats};

use crate::archive::Digest;
use manifest::BadConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0} is not published")]
    NotFound(ImageRef),
    #[error("image {0} is already published with other content")]
    AlreadyPublished(ImageRef),
    #[error("layer {diff_id}: content digest is {actual}")]
    DigestMismatch { diff_id: Digest, actual: Digest },
    #[error("layer {0} is missing from the store")]
    MissingLayer(Digest),
    #[error("manifest {path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("docker save archive: {0}")]
    BadArchive(String),
    #[error("writing the load archive: {0}")]
    Sink(std::io::Error),
    #[error("layer {diff_id} has {actual} bytes, expected {expected}")]
    LayerSize {
        diff_id: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("reading the docker save stream: {0}")]
    SaveStream(std::io::Error),
    #[error("image config: {0}")]
    Config(BadConfig),
    #[error("{store} is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    #[error("{store} is read-only: publishing is refused")]
    ReadOnly { store: String },
}

impl StoreError {
    /// A short, bounded name of the error's kind (the `kind` label of
    /// `shoal_store_errors_total`).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "io",
            StoreError::NotFound(_) => "not_found",
            StoreError::AlreadyPublished(_) => "already_published",
            StoreError::DigestMismatch { .. } => "digest_mismatch",
            StoreError::MissingLayer(_) => "missing_layer",
            StoreError::BadManifest { .. } => "bad_manifest",
            StoreError::BadArchive(_) => "bad_archive",
            StoreError::Sink(_) => "sink",
            StoreError::LayerSize { .. } => "layer_size",
            StoreError::SaveStream(_) => "save_stream",
            StoreError::Config(_) => "config",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::ReadOnly { .. } => "read_only",
        }
    }
}

/// blocking file I/O, so async callers use [`Store::call`] (bounded) or
/// `spawn_blocking`. Clones share one [`StoreStatus`] (`store/health.rs`).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    health: std::sync::Arc<health::Health>,
}

impl Store {
    /// Opens (and creates) the store at `root`, removing leftovers in `tmp/`
    /// from a crashed writer.
    ///
    /// Only leftovers untouched for [`TMP_GRACE`] are removed: the store may
    /// be an NFS directory shared by nodes, and another node may be writing
    /// into `tmp/` right now (a live writer keeps its file's mtime fresh).
    ///
    /// A store opened here is trusted as it is (tools, tests): a new one
    /// gets its marker (`store/marker.rs`), an existing one is used. A
    /// daemon uses [`Store::for_node`], which refuses a store it knew that
    /// is gone instead of making a new one.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for dir in [
            root.join("layers/sha256"),
            root.join("manifests"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        let m = match marker::look(root).map_err(io_at(root))? {
            marker::Seen::Marked(m) => m,
            _ => marker::write_marker(root, &marker::Marker::new()).map_err(io_at(root))?,
        };
        let store = Store {
            root: root.to_path_buf(),
            health: std::sync::Arc::new(health::Health::new(
                root.to_path_buf(),
                StoreState::Ok,
                Some(m.id),
                None,
                None,
            )),
        };
        store.clean_tmp(TMP_GRACE)?;
        Ok(store)
    }

    /// Removes files in `tmp/` not modified for `older_than`; returns how
    /// many. [`Store::open`] does this; a long-running daemon may call it
    /// from time to time.
    pub fn clean_tmp(&self, older_than: Duration) -> Result<usize, StoreError> {
        let tmp = self.tmp_dir();
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let entry = entry.map_err(io_at(&tmp))?;
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age < older_than {
                continue;
            }
            let res = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match res {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %path.display(), "removed leftover temp file");
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        Ok(removed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers").join("sha256")
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh path in `tmp/`, unique across processes and nodes.
    fn tmp_path(&self) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir().join(format!(
            "{}-{}-{:016x}",
            std::process::id(),
            seq,
            rand::random::<u64>()
        ))
    }
}

/// How old a file in `tmp/` must be before [`Store::open`] takes it for a
/// crashed writer's leftover.
pub const TMP_GRACE: Duration = Duration::from_secs(15 * 60);

/// Read and write buffer size for layer data.
const IO_BUF: usize = 1 << 20;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Removes a temp file when dropped, whatever happened to it.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The fixtures other modules' tests build images with.
    pub(crate) use super::fixtures::{config_for, oci_save};

    #[test]
    fn open_removes_old_leftovers_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = store.tmp_dir().join("crashed");
        fs::write(&old, b"half a layer").unwrap();
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - TMP_GRACE - Duration::from_secs(1))
            .unwrap();
        let live = store.tmp_dir().join("live");
        fs::write(&live, b"being written").unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!old.exists());
        assert!(live.exists());
        assert_eq!(store.clean_tmp(Duration::ZERO).unwrap(), 1);
        assert!(!live.exists());
    }
}
