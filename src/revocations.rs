//! The `revocations` worker: how a revoked token reaches every node and
//! stays revoked across restarts.
//!
//! A node holds its revoked token ids in [`Authority`] (what `verify`
//! checks). Every second, and at once when this node revokes one (`POST
//! /v1/tokens/revoke`), the worker
//! 1. merges `<data_dir>/revoked.json` when it changed (what `shoal token
//!    revoke --data-dir` writes, and what this node wrote before a restart),
//! 2. merges every revocation other nodes gossip (`revoked:<id>` keys),
//! 3. when its list changed, writes the union back to the file (locked,
//!    atomic: [`Revocations::save_merged`]) and gossips it.
//!
//! A revocation made on any node thus reaches every live node within a few
//! gossip rounds, and a node that was down hears it from the file it wrote
//! or from any peer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::auth::{now_secs, Authority, Revocations};
use crate::routing::Cluster;

/// How often the worker looks at the file and the gossiped lists.
pub const TICK: Duration = Duration::from_secs(1);

/// Reads the file at start: a restarted node refuses revoked tokens from
/// its first request.
pub fn load_at_start(auth: &Authority, path: &std::path::Path) {
    match Revocations::load(path) {
        Ok(r) => {
            if !r.is_empty() {
                info!(revoked = r.len(), "revoked tokens loaded");
            }
            auth.merge_revocations(&r);
        }
        Err(e) => warn!(error = %e, "revoked tokens not loaded"),
    }
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The worker (see the module doc). Ends with the daemon.
pub async fn run(auth: Arc<Authority>, cluster: Arc<Cluster>, path: PathBuf) {
    let mut seen_file: Option<SystemTime> = None;
    let mut written = Revocations::default();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = auth.revoked_here.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        first = false;
        let m = mtime(&path);
        if m != seen_file {
            seen_file = m;
            let p = path.clone();
            match tokio::task::spawn_blocking(move || Revocations::load(&p)).await {
                Ok(Ok(r)) => {
                    if auth.merge_revocations(&r) {
                        info!(file = %path.display(), "revocations read from the file");
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "revocation file not read"),
                Err(_) => {}
            }
        }
        if auth.merge_revocations(&cluster.gossiped_revocations()) {
            info!("revocations heard from other nodes");
        }
        let now_list = auth.revocations();
        if now_list == written {
            continue;
        }
        let (p, list) = (path.clone(), now_list.clone());
        let now = now_secs();
        match tokio::task::spawn_blocking(move || list.save_merged(&p, now)).await {
            Ok(Ok(all)) => {
                auth.merge_revocations(&all);
                seen_file = mtime(&path);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "revocations not written (they stay in memory and gossip)")
            }
            Err(_) => {}
        }
        written = now_list;
        cluster.set_revoked(&written);
        cluster.publish().await;
    }
}
