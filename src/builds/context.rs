//! The Docker build context of one build, as a tar stream: the recipe's own
//! files at the root (the `Dockerfile` among them) and the build's
//! directory under `build/`. Build directories can hold many GiB, so the tar
//! is written on a blocking thread into a bounded channel that the engine
//! upload reads: memory stays at a few MiB whatever the size.
//!
//! Symlinks are stored as symlinks, never followed, so a link inside a
//! build cannot pull a file from elsewhere on the build node into the image.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Where the build's own files are in the context.
pub const BUILD_DIR: &str = "build";

const CHUNK: usize = 1 << 20;

/// The context tar of `recipe_dir` + `build_dir`, as a stream of chunks.
/// A read error ends the stream with that error (the engine then fails the
/// build). The returned handle yields the number of bytes written.
pub fn stream(
    recipe_dir: PathBuf,
    build_dir: PathBuf,
) -> (
    tokio_stream::wrappers::ReceiverStream<Result<Bytes, std::io::Error>>,
    tokio::task::JoinHandle<std::io::Result<u64>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
            total: 0,
        };
        let res = write(&recipe_dir, &build_dir, &mut w).and_then(|()| w.flush_chunk());
        if let Err(e) = &res {
            let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        res.map(|()| w.total)
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// Writes the context tar into `out` (blocking).
pub fn write(recipe_dir: &Path, build_dir: &Path, out: &mut dyn Write) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let mut entries: Vec<_> = std::fs::read_dir(recipe_dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name == BUILD_DIR {
            tracing::warn!(recipe = %recipe_dir.display(), "recipe entry `build` is shadowed by the build's files");
            continue;
        }
        if e.file_type()?.is_dir() {
            b.append_dir_all(&name, e.path())?;
        } else {
            b.append_path_with_name(e.path(), &name)?;
        }
    }
    b.append_dir_all(BUILD_DIR, build_dir)?;
    b.into_inner()?.flush()
}

struct ChunkWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    total: u64,
}

impl ChunkWriter {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the engine stopped reading the build context",
            )
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.total += data.len() as u64;
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn recipe_at_root_build_under_build_symlinks_kept() {
        let t = tempfile::tempdir().unwrap();
        let recipe = t.path().join("recipe");
        let build = t.path().join("drop/app/1");
        std::fs::create_dir_all(recipe.join("conf")).unwrap();
        std::fs::create_dir_all(build.join("bin")).unwrap();
        std::fs::write(recipe.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(recipe.join("conf/a.ini"), "a=1").unwrap();
        std::fs::write(build.join("bin/app"), "binary").unwrap();
        std::fs::write(t.path().join("secret"), "do not take").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), build.join("link")).unwrap();

        let mut out = Vec::new();
        write(&recipe, &build, &mut out).unwrap();
        let mut a = tar::Archive::new(&out[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mut data = String::new();
            if kind.is_file() {
                e.read_to_string(&mut data).unwrap();
            }
            seen.push((path, kind.is_symlink(), data));
        }
        let find = |p: &str| seen.iter().find(|(x, _, _)| x.trim_end_matches('/') == p);
        assert_eq!(find("Dockerfile").unwrap().2, "FROM scratch\n");
        assert_eq!(find("conf/a.ini").unwrap().2, "a=1");
        assert_eq!(find("build/bin/app").unwrap().2, "binary");
        let link = find("build/link").unwrap();
        assert!(link.1, "symlink stored as a link");
        assert!(!seen.iter().any(|(_, _, d)| d.contains("do not take")));
    }

    #[tokio::test]
    async fn streams_in_chunks_and_counts_bytes() {
        use futures::StreamExt;
        let t = tempfile::tempdir().unwrap();
        let recipe = t.path().join("r");
        let build = t.path().join("b");
        std::fs::create_dir_all(&recipe).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(recipe.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(build.join("big"), vec![7u8; 3 << 20]).unwrap();
        let (s, task) = stream(recipe, build);
        let chunks: Vec<Bytes> = s.map(|c| c.unwrap()).collect().await;
        let total = task.await.unwrap().unwrap();
        assert!(chunks.len() >= 3);
        assert!(chunks.iter().all(|c| c.len() <= 2 * CHUNK));
        assert_eq!(chunks.iter().map(|c| c.len() as u64).sum::<u64>(), total);
    }

    #[tokio::test]
    async fn a_missing_build_dir_fails_the_stream() {
        use futures::StreamExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let (s, task) = stream(t.path().to_path_buf(), t.path().join("gone"));
        let items: Vec<_> = s.collect().await;
        assert!(items.last().unwrap().is_err());
        assert!(task.await.unwrap().is_err());
    }
}
