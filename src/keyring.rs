//! The cluster keyring: the secret every node of a cluster shares.
//!
//! A key file holds one or more 32-byte keys, one `shoal-key-v1:<base64>`
//! line each (blank lines and `#` comments are ignored). The first key is
//! the primary: it seals what this node sends. The others still open what
//! peers send, so an operator can rotate a key on a live cluster (add the
//! new key second everywhere, move it first everywhere, remove the old one;
//! `docs/security.md`).
//!
//! Keys are never used directly: each use gets its own subkey derived with
//! HKDF-SHA256 ([`Keyring::gossip_keys`] seals gossip, [`Keyring::http_keys`]
//! authenticates node-to-node HTTP calls), so a weakness in one use never
//! gives away another. Each key has a short public id (8 hex digits, also
//! derived with HKDF) for logs, metrics and datagram headers; key bytes are
//! never logged or shown (`Debug` is redacted).
//!
//! Parsing and derivation are pure; [`Keyring::load`] and
//! [`Keyring::load_or_create`] are the file edges (the file must not be
//! readable by group or others).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;

/// The prefix of every key line: the format's version.
pub const KEY_PREFIX: &str = "shoal-key-v1:";

/// Most keys one file may hold (a rotation needs two; a few spare).
pub const MAX_KEYS: usize = 8;

/// Largest key file read (a handful of lines).
const MAX_FILE_BYTES: u64 = 16 * 1024;

/// HKDF `info` of each use. Changing one changes every derived key.
const INFO_ID: &[u8] = b"shoal-v1 key id";
const INFO_GOSSIP: &[u8] = b"shoal-v1 gossip seal";
const INFO_HTTP: &[u8] = b"shoal-v1 http mac";
const INFO_TOKEN: &[u8] = b"shoal-v1 user token";
const INFO_WEB: &[u8] = b"shoal-v1 web csrf";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("reading key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}): \
         run `chmod 600 {path}` (it must be readable by shoal alone)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Why a key file's text is not a keyring (the line is 1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: expected `{KEY_PREFIX}<base64 of 32 bytes>`")]
    Format { line: usize },
    #[error("line {line}: the key is not 32 bytes of base64")]
    Key { line: usize },
    #[error("line {line}: the same key twice")]
    Duplicate { line: usize },
    #[error("no key in the file")]
    Empty,
    #[error("more than {MAX_KEYS} keys")]
    TooMany,
}

/// A key's public id: 4 bytes derived from the key, shown as 8 hex digits.
/// Knowing it reveals nothing of the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 4]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One 32-byte secret: a cluster key, or a subkey derived from one.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A key for one use: the id of the cluster key it comes from, and the
/// derived secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subkey {
    pub id: KeyId,
    pub secret: Secret,
}

/// The keys of a key file, primary first.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<Secret>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

fn derive(key: &Secret, info: &[u8], out: &mut [u8]) {
    Hkdf::<Sha256>::new(None, &key.0)
        .expand(info, out)
        .expect("HKDF output of at most 32 bytes");
}

fn key_id(key: &Secret) -> KeyId {
    let mut id = [0u8; 4];
    derive(key, INFO_ID, &mut id);
    KeyId(id)
}

impl Keyring {
    /// A keyring of the given keys, primary first (tests, and the parser).
    pub fn from_keys(keys: Vec<[u8; 32]>) -> Result<Keyring, ParseError> {
        if keys.is_empty() {
            return Err(ParseError::Empty);
        }
        if keys.len() > MAX_KEYS {
            return Err(ParseError::TooMany);
        }
        Ok(Keyring {
            keys: keys.into_iter().map(Secret).collect(),
        })
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Keyring, ParseError> {
        let mut keys: Vec<[u8; 32]> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let b64 = l
                .strip_prefix(KEY_PREFIX)
                .ok_or(ParseError::Format { line })?;
            let bytes = B64
                .decode(b64.trim())
                .map_err(|_| ParseError::Key { line })?;
            let key: [u8; 32] = bytes.try_into().map_err(|_| ParseError::Key { line })?;
            if keys.contains(&key) {
                return Err(ParseError::Duplicate { line });
            }
            keys.push(key);
        }
        Keyring::from_keys(keys)
    }

    /// A new random key as a key file line (with its newline).
    pub fn generate_line() -> String {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        format!("{KEY_PREFIX}{}\n", B64.encode(key))
    }

    /// The public ids of the keys, primary first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(key_id).collect()
    }

    /// The primary key's id.
    pub fn primary_id(&self) -> KeyId {
        key_id(&self.keys[0])
    }

    fn subkeys(&self, info: &[u8]) -> Vec<Subkey> {
        self.keys
            .iter()
            .map(|k| {
                let mut out = [0u8; 32];
                derive(k, info, &mut out);
                Subkey {
                    id: key_id(k),
                    secret: Secret(out),
                }
            })
            .collect()
    }

    /// Keys that seal gossip datagrams, primary first.
    pub fn gossip_keys(&self) -> Vec<Subkey> {
        self.subkeys(INFO_GOSSIP)
    }

    /// Keys that authenticate node-to-node HTTP calls, primary first.
    pub fn http_keys(&self) -> Vec<Subkey> {
        self.subkeys(INFO_HTTP)
    }

    /// Keys that sign user tokens (`auth.rs`), primary first.
    pub fn token_keys(&self) -> Vec<Subkey> {
        self.subkeys(INFO_TOKEN)
    }

    /// Keys that make the web page's CSRF tokens, primary first.
    pub fn web_keys(&self) -> Vec<Subkey> {
        self.subkeys(INFO_WEB)
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let read_err = |source| KeyringError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyringError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(MAX_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Keyring::parse(&text).map_err(|e| KeyringError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads the key file at `path`, first creating it (mode 0600, one new
    /// key) if it does not exist. Returns the keyring and whether the file
    /// was created now.
    pub fn load_or_create(path: &Path) -> Result<(Keyring, bool), KeyringError> {
        use std::os::unix::fs::OpenOptionsExt;
        let created = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                let write_err = |source| KeyringError::Write {
                    path: path.to_path_buf(),
                    source,
                };
                f.write_all(Keyring::generate_line().as_bytes())
                    .map_err(write_err)?;
                f.sync_all().map_err(write_err)?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(source) => {
                return Err(KeyringError::Write {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok((Keyring::load(path)?, created))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(key: [u8; 32]) -> String {
        format!("{KEY_PREFIX}{}", B64.encode(key))
    }

    #[test]
    fn parse_table() {
        let a = line([1; 32]);
        let b = line([2; 32]);
        let short = format!("{KEY_PREFIX}{}", B64.encode([1u8; 16]));
        let cases: Vec<(String, Result<usize, ParseError>)> = vec![
            (a.clone(), Ok(1)),
            (format!("# cluster key\n\n{a}\n  {b}  \n"), Ok(2)),
            (String::new(), Err(ParseError::Empty)),
            ("# only a comment\n".into(), Err(ParseError::Empty)),
            (
                format!("{a}\nshoal-key-v2:abc"),
                Err(ParseError::Format { line: 2 }),
            ),
            (hex::encode([1u8; 32]), Err(ParseError::Format { line: 1 })),
            (short, Err(ParseError::Key { line: 1 })),
            (
                format!("{KEY_PREFIX}not base64!"),
                Err(ParseError::Key { line: 1 }),
            ),
            (format!("{a}\n{a}"), Err(ParseError::Duplicate { line: 2 })),
            (
                (0..9u8)
                    .map(|i| line([i; 32]))
                    .collect::<Vec<_>>()
                    .join("\n"),
                Err(ParseError::TooMany),
            ),
        ];
        for (text, want) in cases {
            let got = Keyring::parse(&text).map(|k| k.ids().len());
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn primary_first_and_subkeys_differ_per_use() {
        let k = Keyring::parse(&format!("{}\n{}", line([1; 32]), line([2; 32]))).unwrap();
        let g = k.gossip_keys();
        let h = k.http_keys();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].id, k.primary_id());
        assert_eq!(g[0].id, h[0].id, "ids name the cluster key, not the use");
        assert_ne!(g[0].id, g[1].id);
        assert_ne!(g[0].secret, h[0].secret, "one subkey per use");
        assert_ne!(g[0].secret.bytes(), &[1u8; 32], "never the key itself");
        // Derivation is stable: the same file gives the same keys on every node.
        let again = Keyring::from_keys(vec![[1; 32], [2; 32]]).unwrap();
        assert_eq!(again.gossip_keys(), g);
    }

    #[test]
    fn debug_is_redacted() {
        let k = Keyring::from_keys(vec![[7; 32]]).unwrap();
        let shown = format!("{k:?} {:?}", k.gossip_keys());
        assert!(!shown.contains(&B64.encode([7u8; 32])), "{shown}");
        assert!(!shown.contains("7, 7"), "{shown}");
        assert!(shown.contains(&k.primary_id().to_string()), "{shown}");
    }

    #[test]
    fn generated_lines_parse_and_differ() {
        let a = Keyring::generate_line();
        let b = Keyring::generate_line();
        assert!(a.ends_with('\n'));
        assert_ne!(a, b);
        assert_eq!(Keyring::parse(&(a + &b)).unwrap().ids().len(), 2);
    }

    #[test]
    fn file_permissions_and_creation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let (k, created) = Keyring::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = Keyring::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, k, "a second start uses the same key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Keyring::load(&path).unwrap_err().to_string();
        assert!(err.contains("readable by group or others"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        let missing = Keyring::load(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, KeyringError::Read { .. }));
    }
}
