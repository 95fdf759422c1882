//! The sealed gossip transport in process: `Gossip` nodes over a
//! `MemWire` (byte datagrams between sockets of this process, refusing any
//! datagram over 65,507 bytes like UDP, with a tap for captures and an
//! injector for replays and forgeries), on tokio's paused clock. Sealing,
//! replay checks and fragmentation are the real ones the daemon uses over
//! UDP. Conditions are polled with a bounded virtual-time deadline.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::forged_ack;
use shoal::cluster::seal::{
    decode_plain, MemWire, SealControl, SealMode, SealStats, SealTransport, Sealer, MAX_DATAGRAM,
};
use shoal::cluster::{ClusterView, Gossip, GossipConfig, NodeFacts, Role};
use shoal::keyring::Keyring;

const WITHIN: Duration = Duration::from_secs(60);
const CLUSTER: &str = "seal-test";
/// Where every member of these tests is (`addr`).
const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

fn addr(i: u16) -> SocketAddr {
    ([127, 0, 0, 1], 11_000 + i).into()
}

fn facts(name: &str) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        http_addr: "127.0.0.1:8000".into(),
        roles: [Role::Slave].into(),
        memory_total: 256 << 30,
        memory_allocatable: 240 << 30,
        max_envs: 8,
        aio_max: 1 << 20,
        version: "test".into(),
        storage_driver: "overlay2".into(),
        ..Default::default()
    }
}

fn keyring(keys: &[u8]) -> Keyring {
    Keyring::from_keys(keys.iter().map(|k| [*k; 32]).collect()).unwrap()
}

struct Member {
    gossip: Gossip,
    stats: Arc<SealStats>,
    control: SealControl,
}

fn sealer(keys: &[u8]) -> Option<Sealer> {
    (!keys.is_empty()).then(|| Sealer::new(&keyring(keys).gossip_keys(), CLUSTER))
}

/// Starts node `i` (seeded by `seed`) with `mode` and the keys `keys`
/// (`&[]`: no key).
async fn start(wire: &MemWire, i: u16, seed: Option<u16>, mode: SealMode, keys: &[u8]) -> Member {
    let mut cfg = GossipConfig::new(CLUSTER, &format!("node-{i}"), addr(i));
    cfg.seeds = seed.map(|s| addr(s).to_string()).into_iter().collect();
    let stats = Arc::new(SealStats::default());
    let control = SealControl::new(mode, sealer(keys));
    let t = SealTransport::with_control(Arc::new(wire.clone()), control.clone(), stats.clone());
    let gossip = Gossip::start(cfg, &facts(&format!("node-{i}")), &t)
        .await
        .expect("gossip starts");
    Member {
        gossip,
        stats,
        control,
    }
}

fn names(v: &ClusterView) -> BTreeSet<String> {
    v.nodes.iter().map(|n| n.name.clone()).collect()
}

fn all_alive(v: &ClusterView, n: u16) -> bool {
    (0..n).all(|i| v.node(&format!("node-{i}")).is_some_and(|x| x.alive))
}

async fn until(g: &Gossip, what: &str, pred: impl Fn(&ClusterView) -> bool) -> ClusterView {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let v = g.view().await;
        if pred(&v) {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{} never saw: {what}\nlast view: {v:#?}", g.name());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lets `d` of virtual time pass while checking, every 100 ms, that every
/// one of `members` sees each of `expect` alive (never seen dead).
async fn always_alive(members: &[&Member], expect: &[&str], d: Duration, step: &str) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end {
        for m in members {
            let v = m.gossip.view().await;
            for name in expect {
                assert!(
                    v.node(name).is_some_and(|n| n.alive),
                    "{step}: {} saw {name} dead or missing: {v:#?}",
                    m.gossip.name()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 16 hex digits that do not compress (a token id).
fn layer(i: u64) -> String {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDEAD_BEEF_CAFE_F00D;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("{:016x}", x ^ (x >> 29))
}

#[tokio::test(start_paused = true)]
async fn a_full_delta_is_fragmented_below_the_udp_limit_and_still_propagates() {
    let wire = MemWire::new();
    let a = start(&wire, 0, None, SealMode::Required, &[1]).await;
    let b = start(&wire, 1, Some(0), SealMode::Required, &[1]).await;
    until(&a.gossip, "node-1 alive", |v| all_alive(v, 2)).await;
    // ~4,000 incompressible `revoked:` keys (layers travel as one filter
    // key): far more than one delta's budget, so chitchat fills deltas to
    // its 65,507-byte budget round after round.
    let mut f = facts("node-0");
    f.revoked = (0..4000).map(|i| (layer(i), 1_900_000_000 + i)).collect();
    a.gossip.publish(&f).await;
    let want = f.revoked.clone();
    until(&b.gossip, "every revocation of node-0", |v| {
        v.node("node-0")
            .and_then(|n| n.facts.as_ref())
            .is_some_and(|x| x.revoked == want)
    })
    .await;
    let (largest, oversized, _) = wire.stats();
    assert_eq!(
        oversized, 0,
        "no datagram over the UDP payload limit was sent"
    );
    assert!(largest <= MAX_DATAGRAM);
    // chitchat's deltas were filled to its budget (it stops below 65,507
    // once the next key-value would not fit its compressed estimate); a
    // message past one sealed datagram's room goes as fragments (unit
    // tests in `cluster::seal`).
    assert!(largest > 48_000, "deltas were not full: largest {largest}");
    let s = b.stats.snapshot();
    assert!(
        s.opened > 0 && s.dropped_bad_auth == 0 && s.dropped_malformed == 0,
        "{s:?}"
    );
    assert_eq!(s.sent_unsealed, 0, "required mode sends nothing unsealed");
}

#[tokio::test(start_paused = true)]
async fn members_without_the_key_or_with_a_wrong_key_never_appear() {
    let wire = MemWire::new();
    let a = start(&wire, 0, None, SealMode::Required, &[1]).await;
    let b = start(&wire, 1, Some(0), SealMode::Required, &[1]).await;
    until(&a.gossip, "node-1 alive", |v| all_alive(v, 2)).await;
    // A wrong key, no key at all (unsealed), and a transitional outsider
    // with a wrong key (it sends both sealed and unsealed).
    let wrong = start(&wire, 7, Some(0), SealMode::Required, &[9]).await;
    let plain = start(&wire, 8, Some(1), SealMode::Off, &[]).await;
    let both = start(&wire, 9, Some(0), SealMode::Transitional, &[9]).await;
    let mut forged = facts("node-7");
    forged.memory_allocatable = 1 << 50;
    wrong.gossip.publish(&forged).await;
    always_alive(
        &[&a, &b],
        &["node-0", "node-1"],
        Duration::from_secs(20),
        "outsiders",
    )
    .await;
    let want: BTreeSet<String> = ["node-0", "node-1"].map(String::from).into();
    for m in [&a, &b] {
        assert_eq!(
            names(&m.gossip.view().await),
            want,
            "only members in any view"
        );
    }
    for o in [&wrong, &plain, &both] {
        let v = o.gossip.view().await;
        assert_eq!(v.nodes.len(), 1, "an outsider hears nobody: {v:#?}");
    }
    let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
    assert!(sa.dropped_bad_auth > 0, "{sa:?}");
    assert!(
        sa.dropped_unsealed > 0 || sb.dropped_unsealed > 0,
        "{sa:?} {sb:?}"
    );
    assert_eq!(sa.accepted_unsealed + sb.accepted_unsealed, 0);
}

#[tokio::test(start_paused = true)]
async fn replayed_datagrams_are_dropped_and_change_nothing() {
    let wire = MemWire::new();
    let mut tap = wire.tap();
    let a = start(&wire, 0, None, SealMode::Required, &[1]).await;
    let b = start(&wire, 1, Some(0), SealMode::Required, &[1]).await;
    until(&a.gossip, "node-1 alive", |v| all_alive(v, 2)).await;
    let mut f = facts("node-1");
    f.version = "captured".into();
    b.gossip.publish(&f).await;
    until(&a.gossip, "node-1's facts", |v| {
        v.node("node-1")
            .and_then(|n| n.facts.as_ref())
            .is_some_and(|x| x.version == "captured")
    })
    .await;
    // Everything node-1 sent node-0 so far, captured.
    let mut captured = Vec::new();
    while let Ok((from, to, bytes)) = tap.try_recv() {
        if from == addr(1) && to == addr(0) {
            captured.push(bytes);
        }
    }
    assert!(captured.len() > 5);
    // Sent on to a third member, which has not seen their nonces: sealed
    // for node-0, they open nowhere else (the receiver is in the tag).
    let c = start(&wire, 2, Some(0), SealMode::Required, &[1]).await;
    until(&c.gossip, "all alive at node-2", |v| all_alive(v, 3)).await;
    let c_before = c.stats.snapshot();
    for d in &captured {
        wire.inject(addr(66), addr(2), d.clone());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c_after = c.stats.snapshot();
    assert_eq!(
        c_after.dropped_bad_auth - c_before.dropped_bad_auth,
        captured.len() as u64,
        "every datagram sealed for node-0 refused at node-2: {c_after:?}"
    );
    c.gossip.abort().await;
    b.gossip.abort().await;
    until(&a.gossip, "node-1 and node-2 dead", |v| {
        v.node("node-1").is_some_and(|n| !n.alive) && v.node("node-2").is_some_and(|n| !n.alive)
    })
    .await;
    let before = a.stats.snapshot();
    // Replayed from its own address and from an outsider's, twice over a
    // stretch of (virtual) time: node-1 must stay dead.
    for round in 0..20 {
        for d in &captured {
            let from = if round % 2 == 0 { addr(1) } else { addr(66) };
            wire.inject(from, addr(0), d.clone());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = a.gossip.view().await;
        assert!(
            v.node("node-1").is_some_and(|n| !n.alive),
            "a replay revived node-1: {v:#?}"
        );
    }
    let after = a.stats.snapshot();
    assert_eq!(
        after.dropped_replay - before.dropped_replay,
        20 * captured.len() as u64,
        "every replayed datagram dropped as a replay: {after:?}"
    );
    assert_eq!(after.opened, before.opened, "no replay opened");
}

#[tokio::test(start_paused = true)]
async fn a_forged_non_ascii_key_crashes_nothing() {
    // The forgery is a well-formed chitchat message: with an ASCII key it
    // decodes; with a non-ASCII first byte it is refused before chitchat.
    let any = ("node-0", 1, 11_000);
    assert!(decode_plain(&forged_ack("ok", any, LOOPBACK)).is_ok());
    assert!(decode_plain(&forged_ack("égal", any, LOOPBACK)).is_err());
    assert!(decode_plain(&forged_ack("\u{301}x", any, LOOPBACK)).is_err());

    let wire = MemWire::new();
    let t = start(&wire, 0, None, SealMode::Transitional, &[1]).await;
    let r = start(&wire, 1, Some(0), SealMode::Required, &[1]).await;
    let o = start(&wire, 2, Some(0), SealMode::Transitional, &[1]).await;
    until(&t.gossip, "all alive", |v| all_alive(v, 3)).await;
    // Aimed at node-2's state as both targets know it (name, generation,
    // address: what anyone on the wire learns from an unsealed SynAck).
    let victim = ("node-2", o.gossip.generation(), addr(2).port());
    for target in [addr(0), addr(1)] {
        for key in ["égal", "\u{301}x", "ключ"] {
            wire.inject(addr(99), target, forged_ack(key, victim, LOOPBACK));
        }
    }
    // Gossip keeps working on both: a fact published afterwards arrives.
    let mut f = facts("node-2");
    f.version = "after-forgery".into();
    o.gossip.publish(&f).await;
    for m in [&t, &r] {
        until(&m.gossip, "the fact published after the forgery", |v| {
            all_alive(v, 3)
                && v.node("node-2")
                    .and_then(|n| n.facts.as_ref())
                    .is_some_and(|x| x.version == "after-forgery")
        })
        .await;
    }
    assert_eq!(
        t.stats.snapshot().dropped_malformed,
        3,
        "transitional: inspected and dropped"
    );
    assert!(
        r.stats.snapshot().dropped_unsealed >= 3,
        "required: never parsed"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unsealed_cluster_moves_to_sealed_and_rotates_its_key_without_a_dead_node() {
    let wire = MemWire::new();
    let n = 3u16;
    let mut members = Vec::new();
    for i in 0..n {
        members.push(start(&wire, i, (i > 0).then_some(0), SealMode::Off, &[]).await);
    }
    // Every member sees every member alive before the first step (not
    // only node-0: a member that has just heard of another may not count
    // it alive yet).
    for m in &members {
        until(&m.gossip, "all alive", |v| all_alive(v, n)).await;
    }
    let expect = ["node-0", "node-1", "node-2"];
    // Each step changes the nodes one by one, live (what SIGHUP does in the
    // daemon): every node sees every node alive the whole time.
    let steps: [(&str, SealMode, &[u8]); 5] = [
        ("transitional", SealMode::Transitional, &[1]),
        ("required", SealMode::Required, &[1]),
        ("new key added second", SealMode::Required, &[1, 2]),
        ("new key made primary", SealMode::Required, &[2, 1]),
        ("old key removed", SealMode::Required, &[2]),
    ];
    let all: Vec<&Member> = members.iter().collect();
    for (step, mode, keys) in steps {
        for m in &members {
            m.control.set(mode, sealer(keys));
            always_alive(&all, &expect, Duration::from_secs(3), step).await;
        }
    }
    // At the end nothing unsealed is sent or accepted any more.
    let before: Vec<_> = members.iter().map(|m| m.stats.snapshot()).collect();
    always_alive(&all, &expect, Duration::from_secs(5), "sealed").await;
    for (m, b) in members.iter().zip(before) {
        let s = m.stats.snapshot();
        assert_eq!(s.sent_unsealed, b.sent_unsealed, "{s:?}");
        assert_eq!(s.accepted_unsealed, b.accepted_unsealed, "{s:?}");
        assert!(s.opened > b.opened, "{s:?}");
    }
    // Only the new key opens the cluster now.
    let old_key = start(&wire, 5, Some(0), SealMode::Required, &[1]).await;
    always_alive(
        &members.iter().collect::<Vec<_>>(),
        &expect,
        Duration::from_secs(10),
        "old key",
    )
    .await;
    assert!(members[0].gossip.view().await.node("node-5").is_none());
    assert_eq!(old_key.gossip.view().await.nodes.len(), 1);
}
