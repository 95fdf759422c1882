//! Wiring of one node: connect the engine, open the store, recover the
//! environments, serve the API, run the background workers, and shut down
//! in order on a signal. `run` takes its listener and shutdown signal as
//! arguments, so tests bind port 0 and stop it when they like.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::api::{router, AppState};
use crate::config::{KeyFile, Settings};
use crate::docker::{DockerError, Engine};
use crate::envs::{EnvError, Envs};
use crate::keyring::Keyring;
use crate::routing::Cluster;
use crate::store::{ImageRef, PublishHint, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Envs(#[from] EnvError),
    #[error("serving http: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("publishing the demo image: {0}")]
    Demo(String),
    #[error(transparent)]
    Builds(#[from] crate::builds::BuildError),
    #[error(transparent)]
    Mail(#[from] crate::mail::MailError),
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
}

/// Options that are about this run, not the node's configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Publish the embedded demo image as `demo:1` at start if missing.
    pub demo: bool,
    /// On `SIGHUP`: the settings as they read now (config file + flags);
    /// the node takes its cluster key and `gossip_seal` from them.
    pub reload: Option<Reloader>,
}

/// Reads the settings again (see [`RunOptions::reload`]).
#[derive(Clone)]
pub struct Reloader(pub Arc<dyn Fn() -> Result<Settings, String> + Send + Sync>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// Applies a reload: the key file is read again (a rotation step) and the
/// seal mode taken from the new settings; nothing else changes live.
fn reload_keys(cluster: &Cluster, authority: &crate::auth::Authority, reload: &Reloader) {
    let settings = match (reload.0)() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "reload refused: the config does not check; keys and seal mode unchanged");
            return;
        }
    };
    match load_keyring(&settings) {
        Ok(keyring) => {
            if let Some(k) = &keyring {
                authority.set_keyring(k.clone());
            }
            cluster.reload_keys(settings.gossip_seal, keyring);
            let g = cluster.gossip_security();
            info!(node = %settings.name, seal = %g.mode, key_ids = ?g.key_ids, "reloaded the cluster key and seal mode (other settings apply on restart)");
        }
        Err(e) => {
            warn!(error = %e, "reload refused: keys and seal mode unchanged")
        }
    }
}

/// How long a stopping node waits for environments still loading or
/// starting before it leaves anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// How long a stopping node, once drained, waits for open HTTP answers
/// before it closes them. Event streams end as soon as shutdown begins, so
/// this only bounds a slow client; with [`DRAIN_DEADLINE`] it stays well
/// inside the unit's `TimeoutStopSec`.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The demo build every new user can request right away.
pub const DEMO_REF: &str = "demo:1";

/// Runs the node until `shutdown` completes. Running environments are left
/// running: a node that stops never takes its environments with it.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    // One metrics handle for the node: the engine carries it to whoever
    // holds the engine (`metrics.rs`).
    let engine = Engine::connect()
        .await?
        .with_metrics(crate::metrics::Metrics::new());
    let info = engine.info().await?;
    info!(
        node = %settings.name,
        engine = %info.server_version,
        api = %info.api_version,
        storage_driver = %info.storage_driver,
        containerd_store = info.containerd_store,
        "docker engine connected"
    );
    for note in crate::host::storage_notes(&info.storage_driver, info.containerd_store) {
        warn!(storage_driver = %info.storage_driver, "{note}");
    }
    std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
        DaemonError::Store(StoreError::Io {
            path: settings.data_dir.clone(),
            source: e,
        })
    })?;
    let keyring = load_keyring(&settings)?;
    let authority = Arc::new(crate::auth::Authority::new(
        token_keyring(&settings, keyring.as_ref())?,
        settings.open_read,
        settings.trusted_proxy.clone(),
    ));
    let revoked_file = crate::auth::revoked_file(&settings.data_dir);
    crate::revocations::load_at_start(&authority, &revoked_file);
    // A store that never existed is created; one this node knew and that
    // is gone is refused until it is back (`store-watch` below). Either
    // way the node starts and serves what does not need the store.
    let store = Store::for_node(settings.store.clone(), settings.data_dir.clone());
    store.check().await;
    if let Err(e) = store.usable() {
        warn!(store = %settings.store.display(), error = %e, "starting without the image store");
    }
    if opts.demo {
        match store.writable() {
            Ok(()) => ensure_demo(&engine, &store).await?,
            Err(e) => warn!(error = %e, "demo image not published"),
        }
    }
    let store_watch = store.clone().watch();
    let envs = Envs::recover(settings.clone(), engine, store).await?;
    // A maintenance drain outlives restarts (`drain.rs`); before the node
    // joins, so it is never offered for placement in between.
    match crate::drain::load(&settings.data_dir) {
        Ok(Some(m)) => {
            info!(node = %settings.name, since = %m.since, by = %m.by, "still drained for maintenance: taking no new environments (shoal drain --undo)");
            envs.set_maintenance(Some(m));
        }
        Ok(None) => {}
        Err(e) => {
            warn!(node = %settings.name, error = %e, "drain file unreadable: staying drained until an operator decides (shoal drain / shoal drain --undo)");
            envs.set_maintenance(Some(crate::drain::Maintenance {
                since: time::OffsetDateTime::now_utc(),
                by: "unreadable drain file".into(),
            }));
        }
    }
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    // What other nodes call: on a wildcard listen, the IP this node gossips
    // from (peers check that the two match, `cluster::keys::check_http_addr`).
    let http_addr = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(settings.advertise.ip(), addr.port()).to_string()
    } else {
        addr.to_string()
    };
    if let Err(e) = crate::cluster::keys::check_http_addr(&http_addr, settings.advertise.ip()) {
        warn!(node = %settings.name, http = %http_addr, gossip = %settings.advertise, "other nodes will not call this node: {e}");
    }
    let cluster = Cluster::start(
        &settings,
        envs.clone(),
        http_addr.clone(),
        info.storage_driver.clone(),
        keyring,
    )
    .await?;
    let workers = crate::workers::Workers::new();
    workers.adopt("store-watch", tokio::spawn(store_watch));
    workers.adopt("gossip-publisher", cluster.spawn_publisher());
    workers.adopt("stall-watch", cluster.spawn_stall_watch());
    workers.adopt(
        "revocations",
        tokio::spawn(crate::revocations::run(
            authority.clone(),
            cluster.clone(),
            revoked_file,
        )),
    );
    if let Some(watch) = cluster.spawn_gossip_watch().await {
        workers.adopt_fallible("gossip-server", watch);
    }
    if let Some(reload) = opts.reload.clone() {
        let cluster = cluster.clone();
        let authority = authority.clone();
        workers.adopt(
            "key-reload",
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    warn!("cannot watch SIGHUP: key reload needs a restart");
                    return;
                };
                while hup.recv().await.is_some() {
                    reload_keys(&cluster, &authority, &reload);
                }
            }),
        );
    }
    // Build watcher (role build) and image GC (every node).
    let builds = crate::builds::Builds::open(envs.clone())?;
    for (name, task) in builds.spawn(cluster.clone()) {
        workers.adopt(name, task);
    }
    // Testers' workers: mail (watcher + outbox) and the reservation reaper.
    // Testers reach the page by the advertised host name (docs/config.md).
    let public_url = settings.public_url.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            format!("http://{}:{}", settings.advertise_host, addr.port())
        } else {
            format!("http://{addr}")
        }
    });
    let mail = crate::mail::Mailer::new(
        &settings,
        public_url,
        Some(crate::web::mail_caps(authority.clone())),
    )?;
    workers.adopt("mail-outbox", mail.spawn_sender());
    workers.adopt(
        "mail-watcher",
        mail.spawn_watcher(envs.clone(), cluster.clone()),
    );
    workers.adopt(
        "reaper",
        tokio::spawn(crate::reaper::run(
            crate::reaper::EnvsTarget {
                envs: envs.clone(),
                mail: mail.clone(),
            },
            time::OffsetDateTime::now_utc,
        )),
    );
    // Cancelled when shutdown begins: event streams end, so the server's
    // graceful shutdown is not held up by a client that never hangs up.
    let stopping = tokio_util::sync::CancellationToken::new();
    let state = Arc::new(AppState {
        envs: envs.clone(),
        engine: info,
        cluster: cluster.clone(),
        builds,
        mail,
        workers: workers.clone(),
        shutdown: stopping.clone(),
        store_probe: Default::default(),
        auth: authority.clone(),
        publishing: Default::default(),
    });

    // Engine health: pings the engine, publishes its state (admission,
    // reconcile, gossip and /healthz read it), re-adopts containers when
    // it comes back. Ends with the daemon.
    workers.adopt(
        "engine-health",
        tokio::spawn(crate::health::run_engine_monitor(envs.clone())),
    );

    // Reconcile worker: notices containers that stopped on their own and
    // frees their room. Ends with the daemon.
    {
        let envs = envs.clone();
        workers.adopt(
            "reconcile",
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    envs.reconcile().await;
                }
            }),
        );
    }

    // Where this node actually listens (port 0 picks one): for scripts and
    // tests that start a node without fixing its port.
    crate::envs::write_atomic(
        &settings.data_dir.join("http-addr"),
        addr.to_string().as_bytes(),
    )
    .map_err(DaemonError::Serve)?;
    info!(node = %settings.name, http = %addr, store = %settings.store.display(), "node ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    if let Some(every) = crate::watchdog::from_env() {
        info!(node = %settings.name, every_ms = every.as_millis() as u64, "systemd watchdog: pinging while healthy");
        workers.adopt(
            "watchdog",
            tokio::spawn(crate::watchdog::run(state.clone(), every)),
        );
    }
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = {
        let (envs, cluster) = (envs.clone(), cluster.clone());
        async move {
            shutdown.await;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            stopping.cancel();
            // Ordered shutdown: tell the cluster we take nothing new, give
            // in-flight starts a deadline, leave the cluster, stop serving.
            // Running environments are never stopped.
            envs.set_draining();
            cluster.publish().await;
            info!(node = %envs.settings().name, in_flight = envs.in_flight(), "draining");
            let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
            while envs.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if envs.in_flight() > 0 {
                warn!(in_flight = envs.in_flight(), "drain deadline passed: abandoning in-flight starts (they show failed after restart)");
            }
            cluster.shutdown().await;
            info!("left the cluster; running environments stay up");
            let _ = drained_tx.send(());
        }
    };
    // With the peer address: the web page believes a trusted proxy's
    // header only from the configured proxy addresses.
    let serve = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(drain)
    .into_future();
    // Graceful, but bounded: answers still open [`CLOSE_GRACE`] after the
    // drain are cut off (the stop timeout of the unit must not be reached).
    let served = tokio::select! {
        served = serve => served,
        () = async {
            match drained_rx.await {
                Ok(()) => tokio::time::sleep(CLOSE_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            warn!(grace_secs = CLOSE_GRACE.as_secs(), "connections still open after the drain: closing them");
            Ok(())
        }
    };
    workers.abort_all();
    served.map_err(DaemonError::Serve)
}

/// The cluster keyring, per `cluster_key`: read the given file, or create
/// `<data_dir>/cluster.key` on first start; `None` for unsealed gossip.
/// Only key ids are logged, never key bytes.
fn load_keyring(settings: &Settings) -> Result<Option<Arc<Keyring>>, DaemonError> {
    let (keyring, path, created) = match &settings.cluster_key {
        KeyFile::None => {
            warn!(node = %settings.name, "no cluster key: gossip is unsealed (--insecure-gossip); anyone who reaches the gossip port can join");
            return Ok(None);
        }
        KeyFile::Given(p) => (Keyring::load(p)?, p, false),
        KeyFile::Default(p) => {
            let (k, created) = Keyring::load_or_create(p)?;
            (k, p, created)
        }
    };
    let ids: Vec<String> = keyring.ids().iter().map(|i| i.to_string()).collect();
    if created {
        info!(node = %settings.name, key_file = %path.display(), key_id = %ids[0], "created a new cluster key (give a copy to every node that joins this one)");
    }
    info!(node = %settings.name, key_file = %path.display(), key_ids = ?ids, seal = settings.gossip_seal.as_str(), "cluster key loaded");
    Ok(Some(Arc::new(keyring)))
}

/// The keys that sign and verify user tokens: the cluster keyring, or,
/// for a node that gossips unsealed without one (`--insecure-gossip`),
/// `<data_dir>/cluster.key`, created on first start: tokens are required in
/// every mode (such a node's tokens verify only where that file is).
fn token_keyring(
    settings: &Settings,
    keyring: Option<&Arc<Keyring>>,
) -> Result<Arc<Keyring>, DaemonError> {
    if let Some(k) = keyring {
        return Ok(k.clone());
    }
    let path = settings.data_dir.join("cluster.key");
    let (k, created) = Keyring::load_or_create(&path)?;
    if created {
        info!(node = %settings.name, key_file = %path.display(), "created a key for user tokens (gossip stays unsealed)");
    }
    Ok(Arc::new(k))
}

/// Builds the embedded demo image and publishes it as [`DEMO_REF`] unless
/// the store has it already. The build's own tag is removed afterwards, so
/// the first environment really loads the image from the store.
pub async fn ensure_demo(engine: &Engine, store: &Store) -> Result<(), DaemonError> {
    let r: ImageRef = DEMO_REF.parse().expect("valid ref");
    let st = store.clone();
    let r2 = r.clone();
    if tokio::task::spawn_blocking(move || st.get(&r2).is_ok())
        .await
        .unwrap_or(false)
    {
        return Ok(());
    }
    let tag = "shoal-demo-build:latest";
    let context = crate::demo::DemoImage::default().context_tar();
    engine
        .build(context, tag, Default::default(), Default::default())
        .await?;
    let img = engine
        .image(tag)
        .await?
        .ok_or_else(|| DaemonError::Demo("the built image is missing".into()))?;
    let hint = PublishHint {
        diff_ids: img.diff_ids.clone(),
    };
    crate::transfer::publish(engine, store, &img.id, &r, hint).await?;
    engine.remove_image(tag).await?;
    info!(image = %r, "demo image published");
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => info!(signal = "SIGINT", "signal received"),
    }
}
