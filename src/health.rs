//! Whether this node can do its job: the state of its Docker engine as a
//! node fact, and the `/healthz` verdict.
//!
//! - [`Tracker`] is the engine's health state machine (pure, table-tested):
//!   probes go in, a state (`ok`, `unreachable`, `hung`) with since-when
//!   and the last short reason comes out. Two failed probes in a row take
//!   the engine down (one slow ping on a busy host is not an outage); one
//!   answer brings it back.
//! - [`run_engine_monitor`] is the `engine-health` worker: it pings the
//!   engine every [`PROBE_INTERVAL`] (each ping bounded by
//!   [`limits::PING`]), publishes the state on a `watch` that admission,
//!   reconcile and the gossip publisher read, and when the engine comes
//!   back asks the environments to re-adopt their containers.
//! - [`assess`] turns what the node knows about itself (engine, state lock,
//!   store, workers, draining) into the `/healthz` answer (pure).
//!
//! "Unreachable" means nothing answers on the socket (the engine died or was
//! never started); "hung" means a connection is taken but no answer comes
//! (a frozen engine). Neither says anything about the containers, which
//! keep running under containerd: environments are never failed because
//! their engine does not answer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::docker::{limits, NoAnswer};
use crate::workers::{WorkerState, WorkerStatus};

/// How often the monitor pings the engine.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Failed probes in a row before the engine counts as down.
pub const FAILS_TO_DOWN: u32 = 2;

/// The engine's state as the node reports and gossips it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    /// The engine answers.
    #[default]
    Ok,
    /// Nothing answers on the engine's socket.
    Unreachable,
    /// The socket takes connections but the engine does not answer.
    Hung,
}

impl EngineState {
    pub fn as_str(&self) -> &'static str {
        match self {
            EngineState::Ok => "ok",
            EngineState::Unreachable => "unreachable",
            EngineState::Hung => "hung",
        }
    }

    pub fn is_ok(&self) -> bool {
        *self == EngineState::Ok
    }
}

impl std::fmt::Display for EngineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "ok" => Ok(EngineState::Ok),
            "unreachable" => Ok(EngineState::Unreachable),
            "hung" => Ok(EngineState::Hung),
            _ => Err(()),
        }
    }
}

/// The engine's health as `GET /v1/node` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EngineHealth {
    pub state: EngineState,
    /// When the engine entered this state (for a down engine: its first
    /// failed probe in a row).
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The last probe.
    #[serde(with = "time::serde::rfc3339::option")]
    pub checked_at: Option<OffsetDateTime>,
    /// The short reason of the last failed probe, kept after a recovery.
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_error_at: Option<OffsetDateTime>,
}

impl Default for EngineHealth {
    /// Ok since the epoch: what a node from before engine health reports.
    fn default() -> Self {
        EngineHealth::ok_since(OffsetDateTime::UNIX_EPOCH)
    }
}

impl EngineHealth {
    /// A healthy engine since `now` (the daemon connected to it at start).
    pub fn ok_since(now: OffsetDateTime) -> EngineHealth {
        EngineHealth {
            state: EngineState::Ok,
            since: now,
            checked_at: None,
            last_error: None,
            last_error_at: None,
        }
    }

    /// A sentence for refusals and `/healthz`: `engine unreachable since
    /// 2026-12-01T22:00:00Z (connection refused)`.
    pub fn describe(&self) -> String {
        let since = self
            .since
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        match (&self.state, &self.last_error) {
            (EngineState::Ok, _) => format!("engine ok since {since}"),
            (s, Some(e)) => format!("engine {s} since {since} ({e})"),
            (s, None) => format!("engine {s} since {since}"),
        }
    }
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Answered,
    Unreachable(String),
    Hung(String),
}

impl Probe {
    /// The probe a failed engine call amounts to; `Answered` when the
    /// engine answered, even with an error.
    pub fn from_error(e: &crate::docker::DockerError) -> Probe {
        match e.no_answer() {
            None => Probe::Answered,
            Some(NoAnswer::Unreachable(why)) => Probe::Unreachable(why.to_string()),
            Some(NoAnswer::Hung) => Probe::Hung(match e {
                crate::docker::DockerError::Timeout { after, .. } => {
                    format!("no answer within {}", crate::units::format_duration(*after))
                }
                _ => "no answer".into(),
            }),
        }
    }
}

/// The engine's health state machine (see the module header).
#[derive(Debug, Clone)]
pub struct Tracker {
    health: EngineHealth,
    failures: u32,
    /// When the current run of failures began.
    failing_since: Option<OffsetDateTime>,
}

impl Tracker {
    pub fn new(now: OffsetDateTime) -> Tracker {
        Tracker {
            health: EngineHealth::ok_since(now),
            failures: 0,
            failing_since: None,
        }
    }

    pub fn health(&self) -> &EngineHealth {
        &self.health
    }

    /// Takes one probe's result; returns whether the state changed.
    pub fn observe(&mut self, probe: Probe, now: OffsetDateTime) -> bool {
        self.health.checked_at = Some(now);
        let (down_as, why) = match probe {
            Probe::Answered => {
                self.failures = 0;
                self.failing_since = None;
                if self.health.state.is_ok() {
                    return false;
                }
                self.health.state = EngineState::Ok;
                self.health.since = now;
                return true;
            }
            Probe::Unreachable(why) => (EngineState::Unreachable, why),
            Probe::Hung(why) => (EngineState::Hung, why),
        };
        self.failures = self.failures.saturating_add(1);
        let first = *self.failing_since.get_or_insert(now);
        self.health.last_error = Some(why);
        self.health.last_error_at = Some(now);
        if self.health.state == down_as {
            return false;
        }
        if self.health.state.is_ok() {
            if self.failures < FAILS_TO_DOWN {
                return false;
            }
            self.health.since = first;
        } else {
            // Hung, then killed (or the reverse): still down, another way.
            self.health.since = now;
        }
        self.health.state = down_as;
        true
    }
}

/// The `engine-health` worker: pings the engine forever, publishing every
/// change of state on `envs`' engine watch. When the engine comes back,
/// the environments re-adopt their containers at once.
pub async fn run_engine_monitor(envs: std::sync::Arc<crate::envs::Envs>) {
    let mut tracker = Tracker::new(envs.engine_health().since);
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probe = match envs.engine().ping(limits::PING).await {
            Ok(()) => Probe::Answered,
            Err(e) => match Probe::from_error(&e) {
                // The engine answered the ping with an error: it is up.
                Probe::Answered => Probe::Answered,
                p => p,
            },
        };
        let was_ok = tracker.health().state.is_ok();
        let changed = tracker.observe(probe, OffsetDateTime::now_utc());
        let health = tracker.health().clone();
        if changed {
            if health.state.is_ok() {
                tracing::info!(node = %envs.settings().name, "docker engine answers again");
            } else {
                tracing::warn!(
                    node = %envs.settings().name,
                    state = %health.state,
                    reason = health.last_error.as_deref().unwrap_or(""),
                    "docker engine down: taking no new environments, running ones are left alone"
                );
            }
        }
        envs.set_engine_health(health, changed);
        if changed && !was_ok {
            envs.readopt().await;
        }
    }
}

/// How long `/healthz` waits for a stat of the store directory.
pub const STORE_WAIT: Duration = Duration::from_secs(2);

/// A bounded stat of the store directory, one at a time: a store that
/// hangs (a dead network or FUSE mount) blocks one blocking thread, never
/// the caller, and never more than one thread however often `/healthz` is
/// asked.
#[derive(Default)]
pub struct StoreProbe {
    busy: Arc<AtomicBool>,
    last: Arc<Mutex<Option<Result<(), String>>>>,
}

impl StoreProbe {
    pub async fn check(&self, root: PathBuf) -> Result<(), String> {
        let no_answer = || {
            Err(format!(
                "the store does not answer within {}",
                crate::units::format_duration(STORE_WAIT)
            ))
        };
        let deadline = tokio::time::Instant::now() + STORE_WAIT;
        if self.busy.swap(true, Ordering::SeqCst) {
            // Another check runs: wait for its answer, as long as ours would.
            while self.busy.load(Ordering::SeqCst) {
                if tokio::time::Instant::now() >= deadline {
                    return no_answer();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            return self.last.lock().clone().unwrap_or(Ok(()));
        }
        let (busy, last) = (self.busy.clone(), self.last.clone());
        let task = tokio::task::spawn_blocking(move || {
            let r = match std::fs::metadata(&root) {
                Ok(md) if md.is_dir() => Ok(()),
                Ok(_) => Err("the store path is not a directory".to_string()),
                Err(e) => Err(format!("the store cannot be read ({})", e.kind())),
            };
            *last.lock() = Some(r.clone());
            busy.store(false, Ordering::SeqCst);
            r
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the store check failed".into()),
            Err(_) => no_answer(),
        }
    }
}

/// What `/healthz` looks at, gathered by the caller (each cheap).
#[derive(Debug, Clone)]
pub struct HealthInputs {
    pub engine: EngineHealth,
    /// The environments' state lock could be taken (or why not).
    pub state_lock: Result<(), String>,
    /// The store directory answered a stat (or why not).
    pub store: Result<(), String>,
    /// Gossip still runs (or why not).
    pub gossip: Result<(), String>,
    pub workers: Vec<WorkerStatus>,
    pub draining: bool,
}

/// One thing that keeps the node from doing its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `engine`, `state`, `store`, `gossip`, `worker`, `draining`.
    pub check: String,
    pub error: String,
}

/// The `/healthz` answer: `ok` only with no problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// `ok` or `unhealthy`.
    pub status: String,
    /// The first problem, as a sentence (absent when ok), so the body has
    /// the same `error` as every other error answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub problems: Vec<Problem>,
    pub engine: EngineHealth,
}

impl HealthReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The verdict (pure).
pub fn assess(i: &HealthInputs) -> HealthReport {
    let mut problems = Vec::new();
    let mut add = |check: &str, error: String| {
        problems.push(Problem {
            check: check.into(),
            error,
        })
    };
    if !i.engine.state.is_ok() {
        add("engine", i.engine.describe());
    }
    if let Err(e) = &i.state_lock {
        add("state", e.clone());
    }
    if let Err(e) = &i.store {
        add("store", e.clone());
    }
    if let Err(e) = &i.gossip {
        add("gossip", e.clone());
    }
    for w in &i.workers {
        match w.state {
            WorkerState::Running => {}
            WorkerState::Stopped => add("worker", format!("worker {} stopped", w.name)),
            WorkerState::Failed => add(
                "worker",
                format!(
                    "worker {} failed: {}",
                    w.name,
                    w.error.as_deref().unwrap_or("panicked")
                ),
            ),
        }
    }
    if i.draining {
        add(
            "draining",
            "node is draining and takes no new environments".into(),
        );
    }
    HealthReport {
        status: if problems.is_empty() {
            "ok"
        } else {
            "unhealthy"
        }
        .into(),
        error: problems.first().map(|p| p.error.clone()),
        problems,
        engine: i.engine.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn t(s: i64) -> OffsetDateTime {
        datetime!(2026-12-01 22:00 UTC) + time::Duration::seconds(s)
    }

    fn refused() -> Probe {
        Probe::Unreachable("connection refused".into())
    }

    fn hung() -> Probe {
        Probe::Hung("no answer within 5s".into())
    }

    /// Feeds probes at t = 1, 2, 3, … and checks (changed, state, since)
    /// after each.
    fn run(probes: Vec<(Probe, bool, EngineState, i64)>) {
        let mut tr = Tracker::new(t(0));
        for (i, (p, changed, state, since)) in probes.into_iter().enumerate() {
            let now = t(i as i64 + 1);
            let desc = format!("step {} ({p:?})", i + 1);
            assert_eq!(tr.observe(p, now), changed, "{desc}: changed");
            assert_eq!(tr.health().state, state, "{desc}: state");
            assert_eq!(tr.health().since, t(since), "{desc}: since");
            assert_eq!(tr.health().checked_at, Some(now), "{desc}: checked_at");
        }
    }

    #[test]
    fn state_machine_table() {
        use EngineState::*;
        let a = || Probe::Answered;
        // Healthy stays healthy.
        run(vec![(a(), false, Ok, 0), (a(), false, Ok, 0)]);
        // One failure is not an outage; an answer clears it.
        run(vec![
            (refused(), false, Ok, 0),
            (a(), false, Ok, 0),
            (refused(), false, Ok, 0),
            (a(), false, Ok, 0),
        ]);
        // Two refusals in a row: unreachable since the first; one answer
        // brings it back, since then.
        run(vec![
            (refused(), false, Ok, 0),
            (refused(), true, Unreachable, 1),
            (refused(), false, Unreachable, 1),
            (a(), true, Ok, 4),
        ]);
        // Two timeouts: hung.
        run(vec![(hung(), false, Ok, 0), (hung(), true, Hung, 1)]);
        // A mixed run of failures goes down as the latest kind.
        run(vec![
            (hung(), false, Ok, 0),
            (refused(), true, Unreachable, 1),
        ]);
        // Hung, then killed: unreachable from then on.
        run(vec![
            (hung(), false, Ok, 0),
            (hung(), true, Hung, 1),
            (refused(), true, Unreachable, 3),
            (refused(), false, Unreachable, 3),
        ]);
    }

    #[test]
    fn last_error_is_kept_after_recovery() {
        let mut tr = Tracker::new(t(0));
        tr.observe(refused(), t(1));
        tr.observe(refused(), t(2));
        tr.observe(Probe::Answered, t(3));
        let h = tr.health();
        assert_eq!(h.state, EngineState::Ok);
        assert_eq!(h.last_error.as_deref(), Some("connection refused"));
        assert_eq!(h.last_error_at, Some(t(2)));
        assert_eq!(h.describe(), "engine ok since 2026-12-01T22:00:03Z");
        tr.observe(hung(), t(4));
        tr.observe(hung(), t(5));
        assert_eq!(
            tr.health().describe(),
            "engine hung since 2026-12-01T22:00:04Z (no answer within 5s)"
        );
    }

    fn worker(name: &str, state: WorkerState, error: Option<&str>) -> WorkerStatus {
        WorkerStatus {
            name: name.into(),
            state,
            started_at: t(0),
            ended_at: None,
            error: error.map(String::from),
        }
    }

    fn inputs() -> HealthInputs {
        HealthInputs {
            engine: EngineHealth::ok_since(t(0)),
            state_lock: Ok(()),
            store: Ok(()),
            gossip: Ok(()),
            workers: vec![worker("reconcile", WorkerState::Running, None)],
            draining: false,
        }
    }

    #[test]
    fn assess_table() {
        let mut tr = Tracker::new(t(0));
        tr.observe(refused(), t(1));
        tr.observe(refused(), t(2));
        let down = tr.health().clone();
        type Edit = Box<dyn Fn(&mut HealthInputs)>;
        type Want = Vec<(&'static str, &'static str)>;
        let cases: Vec<(&str, Edit, Want)> = vec![
            ("healthy", Box::new(|_| {}), vec![]),
            (
                "engine down",
                Box::new(move |i| i.engine = down.clone()),
                vec![(
                    "engine",
                    "engine unreachable since 2026-12-01T22:00:01Z (connection refused)",
                )],
            ),
            (
                "wedged lock",
                Box::new(|i| i.state_lock = Err("the state lock is held".into())),
                vec![("state", "the state lock is held")],
            ),
            (
                "store",
                Box::new(|i| i.store = Err("the store does not answer".into())),
                vec![("store", "the store does not answer")],
            ),
            (
                "gossip",
                Box::new(|i| i.gossip = Err("gossip stopped".into())),
                vec![("gossip", "gossip stopped")],
            ),
            (
                "failed and stopped workers",
                Box::new(|i| {
                    i.workers
                        .push(worker("reaper", WorkerState::Failed, Some("boom")));
                    i.workers
                        .push(worker("mail-outbox", WorkerState::Stopped, None));
                }),
                vec![
                    ("worker", "worker reaper failed: boom"),
                    ("worker", "worker mail-outbox stopped"),
                ],
            ),
            (
                "draining",
                Box::new(|i| i.draining = true),
                vec![("draining", "node is draining and takes no new environments")],
            ),
        ];
        for (name, edit, want) in cases {
            let mut i = inputs();
            edit(&mut i);
            let r = assess(&i);
            let got: Vec<(&str, &str)> = r
                .problems
                .iter()
                .map(|p| (p.check.as_str(), p.error.as_str()))
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(r.is_ok(), want.is_empty(), "{name}");
            assert_eq!(r.status, if want.is_empty() { "ok" } else { "unhealthy" });
            assert_eq!(r.error.as_deref(), want.first().map(|w| w.1), "{name}");
        }
    }

    #[tokio::test]
    async fn store_probe_answers_for_a_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let probe = StoreProbe::default();
        assert_eq!(probe.check(tmp.path().to_path_buf()).await, Ok(()));
        assert_eq!(
            probe.check(file).await,
            Err("the store path is not a directory".into())
        );
        let missing = probe.check(tmp.path().join("gone")).await.unwrap_err();
        assert!(missing.starts_with("the store cannot be read"), "{missing}");
        assert!(!missing.contains("gone"), "no paths: {missing}");
        // Concurrent checks share one stat at a time and all answer.
        let (a, b) = tokio::join!(
            probe.check(tmp.path().to_path_buf()),
            probe.check(tmp.path().to_path_buf())
        );
        assert_eq!((a, b), (Ok(()), Ok(())));
    }

    #[test]
    fn states_read_and_print() {
        for s in [EngineState::Ok, EngineState::Unreachable, EngineState::Hung] {
            assert_eq!(s.as_str().parse::<EngineState>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("down".parse::<EngineState>().is_err());
    }
}
