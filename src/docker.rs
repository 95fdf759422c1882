//! The Docker engine, through bollard. This is the only module that imports
//! bollard: everything else speaks in shoal's terms (environments, layers,
//! digests), so the rest of the crate neither knows nor cares which API
//! version the engine speaks.
//!
//! The engine is the truth for what runs on this node: every environment
//! container carries its immutable record in labels (see [`labels`]), and a
//! restarted daemon rebuilds its view from them.
//!
//! Every call is bounded (see [`limits`]): an engine that died fails a call
//! at once (the socket refuses), one that hangs (a stopped `dockerd`
//! accepts connections and never answers) fails it after the limit of its
//! kind. bollard's own timeout is one per client and covers only the
//! response head, so each call also runs under a `tokio::time::timeout`
//! of its kind; streams (load, save) are bounded by progress instead of a
//! total. [`DockerError::no_answer`] tells "the engine did not answer"
//! from "the engine answered no", which callers must treat differently (an
//! engine that does not answer says nothing about the containers).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    BuildImageOptions, CommitContainerOptions, CreateContainerOptions, ImportImageOptions,
    ListContainersOptions, ListImagesOptions, LogsOptions, RemoveContainerOptions,
    RemoveImageOptions, TagImageOptions, WaitContainerOptions,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};

use crate::archive::{chain_ids, Digest};

mod bounds;
use bounds::{collect_within, idle_bounded, millis_since, transport_failure, within};
pub use bounds::{limits, NoAnswer};

/// Labels shoal puts on every environment container.
pub mod labels {
    pub const NODE: &str = "shoal.node";
    pub const ENV_ID: &str = "shoal.env.id";
    pub const OWNER: &str = "shoal.env.owner";
    pub const IMAGE: &str = "shoal.env.image";
    pub const MEMORY: &str = "shoal.env.memory";
    pub const AIO: &str = "shoal.env.aio";
    pub const CREATED_AT: &str = "shoal.env.created_at";
    /// The expiry the environment was created with (RFC 3339).
    pub const EXPIRES_AT: &str = "shoal.env.expires_at";
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the docker engine: {0}")]
    Connect(String),
    #[error("docker {op}: no answer within {}", crate::units::format_duration(*after))]
    Timeout { op: &'static str, after: Duration },
    #[error("docker {op}: {source}")]
    Api {
        op: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker load: {0}")]
    Load(String),
    #[error("docker build: {0}")]
    Build(String),
}

fn api(op: &'static str) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    move |source| DockerError::Api { op, source }
}

impl DockerError {
    /// `Some` when the engine did not answer (unreachable or hung), `None`
    /// when it answered (an error status, a bad image, a failed build).
    pub fn no_answer(&self) -> Option<NoAnswer> {
        match self {
            DockerError::Connect(_) => Some(NoAnswer::Unreachable("cannot connect")),
            DockerError::Timeout { .. } => Some(NoAnswer::Hung),
            DockerError::Api { source, .. } => transport_failure(source),
            DockerError::Load(_) | DockerError::Build(_) => None,
        }
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// What the engine says about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    pub server_version: String,
    pub api_version: String,
    pub storage_driver: String,
    /// The storage driver's own status lines (backing filesystem, …).
    pub driver_status: Vec<(String, String)>,
    /// Whether images live in containerd's image store (Docker ≥ 24 with
    /// the containerd snapshotter) rather than the classic graph driver.
    pub containerd_store: bool,
    pub root_dir: String,
    pub total_memory: u64,
}

/// An image in the engine, as far as shoal cares.
#[derive(Debug, Clone)]
pub struct ImageFacts {
    pub id: String,
    pub diff_ids: Vec<Digest>,
    pub labels: HashMap<String, String>,
    pub tags: Vec<String>,
}

/// A container to create for an environment.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub memory: u64,
    pub env: BTreeMap<String, String>,
    pub labels: HashMap<String, String>,
    /// Container TCP ports to publish on ephemeral host ports.
    pub ports: Vec<u16>,
    /// Host address the ports are published on.
    pub publish_addr: String,
}

/// A container as the engine reports it.
#[derive(Debug, Clone)]
pub struct ContainerFacts {
    pub id: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    /// `starting`, `healthy`, `unhealthy`, or `None` without a healthcheck.
    pub health: Option<String>,
    /// (container port, host port) of published TCP ports.
    pub ports: Vec<(u16, u16)>,
    /// The container's address on its network, if it has one.
    pub ip: Option<std::net::IpAddr>,
    pub labels: HashMap<String, String>,
    /// When the engine last started it (RFC 3339), so a restart shows.
    pub started_at: Option<String>,
}

/// A connection to the local Docker engine.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: bollard::Docker,
}

impl Engine {
    /// Connects to the engine named by `DOCKER_HOST`, or the default socket,
    /// and agrees on an API version the engine speaks (bollard 0.21 speaks
    /// 1.52 by default; Debian's engine 20.10 speaks 1.41).
    pub async fn connect() -> Result<Engine, DockerError> {
        // The client's own timeout bounds the response head of every call.
        // A load's head comes only after the whole archive is uploaded, so
        // it is the load's limit; every other call has a shorter one of its
        // own (see `within`).
        let docker = bollard::Docker::connect_with_defaults()
            .map_err(|e| DockerError::Connect(e.to_string()))?;
        Engine::negotiate(docker).await
    }

    /// Connects to the engine listening on the unix socket `host`
    /// (`unix:///run/…/docker.sock` or a plain path), whatever `DOCKER_HOST`
    /// says: the test harness talks to one engine per host.
    pub async fn connect_at(host: &str) -> Result<Engine, DockerError> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        let docker = bollard::Docker::connect_with_unix(
            path,
            limits::LOAD_MAX.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| DockerError::Connect(e.to_string()))?;
        Engine::negotiate(docker).await
    }

    async fn negotiate(docker: bollard::Docker) -> Result<Engine, DockerError> {
        let docker = docker.with_timeout(limits::LOAD_MAX);
        let docker = within("version", limits::QUICK, docker.negotiate_version())
            .await?
            .map_err(|e| DockerError::Connect(e.to_string()))?;
        let engine = Engine { docker };
        engine.ping(limits::QUICK).await?;
        Ok(engine)
    }

    /// Pings the engine, waiting at most `limit`.
    pub async fn ping(&self, limit: Duration) -> Result<(), DockerError> {
        within("ping", limit, self.docker.ping())
            .await?
            .map(|_| ())
            .map_err(api("ping"))
    }

    pub async fn info(&self) -> Result<EngineInfo, DockerError> {
        let info = within("info", limits::QUICK, self.docker.info())
            .await?
            .map_err(api("info"))?;
        let version = within("version", limits::QUICK, self.docker.version())
            .await?
            .map_err(api("version"))?;
        let driver_status: Vec<(String, String)> = info
            .driver_status
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| match kv.as_slice() {
                [k, v] => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect();
        let containerd_store = driver_status
            .iter()
            .any(|(k, v)| k == "driver-type" && v.contains("snapshotter"));
        Ok(EngineInfo {
            server_version: info.server_version.unwrap_or_default(),
            api_version: version.api_version.unwrap_or_default(),
            storage_driver: info.driver.unwrap_or_default(),
            driver_status,
            containerd_store,
            root_dir: info.docker_root_dir.unwrap_or_default(),
            total_memory: info.mem_total.unwrap_or(0).max(0) as u64,
        })
    }

    /// The image `reference` (tag or id), or `None` when the engine lacks it.
    pub async fn image(&self, reference: &str) -> Result<Option<ImageFacts>, DockerError> {
        match within(
            "inspect image",
            limits::QUICK,
            self.docker.inspect_image(reference),
        )
        .await?
        {
            Ok(img) => {
                let diff_ids = img
                    .root_fs
                    .and_then(|r| r.layers)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| l.parse().ok())
                    .collect();
                Ok(Some(ImageFacts {
                    id: img.id.unwrap_or_default(),
                    diff_ids,
                    labels: img.config.and_then(|c| c.labels).unwrap_or_default(),
                    tags: img.repo_tags.unwrap_or_default(),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(api("inspect image")(e)),
        }
    }

    /// Every chain id the engine's layer store holds: each image's layer
    /// list and all its prefixes. (The engine API has no call that lists
    /// layers; an image's presence implies its whole chain is present.)
    pub async fn held_chain_ids(&self) -> Result<HashSet<Digest>, DockerError> {
        let images = within(
            "list images",
            limits::QUICK,
            self.docker.list_images(Some(ListImagesOptions {
                all: true,
                ..Default::default()
            })),
        )
        .await?
        .map_err(api("list images"))?;
        let mut held = HashSet::new();
        for summary in images {
            if let Some(img) = self.image(&summary.id).await? {
                held.extend(chain_ids(&img.diff_ids));
            }
        }
        Ok(held)
    }

    /// The `docker save` tar stream of one image, bounded by progress: the
    /// first chunk within [`limits::SAVE_FIRST_BYTE`], each later one within
    /// [`limits::SAVE_IDLE`].
    pub fn export(
        &self,
        reference: &str,
    ) -> impl Stream<Item = Result<Bytes, DockerError>> + Send + 'static {
        let inner = self
            .docker
            .export_image(reference)
            .map_err(|source| DockerError::Api { op: "save", source })
            .boxed();
        idle_bounded("save", inner, limits::SAVE_FIRST_BYTE, limits::SAVE_IDLE)
    }

    /// Sends a `docker load` archive. Succeeds only when the engine reports
    /// the image loaded: a stream error, an `errorDetail`, or an `Error
    /// unpacking image` line (how the containerd store reports a failed
    /// unpack) all fail the load. Returns the engine's messages.
    ///
    /// Bounded by progress: the load fails when for [`limits::LOAD_IDLE`]
    /// the engine takes no byte of the archive and reports no progress (it
    /// does, layer by layer, while it registers what it unpacked), and in
    /// any case after [`limits::LOAD_MAX`].
    pub async fn load<S>(&self, archive: S) -> Result<String, DockerError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let base = tokio::time::Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let touch = {
            let last = last.clone();
            move || last.store(millis_since(base), Ordering::Relaxed)
        };
        let taken = {
            let touch = touch.clone();
            archive.inspect(move |_| touch())
        };
        let work = async {
            let mut out = String::new();
            let mut stream = self.docker.import_image_stream(
                ImportImageOptions {
                    quiet: false,
                    platform: None,
                },
                taken,
                None,
            );
            while let Some(item) = stream.next().await {
                touch();
                let info = match item {
                    Ok(info) => info,
                    Err(e) if transport_failure(&e).is_some() => {
                        return Err(DockerError::Api {
                            op: "load",
                            source: e,
                        })
                    }
                    Err(e) => return Err(DockerError::Load(e.to_string())),
                };
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    return Err(DockerError::Load(e));
                }
                // Progress lines ("Loading layer") only keep the load alive.
                if info.progress_detail.is_some() {
                    continue;
                }
                if let Some(s) = info.stream.or(info.status) {
                    if s.contains("Error unpacking image") {
                        return Err(DockerError::Load(s.trim().to_string()));
                    }
                    out.push_str(&s);
                }
            }
            Ok(out)
        };
        let stalled = async {
            let tick = limits::LOAD_IDLE / 10;
            loop {
                tokio::time::sleep(tick).await;
                let idle = millis_since(base).saturating_sub(last.load(Ordering::Relaxed));
                if Duration::from_millis(idle) >= limits::LOAD_IDLE {
                    return limits::LOAD_IDLE;
                }
            }
        };
        let out = tokio::select! {
            r = work => r?,
            after = stalled => return Err(DockerError::Timeout { op: "load (no progress)", after }),
            _ = tokio::time::sleep(limits::LOAD_MAX) => {
                return Err(DockerError::Timeout { op: "load", after: limits::LOAD_MAX })
            }
        };
        if !out.contains("Loaded image") {
            return Err(DockerError::Load(format!(
                "the engine did not report a loaded image: {}",
                out.trim()
            )));
        }
        Ok(out)
    }

    /// Builds an image from a tar build context and tags it. Returns the
    /// build log; a failed step is [`DockerError::Build`] with the log.
    pub async fn build(
        &self,
        context: Vec<u8>,
        tag: &str,
        build_args: HashMap<String, String>,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError> {
        let once = futures::stream::once(async move { Ok(Bytes::from(context)) });
        self.build_stream(once, tag, build_args, labels).await
    }

    /// [`Engine::build`] with the tar build context streamed (a build
    /// context can be many GiB: it is never held in memory whole).
    /// Unbounded here: a build step may be silent for as long as it
    /// compiles; the build watcher bounds every build as a whole by its
    /// recipe's `timeout` (`build_timeout`, 1 h by default).
    pub async fn build_stream<S>(
        &self,
        context: S,
        tag: &str,
        build_args: HashMap<String, String>,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let opts = BuildImageOptions {
            t: Some(tag.to_string()),
            rm: true,
            forcerm: true,
            buildargs: Some(build_args),
            labels: Some(labels),
            ..Default::default()
        };
        let mut log = String::new();
        let mut stream =
            self.docker
                .build_image(opts, None, Some(bollard::body_try_stream(context)));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(s) = info.stream {
                        log.push_str(&s);
                    }
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        log.push_str(&e);
                        return Err(DockerError::Build(log));
                    }
                }
                Err(e) => {
                    log.push_str(&e.to_string());
                    return Err(DockerError::Build(log));
                }
            }
        }
        Ok(log)
    }

    /// Removes an image tag (and the image when nothing else refers to it).
    /// A missing image is not an error.
    pub async fn remove_image(&self, reference: &str) -> Result<(), DockerError> {
        match within(
            "remove image",
            limits::CHANGE,
            self.docker.remove_image(
                reference,
                Some(RemoveImageOptions {
                    force: true,
                    ..Default::default()
                }),
                None,
            ),
        )
        .await?
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api("remove image")(e)),
        }
    }

    /// Creates and starts an environment container; returns its id.
    pub async fn run(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .ports
            .iter()
            .map(|p| {
                (
                    format!("{p}/tcp"),
                    Some(vec![PortBinding {
                        host_ip: Some(spec.publish_addr.clone()),
                        host_port: Some(String::new()),
                    }]),
                )
            })
            .collect();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(spec.labels.clone()),
            exposed_ports: Some(spec.ports.iter().map(|p| format!("{p}/tcp")).collect()),
            host_config: Some(HostConfig {
                memory: Some(spec.memory as i64),
                memory_swap: Some(spec.memory as i64),
                port_bindings: Some(port_bindings),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.create_and_start(&spec.name, body).await
    }

    /// Creates a container and starts it; one that does not start is removed.
    async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let created = within(
            "create container",
            limits::CHANGE,
            self.docker.create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    platform: String::new(),
                }),
                body,
            ),
        )
        .await?
        .map_err(api("create container"))?;
        let started = within(
            "start container",
            limits::CHANGE,
            self.docker.start_container(&created.id, None),
        )
        .await
        .and_then(|r| r.map_err(api("start container")));
        if let Err(e) = started {
            let _ = self.remove_container(&created.id).await;
            return Err(e);
        }
        Ok(created.id)
    }

    /// The container `id`, or `None` when it is gone.
    pub async fn container(&self, id: &str) -> Result<Option<ContainerFacts>, DockerError> {
        let c = match within(
            "inspect container",
            limits::QUICK,
            self.docker.inspect_container(id, None),
        )
        .await?
        {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(api("inspect container")(e)),
        };
        let state = c.state.unwrap_or_default();
        let net = c.network_settings.unwrap_or_default();
        let ip = net
            .networks
            .unwrap_or_default()
            .values()
            .filter_map(|n| n.ip_address.as_deref()?.parse().ok())
            .next();
        let mut ports = Vec::new();
        for (key, bindings) in net.ports.unwrap_or_default() {
            let Some(cport) = key.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) else {
                continue;
            };
            if let Some(hport) = bindings
                .unwrap_or_default()
                .iter()
                .filter_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
                .next()
            {
                ports.push((cport, hport));
            }
        }
        ports.sort_unstable();
        Ok(Some(ContainerFacts {
            id: c.id.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            exit_code: state.exit_code,
            oom_killed: state.oom_killed.unwrap_or(false),
            health: state
                .health
                .and_then(|h| h.status)
                .map(|s| s.to_string())
                .filter(|s| !s.is_empty() && s != "none"),
            ports,
            ip,
            labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
            started_at: state.started_at.filter(|s| !s.starts_with("0001-")),
        }))
    }

    /// Ids of every container (running or not) labelled as an environment
    /// of node `node`.
    pub async fn env_containers(&self, node: &str) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={node}", labels::NODE)],
        )]);
        let list = within(
            "list containers",
            limits::QUICK,
            self.docker.list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            })),
        )
        .await?
        .map_err(api("list containers"))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Like [`Engine::env_containers`], with the environment id each
    /// container's `shoal.env.id` label names (`None` without one).
    pub async fn env_containers_by_env(
        &self,
        node: &str,
    ) -> Result<Vec<(String, Option<String>)>, DockerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={node}", labels::NODE)],
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(api("list containers"))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let env = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(labels::ENV_ID).cloned());
                Some((c.id?, env))
            })
            .collect())
    }

    /// Stops and removes a container. A missing container is not an error.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        match within(
            "remove container",
            limits::CHANGE,
            self.docker.remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            ),
        )
        .await?
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api("remove container")(e)),
        }
    }

    /// Creates and starts a container of `image` running `command` (which
    /// replaces the image's entrypoint and command), for a recipe's install
    /// step: privileged, or with only `capabilities` added when given.
    /// Returns its id. It has no `shoal.*` labels: they would end up in the
    /// committed image.
    pub async fn run_privileged(
        &self,
        name: &str,
        image: &str,
        command: &[String],
        env: &BTreeMap<String, String>,
        capabilities: Option<&[String]>,
    ) -> Result<String, DockerError> {
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint: Some(command.to_vec()),
            cmd: Some(Vec::new()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            host_config: Some(HostConfig {
                privileged: Some(capabilities.is_none()),
                cap_add: capabilities.map(|c| c.to_vec()),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.create_and_start(name, body).await
    }

    /// Waits until container `id` exits; returns its exit code. Unbounded
    /// here: an install step runs as long as it runs, and the build that
    /// waits is bounded as a whole by its recipe's `timeout`.
    pub async fn wait_exit(&self, id: &str) -> Result<i64, DockerError> {
        // bollard reports a non-zero exit as an error item: the code is
        // read from the container's state afterwards either way.
        let mut waits = self.docker.wait_container(id, None::<WaitContainerOptions>);
        while let Some(item) = waits.next().await {
            if let Err(e) = item {
                if !matches!(e, bollard::errors::Error::DockerContainerWaitError { .. }) {
                    return Err(api("wait container")(e));
                }
            }
        }
        let c = within(
            "inspect container",
            limits::QUICK,
            self.docker.inspect_container(id, None),
        )
        .await?
        .map_err(api("inspect container"))?;
        let state = c.state.unwrap_or_default();
        if state.running.unwrap_or(false) {
            return Err(DockerError::Build(format!("container {id} still runs")));
        }
        Ok(state.exit_code.unwrap_or(-1))
    }

    /// Everything container `id` wrote to stdout and stderr (what arrives
    /// within [`limits::CHANGE`]).
    pub async fn logs_all(&self, id: &str) -> String {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: "all".into(),
            ..Default::default()
        };
        let chunks = collect_within(limits::CHANGE, self.docker.logs(id, Some(opts))).await;
        let mut out = String::new();
        for c in chunks.into_iter().flatten() {
            out.push_str(&String::from_utf8_lossy(&c.into_bytes()));
        }
        out
    }

    /// Commits container `id` as image `repo:tag`, with the run settings
    /// (command, entrypoint, environment, labels, health check, exposed
    /// ports, user, working directory) of image `like` rather than those of
    /// the container (whose entrypoint was the installer). Returns the new
    /// image id.
    pub async fn commit_like(
        &self,
        id: &str,
        like: &str,
        repo: &str,
        tag: &str,
    ) -> Result<String, DockerError> {
        let img = within(
            "inspect image",
            limits::QUICK,
            self.docker.inspect_image(like),
        )
        .await?
        .map_err(api("inspect image"))?;
        let c = img.config.unwrap_or_default();
        let config = bollard::models::ContainerConfig {
            user: c.user,
            exposed_ports: c.exposed_ports,
            env: c.env,
            cmd: c.cmd,
            healthcheck: c.healthcheck,
            volumes: c.volumes,
            working_dir: c.working_dir,
            // An empty list, not none: the engine fills a missing entrypoint
            // in from the container (the installer command).
            entrypoint: Some(c.entrypoint.unwrap_or_default()),
            on_build: c.on_build,
            labels: Some(c.labels.unwrap_or_default()),
            stop_signal: c.stop_signal,
            shell: c.shell,
            ..Default::default()
        };
        let opts = CommitContainerOptions {
            container: Some(id.to_string()),
            repo: Some(repo.to_string()),
            tag: Some(tag.to_string()),
            pause: true,
            ..Default::default()
        };
        let done = within(
            "commit container",
            limits::COMMIT,
            self.docker.commit_container(opts, config),
        )
        .await?
        .map_err(api("commit container"))?;
        Ok(done.id)
    }

    /// Tags image `image` (id or tag) as `repo:tag`.
    pub async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), DockerError> {
        within(
            "tag image",
            limits::QUICK,
            self.docker.tag_image(
                image,
                Some(TagImageOptions {
                    repo: Some(repo.to_string()),
                    tag: Some(tag.to_string()),
                }),
            ),
        )
        .await?
        .map_err(api("tag image"))
    }

    /// Every `shoal/...` tag in the engine (the images shoal loaded or
    /// built); other images are never listed, so never touched.
    pub async fn shoal_tags(&self) -> Result<Vec<String>, DockerError> {
        let images = within(
            "list images",
            limits::QUICK,
            self.docker.list_images(None::<ListImagesOptions>),
        )
        .await?
        .map_err(api("list images"))?;
        let mut tags: Vec<String> = images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t.starts_with("shoal/"))
            .collect();
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// Removes tag `reference` unless a container uses the image (no
    /// force); `Ok(false)` when it is in use or already gone.
    pub async fn untag(&self, reference: &str) -> Result<bool, DockerError> {
        match within(
            "untag image",
            limits::CHANGE,
            self.docker
                .remove_image(reference, None::<RemoveImageOptions>, None),
        )
        .await?
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(false),
            Err(e) => Err(api("remove image")(e)),
        }
    }

    /// The last `lines` lines of a container's output, for error messages.
    pub async fn logs_tail(&self, id: &str, lines: usize) -> String {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let chunks = collect_within(limits::QUICK, self.docker.logs(id, Some(opts))).await;
        let mut out = String::new();
        for c in chunks.into_iter().flatten() {
            out.push_str(&String::from_utf8_lossy(&c.into_bytes()));
        }
        out
    }
}
