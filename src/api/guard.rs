//! What every request passes before its handler: a request id
//! (`x-request-id`, tower-http), a place among at most [`MAX_IN_FLIGHT`]
//! requests in flight (load shedding: 503 at once, never a queue), a
//! deadline, a caught panic, and error hygiene: a 500 or 502 tells the
//! client nothing about paths, the engine or peers; the log has it, under
//! the request id that the client also gets.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{warn, Instrument};

use super::{ApiError, MAX_BODY};
use crate::model::ErrorBody;

/// The longest an ordinary request may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Publishing streams a whole image into the store: its own, longer bound.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3600);

/// Requests this node works on at once; more are answered 503 at once
/// (load shedding) rather than queued.
pub const MAX_IN_FLIGHT: usize = 256;

/// The header that carries the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// `router` with every layer of this module, allowing `max_in_flight`
/// requests at once.
pub fn guarded(router: Router, max_in_flight: usize) -> Router {
    router
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                // The guard logs it, with the request id.
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "handler panicked").into_response()
            },
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            guard,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// What a client is told for a 500 or 502: nothing about paths, the
/// engine or peers (that is in the log, under the request id).
pub fn public_error(status: StatusCode, error: &str) -> String {
    match status {
        StatusCode::INTERNAL_SERVER_ERROR => "internal error; the node's log has the details".into(),
        StatusCode::BAD_GATEWAY => {
            "the container engine or another node did not answer as expected; the node's log has the details"
                .into()
        }
        _ => error.to_string(),
    }
}

/// Request id, in-flight limit, deadline and error hygiene for every
/// request (see the module header).
async fn guard(
    State(permits): State<Arc<tokio::sync::Semaphore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    async move {
        // Held until the answer's head is ready (an event stream's body
        // then flows without holding a place).
        let Ok(_permit) = permits.try_acquire() else {
            warn!("too many requests in flight, shed");
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node has too many requests in flight; retry shortly",
            );
            e.body.resource = Some("requests".into());
            return with_request_id(e.into_response(), &id).await;
        };
        let limit = if req.method() == hyper::Method::POST && req.uri().path() == "/v1/images" {
            PUBLISH_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let served = crate::client::REQUEST_ID.scope(id.clone(), next.run(req));
        let resp = match tokio::time::timeout(limit, served).await {
            Ok(resp) => resp,
            Err(_) => {
                warn!(timeout_secs = limit.as_secs(), "request timed out");
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no answer within {}s", limit.as_secs()),
                );
                e.body.resource = Some("timeout".into());
                e.into_response()
            }
        };
        with_request_id(resp, &id).await
    }
    .instrument(span)
    .await
}

/// Adds the request id to a JSON error body and, for a 500 or 502,
/// replaces the message by [`public_error`] after logging it.
async fn with_request_id(resp: Response, id: &str) -> Response {
    let status = resp.status();
    let ct = resp.headers().get(header::CONTENT_TYPE);
    // axum's own rejections (a path that is not valid text...) are plain
    // text: they become the JSON error body too.
    let json = ct.is_none_or(|v| {
        v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/plain")
    });
    let hide = matches!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR | StatusCode::BAD_GATEWAY
    );
    if !(status.is_client_error() || status.is_server_error()) || !(json || hide) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    // A JSON object keeps every field it has (`/healthz`'s report, a
    // refusal's `reasons`) and gains the request id.
    if !hide {
        if let Ok(serde_json::Value::Object(mut obj)) =
            serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            if obj.get("error").is_some_and(|e| e.is_string()) {
                obj.insert(
                    "request_id".into(),
                    serde_json::Value::String(id.to_string()),
                );
                parts.headers.remove(header::CONTENT_LENGTH);
                let body = serde_json::to_vec(&obj).unwrap_or_default();
                return Response::from_parts(parts, axum::body::Body::from(body));
            }
        }
    }
    let mut err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
        error: String::from_utf8_lossy(&bytes).into_owned(),
        field: None,
        resource: None,
        reasons: Vec::new(),
        request_id: None,
    });
    if hide {
        warn!(status = status.as_u16(), error = %err.error, "request failed");
        err = ErrorBody {
            error: public_error(status, &err.error),
            field: None,
            resource: None,
            reasons: Vec::new(),
            request_id: None,
        };
    }
    err.request_id = Some(id.to_string());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&err).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn call(app: &Router, path: &str) -> (StatusCode, Option<String>, ErrorBody) {
        let resp = app
            .clone()
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let rid = resp
            .headers()
            .get(REQUEST_ID_HEADER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
            error: String::from_utf8_lossy(&bytes).into_owned(),
            field: None,
            resource: None,
            reasons: Vec::new(),
            request_id: None,
        });
        (status, rid, body)
    }

    fn app(max: usize, gate: Arc<tokio::sync::Notify>) -> Router {
        let r = Router::new()
            .route(
                "/wait",
                get(move || async move {
                    gate.notified().await;
                    "done"
                }),
            )
            .route(
                "/sleep",
                get(|| async {
                    tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
                    "late"
                }),
            )
            .route(
                "/panic",
                get(|| async {
                    if true {
                        panic!("/secret/path exploded");
                    }
                    "never"
                }),
            )
            .route(
                "/fail",
                get(|| async {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "open /var/lib/shoal/x: denied",
                    )
                }),
            )
            .route(
                "/id",
                get(|| async {
                    // What a node-to-node call made here would send on.
                    let id = crate::client::REQUEST_ID
                        .try_with(|id| id.clone())
                        .unwrap_or_default();
                    ApiError::new(StatusCode::NOT_FOUND, id)
                }),
            )
            .route(
                "/bad",
                get(|| async {
                    ApiError::field(StatusCode::BAD_REQUEST, "by", "`x` is not a duration")
                }),
            );
        guarded(r, max)
    }

    #[tokio::test]
    async fn over_the_limit_is_shed_with_a_503_naming_requests() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let app = app(1, gate.clone());
        let first = tokio::spawn({
            let app = app.clone();
            async move { call(&app, "/wait").await }
        });
        // The first call holds the one place until the gate opens.
        let mut shed = None;
        for _ in 0..200 {
            let (status, rid, body) = call(&app, "/bad").await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                shed = Some((rid, body));
                break;
            }
            tokio::task::yield_now().await;
        }
        let (rid, body) = shed.expect("a second call while the first waits is shed");
        assert_eq!(body.resource.as_deref(), Some("requests"));
        assert_eq!(body.request_id, rid);
        gate.notify_one();
        assert_eq!(first.await.unwrap().0, StatusCode::OK);
        // The place is free again.
        assert_eq!(call(&app, "/bad").await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_answers_503_timeout() {
        let app = app(4, Default::default());
        let (status, _, body) = call(&app, "/sleep").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.resource.as_deref(), Some("timeout"));
    }

    #[tokio::test]
    async fn internals_never_reach_the_client_and_errors_carry_the_request_id() {
        let app = app(4, Default::default());
        for path in ["/panic", "/fail"] {
            let (status, rid, body) = call(&app, path).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert!(
                !body.error.contains("/secret") && !body.error.contains("/var/lib"),
                "{body:?}"
            );
            assert!(rid.is_some() && body.request_id == rid, "{path}: {body:?}");
        }
        let (status, rid, body) = call(&app, "/bad").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body.error, "`x` is not a duration");
        assert_eq!(body.field.as_deref(), Some("by"));
        assert!(rid.is_some() && body.request_id == rid);
        // Calls to peers made while serving carry the same id on.
        let (_, rid, body) = call(&app, "/id").await;
        assert_eq!(Some(body.error), rid);
        // The node keeps serving after a panic.
        assert_eq!(call(&app, "/bad").await.0, StatusCode::BAD_REQUEST);
    }
}
