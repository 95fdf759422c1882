//! Whether the store can be used right now, and store calls that never
//! block the async runtime for long.
//!
//! A shared store is a mount: it can vanish (unmounted: an empty directory
//! or none), turn read-only, or hang (a dead NFS server: every read blocks).
//! The `store-watch` worker looks at the store every [`CHECK_EVERY`] on a
//! blocking thread, bounded by [`CHECK_TIMEOUT`], and keeps a [`StoreStatus`]
//! that `GET /v1/node` and `/healthz` show. Loads and publishes are refused
//! at once while the store is unavailable (publishes also while it is
//! read-only), and every store call from the API runs through
//! [`Store::call`], which answers within [`CALL_TIMEOUT`] whatever the store
//! does. When the store is back, the next check finds it and the node
//! serves again by itself.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{error, info, warn};

use super::marker::{self, Decision, Marker, Remembered, Seen};
use super::{Store, StoreError, TMP_GRACE};

/// How often the store is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A check that takes longer marks the store unavailable.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest an API call waits for a store read (a listing, a manifest).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    /// Loads and publishes work.
    #[default]
    Ok,
    /// Loads work; publishes are refused.
    ReadOnly,
    /// Neither: missing, unmounted, replaced, or not answering.
    Unavailable,
}

impl StoreState {
    /// As `GET /v1/node` and the gossip key `store` spell it.
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreState::Ok => "ok",
            StoreState::ReadOnly => "read_only",
            StoreState::Unavailable => "unavailable",
        }
    }
}

impl std::str::FromStr for StoreState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "ok" => Ok(StoreState::Ok),
            "read_only" => Ok(StoreState::ReadOnly),
            "unavailable" => Ok(StoreState::Unavailable),
            _ => Err(()),
        }
    }
}

/// The store as this node sees it (`GET /v1/node`, field `store`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoreStatus {
    pub state: StoreState,
    /// The store's id (its marker), once known.
    #[serde(default)]
    pub id: Option<String>,
    /// The configured store path.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Why it is not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when it is in this state.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// The shared, changing part of a [`Store`] handle.
#[derive(Debug)]
pub(super) struct Health {
    status: Mutex<StoreStatus>,
    /// The node's data dir, where it remembers its store's id; `None` for
    /// a store opened directly ([`Store::open`]), which is trusted as is.
    data_dir: Option<PathBuf>,
    /// A check is running (a hung one stays running).
    checking: AtomicBool,
}

impl Health {
    pub(super) fn new(
        path: PathBuf,
        state: StoreState,
        id: Option<String>,
        reason: Option<String>,
        data_dir: Option<PathBuf>,
    ) -> Health {
        Health {
            status: Mutex::new(StoreStatus {
                state,
                id,
                path,
                reason,
                since: OffsetDateTime::now_utc(),
            }),
            data_dir,
            checking: AtomicBool::new(false),
        }
    }
}

/// How the store is named in messages to clients: by its id, not its path.
fn name(st: &StoreStatus) -> String {
    match &st.id {
        Some(id) => format!("image store {id}"),
        None => "the image store".into(),
    }
}

impl Store {
    /// The store at `root` as the node with data dir `data_dir` uses it:
    /// nothing is read or created until the first [`Store::check`], which
    /// creates a store that never existed and refuses one that was known
    /// and is gone (`store/marker.rs`).
    pub fn for_node(root: PathBuf, data_dir: PathBuf) -> Store {
        let known = marker::read_remembered(&data_dir).filter(|r| r.root == root);
        Store {
            health: std::sync::Arc::new(Health::new(
                root.clone(),
                StoreState::Unavailable,
                known.map(|r| r.id),
                Some("not checked yet".into()),
                Some(data_dir),
            )),
            root,
        }
    }

    /// This node's view of the store.
    pub fn status(&self) -> StoreStatus {
        self.health.status.lock().clone()
    }

    /// `Ok` unless the store is unavailable (loads and reads need this).
    pub fn usable(&self) -> Result<(), StoreError> {
        let st = self.status();
        match st.state {
            StoreState::Unavailable => Err(StoreError::Unavailable {
                store: name(&st),
                reason: st.reason.unwrap_or_default(),
            }),
            _ => Ok(()),
        }
    }

    /// `Ok` when publishing may write to the store.
    pub fn writable(&self) -> Result<(), StoreError> {
        self.usable()?;
        let st = self.status();
        match st.state {
            StoreState::ReadOnly => Err(StoreError::ReadOnly { store: name(&st) }),
            _ => Ok(()),
        }
    }

    /// Runs blocking store I/O `f` off the async threads, answering within
    /// [`CALL_TIMEOUT`]: a store that does not answer in time is marked
    /// unavailable (the thread stays blocked until the store answers).
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.usable()?;
        let st = self.clone();
        match tokio::time::timeout(CALL_TIMEOUT, tokio::task::spawn_blocking(move || f(&st))).await
        {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => Err(StoreError::Sink(std::io::Error::other(e))),
            Err(_) => Err(self.not_answering(CALL_TIMEOUT)),
        }
    }

    /// Marks the store unavailable because a call waited `waited` in vain,
    /// and returns the error to answer with.
    pub fn not_answering(&self, waited: Duration) -> StoreError {
        let why = format!("the store did not answer within {}s", waited.as_secs());
        self.set(StoreState::Unavailable, Some(why.clone()));
        StoreError::Unavailable {
            store: name(&self.status()),
            reason: why,
        }
    }

    /// Looks at the store once (bounded by [`CHECK_TIMEOUT`]) and updates
    /// its status. While an earlier check still hangs, the store is marked
    /// unavailable and no second thread is spent on it.
    pub async fn check(&self) {
        if self.health.checking.swap(true, Ordering::SeqCst) {
            self.set(
                StoreState::Unavailable,
                Some("the store does not answer".into()),
            );
            return;
        }
        let st = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let (state, reason) = st.look_now();
            st.set(state, reason);
            st.health.checking.store(false, Ordering::SeqCst);
        });
        if tokio::time::timeout(CHECK_TIMEOUT, task).await.is_err() {
            self.not_answering(CHECK_TIMEOUT);
        }
    }

    /// The `store-watch` worker: checks the store every [`CHECK_EVERY`].
    pub async fn watch(self) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check().await;
        }
    }

    /// The store's state as seen now (blocking; may hang on a dead mount).
    fn look_now(&self) -> (StoreState, Option<String>) {
        if self.health.data_dir.is_none() {
            return (StoreState::Ok, None);
        }
        let known = self.status().id;
        let seen = match marker::look(&self.root) {
            Ok(s) => s,
            Err(e) => {
                return (
                    StoreState::Unavailable,
                    Some(format!("the store directory does not read: {}", e.kind())),
                )
            }
        };
        let created = match marker::decide(known.as_deref(), &seen) {
            Decision::Refuse(lost) => return (StoreState::Unavailable, Some(lost.to_string())),
            Decision::Use(m) => self.finish_open(&m, false),
            Decision::Create | Decision::Adopt => {
                let fresh = matches!(seen, Seen::Missing | Seen::Empty);
                match self.make_dirs().and_then(|()| {
                    marker::write_marker(&self.root, &Marker::new()).map_err(|e| e.to_string())
                }) {
                    Ok(m) => {
                        if fresh {
                            info!(store = %self.root.display(), id = %m.id, "new image store created");
                        } else {
                            info!(store = %self.root.display(), id = %m.id, "image store from before markers adopted");
                        }
                        self.finish_open(&m, true)
                    }
                    Err(e) => {
                        return (
                            StoreState::Unavailable,
                            Some(format!("the store cannot be created: {e}")),
                        )
                    }
                }
            }
        };
        if let Err(e) = created {
            return (StoreState::Unavailable, Some(e));
        }
        if nix::unistd::access(&self.root, nix::unistd::AccessFlags::W_OK).is_err() {
            return (
                StoreState::ReadOnly,
                Some("the store is read-only: publishing is refused".into()),
            );
        }
        (StoreState::Ok, None)
    }

    /// Remembers the store's id (in memory and in the data dir) and makes
    /// sure its directories are there (when it is writable).
    fn finish_open(&self, m: &Marker, new: bool) -> Result<(), String> {
        let first = {
            let mut st = self.health.status.lock();
            let first = st.id.as_deref() != Some(&m.id);
            st.id = Some(m.id.clone());
            first
        };
        if first {
            if let Some(dir) = &self.health.data_dir {
                let r = Remembered {
                    id: m.id.clone(),
                    root: self.root.clone(),
                };
                if let Err(e) = marker::write_remembered(dir, &r) {
                    // Still remembered in memory for this run.
                    error!(store = %self.root.display(), error = %e, "cannot remember the store's id in the data dir");
                }
            }
        }
        if !new && nix::unistd::access(&self.root, nix::unistd::AccessFlags::W_OK).is_ok() {
            self.make_dirs()?;
        }
        Ok(())
    }

    fn make_dirs(&self) -> Result<(), String> {
        for dir in [self.layers_dir(), self.manifests_dir(), self.tmp_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// Sets the state, logging a change (and cleaning `tmp/` when the store
    /// comes back writable).
    fn set(&self, state: StoreState, reason: Option<String>) {
        let before = {
            let mut st = self.health.status.lock();
            let before = st.state;
            if before != state || st.reason != reason {
                st.since = OffsetDateTime::now_utc();
            }
            st.state = state;
            st.reason = reason.clone();
            before
        };
        if before == state {
            return;
        }
        let why = reason.unwrap_or_default();
        match state {
            StoreState::Unavailable => {
                error!(store = %self.root.display(), reason = %why, "image store unavailable: loads and publishes are refused")
            }
            StoreState::ReadOnly => {
                warn!(store = %self.root.display(), "image store is read-only: loads only")
            }
            StoreState::Ok => info!(store = %self.root.display(), "image store available"),
        }
        if state == StoreState::Ok && before == StoreState::Unavailable {
            if let Err(e) = self.clean_tmp(TMP_GRACE) {
                warn!(store = %self.root.display(), error = %e, "cleaning the store's tmp/");
            }
        }
    }
}
