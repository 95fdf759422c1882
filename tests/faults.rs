//! Faults on separate hosts (`tests/common/hosts.rs`), each judged by the
//! checker (`tests/common/checker.rs`) from the answers clients got and the
//! final state of every engine: a partition of one host, and a kill -9 of a
//! host's shoal with a restart. Each scenario is bounded in time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::checker::{self, History};
use common::hosts::{wait_for, Hosts};
use futures::future::join_all;
use serde_json::{json, Value};
use shoal::model::EnvRecord;

/// Three roomy slaves labelled `host=<i>`; hosts 1 and 2 also `zone=b`.
async fn three_hosts() -> Result<Arc<Hosts>> {
    let roomy = ["--role", "slave", "--memory", "2GiB", "--max-envs", "12"];
    Ok(Arc::new(
        Hosts::up_each(
            3,
            &roomy,
            &[
                &["--label", "host=0"],
                &["--label", "host=1", "--label", "zone=b"],
                &["--label", "host=2", "--label", "zone=b"],
            ],
        )
        .await?,
    ))
}

fn req(image: &str, who: &str, constraints: Value) -> Value {
    json!({"image": image, "owner": format!("{who}@example.com"), "constraints": constraints})
}

/// One ready environment pinned on every host; their ids by host.
async fn one_on_each(hosts: &Hosts, history: &History, image: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..hosts.len() {
        let a = history
            .create(
                hosts,
                0,
                req(image, &format!("pin{i}"), json!({"host": i.to_string()})),
            )
            .await;
        anyhow::ensure!(a.code == 202, "pinned create on {i}: {} {}", a.code, a.body);
        ids.push(a.body["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let rec = hosts.host(0).wait_settled(id).await?;
        anyhow::ensure!(rec.status.as_str() == "ready", "{rec:?}");
    }
    Ok(ids)
}

/// Waits until host `at` shows environment `id` with `status`.
async fn wait_status(hosts: &Hosts, at: usize, id: &str, status: &str) -> Result<()> {
    let h = hosts.host(at);
    wait_for(Duration::from_secs(45), || async {
        let r: EnvRecord = h.client.get(&format!("/v1/environments/{id}")).await?;
        Ok(r.status.as_str() == status)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{id} never {status} at {}: {e}", h.name))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_host_keeps_running_and_the_views_converge_after_the_heal() -> Result<()> {
    let hosts = three_hosts().await?;
    let limits = checker::limits(&hosts).await?;
    let image = hosts.publish_demo(0).await?;
    let history = History::new();
    let pinned = one_on_each(&hosts, &history, &image).await?;
    let before = checker::snapshot(&hosts).await?;

    hosts.cut(2).await?;
    // Right after the cut host 2 still looks alive: requests for zone b at
    // host 0 are offered to it in turn (hosts 1 and 2 are near-equal), cost
    // a timeout there and go to host 1. Meanwhile requests arrive at every
    // host, the cut one included (its own clients still reach it).
    let early = join_all((0..8).map(|k| {
        let (hosts, history, image) = (hosts.clone(), history.clone(), image.clone());
        async move {
            history
                .create(
                    &hosts,
                    0,
                    req(&image, &format!("z{k}"), json!({"zone": "b"})),
                )
                .await
        }
    }));
    let others = join_all((0..6).map(|k| {
        let (hosts, history, image) = (hosts.clone(), history.clone(), image.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(500 * k as u64)).await;
            history
                .create(&hosts, k % 3, req(&image, &format!("a{k}"), json!({})))
                .await
        }
    }));
    let (early, _) = tokio::join!(early, others);
    for a in &early {
        assert_eq!(a.code, 202, "{}", a.body);
        assert_eq!(a.body["node"], hosts.host(1).name.as_str(), "{}", a.body);
    }
    assert!(
        hosts.shoal_log(0).contains("candidate unreachable"),
        "no forward into the partition: {}",
        hosts.logs_tail(20)
    );

    // Both sides see the other side's environments lost; host 2's keep
    // running on its engine.
    wait_status(&hosts, 0, &pinned[2], "lost").await?;
    wait_status(&hosts, 1, &pinned[2], "lost").await?;
    wait_status(&hosts, 2, &pinned[0], "lost").await?;
    wait_status(&hosts, 2, &pinned[1], "lost").await?;
    let on2 = hosts.host(2).containers().await?;
    assert!(on2.iter().any(|c| c.env == pinned[2] && c.running));
    // More requests while both sides know: each side places on itself.
    for i in 0..3 {
        let a = history
            .create(&hosts, i, req(&image, &format!("p{i}"), json!({})))
            .await;
        assert_eq!(a.code, 202, "{}", a.body);
        if i == 2 {
            assert_eq!(a.body["node"], hosts.host(2).name.as_str());
        } else {
            assert_ne!(a.body["node"], hosts.host(2).name.as_str());
        }
    }
    let during = checker::snapshot(&hosts).await?;

    hosts.heal(2).await?;
    hosts.wait_view(&[0, 1, 2], Duration::from_secs(60)).await?;
    // Every view converges: every accepted environment ready at every host.
    let accepted = history.accepted();
    for i in 0..3 {
        for rec in &accepted {
            wait_status(&hosts, i, &rec.id, "ready").await?;
        }
        let list: Vec<EnvRecord> = hosts.host(i).client.get("/v1/environments").await?;
        for rec in &accepted {
            assert_eq!(
                list.iter().filter(|r| r.id == rec.id).count(),
                1,
                "{} listed once at {}",
                rec.id,
                hosts.host(i).name
            );
        }
    }
    let report = checker::check(&hosts, &history, &limits, &[&before, &during], &[]).await?;
    eprintln!("partition: {report:?}");
    // Nobody died: every accepted environment runs.
    assert!(report.statuses.values().all(|s| s == "ready"), "{report:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_hosts_shoal_mid_stream_then_restart_loses_and_duplicates_nothing() -> Result<()>
{
    let hosts = three_hosts().await?;
    let limits = checker::limits(&hosts).await?;
    let image = hosts.publish_demo(0).await?;
    let history = History::new();
    let pinned = one_on_each(&hosts, &history, &image).await?;
    let before = checker::snapshot(&hosts).await?;

    // A stream of requests at hosts 0 and 2 (some placed on host 1) while
    // host 1's shoal is killed part way through.
    let stream = join_all((0..12).map(|k| {
        let (hosts, history, image) = (hosts.clone(), history.clone(), image.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(250 * k as u64)).await;
            history
                .create(
                    &hosts,
                    [0, 2][k % 2],
                    req(&image, &format!("s{k}"), json!({})),
                )
                .await
        }
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        hosts.kill_shoal(1).await
    };
    let (_, killed) = tokio::join!(stream, kill);
    killed?;

    // The others show host 1's environments lost; nothing is started in
    // their place.
    for i in [0, 2] {
        wait_status(&hosts, i, &pinned[1], "lost").await?;
    }
    let report = checker::check(&hosts, &history, &limits, &[&before], &[1]).await?;
    eprintln!("host 1 down: {report:?}");
    let mid = checker::snapshot(&hosts).await?;

    // Restarted with the same data dir: it adopts its containers as they
    // are, every view converges, and the checker finds the same world.
    hosts.start_shoal(1).await?;
    hosts.wait_view(&[0, 1, 2], Duration::from_secs(60)).await?;
    for i in 0..3 {
        wait_status(&hosts, i, &pinned[1], "ready").await?;
    }
    let report = checker::check(&hosts, &history, &limits, &[&before, &mid], &[]).await?;
    eprintln!("after restart: {report:?}");
    // A create host 1 had in flight when it was killed may have failed
    // (with its reason: the checker saw to that); nothing is lost any more.
    assert!(
        report
            .statuses
            .values()
            .all(|s| s == "ready" || s == "failed"),
        "{report:?}"
    );

    // Killed right after a forwarded 202, before its gossip carried the
    // environment (host 1's gossip is muted so that moment lasts): the
    // entry node remembers where it placed it, so the environment is
    // `lost` at the entry node and at any other, never 404.
    hosts.mute(1).await?;
    let a = history
        .create(&hosts, 0, req(&image, "unannounced", json!({"host": "1"})))
        .await;
    let killed = hosts.kill_shoal(1).await;
    hosts.unmute(1).await?;
    killed?;
    assert_eq!(a.code, 202, "{}", a.body);
    assert_eq!(a.body["node"], hosts.host(1).name.as_str(), "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();
    for i in [0, 2] {
        wait_status(&hosts, i, &id, "lost").await?;
    }
    let (code, body) = common::raw(
        &hosts.host(2).client,
        "DELETE",
        &format!("/v1/environments/{id}"),
        None,
    )
    .await?;
    assert_eq!(code, 503, "a delete of a lost environment: {body}");
    let list: Vec<EnvRecord> = hosts.host(0).client.get("/v1/environments").await?;
    assert!(
        list.iter()
            .any(|r| r.id == id && r.status.as_str() == "lost"),
        "{id} not listed lost"
    );
    let report = checker::check(&hosts, &history, &limits, &[&before, &mid], &[1]).await?;
    eprintln!("host 1 killed after a forwarded 202: {report:?}");
    assert!(report.unannounced.is_empty(), "{report:?}");
    assert_eq!(report.statuses.get(&id).map(String::as_str), Some("lost"));
    Ok(())
}
