//! Gossip benchmarks over chitchat's in-process transport, on tokio's paused
//! clock: figures are in *virtual* time, i.e. what the protocol needs with
//! 500 ms rounds, independent of this machine's CPU. Prints, for 50 and 100
//! nodes: propagation of one key change to every node (p50/p99 over
//! repeated changes), failure detection time of a killed node, and gossip
//! bytes per node per second in a quiet cluster.
//!
//! Then the cost of sealing: the same quiet cluster over the sealing
//! transport's in-process wire (real serialization, real
//! XChaCha20-Poly1305), unsealed (`off`) and sealed (`required`) in the
//! same run: gossip bytes and CPU per node per second, and their ratio.
//!
//! Run: `cargo bench --bench gossip`.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use chitchat::transport::ChannelTransport;
use shoal::cluster::seal::{MemWire, SealMode, SealStats, SealTransport, Sealer};
use shoal::cluster::{Gossip, GossipConfig, NodeFacts, Role};
use shoal::keyring::Keyring;
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
    until_all(&nodes, |v| {
        v.nodes.len() == n && v.nodes.iter().all(|x| x.alive)
    })
    .await;
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
}
