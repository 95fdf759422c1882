//! shoal's own reading of the phi accrual failure detector, per member, for
//! operators (`phi` in `GET /v1/gossip`, `GET /v1/cluster`, `shoal gossip`).
//!
//! chitchat 0.11.1 computes phi inside its `FailureDetector`, which
//! `Chitchat` keeps private (no accessor for it, its sampling windows or a
//! node's phi). Whether a member is alive or dead is still chitchat's
//! decision (`Chitchat::live_nodes`); this module only repeats chitchat's
//! formula over what this node observes (each time the member's heartbeat
//! advances, seen once per gossip round by the observer), so the number
//! an operator reads is chitchat's to within one gossip round:
//! `phi = time since the heartbeat last advanced / mean interval`, the
//! mean smoothed with the prior `initial_interval` at weight 5, intervals
//! longer than `max_interval` left out. Pure: the caller passes the clock.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// chitchat's additive-smoothing weight of the prior interval.
const PRIOR_WEIGHT: f64 = 5.0;
/// Longer gaps are not sampled (chitchat's `max_interval`, as shoal sets it).
pub const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// Intervals kept per member (chitchat keeps 1000; the mean settles long
/// before, and a thousand members × 100 floats stays small).
const WINDOW: usize = 100;

/// The heartbeats of one member as observed here.
#[derive(Debug, Clone)]
pub struct HeartbeatWindow {
    heartbeat: u64,
    last: Instant,
    intervals: VecDeque<f64>,
    sum: f64,
}

impl HeartbeatWindow {
    /// First sight of a member at `heartbeat`.
    pub fn new(heartbeat: u64, now: Instant) -> HeartbeatWindow {
        HeartbeatWindow {
            heartbeat,
            last: now,
            intervals: VecDeque::new(),
            sum: 0.0,
        }
    }

    /// Records the member's heartbeat as read at `now`: an advance is a
    /// sample (the time since the previous advance).
    pub fn observe(&mut self, heartbeat: u64, now: Instant) {
        if heartbeat == self.heartbeat {
            return;
        }
        let gap = now.saturating_duration_since(self.last);
        if gap <= MAX_INTERVAL {
            if self.intervals.len() == WINDOW {
                if let Some(old) = self.intervals.pop_front() {
                    self.sum -= old;
                }
            }
            self.intervals.push_back(gap.as_secs_f64());
            self.sum += gap.as_secs_f64();
        }
        self.heartbeat = heartbeat;
        self.last = now;
    }

    /// Time since the heartbeat last advanced.
    pub fn last_seen(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last)
    }

    /// Phi at `now` with the prior mean `prior`; `None` before the first
    /// sampled interval (chitchat's phi is `None` then too, and the member
    /// counts as dead).
    pub fn phi(&self, now: Instant, prior: Duration) -> Option<f64> {
        if self.intervals.is_empty() {
            return None;
        }
        let mean = (self.sum + PRIOR_WEIGHT * prior.as_secs_f64())
            / (self.intervals.len() as f64 + PRIOR_WEIGHT);
        if mean <= 0.0 {
            return None;
        }
        Some(self.last_seen(now).as_secs_f64() / mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(beats_every_ms: &[u64], silent_ms: u64, prior_ms: u64, expect: Option<f64>) {
        let t0 = Instant::now();
        let mut w = HeartbeatWindow::new(1, t0);
        let mut t = t0;
        for (i, gap) in beats_every_ms.iter().enumerate() {
            t += Duration::from_millis(*gap);
            w.observe(2 + i as u64, t);
        }
        let now = t + Duration::from_millis(silent_ms);
        let got = w.phi(now, Duration::from_millis(prior_ms));
        match (got, expect) {
            (None, None) => {}
            (Some(g), Some(e)) => assert!((g - e).abs() < 1e-9, "phi {g}, expected {e}"),
            _ => panic!("phi {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn phi_is_silence_over_the_smoothed_mean() {
        // (intervals, silence, prior) → phi
        check(&[], 5_000, 1_000, None);
        // One 500 ms sample, prior 1 s at weight 5: mean (0.5 + 5) / 6.
        check(&[500], 0, 1_000, Some(0.0));
        check(&[500], 917, 1_000, Some(0.917 / (5.5 / 6.0)));
        // Ten 500 ms samples: mean (5 + 5) / 15 = 0.6667 s; 4 s silent → 6.
        check(&[500; 10], 4_000, 1_000, Some(6.0));
        // A gap longer than MAX_INTERVAL is no sample (but resets the clock).
        check(&[500, 20_000], 1_000, 1_000, Some(1.0 / (5.5 / 6.0)));
    }

    #[test]
    fn an_unchanged_heartbeat_is_no_sample() {
        let t0 = Instant::now();
        let mut w = HeartbeatWindow::new(7, t0);
        w.observe(7, t0 + Duration::from_secs(1));
        assert_eq!(
            w.phi(t0 + Duration::from_secs(2), Duration::from_secs(1)),
            None
        );
        assert_eq!(
            w.last_seen(t0 + Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn the_window_is_bounded() {
        let t0 = Instant::now();
        let mut w = HeartbeatWindow::new(0, t0);
        for i in 1..=(WINDOW as u64 * 3) {
            w.observe(i, t0 + Duration::from_millis(500 * i));
        }
        assert_eq!(w.intervals.len(), WINDOW);
        assert!((w.sum - 0.5 * WINDOW as f64).abs() < 1e-6);
    }
}
