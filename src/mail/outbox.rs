//! The persistent outbox: one JSON file per message under
//! `<data_dir>/outbox/`, written temp + fsync + rename, so a crash leaves a
//! message whole or absent.
//!
//! A message's id is deterministic per (environment, event), so an event
//! seen again after a restart maps to the same file and is queued once.
//! When the mail server accepts a message, a marker `sent/<id>` is written
//! first and the message file removed second: a crash between the two
//! leaves both, and the marker wins (the message is dropped, not resent).
//! A crash after the server accepted but before the marker is the one case
//! that sends twice; SMTP offers nothing better (the `Message-ID` header is
//! the same, so a mail client can tell).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::warn;

use super::MailError;
use crate::envs::write_atomic;

/// Version of the message file format.
pub const FORMAT_VERSION: u32 = 1;

/// One queued mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub version: u32,
    /// `<env>.<event>[.<detail>]`: letters, digits, `.`, `-`, `_`.
    pub id: String,
    pub env: String,
    pub event: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Delivery attempts that failed so far.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Whether `id` is safe as a file name.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The outbox directory.
pub struct Outbox {
    dir: PathBuf,
    sent_dir: PathBuf,
    /// Ids queued or sent, so that watchers re-offering the same event do
    /// not touch the disk each time; a std mutex, held for set operations
    /// and the enqueue file write only (no await inside).
    known: Mutex<HashSet<String>>,
}

impl Outbox {
    pub fn open(dir: &Path) -> Result<Outbox, MailError> {
        let sent_dir = dir.join("sent");
        std::fs::create_dir_all(&sent_dir).map_err(|e| MailError::io(&sent_dir, e))?;
        let ob = Outbox {
            dir: dir.to_path_buf(),
            sent_dir,
            known: Mutex::default(),
        };
        // Leftover temp files of writes that did not finish.
        for d in [&ob.dir, &ob.sent_dir] {
            for e in std::fs::read_dir(d)
                .map_err(|e| MailError::io(d, e))?
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(ob)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn sent_path(&self, id: &str) -> PathBuf {
        self.sent_dir.join(id)
    }

    /// Queues a message unless one with its id is queued or was sent.
    /// Returns whether it was queued now.
    pub fn enqueue(&self, m: &Message) -> Result<bool, MailError> {
        if !valid_id(&m.id) {
            return Err(MailError::BadId(m.id.clone()));
        }
        let mut known = self.known.lock();
        if known.contains(&m.id) {
            return Ok(false);
        }
        if self.path(&m.id).exists() || self.sent_path(&m.id).exists() {
            known.insert(m.id.clone());
            return Ok(false);
        }
        let path = self.path(&m.id);
        let data = serde_json::to_vec_pretty(m).expect("messages serialize");
        write_atomic(&path, &data).map_err(|e| MailError::io(&path, e))?;
        known.insert(m.id.clone());
        Ok(true)
    }

    /// Every queued message, oldest first. Unreadable files are skipped
    /// (and logged), never deleted.
    pub fn pending(&self) -> Vec<Message> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in dir.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Message>(&b).ok())
            {
                Some(m) if m.version == FORMAT_VERSION => out.push(m),
                Some(m) => {
                    warn!(path = %path.display(), version = m.version, "outbox message of an unknown format version left alone")
                }
                None => warn!(path = %path.display(), "unreadable outbox message left alone"),
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    pub fn is_sent(&self, id: &str) -> bool {
        self.sent_path(id).exists()
    }

    /// The server accepted `id`: marker first, then the message goes.
    pub fn mark_sent(&self, id: &str) -> Result<(), MailError> {
        let marker = self.sent_path(id);
        write_atomic(&marker, b"").map_err(|e| MailError::io(&marker, e))?;
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(MailError::io(&path, e)),
            _ => Ok(()),
        }
    }

    /// Records a failed attempt in the message file.
    pub fn record_failure(&self, m: &mut Message, error: &str) -> Result<(), MailError> {
        m.attempts += 1;
        m.last_error = Some(error.to_string());
        let path = self.path(&m.id);
        if !path.exists() {
            return Ok(());
        }
        let data = serde_json::to_vec_pretty(m).expect("messages serialize");
        write_atomic(&path, &data).map_err(|e| MailError::io(&path, e))
    }

    /// Forgets sent markers older than `age`: by then no event of their
    /// environment can come again (it has been reaped).
    pub fn prune_sent(&self, age: Duration) {
        let Ok(dir) = std::fs::read_dir(&self.sent_dir) else {
            return;
        };
        for e in dir.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|el| el > age);
            if old {
                let _ = std::fs::remove_file(e.path());
                let id = e.file_name().to_string_lossy().into_owned();
                self.known.lock().remove(&id);
            }
        }
    }
}

/// Wait before the next attempt after `attempts` failures: 2 s doubling,
/// at most 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    let secs = 2u64.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> Message {
        Message {
            version: FORMAT_VERSION,
            id: id.into(),
            env: "e1".into(),
            event: "ready".into(),
            to: "a@example.com".into(),
            subject: "s".into(),
            body: "b".into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn queued_once_across_reopen_and_after_sending() {
        let tmp = tempfile::tempdir().unwrap();
        let ob = Outbox::open(tmp.path()).unwrap();
        assert!(ob.enqueue(&msg("e1.ready")).unwrap());
        assert!(!ob.enqueue(&msg("e1.ready")).unwrap());
        assert!(ob.enqueue(&msg("e1.failed")).unwrap());
        // A restart: a fresh outbox on the same directory.
        let ob = Outbox::open(tmp.path()).unwrap();
        assert!(!ob.enqueue(&msg("e1.ready")).unwrap());
        let ids: Vec<String> = ob.pending().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["e1.failed", "e1.ready"]);
        ob.mark_sent("e1.ready").unwrap();
        assert_eq!(ob.pending().len(), 1);
        let ob = Outbox::open(tmp.path()).unwrap();
        assert!(ob.is_sent("e1.ready"));
        assert!(
            !ob.enqueue(&msg("e1.ready")).unwrap(),
            "sent is never requeued"
        );
        let mut m = ob.pending().remove(0);
        ob.record_failure(&mut m, "connection refused").unwrap();
        let back = ob.pending().remove(0);
        assert_eq!(
            (back.attempts, back.last_error.as_deref()),
            (1, Some("connection refused"))
        );
        assert!(ob.enqueue(&msg("../x")).is_err());
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let s: Vec<u64> = [1, 2, 3, 4, 8, 9, 50]
            .iter()
            .map(|&n| backoff(n).as_secs())
            .collect();
        assert_eq!(s, [2, 4, 8, 16, 256, 300, 300]);
    }
}
