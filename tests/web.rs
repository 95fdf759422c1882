//! shoal for testers, end to end on the real engine: reservations and the
//! reaper, mail through a real SMTP server (aiosmtpd), the event stream
//! read with `curl -N` from the owner and from another node, and the web
//! page driven in a real Chromium over WebDriver.
//!
//! Tools that a fresh machine may lack (aiosmtpd, chromium, chromedriver)
//! are installed by `scripts/ensure-tools`; with `SHOAL_REQUIRE_TOOLS=1`
//! (as `scripts/test` sets it) a missing one fails the test.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::browser::{chromedriver, chromium, Browser};
use common::smtp::{free_tcp_port, have_aiosmtpd, require_tools, SmtpSink};
use common::*;
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::model::EnvRecord;

fn need_aiosmtpd() -> bool {
    if have_aiosmtpd() {
        return true;
    }
    assert!(
        !require_tools(),
        "python3 cannot import aiosmtpd (scripts/ensure-tools installs it)"
    );
    eprintln!("skipped: aiosmtpd is not installed");
    false
}

/// One node with a published image of the demo server.
struct Setup {
    node: Node,
    image: String,
    engine: Engine,
    _cleanup: Cleanup,
    _tmp: tempfile::TempDir,
}

async fn setup(extra: &[&str]) -> Result<Setup> {
    let Solo {
        dir: tmp,
        engine,
        mut cleanup,
        node,
        ..
    } = solo("w", extra).await?;
    let image = format!("{}:20151103.1", unique("erp"));
    let img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(2 << 20))],
        ..Default::default()
    };
    publish_one(&node, &engine, &image, &img, &mut cleanup).await?;
    Ok(Setup {
        node,
        image,
        engine,
        _cleanup: cleanup,
        _tmp: tmp,
    })
}

async fn wait_gone(node: &Node, id: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, _) = raw(&node.client, "GET", &format!("/v1/environments/{id}"), None).await?;
        if code == 404 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("environment {id} still there: {}", node.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reservations_over_the_api() -> Result<()> {
    let s = setup(&["--default-ttl", "1h", "--max-ttl", "2h"]).await?;
    let node = &s.node;
    // Longer than the maximum: refused, naming the field and the limit.
    let (code, body) = node
        .request_env(json!({"image": s.image, "owner": "t@example.com", "ttl": "3h"}))
        .await?;
    assert_eq!((code, body["field"].as_str()), (400, Some("ttl")), "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_ttl"),
        "{body}"
    );
    let (code, body) = node
        .request_env(json!({"image": s.image, "owner": "t@example.com", "ttl": "soon"}))
        .await?;
    assert_eq!((code, body["field"].as_str()), (400, Some("ttl")), "{body}");

    // No ttl: the default.
    let (code, body) = node
        .request_env(json!({"image": s.image, "owner": "t@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    let exp = rec.expires_at.context("every environment has an expiry")?;
    assert_eq!(exp - rec.created_at, time::Duration::hours(1));
    let rec = node.wait_settled(&rec.id).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    // The first expiry is in the container's labels.
    let cid = rec.container.clone().unwrap();
    let out = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{index .Config.Labels \"shoal.env.expires_at\"}}",
            &cid,
        ])
        .output()?;
    let label = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        time::OffsetDateTime::parse(&label, &time::format_description::well_known::Rfc3339)?,
        exp
    );

    // Extend by 30m: the expiry moves; the journal keeps it over a restart.
    let path = format!("/v1/environments/{}/extend", rec.id);
    let (code, body) = raw(
        &node.client,
        "POST",
        &path,
        Some(br#"{"by": "30m"}"#.to_vec()),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let ext: EnvRecord = serde_json::from_value(body)?;
    assert_eq!(ext.expires_at, Some(exp + time::Duration::minutes(30)));
    // Past the maximum from now: 409 naming the limit; nothing changes.
    let (code, body) = raw(
        &node.client,
        "POST",
        &path,
        Some(br#"{"by": "1h"}"#.to_vec()),
    )
    .await?;
    assert_eq!((code, body["field"].as_str()), (409, Some("by")), "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("max_ttl") && msg.contains("2h"), "{msg}");
    let (code, body) = raw(
        &node.client,
        "POST",
        &path,
        Some(br#"{"for": "1h"}"#.to_vec()),
    )
    .await?;
    assert_eq!((code, body["field"].as_str()), (400, Some("for")), "{body}");
    let (code, _) = raw(
        &node.client,
        "POST",
        "/v1/environments/nosuchenv/extend",
        Some(br#"{"by": "1h"}"#.to_vec()),
    )
    .await?;
    assert_eq!(code, 404);

    let mut node = s.node;
    node.kill();
    node.spawn().await?;
    let back: EnvRecord = node
        .client
        .get(&format!("/v1/environments/{}", rec.id))
        .await?;
    assert_eq!(back.expires_at, ext.expires_at);
    assert_eq!(back.status.as_str(), "ready");
    let _: EnvRecord = node
        .client
        .delete(&format!("/v1/environments/{}", rec.id))
        .await?;
    drop(s.engine);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mails_ready_failed_warning_expired_and_the_reaper_deletes() -> Result<()> {
    if !need_aiosmtpd() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let sink = SmtpSink::start(free_tcp_port()?, &tmp.path().join("mail"))?;
    let url = sink.url();
    let s = setup(&[
        "--smtp",
        &url,
        "--mail-from",
        "shoal@lab.example.com",
        "--expiry-warning",
        "40s",
    ])
    .await?;
    let node = &s.node;
    let owner = format!("{}@example.com", unique("tester"));

    // A reservation of 60 s: ready mail, warning 40 s before, then the
    // reaper deletes it and says so. (No warning is sent for a reservation
    // that had less than the warning left once ready: the 20 s between
    // leave room for a slow start on a loaded machine.)
    let (code, body) = node
        .request_env(json!({"image": s.image, "owner": owner, "ttl": "60s"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let rec = node.wait_settled(&id).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    let ep = &rec.endpoints[0];

    let ready = sink
        .wait_for(&format!("is ready: {id}"), Duration::from_secs(20))
        .await?;
    assert_eq!(ready.to, owner);
    assert!(ready.subject.contains(&s.image), "{}", ready.subject);
    assert!(
        ready.message_id.contains(&format!("{id}.ready")),
        "{}",
        ready.message_id
    );
    for want in [
        format!("http://{}:{}/", ep.host, ep.host_port),
        format!("Node         {}", node.name),
        format!("Build        {}", s.image),
        format!("{}/envs/{id}\n", node.url),
        format!("{}/envs/{id}/extend", node.url),
        format!("{}/envs/{id}/return", node.url),
    ] {
        assert!(
            ready.body.contains(&want),
            "{want} missing from:\n{}",
            ready.body
        );
    }
    // The link in the mail is the endpoint that answers.
    assert!(http_get(&ep.host, ep.host_port, "/").await?.contains(&id));

    // A failing environment: its mail gives the reason.
    let (code, body) = node
        .request_env(json!({"image": s.image, "owner": owner, "env": {"DEMO_EXIT_AFTER": "0", "DEMO_START_DELAY": "5"}}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let bad = body["id"].as_str().unwrap().to_string();
    let failed = sink
        .wait_for(&format!("failed: {bad}"), Duration::from_secs(60))
        .await?;
    assert!(
        failed
            .body
            .contains("Reason: the container exited with code 3"),
        "{}",
        failed.body
    );

    let warning = sink
        .wait_for(&format!("{id} expires in"), Duration::from_secs(60))
        .await?;
    assert!(
        warning
            .body
            .contains(&format!("{}/envs/{id}/extend", node.url)),
        "{}",
        warning.body
    );

    // The reaper: gone from the API and the engine, and a last mail.
    wait_gone(node, &id, Duration::from_secs(70)).await?;
    let containers = s.engine.env_containers(&node.name).await?;
    assert!(
        !containers
            .iter()
            .any(|c| c == rec.container.as_deref().unwrap()),
        "container still there"
    );
    sink.wait_for(&format!("{id} was deleted"), Duration::from_secs(20))
        .await?;
    assert!(node.log().contains("reservation ended: deleted"));

    // Each event once.
    let subjects: Vec<String> = sink.mails().into_iter().map(|m| m.subject).collect();
    for needle in ["is ready", "expires in", "was deleted"] {
        let n = subjects
            .iter()
            .filter(|s| s.contains(needle) && s.contains(&id))
            .count();
        assert_eq!(n, 1, "{needle}: {subjects:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_survives_a_restart_while_the_mail_server_is_down() -> Result<()> {
    if !need_aiosmtpd() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    // Nothing listens on this port yet: every delivery fails.
    let port = free_tcp_port()?;
    let url = format!("smtp://127.0.0.1:{port}");
    let s = setup(&["--smtp", &url]).await?;
    let mut node = s.node;
    let owner = format!("{}@example.com", unique("tester"));
    let (code, body) = node
        .request_env(json!({"image": s.image, "owner": owner}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let rec = node.wait_settled(&id).await?;
    assert_eq!(rec.status.as_str(), "ready");

    // The ready mail waits in the outbox after a failed attempt.
    let file = node.dir.join(format!("outbox/{id}.ready.json"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempts = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["attempts"].as_u64())
            .unwrap_or(0);
        if attempts >= 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("no failed attempt recorded: {}", node.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // kill -9, the mail server comes up, the node restarts: one mail.
    node.kill();
    let sink = SmtpSink::start(port, &tmp.path().join("mail"))?;
    node.spawn().await?;
    let mail = sink
        .wait_for(&format!("is ready: {id}"), Duration::from_secs(30))
        .await
        .with_context(|| node.log())?;
    assert_eq!(mail.to, owner);
    // The sink stores the message before it answers; the node then clears
    // its outbox.
    let deadline = Instant::now() + Duration::from_secs(10);
    while file.exists() {
        assert!(
            Instant::now() < deadline,
            "delivered mail leaves the outbox"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node.dir.join(format!("outbox/sent/{id}.ready")).exists());
    // Another restart sends nothing again.
    node.kill();
    node.spawn().await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = sink
        .mails()
        .iter()
        .filter(|m| m.subject.contains(&id))
        .count();
    assert_eq!(n, 1, "{:?}", sink.mails());
    let _: EnvRecord = node
        .client
        .delete(&format!("/v1/environments/{id}"))
        .await?;
    Ok(())
}

/// `curl -N URL`: the lines of the stream, read as they come.
fn curl_stream(
    url: &str,
    token: Option<&str>,
) -> Result<(std::process::Child, std::sync::mpsc::Receiver<String>)> {
    let auth = format!("Authorization: Bearer {}", token.unwrap_or_default());
    let mut child = Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "120",
            "-H",
            "Accept: text/event-stream",
            "-H",
            &auth,
            "-D",
            "-",
            url,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("curl")?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Ok((child, rx))
}

/// Reads stream lines until `data:` of an event with status `want`;
/// returns every line read.
fn read_until(
    rx: &std::sync::mpsc::Receiver<String>,
    want: &str,
    seen: &mut Vec<String>,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .with_context(|| format!("no {want} event; got {seen:?}"))?;
        seen.push(line.clone());
        if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data)?;
            if v["status"] == want {
                return Ok(v);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn event_stream_from_the_owner_and_from_another_node() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let (a_name, b_name) = (unique("a"), unique("b"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes.extend([a_name.clone(), b_name.clone()]);
    let cluster_id = unique("c");
    let a = Node::start(
        &a_name,
        &tmp.path().join("a"),
        &store,
        &["--cluster-id", &cluster_id],
    )
    .await?;
    let b = Node::start(
        &b_name,
        &tmp.path().join("b"),
        &store,
        &[
            "--cluster-id",
            &cluster_id,
            "--seed",
            &a.gossip,
            "--label",
            "pool=b",
        ],
    )
    .await?;
    let image = format!("{}:1", unique("ev"));
    publish_one(&a, &engine, &image, &DemoImage::default(), &mut cleanup).await?;
    // Both see each other.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = a.client.get("/v1/cluster").await?;
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.len() == 2
            && nodes
                .iter()
                .all(|n| n["alive"] == true && n["facts"].is_object())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the nodes never met: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Requested at A, placed on B by its label.
    let (code, body) = a
        .request_env(
            json!({"image": image, "owner": "t@example.com", "constraints": {"pool": "b"}}),
        )
        .await?;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["node"], b_name.as_str());
    let id = body["id"].as_str().unwrap().to_string();

    // The owner's stream, and A's relay of it, both read with curl -N.
    let (mut c_b, rx_b) = curl_stream(
        &format!("{}/v1/environments/{id}/events", b.url),
        b.token.as_deref(),
    )?;
    // At once (A may not see it in gossip yet: it asks the other nodes),
    // and again once gossip shows where it is.
    let (mut c_a0, rx_a0) = curl_stream(
        &format!("{}/v1/environments/{id}/events", a.url),
        a.token.as_deref(),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = a.client.get("/v1/cluster").await?;
        let known = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == b_name.as_str() && n["facts"]["envs"][&id].is_object());
        if known {
            break;
        }
        if Instant::now() > deadline {
            bail!("A's gossip never showed {id}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut c_a, rx_a) = curl_stream(
        &format!("{}/v1/environments/{id}/events", a.url),
        a.token.as_deref(),
    )?;
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let ready_b = read_until(&rx_b, "ready", &mut seen_b)?;
    let ready_a = read_until(&rx_a, "ready", &mut seen_a)?;
    let mut seen_a0 = Vec::new();
    assert_eq!(read_until(&rx_a0, "ready", &mut seen_a0)?, ready_b);
    for seen in [&seen_a, &seen_b] {
        assert!(
            seen.iter().any(|l| l
                .to_ascii_lowercase()
                .starts_with("content-type: text/event-stream")),
            "{seen:?}"
        );
        assert!(seen.iter().any(|l| l == "event: ready"), "{seen:?}");
    }
    assert_eq!(ready_a, ready_b);
    assert_eq!(ready_a["node"], b_name.as_str());
    assert!(ready_a["endpoints"][0]["host_port"].as_u64().is_some());

    // Return it through A: both streams end with a `deleted` record.
    let (code, _) = raw(&a.client, "DELETE", &format!("/v1/environments/{id}"), None).await?;
    assert_eq!(code, 200);
    read_until(&rx_a, "deleted", &mut seen_a)?;
    read_until(&rx_b, "deleted", &mut seen_b)?;
    read_until(&rx_a0, "deleted", &mut seen_a0)?;
    for c in [&mut c_a, &mut c_b, &mut c_a0] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait()? {
                assert!(st.success(), "curl ended with {st}");
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("the stream did not end after the delete");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (code, _) = raw(
        &a.client,
        "GET",
        &format!("/v1/environments/{id}/events"),
        None,
    )
    .await?;
    assert_eq!(code, 404);
    Ok(())
}

fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output/web")
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_requests_watches_extends_and_returns() -> Result<()> {
    let (Some(chromium), Some(driver)) = (chromium(), chromedriver()) else {
        assert!(
            !require_tools(),
            "chromium or chromedriver is missing (scripts/ensure-tools installs them)"
        );
        eprintln!("skipped: chromium or chromedriver is not installed");
        return Ok(());
    };
    let s = setup(&["--max-ttl", "48h"]).await?;
    let node = &s.node;
    let shots = shots_dir();
    let browser = Browser::start(&chromium, &driver).await?;
    let owner = format!("{}@example.com", unique("tester"));

    // The catalog lists the build; request it with the form.
    browser.goto(&format!("{}/", node.url)).await?;
    let (product, build) = s.image.split_once(':').unwrap();
    browser
        .wait_text("main", build, Duration::from_secs(10))
        .await?;
    let src = browser.source().await?;
    assert!(src.contains(&format!("id=\"p-{product}\"")), "{src}");
    let email = browser.find(&format!("#p-{product}-owner")).await?;
    browser.type_into(&email, &owner).await?;
    let ttl = browser
        .find(&format!("#p-{product}-ttl option[value='8h']"))
        .await?;
    browser.click(&ttl).await?;
    browser.screenshot(&shots.join("1-catalog.png")).await?;
    let submit = browser
        .find(&format!(
            "#p-{product} ~ form button, section[aria-labelledby='p-{product}'] button"
        ))
        .await?;
    browser.click(&submit).await?;

    // The environment's page: live until ready, without a reload.
    browser
        .wait_text("h1", "Environment", Duration::from_secs(10))
        .await?;
    let url = browser.url().await?;
    let id = url
        .split("/envs/")
        .nth(1)
        .and_then(|r| r.split(['?', '#']).next())
        .context("env page url")?
        .to_string();
    assert!(
        url.contains("why="),
        "placement explanation passed on: {url}"
    );
    browser.screenshot(&shots.join("2-progress.png")).await?;
    browser
        .wait_text("#live .badge", "ready", Duration::from_secs(90))
        .await?;
    assert_eq!(browser.url().await?, url, "updated in place");
    let live = browser.text(&browser.find("#live").await?).await?;
    assert!(
        live.contains(&node.name) && live.contains(&s.image),
        "{live}"
    );
    assert!(
        live.contains("8h") || live.contains("in 7h"),
        "expiry shown: {live}"
    );
    browser.screenshot(&shots.join("3-ready.png")).await?;
    let rec: EnvRecord = node.client.get(&format!("/v1/environments/{id}")).await?;
    assert_eq!(rec.owner, owner);
    assert_eq!(
        rec.expires_at.unwrap() - rec.created_at,
        time::Duration::hours(8)
    );

    // Follow the endpoint link: the environment answers.
    let link = browser.find("a.endpoint").await?;
    let href = browser.attr(&link, "href").await?;
    let ep = &rec.endpoints[0];
    assert_eq!(href, format!("http://{}:{}/", ep.host, ep.host_port));
    browser.click(&link).await?;
    browser
        .wait_text("body", &id, Duration::from_secs(10))
        .await?;
    browser.screenshot(&shots.join("4-endpoint.png")).await?;
    browser.back().await?;

    // Extend by 4h.
    browser
        .wait_text("h1", "Environment", Duration::from_secs(10))
        .await?;
    let opt = browser.find("#by option[value='4h']").await?;
    browser.click(&opt).await?;
    browser.click(&browser.find("#extend").await?).await?;
    browser
        .wait_text(".notice", "Extended by 4h", Duration::from_secs(10))
        .await?;
    browser.screenshot(&shots.join("5-extended.png")).await?;
    let after: EnvRecord = node.client.get(&format!("/v1/environments/{id}")).await?;
    assert_eq!(
        after.expires_at,
        rec.expires_at.map(|e| e + time::Duration::hours(4))
    );

    // Return it: a confirmation page, then "my environments".
    browser.click(&browser.find("#return").await?).await?;
    browser
        .wait_text("h1", "Return environment", Duration::from_secs(10))
        .await?;
    browser
        .click(&browser.find("#confirm-return").await?)
        .await?;
    browser
        .wait_text(".notice", "was returned", Duration::from_secs(30))
        .await?;
    assert!(browser.url().await?.contains("/my?owner="));
    let main = browser.text(&browser.find("main").await?).await?;
    assert!(main.contains("has no environment"), "{main}");
    browser.screenshot(&shots.join("6-returned.png")).await?;
    let (code, _) = raw(&node.client, "GET", &format!("/v1/environments/{id}"), None).await?;
    assert_eq!(code, 404);
    assert!(s.engine.env_containers(&node.name).await?.is_empty());

    // The cluster page and a phone-sized catalog.
    browser.goto(&format!("{}/cluster", node.url)).await?;
    browser
        .wait_text("table.nodes", &node.name, Duration::from_secs(10))
        .await?;
    browser.screenshot(&shots.join("7-cluster.png")).await?;
    browser.set_size(390, 844).await?;
    browser.goto(&format!("{}/", node.url)).await?;
    browser
        .wait_text("main", build, Duration::from_secs(10))
        .await?;
    browser.screenshot(&shots.join("8-phone.png")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_work_without_javascript() -> Result<()> {
    let s = setup(&[]).await?;
    let node = &s.node;
    // The form post of a browser without JavaScript: urlencoded, answered
    // with a redirect to the environment's page.
    let (code, _) = raw(&node.client, "GET", "/", None).await?;
    assert_eq!(code, 200);
    let form = format!(
        "image={}&owner={}&memory=&ttl=4h",
        s.image.replace(':', "%3A"),
        "nojs%40example.com"
    );
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-d",
            &form,
        ])
        .arg(format!("{}/envs", node.url))
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    let (code, location) = answer.split_once(' ').context("curl output")?;
    assert_eq!(code, "303", "{answer}");
    let id = location
        .split("/envs/")
        .nth(1)
        .and_then(|r| r.split('?').next())
        .context("redirect to the env page")?
        .to_string();
    // While in progress the page refreshes itself (noscript) and shows
    // the state it is in.
    let page = Command::new("curl")
        .arg("-s")
        .arg(format!("{}/envs/{id}", node.url))
        .output()?;
    let page = String::from_utf8_lossy(&page.stdout).to_string();
    assert!(page.contains("data-status="), "{page}");
    let rec = node.wait_settled(&id).await?;
    assert_eq!(rec.status.as_str(), "ready");
    let page = Command::new("curl")
        .arg("-s")
        .arg(format!("{}/envs/{id}", node.url))
        .output()?;
    let page = String::from_utf8_lossy(&page.stdout).to_string();
    assert!(
        !page.contains("http-equiv=\"refresh\""),
        "no refresh once ready"
    );
    let ep = &rec.endpoints[0];
    assert!(
        page.contains(&format!("href=\"http://{}:{}/\"", ep.host, ep.host_port)),
        "{page}"
    );
    // "My environments" lists it for its owner, and only for its owner.
    let my = |owner: &str| {
        let out = Command::new("curl")
            .arg("-s")
            .arg(format!("{}/my?owner={owner}", node.url))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        my("NoJS%40example.com").contains(&format!("href=\"/envs/{id}\"")),
        "listed, whatever the case of the address"
    );
    assert!(!my("other%40example.com").contains(&id));
    // A bad request re-shows the form with the reason, nothing created.
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-d",
            &format!("image={}&owner=nobody&ttl=4h", s.image),
        ])
        .arg(format!("{}/envs", node.url))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with("\n400"), "{text}");
    assert!(text.contains("not a mail address"), "{text}");
    let list: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
    assert_eq!(list.len(), 1);
    // Return without JavaScript: the confirmation form posts.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("{}/envs/{id}/return", node.url))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "303");
    wait_gone(node, &id, Duration::from_secs(10)).await?;
    Ok(())
}
