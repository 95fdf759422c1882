//! The cluster-wide view of builds: every live build node's list and logs,
//! asked over signed node-to-node calls within the fan-out deadline; a node
//! that does not answer is left out.

use std::time::Duration;

use tracing::warn;

use super::records::sort_records;
use super::{BuildRecord, Builds};
use crate::client::Client;
use crate::cluster::Role;
use crate::routing::Cluster;

/// How long a call to another node may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

impl Builds {
    /// Every build the build nodes know: this node's, and each live build
    /// node's own list. A node that does not answer is left out (logged).
    pub async fn cluster_list(&self, cluster: &Cluster) -> Vec<BuildRecord> {
        let mut out = self.list();
        let calls = build_peers(cluster)
            .into_iter()
            .map(|(name, client)| async move {
                match client.get::<Vec<BuildRecord>>("/v1/builds").await {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(node = %name, error = %e, "build node did not list its builds");
                        Vec::new()
                    }
                }
            });
        for l in crate::routing::fan_out(calls.collect())
            .await
            .into_iter()
            .flatten()
        {
            out.extend(l);
        }
        sort_records(&mut out);
        out
    }

    /// The log of a build, from whichever build node has it.
    pub async fn cluster_log(
        &self,
        cluster: &Cluster,
        product: &str,
        build: &str,
    ) -> Option<String> {
        if let Some(l) = self.log(product, build) {
            return Some(l);
        }
        let path = format!("/v1/builds/{product}/{build}/log");
        let ask = async {
            for (name, client) in build_peers(cluster) {
                match client.send_raw(hyper::Method::GET, &path, None).await {
                    Ok((status, body)) if status.is_success() => {
                        return Some(String::from_utf8_lossy(&body).into_owned())
                    }
                    Ok(_) => {}
                    Err(e) => warn!(node = %name, error = %e, "build node did not answer"),
                }
            }
            None
        };
        // One by one (the first that has it answers), within the fan-out
        // deadline however many build nodes there are.
        tokio::time::timeout(crate::routing::FANOUT_DEADLINE, ask)
            .await
            .ok()
            .flatten()
    }
}

/// Live build nodes other than this one, with a client for each.
fn build_peers(cluster: &Cluster) -> Vec<(String, Client)> {
    cluster
        .view()
        .nodes
        .into_iter()
        .filter(|n| !n.is_self && n.alive && !n.left)
        .filter_map(|n| {
            let f = n.facts.as_ref()?;
            if !f.roles.contains(&Role::Build) {
                return None;
            }
            let c = cluster.peer_client(&n, PEER_TIMEOUT)?;
            Some((n.name.clone(), c))
        })
        .collect()
}
