//! Mail to environment owners: what is sent when, composed here, queued in
//! the persistent [`outbox`], delivered by [`smtp`] (lettre) with retries.
//!
//! Who sends what:
//! - The owning node sends `ready` (after the health check passed), `failed`
//!   (with the reason), `expiring` (`expiry_warning` before the end) and
//!   `expired` (queued by the reaper just before it deletes).
//! - `lost` cannot come from the owner, which is dead: the alive node with
//!   the smallest name sends it, when the failure detector marks the owner
//!   dead (a clean leave is not a loss). Message ids are per environment and
//!   event, so that node sends it once even across its own restarts; two
//!   nodes that briefly disagree on who is smallest (during a partition)
//!   may both send one.
//!
//! Two named workers per node: `mail-watcher` turns records and the
//! cluster view into events (pure: [`due_events`], [`lost_sender`]), and
//! `mail-outbox` delivers queued messages, oldest first, retrying failures
//! with exponential backoff. A daemon restart tries every queued message at
//! once (the backoff lives in memory).
//!
//! Links in mails point at the node's `public_url`; the extend and return
//! links open a page with a button (a GET never changes anything, so a
//! mail scanner that follows links cannot return an environment). Those
//! two links carry a capability ([`MailCaps`], made by the web page's
//! `session::mail_cap`): the owner reading the mail acts on that one
//! environment without signing in.

pub mod outbox;
pub mod smtp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use parking_lot::Mutex;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::cluster::ClusterView;
use crate::config::Settings;
use crate::envs::Envs;
use crate::model::{EnvRecord, EnvStatus};
use crate::units::format_duration;
pub use outbox::{Message, Outbox};
pub use smtp::SmtpUrl;

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("outbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("message id `{0}` is not a safe file name")]
    BadId(String),
    #[error("not a mail address: {0}")]
    Address(String),
    #[error("composing a mail: {0}")]
    Compose(String),
    #[error("smtp: {0}")]
    Transport(String),
}

impl MailError {
    fn io(path: &std::path::Path, source: std::io::Error) -> MailError {
        MailError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Errors that no retry can fix.
    fn permanent(&self) -> bool {
        matches!(
            self,
            MailError::Address(_) | MailError::Compose(_) | MailError::BadId(_)
        )
    }
}

/// Whether `s` is a mail address lettre accepts (`a@b`, `Name <a@b>`).
pub fn check_address(s: &str) -> Result<(), String> {
    s.parse::<Mailbox>()
        .map(|_| ())
        .map_err(|e| format!("`{s}` is not a mail address: {e}"))
}

/// What happened to an environment that its owner hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Ready,
    Failed,
    /// The warning before the given expiry (a new expiry, a new warning).
    Expiring(OffsetDateTime),
    Expired,
    Lost,
}

impl Event {
    /// The message id: one per environment and event.
    pub fn message_id(&self, env: &str) -> String {
        match self {
            Event::Ready => format!("{env}.ready"),
            Event::Failed => format!("{env}.failed"),
            Event::Expiring(at) => format!("{env}.expiring.{}", at.unix_timestamp()),
            Event::Expired => format!("{env}.expired"),
            Event::Lost => format!("{env}.lost"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Event::Ready => "ready",
            Event::Failed => "failed",
            Event::Expiring(_) => "expiring",
            Event::Expired => "expired",
            Event::Lost => "lost",
        }
    }
}

/// A ready mail is offered only this long after the environment became
/// ready, so records from before mail existed (an upgrade) send none.
pub const READY_MAIL_WINDOW: Duration = Duration::from_secs(3600);

/// The events of one local record that are due at `now` (offered again
/// and again; the outbox keeps each once).
pub fn due_events(rec: &EnvRecord, now: OffsetDateTime, warning: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    match rec.status {
        EnvStatus::Ready => {
            if rec
                .ready_at
                .is_some_and(|t| now - t <= time::Duration::try_from(READY_MAIL_WINDOW).unwrap())
            {
                out.push(Event::Ready);
            }
            if let Some(exp) = rec.expires_at {
                let warn = time::Duration::try_from(warning).unwrap_or(time::Duration::MAX);
                // Not when the whole reservation is shorter than the
                // warning: the ready mail already says when it ends.
                let long_enough = rec.ready_at.is_none_or(|r| exp - r > warn);
                if long_enough && now >= exp - warn && now < exp {
                    out.push(Event::Expiring(exp));
                }
            }
        }
        EnvStatus::Failed => out.push(Event::Failed),
        _ => {}
    }
    out
}

/// When the next time-driven event of `records` falls (an expiry warning).
pub fn next_event_at(
    records: &[EnvRecord],
    now: OffsetDateTime,
    warning: Duration,
) -> Option<OffsetDateTime> {
    let warn = time::Duration::try_from(warning).unwrap_or(time::Duration::MAX);
    records
        .iter()
        .filter(|r| r.status == EnvStatus::Ready)
        .filter_map(|r| r.expires_at.map(|e| e - warn))
        .filter(|t| *t > now)
        .min()
}

/// Whether this node is the one that mails about lost environments: the
/// alive node with the smallest name.
pub fn lost_sender(view: &ClusterView) -> bool {
    view.nodes
        .iter()
        .filter(|n| n.alive && !n.left)
        .map(|n| n.name.as_str())
        .min()
        == Some(view.self_name.as_str())
}

/// Environments of nodes the failure detector calls dead (not those that
/// left cleanly), as records rebuilt from gossip.
pub fn lost_envs(view: &ClusterView) -> Vec<EnvRecord> {
    view.nodes
        .iter()
        .filter(|n| !n.is_self && !n.alive && !n.left)
        .flat_map(|n| {
            n.facts
                .iter()
                .flat_map(|f| f.envs.values())
                .filter(|s| {
                    ["pending", "loading", "starting", "ready"].contains(&s.status.as_str())
                })
                .map(|s| crate::routing::lost_record(&n.name, s))
        })
        .collect()
}

fn fmt_time(t: OffsetDateTime) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    t.format(&f).unwrap_or_default()
}

/// The query strings (`?cap=…`, or empty) of a mail's extend and return
/// links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailCaps {
    pub extend: String,
    pub ret: String,
}

/// Makes the [`MailCaps`] of an environment (the node's keys live there).
pub type CapMaker = Arc<dyn Fn(&EnvRecord) -> MailCaps + Send + Sync>;

/// Subject and body of the mail for `ev` about `rec`. `base` is the
/// public URL of the sending node.
pub fn compose(
    ev: Event,
    rec: &EnvRecord,
    base: &str,
    caps: &MailCaps,
    now: OffsetDateTime,
) -> (String, String) {
    let id = &rec.id;
    let page = format!("{base}/envs/{id}");
    let expiry = |e: Option<OffsetDateTime>| match e {
        Some(e) if e > now => format!(
            "{} (in {})",
            fmt_time(e),
            format_duration(Duration::from_secs((e - now).whole_seconds() as u64))
        ),
        Some(e) => fmt_time(e),
        None => "unknown".into(),
    };
    let endpoints = if rec.endpoints.is_empty() {
        "  (none: the image exposes no port)\n".to_string()
    } else {
        rec.endpoints
            .iter()
            .map(|e| format!("  http://{}:{}/   (port {})\n", e.host, e.host_port, e.port))
            .collect()
    };
    let facts = format!(
        "Environment  {id}\nBuild        {}\nNode         {}\nExpires      {}\n",
        rec.image,
        rec.node,
        expiry(rec.expires_at)
    );
    let links = format!(
        "Its page:  {page}\nExtend:    {page}/extend{}\nReturn:    {page}/return{}\n",
        caps.extend, caps.ret
    );
    match ev {
        Event::Ready => (
            format!("[shoal] {} is ready: {id}", rec.image),
            format!(
                "Your environment of {} is ready to use.\n\n{facts}\nEndpoints:\n{endpoints}\n{links}\n\
                 It is deleted when the reservation ends; extend it if you need it longer,\n\
                 and return it when you are done so others can have the room.\n",
                rec.image
            ),
        ),
        Event::Failed => (
            format!("[shoal] {} failed: {id}", rec.image),
            format!(
                "Your environment of {} could not be made ready.\n\n{facts}\nReason: {}\n\n\
                 Its page: {page}\nRequest another: {base}/\n",
                rec.image,
                rec.error.as_deref().unwrap_or("unknown")
            ),
        ),
        Event::Expiring(at) => (
            format!(
                "[shoal] {id} expires in {}",
                format_duration(Duration::from_secs(
                    (at - now).whole_seconds().max(0) as u64
                ))
            ),
            format!(
                "The reservation of your environment of {} ends at {}.\n\
                 It will then be deleted.\n\n{facts}\nEndpoints:\n{endpoints}\n{links}",
                rec.image,
                fmt_time(at)
            ),
        ),
        Event::Expired => (
            format!("[shoal] {id} was deleted: its reservation ended"),
            format!(
                "The reservation of your environment of {} ended, and it has been deleted.\n\n\
                 {facts}\nRequest a new one: {base}/\n",
                rec.image
            ),
        ),
        Event::Lost => (
            format!("[shoal] {id} is lost: node {} is unreachable", rec.node),
            format!(
                "The node that runs your environment of {} stopped answering the cluster.\n\
                 shoal never moves or restarts an environment elsewhere; if the node comes\n\
                 back, so does the environment.\n\n{facts}\nIts page: {page}\nRequest a new one: {base}/\n",
                rec.image
            ),
        ),
    }
}

/// What the outbox worker reports (for the cluster page).
#[derive(Debug, Clone, Default)]
pub struct MailStatus {
    pub transport: String,
    pub pending: usize,
    pub last_error: Option<String>,
}

/// This node's mailer: composes, queues and delivers.
pub struct Mailer {
    outbox: Outbox,
    transport: smtp::Transport,
    from: Mailbox,
    /// Base of the links in mails, no trailing `/`.
    public_url: String,
    /// The capabilities of the extend and return links.
    caps: Option<CapMaker>,
    warning: Duration,
    max_ttl: Duration,
    /// Wakes the outbox worker when a message is queued (one waiter).
    wake: tokio::sync::Notify,
    last_error: Mutex<Option<String>>,
    /// Sends the server did not accept (retried) / refused for good
    /// (dropped), since start: `shoal_mail_send_failures_total`.
    failed_retry: AtomicU64,
    failed_permanent: AtomicU64,
}

impl Mailer {
    pub fn new(
        settings: &Settings,
        public_url: String,
        caps: Option<CapMaker>,
    ) -> Result<Arc<Mailer>, MailError> {
        let from: Mailbox = settings
            .mail_from
            .parse()
            .map_err(|e| MailError::Address(format!("{}: {e}", settings.mail_from)))?;
        let transport = smtp::Transport::new(settings.smtp.as_ref())?;
        match &transport {
            smtp::Transport::Log => {
                info!(node = %settings.name, "no smtp configured: mails are logged, not sent")
            }
            smtp::Transport::Smtp { url, .. } => {
                info!(node = %settings.name, smtp = %url, from = %from, "mail via smtp")
            }
        }
        Ok(Arc::new(Mailer {
            outbox: Outbox::open(&settings.data_dir.join("outbox"))?,
            transport,
            from,
            public_url: public_url.trim_end_matches('/').to_string(),
            caps,
            warning: settings.expiry_warning,
            max_ttl: settings.max_ttl,
            wake: tokio::sync::Notify::new(),
            last_error: Mutex::new(None),
            failed_retry: AtomicU64::new(0),
            failed_permanent: AtomicU64::new(0),
        }))
    }

    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    pub fn status(&self) -> MailStatus {
        MailStatus {
            transport: match &self.transport {
                smtp::Transport::Log => "log only (no smtp configured)".into(),
                smtp::Transport::Smtp { url, .. } => url.to_string(),
            },
            pending: self.outbox.pending().len(),
            last_error: self.last_error.lock().clone(),
        }
    }

    /// The outbox's depth and the failures since start, for `/metrics`.
    pub fn counts(&self) -> crate::metrics::MailCounts {
        crate::metrics::MailCounts {
            pending: self.outbox.pending().len() as u64,
            failed_retry: self.failed_retry.load(Ordering::Relaxed),
            failed_permanent: self.failed_permanent.load(Ordering::Relaxed),
        }
    }

    /// Queues the mail for `ev` about `rec`, once per (environment, event).
    pub fn event(&self, ev: Event, rec: &EnvRecord) {
        if let Err(e) = check_address(&rec.owner) {
            tracing::debug!(env = %rec.id, owner = %rec.owner, error = %e, "owner has no mail address: no mail");
            return;
        }
        let now = OffsetDateTime::now_utc();
        let caps = self.caps.as_ref().map(|c| c(rec)).unwrap_or_default();
        let (subject, body) = compose(ev, rec, &self.public_url, &caps, now);
        let m = Message {
            version: outbox::FORMAT_VERSION,
            id: ev.message_id(&rec.id),
            env: rec.id.clone(),
            event: ev.name().into(),
            to: rec.owner.clone(),
            subject,
            body,
            created_at: now.replace_nanosecond(0).unwrap_or(now),
            attempts: 0,
            last_error: None,
        };
        match self.outbox.enqueue(&m) {
            Ok(true) => {
                info!(env = %rec.id, owner = %rec.owner, event = ev.name(), mail = %m.id, "mail queued");
                self.wake.notify_one();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(env = %rec.id, owner = %rec.owner, error = %e, "cannot queue mail")
            }
        }
    }

    /// The `mail-outbox` worker: delivers queued messages, retrying with
    /// backoff. Runs until aborted.
    pub fn spawn_sender(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.send_loop().await })
    }

    async fn send_loop(&self) {
        // When each failed message may be tried again (in memory: a
        // restart tries everything at once).
        let mut retry_at: HashMap<String, tokio::time::Instant> = HashMap::new();
        let mut last_prune: Option<tokio::time::Instant> = None;
        loop {
            if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                // Markers outlive any event of their environment.
                self.outbox
                    .prune_sent(self.max_ttl + Duration::from_secs(7 * 86400));
                last_prune = Some(tokio::time::Instant::now());
            }
            let pending = self.outbox.pending();
            retry_at.retain(|id, _| pending.iter().any(|m| &m.id == id));
            for mut m in pending {
                if retry_at
                    .get(&m.id)
                    .is_some_and(|t| *t > tokio::time::Instant::now())
                {
                    continue;
                }
                if self.outbox.is_sent(&m.id) {
                    let _ = self.outbox.mark_sent(&m.id);
                    continue;
                }
                match self.transport.send(&self.from, &m).await {
                    Ok(()) => {
                        if let Err(e) = self.outbox.mark_sent(&m.id) {
                            warn!(mail = %m.id, error = %e, "sent, but cannot mark it sent");
                        }
                        info!(mail = %m.id, env = %m.env, owner = %m.to, event = %m.event, "mail sent");
                        retry_at.remove(&m.id);
                        *self.last_error.lock() = None;
                    }
                    Err(e) if e.permanent() => {
                        self.failed_permanent.fetch_add(1, Ordering::Relaxed);
                        warn!(mail = %m.id, env = %m.env, owner = %m.to, error = %e, "mail cannot be sent, dropped");
                        let _ = self.outbox.mark_sent(&m.id);
                    }
                    Err(e) => {
                        self.failed_retry.fetch_add(1, Ordering::Relaxed);
                        let _ = self.outbox.record_failure(&mut m, &e.to_string());
                        let wait = outbox::backoff(m.attempts);
                        warn!(mail = %m.id, env = %m.env, owner = %m.to, attempts = m.attempts, retry_in = %format_duration(wait), error = %e, "mail not accepted, will retry");
                        retry_at.insert(m.id.clone(), tokio::time::Instant::now() + wait);
                        *self.last_error.lock() = Some(e.to_string());
                    }
                }
            }
            let nap = retry_at
                .values()
                .min()
                .map(|t| t.saturating_duration_since(tokio::time::Instant::now()))
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// The `mail-watcher` worker: offers the due events of this node's
    /// records on every change and at each expiry warning, and the lost
    /// environments of dead nodes when this node is the one to tell.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        envs: Arc<Envs>,
        cluster: Arc<crate::routing::Cluster>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut changes = envs.subscribe();
            loop {
                changes.borrow_and_update();
                let now = OffsetDateTime::now_utc();
                let records = envs.list();
                for rec in &records {
                    for ev in due_events(rec, now, me.warning) {
                        me.event(ev, rec);
                    }
                }
                let view = cluster.view();
                if lost_sender(&view) {
                    for rec in lost_envs(&view) {
                        me.event(Event::Lost, &rec);
                    }
                }
                // Gossip changes are polled; warnings are met on time.
                let nap = next_event_at(&records, now, me.warning)
                    .map(|t| (t - now).unsigned_abs())
                    .unwrap_or(Duration::MAX)
                    .min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(nap) => {}
                    r = changes.changed() => if r.is_err() { return },
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;
    use time::macros::datetime;

    fn rec(status: EnvStatus) -> EnvRecord {
        EnvRecord {
            id: "abc123".into(),
            image: "erp-server:20151103.1".parse().unwrap(),
            owner: "t@example.com".into(),
            node: "worker-2".into(),
            status,
            error: None,
            memory: 1,
            aio: 0,
            env: Default::default(),
            created_at: datetime!(2025-01-01 0:00 UTC),
            ready_at: Some(datetime!(2025-01-01 0:03 UTC)),
            endpoints: vec![Endpoint {
                port: 8080,
                host: "worker-2.lab".into(),
                host_port: 49153,
            }],
            load: Default::default(),
            container: None,
            expires_at: Some(datetime!(2025-01-02 0:00 UTC)),
        }
    }

    #[test]
    fn events_due() {
        let h = Duration::from_secs(3600);
        let check = |r: &EnvRecord, now: OffsetDateTime, want: &[Event]| {
            assert_eq!(due_events(r, now, h), want, "{} at {now}", r.status);
        };
        let ready = rec(EnvStatus::Ready);
        let exp = ready.expires_at.unwrap();
        check(&ready, datetime!(2025-01-01 0:04 UTC), &[Event::Ready]);
        // Long after ready: no ready mail (records older than mail).
        check(&ready, datetime!(2025-01-01 10:00 UTC), &[]);
        check(
            &ready,
            datetime!(2025-01-01 23:00 UTC),
            &[Event::Expiring(exp)],
        );
        check(
            &ready,
            datetime!(2025-01-01 23:59 UTC),
            &[Event::Expiring(exp)],
        );
        check(&ready, datetime!(2025-01-02 0:00 UTC), &[]);
        check(
            &rec(EnvStatus::Failed),
            datetime!(2025-01-01 0:04 UTC),
            &[Event::Failed],
        );
        check(
            &rec(EnvStatus::Loading),
            datetime!(2025-01-01 0:04 UTC),
            &[],
        );
        // A reservation shorter than the warning: no separate warning.
        let mut short = rec(EnvStatus::Ready);
        short.expires_at = Some(datetime!(2025-01-01 0:33 UTC));
        check(&short, datetime!(2025-01-01 0:04 UTC), &[Event::Ready]);
        assert_eq!(
            next_event_at(&[ready.clone(), short], datetime!(2025-01-01 0:04 UTC), h),
            Some(datetime!(2025-01-01 23:00 UTC))
        );
        // Ids: a new expiry makes a new warning.
        assert_eq!(Event::Ready.message_id("e"), "e.ready");
        assert_ne!(
            Event::Expiring(exp).message_id("e"),
            Event::Expiring(exp + time::Duration::hours(4)).message_id("e")
        );
    }

    #[test]
    fn ready_mail_says_everything() {
        let now = datetime!(2025-01-01 0:03 UTC);
        let (subject, body) = compose(
            Event::Ready,
            &rec(EnvStatus::Ready),
            "http://n1:7070",
            &MailCaps {
                extend: "?cap=E".into(),
                ret: "?cap=R".into(),
            },
            now,
        );
        assert!(subject.contains("erp-server:20151103.1") && subject.contains("abc123"));
        for want in [
            "worker-2",
            "http://worker-2.lab:49153/",
            "2025-01-02 00:00 UTC (in 23h57m)",
            "http://n1:7070/envs/abc123\n",
            "http://n1:7070/envs/abc123/extend?cap=E\n",
            "http://n1:7070/envs/abc123/return?cap=R\n",
        ] {
            assert!(body.contains(want), "{want} missing from:\n{body}");
        }
        let mut failed = rec(EnvStatus::Failed);
        failed.error = Some("the container exited with code 3".into());
        let (_, body) = compose(
            Event::Failed,
            &failed,
            "http://n1:7070",
            &MailCaps::default(),
            now,
        );
        assert!(
            body.contains("Reason: the container exited with code 3"),
            "{body}"
        );
    }

    #[test]
    fn lost_mail_comes_from_the_smallest_alive_node() {
        use crate::cluster::keys::EnvSummary;
        use crate::cluster::{NodeFacts, NodeView};
        let node = |name: &str, alive: bool, left: bool, me: &str| NodeView {
            name: name.into(),
            facts: Some(NodeFacts {
                name: name.into(),
                envs: [(
                    "e9".to_string(),
                    EnvSummary {
                        id: "e9".into(),
                        image: "erp:1".into(),
                        owner: "o@example.com".into(),
                        status: "ready".into(),
                        memory: 1,
                        endpoints: vec!["h:1".into()],
                    },
                )]
                .into(),
                ..Default::default()
            }),
            facts_error: None,
            http_error: None,
            alive,
            left,
            is_self: name == me,
            generation: 1,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            heartbeat: 0,
            last_seen: None,
            phi: None,
            state_bytes: 0,
        };
        let view = |me: &str, dead_left: bool| ClusterView {
            self_name: me.into(),
            nodes: vec![
                node("a", false, dead_left, me),
                node("b", true, false, me),
                node("c", true, false, me),
            ],
        };
        // "a" is dead: "b" is the smallest alive node and sends.
        assert!(lost_sender(&view("b", false)));
        assert!(!lost_sender(&view("c", false)));
        let lost = lost_envs(&view("b", false));
        assert_eq!(lost.len(), 1);
        assert_eq!((lost[0].id.as_str(), lost[0].node.as_str()), ("e9", "a"));
        assert_eq!(lost[0].status, EnvStatus::Lost);
        // A clean leave is not a loss.
        assert!(lost_envs(&view("b", true)).is_empty());
        let (subject, body) = compose(
            Event::Lost,
            &lost[0],
            "http://b:7070",
            &MailCaps::default(),
            datetime!(2025-01-01 0:00 UTC),
        );
        assert!(subject.contains("node a is unreachable"), "{subject}");
        assert!(body.contains("never moves or restarts"), "{body}");
    }

    #[test]
    fn addresses() {
        assert!(check_address("t@example.com").is_ok());
        assert!(check_address("Shoal <shoal@box1>").is_ok());
        assert!(check_address("nobody").is_err());
    }
}
