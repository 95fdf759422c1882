//! The web page for testers, served by every node at `/`: the catalog
//! with its request form, each environment's page with live progress,
//! "my environments", the cluster page for operators, and the sign-in
//! page. Plus the event stream of an environment
//! (`GET /v1/environments/{id}/events`, [`sse`]).
//!
//! Server-rendered HTML ([`pages`], pure) and one small script, both
//! embedded in the binary; no build step, no external fonts or CDNs. Every
//! form is a plain HTML form (urlencoded POST, answered with a redirect),
//! so the page works without JavaScript; the script only keeps the
//! environment page live. Like `api.rs`, this module translates and
//! decides nothing: requests go through the same [`Cluster`] routing as
//! the JSON API, and who may do what is `auth.rs`'s [`Identity`].
//!
//! Every page route passes [`gate`] first: it finds who is calling (the
//! sign-in cookie, or a trusted proxy's header from a proxy address,
//! [`session`]), sends the unsigned to `/signin?next=…` (except the
//! sign-in page itself and a mail link that carries its capability), and
//! refuses any POST whose CSRF token is missing or wrong with a 403 page
//! before a handler runs. Assets and the event stream are outside it.

pub mod pages;
pub mod session;
pub mod sse;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Extension, Form, Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::api::AppState;
use crate::auth::{now_secs, Authority, Identity, Via};
use crate::mail::{CapMaker, MailCaps};
use crate::model::{EnvRecord, EnvRequest, ErrorBody, ImageInfo};
use crate::routing::{Cluster, DEFAULT_LOAD_BPS};
use pages::{Csrf, FormValues, Frame};
use session::MailAction;

const CSS: &str = include_str!("assets/shoal.css");
const JS: &str = include_str!("assets/shoal.js");

/// The page routes (merged into the API router). The pages sit behind
/// [`gate`]; the assets and the event stream do not.
pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let pages = Router::new()
        .route("/", get(catalog))
        .route("/signin", get(signin_page).post(signin_form))
        .route("/signout", post(signout))
        .route("/envs", post(request_form))
        .route("/envs/{id}", get(env_page))
        .route("/envs/{id}/live", get(env_live))
        .route("/envs/{id}/extend", get(extend_page).post(extend_form))
        .route("/envs/{id}/return", get(return_page).post(return_form))
        .route("/my", get(my_envs))
        .route("/cluster", get(cluster_page))
        .route_layer(axum::middleware::from_fn_with_state(state, gate));
    Router::new()
        .merge(pages)
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

/// Who is on the page (set by [`gate`] on every page request).
#[derive(Debug, Clone)]
pub struct Session {
    pub who: Option<Identity>,
}

impl Session {
    fn me(&self) -> Result<&Identity, Unsigned> {
        self.who.as_ref().ok_or(Unsigned)
    }
}

/// No one is signed in (the gate lets such a request through only to the
/// sign-in page and capability links): to the sign-in page.
struct Unsigned;

impl IntoResponse for Unsigned {
    fn into_response(self) -> Response {
        Redirect::to("/signin").into_response()
    }
}

/// What the CSRF tokens of a request are bound to: the signed-in session,
/// else a mail link's capability.
fn csrf_key(who: Option<&Identity>, cap: Option<&str>) -> Option<String> {
    match (who, cap) {
        (Some(w), _) => Some(session::session_key(w)),
        (None, Some(c)) if !c.is_empty() => Some(format!("cap:{c}")),
        (None, _) => None,
    }
}

fn csrf_for(s: &AppState, key: &str) -> Csrf {
    session::csrf(&s.auth.keyring().web_keys(), key, now_secs())
}

/// The sign-in cookie's token, verified; else a trusted proxy's header
/// from one of its addresses.
fn identify(auth: &Authority, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<Identity> {
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    for c in cookies {
        if let Some(tok) = session::cookie(c, session::COOKIE) {
            if let Ok(claims) = auth.verify(tok) {
                return Some(Identity::from_claims(&claims, Via::Cookie));
            }
        }
    }
    let t = auth.trusted.as_ref()?;
    let value = headers.get(t.header.as_str()).and_then(|v| v.to_str().ok());
    session::from_proxy(t, peer, value)
}

fn pre_nonce(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| session::cookie(c, session::PRE_COOKIE))
        .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(String::from)
}

/// `/envs/{id}/extend` or `/envs/{id}/return`: a mail link's target.
fn mail_link(path: &str) -> Option<MailAction> {
    let rest = path.strip_prefix("/envs/")?;
    let (id, action) = rest.split_once('/')?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    match action {
        "extend" => Some(MailAction::Extend),
        "return" => Some(MailAction::Return),
        _ => None,
    }
}

fn field_of(query: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(query)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn to_signin(uri: &axum::http::Uri) -> Response {
    let next = uri.path_and_query().map_or("/", |p| p.as_str());
    Redirect::to(&format!(
        "/signin?next={}",
        pages::enc(session::safe_next(next))
    ))
    .into_response()
}

/// The gate in front of every page (see the module doc).
async fn gate(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let who = identify(&s.auth, req.headers(), peer);
    let path = req.uri().path().to_string();
    let signin = path == "/signin";
    let link = mail_link(&path);
    let sess = Session { who: who.clone() };
    if req.method() != Method::POST {
        let cap = req
            .uri()
            .query()
            .and_then(|q| field_of(q.as_bytes(), session::CAP_FIELD));
        if who.is_none() && !signin && !(link.is_some() && cap.is_some()) {
            return to_signin(req.uri());
        }
        let mut req = req;
        req.extensions_mut().insert(sess);
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, crate::api::MAX_BODY).await else {
        return message(
            &s,
            &sess,
            StatusCode::PAYLOAD_TOO_LARGE,
            "Too large",
            "the form is too large",
        );
    };
    let presented = field_of(&bytes, session::CSRF_FIELD).unwrap_or_default();
    let key = if signin {
        pre_nonce(&parts.headers).map(|n| format!("pre:{n}"))
    } else {
        let cap = link.and_then(|_| field_of(&bytes, session::CAP_FIELD));
        match csrf_key(who.as_ref(), cap.as_deref()) {
            Some(k) => Some(k),
            None => return to_signin(&parts.uri),
        }
    };
    let ok = key
        .as_deref()
        .is_some_and(|k| session::csrf_ok(&s.auth.keyring().web_keys(), k, &presented, now_secs()));
    if !ok {
        warn!(
            path = %path,
            user = who.as_ref().map_or("-", |w| w.user.as_str()),
            presented = !presented.is_empty(),
            "refused a form without a valid CSRF token"
        );
        return message(
            &s,
            &sess,
            StatusCode::FORBIDDEN,
            "Refused",
            "This form was not sent by this page or is out of date (its CSRF token is missing or wrong). \
             Nothing was changed: reload the page and try again.",
        );
    }
    let actor = match &who {
        Some(i) => Some(crate::audit::Actor::of(i)),
        None if link.is_some() => Some(crate::audit::Actor::mail_link()),
        None => None,
    };
    parts.extensions.insert(sess);
    let mut resp = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ))
        .await;
    // Who posted, for the audit line (`audit.rs` writes it outside).
    if let Some(a) = actor {
        resp.extensions_mut().insert(a);
    }
    resp
}

/// The capabilities of an environment's mail links (`mail/`).
pub fn mail_caps(auth: Arc<Authority>) -> CapMaker {
    Arc::new(move |rec: &EnvRecord| {
        let keys = auth.keyring().web_keys();
        let cap = |a| session::mail_cap(&keys, a, &rec.id, &rec.owner);
        MailCaps {
            extend: format!("?{}={}", session::CAP_FIELD, cap(MailAction::Extend)),
            ret: format!("?{}={}", session::CAP_FIELD, cap(MailAction::Return)),
        }
    })
}

fn secure(s: &AppState) -> bool {
    s.mail.public_url().starts_with("https://")
}

#[allow(clippy::too_many_arguments)]
fn html(
    s: &AppState,
    sess: &Session,
    status: StatusCode,
    title: &str,
    nav: &str,
    head: String,
    body: &str,
) -> Response {
    let csrf = sess
        .who
        .as_ref()
        .map(|w| csrf_for(s, &session::session_key(w)));
    let signed = sess
        .who
        .as_ref()
        .zip(csrf.as_ref())
        .map(|(w, c)| pages::Signed {
            user: &w.user,
            operator: w.is_operator(),
            cookie: matches!(w.via, Via::Cookie(_)),
            csrf: c,
        });
    let f = Frame {
        signed,
        title,
        node: &s.envs.settings().name,
        nav,
        head,
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Html(pages::page(&f, body)),
    )
        .into_response()
}

fn message(s: &AppState, sess: &Session, status: StatusCode, title: &str, text: &str) -> Response {
    let text = &shown(status, text);
    html(
        s,
        sess,
        status,
        title,
        "",
        String::new(),
        &pages::message(title, text),
    )
}

fn forbidden(s: &AppState, sess: &Session, text: &str) -> Response {
    message(s, sess, StatusCode::FORBIDDEN, "Not yours", text)
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
    sess: &Session,
    status: StatusCode,
    form: &FormValues,
    error: Option<&str>,
) -> Response {
    let me = match sess.me() {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    let list = images(s).await;
    let csrf = csrf_for(s, &session::session_key(me));
    let who = pages::Requester {
        user: &me.user,
        operator: me.is_operator(),
        csrf: &csrf,
    };
    let body = pages::catalog(
        &list,
        &ttls(s),
        form,
        error,
        &who,
        OffsetDateTime::now_utc(),
    );
    html(s, sess, status, "Catalog", "catalog", String::new(), &body)
}

async fn catalog(State(s): State<Arc<AppState>>, Extension(sess): Extension<Session>) -> Response {
    catalog_with(&s, &sess, StatusCode::OK, &FormValues::default(), None).await
}

#[derive(Deserialize, Default)]
struct SigninQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    error: String,
}

fn signin_with(
    s: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
) -> Response {
    let (nonce, fresh) = match pre_nonce(headers) {
        Some(n) => (n, false),
        None => {
            let mut b = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
            (hex::encode(b), true)
        }
    };
    let csrf = csrf_for(s, &format!("pre:{nonce}"));
    let body = pages::signin(error, session::safe_next(next), &csrf);
    let page = html(
        s,
        &Session { who: None },
        status,
        "Sign in",
        "",
        String::new(),
        &body,
    );
    if fresh {
        let c = session::set_cookie(session::PRE_COOKIE, &nonce, 86400, secure(s));
        (AppendHeaders([(header::SET_COOKIE, c)]), page).into_response()
    } else {
        page
    }
}

async fn signin_page(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<SigninQuery>,
) -> Response {
    let error = Some(q.error.as_str()).filter(|e| !e.is_empty());
    signin_with(&s, &headers, StatusCode::OK, &q.next, error)
}

#[derive(Deserialize)]
struct SigninForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

async fn signin_form(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(f): Form<SigninForm>,
) -> Response {
    let token = f.token.trim();
    match s.auth.verify(token) {
        Ok(claims) => {
            info!(user = %claims.sub, role = claims.role.as_str(), token = %claims.tid, "signed in on the web page");
            let max_age = claims.exp.saturating_sub(now_secs());
            let secure = secure(&s);
            (
                AppendHeaders([
                    (
                        header::SET_COOKIE,
                        session::set_cookie(session::COOKIE, token, max_age, secure),
                    ),
                    (
                        header::SET_COOKIE,
                        session::clear_cookie(session::PRE_COOKIE, secure),
                    ),
                ]),
                Redirect::to(session::safe_next(&f.next)),
            )
                .into_response()
        }
        Err(e) => {
            info!(error = %e, "web sign-in refused");
            signin_with(
                &s,
                &headers,
                StatusCode::UNAUTHORIZED,
                &f.next,
                Some(&format!("Not signed in: {e}.")),
            )
        }
    }
}

async fn signout(State(s): State<Arc<AppState>>, Extension(sess): Extension<Session>) -> Response {
    if let Some(w) = &sess.who {
        info!(user = %w.user, role = w.role.as_str(), "signed out of the web page");
    }
    (
        AppendHeaders([(
            header::SET_COOKIE,
            session::clear_cookie(session::COOKIE, secure(&s)),
        )]),
        Redirect::to("/signin"),
    )
        .into_response()
}

/// The request form, urlencoded.
#[derive(Deserialize)]
struct RequestForm {
    image: String,
    #[serde(default)]
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

async fn request_form(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Form(f): Form<RequestForm>,
) -> Response {
    let me = match sess.me() {
        Ok(m) => m.clone(),
        Err(r) => return r.into_response(),
    };
    // A tester requests for themselves; an operator may name the owner.
    let owner = match me.owner_for(Some(&f.owner)) {
        Ok(o) => o,
        Err(e) => return forbidden(&s, &sess, &e.to_string()),
    };
    let values = FormValues {
        image: f.image.clone(),
        owner: f.owner.clone(),
        memory: f.memory.clone(),
        ttl: f.ttl.clone(),
    };
    let req = EnvRequest {
        image: f.image.trim().to_string(),
        owner,
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
        let sess = sess.clone();
        let e = shown(status, &e);
        async move { catalog_with(&s, &sess, status, &values, Some(&e)).await }
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
            info!(env = %rec.id, owner = %rec.owner, node = %rec.node, user = %me.user, role = me.role.as_str(), "environment requested from the web page");
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

fn not_found(s: &AppState, sess: &Session, id: &str) -> Response {
    message(
        s,
        sess,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("environment {id} does not exist (returned, expired, or never was)"),
    )
}

const NOT_YOURS: &str = "This environment belongs to someone else.";

async fn env_page(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<EnvQuery>,
) -> Response {
    let me = match sess.me() {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    let Some(rec) = find_env(&s, &id).await else {
        return not_found(&s, &sess, &id);
    };
    if !me.may_use(&rec.owner, &[]) {
        return forbidden(&s, &sess, NOT_YOURS);
    }
    // Without JavaScript the page refreshes itself while things move.
    let head = if pages::in_progress(rec.status) {
        "<noscript><meta http-equiv=\"refresh\" content=\"3\"></noscript>\n".to_string()
    } else {
        String::new()
    };
    let csrf = csrf_for(&s, &session::session_key(me));
    let may = pages::Actions {
        extend: me.may_use(&rec.owner, &[]),
        ret: me.may_return(&rec.owner),
        csrf: &csrf,
    };
    let body = pages::env_page(
        &rec,
        q.why.as_deref(),
        &ttls(&s),
        load_bps(&s, &rec.node),
        q.notice.as_deref(),
        &may,
        OffsetDateTime::now_utc(),
    );
    html(
        &s,
        &sess,
        StatusCode::OK,
        &format!("Environment {id}"),
        "",
        head,
        &body,
    )
}

async fn env_live(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<EnvQuery>,
) -> Response {
    let me = match sess.me() {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    let rec = match find_env(&s, &id).await {
        Some(r) if me.may_use(&r.owner, &[]) => r,
        Some(_) => {
            return (
                StatusCode::FORBIDDEN,
                Html(format!("<p class=\"error\">{}</p>", pages::esc(NOT_YOURS))),
            )
                .into_response()
        }
        None => {
            return (
                StatusCode::NOT_FOUND,
                Html(
                    "<p class=\"notice\">This environment was returned or deleted.</p>".to_string(),
                ),
            )
                .into_response()
        }
    };
    let body = pages::env_live(
        &rec,
        q.why.as_deref(),
        load_bps(&s, &rec.node),
        OffsetDateTime::now_utc(),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

/// A mail link's capability, from its query or form.
#[derive(Deserialize, Default)]
struct CapQuery {
    #[serde(default)]
    cap: String,
}

/// Whether this caller may do `action` on `rec`: as who they are, or with
/// the mail link's capability. Returns the capability to carry on when it
/// is the one that allows it.
fn allowed<'a>(
    s: &AppState,
    who: Option<&Identity>,
    action: MailAction,
    rec: &EnvRecord,
    cap: &'a str,
) -> Result<Option<&'a str>, &'static str> {
    let by_cap = !cap.is_empty()
        && session::mail_cap_ok(
            &s.auth.keyring().web_keys(),
            action,
            &rec.id,
            &rec.owner,
            cap,
        );
    let by_who = who.is_some_and(|w| match action {
        MailAction::Extend => w.may_use(&rec.owner, &[]),
        MailAction::Return => w.may_return(&rec.owner),
    });
    match (by_who, by_cap) {
        (_, true) => Ok(Some(cap)),
        (true, false) => Ok(None),
        (false, false) if who.is_none() => {
            Err("This link is not valid (or no longer): sign in to manage the environment.")
        }
        (false, false) => Err(NOT_YOURS),
    }
}

/// The confirmation page behind a mail link (GET: changes nothing).
async fn confirm_page(
    s: &AppState,
    sess: &Session,
    id: &str,
    action: MailAction,
    cap: &str,
) -> Response {
    let Some(rec) = find_env(s, id).await else {
        return not_found(s, sess, id);
    };
    let cap = match allowed(s, sess.who.as_ref(), action, &rec, cap) {
        Ok(c) => c,
        Err(e) => return forbidden(s, sess, e),
    };
    let Some(key) = csrf_key(sess.who.as_ref(), cap) else {
        return Redirect::to("/signin").into_response();
    };
    let csrf = csrf_for(s, &key);
    let (title, body) = match action {
        MailAction::Extend => (
            "Extend",
            pages::extend_confirm(&rec, &ttls(s), &csrf, cap, OffsetDateTime::now_utc()),
        ),
        MailAction::Return => ("Return", pages::return_confirm(&rec, &csrf, cap)),
    };
    html(s, sess, StatusCode::OK, title, "", String::new(), &body)
}

async fn extend_page(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<CapQuery>,
) -> Response {
    confirm_page(&s, &sess, &id, MailAction::Extend, &q.cap).await
}

async fn return_page(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<CapQuery>,
) -> Response {
    confirm_page(&s, &sess, &id, MailAction::Return, &q.cap).await
}

#[derive(Deserialize)]
struct ExtendForm {
    by: String,
    #[serde(default)]
    cap: String,
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

/// Who acted, for the audit line: the user, or the mail link.
fn actor(who: Option<&Identity>) -> (&str, &'static str) {
    match who {
        Some(w) => (w.user.as_str(), w.role.as_str()),
        None => ("-", "mail-link"),
    }
}

async fn extend_form(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Path(id): Path<String>,
    Form(f): Form<ExtendForm>,
) -> Response {
    let Some(rec) = find_env(&s, &id).await else {
        return not_found(&s, &sess, &id);
    };
    if let Err(e) = allowed(&s, sess.who.as_ref(), MailAction::Extend, &rec, &f.cap) {
        return forbidden(&s, &sess, e);
    }
    let body = serde_json::json!({ "by": f.by.trim() })
        .to_string()
        .into_bytes();
    let (status, answer) = env_call(&s, hyper::Method::POST, &id, "/extend", Some(body)).await;
    if status == StatusCode::OK {
        let (user, role) = actor(sess.who.as_ref());
        info!(env = %id, owner = %rec.owner, user = %user, role = role, by = %f.by.trim(), "environment extended from the web page");
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
        if sess.who.is_none() {
            return html(
                &s,
                &sess,
                StatusCode::OK,
                "Extended",
                "",
                String::new(),
                &pages::done("Extended", &notice),
            );
        }
        return Redirect::to(&format!("/envs/{id}?notice={}", pages::enc(&notice))).into_response();
    }
    message(&s, &sess, status, "Not extended", &error_text(&answer))
}

async fn return_form(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Path(id): Path<String>,
    Form(f): Form<CapQuery>,
) -> Response {
    let Some(rec) = find_env(&s, &id).await else {
        return not_found(&s, &sess, &id);
    };
    if let Err(e) = allowed(&s, sess.who.as_ref(), MailAction::Return, &rec, &f.cap) {
        return forbidden(&s, &sess, e);
    }
    let owner = rec.owner;
    let (status, answer) = env_call(&s, hyper::Method::DELETE, &id, "", None).await;
    if status == StatusCode::OK {
        let (user, role) = actor(sess.who.as_ref());
        info!(env = %id, owner = %owner, user = %user, role = role, "environment returned from the web page");
        let notice = format!("Environment {id} was returned. Thank you.");
        return match &sess.who {
            None => html(
                &s,
                &sess,
                StatusCode::OK,
                "Returned",
                "",
                String::new(),
                &pages::done("Returned", &notice),
            ),
            Some(w) if w.is_operator() => Redirect::to(&format!(
                "/my?owner={}&notice={}",
                pages::enc(&owner),
                pages::enc(&notice)
            ))
            .into_response(),
            Some(_) => Redirect::to(&format!("/my?notice={}", pages::enc(&notice))).into_response(),
        };
    }
    message(&s, &sess, status, "Not returned", &error_text(&answer))
}

async fn my_envs(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let me = match sess.me() {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    // An operator may look at anyone's; a tester sees their own.
    let owner = match q.get("owner").map(|o| o.trim()).filter(|o| !o.is_empty()) {
        Some(o) if me.is_operator() => o.to_string(),
        _ => me.user.clone(),
    };
    let envs: Vec<EnvRecord> = s
        .cluster
        .all_envs()
        .await
        .into_iter()
        .filter(|e| crate::auth::same_user(&e.owner, &owner))
        .collect();
    let body = pages::my_envs(
        &owner,
        &envs,
        q.get("notice").map(String::as_str),
        me.is_operator(),
        OffsetDateTime::now_utc(),
    );
    html(
        &s,
        &sess,
        StatusCode::OK,
        "My environments",
        "my",
        String::new(),
        &body,
    )
}

async fn cluster_page(
    State(s): State<Arc<AppState>>,
    Extension(sess): Extension<Session>,
) -> Response {
    match sess.me() {
        Ok(m) if m.is_operator() => {}
        Ok(_) => {
            return message(
                &s,
                &sess,
                StatusCode::FORBIDDEN,
                "Operators only",
                "The cluster page is for operators.",
            )
        }
        Err(r) => return r.into_response(),
    }
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
        &sess,
        StatusCode::OK,
        "Cluster",
        "cluster",
        String::new(),
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    #[test]
    fn mail_link_targets() {
        for (path, want) in [
            ("/envs/e1/extend", Some(MailAction::Extend)),
            ("/envs/e1/return", Some(MailAction::Return)),
            ("/envs/e1", None),
            ("/envs//return", None),
            ("/envs/e1/live", None),
            ("/envs/e1/return/x", None),
            ("/my", None),
        ] {
            assert_eq!(mail_link(path), want, "{path}");
        }
    }

    #[test]
    fn what_csrf_tokens_are_bound_to() {
        let who = |via| Identity {
            user: "Li@Lab".into(),
            role: Role::Tester,
            via,
        };
        let cookie = who(Via::Cookie("t1".into()));
        let proxy = who(Via::ProxyHeader);
        assert_eq!(csrf_key(Some(&cookie), None).unwrap(), "token:t1");
        // A signed-in user's session wins over a capability.
        assert_eq!(csrf_key(Some(&cookie), Some("c")).unwrap(), "token:t1");
        assert_eq!(csrf_key(Some(&proxy), None).unwrap(), "proxy:li@lab");
        assert_eq!(csrf_key(None, Some("c")).unwrap(), "cap:c");
        assert_eq!(csrf_key(None, Some("")), None);
        assert_eq!(csrf_key(None, None), None);
    }

    #[test]
    fn the_pre_session_nonce_is_32_hex_digits() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::COOKIE, v.parse().unwrap());
            m
        };
        let n = "0123456789abcdef0123456789abcdef";
        assert_eq!(pre_nonce(&h(&format!("shoal_pre={n}"))).as_deref(), Some(n));
        assert_eq!(pre_nonce(&h("shoal_pre=short")), None);
        assert_eq!(
            pre_nonce(&h(&format!("shoal_pre={}", "z".repeat(32)))),
            None
        );
        assert_eq!(pre_nonce(&HeaderMap::new()), None);
    }
}
