//! Who may do what, on the multi-host harness (real processes, real
//! engines): user tokens any node verifies, testers limited to their own
//! environments, operators to everything, expiry, revocation that reaches
//! every node and survives a restart, and `--open-read`. One cluster of
//! three hosts for the whole file: host 0 takes no environments (every
//! create there is forwarded), hosts 1 and 2 do; host 2 runs with
//! `--open-read`.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::hosts::{wait_for, Host, Hosts};
use common::*;
use serde_json::{json, Value};
use shoal::client::Client;
use shoal::model::EnvRecord;

/// One raw HTTP/1.0 request to `host`: the status, the `WWW-Authenticate`
/// header (if any) and the JSON body.
async fn bare(
    host: &Host,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Option<String>, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = host.api.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    let (head, body) = out.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let www = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("www-authenticate")
            .then(|| v.trim().to_string())
    });
    Ok((
        status,
        www,
        serde_json::from_str(body).unwrap_or(Value::Null),
    ))
}

async fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
    raw(c, method, path, body.map(|b| b.to_string().into_bytes())).await
}

/// Every environment container of every engine: (env id, running).
async fn containers(hosts: &Hosts) -> Result<Vec<(String, bool)>> {
    let mut all: Vec<(String, bool)> = hosts
        .engines()
        .await?
        .into_iter()
        .flatten()
        .map(|c| (c.env, c.running))
        .collect();
    all.sort();
    Ok(all)
}

/// `shoal ARGS` (the CLI), its stdout.
fn cli(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("SHOAL_TOKEN")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Waits until `token` is refused (401) by every host in `which`.
async fn refused_everywhere(hosts: &Hosts, which: &[usize], token: &str) -> Result<()> {
    for &i in which {
        let c = bearer(hosts.host(i).anonymous()?, token);
        wait_for(Duration::from_secs(30), || {
            let c = c.clone();
            async move { Ok(call(&c, "GET", "/v1/environments", None).await?.0 == 401) }
        })
        .await
        .with_context(|| format!("host {i} still takes the revoked token"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn who_may_do_what_across_three_hosts() -> Result<()> {
    let hosts = Hosts::up_each(
        3,
        &[],
        &[
            &["--role", "master"],
            &["--role", "slave"],
            &["--role", "slave", "--open-read"],
        ],
    )
    .await?;
    let (h0, h2) = (hosts.host(0), hosts.host(2));
    let image = hosts.publish_demo(0).await?;
    let key = h0.key.clone().context("the harness made a cluster key")?;
    let key_s = key.display().to_string();

    // Without a token: 401 naming the header, WWW-Authenticate, nothing made.
    let body = json!({"image": image, "owner": "a@lab"}).to_string();
    for (method, path) in [
        ("POST", "/v1/environments"),
        ("GET", "/v1/environments"),
        ("POST", "/v1/images"),
        ("GET", "/v1/workers"),
        ("POST", "/v1/tokens"),
    ] {
        let (status, www, err) = bare(h0, method, path, &body).await?;
        assert_eq!(status, 401, "{method} {path}: {err}");
        assert_eq!(err["field"], "authorization", "{method} {path}: {err}");
        assert!(
            www.is_some_and(|w| w.starts_with("Bearer")),
            "{method} {path}"
        );
    }
    let garbage = bearer(h0.anonymous()?, "shoal1.e30.AAAA");
    let (code, err) = call(
        &garbage,
        "POST",
        "/v1/environments",
        Some(json!({"image": image})),
    )
    .await?;
    assert_eq!(
        (code, err["field"].as_str()),
        (401, Some("authorization")),
        "{err}"
    );
    assert!(containers(&hosts).await?.is_empty());
    // Even with an operator's token, a client's `x-shoal-local` ("serve it
    // here", node-to-node only) is refused at every host: 401 naming it.
    for i in 0..3 {
        let forged = hosts
            .host(i)
            .client
            .clone()
            .with_header("x-shoal-local", "1");
        let (code, err) = call(
            &forged,
            "POST",
            "/v1/environments",
            Some(json!({"image": image})),
        )
        .await?;
        assert_eq!(
            (code, err["field"].as_str()),
            (401, Some("x-shoal-local")),
            "host {i}: {err}"
        );
    }
    assert!(containers(&hosts).await?.is_empty());
    let (_, all) = call(&h0.client, "GET", "/v1/environments", None).await?;
    assert_eq!(all, json!([]));

    // Tester A asks host 0 with no owner: the environment is A's, on a slave.
    let a = h0.tester("a@lab")?;
    let b = h0.tester("b@lab")?;
    // Her environment variables are secret: the value below must never be
    // gossiped or logged, only shown to her and operators.
    let secret = format!("pw-{}", unique("s"));
    let (code, env_a) = call(
        &a,
        "POST",
        "/v1/environments",
        Some(json!({"image": image, "env": {"DB_PASSWORD": secret}})),
    )
    .await?;
    assert_eq!(code, 202, "{env_a}");
    let env_a: EnvRecord = serde_json::from_value(env_a)?;
    assert_eq!(env_a.owner, "a@lab");
    assert_ne!(env_a.node, h0.name);
    let rec = settled(&a, &env_a.id, || hosts.logs_tail(20)).await?;
    assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
    assert_eq!(rec.env["DB_PASSWORD"], secret, "the owner sees her value");
    for i in 0..3 {
        let (_, view) = call(&hosts.host(i).client, "GET", "/v1/cluster", None).await?;
        assert!(
            !view.to_string().contains(&secret),
            "host {i} gossips the secret"
        );
    }
    // The write left an audit line at the node she called, naming her,
    // her role and the new environment (the layer in `audit.rs`).
    let audited = |i: usize, needles: &[&str]| {
        hosts
            .shoal_log(i)
            .lines()
            .any(|l| l.contains("audit") && needles.iter().all(|n| l.contains(n)))
    };
    let obj = format!("object={}", env_a.id);
    let created = [
        "user=a@lab",
        "role=tester",
        "action=create",
        obj.as_str(),
        "status=202",
    ];
    wait_for(Duration::from_secs(5), || async {
        Ok(audited(0, &created))
    })
    .await
    .with_context(|| {
        format!(
            "no audit line of the create at host 0:\n{}",
            hosts.logs_tail(30)
        )
    })?;
    let owner_host = hosts.index(&rec.node).context("owner host")?;
    let (code, env_b) = call(
        &b,
        "POST",
        "/v1/environments",
        Some(json!({"image": image, "owner": "B@lab"})),
    )
    .await?;
    assert_eq!(code, 202, "{env_b}");
    let env_b: EnvRecord = serde_json::from_value(env_b)?;
    assert_eq!(
        env_b.owner, "b@lab",
        "a tester's own name, as the token says"
    );
    let rec_b = settled(&b, &env_b.id, || hosts.logs_tail(20)).await?;
    assert_eq!(rec_b.status.as_str(), "ready", "{rec_b:?}");
    let before = containers(&hosts).await?;
    assert_eq!(before.len(), 2);

    // An unauthenticated delete and extend change nothing.
    let path = format!("/v1/environments/{}", env_a.id);
    for i in [0, owner_host] {
        let (s, _, err) = bare(hosts.host(i), "DELETE", &path, "").await?;
        assert_eq!((s, err["field"].as_str()), (401, Some("authorization")));
        let (s, _, _) = bare(
            hosts.host(i),
            "POST",
            &format!("{path}/extend"),
            r#"{"by":"1h"}"#,
        )
        .await?;
        assert_eq!(s, 401);
    }

    // Tester B on A's environment, at the entry node and at the owner: 403.
    for i in [0, owner_host] {
        let b_here = hosts.host(i).tester("b@lab")?;
        let (code, err) = call(&b_here, "DELETE", &path, None).await?;
        assert_eq!(
            (code, err["field"].as_str()),
            (403, Some("id")),
            "host {i}: {err}"
        );
        let (code, err) = call(
            &b_here,
            "POST",
            &format!("{path}/extend"),
            Some(json!({"by": "1h"})),
        )
        .await?;
        assert_eq!(code, 403, "host {i}: {err}");
        let (code, _) = call(&b_here, "GET", &path, None).await?;
        assert_eq!(code, 403, "host {i}");
    }
    // A tester may not request for someone else; an operator may.
    let (code, err) = call(
        &b,
        "POST",
        "/v1/environments",
        Some(json!({"image": image, "owner": "a@lab"})),
    )
    .await?;
    assert_eq!((code, err["field"].as_str()), (403, Some("owner")), "{err}");
    assert_eq!(
        containers(&hosts).await?,
        before,
        "nothing started or stopped"
    );
    let (code, rec) = call(&a, "GET", &path, None).await?;
    assert_eq!(
        (code, rec["status"].as_str()),
        (200, Some("ready")),
        "A's still runs"
    );
    let (code, rec) = call(
        &a,
        "POST",
        &format!("{path}/extend"),
        Some(json!({"by": "1h"})),
    )
    .await?;
    assert_eq!(code, 200, "A extends her own: {rec}");
    // Refused writes are audited too, where they were refused.
    let refused = ["user=b@lab", "action=return", obj.as_str(), "status=403"];
    assert!(audited(0, &refused), "no audit line of B's refused return");
    let extended = ["user=a@lab", "action=extend", obj.as_str(), "status=200"];
    assert!(audited(0, &extended), "no audit line of A's extension");
    // The secret was never logged by any host.
    for i in 0..3 {
        assert!(
            !hosts.shoal_log(i).contains(&secret),
            "host {i} logged the secret"
        );
    }

    // Lists: a tester sees their own, an operator every one.
    let ids = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["id"].as_str().map(String::from))
            .collect();
        ids.sort();
        ids
    };
    for i in 0..3 {
        let (_, mine) = call(
            &hosts.host(i).tester("b@lab")?,
            "GET",
            "/v1/environments",
            None,
        )
        .await?;
        assert_eq!(ids(&mine), vec![env_b.id.clone()], "host {i}");
        let (_, every) = call(&hosts.host(i).client, "GET", "/v1/environments", None).await?;
        let mut both = vec![env_a.id.clone(), env_b.id.clone()];
        both.sort();
        assert_eq!(ids(&every), both, "host {i}");
    }
    // Operators name any owner; testers are kept off operator routes.
    let (code, env_c) = call(
        &h0.client,
        "POST",
        "/v1/environments",
        Some(json!({"image": image, "owner": "c@lab"})),
    )
    .await?;
    assert_eq!(code, 202, "{env_c}");
    assert_eq!(env_c["owner"], "c@lab");
    for (method, path) in [
        ("GET", "/v1/workers"),
        ("GET", "/v1/builds"),
        ("POST", "/v1/tokens"),
        ("GET", "/v1/cluster"),
        ("GET", "/v1/node"),
    ] {
        let (code, err) = call(
            &a,
            method,
            path,
            Some(json!({"user": "x", "role": "operator"})),
        )
        .await?;
        assert_eq!(code, 403, "{method} {path}: {err}");
    }
    // B returns her own; the operator returns C's.
    let (code, _) = call(
        &b,
        "DELETE",
        &format!("/v1/environments/{}", env_b.id),
        None,
    )
    .await?;
    assert_eq!(code, 200);
    let c_id = env_c["id"].as_str().unwrap().to_string();
    let (code, _) = call(
        &h0.client,
        "DELETE",
        &format!("/v1/environments/{c_id}"),
        None,
    )
    .await?;
    assert_eq!(code, 200);

    // A token issued by host 1's API works on host 2 (and the CLI's on all).
    let (code, issued) = call(
        &hosts.host(1).client,
        "POST",
        "/v1/tokens",
        Some(json!({"user": "d@lab", "role": "tester"})),
    )
    .await?;
    assert_eq!(code, 201, "{issued}");
    let d_token = issued["token"].as_str().unwrap().to_string();
    let (code, _) = call(
        &bearer(h2.anonymous()?, &d_token),
        "GET",
        "/v1/environments",
        None,
    )
    .await?;
    assert_eq!(code, 200);
    let out = cli(&[
        "token",
        "issue",
        "--cluster-key",
        &key_s,
        "--user",
        "e@lab",
        "--role",
        "tester",
        "--ttl",
        "1h",
    ])?;
    let e_token = out.lines().last().context("a last line")?.to_string();
    for i in 0..3 {
        let (code, _) = call(
            &bearer(hosts.host(i).anonymous()?, &e_token),
            "GET",
            "/v1/environments",
            None,
        )
        .await?;
        assert_eq!(code, 200, "host {i}");
    }

    // Expiry: a 1 s token is refused once it is past.
    let (code, short) = call(
        &h0.client,
        "POST",
        "/v1/tokens",
        Some(json!({"user": "f@lab", "role": "tester", "ttl": "1s"})),
    )
    .await?;
    assert_eq!(code, 201);
    let short = bearer(hosts.host(1).anonymous()?, short["token"].as_str().unwrap());
    wait_for(Duration::from_secs(10), || {
        let short = short.clone();
        async move {
            let (code, err) = call(&short, "GET", "/v1/environments", None).await?;
            Ok(code == 401 && err["error"].as_str().is_some_and(|e| e.contains("expired")))
        }
    })
    .await?;

    // Revoked on host 1 (API) → refused by every host; also after host 2
    // restarts cut off from the others (it reads its own file).
    let (code, r) = call(
        &hosts.host(1).client,
        "POST",
        "/v1/tokens/revoke",
        Some(json!({"token": d_token})),
    )
    .await?;
    assert_eq!(
        (code, r["id"].as_str()),
        (200, issued["id"].as_str()),
        "{r}"
    );
    refused_everywhere(&hosts, &[0, 1, 2], &d_token).await?;
    hosts.cut(2).await?;
    hosts.kill_shoal(2).await?;
    hosts.start_shoal(2).await?;
    let (code, err) = call(
        &bearer(h2.anonymous()?, &d_token),
        "GET",
        "/v1/environments",
        None,
    )
    .await?;
    assert_eq!(
        (code, err["field"].as_str()),
        (401, Some("authorization")),
        "{err}"
    );
    assert!(
        err["error"].as_str().unwrap_or("").contains("revoked"),
        "{err}"
    );
    hosts.heal(2).await?;
    // Revoked by the CLI in host 0's data dir (by id) → every host.
    let e_id = shoal::auth::peek_claims(&e_token).unwrap().tid;
    let out = cli(&[
        "token",
        "revoke",
        "--data-dir",
        &hosts.data_dir(0).display().to_string(),
        &e_id,
    ])?;
    assert_eq!(out.trim(), e_id);
    refused_everywhere(&hosts, &[0, 1, 2], &e_token).await?;
    // The operator's token is untouched.
    let (code, _) = call(&h2.client, "GET", "/v1/environments", None).await?;
    assert_eq!(code, 200);

    // A tester reads the catalog; the cluster view only where it is open.
    assert_eq!(call(&a, "GET", "/v1/images", None).await?.0, 200);
    let a2 = h2.tester("a@lab")?;
    assert_eq!(call(&a2, "GET", "/v1/cluster", None).await?.0, 200);
    // --open-read: host 2 shows the catalog and the cluster without a
    // token; host 0 does not; writes need a token everywhere.
    let anon2 = h2.anonymous()?;
    let anon0 = h0.anonymous()?;
    for path in [
        "/v1/images",
        "/v1/cluster",
        "/v1/node",
        &format!("/v1/images/{image}"),
    ] {
        assert_eq!(
            call(&anon2, "GET", path, None).await?.0,
            200,
            "{path} on host 2"
        );
        assert_eq!(
            call(&anon0, "GET", path, None).await?.0,
            401,
            "{path} on host 0"
        );
    }
    for (method, path) in [
        ("GET", "/v1/environments"),
        ("POST", "/v1/images"),
        ("GET", "/v1/workers"),
    ] {
        assert_eq!(
            call(&anon2, method, path, Some(json!({}))).await?.0,
            401,
            "{method} {path}"
        );
    }
    // Healthz and the document stay open everywhere.
    assert_eq!(call(&anon0, "GET", "/healthz", None).await?.0, 200);
    assert_eq!(call(&anon0, "GET", "/v1/openapi.json", None).await?.0, 200);

    // A's environment ran through all of it.
    let (code, rec) = call(&a, "GET", &path, None).await?;
    assert_eq!((code, rec["status"].as_str()), (200, Some("ready")));
    let (code, _) = call(&a, "DELETE", &path, None).await?;
    assert_eq!(code, 200);
    Ok(())
}
