//! The systemd watchdog: with `WatchdogSec=` in the unit, systemd passes
//! `WATCHDOG_USEC` and restarts the daemon when no `WATCHDOG=1` comes within
//! it. The `watchdog` worker sends one every half of that, but only while
//! the node is healthy by the same verdict `/healthz` gives
//! ([`crate::health::assess`] over [`crate::api::health_inputs`]), with one
//! exception: a stopping node (check `draining`) still pings until it
//! exits. A maintenance drain is healthy for `/healthz` already.
//!
//! The check runs as a task on the daemon's runtime, not on a thread of its
//! own: a wedged runtime (every worker thread blocked) runs no check and so
//! sends no ping, and systemd restarts it. A check is bounded by the ping
//! interval, so a check that hangs counts as a miss too.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::api::AppState;
use crate::health::HealthReport;

/// The ping interval for `WATCHDOG_USEC` / `WATCHDOG_PID` (pure): half the
/// timeout, when the timeout is set, positive, and meant for this process
/// (`WATCHDOG_PID` unset or ours), as `sd_watchdog_enabled(3)` reads them.
/// Not `sd_notify::watchdog_enabled`: it demands `WATCHDOG_PID`, which only
/// systemd can set for a process it starts itself.
pub fn interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1))),
    }
}

/// [`interval`] from this process's environment.
pub fn from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Whether the watchdog may be pinged (pure): every problem but a drain
/// keeps it silent. `Err` lists the problems that do.
pub fn verdict(report: &HealthReport) -> Result<(), Vec<String>> {
    let blocking: Vec<String> = report
        .problems
        .iter()
        .filter(|p| p.check != "draining")
        .map(|p| format!("{}: {}", p.check, p.error))
        .collect();
    if blocking.is_empty() {
        Ok(())
    } else {
        Err(blocking)
    }
}

/// The `watchdog` worker: checks and pings every `every`, forever.
pub async fn run(state: Arc<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pinging = true;
    loop {
        tick.tick().await;
        let check = async {
            let inputs = crate::api::health_inputs(&state).await;
            verdict(&crate::health::assess(&inputs))
        };
        let verdict = match tokio::time::timeout(every, check).await {
            Ok(v) => v,
            Err(_) => Err(vec![format!(
                "the health check took longer than {}ms",
                every.as_millis()
            )]),
        };
        match verdict {
            Ok(()) => {
                if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]) {
                    warn!(error = %e, "cannot send WATCHDOG=1");
                }
                if !pinging {
                    info!("node healthy again: watchdog pings resumed");
                }
                pinging = true;
            }
            Err(problems) => {
                if pinging {
                    warn!(?problems, "node unhealthy: watchdog pings stopped (systemd restarts the daemon if this lasts past WatchdogSec)");
                }
                pinging = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{EngineHealth, Problem};

    #[test]
    fn interval_table() {
        let ms = Duration::from_millis;
        for (usec, pid, want) in [
            (Some("30000000"), None, Some(ms(15_000))),
            (Some("30000000"), Some("42"), Some(ms(15_000))),
            (Some("2000000"), Some(" 42 "), Some(ms(1_000))),
            (Some("30000000"), Some("43"), None),
            (Some("30000000"), Some("x"), None),
            (None, Some("42"), None),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("soon"), None, None),
            (Some("1"), None, Some(ms(1))),
        ] {
            assert_eq!(interval(usec, pid, 42), want, "{usec:?} {pid:?}");
        }
    }

    fn report(checks: &[&str]) -> HealthReport {
        HealthReport {
            status: "x".into(),
            error: None,
            problems: checks
                .iter()
                .map(|c| Problem {
                    check: c.to_string(),
                    error: "why".into(),
                })
                .collect(),
            engine: EngineHealth::default(),
        }
    }

    #[test]
    fn verdict_table() {
        for (checks, ping) in [
            (&[][..], true),
            (&["draining"][..], true),
            (&["engine"][..], false),
            (&["draining", "store"][..], false),
            (&["worker", "worker"][..], false),
            (&["state"][..], false),
            (&["gossip"][..], false),
        ] {
            let v = verdict(&report(checks));
            assert_eq!(v.is_ok(), ping, "{checks:?}");
            if let Err(p) = v {
                assert!(!p.iter().any(|p| p.starts_with("draining")), "{p:?}");
            }
        }
    }
}
