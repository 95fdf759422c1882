//! Forwarding cost and cluster-view throughput, on real daemons over
//! loopback with real UDP gossip and the real engine:
//!
//! - `POST /v1/environments` answered at the owner vs at a node that is not
//!   a `slave` and forwards it (same cached image; each environment is
//!   deleted before the next request, outside the timing): added latency
//!   p50 / p99 (goal: p99 under 5 ms);
//! - `GET /v1/cluster` requests per second from 8 concurrent clients;
//! - the same added latency on separate hosts (`tests/common/hosts.rs`):
//!   front and owner in their own network namespaces with their own
//!   engines, the forward crossing the bridge.
//!
//! `cargo bench --bench forwarding` (200 requests each, 5000 GETs); without
//! `--bench`, as `cargo test --all-targets` runs it, a few of each.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use common::hosts::Hosts;
use common::*;
use serde_json::json;
use shoal::client::Client;
use shoal::demo::DemoImage;
use shoal::docker::Engine;

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (posts, gets) = if full { (200, 5000) } else { (5, 200) };
    tokio::runtime::Runtime::new()?.block_on(run(posts, gets))
}

async fn run(posts: usize, gets: usize) -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let (front_name, owner_name) = (unique("bf"), unique("bo"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes = vec![front_name.clone(), owner_name.clone()];
    let cluster_id = unique("c");
    let front = Node::start(
        &front_name,
        &tmp.path().join("f"),
        &store,
        &["--cluster-id", &cluster_id, "--role", "master"],
    )
    .await?;
    let owner = Node::start(
        &owner_name,
        &tmp.path().join("o"),
        &store,
        &[
            "--cluster-id",
            &cluster_id,
            "--role",
            "slave",
            "--seed",
            &front.gossip,
        ],
    )
    .await?;
    let r = format!("{}-bench:1", unique("t"));
    publish_one(&front, &engine, &r, &DemoImage::default(), &mut cleanup).await?;
    // Wait until the front node sees the owner as a candidate.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, p) = raw(
            &front.client,
            "POST",
            "/v1/placement",
            Some(json!({"image": r, "owner": "b@x"}).to_string().into_bytes()),
        )
        .await?;
        if code == 200 && p["ranked"].as_array().is_some_and(|a| a.len() == 1) {
            break;
        }
        ensure!(Instant::now() < deadline, "cluster did not form");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Warm the image cache on the owner.
    let (code, body) = owner
        .request_env(json!({"image": r, "owner": "b@x"}))
        .await?;
    ensure!(code == 202, "{body}");
    owner.wait_settled(body["id"].as_str().unwrap()).await?;
    raw(
        &owner.client,
        "DELETE",
        &format!("/v1/environments/{}", body["id"].as_str().unwrap()),
        None,
    )
    .await?;

    let (at_owner, forwarded) =
        post_latencies(&front.client, &owner.client, &owner_name, &r, posts).await?;
    // GET /v1/cluster throughput, 8 clients.
    let t = Instant::now();
    let per = gets / 8;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = front.client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let (code, _) = raw(&c, "GET", "/v1/cluster", None).await?;
                ensure!(code == 200);
            }
            anyhow::Ok(())
        }))
    }
    for t in tasks {
        t.await??;
    }
    let rps = (per * 8) as f64 / t.elapsed().as_secs_f64();

    println!("POST /v1/environments, {posts} each, ms (loopback, one engine):");
    print_latencies(&at_owner, &forwarded);
    println!(
        "GET /v1/cluster: {rps:.0} requests/s (8 clients, {} requests)",
        per * 8
    );
    drop(cleanup);
    on_hosts(posts).await
}

/// The same on two hosts: a master in front, a slave owning every
/// environment, each with its own engine; the forward crosses the bridge.
async fn on_hosts(posts: usize) -> Result<()> {
    let hosts = Hosts::up_each(2, &[], &[&["--role", "master"], &["--role", "slave"]]).await?;
    let (front, owner) = (hosts.host(0), hosts.host(1));
    let r = hosts.publish_demo(0).await?;
    // Warm the image cache on the owner's engine.
    let (code, body) = owner
        .request_env(json!({"image": r, "owner": "b@x"}))
        .await?;
    ensure!(code == 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    owner.wait_settled(&id).await?;
    raw(
        &owner.client,
        "DELETE",
        &format!("/v1/environments/{id}"),
        None,
    )
    .await?;
    let (at_owner, forwarded) =
        post_latencies(&front.client, &owner.client, &owner.name, &r, posts).await?;
    println!("POST /v1/environments, {posts} each, ms (separate hosts, across the bridge):");
    print_latencies(&at_owner, &forwarded);
    Ok(())
}

/// Alternates requests at the owner and at the front (which forwards to
/// the owner); each environment is deleted before the next request,
/// outside the timing. Both lists sorted, in ms.
async fn post_latencies(
    front: &Client,
    owner: &Client,
    owner_name: &str,
    r: &str,
    posts: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let body = json!({"image": r, "owner": "bench@example.com"})
        .to_string()
        .into_bytes();
    let mut at_owner = Vec::new();
    let mut forwarded = Vec::new();
    for i in 0..posts * 2 {
        let client = if i % 2 == 0 { owner } else { front };
        let t = Instant::now();
        let (code, rec) = raw(client, "POST", "/v1/environments", Some(body.clone())).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        ensure!(code == 202, "{rec}");
        ensure!(rec["node"] == owner_name);
        if i % 2 == 0 {
            at_owner.push(ms)
        } else {
            forwarded.push(ms)
        }
        raw(
            owner,
            "DELETE",
            &format!("/v1/environments/{}", rec["id"].as_str().unwrap()),
            None,
        )
        .await?;
    }
    at_owner.sort_by(f64::total_cmp);
    forwarded.sort_by(f64::total_cmp);
    Ok((at_owner, forwarded))
}

fn print_latencies(at_owner: &[f64], forwarded: &[f64]) {
    println!(
        "  at the owner:     p50 {:.2}  p99 {:.2}",
        pct(at_owner, 0.5),
        pct(at_owner, 0.99)
    );
    println!(
        "  forwarded:        p50 {:.2}  p99 {:.2}",
        pct(forwarded, 0.5),
        pct(forwarded, 0.99)
    );
    println!(
        "  added by forwarding: p50 {:.2}  p99 {:.2}  (goal: p99 < 5 ms)",
        pct(forwarded, 0.5) - pct(at_owner, 0.5),
        pct(forwarded, 0.99) - pct(at_owner, 0.99)
    );
}
