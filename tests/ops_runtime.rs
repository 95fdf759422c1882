//! The daemon as systemd and a log collector see it, on the real engine:
//! - `--log-format json`: every line the daemon writes is one JSON object
//!   with timestamp, level, target, the event's fields, and the spans it
//!   ran in (a create's environment task carries `env_id`, a request
//!   `request_id`);
//! - the watchdog: with `NOTIFY_SOCKET` (a datagram socket this test binds)
//!   and `WATCHDOG_USEC`, the daemon sends READY=1 and then WATCHDOG=1 every
//!   half of it while healthy; a store that vanishes makes it unhealthy and
//!   the pings stop, they resume when the store is back; a maintenance
//!   drain does not stop them.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{publish_one, raw, unique, wait_for, Cleanup, Node};
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::model::EnvRecord;

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_every_line_an_object_with_span_fields() -> Result<()> {
    let engine = Engine::connect().await?;
    let dir = tempfile::tempdir()?;
    let name = unique("lj");
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    let node = Node::start(
        &name,
        &dir.path().join("node"),
        &dir.path().join("store"),
        &["--log-format", "json"],
    )
    .await?;
    let r = format!("{}:1", unique("logs"));
    publish_one(&node, &engine, &r, &DemoImage::default(), &mut cleanup).await?;
    let (code, body) = node
        .request_env(json!({"image": r, "owner": "o@example.com"}))
        .await?;
    ensure!(code == 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    let done = node.wait_settled(&rec.id).await?;
    ensure!(done.status.as_str() == "ready", "{done:?}");
    let (code, b) = raw(
        &node.client,
        "DELETE",
        &format!("/v1/environments/{}", rec.id),
        None,
    )
    .await?;
    ensure!(code < 300, "delete: {code} {b}");
    drop(node); // the last lines too

    let log = std::fs::read_to_string(dir.path().join("node/daemon.log"))?;
    let mut lines = 0;
    let (mut env_span, mut request_span) = (false, false);
    for (i, line) in log.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not JSON: {line}", i + 1))?;
        ensure!(v.is_object(), "line {}: {line}", i + 1);
        for k in ["timestamp", "level", "target"] {
            ensure!(v[k].is_string(), "line {} has no {k}: {line}", i + 1);
        }
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        env_span |= spans
            .iter()
            .any(|s| s["name"] == "env" && s["env_id"] == rec.id.as_str())
            && v["span"]["env_id"] == rec.id.as_str();
        request_span |= spans
            .iter()
            .any(|s| s["name"] == "request" && s["request_id"].is_string());
        lines += 1;
    }
    ensure!(lines > 5, "too few lines: {log}");
    ensure!(
        env_span,
        "no line in the env span with env_id {}: {log}",
        rec.id
    );
    ensure!(request_span, "no line in a request span: {log}");
    Ok(())
}

/// What the daemon sent to the notify socket, with when.
type Heard = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(sock: UnixDatagram) -> Heard {
    let heard: Heard = Arc::default();
    let h = heard.clone();
    sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends when the test is over (the Arc is the only other owner).
        while Arc::strong_count(&h) > 1 {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                h.lock().unwrap().push((Instant::now(), msg));
            }
        }
    });
    heard
}

fn pings_since(heard: &Heard, t: Instant) -> usize {
    heard
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, m)| *at >= t && m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

async fn healthz(node: &Node) -> Result<u16> {
    Ok(raw(&node.client, "GET", "/healthz", None).await?.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pings_only_while_healthy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock_path = dir.path().join("notify.sock");
    let heard = listen(UnixDatagram::bind(&sock_path)?);
    let name = unique("wd");
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    let store = dir.path().join("store");
    // 2 s: a ping every second.
    let env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "2000000".into()),
    ];
    let node = Node::start_with_env(&name, &dir.path().join("node"), &store, &[], env).await?;
    let t0 = Instant::now() - Duration::from_secs(120);
    wait_for(Duration::from_secs(30), || async {
        Ok(heard
            .lock()
            .unwrap()
            .iter()
            .any(|(_, m)| m.lines().any(|l| l == "READY=1")))
    })
    .await
    .context("no READY=1")?;
    let healthy = Instant::now();
    wait_for(Duration::from_secs(20), || async {
        Ok(pings_since(&heard, healthy) >= 3)
    })
    .await
    .with_context(|| {
        format!(
            "no periodic WATCHDOG=1: {:?}\n{}",
            heard.lock().unwrap(),
            node.log()
        )
    })?;
    ensure!(healthz(&node).await? == 200);

    // A maintenance drain is no reason to be restarted: pings go on.
    let (code, b) = raw(
        &node.client,
        "POST",
        "/v1/node/drain",
        Some(br#"{"drain":true}"#.to_vec()),
    )
    .await?;
    ensure!(code == 200, "{code} {b}");
    ensure!(
        healthz(&node).await? == 200,
        "a node drained for maintenance is healthy"
    );
    let drained = Instant::now();
    wait_for(Duration::from_secs(20), || async {
        Ok(pings_since(&heard, drained) >= 2)
    })
    .await
    .context("pings stopped on a maintenance drain")?;
    let (code, b) = raw(
        &node.client,
        "POST",
        "/v1/node/drain",
        Some(br#"{"drain":false}"#.to_vec()),
    )
    .await?;
    ensure!(code == 200, "{code} {b}");

    // The store vanishes (an unmount): unhealthy, and the pings stop.
    let away = dir.path().join("store-away");
    std::fs::rename(&store, &away)?;
    let mut back = RenameBack(Some((away.clone(), store.clone())));
    wait_for(Duration::from_secs(30), || async {
        Ok(healthz(&node).await? == 503)
    })
    .await
    .context("a vanished store never made the node unhealthy")?;
    // A check that began before may still end in one last ping.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let quiet = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        pings_since(&heard, quiet) == 0,
        "pings while unhealthy: {:?}",
        heard.lock().unwrap()
    );
    ensure!(healthz(&node).await? == 503, "still unhealthy throughout");

    // Back: healthy again, and the pings resume.
    back.now()?;
    wait_for(Duration::from_secs(30), || async {
        Ok(healthz(&node).await? == 200)
    })
    .await
    .context("the store came back, the node stayed unhealthy")?;
    let resumed = Instant::now();
    wait_for(Duration::from_secs(20), || async {
        Ok(pings_since(&heard, resumed) >= 2)
    })
    .await
    .context("pings did not resume")?;
    ensure!(pings_since(&heard, t0) >= 7);
    let log = node.log();
    ensure!(
        log.contains("watchdog pings stopped") && log.contains("watchdog pings resumed"),
        "{log}"
    );
    Ok(())
}

/// Puts the store back even when the test fails half-way.
struct RenameBack(Option<(std::path::PathBuf, std::path::PathBuf)>);

impl RenameBack {
    fn now(&mut self) -> Result<()> {
        if let Some((from, to)) = self.0.take() {
            std::fs::rename(from, to)?;
        }
        Ok(())
    }
}

impl Drop for RenameBack {
    fn drop(&mut self) {
        let _ = self.now();
    }
}
