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
//! - `GET  /v1/gossip`                the raw gossip state (`api/gossip.rs`)
//! - `GET  /v1/images/{ref}/progress` how far a publish in flight got
//! - `GET  /v1/workers`               this node's background workers and their state
//! - `POST /v1/placement`             where a request would go, and why
//! - `GET  /v1/builds`                every build the build nodes know
//! - `GET  /v1/builds/{product}/{build}/log`  a build's log (text)
//! - `POST /v1/environments/{id}/extend` push its expiry back (`{"by": "4h"}`)
//! - `GET  /v1/environments/{id}/events` server-sent events (`web/sse.rs`)
//! - `GET  /v1/openapi.json`          this API's OpenAPI 3 document (`openapi.rs`)
//! - `GET  /healthz`                  `ok`
//! - `GET  /metrics`                  Prometheus metrics (`api/metrics.rs`)
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
//!
//! Node-to-node calls are signed (`peer_auth.rs`); [`peer_gate`], in front
//! of every route, checks the signature (over the body too, read up to
//! [`MAX_BODY`]) and marks the call [`PeerCall`]. Handlers honour
//! `x-shoal-local` (and the forwarding budget) only through [`Local`],
//! i.e. on a verified call; an unsigned call carrying any `x-shoal-*`
//! header is refused with 401 before any handler runs.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
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
    PublishRequest, RevokeRequest, Revoked, TokenIssued, TokenRequest,
};
use crate::peer_auth::{self, Admission, PeerPolicy, Presented};
use crate::routing::{Cluster, Forwarded, RouteError, BUDGET_HEADER, LOCAL_HEADER};
use crate::store::{ImageRef, PublishHint, StoreError};

pub mod authn;
pub mod drain;
pub mod gossip;
pub mod guard;
pub mod layers;
pub mod metrics;

pub use authn::Caller;

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
    /// Cancelled when the node begins to shut down: long answers (event
    /// streams) end then, so the server can close every connection.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// `/healthz`'s bounded stat of the store.
    pub store_probe: crate::health::StoreProbe,
    /// Tokens and who may do what (`auth.rs`).
    pub auth: Arc<crate::auth::Authority>,
    /// This node's publishes in flight and their progress.
    pub publishing: Arc<crate::publishing::Publishing>,
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
            StoreError::Unavailable { .. } | StoreError::ReadOnly { .. } => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                a.body.resource = Some("store".into());
                a
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
            EnvError::DiskFull { .. } => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                a.body.resource = Some("disk".into());
                a
            }
            EnvError::Draining(_) => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                a.body.resource = Some("draining".into());
                a
            }
            EnvError::EngineDown { .. } => engine_down(e.to_string()),
            EnvError::Store(s) => s.into(),
            EnvError::Transfer(crate::transfer::TransferError::Store(s)) => s.into(),
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
            // The engine's own message may name its socket: say only what failed.
            EnvError::Docker(ref d) if d.no_answer().is_some() => engine_down(format!(
                "the node's docker engine is {}",
                d.no_answer().expect("checked")
            )),
            EnvError::Docker(_) => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
            _ => {
                warn!(error = %e, "environment error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// 503 naming the engine: the node's Docker engine does not answer (the
/// call may succeed later, or on another node).
fn engine_down(error: String) -> ApiError {
    let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error);
    a.body.resource = Some("engine".into());
    a
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

/// On a request this node accepted as a node-to-node call: the sender's
/// name when the signature was verified (`None` when the policy trusted an
/// unsigned call: transitional or insecure mode).
#[derive(Debug, Clone)]
pub struct PeerCall(pub Option<String>);

/// Whether the call is a node-to-node call with `x-shoal-local` ("serve it
/// here"): true only on a call [`peer_gate`] accepted.
#[derive(Debug, Clone, Copy)]
pub struct Local(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for Local {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Local(
            parts.extensions.get::<PeerCall>().is_some()
                && parts.headers.contains_key(LOCAL_HEADER),
        ))
    }
}

/// Where the gate reads the node's policy, as it stands at each call (the
/// keys change on `SIGHUP`).
pub type PolicySource = Arc<dyn Fn() -> PeerPolicy + Send + Sync>;

/// The gate in front of every route (see the module doc).
pub async fn peer_gate(
    State(policy): State<PolicySource>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match admit_call(&policy(), req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn admit_call(
    policy: &PeerPolicy,
    req: axum::extract::Request,
) -> Result<axum::extract::Request, ApiError> {
    let headers = req.headers();
    let signed = headers.contains_key(peer_auth::SIG_HEADER);
    let shoal_header = headers
        .keys()
        .map(|k| k.as_str())
        .find(|k| k.starts_with(peer_auth::HEADER_PREFIX) && *k != peer_auth::SIG_HEADER);
    match peer_auth::admit(policy, signed, shoal_header) {
        Admission::Plain => Ok(req),
        Admission::Refuse(h) => {
            warn!(header = %h, uri = %req.uri(), "refused an unsigned call with a node-to-node header");
            Err(ApiError::field(
                StatusCode::UNAUTHORIZED,
                &h,
                format!("header {h} is honoured only on a signed node-to-node call"),
            ))
        }
        Admission::Trust => {
            let mut req = req;
            req.extensions_mut().insert(PeerCall(None));
            Ok(req)
        }
        Admission::Verify => {
            let Some(auth) = policy.signer() else {
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, "no key"));
            };
            let (mut parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is over {MAX_BODY} bytes"),
                )
            })?;
            let text = |h: &str| parts.headers.get(h).and_then(|v| v.to_str().ok());
            let presented = Presented {
                peer: text(peer_auth::PEER_HEADER),
                ts: text(peer_auth::TS_HEADER),
                nonce: text(peer_auth::NONCE_HEADER),
                sig: text(peer_auth::SIG_HEADER),
            };
            let target = parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path(), |p| p.as_str());
            match auth.verify(&presented, parts.method.as_str(), target, &body) {
                Ok(peer) => {
                    parts.extensions.insert(PeerCall(Some(peer)));
                    Ok(axum::extract::Request::from_parts(
                        parts,
                        axum::body::Body::from(body),
                    ))
                }
                Err(e) => {
                    warn!(
                        peer = presented.peer.unwrap_or("-"),
                        uri = %parts.uri,
                        error = %e,
                        "refused a node-to-node call"
                    );
                    Err(ApiError::field(
                        StatusCode::UNAUTHORIZED,
                        e.header(),
                        format!("node-to-node call refused: {e}"),
                    ))
                }
            }
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/node", get(node))
        .route("/v1/node/drain", axum::routing::post(drain::drain_node))
        .route("/v1/node/layers", get(layers::node_layers))
        .route("/v1/images", get(list_images).post(publish))
        .route("/v1/images/{image}", get(get_image))
        .route("/v1/images/{image}/progress", get(gossip::publish_progress))
        .route("/v1/environments", get(list_envs).post(create_env))
        .route("/v1/environments/{id}", get(get_env).delete(delete_env))
        .route("/v1/cluster", get(cluster))
        .route("/v1/gossip", get(gossip::gossip))
        .route("/v1/workers", get(workers))
        .route("/v1/placement", axum::routing::post(placement))
        // Build watcher (builds/).
        .route("/v1/builds", get(list_builds))
        .route("/v1/builds/{product}/{build}/log", get(build_log))
        .route(
            "/v1/environments/{id}/extend",
            axum::routing::post(extend_env),
        )
        .route("/v1/tokens", axum::routing::post(issue_token))
        .route("/v1/tokens/revoke", axum::routing::post(revoke_token))
        .merge(crate::web::routes(state.clone()))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // Audit lines of writes: inside the token gate, which names the
        // caller (`audit.rs`).
        .layer(axum::middleware::from_fn(crate::audit::layer))
        // Runs after the peer gate (layers added later run first).
        .layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            authn::gate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            {
                let cluster = state.cluster.clone();
                Arc::new(move || cluster.peer_policy()) as PolicySource
            },
            peer_gate,
        ))
        // Outermost of the router's layers: every answer, the gates' too,
        // with its route template (`api/metrics.rs`).
        .layer(axum::middleware::from_fn_with_state(
            state.envs.metrics().clone(),
            metrics::record,
        ))
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
        engine: envs.engine_health(),
        storage_driver: s.engine.storage_driver.clone(),
        containerd_store: s.engine.containerd_store,
        storage_notes: crate::host::storage_notes(
            &s.engine.storage_driver,
            s.engine.containerd_store,
        ),
        gossip: s.cluster.gossip_security(),
        store: s.envs.store().status(),
        peer_calls: s.cluster.peer_policy().mode().to_string(),
        drain: envs.drain_state(),
    }))
}

/// `GET /healthz`: 200 only when the node can do its job (engine answers,
/// state lock free, store answers, gossip and every worker running, not
/// stopping; a maintenance drain is healthy); otherwise 503 with what is wrong. Cheap: the engine's state
/// comes from its monitor, the store gets one stat at most per call.
#[utoipa::path(
    get,
    path = "/healthz",
    responses(
        (status = 200, description = "the node can do its job: `{\"status\": \"ok\", \"problems\": [], \"engine\": …}`", body = Object),
        (status = 503, description = "it cannot: `error` (the first problem) with `status` `unhealthy` and every `problems[]` entry (`check`, `error`); or busy (`resource: requests`) / timed out (`resource: timeout`)", body = ErrorBody),
    )
)]
async fn healthz(State(s): State<Arc<AppState>>) -> Response {
    let report = crate::health::assess(&health_inputs(&s).await);
    let status = if report.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

/// What `/healthz` and the systemd watchdog (`watchdog.rs`) judge.
pub async fn health_inputs(s: &AppState) -> crate::health::HealthInputs {
    crate::health::HealthInputs {
        engine: s.envs.engine_health(),
        state_lock: s.envs.state_lock_ok(HEALTH_LOCK_WAIT).await,
        // What store-watch last saw (marker, read-only, answers), then one
        // bounded stat of our own.
        store: match s.envs.store().usable() {
            Err(e) => Err(e.to_string()),
            Ok(()) => {
                s.store_probe
                    .check(s.envs.store().root().to_path_buf())
                    .await
            }
        },
        gossip: s.cluster.gossip_running().await,
        workers: s.workers.list(),
        // Stopping only: a node drained for maintenance still serves
        // reads and forwards creates to other nodes (`drain.rs`).
        draining: s.envs.is_stopping(),
    }
}

/// How long `/healthz` tries to take the state lock.
const HEALTH_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[utoipa::path(
    get,
    path = "/v1/images",
    responses(
        (status = 200, description = "published builds, newest first", body = Vec<ImageInfo>),
        (status = 500, description = "internal error (generic message; details in the node's log under the request id)", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), the store unavailable (`resource: store`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn list_images(State(s): State<Arc<AppState>>) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let list = s.envs.store().call(|st| st.list()).await?;
    Ok(Json(list.iter().map(ImageInfo::from).collect()))
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
    let m = s.envs.store().call(move |st| st.get(&r)).await?;
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
    s.envs.store().writable()?;
    s.envs.engine_ready()?;
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
        let r2 = r.clone();
        store.call(move |st| Ok(st.get(&r2).is_ok())).await?
    };
    let tracked = s.publishing.begin(&r.to_string(), &req.source, img.size);
    let (manifest, stats) = crate::transfer::publish_counted(
        &engine,
        &store,
        &img.id,
        &r,
        hint,
        None,
        Some(tracked.bytes.clone()),
    )
    .await?;
    drop(tracked);
    info!(image = %r, layers_added = stats.layers_added, bytes_added = stats.bytes_added, "published");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(ImageInfo::from(&manifest))).into_response())
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
    caller: Option<&Caller>,
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
    let mut body = body_bytes(req).await?;
    let mut req: EnvRequest = parse_body(&body)?;
    if let Some(caller) = caller {
        // The owner is settled here, on the node the client called: the
        // body forwarded to the node that takes it names it.
        let owner = caller.owner_for(req.owner.trim())?;
        if owner != req.owner {
            req.owner = owner;
            body = serde_json::to_vec(&req).expect("request serializes").into();
        }
    }
    let r = req.image_ref()?;
    let manifest = s.envs.store().call(move |st| st.get(&r)).await?;
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
    Local(local): Local,
    caller: Caller,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    // When this node read the request, and how long it may have waited
    // unread before (the node was frozen or starved).
    let read_at = tokio::time::Instant::now();
    let stalled = s.cluster.stalled(read_at);
    let (body, req, manifest, spec) = env_request(&s, Some(&caller), req).await?;
    if !local {
        return Ok(passthrough(
            s.cluster.create(&body, &req, spec, manifest).await?,
        ));
    }
    // A forwarded create served after its sender gave up: refuse, so no
    // environment starts that the requester never heard of. The budget is
    // relative: this node's clock alone measures it.
    let budget = headers
        .get(BUDGET_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    if budget.is_some_and(|b| crate::routing::too_late(b, stalled, read_at.elapsed())) {
        warn!(budget_ms = ?budget.map(|b| b.as_millis()), stalled_ms = stalled.as_millis() as u64, "forwarded create arrived after its sender stopped waiting: refused");
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
async fn list_envs(
    State(s): State<Arc<AppState>>,
    Local(local): Local,
    caller: Caller,
) -> impl IntoResponse {
    let mut list = if local {
        s.envs.list()
    } else {
        s.cluster.all_envs().await
    };
    // A tester sees their own.
    if !caller.sees_all() {
        list.retain(|r| caller.may_use(&r.owner));
    }
    Json(list)
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
    Local(local): Local,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(rec) = s.envs.get(&id) {
        check_owner(&caller, &rec.owner, Act::Use)?;
        return Ok(Json(rec).into_response());
    }
    if !local {
        if let Some(f) = s.cluster.forward_env(hyper::Method::GET, &id).await {
            let f = f?;
            if !caller.sees_all() && f.status == StatusCode::OK {
                check_owner(&caller, &forwarded_owner(&f)?, Act::Use)?;
            }
            return Ok(passthrough(f));
        }
    } else if let Some(rec) = s.cluster.remembered_lost(&id) {
        // A peer asking everyone: this node placed it on a node now down.
        return Ok(Json(rec).into_response());
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
    Local(local): Local,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match s.envs.get(&id) {
        Some(rec) => check_owner(&caller, &rec.owner, Act::Return)?,
        None if !local => {
            if let Err(answer) = check_remote(&s, &caller, &id, Act::Return).await? {
                return Ok(answer);
            }
            if let Some(f) = s.cluster.forward_env(hyper::Method::DELETE, &id).await {
                return Ok(passthrough(f?));
            }
        }
        None => {}
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
    Local(local): Local,
    caller: Caller,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(req).await?;
    if let Some(rec) = s.envs.get(&id) {
        check_owner(&caller, &rec.owner, Act::Use)?;
    } else if !local {
        if let Err(answer) = check_remote(&s, &caller, &id, Act::Use).await? {
            return Ok(answer);
        }
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

/// What a caller wants to do with an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// See it, follow it, extend it.
    Use,
    /// Return (delete) it.
    Return,
}

/// 403 unless `caller` may `act` on an environment of `owner`.
pub fn check_owner(caller: &Caller, owner: &str, act: Act) -> Result<(), ApiError> {
    let ok = match act {
        Act::Use => caller.may_use(owner),
        Act::Return => caller.may_return(owner),
    };
    if ok {
        Ok(())
    } else {
        Err(authn::denied(crate::auth::Denied::NotYours))
    }
}

/// The owner in a forwarded answer's record.
fn forwarded_owner(f: &Forwarded) -> Result<String, ApiError> {
    serde_json::from_slice::<EnvRecord>(&f.body)
        .map(|r| r.owner)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "the owning node's answer was not an environment",
            )
        })
}

/// For a caller who does not see every environment, before a call on an
/// environment of another node is forwarded: its record, read from its
/// owner (a signed GET; an environment's owner never changes), must be
/// the caller's. `Ok(Err(answer))`: answer that instead (403, or the
/// owner's 404 / error). `Ok(Ok(()))`: go on.
pub async fn check_remote(
    s: &AppState,
    caller: &Caller,
    id: &str,
    act: Act,
) -> Result<Result<(), Response>, ApiError> {
    if caller.sees_all() {
        return Ok(Ok(()));
    }
    match s.cluster.forward_env(hyper::Method::GET, id).await {
        None => Ok(Ok(())),
        Some(f) => {
            let f = f?;
            if f.status != StatusCode::OK {
                return Ok(Err(passthrough(f)));
            }
            check_owner(caller, &forwarded_owner(&f)?, act)?;
            Ok(Ok(()))
        }
    }
}

/// Extends an environment of this node by the request's `by`.
pub fn extend_local(envs: &Envs, id: &str, body: &[u8]) -> Result<Response, ApiError> {
    let req: crate::model::ExtendRequest = parse_body(body)?;
    let by = crate::units::parse_duration(&req.by)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "by", e.to_string()))?;
    Ok(Json(envs.extend(id, by)?).into_response())
}

/// `POST /v1/tokens` (operators): issues a token with this node's key.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    request_body = TokenRequest,
    responses(
        (status = 201, description = "the token (shown once) and its id", body = TokenIssued),
        (status = 400, description = "malformed request; `field` names what is wrong", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or refused: no room, draining, node unreachable", body = ErrorBody),
    )
)]
async fn issue_token(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(req).await?;
    let req: TokenRequest = parse_body(&body)?;
    let ttl = match &req.ttl {
        None => crate::auth::DEFAULT_TTL,
        Some(t) => crate::units::parse_duration(t)
            .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "ttl", e.to_string()))?,
    };
    let (token, claims) = s.auth.issue(&req.user, req.role, ttl).map_err(|e| {
        let field = match e {
            crate::auth::TokenError::BadTtl => "ttl",
            _ => "user",
        };
        ApiError::field(StatusCode::BAD_REQUEST, field, e.to_string())
    })?;
    info!(by = caller.user(), user = %claims.sub, role = claims.role.as_str(), token_id = %claims.tid, expires = claims.exp, "token issued");
    Ok((
        StatusCode::CREATED,
        Json(TokenIssued {
            token,
            id: claims.tid,
            user: claims.sub,
            role: claims.role,
            expires_at: claims.exp,
        }),
    )
        .into_response())
}

/// `POST /v1/tokens/revoke` (operators): revokes a token on every node.
#[utoipa::path(
    post,
    path = "/v1/tokens/revoke",
    request_body = RevokeRequest,
    responses(
        (status = 200, description = "revoked here; every node refuses it within a few gossip rounds", body = Revoked),
        (status = 400, description = "neither a token nor a token id (`field: token`)", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 503, description = "busy (`resource: requests`), timed out (`resource: timeout`), or the revocation list is full (`resource: revocations`)", body = ErrorBody),
    )
)]
async fn revoke_token(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let body = body_bytes(req).await?;
    let req: RevokeRequest = parse_body(&body)?;
    let (id, until) =
        crate::auth::revocation_of(&req.token, crate::auth::now_secs()).map_err(|_| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "token",
                "not a shoal token nor a token id (16 hex digits)",
            )
        })?;
    if !s.auth.revoke(&id, until) {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the revocation list is full ({} unexpired ids)",
                crate::auth::MAX_REVOKED
            ),
        );
        e.body.resource = Some("revocations".into());
        return Err(e);
    }
    info!(by = caller.user(), token_id = %id, until, "token revoked");
    Ok(Json(Revoked { id, until }).into_response())
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
    let (_, req, manifest, spec) = env_request(&s, None, req).await?;
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
async fn list_builds(State(s): State<Arc<AppState>>, Local(local): Local) -> impl IntoResponse {
    if local {
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
    Local(local): Local,
    Path((product, build)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let log = if local {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_auth::{PeerAuth, PeerKeys};
    use tower::ServiceExt;

    /// A route behind the gate that answers what the handler saw.
    fn gated(policy: PeerPolicy) -> Router {
        async fn echo(Local(local): Local, req: axum::extract::Request) -> String {
            let peer = req.extensions().get::<PeerCall>().cloned();
            let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
                .await
                .unwrap();
            format!(
                "local={local} peer={:?} body={}",
                peer.map(|p| p.0),
                String::from_utf8_lossy(&body)
            )
        }
        Router::new()
            .route("/v1/environments", axum::routing::post(echo).get(echo))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(move || policy.clone()) as PolicySource,
                peer_gate,
            ))
    }

    fn auth(name: &str, key: u8) -> Arc<PeerAuth> {
        Arc::new(PeerAuth::new(name, PeerKeys::new(vec![[key; 32]]).unwrap()))
    }

    fn request(path: &str, body: &str, headers: &[(&str, String)]) -> axum::extract::Request {
        let mut r = axum::extract::Request::builder().method("POST").uri(path);
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.body(axum::body::Body::from(body.to_string())).unwrap()
    }

    async fn send(app: &Router, req: axum::extract::Request) -> (StatusCode, String) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn signed(by: &PeerAuth, to: &str, path: &str, body: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![(LOCAL_HEADER, "1".to_string())];
        let s = by.sign("POST", path, body.as_bytes(), to);
        h.extend(s.headers().map(|(k, v)| (k, v.to_string())));
        h
    }

    #[tokio::test]
    async fn the_gate_honours_local_only_on_a_verified_call() {
        let app = gated(PeerPolicy::Required(auth("b", 1)));
        let a = auth("a", 1);
        let path = "/v1/environments";
        // A plain client call passes, not local.
        let (st, body) = send(&app, request(path, "{}", &[])).await;
        assert_eq!(
            (st, body.as_str()),
            (StatusCode::OK, "local=false peer=None body={}")
        );
        // A signed call from a node of the cluster is local, body intact.
        let h = signed(&a, "b", path, "{\"x\":1}");
        let (st, body) = send(&app, request(path, "{\"x\":1}", &h)).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(body, "local=true peer=Some(Some(\"a\")) body={\"x\":1}");
        // The same call again: a replay.
        let (st, body) = send(&app, request(path, "{\"x\":1}", &h)).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(body.contains("\"field\":\"x-shoal-nonce\""), "{body}");
        // A forged x-shoal-local (or any x-shoal-* header) from a client.
        for header in [LOCAL_HEADER, BUDGET_HEADER, "x-shoal-deadline"] {
            let (st, body) = send(&app, request(path, "{}", &[(header, "1".into())])).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{header}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["field"], header);
            assert!(v["error"].as_str().unwrap().contains(header), "{body}");
        }
        // Signed with another key, or for another node, or its body changed.
        let other = auth("a", 2);
        let cases = [
            (signed(&other, "b", path, "{}"), "{}", "x-shoal-sig"),
            (signed(&a, "c", path, "{}"), "{}", "x-shoal-sig"),
            (signed(&a, "b", path, "{}"), "{ }", "x-shoal-sig"),
            (
                signed(&a, "b", "/v1/environments?all=1", "{}"),
                "{}",
                "x-shoal-sig",
            ),
        ];
        for (h, body, field) in cases {
            let (st, answer) = send(&app, request(path, body, &h)).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{answer}");
            assert!(
                answer.contains(&format!("\"field\":\"{field}\"")),
                "{answer}"
            );
        }
        // Signature headers without x-shoal-local: verified, not local.
        let s = a.sign("POST", path, b"", "b");
        let h: Vec<_> = s.headers().map(|(k, v)| (k, v.to_string())).into();
        let (st, body) = send(&app, request(path, "", &h)).await;
        assert_eq!(
            (st, body.as_str()),
            (StatusCode::OK, "local=false peer=Some(Some(\"a\")) body=")
        );
    }

    #[tokio::test]
    async fn a_signed_body_over_the_limit_is_refused_in_json() {
        let app = gated(PeerPolicy::Required(auth("b", 1)));
        let big = "x".repeat(MAX_BODY + 1);
        let h = signed(&auth("a", 1), "b", "/v1/environments", &big);
        let (st, body) = send(&app, request("/v1/environments", &big, &h)).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body.contains("\"error\""), "{body}");
    }

    #[tokio::test]
    async fn transitional_and_off_trust_unsigned_calls_but_never_a_bad_signature() {
        let path = "/v1/environments";
        let local = [(LOCAL_HEADER, "1".to_string())];
        for policy in [PeerPolicy::Transitional(auth("b", 1)), PeerPolicy::Off] {
            let mode = policy.mode();
            let app = gated(policy);
            let (st, body) = send(&app, request(path, "{}", &local)).await;
            assert_eq!(
                (st, body.as_str()),
                (StatusCode::OK, "local=true peer=Some(None) body={}"),
                "{mode}"
            );
        }
        let app = gated(PeerPolicy::Transitional(auth("b", 1)));
        let h = signed(&auth("a", 2), "b", path, "{}");
        let (st, _) = send(&app, request(path, "{}", &h)).await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "transitional still checks signatures"
        );
    }
}
