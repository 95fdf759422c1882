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
//! Then the cost of sealing: the same quiet cluster over the sealing
//! transport's in-process wire (real serialization, real
//! XChaCha20-Poly1305), unsealed (`off`) and sealed (`required`) in the
//! same run: gossip bytes and CPU per node per second, and their ratio.
//!
//! Run: `cargo bench --bench gossip`.

#[path = "../tests/common/mod.rs"]
mod common;
mod sim;

use std::time::Duration;

use std::sync::Arc;

use chitchat::transport::ChannelTransport;
use shoal::cluster::seal::{MemWire, SealMode, SealStats, SealTransport, Sealer};
use shoal::cluster::{Gossip, GossipConfig, NodeFacts, Role};
use shoal::keyring::Keyring;
use sim::{addr, pct};

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

async fn run(n: usize, reps: usize) {
    let t = ChannelTransport::default();
    let (fig, nodes) = sim::simulate(
        &t,
        || t.statistics().num_bytes_total,
        n,
        reps,
        Duration::from_secs(10),
        facts,
        |_| {},
    )
    .await;
    println!(
        "{n} nodes: join {:?}; propagation p50 {:?} p99 {:?} ({reps} changes); \
         failure detection {:?}; {:.0} gossip bytes/node/s",
        fig.join,
        pct(&fig.propagation, 0.5),
        pct(&fig.propagation, 0.99),
        fig.detection,
        fig.bytes_per_node_s
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

/// CPU time of this process so far (user + system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of the line (utime, stime) are 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// A quiet cluster of `n` nodes over the in-process wire in `mode`: gossip
/// bytes per node per second, and CPU per node per second (both per
/// second of virtual time).
async fn seal_cost(n: usize, mode: SealMode, window: Duration) -> (f64, Duration) {
    let wire = MemWire::new();
    let keys = Keyring::from_keys(vec![[7; 32]]).unwrap().gossip_keys();
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mut cfg = GossipConfig::new("bench", &format!("n{i}"), addr(i));
        if i > 0 {
            cfg.seeds = vec![addr(0).to_string()];
        }
        let sealer = (mode != SealMode::Off).then(|| Sealer::new(&keys, "bench"));
        let t = SealTransport::new(
            Arc::new(wire.clone()),
            mode,
            sealer,
            Arc::new(SealStats::default()),
        );
        let mut f = facts(i, "v0");
        // Some layers per node, so that values weigh what they do in a lab.
        f.layers = (0..20)
            .map(|l| format!("{:016x}", (i * 1000 + l) as u64 * 0x9E37_79B9))
            .collect();
        nodes.push(Gossip::start(cfg, &f, &t).await.unwrap());
    }
    sim::until_all_alive(&nodes, n).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, _, bytes0) = wire.stats();
    let cpu0 = cpu_time();
    tokio::time::sleep(window).await;
    let cpu = cpu_time() - cpu0;
    let (largest, oversized, bytes1) = wire.stats();
    assert_eq!(oversized, 0);
    assert!(largest <= shoal::cluster::seal::MAX_DATAGRAM);
    for g in nodes {
        g.abort().await;
    }
    let secs = window.as_secs_f64();
    (
        (bytes1 - bytes0) as f64 / n as f64 / secs,
        cpu.div_f64(n as f64 * secs),
    )
}

async fn seal_costs(n: usize, window: Duration) {
    let (b0, c0) = seal_cost(n, SealMode::Off, window).await;
    let (b1, c1) = seal_cost(n, SealMode::Required, window).await;
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::NAN };
    println!(
        "{n} nodes, sealing cost: unsealed {b0:.0} bytes/node/s, {:.3} ms CPU/node/s; \
         sealed {b1:.0} bytes/node/s, {:.3} ms CPU/node/s; ratio sealed/unsealed: bytes {:.3}, CPU {:.2}",
        c0.as_secs_f64() * 1e3,
        c1.as_secs_f64() * 1e3,
        ratio(b0, b1),
        ratio(c0.as_secs_f64(), c1.as_secs_f64()),
    );
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
            seal_costs(50, Duration::from_secs(60)).await;
            seal_costs(100, Duration::from_secs(30)).await;
        } else {
            run(10, 3).await;
            seal_costs(10, Duration::from_secs(5)).await;
        }
    });
    drop(rt);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(on_hosts(if full { 20 } else { 3 }))
        .unwrap();
}
