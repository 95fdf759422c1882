//! Several real `shoal daemon` processes on loopback, real UDP gossip, one
//! real Docker engine and one shared store (standing in for the NFS mount).
//! Each node counts only the containers labelled with its own name.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::hosts::Hosts;
use common::*;
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::model::EnvRecord;

/// Starts nodes named `names` (the first is the seed of the others) with
/// per-node extra flags, sharing one store, and waits until every node sees
/// every other alive.
async fn cluster(dir: &std::path::Path, nodes: &[(&str, Vec<&str>)]) -> Result<Vec<Node>> {
    let store = dir.join("store");
    let cluster_id = unique("c");
    let mut out: Vec<Node> = Vec::new();
    for (name, extra) in nodes {
        let mut args: Vec<&str> = vec!["--cluster-id", &cluster_id];
        let seed;
        if let Some(first) = out.first() {
            seed = first.gossip.clone();
            args.extend(["--seed", &seed]);
        }
        args.extend(extra.iter().copied());
        out.push(Node::start(name, &dir.join(name), &store, &args).await?);
    }
    for n in &out {
        wait_for(Duration::from_secs(30), || async {
            let v: Value = n.client.get("/v1/cluster").await?;
            let alive = v["nodes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|n| n["alive"] == true && !n["facts"].is_null())
                        .count()
                })
                .unwrap_or(0);
            Ok(alive == nodes.len())
        })
        .await?;
    }
    Ok(out)
}

/// Polls `check` until it returns true, at most `limit`.
async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(true) = check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn node_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn publish_image(node: &Node, engine: &Engine, cleanup: &mut Cleanup) -> Result<String> {
    let r = format!("{}-img:1", unique("t"));
    let img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(4096))],
        ..Default::default()
    };
    publish_one(node, engine, &r, &img, cleanup).await?;
    Ok(r)
}

/// The harness itself: separate engines (an image published on one host
/// is loaded from the store by another), gossip and forwarding across the
/// bridge, endpoints reachable from the machine at the owner's address.
#[tokio::test(flavor = "multi_thread")]
async fn hosts_smoke_a_request_at_one_host_runs_on_another_engine() -> Result<()> {
    let hosts = Hosts::up_each(2, &[], &[&["--role", "master"], &["--role", "slave"]]).await?;
    let (a, b) = (hosts.host(0), hosts.host(1));
    assert_ne!(a.ip, b.ip);
    let image = hosts.publish_demo(0).await?;
    // Published through host 0 (whose engine then drops the source tag):
    // the image is in the store only.
    assert!(b.engine.image(&format!("shoal/{image}")).await?.is_none());
    let (code, body) = a
        .request_env(json!({"image": image, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    assert_eq!(rec.node, b.name);
    let rec = a.wait_settled(&rec.id).await?;
    assert_eq!(
        rec.status.as_str(),
        "ready",
        "{rec:?}\n{}",
        hosts.logs_tail(30)
    );
    // Host 1 loaded it from the store into its own engine and runs it.
    assert!(b.engine.image(&format!("shoal/{image}")).await?.is_some());
    let on_b = b.containers().await?;
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].env, rec.id);
    assert!(a.containers().await?.is_empty());
    let ep = &rec.endpoints[0];
    assert_eq!(ep.host, b.ip);
    assert!(http_get(&ep.host, ep.host_port, "/")
        .await?
        .contains(&rec.id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn request_at_any_node_lands_on_the_best_slave_and_is_reachable_everywhere() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let names = node_names(&unique("k"), 3);
    let mut cleanup = Cleanup::new();
    cleanup.nodes = names.clone();
    let nodes = cluster(
        tmp.path(),
        &[
            (&names[0], vec!["--role", "master", "--role", "build"]),
            (
                &names[1],
                vec![
                    "--role",
                    "slave",
                    "--memory",
                    "1GiB",
                    "--label",
                    "memory=256GB",
                ],
            ),
            (
                &names[2],
                vec![
                    "--role",
                    "slave",
                    "--memory",
                    "200MiB",
                    "--label",
                    "memory=128GB",
                ],
            ),
        ],
    )
    .await?;
    let (master, big, small) = (&nodes[0], &nodes[1], &nodes[2]);
    let image = publish_image(master, &engine, &mut cleanup).await?;

    // The explanation: the master is not a slave; the tighter fit ranks first.
    let (code, p) = raw(
        &master.client,
        "POST",
        "/v1/placement",
        Some(
            json!({"image": image, "owner": "a@example.com"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    assert_eq!(code, 200, "{p}");
    let ranked: Vec<&str> = p["ranked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(ranked, vec![small.name.as_str(), big.name.as_str()], "{p}");
    let rejected = p["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["node"], master.name.as_str());
    assert!(
        rejected[0]["reason"].as_str().unwrap().contains("slave"),
        "{p}"
    );

    // A request at the master lands on a slave; with a label constraint, on
    // the node that has the label.
    let (code, body) = master
        .request_env(json!({"image": image, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let any: EnvRecord = serde_json::from_value(body)?;
    assert_ne!(any.node, master.name);
    let (code, body) = master
        .request_env(
            json!({"image": image, "owner": "b@example.com", "constraints": {"memory": "256GB"}}),
        )
        .await?;
    assert_eq!(code, 202, "{body}");
    let pinned: EnvRecord = serde_json::from_value(body)?;
    assert_eq!(pinned.node, big.name);
    // Ready, read through a node that does not own it.
    let rec = master.wait_settled(&pinned.id).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    assert_eq!(rec.node, big.name);
    let ep = &rec.endpoints[0];
    assert!(http_get(&ep.host, ep.host_port, "/")
        .await?
        .contains(&rec.id));

    // Every node lists every environment with its node.
    for n in &nodes {
        let list: Vec<EnvRecord> = n.client.get("/v1/environments").await?;
        let ids: HashMap<String, String> = list.into_iter().map(|r| (r.id, r.node)).collect();
        assert_eq!(ids.get(&pinned.id), Some(&big.name), "at {}", n.name);
        assert_eq!(ids.get(&any.id), Some(&any.node), "at {}", n.name);
    }
    // Only the owners run containers.
    assert!(engine.env_containers(&master.name).await?.is_empty());

    // A request no node can take: 503 with every node's reason.
    let (code, body) = small
        .request_env(json!({"image": image, "owner": "a@example.com", "memory": "8GiB"}))
        .await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["reasons"].as_array().unwrap().len(), 3, "{body}");
    assert!(body["reasons"][0]["node"].is_string());

    // Delete through a node that does not own it.
    master.wait_settled(&any.id).await?;
    for rec in [&pinned, &any] {
        let other = nodes.iter().find(|n| n.name != rec.node).unwrap();
        let (code, body) = raw(
            &other.client,
            "DELETE",
            &format!("/v1/environments/{}", rec.id),
            None,
        )
        .await?;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "deleted");
    }
    for n in &nodes {
        assert!(engine.env_containers(&n.name).await?.is_empty());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_across_nodes_never_overcommit() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let names = node_names(&unique("k"), 3);
    let mut cleanup = Cleanup::new();
    cleanup.nodes = names.clone();
    // Each node: 2 slots by count, 150 MiB memory = 2 × 64 MiB.
    let flags = vec!["--memory", "150MiB", "--max-envs", "2"];
    let nodes = cluster(
        tmp.path(),
        &[
            (&names[0], flags.clone()),
            (&names[1], flags.clone()),
            (&names[2], flags.clone()),
        ],
    )
    .await?;
    let image = publish_image(&nodes[0], &engine, &mut cleanup).await?;

    let mut tasks = Vec::new();
    for i in 0..30 {
        let client = nodes[i % 3].client.clone();
        let body = json!({"image": image, "owner": format!("u{i}@example.com")});
        tasks.push(tokio::spawn(async move {
            raw(
                &client,
                "POST",
                "/v1/environments",
                Some(body.to_string().into_bytes()),
            )
            .await
        }));
    }
    let mut accepted: Vec<EnvRecord> = Vec::new();
    for t in tasks {
        let (code, body) = t.await??;
        match code {
            202 => accepted.push(serde_json::from_value(body)?),
            503 => {
                assert!(!body["reasons"].as_array().unwrap().is_empty(), "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Six slots in the cluster, and every one of them taken.
    assert_eq!(accepted.len(), 6);
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for rec in &accepted {
        *per_node.entry(rec.node.clone()).or_default() += 1;
    }
    for n in &nodes {
        assert_eq!(per_node.get(&n.name), Some(&2), "{per_node:?}");
        // The engine agrees: containers labelled with this node.
        let info: Value = n.client.get("/v1/node").await?;
        assert!(info["memory_committed"].as_u64().unwrap() <= 150 << 20);
        assert_eq!(info["env_count"], 2);
    }
    for rec in &accepted {
        let done = nodes[0].wait_settled(&rec.id).await?;
        assert_eq!(done.status.as_str(), "ready", "{done:?}");
    }
    for n in &nodes {
        assert_eq!(engine.env_containers(&n.name).await?.len(), 2);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_node_shows_lost_and_nothing_moves() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let names = node_names(&unique("k"), 3);
    let mut cleanup = Cleanup::new();
    cleanup.nodes = names.clone();
    let mut nodes = cluster(
        tmp.path(),
        &[
            (&names[0], vec!["--role", "master"]),
            (&names[1], vec!["--role", "slave"]),
            (&names[2], vec!["--role", "slave", "--max-envs", "1"]),
        ],
    )
    .await?;
    let image = publish_image(&nodes[0], &engine, &mut cleanup).await?;
    let (code, body) = nodes[0]
        .request_env(json!({"image": image, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    let rec = nodes[0].wait_settled(&rec.id).await?;
    assert_eq!(rec.status.as_str(), "ready");
    let owner = nodes.iter().position(|n| n.name == rec.node).unwrap();
    let witness = if owner == 1 { 2 } else { 1 };
    let before_other = engine.env_containers(&nodes[witness].name).await?.len();

    // kill -9 the owner: within the failure-detection time the others show
    // its environment lost, still with owner and image.
    nodes[owner].kill();
    let killed_at = Instant::now();
    for i in [0, witness] {
        let n = &nodes[i];
        wait_for(Duration::from_secs(30), || async {
            let r: EnvRecord = n
                .client
                .get(&format!("/v1/environments/{}", rec.id))
                .await?;
            Ok(r.status.as_str() == "lost" && r.owner == "a@example.com" && r.image == rec.image)
        })
        .await?;
        let list: Vec<EnvRecord> = n.client.get("/v1/environments").await?;
        assert!(list
            .iter()
            .any(|r| r.id == rec.id && r.status.as_str() == "lost"));
    }
    eprintln!("lost seen after {:?}", killed_at.elapsed());
    // Its container still runs, and nothing was started in its place.
    assert_eq!(engine.env_containers(&rec.node).await?.len(), 1);
    assert_eq!(
        engine.env_containers(&nodes[witness].name).await?.len(),
        before_other
    );
    assert!(engine.env_containers(&nodes[0].name).await?.is_empty());
    let v: Value = nodes[0].client.get("/v1/cluster").await?;
    let dead = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == rec.node.as_str())
        .unwrap()
        .clone();
    assert_eq!(dead["alive"], false, "{dead}");

    // It comes back: restored from Docker labels, ready again everywhere.
    nodes[owner].spawn().await?;
    for n in &nodes {
        wait_for(Duration::from_secs(30), || async {
            let r: EnvRecord = n
                .client
                .get(&format!("/v1/environments/{}", rec.id))
                .await?;
            Ok(r.status.as_str() == "ready")
        })
        .await?;
    }
    assert_eq!(engine.env_containers(&rec.node).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_leaves_environments_running() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let names = node_names(&unique("k"), 2);
    let mut cleanup = Cleanup::new();
    cleanup.nodes = names.clone();
    let mut nodes = cluster(tmp.path(), &[(&names[0], vec![]), (&names[1], vec![])]).await?;
    let image = publish_image(&nodes[0], &engine, &mut cleanup).await?;
    let (code, body) = nodes[1]
        .request_env(json!({"image": image, "owner": "a@example.com", "constraints": {}}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec = nodes[1].wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(rec.status.as_str(), "ready");
    let owner = nodes.iter().position(|n| n.name == rec.node).unwrap();
    let other = 1 - owner;
    let status = nodes[owner].terminate()?;
    assert!(status.success(), "{status}");
    // The container keeps running; the other node shows the node left and
    // its environment lost, and places new requests only on itself.
    assert_eq!(engine.env_containers(&rec.node).await?.len(), 1);
    let cid = engine.env_containers(&rec.node).await?.remove(0);
    assert!(engine.container(&cid).await?.unwrap().running);
    let n = &nodes[other];
    wait_for(Duration::from_secs(30), || async {
        let v: Value = n.client.get("/v1/cluster").await?;
        let gone = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == rec.node.as_str())
            .cloned();
        Ok(gone.is_some_and(|g| g["left"] == true || g["alive"] == false))
    })
    .await?;
    let r: EnvRecord = n
        .client
        .get(&format!("/v1/environments/{}", rec.id))
        .await?;
    assert_eq!(r.status.as_str(), "lost");
    let (code, body) = n
        .request_env(json!({"image": image, "owner": "b@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["node"], n.name.as_str());
    n.wait_settled(body["id"].as_str().unwrap()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_candidate_costs_a_timeout_then_the_next_node_takes_it() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let names = node_names(&unique("k"), 3);
    let mut cleanup = Cleanup::new();
    cleanup.nodes = names.clone();
    let roomy = vec!["--role", "slave", "--memory", "2GiB", "--max-envs", "12"];
    let nodes = cluster(
        tmp.path(),
        &[
            (&names[0], vec!["--role", "master"]),
            (&names[1], roomy.clone()),
            (&names[2], roomy.clone()),
        ],
    )
    .await?;
    let image = publish_image(&nodes[0], &engine, &mut cleanup).await?;
    // Freeze node 1 (SIGSTOP): its gossip still looks alive for a few
    // seconds, but its API does not answer.
    let pid = nix::unistd::Pid::from_raw(nodes[1].child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = nodes[0].client.clone();
        let body = json!({"image": image, "owner": format!("u{i}@example.com")});
        tasks.push(tokio::spawn(async move {
            raw(
                &client,
                "POST",
                "/v1/environments",
                Some(body.to_string().into_bytes()),
            )
            .await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    let mut accepted = Vec::new();
    for r in results {
        let (code, body) = r?;
        assert_eq!(code, 202, "{body}");
        assert_eq!(body["node"], nodes[2].name.as_str(), "{body}");
        accepted.push(body["id"].as_str().unwrap().to_string());
    }
    // With 8 requests in random order among two equal candidates, the
    // frozen one was tried first at least once and cost a timeout.
    assert!(
        nodes[0].log().contains("candidate unreachable"),
        "{}",
        nodes[0].log()
    );
    // The thawed node comes back and took nothing.
    assert!(engine.env_containers(&nodes[1].name).await?.is_empty());
    // Let the accepted ones finish starting before the cleanup.
    for id in accepted {
        nodes[0].wait_settled(&id).await?;
    }
    Ok(())
}
