//! Maintenance drain without stopping (`POST /v1/node/drain`, `shoal
//! drain`), on the multi-host harness: host 2 is drained by an operator
//! (testers get 403, anonymous callers 401, a bad body 400 naming
//! `drain`); placement everywhere rejects it with reason `draining`
//! (gossiped); creates sent to every host land elsewhere, one pinned to it
//! is refused naming `draining`; its running environment stays ready and
//! can be extended; the drain survives a restart of its daemon; `shoal
//! drain --undo` (the real CLI) makes it take new environments again.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::hosts::{wait_for, Host, Hosts};
use common::raw;
use serde_json::{json, Value};
use shoal::model::EnvRecord;

/// Gossip rounds to carry a change, on two busy cores.
const GOSSIP: Duration = Duration::from_secs(30);

async fn post(c: &shoal::client::Client, path: &str, body: Value) -> Result<(u16, Value)> {
    raw(c, "POST", path, Some(body.to_string().into_bytes())).await
}

/// The rejected entries of `POST /v1/placement` at `h` for `node`.
async fn rejection(h: &Host, image: &str, node: &str) -> Result<Option<Value>> {
    let (code, p) = post(
        &h.client,
        "/v1/placement",
        json!({"image": image, "owner": "p@example.com"}),
    )
    .await?;
    ensure!(code == 200, "placement at {}: {code} {p}", h.name);
    Ok(p["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["node"] == node)
        .cloned())
}

/// `shoal drain [--undo] --json` against host `h`, as the harness's operator.
fn cli_drain(h: &Host, undo: bool) -> Result<Value> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.args(["drain", "--json", "--node", &h.api]);
    if undo {
        cmd.arg("--undo");
    }
    let out = cmd
        .env("SHOAL_TOKEN", h.token.as_deref().context("no token")?)
        .output()?;
    ensure!(
        out.status.success(),
        "shoal drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_host_keeps_its_environments_and_takes_no_new_ones() -> Result<()> {
    let hosts = Hosts::up_each(
        3,
        &[],
        &[
            &["--label", "slot=0"],
            &["--label", "slot=1"],
            &["--label", "slot=2"],
        ],
    )
    .await?;
    let drained = hosts.host(2);
    let image = hosts.publish_demo(0).await?;
    let pinned = |slot: &str| json!({"image": image, "owner": "o@example.com", "constraints": {"slot": slot}});

    // An environment on host 2, before the drain.
    let (code, body) = hosts.host(0).request_env(pinned("2")).await?;
    ensure!(code == 202, "{body}");
    let kept: EnvRecord = serde_json::from_value(body)?;
    ensure!(kept.node == drained.name, "placed on {}", kept.node);
    let kept = hosts.host(0).wait_settled(&kept.id).await?;
    ensure!(kept.status.as_str() == "ready", "{kept:?}");
    let container = drained.containers().await?;
    ensure!(container.len() == 1, "{container:?}");

    // Only operators drain.
    let path = "/v1/node/drain";
    let (code, b) = post(
        &drained.tester("li@example.com")?,
        path,
        json!({"drain": true}),
    )
    .await?;
    ensure!(code == 403, "tester: {code} {b}");
    let (code, b) = post(&drained.anonymous()?, path, json!({"drain": true})).await?;
    ensure!(code == 401, "anonymous: {code} {b}");
    let (code, b) = post(&drained.client, path, json!({"drain": "yes"})).await?;
    ensure!(code == 400 && b["field"] == "drain", "bad body: {code} {b}");
    let (code, b) = post(&drained.client, path, json!({})).await?;
    ensure!(code == 400 && b["field"] == "drain", "no field: {code} {b}");
    let n: Value = drained.client.get("/v1/node").await?;
    ensure!(
        n["drain"]["draining"] == false,
        "refused calls changed nothing: {n}"
    );

    // The drain (the API); twice keeps the first `since`.
    let (code, d) = post(&drained.client, path, json!({"drain": true})).await?;
    ensure!(code == 200 && d["draining"] == true, "{code} {d}");
    let since = d["maintenance"]["since"].clone();
    ensure!(
        since.is_string() && d["maintenance"]["by"].is_string(),
        "{d}"
    );
    let (_, again) = post(&drained.client, path, json!({"drain": true})).await?;
    ensure!(again["maintenance"]["since"] == since, "{again}");
    let n: Value = drained.client.get("/v1/node").await?;
    ensure!(
        n["drain"]["draining"] == true && n["drain"]["stopping"] == false,
        "{n}"
    );
    // Healthy still: it serves reads and forwards creates elsewhere.
    let (code, h) = raw(&drained.client, "GET", "/healthz", None).await?;
    ensure!(code == 200, "healthz while drained: {code} {h}");

    // Every host's placement rejects it, saying why (gossiped).
    for h in &hosts.hosts {
        wait_for(GOSSIP, || async {
            Ok(rejection(h, &image, &drained.name)
                .await?
                .is_some_and(|r| r.to_string().contains("draining")))
        })
        .await
        .with_context(|| format!("{} never rejected the drained node", h.name))?;
    }
    // Creates at every host avoid it...
    let mut made = Vec::new();
    for h in &hosts.hosts {
        let (code, body) = h
            .request_env(json!({"image": image, "owner": "o@example.com"}))
            .await?;
        ensure!(code == 202, "create at {}: {code} {body}", h.name);
        let rec: EnvRecord = serde_json::from_value(body)?;
        ensure!(
            rec.node != drained.name,
            "create at {} placed on the drained node",
            h.name
        );
        made.push(rec.id);
    }
    // ...and one that only it could take is refused, naming the drain.
    let (code, body) = hosts.host(1).request_env(pinned("2")).await?;
    ensure!(
        code == 503 && body.to_string().contains("draining"),
        "{code} {body}"
    );

    // Its environment stays: ready, same container, and can be extended.
    let rec: EnvRecord = hosts
        .host(1)
        .client
        .get(&format!("/v1/environments/{}", kept.id))
        .await?;
    ensure!(rec.status.as_str() == "ready", "{rec:?}");
    ensure!(
        drained.containers().await?[0].id == container[0].id,
        "container changed"
    );
    let (code, b) = post(
        &hosts.host(1).client,
        &format!("/v1/environments/{}/extend", kept.id),
        json!({"by": "1h"}),
    )
    .await?;
    ensure!(code == 200, "extend: {code} {b}");

    // A restart of its daemon keeps the drain (persisted in the data dir).
    hosts.kill_shoal(2).await?;
    hosts.start_shoal(2).await?;
    let n: Value = drained.client.get("/v1/node").await?;
    ensure!(
        n["drain"]["draining"] == true && n["drain"]["maintenance"]["since"] == since,
        "after restart: {n}"
    );
    ensure!(
        drained.containers().await?[0].id == container[0].id,
        "container changed"
    );

    // Undo, through the CLI: it takes new environments again.
    let d = cli_drain(drained, true)?;
    ensure!(d["draining"] == false && d["maintenance"].is_null(), "{d}");
    for h in &hosts.hosts {
        wait_for(GOSSIP, || async {
            Ok(rejection(h, &image, &drained.name).await?.is_none())
        })
        .await
        .with_context(|| format!("{} still rejects the undrained node", h.name))?;
    }
    let (code, body) = hosts.host(1).request_env(pinned("2")).await?;
    ensure!(code == 202, "{code} {body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    ensure!(rec.node == drained.name, "{rec:?}");
    made.push(rec.id);
    // And the CLI drains too.
    let d = cli_drain(drained, false)?;
    ensure!(d["draining"] == true, "{d}");
    let d = cli_drain(drained, true)?;
    ensure!(d["draining"] == false, "{d}");

    // Clean up what this test made (the harness removes the rest).
    made.push(kept.id);
    for id in made {
        let h = hosts.host(0);
        let _ = h.wait_settled(&id).await;
        let (code, b) = raw(&h.client, "DELETE", &format!("/v1/environments/{id}"), None).await?;
        ensure!(
            code == 200 || code == 202 || code == 204,
            "delete {id}: {code} {b}"
        );
    }
    Ok(())
}
