//! `GET /metrics` of real daemons on the real engine: who may scrape, the
//! body passes `promtool check metrics` (Debian's `prometheus` package,
//! installed by `scripts/ensure-tools`; with `SHOAL_REQUIRE_TOOLS=1` a
//! missing promtool fails the test), and each series moves when its event
//! happens: a request, a refused placement, an environment loaded from the
//! store and started, a load broken by a corrupted layer, a mail the SMTP
//! server does not take, a build that fails, a bad gossip datagram, a
//! member that dies.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use serde_json::json;
use shoal::client::Client;
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::store::Store;

/// One sample: the family-and-suffix name and its labels.
type Series = (String, BTreeMap<String, String>);

/// The samples of an exposition (comments skipped), by series.
fn parse(text: &str) -> Result<BTreeMap<Series, f64>> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value: {line}"))?;
        let value: f64 = value.parse().with_context(|| format!("value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => (name, parse_labels(rest, line)?),
        };
        out.insert((name.to_string(), labels), value);
    }
    Ok(out)
}

/// `k="v",k2="v2"}`: values may hold `{`, `}`, `,` and escapes.
fn parse_labels(mut rest: &str, line: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            anyhow::ensure!(r.is_empty(), "after labels: {line}");
            return Ok(labels);
        }
        let (key, r) = rest
            .split_once("=\"")
            .with_context(|| format!("label: {line}"))?;
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("escape: {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("unterminated: {line}"),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = r[end + 1..].trim_start_matches(',');
    }
}

/// A scrape, parsed.
struct Scrape {
    text: String,
    samples: BTreeMap<Series, f64>,
}

impl Scrape {
    /// The value of `name{labels}` (exactly those labels); 0 when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .get(&(name.to_string(), l))
            .copied()
            .unwrap_or(0.0)
    }

    /// The sum of every `name` sample whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

async fn scrape(client: &Client) -> Result<Scrape> {
    let (status, body) = client
        .send_raw(hyper::Method::GET, "/metrics", None)
        .await?;
    let text = String::from_utf8(body.to_vec())?;
    anyhow::ensure!(status.as_u16() == 200, "/metrics answered {status}: {text}");
    Ok(Scrape {
        samples: parse(&text)?,
        text,
    })
}

/// Scrapes until `check` holds (at most `limit`); the last scrape.
async fn scrape_until(
    client: &Client,
    limit: Duration,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> Result<Scrape> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let s = scrape(client).await?;
        if check(&s) {
            return Ok(s);
        }
        if std::time::Instant::now() > deadline {
            bail!("{what}: not seen within {limit:?} in:\n{}", s.text);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn require_tools() -> bool {
    std::env::var("SHOAL_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// `promtool check metrics` on `text`: its findings, or `None` when
/// promtool is not installed (a failure under `SHOAL_REQUIRE_TOOLS=1`).
fn promtool_check(text: &str) -> Result<Option<String>> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                !require_tools(),
                "promtool is missing (scripts/ensure-tools installs Debian's prometheus)"
            );
            eprintln!("SKIPPED promtool: not installed; scripts/ensure-tools installs it");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{findings}\n--- body:\n{text}",
        out.status
    );
    Ok(Some(findings))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_valid_and_move_with_their_events() -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let store_dir = tmp.path().join("store");
    let cluster = unique("c");
    let (a_name, b_name) = (unique("ma"), unique("mb"));
    let mut cleanup = Cleanup::new();
    cleanup.nodes.extend([a_name.clone(), b_name.clone()]);
    // An SMTP port nothing listens on: every send fails (and is retried).
    let smtp = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("smtp://127.0.0.1:{}", l.local_addr()?.port())
    };
    let gossip_fast = ["--gossip-interval", "200ms", "--phi-threshold", "3"];
    // Node A watches a drop directory (a build node); no recipe is there.
    let (drop_dir, recipes) = (tmp.path().join("drop"), tmp.path().join("recipes"));
    std::fs::create_dir_all(&drop_dir)?;
    std::fs::create_dir_all(&recipes)?;
    let (d, r) = (
        drop_dir.display().to_string(),
        recipes.display().to_string(),
    );
    let mut a_args = vec![
        "--cluster-id",
        &cluster,
        "--smtp",
        &smtp,
        "--label",
        "rack=a",
    ];
    a_args.extend(gossip_fast);
    a_args.extend(["--drop", &d, "--recipes", &r, "--build-rescan", "1s"]);
    let a = Node::start(&a_name, &tmp.path().join("a"), &store_dir, &a_args).await?;
    let seed = a.gossip.clone();
    let mut b_args = vec![
        "--cluster-id",
        &cluster,
        "--seed",
        &seed,
        "--label",
        "rack=b",
    ];
    b_args.extend(gossip_fast);
    let mut b = Node::start(&b_name, &tmp.path().join("b"), &store_dir, &b_args).await?;

    // Who may scrape: no token 401, any role's token 200.
    let (code, body) = raw(&a.anonymous()?, "GET", "/metrics", None).await?;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["field"], "authorization", "{body}");
    let owner = "alice@example.com";
    let tester = a.tester(owner)?;
    let before = scrape(&tester).await?;
    if let Some(findings) = promtool_check(&before.text)? {
        eprintln!("promtool check metrics: ok {findings}");
    }
    assert_eq!(before.get("shoal_builds", &[("status", "failed")]), 0.0);

    // A build without a recipe: recorded failed (checked below).
    let product = unique("norecipe");
    let build = drop_dir.join(&product).join("1");
    std::fs::create_dir_all(&build)?;
    std::fs::write(build.join("VERSION"), "1\n")?;
    std::fs::write(build.join("BUILD_COMPLETE"), b"")?;

    // Gossip: both members alive (as node A sees them).
    let s = scrape_until(&tester, Duration::from_secs(30), "two members alive", |s| {
        s.get("shoal_gossip_members", &[("state", "alive")]) == 2.0
    })
    .await?;
    assert_eq!(s.get("shoal_gossip_members", &[("state", "dead")]), 0.0);
    // Workers: one series per state, 1 for the state it is in.
    assert_eq!(
        s.get(
            "shoal_worker_state",
            &[("worker", "reaper"), ("state", "running")]
        ),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "shoal_worker_state",
            &[("worker", "reaper"), ("state", "failed")]
        ),
        0.0
    );

    // A request: counted under its route template, never the raw id.
    let route = [
        ("method", "GET"),
        ("route", "/v1/environments/{id}"),
        ("status", "404"),
    ];
    let n0 = scrape(&tester)
        .await?
        .get("shoal_http_requests_total", &route);
    let (code, _) = raw(&tester, "GET", "/v1/environments/nosuchenv0123", None).await?;
    assert_eq!(code, 404);
    let s = scrape(&tester).await?;
    assert_eq!(s.get("shoal_http_requests_total", &route), n0 + 1.0);
    assert!(!s.text.contains("nosuchenv0123"), "a raw path in a label");
    assert!(
        s.sum(
            "shoal_http_request_duration_seconds_count",
            &[("route", "/v1/environments/{id}")]
        ) >= 1.0
    );

    // A published image (built here, loaded from the store by the node).
    let image = format!("{}-img:1", unique("t"));
    publish_one(&a, &engine, &image, &DemoImage::default(), &mut cleanup).await?;

    // A refused placement: no node has 64 TiB.
    let refused = [("reason", "memory_short")];
    let r0 = s.get("shoal_placement_refusals_total", &refused);
    let (code, body) = a
        .request_env(json!({"image": image, "owner": owner, "memory": "64TiB"}))
        .await?;
    assert_eq!(code, 503, "{body}");
    let s = scrape(&tester).await?;
    // Both nodes were ruled out for memory.
    assert_eq!(s.get("shoal_placement_refusals_total", &refused), r0 + 2.0);

    // An environment, on node A (its label): loaded from the store, started.
    let load_ok = [("outcome", "ok")];
    let bytes0 = s.get("shoal_image_load_bytes_total", &[]);
    let loads0 = s.get("shoal_image_load_duration_seconds_count", &load_ok);
    let creates0 = s.get(
        "shoal_engine_call_duration_seconds_count",
        &[("op", "create container")],
    );
    let (code, body) = a
        .request_env(json!({"image": image, "owner": owner, "constraints": {"rack": "a"}}))
        .await?;
    let id = match (code, body["id"].as_str()) {
        (202, Some(id)) => id.to_string(),
        _ => bail!("create: {code} {body}"),
    };
    let rec = a.wait_settled(&id).await?;
    anyhow::ensure!(rec.status.as_str() == "ready", "{rec:?}: {}", a.log());
    let s = scrape(&tester).await?;
    assert_eq!(s.get("shoal_environments", &[("status", "ready")]), 1.0);
    assert!(
        s.get("shoal_image_load_bytes_total", &[]) > bytes0,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("shoal_image_load_duration_seconds_count", &load_ok),
        loads0 + 1.0
    );
    assert_eq!(
        s.get(
            "shoal_engine_call_duration_seconds_count",
            &[("op", "create container")]
        ),
        creates0 + 1.0
    );
    // Looking the new image up found nothing (a 404 the engine answered).
    assert!(
        s.get(
            "shoal_engine_call_errors_total",
            &[("op", "inspect image"), ("kind", "not_found")]
        ) >= 1.0,
        "{}",
        s.text
    );

    // Mail: the ready mail is queued and the server refuses it.
    let s = scrape_until(&tester, Duration::from_secs(30), "a failed mail", |s| {
        s.get("shoal_mail_send_failures_total", &[("kind", "retry")]) >= 1.0
    })
    .await?;
    assert!(s.get("shoal_mail_queue_depth", &[]) >= 1.0, "{}", s.text);

    // A store error: a load broken by a corrupted layer.
    let bad = format!("{}-bad:1", unique("t"));
    let bad_img = DemoImage {
        extra_files: vec![("/payload".into(), random_bytes(64 << 10))],
        ..Default::default()
    };
    publish_one(&a, &engine, &bad, &bad_img, &mut cleanup).await?;
    let store = Store::open(&store_dir)?;
    let m = store.get(&bad.parse()?)?;
    let top = m.layers.last().context("layers")?;
    corrupt_layer(&store.layer_path(&top.diff_id), top.size)?;
    let digest = [("kind", "digest_mismatch")];
    let failed = [("outcome", "failed")];
    let e0 = s.get("shoal_store_errors_total", &digest);
    let f0 = s.get("shoal_image_load_duration_seconds_count", &failed);
    let (code, body) = a
        .request_env(json!({"image": bad, "owner": owner, "constraints": {"rack": "a"}}))
        .await?;
    anyhow::ensure!(code == 202, "create: {code} {body}");
    let rec = a.wait_settled(body["id"].as_str().context("id")?).await?;
    assert_eq!(rec.status.as_str(), "failed", "{rec:?}");
    let s = scrape(&tester).await?;
    assert_eq!(s.get("shoal_store_errors_total", &digest), e0 + 1.0);
    assert_eq!(
        s.get("shoal_image_load_duration_seconds_count", &failed),
        f0 + 1.0
    );
    assert_eq!(s.get("shoal_environments", &[("status", "failed")]), 1.0);

    // The build dropped at the start failed (no recipe).
    scrape_until(&tester, Duration::from_secs(30), "a failed build", |s| {
        s.get("shoal_builds", &[("status", "failed")]) == 1.0
    })
    .await?;

    // A bad gossip datagram: not sealed, dropped unopened.
    let unsealed = [("reason", "unsealed")];
    let d0 = s.get("shoal_gossip_datagrams_dropped_total", &unsealed);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sock.send_to(b"not a sealed datagram", &a.gossip)?;
    scrape_until(
        &tester,
        Duration::from_secs(10),
        "a dropped datagram",
        |s| s.get("shoal_gossip_datagrams_dropped_total", &unsealed) == d0 + 1.0,
    )
    .await?;

    // A member dies: node B killed, node A's failure detector notices.
    b.kill();
    scrape_until(&tester, Duration::from_secs(45), "a dead member", |s| {
        s.get("shoal_gossip_members", &[("state", "dead")]) == 1.0
            && s.get("shoal_gossip_members", &[("state", "alive")]) == 1.0
    })
    .await?;

    // Everything above, still valid for promtool; the OpenMetrics answer
    // (what Prometheus asks for) carries the same samples.
    let last = scrape(&tester).await?;
    promtool_check(&last.text)?;
    let om = tester
        .clone()
        .with_header("accept", "application/openmetrics-text; version=1.0.0");
    let (status, body) = om.send_raw(hyper::Method::GET, "/metrics", None).await?;
    assert_eq!(status.as_u16(), 200);
    let om_text = String::from_utf8(body.to_vec())?;
    assert!(om_text.ends_with("# EOF\n"), "{om_text}");
    let om_samples = parse(&om_text)?;
    let names = |m: &BTreeMap<Series, f64>| -> Vec<Series> { m.keys().cloned().collect() };
    assert_eq!(names(&om_samples), names(&parse(&last.text)?));

    drop(b);
    drop(a);
    Ok(())
}

#[test]
fn the_parser_reads_labels_with_braces_and_escapes() {
    let s =
        parse("# HELP x y\nshoal_x_total{route=\"/v1/e/{id}\",q=\"a\\\"b,c\"} 3\nshoal_y 1.5\n")
            .unwrap();
    let l: BTreeMap<String, String> = [("route", "/v1/e/{id}"), ("q", "a\"b,c")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(s.get(&("shoal_x_total".to_string(), l)), Some(&3.0));
    assert_eq!(s.get(&("shoal_y".to_string(), BTreeMap::new())), Some(&1.5));
}
