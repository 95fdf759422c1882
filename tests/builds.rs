//! The build watcher on the real Docker engine: builds dropped into a
//! directory become published images (base and derived, with privileged
//! install steps), failures are recorded with their log and never reach
//! the catalog, half-copied builds wait for their marker, path attacks are
//! refused, retention keeps the newest N and what environments use, and a
//! dropped build ends as an environment that answers.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;
use serde_json::{json, Value};
use shoal::builds::BuildRecord;
use shoal::docker::Engine;
use shoal::model::{EnvRecord, ImageInfo};
use shoal::store::{Manifest, Store};

/// A build node with its drop and recipes directories, and the names it
/// makes registered for cleanup.
struct Rig {
    _tmp: tempfile::TempDir,
    drop: PathBuf,
    recipes: PathBuf,
    store: PathBuf,
    node: Node,
    cleanup: Cleanup,
    engine: Engine,
}

impl Rig {
    async fn start(extra: &[&str]) -> Result<Rig> {
        let tmp = tempfile::tempdir()?;
        let drop = tmp.path().join("drop");
        let recipes = tmp.path().join("recipes");
        std::fs::create_dir_all(&drop)?;
        std::fs::create_dir_all(&recipes)?;
        let name = unique("b");
        let mut cleanup = Cleanup::new();
        cleanup.nodes.push(name.clone());
        let (d, r) = (drop.display().to_string(), recipes.display().to_string());
        let mut args = vec![
            "--drop",
            &d,
            "--recipes",
            &r,
            "--build-rescan",
            "1s",
            "--prune-grace",
            "0s",
            "--image-gc-interval",
            "2s",
        ];
        args.extend_from_slice(extra);
        let store = tmp.path().join("store");
        let node = Node::start(&name, &tmp.path().join("node"), &store, &args).await?;
        Ok(Rig {
            engine: Engine::connect().await?,
            _tmp: tmp,
            drop,
            recipes,
            store,
            node,
            cleanup,
        })
    }

    /// A recipe: Dockerfile, optional recipe.toml, and the demo server.
    fn recipe(&self, product: &str, dockerfile: &str, toml: Option<&str>) -> Result<()> {
        let dir = self.recipes.join(product);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("Dockerfile"), dockerfile)?;
        if let Some(t) = toml {
            std::fs::write(dir.join("recipe.toml"), t)?;
        }
        let server = dir.join("demo-server");
        std::fs::write(&server, shoal::demo::SERVER)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// Writes a build's files into the drop directory (marker last), and
    /// registers what building it makes in the engine.
    fn drop_build(&mut self, product: &str, build: &str, marker: bool) -> Result<PathBuf> {
        let dir = self.drop.join(product).join(build);
        std::fs::create_dir_all(dir.join("bin"))?;
        std::fs::write(dir.join("bin/payload"), random_bytes(128 << 10))?;
        std::fs::write(dir.join("VERSION"), format!("{product} {build}\n"))?;
        if marker {
            std::fs::write(dir.join("BUILD_COMPLETE"), b"")?;
        }
        self.cleanup.images.push(format!("shoal/{product}:{build}"));
        self.cleanup
            .images
            .push(format!("shoal-build/{product}:{build}"));
        self.cleanup
            .containers
            .push(format!("shoal-install-{product}-{build}"));
        Ok(dir)
    }

    async fn builds(&self) -> Result<Vec<BuildRecord>> {
        Ok(self.node.client.get("/v1/builds").await?)
    }

    async fn find(&self, product: &str, build: &str) -> Result<Option<BuildRecord>> {
        Ok(self
            .builds()
            .await?
            .into_iter()
            .find(|b| b.product == product && b.build == build))
    }

    /// Polls until the build is published or failed.
    async fn settled(&self, product: &str, build: &str) -> Result<BuildRecord> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(b) = self.find(product, build).await? {
                if matches!(b.status.to_string().as_str(), "published" | "failed") {
                    return Ok(b);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "build {product}/{build} did not settle: {}",
                    self.node.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn catalog(&self) -> Result<Vec<String>> {
        let list: Vec<ImageInfo> = self.node.client.get("/v1/images").await?;
        Ok(list.into_iter().map(|i| i.image_ref).collect())
    }

    async fn log(&self, product: &str, build: &str) -> Result<(u16, String)> {
        let (status, body) = self
            .node
            .client
            .send_raw(
                "GET".parse().unwrap(),
                &format!("/v1/builds/{product}/{build}/log"),
                None,
            )
            .await?;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    fn manifest(&self, r: &str) -> Result<Manifest> {
        Ok(Store::open(&self.store)?.get(&r.parse()?)?)
    }
}

/// A FROM-scratch product: the demo server plus the build's files.
fn base_dockerfile() -> &'static str {
    r#"FROM scratch
ARG PRODUCT
ARG BUILD_ID
COPY demo-server /demo-server
COPY build/ /opt/build/
ENV PORT=8080 DEMO_MESSAGE=built-${PRODUCT}-${BUILD_ID}
LABEL shoal.memory="64MiB"
EXPOSE 8080/tcp
HEALTHCHECK --interval=1s --timeout=2s --retries=3 CMD ["/demo-server","--check"]
CMD ["/demo-server"]
"#
}

/// A product built FROM its base product's newest published build.
fn derived_dockerfile() -> &'static str {
    r#"ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG PRODUCT
ARG BUILD_ID
COPY build/ /opt/app/
ENV DEMO_MESSAGE=built-${PRODUCT}-${BUILD_ID}
"#
}

/// The file `path` (no leading slash) in the image's top layer.
fn file_in_top_layer(store: &Path, m: &Manifest, path: &str) -> Result<String> {
    let store = Store::open(store)?;
    let top = m.layers.last().context("no layers")?;
    let f = std::fs::File::open(store.layer_path(&top.diff_id))?;
    let mut a = tar::Archive::new(lz4::Decoder::new(f)?);
    for e in a.entries()? {
        let mut e = e?;
        if e.path()?.to_string_lossy().trim_start_matches("./") == path {
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            return Ok(s);
        }
    }
    bail!("{path} is not in the top layer")
}

/// Whether a `CapEff: <hex>` line shows CAP_SYS_ADMIN (bit 21), which only
/// a privileged container has.
fn has_sys_admin(text: &str) -> bool {
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 21) != 0)
}

#[tokio::test(flavor = "multi_thread")]
async fn base_and_derived_builds_with_privileged_installs() -> Result<()> {
    let mut rig = Rig::start(&[]).await?;
    let db = unique("db");
    let app = unique("app");
    rig.recipe(
        &db,
        base_dockerfile(),
        Some(
            r#"timeout = "10m"
[privileged_install]
command = ["/demo-server", "--install", "/opt/db/installed", "database installed"]
capabilities = ["SYS_ADMIN"]
"#,
        ),
    )?;
    rig.recipe(
        &app,
        derived_dockerfile(),
        Some(&format!(
            r#"base = "{db}"
[privileged_install]
command = ["/demo-server", "--install", "/opt/app/installed", "server installed"]
env = {{ INSTALL_MODE = "silent" }}
capabilities = ["SYS_ADMIN", "NET_ADMIN"]
"#
        )),
    )?;

    rig.drop_build(&db, "20151103.1", true)?;
    let b = rig.settled(&db, "20151103.1").await?;
    assert_eq!(
        b.status.to_string(),
        "published",
        "{b:?}\n{}",
        rig.node.log()
    );
    assert_eq!(
        b.image.as_deref(),
        Some(format!("{db}:20151103.1").as_str())
    );
    rig.drop_build(&app, "7", true)?;
    let a = rig.settled(&app, "7").await?;
    assert_eq!(
        a.status.to_string(),
        "published",
        "{a:?}\n{}",
        rig.node.log()
    );
    assert_eq!(a.base.as_deref(), Some(format!("{db}:20151103.1").as_str()));
    for t in [&b.timings, &a.timings] {
        assert!(t.build_ms.is_some() && t.install_ms.is_some() && t.publish_ms.is_some());
    }

    // Both in the catalog, newest first.
    let catalog = rig.catalog().await?;
    assert_eq!(catalog, [format!("{app}:7"), format!("{db}:20151103.1")]);

    // The derived image stores only its own layers: the base's are shared.
    let dbm = rig.manifest(&format!("{db}:20151103.1"))?;
    let appm = rig.manifest(&format!("{app}:7"))?;
    assert_eq!(appm.base, Some(dbm.image_ref()));
    assert_eq!(appm.layers[..dbm.layers.len()], dbm.layers[..]);
    let own: u64 = appm.layers[dbm.layers.len()..]
        .iter()
        .map(|l| l.compressed_size)
        .sum();
    assert_eq!(a.bytes_added, Some(own));
    assert!(
        own < dbm.compressed_size(),
        "{own} vs {}",
        dbm.compressed_size()
    );

    // The install steps ran with the capability a default container lacks,
    // and their files are in the images.
    let db_file = file_in_top_layer(&rig.store, &dbm, "opt/db/installed")?;
    assert!(db_file.starts_with("database installed"), "{db_file}");
    assert!(has_sys_admin(&db_file), "not privileged: {db_file}");
    let app_file = file_in_top_layer(&rig.store, &appm, "opt/app/installed")?;
    assert!(app_file.starts_with("server installed"), "{app_file}");
    assert!(has_sys_admin(&app_file), "not privileged: {app_file}");

    // The commit kept the image's command, health check and ports, not the
    // installer's.
    let config: Value = serde_json::from_str(&appm.config)?;
    assert_eq!(config["config"]["Cmd"], json!(["/demo-server"]), "{config}");
    let ep = &config["config"]["Entrypoint"];
    assert!(ep.is_null() || ep == &json!([]), "{ep}");
    assert!(appm.healthcheck);
    assert_eq!(appm.exposed_ports, [8080]);
    assert_eq!(
        config["config"]["Labels"]["shoal.memory"],
        json!("64MiB"),
        "{config}"
    );

    // The logs are served, with the installers' output.
    let (code, log) = rig.log(&app, "7").await?;
    assert_eq!(code, 200);
    assert!(log.contains("installed /opt/app/installed"), "{log}");
    assert!(
        log.contains(&format!("BASE_IMAGE=shoal/{db}:20151103.1")),
        "{log}"
    );
    let (code, _) = rig.log(&app, "8").await?;
    assert_eq!(code, 404);

    // No work tag or installer container is left behind.
    assert!(rig
        .engine
        .image(&format!("shoal-build/{app}:7"))
        .await?
        .is_none());
    assert!(rig
        .engine
        .container(&format!("shoal-install-{app}-7"))
        .await?
        .is_none());
    Ok(())
}

/// Whether this engine can start a fully privileged container at all (an
/// engine inside a container with a reduced capability bounding set, as
/// Docker 20.10 under fuse-overlayfs here, cannot: "unable to apply caps").
async fn engine_runs_privileged(
    engine: &Engine,
    cleanup: &mut Cleanup,
) -> Result<Result<(), String>> {
    let tag = format!("{}/probe:1", unique("priv"));
    cleanup.images.push(tag.clone());
    build_image(engine, &tag, &shoal::demo::DemoImage::default()).await?;
    let name = unique("shoal-probe-");
    cleanup.containers.push(name.clone());
    let cmd = ["/demo-server".to_string(), "--install".into(), "/x".into()];
    let res = match engine
        .run_privileged(&name, &tag, &cmd, &Default::default(), None)
        .await
    {
        Ok(id) => match engine.wait_exit(&id).await? {
            0 => Ok(()),
            code => Err(format!("probe exited with {code}")),
        },
        Err(e) => Err(e.to_string()),
    };
    engine.remove_container(&name).await?;
    Ok(res)
}

/// The install step with no `capabilities`: `docker run --privileged`. On
/// an engine that can run privileged containers the installer gets every
/// capability (CAP_SYS_MODULE, which no default container has); on one
/// that cannot, the build fails with the engine's reason, recorded, and
/// nothing reaches the catalog.
#[tokio::test(flavor = "multi_thread")]
async fn fully_privileged_install_step() -> Result<()> {
    let mut rig = Rig::start(&[]).await?;
    let probe = engine_runs_privileged(&rig.engine, &mut rig.cleanup).await?;
    let p = unique("priv");
    rig.recipe(
        &p,
        base_dockerfile(),
        Some(
            r#"[privileged_install]
command = ["/demo-server", "--install", "/opt/p/installed", "privileged"]
"#,
        ),
    )?;
    rig.drop_build(&p, "1", true)?;
    let b = rig.settled(&p, "1").await?;
    let (_, log) = rig.log(&p, "1").await?;
    assert!(log.contains("privileged install"), "{log}");
    match probe {
        Ok(()) => {
            assert_eq!(b.status.to_string(), "published", "{b:?}");
            let m = rig.manifest(&format!("{p}:1"))?;
            let f = file_in_top_layer(&rig.store, &m, "opt/p/installed")?;
            let caps = f
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .context("no CapEff")?;
            assert!(caps & (1 << 16) != 0, "no CAP_SYS_MODULE: {f}");
        }
        Err(why) => {
            eprintln!("this engine cannot run privileged containers: {why}");
            assert_eq!(b.status.to_string(), "failed", "{b:?}");
            let err = b.error.unwrap_or_default();
            assert!(err.contains("caps") || err.contains("privileged"), "{err}");
            assert!(!rig.catalog().await?.contains(&format!("{p}:1")));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_installer_is_recorded_and_half_copied_builds_wait() -> Result<()> {
    let mut rig = Rig::start(&[]).await?;
    let bad = unique("bad");
    let slow = unique("slow");
    rig.recipe(
        &bad,
        base_dockerfile(),
        Some(
            r#"[privileged_install]
command = ["/demo-server", "--fail", "database installer: disk full"]
capabilities = ["SYS_ADMIN"]
"#,
        ),
    )?;
    rig.recipe(&slow, base_dockerfile(), None)?;

    // Copied without the marker: never taken, however many rescans pass.
    rig.drop_build(&slow, "1", false)?;
    rig.drop_build(&bad, "1", true)?;
    let b = rig.settled(&bad, "1").await?;
    assert_eq!(b.status.to_string(), "failed");
    let err = b.error.clone().unwrap_or_default();
    assert!(err.contains("exited with code 1"), "{err}");
    let (code, log) = rig.log(&bad, "1").await?;
    assert_eq!(code, 200);
    assert!(log.contains("database installer: disk full"), "{log}");
    assert!(!rig.catalog().await?.contains(&format!("{bad}:1")));
    assert!(rig.engine.image(&format!("shoal/{bad}:1")).await?.is_none());
    assert!(rig
        .engine
        .image(&format!("shoal-build/{bad}:1"))
        .await?
        .is_none());
    assert!(rig
        .engine
        .container(&format!("shoal-install-{bad}-1"))
        .await?
        .is_none());

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rig.find(&slow, "1").await?.is_none(),
        "taken without marker"
    );
    std::fs::write(rig.drop.join(&slow).join("1").join("BUILD_COMPLETE"), b"")?;
    let s = rig.settled(&slow, "1").await?;
    assert_eq!(s.status.to_string(), "published", "{s:?}");

    // A restart keeps the history.
    rig.node.kill();
    rig.node.spawn().await?;
    let after = rig
        .find(&bad, "1")
        .await?
        .context("failed build forgotten")?;
    assert_eq!(after.status.to_string(), "failed");
    assert_eq!(after.error, b.error);
    assert_eq!(
        rig.find(&slow, "1").await?.map(|b| b.status.to_string()),
        Some("published".into())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_directory_path_attacks_are_refused() -> Result<()> {
    let mut rig = Rig::start(&[]).await?;
    let p = unique("p");
    rig.recipe(&p, base_dockerfile(), None)?;
    // Outside the drop directory: a directory that looks like a build.
    let outside = rig.drop.parent().unwrap().join("outside");
    std::fs::create_dir_all(outside.join("1"))?;
    std::fs::write(outside.join("1/BUILD_COMPLETE"), b"")?;
    std::fs::write(outside.join("BUILD_COMPLETE"), b"")?;
    std::fs::create_dir_all(rig.drop.join(&p))?;
    // A build that is a symlink out, one through `..`, a product that is.
    std::os::unix::fs::symlink(&outside, rig.drop.join(&p).join("2"))?;
    std::os::unix::fs::symlink("../../outside", rig.drop.join(&p).join("3"))?;
    let evil = unique("evil");
    std::os::unix::fs::symlink(&outside, rig.drop.join(&evil))?;
    // Bad ids.
    for bad in ["bad$id", "-1", "a b"] {
        let d = rig.drop.join(&p).join(bad);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("BUILD_COMPLETE"), b"")?;
    }
    // One good build, so we know scans happened.
    rig.drop_build(&p, "1", true)?;
    let ok = rig.settled(&p, "1").await?;
    assert_eq!(ok.status.to_string(), "published");

    let builds = rig.builds().await?;
    let refused: Vec<&BuildRecord> = builds
        .iter()
        .filter(|b| b.error.as_deref().is_some_and(|e| e.starts_with("refused")))
        .collect();
    let mut names: Vec<String> = refused
        .iter()
        .map(|b| format!("{}/{}", b.product, b.build))
        .collect();
    names.sort();
    let mut want = vec![
        format!("{p}/-1"),
        format!("{p}/2"),
        format!("{p}/3"),
        format!("{p}/a b"),
        format!("{p}/bad$id"),
        format!("{evil}/"),
    ];
    want.sort();
    assert_eq!(names, want, "{builds:#?}");
    for b in &refused {
        assert_eq!(b.status.to_string(), "failed");
        assert!(b.image.is_none());
    }
    let outside_err = refused.iter().find(|b| b.build == "2").unwrap();
    assert!(
        outside_err
            .error
            .as_deref()
            .unwrap()
            .contains("outside the drop directory"),
        "{outside_err:?}"
    );
    assert_eq!(rig.catalog().await?, [format!("{p}:1")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_newest_and_builds_in_use() -> Result<()> {
    let mut rig = Rig::start(&["--keep", "2"]).await?;
    let r = unique("r");
    rig.recipe(&r, base_dockerfile(), None)?;
    rig.drop_build(&r, "1", true)?;
    assert_eq!(rig.settled(&r, "1").await?.status.to_string(), "published");
    let m1 = rig.manifest(&format!("{r}:1"))?;

    // An environment uses the oldest build.
    let (code, body) = rig
        .node
        .request_env(json!({"image": format!("{r}:1"), "owner": "t@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let env: EnvRecord = serde_json::from_value(body)?;
    let env = rig.node.wait_settled(&env.id).await?;
    assert_eq!(env.status.as_str(), "ready", "{env:?}");

    for b in ["2", "3"] {
        rig.drop_build(&r, b, true)?;
        assert_eq!(rig.settled(&r, b).await?.status.to_string(), "published");
    }
    // Past rescans and the prune after each build: 1 stays, it is in use.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rig.catalog().await?,
        [format!("{r}:3"), format!("{r}:2"), format!("{r}:1")]
    );

    // Without the environment, the oldest goes: manifest, its own layer
    // files, its record says pruned, and the image GC untags it.
    let (code, _) = raw(
        &rig.node.client,
        "DELETE",
        &format!("/v1/environments/{}", env.id),
        None,
    )
    .await?;
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rig.catalog().await?.len() > 2 {
        if Instant::now() > deadline {
            bail!("build 1 was not pruned: {}", rig.node.log());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(rig.catalog().await?, [format!("{r}:3"), format!("{r}:2")]);
    let store = Store::open(&rig.store)?;
    let kept: Vec<Manifest> = ["2", "3"]
        .iter()
        .map(|b| rig.manifest(&format!("{r}:{b}")))
        .collect::<Result<_>>()?;
    for m in &kept {
        for l in &m.layers {
            assert!(store.layer_path(&l.diff_id).exists());
        }
    }
    let own = m1.layers.last().unwrap();
    assert!(kept.iter().all(|m| !m.layers.contains(own)));
    assert!(
        !store.layer_path(&own.diff_id).exists(),
        "unreferenced layer kept"
    );
    assert_eq!(
        rig.find(&r, "1").await?.map(|b| b.status.to_string()),
        Some("pruned".into())
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.engine.image(&format!("shoal/{r}:1")).await?.is_some() {
        if Instant::now() > deadline {
            bail!("image gc left shoal/{r}:1: {}", rig.node.log());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(rig.engine.image(&format!("shoal/{r}:3")).await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_build_becomes_an_environment_that_answers() -> Result<()> {
    let mut rig = Rig::start(&[]).await?;
    let erp = unique("erp");
    rig.recipe(&erp, base_dockerfile(), None)?;
    let dropped_at = Instant::now();
    rig.drop_build(&erp, "42", true)?;

    // Through the API alone: wait for the catalog, request, use.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !rig.catalog().await?.contains(&format!("{erp}:42")) {
        if Instant::now() > deadline {
            bail!("never published: {}", rig.node.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let published_in = dropped_at.elapsed();
    let (code, body) = rig
        .node
        .request_env(json!({"image": format!("{erp}:42"), "owner": "tester@example.com"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let env: EnvRecord = serde_json::from_value(body)?;
    let env = rig.node.wait_settled(&env.id).await?;
    assert_eq!(env.status.as_str(), "ready", "{env:?}\n{}", rig.node.log());
    let ep = &env.endpoints[0];
    let page = http_get(&ep.host, ep.host_port, "/").await?;
    assert!(page.contains(&format!("built-{erp}-42")), "{page}");
    assert!(page.contains(&env.id), "{page}");
    eprintln!("dropped to published in {published_in:?}");

    // The CLI table shows it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["--node", &rig.node.url, "builds"])
        .env("SHOAL_TOKEN", rig.node.token.as_deref().unwrap_or_default())
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&erp))
        .context("no row")?;
    assert!(row.contains("42") && row.contains("published"), "{table}");
    raw(
        &rig.node.client,
        "DELETE",
        &format!("/v1/environments/{}", env.id),
        None,
    )
    .await?;
    Ok(())
}
