//! The `shoal` binary: `shoal daemon` runs a node; every other subcommand
//! is a client of some node's HTTP API (`--node URL` or `SHOAL_NODE`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use shoal::client::Client;
use shoal::config::Config;
use shoal::model::{EnvRecord, EnvStatus, ImageInfo, NodeInfo};
use shoal::units::format_size;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Ready-to-use test environments on a rack of container hosts"
)]
struct Cli {
    /// The node to talk to (client subcommands).
    #[arg(
        long,
        global = true,
        env = "SHOAL_NODE",
        default_value = "http://127.0.0.1:7070"
    )]
    node: String,
    /// The user token client subcommands send (`Authorization: Bearer`;
    /// `shoal token issue`).
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run this machine's node. With no arguments: a single node on this
    /// machine, HTTP on 127.0.0.1:7070, state under ./.shoal.
    Daemon(Box<DaemonArgs>),
    /// Publish an image of the node's engine as `name:build`.
    Publish {
        /// Image in the node's Docker engine (tag or id).
        source: String,
        /// `name:build` to publish it as.
        image_ref: String,
    },
    /// List published builds.
    Images {
        #[arg(long)]
        json: bool,
    },
    /// Request an environment of a published build.
    Create {
        /// `name:build`.
        image: String,
        /// Who it is for (an email address). Default: the token's user;
        /// only operators may name someone else.
        #[arg(long)]
        owner: Option<String>,
        /// Memory, e.g. `32GiB` (at least what the image states).
        #[arg(long)]
        memory: Option<String>,
        /// AIO contexts (at least what the image states).
        #[arg(long)]
        aio: Option<u64>,
        /// Environment variables, `KEY=VALUE`, repeatable.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Wait until it is ready (or failed) and print it then.
        #[arg(long)]
        wait: bool,
    },
    /// List environments.
    Envs {
        #[arg(long)]
        json: bool,
    },
    /// Show one environment.
    Env { id: String },
    /// Delete an environment (stops and removes its container).
    Delete { id: String },
    /// Push an environment's expiry back (up to the node's max_ttl).
    Extend {
        id: String,
        /// How much longer, e.g. `4h`.
        #[arg(long, default_value = "4h")]
        by: String,
    },
    /// Follow an environment's changes as they happen (server-sent events;
    /// one JSON record per line) until it is deleted.
    Events { id: String },
    /// Every node this node knows, alive or dead, with its facts (the
    /// seed's `fleetctl list-machines`).
    Cluster {
        #[arg(long)]
        json: bool,
    },
    /// Where a request would be placed and why, placing nothing.
    Placement {
        /// `name:build`.
        image: String,
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        aio: Option<u64>,
        /// Node labels required, `KEY=VALUE`, repeatable.
        #[arg(long = "constraint", value_name = "KEY=VALUE")]
        constraints: Vec<String>,
    },
    /// The node's background workers: running, stopped, or failed.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Show the node's facts and limits.
    Node {
        #[arg(long)]
        json: bool,
    },
    /// List the builds the build nodes know (queued, building, published,
    /// failed, pruned).
    Builds {
        #[arg(long)]
        json: bool,
    },
    /// Print a build's log.
    BuildLog { product: String, build: String },
    /// Cluster keys (local; talks to no node).
    #[command(subcommand)]
    Key(KeyCmd),
    /// User tokens: issue (local, with the cluster key) and revoke.
    #[command(subcommand)]
    Token(TokenCmd),
}

/// Where the cluster key is: `--data-dir DIR` (`DIR/cluster.key`, what a
/// node without `cluster_key` uses) or `--cluster-key FILE`.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct KeySource {
    /// A node's data directory: its `cluster.key` (and, for revoke, its
    /// `revoked.json`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The cluster key file.
    #[arg(long)]
    cluster_key: Option<PathBuf>,
}

impl KeySource {
    fn keyring(&self) -> Result<shoal::keyring::Keyring> {
        let path = match (&self.data_dir, &self.cluster_key) {
            (Some(d), _) => d.join("cluster.key"),
            (_, Some(k)) => k.clone(),
            _ => bail!("give --data-dir or --cluster-key"),
        };
        shoal::keyring::Keyring::load(&path)
            .with_context(|| format!("reading the cluster key {}", path.display()))
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a token: the token on the last line of stdout, its id and
    /// expiry on stderr. Any node with the same cluster key accepts it.
    Issue {
        #[command(flatten)]
        key: KeySource,
        /// Who it is for (a mail address).
        #[arg(long)]
        user: String,
        /// tester or operator.
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. `90d`, `8h` (at most 5 years).
        #[arg(long, default_value = "90d")]
        ttl: String,
    },
    /// Revoke a token (the token or its id) on every node. With
    /// `--data-dir`: written to that node's `revoked.json` (the node reads
    /// it within a second and gossips it). With `--cluster-key`: sent to
    /// the node at `--node` (`POST /v1/tokens/revoke`).
    Revoke {
        #[command(flatten)]
        key: KeySource,
        /// The token, or its 16-hex-digit id.
        token_or_id: String,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Print a new cluster key line: `shoal key generate > FILE`, then
    /// `chmod 600 FILE` and give the same file to every node
    /// (`--cluster-key FILE`). Appending the line to an existing key file
    /// adds a secondary key (rotation: docs/security.md).
    Generate,
}

#[derive(Args)]
struct DaemonArgs {
    /// TOML config file (see docs/config.md); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Publish the embedded demo image as `demo:1` at start if missing.
    #[arg(long)]
    demo: bool,
    #[arg(long)]
    name: Option<String>,
    /// HTTP API address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Image store directory (an NFS mount in production).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Memory environments may take in all, e.g. `240GiB`.
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    memory_reserve: Option<String>,
    /// Most environments at once.
    #[arg(long)]
    max_envs: Option<u32>,
    #[arg(long)]
    default_memory: Option<String>,
    /// Host address environment ports are published on.
    #[arg(long)]
    publish_addr: Option<IpAddr>,
    /// Host name put in endpoints.
    #[arg(long)]
    advertise_host: Option<String>,
    /// How long a start may take to become ready, e.g. `5m`.
    #[arg(long)]
    ready_timeout: Option<String>,
    #[arg(long)]
    cluster_id: Option<String>,
    /// Gossip (UDP) listen address.
    #[arg(long)]
    gossip: Option<SocketAddr>,
    /// Gossip address other nodes reach this one at.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Gossip address of an existing member, repeatable.
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// Cluster key file (mode 0600; `shoal key generate`). Default without
    /// seeds: <data_dir>/cluster.key, created on first start.
    #[arg(long)]
    cluster_key: Option<PathBuf>,
    /// Gossip sealing: required (default), transitional, off.
    #[arg(long)]
    gossip_seal: Option<String>,
    /// Allow unsealed gossip (seeds without a cluster key, or --gossip-seal off).
    #[arg(long)]
    insecure_gossip: bool,
    /// slave, build, master or test; repeatable. Default: all.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// One gossip round every this often, e.g. `500ms`.
    #[arg(long)]
    gossip_interval: Option<String>,
    /// Failure detector threshold (phi); higher waits longer.
    #[arg(long)]
    phi_threshold: Option<u32>,
    /// How long a dead node stays listed, e.g. `1h`.
    #[arg(long)]
    dead_node_grace: Option<String>,
    /// Build watcher: drop directory of `<product>/<build-id>/` builds.
    #[arg(long)]
    drop: Option<PathBuf>,
    /// Build watcher: recipes directory (`<product>/Dockerfile`).
    #[arg(long)]
    recipes: Option<PathBuf>,
    /// Published builds kept per product (default 7).
    #[arg(long)]
    keep: Option<u32>,
    /// File that marks a build directory complete (default BUILD_COMPLETE).
    #[arg(long)]
    build_marker: Option<String>,
    /// Drop directory rescan interval, e.g. `30s`.
    #[arg(long)]
    build_rescan: Option<String>,
    /// Builds run at once (default 1).
    #[arg(long)]
    build_concurrency: Option<u32>,
    /// Longest a build may take, e.g. `1h`.
    #[arg(long)]
    build_timeout: Option<String>,
    /// Layer files younger than this are never pruned, e.g. `10m`.
    #[arg(long)]
    prune_grace: Option<String>,
    /// How often unpublished `shoal/*` images are removed from the engine.
    #[arg(long)]
    image_gc_interval: Option<String>,
    /// Reservation length when a request names none, e.g. `24h`.
    #[arg(long)]
    default_ttl: Option<String>,
    /// Longest reservation, and how far ahead an extension may reach.
    #[arg(long)]
    max_ttl: Option<String>,
    /// Mail the owner this long before expiry, e.g. `1h`.
    #[arg(long)]
    expiry_warning: Option<String>,
    /// Mail server: smtp://host:port, smtp+starttls://…, smtps://…
    #[arg(long)]
    smtp: Option<String>,
    /// Sender address of mails.
    #[arg(long)]
    mail_from: Option<String>,
    /// Base URL of this node's web page, for links in mails.
    #[arg(long)]
    public_url: Option<String>,
    /// Web page: header the lab's reverse proxy names the user in
    /// (`X-Forwarded-User`), believed from `--trusted-proxy` only.
    #[arg(long)]
    trusted_user_header: Option<String>,
    /// Address of a reverse proxy the trusted header is believed from;
    /// repeatable.
    #[arg(long = "trusted-proxy")]
    trusted_proxies: Vec<IpAddr>,
    /// Catalog and cluster reads (`GET /v1/images*`, `/v1/cluster`,
    /// `/v1/node`) without a token.
    #[arg(long)]
    open_read: bool,
}

impl DaemonArgs {
    fn to_config(&self) -> Result<Config> {
        let labels = if self.labels.is_empty() {
            None
        } else {
            Some(parse_kv(&self.labels, "--label")?)
        };
        Ok(Config {
            name: self.name.clone(),
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            store: self.store.clone(),
            memory: self.memory.clone(),
            memory_reserve: self.memory_reserve.clone(),
            max_envs: self.max_envs,
            default_memory: self.default_memory.clone(),
            publish_addr: self.publish_addr,
            advertise_host: self.advertise_host.clone(),
            ready_timeout: self.ready_timeout.clone(),
            cluster_id: self.cluster_id.clone(),
            gossip: self.gossip,
            advertise: self.advertise,
            seeds: (!self.seeds.is_empty()).then(|| self.seeds.clone()),
            cluster_key: self.cluster_key.clone(),
            gossip_seal: self.gossip_seal.clone(),
            insecure_gossip: self.insecure_gossip.then_some(true),
            roles: (!self.roles.is_empty()).then(|| self.roles.clone()),
            labels,
            gossip_interval: self.gossip_interval.clone(),
            phi_threshold: self.phi_threshold,
            dead_node_grace: self.dead_node_grace.clone(),
            drop: self.drop.clone(),
            recipes: self.recipes.clone(),
            keep: self.keep,
            build_marker: self.build_marker.clone(),
            build_rescan: self.build_rescan.clone(),
            build_concurrency: self.build_concurrency,
            build_timeout: self.build_timeout.clone(),
            prune_grace: self.prune_grace.clone(),
            image_gc_interval: self.image_gc_interval.clone(),
            default_ttl: self.default_ttl.clone(),
            max_ttl: self.max_ttl.clone(),
            expiry_warning: self.expiry_warning.clone(),
            smtp: self.smtp.clone(),
            mail_from: self.mail_from.clone(),
            public_url: self.public_url.clone(),
            trusted_user_header: self.trusted_user_header.clone(),
            trusted_proxies: (!self.trusted_proxies.is_empty())
                .then(|| self.trusted_proxies.clone()),
            open_read: self.open_read.then_some(true),
        })
    }
}

fn parse_kv(items: &[String], flag: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{flag} {kv}: expected KEY=VALUE"))
        })
        .collect()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "shoal=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Daemon(args) => daemon(*args).await,
            Cmd::Key(KeyCmd::Generate) => {
                print!("{}", shoal::keyring::Keyring::generate_line());
                Ok(())
            }
            Cmd::Token(t) => token_cmd(&cli.node, t).await,
            cmd => client_cmd(&cli.node, cli.token.as_deref(), cmd).await,
        }
    })
}

async fn daemon(args: DaemonArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    let config = file.overlay(args.to_config()?);
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let settings = config.resolve(shoal::host::total_memory(), &hostname)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    // SIGHUP re-reads the config file with the same flags on top; the
    // daemon takes the cluster key and gossip_seal from it (docs/security.md).
    let reload = {
        let (path, flags, hostname) = (args.config.clone(), args.to_config()?, hostname.clone());
        shoal::daemon::Reloader(std::sync::Arc::new(move || {
            let file = match &path {
                Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
                None => Config::default(),
            };
            file.overlay(flags.clone())
                .resolve(shoal::host::total_memory(), &hostname)
                .map_err(|e| e.to_string())
        }))
    };
    let opts = shoal::daemon::RunOptions {
        demo: args.demo,
        reload: Some(reload),
    };
    shoal::daemon::run(settings, listener, opts, shoal::daemon::shutdown_signal()).await?;
    Ok(())
}

fn fmt_unix(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(fmt_time)
        .unwrap_or_else(|_| secs.to_string())
}

async fn token_cmd(node: &str, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Issue {
            key,
            user,
            role,
            ttl,
        } => {
            let keyring = key.keyring()?;
            let role: shoal::auth::Role = role.parse()?;
            let ttl = shoal::units::parse_duration(&ttl).context("--ttl")?;
            let (token, claims) =
                shoal::auth::issue(&keyring, &user, role, ttl, shoal::auth::now_secs())?;
            eprintln!(
                "token {} for {} ({}), expires {}",
                claims.tid,
                claims.sub,
                claims.role.as_str(),
                fmt_unix(claims.exp)
            );
            println!("{token}");
        }
        TokenCmd::Revoke { key, token_or_id } => {
            let now = shoal::auth::now_secs();
            let (id, until) = shoal::auth::revocation_of(&token_or_id, now)
                .context("not a shoal token nor a token id (16 hex digits)")?;
            if let Some(dir) = &key.data_dir {
                let mut r = shoal::auth::Revocations::default();
                anyhow::ensure!(r.insert(&id, until, now), "the revocation list is full");
                r.save_merged(&shoal::auth::revoked_file(dir), now)?;
                eprintln!(
                    "revoked {id} in {} (the node reads it within a second)",
                    dir.display()
                );
            } else {
                // A short operator token of our own, for this one call.
                let keyring = key.keyring()?;
                let (token, _) = shoal::auth::issue(
                    &keyring,
                    "shoal-token-revoke",
                    shoal::auth::Role::Operator,
                    Duration::from_secs(60),
                    now,
                )?;
                let client = Client::new(node, Duration::from_secs(30))?
                    .with_header("authorization", &format!("Bearer {token}"));
                let r: shoal::model::Revoked = client
                    .post("/v1/tokens/revoke", &json!({"token": token_or_id}))
                    .await?;
                eprintln!(
                    "revoked {} on {node} (every node refuses it within a few seconds)",
                    r.id
                );
            }
            println!("{id}");
        }
    }
    Ok(())
}

async fn client_cmd(node: &str, token: Option<&str>, cmd: Cmd) -> Result<()> {
    let mut client = Client::new(node, Duration::from_secs(600))?;
    if let Some(t) = token {
        client = client.with_header("authorization", &format!("Bearer {}", t.trim()));
    }
    match cmd {
        Cmd::Daemon(_) | Cmd::Key(_) | Cmd::Token(_) => unreachable!("handled in main"),
        Cmd::Publish { source, image_ref } => {
            let img: ImageInfo = client
                .post("/v1/images", &json!({"source": source, "ref": image_ref}))
                .await?;
            println!(
                "published {} ({} layers, {} uncompressed, {} in the store)",
                img.image_ref,
                img.layers,
                format_size(img.size),
                format_size(img.compressed_size)
            );
        }
        Cmd::Images { json } => {
            let list: Vec<ImageInfo> = client.get("/v1/images").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows = list
                    .iter()
                    .map(|i| {
                        vec![
                            i.image_ref.clone(),
                            format_size(i.size),
                            format_size(i.compressed_size),
                            i.layers.to_string(),
                            i.requirements.memory.map(format_size).unwrap_or("-".into()),
                            i.requirements.aio.to_string(),
                            fmt_time(i.published_at),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "REF",
                        "SIZE",
                        "STORED",
                        "LAYERS",
                        "MEMORY",
                        "AIO",
                        "PUBLISHED",
                    ],
                    rows,
                );
            }
        }
        Cmd::Create {
            image,
            owner,
            memory,
            aio,
            env,
            wait,
        } => {
            let mut body = json!({"image": image});
            if let Some(o) = owner {
                body["owner"] = json!(o);
            }
            if let Some(m) = memory {
                body["memory"] = json!(m);
            }
            if let Some(a) = aio {
                body["aio"] = json!(a);
            }
            if !env.is_empty() {
                body["env"] = json!(parse_kv(&env, "--env")?);
            }
            let mut rec: EnvRecord = client.post("/v1/environments", &body).await?;
            if wait {
                while matches!(
                    rec.status,
                    EnvStatus::Pending | EnvStatus::Loading | EnvStatus::Starting
                ) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    rec = client.get(&format!("/v1/environments/{}", rec.id)).await?;
                }
            }
            print_env(&rec);
            if rec.status == EnvStatus::Failed {
                bail!("environment {} failed", rec.id);
            }
        }
        Cmd::Envs { json } => {
            let list: Vec<EnvRecord> = client.get("/v1/environments").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows = list
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.clone(),
                            e.image.to_string(),
                            e.owner.clone(),
                            e.node.clone(),
                            e.status.to_string(),
                            format_size(e.memory),
                            e.endpoints
                                .iter()
                                .map(|p| p.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "IMAGE",
                        "OWNER",
                        "NODE",
                        "STATUS",
                        "MEMORY",
                        "ENDPOINTS",
                    ],
                    rows,
                );
            }
        }
        Cmd::Env { id } => {
            let rec: EnvRecord = client.get(&format!("/v1/environments/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&rec)?);
        }
        Cmd::Extend { id, by } => {
            let rec: EnvRecord = client
                .post(&format!("/v1/environments/{id}/extend"), &json!({"by": by}))
                .await?;
            let when = rec.expires_at.map_or_else(|| "never".to_string(), fmt_time);
            println!("{} expires {when}", rec.id);
        }
        Cmd::Events { id } => {
            let mut streaming = Client::new(node, Duration::from_secs(30))?;
            if let Some(t) = token {
                streaming = streaming.with_header("authorization", &format!("Bearer {}", t.trim()));
            }
            let mut pending = String::new();
            streaming
                .stream(&format!("/v1/environments/{id}/events"), |chunk| {
                    pending.push_str(&String::from_utf8_lossy(chunk));
                    while let Some(end) = pending.find('\n') {
                        let line: String = pending.drain(..=end).collect();
                        if let Some(data) = line.trim_end().strip_prefix("data:") {
                            println!("{}", data.trim());
                        }
                    }
                })
                .await?;
        }
        Cmd::Delete { id } => {
            let rec: EnvRecord = client.delete(&format!("/v1/environments/{id}")).await?;
            println!("{} {}", rec.id, rec.status);
        }
        Cmd::Cluster { json } => {
            let v: serde_json::Value = client.get("/v1/cluster").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let empty = vec![];
            let rows = v["nodes"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|n| {
                    let f = &n["facts"];
                    let state = if n["left"] == true {
                        "left"
                    } else if n["alive"] != true {
                        "DEAD"
                    } else if f["draining"] == true {
                        "draining"
                    } else {
                        "alive"
                    };
                    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
                    let labels = f["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let roles = f["roles"]
                        .as_array()
                        .map(|r| {
                            r.iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        format!(
                            "{}{}",
                            n["name"].as_str().unwrap_or("?"),
                            if n["is_self"] == true { "*" } else { "" }
                        ),
                        state.to_string(),
                        f["http_addr"].as_str().unwrap_or("-").to_string(),
                        if roles.is_empty() {
                            "all".into()
                        } else {
                            roles
                        },
                        labels,
                        format!(
                            "{}/{}",
                            format_size(num(&f["memory_committed"])),
                            format_size(num(&f["memory_allocatable"]))
                        ),
                        format!("{}/{}", num(&f["aio_committed"]), num(&f["aio_max"])),
                        format!("{}/{}", num(&f["env_count"]), num(&f["max_envs"])),
                        // Gossip carries a filter that says how many.
                        f["layers"]
                            .as_array()
                            .map_or(0, |l| l.len() as u64)
                            .max(num(&f["layer_filter"]["layers"]))
                            .to_string(),
                        f["storage_driver"].as_str().unwrap_or("-").to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NODE", "STATE", "HTTP", "ROLES", "LABELS", "MEMORY", "AIO", "ENVS", "LAYERS",
                    "DRIVER",
                ],
                rows,
            );
        }
        Cmd::Placement {
            image,
            memory,
            aio,
            constraints,
        } => {
            let mut body = json!({"image": image, "owner": "placement@shoal"});
            if let Some(m) = memory {
                body["memory"] = json!(m);
            }
            if let Some(a) = aio {
                body["aio"] = json!(a);
            }
            if !constraints.is_empty() {
                body["constraints"] = json!(parse_kv(&constraints, "--constraint")?);
            }
            let v: serde_json::Value = client.post("/v1/placement", &body).await?;
            let empty = vec![];
            for (i, r) in v["ranked"].as_array().unwrap_or(&empty).iter().enumerate() {
                println!(
                    "{}. {}  {}",
                    i + 1,
                    r["node"].as_str().unwrap_or("?"),
                    r["why"].as_str().unwrap_or("")
                );
            }
            for r in v["rejected"].as_array().unwrap_or(&empty) {
                println!(
                    "-  {}  {}",
                    r["node"].as_str().unwrap_or("?"),
                    r["reason"].as_str().unwrap_or("")
                );
            }
        }
        Cmd::Builds { json } => {
            let list: Vec<shoal::builds::BuildRecord> = client.get("/v1/builds").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let secs = |ms: Option<u64>| {
                    ms.map(|m| format!("{:.1}s", m as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into())
                };
                let rows = list
                    .iter()
                    .map(|b| {
                        vec![
                            b.product.clone(),
                            b.build.clone(),
                            b.status.to_string(),
                            b.node.clone(),
                            b.detected_at.to_string(),
                            secs(b.timings.build_ms),
                            secs(b.timings.publish_ms),
                            b.error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "PRODUCT", "BUILD", "STATUS", "NODE", "DETECTED", "BUILD", "PUBLISH",
                        "ERROR",
                    ],
                    rows,
                );
            }
        }
        Cmd::BuildLog { product, build } => {
            let (status, body) = client
                .send_raw(
                    hyper::Method::GET,
                    &format!("/v1/builds/{product}/{build}/log"),
                    None,
                )
                .await?;
            if !status.is_success() {
                bail!("{status}: {}", String::from_utf8_lossy(&body));
            }
            print!("{}", String::from_utf8_lossy(&body));
        }
        Cmd::Workers { json } => {
            let list: Vec<serde_json::Value> = client.get("/v1/workers").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
                let rows = list
                    .iter()
                    .map(|w| {
                        vec![
                            text(&w["name"]),
                            text(&w["state"]),
                            text(&w["started_at"]),
                            text(&w["error"]),
                        ]
                    })
                    .collect();
                print_table(&["WORKER", "STATE", "SINCE", "ERROR"], rows);
            }
        }
        Cmd::Node { json } => {
            let n: NodeInfo = client.get("/v1/node").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&n)?);
            } else {
                println!("node        {} (shoal {})", n.name, n.version);
                println!(
                    "memory      {} committed of {} allocatable ({} total)",
                    format_size(n.memory_committed),
                    format_size(n.memory_allocatable),
                    format_size(n.memory_total)
                );
                println!(
                    "aio         {} committed, {} in use, max {}",
                    n.aio_committed, n.aio_in_use, n.aio_max
                );
                println!("envs        {} of {}", n.env_count, n.max_envs);
                println!(
                    "engine      docker {}, storage driver {}{}",
                    n.engine_version,
                    n.storage_driver,
                    if n.containerd_store {
                        " (containerd image store)"
                    } else {
                        ""
                    }
                );
                println!(
                    "gossip      {}{}, keys {}",
                    n.gossip.mode,
                    if n.gossip.insecure {
                        " (insecure allowed)"
                    } else {
                        ""
                    },
                    if n.gossip.key_ids.is_empty() {
                        "none".to_string()
                    } else {
                        n.gossip.key_ids.join(", ")
                    }
                );
                println!("engine      {}", n.engine.describe());
                if !n.peer_calls.is_empty() {
                    println!("peer calls  {}", n.peer_calls);
                }
                for note in n.storage_notes {
                    println!("note        {note}");
                }
                println!(
                    "store       {} {}{}",
                    n.store.path.display(),
                    serde_json::to_value(n.store.state)?.as_str().unwrap_or("?"),
                    n.store
                        .reason
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn print_env(e: &EnvRecord) {
    println!("id        {}", e.id);
    println!("image     {}", e.image);
    println!("owner     {}", e.owner);
    println!("node      {}", e.node);
    println!("status    {}", e.status);
    if let Some(err) = &e.error {
        println!("error     {err}");
    }
    for p in &e.endpoints {
        println!("endpoint  {} -> port {}", p, p.port);
    }
}

/// A time as `2015-11-03T02:10:00Z`.
fn fmt_time(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Prints rows as an aligned table.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}
