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

/// A user token for `node`'s cluster, signed with its key file.
fn token_for(node: &Node, user: &str, role: shoal::auth::Role) -> Result<String> {
    let ring = shoal::keyring::Keyring::load(Path::new(&cluster_key_for(&node.store)?))?;
    let now = shoal::auth::now_secs();
    let (t, _) = shoal::auth::issue(&ring, user, role, Duration::from_secs(86400), now)?;
    Ok(t)
}

fn web_keys(node: &Node) -> Result<Vec<shoal::keyring::Subkey>> {
    Ok(shoal::keyring::Keyring::load(Path::new(&cluster_key_for(&node.store)?))?.web_keys())
}

/// One answer of the page, read with curl.
#[derive(Debug)]
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn location(&self) -> &str {
        self.header("location").first().copied().unwrap_or("")
    }

    /// The CSRF token of the first form on the page.
    fn csrf(&self) -> String {
        hidden(&self.body, "csrf").unwrap_or_else(|| panic!("no csrf field in {}", self.body))
    }
}

/// The value of the first hidden field `name` of a page.
fn hidden(html: &str, name: &str) -> Option<String> {
    let needle = format!("name=\"{name}\" value=\"");
    let rest = &html[html.find(&needle)? + needle.len()..];
    Some(rest[..rest.find('"')?].replace("&amp;", "&"))
}

/// curl against a node's page: a cookie (the sign-in token) and headers.
struct Web {
    base: String,
    cookie: Option<String>,
    headers: Vec<String>,
}

impl Web {
    fn new(node: &Node) -> Web {
        Web {
            base: node.url.clone(),
            cookie: None,
            headers: Vec::new(),
        }
    }

    fn signed(node: &Node, token: &str) -> Web {
        Web {
            cookie: Some(format!("shoal_session={token}")),
            ..Web::new(node)
        }
    }

    fn call(&self, method: &str, path: &str, form: Option<&[(&str, &str)]>) -> Result<Answer> {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-i", "--max-time", "30", "-X", method]);
        if let Some(c) = &self.cookie {
            cmd.args(["-H", &format!("Cookie: {c}")]);
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        if let Some(f) = form {
            let body: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(f.iter())
                .finish();
            cmd.args([
                "-H",
                "Content-Type: application/x-www-form-urlencoded",
                "--data-binary",
                &body,
            ]);
        }
        let out = cmd.arg(format!("{}{path}", self.base)).output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no answer from {path}: {text}"))?;
        let mut lines = head.lines();
        let code = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("status line of {head}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(Answer {
            code,
            headers,
            body: body.to_string(),
        })
    }

    fn get(&self, path: &str) -> Result<Answer> {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<Answer> {
        self.call("POST", path, Some(form))
    }
}

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
    // The extend and return links carry their capability: they open the
    // confirmation page without a sign-in (and change nothing).
    for action in ["extend", "return"] {
        let prefix = format!("{}/envs/{id}/{action}?cap=", node.url);
        let link = ready
            .body
            .lines()
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with(&prefix)))
            .with_context(|| format!("no {action} link with a capability in {}", ready.body))?;
        let a = Web::new(node).get(&link[node.url.len()..])?;
        assert_eq!(a.code, 200, "{action}: {a:?}");
        assert!(a.body.contains("name=\"cap\""), "{}", a.body);
    }
    let plain = Web::new(node).get(&format!("/envs/{id}/return"))?;
    assert_eq!(plain.code, 303, "without the capability: the sign-in");

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
    let token = token_for(node, &owner, shoal::auth::Role::Tester)?;

    // Not signed in: the sign-in page, which comes back to the catalog.
    browser.goto(&format!("{}/", node.url)).await?;
    browser
        .wait_text("h1", "Sign in", Duration::from_secs(10))
        .await?;
    assert!(browser.url().await?.contains("/signin?next=%2F"));
    browser.screenshot(&shots.join("0-signin.png")).await?;
    browser
        .type_into(&browser.find("#token").await?, &token)
        .await?;
    browser.click(&browser.find("#signin").await?).await?;

    // The catalog lists the build; request it with the form (for the
    // signed-in tester: there is no owner field).
    let (product, build) = s.image.split_once(':').unwrap();
    browser
        .wait_text("main", build, Duration::from_secs(10))
        .await?;
    let src = browser.source().await?;
    assert!(src.contains(&format!("id=\"p-{product}\"")), "{src}");
    assert!(!src.contains("name=\"owner\""), "a tester names no owner");
    assert!(src.contains(&owner), "signed in as {owner}: {src}");
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

    // Under "my environments"; its link leads back to it.
    browser.goto(&format!("{}/my", node.url)).await?;
    let link = browser.find(&format!("a[href='/envs/{id}']")).await?;
    browser.click(&link).await?;
    browser
        .wait_text("h1", &id, Duration::from_secs(10))
        .await?;

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
    assert!(browser.url().await?.contains("/my?notice="));
    let main = browser.text(&browser.find("main").await?).await?;
    assert!(main.contains("has no environment"), "{main}");
    browser.screenshot(&shots.join("6-returned.png")).await?;
    let (code, _) = raw(&node.client, "GET", &format!("/v1/environments/{id}"), None).await?;
    assert_eq!(code, 404);
    assert!(s.engine.env_containers(&node.name).await?.is_empty());

    // The cluster page is for operators: refused, then sign out and in
    // again as one.
    browser.goto(&format!("{}/cluster", node.url)).await?;
    browser
        .wait_text("h1", "Operators only", Duration::from_secs(10))
        .await?;
    browser.click(&browser.find("#signout").await?).await?;
    browser
        .wait_text("h1", "Sign in", Duration::from_secs(10))
        .await?;
    browser.goto(&format!("{}/cluster", node.url)).await?;
    browser
        .wait_text("h1", "Sign in", Duration::from_secs(10))
        .await?;
    let op = token_for(node, "ops@example.com", shoal::auth::Role::Operator)?;
    browser
        .type_into(&browser.find("#token").await?, &op)
        .await?;
    browser.click(&browser.find("#signin").await?).await?;
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
    let web = Web::signed(
        node,
        &token_for(node, "NoJS@example.com", shoal::auth::Role::Tester)?,
    );
    // The form post of a browser without JavaScript: urlencoded, answered
    // with a redirect to the environment's page.
    let page = web.get("/")?;
    assert_eq!(page.code, 200, "{page:?}");
    let csrf = page.csrf();
    let a = web.post(
        "/envs",
        &[
            ("csrf", &csrf),
            ("image", &s.image),
            ("memory", ""),
            ("ttl", "4h"),
        ],
    )?;
    assert_eq!(a.code, 303, "{a:?}");
    let id = a
        .location()
        .split("/envs/")
        .nth(1)
        .and_then(|r| r.split('?').next())
        .context("redirect to the env page")?
        .to_string();
    // While in progress the page refreshes itself (noscript) and shows
    // the state it is in.
    let page = web.get(&format!("/envs/{id}"))?.body;
    assert!(page.contains("data-status="), "{page}");
    let rec = node.wait_settled(&id).await?;
    assert_eq!(rec.status.as_str(), "ready");
    assert_eq!(rec.owner, "NoJS@example.com", "the signed-in user owns it");
    let page = web.get(&format!("/envs/{id}"))?.body;
    assert!(
        !page.contains("http-equiv=\"refresh\""),
        "no refresh once ready"
    );
    let ep = &rec.endpoints[0];
    assert!(
        page.contains(&format!("href=\"http://{}:{}/\"", ep.host, ep.host_port)),
        "{page}"
    );
    // "My environments" lists it for its owner, and only for its owner
    // (a tester's `owner=` is ignored: it is always their own).
    assert!(web
        .get("/my")?
        .body
        .contains(&format!("href=\"/envs/{id}\"")));
    let other = Web::signed(
        node,
        &token_for(node, "other@example.com", shoal::auth::Role::Tester)?,
    );
    assert!(!other.get("/my")?.body.contains(&id));
    assert!(!other
        .get("/my?owner=nojs%40example.com")?
        .body
        .contains(&id));
    // A bad request re-shows the form with the reason, nothing created.
    let a = web.post(
        "/envs",
        &[("csrf", &csrf), ("image", "no such image"), ("ttl", "4h")],
    )?;
    assert_eq!(a.code, 400, "{a:?}");
    assert!(a.body.contains("class=\"error\""), "{}", a.body);
    let list: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
    assert_eq!(list.len(), 1);
    // Return without JavaScript: the confirmation form posts.
    let confirm = web.get(&format!("/envs/{id}/return"))?;
    assert_eq!(confirm.code, 200);
    let a = web.post(&format!("/envs/{id}/return"), &[("csrf", &confirm.csrf())])?;
    assert_eq!(a.code, 303, "{a:?}");
    wait_gone(node, &id, Duration::from_secs(10)).await?;
    Ok(())
}

/// A form's fields, plus a `csrf` field when given one.
fn with_csrf<'a>(
    mut f: Vec<(&'a str, &'a str)>,
    token: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    if let Some(t) = token {
        f.push(("csrf", t));
    }
    f
}

/// Asserts that a POST was refused by the CSRF check: 403, the refusal
/// page, no cookie set.
fn refused(a: &Answer, what: &str) {
    assert_eq!(a.code, 403, "{what}: {a:?}");
    assert!(a.body.contains("CSRF token"), "{what}: {}", a.body);
    assert!(a.header("set-cookie").is_empty(), "{what}: {a:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_csrf_on_every_form_and_only_your_own() -> Result<()> {
    use shoal::auth::Role;
    let s = setup(&[]).await?;
    let node = &s.node;

    // Unsigned: every page sends to the sign-in page, with a local next.
    let anon = Web::new(node);
    for (path, next) in [
        ("/", "%2F"),
        ("/my", "%2Fmy"),
        ("/envs/abc", "%2Fenvs%2Fabc"),
        ("/envs/abc/extend", "%2Fenvs%2Fabc%2Fextend"),
        ("/cluster", "%2Fcluster"),
    ] {
        let a = anon.get(path)?;
        assert_eq!(
            (a.code, a.location()),
            (303, format!("/signin?next={next}").as_str()),
            "{path}"
        );
    }
    // Assets need no sign-in.
    assert_eq!(anon.get("/assets/shoal.css")?.code, 200);

    // The sign-in page: a pre-session cookie, and its form's token bound
    // to it.
    let page = anon.get("/signin?next=%2Fmy")?;
    assert_eq!(page.code, 200);
    let pre = page.header("set-cookie");
    assert_eq!(pre.len(), 1, "{page:?}");
    assert!(
        pre[0].starts_with("shoal_pre=")
            && pre[0].contains("HttpOnly")
            && pre[0].contains("SameSite=Strict"),
        "{pre:?}"
    );
    let pre_cookie = pre[0].split(';').next().unwrap().to_string();
    let signin_csrf = page.csrf();
    let li = format!("{}@example.com", unique("li"));
    let token = token_for(node, &li, Role::Tester)?;
    let with_pre = Web {
        cookie: Some(pre_cookie.clone()),
        ..Web::new(node)
    };
    // Without the token, with a wrong one, or without the pre-session
    // cookie it was made for: refused, no cookie set.
    refused(
        &with_pre.post("/signin", &[("token", &token), ("next", "/my")])?,
        "sign-in without a token",
    );
    refused(
        &with_pre.post(
            "/signin",
            &[("csrf", "AAAA"), ("token", &token), ("next", "/my")],
        )?,
        "sign-in with a wrong token",
    );
    refused(
        &anon.post(
            "/signin",
            &[("csrf", &signin_csrf), ("token", &token), ("next", "/my")],
        )?,
        "sign-in without its pre-session",
    );
    // A bad user token: 401 and the form again.
    let a = with_pre.post(
        "/signin",
        &[
            ("csrf", &signin_csrf),
            ("token", "shoal1.x.y"),
            ("next", "/"),
        ],
    )?;
    assert_eq!(a.code, 401, "{a:?}");
    assert!(a.body.contains("Not signed in"), "{}", a.body);
    // The right one: the cookie, and back to next (only a local one).
    let a = with_pre.post(
        "/signin",
        &[("csrf", &signin_csrf), ("token", &token), ("next", "/my")],
    )?;
    assert_eq!((a.code, a.location()), (303, "/my"), "{a:?}");
    let set = a.header("set-cookie");
    let session = set
        .iter()
        .find(|c| c.starts_with("shoal_session="))
        .with_context(|| format!("{set:?}"))?;
    let attrs: Vec<&str> = session.split("; ").collect();
    assert_eq!(attrs[0], format!("shoal_session={token}"));
    for want in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&want), "{want} missing: {session}");
    }
    assert!(
        !attrs.contains(&"Secure"),
        "no Secure on an http page: {session}"
    );
    let max_age: u64 = attrs
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .context("Max-Age")?
        .parse()?;
    assert!(
        max_age > 0 && max_age <= 86400,
        "lives as long as the token: {max_age}"
    );
    assert!(set.iter().any(|c| c.starts_with("shoal_pre=;")), "{set:?}");
    let a = with_pre.post(
        "/signin",
        &[
            ("csrf", &signin_csrf),
            ("token", &token),
            ("next", "https://evil.example/"),
        ],
    )?;
    assert_eq!((a.code, a.location()), (303, "/"), "{a:?}");

    // Signed in: the request form. Without its token, with a wrong one,
    // or with another session's: 403 and nothing created.
    let web = Web::signed(node, &token);
    let bo = format!("{}@example.com", unique("bo"));
    let bo_web = Web::signed(node, &token_for(node, &bo, Role::Tester)?);
    let page = web.get("/")?;
    assert_eq!(page.code, 200, "{page:?}");
    let csrf = page.csrf();
    let bo_csrf = bo_web.get("/")?.csrf();
    assert_ne!(csrf, bo_csrf);
    let count = || async {
        let l: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
        anyhow::Ok(l.len())
    };
    for (what, token) in [
        ("none", None),
        ("wrong", Some("AAAA")),
        ("another session's", Some(bo_csrf.as_str())),
    ] {
        let mut f = vec![("image", s.image.as_str()), ("ttl", "4h")];
        if let Some(t) = token {
            f.push(("csrf", t));
        }
        refused(&web.post("/envs", &f)?, &format!("request form, {what}"));
    }
    assert_eq!(count().await?, 0, "nothing created");
    // A tester naming another owner: refused.
    let a = web.post(
        "/envs",
        &[
            ("csrf", &csrf),
            ("image", &s.image),
            ("owner", &bo),
            ("ttl", "4h"),
        ],
    )?;
    assert_eq!(a.code, 403, "{a:?}");
    assert_eq!(count().await?, 0, "nothing created");
    let a = web.post(
        "/envs",
        &[("csrf", &csrf), ("image", &s.image), ("ttl", "4h")],
    )?;
    assert_eq!(a.code, 303, "{a:?}");
    let id = a
        .location()
        .split("/envs/")
        .nth(1)
        .and_then(|r| r.split('?').next())
        .context("env page")?
        .to_string();
    let rec = node.wait_settled(&id).await?;
    assert_eq!(rec.owner, li);
    let expires = rec.expires_at;
    let now_expiry = || async {
        let r: EnvRecord = node.client.get(&format!("/v1/environments/{id}")).await?;
        anyhow::Ok(r.expires_at)
    };

    // Another tester: the page, the live part, the confirmation pages and
    // the forms are refused (403), nothing changes.
    for path in [
        format!("/envs/{id}"),
        format!("/envs/{id}/live"),
        format!("/envs/{id}/extend"),
        format!("/envs/{id}/return"),
    ] {
        assert_eq!(bo_web.get(&path)?.code, 403, "{path}");
    }
    assert!(!bo_web.get("/my")?.body.contains(&id));
    let a = bo_web.post(
        &format!("/envs/{id}/extend"),
        &[("csrf", &bo_csrf), ("by", "1h")],
    )?;
    assert_eq!(a.code, 403, "{a:?}");
    let a = bo_web.post(&format!("/envs/{id}/return"), &[("csrf", &bo_csrf)])?;
    assert_eq!(a.code, 403, "{a:?}");
    assert_eq!(now_expiry().await?, expires);
    // Audit lines (`audit.rs`): the page's create under the signed-in
    // user, and the other tester's refused return.
    let log = node.log();
    let audited = |needles: &[&str]| {
        log.lines()
            .any(|l| l.contains("shoal::audit") && needles.iter().all(|n| l.contains(n)))
    };
    let obj = format!("object={id}");
    assert!(
        audited(&[&format!("user={li}"), "action=create", &obj, "status=303"]),
        "no audit line of the page's create:\n{log}"
    );
    assert!(
        audited(&[&format!("user={bo}"), "action=return", &obj, "status=403"]),
        "no audit line of the refused return:\n{log}"
    );
    // The cluster page is for operators.
    assert_eq!(web.get("/cluster")?.code, 403);
    let ops = Web::signed(node, &token_for(node, "ops@example.com", Role::Operator)?);
    assert_eq!(ops.get("/cluster")?.code, 200);
    assert_eq!(
        ops.get(&format!("/envs/{id}"))?.code,
        200,
        "operators see all"
    );
    assert!(ops
        .get(&format!("/my?owner={}", li.replace('@', "%40")))?
        .body
        .contains(&id));

    // The owner's extend and return forms, and the sign-out: refused
    // without the token, with a wrong one, with another session's.
    let page = web.get(&format!("/envs/{id}"))?;
    assert!(page.body.contains("id=\"extend\"") && page.body.contains("id=\"return\""));
    for (what, token) in [
        ("none", None),
        ("wrong", Some("AAAA")),
        ("another session's", Some(bo_csrf.as_str())),
    ] {
        refused(
            &web.post(
                &format!("/envs/{id}/extend"),
                &with_csrf(vec![("by", "1h")], token),
            )?,
            &format!("extend, {what}"),
        );
        refused(
            &web.post(&format!("/envs/{id}/return"), &with_csrf(vec![], token))?,
            &format!("return, {what}"),
        );
        refused(
            &web.post("/signout", &with_csrf(vec![], token))?,
            &format!("sign-out, {what}"),
        );
    }
    assert_eq!(now_expiry().await?, expires, "not extended");
    assert_eq!(web.get("/my")?.code, 200, "still signed in");

    // The mail links: with their capability they work without a sign-in
    // (a confirmation page first: the GET changes nothing), and their form
    // needs its CSRF token too.
    let keys = web_keys(node)?;
    use shoal::web::session::{mail_cap, MailAction};
    let ext_cap = mail_cap(&keys, MailAction::Extend, &id, &li);
    let ret_cap = mail_cap(&keys, MailAction::Return, &id, &li);
    let confirm = anon.get(&format!("/envs/{id}/extend?cap={ext_cap}"))?;
    assert_eq!(confirm.code, 200, "{confirm:?}");
    assert!(confirm.body.contains("Extend environment"));
    assert_eq!(
        hidden(&confirm.body, "cap").as_deref(),
        Some(ext_cap.as_str())
    );
    let link_csrf = confirm.csrf();
    assert_eq!(now_expiry().await?, expires, "a GET changes nothing");
    // A capability for another action or a made-up one: refused.
    assert_eq!(
        anon.get(&format!("/envs/{id}/extend?cap={ret_cap}"))?.code,
        403
    );
    assert_eq!(anon.get(&format!("/envs/{id}/return?cap=AAAA"))?.code, 403);
    for (what, token) in [
        ("none", None),
        ("wrong", Some("AAAA")),
        ("a session's", Some(csrf.as_str())),
    ] {
        let mut f = vec![("cap", ext_cap.as_str()), ("by", "1h")];
        if let Some(t) = token {
            f.push(("csrf", t));
        }
        refused(
            &anon.post(&format!("/envs/{id}/extend"), &f)?,
            &format!("mail extend, {what}"),
        );
        let mut f = vec![("cap", ret_cap.as_str())];
        if let Some(t) = token {
            f.push(("csrf", t));
        }
        refused(
            &anon.post(&format!("/envs/{id}/return"), &f)?,
            &format!("mail return, {what}"),
        );
    }
    assert_eq!(now_expiry().await?, expires, "not extended");
    // The extend capability's form does not return.
    let a = anon.post(
        &format!("/envs/{id}/return"),
        &[("cap", &ext_cap), ("csrf", &link_csrf)],
    )?;
    assert!(a.code == 403, "{a:?}");
    let a = anon.post(
        &format!("/envs/{id}/extend"),
        &[("cap", &ext_cap), ("csrf", &link_csrf), ("by", "1h")],
    )?;
    assert_eq!(a.code, 200, "{a:?}");
    assert!(a.body.contains("Extended by 1h"), "{}", a.body);
    assert_eq!(
        now_expiry().await?,
        expires.map(|e| e + time::Duration::hours(1))
    );

    // Return it from the page: gone, back to "my environments".
    let confirm = web.get(&format!("/envs/{id}/return"))?;
    let a = web.post(&format!("/envs/{id}/return"), &[("csrf", &confirm.csrf())])?;
    assert_eq!(a.code, 303, "{a:?}");
    assert!(a.location().starts_with("/my?notice="), "{a:?}");
    wait_gone(node, &id, Duration::from_secs(10)).await?;

    // Sign out with the token: the cookie is cleared.
    let a = web.post("/signout", &[("csrf", &csrf)])?;
    assert_eq!((a.code, a.location()), (303, "/signin"), "{a:?}");
    let cleared = a.header("set-cookie");
    assert!(
        cleared.len() == 1
            && cleared[0].starts_with("shoal_session=;")
            && cleared[0].contains("Max-Age=0"),
        "{cleared:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trusted_header_counts_from_the_proxy_only() -> Result<()> {
    let trusted = solo(
        "px",
        &[
            "--trusted-user-header",
            "X-Forwarded-User",
            "--trusted-proxy",
            "127.0.0.1",
            "--public-url",
            "https://shoal.lab.example",
        ],
    )
    .await?;
    let other = solo(
        "py",
        &[
            "--trusted-user-header",
            "X-Forwarded-User",
            "--trusted-proxy",
            "192.0.2.7",
        ],
    )
    .await?;
    let as_li = |node: &Node| Web {
        headers: vec!["X-Forwarded-User: li@example.com".into()],
        ..Web::new(node)
    };
    // From the configured proxy address: signed in as a tester.
    let web = as_li(&trusted.node);
    let a = web.get("/my")?;
    assert_eq!(a.code, 200, "{a:?}");
    assert!(a.body.contains("li@example.com"), "{}", a.body);
    assert!(!a.body.contains("id=\"signout\""), "nothing to sign out of");
    assert_eq!(web.get("/cluster")?.code, 403, "header users are testers");
    // Its forms need the CSRF token as well (bound to the proxy's user;
    // the catalog is empty here, so the token is made as the page makes
    // it); with it the request passes the gate and fails on the image,
    // which does not exist.
    let csrf = shoal::web::session::csrf(
        &web_keys(&trusted.node)?,
        "proxy:li@example.com",
        shoal::auth::now_secs(),
    )
    .as_str()
    .to_string();
    refused(
        &web.post("/envs", &[("image", "nosuch:1"), ("ttl", "1h")])?,
        "header user, no token",
    );
    let a = web.post(
        "/envs",
        &[("csrf", &csrf), ("image", "nosuch:1"), ("ttl", "1h")],
    )?;
    assert_eq!(a.code, 404, "{a:?}");
    // Without the header: the sign-in page.
    assert_eq!(Web::new(&trusted.node).get("/my")?.code, 303);
    // The header from an address that is not the proxy: ignored.
    let a = as_li(&other.node).get("/my")?;
    assert_eq!((a.code, a.location()), (303, "/signin?next=%2Fmy"), "{a:?}");

    // An https public URL makes the cookie Secure.
    let node = &trusted.node;
    let page = Web::new(node).get("/signin")?;
    let pre = page.header("set-cookie")[0]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(page.header("set-cookie")[0].contains("; Secure"));
    let token = token_for(node, "ops@example.com", shoal::auth::Role::Operator)?;
    let a = Web {
        cookie: Some(pre),
        ..Web::new(node)
    }
    .post("/signin", &[("csrf", &page.csrf()), ("token", &token)])?;
    assert_eq!(a.code, 303, "{a:?}");
    let session = a.header("set-cookie");
    assert!(
        session
            .iter()
            .any(|c| c.starts_with("shoal_session=") && c.ends_with("; Secure")),
        "{session:?}"
    );
    // A token cookie wins over the header: the operator's role.
    let both = Web {
        cookie: Some(format!("shoal_session={token}")),
        ..as_li(node)
    };
    assert_eq!(both.get("/cluster")?.code, 200);
    Ok(())
}
