//! The gossip state for operators, against real daemons on loopback (real
//! sealed UDP gossip between two processes): `GET /v1/gossip` on one node
//! shows the other's keys with the versions that node itself holds, a
//! killed member turns dead (with its silence and phi), `shoal gossip
//! --json` parses, the text form lists the members, `--watch` prints the
//! death as a change, a tester gets 403. And the progress of `shoal
//! publish` / `shoal create --wait` with stdout and stderr piped: plain
//! lines, no bar, and `--json` output that parses.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use shoal::cluster::inspect::{GossipState, Member, MemberStatus};

use common::{build_image, raw, unique, wait_for, Cleanup, Node};

/// `shoal ARGS` against `node` with its operator token; (status, stdout, stderr).
fn shoal(node: &Node, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_NODE", &node.url)
        .env("SHOAL_TOKEN", node.token.as_deref().unwrap_or_default())
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn member<'a>(s: &'a GossipState, name: &str) -> Option<&'a Member> {
    s.members
        .iter()
        .filter(|m| m.name == name)
        .max_by_key(|m| m.generation)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_shows_the_others_keys_and_its_death() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let cid = unique("gv");
    let (an, bn) = (unique("gva"), unique("gvb"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes.extend([an.clone(), bn.clone()]);
    let a = Node::start(
        &an,
        &tmp.path().join("a"),
        &store,
        &["--cluster-id", &cid, "--role", "master"],
    )
    .await?;
    let mut b = Node::start(
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
            "--label",
            "rack=7",
        ],
    )
    .await?;

    // a hears b's keys, at the versions b itself holds.
    wait_for(Duration::from_secs(40), || async {
        let s: GossipState = a.client.get("/v1/gossip").await?;
        Ok(member(&s, &bn).is_some_and(|m| {
            m.status == MemberStatus::Alive && m.keys.iter().any(|k| k.key == "labels")
        }))
    })
    .await
    .with_context(|| format!("a never saw b alive with its keys: {}", a.log()))?;
    // b's own state first: whatever a holds then is at most as new.
    let own: GossipState = b.client.get("/v1/gossip").await?;
    let at_a: GossipState = a.client.get("/v1/gossip").await?;
    let b_at_a = member(&at_a, &bn).context("b")?;
    let b_own = own
        .members
        .iter()
        .find(|m| m.is_self)
        .context("b's own entry")?;
    assert_eq!(b_own.name, bn);
    assert_eq!(b_at_a.generation, b_own.generation);
    for key in ["name", "http", "roles", "labels"] {
        let there = b_own.keys.iter().find(|k| k.key == key).context(key)?;
        let here = b_at_a.keys.iter().find(|k| k.key == key).context(key)?;
        assert_eq!((&here.value, here.version), (&there.value, there.version));
        assert!(here.version > 0 && here.version <= b_at_a.max_version);
    }
    let labels = b_at_a.keys.iter().find(|k| k.key == "labels").unwrap();
    assert!(labels.value.contains("\"rack\":\"7\""), "{labels:?}");
    let bytes: u64 = b_at_a
        .keys
        .iter()
        .map(|k| (k.key.len() + k.value.len()) as u64)
        .sum();
    assert_eq!(b_at_a.state_bytes, bytes);
    assert!(b_at_a.heartbeat > 0 && b_at_a.last_seen.is_some());
    assert_eq!(b_at_a.gossip_addr.to_string(), b.gossip);
    let a_self = member(&at_a, &an).context("a")?;
    assert!(a_self.is_self && a_self.phi.is_none());

    // A tester may not read it; without a token, 401.
    let (code, body) = raw(&a.tester("li@lab")?, "GET", "/v1/gossip", None).await?;
    assert_eq!(code, 403, "{body}");
    let (code, _) = raw(&a.anonymous()?, "GET", "/v1/gossip", None).await?;
    assert_eq!(code, 401);

    // The CLI: --json parses to the same members, the text lists them.
    let (ok, out, err) = shoal(&a, &["gossip", "--json"])?;
    ensure!(ok, "shoal gossip --json: {err}");
    let parsed: GossipState = serde_json::from_str(&out).context("shoal gossip --json")?;
    assert!(member(&parsed, &bn).is_some() && member(&parsed, &an).is_some());
    let (ok, out, err) = shoal(&a, &["gossip"])?;
    ensure!(ok, "shoal gossip: {err}");
    let header = [
        "MEMBER",
        "GENERATION",
        "GOSSIP",
        "STATUS",
        "HEARTBEAT",
        "LAST",
        "SEEN",
        "PHI",
    ];
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().take(8).eq(header.iter().copied())),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&an) || l.starts_with(&bn))
        .collect();
    assert!(
        rows.iter()
            .any(|l| l.starts_with(&format!("{an}*")) && l.contains(" alive ")),
        "{out}"
    );
    assert!(
        rows.iter()
            .any(|l| l.starts_with(&bn) && l.contains(" alive ")),
        "{out}"
    );
    assert!(out.contains(&format!("\n{bn} generation ")), "{out}");
    let (ok, out, err) = shoal(&a, &["cluster"])?;
    ensure!(ok, "shoal cluster: {err}");
    assert!(
        out.contains("LAST SEEN") && out.contains("PHI") && out.contains("GOSSIP STATE"),
        "{out}"
    );

    // Watch while b is killed: the change is printed, heartbeats are not.
    let watch = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["gossip", "--watch", "--interval", "1s", "--for", "60s"])
        .env("SHOAL_NODE", &a.url)
        .env("SHOAL_TOKEN", a.token.as_deref().unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill();
    wait_for(Duration::from_secs(40), || async {
        let s: GossipState = a.client.get("/v1/gossip").await?;
        Ok(member(&s, &bn).is_some_and(|m| m.status == MemberStatus::Dead))
    })
    .await
    .with_context(|| format!("b never turned dead at a: {}", a.log()))?;
    let s: GossipState = a.client.get("/v1/gossip").await?;
    let dead = member(&s, &bn).context("b forgotten at once")?.clone();
    assert_eq!(dead.status, MemberStatus::Dead);
    // Its silence shows, and phi has grown past a live member's (~1).
    assert!(dead.last_seen.unwrap_or(0.0) > 1.0, "{dead:?}");
    assert!(dead.phi.unwrap_or(0.0) > 2.0, "{dead:?}");
    let cluster: Value = a.client.get("/v1/cluster").await?;
    let b_view = cluster["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == bn.as_str()))
        .context("b in /v1/cluster")?;
    assert_eq!(b_view["alive"], false, "{b_view}");
    assert!(b_view["phi"].as_f64().unwrap_or(0.0) > 2.0, "{b_view}");
    assert!(b_view["state_bytes"].as_u64().unwrap_or(0) > 0, "{b_view}");
    // Give the watcher a poll or two, then stop it and read what it said.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut watch = watch;
    let _ = watch.kill();
    let out = watch.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let changes: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("MEMBER"))
        .filter(|l| l.contains(" -> ") || l.contains(" set ") || l.contains(" deleted "))
        .collect();
    assert!(
        changes
            .iter()
            .any(|l| l.ends_with(&format!("{bn} alive -> dead"))),
        "watch printed: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_and_create_show_plain_progress_lines_when_piped() -> Result<()> {
    let mut solo = common::solo("gvp", &[]).await?;
    let r = format!("{}-img:1", unique("gvp"));
    let src = format!("{}-src/img:1", r.replace(':', "-"));
    solo.cleanup
        .images
        .extend([src.clone(), format!("shoal/{r}")]);
    // A layer big enough that the publish takes a few polls.
    let image = shoal::demo::DemoImage {
        extra_files: vec![("/payload".into(), common::random_bytes(96 << 20))],
        ..Default::default()
    };
    build_image(&solo.engine, &src, &image).await?;

    let (ok, out, err) = shoal(&solo.node, &["publish", &src, &r])?;
    ensure!(ok, "shoal publish: {err}");
    assert!(out.starts_with(&format!("published {r} (")), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        !err.contains('\r') && !err.contains('\x1b'),
        "not plain: {err:?}"
    );
    let prefix = format!("publish {r}: ");
    assert!(lines.iter().all(|l| l.starts_with(&prefix)), "{err}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" of ") && l.contains("/s, about ")),
        "no progress line: {err}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains(": done, ")),
        "{err}"
    );

    // --json: stdout is the published build as JSON, progress on stderr.
    let r2 = format!("{}-img:2", unique("gvp"));
    solo.cleanup.images.push(format!("shoal/{r2}"));
    let (ok, out, err) = shoal(&solo.node, &["publish", "--json", &src, &r2])?;
    ensure!(ok, "shoal publish --json: {err}");
    let img: Value = serde_json::from_str(&out).context("publish --json")?;
    assert_eq!(img["ref"], r2.as_str(), "{img}");
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");

    // create --wait --json: the record on stdout, status lines on stderr.
    let (ok, out, err) = shoal(
        &solo.node,
        &["create", &r, "--owner", "li@lab", "--wait", "--json"],
    )?;
    ensure!(ok, "shoal create --wait: {err}\n{}", solo.node.log());
    let rec: Value = serde_json::from_str(&out).context("create --json")?;
    assert_eq!(rec["status"], "ready", "{rec}");
    let id = rec["id"].as_str().context("id")?;
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(&format!("create {id}: "))),
        "{err}"
    );
    assert!(
        lines.first().is_some_and(|l| l.ends_with(": pending")),
        "{err}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains(": ready after ")),
        "{err}"
    );
    let (ok, _, err) = shoal(&solo.node, &["delete", id])?;
    ensure!(ok, "delete: {err}");
    solo.engine.remove_image(&src).await.ok();
    Ok(())
}
