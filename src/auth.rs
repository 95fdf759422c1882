//! Who is calling: user tokens any node can verify, roles, and what each
//! role may do (pure; the HTTP side lives in `api.rs` and `web/`).
//!
//! A token is `shoal1.<claims>.<mac>`: the claims are JSON (user, role,
//! token id, issue and expiry times, in seconds since the epoch) in
//! unpadded base64url, the MAC is HMAC-SHA256 over `shoal1.<claims>` with
//! the token subkey of the cluster key (HKDF, `keyring.rs`). The primary key
//! signs; every key of the keyring verifies, so a key rotation keeps tokens
//! valid until the old key leaves the file. There is no master: any node
//! with the cluster key issues and checks tokens. A token is revoked by its
//! id (`Revocations`), and expires at `exp`.
//!
//! Written by hand rather than with a JWT crate: the format needs one MAC
//! and one JSON object, the MAC key is already derived from the keyring, and
//! a JWT library would bring algorithm negotiation that must then be
//! switched off.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::keyring::Keyring;

/// The prefix of every token: the format's version.
pub const TOKEN_PREFIX: &str = "shoal1.";

/// Longest token accepted (a token is about 200 bytes).
pub const MAX_TOKEN_LEN: usize = 2048;

/// Longest user name (a mail address).
pub const MAX_USER_LEN: usize = 254;

/// Longest lifetime a token may be issued with.
pub const MAX_TTL: Duration = Duration::from_secs(5 * 365 * 86400);

/// The lifetime of a token when none is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 86400);

/// Most revoked token ids a node keeps (each expires with its token).
pub const MAX_REVOKED: usize = 4096;

/// Tolerated clock skew when a token's issue time is in the future.
pub const ISSUE_SKEW_SECS: u64 = 300;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Requests environments for themselves; sees, extends and returns
    /// their own (and those shared with them).
    Tester,
    /// Everything: publish, builds, any environment, cluster and workers.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tester => "tester",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Role, TokenError> {
        match s {
            "tester" => Ok(Role::Tester),
            "operator" => Ok(Role::Operator),
            _ => Err(TokenError::BadRole(s.chars().take(32).collect())),
        }
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The token's id (16 hex digits): what revocation names.
    pub tid: String,
    /// The user (a mail address, or any name without control characters).
    pub sub: String,
    pub role: Role,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a shoal token")]
    Malformed,
    #[error("the token's signature does not match any cluster key")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has been revoked")]
    Revoked,
    #[error("unknown role {0:?} (tester or operator)")]
    BadRole(String),
    #[error("the user name must be 1 to 254 characters without control characters")]
    BadUser,
    #[error("the lifetime must be between 1 second and 5 years")]
    BadTtl,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8; 32], signed: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(signed);
    m
}

/// Checks a user name as tokens and owners use it.
pub fn check_user(user: &str) -> Result<(), TokenError> {
    if user.is_empty()
        || user.len() > MAX_USER_LEN
        || user.trim() != user
        || user.chars().any(|c| c.is_control())
    {
        return Err(TokenError::BadUser);
    }
    Ok(())
}

/// Issues a token for `user` with `role`, valid for `ttl` from `now`
/// (seconds since the epoch), signed with the keyring's primary key.
pub fn issue(
    keyring: &Keyring,
    user: &str,
    role: Role,
    ttl: Duration,
    now: u64,
) -> Result<(String, Claims), TokenError> {
    check_user(user)?;
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(TokenError::BadTtl);
    }
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let claims = Claims {
        tid: hex::encode(id),
        sub: user.to_string(),
        role,
        iat: now,
        exp: now.saturating_add(ttl.as_secs()),
    };
    Ok((sign(keyring, &claims), claims))
}

/// The token text of `claims`, signed with the primary key.
pub fn sign(keyring: &Keyring, claims: &Claims) -> String {
    let body = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signed = format!("{TOKEN_PREFIX}{body}");
    let key = &keyring.token_keys()[0];
    let tag = mac(key.secret.bytes(), signed.as_bytes())
        .finalize()
        .into_bytes();
    format!("{signed}.{}", B64.encode(tag))
}

/// Verifies a token at `now` (seconds since the epoch): its MAC under any
/// key of the keyring, its times, and that it is not revoked.
pub fn verify(
    keyring: &Keyring,
    token: &str,
    now: u64,
    revoked: &Revocations,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
        return Err(TokenError::Malformed);
    }
    let rest = &token[TOKEN_PREFIX.len()..];
    let (body, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    if body.is_empty() || tag.contains('.') {
        return Err(TokenError::Malformed);
    }
    let signed = &token[..TOKEN_PREFIX.len() + body.len()];
    let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
    let ok = keyring.token_keys().iter().any(|k| {
        mac(k.secret.bytes(), signed.as_bytes())
            .verify_slice(&tag)
            .is_ok()
    });
    if !ok {
        return Err(TokenError::BadSignature);
    }
    let json = B64.decode(body).map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    check_user(&claims.sub).map_err(|_| TokenError::Malformed)?;
    if claims.iat > now.saturating_add(ISSUE_SKEW_SECS) {
        return Err(TokenError::NotYetValid);
    }
    if now >= claims.exp {
        return Err(TokenError::Expired);
    }
    if revoked.contains(&claims.tid) {
        return Err(TokenError::Revoked);
    }
    Ok(claims)
}

/// Revoked token ids, each kept until its token would have expired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// Token id → its expiry (seconds since the epoch).
    ids: BTreeMap<String, u64>,
}

impl Revocations {
    pub fn contains(&self, tid: &str) -> bool {
        self.ids.contains_key(tid)
    }

    /// Adds a revocation; false when the list is full of unexpired ids.
    pub fn insert(&mut self, tid: &str, exp: u64, now: u64) -> bool {
        self.prune(now);
        if self.ids.len() >= MAX_REVOKED && !self.ids.contains_key(tid) {
            return false;
        }
        let e = self.ids.entry(tid.to_string()).or_insert(exp);
        *e = (*e).max(exp);
        true
    }

    /// Merges another node's list (a union; expired ids dropped); true
    /// when an id was new here.
    pub fn merge(&mut self, other: &Revocations, now: u64) -> bool {
        let mut new = false;
        for (tid, exp) in &other.ids {
            if *exp > now && !self.ids.contains_key(tid) {
                new |= self.insert(tid, *exp, now);
            } else {
                self.insert(tid, *exp, now);
            }
        }
        new
    }

    /// A list of `(id, expiry)` pairs (from gossip), ids checked.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, u64)>,
        now: u64,
    ) -> Revocations {
        let mut r = Revocations::default();
        for (tid, exp) in pairs {
            if valid_tid(tid) {
                r.insert(tid, exp, now);
            }
        }
        r
    }

    /// Drops the ids whose tokens have expired anyway.
    pub fn prune(&mut self, now: u64) {
        self.ids.retain(|_, exp| *exp > now);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.ids.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// How a caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `Authorization: Bearer` with this token id.
    Token(String),
    /// The web page's sign-in cookie (a token) with this token id.
    Cookie(String),
    /// A trusted header set by a configured reverse proxy.
    ProxyHeader,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub role: Role,
    pub via: Via,
}

impl Identity {
    pub fn from_claims(c: &Claims, via: fn(String) -> Via) -> Identity {
        Identity {
            user: c.sub.clone(),
            role: c.role,
            via: via(c.tid.clone()),
        }
    }

    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }

    /// May this caller see and extend an environment of `owner`, shared
    /// with `shared`?
    pub fn may_use(&self, owner: &str, shared: &[String]) -> bool {
        self.is_operator()
            || same_user(&self.user, owner)
            || shared.iter().any(|s| same_user(&self.user, s))
    }

    /// May this caller return (delete) an environment of `owner`?
    pub fn may_return(&self, owner: &str) -> bool {
        self.is_operator() || same_user(&self.user, owner)
    }

    /// The owner a new environment gets: the caller, or (operators only)
    /// the one named in the request.
    pub fn owner_for(&self, requested: Option<&str>) -> Result<String, Denied> {
        match requested.map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(self.user.clone()),
            Some(o) if same_user(o, &self.user) => Ok(self.user.clone()),
            Some(o) if self.is_operator() => Ok(o.to_string()),
            Some(_) => Err(Denied::OwnerNotSelf),
        }
    }

    /// The token id, for audit lines.
    pub fn token_id(&self) -> Option<&str> {
        match &self.via {
            Via::Token(t) | Via::Cookie(t) => Some(t),
            Via::ProxyHeader => None,
        }
    }
}

/// User names compare without case (mail addresses).
pub fn same_user(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// Why an identified caller may not do something (a 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this needs the operator role")]
    OperatorOnly,
    #[error("this environment belongs to someone else")]
    NotYours,
    #[error("a tester may request environments only for themselves")]
    OwnerNotSelf,
}

/// A reverse proxy whose header names the signed-in user (web page only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxy {
    /// The header, e.g. `X-Forwarded-User`.
    pub header: String,
    /// The proxy addresses the header is believed from.
    pub from: Vec<std::net::IpAddr>,
}

/// A node's live token state: the keyring that signs and verifies (swapped
/// on a key reload), the revoked ids (merged from every node's gossip), and
/// the access settings.
#[derive(Debug)]
pub struct Authority {
    keyring: parking_lot::RwLock<Arc<Keyring>>,
    revoked: parking_lot::Mutex<Revocations>,
    /// Catalog and cluster reads without a token (`--open-read`).
    pub open_read: bool,
    /// The web page's trusted sign-in header (`--trusted-user-header`).
    pub trusted: Option<TrustedProxy>,
    /// Woken when this node revokes a token (the revocation worker then
    /// writes the file and gossips at once).
    pub revoked_here: tokio::sync::Notify,
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authority {
    pub fn new(keyring: Arc<Keyring>, open_read: bool, trusted: Option<TrustedProxy>) -> Authority {
        Authority {
            keyring: parking_lot::RwLock::new(keyring),
            revoked: parking_lot::Mutex::new(Revocations::default()),
            open_read,
            trusted,
            revoked_here: tokio::sync::Notify::new(),
        }
    }

    /// Verifies a token now.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let keyring = self.keyring.read().clone();
        let revoked = self.revoked.lock();
        verify(&keyring, token, now_secs(), &revoked)
    }

    /// Issues a token now with the primary key.
    pub fn issue(
        &self,
        user: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<(String, Claims), TokenError> {
        let keyring = self.keyring.read().clone();
        issue(&keyring, user, role, ttl, now_secs())
    }

    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().clone()
    }

    /// A reloaded key file (rotation).
    pub fn set_keyring(&self, keyring: Arc<Keyring>) {
        *self.keyring.write() = keyring;
    }

    /// Revokes a token id until `exp`; false when the list is full.
    pub fn revoke(&self, tid: &str, exp: u64) -> bool {
        let ok = self.revoked.lock().insert(tid, exp, now_secs());
        self.revoked_here.notify_one();
        ok
    }

    /// Merges revocations heard from another node (or read from the
    /// file); true when any was new here.
    pub fn merge_revocations(&self, other: &Revocations) -> bool {
        self.revoked.lock().merge(other, now_secs())
    }

    /// A copy of the revoked ids (to gossip or persist).
    pub fn revocations(&self) -> Revocations {
        let mut r = self.revoked.lock();
        r.prune(now_secs());
        r.clone()
    }
}

/// What a route needs from its caller (pure; the table is [`need`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: `/healthz`, the OpenAPI document, and every path outside
    /// `/v1/` but `/metrics` (the web page, which signs in on its own).
    Open,
    /// A token of any role, or none with `open_read`: the catalog and
    /// `/metrics`.
    Read,
    /// An operator's token, or any caller with `open_read`: the cluster
    /// view (`/v1/cluster`, `/v1/node`).
    ClusterRead,
    /// A token of any role; the handler checks whose object it is.
    User,
    /// An operator's token.
    Operator,
}

/// Who may call `method path` (before any handler runs). Unknown `/v1/`
/// paths need a token (they answer 404 after it).
pub fn need(method: &str, path: &str) -> Need {
    if path == "/metrics" {
        return Need::Read;
    }
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Need::Open;
    };
    let first = rest.split('/').next().unwrap_or("");
    let get = method == "GET" || method == "HEAD";
    match first {
        "openapi.json" if rest == "openapi.json" => Need::Open,
        "images" if get => Need::Read,
        "cluster" | "node" if get => Need::ClusterRead,
        // The raw gossip dump (owners, endpoints, revoked token ids) stays
        // an operator's even under `open_read` (`cluster/inspect.rs`).
        "gossip" => Need::Operator,
        "environments" => Need::User,
        _ => Need::Operator,
    }
}

/// A token id: 16 lowercase hex digits.
pub fn valid_tid(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The claims of a token, read without checking its MAC: only to name what
/// to revoke (revoking a forged token's id does no harm).
pub fn peek_claims(token: &str) -> Option<Claims> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let body = token.strip_prefix(TOKEN_PREFIX)?.split('.').next()?;
    let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
    valid_tid(&claims.tid).then_some(claims)
}

/// What `shoal token revoke X` and `POST /v1/tokens/revoke` revoke: a
/// whole token (its id until its expiry) or a bare id (until the longest
/// lifetime a token can have, from `now`).
pub fn revocation_of(token_or_id: &str, now: u64) -> Result<(String, u64), TokenError> {
    let t = token_or_id.trim();
    if valid_tid(t) {
        return Ok((t.to_string(), now.saturating_add(MAX_TTL.as_secs())));
    }
    let c = peek_claims(t).ok_or(TokenError::Malformed)?;
    Ok((c.tid, c.exp))
}

#[derive(Debug, thiserror::Error)]
pub enum RevokedFileError {
    #[error("cannot read or write the revocation list {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the revocation list {path} is not valid: {message}")]
    Parse {
        path: std::path::PathBuf,
        message: String,
    },
}

/// The file a node keeps its revocations in: `<data_dir>/revoked.json`.
pub fn revoked_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("revoked.json")
}

/// On disk: `{"ids": {"<token id>": <expiry>, ...}}`.
impl Revocations {
    /// Reads a revocation file; a missing file is an empty list. Ids that
    /// are not token ids are dropped.
    pub fn load(path: &std::path::Path) -> Result<Revocations, RevokedFileError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Revocations::default()),
            Err(source) => {
                return Err(RevokedFileError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut r: Revocations =
            serde_json::from_slice(&text).map_err(|e| RevokedFileError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        r.ids.retain(|k, _| valid_tid(k));
        while r.ids.len() > MAX_REVOKED {
            r.ids.pop_last();
        }
        Ok(r)
    }

    /// Merges this list into the file at `path` under an exclusive lock
    /// (`<path>.lock`) and writes the union atomically (temporary file,
    /// fsync, rename): a node and `shoal token revoke` never lose each
    /// other's additions. Returns the union as written.
    pub fn save_merged(
        &self,
        path: &std::path::Path,
        now: u64,
    ) -> Result<Revocations, RevokedFileError> {
        use std::io::Write as _;
        let io = |source| RevokedFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let lock_path = path.with_extension("json.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(std::io::Error::from(e)))?;
        let mut all = Revocations::load(path).unwrap_or_default();
        all.merge(self, now);
        all.prune(now);
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec(&all).expect("map serializes"))
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(b: u8) -> Keyring {
        Keyring::from_keys(vec![[b; 32]]).unwrap()
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn issued_tokens_verify_and_carry_their_claims() {
        let k = ring(1);
        let (t, c) = issue(&k, "li@lab", Role::Tester, DEFAULT_TTL, NOW).unwrap();
        assert!(t.starts_with(TOKEN_PREFIX));
        assert!(t.len() < 400, "{}", t.len());
        let got = verify(&k, &t, NOW + 10, &Revocations::default()).unwrap();
        assert_eq!(got, c);
        assert_eq!(got.sub, "li@lab");
        assert_eq!(got.role, Role::Tester);
        assert_eq!(got.exp, NOW + 90 * 86400);
        assert_eq!(got.tid.len(), 16);
    }

    #[test]
    fn verification_table() {
        let k = ring(1);
        let none = Revocations::default();
        let (t, c) = issue(&k, "a@b", Role::Operator, Duration::from_secs(60), NOW).unwrap();
        let mut revoked = Revocations::default();
        revoked.insert(&c.tid, c.exp, NOW);
        // A claim changed after signing (operator from tester).
        let (tt, _) = issue(&k, "a@b", Role::Tester, Duration::from_secs(60), NOW).unwrap();
        let (head, tag) = tt.rsplit_once('.').unwrap();
        let json = String::from_utf8(B64.decode(&head[TOKEN_PREFIX.len()..]).unwrap()).unwrap();
        let forged_body = B64.encode(json.replace("tester", "operator"));
        let forged = format!("{TOKEN_PREFIX}{forged_body}.{tag}");
        let future = sign(
            &k,
            &Claims {
                iat: NOW + 3600,
                ..c.clone()
            },
        );
        type Case<'a> = (
            &'a str,
            String,
            u64,
            &'a Revocations,
            Result<(), TokenError>,
        );
        let cases: Vec<Case> = vec![
            ("valid", t.clone(), NOW, &none, Ok(())),
            ("last second", t.clone(), NOW + 59, &none, Ok(())),
            (
                "expired",
                t.clone(),
                NOW + 60,
                &none,
                Err(TokenError::Expired),
            ),
            (
                "revoked",
                t.clone(),
                NOW,
                &revoked,
                Err(TokenError::Revoked),
            ),
            (
                "other key",
                sign(&ring(2), &c),
                NOW,
                &none,
                Err(TokenError::BadSignature),
            ),
            (
                "forged role",
                forged,
                NOW,
                &none,
                Err(TokenError::BadSignature),
            ),
            (
                "issued in the future",
                future,
                NOW,
                &none,
                Err(TokenError::NotYetValid),
            ),
            (
                "empty",
                String::new(),
                NOW,
                &none,
                Err(TokenError::Malformed),
            ),
            (
                "no prefix",
                t[TOKEN_PREFIX.len()..].to_string(),
                NOW,
                &none,
                Err(TokenError::Malformed),
            ),
            (
                "no mac",
                format!("{TOKEN_PREFIX}abc"),
                NOW,
                &none,
                Err(TokenError::Malformed),
            ),
            (
                "huge",
                format!("{TOKEN_PREFIX}{}", "a".repeat(5000)),
                NOW,
                &none,
                Err(TokenError::Malformed),
            ),
        ];
        for (name, tok, now, rev, want) in cases {
            let got = verify(&k, &tok, now, rev).map(|_| ());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn every_key_of_the_ring_verifies_and_the_primary_signs() {
        let old = ring(1);
        let (t, _) = issue(&old, "a@b", Role::Tester, DEFAULT_TTL, NOW).unwrap();
        let rotated = Keyring::from_keys(vec![[2; 32], [1; 32]]).unwrap();
        assert!(verify(&rotated, &t, NOW, &Revocations::default()).is_ok());
        let (t2, _) = issue(&rotated, "a@b", Role::Tester, DEFAULT_TTL, NOW).unwrap();
        assert_eq!(
            verify(&old, &t2, NOW, &Revocations::default()),
            Err(TokenError::BadSignature)
        );
        assert!(verify(&ring(2), &t2, NOW, &Revocations::default()).is_ok());
    }

    #[test]
    fn issue_checks_user_and_ttl() {
        let k = ring(1);
        for bad in ["", " a", "a\n", &"x".repeat(255)] {
            assert_eq!(
                issue(&k, bad, Role::Tester, DEFAULT_TTL, NOW).unwrap_err(),
                TokenError::BadUser,
                "{bad:?}"
            );
        }
        for ttl in [Duration::ZERO, MAX_TTL + Duration::from_secs(1)] {
            assert_eq!(
                issue(&k, "a", Role::Tester, ttl, NOW).unwrap_err(),
                TokenError::BadTtl
            );
        }
        assert_eq!(
            "admin".parse::<Role>(),
            Err(TokenError::BadRole("admin".into()))
        );
    }

    #[test]
    fn revocations_expire_merge_and_stay_bounded() {
        let mut r = Revocations::default();
        assert!(r.insert("a", NOW + 10, NOW));
        let mut other = Revocations::default();
        other.insert("b", NOW + 100, NOW);
        other.insert("a", NOW + 50, NOW);
        r.merge(&other, NOW);
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![("a", NOW + 50), ("b", NOW + 100)]
        );
        r.prune(NOW + 60);
        assert!(!r.contains("a") && r.contains("b"));
        let mut full = Revocations::default();
        for i in 0..MAX_REVOKED {
            assert!(full.insert(&format!("{i}"), NOW + 10, NOW));
        }
        assert!(!full.insert("late", NOW + 10, NOW));
        // Once they expire there is room again.
        assert!(full.insert("late", NOW + 100, NOW + 20));
        assert_eq!(full.len(), 1);
    }

    #[test]
    fn what_each_route_needs() {
        use Need::*;
        let cases = [
            ("GET", "/healthz", Open),
            ("GET", "/metrics", Read),
            ("GET", "/metrics/x", Open),
            ("GET", "/v1/openapi.json", Open),
            ("GET", "/", Open),
            ("POST", "/envs", Open),
            ("GET", "/assets/shoal.js", Open),
            ("GET", "/v1/images", Read),
            ("HEAD", "/v1/images", Read),
            ("GET", "/v1/images/demo:1", Read),
            ("POST", "/v1/images", Operator),
            ("GET", "/v1/cluster", ClusterRead),
            ("GET", "/v1/node", ClusterRead),
            ("GET", "/v1/gossip", Operator),
            ("GET", "/v1/images/demo:1/progress", Read),
            ("POST", "/v1/node", Operator),
            ("GET", "/v1/environments", User),
            ("POST", "/v1/environments", User),
            ("GET", "/v1/environments/e1", User),
            ("DELETE", "/v1/environments/e1", User),
            ("POST", "/v1/environments/e1/extend", User),
            ("GET", "/v1/environments/e1/events", User),
            ("GET", "/v1/workers", Operator),
            ("POST", "/v1/placement", Operator),
            ("GET", "/v1/builds", Operator),
            ("GET", "/v1/builds/erp/1/log", Operator),
            ("POST", "/v1/tokens", Operator),
            ("POST", "/v1/tokens/revoke", Operator),
            ("GET", "/v1/openapi.json/x", Operator),
            ("GET", "/v1/nothing", Operator),
            ("GET", "/v1/", Operator),
        ];
        for (m, p, want) in cases {
            assert_eq!(need(m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn what_a_revocation_names() {
        let k = ring(1);
        let (t, c) = issue(&k, "a@b", Role::Tester, Duration::from_secs(60), NOW).unwrap();
        assert_eq!(revocation_of(&t, NOW), Ok((c.tid.clone(), c.exp)));
        // Another key's token still names its id (revoking it harms no one).
        let (t2, c2) = issue(&ring(2), "a@b", Role::Tester, DEFAULT_TTL, NOW).unwrap();
        assert_eq!(revocation_of(&t2, NOW).unwrap().0, c2.tid);
        assert_eq!(
            revocation_of(&c.tid, NOW),
            Ok((c.tid.clone(), NOW + MAX_TTL.as_secs()))
        );
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF",
            "shoal1.x.y",
            &"a".repeat(3000),
        ] {
            assert_eq!(
                revocation_of(bad, NOW),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_revocation_file_merges_and_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = revoked_file(dir.path());
        assert!(Revocations::load(&path).unwrap().is_empty());
        let mut a = Revocations::default();
        a.insert("00000000000000aa", NOW + 100, NOW);
        a.save_merged(&path, NOW).unwrap();
        let mut b = Revocations::default();
        b.insert("00000000000000bb", NOW + 100, NOW);
        b.insert("00000000000000cc", NOW + 1, NOW);
        // Another writer's additions stay; expired ones go.
        let all = b.save_merged(&path, NOW + 5).unwrap();
        assert_eq!(all, Revocations::load(&path).unwrap());
        assert_eq!(
            all.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            vec!["00000000000000aa", "00000000000000bb"]
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(Revocations::load(&path).is_err());
    }

    #[test]
    fn who_may_do_what() {
        let tester = Identity {
            user: "Li@Lab".into(),
            role: Role::Tester,
            via: Via::Token("t".into()),
        };
        let op = Identity {
            role: Role::Operator,
            user: "ops@lab".into(),
            ..tester.clone()
        };
        let shared = vec!["li@lab".to_string()];
        assert!(tester.may_use("li@lab", &[]));
        assert!(!tester.may_use("bo@lab", &[]));
        assert!(tester.may_use("bo@lab", &shared));
        assert!(!tester.may_return("bo@lab"));
        assert!(tester.may_return("LI@lab"));
        assert!(op.may_use("bo@lab", &[]) && op.may_return("bo@lab"));
        assert_eq!(tester.owner_for(None).unwrap(), "Li@Lab");
        assert_eq!(tester.owner_for(Some(" li@lab ")).unwrap(), "Li@Lab");
        assert_eq!(tester.owner_for(Some("bo@lab")), Err(Denied::OwnerNotSelf));
        assert_eq!(op.owner_for(Some("bo@lab")).unwrap(), "bo@lab");
        assert_eq!(op.owner_for(Some("")).unwrap(), "ops@lab");
    }
}
