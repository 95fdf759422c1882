//! The engine dies (kill -9 of a host's dockerd) and the engine hangs
//! (SIGSTOP of it), on the multi-host harness (`tests/common/hosts.rs`):
//! each host has its own dockerd, started with live-restore, so its
//! containers keep running while the engine is away.
//!
//! What each test shows, while the engine is down:
//! - the node stays responsive: `GET /v1/node` (engine state, since when,
//!   the last short reason), `/healthz` (503 with what is wrong), reads of
//!   its environments, all answered under a short client timeout;
//! - gossip carries it: the other host's view has the node's `engine`
//!   fact, and placement there leaves the node out with the reason;
//! - admission refuses new environments there (503, resource `engine`),
//!   a request through the cluster lands on the other host, and a delete
//!   fails at once with the same 503 (and changes nothing);
//! - its ready environment is not declared failed (several reconcile
//!   rounds pass).
//!
//! And after `start-dockerd` / SIGCONT, by itself: engine `ok`, `/healthz`
//! 200, placement includes the node again, the environment is ready in
//! the same container, never restarted (same id, same `StartedAt`), and a
//! new environment starts there. The checker (`tests/common/checker.rs`)
//! then judges every answer and every engine: all accounted for, nothing
//! twice, moved or restarted, no host over its limits, journals and
//! engines agree.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::checker::{self, History};
use common::hosts::{wait_for, Host, Hosts};
use common::raw;
use serde_json::{json, Value};
use shoal::client::Client;
use shoal::model::EnvRecord;

/// How long the node may take to notice the engine is down or back:
/// probes every 2 s, two failures in a row, a hung ping costs 5 s, and
/// gossip a few rounds more. Generous: two cores, many tests.
const NOTICE: Duration = Duration::from_secs(60);

/// A short client timeout: "responsive" means answering within it.
const RESPONSIVE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// kill -9 of dockerd, later started again.
    Kill,
    /// SIGSTOP of dockerd, later SIGCONT.
    Stop,
}

impl Fault {
    fn state(self) -> &'static str {
        match self {
            Fault::Kill => "unreachable",
            Fault::Stop => "hung",
        }
    }
}

/// Sends SIGCONT to a stopped dockerd if the test ends early, so that
/// `scripts/cluster down` (run by the `Hosts` guard, dropped after this
/// one) finds an engine that can stop.
struct ContOnDrop {
    dir: std::path::PathBuf,
    host: String,
    armed: bool,
}

impl Drop for ContOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(common::hosts::SCRIPT)
                .args(["cont-dockerd", &self.host])
                .env("SHOAL_CLUSTER_DIR", &self.dir)
                .stdin(std::process::Stdio::null())
                .status();
        }
    }
}

fn quick(h: &Host) -> Result<Client> {
    let c = Client::new(&h.api, RESPONSIVE)?;
    Ok(match &h.token {
        Some(t) => common::bearer(c, t),
        None => c,
    })
}

/// `GET path` with the short timeout: (status, JSON body).
async fn get(h: &Host, path: &str) -> Result<(u16, Value)> {
    raw(&quick(h)?, "GET", path, None)
        .await
        .with_context(|| format!("GET {path} at {} did not answer in time", h.name))
}

/// The engine state `GET /v1/node` reports.
async fn engine_state(h: &Host) -> Result<Value> {
    let (code, node) = get(h, "/v1/node").await?;
    ensure!(code == 200, "GET /v1/node: {code} {node}");
    Ok(node["engine"].clone())
}

/// The `engine` fact `observer` hears about `node` in gossip.
async fn gossiped_engine(observer: &Host, node: &str) -> Result<String> {
    let (_, v) = get(observer, "/v1/cluster").await?;
    let n = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .with_context(|| format!("{node} not in {}'s view", observer.name))?;
    Ok(n["facts"]["engine"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// `POST /v1/placement` at `h`: (ranked node names, rejected node → reason).
async fn placement(h: &Host, image: &str) -> Result<(Vec<String>, Vec<(String, String)>)> {
    let body = json!({"image": image, "owner": "p@example.com"});
    let (code, p) = raw(
        &quick(h)?,
        "POST",
        "/v1/placement",
        Some(body.to_string().into_bytes()),
    )
    .await?;
    ensure!(code == 200, "placement: {code} {p}");
    let ranked = p["ranked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["node"].as_str().map(String::from))
        .collect();
    let rejected = p["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["node"].as_str().unwrap_or_default().to_string(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    Ok((ranked, rejected))
}

/// A create served by `h` alone (`x-shoal-local`: its own admission).
async fn request_local(h: &Host, body: Value) -> Result<(u16, Value)> {
    let c = h.peer(quick(h)?).with_header("x-shoal-local", "1");
    raw(
        &c,
        "POST",
        "/v1/environments",
        Some(body.to_string().into_bytes()),
    )
    .await
}

async fn scenario(fault: Fault) -> Result<()> {
    let hosts = Hosts::up_each(
        2,
        &[],
        &[
            &["--role", "slave", "--label", "rack=a"],
            &["--role", "slave", "--label", "rack=b"],
        ],
    )
    .await?;
    let (victim, other) = (hosts.host(0), hosts.host(1));
    let mut cont = ContOnDrop {
        dir: hosts.dir.clone(),
        host: victim.name.clone(),
        armed: false,
    };
    let limits = checker::limits(&hosts).await?;
    let history = History::new();
    let image = hosts.publish_demo(1).await?;
    let on_victim = json!({"image": image, "owner": "o@example.com", "constraints": {"rack": "a"}});

    // A ready environment on the victim, requested at the other host.
    let a = history.create(&hosts, 1, on_victim.clone()).await;
    ensure!(a.code == 202, "{a:?}");
    let env: EnvRecord = serde_json::from_value(a.body)?;
    ensure!(env.node == victim.name, "placed on {}", env.node);
    let env = other.wait_settled(&env.id).await?;
    ensure!(env.status.as_str() == "ready", "{env:?}");
    let before = victim.containers().await?;
    ensure!(before.len() == 1 && before[0].env == env.id, "{before:?}");
    let (code, h) = get(victim, "/healthz").await?;
    ensure!(
        code == 200 && h["status"] == "ok",
        "healthz before: {code} {h}"
    );
    let snap = checker::snapshot(&hosts).await?;
    // The fault.
    match fault {
        Fault::Kill => hosts.kill_dockerd(0).await?,
        Fault::Stop => {
            cont.armed = true;
            hosts.stop_dockerd(0).await?
        }
    }
    let want = fault.state();
    let faulted = std::time::Instant::now();

    // The node says so in GET /v1/node...
    wait_for(NOTICE, || async {
        Ok(engine_state(victim).await?["state"] == want)
    })
    .await
    .with_context(|| format!("{} never reported its engine {want}", victim.name))?;
    let noticed = faulted.elapsed();
    let eng = engine_state(victim).await?;
    ensure!(eng["since"].is_string(), "{eng}");
    let reason = eng["last_error"].as_str().unwrap_or_default();
    ensure!(
        !reason.is_empty() && !reason.contains('/'),
        "short reason, no paths: {eng}"
    );

    // ...in /healthz (503, JSON naming the engine)...
    let (code, h) = get(victim, "/healthz").await?;
    ensure!(code == 503, "healthz while down: {code} {h}");
    ensure!(h["status"] == "unhealthy", "{h}");
    ensure!(h["problems"][0]["check"] == "engine", "{h}");
    ensure!(
        h["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("engine {want}")),
        "{h}"
    );
    let (code, h) = get(other, "/healthz").await?;
    ensure!(code == 200, "the other host is healthy: {code} {h}");

    // ...and in gossip: placement at the other host leaves it out, saying why.
    wait_for(NOTICE, || async {
        Ok(gossiped_engine(other, &victim.name).await? == want)
    })
    .await
    .context("the engine state never reached the other host's gossip view")?;
    let gossiped = faulted.elapsed();
    // (Placement reads the view the gossip observer last sent: a round
    // behind `/v1/cluster` at most.)
    wait_for(NOTICE, || async {
        Ok(!placement(other, &image).await?.0.contains(&victim.name))
    })
    .await
    .context("placement at the other host still ranks the node")?;
    let (ranked, rejected) = placement(other, &image).await?;
    ensure!(ranked == [other.name.clone()], "ranked {ranked:?}");
    let why = rejected
        .iter()
        .find(|(n, _)| *n == victim.name)
        .map(|(_, r)| r.clone())
        .with_context(|| format!("{} not rejected: {rejected:?}", victim.name))?;
    ensure!(why.starts_with(&format!("engine {want}")), "reason: {why}");

    // Admission refuses at the victim (503 naming the engine), and a
    // request through the cluster goes to the other host.
    let (code, body) = request_local(victim, on_victim.clone()).await?;
    ensure!(
        code == 503 && body["resource"] == "engine",
        "local create: {code} {body}"
    );
    let a = history.create(&hosts, 0, on_victim.clone()).await;
    let (code, body) = (a.code, a.body);
    ensure!(code == 503, "only the victim has rack=a: {code} {body}");
    ensure!(
        body["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["node"] == victim.name && r["resource"] == "engine"),
        "{body}"
    );
    let anywhere = json!({"image": image, "owner": "o@example.com"});
    let a = history.create(&hosts, 0, anywhere).await;
    let (code, body) = (a.code, a.body);
    ensure!(code == 202 && body["node"] == other.name, "{code} {body}");
    let elsewhere = other
        .wait_settled(body["id"].as_str().unwrap_or_default())
        .await?;
    ensure!(elsewhere.status.as_str() == "ready", "{elsewhere:?}");

    // A delete needs the engine: refused at once, nothing changes.
    let d = history.delete(&hosts, 0, &env.id).await;
    ensure!(
        d.code == 503 && d.body["resource"] == "engine",
        "delete: {d:?}"
    );

    // Several reconcile rounds (every 5 s) pass: the environment stays
    // ready, read from the node itself and through the other host.
    tokio::time::sleep(Duration::from_secs(16)).await;
    for h in [victim, other] {
        let (code, rec) = get(h, &format!("/v1/environments/{}", env.id)).await?;
        ensure!(
            code == 200 && rec["status"] == "ready",
            "at {}: {code} {rec}",
            h.name
        );
    }
    ensure!(engine_state(victim).await?["state"] == want);

    // The engine comes back; the node recovers by itself.
    match fault {
        Fault::Kill => hosts.start_dockerd(0).await?,
        Fault::Stop => hosts.cont_dockerd(0).await?,
    }
    cont.armed = false;
    let restored = std::time::Instant::now();
    wait_for(NOTICE, || async {
        Ok(engine_state(victim).await?["state"] == "ok")
    })
    .await
    .context("the engine never showed ok again")?;
    let back = restored.elapsed();
    let eng = engine_state(victim).await?;
    ensure!(eng["last_error"].as_str() == Some(reason), "{eng}");
    wait_for(NOTICE, || async {
        Ok(get(victim, "/healthz").await?.0 == 200)
    })
    .await
    .context("healthz never came back to 200")?;
    wait_for(NOTICE, || async {
        Ok(placement(other, &image).await?.0.contains(&victim.name))
    })
    .await
    .context("placement never included the node again")?;
    let placed_again = restored.elapsed();
    eprintln!(
        "engine {want}: seen by the node after {:.1}s, in the other host's gossip after {:.1}s; \
         back ok {:.1}s after the engine returned, placed on again after {:.1}s",
        noticed.as_secs_f64(),
        gossiped.as_secs_f64(),
        back.as_secs_f64(),
        placed_again.as_secs_f64()
    );

    // Same container, still running, never restarted; still ready.
    let after = victim.containers().await?;
    ensure!(after.len() == 1, "{after:?}");
    ensure!(after[0].id == before[0].id && after[0].running, "{after:?}");
    ensure!(
        after[0].started_at == before[0].started_at,
        "restarted: {before:?} {after:?}"
    );
    let rec = victim.wait_settled(&env.id).await?;
    ensure!(rec.status.as_str() == "ready", "{rec:?}");
    let ep = rec.endpoints.first().context("no endpoint")?;
    wait_for(NOTICE, || async {
        Ok(common::http_get(&ep.host, ep.host_port, "/")
            .await?
            .contains(&env.id))
    })
    .await
    .with_context(|| format!("the environment does not answer at {ep} again"))?;

    // It takes new environments again.
    let a = history.create(&hosts, 1, on_victim).await;
    let (code, body) = (a.code, a.body);
    ensure!(code == 202 && body["node"] == victim.name, "{code} {body}");
    let fresh = victim
        .wait_settled(body["id"].as_str().unwrap_or_default())
        .await?;
    ensure!(fresh.status.as_str() == "ready", "{fresh:?}");

    // No environment runs twice: each id in one container, on its owner.
    let engines = hosts.engines().await?;
    let mut seen = std::collections::BTreeMap::new();
    for (i, cs) in engines.iter().enumerate() {
        for c in cs {
            ensure!(c.node == hosts.host(i).name, "{c:?} on host {i}");
            ensure!(seen.insert(c.env.clone(), i).is_none(), "{} twice", c.env);
        }
    }
    ensure!(seen.len() == 3, "{seen:?}");
    ensure!(seen[&env.id] == 0 && seen[&fresh.id] == 0 && seen[&elsewhere.id] == 1);
    let report = checker::check(&hosts, &history, &limits, &[&snap], &[]).await?;
    ensure!(
        report.statuses.len() == 3 && report.statuses.values().all(|s| s == "ready"),
        "{report:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn engine_killed_the_node_stays_up_and_recovers_by_itself() -> Result<()> {
    scenario(Fault::Kill).await
}

#[tokio::test(flavor = "multi_thread")]
async fn engine_frozen_the_node_stays_up_and_recovers_by_itself() -> Result<()> {
    scenario(Fault::Stop).await
}
