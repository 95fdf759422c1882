//! Environment containers: creating and starting one from its
//! [`ContainerSpec`] (memory limit, ports published on ephemeral host
//! ports), what the engine reports of it, the containers labelled as a
//! node's environments, removal, the tail of its output.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};

use super::bounds::collect_within;
use super::{api, is_not_found, labels, limits, DockerError, Engine};

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
impl Engine {
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
    pub(super) async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let created = self
            .call(
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
        let started = self
            .call(
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
        let c = match self
            .call(
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
        let list = self
            .call(
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
        match self
            .call(
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
