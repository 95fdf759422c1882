//! Moving images between the engine and the store, as streams end to end:
//! `publish` pipes `docker save` into the store's layer files, `load` pipes
//! the store's (thin) load archive into `docker load`. Neither writes a
//! temporary archive or decompresses a whole image to disk; the tar and lz4
//! work runs on a blocking thread, joined to the async engine calls by a
//! bounded channel.

use std::io::Write;

use bytes::Bytes;
use futures::TryStreamExt;
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
    let stream = engine.export(source).map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let store = store.clone();
    let r = r.clone();
    tokio::task::spawn_blocking(move || store.publish(reader, &r, &hint))
        .await
        .map_err(|e| StoreError::Sink(std::io::Error::other(e)))?
}

/// Loads `m` into the engine, omitting its first `skip` layers (the engine
/// holds their chain), tagged with the image ref's docker tag. `progress`
/// gets the uncompressed bytes sent so far. A bad layer aborts the upload
/// before the archive is complete and is reported as the store's error.
pub async fn load(
    engine: &Engine,
    store: &Store,
    m: &Manifest,
    skip: usize,
    mut progress: Box<dyn FnMut(u64) + Send>,
) -> Result<LoadStats, TransferError> {
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
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let loaded = engine.load(stream).await;
    let written = writer
        .await
        .map_err(|e| TransferError::Task(e.to_string()))?;
    // The store's error says why a load broke off (a bad layer); the
    // engine's only that it did.
    let stats = written?;
    loaded?;
    Ok(stats)
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
