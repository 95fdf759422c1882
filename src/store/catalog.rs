//! What the store holds and where: the paths of layer and manifest files,
//! listing and reading manifests (strictly for use, leniently for pruning),
//! writing a manifest so that of two racing publishers exactly one wins,
//! and removing manifests and layer files for retention.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{io_at, sync_dir, ImageRef, Manifest, RemoveOnDrop, Store, StoreError};
use crate::archive::Digest;

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

impl Store {
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
    pub(super) fn manifest_paths(&self) -> Result<Vec<PathBuf>, StoreError> {
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

    pub(super) fn read_manifest(&self, path: &Path) -> Result<Manifest, StoreError> {
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
    pub(super) fn write_manifest(&self, m: &Manifest) -> Result<Option<Manifest>, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{config_for, hint, image, legacy_save, r};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::time::Duration;

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
}
