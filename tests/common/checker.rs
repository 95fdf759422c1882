//! The fault checker: reads the history of requests (every answer each
//! client got) and the final state of every host's engine, and asserts what
//! must hold whatever broke:
//!
//! - every accepted request is accounted for: ready, failed with a reason,
//!   deleted by the test, or `lost` because its node is down;
//! - no environment runs twice (one container per id over all engines);
//! - none moved (a container runs on the engine of the node that accepted
//!   it, labelled with that node) or restarted (same container, same
//!   `StartedAt` as in every earlier [`Snapshot`]);
//! - no host is over its memory, slots or AIO, counted from the labels of
//!   its engine's running containers, not from shoal's own view;
//! - journals and engines agree on every host whose shoal runs: a ready
//!   record has its running container, a container has its record.
//!
//! Refusals must say why (a JSON body with `error`); an answer the client
//! never got (transport error) is kept as code 0 and makes the checker
//! accept an environment it cannot otherwise explain, and say so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;
use shoal::model::EnvRecord;

use super::hosts::{Container, Hosts};
use super::raw;

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create,
    Delete(String),
}

/// One answer a client got (code 0: no answer, with the error as body).
#[derive(Debug, Clone)]
pub struct Answer {
    pub host: usize,
    pub op: Op,
    pub code: u16,
    pub body: Value,
    pub took: Duration,
}

/// Every answer of a scenario; clone it into each client task.
#[derive(Debug, Clone, Default)]
pub struct History(Arc<Mutex<Vec<Answer>>>);

impl History {
    pub fn new() -> History {
        History::default()
    }

    fn push(&self, a: Answer) {
        self.0.lock().unwrap().push(a);
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.0.lock().unwrap().clone()
    }

    /// POSTs a create at host `i` and records the answer.
    pub async fn create(&self, hosts: &Hosts, i: usize, body: Value) -> Answer {
        let started = Instant::now();
        let r = hosts.host(i).request_env(body).await;
        self.record(i, Op::Create, r, started)
    }

    /// DELETEs an environment through host `i` and records the answer.
    pub async fn delete(&self, hosts: &Hosts, i: usize, id: &str) -> Answer {
        let started = Instant::now();
        let r = raw(
            &hosts.host(i).client,
            "DELETE",
            &format!("/v1/environments/{id}"),
            None,
        )
        .await;
        self.record(i, Op::Delete(id.to_string()), r, started)
    }

    fn record(&self, host: usize, op: Op, r: Result<(u16, Value)>, started: Instant) -> Answer {
        let (code, body) = match r {
            Ok(x) => x,
            Err(e) => (0, Value::String(format!("{e:#}"))),
        };
        let a = Answer {
            host,
            op,
            code,
            body,
            took: started.elapsed(),
        };
        self.push(a.clone());
        a
    }

    /// The records of every accepted create.
    pub fn accepted(&self) -> Vec<EnvRecord> {
        self.answers()
            .into_iter()
            .filter(|a| a.op == Op::Create && a.code == 202)
            .filter_map(|a| serde_json::from_value(a.body).ok())
            .collect()
    }
}

/// Where every environment container is at one moment: env id →
/// (host index, container).
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub HashMap<String, (usize, Container)>);

/// Takes a [`Snapshot`] of every engine.
pub async fn snapshot(hosts: &Hosts) -> Result<Snapshot> {
    let mut s = Snapshot::default();
    for (i, cs) in hosts.engines().await?.into_iter().enumerate() {
        for c in cs {
            s.0.insert(c.env.clone(), (i, c));
        }
    }
    Ok(s)
}

/// A host's limits, as configured (read from `GET /v1/node` while it runs).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory: u64,
    pub max_envs: u64,
    pub aio: u64,
}

/// Every host's limits; call while every shoal runs.
pub async fn limits(hosts: &Hosts) -> Result<Vec<Limits>> {
    let mut out = Vec::new();
    for h in &hosts.hosts {
        let v: Value = h.client.get("/v1/node").await?;
        out.push(Limits {
            memory: v["memory_allocatable"].as_u64().unwrap_or(0),
            max_envs: v["max_envs"].as_u64().unwrap_or(0),
            aio: v["aio_max"].as_u64().unwrap_or(0),
        });
    }
    Ok(out)
}

/// What the checker found, for the test to print and assert on further.
#[derive(Debug, Default)]
pub struct Report {
    /// Final status of every accepted environment.
    pub statuses: BTreeMap<String, String>,
    /// Accepted environments by the host that runs them.
    pub per_host: BTreeMap<String, usize>,
    /// Answers by code.
    pub codes: BTreeMap<u16, usize>,
    /// Environments found without an answer that named them (allowed only
    /// when some client got no answer).
    pub unexplained: Vec<String>,
    /// Accepted environments whose node went down before its gossip told
    /// anyone, and whose entry node (the one that forwarded the create and
    /// remembers where it went) is down too, or was the owner itself: the
    /// others answer 404, not `lost`, until it is back. Reported, not
    /// failed: the client's 202 was the only trace. With the entry node up
    /// the answer must be `lost` (`routing::Placements`).
    pub unannounced: Vec<String>,
}

/// Runs every check. `down`: hosts whose shoal is not running now (their
/// environments must show `lost` elsewhere). `snapshots`: earlier states of
/// the engines; nothing in them may have moved or restarted since.
pub async fn check(
    hosts: &Hosts,
    history: &History,
    limits: &[Limits],
    snapshots: &[&Snapshot],
    down: &[usize],
) -> Result<Report> {
    let mut problems: Vec<String> = Vec::new();
    let mut report = Report::default();
    let answers = history.answers();
    let up: Vec<usize> = (0..hosts.len()).filter(|i| !down.contains(i)).collect();

    // Let every running node finish what it started (bounded).
    for &i in &up {
        let h = hosts.host(i);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let busy = h
                .local_envs()
                .await?
                .into_iter()
                .filter(|r| matches!(r.status.as_str(), "pending" | "loading" | "starting"))
                .count();
            if busy == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} still has {busy} environments in progress", h.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Answers: a refusal says why.
    let mut no_answer = 0;
    for a in &answers {
        *report.codes.entry(a.code).or_default() += 1;
        match a.code {
            0 => no_answer += 1,
            200 | 202 => {}
            _ => {
                let why = a.body["error"].as_str().unwrap_or("");
                if why.is_empty() {
                    problems.push(format!("refusal without a reason: {} {}", a.code, a.body));
                }
            }
        }
    }
    let accepted = history.accepted();
    let deleted: HashSet<String> = answers
        .iter()
        .filter_map(|a| match &a.op {
            Op::Delete(id) if a.code == 200 => Some(id.clone()),
            _ => None,
        })
        .collect();
    // The host each accepted create entered at.
    let entry: HashMap<String, usize> = answers
        .iter()
        .filter(|a| a.op == Op::Create && a.code == 202)
        .filter_map(|a| Some((a.body["id"].as_str()?.to_string(), a.host)))
        .collect();
    let mut ids = HashSet::new();
    for rec in &accepted {
        if !ids.insert(rec.id.clone()) {
            problems.push(format!("id {} accepted twice", rec.id));
        }
    }

    // Engines: one container per environment, on its own node's engine.
    let engines = hosts.engines().await?;
    let mut where_: HashMap<String, Vec<(usize, Container)>> = HashMap::new();
    for (i, cs) in engines.iter().enumerate() {
        for c in cs {
            where_
                .entry(c.env.clone())
                .or_default()
                .push((i, c.clone()));
            if c.node != hosts.host(i).name {
                problems.push(format!(
                    "container {} of {} on {} is labelled {}",
                    c.id,
                    c.env,
                    hosts.host(i).name,
                    c.node
                ));
            }
        }
    }
    for (env, at) in &where_ {
        if at.len() > 1 {
            let on: Vec<&str> = at
                .iter()
                .map(|(i, _)| hosts.host(*i).name.as_str())
                .collect();
            problems.push(format!("environment {env} runs twice: on {on:?}"));
        }
        if !ids.contains(env) {
            report.unexplained.push(env.clone());
        }
    }
    if !report.unexplained.is_empty() && no_answer == 0 {
        problems.push(format!(
            "containers no answer accounts for: {:?}",
            report.unexplained
        ));
    }

    // Nothing moved or restarted since any snapshot.
    for snap in snapshots {
        for (env, (i, before)) in &snap.0 {
            match where_.get(env).and_then(|v| v.first()) {
                Some((j, now)) => {
                    if j != i || now.id != before.id {
                        problems.push(format!(
                            "{env} moved: was {} on {}, now {} on {}",
                            before.id,
                            hosts.host(*i).name,
                            now.id,
                            hosts.host(*j).name
                        ));
                    } else if before.running && now.started_at != before.started_at {
                        problems.push(format!(
                            "{env} restarted: started {:?}, now {:?}",
                            before.started_at, now.started_at
                        ));
                    }
                }
                None if deleted.contains(env) => {}
                None if before.running => {
                    problems.push(format!("{env} was running and its container is gone"))
                }
                None => {}
            }
        }
    }

    // Every accepted request accounted for, seen from a running node.
    let reader = up.first().copied();
    for rec in &accepted {
        let owner = hosts.index(&rec.node);
        let mut error = String::new();
        let status = match reader {
            Some(r) => {
                let (code, body) = raw(
                    &hosts.host(r).client,
                    "GET",
                    &format!("/v1/environments/{}", rec.id),
                    None,
                )
                .await?;
                error = body["error"].as_str().unwrap_or("").to_string();
                match code {
                    200 => body["status"].as_str().unwrap_or("?").to_string(),
                    404 => "absent".to_string(),
                    c => format!("http {c}"),
                }
            }
            None => "unknown".to_string(),
        };
        let running_on: Vec<usize> = where_
            .get(&rec.id)
            .map(|v| {
                v.iter()
                    .filter(|(_, c)| c.running)
                    .map(|(i, _)| *i)
                    .collect()
            })
            .unwrap_or_default();
        let owner_down = owner.is_some_and(|o| down.contains(&o));
        let entry_down = entry.get(&rec.id).is_none_or(|e| down.contains(e));
        let ok = match status.as_str() {
            "ready" => running_on.len() == 1 && Some(running_on[0]) == owner,
            "failed" => running_on.is_empty() && !error.is_empty(),
            "lost" => owner_down,
            "absent"
                if owner_down && entry_down && running_on.iter().all(|i| Some(*i) == owner) =>
            {
                report.unannounced.push(rec.id.clone());
                true
            }
            "deleted" | "absent" => deleted.contains(&rec.id) && running_on.is_empty(),
            "unknown" => true,
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "{} (accepted on {}) is {status}, running on {:?}{}",
                rec.id,
                rec.node,
                running_on
                    .iter()
                    .map(|i| hosts.host(*i).name.clone())
                    .collect::<Vec<_>>(),
                if owner_down { " (owner down)" } else { "" }
            ));
        }
        if let Some(o) = owner {
            *report
                .per_host
                .entry(hosts.host(o).name.clone())
                .or_default() += running_on.len().min(1);
        }
        report.statuses.insert(rec.id.clone(), status);
    }

    // Capacity, from each engine's own containers.
    for (i, cs) in engines.iter().enumerate() {
        let running: Vec<&Container> = cs.iter().filter(|c| c.running).collect();
        let l = limits[i];
        let memory: u64 = running.iter().map(|c| c.memory).sum();
        let aio: u64 = running.iter().map(|c| c.aio).sum();
        let name = &hosts.host(i).name;
        if memory > l.memory {
            problems.push(format!("{name}: memory {memory} > {}", l.memory));
        }
        if running.len() as u64 > l.max_envs {
            problems.push(format!("{name}: {} envs > {}", running.len(), l.max_envs));
        }
        if aio > l.aio {
            problems.push(format!("{name}: aio {aio} > {}", l.aio));
        }
    }

    // Journals and engines agree on every running node.
    for &i in &up {
        let h = hosts.host(i);
        let local = h.local_envs().await?;
        let by_id: HashMap<&str, &EnvRecord> = local.iter().map(|r| (r.id.as_str(), r)).collect();
        for r in &local {
            let c = engines[i].iter().find(|c| c.env == r.id);
            match (r.status.as_str(), c) {
                ("ready", Some(c))
                    if c.running && r.container.as_deref().is_some_and(|id| id != c.id) =>
                {
                    problems.push(format!("{}: {} names another container", h.name, r.id))
                }
                ("ready", Some(c)) if c.running => {}
                ("ready", _) => problems.push(format!(
                    "{}: {} is ready without a running container",
                    h.name, r.id
                )),
                _ => {}
            }
        }
        for c in &engines[i] {
            match by_id.get(c.env.as_str()) {
                None => problems.push(format!(
                    "{}: container {} of {} has no record",
                    h.name, c.id, c.env
                )),
                Some(r) if c.running && r.status.as_str() != "ready" => problems.push(format!(
                    "{}: {} runs but its record says {}",
                    h.name,
                    c.env,
                    r.status.as_str()
                )),
                _ => {}
            }
        }
    }

    if !problems.is_empty() {
        bail!(
            "checker: {} problem(s):\n  {}\nreport: {report:?}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(report)
}
