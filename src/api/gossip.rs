//! Operators' views of what a node is doing under the hood:
//! `GET /v1/gossip`, the raw gossip state as this node's chitchat holds it
//! (`cluster/inspect.rs`), and `GET /v1/images/{ref}/progress`, how far a
//! publish in flight got (`publishing.rs`). Both only read.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{parse_ref, ApiError, AppState};
use crate::cluster::inspect::GossipState;
use crate::model::ErrorBody;
use crate::publishing::PublishProgress;

/// `GET /v1/gossip`: every member this node's chitchat holds (each
/// generation), its liveness, heartbeat, last seen and phi, every key with
/// its value and version, the tombstones, and the bytes of state. An
/// operator's route, `--open-read` or not (`auth::need`).
#[utoipa::path(
    get,
    path = "/v1/gossip",
    responses(
        (status = 200, description = "the gossip state as this node's chitchat holds it", body = GossipState),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or the node left the cluster (`resource: gossip`)", body = ErrorBody),
    )
)]
pub(crate) async fn gossip(State(s): State<Arc<AppState>>) -> Result<Json<GossipState>, ApiError> {
    match s.cluster.gossip_state().await {
        Some(g) => Ok(Json(g)),
        None => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the node left the cluster: no gossip state",
            );
            e.body.resource = Some("gossip".into());
            Err(e)
        }
    }
}

/// `GET /v1/images/{ref}/progress`: the publish of `ref` running on this
/// node, or 404 when none does (not begun, or done).
#[utoipa::path(
    get,
    path = "/v1/images/{image}/progress",
    params(("image" = String, Path, description = "`name:build`")),
    responses(
        (status = 200, description = "how far the publish in flight got", body = PublishProgress),
        (status = 400, description = "not a `name:build` reference", body = ErrorBody),
        (status = 404, description = "no publish of it runs on this node", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`)", body = ErrorBody),
    )
)]
pub(crate) async fn publish_progress(
    State(s): State<Arc<AppState>>,
    Path(image): Path<String>,
) -> Result<Json<PublishProgress>, ApiError> {
    let r = parse_ref("image", &image)?;
    s.publishing
        .progress(&r.to_string())
        .map(Json)
        .ok_or_else(|| {
            ApiError::field(
                StatusCode::NOT_FOUND,
                "image",
                format!("no publish of {r} runs on this node"),
            )
        })
}
