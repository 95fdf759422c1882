//! Reservations: how long an environment is held, how far it may be
//! extended, and the reaper that deletes it when its time is up.
//!
//! The arithmetic ([`initial_expiry`], [`extend`], [`due`], [`next_due`]) is
//! pure; [`run`] is the thin loop around it. The loop only ever looks at
//! the records of its own node (the `Target`), so an environment is reaped
//! by the node that owns it and by no other: no master, no double delete.
//! An expiry that passed while the node was down is due at once when the
//! loop first looks, right after the daemon starts.
//!
//! The loop takes its notion of "now" as a function, so tests drive it on
//! tokio's paused clock ([`TokioClock`]) instead of sleeping.

use std::future::Future;
use std::time::Duration;

use time::OffsetDateTime;
use tracing::{info, warn};

use crate::model::EnvRecord;
use crate::units::format_duration;

/// The longest the loop sleeps without looking again (wall clock changes,
/// a missed wake-up): a safety net, not the schedule.
pub const MAX_NAP: Duration = Duration::from_secs(60);

/// A delete that failed is tried again after this.
pub const RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReservationError {
    #[error("a reservation of {asked} is longer than the maximum of {max} (max_ttl)")]
    TooLong { asked: String, max: String },
    #[error("extending by {by} would end the reservation {ahead} from now, past the maximum of {max} (max_ttl)")]
    PastMax {
        by: String,
        ahead: String,
        max: String,
    },
    #[error("an extension must be longer than 0s")]
    Zero,
}

fn dur(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// The expiry of a new environment: `ttl` (or `default_ttl`) from `now`,
/// refused when longer than `max_ttl`.
pub fn initial_expiry(
    now: OffsetDateTime,
    ttl: Option<Duration>,
    default_ttl: Duration,
    max_ttl: Duration,
) -> Result<OffsetDateTime, ReservationError> {
    let ttl = ttl.unwrap_or(default_ttl.min(max_ttl));
    if ttl > max_ttl {
        return Err(ReservationError::TooLong {
            asked: format_duration(ttl),
            max: format_duration(max_ttl),
        });
    }
    now.checked_add(dur(ttl))
        .ok_or_else(|| ReservationError::TooLong {
            asked: format_duration(ttl),
            max: format_duration(max_ttl),
        })
}

/// A later expiry: `current + by`, which may not lie more than `max_ttl`
/// after `now` (a tester who still works can keep extending, but nobody
/// holds an environment for weeks with one click).
pub fn extend(
    current: OffsetDateTime,
    by: Duration,
    now: OffsetDateTime,
    max_ttl: Duration,
) -> Result<OffsetDateTime, ReservationError> {
    if by.is_zero() {
        return Err(ReservationError::Zero);
    }
    // Checked: `by` comes from a request and may be absurd.
    let past_max = |ahead: Duration| ReservationError::PastMax {
        by: format_duration(by),
        ahead: format_duration(Duration::from_secs(ahead.as_secs())),
        max: format_duration(max_ttl),
    };
    let new = current
        .max(now)
        .checked_add(dur(by))
        .ok_or_else(|| past_max(by))?;
    if now
        .checked_add(dur(max_ttl))
        .is_some_and(|limit| new > limit)
    {
        return Err(past_max((new - now).unsigned_abs()));
    }
    Ok(new)
}

/// The environments whose reservation has ended at `now`, oldest expiry
/// first.
pub fn due(records: &[EnvRecord], now: OffsetDateTime) -> Vec<EnvRecord> {
    let mut v: Vec<EnvRecord> = records.iter().filter(|r| is_due(r, now)).cloned().collect();
    v.sort_by_key(|r| r.expires_at);
    v
}

/// Whether the reservation of `rec` has ended at `now`.
pub fn is_due(rec: &EnvRecord, now: OffsetDateTime) -> bool {
    rec.expires_at.is_some_and(|e| e <= now)
}

/// The next expiry after `now`, if any.
pub fn next_due(records: &[EnvRecord], now: OffsetDateTime) -> Option<OffsetDateTime> {
    records
        .iter()
        .filter_map(|r| r.expires_at)
        .filter(|e| *e > now)
        .min()
}

/// What the reaper works on: the records of one node.
pub trait Target: Send + Sync {
    fn records(&self) -> Vec<EnvRecord>;
    /// Deletes environment `id` (and says so to its owner) if its
    /// reservation is still over at `now`: re-checked with [`is_due`] under
    /// the target's own lock at delete time, so an extension made since the
    /// loop's snapshot wins. `Ok(false)`: kept (extended, or already gone).
    fn expire_if_due(
        &self,
        id: &str,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<bool, String>> + Send;
    /// Changes to the records (a new environment, an extension).
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Wall time that moves with tokio's clock: paused in tests, real in
/// production (where it is the system clock as of the start, advanced by
/// the monotonic clock).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: OffsetDateTime,
    at: tokio::time::Instant,
}

impl TokioClock {
    pub fn start_at(wall: OffsetDateTime) -> TokioClock {
        TokioClock {
            wall,
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        self.wall + dur(self.at.elapsed())
    }
}

/// The reaper: deletes every environment of `target` whose reservation
/// ended, then sleeps until the next expiry or a change. Runs until
/// aborted.
pub async fn run<T: Target>(target: T, now: impl Fn() -> OffsetDateTime + Send) {
    let mut changes = target.subscribe();
    loop {
        let t = now();
        let records = target.records();
        let mut failed = false;
        for rec in due(&records, t) {
            // The snapshot may be stale by now (an earlier delete took a
            // while): the target re-checks at the time of the delete.
            match target.expire_if_due(&rec.id, now()).await {
                Ok(true) => {
                    info!(env = %rec.id, owner = %rec.owner, expires_at = ?rec.expires_at, "reservation ended: deleted")
                }
                Ok(false) => {
                    info!(env = %rec.id, "reservation extended or environment gone meanwhile: kept")
                }
                Err(e) => {
                    warn!(env = %rec.id, error = %e, "reaper could not delete the environment");
                    failed = true;
                }
            }
        }
        let t = now();
        let mut nap = next_due(&target.records(), t)
            .map(|e| (e - t).unsigned_abs())
            .unwrap_or(MAX_NAP)
            .min(MAX_NAP);
        if failed {
            nap = nap.min(RETRY);
        }
        changes.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// The daemon's target: this node's [`crate::envs::Envs`], with an expiry
/// mail queued before the delete.
pub struct EnvsTarget {
    pub envs: std::sync::Arc<crate::envs::Envs>,
    pub mail: std::sync::Arc<crate::mail::Mailer>,
}

impl Target for EnvsTarget {
    fn records(&self) -> Vec<EnvRecord> {
        self.envs.list()
    }

    async fn expire_if_due(&self, id: &str, now: OffsetDateTime) -> Result<bool, String> {
        // The mail is queued once the delete is decided, before the
        // container goes.
        let mail = &self.mail;
        let deleted = self
            .envs
            .delete_if(
                id,
                |r| r.status != crate::model::EnvStatus::Deleted && is_due(r, now),
                |r| mail.event(crate::mail::Event::Expired, r),
            )
            .await;
        match deleted {
            Ok(d) => Ok(d.is_some()),
            Err(crate::envs::EnvError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.envs.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use time::macros::datetime;

    const H: u64 = 3600;

    #[test]
    fn initial_expiry_cases() {
        let now = datetime!(2025-01-01 0:00 UTC);
        let (d, m) = (Duration::from_secs(24 * H), Duration::from_secs(99 * H));
        let check = |ttl: Option<u64>, want: Result<OffsetDateTime, ()>| {
            let got = initial_expiry(now, ttl.map(Duration::from_secs), d, m).map_err(|_| ());
            assert_eq!(got, want, "{ttl:?}");
        };
        check(None, Ok(datetime!(2025-01-02 0:00 UTC)));
        check(Some(8 * H), Ok(datetime!(2025-01-01 8:00 UTC)));
        check(Some(99 * H), Ok(now + time::Duration::hours(99)));
        check(Some(99 * H + 1), Err(()));
        let e = initial_expiry(now, Some(Duration::from_secs(100 * H)), d, m).unwrap_err();
        assert!(e.to_string().contains("4d3h"), "{e}");
    }

    #[test]
    fn extend_cases() {
        let now = datetime!(2025-01-01 0:00 UTC);
        let max = Duration::from_secs(99 * H);
        let h = |n: i64| now + time::Duration::hours(n);
        let check = |current, by: u64, want: Result<OffsetDateTime, ()>| {
            let got = extend(current, Duration::from_secs(by * H), now, max).map_err(|_| ());
            assert_eq!(got, want, "{current} + {by}h");
        };
        check(h(24), 4, Ok(h(28)));
        check(h(24), 75, Ok(h(99)));
        check(h(24), 76, Err(()));
        check(h(99), 1, Err(()));
        // Already expired (not yet reaped): extended from now.
        check(h(-2), 4, Ok(h(4)));
        assert_eq!(
            extend(h(1), Duration::ZERO, now, max),
            Err(ReservationError::Zero)
        );
        let e = extend(h(24), Duration::from_secs(80 * H), now, max).unwrap_err();
        assert!(
            e.to_string().contains("max_ttl") && e.to_string().contains("4d3h"),
            "{e}"
        );
        // Absurd lengths are refused, never an overflow panic.
        check(h(24), 99_999_999_999, Err(()));
        for by in [Duration::MAX, Duration::from_secs(u64::MAX)] {
            assert!(matches!(
                extend(h(24), by, now, max),
                Err(ReservationError::PastMax { .. })
            ));
            assert!(extend(h(24), by, now, Duration::MAX).is_err());
            assert!(initial_expiry(now, Some(by), max, Duration::MAX).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn reservation_arithmetic_never_panics(
            secs in proptest::prelude::any::<u64>(),
            max in proptest::prelude::any::<u64>(),
            offset in -1_000_000_000i64..1_000_000_000,
        ) {
            let now = datetime!(2025-01-01 0:00 UTC);
            let current = now + time::Duration::seconds(offset);
            let (by, max) = (Duration::from_secs(secs), Duration::from_secs(max));
            if let Ok(new) = extend(current, by, now, max) {
                proptest::prop_assert!(new > now.min(current));
            }
            let _ = initial_expiry(now, Some(by), by, max);
        }
    }

    fn rec(id: &str, expires_at: Option<OffsetDateTime>) -> EnvRecord {
        EnvRecord {
            id: id.into(),
            image: "demo:1".parse().unwrap(),
            owner: "o@example.com".into(),
            node: "n1".into(),
            status: crate::model::EnvStatus::Ready,
            error: None,
            memory: 1,
            aio: 0,
            env: Default::default(),
            created_at: datetime!(2025-01-01 0:00 UTC),
            ready_at: None,
            endpoints: vec![],
            load: Default::default(),
            container: None,
            expires_at,
        }
    }

    #[test]
    fn due_and_next() {
        let t = datetime!(2025-01-01 12:00 UTC);
        let recs = vec![
            rec("late", Some(t + time::Duration::hours(2))),
            rec("past", Some(t - time::Duration::hours(1))),
            rec("now", Some(t)),
            rec("soon", Some(t + time::Duration::minutes(5))),
            rec("none", None),
        ];
        let ids: Vec<String> = due(&recs, t).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["past", "now"]);
        assert_eq!(next_due(&recs, t), Some(t + time::Duration::minutes(5)));
        assert_eq!(next_due(&[], t), None);
    }

    /// Records in memory; `expire` removes and remembers when (by the
    /// test's clock).
    #[derive(Clone)]
    struct Fake {
        recs: Arc<Mutex<Vec<EnvRecord>>>,
        expired: Arc<Mutex<Vec<(String, OffsetDateTime)>>>,
        tx: Arc<tokio::sync::watch::Sender<u64>>,
        clock: TokioClock,
        /// Deletes that take this long (a slow engine), by id.
        slow: Arc<Mutex<Vec<(String, Duration)>>>,
    }

    impl Fake {
        fn new(clock: TokioClock, recs: Vec<EnvRecord>) -> Fake {
            Fake {
                recs: Arc::new(Mutex::new(recs)),
                expired: Arc::default(),
                tx: Arc::new(tokio::sync::watch::channel(0).0),
                clock,
                slow: Arc::default(),
            }
        }
        fn change(&self, f: impl FnOnce(&mut Vec<EnvRecord>)) {
            f(&mut self.recs.lock().unwrap());
            self.tx.send_modify(|v| *v += 1);
        }
        fn expired(&self) -> Vec<String> {
            self.expired
                .lock()
                .unwrap()
                .iter()
                .map(|(i, _)| i.clone())
                .collect()
        }
    }

    impl Target for Fake {
        fn records(&self) -> Vec<EnvRecord> {
            self.recs.lock().unwrap().clone()
        }
        /// Like the real target: the re-check and the removal under one
        /// lock, then the slow part (the engine) outside it.
        async fn expire_if_due(&self, id: &str, now: OffsetDateTime) -> Result<bool, String> {
            {
                let mut recs = self.recs.lock().unwrap();
                if !recs.iter().any(|r| r.id == id && is_due(r, now)) {
                    return Ok(false);
                }
                recs.retain(|r| r.id != id);
            }
            let slow = self
                .slow
                .lock()
                .unwrap()
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, d)| *d);
            if let Some(d) = slow {
                tokio::time::sleep(d).await;
            }
            self.expired
                .lock()
                .unwrap()
                .push((id.to_string(), self.clock.now()));
            Ok(true)
        }
        fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
            self.tx.subscribe()
        }
    }

    /// Lets the reaper task run at the current paused instant.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reaps_on_time_on_the_paused_clock() {
        let t0 = datetime!(2025-01-01 0:00 UTC);
        let clock = TokioClock::start_at(t0);
        let fake = Fake::new(
            clock,
            vec![
                rec("a", Some(t0 + time::Duration::hours(8))),
                rec("b", Some(t0 + time::Duration::hours(24))),
            ],
        );
        let task = tokio::spawn(run(fake.clone(), move || clock.now()));
        settle().await;
        assert!(fake.expired().is_empty());
        tokio::time::sleep(Duration::from_secs(8 * H - 1)).await;
        settle().await;
        assert!(fake.expired().is_empty(), "not a second early");
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(fake.expired(), ["a"]);
        let at = fake.expired.lock().unwrap()[0].1;
        assert_eq!(at, t0 + time::Duration::hours(8));

        // A new environment with an early expiry wakes the reaper.
        fake.change(|v| v.push(rec("c", Some(clock.now() + time::Duration::minutes(1)))));
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(fake.expired(), ["a", "c"]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn extension_up_to_the_maximum_moves_the_reaping() {
        let t0 = datetime!(2025-01-01 0:00 UTC);
        let clock = TokioClock::start_at(t0);
        let max = Duration::from_secs(99 * H);
        let fake = Fake::new(clock, vec![rec("a", Some(t0 + time::Duration::hours(24)))]);
        let task = tokio::spawn(run(fake.clone(), move || clock.now()));
        settle().await;
        tokio::time::sleep(Duration::from_secs(23 * H)).await;
        // One hour left: extend by 4h, then as far as the maximum allows.
        let extend_a = |by: u64| {
            let mut result = Err(ReservationError::Zero);
            fake.change(|v| {
                let r = &mut v[0];
                result = extend(
                    r.expires_at.unwrap(),
                    Duration::from_secs(by),
                    clock.now(),
                    max,
                );
                if let Ok(e) = result {
                    r.expires_at = Some(e);
                }
            });
            result
        };
        assert_eq!(extend_a(4 * H), Ok(t0 + time::Duration::hours(28)));
        assert!(matches!(
            extend_a(95 * H),
            Err(ReservationError::PastMax { .. })
        ));
        assert_eq!(
            extend_a(94 * H),
            Ok(clock.now() + time::Duration::hours(99))
        );
        settle().await;
        // The old expiry passes: nothing happens.
        tokio::time::sleep(Duration::from_secs(6 * H)).await;
        settle().await;
        assert!(fake.expired().is_empty());
        // The extended one is met to the second.
        tokio::time::sleep(Duration::from_secs(93 * H - 1)).await;
        settle().await;
        assert!(fake.expired().is_empty());
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(fake.expired(), ["a"]);
        assert_eq!(
            fake.expired.lock().unwrap()[0].1,
            t0 + time::Duration::hours(23 + 99)
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_while_the_node_was_down_happens_at_start() {
        // The node comes back at t0; one reservation ended an hour ago.
        let t0 = datetime!(2025-01-01 0:00 UTC);
        let clock = TokioClock::start_at(t0);
        let fake = Fake::new(
            clock,
            vec![
                rec("gone-while-down", Some(t0 - time::Duration::hours(1))),
                rec("still-held", Some(t0 + time::Duration::hours(1))),
            ],
        );
        let task = tokio::spawn(run(fake.clone(), move || clock.now()));
        settle().await;
        assert_eq!(fake.expired(), ["gone-while-down"]);
        assert_eq!(
            fake.expired.lock().unwrap()[0].1,
            t0,
            "at once, no time passed"
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_extension_made_while_the_reaper_deletes_another_is_kept() {
        // `a` and `b` end at the same time; deleting `a` takes a minute (a
        // slow engine), and `b` is extended by 4h during that minute.
        let t0 = datetime!(2025-01-01 0:00 UTC);
        let clock = TokioClock::start_at(t0);
        let end = t0 + time::Duration::hours(1);
        let fake = Fake::new(clock, vec![rec("a", Some(end)), rec("b", Some(end))]);
        fake.slow
            .lock()
            .unwrap()
            .push(("a".into(), Duration::from_secs(60)));
        let task = tokio::spawn(run(fake.clone(), move || clock.now()));
        settle().await;
        tokio::time::sleep(Duration::from_secs(H)).await;
        settle().await;
        // The reaper took its snapshot and is busy deleting `a`.
        assert!(fake.expired().is_empty());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let max = Duration::from_secs(99 * H);
        fake.change(|v| {
            let r = v.iter_mut().find(|r| r.id == "b").unwrap();
            r.expires_at = Some(
                extend(
                    r.expires_at.unwrap(),
                    Duration::from_secs(4 * H),
                    clock.now(),
                    max,
                )
                .unwrap(),
            );
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(fake.expired(), ["a"], "the extended one was deleted");
        // `b` goes at its new expiry.
        tokio::time::sleep(Duration::from_secs(4 * H)).await;
        settle().await;
        assert_eq!(fake.expired(), ["a", "b"]);
        assert_eq!(
            fake.expired.lock().unwrap()[1].1,
            t0 + time::Duration::hours(1) + time::Duration::seconds(10) + time::Duration::hours(4)
        );
        task.abort();
    }
}
