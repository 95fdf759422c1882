//! Who is on the page, and the proofs its forms carry (pure: headers,
//! keys and times in, decisions out; `mod.rs` does the I/O).
//!
//! - The sign-in cookie [`COOKIE`] holds a user token (`auth.rs`) pasted
//!   into the sign-in form; it is `HttpOnly; SameSite=Strict; Path=/`
//!   (and `Secure` when the public URL is https).
//! - A reverse proxy may name the user in a header instead
//!   ([`from_proxy`]): believed only when the TCP peer is one of the
//!   configured proxy addresses, and such a user is a tester.
//! - Every form carries a CSRF token ([`Csrf`]): HMAC-SHA256 with the web
//!   subkey of the cluster key over the session (the cookie's token id, the
//!   proxy user, the sign-in page's pre-session nonce, or a mail link's
//!   capability) and a time bucket. The primary key makes it, every key of
//!   the ring checks it; it is good for [`CSRF_BUCKET_SECS`] to twice that.
//! - A mail's extend and return links carry a capability ([`mail_cap`]):
//!   HMAC over the action, the environment id and its owner. It lets the
//!   owner's mail act on that one environment without a sign-in, for the
//!   environment's life (ids are never reused) or until the key leaves
//!   the ring.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{Identity, Role, TrustedProxy, Via};
use crate::keyring::Subkey;

/// The sign-in cookie.
pub const COOKIE: &str = "shoal_session";

/// The sign-in page's pre-session cookie (a random nonce): its form's CSRF
/// token is bound to it, so a sign-in cannot be forged from another site.
pub const PRE_COOKIE: &str = "shoal_pre";

/// The form field every POST carries.
pub const CSRF_FIELD: &str = "csrf";

/// The form field and query parameter of a mail link's capability.
pub const CAP_FIELD: &str = "cap";

/// Length of a CSRF time bucket: a form is good for 6 to 12 hours.
pub const CSRF_BUCKET_SECS: u64 = 6 * 3600;

/// Longest `next` kept across the sign-in.
const MAX_NEXT: usize = 2048;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &Subkey, parts: &[&str]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key.secret.bytes()).expect("HMAC takes any key length");
    for p in parts {
        // Length-prefixed: no two part lists sign the same bytes.
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p.as_bytes());
    }
    m
}

fn tag(key: &Subkey, parts: &[&str]) -> String {
    B64.encode(mac(key, parts).finalize().into_bytes())
}

fn check(keys: &[Subkey], parts: &[&str], presented: &str) -> bool {
    let Ok(bytes) = B64.decode(presented) else {
        return false;
    };
    keys.iter()
        .any(|k| mac(k, parts).verify_slice(&bytes).is_ok())
}

/// A CSRF token for one session. Only [`csrf`] makes one, so a form
/// helper that takes a `&Csrf` cannot be handed anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Csrf(String);

impl Csrf {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a CSRF token is bound to, as text.
pub fn session_key(who: &Identity) -> String {
    match &who.via {
        Via::Cookie(t) | Via::Token(t) => format!("token:{t}"),
        Via::ProxyHeader => format!("proxy:{}", who.user.to_ascii_lowercase()),
    }
}

fn bucket(now: u64) -> String {
    (now / CSRF_BUCKET_SECS).to_string()
}

/// The CSRF token of `session` at `now`, made with the primary web key.
pub fn csrf(keys: &[Subkey], session: &str, now: u64) -> Csrf {
    Csrf(tag(&keys[0], &["csrf", session, &bucket(now)]))
}

/// Whether `presented` is the CSRF token of `session`, made now or in the
/// bucket before, with any key of the ring.
pub fn csrf_ok(keys: &[Subkey], session: &str, presented: &str, now: u64) -> bool {
    let prev = now.saturating_sub(CSRF_BUCKET_SECS);
    !presented.is_empty()
        && [now, prev]
            .iter()
            .any(|t| check(keys, &["csrf", session, &bucket(*t)], presented))
}

/// What a mail link lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailAction {
    Extend,
    Return,
}

impl MailAction {
    pub fn as_str(self) -> &'static str {
        match self {
            MailAction::Extend => "extend",
            MailAction::Return => "return",
        }
    }
}

/// The capability of a mail link: `action` on environment `id` of `owner`.
pub fn mail_cap(keys: &[Subkey], action: MailAction, id: &str, owner: &str) -> String {
    tag(
        &keys[0],
        &["mail", action.as_str(), id, &owner.to_ascii_lowercase()],
    )
}

pub fn mail_cap_ok(
    keys: &[Subkey],
    action: MailAction,
    id: &str,
    owner: &str,
    presented: &str,
) -> bool {
    !presented.is_empty()
        && check(
            keys,
            &["mail", action.as_str(), id, &owner.to_ascii_lowercase()],
            presented,
        )
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v).filter(|v| !v.is_empty())
    })
}

/// The `Set-Cookie` value of the sign-in cookie, living `max_age` seconds.
pub fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> String {
    format!(
        "{name}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes a cookie.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", 0, secure)
}

/// The user a trusted proxy names, when the call comes from one of its
/// addresses and the header holds a plausible user name; a tester.
pub fn from_proxy(
    trusted: &TrustedProxy,
    peer: Option<std::net::IpAddr>,
    value: Option<&str>,
) -> Option<Identity> {
    let peer = peer?;
    let peer = match peer {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(peer),
        v4 => v4,
    };
    if !trusted.from.contains(&peer) {
        return None;
    }
    let user = value?.trim();
    crate::auth::check_user(user).ok()?;
    Some(Identity {
        user: user.to_string(),
        role: Role::Tester,
        via: Via::ProxyHeader,
    })
}

/// Where to go after the sign-in: a path on this site, else `/`.
pub fn safe_next(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && next.len() <= MAX_NEXT
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control() || c.is_whitespace())
        && !next.starts_with("/signin");
    if ok {
        next
    } else {
        "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Keyring;

    fn keys(b: u8) -> Vec<Subkey> {
        Keyring::from_keys(vec![[b; 32]]).unwrap().web_keys()
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn csrf_is_bound_to_session_key_and_time() {
        let k = keys(1);
        let t = csrf(&k, "token:abc", NOW);
        type Case<'a> = (&'a str, Vec<Subkey>, &'a str, String, u64, bool);
        let cases: Vec<Case> = vec![
            ("same", k.clone(), "token:abc", t.0.clone(), NOW, true),
            (
                "next bucket",
                k.clone(),
                "token:abc",
                t.0.clone(),
                NOW + CSRF_BUCKET_SECS,
                true,
            ),
            (
                "two buckets on",
                k.clone(),
                "token:abc",
                t.0.clone(),
                NOW + 2 * CSRF_BUCKET_SECS,
                false,
            ),
            (
                "other session",
                k.clone(),
                "token:abd",
                t.0.clone(),
                NOW,
                false,
            ),
            ("other key", keys(2), "token:abc", t.0.clone(), NOW, false),
            ("empty", k.clone(), "token:abc", String::new(), NOW, false),
            ("garbage", k.clone(), "token:abc", "!!".into(), NOW, false),
            (
                "rotated ring",
                Keyring::from_keys(vec![[2; 32], [1; 32]])
                    .unwrap()
                    .web_keys(),
                "token:abc",
                t.0.clone(),
                NOW,
                true,
            ),
        ];
        for (name, ring, session, presented, now, want) in cases {
            assert_eq!(csrf_ok(&ring, session, &presented, now), want, "{name}");
        }
    }

    #[test]
    fn mail_caps_name_one_action_on_one_environment() {
        let k = keys(1);
        let c = mail_cap(&k, MailAction::Return, "e1", "Li@Lab");
        assert!(mail_cap_ok(&k, MailAction::Return, "e1", "li@lab", &c));
        assert!(!mail_cap_ok(&k, MailAction::Extend, "e1", "li@lab", &c));
        assert!(!mail_cap_ok(&k, MailAction::Return, "e2", "li@lab", &c));
        assert!(!mail_cap_ok(&k, MailAction::Return, "e1", "bo@lab", &c));
        assert!(!mail_cap_ok(
            &keys(2),
            MailAction::Return,
            "e1",
            "li@lab",
            &c
        ));
        assert!(!mail_cap_ok(&k, MailAction::Return, "e1", "li@lab", ""));
        // A cap is no CSRF token and the other way round.
        assert!(!csrf_ok(&k, "e1", &c, NOW));
    }

    #[test]
    fn cookies_are_read_and_written() {
        let h = "a=1; shoal_session=shoal1.x.y; shoal_pre=n";
        assert_eq!(cookie(h, COOKIE), Some("shoal1.x.y"));
        assert_eq!(cookie(h, PRE_COOKIE), Some("n"));
        assert_eq!(cookie("shoal_session=", COOKIE), None);
        assert_eq!(cookie("xshoal_session=1", COOKIE), None);
        assert_eq!(
            set_cookie(COOKIE, "t", 60, false),
            "shoal_session=t; HttpOnly; SameSite=Strict; Path=/; Max-Age=60"
        );
        assert!(set_cookie(COOKIE, "t", 60, true).ends_with("; Secure"));
        assert!(
            clear_cookie(COOKIE, false).contains("shoal_session=; ")
                && clear_cookie(COOKIE, false).contains("Max-Age=0")
        );
    }

    #[test]
    fn the_proxy_header_is_believed_from_proxy_addresses_only() {
        let t = TrustedProxy {
            header: "x-forwarded-user".into(),
            from: vec!["10.0.0.5".parse().unwrap()],
        };
        let ip = |s: &str| Some(s.parse().unwrap());
        let who = from_proxy(&t, ip("10.0.0.5"), Some("li@lab")).unwrap();
        assert_eq!(
            (who.user.as_str(), who.role, who.via),
            ("li@lab", Role::Tester, Via::ProxyHeader)
        );
        assert!(from_proxy(&t, ip("::ffff:10.0.0.5"), Some("li@lab")).is_some());
        assert_eq!(from_proxy(&t, ip("10.0.0.6"), Some("li@lab")), None);
        assert_eq!(from_proxy(&t, None, Some("li@lab")), None);
        assert_eq!(from_proxy(&t, ip("10.0.0.5"), None), None);
        assert_eq!(from_proxy(&t, ip("10.0.0.5"), Some("")), None);
        assert_eq!(from_proxy(&t, ip("10.0.0.5"), Some("a\u{7}b")), None);
    }

    #[test]
    fn next_stays_on_this_site() {
        for (next, want) in [
            ("/envs/e1/return?cap=x", "/envs/e1/return?cap=x"),
            ("/my", "/my"),
            ("", "/"),
            ("https://evil.example/", "/"),
            ("//evil.example/", "/"),
            ("/\\evil.example", "/"),
            ("/a b", "/"),
            ("/signin?next=/x", "/"),
            ("my", "/"),
        ] {
            assert_eq!(safe_next(next), want, "{next}");
        }
    }
}
