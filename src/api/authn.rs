//! Who is calling, in front of every route: `Authorization: Bearer
//! <token>` becomes an [`Identity`] (`auth.rs` verifies it), or the call is
//! refused before any handler runs.
//!
//! - What a route needs is [`auth::need`] (pure, table-tested): `/healthz`,
//!   `/v1/openapi.json` and the web page's paths are open; the catalog and
//!   `/metrics` need a token and the cluster view an operator's, unless the
//!   node runs with `open_read`;
//!   environments need a token of any role (their handlers check whose
//!   environment it is); everything else needs an operator.
//! - No token, or one that does not verify (malformed, another key,
//!   expired, revoked): **401** `{"field": "authorization"}` with
//!   `WWW-Authenticate: Bearer`. A tester on an operator route: **403**.
//! - A node-to-node call [`peer_gate`](super::peer_gate) accepted is the
//!   cluster itself ([`Caller::Cluster`]): the node that took the client's
//!   request already authorized it (it resolved the owner of a new
//!   environment into the body it forwards, and it reads an environment's
//!   record from its owner before it forwards a delete or extension of it).
//! - An [`Identity`] already in the request's extensions (set by a layer
//!   outside this one, e.g. the web page's sign-in) is taken as is.
//!
//! Handlers read the caller with the [`Caller`] extractor.

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use super::{ApiError, PeerCall};
use crate::auth::{self, Authority, Denied, Identity, Need, Via};

/// The header tokens come in.
pub const AUTHORIZATION: &str = "authorization";

/// Who is calling a route that needs a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node of the cluster on a verified (or, in `transitional` / `off`
    /// peer-call modes, trusted) node-to-node call.
    Cluster,
    /// A user whose token verified.
    User(Identity),
    /// No token, on a read `open_read` opens.
    Anonymous,
}

impl Caller {
    /// Sees (and may act on) every environment: the cluster, operators.
    pub fn sees_all(&self) -> bool {
        match self {
            Caller::Cluster => true,
            Caller::User(i) => i.is_operator(),
            Caller::Anonymous => false,
        }
    }

    /// May see and extend an environment of `owner`.
    pub fn may_use(&self, owner: &str) -> bool {
        match self {
            Caller::Cluster => true,
            Caller::User(i) => i.may_use(owner, &[]),
            Caller::Anonymous => false,
        }
    }

    /// May return (delete) an environment of `owner`.
    pub fn may_return(&self, owner: &str) -> bool {
        match self {
            Caller::Cluster => true,
            Caller::User(i) => i.may_return(owner),
            Caller::Anonymous => false,
        }
    }

    /// The owner of a new environment asked for as `requested` (empty:
    /// none named). The cluster's forwarded request already names it.
    pub fn owner_for(&self, requested: &str) -> Result<String, ApiError> {
        match self {
            Caller::Cluster => Ok(requested.to_string()),
            Caller::User(i) => i.owner_for(Some(requested)).map_err(denied),
            Caller::Anonymous => Err(unauthorized("this needs a token")),
        }
    }

    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::User(i) => Some(i),
            _ => None,
        }
    }

    /// For logs: the user, or `cluster` / `anonymous`.
    pub fn user(&self) -> &str {
        match self {
            Caller::Cluster => "cluster",
            Caller::User(i) => &i.user,
            Caller::Anonymous => "anonymous",
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| unauthorized("this needs a token"))
    }
}

/// 401 naming the `authorization` header (the gate adds
/// `WWW-Authenticate`).
pub fn unauthorized(why: &str) -> ApiError {
    ApiError::field(
        StatusCode::UNAUTHORIZED,
        AUTHORIZATION,
        format!("{why}: send Authorization: Bearer <token> (shoal token issue)"),
    )
}

/// 403 for what an identified caller may not do, naming the field at fault.
pub fn denied(d: Denied) -> ApiError {
    let field = match d {
        Denied::OperatorOnly => AUTHORIZATION,
        Denied::NotYours => "id",
        Denied::OwnerNotSelf => "owner",
    };
    ApiError::field(StatusCode::FORBIDDEN, field, d.to_string())
}

/// The token of an `Authorization: Bearer` header: `Ok(None)` without the
/// header, `Err` for another scheme or a value that is not text.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| "the authorization header is not text")?;
    let (scheme, token) = v
        .split_once(' ')
        .ok_or("the authorization header is not Bearer <token>")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("the authorization header is not Bearer <token>");
    }
    Ok(Some(token.trim()))
}

/// The web page's sign-in cookie (`web::session::COOKIE`) on a read
/// (`GET`/`HEAD`): the page's event stream is an API route, and a browser's
/// `EventSource` sends the cookie, not a Bearer header. Never on a write:
/// the cookie alone authorizes no change (the page's own posts carry CSRF
/// tokens, the API's need the header).
pub fn session_cookie<'a>(method: &axum::http::Method, headers: &'a HeaderMap) -> Option<&'a str> {
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        return None;
    }
    let h = headers.get(header::COOKIE)?.to_str().ok()?;
    crate::web::session::cookie(h, crate::web::session::COOKIE)
}

/// What the gate decides for one request (pure but for the token check,
/// which `verify` does). `cookie`: the sign-in cookie's token of a read
/// ([`session_cookie`]), used when there is no Bearer header.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    need: Need,
    peer_call: bool,
    outer: Option<Identity>,
    headers: &HeaderMap,
    cookie: Option<&str>,
    open_read: bool,
    verify: impl Fn(&str) -> Result<auth::Claims, auth::TokenError>,
) -> Result<Option<Caller>, ApiError> {
    if need == Need::Open {
        return Ok(None);
    }
    if peer_call {
        return Ok(Some(Caller::Cluster));
    }
    let ident = match outer {
        Some(i) => Some(i),
        None => match (bearer(headers).map_err(unauthorized)?, cookie) {
            (None, None) => None,
            (Some(token), _) => {
                let c = verify(token).map_err(|e| unauthorized(&e.to_string()))?;
                Some(Identity::from_claims(&c, Via::Token))
            }
            (None, Some(token)) => {
                let c = verify(token).map_err(|e| unauthorized(&e.to_string()))?;
                Some(Identity::from_claims(&c, Via::Cookie))
            }
        },
    };
    match (need, ident) {
        (Need::Read | Need::ClusterRead, None) if open_read => Ok(Some(Caller::Anonymous)),
        (_, None) => Err(unauthorized("this needs a token")),
        (Need::ClusterRead, Some(i)) if open_read => Ok(Some(Caller::User(i))),
        (Need::Operator | Need::ClusterRead, Some(i)) if !i.is_operator() => {
            Err(denied(Denied::OperatorOnly))
        }
        (_, Some(i)) => Ok(Some(Caller::User(i))),
    }
}

/// The gate (see the module doc); runs after [`super::peer_gate`].
pub async fn gate(
    State(authority): State<Arc<Authority>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let need = auth::need(req.method().as_str(), req.uri().path());
    let decided = decide(
        need,
        req.extensions().get::<PeerCall>().is_some(),
        req.extensions().get::<Identity>().cloned(),
        req.headers(),
        session_cookie(req.method(), req.headers()),
        authority.open_read,
        |t| authority.verify(t),
    );
    match decided {
        Ok(None) => next.run(req).await,
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            if e.status == StatusCode::UNAUTHORIZED {
                info!(method = %req.method(), uri = %req.uri(), error = %e.body.error, "refused a call without a valid token");
                let mut resp = e.into_response();
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"shoal\""),
                );
                resp
            } else {
                warn!(method = %req.method(), uri = %req.uri(), error = %e.body.error, "refused a call: the role does not allow it");
                e.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{issue, verify, Revocations, Role, DEFAULT_TTL};
    use crate::keyring::Keyring;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn the_gate_decides() {
        let k = Keyring::from_keys(vec![[1; 32]]).unwrap();
        let other = Keyring::from_keys(vec![[2; 32]]).unwrap();
        let (tester, _) = issue(&k, "li@lab", Role::Tester, DEFAULT_TTL, NOW).unwrap();
        let (op, _) = issue(&k, "ops@lab", Role::Operator, DEFAULT_TTL, NOW).unwrap();
        let (short, _) =
            issue(&k, "li@lab", Role::Tester, Duration::from_secs(1), NOW - 5).unwrap();
        let (foreign, _) = issue(&other, "li@lab", Role::Operator, DEFAULT_TTL, NOW).unwrap();
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        let none = HeaderMap::new();
        let check = |t: &str| verify(&k, t, NOW, &Revocations::default());
        // (need, peer call, headers, open_read) -> status or caller
        type Case<'a> = (
            &'a str,
            Need,
            bool,
            HeaderMap,
            bool,
            Result<Option<Role>, u16>,
        );
        let cases: Vec<Case> = vec![
            (
                "open route",
                Need::Open,
                false,
                none.clone(),
                false,
                Ok(None),
            ),
            ("no token", Need::User, false, none.clone(), false, Err(401)),
            (
                "no token, read, closed",
                Need::Read,
                false,
                none.clone(),
                false,
                Err(401),
            ),
            (
                "bad scheme",
                Need::User,
                false,
                h(&format!("Basic {tester}")),
                false,
                Err(401),
            ),
            (
                "not a token",
                Need::User,
                false,
                h("Bearer nope"),
                false,
                Err(401),
            ),
            (
                "another key",
                Need::User,
                false,
                h(&format!("Bearer {foreign}")),
                false,
                Err(401),
            ),
            (
                "expired",
                Need::User,
                false,
                h(&format!("Bearer {short}")),
                false,
                Err(401),
            ),
            (
                "bad token, open read",
                Need::Read,
                false,
                h("Bearer nope"),
                true,
                Err(401),
            ),
            (
                "tester",
                Need::User,
                false,
                h(&format!("Bearer {tester}")),
                false,
                Ok(Some(Role::Tester)),
            ),
            (
                "bearer any case",
                Need::User,
                false,
                h(&format!("bearer {tester}")),
                false,
                Ok(Some(Role::Tester)),
            ),
            (
                "tester on operator",
                Need::Operator,
                false,
                h(&format!("Bearer {tester}")),
                false,
                Err(403),
            ),
            (
                "operator",
                Need::Operator,
                false,
                h(&format!("Bearer {op}")),
                false,
                Ok(Some(Role::Operator)),
            ),
            (
                "tester reads",
                Need::Read,
                false,
                h(&format!("Bearer {tester}")),
                false,
                Ok(Some(Role::Tester)),
            ),
            (
                "tester on the cluster view",
                Need::ClusterRead,
                false,
                h(&format!("Bearer {tester}")),
                false,
                Err(403),
            ),
            (
                "tester on the open cluster view",
                Need::ClusterRead,
                false,
                h(&format!("Bearer {tester}")),
                true,
                Ok(Some(Role::Tester)),
            ),
            (
                "operator on the cluster view",
                Need::ClusterRead,
                false,
                h(&format!("Bearer {op}")),
                false,
                Ok(Some(Role::Operator)),
            ),
            (
                "nobody on the cluster view",
                Need::ClusterRead,
                false,
                none.clone(),
                false,
                Err(401),
            ),
            // `--open-read` opens no operator route (`GET /v1/gossip`).
            (
                "tester on an operator route, open_read",
                Need::Operator,
                false,
                h(&format!("Bearer {tester}")),
                true,
                Err(403),
            ),
            (
                "nobody on an operator route, open_read",
                Need::Operator,
                false,
                none.clone(),
                true,
                Err(401),
            ),
        ];
        for (name, need, peer, headers, open_read, want) in cases {
            let got = decide(need, peer, None, &headers, None, open_read, check);
            match (want, got) {
                (Ok(None), Ok(None)) => {}
                (Ok(Some(r)), Ok(Some(Caller::User(i)))) if i.role == r => {}
                (Err(code), Err(e)) if e.status.as_u16() == code => {
                    if code == 401 {
                        assert_eq!(e.body.field.as_deref(), Some("authorization"), "{name}");
                    }
                }
                (w, g) => panic!("{name}: want {w:?}, got {g:?}"),
            }
        }
        // Open reads without a token; the cluster on a peer call; an
        // identity set by an outer layer.
        for need in [Need::Read, Need::ClusterRead] {
            assert_eq!(
                decide(need, false, None, &none, None, true, check).unwrap(),
                Some(Caller::Anonymous)
            );
        }
        assert_eq!(
            decide(Need::Operator, true, None, &none, None, false, check).unwrap(),
            Some(Caller::Cluster)
        );
        let outer = Identity {
            user: "li@lab".into(),
            role: Role::Tester,
            via: Via::Cookie("t".into()),
        };
        assert_eq!(
            decide(
                Need::User,
                false,
                Some(outer.clone()),
                &none,
                None,
                false,
                check
            )
            .unwrap(),
            Some(Caller::User(outer))
        );
        // The sign-in cookie of a read: that user, seen as a cookie; a bad
        // one is a 401 like a bad header; a Bearer header wins.
        let got = decide(Need::User, false, None, &none, Some(&tester), false, check).unwrap();
        assert!(
            matches!(&got, Some(Caller::User(i)) if i.user == "li@lab" && matches!(i.via, Via::Cookie(_))),
            "{got:?}"
        );
        let bad = decide(Need::User, false, None, &none, Some(&foreign), false, check).unwrap_err();
        assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
        let both = h(&format!("Bearer {op}"));
        let got = decide(Need::User, false, None, &both, Some(&tester), false, check).unwrap();
        assert!(matches!(got, Some(Caller::User(i)) if i.role == Role::Operator));
    }

    #[test]
    fn the_cookie_counts_on_reads_only() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; shoal_session=shoal1.x.y"),
        );
        assert_eq!(
            session_cookie(&axum::http::Method::GET, &h),
            Some("shoal1.x.y")
        );
        assert_eq!(
            session_cookie(&axum::http::Method::HEAD, &h),
            Some("shoal1.x.y")
        );
        for m in [
            axum::http::Method::POST,
            axum::http::Method::DELETE,
            axum::http::Method::PUT,
        ] {
            assert_eq!(session_cookie(&m, &h), None, "{m}");
        }
        assert_eq!(
            session_cookie(&axum::http::Method::GET, &HeaderMap::new()),
            None
        );
    }

    #[test]
    fn callers_and_environments() {
        let t = Caller::User(Identity {
            user: "li@lab".into(),
            role: Role::Tester,
            via: Via::Token("x".into()),
        });
        let o = Caller::User(Identity {
            user: "ops@lab".into(),
            role: Role::Operator,
            via: Via::Token("y".into()),
        });
        assert!(t.may_use("LI@lab") && t.may_return("li@lab"));
        assert!(!t.may_use("bo@lab") && !t.may_return("bo@lab") && !t.sees_all());
        assert!(o.may_use("bo@lab") && o.may_return("bo@lab") && o.sees_all());
        assert!(Caller::Cluster.sees_all() && Caller::Cluster.may_return("x"));
        assert!(!Caller::Anonymous.may_use("x"));
        assert_eq!(t.owner_for("").unwrap(), "li@lab");
        assert_eq!(
            t.owner_for("bo@lab").unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            t.owner_for("bo@lab").unwrap_err().body.field.as_deref(),
            Some("owner")
        );
        assert_eq!(o.owner_for("bo@lab").unwrap(), "bo@lab");
        assert_eq!(Caller::Cluster.owner_for("bo@lab").unwrap(), "bo@lab");
        assert_eq!(
            Caller::Anonymous.owner_for("").unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }
}
