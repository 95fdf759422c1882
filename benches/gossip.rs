//! Gossip benchmarks over chitchat's in-process transport, on tokio's paused
//! clock: figures are in *virtual* time, i.e. what the protocol needs with
//! 500 ms rounds, independent of this machine's CPU. Prints, for 50 and 100
//! nodes: propagation of one key change to every node (p50/p99 over
//! repeated changes), failure detection time of a killed node, and gossip
//! bytes per node per second in a quiet cluster.
//!
//! Run: `cargo bench --bench gossip`.

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
}
