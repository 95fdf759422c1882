//! Loading: a `docker load` archive of a published image written from the
//! store's layer files, omitting the layers the engine already holds, each
//! layer's digest checked as it streams, the metadata last.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::Path;

use super::{io_at, Manifest, Store, StoreError, IO_BUF};
use crate::archive::load::{blob_path, metadata_files, LoadError, LoadWriter};
use crate::archive::Digest;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Layers in the image.
    pub layers_total: usize,
    /// Layers written into the archive (the rest were omitted).
    pub layers_sent: usize,
    /// Uncompressed layer bytes written into the archive.
    pub bytes_sent: u64,
}

impl Store {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{
        check_load_archive, config_for, hint, legacy_save, load, published, r, random_layer,
    };
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::fs;

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
