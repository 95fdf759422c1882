//! Builds in the engine: `docker build` from a streamed tar context, and
//! the recipe's install step: a privileged container (or one with only
//! the given capabilities), waiting for its exit, its output, and the
//! commit that keeps the image's own run settings.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    BuildImageOptions, CommitContainerOptions, LogsOptions, WaitContainerOptions,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::bounds::collect_within;
use super::{api, limits, DockerError, Engine};

impl Engine {
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
        let c = self
            .call(
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
        let img = self
            .call(
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
        let done = self
            .call(
                "commit container",
                limits::COMMIT,
                self.docker.commit_container(opts, config),
            )
            .await?
            .map_err(api("commit container"))?;
        Ok(done.id)
    }
}
