//! Moving images between the engine and the store, as streams end to end:
//! `publish` pipes `docker save` into the store's layer files, `load` pipes
//! the store's (thin) load archive into `docker load`. Neither writes a
//! temporary archive or decompresses a whole image to disk; the tar and lz4
//! work runs on a blocking thread, joined to the async engine calls by a
//! bounded channel.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use crate::docker::{DockerError, Engine};
use crate::store::{ImageRef, LoadStats, Manifest, PublishHint, PublishStats, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("transfer task failed: {0}")]
    Task(String),
}

/// Streams `docker save` of `source` into the store as `r`.
pub async fn publish(
    engine: &Engine,
    store: &Store,
    source: &str,
    r: &ImageRef,
    hint: PublishHint,
) -> Result<(Manifest, PublishStats), StoreError> {
    publish_derived(engine, store, source, r, hint, None).await
}

/// [`publish`] of an image built FROM the published build `base`, which the
/// manifest records (see `Store::publish_derived`).
pub async fn publish_derived(
    engine: &Engine,
    store: &Store,
    source: &str,
    r: &ImageRef,
    hint: PublishHint,
    base: Option<ImageRef>,
) -> Result<(Manifest, PublishStats), StoreError> {
    publish_counted(engine, store, source, r, hint, base, None).await
}

/// [`publish_derived`], adding the bytes of the save stream to `counter`
/// as they are read (`publishing.rs`: the progress of `shoal publish`).
pub async fn publish_counted(
    engine: &Engine,
    store: &Store,
    source: &str,
    r: &ImageRef,
    hint: PublishHint,
    base: Option<ImageRef>,
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) -> Result<(Manifest, PublishStats), StoreError> {
    let published = async {
        store.writable()?;
        // A pump reads the save stream ahead into a deep buffer, so the engine
        // keeps writing while the blocking side hashes and compresses: without
        // it the two take turns (the socket buffer is all that lies between).
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(SAVE_AHEAD_CHUNKS);
        let mut export = engine.export(source).map_err(std::io::Error::other).boxed();
        let pump = tokio::spawn(async move {
            while let Some(item) = export.next().await {
                if let (Some(c), Ok(chunk)) = (&counter, &item) {
                    c.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        let store = store.clone();
        let r = r.clone();
        let done =
            tokio::task::spawn_blocking(move || store.publish_derived(reader, &r, &hint, base))
                .await
                .map_err(|e| StoreError::Sink(std::io::Error::other(e)));
        pump.abort();
        done?
    }
    .await;
    if let Err(e) = &published {
        engine.metrics().store_error(e.kind());
    }
    published
}

/// Chunks of the save stream read ahead of the store writer (hyper hands
/// out chunks of up to a few tens of KiB: some tens of MiB at most).
const SAVE_AHEAD_CHUNKS: usize = 1024;

/// Loads `m` into the engine, omitting its first `skip` layers (the engine
/// holds their chain), tagged with the image ref's docker tag. `progress`
/// gets the uncompressed bytes sent so far. A bad layer aborts the upload
/// before the archive is complete and is reported as the store's error.
/// Counted in the engine's metrics: bytes, duration and outcome, and the
/// store's error when it broke the load.
pub async fn load(
    engine: &Engine,
    store: &Store,
    m: &Manifest,
    skip: usize,
    progress: Box<dyn FnMut(u64) + Send>,
) -> Result<LoadStats, TransferError> {
    let started = tokio::time::Instant::now();
    let r = load_unmetered(engine, store, m, skip, progress).await;
    let metrics = engine.metrics();
    match &r {
        Ok(stats) => metrics.image_load(true, stats.bytes_sent, started.elapsed()),
        Err(e) => {
            metrics.image_load(false, 0, started.elapsed());
            if let TransferError::Store(e) = e {
                metrics.store_error(e.kind());
            }
        }
    }
    r
}

async fn load_unmetered(
    engine: &Engine,
    store: &Store,
    m: &Manifest,
    skip: usize,
    mut progress: Box<dyn FnMut(u64) + Send>,
) -> Result<LoadStats, TransferError> {
    store.usable()?;
    let store_ref = store;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let store = store.clone();
    let manifest = m.clone();
    let tag = m.image_ref().docker_tag();
    let writer = tokio::task::spawn_blocking(move || {
        let mut sink = ChannelWriter::new(tx.clone());
        let res = store
            .write_load_archive(&manifest, skip, &tag, &mut sink, &mut *progress)
            .and_then(|stats| sink.finish().map(|_| stats).map_err(StoreError::Sink));
        if let Err(e) = &res {
            // Abort the upload so the engine never sees a whole archive.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
        res
    });
    // A store that stops answering mid-load (a hung mount) ends the upload
    // with an error instead of holding it, and the environment, for ever.
    let stream = stall_guard(tokio_stream::wrappers::ReceiverStream::new(rx), LOAD_STALL);
    let loaded = engine.load(stream).await;
    let written = match tokio::time::timeout(LOAD_STALL, writer).await {
        Ok(joined) => joined.map_err(|e| TransferError::Task(e.to_string()))?,
        // The writer is stuck in a store read: leave it to the store.
        Err(_) => return Err(store_ref.not_answering(LOAD_STALL).into()),
    };
    // The store's error says why a load broke off (a bad layer); the
    // engine's only that it did.
    let stats = written?;
    loaded?;
    Ok(stats)
}

/// The longest a load waits for the next chunk from the store.
pub const LOAD_STALL: Duration = Duration::from_secs(60);

/// `chunks` as they come, ended by an error when none comes for `stall`.
fn stall_guard(
    chunks: impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    stall: Duration,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold((chunks, false), move |(mut chunks, done)| async move {
        if done {
            return None;
        }
        match tokio::time::timeout(stall, chunks.next()).await {
            Ok(Some(item)) => Some((item, (chunks, false))),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the image store stopped answering",
                )),
                (chunks, true),
            )),
        }
    })
}

/// A `Write` that forwards the archive to the engine upload in 1 MiB
/// chunks through a bounded channel (backpressure: the writer blocks while
/// the engine is behind, so memory stays at a few MiB).
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 1 << 20;

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Result<Bytes, std::io::Error>>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn push(&self, chunk: Bytes) -> std::io::Result<()> {
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the engine stopped reading the load",
            )
        })
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.push(Bytes::from(chunk))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > CHUNK {
            self.finish()?;
        }
        if data.len() >= CHUNK {
            self.push(Bytes::copy_from_slice(data))?;
        } else {
            self.buf.extend_from_slice(data);
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

    #[tokio::test(start_paused = true)]
    async fn a_stalled_store_ends_the_load_stream_with_an_error() {
        let chunks =
            futures::stream::iter([Ok(Bytes::from_static(b"a"))]).chain(futures::stream::pending());
        let got: Vec<_> = stall_guard(Box::pin(chunks), Duration::from_secs(60))
            .collect()
            .await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap(), &Bytes::from_static(b"a"));
        assert_eq!(
            got[1].as_ref().unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
        // A stream that ends is passed on as it is.
        let done: Vec<_> = stall_guard(
            futures::stream::iter([Ok(Bytes::from_static(b"b"))]),
            Duration::from_secs(60),
        )
        .collect()
        .await;
        assert_eq!(done.len(), 1);
    }
}
