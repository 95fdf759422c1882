//! `GET /v1/environments/{id}/events`: server-sent events, one per change
//! of the environment, each the JSON record (load progress included). The
//! stream starts with the current record and ends after the environment is
//! deleted (a last record with status `deleted`). `curl -N` shows it.
//!
//! Any node answers: the owner streams from its own records; another node
//! relays the owner's stream byte for byte (a signed node-to-node call with
//! the local header; only the request is signed, the stream is the answer);
//! for an owner the cluster calls dead it sends the `lost` record once and
//! ends.
//!
//! Every stream ends when the node begins to shut down (`AppState::shutdown`):
//! an open stream must never keep a stopping node alive.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::api::{ApiError, AppState, Local};
use crate::cluster::NodeView;
use crate::envs::Envs;
use crate::model::{EnvRecord, EnvStatus, ErrorBody};

/// How long the owner may take to start answering a relayed stream.
const RELAY_CONNECT: Duration = Duration::from_secs(5);

fn event(rec: &EnvRecord) -> Event {
    Event::default()
        .event(rec.status.as_str())
        .data(serde_json::to_string(rec).expect("records serialize"))
}

#[utoipa::path(
    get,
    path = "/v1/environments/{id}/events",
    params(("id" = String, Path, description = "environment id")),
    responses(
        (status = 200, description = "server-sent events: the record on every change, then a last `deleted` one", body = String, content_type = "text/event-stream"),
        (status = 400, description = "the id is not valid text", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 502, description = "the engine or the owning node did not answer as expected (generic message)", body = ErrorBody),
        (status = 504, description = "the owning node did not start the stream in time", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
pub async fn events(
    State(s): State<Arc<AppState>>,
    Local(local_call): Local,
    caller: crate::api::Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    use crate::api::{check_owner, check_remote, Act};
    if let Some(rec) = s.envs.get(&id) {
        check_owner(&caller, &rec.owner, Act::Use)?;
        return Ok(local(s.envs.clone(), id, s.shutdown.clone()));
    }
    if !local_call {
        if let Err(answer) = check_remote(&s, &caller, &id, Act::Use).await? {
            return Ok(answer);
        }
        if let Some((node, summary)) = s.cluster.owner_of(&id) {
            if !node.alive || node.left {
                let rec = crate::routing::lost_record(&node.name, &summary);
                let once = futures::stream::iter([Ok::<_, Infallible>(event(&rec))]);
                return Ok(Sse::new(once).into_response());
            }
            if node.http_addr().is_some() {
                return relay(&s, &node, &id).await;
            }
        } else if let Some(node) = ask_peers(&s, &id).await {
            // Just created: gossip does not show it yet.
            return relay(&s, &node, &id).await;
        }
    }
    Err(ApiError::field(
        StatusCode::NOT_FOUND,
        "id",
        format!("environment {id} not found"),
    ))
}

/// The alive peer that has environment `id`, asked directly (for an
/// environment too new for gossip to show).
async fn ask_peers(s: &AppState, id: &str) -> Option<NodeView> {
    let view = s.cluster.view();
    let path = format!("/v1/environments/{id}");
    let peers: Vec<(NodeView, crate::client::Client)> = view
        .nodes
        .into_iter()
        .filter(|n| !n.is_self && n.alive && !n.left)
        .filter_map(|n| {
            let c = s.cluster.peer_client(&n, RELAY_CONNECT)?;
            Some((n, c))
        })
        .collect();
    let asks = peers.into_iter().map(|(n, c)| {
        let path = path.clone();
        async move {
            match c.send_raw(hyper::Method::GET, &path, None).await {
                Ok((StatusCode::OK, _)) => Some(n),
                _ => None,
            }
        }
    });
    crate::routing::fan_out(asks.collect())
        .await
        .into_iter()
        .flatten()
        .flatten()
        .next()
}

/// The stream of a local environment: the record on every change, then a
/// last `deleted` record. It ends early when the node shuts down.
fn local(envs: Arc<Envs>, id: String, shutdown: CancellationToken) -> Response {
    // Subscribed before the first read, so no change falls in between.
    let rx = envs.subscribe();
    let stream = futures::stream::unfold(
        (envs, rx, id, None::<EnvRecord>, false),
        |(envs, mut rx, id, last, done)| async move {
            if done {
                return None;
            }
            loop {
                match envs.get(&id) {
                    None => {
                        let mut rec = last?;
                        if rec.status == EnvStatus::Deleted {
                            // Said already, while the delete ran.
                            return None;
                        }
                        rec.status = EnvStatus::Deleted;
                        return Some((event(&rec), (envs, rx, id, None, true)));
                    }
                    Some(rec) if last.as_ref() != Some(&rec) => {
                        return Some((event(&rec), (envs, rx, id, Some(rec), false)));
                    }
                    Some(_) => {}
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    let stream = stream.take_until(shutdown.cancelled_owned());
    Sse::new(stream.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Relays the owner's stream as it comes, until this node shuts down.
async fn relay(s: &AppState, node: &NodeView, id: &str) -> Result<Response, ApiError> {
    let Some(addr) = node.http_addr() else {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {} has no usable http address", node.name),
        ));
    };
    let shutdown = s.shutdown.clone();
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let path = format!("/v1/environments/{id}/events");
    let mut req = hyper::Request::get(format!("http://{addr}{path}"));
    for (k, v) in s.cluster.peer_headers("GET", &path, &node.name) {
        req = req.header(k, v);
    }
    let req = req
        .body(Empty::new())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let resp = tokio::time::timeout(RELAY_CONNECT, client.request(req))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("node at {addr} did not answer"),
            )
        })?
        .map_err(|e| {
            warn!(env = %id, error = %e, "relaying events");
            ApiError::new(StatusCode::BAD_GATEWAY, format!("node at {addr}: {e}"))
        })?;
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED {
        warn!(env = %id, node = %node.name, "the owner refused this node's signed call");
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {} refused this node's signed call", node.name),
        ));
    }
    let ty = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| header::HeaderValue::from_static("text/event-stream"));
    Ok((
        status,
        [
            (header::CONTENT_TYPE, ty),
            (
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            ),
        ],
        Body::from_stream(
            resp.into_body()
                .into_data_stream()
                .take_until(shutdown.cancelled_owned()),
        ),
    )
        .into_response())
}
