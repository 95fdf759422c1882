//! Audit lines: every write a user makes (create, extend, return, publish,
//! token issue and revoke; from the JSON API or the web page) leaves one log
//! line under the target `shoal::audit` with the user, the role, the token id, the
//! action, the object and the answer's status.
//!
//! One layer around every route ([`layer`]) writes them, so a new write
//! route cannot forget it: what a route is ([`classify`]) is a pure table.
//! The caller comes from the API's token gate (`api::authn`, the request's
//! [`Caller`]) or, for the web page, from its gate, which hands the signed-in
//! user back on the response ([`Actor`] in the response's extensions).
//! Node-to-node calls are not audited where they land: the node the user
//! called wrote the line (it is the one that authorized the call). Refusals
//! before a caller is known (no token: 401) are logged by the gate itself.

use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use tracing::info;

use crate::api::authn::Caller;
use crate::api::PeerCall;
use crate::auth::Identity;

/// What a write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Extend,
    Return,
    Publish,
    TokenIssue,
    TokenRevoke,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Extend => "extend",
            Action::Return => "return",
            Action::Publish => "publish",
            Action::TokenIssue => "token_issue",
            Action::TokenRevoke => "token_revoke",
        }
    }
}

/// Who did it, as the audit line names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub user: String,
    pub role: &'static str,
    /// The token id (never the token), `-` for a proxy header or a mail
    /// link.
    pub token: String,
}

impl Actor {
    pub fn of(i: &Identity) -> Actor {
        Actor {
            user: i.user.clone(),
            role: i.role.as_str(),
            token: i.token_id().unwrap_or("-").to_string(),
        }
    }

    /// Whoever holds a mail link (its capability names one action on one
    /// environment, whose owner the mail went to).
    pub fn mail_link() -> Actor {
        Actor {
            user: "-".into(),
            role: "mail-link",
            token: "-".into(),
        }
    }
}

/// The write a request is, and the object it names (`""` when the object
/// is only known from the answer: a new environment's id). `None`: not a
/// write that is audited (reads, the cluster's own calls).
pub fn classify(method: &Method, path: &str) -> Option<(Action, String)> {
    let seg: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let m = method.as_str();
    let a = match (m, seg.as_slice()) {
        ("POST", ["v1", "environments"]) | ("POST", ["envs"]) => (Action::Create, String::new()),
        ("DELETE", ["v1", "environments", id]) | ("POST", ["envs", id, "return"]) => {
            (Action::Return, id.to_string())
        }
        ("POST", ["v1", "environments", id, "extend"]) | ("POST", ["envs", id, "extend"]) => {
            (Action::Extend, id.to_string())
        }
        ("POST", ["v1", "images"]) => (Action::Publish, String::new()),
        ("POST", ["v1", "tokens"]) => (Action::TokenIssue, String::new()),
        ("POST", ["v1", "tokens", "revoke"]) => (Action::TokenRevoke, String::new()),
        _ => return None,
    };
    Some(a)
}

/// The object of a write known only from its answer: a new environment's
/// id from the `Location` of a 202 (`/v1/environments/<id>`) or of the web
/// page's redirect (`/envs/<id>…`).
pub fn object_from_location(location: &str) -> Option<String> {
    let rest = location
        .strip_prefix("/v1/environments/")
        .or_else(|| location.strip_prefix("/envs/"))?;
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (!id.is_empty()).then_some(id)
}

/// Writes the line.
pub fn record(actor: &Actor, action: Action, object: &str, status: StatusCode) {
    info!(
        user = %actor.user,
        role = %actor.role,
        token = %actor.token,
        action = %action.as_str(),
        object = %if object.is_empty() { "-" } else { object },
        status = status.as_u16(),
        "audit"
    );
}

/// The layer (see the module doc): runs inside the API's token gate.
pub async fn layer(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Some((action, object)) = classify(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    if req.extensions().get::<PeerCall>().is_some() {
        return next.run(req).await;
    }
    let api_actor = match req.extensions().get::<Caller>() {
        Some(Caller::User(i)) => Some(Actor::of(i)),
        Some(Caller::Cluster) => return next.run(req).await,
        _ => None,
    };
    let resp = next.run(req).await;
    let Some(actor) = api_actor.or_else(|| resp.extensions().get::<Actor>().cloned()) else {
        return resp;
    };
    let object = if object.is_empty() {
        resp.headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(object_from_location)
            .unwrap_or_default()
    } else {
        object
    };
    record(&actor, action, &object, resp.status());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_route_is_classified() {
        type Case<'a> = (&'a str, &'a str, Option<(Action, &'a str)>);
        let cases: Vec<Case> = vec![
            ("POST", "/v1/environments", Some((Action::Create, ""))),
            (
                "DELETE",
                "/v1/environments/e1",
                Some((Action::Return, "e1")),
            ),
            (
                "POST",
                "/v1/environments/e1/extend",
                Some((Action::Extend, "e1")),
            ),
            ("POST", "/v1/images", Some((Action::Publish, ""))),
            ("POST", "/v1/tokens", Some((Action::TokenIssue, ""))),
            ("POST", "/v1/tokens/revoke", Some((Action::TokenRevoke, ""))),
            ("POST", "/envs", Some((Action::Create, ""))),
            ("POST", "/envs/e2/extend", Some((Action::Extend, "e2"))),
            ("POST", "/envs/e2/return", Some((Action::Return, "e2"))),
            // Signing in and out have their own log lines, not audit ones.
            ("POST", "/signin", None),
            ("POST", "/signout", None),
            ("GET", "/v1/environments", None),
            ("GET", "/v1/environments/e1", None),
            ("GET", "/envs/e2/extend", None),
            ("POST", "/v1/placement", None),
            ("POST", "/v1/environments/e1/other", None),
        ];
        for (m, p, want) in cases {
            let got = classify(&m.parse().unwrap(), p);
            let want = want.map(|(a, o)| (a, o.to_string()));
            assert_eq!(got, want, "{m} {p}");
        }
    }

    #[test]
    fn objects_from_the_answer() {
        assert_eq!(
            object_from_location("/v1/environments/ab12-cd").as_deref(),
            Some("ab12-cd")
        );
        assert_eq!(
            object_from_location("/envs/ab12?why=x").as_deref(),
            Some("ab12")
        );
        assert_eq!(object_from_location("/my"), None);
        assert_eq!(object_from_location("/envs/"), None);
    }
}
