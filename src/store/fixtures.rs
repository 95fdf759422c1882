//! Test fixtures of the store's tests (and of other modules' tests that
//! need a published image): random layer tars, `docker save` archives as
//! both engine generations write them, and the check of a load archive the
//! way both engines read it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ImageRef, LoadStats, Manifest, PublishHint, Store, StoreError};
use crate::archive::load::{blob_path, metadata_files};
use crate::archive::{chain_ids, Digest};

/// A small valid layer tar with a few random files.
pub(crate) fn random_layer(rng: &mut StdRng) -> Vec<u8> {
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

pub(crate) fn tar_of(mut entries: Vec<(String, Vec<u8>)>, links: Vec<(String, String)>) -> Vec<u8> {
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
pub(crate) fn legacy_save(config: &str, layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
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
            Some(first) => links.push((format!("{v1}/layer.tar"), format!("../{first}/layer.tar"))),
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

pub(crate) fn untar(data: &[u8]) -> Vec<(String, Vec<u8>)> {
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

pub(crate) fn decompress(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    lz4::Decoder::new(File::open(path).unwrap())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

pub(crate) fn image(rng: &mut StdRng, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|_| random_layer(rng)).collect()
}

pub(crate) fn r(s: &str) -> ImageRef {
    s.parse().unwrap()
}

pub(crate) fn hint(layers: &[Vec<u8>]) -> PublishHint {
    PublishHint {
        diff_ids: layers.iter().map(|l| Digest::of(l)).collect(),
    }
}

/// Checks a load archive of `layers` (with `config`, skipping `skip`)
/// the way both engines read it.
pub(crate) fn check_load_archive(
    data: &[u8],
    config: &str,
    layers: &[Vec<u8>],
    skip: usize,
    tag: &str,
) {
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

pub(crate) fn load(
    store: &Store,
    m: &Manifest,
    skip: usize,
) -> Result<(Vec<u8>, LoadStats), StoreError> {
    let mut out = Vec::new();
    let stats =
        store.write_load_archive(m, skip, &m.image_ref().docker_tag(), &mut out, &mut |_| {})?;
    Ok((out, stats))
}

pub(crate) fn published(n: usize) -> (tempfile::TempDir, Store, Manifest, Vec<Vec<u8>>) {
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
