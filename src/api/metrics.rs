//! `GET /metrics` (Prometheus / OpenMetrics text, `metrics.rs` renders it)
//! and the layer that counts every HTTP request by method, route template
//! (axum's [`MatchedPath`], never the raw path with its ids) and status,
//! with its latency.
//!
//! Who may scrape is `auth::need`: a token of any role, or none when the
//! node runs with `--open-read` (docs/metrics.md).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::{self, Metrics, Snapshot};

/// Route label of a request no route matched (the 404 fallback).
pub const UNMATCHED: &str = "unmatched";

/// Counts one request when its answer's head is ready. Runs inside the
/// router (so the route template is known) and outside the token and peer
/// gates (so their 401s count too); answers the request guard gives
/// before routing (503 busy, timeouts) are not seen here.
pub async fn record(State(m): State<Metrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let method = req.method().as_str().to_string();
    let started = tokio::time::Instant::now();
    let resp = next.run(req).await;
    m.http_request(&method, &route, resp.status().as_u16(), started.elapsed());
    resp
}

/// Whether a scraper's `Accept` asks for OpenMetrics (Prometheus does,
/// first); everyone else gets the classic text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut it = part.split(';');
            let kind = it.next().unwrap_or("").trim();
            // `q=0` means "not this one".
            let refused = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            kind.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// `GET /metrics`: this node's series, its records read now.
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (status = 200, description = "this node's metrics: the Prometheus text format (0.0.4), or OpenMetrics text when `Accept` asks for `application/openmetrics-text` (Prometheus does); docs/metrics.md lists the series", body = String, content_type = "text/plain"),
        (status = 401, description = "no valid token (and the node does not run with `--open-read`)", body = crate::model::ErrorBody),
        (status = 503, description = "busy (`resource: requests`) or timed out (`resource: timeout`)", body = crate::model::ErrorBody),
    )
)]
pub async fn scrape(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snapshot = Snapshot {
        envs: metrics::envs_by_status(&s.envs.list()),
        members: metrics::members_by_state(&s.cluster.view()),
        datagrams_dropped: metrics::dropped_by_reason(&s.cluster.gossip_security().datagrams),
        mail: {
            // The outbox is a directory: read it off the async threads.
            let mail = s.mail.clone();
            tokio::task::spawn_blocking(move || mail.counts())
                .await
                .unwrap_or_default()
        },
        builds: metrics::builds_by_status(&s.builds.list()),
        workers: metrics::workers_by_state(&s.workers.list()),
    };
    let body = s.envs.metrics().render(snapshot);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, metrics::OPENMETRICS)], body).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, metrics::PROMETHEUS_TEXT)],
            metrics::prometheus_text(&body),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::wants_openmetrics;

    #[test]
    fn accept_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (Some(prometheus), true),
            (Some("Application/OpenMetrics-Text"), true),
            (Some("application/openmetrics-text;q=0"), false),
            (
                Some("text/plain, application/openmetrics-text; q=0.2"),
                true,
            ),
        ] {
            assert_eq!(wants_openmetrics(accept), want, "{accept:?}");
        }
    }
}
