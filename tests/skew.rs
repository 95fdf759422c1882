//! Two real `shoal daemon` processes on loopback whose clocks disagree (one
//! runs 90 s behind through libfaketime): forwarded creates carry a
//! relative budget, never a wall-clock deadline. Namespaces share the
//! machine's clock, so skew is injected per process rather than per host.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::docker::Engine;

/// A node to start: name, flags, more environment of its process.
type NodeSpec<'a> = (&'a str, Vec<&'a str>, Vec<(String, String)>);

/// Starts nodes (the first is the seed of the others), each daemon with more
/// environment of its own (name, flags, environment), sharing one store, and
/// waits until every node sees every other alive.
async fn cluster_with_env(dir: &std::path::Path, nodes: &[NodeSpec<'_>]) -> Result<Vec<Node>> {
    let store = dir.join("store");
    let cluster_id = unique("c");
    let mut out: Vec<Node> = Vec::new();
    for (name, extra, env) in nodes {
        let mut args: Vec<&str> = vec!["--cluster-id", &cluster_id];
        let seed;
        if let Some(first) = out.first() {
            seed = first.gossip.clone();
            args.extend(["--seed", &seed]);
        }
        args.extend(extra.iter().copied());
        out.push(Node::start_with_env(name, &dir.join(name), &store, &args, env.clone()).await?);
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

#[tokio::test(flavor = "multi_thread")]
async fn forwards_work_across_skewed_clocks_and_a_frozen_node_still_refuses_late_work() -> Result<()>
{
    // Node a's clock is 90 s behind (faketime), node b's is right: within
    // the ±120 s that sealed gossip and signed calls tolerate, and 30 times
    // the 3 s a forwarded create may take: a wall-clock deadline would
    // refuse every forward from a to b and never stop a late one from b to
    // a. The nodes stand for separate hosts whose clocks disagree.
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let names = node_names(&unique("k"), 2);
    let mut cleanup = Cleanup::new();
    cleanup.nodes = names.clone();
    let flags = |host| vec!["--memory", "1GiB", "--label", host];
    let nodes = cluster_with_env(
        tmp.path(),
        &[
            (&names[0], flags("host=a"), faketime("-90")?),
            (&names[1], flags("host=b"), Vec::new()),
        ],
    )
    .await?;
    let (a, b) = (&nodes[0], &nodes[1]);
    let image = publish_image(a, &engine, &mut cleanup).await?;
    let on = |host: &str, owner: &str| json!({"image": image, "owner": owner, "constraints": {"host": host}});
    // Both ways: the slow clock forwards to the right one and back.
    let mut ids = Vec::new();
    for (at, host, to) in [(a, "b", b), (b, "a", a)] {
        let (code, body) = at.request_env(on(host, "x@example.com")).await?;
        assert_eq!(code, 202, "{} to {}: {body}", at.name, to.name);
        assert_eq!(body["node"], to.name.as_str(), "{body}");
        // The skew is real: a record carries its node's clock.
        let created = time::OffsetDateTime::parse(
            body["created_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )?;
        let behind = time::OffsetDateTime::now_utc() - created;
        assert_eq!(
            behind > time::Duration::seconds(60),
            to.name == a.name,
            "{behind}"
        );
        ids.push((to, body["id"].as_str().unwrap().to_string()));
    }
    for (n, id) in &ids {
        n.wait_settled(id).await?;
    }
    // Node a (behind, so a wall-clock deadline would never look passed to
    // it) freezes; a request for it costs b a timeout and is refused.
    let pid = nix::unistd::Pid::from_raw(a.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let answer = b.request_env(on("a", "late@example.com")).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    let (code, body) = answer?;
    assert_eq!(code, 503, "{body}");
    // Thawed, a reads the request its sender gave up on: it starts nothing.
    for _ in 0..24 {
        let info: Value = a.client.get("/v1/node").await?;
        assert_eq!(info["env_count"], 1, "late work was started: {info}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(engine.env_containers(&a.name).await?.len(), 1);
    Ok(())
}
