//! A thousand nodes, in process: `n` real gossip members (the real
//! `cluster` key encoding, `cluster::keys`) over chitchat's channel
//! transport with the datagram limit sealing leaves
//! (`cluster::seal::MAX_CHUNK`), on tokio's paused clock, each member
//! publishing a lab node's state (8 environments, 300 layers). Prints per
//! size: join, propagation of a change to every member (p50/p99 virtual
//! time), failure detection, gossip bytes per node per second, one node's
//! state and the largest digest (SYN) sent, the messages over the limit,
//! what the real `placement::rank` makes of one member's view (bytes needed
//! against the truth: the layer filter's false positives), and the peak RSS
//! of the process (every member holds every member's state: n² states).
//!
//! Run: `cargo bench --bench scale` (500 and 1000 nodes; `SCALE_NODES=200,500`
//! picks sizes); without `--bench` (as `cargo test --all-targets` runs it)
//! 50 nodes.

mod sim;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{ChannelTransport, Socket, Transport};
use chitchat::{ChitchatMessage, Serializable};
use shoal::archive::{chain_ids, Digest};
use shoal::cluster::keys::{kv_bytes, to_kv, EngineState, StoreState};
use shoal::cluster::seal::MAX_CHUNK;
use shoal::cluster::{EnvSummary, NodeFacts, Role};
use shoal::placement::{self, PlacementRequest};
use sim::pct;

/// Counts what the channel transport would refuse: messages over its mtu.
#[derive(Default)]
struct Counters {
    oversize: AtomicU64,
    largest: AtomicUsize,
    largest_syn: AtomicUsize,
}

struct Counting {
    inner: ChannelTransport,
    mtu: usize,
    counters: Arc<Counters>,
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    mtu: usize,
    counters: Arc<Counters>,
}

#[async_trait]
impl Transport for Counting {
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(CountingSocket {
            inner: self.inner.open(addr).await?,
            mtu: self.mtu,
            counters: self.counters.clone(),
        }))
    }
}

#[async_trait]
impl Socket for CountingSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let len = msg.serialized_len();
        let c = &self.counters;
        c.largest.fetch_max(len, Ordering::Relaxed);
        if matches!(msg, ChitchatMessage::Syn { .. }) {
            c.largest_syn.fetch_max(len, Ordering::Relaxed);
        }
        if len > self.mtu {
            c.oversize.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.send(to, msg).await
    }
    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        self.inner.recv().await
    }
}

/// Layers of the image placement is asked about: 20 layers, held (with
/// every level of its chain, as an engine lists them) by every 10th node.
fn image() -> Vec<(Digest, u64)> {
    let diff: Vec<Digest> = (0..20)
        .map(|l| Digest::of(format!("erp-{l}").as_bytes()))
        .collect();
    chain_ids(&diff)
        .into_iter()
        .map(|c| (c, 500 << 20))
        .collect()
}

fn holds_image(i: usize) -> bool {
    i.is_multiple_of(10)
}

/// Node `i` as a lab node publishes it.
fn facts(i: usize, version: &str) -> NodeFacts {
    let mut layers: Vec<String> = (0..300)
        .map(|l| Digest::of(format!("n{i}-l{l}").as_bytes()).short(16))
        .collect();
    if holds_image(i) {
        layers.truncate(280);
        layers.extend(image().iter().map(|(c, _)| c.short(16)));
    }
    let envs = (0..8)
        .map(|e| {
            let id = format!("e-{}", i * 8 + e);
            let s = EnvSummary {
                id: id.clone(),
                image: format!("erp:2015061{e}"),
                owner: "li.wei@lab.example".into(),
                status: "running".into(),
                memory: 16 << 30,
                endpoints: vec![format!("127.0.0.1:{}", 32768 + e)],
            };
            (id, s)
        })
        .collect();
    NodeFacts {
        name: format!("node-{i:04}"),
        http_addr: format!("127.0.0.1:{}", 30_000 + i),
        roles: [Role::Slave, Role::Build].into(),
        labels: BTreeMap::from([
            ("memory".into(), "256GB".into()),
            ("rack".into(), (i / 40).to_string()),
        ]),
        memory_total: 256 << 30,
        memory_allocatable: 240 << 30,
        memory_committed: 128 << 30,
        aio_max: 1_048_576,
        aio_in_use: 70_656,
        aio_committed: 131_072,
        max_envs: 16,
        env_count: 8,
        engine: EngineState::Ok,
        engine_since: Some(1_764_626_400),
        store: StoreState::Ok,
        version: version.into(),
        storage_driver: "overlay2".into(),
        load_bps: Some(123_000_000),
        layers: layers.into_iter().collect(),
        envs,
        ..Default::default()
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn run(n: usize, reps: usize) {
    let counters = Arc::new(Counters::default());
    let channel = ChannelTransport::with_mtu(MAX_CHUNK);
    let t = Counting {
        inner: channel.clone(),
        mtu: MAX_CHUNK,
        counters: counters.clone(),
    };
    let (fig, nodes) = sim::simulate(
        &t,
        || channel.statistics().num_bytes_total,
        n,
        reps,
        Duration::from_secs(10),
        facts,
        // The protocol's work only: no member re-reads every member's facts
        // on every change (the daemon's view watch, n² here).
        |cfg| cfg.watch_views = false,
    )
    .await;
    let kv = to_kv(&facts(1, "v0"));
    let state = kv_bytes(&kv);

    // The real placement over one member's view of everyone.
    let view = nodes[1].view().await;
    let img = image();
    let full: u64 = img.iter().map(|(_, s)| s).sum();
    let req = PlacementRequest {
        memory: 16 << 30,
        aio: 1024,
        constraints: BTreeMap::new(),
    };
    let p = placement::rank(&view.nodes, &req, &img, 100 << 20);
    let mut misjudged = 0;
    for r in &p.ranked {
        let i: usize = r.node["node-".len()..].parse().unwrap();
        let truth = if holds_image(i) { 0 } else { full };
        assert!(
            r.missing_bytes <= truth,
            "{}: a filter never overstates",
            r.node
        );
        if r.missing_bytes != truth {
            misjudged += 1;
        }
    }
    assert_eq!(
        p.ranked.len(),
        n - 1,
        "every live node placeable: {:?}",
        p.rejected.first()
    );

    let oversize = counters.oversize.load(Ordering::Relaxed);
    println!(
        "{n} nodes: join {:.2}s; propagation p50 {:.2}s p99 {:.2}s; failure detection {:.2}s; \
         {:.0} bytes/node/s; state {state} B/node ({} keys); digest {} B; oversize_messages={oversize}",
        fig.join.as_secs_f64(),
        pct(&fig.propagation, 0.5).as_secs_f64(),
        pct(&fig.propagation, 0.99).as_secs_f64(),
        fig.detection.as_secs_f64(),
        fig.bytes_per_node_s,
        kv.len(),
        counters.largest_syn.load(Ordering::Relaxed),
    );
    let rss = peak_rss_kib();
    let states = n * n;
    println!(
        "{n} nodes: {reps} changes; largest message {} B (limit {MAX_CHUNK}); placement ranked {} nodes, \
         {misjudged} with too few bytes needed (layer-filter false positives); \
         peak RSS {:.2} GiB for {states} node states ({:.1} KiB each at most, so 10^6 states ≈ {:.1} GiB)",
        counters.largest.load(Ordering::Relaxed),
        p.ranked.len(),
        rss as f64 / (1 << 20) as f64,
        rss as f64 / states as f64,
        rss as f64 / states as f64 * 1e6 / (1 << 20) as f64,
    );
    assert_eq!(oversize, 0, "a message over the datagram limit");
    for g in nodes {
        g.abort().await;
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<(usize, usize)> = match std::env::var("SCALE_NODES") {
        Ok(v) => v
            .split(',')
            .filter_map(|n| n.parse().ok())
            .map(|n| (n, 10))
            .collect(),
        Err(_) if full => vec![(500, 10), (1000, 10)],
        Err(_) => vec![(50, 3)],
    };
    for (n, reps) in sizes {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(n, reps));
    }
}
