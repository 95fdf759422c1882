//! The cluster on separate hosts (`tests/common/hosts.rs`, built on
//! `scripts/cluster`): each node in its own network namespace with its own
//! Docker engine, real UDP gossip and node-to-node HTTP across a bridge,
//! one shared store directory (standing in for the NFS mount). What runs
//! where is read from each host's own engine.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::hosts::{wait_for, Host, Hosts};
use common::*;
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::model::EnvRecord;

/// `POST /v1/placement` at `host`.
async fn placement(host: &Host, body: Value) -> Result<Value> {
    let (code, p) = raw(
        &host.client,
        "POST",
        "/v1/placement",
        Some(body.to_string().into_bytes()),
    )
    .await?;
    anyhow::ensure!(code == 200, "placement: {code} {p}");
    Ok(p)
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
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
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

    // The engine faults the harness offers: kill -9 of host 1's dockerd
    // leaves its container running (live-restore); the restarted engine
    // finds it unrestarted.
    hosts.kill_dockerd(1).await?;
    assert!(b.engine.env_containers(&b.name).await.is_err());
    assert!(http_get(&ep.host, ep.host_port, "/")
        .await?
        .contains(&rec.id));
    hosts.start_dockerd(1).await?;
    assert_eq!(b.containers().await?, on_b);

    // `down` (on drop) removes every namespace, link, rule, cgroup and
    // file the cluster made.
    let (prefix, dir) = (hosts.prefix.clone(), hosts.dir.clone());
    drop(hosts);
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&prefix));
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()?;
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&prefix));
    let rules = std::process::Command::new("iptables")
        .args(["-S"])
        .output()?;
    assert!(!String::from_utf8_lossy(&rules.stdout).contains(&prefix));
    assert!(!std::path::Path::new(&format!("/run/shoal-cluster/{prefix}")).exists());
    assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/memory/shoal-{prefix}-1")).exists());
    assert!(!dir.exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn request_at_any_node_lands_on_the_best_slave_and_is_reachable_everywhere() -> Result<()> {
    let hosts = Hosts::up_each(
        3,
        &[],
        &[
            &["--role", "master", "--role", "build"],
            &[
                "--role",
                "slave",
                "--memory",
                "1GiB",
                "--label",
                "memory=256GB",
            ],
            &[
                "--role",
                "slave",
                "--memory",
                "200MiB",
                "--label",
                "memory=128GB",
            ],
        ],
    )
    .await?;
    let (master, big, small) = (hosts.host(0), hosts.host(1), hosts.host(2));
    let image = hosts.publish_demo(0).await?;

    // The explanation: the master is not a slave; the tighter fit ranks first.
    let p = placement(master, json!({"image": image, "owner": "a@example.com"})).await?;
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
    // Ready, read through a node that does not own it, reachable at the
    // owner's address.
    let rec = master.wait_settled(&pinned.id).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    assert_eq!(rec.node, big.name);
    let ep = &rec.endpoints[0];
    assert_eq!(ep.host, big.ip);
    assert!(http_get(&ep.host, ep.host_port, "/")
        .await?
        .contains(&rec.id));

    // Every node lists every environment with its node.
    for h in &hosts.hosts {
        let list: Vec<EnvRecord> = h.client.get("/v1/environments").await?;
        let ids: HashMap<String, String> = list.into_iter().map(|r| (r.id, r.node)).collect();
        assert_eq!(ids.get(&pinned.id), Some(&big.name), "at {}", h.name);
        assert_eq!(ids.get(&any.id), Some(&any.node), "at {}", h.name);
    }
    // Only the owners' engines run containers.
    assert!(master.containers().await?.is_empty());
    let big_envs: Vec<String> = big.containers().await?.into_iter().map(|c| c.env).collect();
    assert!(big_envs.contains(&pinned.id), "{big_envs:?}");

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
        let other = hosts.hosts.iter().find(|h| h.name != rec.node).unwrap();
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
    for h in &hosts.hosts {
        assert!(h.containers().await?.is_empty(), "{}", h.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_across_hosts_never_overcommit() -> Result<()> {
    // Each host: 2 slots by count, 150 MiB memory = 2 × 64 MiB.
    let hosts = Hosts::up(3, &["--memory", "150MiB", "--max-envs", "2"]).await?;
    let image = hosts.publish_demo(0).await?;

    let mut tasks = Vec::new();
    for i in 0..30 {
        let client = hosts.host(i % 3).client.clone();
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
    for rec in &accepted {
        let done = hosts.host(0).wait_settled(&rec.id).await?;
        assert_eq!(done.status.as_str(), "ready", "{done:?}");
    }
    // Each host's own engine agrees: two containers, each the one the
    // answer named, their memory labels within the host's 150 MiB.
    for h in &hosts.hosts {
        let on = h.containers().await?;
        assert_eq!(on.len(), 2, "{}: {on:?}", h.name);
        assert!(on.iter().map(|c| c.memory).sum::<u64>() <= 150 << 20);
        for c in &on {
            let rec = accepted.iter().find(|r| r.id == c.env).unwrap();
            assert_eq!(rec.node, h.name);
            assert!(c.running);
        }
        let info: Value = h.client.get("/v1/node").await?;
        assert_eq!(info["env_count"], 2);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_host_shows_lost_and_nothing_moves() -> Result<()> {
    let hosts = Hosts::up_each(
        3,
        &[],
        &[
            &["--role", "master"],
            &["--role", "slave"],
            &["--role", "slave", "--max-envs", "1"],
        ],
    )
    .await?;
    let image = hosts.publish_demo(0).await?;
    let (code, body) = hosts
        .host(0)
        .request_env(json!({"image": image, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    let rec = hosts.host(0).wait_settled(&rec.id).await?;
    assert_eq!(rec.status.as_str(), "ready");
    let owner = hosts.index(&rec.node).unwrap();
    let witness = if owner == 1 { 2 } else { 1 };
    let before = hosts.host(owner).containers().await?;
    assert_eq!(before.len(), 1);

    // kill -9 the owner's shoal: within the failure-detection time the
    // others show its environment lost, still with owner and image.
    hosts.kill_shoal(owner).await?;
    let killed_at = Instant::now();
    for i in [0, witness] {
        let h = hosts.host(i);
        wait_for(Duration::from_secs(30), || async {
            let r: EnvRecord = h
                .client
                .get(&format!("/v1/environments/{}", rec.id))
                .await?;
            Ok(r.status.as_str() == "lost" && r.owner == "a@example.com" && r.image == rec.image)
        })
        .await?;
        let list: Vec<EnvRecord> = h.client.get("/v1/environments").await?;
        assert!(list
            .iter()
            .any(|r| r.id == rec.id && r.status.as_str() == "lost"));
    }
    eprintln!("lost seen after {:?}", killed_at.elapsed());
    // Its container still runs on its own engine, unrestarted, and nothing
    // was started in its place on any other.
    assert_eq!(hosts.host(owner).containers().await?, before);
    assert!(hosts.host(witness).containers().await?.is_empty());
    assert!(hosts.host(0).containers().await?.is_empty());
    let v: Value = hosts.host(0).client.get("/v1/cluster").await?;
    let dead = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == rec.node.as_str())
        .unwrap()
        .clone();
    assert_eq!(dead["alive"], false, "{dead}");

    // It comes back: restored from its engine's labels, ready again
    // everywhere, the same container never restarted.
    hosts.start_shoal(owner).await?;
    for h in &hosts.hosts {
        wait_for(Duration::from_secs(30), || async {
            let r: EnvRecord = h
                .client
                .get(&format!("/v1/environments/{}", rec.id))
                .await?;
            Ok(r.status.as_str() == "ready")
        })
        .await?;
    }
    assert_eq!(hosts.host(owner).containers().await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_leaves_environments_running() -> Result<()> {
    let hosts = Hosts::up(2, &[]).await?;
    let image = hosts.publish_demo(0).await?;
    let (code, body) = hosts
        .host(1)
        .request_env(json!({"image": image, "owner": "a@example.com", "constraints": {}}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec = hosts
        .host(1)
        .wait_settled(body["id"].as_str().unwrap())
        .await?;
    assert_eq!(rec.status.as_str(), "ready");
    let owner = hosts.index(&rec.node).unwrap();
    let other = 1 - owner;
    let before = hosts.host(owner).containers().await?;
    hosts.term_shoal(owner).await?;
    assert!(
        hosts
            .shoal_log(owner)
            .contains("left the cluster; running environments stay up"),
        "{}",
        hosts.shoal_log(owner)
    );
    // The container keeps running; the other host shows the node left and
    // its environment lost, and places new requests only on itself.
    let after = hosts.host(owner).containers().await?;
    assert_eq!(after, before);
    assert!(after[0].running);
    let n = hosts.host(other);
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
async fn a_frozen_candidate_costs_a_timeout_then_the_next_host_takes_it() -> Result<()> {
    let roomy: &[&str] = &["--role", "slave", "--memory", "2GiB", "--max-envs", "12"];
    let hosts = Hosts::up_each(3, &[], &[&["--role", "master"], roomy, roomy]).await?;
    let image = hosts.publish_demo(0).await?;
    // Freeze host 1's shoal (SIGSTOP): its gossip still looks alive for a
    // few seconds, but its API does not answer.
    hosts.stop_shoal(1).await?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = hosts.host(0).client.clone();
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
    hosts.cont_shoal(1).await?;
    let mut accepted = Vec::new();
    for r in results {
        let (code, body) = r?;
        assert_eq!(code, 202, "{body}");
        assert_eq!(body["node"], hosts.host(2).name.as_str(), "{body}");
        accepted.push(body["id"].as_str().unwrap().to_string());
    }
    // With 8 requests in random order among two equal candidates, the
    // frozen one was tried first at least once and cost a timeout.
    assert!(
        hosts.shoal_log(0).contains("candidate unreachable"),
        "{}",
        hosts.shoal_log(0)
    );
    // The thawed host comes back and took nothing.
    assert!(hosts.host(1).containers().await?.is_empty());
    for id in accepted {
        hosts.host(0).wait_settled(&id).await?;
    }
    Ok(())
}

/// Layer locality across engines: with base `B` on host 0 only, a request
/// for `D` (FROM `B`) at host 2 is placed on host 0, which loads only `D`'s
/// own layers; with host 0 full it goes elsewhere and that host loads all.
/// `B` is big enough (240 MiB, zeros: small in the lz4 store) that loading
/// it puts the other hosts outside placement's near-equal band.
#[tokio::test(flavor = "multi_thread")]
async fn a_derived_build_lands_where_its_base_is_and_loads_only_the_delta() -> Result<()> {
    let hosts = Hosts::up_each(3, &["--role", "slave"], &[&["--max-envs", "1"]]).await?;
    let (h0, h2) = (hosts.host(0), hosts.host(2));
    // B built and published on host 0, its source image kept there: host
    // 0's engine holds B's layers, the others hold nothing.
    let base_src = "locality-base-src/img:1";
    let base = DemoImage {
        extra_files: vec![("/base.bin".into(), vec![0u8; 240 << 20])],
        ..Default::default()
    };
    build_image(&h0.engine, base_src, &base).await?;
    let (code, body) = raw(
        &h0.client,
        "POST",
        "/v1/images",
        Some(
            json!({"source": base_src, "ref": "base:1"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    assert_eq!(code, 201, "{body}");
    let derived = DemoImage {
        from: Some(base_src.into()),
        extra_files: vec![("/app.bin".into(), random_bytes(64 << 10))],
        ..Default::default()
    };
    hosts.publish(0, "app:1", &derived).await?;

    let app: Value = h2.client.get("/v1/images/app:1").await?;
    let b: Value = h2.client.get("/v1/images/base:1").await?;
    let total = app["size"].as_u64().unwrap();
    let delta = total - b["size"].as_u64().unwrap();
    let base_layers = b["layers"].as_u64().unwrap() as usize;
    assert!(delta > 0 && delta < 1 << 20, "{app} {b}");

    // The explanation, once host 0 has gossiped its layers (every 10 s).
    let req = json!({"image": "app:1", "owner": "a@example.com"});
    let deadline = Instant::now() + Duration::from_secs(30);
    let p = loop {
        let p = placement(h2, req.clone()).await?;
        if p["ranked"][0]["node"] == h0.name.as_str()
            && p["ranked"][0]["missing_bytes"].as_u64() == Some(delta)
        {
            break p;
        }
        assert!(Instant::now() < deadline, "host 0 never ranked first: {p}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for r in p["ranked"].as_array().unwrap().iter().skip(1) {
        assert_eq!(r["missing_bytes"].as_u64(), Some(total), "{p}");
    }
    assert!(p["ranked"][0]["why"].as_str().unwrap().contains("loads"));

    // Host 0 has room: the request at host 2 lands there and loads D's own
    // layers only.
    let (code, body) = h2.request_env(req.clone()).await?;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["node"], h0.name.as_str(), "{body}");
    let near = h2.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(near.status.as_str(), "ready", "{near:?}");
    let local = h0.local_envs().await?;
    let near_local = local.iter().find(|r| r.id == near.id).unwrap();
    assert_eq!(near_local.load.bytes_needed, delta, "{near_local:?}");
    assert_eq!(near_local.load.layers_cached, base_layers);

    // Host 0 is full (one environment at most): the next goes elsewhere,
    // and that host loads everything.
    let p = placement(h2, req.clone()).await?;
    let rejected = p["rejected"].as_array().unwrap();
    assert!(
        rejected
            .iter()
            .any(|r| r["node"] == h0.name.as_str()
                && r["reason"].as_str().unwrap().contains("at most")),
        "{p}"
    );
    let (code, body) = h2.request_env(req.clone()).await?;
    assert_eq!(code, 202, "{body}");
    let far_node = body["node"].as_str().unwrap().to_string();
    assert_ne!(far_node, h0.name);
    let far = h2.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(far.status.as_str(), "ready", "{far:?}");
    let owner = hosts.host(hosts.index(&far_node).unwrap());
    let far_local = owner.local_envs().await?;
    let far_local = far_local.iter().find(|r| r.id == far.id).unwrap();
    assert_eq!(far_local.load.bytes_needed, total, "{far_local:?}");
    assert_eq!(far_local.load.layers_cached, 0);
    Ok(())
}
