//! `POST /v1/node/drain`: an operator's maintenance drain of this node
//! (`drain.rs`). Body `{"drain": true}` drains, `{"drain": false}` undoes;
//! the answer is the node's drain state, as `GET /v1/node` shows it under
//! `drain`. Operators only (`auth::need`: every write under `/v1/node` is
//! theirs; testers get 403). The drain is persisted before it takes effect,
//! so a request that fails changes nothing; it is gossiped at once.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tracing::{info, warn};

use super::{body_bytes, parse_body, ApiError, AppState, Caller};
use crate::drain::{DrainRequest, Maintenance, NodeDrain};
use crate::model::ErrorBody;

/// Serializes drain changes on this node (one daemon per process).
static CHANGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[utoipa::path(
    post,
    path = "/v1/node/drain",
    request_body = DrainRequest,
    responses(
        (status = 200, description = "the node's drain state after the call (`draining`, `maintenance` with `since` and `by`, `stopping`); draining twice keeps the first `since`", body = NodeDrain),
        (status = 400, description = "malformed body (`field: drain`)", body = ErrorBody),
        (status = 401, description = "no valid token", body = ErrorBody),
        (status = 403, description = "not an operator", body = ErrorBody),
        (status = 500, description = "the drain could not be persisted in the data dir (nothing changed)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`) or timed out (`resource: timeout`)", body = ErrorBody),
    )
)]
pub async fn drain_node(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    req: axum::extract::Request,
) -> Result<Json<NodeDrain>, ApiError> {
    let body = body_bytes(req).await?;
    let req: DrainRequest = parse_body(&body)?;
    // One change at a time: the decision, the file and the node's state
    // must not interleave with another call's (a drain and an undo at once
    // could leave the file drained and the node not).
    let _one = CHANGE.lock().await;
    let envs = s.envs.clone();
    let node = envs.settings().name.clone();
    let current = envs.drain_state().maintenance;
    let next = match (req.drain, current) {
        // Already drained: keep when and by whom.
        (true, Some(m)) => Some(m),
        (true, None) => Some(Maintenance {
            since: time::OffsetDateTime::now_utc(),
            by: caller.user().to_string(),
        }),
        (false, _) => None,
    };
    let dir = envs.settings().data_dir.clone();
    let to_save = next.clone();
    tokio::task::spawn_blocking(move || crate::drain::save(&dir, to_save.as_ref()))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
        .map_err(|e| {
            warn!(node = %node, error = %e, "drain not changed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the drain could not be saved in the node's data directory",
            )
        })?;
    let drained = next.is_some();
    envs.set_maintenance(next);
    s.cluster.publish().await;
    let state = envs.drain_state();
    if drained {
        info!(node = %node, by = %caller.user(), env_count = envs.committed().envs, "drained for maintenance: taking no new environments; running ones stay");
    } else {
        info!(node = %node, by = %caller.user(), stopping = state.stopping, "maintenance drain undone: taking new environments");
    }
    Ok(Json(state))
}
