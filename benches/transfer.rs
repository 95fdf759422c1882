//! Publish and load, side by side with Docker's own tools, in one run on a
//! generated image (half random bytes, half compressible text, many files):
//!
//! - load: shoal's streamed load vs `lz4 -dc | docker load` vs `docker load`
//!   of the uncompressed tar;
//! - publish: shoal's publish vs `docker save | lz4 -1`;
//! - thin: loading a derived image whose base the engine holds vs loading
//!   it whole;
//! - the same across separate hosts (`tests/common/hosts.rs`), end to end
//!   through the API: the derived image requested on a host whose engine
//!   holds the base (it loads the delta) and on a host that holds nothing
//!   (it loads everything), as ratios of bytes and load time.
//!
//! `cargo bench --bench transfer` runs it on a 1 GiB image
//! (`SHOAL_BENCH_MIB` sets the size, `SHOAL_BENCH_REPS` the repetitions; the
//! best of each is kept). Run without `--bench` (as `cargo test` does) it
//! makes a 16 MiB image: a quick check that every path works. Every image
//! it makes is removed at the end.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{ensure, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use shoal::archive::held_prefix;
use shoal::docker::Engine;
use shoal::store::{ImageRef, PublishHint, Store};
use shoal::transfer;

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("SHOAL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1024 } else { 16 });
    let reps: usize = std::env::var("SHOAL_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 2 } else { 1 });
    let rt = tokio::runtime::Runtime::new()?;
    let prefix = format!("shoalbench{}", std::process::id());
    let result = rt.block_on(run(&prefix, mib, reps));
    // Remove every image this run made, whatever happened.
    for tag in ["base:1", "derived:1"] {
        docker(&["rmi", "-f", &format!("{prefix}/{tag}")]).ok();
        docker(&[
            "rmi",
            "-f",
            &format!("shoal/{prefix}-{}", tag.replace("/", "-")),
        ])
        .ok();
    }
    result?;
    rt.block_on(on_hosts(mib))
}

/// Seconds of the "image loaded" log line of environment `id`.
fn load_secs(log: &str, id: &str) -> Option<f64> {
    let line = log
        .lines()
        .find(|l| l.contains("image loaded") && l.contains(&format!("env={id}")))?;
    let v = line.split("secs=").nth(1)?.split_whitespace().next()?;
    v.trim_matches('"').parse().ok()
}

/// Thin vs whole load across hosts: host 1 holds the base (an environment
/// of it runs there), host 2 holds nothing; both get the derived image.
async fn on_hosts(mib: u64) -> Result<()> {
    use common::hosts::Hosts;
    use serde_json::json;
    use shoal::demo::DemoImage;
    let hosts = Hosts::up_each(
        3,
        &["--ready-timeout", "10m"],
        &[
            &["--role", "master"],
            &["--role", "slave", "--label", "pin=1"],
            &["--role", "slave", "--label", "pin=2"],
        ],
    )
    .await?;
    let h0 = hosts.host(0);
    let base_src = "hostbench-base/img:1";
    let mut payload = vec![0u8; (mib << 20) as usize];
    rand::thread_rng().fill_bytes(&mut payload);
    let base = DemoImage {
        extra_files: vec![("/payload".into(), payload)],
        ..Default::default()
    };
    common::build_image(&h0.engine, base_src, &base).await?;
    let (code, body) = common::raw(
        &h0.client,
        "POST",
        "/v1/images",
        Some(
            json!({"source": base_src, "ref": "hb-base:1"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    ensure!(code == 201, "{body}");
    let mut extra = vec![0u8; ((mib / 32).max(1) << 20) as usize];
    rand::thread_rng().fill_bytes(&mut extra);
    let derived = DemoImage {
        from: Some(base_src.into()),
        extra_files: vec![("/extra".into(), extra)],
        ..Default::default()
    };
    hosts.publish(0, "hb-app:1", &derived).await?;
    h0.engine.remove_image(base_src).await?;

    // Returns (bytes loaded, load seconds, request-to-ready seconds).
    let run_on = |pin: usize, image: &'static str| {
        let hosts = &hosts;
        async move {
            let h = hosts.host(pin);
            let t = Instant::now();
            let (code, body) = h
                .request_env(json!({"image": image, "owner": "t@x", "constraints": {"pin": pin.to_string()}}))
                .await?;
            ensure!(code == 202, "{body}");
            let id = body["id"].as_str().unwrap().to_string();
            let rec = h.wait_settled(&id).await?;
            ensure!(rec.status.as_str() == "ready", "{rec:?}");
            let total = t.elapsed().as_secs_f64();
            let local = h.local_envs().await?;
            let r = local.iter().find(|r| r.id == id).context("local record")?;
            let secs = load_secs(&hosts.shoal_log(pin), &id).context("load time in the log")?;
            anyhow::Ok((r.load.bytes_needed, secs, total))
        }
    };
    run_on(1, "hb-base:1").await?;
    let (thin_b, thin_s, thin_t) = run_on(1, "hb-app:1").await?;
    let (whole_b, whole_s, whole_t) = run_on(2, "hb-app:1").await?;
    println!();
    println!("across separate hosts, derived image ({mib} MiB base), through the API:");
    println!(
        "  thin (host holds the base): {:.1} MB loaded in {thin_s:.2} s, ready after {thin_t:.2} s",
        thin_b as f64 / 1e6
    );
    println!(
        "  whole (host holds nothing): {:.1} MB loaded in {whole_s:.2} s, ready after {whole_t:.2} s",
        whole_b as f64 / 1e6
    );
    println!(
        "ratio thin / whole across hosts: bytes {:.3}, load time {:.3}, request to ready {:.3}",
        thin_b as f64 / whole_b as f64,
        thin_s / whole_s.max(1e-9),
        thin_t / whole_t.max(1e-9)
    );
    Ok(())
}

fn docker(args: &[&str]) -> Result<()> {
    let st = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(st.success(), "docker {args:?} failed");
    Ok(())
}

fn sh(script: &str) -> Result<()> {
    let st = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .stdout(Stdio::null())
        .status()?;
    ensure!(st.success(), "`{script}` failed");
    Ok(())
}

/// Writes a layer tar of about `mib` MiB: 1 MiB files, alternately random
/// and text that compresses about 4:1 (log lines with numbers).
fn make_rootfs_tar(path: &Path, mib: u64) -> Result<()> {
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..mib {
        if i % 2 == 0 {
            rng.fill_bytes(&mut buf);
        } else {
            let mut text = Vec::with_capacity(buf.len());
            while text.len() < buf.len() {
                let _ = writeln!(
                    text,
                    "2015-11-03 02:{:02}:{:02} INFO erp.install step {} of 480 done in {} ms",
                    rng.gen_range(0..60),
                    rng.gen_range(0..60),
                    rng.gen_range(1..480),
                    rng.gen_range(1..99999)
                );
            }
            text.truncate(buf.len());
            buf.copy_from_slice(&text);
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(buf.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_446_000_000);
        b.append_data(&mut h, format!("data/d{}/f{i:05}", i / 64), &buf[..])?;
    }
    b.into_inner()?.flush()?;
    Ok(())
}

fn secs(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

async fn asecs<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<f64> {
    let t = Instant::now();
    f.await?;
    Ok(t.elapsed().as_secs_f64())
}

fn best(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::INFINITY, f64::min)
}

async fn run(prefix: &str, mib: u64, reps: usize) -> Result<()> {
    let engine = Engine::connect().await?;
    let info = engine.info().await?;
    let tmp = tempfile::tempdir_in(
        std::env::var("SHOAL_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )?;
    let dir = tmp.path();
    let store = Store::open(&dir.join("store"))?;
    println!(
        "engine {} ({}), storage driver {}, image {mib} MiB, best of {reps}",
        info.server_version, info.api_version, info.storage_driver
    );

    // The images: a base from a generated rootfs, and a derived one with
    // one small layer of its own.
    let base_tag = format!("{prefix}/base:1");
    let derived_tag = format!("{prefix}/derived:1");
    let rootfs = dir.join("rootfs.tar");
    make_rootfs_tar(&rootfs, mib)?;
    sh(&format!("docker import {} {base_tag}", rootfs.display()))?;
    std::fs::remove_file(&rootfs)?;
    let extra = (mib / 32).max(1);
    let mut ctx = tar::Builder::new(Vec::new());
    let dockerfile = format!("FROM {base_tag}\nCOPY extra /extra\n");
    let mut h = tar::Header::new_gnu();
    h.set_size(dockerfile.len() as u64);
    h.set_mode(0o644);
    ctx.append_data(&mut h, "Dockerfile", dockerfile.as_bytes())?;
    let mut payload = vec![0u8; (extra << 20) as usize];
    rand::thread_rng().fill_bytes(&mut payload);
    let mut h = tar::Header::new_gnu();
    h.set_size(payload.len() as u64);
    h.set_mode(0o644);
    ctx.append_data(&mut h, "extra", &payload[..])?;
    engine
        .build(
            ctx.into_inner()?,
            &derived_tag,
            Default::default(),
            Default::default(),
        )
        .await?;

    // Publish: shoal vs docker save | lz4 -1.
    let base_ref: ImageRef = format!("{prefix}-base:1").parse()?;
    let derived_ref: ImageRef = format!("{prefix}-derived:1").parse()?;
    let base_img = engine.image(&base_tag).await?.context("base image")?;
    let lz4_file = dir.join("base.tar.lz4");
    let tar_file = dir.join("base.tar");
    let mut t_save_lz4 = Vec::new();
    let mut t_publish = Vec::new();
    for _ in 0..reps {
        t_save_lz4.push(secs(|| {
            sh(&format!(
                "docker save {base_tag} | lz4 -1 -q -f - {}",
                lz4_file.display()
            ))
        })?);
        let st = Store::open(&dir.join(format!("store-{}", t_publish.len())))?;
        let hint = PublishHint {
            diff_ids: base_img.diff_ids.clone(),
        };
        t_publish.push(
            asecs(async {
                transfer::publish(&engine, &st, &base_tag, &base_ref, hint).await?;
                Ok(())
            })
            .await?,
        );
        std::fs::remove_dir_all(st.root())?;
    }
    let hint = PublishHint {
        diff_ids: base_img.diff_ids.clone(),
    };
    let (base_m, _) = transfer::publish(&engine, &store, &base_tag, &base_ref, hint).await?;
    let derived_img = engine.image(&derived_tag).await?.context("derived image")?;
    let hint = PublishHint {
        diff_ids: derived_img.diff_ids.clone(),
    };
    let (derived_m, derived_stats) =
        transfer::publish(&engine, &store, &derived_tag, &derived_ref, hint).await?;
    sh(&format!("docker save -o {} {base_tag}", tar_file.display()))?;
    let lz4_size = std::fs::metadata(&lz4_file)?.len();
    let tar_size = std::fs::metadata(&tar_file)?.len();

    // Loads of the base into an engine without it.
    docker(&["rmi", "-f", &derived_tag])?;
    docker(&["rmi", "-f", &base_tag])?;
    let shoal_tag = base_ref.docker_tag();
    let (mut t_plain, mut t_lz4, mut t_shoal) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        t_plain.push(secs(|| {
            sh(&format!("docker load -q -i {}", tar_file.display()))
        })?);
        docker(&["rmi", "-f", &base_tag])?;
        t_lz4.push(secs(|| {
            sh(&format!("lz4 -dc {} | docker load -q", lz4_file.display()))
        })?);
        docker(&["rmi", "-f", &base_tag])?;
        t_shoal.push(
            asecs(async {
                transfer::load(&engine, &store, &base_m, 0, Box::new(|_| {})).await?;
                Ok(())
            })
            .await?,
        );
        docker(&["rmi", "-f", &shoal_tag])?;
    }

    // shoal's side alone: the load archive written to nowhere (decompress,
    // hash, tar), to tell its cost from the engine's.
    let mut t_produce = Vec::new();
    for _ in 0..reps {
        let st = store.clone();
        let m = base_m.clone();
        t_produce.push(secs(|| {
            st.write_load_archive(&m, 0, "x:1", std::io::sink(), &mut |_| {})?;
            Ok(())
        })?);
    }

    // Thin: the derived image with its base held, vs whole.
    let (mut t_thin, mut t_whole) = (Vec::new(), Vec::new());
    let derived_shoal_tag = derived_ref.docker_tag();
    let mut thin_bytes = 0;
    for _ in 0..reps {
        transfer::load(&engine, &store, &base_m, 0, Box::new(|_| {})).await?;
        let held: HashSet<_> = engine.held_chain_ids().await?;
        let skip = held_prefix(&derived_m.chain_ids(), &held);
        ensure!(
            skip == base_m.layers.len(),
            "the engine should hold the base chain"
        );
        let t = Instant::now();
        let stats = transfer::load(&engine, &store, &derived_m, skip, Box::new(|_| {})).await?;
        t_thin.push(t.elapsed().as_secs_f64());
        thin_bytes = stats.bytes_sent;
        docker(&["rmi", "-f", &derived_shoal_tag])?;
        docker(&["rmi", "-f", &shoal_tag])?;
        t_whole.push(
            asecs(async {
                transfer::load(&engine, &store, &derived_m, 0, Box::new(|_| {})).await?;
                Ok(())
            })
            .await?,
        );
        docker(&["rmi", "-f", &derived_shoal_tag])?;
    }

    let mb = |bytes: u64, s: f64| bytes as f64 / s / 1e6;
    let size = base_m.size();
    println!();
    println!("{:<44} {:>9} {:>10}", "path", "seconds", "MB/s");
    let row =
        |name: &str, t: f64, bytes: u64| println!("{name:<44} {t:>9.2} {:>10.1}", mb(bytes, t));
    row("publish: docker save | lz4 -1", best(&t_save_lz4), size);
    row("publish: shoal", best(&t_publish), size);
    row("load: docker load (uncompressed tar)", best(&t_plain), size);
    row("load: lz4 -dc | docker load", best(&t_lz4), size);
    row("load: shoal", best(&t_shoal), size);
    row(
        "  of which shoal's archive alone (to /dev/null)",
        best(&t_produce),
        size,
    );
    row(
        "thin load of derived: shoal, base held",
        best(&t_thin),
        thin_bytes,
    );
    row(
        "whole load of derived: shoal",
        best(&t_whole),
        derived_m.size(),
    );
    println!();
    println!(
        "image {} MB uncompressed, {} MB as one lz4 archive, {} MB in the store ({} layer files)",
        size / 1_000_000,
        lz4_size / 1_000_000,
        base_m.compressed_size() / 1_000_000,
        base_m.layers.len()
    );
    println!("uncompressed save tar {} MB", tar_size / 1_000_000);
    println!(
        "derived image adds {} layer(s), {} MB to the store; its full save is {} MB",
        derived_stats.layers_added,
        derived_stats.bytes_added / 1_000_000,
        derived_m.size() / 1_000_000
    );
    println!();
    println!(
        "ratio shoal load / lz4 -dc | docker load  = {:.3}  (goal <= 1.00)",
        best(&t_shoal) / best(&t_lz4)
    );
    println!(
        "ratio shoal load / docker load (tar)      = {:.3}  (goal <= 1.10)",
        best(&t_shoal) / best(&t_plain)
    );
    println!(
        "ratio shoal publish / docker save | lz4   = {:.3}  (goal <= 1.00)",
        best(&t_publish) / best(&t_save_lz4)
    );
    println!(
        "ratio thin load / whole load (derived)    = {:.3}  (bytes {:.3})",
        best(&t_thin) / best(&t_whole),
        thin_bytes as f64 / derived_m.size() as f64
    );
    Ok(())
}
