//! The build watcher, end to end on a real daemon process and the real
//! engine: a base product and a derived one (FROM the base's newest build)
//! are dropped into the drop directory, and for each it reports the time
//! from the marker appearing to the build published, split into detection,
//! docker build and publish (the daemon's own timings), plus the store
//! bytes the derived build added against its full `docker save` size.
//!
//! `cargo bench --bench builds` drops a 256 MiB base build and a 32 MiB
//! derived one (`SHOAL_BENCH_MIB` sets the base size; the derived build is
//! an eighth of it). Without `--bench` (as `cargo test --all-targets` runs
//! it) the sizes are 4 MiB and 512 KiB: a check that every path works.
//! Every image and container it makes is removed at the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{random_bytes, unique, Cleanup, Node};
use futures::TryStreamExt;
use shoal::builds::BuildRecord;
use shoal::docker::Engine;

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("SHOAL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 256 } else { 4 });
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(mib))
}

const BASE_DOCKERFILE: &str = r#"FROM scratch
COPY demo-server /demo-server
COPY build/ /opt/db/
ENV PORT=8080
EXPOSE 8080/tcp
CMD ["/demo-server"]
"#;

const DERIVED_DOCKERFILE: &str = r#"ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY build/ /opt/app/
"#;

fn recipe(recipes: &Path, product: &str, dockerfile: &str, toml: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = recipes.join(product);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("Dockerfile"), dockerfile)?;
    std::fs::write(dir.join("recipe.toml"), toml)?;
    let server = dir.join("demo-server");
    std::fs::write(&server, shoal::demo::SERVER)?;
    std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Writes a build of `bytes` random bytes (in 8 MiB files), marker last;
/// returns when the marker was written.
fn drop_build(drop: &Path, product: &str, build: &str, bytes: usize) -> Result<Instant> {
    let dir = drop.join(product).join(build);
    std::fs::create_dir_all(&dir)?;
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let n = left.min(8 << 20);
        std::fs::write(dir.join(format!("part{i}")), random_bytes(n))?;
        left -= n;
        i += 1;
    }
    std::fs::write(dir.join("BUILD_COMPLETE"), b"")?;
    Ok(Instant::now())
}

async fn published(
    node: &Node,
    product: &str,
    build: &str,
    marker: Instant,
) -> Result<(BuildRecord, Duration)> {
    let deadline = marker + Duration::from_secs(1800);
    loop {
        let list: Vec<BuildRecord> = node.client.get("/v1/builds").await?;
        if let Some(b) = list
            .iter()
            .find(|b| b.product == product && b.build == build)
        {
            match b.status.to_string().as_str() {
                "published" => return Ok((b.clone(), marker.elapsed())),
                "failed" => bail!("build failed: {:?}\n{}", b.error, node.log()),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("build {product}/{build} not published: {}", node.log());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn secs(ms: Option<u64>) -> String {
    ms.map(|m| format!("{:.2}s", m as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn report(what: &str, b: &BuildRecord, wall: Duration) {
    let t = &b.timings;
    println!(
        "{what:<8} marker→published {:.2}s  (detect {}, docker build {}, install {}, publish {})",
        wall.as_secs_f64(),
        secs(t.detect_ms),
        secs(t.build_ms),
        secs(t.install_ms),
        secs(t.publish_ms),
    );
}

async fn run(mib: usize) -> Result<()> {
    let engine = Engine::connect().await?;
    let tmp = tempfile::tempdir()?;
    let drop_dir = tmp.path().join("drop");
    let recipes = tmp.path().join("recipes");
    std::fs::create_dir_all(&drop_dir)?;
    let db = unique("benchdb");
    let app = unique("benchapp");
    recipe(&recipes, &db, BASE_DOCKERFILE, "")?;
    recipe(
        &recipes,
        &app,
        DERIVED_DOCKERFILE,
        &format!("base = \"{db}\"\n"),
    )?;
    let name = unique("bench");
    let mut cleanup = Cleanup::new();
    cleanup.nodes.push(name.clone());
    for t in [
        format!("shoal/{db}:1"),
        format!("shoal/{app}:1"),
        format!("shoal-build/{db}:1"),
        format!("shoal-build/{app}:1"),
    ] {
        cleanup.images.push(t);
    }
    let (d, r) = (
        drop_dir.display().to_string(),
        recipes.display().to_string(),
    );
    let node = Node::start(
        &name,
        &tmp.path().join("node"),
        &tmp.path().join("store"),
        &["--drop", &d, "--recipes", &r, "--build-rescan", "30s"],
    )
    .await?;

    let base_bytes = mib << 20;
    let derived_bytes = base_bytes / 8;
    println!(
        "build watcher: base build {} MiB, derived build {} KiB (detection by file notifications; rescan 30s)",
        mib,
        derived_bytes >> 10
    );
    let marker = drop_build(&drop_dir, &db, "1", base_bytes)?;
    let (b, wall) = published(&node, &db, "1", marker).await?;
    report("base", &b, wall);
    let marker = drop_build(&drop_dir, &app, "1", derived_bytes)?;
    let (a, wall) = published(&node, &app, "1", marker).await?;
    report("derived", &a, wall);

    let save: u64 = engine
        .export(&format!("shoal/{app}:1"))
        .try_fold(0u64, |n, c| async move { Ok(n + c.len() as u64) })
        .await
        .context("docker save of the derived image")?;
    let added = a.bytes_added.unwrap_or(0);
    println!(
        "derived: store bytes added {} ({} layer files) vs full docker save {} = {:.1}%",
        added,
        a.layers_added.unwrap_or(0),
        save,
        100.0 * added as f64 / save as f64
    );
    drop(node);
    drop(cleanup);
    Ok(())
}
