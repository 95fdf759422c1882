//! The store's marker, `<root>/shoal-store.json`: it says that a directory
//! is a shoal store (format version, id, creation time). A node remembers
//! the id of the store it uses in `<data_dir>/store.json`, so a store that
//! was initialised once and is now missing, empty or unmounted (its marker
//! gone) is never taken for a new one and silently replaced by an empty
//! store: [`decide`] (pure) says what to do with what the node sees.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The marker's file name in the store root.
pub const MARKER_FILE: &str = "shoal-store.json";
/// The file in the node's data dir that remembers its store.
pub const REMEMBERED_FILE: &str = "store.json";
/// Marker format this version writes and reads.
pub const MARKER_FORMAT: u32 = 1;

/// The content of `shoal-store.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub format: u32,
    /// Random, made when the store is created; the same for every node
    /// that shares the store.
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl Marker {
    pub fn new() -> Marker {
        let mut id = uuid::Uuid::new_v4().simple().to_string();
        id.truncate(16);
        Marker {
            format: MARKER_FORMAT,
            id,
            created_at: OffsetDateTime::now_utc(),
        }
    }
}

impl Default for Marker {
    fn default() -> Self {
        Marker::new()
    }
}

/// What the node remembers of its store (`<data_dir>/store.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub id: String,
    /// The store path it was seen at: a node pointed at another path on
    /// purpose starts afresh there.
    pub root: PathBuf,
}

/// What the store root looks like right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The path does not exist.
    Missing,
    /// An empty directory (an unmounted mount point looks like this).
    Empty,
    /// A directory with a marker that reads.
    Marked(Marker),
    /// A directory with content but no marker: a store from before markers,
    /// or something that is not a store (or whose marker was removed).
    Unmarked,
    /// A marker that does not read as one.
    BadMarker(String),
}

/// What to do with the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Make a new store there (directories and a new marker).
    Create,
    /// It is the store: use it.
    Use(Marker),
    /// A store from before markers, never seen by this node: give it a
    /// marker and use it.
    Adopt,
    /// Do not touch it: refuse loads and publishes, check again later.
    Refuse(Lost),
}

/// Why a store the node knew cannot be used now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    #[error("the store directory is missing")]
    Missing,
    #[error("the store directory is empty (not mounted?)")]
    Empty,
    #[error("the store's marker is gone (not mounted, or not the store?)")]
    MarkerGone,
    #[error("the store directory holds another store ({found})")]
    Other { found: String },
    #[error("the store's marker has format {0}, newer than this node reads")]
    NewerFormat(u32),
    #[error("the store's marker does not read: {0}")]
    BadMarker(String),
}

/// The decision for a node that remembers `known` (the id of its store,
/// when it has used one at this path) and sees `seen`.
pub fn decide(known: Option<&str>, seen: &Seen) -> Decision {
    match (known, seen) {
        (_, Seen::Marked(m)) if m.format > MARKER_FORMAT => {
            Decision::Refuse(Lost::NewerFormat(m.format))
        }
        (_, Seen::BadMarker(why)) => Decision::Refuse(Lost::BadMarker(why.clone())),
        (None, Seen::Missing | Seen::Empty) => Decision::Create,
        (None, Seen::Unmarked) => Decision::Adopt,
        (None, Seen::Marked(m)) => Decision::Use(m.clone()),
        (Some(id), Seen::Marked(m)) if m.id == id => Decision::Use(m.clone()),
        (Some(_), Seen::Marked(m)) => Decision::Refuse(Lost::Other {
            found: m.id.clone(),
        }),
        (Some(_), Seen::Missing) => Decision::Refuse(Lost::Missing),
        (Some(_), Seen::Empty) => Decision::Refuse(Lost::Empty),
        (Some(_), Seen::Unmarked) => Decision::Refuse(Lost::MarkerGone),
    }
}

/// The id a node remembers for the store at `root`, if any.
pub fn known_id(remembered: Option<&Remembered>, root: &Path) -> Option<String> {
    remembered.filter(|r| r.root == root).map(|r| r.id.clone())
}

/// Looks at the store root (blocking I/O; may hang on a dead mount).
pub fn look(root: &Path) -> io::Result<Seen> {
    let mut entries = match fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Seen::Missing),
        Err(e) => return Err(e),
    };
    if entries.next().transpose()?.is_none() {
        return Ok(Seen::Empty);
    }
    match fs::read(root.join(MARKER_FILE)) {
        Ok(bytes) => Ok(match serde_json::from_slice::<Marker>(&bytes) {
            Ok(m) => Seen::Marked(m),
            Err(e) => Seen::BadMarker(e.to_string()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Seen::Unmarked),
        Err(e) => Err(e),
    }
}

/// Writes `m` as the marker of `root` unless one is there already (two
/// nodes creating a shared store at once: exactly one marker wins, by a
/// hard link that never replaces). Returns the marker in place.
pub fn write_marker(root: &Path, m: &Marker) -> io::Result<Marker> {
    let path = root.join(MARKER_FILE);
    let tmp = root.join(format!(
        ".{MARKER_FILE}.{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    let data = serde_json::to_vec_pretty(m).expect("markers serialize");
    let res = (|| {
        {
            let mut f = fs::File::create(&tmp)?;
            io::Write::write_all(&mut f, &data)?;
            f.sync_all()?;
        }
        match fs::hard_link(&tmp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        fs::File::open(root)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    res?;
    let bytes = fs::read(&path)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// Reads `<data_dir>/store.json`; `None` when there is none (or it does
/// not read: then the store is checked as if new, which never replaces a
/// store that has a marker).
pub fn read_remembered(data_dir: &Path) -> Option<Remembered> {
    let bytes = fs::read(data_dir.join(REMEMBERED_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `<data_dir>/store.json` (temp + fsync + rename).
pub fn write_remembered(data_dir: &Path, r: &Remembered) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(r).expect("serializes");
    crate::envs::write_atomic(&data_dir.join(REMEMBERED_FILE), &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(id: &str, format: u32) -> Marker {
        Marker {
            format,
            id: id.into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn decisions() {
        use Decision::*;
        let a = marker("a", 1);
        let cases: Vec<(Option<&str>, Seen, Decision)> = vec![
            // Never seen a store here: create, use, or adopt an old one.
            (None, Seen::Missing, Create),
            (None, Seen::Empty, Create),
            (None, Seen::Marked(a.clone()), Use(a.clone())),
            (None, Seen::Unmarked, Adopt),
            // Known: the same store is used, nothing else replaces it.
            (Some("a"), Seen::Marked(a.clone()), Use(a.clone())),
            (Some("a"), Seen::Missing, Refuse(Lost::Missing)),
            (Some("a"), Seen::Empty, Refuse(Lost::Empty)),
            (Some("a"), Seen::Unmarked, Refuse(Lost::MarkerGone)),
            (
                Some("b"),
                Seen::Marked(a.clone()),
                Refuse(Lost::Other { found: "a".into() }),
            ),
            // A marker this version cannot read is never overwritten.
            (
                None,
                Seen::Marked(marker("a", 2)),
                Refuse(Lost::NewerFormat(2)),
            ),
            (
                Some("a"),
                Seen::Marked(marker("a", 2)),
                Refuse(Lost::NewerFormat(2)),
            ),
            (
                None,
                Seen::BadMarker("eof".into()),
                Refuse(Lost::BadMarker("eof".into())),
            ),
        ];
        for (known, seen, want) in cases {
            assert_eq!(decide(known, &seen), want, "{known:?} {seen:?}");
        }
    }

    #[test]
    fn known_id_only_for_the_same_root() {
        let r = Remembered {
            id: "a".into(),
            root: "/mnt/store".into(),
        };
        assert_eq!(
            known_id(Some(&r), Path::new("/mnt/store")),
            Some("a".into())
        );
        assert_eq!(known_id(Some(&r), Path::new("/mnt/other")), None);
        assert_eq!(known_id(None, Path::new("/mnt/store")), None);
    }

    #[test]
    fn look_and_write_marker() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        assert_eq!(look(&root).unwrap(), Seen::Missing);
        fs::create_dir(&root).unwrap();
        assert_eq!(look(&root).unwrap(), Seen::Empty);
        fs::create_dir(root.join("layers")).unwrap();
        assert_eq!(look(&root).unwrap(), Seen::Unmarked);
        let m = Marker::new();
        assert_eq!(write_marker(&root, &m).unwrap(), m);
        assert_eq!(look(&root).unwrap(), Seen::Marked(m.clone()));
        // A second writer finds the first one's marker.
        assert_eq!(write_marker(&root, &Marker::new()).unwrap(), m);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 2);
        fs::write(root.join(MARKER_FILE), b"{").unwrap();
        assert!(matches!(look(&root).unwrap(), Seen::BadMarker(_)));
    }
}
