//! `GET /v1/node/layers`: the exact layers this node's engine holds, the
//! detail behind the Bloom filter gossip carries (`docs/gossip.md`, key
//! `layers`). Asked on demand by an operator or a peer (signed call); no
//! placement decision waits on it.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::api::AppState;

/// The layers this node holds, as it last read them from its engine.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeLayers {
    /// This node's name.
    pub name: String,
    /// How many layers.
    pub count: usize,
    /// Chain-id prefixes (16 lowercase hex digits), sorted.
    pub layers: Vec<String>,
    /// The expected false-positive rate of the filter gossip carries for
    /// these layers (a peer may think this node holds a layer it lacks).
    pub filter_false_positive_rate: f64,
}

#[utoipa::path(
    get,
    path = "/v1/node/layers",
    responses(
        (status = 200, description = "the layers this node's engine holds (refreshed every 10 s)", body = NodeLayers),
        (status = 503, description = "busy (`resource: requests`) or timed out (`resource: timeout`)", body = crate::model::ErrorBody),
    )
)]
pub async fn node_layers(State(s): State<Arc<AppState>>) -> Json<NodeLayers> {
    let layers = s.cluster.layers();
    let filter = crate::cluster::keys::LayerFilter::build(&layers);
    Json(NodeLayers {
        name: s.envs.settings().name.clone(),
        count: layers.len(),
        filter_false_positive_rate: filter.false_positive_rate(),
        layers: layers.into_iter().collect(),
    })
}
