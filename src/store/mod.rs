//! The image store: a directory (local disk, or an NFS mount shared by the
//! nodes) holding one lz4-frame file per layer, named by the layer's diff id
//! and shared by every image that has it, and one small manifest per
//! published `name:build`. Format: `docs/store-format.md`.
//!
//! Crash safety: every file is written to `tmp/`, fsynced and renamed into
//! place, and a manifest is written only after every layer it names, so a
//! crash leaves the old or the new state, never a manifest that points at a
//! missing or partial layer.

mod health;
pub mod manifest;
pub mod marker;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

pub use health::{StoreState, StoreStatus, CALL_TIMEOUT, CHECK_EVERY};
pub use manifest::{ImageRef, LayerEntry, Manifest, Requirements};

use crate::archive::load::{blob_path, metadata_files, LoadError, LoadWriter};
use crate::archive::save::{read_full, read_save, LayerSink, SaveError};
use crate::archive::{chain_ids, Digest, Hasher};
use manifest::{config_facts, BadConfig, MANIFEST_FORMAT};

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

/// What publishing knows before the `docker save` stream starts: the image
/// as the engine describes it. Used to skip compressing layers the store
/// already holds, and cross-checked against the archive.
#[derive(Debug, Clone, Default)]
pub struct PublishHint {
    /// The image's diff ids, bottom-up, from the engine's inspect.
    pub diff_ids: Vec<Digest>,
}

/// Figures of one load archive written by [`Store::write_load_archive`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Layers in the image.
    pub layers_total: usize,
    /// Layers written into the archive (the rest were omitted).
    pub layers_sent: usize,
    /// Uncompressed layer bytes written into the archive.
    pub bytes_sent: u64,
}

/// One manifest file as [`Store::manifest_files`] found it.
#[derive(Debug, Clone)]
pub struct ManifestFile {
    pub path: PathBuf,
    /// The manifest when it reads and validates.
    pub manifest: Option<Manifest>,
    /// The diff ids it names; `None` when not even that can be read (then
    /// no layer may be taken for garbage).
    pub layers: Option<Vec<Digest>>,
}

/// The diff ids a manifest names, from its JSON alone.
fn lenient_layers(path: &Path) -> Option<Vec<Digest>> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    v.get("layers")?
        .as_array()?
        .iter()
        .map(|l| l.get("diff_id")?.as_str()?.parse().ok())
        .collect()
}

/// Figures of one publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Layer files the publish added to the store.
    pub layers_added: usize,
    /// Bytes of the layer files it added.
    pub bytes_added: u64,
}

/// A handle on the store directory. Cheap to clone; every method does
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

    /// Every published manifest, newest `published_at` first. A manifest
    /// that does not read or validate is logged and left out.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for path in self.manifest_paths()? {
            let m = match self.read_manifest(&path) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping manifest");
                    continue;
                }
            };
            if let Some(l) = m
                .layers
                .iter()
                .find(|l| !self.layer_path(&l.diff_id).exists())
            {
                tracing::warn!(
                    path = %path.display(),
                    layer = %l.diff_id,
                    "skipping manifest: layer file missing"
                );
                continue;
            }
            out.push(m);
        }
        out.sort_by(|a, b| {
            b.published_at
                .cmp(&a.published_at)
                .then_with(|| a.image_ref().cmp(&b.image_ref()))
        });
        Ok(out)
    }

    /// Paths of every `manifests/<name>/<build>.json` file.
    fn manifest_paths(&self) -> Result<Vec<PathBuf>, StoreError> {
        let dir = self.manifests_dir();
        let mut out = Vec::new();
        for name in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let name = name.map_err(io_at(&dir))?.path();
            if !name.is_dir() {
                continue;
            }
            for file in fs::read_dir(&name).map_err(io_at(&name))? {
                let path = file.map_err(io_at(&name))?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    out.push(path);
                }
            }
        }
        Ok(out)
    }

    /// The manifest of `r`, or [`StoreError::NotFound`].
    pub fn get(&self, r: &ImageRef) -> Result<Manifest, StoreError> {
        match self.read_manifest(&self.manifest_path(r)) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(r.clone()))
            }
            other => other,
        }
    }

    /// Path of the lz4 file of the layer with this diff id.
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layers_dir().join(format!("{}.tar.lz4", diff_id.hex()))
    }

    /// Path of the manifest of `r` (which may not exist).
    pub fn manifest_path(&self, r: &ImageRef) -> PathBuf {
        self.manifests_dir()
            .join(&r.name)
            .join(format!("{}.json", r.build))
    }

    /// Every manifest file, read leniently for pruning: unlike
    /// [`Store::list`], a manifest that does not validate (a newer format, a
    /// missing layer) is still returned, with the layers it names when its
    /// JSON says, so nothing it references is taken for garbage.
    pub fn manifest_files(&self) -> Result<Vec<ManifestFile>, StoreError> {
        let mut out = Vec::new();
        for path in self.manifest_paths()? {
            let manifest = self.read_manifest(&path).ok();
            let layers = match &manifest {
                Some(m) => Some(m.layers.iter().map(|l| l.diff_id).collect()),
                None => lenient_layers(&path),
            };
            out.push(ManifestFile {
                path,
                manifest,
                layers,
            });
        }
        Ok(out)
    }

    /// Product names the store has a manifest directory for (kept when its
    /// last manifest is pruned, so the name stays known).
    pub fn products(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.manifests_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let e = e.map_err(io_at(&dir))?;
            if e.path().is_dir() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every layer file with its modification time (refreshed by each
    /// publish that uses the layer).
    pub fn layer_files(&self) -> Result<Vec<(Digest, SystemTime)>, StoreError> {
        let dir = self.layers_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let e = e.map_err(io_at(&dir))?;
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".tar.lz4")) else {
                continue;
            };
            let Ok(d) = hex.parse::<Digest>() else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            out.push((d, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        }
        Ok(out)
    }

    /// Removes the manifest of `r` (unpublishes it); `false` when it was
    /// not there. Its layer files stay: see [`Store::remove_layer`].
    pub fn remove_manifest(&self, r: &ImageRef) -> Result<bool, StoreError> {
        let path = self.manifest_path(r);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(path.parent().expect("manifest paths have a parent"))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Removes a layer file; `false` when it was not there. The caller
    /// makes sure no manifest that stays names it.
    pub fn remove_layer(&self, diff_id: &Digest) -> Result<bool, StoreError> {
        let path = self.layer_path(diff_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Reads a `docker save` stream of one image and publishes it as `r`:
    /// every layer the store lacks is written (lz4 frame, level 1), then the
    /// manifest. Publishing the same image under the same ref again is a
    /// no-op; other content under a published ref is
    /// [`StoreError::AlreadyPublished`].
    pub fn publish<R: Read>(
        &self,
        save: R,
        r: &ImageRef,
        hint: &PublishHint,
    ) -> Result<(Manifest, PublishStats), StoreError> {
        self.publish_counted(save, r, hint, None)
            .map(|(m, stats, _)| (m, stats))
    }

    /// [`Store::publish`] of an image built FROM the published build
    /// `base`: the manifest records it (`Manifest::base`), so retention
    /// keeps the base while this build is kept.
    pub fn publish_derived<R: Read>(
        &self,
        save: R,
        r: &ImageRef,
        hint: &PublishHint,
        base: Option<ImageRef>,
    ) -> Result<(Manifest, PublishStats), StoreError> {
        self.publish_counted(save, r, hint, base)
            .map(|(m, stats, _)| (m, stats))
    }

    /// [`Store::publish`], also returning how many layers were compressed
    /// (the others were only hashed, the store holding them).
    fn publish_counted<R: Read>(
        &self,
        save: R,
        r: &ImageRef,
        hint: &PublishHint,
        base: Option<ImageRef>,
    ) -> Result<(Manifest, PublishStats, usize), StoreError> {
        let mut ingest = Ingest::new(self);
        let saved = read_save(
            BufReader::with_capacity(IO_BUF, save),
            &hint.diff_ids,
            &mut ingest,
        )
        .map_err(|e| match e {
            SaveError::Read(e) => StoreError::SaveStream(e),
            SaveError::Bad(why) => StoreError::BadArchive(why),
            SaveError::Sink(e) => e,
        })?;
        let facts = config_facts(&saved.config).map_err(StoreError::Config)?;
        if facts.diff_ids != saved.layers {
            return Err(StoreError::BadArchive(format!(
                "the archive's {} layers are not the {} layers of its config",
                saved.layers.len(),
                facts.diff_ids.len()
            )));
        }
        if !hint.diff_ids.is_empty() && hint.diff_ids != facts.diff_ids {
            return Err(StoreError::BadArchive(
                "the archive's layers are not those the engine reported".into(),
            ));
        }
        let config = String::from_utf8(saved.config)
            .map_err(|_| StoreError::BadArchive("the image config is not UTF-8".into()))?;

        match self.get(r) {
            Ok(m) if m.image_id == saved.image_id => {
                return Ok((m, PublishStats::default(), ingest.compressed))
            }
            Ok(_) => return Err(StoreError::AlreadyPublished(r.clone())),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }

        // Layers first, durable, then the manifest that names them.
        let stats = ingest.commit()?;
        let chain = chain_ids(&facts.diff_ids);
        let mut layers = Vec::with_capacity(chain.len());
        for (diff_id, chain_id) in facts.diff_ids.iter().zip(chain) {
            let path = self.layer_path(diff_id);
            // Refresh the file's time: a pruner (on any node sharing the
            // store) leaves layer files younger than its grace alone, so a
            // layer this publish reuses is not taken as garbage meanwhile.
            if let Ok(f) = File::options().write(true).open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
            let compressed_size = match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::MissingLayer(*diff_id))
                }
                Err(e) => return Err(io_at(&path)(e)),
            };
            layers.push(LayerEntry {
                diff_id: *diff_id,
                chain_id,
                size: *ingest
                    .sizes
                    .get(diff_id)
                    .ok_or(StoreError::MissingLayer(*diff_id))?,
                compressed_size,
            });
        }
        let m = Manifest {
            format: MANIFEST_FORMAT,
            name: r.name.clone(),
            build: r.build.clone(),
            image_id: saved.image_id,
            config,
            layers,
            requirements: facts.requirements,
            exposed_ports: facts.exposed_ports,
            healthcheck: facts.healthcheck,
            published_at: OffsetDateTime::now_utc(),
            base,
        };
        debug_assert_eq!(m.validate(), Ok(()));
        match self.write_manifest(&m)? {
            None => {
                tracing::info!(
                    image = %r,
                    image_id = %m.image_id,
                    layers = m.layers.len(),
                    layers_added = stats.layers_added,
                    layers_compressed = ingest.compressed,
                    bytes_added = stats.bytes_added,
                    "published"
                );
                Ok((m, stats, ingest.compressed))
            }
            // Another publisher of the same ref won the race.
            Some(existing) if existing.image_id == m.image_id => {
                Ok((existing, stats, ingest.compressed))
            }
            Some(_) => Err(StoreError::AlreadyPublished(r.clone())),
        }
    }

    /// Writes a `docker load` archive of `m` tagged `tag` into `out`,
    /// omitting the first `skip` layers (the engine holds their chain). Each
    /// layer is decompressed from its lz4 file and its digest checked as it
    /// streams; a mismatch returns [`StoreError::DigestMismatch`] before the
    /// archive is complete, so the engine never gets a whole archive.
    /// `progress` is called with the uncompressed bytes written so far.
    pub fn write_load_archive<W: Write>(
        &self,
        m: &Manifest,
        skip: usize,
        tag: &str,
        out: W,
        progress: &mut dyn FnMut(u64),
    ) -> Result<LoadStats, StoreError> {
        let skip = skip.min(m.layers.len());
        // Open every layer file before the first byte goes out, so a missing
        // layer fails the load without sending anything.
        let mut files = Vec::with_capacity(m.layers.len() - skip);
        for l in &m.layers[skip..] {
            let path = self.layer_path(&l.diff_id);
            match File::open(&path) {
                Ok(f) => files.push((l, path, f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::MissingLayer(l.diff_id))
                }
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        let mut w = LoadWriter::new(out);
        let map = |path: &Path| {
            let path = path.to_path_buf();
            move |e: LoadError| match e {
                LoadError::Read { source, .. } => StoreError::Io { path, source },
                LoadError::Write(e) => StoreError::Sink(e),
                LoadError::Size {
                    diff_id,
                    expected,
                    actual,
                } => StoreError::LayerSize {
                    diff_id,
                    expected,
                    actual,
                },
                LoadError::Digest { diff_id, actual } => {
                    StoreError::DigestMismatch { diff_id, actual }
                }
            }
        };
        let root = Path::new("");
        w.dir("blobs/").map_err(map(root))?;
        w.dir("blobs/sha256/").map_err(map(root))?;
        // Layers first, the small JSON files last: the archive becomes
        // loadable only with its final entry (`manifest.json`), so an upload
        // cut short by a bad layer can never look like a whole image, even to
        // a reader that takes a clean end of stream between two entries for
        // the end of the archive. Docker unpacks the whole archive before it
        // reads `manifest.json` in any case, so the order costs nothing.
        for (l, path, f) in files {
            let mut dec =
                lz4::Decoder::new(BufReader::with_capacity(IO_BUF, f)).map_err(io_at(&path))?;
            w.layer(
                &blob_path(&l.diff_id),
                l.diff_id,
                l.size,
                &mut dec,
                progress,
            )
            .map_err(map(&path))?;
        }
        let bytes_sent = w.layer_bytes();
        let all: Vec<(Digest, u64)> = m.layers.iter().map(|l| (l.diff_id, l.size)).collect();
        for (path, data) in metadata_files(&m.config, &all, tag) {
            w.file(&path, &data).map_err(map(root))?;
        }
        w.finish().map_err(map(root))?;
        Ok(LoadStats {
            layers_total: m.layers.len(),
            layers_sent: m.layers.len() - skip,
            bytes_sent,
        })
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

    fn read_manifest(&self, path: &Path) -> Result<Manifest, StoreError> {
        let data = fs::read(path).map_err(io_at(path))?;
        let bad = |reason: String| StoreError::BadManifest {
            path: path.to_path_buf(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(&data).map_err(|e| bad(e.to_string()))?;
        m.validate().map_err(bad)?;
        if self.manifest_path(&m.image_ref()) != path {
            return Err(bad(format!(
                "manifest of {} is in the wrong place",
                m.image_ref()
            )));
        }
        Ok(m)
    }

    /// Writes `m` unless its ref is already published; returns the
    /// manifest that was there in that case.
    fn write_manifest(&self, m: &Manifest) -> Result<Option<Manifest>, StoreError> {
        let path = self.manifest_path(&m.image_ref());
        let dir = path
            .parent()
            .expect("manifest paths have a parent")
            .to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            sync_dir(&self.manifests_dir())?;
        }
        let mut data = serde_json::to_vec_pretty(m).expect("manifests serialize");
        data.push(b'\n');
        let tmp = self.tmp_path();
        let _guard = RemoveOnDrop(tmp.clone());
        let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(&data).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
        drop(f);
        // A hard link, unlike a rename, never replaces an existing manifest:
        // of two racing publishers of one ref, exactly one wins.
        match fs::hard_link(&tmp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return self.read_manifest(&path).map(Some);
            }
            Err(_) if !path.exists() => {
                // A file system without hard links.
                fs::rename(&tmp, &path).map_err(io_at(&path))?;
            }
            Err(e) => return Err(io_at(&path)(e)),
        }
        sync_dir(&dir)?;
        Ok(None)
    }
}

/// How old a file in `tmp/` must be before [`Store::open`] takes it for a
/// crashed writer's leftover.
pub const TMP_GRACE: Duration = Duration::from_secs(15 * 60);

/// Read and write buffer size for layer data.
const IO_BUF: usize = 1 << 20;
/// Bytes per step through the lz4 encoder: one whole lz4 block, so the
/// encoder compresses straight from our buffer without copying.
const COMPRESS_CHUNK: usize = 4 << 20;

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

/// The layer sink of one publish: compresses layers the store lacks into
/// `tmp/`, only hashes those it holds, and on [`Ingest::commit`] renames
/// the new layer files into place. Temp files left uncommitted are removed
/// on drop, so a failed publish leaves nothing behind.
struct Ingest<'a> {
    store: &'a Store,
    buf: Vec<u8>,
    /// Uncompressed size of every layer seen, by content digest.
    sizes: HashMap<Digest, u64>,
    /// New layer files waiting in `tmp/`: digest, temp path, file size.
    pending: Vec<(Digest, RemoveOnDrop, u64)>,
    /// Layers compressed (the others were only hashed).
    compressed: usize,
}

impl<'a> Ingest<'a> {
    fn new(store: &'a Store) -> Ingest<'a> {
        Ingest {
            store,
            buf: vec![0; COMPRESS_CHUNK],
            sizes: HashMap::new(),
            pending: Vec::new(),
            compressed: 0,
        }
    }

    fn hash_only(&mut self, size: u64, content: &mut dyn Read) -> Result<Digest, StoreError> {
        let mut hasher = Hasher::default();
        let mut n = 0u64;
        loop {
            let got = read_full(content, &mut self.buf).map_err(StoreError::SaveStream)?;
            if got == 0 {
                break;
            }
            hasher.update(&self.buf[..got]);
            n += got as u64;
        }
        if n != size {
            return Err(StoreError::BadArchive(format!(
                "layer entry has {n} bytes, its header says {size}"
            )));
        }
        let d = hasher.finish();
        self.sizes.insert(d, n);
        Ok(d)
    }

    fn compress(&mut self, size: u64, content: &mut dyn Read) -> Result<Digest, StoreError> {
        self.compressed += 1;
        let tmp = RemoveOnDrop(self.store.tmp_path());
        let at = |e| io_at(&tmp.0)(e);
        let file = File::create(&tmp.0).map_err(at)?;
        let mut enc = lz4::EncoderBuilder::new()
            .level(1)
            .block_size(lz4::BlockSize::Max4MB)
            .checksum(lz4::ContentChecksum::ChecksumEnabled)
            .block_checksum(lz4::liblz4::BlockChecksum::NoBlockChecksum)
            .content_size(size)
            .build(file)
            .map_err(at)?;
        let mut hasher = Hasher::default();
        let mut n = 0u64;
        loop {
            let got = read_full(content, &mut self.buf).map_err(StoreError::SaveStream)?;
            if got == 0 {
                break;
            }
            hasher.update(&self.buf[..got]);
            enc.write_all(&self.buf[..got]).map_err(at)?;
            n += got as u64;
        }
        if n != size {
            return Err(StoreError::BadArchive(format!(
                "layer entry has {n} bytes, its header says {size}"
            )));
        }
        let (file, res) = enc.finish();
        res.map_err(at)?;
        file.sync_all().map_err(at)?;
        let compressed = file.metadata().map_err(at)?.len();
        let d = hasher.finish();
        self.sizes.insert(d, n);
        if !self.pending.iter().any(|p| p.0 == d) {
            self.pending.push((d, tmp, compressed));
        }
        Ok(d)
    }

    /// Moves the new layer files into place (a layer another publisher put
    /// there meanwhile is kept, ours dropped) and makes that durable.
    fn commit(&mut self) -> Result<PublishStats, StoreError> {
        let mut stats = PublishStats::default();
        for (d, tmp, compressed) in self.pending.drain(..) {
            let path = self.store.layer_path(&d);
            if path.exists() {
                continue; // `tmp` is removed on drop
            }
            fs::rename(&tmp.0, &path).map_err(io_at(&path))?;
            std::mem::forget(tmp);
            stats.layers_added += 1;
            stats.bytes_added += compressed;
        }
        if stats.layers_added > 0 {
            sync_dir(&self.store.layers_dir())?;
        }
        Ok(stats)
    }
}

impl LayerSink for Ingest<'_> {
    type Error = StoreError;

    fn layer(
        &mut self,
        expect: Option<Digest>,
        size: u64,
        content: &mut dyn Read,
    ) -> Result<Digest, StoreError> {
        let held = expect
            .is_some_and(|d| self.sizes.contains_key(&d) || self.store.layer_path(&d).exists());
        if held {
            self.hash_only(size, content)
        } else {
            self.compress(size, content)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    /// A small valid layer tar with a few random files.
    fn random_layer(rng: &mut StdRng) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..rng.gen_range(1..4) {
            let len = rng.gen_range(0..20_000);
            // Half random (incompressible), half repetitive.
            let data: Vec<u8> = if rng.gen_bool(0.5) {
                (0..len).map(|_| rng.gen()).collect()
            } else {
                vec![rng.gen(); len]
            };
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(
                &mut h,
                format!("dir/file{i}-{}", rng.gen::<u32>()),
                &data[..],
            )
            .unwrap();
        }
        b.into_inner().unwrap()
    }

    pub(crate) fn config_for(layers: &[Vec<u8>], memory: &str) -> String {
        let diffs: Vec<String> = layers.iter().map(|l| Digest::of(l).to_string()).collect();
        serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Labels": {"shoal.memory": memory},
                "ExposedPorts": {"8080/tcp": {}},
            },
            "rootfs": {"type": "layers", "diff_ids": diffs},
        })
        .to_string()
    }

    fn tar_of(mut entries: Vec<(String, Vec<u8>)>, links: Vec<(String, String)>) -> Vec<u8> {
        // The engine tars a directory: lexical order.
        entries.sort();
        let mut b = tar::Builder::new(Vec::new());
        let mut links = links.into_iter().peekable();
        for (path, data) in entries {
            while let Some((l, _)) = links.peek() {
                if *l > path {
                    break;
                }
                let (l, target) = links.next().unwrap();
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, &l, &target).unwrap();
            }
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, &path, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A `docker save` archive as Docker 20.10 writes it: v1 id directories
    /// (ids computed as the engine does), a layer seen twice as a symlink.
    fn legacy_save(config: &str, layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
        const CC: &str = r#"{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null}"#;
        let diffs: Vec<Digest> = layers.iter().map(|l| Digest::of(l)).collect();
        let chain = chain_ids(&diffs);
        let config_hex = Digest::of(config.as_bytes()).hex();
        let mut entries = vec![(format!("{config_hex}.json"), config.as_bytes().to_vec())];
        let mut links = Vec::new();
        let mut parent: Option<String> = None;
        let mut paths = Vec::new();
        let mut saved: HashMap<Digest, String> = HashMap::new();
        for (i, layer) in layers.iter().enumerate() {
            let created = r#""1970-01-01T00:00:00Z""#;
            let p = parent
                .as_ref()
                .map(|p| format!(r#","parent":"sha256:{p}""#))
                .unwrap_or_default();
            let id_src = format!(
                r#"{{"container_config":{CC},"created":{created},"layer_id":"{}"{p}}}"#,
                chain[i]
            );
            let v1 = Digest::of(id_src.as_bytes()).hex();
            let p = parent
                .as_ref()
                .map(|p| format!(r#","parent":"{p}""#))
                .unwrap_or_default();
            let json = format!(
                r#"{{"id":"{v1}"{p},"created":{created},"container_config":{CC},"os":"linux"}}"#
            );
            entries.push((format!("{v1}/VERSION"), b"1.0".to_vec()));
            entries.push((format!("{v1}/json"), json.into_bytes()));
            match saved.get(&diffs[i]) {
                Some(first) => {
                    links.push((format!("{v1}/layer.tar"), format!("../{first}/layer.tar")))
                }
                None => {
                    entries.push((format!("{v1}/layer.tar"), layer.clone()));
                    saved.insert(diffs[i], v1.clone());
                }
            }
            paths.push(format!("{v1}/layer.tar"));
            parent = Some(v1);
        }
        links.sort();
        let manifest = serde_json::json!([{
            "Config": format!("{config_hex}.json"), "RepoTags": [tag], "Layers": paths,
        }]);
        entries.push(("manifest.json".into(), manifest.to_string().into_bytes()));
        entries.push(("repositories".into(), b"{}".to_vec()));
        tar_of(entries, links)
    }

    /// A `docker save` archive as Docker >= 25 writes it (OCI layout).
    pub(crate) fn oci_save(config: &str, layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
        let all: Vec<(Digest, u64)> = layers
            .iter()
            .map(|l| (Digest::of(l), l.len() as u64))
            .collect();
        // Our load archive writer makes the same metadata the engine does.
        let mut entries: BTreeMap<String, Vec<u8>> =
            metadata_files(config, &all, tag).into_iter().collect();
        for l in layers {
            entries.insert(blob_path(&Digest::of(l)), l.clone());
        }
        entries.insert("repositories".into(), b"{}".to_vec());
        tar_of(entries.into_iter().collect(), vec![])
    }

    fn untar(data: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut ar = tar::Archive::new(data);
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                (p, v)
            })
            .filter(|(p, _)| !p.ends_with('/'))
            .collect()
    }

    fn decompress(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        lz4::Decoder::new(File::open(path).unwrap())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn image(rng: &mut StdRng, n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|_| random_layer(rng)).collect()
    }

    fn r(s: &str) -> ImageRef {
        s.parse().unwrap()
    }

    fn hint(layers: &[Vec<u8>]) -> PublishHint {
        PublishHint {
            diff_ids: layers.iter().map(|l| Digest::of(l)).collect(),
        }
    }

    /// Checks a load archive of `layers` (with `config`, skipping `skip`)
    /// the way both engines read it.
    fn check_load_archive(data: &[u8], config: &str, layers: &[Vec<u8>], skip: usize, tag: &str) {
        let files = untar(data);
        assert_eq!(
            files.last().unwrap().0,
            "manifest.json",
            "metadata comes last"
        );
        let files: BTreeMap<String, Vec<u8>> = files.into_iter().collect();
        let json = |p: &str| -> serde_json::Value { serde_json::from_slice(&files[p]).unwrap() };
        let config_path = blob_path(&Digest::of(config.as_bytes()));
        assert_eq!(files[&config_path], config.as_bytes());
        // Docker's manifest.json: every layer, present or omitted.
        let m = json("manifest.json");
        assert_eq!(m[0]["Config"], config_path);
        assert_eq!(m[0]["RepoTags"], serde_json::json!([tag]));
        let listed: Vec<String> = m[0]["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = layers.iter().map(|l| blob_path(&Digest::of(l))).collect();
        assert_eq!(listed, want);
        for (i, l) in layers.iter().enumerate() {
            let p = blob_path(&Digest::of(l));
            if i >= skip {
                assert_eq!(files.get(&p), Some(l), "layer {i}");
            } else if !layers[skip..].contains(l) {
                assert!(
                    !files.contains_key(&p),
                    "omitted layer {i} is in the archive"
                );
            }
        }
        let blobs = files.keys().filter(|p| p.starts_with("blobs/")).count();
        let sent: std::collections::HashSet<&Vec<u8>> = layers[skip..].iter().collect();
        assert_eq!(blobs, sent.len() + 2, "layers + config + oci manifest");
        // OCI: oci-layout, index.json -> manifest -> config + layers.
        assert_eq!(json("oci-layout")["imageLayoutVersion"], "1.0.0");
        let index = json("index.json");
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(desc["annotations"]["io.containerd.image.name"], tag);
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            tag.rsplit_once(':').unwrap().1
        );
        let mdigest: Digest = desc["digest"].as_str().unwrap().parse().unwrap();
        let mbytes = &files[&blob_path(&mdigest)];
        assert_eq!(Digest::of(mbytes), mdigest);
        assert_eq!(desc["size"], mbytes.len());
        let om: serde_json::Value = serde_json::from_slice(mbytes).unwrap();
        assert_eq!(om["schemaVersion"], 2);
        assert_eq!(
            om["config"]["digest"],
            Digest::of(config.as_bytes()).to_string()
        );
        assert_eq!(om["config"]["size"], config.len());
        assert_eq!(om["layers"].as_array().unwrap().len(), layers.len());
        for (d, l) in om["layers"].as_array().unwrap().iter().zip(layers) {
            assert_eq!(d["digest"], Digest::of(l).to_string());
            assert_eq!(d["size"], l.len());
            assert_eq!(d["mediaType"], "application/vnd.oci.image.layer.v1.tar");
        }
    }

    fn load(store: &Store, m: &Manifest, skip: usize) -> Result<(Vec<u8>, LoadStats), StoreError> {
        let mut out = Vec::new();
        let stats = store.write_load_archive(
            m,
            skip,
            &m.image_ref().docker_tag(),
            &mut out,
            &mut |_| {},
        )?;
        Ok((out, stats))
    }

    fn round_trip(legacy: bool, seed: u64, n: usize, skip: usize) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = image(&mut rng, n);
        if n >= 3 && seed.is_multiple_of(3) {
            layers[2] = layers[0].clone(); // a layer that appears twice
        }
        let config = config_for(&layers, "2GiB");
        let tag = "shoal/demo:7";
        let save = if legacy {
            legacy_save(&config, &layers, tag)
        } else {
            oci_save(&config, &layers, tag)
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (m, stats, compressed) = store
            .publish_counted(&save[..], &r("demo:7"), &hint(&layers), None)
            .unwrap();
        let distinct: std::collections::HashSet<&Vec<u8>> = layers.iter().collect();
        assert_eq!(stats.layers_added, distinct.len());
        assert_eq!(compressed, distinct.len());
        assert_eq!(m.image_id, Digest::of(config.as_bytes()));
        assert_eq!(m.config, config);
        assert_eq!(m.requirements.memory, Some(2 << 30));
        assert_eq!(m.exposed_ports, vec![8080]);
        let diffs: Vec<Digest> = layers.iter().map(|l| Digest::of(l)).collect();
        assert_eq!(m.chain_ids(), chain_ids(&diffs));
        let mut bytes = 0;
        for (e, l) in m.layers.iter().zip(&layers) {
            assert_eq!(e.diff_id, Digest::of(l));
            assert_eq!(e.size, l.len() as u64);
            let path = store.layer_path(&e.diff_id);
            assert_eq!(e.compressed_size, fs::metadata(&path).unwrap().len());
            assert_eq!(&decompress(&path), l);
            bytes += e.compressed_size;
        }
        let distinct_bytes: u64 = {
            let mut seen = std::collections::HashSet::new();
            m.layers
                .iter()
                .filter(|l| seen.insert(l.diff_id))
                .map(|l| l.compressed_size)
                .sum()
        };
        assert!(bytes >= distinct_bytes);
        assert_eq!(stats.bytes_added, distinct_bytes);
        assert_eq!(store.get(&r("demo:7")).unwrap(), m);
        assert_eq!(
            fs::read_dir(store.tmp_dir()).unwrap().count(),
            0,
            "tmp/ is clean"
        );

        let (out, stats) = load(&store, &m, skip).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                layers_total: n,
                layers_sent: n - skip,
                bytes_sent: layers[skip..].iter().map(|l| l.len() as u64).sum(),
            }
        );
        check_load_archive(&out, &config, &layers, skip, tag);

        // A whole load archive is itself a Docker >= 25 save archive.
        if skip == 0 {
            let dir2 = tempfile::tempdir().unwrap();
            let store2 = Store::open(dir2.path()).unwrap();
            let (m2, _) = store2
                .publish(&out[..], &r("demo:7"), &PublishHint::default())
                .unwrap();
            assert_eq!(m2.layers, m.layers);
            assert_eq!(m2.image_id, m.image_id);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn publish_and_load_round_trip(legacy: bool, seed: u64, n in 1usize..6, skip in 0usize..6) {
            round_trip(legacy, seed, n, skip.min(n));
        }
    }

    #[test]
    fn round_trip_examples() {
        round_trip(true, 3, 4, 0);
        round_trip(true, 3, 4, 2);
        round_trip(false, 3, 4, 1);
        round_trip(false, 6, 3, 3);
    }

    #[test]
    fn shared_layers_are_stored_once_and_not_recompressed() {
        for legacy in [true, false] {
            let save = if legacy { legacy_save } else { oci_save };
            let mut rng = StdRng::seed_from_u64(7);
            let a = image(&mut rng, 4);
            let mut b = a[..2].to_vec();
            b.extend(image(&mut rng, 2));
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let (ma, sa, _) = store
                .publish_counted(
                    &save(&config_for(&a, "1GiB"), &a, "x:1")[..],
                    &r("app:1"),
                    &hint(&a),
                    None,
                )
                .unwrap();
            assert_eq!(sa.layers_added, 4);
            let (mb, sb, compressed) = store
                .publish_counted(
                    &save(&config_for(&b, "1GiB"), &b, "x:2")[..],
                    &r("app:2"),
                    &hint(&b),
                    None,
                )
                .unwrap();
            assert_eq!(sb.layers_added, 2, "legacy {legacy}");
            assert_eq!(
                compressed, 2,
                "held layers are only hashed (legacy {legacy})"
            );
            assert_eq!(
                sb.bytes_added,
                mb.layers[2..]
                    .iter()
                    .map(|l| l.compressed_size)
                    .sum::<u64>()
            );
            assert_eq!(ma.chain_ids()[..2], mb.chain_ids()[..2]);
            assert_eq!(fs::read_dir(store.layers_dir()).unwrap().count(), 6);

            // Without a hint a legacy archive cannot say which layer is
            // which: everything is compressed, and nothing added twice.
            let c = b[..3].to_vec();
            let (_, sc, compressed) = store
                .publish_counted(
                    &save(&config_for(&c, "1GiB"), &c, "x:3")[..],
                    &r("app:3"),
                    &PublishHint::default(),
                    None,
                )
                .unwrap();
            assert_eq!(sc, PublishStats::default());
            assert_eq!(compressed, if legacy { 3 } else { 0 });
            assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        }
    }

    #[test]
    fn republish_is_a_no_op_other_content_is_refused() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = image(&mut rng, 2);
        let b = image(&mut rng, 2);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let save_a = legacy_save(&config_for(&a, "1GiB"), &a, "x:1");
        let (m1, _) = store.publish(&save_a[..], &r("app:1"), &hint(&a)).unwrap();
        let (m2, stats) = store.publish(&save_a[..], &r("app:1"), &hint(&a)).unwrap();
        assert_eq!(m1, m2, "the first manifest stays, published_at included");
        assert_eq!(stats, PublishStats::default());
        // Same layers, other config: other content.
        let save_a2 = oci_save(&config_for(&a, "2GiB"), &a, "x:1");
        let err = store
            .publish(&save_a2[..], &r("app:1"), &hint(&a))
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyPublished(_)), "{err}");
        let save_b = oci_save(&config_for(&b, "1GiB"), &b, "x:1");
        let err = store
            .publish(&save_b[..], &r("app:1"), &hint(&b))
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyPublished(_)), "{err}");
        assert_eq!(store.get(&r("app:1")).unwrap(), m1);
        // The refused publish added no layer files and left no temp files.
        assert_eq!(fs::read_dir(store.layers_dir()).unwrap().count(), 2);
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn bad_archives_are_refused() {
        let mut rng = StdRng::seed_from_u64(2);
        let a = image(&mut rng, 2);
        let config = config_for(&a, "1GiB");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bad = |save: &[u8], hint: &PublishHint| {
            let err = store.publish(save, &r("bad:1"), hint).unwrap_err();
            assert!(matches!(err, StoreError::BadArchive(_)), "{err}");
        };
        // The engine described another image.
        let other = image(&mut rng, 2);
        bad(&oci_save(&config, &a, "x:1"), &hint(&other));
        // The archive's layers are not the config's.
        bad(
            &oci_save(&config_for(&other, "1GiB"), &a, "x:1"),
            &PublishHint::default(),
        );
        // A blob whose content is not its name.
        let mut save = oci_save(&config, &a, "x:1");
        let pos = save.windows(a[0].len()).position(|w| w == a[0]).unwrap();
        save[pos + 600] ^= 1;
        bad(&save, &PublishHint::default());
        // No manifest.json.
        bad(
            &tar_of(vec![("x".into(), b"{}".to_vec())], vec![]),
            &PublishHint::default(),
        );
        // A label that does not parse.
        let err = store
            .publish(
                &oci_save(&config_for(&a, "lots"), &a, "x:1")[..],
                &r("bad:1"),
                &hint(&a),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{err}");
        // A stream that breaks off.
        let save = legacy_save(&config, &a, "x:1");
        let err = store
            .publish(&save[..save.len() / 2], &r("bad:1"), &hint(&a))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::SaveStream(_) | StoreError::BadArchive(_)),
            "{err}"
        );
        assert!(matches!(
            store.get(&r("bad:1")),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    fn published(n: usize) -> (tempfile::TempDir, Store, Manifest, Vec<Vec<u8>>) {
        let mut rng = StdRng::seed_from_u64(n as u64);
        let layers = image(&mut rng, n);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let save = oci_save(&config_for(&layers, "1GiB"), &layers, "x:1");
        let (m, _) = store
            .publish(&save[..], &r("app:1"), &hint(&layers))
            .unwrap();
        (dir, store, m, layers)
    }

    #[test]
    fn corrupt_layer_files_fail_the_load() {
        let (_dir, store, m, layers) = published(3);
        let path = store.layer_path(&m.layers[1].diff_id);
        let original = fs::read(&path).unwrap();

        // Other content, validly compressed.
        let mut content = layers[1].clone();
        content[700] ^= 0x40;
        let mut enc = lz4::EncoderBuilder::new().build(Vec::new()).unwrap();
        enc.write_all(&content).unwrap();
        fs::write(&path, enc.finish().0).unwrap();
        let mut out = Vec::new();
        let err = store
            .write_load_archive(&m, 0, "shoal/app:1", &mut out, &mut |_| {})
            .unwrap_err();
        assert!(
            matches!(err, StoreError::DigestMismatch { diff_id, .. } if diff_id == m.layers[1].diff_id),
            "{err}"
        );
        assert!(
            !out.windows(13).any(|w| w == b"manifest.json"),
            "archive must not be complete"
        );
        // Skipping the bad layer does not read it.
        load(&store, &m, 2).unwrap();

        // A truncated file.
        fs::write(&path, &original[..original.len() / 2]).unwrap();
        let err = load(&store, &m, 0).unwrap_err();
        assert!(
            matches!(err, StoreError::LayerSize { .. } | StoreError::Io { .. }),
            "{err}"
        );

        // A file that is not lz4 at all.
        fs::write(&path, b"garbage").unwrap();
        assert!(load(&store, &m, 0).is_err());

        // A missing file: nothing is written.
        fs::remove_file(&path).unwrap();
        let mut out = Vec::new();
        let err = store
            .write_load_archive(&m, 0, "shoal/app:1", &mut out, &mut |_| {})
            .unwrap_err();
        assert!(
            matches!(err, StoreError::MissingLayer(d) if d == m.layers[1].diff_id),
            "{err}"
        );
        assert!(out.is_empty());
    }

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

    #[test]
    fn list_skips_broken_manifests_and_sorts_newest_first() {
        let mut rng = StdRng::seed_from_u64(4);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut images = Vec::new();
        for i in 1..=3 {
            let layers = image(&mut rng, 2);
            let save = legacy_save(&config_for(&layers, "1GiB"), &layers, "x:1");
            let (m, _) = store
                .publish(&save[..], &r(&format!("app:{i}")), &hint(&layers))
                .unwrap();
            images.push(m);
            std::thread::sleep(Duration::from_millis(5));
        }
        let refs = |ms: Vec<Manifest>| ms.iter().map(|m| m.build.clone()).collect::<Vec<_>>();
        assert_eq!(refs(store.list().unwrap()), ["3", "2", "1"]);

        // A layer file gone: not listed (get still reads it).
        fs::remove_file(store.layer_path(&images[1].layers[1].diff_id)).unwrap();
        // A manifest that does not parse, one that does not validate.
        fs::write(store.manifests_dir().join("app").join("9.json"), b"{").unwrap();
        let mut bad = images[2].clone();
        bad.build = "8".into();
        bad.image_id = Digest::of(b"not the config");
        fs::write(
            store.manifest_path(&bad.image_ref()),
            serde_json::to_vec(&bad).unwrap(),
        )
        .unwrap();
        assert_eq!(refs(store.list().unwrap()), ["3", "1"]);
        assert!(matches!(
            store.get(&r("app:8")),
            Err(StoreError::BadManifest { .. })
        ));
        assert!(matches!(
            store.get(&r("app:nope")),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.get(&r("other:1")),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn layer_files_read_with_the_lz4_cli() {
        let (_dir, store, m, layers) = published(2);
        for (l, content) in m.layers.iter().zip(&layers) {
            let path = store.layer_path(&l.diff_id);
            assert!(path
                .to_string_lossy()
                .ends_with(&format!("layers/sha256/{}.tar.lz4", l.diff_id.hex())));
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("lz4 -dc '{}' | tar t", path.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let names: Vec<String> = tar::Archive::new(&content[..])
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
                .collect();
            let listed: Vec<String> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            assert_eq!(listed, names);
            let out = std::process::Command::new("lz4")
                .arg("-dc")
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(&out.stdout, content);
        }
    }

    #[test]
    fn load_progress_is_reported() {
        let mut rng = StdRng::seed_from_u64(9);
        // One big layer so progress fires inside it.
        let mut b = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..(10 << 20)).map(|_| rng.gen::<u8>() & 0x0f).collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, "big", &data[..]).unwrap();
        let layers = vec![b.into_inner().unwrap(), random_layer(&mut rng)];
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let save = legacy_save(&config_for(&layers, "1GiB"), &layers, "x:1");
        let (m, _) = store
            .publish(&save[..], &r("big:1"), &hint(&layers))
            .unwrap();
        let mut calls = Vec::new();
        let mut out = Vec::new();
        store
            .write_load_archive(&m, 0, "shoal/big:1", &mut out, &mut |n| calls.push(n))
            .unwrap();
        assert!(calls.len() >= 3, "{calls:?}");
        assert!(calls.windows(2).all(|w| w[0] <= w[1]));
        // At most every few MiB: one step is the threshold plus one read.
        assert!(calls
            .windows(2)
            .all(|w| w[1] - w[0] <= (4 << 20) + (1 << 20)));
        assert_eq!(*calls.last().unwrap(), m.size());
        check_load_archive(&out, &m.config, &layers, 0, "shoal/big:1");
    }
}
