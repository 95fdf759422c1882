//! Finding builds in the drop directory: `<drop>/<product>/<build-id>/`,
//! complete once the marker file is in it. [`scan`] lists what is there
//! (blocking file I/O, cheap: two directory levels); [`watcher`] turns file
//! system notifications into "scan now" wake-ups. The periodic rescan in
//! `builds/mod.rs` covers network file systems that send none.
//!
//! Everything found is checked before it is taken: product and build ids
//! become image refs (`ImageRef::new`: a safe charset, bounded length, so
//! never `..` or `/`), and a directory that resolves outside the drop
//! directory (a symlink pointing elsewhere) is refused.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::store::ImageRef;

/// A complete build, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub image: ImageRef,
    /// The build directory, resolved (inside the drop directory).
    pub dir: PathBuf,
    /// When the marker was written: the build's arrival time.
    pub marker_time: SystemTime,
}

/// Something in the drop directory that is not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub path: PathBuf,
    /// The names as found (lossy UTF-8), for the record.
    pub product: String,
    pub build: String,
    pub reason: String,
}

/// What one scan saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Complete builds, oldest marker first.
    pub found: Vec<Found>,
    pub refused: Vec<Refused>,
    /// Build directories without the marker yet (still being copied).
    pub incomplete: usize,
}

/// Checks a product and build directory name (pure).
pub fn check_ids(product: &OsStr, build: &OsStr) -> Result<ImageRef, String> {
    let (Some(p), Some(b)) = (product.to_str(), build.to_str()) else {
        return Err("the name is not UTF-8".into());
    };
    ImageRef::new(p, b).map_err(|e| e.to_string())
}

/// Whether `path` resolves to a place under `root` (both resolved).
fn resolves_inside(path: &Path, root: &Path) -> Result<PathBuf, String> {
    let real = path
        .canonicalize()
        .map_err(|e| format!("cannot resolve: {e}"))?;
    if real.starts_with(root) && real != root {
        Ok(real)
    } else {
        Err(format!(
            "resolves to {}, outside the drop directory",
            real.display()
        ))
    }
}

/// Lists the drop directory. Directories that are not there yet are no
/// error (a mount may come later): the scan is then empty.
pub fn scan(drop: &Path, marker: &str) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    let root = match drop.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let lossy = |s: &OsStr| s.to_string_lossy().into_owned();
    for product in std::fs::read_dir(&root)? {
        let product = product?;
        let pname = product.file_name();
        if pname.to_string_lossy().starts_with('.') {
            continue; // hidden: editors' and rsync's temporary names
        }
        let ppath = product.path();
        if !ppath.is_dir() {
            continue;
        }
        let pdir = match resolves_inside(&ppath, &root) {
            Ok(p) => p,
            Err(reason) => {
                out.refused.push(Refused {
                    path: ppath,
                    product: lossy(&pname),
                    build: String::new(),
                    reason: format!("product directory {reason}"),
                });
                continue;
            }
        };
        for build in std::fs::read_dir(&pdir)? {
            let build = build?;
            let bname = build.file_name();
            if bname.to_string_lossy().starts_with('.') {
                continue;
            }
            let bpath = ppath.join(&bname);
            if !bpath.is_dir() {
                continue;
            }
            let refuse = |reason: String| Refused {
                path: bpath.clone(),
                product: lossy(&pname),
                build: lossy(&bname),
                reason,
            };
            let image = match check_ids(&pname, &bname) {
                Ok(r) => r,
                Err(reason) => {
                    out.refused.push(refuse(reason));
                    continue;
                }
            };
            let dir = match resolves_inside(&bpath, &root) {
                Ok(d) => d,
                Err(reason) => {
                    out.refused
                        .push(refuse(format!("build directory {reason}")));
                    continue;
                }
            };
            // The marker must be a plain file in the build directory.
            match std::fs::symlink_metadata(dir.join(marker)) {
                Ok(meta) if meta.is_file() => out.found.push(Found {
                    image,
                    dir,
                    marker_time: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                Ok(_) => out
                    .refused
                    .push(refuse(format!("marker {marker} is not a plain file"))),
                Err(_) => out.incomplete += 1,
            }
        }
    }
    out.found.sort_by(|a, b| {
        a.marker_time
            .cmp(&b.marker_time)
            .then_with(|| a.image.cmp(&b.image))
    });
    Ok(out)
}

/// Watches `drop` recursively; every event sends a wake-up on the returned
/// channel (capacity 1: a burst of events is one wake-up). The watcher
/// stops when the returned handle is dropped.
pub fn watcher(drop: &Path) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = mpsc::channel(1);
    let mut w = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        // Full channel: a wake-up is pending already.
        let _ = tx.try_send(());
    })?;
    w.watch(drop, notify::RecursiveMode::Recursive)?;
    Ok((w, rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn mk(root: &Path, rel: &str, marker: bool) {
        let d = root.join(rel);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("payload"), b"x").unwrap();
        if marker {
            fs::write(d.join("BUILD_COMPLETE"), b"").unwrap();
        }
    }

    #[test]
    fn ids_are_checked() {
        let ok = |p: &str, b: &str| check_ids(OsStr::new(p), OsStr::new(b)).is_ok();
        assert!(ok("erp-db", "20151103.1"));
        assert!(ok("a", "B_1-x"));
        assert!(!ok("..", "1"));
        assert!(!ok("erp", ".."));
        assert!(!ok("erp", "a/b"));
        assert!(!ok("ERP", "1"), "names are lowercase");
        assert!(!ok("erp", "a b"));
        assert!(!ok("erp", "-1"));
        assert!(!ok("erp", &"1".repeat(101)));
        assert!(!ok(&"e".repeat(65), "1"));
        assert!(!ok("erp", "naïve"));
        use std::os::unix::ffi::OsStrExt;
        assert!(check_ids(OsStr::from_bytes(b"erp\xff"), OsStr::new("1")).is_err());
    }

    #[test]
    fn complete_builds_only_bad_ones_refused() {
        let t = tempfile::tempdir().unwrap();
        let drop = t.path().join("drop");
        mk(&drop, "db/1", true);
        mk(&drop, "db/2", false);
        mk(&drop, "db/bad id", true);
        mk(&drop, "Upper/1", true);
        mk(&drop, ".tmp/1", true);
        fs::write(drop.join("db").join("notes.txt"), b"a file").unwrap();
        // Symlinks: one outside the drop directory, one inside.
        let outside = t.path().join("outside");
        mk(&outside, "", true);
        std::os::unix::fs::symlink(&outside, drop.join("db").join("3")).unwrap();
        std::os::unix::fs::symlink(drop.join("db").join("1"), drop.join("db").join("4")).unwrap();
        std::os::unix::fs::symlink(&outside, drop.join("evil")).unwrap();
        // A marker that is a symlink is no marker.
        mk(&drop, "db/5", false);
        std::os::unix::fs::symlink(
            outside.join("BUILD_COMPLETE"),
            drop.join("db/5/BUILD_COMPLETE"),
        )
        .unwrap();

        let s = scan(&drop, "BUILD_COMPLETE").unwrap();
        let found: Vec<String> = s.found.iter().map(|f| f.image.to_string()).collect();
        let mut found_sorted = found.clone();
        found_sorted.sort();
        assert_eq!(found_sorted, ["db:1", "db:4"]);
        assert_eq!(s.incomplete, 1);
        let mut refused: Vec<(String, String)> = s
            .refused
            .iter()
            .map(|r| (format!("{}/{}", r.product, r.build), r.reason.clone()))
            .collect();
        refused.sort();
        let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["Upper/1", "db/3", "db/5", "db/bad id", "evil/"],
            "{refused:?}"
        );
        assert!(refused[1].1.contains("outside the drop directory"));
        assert!(refused[4].1.contains("outside the drop directory"));
        for f in &s.found {
            assert!(f.dir.starts_with(drop.canonicalize().unwrap()));
        }
    }

    #[test]
    fn missing_drop_directory_is_an_empty_scan() {
        let t = tempfile::tempdir().unwrap();
        let s = scan(&t.path().join("nope"), "BUILD_COMPLETE").unwrap();
        assert_eq!(s, Scan::default());
    }

    #[test]
    fn found_in_marker_order() {
        let t = tempfile::tempdir().unwrap();
        mk(t.path(), "a/2", true);
        mk(t.path(), "a/1", true);
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(t.path().join("a/2/BUILD_COMPLETE"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let s = scan(t.path(), "BUILD_COMPLETE").unwrap();
        let order: Vec<String> = s.found.iter().map(|f| f.image.build.clone()).collect();
        assert_eq!(order, ["2", "1"]);
    }
}
