//! Load on separate hosts (`tests/common/hosts.rs`: one daemon and one
//! engine per network namespace, gossip and forwards across the bridge).
//!
//! Every host is a `slave` with two slots. The cluster is filled first (two
//! environments per host), then for the run's length, with requests sent
//! to every node in turn:
//!
//! - a **decision stream** at a fixed rate: `POST /v1/placement`, and
//!   `POST /v1/environments` that find the cluster full (each runs the
//!   entry node's placement and routing and answers 503 with the reasons
//!   of every node, starting no container; one that finds a slot freed a
//!   moment ago is accepted and joins the churn);
//! - a **churn** of real creates at the rate the engines sustain: the
//!   oldest environment is deleted through some node and a new one is
//!   requested at another, then waited for until ready.
//!
//! At the end the fault checker (`tests/common/checker.rs`) reads every
//! answer and every engine: no overcommit (counted from each engine's
//! containers), nothing accepted unaccounted for, nothing twice. "No lost
//! request": every request got an answer. Printed: rates and answer times
//! (p50 / p99) per kind.
//!
//! `cargo bench --bench load`: 10 hosts, 60 s, 100 decisions/s. Without
//! `--bench` (as `cargo test --all-targets` runs it): 3 hosts, 5 s, 20/s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::checker::{self, History};
use common::hosts::Hosts;
use common::*;
use serde_json::{json, Value};

struct Shape {
    hosts: usize,
    secs: u64,
    rate: u32,
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let shape = if full {
        Shape {
            hosts: 10,
            secs: 60,
            rate: 100,
        }
    } else {
        Shape {
            hosts: 3,
            secs: 5,
            rate: 20,
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(shape))
}

/// Answer times of one kind of request, in ms.
#[derive(Default)]
struct Times(Mutex<Vec<f64>>);

impl Times {
    fn add(&self, since: Instant) {
        self.0
            .lock()
            .unwrap()
            .push(since.elapsed().as_secs_f64() * 1000.0);
    }

    fn line(&self, what: &str, secs: f64) -> String {
        let mut v = self.0.lock().unwrap().clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return format!("{what}: none");
        }
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        format!(
            "{what}: {} ({:.1}/s) p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            v.len(),
            v.len() as f64 / secs,
            pct(0.5),
            pct(0.99),
            v[v.len() - 1]
        )
    }
}

fn env_req(image: &str, i: u64) -> Value {
    json!({"image": image, "owner": format!("load{i}@example.com")})
}

async fn run(shape: Shape) -> Result<()> {
    let n = shape.hosts;
    let hosts = Arc::new(
        Hosts::up(
            n,
            &["--role", "slave", "--memory", "256MiB", "--max-envs", "2"],
        )
        .await?,
    );
    let image = hosts.publish_demo(0).await?;
    let limits = checker::limits(&hosts).await?;
    let history = History::new();

    // Fill every slot (the first create on a host also loads the image).
    let pool: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let fill = futures::future::join_all((0..2 * n as u64).map(|i| {
        let (hosts, history, image) = (&hosts, &history, &image);
        async move {
            history
                .create(hosts, i as usize % n, env_req(image, i))
                .await
        }
    }))
    .await;
    for a in fill {
        ensure!(a.code == 202, "fill: {} {}", a.code, a.body);
        let id = a.body["id"].as_str().context("id")?.to_string();
        let rec = hosts.host(0).wait_settled(&id).await?;
        ensure!(rec.status.as_str() == "ready", "fill: {rec:?}");
        pool.lock().unwrap().push_back(id);
    }

    let placements = Arc::new(Times::default());
    let refused = Arc::new(Times::default());
    // Every accepted create, the churn's and the decision stream's.
    let ready_times = Arc::new(Times::default());
    let deletes = Arc::new(Times::default());
    let stolen = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let end = started + Duration::from_secs(shape.secs);

    // The churn: one real create at a time, as fast as the engines go.
    let churn = {
        let (hosts, history, pool, image) =
            (hosts.clone(), history.clone(), pool.clone(), image.clone());
        let (ready_times, deletes) = (ready_times.clone(), deletes.clone());
        tokio::spawn(async move {
            let mut k = 1000u64;
            while Instant::now() < end {
                k += 1;
                let Some(old) = pool.lock().unwrap().pop_front() else {
                    break;
                };
                let t = Instant::now();
                let d = history.delete(&hosts, k as usize % n, &old).await;
                ensure!(d.code == 200, "delete {old}: {} {}", d.code, d.body);
                deletes.add(t);
                let t = Instant::now();
                let a = history
                    .create(&hosts, (k as usize + 1) % n, env_req(&image, k))
                    .await;
                match a.code {
                    202 => {
                        let id = a.body["id"].as_str().context("id")?.to_string();
                        let rec = hosts.host(0).wait_settled(&id).await?;
                        ensure!(rec.status.as_str() == "ready", "churn: {rec:?}");
                        ready_times.add(t);
                        pool.lock().unwrap().push_back(id);
                    }
                    // A decision-stream create took the freed slot first.
                    503 => {}
                    c => anyhow::bail!("churn create: {c} {}", a.body),
                }
            }
            anyhow::Ok(())
        })
    };

    // The decision stream, at a fixed rate whatever the answer times.
    let mut tick = tokio::time::interval(Duration::from_secs(1) / shape.rate);
    // Burst (tokio's default): a late tick is made up, so the rate holds.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let mut max_inflight = 0usize;
    while Instant::now() < end {
        tick.tick().await;
        sent += 1;
        let at = sent as usize % n;
        let (hosts, history, image) = (hosts.clone(), history.clone(), image.clone());
        let (placements, refused, pool, stolen, ready) = (
            placements.clone(),
            refused.clone(),
            pool.clone(),
            stolen.clone(),
            ready_times.clone(),
        );
        inflight.spawn(async move {
            let t = Instant::now();
            if sent.is_multiple_of(2) {
                let (code, body) = raw(
                    &hosts.host(at).client,
                    "POST",
                    "/v1/placement",
                    Some(env_req(&image, sent).to_string().into_bytes()),
                )
                .await?;
                ensure!(code == 200, "placement: {code} {body}");
                placements.add(t);
            } else {
                let a = history.create(&hosts, at, env_req(&image, sent)).await;
                match a.code {
                    503 => refused.add(t),
                    202 => {
                        *stolen.lock().unwrap() += 1;
                        let id = a.body["id"].as_str().context("id")?.to_string();
                        let rec = hosts.host(at).wait_settled(&id).await?;
                        ensure!(rec.status.as_str() == "ready", "decision create: {rec:?}");
                        ready.add(t);
                        pool.lock().unwrap().push_back(id);
                    }
                    c => anyhow::bail!("decision create: {c} {}", a.body),
                }
            }
            anyhow::Ok(())
        });
        max_inflight = max_inflight.max(inflight.len());
        while let Some(done) = inflight.try_join_next() {
            done??;
        }
    }
    while let Some(done) = inflight.join_next().await {
        done??;
    }
    churn.await??;
    let secs = started.elapsed().as_secs_f64();

    // Every request answered, and the checker finds nothing wrong.
    let answers = history.answers();
    let unanswered = answers.iter().filter(|a| a.code == 0).count();
    ensure!(unanswered == 0, "{unanswered} requests got no answer");
    let report = checker::check(&hosts, &history, &limits, &[], &[]).await?;
    let running: usize = hosts.engines().await?.iter().map(Vec::len).sum();
    ensure!(running <= 2 * n, "{running} containers in {} slots", 2 * n);

    println!(
        "load on {n} hosts for {secs:.0} s, decisions at {}/s (sent {sent}, at most {max_inflight} in flight):",
        shape.rate
    );
    println!("  {}", placements.line("POST /v1/placement", secs));
    println!(
        "  {}",
        refused.line("POST /v1/environments refused (cluster full)", secs)
    );
    println!(
        "  {}",
        ready_times.line("accepted creates, request to ready", secs)
    );
    println!("  {}", deletes.line("churn deletes", secs));
    println!(
        "  decision creates that found a freed slot: {}; answers by code: {:?}",
        stolen.lock().unwrap(),
        report.codes
    );
    println!(
        "  checker: {} environments accounted for, no overcommit, none twice, none moved; \
         {running} containers running in {} slots; no request without an answer",
        report.statuses.len(),
        2 * n
    );
    Ok(())
}
