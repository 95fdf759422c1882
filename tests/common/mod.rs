//! Test harness: real `shoal daemon` processes on loopback ports chosen at
//! run time, against the real Docker engine, with images built locally
//! (FROM scratch plus the static demo server). Every test names its own
//! node and images with a random prefix, and the guards remove exactly the
//! containers, images and processes the test made.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use shoal::client::Client;
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::model::EnvRecord;

/// A random lowercase prefix that keeps this test's names apart.
pub fn unique(prefix: &str) -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(8);
    format!("{prefix}{id}")
}

/// A running daemon process.
pub struct Node {
    pub name: String,
    /// UDP gossip address.
    pub gossip: String,
    pub dir: PathBuf,
    pub store: PathBuf,
    pub args: Vec<String>,
    /// Extra environment of the daemon process (e.g. [`faketime`]).
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub url: String,
    /// An operator's client of this node (its token from the node's key).
    pub client: Client,
    /// The operator token `client` sends (`None`: no key file found).
    pub token: Option<String>,
}

/// A token for `user` with `role` (`"tester"` / `"operator"`), signed with
/// the key file at `key`, valid for `ttl`.
pub fn token_with(key: &Path, user: &str, role: &str, ttl: Duration) -> Result<String> {
    let keyring = shoal::keyring::Keyring::load(key)?;
    let (t, _) = shoal::auth::issue(&keyring, user, role.parse()?, ttl, shoal::auth::now_secs())?;
    Ok(t)
}

/// `client`, sending `Authorization: Bearer <token>`.
pub fn bearer(client: Client, token: &str) -> Client {
    client.with_header("authorization", &format!("Bearer {token}"))
}

/// The user name the harness's operator tokens carry.
pub const HARNESS_OPERATOR: &str = "ops@harness";

/// The cluster key file of the nodes sharing `store` (created on first use,
/// mode 0600, next to the store), as a `--cluster-key` argument.
pub fn cluster_key_for(store: &Path) -> Result<String> {
    let name = store
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    let path = store.with_file_name(format!("{name}.cluster.key"));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    shoal::keyring::Keyring::load_or_create(&path)?;
    Ok(path.display().to_string())
}

impl Node {
    /// Starts a node named `name` with its own data dir, the given store and
    /// extra flags, and waits until it answers.
    pub async fn start(name: &str, dir: &Path, store: &Path, extra: &[&str]) -> Result<Node> {
        Node::start_with_env(name, dir, store, extra, Vec::new()).await
    }

    /// Like [`Node::start`], with more environment for the daemon process.
    pub async fn start_with_env(
        name: &str,
        dir: &Path,
        store: &Path,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Result<Node> {
        let listen = match extra.iter().position(|a| *a == "--listen") {
            Some(i) => extra[i + 1].to_string(),
            None => "127.0.0.1:0".into(),
        };
        let mut args: Vec<String> = vec![
            "daemon".into(),
            "--name".into(),
            name.into(),
            "--listen".into(),
            listen,
            "--data-dir".into(),
            dir.display().to_string(),
            "--store".into(),
            store.display().to_string(),
            "--publish-addr".into(),
            "127.0.0.1".into(),
        ];
        let gossip = match extra.iter().position(|a| *a == "--gossip") {
            Some(i) => extra[i + 1].to_string(),
            None => {
                let g = format!("127.0.0.1:{}", free_udp_port()?);
                args.extend(["--gossip".into(), g.clone()]);
                g
            }
        };
        if !extra.contains(&"--cluster-id") {
            // A cluster of its own, so parallel tests never meet.
            args.extend(["--cluster-id".into(), format!("c-{name}")]);
        }
        // A node given a config file takes its gossip security from it.
        let keyed = [
            "--cluster-key",
            "--insecure-gossip",
            "--gossip-seal",
            "--config",
        ];
        if !extra.iter().any(|a| keyed.contains(a)) {
            // Nodes sharing a store are one cluster: they share its key.
            args.extend(["--cluster-key".into(), cluster_key_for(store)?]);
        }
        if !extra.contains(&"--ready-timeout") {
            args.extend(["--ready-timeout".into(), "60s".into()]);
        }
        let mut skip_value = false;
        for a in extra {
            // `--listen` is already in place.
            if std::mem::take(&mut skip_value) {
                continue;
            }
            if *a == "--listen" {
                skip_value = true;
                continue;
            }
            args.push(a.to_string());
        }
        let mut node = Node {
            name: name.into(),
            gossip,
            dir: dir.into(),
            store: store.into(),
            args,
            env,
            child: None,
            url: String::new(),
            client: Client::new("http://127.0.0.1:1", Duration::from_secs(30))?,
            token: None,
        };
        node.spawn().await?;
        Ok(node)
    }

    /// (Re)starts the process with the same arguments.
    pub async fn spawn(&mut self) -> Result<()> {
        let addr_file = self.dir.join("http-addr");
        let _ = std::fs::remove_file(&addr_file);
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "shoal=debug,warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning shoal daemon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                self.url = format!("http://{}", addr.trim());
                self.token = match self.key_file() {
                    Some(k) => Some(token_with(
                        &k,
                        HARNESS_OPERATOR,
                        "operator",
                        Duration::from_secs(86400),
                    )?),
                    None => None,
                };
                self.client = self.anonymous()?;
                if let Some(t) = &self.token {
                    self.client = bearer(self.client.clone(), t);
                }
                if self.client.get::<Value>("/v1/node").await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("daemon exited with {status}: {}", self.log());
            }
            if Instant::now() > deadline {
                bail!("daemon did not come up: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The key file this node signs tokens with: its `--cluster-key`, or
    /// `<data_dir>/cluster.key` (created by a node without one).
    pub fn key_file(&self) -> Option<PathBuf> {
        if let Some(i) = self.args.iter().position(|a| a == "--cluster-key") {
            return self.args.get(i + 1).map(PathBuf::from);
        }
        let own = self.dir.join("cluster.key");
        own.exists().then_some(own)
    }

    /// A client of this node without a token.
    pub fn anonymous(&self) -> Result<Client> {
        Ok(Client::new(&self.url, Duration::from_secs(30))?)
    }

    /// A client of this node as `user` with `role` (`tester`, `operator`).
    pub fn client_as(&self, user: &str, role: &str) -> Result<Client> {
        let key = self.key_file().context("the node has no key file")?;
        let t = token_with(&key, user, role, Duration::from_secs(86400))?;
        Ok(bearer(self.anonymous()?, &t))
    }

    /// A client of this node as tester `user`.
    pub fn tester(&self, user: &str) -> Result<Client> {
        self.client_as(user, "tester")
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("daemon ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// POSTs an environment request; returns the status code and body.
    pub async fn request_env(&self, body: Value) -> Result<(u16, Value)> {
        raw(
            &self.client,
            "POST",
            "/v1/environments",
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// Polls an environment until it leaves pending/loading/starting.
    pub async fn wait_settled(&self, id: &str) -> Result<EnvRecord> {
        settled(&self.client, id, || format!(": {}", self.log())).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The environment that runs a process with its clock `offset` off
/// (libfaketime, Debian's `faketime` package, e.g. `"-10m"`). Preloaded in
/// the daemon itself (the `faketime` command forks, so its pid would not
/// be the daemon's); only the wall clock moves.
pub fn faketime(offset: &str) -> Result<Vec<(String, String)>> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .context("libfaketime not found: run scripts/ensure-tools (Debian package faketime)")?;
    Ok(vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
    ])
}

/// A UDP port free right now on 127.0.0.1.
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sends a request and returns the status code and JSON body (or the text
/// as a JSON string when the body is not JSON).
pub async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Value)> {
    let (status, bytes) = client.send_raw(method.parse().unwrap(), path, body).await?;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status.as_u16(), v))
}

/// Removes, on drop, every container labelled with the given node names and
/// every image tag this test made. Runs its own runtime so it can be dropped
/// anywhere.
pub struct Cleanup {
    pub nodes: Vec<String>,
    pub images: Vec<String>,
    /// Containers by name (build installers).
    pub containers: Vec<String>,
}

impl Cleanup {
    pub fn new() -> Cleanup {
        Cleanup {
            nodes: Vec::new(),
            images: Vec::new(),
            containers: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        let images = std::mem::take(&mut self.images);
        let containers = std::mem::take(&mut self.containers);
        let work = async move {
            let Ok(engine) = Engine::connect().await else {
                return;
            };
            // Twice: a create or load the killed daemons had in flight is
            // finished by the engine after they are gone.
            for pass in 0..2 {
                if pass == 1 {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                for n in &nodes {
                    for c in engine.env_containers(n).await.unwrap_or_default() {
                        let _ = engine.remove_container(&c).await;
                    }
                }
                for c in &containers {
                    let _ = engine.remove_container(c).await;
                }
                for i in &images {
                    let _ = engine.remove_image(i).await;
                }
            }
        };
        // Drop may run inside a tokio runtime: do the work on a fresh thread.
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(work);
        })
        .join()
        .ok();
    }
}

/// One daemon of its own on the real engine: a unique name, a fresh data
/// dir and store under `dir`, and the guard that removes what it made.
pub struct Solo {
    pub engine: Engine,
    pub dir: tempfile::TempDir,
    pub name: String,
    pub cleanup: Cleanup,
    pub node: Node,
}

/// Starts a [`Solo`] node named `<prefix><random>` with extra flags.
pub async fn solo(prefix: &str, extra: &[&str]) -> Result<Solo> {
    let engine = Engine::connect().await?;
    let dir = tempfile::tempdir()?;
    let name = unique(prefix);
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    let node = Node::start(
        &name,
        &dir.path().join("node"),
        &dir.path().join("store"),
        extra,
    )
    .await?;
    Ok(Solo {
        engine,
        dir,
        name,
        cleanup,
        node,
    })
}

/// Builds a test image from a demo build context and returns its tag.
pub async fn build_image(engine: &Engine, tag: &str, image: &DemoImage) -> Result<String> {
    engine
        .build(
            image.context_tar(),
            tag,
            Default::default(),
            Default::default(),
        )
        .await
        .with_context(|| format!("building {tag}"))?;
    Ok(tag.to_string())
}

/// Builds `image` as a source tag, publishes it as `r` through the node's
/// API and removes the source tag; both tags are registered for cleanup.
pub async fn publish_one(
    node: &Node,
    engine: &Engine,
    r: &str,
    image: &DemoImage,
    cleanup: &mut Cleanup,
) -> Result<Value> {
    let src = format!("{}-src/img:1", r.replace(':', "-"));
    cleanup.images.push(src.clone());
    cleanup.images.push(format!("shoal/{r}"));
    build_image(engine, &src, image).await?;
    let (code, body) = raw(
        &node.client,
        "POST",
        "/v1/images",
        Some(
            serde_json::json!({"source": src, "ref": r})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    anyhow::ensure!(code == 201, "publish {r}: {code} {body}");
    engine.remove_image(&src).await?;
    Ok(body)
}

/// Random bytes, so a test's layers are its own.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// GETs `http://host:port/` and returns the body.
pub async fn http_get(host: &str, port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    Ok(out)
}
pub mod browser;
pub mod checker;
pub mod hosts;
pub mod smtp;

/// Polls `check` until it returns true, at most `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(true) = check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls environment `id` through `client` until it leaves
/// pending/loading/starting (at most 120 s); `context` adds to the error.
pub async fn settled(client: &Client, id: &str, context: impl Fn() -> String) -> Result<EnvRecord> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rec: EnvRecord = client.get(&format!("/v1/environments/{id}")).await?;
        if !matches!(rec.status.as_str(), "pending" | "loading" | "starting") {
            return Ok(rec);
        }
        if Instant::now() > deadline {
            bail!("environment {id} stuck in {}{}", rec.status, context());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A chitchat 0.11.1 Ack carrying one key-value for `node` (name,
/// generation, gossip port: chitchat applies deltas to known members only)
/// at IPv4 `ip`, built byte by byte (magic, protocol version, type, then
/// the delta as a block stream): the forgeries of `gossip_seal.rs` and
/// `rogue.rs`.
pub fn forged_ack(key: &str, node: (&str, u64, u16), ip: [u8; 4]) -> Vec<u8> {
    fn str16(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u16).to_le_bytes());
        b.extend(s.as_bytes());
    }
    let mut ops = vec![0u8]; // node op
    str16(&mut ops, node.0);
    ops.extend(node.1.to_le_bytes()); // generation
    ops.push(4); // IPv4
    ops.extend(ip);
    ops.extend(node.2.to_le_bytes());
    ops.extend(0u64.to_le_bytes()); // last gc version
    ops.extend(0u64.to_le_bytes()); // from version
    ops.push(1u8); // key-value op
    str16(&mut ops, key);
    str16(&mut ops, "x");
    ops.extend(1_000_000u64.to_le_bytes()); // a version newer than any
    ops.push(0); // set
    let mut b = Vec::new();
    b.extend(45_139u16.to_le_bytes());
    b.push(0); // protocol version
    b.push(2); // Ack
    b.push(2); // uncompressed block
    b.extend((ops.len() as u16).to_le_bytes());
    b.extend(ops);
    b.push(0); // no more blocks
    b
}

/// Writes an lz4 file of `size` bytes that are not the layer's.
pub fn corrupt_layer(path: &Path, size: u64) -> Result<()> {
    let mut bytes = random_bytes(size as usize);
    bytes[0] ^= 1;
    let f = std::fs::File::create(path)?;
    let mut enc = lz4::EncoderBuilder::new().build(f)?;
    std::io::Write::write_all(&mut enc, &bytes)?;
    let (_, res) = enc.finish();
    res?;
    Ok(())
}
