//! The mail server: its URL (parsed here, purely, so `config.rs` can check
//! it) and the lettre transport built from it. The only file that talks
//! SMTP.
//!
//! - `smtp://host[:port]` plain SMTP (port 25), for a relay on the lab
//!   network or a test server on loopback;
//! - `smtp+starttls://host[:port]` STARTTLS required (port 587);
//! - `smtps://host[:port]` implicit TLS (port 465).
//!
//! Credentials come from the URL (`smtp://user:password@host`, percent
//! encoded) or, when the URL has none, from `SHOAL_SMTP_USER` and
//! `SHOAL_SMTP_PASSWORD`, so a password need not sit in a config file.

use std::fmt;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::outbox::Message;
use super::MailError;

/// How the connection to the mail server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    StartTls,
    Tls,
}

/// A parsed `--smtp` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpUrl {
    pub security: Security,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpUrl")
            .field("security", &self.security)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Display for SmtpUrl {
    /// Without the password, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.security {
            Security::Plain => "smtp",
            Security::StartTls => "smtp+starttls",
            Security::Tls => "smtps",
        };
        let user = self
            .user
            .as_ref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
    }
}

impl SmtpUrl {
    pub fn parse(s: &str) -> Result<SmtpUrl, String> {
        let u = url::Url::parse(s.trim()).map_err(|e| format!("`{s}`: {e}"))?;
        let (security, default_port) = match u.scheme() {
            "smtp" => (Security::Plain, 25),
            "smtp+starttls" => (Security::StartTls, 587),
            "smtps" => (Security::Tls, 465),
            other => {
                return Err(format!(
                    "scheme `{other}` is not one of smtp, smtp+starttls, smtps"
                ))
            }
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if !(u.path().is_empty() || u.path() == "/") || u.query().is_some() {
            return Err(format!("`{s}`: a mail server URL has no path or query"));
        }
        let decode = |v: &str| {
            percent_decode(v).ok_or_else(|| format!("`{s}`: bad percent encoding in credentials"))
        };
        let user = match u.username() {
            "" => None,
            v => Some(decode(v)?),
        };
        let password = u.password().map(decode).transpose()?;
        Ok(SmtpUrl {
            security,
            host,
            port: u.port().unwrap_or(default_port),
            user,
            password,
        })
    }

    /// Credentials from the environment when the URL has none.
    pub fn with_env_credentials(mut self) -> SmtpUrl {
        if self.user.is_none() {
            self.user = std::env::var("SHOAL_SMTP_USER")
                .ok()
                .filter(|v| !v.is_empty());
            self.password = std::env::var("SHOAL_SMTP_PASSWORD").ok();
        }
        self
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where mail goes: a mail server, or the log when none is configured.
pub enum Transport {
    Log,
    Smtp {
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        url: SmtpUrl,
    },
}

/// How long one SMTP conversation may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

impl Transport {
    pub fn new(url: Option<&SmtpUrl>) -> Result<Transport, MailError> {
        let Some(url) = url else {
            return Ok(Transport::Log);
        };
        let url = url.clone().with_env_credentials();
        let builder = match url.security {
            Security::Plain => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&url.host),
            Security::StartTls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&url.host)
                .map_err(|e| MailError::Transport(e.to_string()))?,
            Security::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&url.host)
                .map_err(|e| MailError::Transport(e.to_string()))?,
        };
        let mut builder = builder.port(url.port).timeout(Some(SMTP_TIMEOUT));
        if let Some(user) = &url.user {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                url.password.clone().unwrap_or_default(),
            ));
        }
        Ok(Transport::Smtp {
            transport: Box::new(builder.build()),
            url,
        })
    }

    /// Hands one message to the server. `Ok` means the server accepted it.
    pub async fn send(&self, from: &Mailbox, m: &Message) -> Result<(), MailError> {
        let to: Mailbox =
            m.to.parse()
                .map_err(|e| MailError::Address(format!("{}: {e}", m.to)))?;
        match self {
            Transport::Log => {
                tracing::info!(
                    mail = %m.id, env = %m.env, owner = %m.to, subject = %m.subject,
                    body = %m.body,
                    "no smtp configured: this mail would have been sent"
                );
                Ok(())
            }
            Transport::Smtp { transport, url } => {
                let host = url.host.clone();
                let email = lettre::Message::builder()
                    .from(from.clone())
                    .to(to)
                    .subject(m.subject.clone())
                    .message_id(Some(format!("<{}@{}>", m.id, from.email.domain())))
                    .date(m.created_at.into())
                    .header(ContentType::TEXT_PLAIN)
                    .body(m.body.clone())
                    .map_err(|e| MailError::Compose(e.to_string()))?;
                transport
                    .send(email)
                    .await
                    .map(|_| ())
                    .map_err(|e| MailError::Transport(format!("{host}:{}: {e}", url.port)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |s: &str| SmtpUrl::parse(s).unwrap();
        let u = ok("smtp://127.0.0.1:2525");
        assert_eq!(
            (u.security, u.host.as_str(), u.port, u.user, u.password),
            (Security::Plain, "127.0.0.1", 2525, None, None)
        );
        assert_eq!(ok("smtp://mail.lab").port, 25);
        let u = ok("smtp+starttls://bob:p%40ss@mail.lab");
        assert_eq!(
            (u.security, u.port, u.user.as_deref(), u.password.as_deref()),
            (Security::StartTls, 587, Some("bob"), Some("p@ss"))
        );
        let u = ok("smtps://mail.lab:4650/");
        assert_eq!((u.security, u.port), (Security::Tls, 4650));
        assert_eq!(ok("smtp://[::1]:25").host, "::1");
        for bad in [
            "http://mail",
            "mail.lab:25",
            "smtp://",
            "smtp://mail/x",
            "smtp://mail?tls=1",
        ] {
            assert!(SmtpUrl::parse(bad).is_err(), "{bad}");
        }
        let shown = format!(
            "{:?} {}",
            ok("smtps://u:secret@h"),
            ok("smtps://u:secret@h")
        );
        assert!(!shown.contains("secret"), "{shown}");
    }
}
