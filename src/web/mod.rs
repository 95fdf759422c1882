//! The web page for testers, served by every node at `/`: the catalog
//! with its request form, each environment's page with live progress,
//! "my environments", and the cluster page for operators. Plus the event
//! stream of an environment (`GET /v1/environments/{id}/events`, [`sse`]).
//!
//! Server-rendered HTML ([`pages`], pure) and one small script, both
//! embedded in the binary; no build step, no external fonts or CDNs. Every
//! form is a plain HTML form (urlencoded POST, answered with a redirect),
//! so the page works without JavaScript; the script only keeps the
//! environment page live. Like `api.rs`, this module translates and
//! decides nothing: requests go through the same [`Cluster`] routing as
//! the JSON API.

pub mod pages;
pub mod sse;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::api::AppState;
use crate::model::{EnvRecord, EnvRequest, ErrorBody, ImageInfo};
use crate::routing::{Cluster, DEFAULT_LOAD_BPS};
use pages::{FormValues, Frame};

const CSS: &str = include_str!("assets/shoal.css");
const JS: &str = include_str!("assets/shoal.js");

/// The page routes (merged into the API router).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(catalog))
        .route("/envs", axum::routing::post(request_form))
        .route("/envs/{id}", get(env_page))
        .route("/envs/{id}/live", get(env_live))
        .route("/envs/{id}/extend", get(extend_page).post(extend_form))
        .route("/envs/{id}/return", get(return_page).post(return_form))
        .route("/my", get(my_envs))
        .route("/cluster", get(cluster_page))
        .route("/assets/shoal.css", get(|| asset(CSS, "text/css")))
        .route("/assets/shoal.js", get(|| asset(JS, "text/javascript")))
        .route("/v1/environments/{id}/events", get(sse::events))
}

async fn asset(body: &'static str, ty: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{ty}; charset=utf-8")),
            (header::CACHE_CONTROL, "max-age=300".into()),
        ],
        body,
    )
        .into_response()
}

fn html(
    s: &AppState,
    status: StatusCode,
    title: &str,
    nav: &str,
    head: String,
    body: &str,
) -> Response {
    let f = Frame {
        title,
        node: &s.envs.settings().name,
        nav,
        head,
    };
    (status, Html(pages::page(&f, body))).into_response()
}

fn message(s: &AppState, status: StatusCode, title: &str, text: &str) -> Response {
    let text = &shown(status, text);
    html(
        s,
        status,
        title,
        "",
        String::new(),
        &pages::message(title, text),
    )
}

fn ttls(s: &AppState) -> Vec<(String, bool)> {
    let st = s.envs.settings();
    pages::ttl_choices(st.default_ttl, st.max_ttl)
}

async fn images(s: &AppState) -> Vec<ImageInfo> {
    s.envs
        .store()
        .call(|st| st.list())
        .await
        .map(|l| l.iter().map(ImageInfo::from).collect())
        .unwrap_or_default()
}

async fn catalog_with(
    s: &AppState,
    status: StatusCode,
    form: &FormValues,
    error: Option<&str>,
) -> Response {
    let list = images(s).await;
    let body = pages::catalog(&list, &ttls(s), form, error, OffsetDateTime::now_utc());
    html(s, status, "Catalog", "catalog", String::new(), &body)
}

#[derive(Deserialize, Default)]
struct CatalogQuery {
    #[serde(default)]
    owner: String,
}

async fn catalog(State(s): State<Arc<AppState>>, Query(q): Query<CatalogQuery>) -> Response {
    let form = FormValues {
        owner: q.owner,
        ..Default::default()
    };
    catalog_with(&s, StatusCode::OK, &form, None).await
}

/// The request form, urlencoded.
#[derive(Deserialize)]
struct RequestForm {
    image: String,
    owner: String,
    #[serde(default)]
    memory: String,
    #[serde(default)]
    ttl: String,
}

/// Why the environment went where it went, in a line, from the ranking.
fn placement_why(placed: &crate::placement::Placement, node: &str) -> Option<String> {
    let r = placed.ranked.iter().find(|r| r.node == node)?;
    let mut why = if r.missing_bytes == 0 {
        "it holds every layer already".to_string()
    } else {
        format!(
            "it lacks {} of layers (~{:.0}s to load)",
            crate::units::format_size(r.missing_bytes),
            r.predicted_load_secs
        )
    };
    why.push_str(&format!(
        ", leaves {} memory free",
        crate::units::format_size(r.memory_free_after)
    ));
    let others = placed.ranked.len() - 1;
    if others > 0 || !placed.rejected.is_empty() {
        why.push_str(&format!(
            "; {others} other candidate(s), {} node(s) could not take it",
            placed.rejected.len()
        ));
    }
    Some(why)
}

async fn request_form(State(s): State<Arc<AppState>>, Form(f): Form<RequestForm>) -> Response {
    let values = FormValues {
        image: f.image.clone(),
        owner: f.owner.clone(),
        memory: f.memory.clone(),
        ttl: f.ttl.clone(),
    };
    let req = EnvRequest {
        image: f.image.trim().to_string(),
        owner: f.owner.trim().to_string(),
        memory: Some(f.memory.trim())
            .filter(|m| !m.is_empty())
            .map(|m| serde_json::Value::String(m.to_string())),
        ttl: Some(f.ttl.trim())
            .filter(|t| !t.is_empty())
            .map(String::from),
        ..Default::default()
    };
    let fail = |status: StatusCode, e: String| {
        let s = s.clone();
        let values = values.clone();
        let e = shown(status, &e);
        async move { catalog_with(&s, status, &values, Some(&e)).await }
    };
    if let Err(e) = crate::mail::check_address(&req.owner) {
        return fail(StatusCode::BAD_REQUEST, format!("owner: {e}")).await;
    }
    let r = match req.image_ref() {
        Ok(r) => r,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e.to_string()).await,
    };
    let manifest = match s.envs.store().call(move |st| st.get(&r)).await {
        Ok(m) => m,
        Err(e) => {
            let e = crate::api::ApiError::from(e);
            return fail(e.status, e.body.error).await;
        }
    };
    let spec = match req.check(&manifest.requirements, s.envs.settings().default_memory) {
        Ok(spec) => spec,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e.to_string()).await,
    };
    let preq = crate::placement::PlacementRequest {
        memory: spec.memory,
        aio: spec.aio,
        constraints: Default::default(),
    };
    let placed = s.cluster.placement(&preq, &manifest);
    let body = bytes::Bytes::from(serde_json::to_vec(&req).expect("serializes"));
    match s.cluster.create(&body, &req, spec, manifest).await {
        Ok(fw) if fw.status == StatusCode::ACCEPTED => {
            let Ok(rec) = serde_json::from_slice::<EnvRecord>(&fw.body) else {
                return fail(
                    StatusCode::BAD_GATEWAY,
                    "unreadable answer from the node".into(),
                )
                .await;
            };
            info!(env = %rec.id, owner = %rec.owner, node = %rec.node, "environment requested from the web page");
            let why = placement_why(&placed, &rec.node)
                .map(|w| format!("?why={}", pages::enc(&w)))
                .unwrap_or_default();
            Redirect::to(&format!("/envs/{}{why}", rec.id)).into_response()
        }
        Ok(fw) => {
            let msg = serde_json::from_slice::<ErrorBody>(&fw.body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&fw.body).into_owned());
            fail(fw.status, msg).await
        }
        Err(e) => {
            let mut msg = e.error.clone();
            for r in &e.reasons {
                msg.push_str(&format!("; {}: {}", r.node, r.reason));
            }
            fail(e.status, msg).await
        }
    }
}

/// An environment from whichever node owns it (a dead owner: `lost`).
pub(crate) async fn find_env(s: &AppState, id: &str) -> Option<EnvRecord> {
    if let Some(r) = s.envs.get(id) {
        return Some(r);
    }
    match s.cluster.forward_env(hyper::Method::GET, id).await {
        Some(Ok(fw)) if fw.status == StatusCode::OK => serde_json::from_slice(&fw.body).ok(),
        _ => None,
    }
}

fn load_bps(s: &AppState, node: &str) -> u64 {
    s.cluster
        .view()
        .node(node)
        .and_then(|n| n.facts.as_ref()?.load_bps)
        .unwrap_or(DEFAULT_LOAD_BPS)
}

#[derive(Deserialize, Default)]
struct EnvQuery {
    why: Option<String>,
    notice: Option<String>,
}

fn not_found(s: &AppState, id: &str) -> Response {
    message(
        s,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("environment {id} does not exist (returned, expired, or never was)"),
    )
}

async fn env_page(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<EnvQuery>,
) -> Response {
    let Some(rec) = find_env(&s, &id).await else {
        return not_found(&s, &id);
    };
    // Without JavaScript the page refreshes itself while things move.
    let head = if pages::in_progress(rec.status) {
        "<noscript><meta http-equiv=\"refresh\" content=\"3\"></noscript>\n".to_string()
    } else {
        String::new()
    };
    let body = pages::env_page(
        &rec,
        q.why.as_deref(),
        &ttls(&s),
        load_bps(&s, &rec.node),
        q.notice.as_deref(),
        OffsetDateTime::now_utc(),
    );
    html(
        &s,
        StatusCode::OK,
        &format!("Environment {id}"),
        "",
        head,
        &body,
    )
}

async fn env_live(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<EnvQuery>,
) -> Response {
    let Some(rec) = find_env(&s, &id).await else {
        return (
            StatusCode::NOT_FOUND,
            Html("<p class=\"notice\">This environment was returned or deleted.</p>"),
        )
            .into_response();
    };
    let body = pages::env_live(
        &rec,
        q.why.as_deref(),
        load_bps(&s, &rec.node),
        OffsetDateTime::now_utc(),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

async fn extend_page(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Some(rec) = find_env(&s, &id).await else {
        return not_found(&s, &id);
    };
    let body = pages::extend_confirm(&rec, &ttls(&s), OffsetDateTime::now_utc());
    html(&s, StatusCode::OK, "Extend", "", String::new(), &body)
}

async fn return_page(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Some(rec) = find_env(&s, &id).await else {
        return not_found(&s, &id);
    };
    html(
        &s,
        StatusCode::OK,
        "Return",
        "",
        String::new(),
        &pages::return_confirm(&rec),
    )
}

#[derive(Deserialize)]
struct ExtendForm {
    by: String,
}

/// Runs an environment call here or on its owner: `(status, body)`.
async fn env_call(
    s: &AppState,
    method: hyper::Method,
    id: &str,
    suffix: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Vec<u8>) {
    let local = s.envs.get(id).is_some();
    if !local {
        match s
            .cluster
            .forward_env_call(method.clone(), id, suffix, body.clone())
            .await
        {
            Some(Ok(fw)) => return (fw.status, fw.body.to_vec()),
            Some(Err(e)) => {
                return (
                    e.status,
                    serde_json::to_vec(&ErrorBody {
                        error: e.error,
                        field: None,
                        resource: None,
                        reasons: e.reasons,
                        request_id: None,
                    })
                    .expect("serializes"),
                )
            }
            None => {}
        }
    }
    let resp = match (method, suffix) {
        (hyper::Method::POST, "/extend") => {
            crate::api::extend_local(&s.envs, id, &body.unwrap_or_default()).into_response()
        }
        (hyper::Method::DELETE, "") => match s.envs.delete(id).await {
            Ok(rec) => axum::Json(rec).into_response(),
            Err(e) => crate::api::ApiError::from(e).into_response(),
        },
        _ => return (StatusCode::METHOD_NOT_ALLOWED, Vec::new()),
    };
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), crate::api::MAX_BODY)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    (status, bytes)
}

/// The text a page shows for an error: a 500 or 502 is logged (with the
/// request id of the span) and shown as a generic message.
fn shown(status: StatusCode, text: &str) -> String {
    if matches!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR | StatusCode::BAD_GATEWAY
    ) {
        warn!(status = status.as_u16(), error = %text, "page request failed");
    }
    crate::api::public_error(status, text)
}

fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

async fn extend_form(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Form(f): Form<ExtendForm>,
) -> Response {
    let body = serde_json::json!({ "by": f.by.trim() })
        .to_string()
        .into_bytes();
    let (status, answer) = env_call(&s, hyper::Method::POST, &id, "/extend", Some(body)).await;
    if status == StatusCode::OK {
        let notice = match serde_json::from_slice::<EnvRecord>(&answer)
            .ok()
            .and_then(|r| r.expires_at)
        {
            Some(e) => format!(
                "Extended by {}: it now expires {}.",
                f.by.trim(),
                pages::fmt_time(e)
            ),
            None => format!("Extended by {}.", f.by.trim()),
        };
        return Redirect::to(&format!("/envs/{id}?notice={}", pages::enc(&notice))).into_response();
    }
    message(&s, status, "Not extended", &error_text(&answer))
}

async fn return_form(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let owner = find_env(&s, &id).await.map(|r| r.owner).unwrap_or_default();
    let (status, answer) = env_call(&s, hyper::Method::DELETE, &id, "", None).await;
    if status == StatusCode::OK {
        info!(env = %id, owner = %owner, "environment returned from the web page");
        let notice = format!("Environment {id} was returned. Thank you.");
        return Redirect::to(&format!(
            "/my?owner={}&notice={}",
            pages::enc(&owner),
            pages::enc(&notice)
        ))
        .into_response();
    }
    message(&s, status, "Not returned", &error_text(&answer))
}

async fn my_envs(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let owner = q
        .get("owner")
        .map(|o| o.trim().to_string())
        .unwrap_or_default();
    let envs: Vec<EnvRecord> = if owner.is_empty() {
        Vec::new()
    } else {
        s.cluster
            .all_envs()
            .await
            .into_iter()
            .filter(|e| e.owner.eq_ignore_ascii_case(&owner))
            .collect()
    };
    let body = pages::my_envs(
        &owner,
        &envs,
        q.get("notice").map(String::as_str),
        OffsetDateTime::now_utc(),
    );
    html(
        &s,
        StatusCode::OK,
        "My environments",
        "my",
        String::new(),
        &body,
    )
}

async fn cluster_page(State(s): State<Arc<AppState>>) -> Response {
    let view = Cluster::view_now(&s.cluster).await;
    let envs = s.cluster.all_envs().await;
    let m = s.mail.status();
    let mail = pages::MailLine {
        transport: m.transport,
        pending: m.pending,
        last_error: m.last_error,
    };
    let body = pages::cluster(&view, &envs, &mail, OffsetDateTime::now_utc());
    html(
        &s,
        StatusCode::OK,
        "Cluster",
        "cluster",
        String::new(),
        &body,
    )
}
