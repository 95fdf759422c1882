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
