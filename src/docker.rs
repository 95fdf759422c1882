//! The Docker engine, through bollard. This module (with its files under
//! `docker/`) is the only one that imports bollard: everything else speaks
//! in shoal's terms (environments, layers, digests), so the rest of the
//! crate neither knows nor cares which API version the engine speaks.
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
//!
//! Here: the connection, the engine's own facts and the errors;
//! `docker/images.rs` has images (inspect, save, load, tags),
//! `docker/containers.rs` environment containers, `docker/build.rs`
//! builds and the install step's container and commit.

use std::time::Duration;

mod bounds;
mod build;
mod containers;
mod images;
pub use bounds::{limits, NoAnswer};
use bounds::{transport_failure, within};
pub use containers::{ContainerFacts, ContainerSpec};
pub use images::ImageFacts;

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
/// A connection to the local Docker engine.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: bollard::Docker,
    /// Where each call's latency and errors are counted (`metrics.rs`).
    metrics: crate::metrics::Metrics,
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
        let engine = Engine {
            docker,
            metrics: Default::default(),
        };
        engine.ping(limits::QUICK).await?;
        Ok(engine)
    }

    /// This engine, counting its calls (and what its holders record) in
    /// `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Engine {
        self.metrics = metrics;
        self
    }

    /// The node's metrics handle (see [`Engine::with_metrics`]).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Pings the engine, waiting at most `limit`.
    pub async fn ping(&self, limit: Duration) -> Result<(), DockerError> {
        self.call("ping", limit, self.docker.ping())
            .await?
            .map(|_| ())
            .map_err(api("ping"))
    }

    pub async fn info(&self) -> Result<EngineInfo, DockerError> {
        let info = self
            .call("info", limits::QUICK, self.docker.info())
            .await?
            .map_err(api("info"))?;
        let version = self
            .call("version", limits::QUICK, self.docker.version())
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
}
