//! Test hosts: a real multi-host shoal cluster on this machine, built on
//! `scripts/cluster` (the same code path a user runs). Each host is a
//! network namespace on a private bridge with its own dockerd and its own
//! `shoal daemon`; the daemons share one store directory. Every cluster has
//! its own state directory (under a temp dir) and a random name prefix, so
//! tests run in parallel; `Drop` runs `scripts/cluster down`, which removes
//! exactly what `up` made. Faults (partition, kill -9 of shoal or dockerd,
//! SIGSTOP of dockerd) go through the same script. See docs/harness.md.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use shoal::client::Client;
use shoal::demo::DemoImage;
use shoal::docker::Engine;
use shoal::model::EnvRecord;
use shoal::peer_auth::{PeerAuth, PeerKeys};

pub use super::wait_for;
use super::{build_image, raw};

/// The script every cluster goes through.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster");

/// One host: its addresses, an API client and a connection to its engine.
pub struct Host {
    /// Node name (also its namespace name).
    pub name: String,
    /// Base URL of its API, `http://IP:PORT`.
    pub api: String,
    /// Its address on the test bridge.
    pub ip: String,
    /// Gossip address, `IP:PORT`.
    pub gossip: String,
    /// Its engine's socket, `unix:///…/docker.sock`.
    pub docker: String,
    /// Network namespace name.
    pub netns: String,
    pub client: Client,
    pub engine: Engine,
    /// Signs node-to-node calls with the cluster's key (`<state>/cluster.key`,
    /// made by `scripts/cluster up`), as the harness's own peer.
    pub auth: Option<Arc<PeerAuth>>,
    /// The operator token `client` sends (`SHOAL_TOKEN=` from `up`).
    pub token: Option<String>,
    /// The cluster key file (`<state>/cluster.key`), when `up` made one.
    pub key: Option<PathBuf>,
}

impl Host {
    /// A client of this host without a token.
    pub fn anonymous(&self) -> Result<Client> {
        Ok(Client::new(&self.api, Duration::from_secs(30))?)
    }

    /// A client of this host as `user` with `role` (`tester`,
    /// `operator`), its token signed with the cluster key.
    pub fn client_as(&self, user: &str, role: &str) -> Result<Client> {
        let key = self.key.as_ref().context("the cluster has no key file")?;
        let t = super::token_with(key, user, role, Duration::from_secs(86400))?;
        Ok(super::bearer(self.anonymous()?, &t))
    }

    /// A client of this host as tester `user`.
    pub fn tester(&self, user: &str) -> Result<Client> {
        self.client_as(user, "tester")
    }

    /// `c` as a signed node-to-node client of this host (what
    /// `x-shoal-local` needs), when the cluster has the harness's key.
    pub fn peer(&self, c: Client) -> Client {
        match &self.auth {
            Some(a) => c.signed(a.clone(), &self.name),
            None => c,
        }
    }

    /// POSTs an environment request here; the status code and body.
    pub async fn request_env(&self, body: Value) -> Result<(u16, Value)> {
        raw(
            &self.client,
            "POST",
            "/v1/environments",
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// Polls an environment through this host until it leaves
    /// pending/loading/starting (at most 120 s).
    pub async fn wait_settled(&self, id: &str) -> Result<EnvRecord> {
        super::settled(&self.client, id, || format!(" at {}", self.name)).await
    }

    /// This node's own records (`x-shoal-local`: not the cluster-wide list).
    pub async fn local_envs(&self) -> Result<Vec<EnvRecord>> {
        Ok(self
            .peer(self.client.clone())
            .with_header("x-shoal-local", "1")
            .get("/v1/environments")
            .await?)
    }

    /// Environment containers on this host's engine, by environment id.
    pub async fn containers(&self) -> Result<Vec<Container>> {
        let mut out = Vec::new();
        for id in self.engine.env_containers(&self.name).await? {
            if let Some(c) = self.engine.container(&id).await? {
                let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
                out.push(Container {
                    id: c.id.clone(),
                    env: label("shoal.env.id"),
                    node: label("shoal.node"),
                    memory: label("shoal.env.memory").parse().unwrap_or(0),
                    aio: label("shoal.env.aio").parse().unwrap_or(0),
                    running: c.running,
                    started_at: c.started_at.clone(),
                });
            }
        }
        Ok(out)
    }
}

/// An environment container as its engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// `shoal.env.id`.
    pub env: String,
    /// `shoal.node`.
    pub node: String,
    pub memory: u64,
    pub aio: u64,
    pub running: bool,
    pub started_at: Option<String>,
}

/// A cluster of hosts; `scripts/cluster down` on drop.
pub struct Hosts {
    pub hosts: Vec<Host>,
    /// The shared store directory.
    pub store: PathBuf,
    /// The cluster's state directory (`SHOAL_CLUSTER_DIR`).
    pub dir: PathBuf,
    pub prefix: String,
    _tmp: tempfile::TempDir,
}

impl Hosts {
    /// Starts `n` hosts, `extra` flags on every daemon.
    pub async fn up(n: usize, extra: &[&str]) -> Result<Hosts> {
        Hosts::up_each(n, extra, &[]).await
    }

    /// Starts `n` hosts: `extra` flags on every daemon, then `each[i]` on
    /// host `i` alone (missing entries: none).
    pub async fn up_each(n: usize, extra: &[&str], each: &[&[&str]]) -> Result<Hosts> {
        Hosts::up_env(n, extra, each, &[]).await
    }

    /// As [`Hosts::up_each`], with settings of `scripts/cluster` in `env`
    /// (`SHOAL_HOST1_STORE_VIEW`, `SHOAL_HOST2_DATA_SIZE`, …).
    pub async fn up_env(
        n: usize,
        extra: &[&str],
        each: &[&[&str]],
        env: &[(&str, &str)],
    ) -> Result<Hosts> {
        let mut plan = Plan::new(n)?;
        plan.extra = extra.iter().map(|s| s.to_string()).collect();
        plan.each = each
            .iter()
            .map(|f| f.iter().map(|s| s.to_string()).collect())
            .collect();
        plan.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan.up().await
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Host index of the node named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    /// Runs `scripts/cluster ARGS…` on this cluster; fails unless it exits 0.
    async fn script(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = tokio::process::Command::new(SCRIPT)
            .args(args)
            .env("SHOAL_CLUSTER_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "scripts/cluster {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Runs `scripts/cluster OP HOST` on this cluster.
    async fn op(&self, op: &str, i: usize) -> Result<()> {
        self.script(&[op, &self.hosts[i].name]).await.map(|_| ())
    }

    /// Partitions host `i` from the other hosts (both ways; the machine,
    /// and so the test, still reaches it).
    pub async fn cut(&self, i: usize) -> Result<()> {
        self.op("cut", i).await
    }

    pub async fn heal(&self, i: usize) -> Result<()> {
        self.op("heal", i).await
    }

    /// Drops host `i`'s outgoing gossip (its HTTP API still works): the
    /// others stop hearing of its changes, and in time declare it dead.
    pub async fn mute(&self, i: usize) -> Result<()> {
        self.op("mute", i).await
    }

    pub async fn unmute(&self, i: usize) -> Result<()> {
        self.op("unmute", i).await
    }

    /// kill -9 of host `i`'s shoal daemon.
    pub async fn kill_shoal(&self, i: usize) -> Result<()> {
        self.op("kill-shoal", i).await
    }

    /// Starts host `i`'s shoal again (same data dir, same arguments) and
    /// waits until it answers.
    pub async fn start_shoal(&self, i: usize) -> Result<()> {
        self.op("start-shoal", i).await
    }

    /// SIGTERM of host `i`'s shoal; waits (30 s) until it has exited.
    pub async fn term_shoal(&self, i: usize) -> Result<()> {
        self.op("term-shoal", i).await
    }

    /// SIGSTOP of host `i`'s shoal: a frozen node (its gossip goes silent,
    /// its API does not answer).
    pub async fn stop_shoal(&self, i: usize) -> Result<()> {
        self.op("stop-shoal", i).await
    }

    pub async fn cont_shoal(&self, i: usize) -> Result<()> {
        self.op("cont-shoal", i).await
    }

    /// kill -9 of host `i`'s dockerd (its containers keep running:
    /// live-restore).
    pub async fn kill_dockerd(&self, i: usize) -> Result<()> {
        self.op("kill-dockerd", i).await
    }

    pub async fn start_dockerd(&self, i: usize) -> Result<()> {
        self.op("start-dockerd", i).await
    }

    /// SIGSTOP of host `i`'s dockerd: the engine hangs.
    pub async fn stop_dockerd(&self, i: usize) -> Result<()> {
        self.op("stop-dockerd", i).await
    }

    pub async fn cont_dockerd(&self, i: usize) -> Result<()> {
        self.op("cont-dockerd", i).await
    }

    /// SIGHUP of host `i`'s shoal: it reads its key file and seal mode
    /// again (returns at once; poll `GET /v1/node` for the result).
    pub async fn hup_shoal(&self, i: usize) -> Result<()> {
        self.op("hup-shoal", i).await
    }

    /// Runs `cmd` in host `i`'s network namespace (`scripts/cluster exec`):
    /// it sends and receives as that host. Fails unless it exits 0.
    pub async fn exec(&self, i: usize, cmd: &[&str]) -> Result<std::process::Output> {
        let mut args = vec!["exec", self.hosts[i].name.as_str()];
        args.extend_from_slice(cmd);
        self.script(&args).await
    }

    /// The test bridge in the root namespace (every frame between hosts
    /// crosses it).
    pub fn bridge(&self) -> String {
        format!("b{}", self.prefix)
    }

    /// Host `i`'s daemon log (every start appends).
    pub fn shoal_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.host_dir(i).join("shoal.log")).unwrap_or_default()
    }

    pub fn dockerd_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.host_dir(i).join("dockerd.log")).unwrap_or_default()
    }

    /// Host `i`'s state directory (`shoal/` is the daemon's data dir).
    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.join("hosts").join(&self.hosts[i].name)
    }

    /// Host `i`'s own view of the store (`SHOAL_HOST<i>_STORE_VIEW`).
    pub fn store_view(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("store")
    }

    /// Host `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("shoal")
    }

    /// Builds `image` on host `i`'s engine and publishes it as `r` through
    /// host `i`'s API into the shared store; the source tag is removed, the
    /// published `shoal/<r>` tag stays on that engine only.
    pub async fn publish(&self, i: usize, r: &str, image: &DemoImage) -> Result<Value> {
        let h = &self.hosts[i];
        let src = format!("{}-src/img:1", r.replace(':', "-"));
        build_image(&h.engine, &src, image).await?;
        let (code, body) = raw(
            &h.client,
            "POST",
            "/v1/images",
            Some(json!({"source": src, "ref": r}).to_string().into_bytes()),
        )
        .await?;
        anyhow::ensure!(code == 201, "publish {r}: {code} {body}");
        h.engine.remove_image(&src).await?;
        Ok(body)
    }

    /// Publishes a small demo image of its own (4 KiB of random bytes on top
    /// of the demo server) through host `i`; returns its ref.
    pub async fn publish_demo(&self, i: usize) -> Result<String> {
        let r = format!("{}-img:1", super::unique("t"));
        let img = DemoImage {
            extra_files: vec![("/marker".into(), super::random_bytes(4096))],
            ..Default::default()
        };
        self.publish(i, &r, &img).await?;
        Ok(r)
    }

    /// Waits until every host named in `alive` sees exactly those nodes
    /// alive (with facts) and the others dead, at most `limit`.
    pub async fn wait_view(&self, alive: &[usize], limit: Duration) -> Result<()> {
        let want: Vec<&str> = alive.iter().map(|&i| self.hosts[i].name.as_str()).collect();
        for &i in alive {
            let h = &self.hosts[i];
            wait_for(limit, || async {
                let v: Value = h.client.get("/v1/cluster").await?;
                let mut seen: Vec<&str> = v["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["alive"] == true && !n["facts"].is_null())
                    .filter_map(|n| n["name"].as_str())
                    .collect();
                seen.sort_unstable();
                let mut w = want.clone();
                w.sort_unstable();
                Ok(seen == w)
            })
            .await
            .with_context(|| format!("view of {}", h.name))?;
        }
        Ok(())
    }

    /// Every environment container of every engine, by host index.
    pub async fn engines(&self) -> Result<Vec<Vec<Container>>> {
        let mut out = Vec::new();
        for h in &self.hosts {
            out.push(h.containers().await?);
        }
        Ok(out)
    }

    /// The tail of every host's daemon log, for a failing test.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for i in 0..self.hosts.len() {
            let log = self.shoal_log(i);
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} ---\n", self.hosts[i].name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// A cluster about to be made: its names and directories are known before
/// `up`, so a test can write a host's files (a config, a key) into its
/// directory first; `down` removes them with the rest.
pub struct Plan {
    pub n: usize,
    /// Flags on every daemon.
    pub extra: Vec<String>,
    /// Flags of host `i` alone (`SHOAL_HOST<i>_FLAGS`; missing entries: none).
    pub each: Vec<Vec<String>>,
    /// Hosts whose shoal `up` does not start (`SHOAL_HOST<i>_DEFER`): the
    /// others converge without them; [`Hosts::start_shoal`] starts one later.
    pub defer: Vec<usize>,
    /// More settings of `scripts/cluster` (`SHOAL_HOST<i>_STORE_VIEW`, …).
    pub env: Vec<(String, String)>,
    pub dir: PathBuf,
    pub prefix: String,
    tmp: tempfile::TempDir,
}

impl Plan {
    pub fn new(n: usize) -> Result<Plan> {
        let tmp = tempfile::tempdir()?;
        Ok(Plan {
            n,
            extra: Vec::new(),
            each: Vec::new(),
            defer: Vec::new(),
            env: Vec::new(),
            dir: tmp.path().join("cluster"),
            prefix: super::unique("h").chars().take(7).collect(),
            tmp,
        })
    }

    /// Host `i`'s node name (and namespace).
    pub fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Host `i`'s state directory, made here (as [`Hosts::host_dir`]).
    pub fn host_dir(&self, i: usize) -> Result<PathBuf> {
        let d = self.dir.join("hosts").join(self.name(i));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// `scripts/cluster up`.
    pub async fn up(self) -> Result<Hosts> {
        let Plan {
            n,
            extra,
            each,
            defer,
            env,
            dir,
            prefix,
            tmp,
        } = self;
        let mut cmd = tokio::process::Command::new(SCRIPT);
        cmd.args(["up", &n.to_string(), "--prefix", &prefix, "--"])
            .args(&extra)
            .env("SHOAL_CLUSTER_DIR", &dir)
            .env("SHOAL_BIN", env!("CARGO_BIN_EXE_shoal"))
            .stdin(Stdio::null());
        for (i, flags) in each.iter().enumerate() {
            cmd.env(format!("SHOAL_HOST{i}_FLAGS"), flags.join(" "));
        }
        for i in &defer {
            cmd.env(format!("SHOAL_HOST{i}_DEFER"), "1");
        }
        cmd.envs(env);
        let out = cmd.output().await.context("running scripts/cluster up")?;
        // From here the cluster exists (or was removed by a failing `up`):
        // the guard takes it down whatever happens next.
        let mut hosts = Hosts {
            hosts: Vec::new(),
            store: dir.join("store"),
            dir,
            prefix,
            _tmp: tmp,
        };
        if !out.status.success() {
            bail!(
                "scripts/cluster up {n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let key = hosts.dir.join("cluster.key");
        let auth = if key.exists() {
            let keyring = shoal::keyring::Keyring::load(&key)?;
            Some(Arc::new(PeerAuth::new(
                "harness",
                PeerKeys::from_keyring(&keyring),
            )))
        } else {
            None
        };
        let stdout = String::from_utf8(out.stdout)?;
        // The last line is `SHOAL_TOKEN=<operator token>`, after the hosts.
        let token = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("SHOAL_TOKEN="))
            .next_back()
            .map(str::to_string);
        anyhow::ensure!(
            stdout
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("SHOAL_TOKEN=")),
            "scripts/cluster up printed no SHOAL_TOKEN= last line"
        );
        let key_file = key.exists().then_some(key.clone());
        for line in stdout.lines().filter(|l| l.starts_with("name=")) {
            let mut h = parse_line(line, auth.clone(), token.clone()).await?;
            h.key = key_file.clone();
            hosts.hosts.push(h);
        }
        anyhow::ensure!(hosts.hosts.len() == n, "expected {n} host lines");
        Ok(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs_tail(40));
        }
        // Bounded: `down` gives every process a few seconds; past two
        // minutes something is wrong and the test says so.
        let child = std::process::Command::new(SCRIPT)
            .arg("down")
            .env("SHOAL_CLUSTER_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("scripts/cluster down could not start");
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return,
                Ok(Some(st)) => {
                    eprintln!("scripts/cluster down: {st}");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    eprintln!("scripts/cluster down did not finish in 120 s");
                    return;
                }
            }
        }
    }
}

/// Parses one `name=… api=… gossip=… docker=… netns=…` line.
async fn parse_line(
    line: &str,
    auth: Option<Arc<PeerAuth>>,
    token: Option<String>,
) -> Result<Host> {
    let kv: HashMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    let get = |k: &str| -> Result<String> {
        kv.get(k)
            .map(|s| s.to_string())
            .with_context(|| format!("no {k}= in {line:?}"))
    };
    let api = get("api")?;
    let ip = api
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .context("api address")?;
    let docker = get("docker")?;
    let mut client = Client::new(&api, Duration::from_secs(30))?;
    if let Some(t) = &token {
        client = super::bearer(client, t);
    }
    Ok(Host {
        name: get("name")?,
        client,
        token,
        key: None,
        engine: Engine::connect_at(&docker).await?,
        api,
        ip,
        gossip: get("gossip")?,
        docker,
        netns: get("netns")?,
        auth,
    })
}
