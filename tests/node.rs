//! One node on the real Docker engine: publish, load only missing layers,
//! start, ready, endpoints that answer, delete, restart survival,
//! admission, corrupted layers and bad input.

mod common;

use std::collections::HashSet;

use anyhow::Result;
use common::*;
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::model::{EnvRecord, ImageInfo};
use shoal::store::Store;

/// A base image (FROM scratch: a unique first layer, the demo server) and a
/// derived one (FROM the base, one more layer), both published; the sources
/// are removed from the engine so environments must load from the store.
struct Published {
    base: String,
    derived: String,
}

async fn publish_pair(
    node: &Node,
    engine: &Engine,
    prefix: &str,
    cleanup: &mut Cleanup,
) -> Result<Published> {
    let src_base = format!("{prefix}-src/base:1");
    let src_derived = format!("{prefix}-src/derived:1");
    cleanup.images.push(src_base.clone());
    cleanup.images.push(src_derived.clone());
    let base_img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(64 << 10))],
        ..Default::default()
    };
    build_image(engine, &src_base, &base_img).await?;
    let derived_img = DemoImage {
        from: Some(src_base.clone()),
        extra_files: vec![("/data/payload".into(), random_bytes(256 << 10))],
        ..Default::default()
    };
    build_image(engine, &src_derived, &derived_img).await?;

    let base = format!("{prefix}-base:1");
    let derived = format!("{prefix}-app:1");
    cleanup.images.push(format!("shoal/{prefix}-base:1"));
    cleanup.images.push(format!("shoal/{prefix}-app:1"));
    for (src, r) in [(&src_base, &base), (&src_derived, &derived)] {
        let (code, body) = raw(
            &node.client,
            "POST",
            "/v1/images",
            Some(json!({"source": src, "ref": r}).to_string().into_bytes()),
        )
        .await?;
        assert_eq!(code, 201, "publish {r}: {body}");
    }
    engine.remove_image(&src_derived).await?;
    engine.remove_image(&src_base).await?;
    Ok(Published { base, derived })
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_load_start_delete() -> Result<()> {
    let Solo {
        dir: tmp,
        engine,
        name,
        mut cleanup,
        node,
    } = solo("n", &[]).await?;
    let p = publish_pair(&node, &engine, &unique("t"), &mut cleanup).await?;

    // The catalog lists both; the derived image shares the base's layers.
    let images: Vec<ImageInfo> = node.client.get("/v1/images").await?;
    assert_eq!(images.len(), 2);
    let store = Store::open(&tmp.path().join("store"))?;
    let base_m = store.get(&p.base.parse()?)?;
    let app_m = store.get(&p.derived.parse()?)?;
    assert!(app_m.layers.len() > base_m.layers.len());
    assert_eq!(app_m.layers[..base_m.layers.len()], base_m.layers[..]);
    // The store holds each layer once.
    let files = std::fs::read_dir(tmp.path().join("store/layers/sha256"))?.count();
    let distinct: HashSet<_> = app_m.layers.iter().map(|l| l.diff_id).collect();
    assert_eq!(files, distinct.len());

    // An environment of the base loads every layer.
    let (code, body) = node
        .request_env(json!({"image": p.base, "owner": "tester@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let base_env: EnvRecord = serde_json::from_value(body)?;
    let base_env = node.wait_settled(&base_env.id).await?;
    assert_eq!(
        base_env.status.as_str(),
        "ready",
        "{base_env:?}\n{}",
        node.log()
    );
    assert_eq!(base_env.load.layers_cached, 0);
    assert_eq!(base_env.load.bytes_needed, base_m.size());
    assert_eq!(base_env.endpoints.len(), 1);
    let ep = &base_env.endpoints[0];
    let page = http_get(&ep.host, ep.host_port, "/").await?;
    assert!(page.contains(&base_env.id), "{page}");

    // The derived environment loads only its own layers.
    let (code, body) = node
        .request_env(json!({"image": p.derived, "owner": "tester@example.com", "memory": "128MiB"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let app_env: EnvRecord = serde_json::from_value(body)?;
    let app_env = node.wait_settled(&app_env.id).await?;
    assert_eq!(app_env.status.as_str(), "ready", "{app_env:?}");
    assert_eq!(app_env.memory, 128 << 20);
    assert_eq!(app_env.load.layers_cached, base_m.layers.len());
    let own: u64 = app_m.layers[base_m.layers.len()..]
        .iter()
        .map(|l| l.size)
        .sum();
    assert_eq!(app_env.load.bytes_needed, own);
    let ep = &app_env.endpoints[0];
    assert!(http_get(&ep.host, ep.host_port, "/")
        .await?
        .contains("200 OK"));

    // The exact layers on demand (`GET /v1/node/layers`, re-read from the
    // engine every 10 s); gossip carries their filter and count.
    let want: Vec<String> = app_m.layers.iter().map(|l| l.chain_id.short(16)).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let held = loop {
        let v: Value = node.client.get("/v1/node/layers").await?;
        let held: HashSet<String> = v["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(String::from))
            .collect();
        assert_eq!(v["count"].as_u64(), Some(held.len() as u64), "{v}");
        if want.iter().all(|w| held.contains(w)) {
            break held;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "layers never listed: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let c: Value = node.client.get("/v1/cluster").await?;
        let gossiped = c["nodes"][0]["facts"]["layer_filter"]["layers"].as_u64();
        if gossiped == Some(held.len() as u64) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "filter not gossiped: {c}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // Both are listed; the engine enforces the memory limit.
    let list: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
    assert_eq!(list.len(), 2);
    let containers = engine.env_containers(&name).await?;
    assert_eq!(containers.len(), 2);

    // Delete: gone from the list and from the engine.
    for id in [&base_env.id, &app_env.id] {
        let rec: EnvRecord = node
            .client
            .delete(&format!("/v1/environments/{id}"))
            .await?;
        assert_eq!(rec.status.as_str(), "deleted");
        let (code, _) = raw(&node.client, "GET", &format!("/v1/environments/{id}"), None).await?;
        assert_eq!(code, 404);
    }
    assert!(engine.env_containers(&name).await?.is_empty());

    // Every background worker is up, by name.
    let workers: Vec<Value> = node.client.get("/v1/workers").await?;
    for want in [
        "reconcile",
        "gossip-publisher",
        "reaper",
        "mail-outbox",
        "mail-watcher",
        "image-gc",
    ] {
        let w = workers.iter().find(|w| w["name"] == want);
        assert_eq!(
            w.map(|w| w["state"].clone()),
            Some(json!("running")),
            "{want}: {workers:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_environments_without_restarting_them() -> Result<()> {
    let Solo {
        dir: _tmp,
        engine,
        name: _,
        mut cleanup,
        mut node,
    } = solo("n", &[]).await?;
    let p = publish_pair(&node, &engine, &unique("t"), &mut cleanup).await?;
    let (code, body) = node
        .request_env(json!({"image": p.base, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let before = node.wait_settled(&id).await?;
    assert_eq!(before.status.as_str(), "ready");
    let cid = before.container.clone().unwrap();
    let started_before = container_started_at(&cid)?;

    node.kill();
    node.spawn().await?;

    let after: EnvRecord = node.client.get(&format!("/v1/environments/{id}")).await?;
    assert_eq!(after.id, before.id);
    assert_eq!(after.status.as_str(), "ready");
    assert_eq!(after.endpoints, before.endpoints);
    assert_eq!(after.ready_at, before.ready_at);
    assert_eq!(
        container_started_at(&cid)?,
        started_before,
        "the container was restarted"
    );
    // Its room is still held after the restart.
    let node_info: Value = node.client.get("/v1/node").await?;
    assert_eq!(node_info["env_count"], 1);
    assert_eq!(node_info["memory_committed"], before.memory);

    // SIGTERM stops the daemon; the environment keeps running.
    let status = node.terminate()?;
    assert!(status.success(), "exit status {status}");
    assert_eq!(container_started_at(&cid)?, started_before);
    assert!(container_running(&cid)?);
    Ok(())
}

fn container_started_at(id: &str) -> Result<String> {
    docker_inspect(id, "{{.State.StartedAt}}")
}

fn container_running(id: &str) -> Result<bool> {
    Ok(docker_inspect(id, "{{.State.Running}}")? == "true")
}

fn docker_inspect(id: &str, format: &str) -> Result<String> {
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", format, id])
        .output()?;
    anyhow::ensure!(out.status.success(), "docker inspect {id} failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn admission_refuses_and_concurrent_requests_never_overcommit() -> Result<()> {
    // Room for two 64 MiB environments by memory, three by count.
    let Solo {
        dir: _tmp,
        engine,
        name,
        mut cleanup,
        node,
    } = solo(
        "n",
        &[
            "--memory",
            "150MiB",
            "--max-envs",
            "3",
            "--default-memory",
            "8MiB",
        ],
    )
    .await?;
    let prefix = unique("t");
    let p = publish_pair(&node, &engine, &prefix, &mut cleanup).await?;
    // An image that states no memory gets the node's 8 MiB default.
    let small = format!("{prefix}-small:1");
    let img = DemoImage {
        memory: None,
        extra_files: vec![("/marker".into(), random_bytes(1024))],
        ..Default::default()
    };
    publish_one(&node, &engine, &small, &img, &mut cleanup).await?;

    // 8 concurrent requests for the last slots: exactly two get in.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = node.client.clone();
        let image = p.base.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"image": image, "owner": format!("u{i}@example.com")});
            raw(
                &client,
                "POST",
                "/v1/environments",
                Some(body.to_string().into_bytes()),
            )
            .await
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        let (code, body) = t.await??;
        match code {
            202 => accepted.push(body["id"].as_str().unwrap().to_string()),
            503 => assert_eq!(body["resource"], "memory", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(accepted.len(), 2);
    for id in &accepted {
        assert_eq!(node.wait_settled(id).await?.status.as_str(), "ready");
    }
    assert_eq!(engine.env_containers(&name).await?.len(), 2);

    // 128 of 150 MiB and 2 of 3 slots taken: a small one fits, and then
    // another fits by memory but not by count.
    let (code, body) = node
        .request_env(json!({"image": small, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["memory"], 8 << 20);
    let (code, body) = node
        .request_env(json!({"image": small, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["resource"], "max_envs");

    // AIO beyond the host's headroom is refused.
    let (aio_max, _) = shoal::host::aio()?;
    node.client
        .delete::<Value>(&format!("/v1/environments/{}", accepted[0]))
        .await?;
    let (code, body) = node
        .request_env(json!({"image": small, "owner": "a@example.com", "aio": aio_max + 1}))
        .await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["resource"], "aio");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_layer_fails_clearly_and_tags_nothing() -> Result<()> {
    let Solo {
        dir: tmp,
        engine,
        name,
        mut cleanup,
        node,
    } = solo("n", &[]).await?;
    let prefix = unique("t");
    let p = publish_pair(&node, &engine, &prefix, &mut cleanup).await?;
    let store = Store::open(&tmp.path().join("store"))?;
    let m = store.get(&p.derived.parse()?)?;
    // Replace the top layer's file with a valid lz4 file of other bytes.
    let top = m.layers.last().unwrap();
    corrupt_layer(&store.layer_path(&top.diff_id), top.size)?;

    let (code, body) = node
        .request_env(json!({"image": p.derived, "owner": "a@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec = node.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(rec.status.as_str(), "failed");
    let err = rec.error.unwrap();
    assert!(err.contains(&top.diff_id.to_string()), "{err}");
    assert!(engine
        .image(&format!("shoal/{prefix}-app:1"))
        .await?
        .is_none());
    assert!(engine.env_containers(&name).await?.is_empty());
    // Its room is free again.
    let info: Value = node.client.get("/v1/node").await?;
    assert_eq!(info["memory_committed"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unhealthy_and_portcheck_images() -> Result<()> {
    let Solo {
        dir: _tmp,
        engine,
        name,
        mut cleanup,
        node,
    } = solo("n", &["--ready-timeout", "30s"]).await?;
    let prefix = unique("t");
    // No HEALTHCHECK: ready once the port answers.
    let src = format!("{prefix}-src/plain:1");
    cleanup.images.push(src.clone());
    cleanup.images.push(format!("shoal/{prefix}-plain:1"));
    let img = DemoImage {
        healthcheck: false,
        extra_files: vec![("/marker".into(), random_bytes(1024))],
        ..Default::default()
    };
    build_image(&engine, &src, &img).await?;
    let r = format!("{prefix}-plain:1");
    let (code, body) = raw(
        &node.client,
        "POST",
        "/v1/images",
        Some(json!({"source": src, "ref": r}).to_string().into_bytes()),
    )
    .await?;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["healthcheck"], false);
    let (_, body) = node
        .request_env(
            json!({"image": r, "owner": "a@example.com", "env": {"DEMO_START_DELAY": "2"}}),
        )
        .await?;
    let rec = node.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    let ep = &rec.endpoints[0];
    assert!(http_get(&ep.host, ep.host_port, "/")
        .await?
        .contains("200 OK"));

    // A container that exits is failed with its exit code, and removed.
    let (_, body) = node
        .request_env(json!({"image": r, "owner": "a@example.com", "env": {"DEMO_EXIT_AFTER": "0", "DEMO_START_DELAY": "5"}}))
        .await?;
    let rec = node.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(rec.status.as_str(), "failed");
    assert!(
        rec.error
            .as_deref()
            .unwrap_or("")
            .contains("exited with code 3"),
        "{rec:?}"
    );

    // A health check that reports unhealthy fails the environment.
    let p = publish_pair(&node, &engine, &prefix, &mut cleanup).await?;
    let (_, body) = node
        .request_env(
            json!({"image": p.base, "owner": "a@example.com", "env": {"DEMO_UNHEALTHY": "1"}}),
        )
        .await?;
    let rec = node.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(rec.status.as_str(), "failed");
    assert!(
        rec.error.as_deref().unwrap_or("").contains("unhealthy"),
        "{rec:?}"
    );
    // Failed starts leave no container behind; only the ready one remains.
    assert_eq!(engine.env_containers(&name).await?.len(), 1);
    Ok(())
}

/// (method, path, body, status, field the error names)
type BadCase<'a> = (&'a str, &'a str, Option<Vec<u8>>, u16, Option<&'a str>);

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_the_field_named() -> Result<()> {
    let Solo {
        dir: _tmp,
        engine,
        name,
        mut cleanup,
        node,
    } = solo("n", &[]).await?;
    let p = publish_pair(&node, &engine, &unique("t"), &mut cleanup).await?;
    let body = |v: Value| Some(v.to_string().into_bytes());
    let base = p.base.as_str();
    let cases: Vec<BadCase> = vec![
        (
            "POST",
            "/v1/environments",
            Some(b"{not json".to_vec()),
            400,
            None,
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"owner": "a@b"})),
            400,
            Some("image"),
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"image": base, "owner": "a@b", "memory": "lots"})),
            400,
            Some("memory"),
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"image": base, "owner": "a@b", "memory": "1MiB"})),
            400,
            Some("memory"),
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"image": base, "owner": "a@b", "aio": "x"})),
            400,
            Some("aio"),
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"image": base, "owner": "a@b", "colour": 1})),
            400,
            Some("colour"),
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"image": "nope:1", "owner": "a@b"})),
            404,
            Some("image"),
        ),
        (
            "POST",
            "/v1/environments",
            body(json!({"image": "Bad Ref", "owner": "a@b"})),
            400,
            Some("image"),
        ),
        (
            "POST",
            "/v1/environments",
            Some(vec![b' '; (1 << 20) + 10]),
            413,
            None,
        ),
        ("GET", "/v1/environments/nope", None, 404, Some("id")),
        ("DELETE", "/v1/environments/nope", None, 404, Some("id")),
        (
            "POST",
            "/v1/images",
            body(json!({"source": "no-such-image:x", "ref": "a:1"})),
            404,
            Some("source"),
        ),
        (
            "POST",
            "/v1/images",
            body(json!({"source": "x", "ref": "A:1"})),
            400,
            Some("ref"),
        ),
        ("GET", "/v1/nothing", None, 404, None),
    ];
    for (method, path, payload, want_code, want_field) in cases {
        let (code, answer) = raw(&node.client, method, path, payload).await?;
        assert_eq!(code, want_code, "{method} {path}: {answer}");
        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
        if let Some(f) = want_field {
            assert_eq!(answer["field"], f, "{method} {path}: {answer}");
        }
    }
    // Nothing changed.
    let list: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
    assert!(list.is_empty());
    let images: Vec<ImageInfo> = node.client.get("/v1/images").await?;
    assert_eq!(images.len(), 2);
    assert!(engine.env_containers(&name).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_is_not_ready_in_time_fails_and_is_removed() -> Result<()> {
    let Solo {
        dir: _tmp,
        engine,
        name,
        mut cleanup,
        node,
    } = solo("n", &["--ready-timeout", "3s"]).await?;
    let r = format!("{}-slow:1", unique("t"));
    let img = DemoImage {
        healthcheck: false,
        extra_files: vec![("/marker".into(), random_bytes(1024))],
        ..Default::default()
    };
    publish_one(&node, &engine, &r, &img, &mut cleanup).await?;
    // The server binds its port only after 600 s: never ready in time.
    let (code, body) = node
        .request_env(
            json!({"image": r, "owner": "a@example.com", "env": {"DEMO_START_DELAY": "600"}}),
        )
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec = node.wait_settled(body["id"].as_str().unwrap()).await?;
    assert_eq!(rec.status.as_str(), "failed");
    assert!(
        rec.error
            .as_deref()
            .unwrap_or("")
            .contains("not ready within 3s"),
        "{rec:?}"
    );
    assert!(engine.env_containers(&name).await?.is_empty());
    let info: Value = node.client.get("/v1/node").await?;
    assert_eq!(info["env_count"], 0);
    Ok(())
}

/// What the engine does when a create was already on its way as the
/// environment was deleted: a container with the environment's labels
/// appears afterwards (`docker create`, as the engine would).
fn late_container(node: &str, id: &str, image: &str, tag: &str) -> Result<String> {
    use shoal::docker::labels;
    let label = |k: &str, v: &str| format!("--label={k}={v}");
    let out = std::process::Command::new("docker")
        .args([
            "create".to_string(),
            format!("--name=shoal-{id}"),
            label(labels::NODE, node),
            label(labels::ENV_ID, id),
            label(labels::OWNER, "a@example.com"),
            label(labels::IMAGE, image),
            label(labels::MEMORY, "67108864"),
            label(labels::AIO, "0"),
            label(labels::CREATED_AT, "2026-01-01T00:00:00Z"),
            tag.to_string(),
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "docker create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The containers of node `node` labelled with one of `ids`.
async fn containers_of(engine: &Engine, node: &str, ids: &[String]) -> Result<Vec<String>> {
    Ok(engine
        .env_containers_by_env(node)
        .await?
        .into_iter()
        .filter(|(_, env)| env.as_ref().is_some_and(|e| ids.contains(e)))
        .map(|(c, _)| c)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_racing_the_create_leaves_no_container_even_after_a_restart() -> Result<()> {
    let Solo {
        dir: _tmp,
        engine,
        name,
        mut cleanup,
        mut node,
    } = solo("n", &[]).await?;
    let r = format!("{}-race:1", unique("t"));
    // Big enough that the first load takes a moment.
    let img = DemoImage {
        extra_files: vec![("/blob".into(), random_bytes(24 << 20))],
        ..Default::default()
    };
    publish_one(&node, &engine, &r, &img, &mut cleanup).await?;
    let tag = format!("shoal/{r}");
    let request = || node.request_env(json!({"image": r, "owner": "a@example.com"}));

    // Deletes at every stage: pending, loading, starting, ready.
    let mut deleted = Vec::new();
    for delay_ms in [0u64, 30, 100, 250, 600, 1500, 3000] {
        let (code, body) = request().await?;
        assert_eq!(code, 202, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        let (code, body) = raw(
            &node.client,
            "DELETE",
            &format!("/v1/environments/{id}"),
            None,
        )
        .await?;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "deleted");
        deleted.push(id);
    }
    // Nothing of them runs or waits in the engine (the reconcile worker
    // sweeps whatever the engine finished creating late).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !containers_of(&engine, &name, &deleted).await?.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "containers of deleted environments remain: {:?}",
            containers_of(&engine, &name, &deleted).await?
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let info: Value = node.client.get("/v1/node").await?;
    assert_eq!(info["env_count"], 0, "{info}");

    // A create the engine finishes after the delete, while the node runs:
    // swept.
    late_container(&name, &deleted[0], &r, &tag)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !containers_of(&engine, &name, &deleted[..1])
        .await?
        .is_empty()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the late container of a deleted environment was never removed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }

    // The same just before a kill -9: the restarted node does not adopt it.
    late_container(&name, &deleted[1], &r, &tag)?;
    node.kill();
    node.spawn().await?;
    let (code, body) = raw(
        &node.client,
        "GET",
        &format!("/v1/environments/{}", deleted[1]),
        None,
    )
    .await?;
    assert_eq!(code, 404, "the deleted environment came back: {body}");
    let list: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
    assert!(list.iter().all(|e| !deleted.contains(&e.id)), "{list:?}");
    assert!(
        containers_of(&engine, &name, &deleted).await?.is_empty(),
        "recovery adopted or kept a container of a deleted environment"
    );
    Ok(())
}
