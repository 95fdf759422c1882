//! Gossip benchmarks over chitchat's in-process transport, on tokio's paused
//! clock: figures are in *virtual* time, i.e. what the protocol needs with
//! 500 ms rounds, independent of this machine's CPU. Prints, for 50 and 100
//! nodes: propagation of one key change to every node (p50/p99 over
//! repeated changes), failure detection time of a killed node, and gossip
//! bytes per node per second in a quiet cluster.
//!
//! Then the same over real UDP between separate hosts
//! (`tests/common/hosts.rs`: one daemon per network namespace, gossip
//! across the bridge), in wall-clock time: propagation of a fact change
//! (an environment created on one host, until every other host's
//! `GET /v1/cluster` shows its count), and failure detection of a host whose
//! shoal is killed (-9) and of a host cut off by a partition.
//!
//! Run: `cargo bench --bench gossip`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::ChannelTransport;
use shoal::cluster::{Gossip, GossipConfig, NodeFacts, Role};
use tokio::time::Instant;

fn addr(i: usize) -> SocketAddr {
    ([127, 0, 0, 1], 20_000 + i as u16).into()
}

fn facts(i: usize, version: &str) -> NodeFacts {
    NodeFacts {
        name: format!("n{i}"),
        http_addr: format!("127.0.0.1:{}", 30_000 + i),
        roles: [Role::Slave].into(),
        memory_allocatable: 240 << 30,
        max_envs: 8,
        version: version.into(),
        ..Default::default()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn until_all(nodes: &[Gossip], pred: impl Fn(&shoal::cluster::ClusterView) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    'poll: loop {
        assert!(Instant::now() < deadline, "did not converge");
        for g in nodes {
            if !pred(&g.view().await) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'poll;
            }
        }
        return;
    }
}

async fn run(n: usize, reps: usize) {
    let t = ChannelTransport::default();
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mut cfg = GossipConfig::new("bench", &format!("n{i}"), addr(i));
        if i > 0 {
            cfg.seeds = vec![addr(0).to_string()];
        }
        nodes.push(Gossip::start(cfg, &facts(i, "v0"), &t).await.unwrap());
    }
    let t0 = Instant::now();
    until_all(&nodes, |v| {
        v.nodes.len() == n && v.nodes.iter().all(|x| x.alive)
    })
    .await;
    let join = t0.elapsed();

    // Quiet cluster traffic.
    let before = t.statistics();
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let after = t.statistics();
    let bps =
        (after.num_bytes_total - before.num_bytes_total) as f64 / n as f64 / window.as_secs_f64();

    let mut prop = Vec::with_capacity(reps);
    for r in 1..=reps {
        let who = (r * 7) % n;
        let version = format!("v{r}");
        let name = format!("n{who}");
        let start = Instant::now();
        nodes[who].publish(&facts(who, &version)).await;
        until_all(&nodes, |v| {
            v.node(&name)
                .and_then(|x| x.facts.as_ref())
                .is_some_and(|f| f.version == version)
        })
        .await;
        prop.push(start.elapsed());
    }
    prop.sort();

    let victim = nodes.pop().unwrap();
    let name = victim.name().to_string();
    let start = Instant::now();
    victim.abort().await;
    until_all(&nodes, |v| v.node(&name).is_some_and(|x| !x.alive)).await;
    let detect = start.elapsed();

    println!(
        "{n} nodes: join {join:?}; propagation p50 {:?} p99 {:?} ({reps} changes); \
         failure detection {detect:?}; {:.0} gossip bytes/node/s",
        pct(&prop, 0.5),
        pct(&prop, 0.99),
        bps
    );
    for g in nodes {
        g.abort().await;
    }
}

/// Host `of`'s gossiped environment count as host `at` sees it, and
/// whether `at` sees it alive.
async fn seen(hosts: &common::hosts::Hosts, at: usize, of: &str) -> (Option<u64>, bool) {
    let v: serde_json::Value = match hosts.host(at).client.get("/v1/cluster").await {
        Ok(v) => v,
        Err(_) => return (None, false),
    };
    let n = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == of);
    match n {
        Some(n) => (n["facts"]["env_count"].as_u64(), n["alive"] == true),
        None => (None, false),
    }
}

/// Polls (every 5 ms, at most 60 s) until `pred` holds at every host in `at`.
async fn until_hosts<F, Fut>(at: &[usize], pred: F) -> std::time::Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    'poll: loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "did not converge"
        );
        for &i in at {
            if !pred(i).await {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue 'poll;
            }
        }
        return start.elapsed();
    }
}

async fn on_hosts(reps: usize) -> anyhow::Result<()> {
    use common::hosts::Hosts;
    let hosts = Hosts::up_each(
        3,
        &["--role", "slave"],
        &[
            &["--label", "pin=0"],
            &["--label", "pin=1"],
            &["--label", "pin=2"],
        ],
    )
    .await?;
    let image = hosts.publish_demo(0).await?;
    let mut prop = Vec::new();
    for r in 0..reps {
        let who = r % 3;
        let name = hosts.host(who).name.clone();
        let before = seen(&hosts, who, &name).await.0.unwrap_or(0);
        // Pinned on `who` by a label only it has.
        let (code, rec) = hosts
            .host(who)
            .request_env(serde_json::json!({
                "image": image, "owner": "g@x", "constraints": {"pin": who.to_string()}
            }))
            .await?;
        anyhow::ensure!(code == 202, "{rec}");
        let others: Vec<usize> = (0..3).filter(|&i| i != who).collect();
        let hs = &hosts;
        let n = &name;
        prop.push(
            until_hosts(&others, |i| async move {
                seen(hs, i, n).await.0.is_some_and(|c| c > before)
            })
            .await,
        );
        hosts
            .host(who)
            .wait_settled(rec["id"].as_str().unwrap())
            .await?;
    }
    prop.sort();
    let name1 = hosts.host(1).name.clone();
    let n1 = &name1;
    let hs = &hosts;
    hosts.kill_shoal(1).await?;
    let killed = until_hosts(&[0, 2], |i| async move { !seen(hs, i, n1).await.1 }).await;
    hosts.start_shoal(1).await?;
    hosts.wait_view(&[0, 1, 2], Duration::from_secs(60)).await?;
    let name2 = hosts.host(2).name.clone();
    let n2 = &name2;
    hosts.cut(2).await?;
    let cut = until_hosts(&[0, 1], |i| async move { !seen(hs, i, n2).await.1 }).await;
    hosts.heal(2).await?;
    let healed = until_hosts(&[0, 1], |i| async move { seen(hs, i, n2).await.1 }).await;
    println!(
        "3 separate hosts, real UDP: propagation p50 {:?} max {:?} ({reps} changes); \
         failure detection: kill -9 {killed:?}, partition {cut:?}; back after the heal {healed:?}",
        pct(&prop, 0.5),
        prop.last().unwrap()
    );
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    // Without `--bench` (as `cargo test --all-targets` runs it): a small
    // cluster, to check the paths work.
    let full = std::env::args().any(|a| a == "--bench");
    rt.block_on(async {
        if full {
            run(50, 20).await;
            run(100, 10).await;
        } else {
            run(10, 3).await;
        }
    });
    drop(rt);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(on_hosts(if full { 20 } else { 3 }))
        .unwrap();
}
