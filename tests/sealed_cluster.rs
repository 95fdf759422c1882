//! Sealed gossip between real `shoal daemon` processes on loopback (real
//! UDP; the multi-host harness was not on its branch yet when this was
//! written). A running unsealed cluster of three moves to sealed, then
//! rotates its key, live: each node's config file and key file are
//! rewritten and the node gets SIGHUP, one node at a time, while every
//! node's view is polled: no node is ever seen dead. Then outsiders (the
//! old key, no key) try to join and never appear.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::*;
use serde_json::Value;
use shoal::keyring::Keyring;

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn hup(node: &Node) -> Result<()> {
    let pid = node.child.as_ref().expect("running").id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    Ok(())
}

async fn node_info(node: &Node) -> Result<Value> {
    node.client
        .get::<Value>("/v1/node")
        .await
        .map_err(Into::into)
}

async fn alive_names(node: &Node) -> Result<BTreeSet<String>> {
    let v: Value = node.client.get("/v1/cluster").await?;
    Ok(v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["alive"] == true)
                .filter_map(|n| n["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

async fn all_names(node: &Node) -> Result<BTreeSet<String>> {
    let v: Value = node.client.get("/v1/cluster").await?;
    Ok(v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

async fn wait_for_mode(node: &Node, mode: &str, primary: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = node_info(node).await?["gossip"].clone();
        if g["mode"] == mode && primary.is_none_or(|p| g["key_ids"][0] == p) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} never reloaded to {mode} {primary:?}: {g}", node.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsealed_to_sealed_and_key_rotation_live_on_three_nodes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let cluster_id = unique("seal");
    let names: Vec<String> = (0..3).map(|i| unique(&format!("s{i}"))).collect();
    let key_a = Keyring::generate_line();
    let key_b = Keyring::generate_line();
    let id = |line: &str| Keyring::parse(line).unwrap().primary_id().to_string();
    let (id_a, id_b) = (id(&key_a), id(&key_b));
    let conf = |i: usize| tmp.path().join(format!("n{i}.toml"));
    let keyfile = |i: usize| tmp.path().join(format!("n{i}.key"));
    // An unsealed cluster, as it runs before sealing.
    let unsealed = "insecure_gossip = true\ngossip_seal = \"off\"\n";
    let mut nodes: Vec<Node> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        std::fs::write(conf(i), unsealed)?;
        let conf_s = conf(i).display().to_string();
        // The key that signs user tokens changes with every step below
        // (the node's own, then key A, then B): the test reads the views
        // without a token (`--open-read`).
        let mut args = vec![
            "--cluster-id",
            &cluster_id,
            "--config",
            &conf_s,
            "--open-read",
        ];
        let seed;
        if let Some(first) = nodes.first() {
            seed = first.gossip.clone();
            args.extend(["--seed", &seed]);
        }
        let mut node = Node::start(name, &tmp.path().join(name), &store, &args).await?;
        node.client = node.anonymous()?;
        nodes.push(node);
    }
    let want: BTreeSet<String> = names.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &nodes {
        while alive_names(n).await? != want {
            if Instant::now() > deadline {
                bail!("the unsealed cluster did not form: {}", n.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(node_info(n).await?["gossip"]["mode"], "off");
    }

    // Every node's view, polled the whole time: any node seen dead is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let seen_dead: Arc<Mutex<Vec<String>>> = Arc::default();
    let poller = {
        let clients: Vec<(String, shoal::client::Client)> = nodes
            .iter()
            .map(|n| (n.name.clone(), n.client.clone()))
            .collect();
        let (stop, seen_dead, want) = (stop.clone(), seen_dead.clone(), want.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (name, c) in &clients {
                    if let Ok(v) = c.get::<Value>("/v1/cluster").await {
                        for n in v["nodes"].as_array().into_iter().flatten() {
                            let who = n["name"].as_str().unwrap_or("").to_string();
                            if want.contains(&who) && n["alive"] != true {
                                seen_dead
                                    .lock()
                                    .unwrap()
                                    .push(format!("{name} saw {who} dead"));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let steps: [(&str, &str, String, &str); 5] = [
        ("transitional", "transitional", key_a.clone(), id_a.as_str()),
        ("required", "required", key_a.clone(), id_a.as_str()),
        (
            "new key second",
            "required",
            format!("{key_a}{key_b}"),
            id_a.as_str(),
        ),
        (
            "new key primary",
            "required",
            format!("{key_b}{key_a}"),
            id_b.as_str(),
        ),
        ("old key removed", "required", key_b.clone(), id_b.as_str()),
    ];
    for (step, mode, keys, primary) in &steps {
        for (i, n) in nodes.iter().enumerate() {
            write_private(&keyfile(i), keys)?;
            std::fs::write(
                conf(i),
                format!(
                    "cluster_key = \"{}\"\ngossip_seal = \"{mode}\"\n",
                    keyfile(i).display()
                ),
            )?;
            hup(n)?;
            wait_for_mode(n, mode, Some(primary)).await?;
            // A few gossip rounds in this state before the next node.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        eprintln!("step done: {step}");
    }
    stop.store(true, Ordering::Relaxed);
    poller.await?;
    let dead = seen_dead.lock().unwrap().clone();
    assert!(dead.is_empty(), "nodes were seen dead: {dead:?}");
    for n in &nodes {
        let g = node_info(n).await?["gossip"].clone();
        assert_eq!(g["key_ids"], serde_json::json!([id_b]), "{g}");
        assert!(g["datagrams"]["opened"].as_u64() > Some(0), "{g}");
        assert_eq!(alive_names(n).await?, want);
    }

    // Outsiders: the old key, and no key at all. Neither ever appears.
    let before = node_info(&nodes[0]).await?["gossip"]["datagrams"].clone();
    let old_key = tmp.path().join("old.key");
    write_private(&old_key, &key_a)?;
    let old_s = old_key.display().to_string();
    let rogue_names = [unique("rogue-old"), unique("rogue-none")];
    let r1 = Node::start(
        &rogue_names[0],
        &tmp.path().join(&rogue_names[0]),
        &tmp.path().join("rogue-store"),
        &[
            "--cluster-id",
            &cluster_id,
            "--cluster-key",
            &old_s,
            "--seed",
            &nodes[0].gossip,
        ],
    )
    .await?;
    let r2 = Node::start(
        &rogue_names[1],
        &tmp.path().join(&rogue_names[1]),
        &tmp.path().join("rogue-store"),
        &[
            "--cluster-id",
            &cluster_id,
            "--insecure-gossip",
            "--seed",
            &nodes[0].gossip,
        ],
    )
    .await?;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        for n in &nodes {
            assert_eq!(all_names(n).await?, want, "an outsider appeared");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for r in [&r1, &r2] {
        assert_eq!(
            all_names(r).await?.len(),
            1,
            "an outsider heard the cluster"
        );
    }
    let after = node_info(&nodes[0]).await?["gossip"]["datagrams"].clone();
    let grew = |k: &str| after[k].as_u64() > before[k].as_u64();
    assert!(grew("dropped_bad_auth"), "{after}");
    assert!(grew("dropped_unsealed"), "{after}");
    Ok(())
}
