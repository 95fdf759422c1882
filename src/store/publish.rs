//! Publishing: a `docker save` stream of one image becomes store files.
//! Layers the store lacks are compressed into `tmp/` (lz4 frame, level 1),
//! those it holds only hashed; the new layer files are renamed into place
//! and made durable before the manifest that names them is written.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::time::SystemTime;

use time::OffsetDateTime;

use super::manifest::{config_facts, MANIFEST_FORMAT};
use super::{
    io_at, sync_dir, ImageRef, LayerEntry, Manifest, RemoveOnDrop, Store, StoreError, IO_BUF,
};
use crate::archive::save::{read_full, read_save, LayerSink, SaveError};
use crate::archive::{chain_ids, Digest, Hasher};

/// What publishing knows before the `docker save` stream starts: the image
/// as the engine describes it. Used to skip compressing layers the store
/// already holds, and cross-checked against the archive.
#[derive(Debug, Clone, Default)]
pub struct PublishHint {
    /// The image's diff ids, bottom-up, from the engine's inspect.
    pub diff_ids: Vec<Digest>,
}

/// Figures of one publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Layer files the publish added to the store.
    pub layers_added: usize,
    /// Bytes of the layer files it added.
    pub bytes_added: u64,
}

impl Store {
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
}

/// Bytes per step through the lz4 encoder: one whole lz4 block, so the
/// encoder compresses straight from our buffer without copying.
const COMPRESS_CHUNK: usize = 4 << 20;

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
mod tests {
    use super::*;
    use crate::store::fixtures::{
        check_load_archive, config_for, decompress, hint, image, legacy_save, load, oci_save,
        published, r, tar_of,
    };
    use crate::store::LoadStats;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

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
}
