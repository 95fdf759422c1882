//! Faults of one host, each on a real daemon and the real engine: SIGTERM
//! while event streams are open, a data directory that is full, and an
//! image store that vanishes, turns read-only or hangs (issue 8, faults 4-6).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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
    fn open(url: &str, token: Option<&str>) -> Result<Stream> {
        let auth = format!("Authorization: Bearer {}", token.unwrap_or_default());
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "300", "-H", &auth, url])
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
    let token = s.node.token.as_deref();
    let mut streams = vec![Stream::open(&url, token)?, Stream::open(&url, token)?];
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

/// Mounts made by a test, unmounted (lazily, so a dead daemon's open files
/// cannot keep them) when dropped: declare it before the nodes that use it.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn run(args: &[&str]) -> Result<()> {
        let out = Command::new(args[0]).args(&args[1..]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn bind(&mut self, from: &Path, to: &Path) -> Result<()> {
        Mounts::run(&[
            "mount",
            "--bind",
            &from.display().to_string(),
            &to.display().to_string(),
        ])?;
        self.0.push(to.into());
        Ok(())
    }

    fn tmpfs(&mut self, at: &Path, size: &str) -> Result<()> {
        Mounts::run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            &at.display().to_string(),
        ])?;
        self.0.push(at.into());
        Ok(())
    }

    fn remount(&self, at: &Path, opts: &str) -> Result<()> {
        Mounts::run(&[
            "mount",
            "-o",
            &format!("remount,bind,{opts}"),
            &at.display().to_string(),
        ])
    }

    fn umount(&mut self, at: &Path) -> Result<()> {
        Mounts::run(&["umount", &at.display().to_string()])?;
        self.0.retain(|p| p != at);
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Polls `GET /v1/node` until `ok` holds for it (bounded).
async fn node_until(node: &Node, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = node.client.get("/v1/node").await?;
        if ok(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("node never got {what}: {v}\n{}", node.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn store_state(v: &Value) -> &str {
    v["store"]["state"].as_str().unwrap_or("")
}

/// Every answer that needs the store is a 503 naming it; the others work.
async fn assert_store_refused(node: &Node, image: &str) -> Result<()> {
    let (code, body) = node
        .request_env(json!({"image": image, "owner": "tester@example.com"}))
        .await?;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("store")),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap_or("").contains("image store"),
        "{body}"
    );
    let (code, body) = raw(&node.client, "GET", "/v1/images", None).await?;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("store")),
        "{body}"
    );
    let (code, body) = raw(&node.client, "GET", "/healthz", None).await?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["problems"][0]["check"], "store", "{body}");
    let (code, _) = raw(&node.client, "GET", "/v1/environments", None).await?;
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_known_store_that_vanishes_is_refused_never_replaced() -> Result<()> {
    let engine = shoal::docker::Engine::connect().await?;
    let dir = tempfile::tempdir()?;
    let real = dir.path().join("nfs-export");
    let mnt = dir.path().join("store");
    std::fs::create_dir_all(&real)?;
    std::fs::create_dir_all(&mnt)?;
    let mut mounts = Mounts(Vec::new());
    mounts.bind(&real, &mnt)?;
    let name = unique("st");
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    let mut node = Node::start(&name, &dir.path().join("node"), &mnt, &[]).await?;

    // A store that never existed is created, with its marker.
    let v = node_until(&node, "an ok store", |v| store_state(v) == "ok").await?;
    let id = v["store"]["id"].as_str().unwrap().to_string();
    let marker: Value = serde_json::from_slice(&std::fs::read(real.join("shoal-store.json"))?)?;
    assert_eq!(marker["id"], id.as_str());
    assert_eq!(marker["format"], 1);
    let image = format!("{}:1", unique("st"));
    let img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(16 << 10))],
        ..Default::default()
    };
    publish_one(&node, &engine, &image, &img, &mut cleanup).await?;

    // Unmounted: the mount point is an empty directory.
    mounts.umount(&mnt)?;
    let v = node_until(&node, "an unavailable store", |v| {
        store_state(v) == "unavailable"
    })
    .await?;
    assert!(
        v["store"]["reason"].as_str().unwrap().contains("empty"),
        "{v}"
    );
    assert_store_refused(&node, &image).await?;
    let (code, body) = raw(
        &node.client,
        "POST",
        "/v1/images",
        Some(
            json!({"source": "x:1", "ref": "y:1"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("store")),
        "{body}"
    );
    // A restart remembers the store: still refused, nothing created.
    node.kill();
    node.spawn().await?;
    let v: Value = node.client.get("/v1/node").await?;
    assert_eq!(store_state(&v), "unavailable", "{v}");
    assert_store_refused(&node, &image).await?;
    assert_eq!(
        std::fs::read_dir(&mnt)?.count(),
        0,
        "the empty mount point was filled"
    );

    // Gone altogether: still refused, not re-created.
    std::fs::remove_dir(&mnt)?;
    let v = node_until(&node, "a missing store", |v| {
        v["store"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("missing")
    })
    .await?;
    assert_eq!(store_state(&v), "unavailable");
    assert!(!mnt.exists(), "the store was re-created");

    // Back, read-only: loads work, publishes are refused.
    std::fs::create_dir(&mnt)?;
    mounts.bind(&real, &mnt)?;
    mounts.remount(&mnt, "ro")?;
    let v = node_until(&node, "a read-only store", |v| {
        store_state(v) == "read_only"
    })
    .await?;
    assert_eq!(v["store"]["id"], id.as_str());
    let (code, body) = raw(&node.client, "GET", "/healthz", None).await?;
    assert_eq!(code, 200, "{body}");
    let env = ready_env(&node, &image).await?;
    assert_eq!(env.load.layers_cached, 0, "{env:?}");
    let (code, body) = raw(
        &node.client,
        "POST",
        "/v1/images",
        Some(
            json!({"source": format!("shoal/{image}"), "ref": format!("{image}x")})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("store")),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("read-only"),
        "{body}"
    );

    // Writable again: by itself, the node takes everything again.
    mounts.remount(&mnt, "rw")?;
    node_until(&node, "an ok store", |v| store_state(v) == "ok").await?;
    let (code, body) = raw(&node.client, "GET", "/v1/images", None).await?;
    assert_eq!(code, 200, "{body}");
    let (code, _) = raw(&node.client, "GET", "/healthz", None).await?;
    assert_eq!(code, 200);
    drop(node);
    Ok(())
}

/// Fills the filesystem of `dir` with one file until it refuses more.
fn fill(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 64 << 10];
    for _ in 0..100_000 {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            anyhow::ensure!(e.raw_os_error() == Some(28), "filling: {e}");
            // Whatever is left is below one block of the chunk: take it too.
            for _ in 0..64 {
                if f.write_all(&[0u8; 1024])
                    .and_then(|()| f.sync_data())
                    .is_err()
                {
                    break;
                }
            }
            return Ok(());
        }
    }
    bail!("{} never filled up", path.display())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_data_dir_refuses_new_environments_until_there_is_room() -> Result<()> {
    let engine = shoal::docker::Engine::connect().await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node");
    std::fs::create_dir_all(&data)?;
    let mut mounts = Mounts(Vec::new());
    mounts.tmpfs(&data, "8m")?;
    // The log lives elsewhere (as with journald), so it can say why.
    std::os::unix::fs::symlink(dir.path().join("daemon.log"), data.join("daemon.log"))?;
    let name = unique("df");
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    let node = Node::start(&name, &data, &dir.path().join("store"), &[]).await?;
    let image = format!("{}:1", unique("df"));
    let img = DemoImage {
        extra_files: vec![("/marker".into(), random_bytes(16 << 10))],
        ..Default::default()
    };
    publish_one(&node, &engine, &image, &img, &mut cleanup).await?;
    let first = ready_env(&node, &image).await?;
    let journal = data.join("envs").join(format!("{}.json", first.id));
    let before = std::fs::read(&journal)?;

    // Full: new environments are refused, naming the disk.
    let filler = data.join("filler");
    fill(&filler)?;
    for _ in 0..3 {
        let (code, body) = node
            .request_env(json!({"image": image, "owner": "tester@example.com"}))
            .await?;
        assert_eq!(
            (code, body["resource"].as_str()),
            (503, Some("disk")),
            "{body}"
        );
        assert!(
            !body["error"]
                .as_str()
                .unwrap()
                .contains(&data.display().to_string()),
            "{body}"
        );
    }
    // Reads go on; the journal holds the old records, whole.
    let list: Vec<EnvRecord> = node.client.get("/v1/environments").await?;
    assert_eq!(list.len(), 1, "{list:?}");
    let rec: EnvRecord = node
        .client
        .get(&format!("/v1/environments/{}", first.id))
        .await?;
    assert_eq!(rec.status.as_str(), "ready");
    let _: Value = node.client.get("/v1/node").await?;
    let (code, _) = raw(&node.client, "GET", "/v1/images", None).await?;
    assert_eq!(code, 200);
    // A write that fails leaves the old file and nothing half-written.
    let (code, body) = raw(
        &node.client,
        "POST",
        &format!("/v1/environments/{}/extend", first.id),
        Some(json!({"by": "1h"}).to_string().into_bytes()),
    )
    .await?;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("disk")),
        "{body}"
    );
    assert_eq!(std::fs::read(&journal)?, before);
    let stray: Vec<_> = files_under(&data)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert!(node.log().contains("data directory full"), "{}", node.log());

    // Room again: accepted, and it runs.
    std::fs::remove_file(&filler)?;
    let second = ready_env(&node, &image).await?;
    assert_ne!(second.id, first.id);
    drop(node);
    Ok(())
}

/// A mount of `tests/hang_fs.py`: the backing directory seen through FUSE,
/// every operation blocking while [`HangFs::hang`] holds it. Dropped, it
/// lets go first (so no process stays stuck in it), then unmounts.
struct HangFs {
    child: Child,
    mnt: PathBuf,
    ctl: PathBuf,
}

impl HangFs {
    fn start(backing: &Path, mnt: &Path, ctl: &Path, log: &Path) -> Result<HangFs> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hang_fs.py");
        let child = Command::new("python3")
            .arg(script)
            .args([backing, mnt, ctl])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting hang_fs.py (needs mfusepy: scripts/ensure-tools)")?;
        let fs = HangFs {
            child,
            mnt: mnt.into(),
            ctl: ctl.into(),
        };
        let want = format!(" {} fuse", mnt.display());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string("/proc/mounts")?.contains(&want) {
            if Instant::now() > deadline {
                bail!("hang_fs did not mount: {}", std::fs::read_to_string(log)?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(fs)
    }

    fn hang(&self) -> Result<()> {
        Ok(std::fs::write(&self.ctl, b"")?)
    }

    fn release(&self) {
        let _ = std::fs::remove_file(&self.ctl);
    }
}

impl Drop for HangFs {
    fn drop(&mut self) {
        self.release();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// `path` on `node`, answered within `within` (or the test fails).
async fn answered(node: &Node, path: &str, within: Duration) -> Result<(u16, Value)> {
    tokio::time::timeout(within, raw(&node.client, "GET", path, None))
        .await
        .with_context(|| format!("GET {path} did not answer within {within:?}"))?
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_store_does_not_block_the_api() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backing = dir.path().join("export");
    let mnt = dir.path().join("store");
    std::fs::create_dir_all(&mnt)?;
    shoal::store::Store::open(&backing)?;
    let name = unique("hang");
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    // Declared before the FUSE mount, so it is dropped after it: the mount
    // lets go of the daemon's blocked reads before the daemon is killed.
    let mut slot: Option<Node> = None;
    let fs = HangFs::start(
        &backing,
        &mnt,
        &dir.path().join("hang"),
        &dir.path().join("fs.log"),
    )?;
    let node = slot.insert(Node::start(&name, &dir.path().join("node"), &mnt, &[]).await?);
    node_until(node, "an ok store", |v| store_state(v) == "ok").await?;
    let (code, body) = answered(node, "/v1/images", Duration::from_secs(20)).await?;
    assert_eq!(code, 200, "{body}");

    // The store's server stops answering.
    fs.hang()?;
    // A catalog read that needs the store answers 503 within its bound.
    let (code, body) = answered(node, "/v1/images", Duration::from_secs(30)).await?;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("store")),
        "{body}"
    );
    let v = node_until(node, "an unavailable store", |v| {
        store_state(v) == "unavailable"
    })
    .await?;
    assert!(
        v["store"]["reason"].as_str().unwrap().contains("answer"),
        "{v}"
    );
    // What does not need the store answers at once, again and again.
    for _ in 0..5 {
        for path in ["/v1/node", "/v1/environments", "/v1/workers"] {
            let (code, body) = answered(node, path, Duration::from_secs(5)).await?;
            assert_eq!(code, 200, "{path}: {body}");
        }
        let (code, body) = answered(node, "/healthz", Duration::from_secs(5)).await?;
        assert_eq!(code, 503, "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, body) = tokio::time::timeout(
        Duration::from_secs(30),
        node.request_env(json!({"image": "nothing:1", "owner": "tester@example.com"})),
    )
    .await??;
    assert_eq!(
        (code, body["resource"].as_str()),
        (503, Some("store")),
        "{body}"
    );

    // The server answers again: the node finds out by itself.
    fs.release();
    node_until(node, "an ok store", |v| store_state(v) == "ok").await?;
    let (code, body) = answered(node, "/v1/images", Duration::from_secs(20)).await?;
    assert_eq!(code, 200, "{body}");
    let (code, _) = answered(node, "/healthz", Duration::from_secs(5)).await?;
    assert_eq!(code, 200);
    drop(fs);
    Ok(())
}
