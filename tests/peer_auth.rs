//! Node-to-node HTTP authentication with real daemons on loopback, real
//! UDP gossip and the real engine: nodes that share the cluster key forward,
//! read from the owner, relay event streams and fetch build logs; a node
//! with another key is refused both ways and the request goes elsewhere or
//! fails cleanly; a client's forged `x-shoal-local`, a replayed signed call
//! and a call signed too far from the node's clock are refused and change
//! nothing; a gossiped http address that is not the node's gossip IP is
//! never called.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use serde_json::{json, Value};
use shoal::client::Client;
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::keyring::Keyring;
use shoal::model::EnvRecord;
use shoal::peer_auth::{self, Call, PeerKeys};

/// Waits until `n` sees `count` nodes alive with readable facts.
async fn sees_alive(n: &Node, count: usize) -> Result<()> {
    wait_for(Duration::from_secs(40), || async {
        let v: Value = n.client.get("/v1/cluster").await?;
        let alive = v["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| n["alive"] == true && !n["facts"].is_null())
                    .count()
            })
            .unwrap_or(0);
        Ok(alive == count)
    })
    .await
    .with_context(|| format!("{} never saw {count} nodes alive: {}", n.name, n.log()))
}

async fn publish_image(node: &Node, engine: &Engine, cleanup: &mut Cleanup) -> Result<String> {
    let r = format!("{}-img:1", unique("pa"));
    // A layer of its own: tests running at once never load the same layer
    // into the one engine together.
    let img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(4096))],
        ..Default::default()
    };
    publish_one(node, engine, &r, &img, cleanup).await?;
    Ok(r)
}

/// The environments node `n` itself holds (a signed call would be needed
/// for `x-shoal-local`; its own records are in `GET /v1/node`'s count and
/// in the engine: both are checked).
async fn env_count(n: &Node) -> Result<u64> {
    let v: Value = n.client.get("/v1/node").await?;
    v["env_count"].as_u64().context("env_count")
}

/// The first chunk of node `n`'s event stream of environment `id`.
async fn first_event(n: &Node, id: &str) -> Result<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let client = n.client.clone();
    let path = format!("/v1/environments/{id}/events");
    let task = tokio::spawn(async move {
        client
            .stream(&path, |chunk| {
                let _ = tx.send(chunk.to_vec());
            })
            .await
    });
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text.contains("\n\n") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(c)) => text.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    task.abort();
    Ok(text)
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_sharing_the_key_forward_read_relay_and_fetch_build_logs() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let (drop, recipes) = (tmp.path().join("drop"), tmp.path().join("recipes"));
    std::fs::create_dir_all(&drop)?;
    std::fs::create_dir_all(recipes.join("broken"))?;
    let cid = unique("c");
    let (an, bn) = (unique("pa"), unique("pb"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes = vec![an.clone(), bn.clone()];
    let (d, r) = (drop.display().to_string(), recipes.display().to_string());
    // A: master and build node (takes no environment); B: the slave.
    let a = Node::start(
        &an,
        &tmp.path().join("a"),
        &store,
        &[
            "--cluster-id",
            &cid,
            "--role",
            "master",
            "--role",
            "build",
            "--drop",
            &d,
            "--recipes",
            &r,
            "--build-rescan",
            "1s",
        ],
    )
    .await?;
    let b = Node::start(
        &bn,
        &tmp.path().join("b"),
        &store,
        &[
            "--cluster-id",
            &cid,
            "--seed",
            &a.gossip,
            "--role",
            "slave",
            "--memory",
            "1GiB",
        ],
    )
    .await?;
    sees_alive(&a, 2).await?;
    sees_alive(&b, 2).await?;
    let node: Value = a.client.get("/v1/node").await?;
    assert_eq!(node["peer_calls"], "required", "{node}");
    let image = publish_image(&a, &engine, &mut cleanup).await?;

    // Forwarding: a request at A lands on B.
    let (code, body) = a
        .request_env(json!({"image": image, "owner": "li@lab"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    assert_eq!(rec.node, bn);
    // Reads from the owner, through A.
    let ready = a.wait_settled(&rec.id).await?;
    assert_eq!(ready.status.as_str(), "ready", "{ready:?}");
    // The event stream, relayed by A from B.
    let ev = first_event(&a, &rec.id).await?;
    assert!(ev.contains("event: ready") && ev.contains(&rec.id), "{ev}");
    // An extension through A.
    let (code, body) = raw(
        &a.client,
        "POST",
        &format!("/v1/environments/{}/extend", rec.id),
        Some(json!({"by": "1h"}).to_string().into_bytes()),
    )
    .await?;
    assert_eq!(code, 200, "{body}");

    // A build that fails at once on A; B lists it and fetches its log.
    std::fs::write(
        recipes.join("broken/Dockerfile"),
        "FROM scratch\nCOPY no-such-file /x\n",
    )
    .unwrap();
    let build_dir = drop.join("broken").join("b1");
    std::fs::create_dir_all(&build_dir)?;
    std::fs::write(build_dir.join("VERSION"), "1\n")?;
    std::fs::write(build_dir.join("BUILD_COMPLETE"), "")?;
    cleanup.images.push("shoal/broken:b1".into());
    cleanup.images.push("shoal-build/broken:b1".into());
    cleanup.containers.push("shoal-install-broken-b1".into());
    wait_for(Duration::from_secs(120), || async {
        let list: Vec<Value> = b.client.get("/v1/builds").await?;
        Ok(list
            .iter()
            .any(|x| x["product"] == "broken" && x["status"] == "failed"))
    })
    .await
    .with_context(|| a.log())?;
    // Polled: on a loaded machine B may briefly see A dead (then it asks
    // no build node) or A may be slow to answer.
    wait_for(Duration::from_secs(30), || async {
        let (status, log) = b
            .client
            .send_raw("GET".parse()?, "/v1/builds/broken/b1/log", None)
            .await?;
        Ok(status.as_u16() == 200 && String::from_utf8_lossy(&log).contains("build failed"))
    })
    .await
    .with_context(|| format!("A:\n{}\nB:\n{}", a.log(), b.log()))?;

    // No call was refused anywhere. (The delete goes to the owner: a
    // delete forwarded under load can outlast the 3 s peer timeout.)
    let (code, body) = raw(
        &b.client,
        "DELETE",
        &format!("/v1/environments/{}", rec.id),
        None,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(engine.env_containers(&bn).await?.is_empty());
    for n in [&a, &b] {
        assert!(
            !n.log().contains("refused a node-to-node call"),
            "{}",
            n.log()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_another_key_is_refused_both_ways_and_the_request_goes_elsewhere() -> Result<()>
{
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let key = cluster_key_for(&store)?;
    let other = tmp.path().join("rogue.key");
    Keyring::load_or_create(&other)?;
    let other = other.display().to_string();
    let cid = unique("c");
    let (an, bn, rn) = (unique("pa"), unique("pb"), unique("pr"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes = vec![an.clone(), bn.clone(), rn.clone()];
    // A cluster moving to sealed gossip (transitional: it still hears
    // unsealed members), and a member with another key that got in.
    let honest = |seed: Option<&str>| {
        let mut v = vec![
            "--cluster-id".to_string(),
            cid.clone(),
            "--cluster-key".into(),
            key.clone(),
            "--gossip-seal".into(),
            "transitional".into(),
        ];
        if let Some(s) = seed {
            v.extend(["--seed".into(), s.to_string()]);
        }
        v
    };
    let args = honest(None);
    let mut a_args: Vec<&str> = args.iter().map(String::as_str).collect();
    a_args.extend(["--role", "master"]);
    let a = Node::start(&an, &tmp.path().join("a"), &store, &a_args).await?;
    let args = honest(Some(&a.gossip));
    let mut b_args: Vec<&str> = args.iter().map(String::as_str).collect();
    b_args.extend([
        "--role",
        "slave",
        "--memory",
        "1GiB",
        "--label",
        "rack=ours",
    ]);
    let b = Node::start(&bn, &tmp.path().join("b"), &store, &b_args).await?;
    let r = Node::start(
        &rn,
        &tmp.path().join("r"),
        &store,
        &[
            "--cluster-id",
            &cid,
            "--cluster-key",
            &other,
            "--gossip-seal",
            "off",
            "--insecure-gossip",
            "--seed",
            &a.gossip,
            "--role",
            "slave",
            "--memory",
            "1GiB",
            "--label",
            "rack=rogue",
        ],
    )
    .await?;
    for n in [&a, &b, &r] {
        sees_alive(n, 3).await?;
    }
    let image = publish_image(&a, &engine, &mut cleanup).await?;

    // The rogue's forward to B is refused: a clean 503 naming the refusal.
    let (code, body) = r
        .request_env(json!({"image": image, "owner": "li@lab", "constraints": {"rack": "ours"}}))
        .await?;
    assert_eq!(code, 503, "{body}");
    let why = body["reasons"].to_string();
    assert!(
        why.contains(&bn) && why.contains("refused this node's signed call"),
        "{body}"
    );
    // A's forward to the rogue is refused by it in turn.
    let (code, body) = a
        .request_env(json!({"image": image, "owner": "li@lab", "constraints": {"rack": "rogue"}}))
        .await?;
    assert_eq!(code, 503, "{body}");
    let why = body["reasons"].to_string();
    assert!(
        why.contains(&rn) && why.contains("refused this node's signed call"),
        "{body}"
    );
    assert_eq!(env_count(&b).await?, 0);
    assert_eq!(env_count(&r).await?, 0);
    assert!(
        b.log().contains("refused a node-to-node call"),
        "{}",
        b.log()
    );
    assert!(
        r.log().contains("refused a node-to-node call"),
        "{}",
        r.log()
    );

    // Unconstrained requests at A land on B, whichever candidate A tries
    // first: the rogue refuses, B takes it.
    for owner in ["a@lab", "b@lab"] {
        let mut answer = a
            .request_env(json!({"image": image, "owner": owner}))
            .await?;
        // On a loaded machine the forward to B can outlast the 3 s peer
        // timeout (B then refuses it late: the deadline); ask again, a
        // bounded number of times.
        for _ in 0..3 {
            if answer.0 != 503 || !answer.1["reasons"].to_string().contains("timed out") {
                break;
            }
            answer = a
                .request_env(json!({"image": image, "owner": owner}))
                .await?;
        }
        let (code, body) = answer;
        assert_eq!(code, 202, "{body}");
        let rec: EnvRecord = serde_json::from_value(body)?;
        assert_eq!(rec.node, bn, "{rec:?}");
        let rec = a.wait_settled(&rec.id).await?;
        assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    }
    assert_eq!(env_count(&r).await?, 0);
    assert!(engine.env_containers(&rn).await?.is_empty());
    Ok(())
}

/// Sends `body` to `path` on `n` with the given extra headers.
async fn send_with(
    n: &Node,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, String)],
) -> Result<(u16, Value)> {
    let mut c = Client::new(&n.url, Duration::from_secs(30))?;
    for (k, v) in headers {
        c = c.with_header(k, v);
    }
    let body = (!body.is_empty()).then(|| body.to_vec());
    raw(&c, method, path, body).await
}

/// The headers of a call to node `to`, signed by "intruder" with `ring`'s
/// HTTP key at `ts_ms`, with `x-shoal-local`.
fn signed_headers(
    ring: &Keyring,
    method: &str,
    path: &str,
    body: &[u8],
    to: &str,
    ts_ms: u64,
) -> Vec<(&'static str, String)> {
    let call = Call {
        method,
        path,
        body,
        from: "intruder",
        to,
    };
    let nonce: [u8; 16] = rand::random();
    let s = peer_auth::sign(&PeerKeys::from_keyring(ring), &call, ts_ms, nonce);
    let mut h = vec![("x-shoal-local", "1".to_string())];
    h.extend(s.headers().map(|(k, v)| (k, v.to_string())));
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_replayed_and_skewed_calls_are_refused_and_change_nothing() -> Result<()> {
    let mut s = solo("pf", &[]).await?;
    let image = publish_image(&s.node, &s.engine, &mut s.cleanup).await?;
    let node = &s.node;
    let ring = Keyring::load(Path::new(&cluster_key_for(&s.dir.path().join("store"))?))?;
    let body = json!({"image": image, "owner": "li@lab"})
        .to_string()
        .into_bytes();
    let path = "/v1/environments";

    // A client's forged x-shoal-local (or forwarding deadline): 401 naming
    // the header, nothing created.
    for header in ["x-shoal-local", "x-shoal-deadline"] {
        let v = if header == "x-shoal-local" {
            "1".to_string()
        } else {
            (peer_auth::unix_ms() + 60_000).to_string()
        };
        let (code, answer) = send_with(node, "POST", path, &body, &[(header, v)]).await?;
        assert_eq!(code, 401, "{answer}");
        assert_eq!(answer["field"], header, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(header),
            "{answer}"
        );
    }
    // Signed with another cluster's key.
    let stranger = Keyring::from_keys(vec![rand::random()])?;
    let h = signed_headers(
        &stranger,
        "POST",
        path,
        &body,
        &s.name,
        peer_auth::unix_ms(),
    );
    let (code, answer) = send_with(node, "POST", path, &body, &h).await?;
    assert_eq!(
        (code, answer["field"].as_str()),
        (401, Some("x-shoal-sig")),
        "{answer}"
    );
    // Signed with the cluster key but too far from the node's clock.
    for skew in [
        -(peer_auth::MAX_SKEW_MS as i64) - 60_000,
        peer_auth::MAX_SKEW_MS as i64 + 60_000,
    ] {
        let ts = (peer_auth::unix_ms() as i64 + skew) as u64;
        let h = signed_headers(&ring, "POST", path, &body, &s.name, ts);
        let (code, answer) = send_with(node, "POST", path, &body, &h).await?;
        assert_eq!(
            (code, answer["field"].as_str()),
            (401, Some("x-shoal-ts")),
            "{answer}"
        );
    }
    // Signed for another node.
    let h = signed_headers(
        &ring,
        "POST",
        path,
        &body,
        "some-other-node",
        peer_auth::unix_ms(),
    );
    let (code, answer) = send_with(node, "POST", path, &body, &h).await?;
    assert_eq!(code, 401, "{answer}");
    assert_eq!(env_count(node).await?, 0);
    assert!(s.engine.env_containers(&s.name).await?.is_empty());

    // A call signed with the cluster key is served here; its replay is not.
    let h = signed_headers(&ring, "POST", path, &body, &s.name, peer_auth::unix_ms());
    let (code, answer) = send_with(node, "POST", path, &body, &h).await?;
    assert_eq!(code, 202, "{answer}");
    let rec: EnvRecord = serde_json::from_value(answer)?;
    let (code, answer) = send_with(node, "POST", path, &body, &h).await?;
    assert_eq!(
        (code, answer["field"].as_str()),
        (401, Some("x-shoal-nonce")),
        "{answer}"
    );
    // The replay with another body fails the signature instead.
    let other = json!({"image": image, "owner": "mallory@lab"})
        .to_string()
        .into_bytes();
    let (code, answer) = send_with(node, "POST", path, &other, &h).await?;
    assert_eq!(
        (code, answer["field"].as_str()),
        (401, Some("x-shoal-sig")),
        "{answer}"
    );
    assert_eq!(env_count(node).await?, 1);
    let rec = node.wait_settled(&rec.id).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    let list: Vec<EnvRecord> = node.client.get(path).await?;
    assert_eq!(list.len(), 1, "{list:?}");
    let (code, _) = raw(&node.client, "DELETE", &format!("{path}/{}", rec.id), None).await?;
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gossiped_http_address_off_the_gossip_ip_is_never_called() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let cid = unique("c");
    let (an, bn) = (unique("pa"), unique("pb"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes = vec![an.clone(), bn.clone()];
    let a = Node::start(
        &an,
        &tmp.path().join("a"),
        &store,
        &["--cluster-id", &cid, "--role", "master"],
    )
    .await?;
    // B serves HTTP on 127.0.0.2 but gossips from 127.0.0.1.
    let b = Node::start(
        &bn,
        &tmp.path().join("b"),
        &store,
        &[
            "--cluster-id",
            &cid,
            "--seed",
            &a.gossip,
            "--listen",
            "127.0.0.2:0",
            "--role",
            "slave",
            "--memory",
            "1GiB",
        ],
    )
    .await?;
    sees_alive(&a, 2).await?;
    assert!(
        b.log().contains("other nodes will not call this node"),
        "{}",
        b.log()
    );
    let v: Value = a.client.get("/v1/cluster").await?;
    let seen = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == bn.as_str())
        .cloned()
        .context("b in the view")?;
    let err = seen["http_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("not the address the node gossips from"),
        "{seen}"
    );
    let image = publish_image(&a, &engine, &mut cleanup).await?;
    let (code, body) = a
        .request_env(json!({"image": image, "owner": "li@lab"}))
        .await?;
    assert_eq!(code, 503, "{body}");
    let why = body["reasons"].to_string();
    assert!(why.contains(&bn) && why.contains("not called"), "{body}");
    assert_eq!(env_count(&b).await?, 0);
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Rewrites `node`'s key file, sends it SIGHUP and waits until it shows
/// the new key ids.
async fn rekey(node: &Node, file: &Path, lines: &[&str]) -> Result<()> {
    write_private(file, &lines.concat())?;
    let want: Vec<String> = Keyring::parse(&lines.concat())?
        .ids()
        .iter()
        .map(|i| i.to_string())
        .collect();
    let pid = node.child.as_ref().context("running")?.id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    wait_for(Duration::from_secs(20), || async {
        // A token from the key file as it is now (the old key goes away).
        let v: Value = node
            .client_as(HARNESS_OPERATOR, "operator")?
            .get("/v1/node")
            .await?;
        Ok(v["gossip"]["key_ids"] == json!(want))
    })
    .await
    .with_context(|| node.log())
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_keep_passing_both_ways_through_a_live_key_rotation() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let (k1, k2) = (Keyring::generate_line(), Keyring::generate_line());
    let (ka, kb) = (tmp.path().join("a.key"), tmp.path().join("b.key"));
    write_private(&ka, &k1)?;
    write_private(&kb, &k1)?;
    let cid = unique("c");
    let (an, bn) = (unique("pa"), unique("pb"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes = vec![an.clone(), bn.clone()];
    let (kas, kbs) = (ka.display().to_string(), kb.display().to_string());
    let a = Node::start(
        &an,
        &tmp.path().join("a"),
        &store,
        &[
            "--cluster-id",
            &cid,
            "--cluster-key",
            &kas,
            "--role",
            "slave",
            "--memory",
            "1GiB",
            "--label",
            "pool=a",
        ],
    )
    .await?;
    let b = Node::start(
        &bn,
        &tmp.path().join("b"),
        &store,
        &[
            "--cluster-id",
            &cid,
            "--cluster-key",
            &kbs,
            "--seed",
            &a.gossip,
            "--role",
            "slave",
            "--memory",
            "1GiB",
            "--label",
            "pool=b",
        ],
    )
    .await?;
    sees_alive(&a, 2).await?;
    sees_alive(&b, 2).await?;
    let image = publish_image(&a, &engine, &mut cleanup).await?;
    // One environment on each node, each requested at the other.
    let mut ids = Vec::new();
    for (at, pool) in [(&a, "b"), (&b, "a")] {
        let (code, body) = at
            .request_env(json!({"image": image, "owner": "li@lab", "constraints": {"pool": pool}}))
            .await?;
        assert_eq!(code, 202, "{body}");
        let rec: EnvRecord = serde_json::from_value(body)?;
        at.wait_settled(&rec.id).await?;
        ids.push(rec.id);
    }
    // A reads B's environment through B, and B reads A's through A.
    let both_ways = || async {
        for (n, id) in [(&a, &ids[0]), (&b, &ids[1])] {
            let c = n.client_as(HARNESS_OPERATOR, "operator")?;
            let (code, body) = raw(&c, "GET", &format!("/v1/environments/{id}"), None).await?;
            assert_eq!(code, 200, "at {}: {body}", n.name);
        }
        Ok::<_, anyhow::Error>(())
    };
    both_ways().await?;
    // Add the new key second, make it first, remove the old: one node at
    // a time, the calls checked after every step.
    for lines in [[&k1, &k2].as_slice(), &[&k2, &k1], &[&k2]] {
        let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        rekey(&a, &ka, &lines).await?;
        both_ways().await?;
        rekey(&b, &kb, &lines).await?;
        both_ways().await?;
    }
    for n in [&a, &b] {
        assert!(
            !n.log().contains("refused a node-to-node call"),
            "{}",
            n.log()
        );
    }
    // The old key is worth nothing now.
    let old = Keyring::parse(&k1)?;
    let path = format!("/v1/environments/{}", ids[0]);
    let h = signed_headers(&old, "GET", &path, b"", &bn, peer_auth::unix_ms());
    let (code, answer) = send_with(&b, "GET", &path, b"", &h).await?;
    assert_eq!(
        (code, answer["field"].as_str()),
        (401, Some("x-shoal-sig")),
        "{answer}"
    );
    Ok(())
}
