//! The HTTP API (axum). The only module that knows HTTP: it turns requests
//! into calls on [`Envs`] and the [`Store`], and every error into one JSON
//! shape, `{"error": "...", "field": "..."}`, with the right status. A
//! rejected request changes nothing.
//!
//! Routes (all JSON):
//! - `GET  /v1/node`                  this node's facts and limits
//! - `GET  /v1/images`                published builds, newest first
//! - `GET  /v1/images/{ref}`          one published build
//! - `POST /v1/images`                publish an image of this node's engine
//! - `POST /v1/environments`          request an environment (202)
//! - `GET  /v1/environments`          environments of this node
//! - `GET  /v1/environments/{id}`     one environment
//! - `DELETE /v1/environments/{id}`   stop and remove it
//! - `GET  /v1/cluster`               every node this node knows, alive or dead
//! - `GET  /v1/workers`               this node's background workers and their state
//! - `POST /v1/placement`             where a request would go, and why
//! - `GET  /v1/builds`                every build the build nodes know
//! - `GET  /v1/builds/{product}/{build}/log`  a build's log (text)
//! - `POST /v1/environments/{id}/extend` push its expiry back (`{"by": "4h"}`)
//! - `GET  /v1/environments/{id}/events` server-sent events (`web/sse.rs`)
//! - `GET  /v1/openapi.json`          this API's OpenAPI 3 document (`openapi.rs`)
//! - `GET  /healthz`                  `ok`
//! - the web page at `/` (`web/`)
//!
//! Every request passes [`guard`] (`api/guard.rs`): it gets a request id (`x-request-id`,
//! kept when the caller sent one, answered in the header and in every JSON
//! error body), a place among at most [`MAX_IN_FLIGHT`] requests in flight
//! (else 503 `resource: "requests"`), and a deadline ([`REQUEST_TIMEOUT`];
//! publishing has [`PUBLISH_TIMEOUT`], event streams none once they
//! started). A 500 or 502 answers a generic message: what went wrong
//! (paths, engine messages) goes to the log with the request id. A panic in
//! a handler answers 500 and leaves the node serving.
//!
//! Environment calls reach the whole cluster: a request is placed on the
//! best node, a read or delete goes to the owner (`routing.rs`). A call with
//! the `x-shoal-local` header is served by this node alone.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::docker::EngineInfo;
use crate::envs::{EnvError, Envs};
use crate::model::{
    EnvRecord, EnvRequest, ErrorBody, ExtendRequest, FieldError, ImageInfo, NodeInfo,
    PublishRequest,
};
use crate::routing::{Cluster, Forwarded, RouteError, DEADLINE_HEADER, LOCAL_HEADER};
use crate::store::{ImageRef, PublishHint, StoreError};

pub mod guard;

pub use guard::{public_error, MAX_IN_FLIGHT, PUBLISH_TIMEOUT, REQUEST_ID_HEADER, REQUEST_TIMEOUT};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// Shared by every handler.
pub struct AppState {
    pub envs: Arc<Envs>,
    pub engine: EngineInfo,
    pub cluster: Arc<Cluster>,
    pub builds: Arc<crate::builds::Builds>,
    pub mail: Arc<crate::mail::Mailer>,
    pub workers: Arc<crate::workers::Workers>,
}

/// An error answer: status plus the JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Boxed: keeps `Result<_, ApiError>` small.
    pub body: Box<ErrorBody>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: Box::new(ErrorBody {
                error: error.into(),
                field: None,
                resource: None,
                reasons: Vec::new(),
                request_id: None,
            }),
        }
    }

    pub fn field(status: StatusCode, field: &str, error: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(status, error);
        e.body.field = Some(field.to_string());
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(*self.body)).into_response()
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::field(StatusCode::BAD_REQUEST, &e.field, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound(_) => {
                ApiError::field(StatusCode::NOT_FOUND, "image", e.to_string())
            }
            StoreError::AlreadyPublished(_) => {
                ApiError::field(StatusCode::CONFLICT, "ref", e.to_string())
            }
            StoreError::BadArchive(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            _ => {
                warn!(error = %e, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl From<EnvError> for ApiError {
    fn from(e: EnvError) -> Self {
        match e {
            EnvError::Refused { ref shortage, .. } => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                a.body.resource = Some(shortage.resource().to_string());
                a
            }
            EnvError::NotFound(_) => ApiError::field(StatusCode::NOT_FOUND, "id", e.to_string()),
            EnvError::Draining(_) => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                a.body.resource = Some("draining".into());
                a
            }
            EnvError::Store(s) => s.into(),
            EnvError::Reservation(ref r) => {
                use crate::reaper::ReservationError as R;
                match r {
                    R::TooLong { .. } => {
                        ApiError::field(StatusCode::BAD_REQUEST, "ttl", e.to_string())
                    }
                    R::PastMax { .. } => ApiError::field(StatusCode::CONFLICT, "by", e.to_string()),
                    R::Zero => ApiError::field(StatusCode::BAD_REQUEST, "by", e.to_string()),
                }
            }
            EnvError::Docker(_) => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
            _ => {
                warn!(error = %e, "environment error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// Parses a JSON body, naming the offending field on error. Any content
/// type is accepted (curl's `-d` sends a form type by default).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = format!("malformed request body: {inner}");
        if path.is_empty() || path == "." {
            // serde names an unknown or missing field only in its message.
            let field = field_in_message(&inner.to_string());
            match field {
                Some(f) => ApiError::field(StatusCode::BAD_REQUEST, &f, msg),
                None => ApiError::new(StatusCode::BAD_REQUEST, msg),
            }
        } else {
            ApiError::field(StatusCode::BAD_REQUEST, &path, msg)
        }
    })
}

fn field_in_message(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_string())
}

pub fn router(state: Arc<AppState>) -> Router {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/node", get(node))
        .route("/v1/images", get(list_images).post(publish))
        .route("/v1/images/{image}", get(get_image))
        .route("/v1/environments", get(list_envs).post(create_env))
        .route("/v1/environments/{id}", get(get_env).delete(delete_env))
        .route("/v1/cluster", get(cluster))
        .route("/v1/workers", get(workers))
        .route("/v1/placement", axum::routing::post(placement))
        // Build watcher (builds/).
        .route("/v1/builds", get(list_builds))
        .route("/v1/builds/{product}/{build}/log", get(build_log))
        .route(
            "/v1/environments/{id}/extend",
            axum::routing::post(extend_env),
        )
        .merge(crate::web::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    guard::guarded(r, MAX_IN_FLIGHT)
}

/// The body as bytes, with the size limit answered in JSON.
async fn body_bytes(req: axum::extract::Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is over {MAX_BODY} bytes"),
            )
        })
}

#[utoipa::path(
    get,
    path = "/v1/node",
    responses(
        (status = 200, description = "this node's facts and limits", body = NodeInfo),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn node(State(s): State<Arc<AppState>>) -> Result<Json<NodeInfo>, ApiError> {
    let envs = &s.envs;
    let cap = envs.capacity()?;
    let c = envs.committed();
    Ok(Json(NodeInfo {
        name: envs.settings().name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        memory_total: crate::host::total_memory(),
        memory_allocatable: cap.memory_allocatable,
        memory_committed: c.memory,
        aio_max: cap.aio_max,
        aio_in_use: cap.aio_in_use,
        aio_committed: c.aio,
        max_envs: cap.max_envs,
        env_count: c.envs,
        engine_version: s.engine.server_version.clone(),
        storage_driver: s.engine.storage_driver.clone(),
        containerd_store: s.engine.containerd_store,
        storage_notes: crate::host::storage_notes(
            &s.engine.storage_driver,
            s.engine.containerd_store,
        ),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/images",
    responses(
        (status = 200, description = "published builds, newest first", body = Vec<ImageInfo>),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn list_images(State(s): State<Arc<AppState>>) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let store = s.envs.store().clone();
    let list = blocking(move || store.list()).await??;
    Ok(Json(list.iter().map(ImageInfo::from).collect()))
}

/// Runs blocking store I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn parse_ref(field: &str, s: &str) -> Result<ImageRef, ApiError> {
    s.parse().map_err(|e: crate::store::manifest::BadRef| {
        ApiError::field(StatusCode::BAD_REQUEST, field, e.to_string())
    })
}

#[utoipa::path(
    get,
    path = "/v1/images/{image}",
    params(("image" = String, Path, description = "`name:build`")),
    responses(
        (status = 200, description = "one published build", body = ImageInfo),
        (status = 400, description = "not a `name:build` reference", body = ErrorBody),
        (status = 404, description = "not published", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn get_image(
    State(s): State<Arc<AppState>>,
    Path(image): Path<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    let r = parse_ref("image", &image)?;
    let store = s.envs.store().clone();
    let m = blocking(move || store.get(&r)).await??;
    Ok(Json(ImageInfo::from(&m)))
}

#[utoipa::path(
    post,
    path = "/v1/images",
    request_body = PublishRequest,
    responses(
        (status = 200, description = "published again (it already was)", body = ImageInfo),
        (status = 201, description = "published", body = ImageInfo),
        (status = 400, description = "malformed request; `field` names what is wrong", body = ErrorBody),
        (status = 404, description = "`source` is not in this node's engine", body = ErrorBody),
        (status = 409, description = "`ref` is published with other content", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 422, description = "the engine's archive is unreadable", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 502, description = "the engine or the owning node did not answer as expected (generic message)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn publish(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(req).await?;
    let req: PublishRequest = parse_body(&body)?;
    let r = parse_ref("ref", &req.image_ref)?;
    let engine = s.envs.engine().clone();
    let img = engine
        .image(&req.source)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?
        .ok_or_else(|| {
            ApiError::field(
                StatusCode::NOT_FOUND,
                "source",
                format!("image {} is not in this node's engine", req.source),
            )
        })?;
    info!(source = %req.source, image = %r, layers = img.diff_ids.len(), "publishing");
    let hint = PublishHint {
        diff_ids: img.diff_ids.clone(),
    };
    let store = s.envs.store().clone();
    let existed = {
        let (st, r2) = (store.clone(), r.clone());
        tokio::task::spawn_blocking(move || st.get(&r2).is_ok())
            .await
            .unwrap_or(false)
    };
    let (manifest, stats) = crate::transfer::publish(&engine, &store, &img.id, &r, hint).await?;
    info!(image = %r, layers_added = stats.layers_added, bytes_added = stats.bytes_added, "published");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(ImageInfo::from(&manifest))).into_response())
}

fn is_local(headers: &HeaderMap) -> bool {
    headers.contains_key(LOCAL_HEADER)
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let mut a = ApiError::new(e.status, e.error);
        // When every node was short of the same thing, name it.
        let first = e.reasons.first().and_then(|r| r.resource.clone());
        if first.is_some() && e.reasons.iter().all(|r| r.resource == first) {
            a.body.resource = first;
        }
        a.body.reasons = e.reasons;
        a
    }
}

/// A node's answer, passed on as it came.
fn passthrough(f: Forwarded) -> Response {
    let mut resp = (
        f.status,
        [(header::CONTENT_TYPE, "application/json")],
        f.body.clone(),
    )
        .into_response();
    if f.status == StatusCode::ACCEPTED {
        if let Ok(rec) = serde_json::from_slice::<crate::model::EnvRecord>(&f.body) {
            if let Ok(v) = format!("/v1/environments/{}", rec.id).parse() {
                resp.headers_mut().insert(header::LOCATION, v);
            }
        }
    }
    resp
}

/// Reads an environment request: the raw body (to forward as is), the
/// request, the image's manifest, and the request checked against it.
async fn env_request(
    s: &AppState,
    req: axum::extract::Request,
) -> Result<
    (
        Bytes,
        EnvRequest,
        crate::store::Manifest,
        crate::model::EnvSpec,
    ),
    ApiError,
> {
    let body = body_bytes(req).await?;
    let req: EnvRequest = parse_body(&body)?;
    let r = req.image_ref()?;
    let store = s.envs.store().clone();
    let manifest = blocking(move || store.get(&r)).await??;
    let spec = req.check(&manifest.requirements, s.envs.settings().default_memory)?;
    crate::reaper::initial_expiry(
        time::OffsetDateTime::now_utc(),
        spec.ttl,
        s.envs.settings().default_ttl,
        s.envs.settings().max_ttl,
    )
    .map_err(|e| ApiError::from(EnvError::from(e)))?;
    Ok((body, req, manifest, spec))
}

#[utoipa::path(
    post,
    path = "/v1/environments",
    request_body = EnvRequest,
    responses(
        (status = 202, description = "accepted; `Location` names the new environment", body = EnvRecord),
        (status = 400, description = "malformed request; `field` names what is wrong", body = ErrorBody),
        (status = 404, description = "the image is not published", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 502, description = "the engine or the owning node did not answer as expected (generic message)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn create_env(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (body, req, manifest, spec) = env_request(&s, req).await?;
    if !is_local(&headers) {
        return Ok(passthrough(
            s.cluster.create(&body, &req, spec, manifest).await?,
        ));
    }
    // A forwarded create read after its sender gave up: refuse, so no
    // environment starts that the requester never heard of.
    let deadline = headers
        .get(DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if deadline.is_some_and(|d| crate::routing::unix_ms() > d) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request arrived after its sender stopped waiting",
        ));
    }
    if let Some(want) = &req.constraints {
        for (k, v) in want {
            if s.envs.settings().labels.get(k) != Some(v) {
                return Err(ApiError::field(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "constraints",
                    format!("node lacks label {k}={v}"),
                ));
            }
        }
    }
    let rec = s.envs.create(spec, manifest)?;
    let location = format!("/v1/environments/{}", rec.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(rec),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/environments",
    responses(
        (status = 200, description = "every environment of the cluster (with `x-shoal-local`: of this node)", body = Vec<EnvRecord>),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn list_envs(State(s): State<Arc<AppState>>, headers: HeaderMap) -> impl IntoResponse {
    if is_local(&headers) {
        Json(s.envs.list())
    } else {
        Json(s.cluster.all_envs().await)
    }
}

#[utoipa::path(
    get,
    path = "/v1/environments/{id}",
    params(("id" = String, Path, description = "environment id")),
    responses(
        (status = 200, description = "the environment (`lost` when its node is unreachable)", body = EnvRecord),
        (status = 400, description = "the id is not valid text", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 502, description = "the engine or the owning node did not answer as expected (generic message)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn get_env(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(rec) = s.envs.get(&id) {
        return Ok(Json(rec).into_response());
    }
    if !is_local(&headers) {
        if let Some(f) = s.cluster.forward_env(hyper::Method::GET, &id).await {
            return Ok(passthrough(f?));
        }
    }
    Err(ApiError::field(
        StatusCode::NOT_FOUND,
        "id",
        format!("environment {id} not found"),
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/environments/{id}",
    params(("id" = String, Path, description = "environment id")),
    responses(
        (status = 200, description = "removed: the last record, status `deleted`", body = EnvRecord),
        (status = 400, description = "the id is not valid text", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 502, description = "the engine or the owning node did not answer as expected (generic message)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn delete_env(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if s.envs.get(&id).is_none() && !is_local(&headers) {
        if let Some(f) = s.cluster.forward_env(hyper::Method::DELETE, &id).await {
            return Ok(passthrough(f?));
        }
    }
    let rec = s.envs.delete(&id).await?;
    Ok(Json(rec).into_response())
}

/// `POST /v1/environments/{id}/extend`, on the owner.
#[utoipa::path(
    post,
    path = "/v1/environments/{id}/extend",
    params(("id" = String, Path, description = "environment id")), request_body = ExtendRequest,
    responses(
        (status = 200, description = "the new expiry", body = EnvRecord),
        (status = 400, description = "malformed request; `field` names what is wrong", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 409, description = "past `max_ttl` from now", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 502, description = "the engine or the owning node did not answer as expected (generic message)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn extend_env(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(req).await?;
    if s.envs.get(&id).is_none() && !is_local(&headers) {
        if let Some(f) = s
            .cluster
            .forward_env_call(hyper::Method::POST, &id, "/extend", Some(body.to_vec()))
            .await
        {
            return Ok(passthrough(f?));
        }
    }
    extend_local(&s.envs, &id, &body)
}

/// Extends an environment of this node by the request's `by`.
pub fn extend_local(envs: &Envs, id: &str, body: &[u8]) -> Result<Response, ApiError> {
    let req: crate::model::ExtendRequest = parse_body(body)?;
    let by = crate::units::parse_duration(&req.by)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "by", e.to_string()))?;
    Ok(Json(envs.extend(id, by)?).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/workers",
    responses(
        (status = 200, description = "this node's background workers and how each ended", body = Vec<Object>),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn workers(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    Json(s.workers.list())
}

#[utoipa::path(
    get,
    path = "/healthz",
    responses(
        (status = 200, description = "the node serves", body = String, content_type = "text/plain"),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn healthz() -> &'static str {
    "ok"
}

/// `GET /v1/openapi.json`: the document of this API (`openapi.rs`).
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    responses(
        (status = 200, description = "this document (OpenAPI 3)", body = Object),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/v1/cluster",
    responses(
        (status = 200, description = "every node this node knows, alive or dead", body = Object),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn cluster(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    Json(s.cluster.view_now().await)
}

/// `POST /v1/placement`: the ranking and every refusal, placing nothing.
#[utoipa::path(
    post,
    path = "/v1/placement",
    request_body = EnvRequest,
    responses(
        (status = 200, description = "the ranking and every node left out, with why (places nothing)", body = Object),
        (status = 400, description = "malformed request; `field` names what is wrong", body = ErrorBody),
        (status = 404, description = "the image is not published", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn placement(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (_, req, manifest, spec) = env_request(&s, req).await?;
    let preq = crate::placement::PlacementRequest {
        memory: spec.memory,
        aio: spec.aio,
        constraints: req.constraints.clone().unwrap_or_default(),
    };
    let placed = s.cluster.placement(&preq, &manifest);
    let ranked: Vec<serde_json::Value> = placed
        .ranked
        .iter()
        .map(|r| {
            serde_json::json!({
                "node": r.node,
                "http_addr": r.http_addr,
                "predicted_load_secs": r.predicted_load_secs,
                "missing_bytes": r.missing_bytes,
                "memory_free_after": r.memory_free_after,
                "aio_free_after": r.aio_free_after,
                "why": format!(
                    "loads {} it lacks in ~{:.0}s, leaves {} memory free",
                    crate::units::format_size(r.missing_bytes),
                    r.predicted_load_secs,
                    crate::units::format_size(r.memory_free_after)
                ),
            })
        })
        .collect();
    let rejected: Vec<serde_json::Value> = placed
        .rejected
        .iter()
        .map(|(node, reason)| serde_json::json!({"node": node, "reason": reason.to_string(), "detail": reason}))
        .collect();
    Ok(Json(serde_json::json!({
        "image": spec.image.to_string(),
        "memory": spec.memory,
        "aio": spec.aio,
        "ranked": ranked,
        "rejected": rejected,
    }))
    .into_response())
}

/// `GET /v1/builds`: this node's builds, and (unless the call is local)
/// every live build node's.
#[utoipa::path(
    get,
    path = "/v1/builds",
    responses(
        (status = 200, description = "every build the build nodes know", body = Vec<Object>),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn list_builds(State(s): State<Arc<AppState>>, headers: HeaderMap) -> impl IntoResponse {
    if is_local(&headers) {
        Json(s.builds.list())
    } else {
        Json(s.builds.cluster_list(&s.cluster).await)
    }
}

/// `GET /v1/builds/{product}/{build}/log`: the log, from the build node
/// that has the build.
#[utoipa::path(
    get,
    path = "/v1/builds/{product}/{build}/log",
    params(("product" = String, Path), ("build" = String, Path)),
    responses(
        (status = 200, description = "the build's log", body = String, content_type = "text/plain"),
        (status = 400, description = "the path is not valid text", body = ErrorBody),
        (status = 404, description = "no build node has the build", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn build_log(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((product, build)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let log = if is_local(&headers) {
        s.builds.log(&product, &build)
    } else {
        s.builds.cluster_log(&s.cluster, &product, &build).await
    };
    match log {
        Some(text) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()),
        None => Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "build",
            format!("no build node has build {product}/{build}"),
        )),
    }
}
