//! Writing a (thin) `docker load` tar stream.
//!
//! The layout is the one Docker >= 25 saves, which Docker 20.10 also loads
//! (it reads only `manifest.json` and opens the paths listed there):
//!
//! ```text
//! blobs/sha256/<layerhex>      uncompressed layer tar, for layers not omitted
//! blobs/sha256/<confighex>     the image config, byte for byte
//! blobs/sha256/<manifesthex>   OCI image manifest
//! index.json                   OCI index naming the manifest and the tag
//! oci-layout                   {"imageLayoutVersion":"1.0.0"}
//! manifest.json                Docker's: Config, RepoTags, Layers (all)
//! ```
//!
//! A thin archive omits the blobs of the bottom layers the engine holds but
//! still lists every layer in `manifest.json`: the engine checks the count
//! against the config's diff ids and does not open the file of a layer whose
//! chain id it already has.
//!
//! [`LoadWriter`] streams this: tar headers and layer bytes go out in chunks
//! of [`CHUNK`] bytes, and every layer is checked (size and sha256) as it
//! passes. No file I/O here: layer contents come in as readers.

use std::io::{self, Read, Write};

use serde_json::json;

use crate::archive::save::read_full;
use crate::archive::{Digest, Hasher};

/// Bytes per write into the sink, and per read from a layer source.
pub const CHUNK: usize = 1 << 20;
/// `progress` is called at most once per this many layer bytes (and at the
/// end of every layer).
pub const PROGRESS_EVERY: u64 = 4 << 20;

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading layer {diff_id}: {source}")]
    Read {
        diff_id: Digest,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive: {0}")]
    Write(#[source] io::Error),
    #[error("layer {diff_id} has {actual} bytes, expected {expected}")]
    Size {
        diff_id: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("layer {diff_id}: content digest is {actual}")]
    Digest { diff_id: Digest, actual: Digest },
}

/// The archive path of a blob.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// The metadata files of a load archive of an image with `config` whose
/// layers (all of them, bottom-up) are `layers` (diff id, uncompressed
/// size), tagged `tag` (`repo:tag`): (path, content), in the order to write.
pub fn metadata_files(config: &str, layers: &[(Digest, u64)], tag: &str) -> Vec<(String, Vec<u8>)> {
    let config_digest = Digest::of(config.as_bytes());
    let oci_manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": layers.iter().map(|(d, size)| json!({
            "mediaType": MEDIA_OCI_LAYER,
            "digest": d.to_string(),
            "size": size,
        })).collect::<Vec<_>>(),
    });
    let oci_manifest = serde_json::to_vec(&oci_manifest).expect("json values serialize");
    let manifest_digest = Digest::of(&oci_manifest);
    let ref_name = match tag.rsplit_once(':') {
        Some((_, t)) if !t.contains('/') => t,
        _ => "latest",
    };
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [{
            "mediaType": MEDIA_OCI_MANIFEST,
            "digest": manifest_digest.to_string(),
            "size": oci_manifest.len(),
            "annotations": {
                "io.containerd.image.name": tag,
                "org.opencontainers.image.ref.name": ref_name,
            },
        }],
    });
    let docker_manifest = json!([{
        "Config": blob_path(&config_digest),
        "RepoTags": [tag],
        "Layers": layers.iter().map(|(d, _)| blob_path(d)).collect::<Vec<_>>(),
    }]);
    vec![
        (blob_path(&config_digest), config.as_bytes().to_vec()),
        (blob_path(&manifest_digest), oci_manifest),
        (
            "index.json".into(),
            serde_json::to_vec(&index).expect("json values serialize"),
        ),
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        (
            "manifest.json".into(),
            serde_json::to_vec(&docker_manifest).expect("json values serialize"),
        ),
    ]
}

/// A tar header for a regular file or directory, as Docker's own tars
/// have them (ustar, root-owned, mtime 0).
fn header(path: &str, size: u64, dir: bool) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(if dir { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_cksum();
    Ok(h)
}

/// Streams a tar into `out` in writes of [`CHUNK`] bytes (the last one
/// smaller). Bytes are held back in the buffer until more follow, so the
/// last bytes of a layer are written only after the layer checked out: an
/// archive cut short by an error never ends with a complete bad layer.
pub struct LoadWriter<W: Write> {
    out: W,
    buf: Box<[u8]>,
    len: usize,
    spare: Box<[u8]>,
    /// Layer bytes written so far, and when progress was last reported.
    layer_bytes: u64,
    reported: u64,
}

impl<W: Write> LoadWriter<W> {
    pub fn new(out: W) -> LoadWriter<W> {
        LoadWriter {
            out,
            buf: vec![0; CHUNK].into_boxed_slice(),
            len: 0,
            spare: vec![0; CHUNK].into_boxed_slice(),
            layer_bytes: 0,
            reported: 0,
        }
    }

    /// Uncompressed layer bytes written so far.
    pub fn layer_bytes(&self) -> u64 {
        self.layer_bytes
    }

    /// Appends small data (headers, padding, metadata files).
    fn push(&mut self, mut data: &[u8]) -> Result<(), LoadError> {
        while !data.is_empty() {
            if self.len == CHUNK {
                self.out.write_all(&self.buf).map_err(LoadError::Write)?;
                self.len = 0;
            }
            let n = data.len().min(CHUNK - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn pad(&mut self, size: u64) -> Result<(), LoadError> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.push(&[0u8; 512][..512 - rem])?;
        }
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> Result<(), LoadError> {
        let h = header(path, 0, true).map_err(LoadError::Write)?;
        self.push(h.as_bytes())
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> Result<(), LoadError> {
        let h = header(path, data.len() as u64, false).map_err(LoadError::Write)?;
        self.push(h.as_bytes())?;
        self.push(data)?;
        self.pad(data.len() as u64)
    }

    /// Writes a layer entry of `size` bytes from `src`, checking as it goes
    /// that `src` yields exactly `size` bytes whose sha256 is `diff_id`.
    /// On a mismatch nothing after the bad byte count, and not the layer's
    /// last chunk, has been written.
    pub fn layer(
        &mut self,
        path: &str,
        diff_id: Digest,
        size: u64,
        src: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), LoadError> {
        let h = header(path, size, false).map_err(LoadError::Write)?;
        self.push(h.as_bytes())?;
        let mut hasher = Hasher::default();
        let mut n: u64 = 0;
        let read_err = |source| LoadError::Read { diff_id, source };
        let too_long = |actual| LoadError::Size {
            diff_id,
            expected: size,
            actual,
        };
        loop {
            if self.len == CHUNK {
                // Read what follows before letting the full buffer go.
                let got = read_full(src, &mut self.spare).map_err(read_err)?;
                if got == 0 {
                    break;
                }
                n += got as u64;
                if n > size {
                    return Err(too_long(n));
                }
                hasher.update(&self.spare[..got]);
                self.out.write_all(&self.buf).map_err(LoadError::Write)?;
                std::mem::swap(&mut self.buf, &mut self.spare);
                self.len = got;
                self.layer_bytes += got as u64;
            } else {
                let got = loop {
                    match src.read(&mut self.buf[self.len..]) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        r => break r.map_err(read_err)?,
                    }
                };
                if got == 0 {
                    break;
                }
                n += got as u64;
                if n > size {
                    return Err(too_long(n));
                }
                hasher.update(&self.buf[self.len..self.len + got]);
                self.len += got;
                self.layer_bytes += got as u64;
            }
            if self.layer_bytes - self.reported >= PROGRESS_EVERY {
                self.reported = self.layer_bytes;
                progress(self.layer_bytes);
            }
        }
        if n != size {
            return Err(LoadError::Size {
                diff_id,
                expected: size,
                actual: n,
            });
        }
        let actual = hasher.finish();
        if actual != diff_id {
            return Err(LoadError::Digest { diff_id, actual });
        }
        self.reported = self.layer_bytes;
        progress(self.layer_bytes);
        self.pad(size)
    }

    /// Ends the archive (two zero blocks), writes what is buffered and
    /// flushes; returns the sink.
    pub fn finish(mut self) -> Result<W, LoadError> {
        self.push(&[0u8; 1024])?;
        self.out
            .write_all(&self.buf[..self.len])
            .map_err(LoadError::Write)?;
        self.out.flush().map_err(LoadError::Write)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the size of every write.
    #[derive(Default)]
    struct Sink {
        data: Vec<u8>,
        writes: Vec<usize>,
    }
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.data.extend_from_slice(b);
            self.writes.push(b.len());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn layer_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn writes_big_chunks_and_a_readable_tar() {
        let a = layer_bytes(3 * CHUNK + 1000);
        let b = layer_bytes(512);
        let mut w = LoadWriter::new(Sink::default());
        w.dir("blobs/").unwrap();
        let mut calls = Vec::new();
        let mut progress = |n| calls.push(n);
        w.layer(
            "a",
            Digest::of(&a),
            a.len() as u64,
            &mut &a[..],
            &mut progress,
        )
        .unwrap();
        w.layer(
            "b",
            Digest::of(&b),
            b.len() as u64,
            &mut &b[..],
            &mut progress,
        )
        .unwrap();
        w.file("manifest.json", b"[]").unwrap();
        let sink = w.finish().unwrap();
        // Every write but the last is a whole chunk.
        let (last, rest) = sink.writes.split_last().unwrap();
        assert!(rest.iter().all(|&n| n == CHUNK), "{:?}", sink.writes);
        assert!(*last <= CHUNK);
        assert_eq!(calls.last(), Some(&((a.len() + b.len()) as u64)));
        assert!(calls.windows(2).all(|w| w[0] < w[1]));

        let mut ar = tar::Archive::new(&sink.data[..]);
        let got: Vec<(String, Vec<u8>)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                (p, v)
            })
            .collect();
        assert_eq!(got[0].0, "blobs/");
        assert_eq!(got[1], ("a".to_string(), a));
        assert_eq!(got[2], ("b".to_string(), b));
        assert_eq!(got[3], ("manifest.json".to_string(), b"[]".to_vec()));
    }

    /// A bad layer fails, and its last chunk never reaches the sink.
    #[test]
    fn bad_layer_is_never_complete_in_the_sink() {
        for len in [100, CHUNK - 512, CHUNK, 2 * CHUNK, 2 * CHUNK + 3] {
            let good = layer_bytes(len);
            let mut bad = good.clone();
            bad[len - 1] ^= 1;
            let mut w = LoadWriter::new(Sink::default());
            let err = w
                .layer(
                    "x",
                    Digest::of(&good),
                    len as u64,
                    &mut &bad[..],
                    &mut |_| {},
                )
                .unwrap_err();
            assert!(matches!(err, LoadError::Digest { .. }), "{err}");
            assert!(
                w.out.data.len() < 512 + len,
                "len {len}: complete layer written"
            );

            let mut w = LoadWriter::new(Sink::default());
            let err = w
                .layer(
                    "x",
                    Digest::of(&good),
                    len as u64,
                    &mut &good[..len - 1],
                    &mut |_| {},
                )
                .unwrap_err();
            assert!(matches!(err, LoadError::Size { actual, .. } if actual == len as u64 - 1));

            let mut w = LoadWriter::new(Sink::default());
            let long = layer_bytes(len + 1);
            let err = w
                .layer(
                    "x",
                    Digest::of(&good),
                    len as u64,
                    &mut &long[..],
                    &mut |_| {},
                )
                .unwrap_err();
            assert!(matches!(err, LoadError::Size { .. }));
            assert!(w.out.data.len() < 512 + len);
        }
    }

    #[test]
    fn metadata_names_every_layer() {
        let cfg = r#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let layers = [(Digest::of(b"a"), 10), (Digest::of(b"b"), 20)];
        let files = metadata_files(cfg, &layers, "shoal/demo:7");
        let get = |p: &str| -> serde_json::Value {
            serde_json::from_slice(&files.iter().find(|f| f.0 == p).unwrap().1).unwrap()
        };
        let m = get("manifest.json");
        assert_eq!(m[0]["RepoTags"][0], "shoal/demo:7");
        assert_eq!(m[0]["Layers"][1], blob_path(&layers[1].0));
        assert_eq!(m[0]["Config"], blob_path(&Digest::of(cfg.as_bytes())));
        let index = get("index.json");
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            "7"
        );
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            "shoal/demo:7"
        );
        let digest: Digest = desc["digest"].as_str().unwrap().parse().unwrap();
        let oci = get(&blob_path(&digest));
        assert_eq!(oci["layers"][0]["size"], 10);
        assert_eq!(oci["layers"][1]["mediaType"], MEDIA_OCI_LAYER);
        assert_eq!(files.last().unwrap().0, "manifest.json");
    }
}
