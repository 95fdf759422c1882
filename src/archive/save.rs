//! Reading a `docker save` tar stream of one image, in either layout the
//! engine writes:
//!
//! - **legacy** (Docker < 25): `<v1id>/layer.tar`, `<v1id>/json`,
//!   `<v1id>/VERSION`, `<confighex>.json`, `manifest.json`, `repositories`;
//! - **OCI** (Docker >= 25): `blobs/sha256/<hex>` for layers, config and OCI
//!   manifests, `index.json`, `oci-layout`, `manifest.json`.
//!
//! The engine tars a directory, so entries come in lexical path order:
//! `manifest.json`, the only file that maps paths to layers, comes after
//! every layer. Layers therefore stream into a [`LayerSink`] before anyone
//! knows which image layer they are; small JSON files are kept in memory and
//! the image is assembled at the end ([`SavedImage`]).
//!
//! Which layer a legacy `layer.tar` is, is not given by its position (the
//! `<v1id>` directories sort randomly). The sink is told the diff id anyway
//! when it can be worked out before the content streams: an OCI blob's name,
//! or, for a legacy layer, the position whose chain id reproduces the
//! directory's v1 id from its `json` file (which sorts before `layer.tar`),
//! see [`legacy_layer_position`]. That lets the store skip compressing a
//! layer it already holds. When it cannot be worked out the sink gets `None`
//! and must keep the content; correctness never depends on the guess, since
//! the content digest is checked either way.
//!
//! No file I/O here: the sink decides where layer bytes go.

use std::collections::HashMap;
use std::io::{self, Read};

use serde::Deserialize;

use crate::archive::{chain_ids, Digest};

/// Files other than layers kept in memory, each at most this big (image
/// configs with long histories reach a few hundred KiB).
pub const SMALL_FILE_MAX: u64 = 16 << 20;
/// All files kept in memory together at most this big.
pub const SMALL_TOTAL_MAX: u64 = 64 << 20;

/// Where layer contents go while the archive streams.
pub trait LayerSink {
    type Error;
    /// Consumes one layer candidate: `content` is `size` bytes that must be
    /// read to the end. `expect` is the diff id the content must have when
    /// it is known before reading (the sink may then only hash it, if it
    /// already holds that layer). Returns the sha256 of the content.
    ///
    /// Candidates that turn out not to be layers of the image (an OCI blob
    /// that was another manifest) are never named in [`SavedImage`].
    fn layer(
        &mut self,
        expect: Option<Digest>,
        size: u64,
        content: &mut dyn Read,
    ) -> Result<Digest, Self::Error>;
}

/// The image a `docker save` archive holds, once the stream has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedImage {
    /// The config JSON, byte for byte.
    pub config: Vec<u8>,
    /// sha256 of `config`, checked against the config's file name.
    pub image_id: Digest,
    /// The content digests of the archive's layers, in `manifest.json`
    /// order (bottom-up); for uncompressed layers these are the diff ids.
    pub layers: Vec<Digest>,
    /// `RepoTags` of the image, as saved.
    pub repo_tags: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError<E: std::error::Error + 'static> {
    #[error("reading the docker save stream: {0}")]
    Read(#[source] io::Error),
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Sink(E),
}

/// One entry of the archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads a `docker save` stream of one image. `hint` is the image's diff ids
/// as the engine reports them (may be empty); it only serves to tell the
/// sink which layer is coming, see the module doc.
pub fn read_save<R: Read, S: LayerSink>(
    save: R,
    hint: &[Digest],
    sink: &mut S,
) -> Result<SavedImage, SaveError<S::Error>>
where
    S::Error: std::error::Error + 'static,
{
    let chain = chain_ids(hint);
    let mut archive = tar::Archive::new(save);
    // Small files by path, and what the sink said about each layer candidate.
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut small_total = 0u64;
    let mut streamed: HashMap<String, Digest> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();

    for entry in archive.entries().map_err(SaveError::Read)? {
        let mut entry = entry.map_err(SaveError::Read)?;
        let path = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            // Symlinks are relative to the link's directory, hard links to
            // the archive root. Docker < 25 saves a layer that appears twice
            // as a symlink `../<v1id>/layer.tar`.
            let target = if kind.is_symlink() {
                let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                normalize(&format!("{dir}/{target}"))
            } else {
                normalize(&target)
            };
            links.insert(path, target);
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();

        if let Some(dir) = path.strip_suffix("/layer.tar").filter(|d| !d.contains('/')) {
            let expect = small
                .get(&format!("{dir}/json"))
                .and_then(|json| legacy_layer_position(dir, json, &chain))
                .map(|i| hint[i]);
            let digest = sink
                .layer(expect, size, &mut entry)
                .map_err(SaveError::Sink)?;
            if let Some(x) = expect.filter(|x| *x != digest) {
                return Err(SaveError::Bad(format!(
                    "{path} has digest {digest}, its v1 id says it is {x}"
                )));
            }
            streamed.insert(path, digest);
        } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let name: Digest = hex
                .parse()
                .map_err(|_| SaveError::Bad(format!("{path}: blob name is not a digest")))?;
            // Configs and manifests are JSON; layers are tars, which start
            // with a file name. Peek one byte to keep JSON in memory and
            // stream everything else.
            let mut first = [0u8; 1];
            let got = read_full(&mut entry, &mut first).map_err(SaveError::Read)?;
            if got == 1 && first[0] == b'{' && size <= SMALL_FILE_MAX {
                let mut data = Vec::with_capacity(size as usize);
                data.push(b'{');
                entry.read_to_end(&mut data).map_err(SaveError::Read)?;
                keep_small(&mut small, &mut small_total, path, data)?;
            } else {
                let mut content = (&first[..got]).chain(&mut entry);
                let digest = sink
                    .layer(Some(name), size, &mut content)
                    .map_err(SaveError::Sink)?;
                if digest != name {
                    return Err(SaveError::Bad(format!("{path} has digest {digest}")));
                }
                streamed.insert(path, digest);
            }
        } else if size <= SMALL_FILE_MAX {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(SaveError::Read)?;
            keep_small(&mut small, &mut small_total, path, data)?;
        }
        // Anything else is an unknown large file: the tar reader skips it.
    }

    let resolve = |p: &str| -> String {
        let mut p = normalize(p);
        for _ in 0..8 {
            match links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        p
    };

    let manifest = small.get("manifest.json").ok_or_else(|| {
        SaveError::Bad("no manifest.json (is this a docker save archive?)".into())
    })?;
    let mut manifest: Vec<SaveManifest> = serde_json::from_slice(manifest)
        .map_err(|e| SaveError::Bad(format!("manifest.json: {e}")))?;
    if manifest.len() != 1 {
        return Err(SaveError::Bad(format!(
            "manifest.json lists {} images, expected one",
            manifest.len()
        )));
    }
    let manifest = manifest.remove(0);

    let config_path = resolve(&manifest.config);
    let config = small
        .remove(&config_path)
        .ok_or_else(|| SaveError::Bad(format!("config {config_path} is not in the archive")))?;
    let image_id = Digest::of(&config);
    let config_name = config_path
        .strip_prefix("blobs/sha256/")
        .or_else(|| config_path.strip_suffix(".json"))
        .and_then(|h| h.parse::<Digest>().ok());
    if config_name.is_some_and(|n| n != image_id) {
        return Err(SaveError::Bad(format!(
            "config {config_path} has digest {image_id}"
        )));
    }

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for p in &manifest.layers {
        let p = resolve(p);
        let digest = match streamed.get(&p) {
            Some(d) => *d,
            None => {
                // A layer blob that looked like JSON: hand it over now.
                let data = small
                    .get(&p)
                    .ok_or_else(|| SaveError::Bad(format!("layer {p} is not in the archive")))?;
                let name = p.strip_prefix("blobs/sha256/").and_then(|h| h.parse().ok());
                let d = sink
                    .layer(name, data.len() as u64, &mut &data[..])
                    .map_err(SaveError::Sink)?;
                if name.is_some_and(|n| n != d) {
                    return Err(SaveError::Bad(format!("{p} has digest {d}")));
                }
                streamed.insert(p, d);
                d
            }
        };
        layers.push(digest);
    }
    Ok(SavedImage {
        config,
        image_id,
        layers,
        repo_tags: manifest.repo_tags.unwrap_or_default(),
    })
}

fn keep_small<E: std::error::Error + 'static>(
    small: &mut HashMap<String, Vec<u8>>,
    total: &mut u64,
    path: String,
    data: Vec<u8>,
) -> Result<(), SaveError<E>> {
    *total += data.len() as u64;
    if *total > SMALL_TOTAL_MAX {
        return Err(SaveError::Bad(format!(
            "more than {SMALL_TOTAL_MAX} bytes of metadata files"
        )));
    }
    small.insert(path, data);
    Ok(())
}

/// `./a/../b//c` → `b/c`.
fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            x => parts.push(x),
        }
    }
    parts.join("/")
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Which layer of an image (index into `chain`, its chain ids) the legacy
/// directory `v1id` holds, given the directory's `json` file; `None` when no
/// position reproduces the v1 id.
///
/// Docker < 25 names each layer directory by a v1 id computed as
/// `v1.CreateID` does: the layer's v1 image JSON without `id` (and, below
/// the top layer, without the `os` that is added after the id is made),
/// with `"layer_id": "<chain id>"` and `"parent": "sha256:<parent v1id>"`,
/// top-level keys sorted, values as written. Checked against Docker 20.10.
pub fn legacy_layer_position(v1id: &str, json: &[u8], chain: &[Digest]) -> Option<usize> {
    if chain.is_empty() {
        return None;
    }
    let text = std::str::from_utf8(json).ok()?;
    let members = json_members(text)?;
    let has_os = members.iter().any(|(k, _)| *k == "os");
    for drop_os in [true, false] {
        if !drop_os && !has_os {
            break; // the first round already tried exactly this
        }
        let mut base: Vec<(&str, String)> = Vec::with_capacity(members.len() + 1);
        for (k, v) in &members {
            match *k {
                "id" => {}
                "os" if drop_os => {}
                "parent" => {
                    let hex = v.strip_prefix('"')?.strip_suffix('"')?;
                    base.push((k, format!("\"sha256:{hex}\"")));
                }
                _ => base.push((k, v.to_string())),
            }
        }
        for (i, c) in chain.iter().enumerate() {
            let mut m = base.clone();
            m.push(("layer_id", format!("\"{c}\"")));
            m.sort_by(|a, b| a.0.cmp(b.0));
            let mut s = String::with_capacity(text.len() + 128);
            s.push('{');
            for (j, (k, v)) in m.iter().enumerate() {
                if j > 0 {
                    s.push(',');
                }
                s.push('"');
                s.push_str(k);
                s.push_str("\":");
                s.push_str(v);
            }
            s.push('}');
            if Digest::of(s.as_bytes()).hex() == v1id {
                return Some(i);
            }
        }
    }
    None
}

/// The top-level members of a JSON object as (key, raw value text). Keys
/// with escapes are refused (v1 image JSON has none).
fn json_members(text: &str) -> Option<Vec<(&str, &str)>> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        ws(&mut i);
        match b.get(i)? {
            b'}' => return Some(out),
            b',' if !out.is_empty() => {
                i += 1;
                ws(&mut i);
            }
            _ if out.is_empty() => {}
            _ => return None,
        }
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let ks = i + 1;
        let ke = ks + text[ks..].find('"')?;
        let key = &text[ks..ke];
        if key.contains('\\') {
            return None;
        }
        i = ke + 1;
        ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        let vs = i;
        let mut depth = 0usize;
        let mut in_str = false;
        while i < b.len() {
            let c = b[i];
            if in_str {
                match c {
                    b'\\' => i += 1,
                    b'"' => in_str = false,
                    _ => {}
                }
            } else {
                match c {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    b',' | b'}' if depth == 0 => break,
                    _ => {}
                }
            }
            i += 1;
        }
        out.push((key, text[vs..i].trim_end()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layer directories and their `json` from a real Docker 20.10.24
    /// `docker save` of a five-layer image (legacy builder).
    const D20_DIFFS: [&str; 5] = [
        "sha256:8e7d43dd240870a475750ce8a53f96b85281332626ea3b0c34cef79e3e4c7cbe",
        "sha256:4aad5356a8b267e75d1eb86ec2a6ef0cb7bf24ea1309501bd0bca053a397a2a1",
        "sha256:3b1602b2844ecc67dca530fdc105c26e971a76a1a2bbb53a74da67196bdee73f",
        "sha256:27d49d24387368eae8dd303b8641ff721f53872c0d68b173d8bd38d1b206f056",
        "sha256:34e315fa79518537f773dc905272213edd34a0f468ddd438ff71b4bd99217967",
    ];
    const D20_L0: (&str, &str) = (
        "45f1d293c28c2a7706baefb6ca879c2c926f36c7781944504c52df17f4ff570b",
        r#"{"id":"45f1d293c28c2a7706baefb6ca879c2c926f36c7781944504c52df17f4ff570b","created":"1970-01-01T00:00:00Z","container_config":{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null},"os":"linux"}"#,
    );
    const D20_L1: (&str, &str) = (
        "1fd8785f1350fbad465fdc465cc47022cfa2e9e70f459cf3a0a87af7d4a99bf5",
        r#"{"id":"1fd8785f1350fbad465fdc465cc47022cfa2e9e70f459cf3a0a87af7d4a99bf5","parent":"45f1d293c28c2a7706baefb6ca879c2c926f36c7781944504c52df17f4ff570b","created":"1970-01-01T00:00:00Z","container_config":{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null},"os":"linux"}"#,
    );
    const D20_TOP: (&str, &str) = (
        "3ebc8e969e5c57d36d21218d958a1fc4d81e4ccbecb537e4f07678e6078887b8",
        r##"{"id":"3ebc8e969e5c57d36d21218d958a1fc4d81e4ccbecb537e4f07678e6078887b8","parent":"bbb913a0bf0d5a779fb57f245a3b4f7cc10040a63bee6f86b92e12d37da7aa11","created":"2026-11-25T20:51:54.000749032Z","container_config":{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh","-c","#(nop) COPY file:380e937aaab77662b81cef3a8d52855669cbfa1c3936daa8d13174d50449a88e in /f1 "],"Image":"sha256:a34d71d8cbcb985ec29dd52037aba18d0ed585185f9cc858c2ea58fd71cd2ec2","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":{"shoal.memory":"1GiB"}},"docker_version":"20.10.24+dfsg1","config":{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":null,"Image":"sha256:a34d71d8cbcb985ec29dd52037aba18d0ed585185f9cc858c2ea58fd71cd2ec2","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":{"shoal.memory":"1GiB"}},"architecture":"amd64","os":"linux"}"##,
    );

    fn d20_chain() -> Vec<Digest> {
        chain_ids(&D20_DIFFS.map(|d| d.parse().unwrap()))
    }

    #[test]
    fn v1_ids_of_docker_20_10_are_recognised() {
        let chain = d20_chain();
        let pos = |(id, json): (&str, &str)| legacy_layer_position(id, json.as_bytes(), &chain);
        assert_eq!(pos(D20_L0), Some(0));
        assert_eq!(pos(D20_L1), Some(1));
        assert_eq!(pos(D20_TOP), Some(4));
        // Another image's chain, or a tampered json, is not recognised.
        let other = chain_ids(&[Digest::of(b"x")]);
        assert_eq!(
            legacy_layer_position(D20_L0.0, D20_L0.1.as_bytes(), &other),
            None
        );
        let tampered = D20_L1.1.replace("1970", "1971");
        assert_eq!(
            legacy_layer_position(D20_L1.0, tampered.as_bytes(), &chain),
            None
        );
        assert_eq!(
            legacy_layer_position(D20_L0.0, D20_L0.1.as_bytes(), &[]),
            None
        );
    }

    #[test]
    fn members_split_raw() {
        let m = json_members(r#" {"a":1, "b":{"c":[1,"}",{"d":"\"}"}]},"e":"x,y"} "#).unwrap();
        assert_eq!(
            m,
            vec![
                ("a", "1"),
                ("b", r#"{"c":[1,"}",{"d":"\"}"}]}"#),
                ("e", r#""x,y""#)
            ]
        );
        assert_eq!(json_members("{}").unwrap(), vec![]);
        assert!(json_members("[]").is_none());
        assert!(json_members(r#"{"a" 1}"#).is_none());
        assert!(json_members(r#"{"a":1"#).is_none());
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("./a/../b//c"), "b/c");
        assert_eq!(normalize("abc/../def/layer.tar"), "def/layer.tar");
        assert_eq!(normalize("manifest.json"), "manifest.json");
    }
}
