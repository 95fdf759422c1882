//! The node's background workers by name (reconcile, gossip publisher,
//! reaper, mail, build watcher and queue, image GC), with a status the API
//! (`GET /v1/workers`) and the CLI (`shoal workers`) show: running since
//! when, or stopped, or failed with the panic that ended it. A worker that
//! dies must not go unnoticed while the node looks healthy.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::error;

/// The message a panic carried (`panic!("...")`), or "panicked".
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// Where a worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Running,
    /// Ended on its own or was stopped at shutdown.
    Stopped,
    /// Ended by a panic; `error` has its message.
    Failed,
}

/// One worker's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerStatus {
    pub name: String,
    pub state: WorkerState,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub error: Option<String>,
}

/// The registry. A std mutex: held only to read or update the map.
#[derive(Default)]
pub struct Workers {
    entries: Mutex<BTreeMap<String, (WorkerStatus, AbortHandle)>>,
}

impl Workers {
    pub fn new() -> Arc<Workers> {
        Arc::default()
    }

    /// Takes a spawned worker under `name`; a small watcher task records
    /// how it ends.
    pub fn adopt(self: &Arc<Self>, name: &str, handle: JoinHandle<()>) {
        self.watch(name, handle, Ok);
    }

    /// Like [`Workers::adopt`], for a worker that ends with an error of its
    /// own, shown as failed with it (the gossip server's watcher).
    pub fn adopt_fallible(self: &Arc<Self>, name: &str, handle: JoinHandle<Result<(), String>>) {
        self.watch(name, handle, |r| r);
    }

    fn watch<T: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        handle: JoinHandle<T>,
        outcome: fn(T) -> Result<(), String>,
    ) {
        let status = WorkerStatus {
            name: name.to_string(),
            state: WorkerState::Running,
            started_at: OffsetDateTime::now_utc(),
            ended_at: None,
            error: None,
        };
        self.entries
            .lock()
            .insert(name.to_string(), (status, handle.abort_handle()));
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let (state, err) = match handle.await.map(outcome) {
                Ok(Ok(())) => (WorkerState::Stopped, None),
                Err(e) if e.is_cancelled() => (WorkerState::Stopped, None),
                Ok(Err(msg)) => {
                    error!(worker = %name, error = %msg, "worker failed");
                    (WorkerState::Failed, Some(msg))
                }
                Err(e) => {
                    let msg = panic_message(&*e.into_panic());
                    error!(worker = %name, error = %msg, "worker failed");
                    (WorkerState::Failed, Some(msg))
                }
            };
            if let Some((s, _)) = me.entries.lock().get_mut(&name) {
                s.state = state;
                s.error = err;
                s.ended_at = Some(OffsetDateTime::now_utc());
            }
        });
    }

    /// Every worker, by name.
    pub fn list(&self) -> Vec<WorkerStatus> {
        self.entries
            .lock()
            .values()
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Stops every worker (shutdown).
    pub fn abort_all(&self) {
        for (_, abort) in self.entries.lock().values() {
            abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle(w: &Workers, name: &str, want: WorkerState) -> WorkerStatus {
        for _ in 0..200 {
            if let Some(s) = w
                .list()
                .into_iter()
                .find(|s| s.name == name && s.state == want)
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{name} never became {want:?}: {:?}", w.list());
    }

    #[tokio::test]
    async fn reports_running_stopped_and_failed() {
        let w = Workers::new();
        w.adopt("forever", tokio::spawn(std::future::pending()));
        w.adopt("done", tokio::spawn(async {}));
        w.adopt("boom", tokio::spawn(async { panic!("disk on fire") }));
        settle(&w, "done", WorkerState::Stopped).await;
        let failed = settle(&w, "boom", WorkerState::Failed).await;
        assert_eq!(failed.error.as_deref(), Some("disk on fire"));
        assert!(failed.ended_at.is_some());
        assert_eq!(
            w.list().iter().find(|s| s.name == "forever").unwrap().state,
            WorkerState::Running
        );
        w.abort_all();
        let stopped = settle(&w, "forever", WorkerState::Stopped).await;
        assert_eq!(stopped.error, None);
        let names: Vec<String> = w.list().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["boom", "done", "forever"]);
    }
}
