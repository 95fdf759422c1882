//! Publishes in flight on this node and how far each got
//! (`GET /v1/images/{ref}/progress`): what `shoal publish` draws its
//! progress bar from while its `POST /v1/images` runs. The bytes are those
//! of the engine's `docker save` stream read so far; the total is the
//! engine's size of the image (its uncompressed layers), so the fraction
//! is an estimate that ends near 1.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;

/// One publish as `GET /v1/images/{ref}/progress` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PublishProgress {
    /// `name:build` being published.
    pub image: String,
    /// The engine image it is read from.
    pub source: String,
    /// Bytes of the engine's save stream read so far.
    pub bytes: u64,
    /// The engine's size of the image (estimate of the stream's length).
    pub total: u64,
    /// Milliseconds since the publish began.
    pub elapsed_ms: u64,
}

struct Entry {
    id: u64,
    source: String,
    total: u64,
    bytes: Arc<AtomicU64>,
    started: Instant,
}

/// The registry of this node's publishes in flight. A parking_lot mutex,
/// held only to insert, look up or remove an entry.
#[derive(Default)]
pub struct Publishing {
    inner: Mutex<BTreeMap<String, Entry>>,
    next: AtomicU64,
}

/// A publish in the registry; removed from it when dropped (done, failed
/// or cancelled alike).
pub struct Tracked {
    owner: Arc<Publishing>,
    image: String,
    id: u64,
    /// Add the bytes read here.
    pub bytes: Arc<AtomicU64>,
}

impl Publishing {
    /// Registers a publish of `image` from `source` (a later publish of the
    /// same image replaces the entry until it ends).
    pub fn begin(self: &Arc<Self>, image: &str, source: &str, total: u64) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let bytes = Arc::new(AtomicU64::new(0));
        self.inner.lock().insert(
            image.to_string(),
            Entry {
                id,
                source: source.to_string(),
                total,
                bytes: bytes.clone(),
                started: Instant::now(),
            },
        );
        Tracked {
            owner: self.clone(),
            image: image.to_string(),
            id,
            bytes,
        }
    }

    /// How far the publish of `image` got; `None` when none runs here.
    pub fn progress(&self, image: &str) -> Option<PublishProgress> {
        let inner = self.inner.lock();
        let e = inner.get(image)?;
        Some(PublishProgress {
            image: image.to_string(),
            source: e.source.clone(),
            bytes: e.bytes.load(Ordering::Relaxed),
            total: e.total,
            elapsed_ms: e.started.elapsed().as_millis().min(u64::MAX as u128) as u64,
        })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut inner = self.owner.inner.lock();
        if inner.get(&self.image).is_some_and(|e| e.id == self.id) {
            inner.remove(&self.image);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_is_listed_until_it_ends() {
        let p = Arc::new(Publishing::default());
        assert_eq!(p.progress("a:1"), None);
        let t = p.begin("a:1", "src:1", 1000);
        t.bytes.fetch_add(250, Ordering::Relaxed);
        let got = p.progress("a:1").unwrap();
        assert_eq!(
            (got.bytes, got.total, got.source.as_str()),
            (250, 1000, "src:1")
        );
        // A second publish of the same image takes over; the first ending
        // does not remove it.
        let t2 = p.begin("a:1", "src:2", 2000);
        drop(t);
        assert_eq!(p.progress("a:1").unwrap().source, "src:2");
        drop(t2);
        assert_eq!(p.progress("a:1"), None);
    }
}
