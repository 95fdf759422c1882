//! The in-process gossip simulation `benches/gossip.rs` and
//! `benches/scale.rs` share: `n` real [`Gossip`] members (the real
//! `cluster` key encoding) over a chitchat transport, on tokio's paused
//! clock, so every figure is virtual time. Probes read one member at a time
//! (`Gossip::view_of`, `Gossip::alive_count`): polling full views of 1000
//! members would cost more than the gossip itself.

#![allow(dead_code)] // each bench uses its part

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::Transport;
use shoal::cluster::{Gossip, GossipConfig, NodeFacts};
use tokio::time::Instant;

/// Member `i`'s gossip address.
pub fn addr(i: usize) -> SocketAddr {
    ([127, 0, 0, 1], 20_000 + i as u16).into()
}

/// The `p` quantile of sorted samples.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Polls every `every` (virtual) until `pred(i)` holds for every member
/// `i < n`, at most `limit`; each member is asked until it first holds.
/// Returns the time.
pub async fn until_each<F, Fut>(n: usize, every: Duration, limit: Duration, pred: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let mut done = vec![false; n];
    loop {
        for (i, d) in done.iter_mut().enumerate() {
            if !*d && pred(i).await {
                *d = true;
            }
        }
        if done.iter().all(|d| *d) {
            return start.elapsed();
        }
        let left = done.iter().filter(|d| !**d).count();
        assert!(
            start.elapsed() < limit,
            "did not converge: {left} members not yet"
        );
        tokio::time::sleep(every).await;
    }
}

/// Every member sees `n` members alive.
pub async fn until_all_alive(nodes: &[Gossip], n: usize) -> Duration {
    until_each(
        nodes.len(),
        Duration::from_millis(100),
        Duration::from_secs(600),
        |i| async move { nodes[i].alive_count().await == n },
    )
    .await
}

/// What one simulated cluster measured.
pub struct Figures {
    /// Until every member sees every member alive (all join via member 0).
    pub join: Duration,
    /// Per change: until every member sees it; sorted.
    pub propagation: Vec<Duration>,
    /// A killed member, until every other sees it dead.
    pub detection: Duration,
    /// Gossip bytes per member per second in a quiet cluster.
    pub bytes_per_node_s: f64,
}

/// Starts `n` members on `transport`, member `i` publishing `facts(i, "v0")`
/// (its name is the member's name), every one seeded with member 0; then
/// measures join, `reps` changes (`facts(who, "v<r>")`, seen once its
/// `version` reads `v<r>`), quiet traffic over `quiet` (`bytes()` is the
/// transport's running byte count) and the death of the last member. The
/// remaining members are returned, still running.
pub async fn simulate(
    transport: &dyn Transport,
    bytes: impl Fn() -> u64,
    n: usize,
    reps: usize,
    quiet: Duration,
    facts: impl Fn(usize, &str) -> NodeFacts,
    tune: impl Fn(&mut GossipConfig),
) -> (Figures, Vec<Gossip>) {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let f = facts(i, "v0");
        let mut cfg = GossipConfig::new("bench", &f.name, addr(i));
        if i > 0 {
            cfg.seeds = vec![addr(0).to_string()];
        }
        tune(&mut cfg);
        nodes.push(Gossip::start(cfg, &f, transport).await.unwrap());
    }
    let join = until_all_alive(&nodes, n).await;

    let before = bytes();
    tokio::time::sleep(quiet).await;
    let bytes_per_node_s = (bytes() - before) as f64 / n as f64 / quiet.as_secs_f64();

    let mut propagation = Vec::with_capacity(reps);
    for r in 1..=reps {
        let who = (r * 7) % n;
        let version = format!("v{r}");
        let f = facts(who, &version);
        let (name, version) = (&f.name, &version);
        let start = Instant::now();
        nodes[who].publish(&f).await;
        let nodes = &nodes;
        until_each(
            nodes.len(),
            Duration::from_millis(50),
            Duration::from_secs(120),
            |i| async move {
                nodes[i]
                    .view_of(name)
                    .await
                    .and_then(|x| x.facts)
                    .is_some_and(|f| &f.version == version)
            },
        )
        .await;
        propagation.push(start.elapsed());
    }
    propagation.sort();

    let victim = nodes.pop().unwrap();
    let name = victim.name().to_string();
    let name = &name;
    let start = Instant::now();
    victim.abort().await;
    let alive = &nodes;
    until_each(
        alive.len(),
        Duration::from_millis(100),
        Duration::from_secs(120),
        |i| async move { alive[i].view_of(name).await.is_some_and(|x| !x.alive) },
    )
    .await;
    let detection = start.elapsed();
    (
        Figures {
            join,
            propagation,
            detection,
            bytes_per_node_s,
        },
        nodes,
    )
}
