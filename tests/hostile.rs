//! Hostile input against one real daemon: requests that used to take a
//! node down, and schemathesis driven by the node's own OpenAPI document.

mod common;

use anyhow::Result;
use common::*;
use serde_json::json;
use shoal::demo::DemoImage;
use shoal::model::EnvRecord;

/// An absurd extension is refused with a 4xx naming `by`, and the node
/// keeps answering every call afterwards (it used to panic while holding
/// its state lock, poisoning it for every later call).
#[tokio::test(flavor = "multi_thread")]
async fn absurd_extension_is_refused_and_the_node_keeps_serving() -> Result<()> {
    let Solo {
        dir: _dir,
        engine,
        node,
        mut cleanup,
        ..
    } = solo("h", &[]).await?;
    let image = format!("{}:1", unique("hx"));
    publish_one(&node, &engine, &image, &DemoImage::default(), &mut cleanup).await?;
    let (code, body) = node
        .request_env(json!({"image": image, "owner": "t@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    let path = format!("/v1/environments/{}/extend", rec.id);
    for by in ["99999999999h", "18446744073709551615", "213503982334601d"] {
        let (code, body) = raw(
            &node.client,
            "POST",
            &path,
            Some(json!({ "by": by }).to_string().into_bytes()),
        )
        .await?;
        assert!(
            (400..500).contains(&code) && body["field"] == "by",
            "{by}: {code} {body}"
        );
    }
    // Every route still answers.
    let back: EnvRecord = node
        .client
        .get(&format!("/v1/environments/{}", rec.id))
        .await?;
    assert_eq!(back.expires_at, rec.expires_at, "nothing changed");
    let (code, body) = raw(&node.client, "GET", "/v1/node", None).await?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = raw(
        &node.client,
        "POST",
        &path,
        Some(br#"{"by": "1m"}"#.to_vec()),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    node.wait_settled(&rec.id).await?;

    // An engine error answers a generic 502 with the request id; the
    // engine's message is in the log under that id, not in the body.
    let (code, body) = raw(
        &node.client,
        "POST",
        "/v1/images",
        Some(br#"{"source": "Not A//Reference", "ref": "x:1"}"#.to_vec()),
    )
    .await?;
    assert_eq!(code, 502, "{body}");
    let rid = body["request_id"].as_str().unwrap_or_default().to_string();
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        !rid.is_empty() && !msg.contains("docker") && !msg.contains("status code"),
        "{body}"
    );
    let log = node.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&rid) && l.contains("request failed") && l.contains("docker")),
        "no log line for {rid}:\n{log}"
    );
    // A path that is not valid text: a JSON 4xx too.
    let (code, body) = raw(&node.client, "GET", "/v1/environments/%FF", None).await?;
    assert!(
        (400..500).contains(&code) && body["request_id"].is_string(),
        "{code} {body}"
    );
    let (code, body) = raw(
        &node.client,
        "DELETE",
        &format!("/v1/environments/{}", rec.id),
        None,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    Ok(())
}

/// schemathesis from the node's own OpenAPI document: every answer has a
/// documented status and matches its schema, no 5xx at all (a single idle
/// node has no reason for a 503), and afterwards the node still answers,
/// with no environment or image that the run did not publish (it publishes
/// nothing: `publish` is left out, since an engine resolves short image ids
/// and a generated `source` could name one of the shared engine's images).
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing_and_the_node_keeps_serving() -> Result<()> {
    let Some(st) = schemathesis() else {
        assert!(
            !common::smtp::require_tools(),
            "schemathesis is not installed (scripts/ensure-tools installs it)"
        );
        eprintln!("skipped: schemathesis is not installed");
        return Ok(());
    };
    let Solo {
        dir, node, name, ..
    } = solo("hs", &[]).await?;
    let seed = std::env::var("SHOAL_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    // An operator's token: every route is reached past the token gate (its
    // 401 and 403 are documented too).
    let auth = format!(
        "Authorization: Bearer {}",
        node.token.as_deref().expect("the node has a key file")
    );
    let out = tokio::process::Command::new(st)
        .current_dir(dir.path())
        .args([
            "run",
            &format!("{}/v1/openapi.json", node.url),
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance",
            "--exclude-operation-id",
            "publish",
            "--max-examples",
            "20",
            // The whole run, every phase: fuzzing and stateful testing
            // repeat until it is spent.
            "--max-time",
            "90",
            "--seed",
            &seed,
            "--workers",
            "2",
            "--request-timeout",
            "20",
            "--no-color",
            "--header",
            &auth,
        ])
        .kill_on_drop(true)
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        node.log()
    );
    assert!(text.contains("passed"), "{text}");
    // Still serving, and nothing was made.
    let (code, body) = raw(&node.client, "GET", "/v1/node", None).await?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = raw(&node.client, "GET", "/v1/images", None).await?;
    assert_eq!((code, body.clone()), (200, json!([])), "{body}");
    let (code, body) = raw(&node.client, "GET", "/v1/environments", None).await?;
    assert_eq!((code, body.clone()), (200, json!([])), "{body}");
    let engine = shoal::docker::Engine::connect().await?;
    assert!(engine.env_containers(&name).await?.is_empty());
    assert!(!node.log().contains("panicked"), "{}", node.log());
    Ok(())
}

/// The schemathesis CLI, if installed.
fn schemathesis() -> Option<String> {
    let ok = std::process::Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "schemathesis".to_string())
}
