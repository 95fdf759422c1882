//! `shoal bootstrap render`: the committed files are what the example
//! config renders to (drift), the Ignition JSON has what Flatcar needs and
//! says the same as the Butane and cloud-init files, the binary's hash is
//! the real file's (`sha512sum`), bad configs name their field, and a first
//! boot on a harness host: render for it, write the files its Ignition
//! config holds into a scratch root, start shoal chrooted there from the
//! unit's own ExecStart and config, and see it join the cluster.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::hosts::{wait_for, Plan};
use serde_json::Value;
use shoal::bootstrap::ignition::decode_data_url;
use shoal::bootstrap::{render, BootstrapError, Format, Inputs};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

const EXAMPLE: &str = "cloud-config/bootstrap.example.toml";
const COMMITTED: [(Format, &str, &str); 3] = [
    (Format::Butane, "butane", "cloud-config/flatcar.bu"),
    (Format::Ignition, "ignition", "cloud-config/flatcar.ign"),
    (Format::CloudInit, "cloud-init", "cloud-config/shoal.yaml"),
];

#[test]
fn committed_files_are_rendered_from_the_example() {
    let inputs = Inputs::load(&repo(EXAMPLE)).unwrap();
    for (format, name, path) in COMMITTED {
        let want = std::fs::read_to_string(repo(path)).unwrap();
        let got = render(&inputs, format).unwrap();
        assert!(
            got == want,
            "{path} is not what the example renders to: run\n  shoal bootstrap render --format {name} {EXAMPLE} > {path}"
        );
        // The command itself, as the docs tell an operator to run it.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["bootstrap", "render", "--format", name])
            .arg(repo(EXAMPLE))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == want.as_bytes(),
            "shoal bootstrap render --format {name}"
        );
    }
}

/// Ignition's files as path → (mode, bytes or the remote source and hash).
#[derive(Debug, Clone, PartialEq)]
enum Body {
    Data(Vec<u8>),
    Remote(String, Option<String>),
}

fn ign_files(ign: &Value) -> BTreeMap<String, (u32, Body)> {
    let mut out = BTreeMap::new();
    for f in ign["storage"]["files"].as_array().expect("storage.files") {
        let path = f["path"].as_str().expect("path").to_string();
        assert!(path.starts_with('/'), "{path}");
        let mode = f["mode"].as_u64().expect("mode") as u32;
        let src = f["contents"]["source"].as_str().expect("contents.source");
        let body = if src.starts_with("data:") {
            assert_eq!(f["contents"]["compression"], "", "{path}");
            Body::Data(decode_data_url(src).unwrap_or_else(|| panic!("{path}: bad data URL")))
        } else {
            assert!(src.starts_with("https://"), "{path}: {src}");
            let hash = f["contents"]["verification"]["hash"]
                .as_str()
                .map(str::to_string);
            Body::Remote(src.to_string(), hash)
        };
        assert!(
            out.insert(path.clone(), (mode, body)).is_none(),
            "{path} twice"
        );
    }
    out
}

fn units(ign: &Value) -> BTreeMap<String, Value> {
    ign["systemd"]["units"]
        .as_array()
        .expect("systemd.units")
        .iter()
        .map(|u| (u["name"].as_str().unwrap().to_string(), u.clone()))
        .collect()
}

fn text(b: &Body) -> String {
    match b {
        Body::Data(d) => String::from_utf8(d.clone()).unwrap(),
        other => panic!("not inline: {other:?}"),
    }
}

#[test]
fn ignition_has_what_a_flatcar_box_needs() {
    let ign: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("cloud-config/flatcar.ign")).unwrap())
            .unwrap();
    let v = ign["ignition"]["version"].as_str().unwrap();
    assert!(v.starts_with("3."), "spec {v}");
    let users = ign["passwd"]["users"].as_array().unwrap();
    assert_eq!(users[0]["name"], "core");
    assert!(users[0]["sshAuthorizedKeys"][0]
        .as_str()
        .unwrap()
        .starts_with("ssh-"));
    let files = ign_files(&ign);
    let (mode, bin) = &files["/opt/bin/shoal"];
    assert_eq!(*mode, 0o755);
    match bin {
        Body::Remote(_, Some(h)) => {
            let hex = h.strip_prefix("sha512-").expect("sha512- hash");
            assert!(hex.len() == 128 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        other => panic!("/opt/bin/shoal: {other:?}"),
    }
    assert_eq!(files["/etc/shoal/cluster.key"].0, 0o600);
    assert_eq!(
        text(&files["/etc/sysctl.d/90-shoal-aio.conf"].1),
        std::fs::read_to_string(repo("systemd/shoal-aio.conf")).unwrap()
    );
    assert_eq!(text(&files["/etc/hostname"].1), "worker-1\n");
    let toml_text = text(&files["/etc/shoal/shoal.toml"].1);
    let conf: shoal::config::Config = toml::from_str(&toml_text).expect("a daemon config");
    assert_eq!(conf.name.as_deref(), Some("worker-1"));
    let net = text(&files["/etc/systemd/network/10-shoal-static.network"].1);
    assert!(net.contains("Address=192.0.2.11/24") && net.contains("Gateway=192.0.2.1"));

    let u = units(&ign);
    for name in [
        "shoal.service",
        "docker.service",
        "mnt-shoal\\x2dstore.mount",
    ] {
        assert_eq!(u[name]["enabled"], true, "{name} enabled");
    }
    // Flatcar ships Docker: enabled, not written.
    assert!(u["docker.service"].get("contents").is_none());
    let svc = u["shoal.service"]["contents"].as_str().unwrap();
    assert!(svc.contains("\nExecStart=/opt/bin/shoal daemon --config /etc/shoal/shoal.toml\n"));
    assert!(!svc.contains("/usr/local/bin"));
    assert_eq!(
        svc,
        std::fs::read_to_string(repo("systemd/shoal.service"))
            .unwrap()
            .replace("/usr/local/bin/shoal", "/opt/bin/shoal")
    );
    assert_eq!(u["shoal.service"]["dropins"][0]["name"], "10-store.conf");
    let mount = u["mnt-shoal\\x2dstore.mount"]["contents"].as_str().unwrap();
    assert!(mount.contains("Where=/mnt/shoal-store") && mount.contains("Type=nfs"));
}

/// The Butane file says what the Ignition file says (what `butane` would
/// translate it to), and cloud-init writes the same files and units.
#[test]
fn the_three_files_say_the_same() {
    let read = |p| std::fs::read_to_string(repo(p)).unwrap();
    let ign: Value = serde_json::from_str(&read("cloud-config/flatcar.ign")).unwrap();
    let files = ign_files(&ign);
    let bu: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("cloud-config/flatcar.bu")).unwrap();
    assert_eq!(bu["variant"].as_str(), Some("flatcar"));
    assert!(bu["version"].as_str().unwrap().starts_with("1."));
    let bu_files = bu["storage"]["files"].as_sequence().unwrap();
    assert_eq!(bu_files.len(), files.len());
    for f in bu_files {
        let path = f["path"].as_str().unwrap();
        let (mode, body) = &files[path];
        assert_eq!(f["mode"].as_u64(), Some(*mode as u64), "{path}");
        match body {
            Body::Data(d) => assert_eq!(
                f["contents"]["inline"].as_str().map(str::as_bytes),
                Some(&d[..]),
                "{path}"
            ),
            Body::Remote(src, hash) => {
                assert_eq!(f["contents"]["source"].as_str(), Some(src.as_str()));
                assert_eq!(
                    f["contents"]["verification"]["hash"].as_str(),
                    hash.as_deref()
                );
            }
        }
    }
    let u = units(&ign);
    let bu_units = bu["systemd"]["units"].as_sequence().unwrap();
    assert_eq!(bu_units.len(), u.len());
    for b in bu_units {
        let j = &u[b["name"].as_str().unwrap()];
        assert_eq!(b["enabled"].as_bool(), j["enabled"].as_bool());
        assert_eq!(b["contents"].as_str(), j["contents"].as_str());
    }

    // cloud-init: the same files (but the Debian paths of binary and unit).
    let cc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("cloud-config/shoal.yaml")).unwrap();
    let written: BTreeMap<&str, &str> = cc["write_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["content"].as_str().unwrap()))
        .collect();
    for (path, (_, body)) in &files {
        if let (Body::Data(d), false) = (body, path == "/etc/hostname") {
            assert_eq!(
                written.get(path.as_str()).map(|s| s.as_bytes()),
                Some(&d[..]),
                "{path}"
            );
        }
    }
    // The binary: the same URL and hash, checked by sha512sum before it
    // is moved into place.
    let Body::Remote(url, Some(hash)) = &files["/opt/bin/shoal"].1 else {
        panic!("/opt/bin/shoal is not a download with a hash")
    };
    let runcmd = serde_yaml_ng::to_string(&cc["runcmd"]).unwrap();
    let hex = hash.trim_start_matches("sha512-");
    assert!(
        runcmd.contains(&format!("curl -fsSL '{url}' -o /usr/local/bin/shoal.new && echo '{hex}  /usr/local/bin/shoal.new' | sha512sum -c")),
        "{runcmd}"
    );
    for (name, unit) in &u {
        if let Some(c) = unit["contents"].as_str() {
            let w = written[format!("/etc/systemd/system/{name}").as_str()];
            assert_eq!(
                w.replace("/usr/local/bin/shoal", "/opt/bin/shoal"),
                c,
                "{name}"
            );
        }
    }
}

/// A bootstrap config for one box, as TOML text.
struct Box_ {
    hostname: String,
    address: String,
    gateway: String,
    key: PathBuf,
    binary: PathBuf,
    cluster_id: String,
    seeds: Vec<String>,
}

impl Box_ {
    /// The first box of a cluster (no seeds), with a key written in `dir`
    /// and the built binary.
    fn first(dir: &Path) -> Box_ {
        Box_ {
            hostname: "box-1".into(),
            address: "192.0.2.20/24".into(),
            gateway: "192.0.2.1".into(),
            key: write_key(dir),
            binary: env!("CARGO_BIN_EXE_shoal").into(),
            cluster_id: "c".into(),
            seeds: vec![],
        }
    }

    fn toml(&self) -> String {
        format!(
            r#"hostname = "{}"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest test@lab"]
[network]
interface = "eth0"
address = "{}"
gateway = "{}"
dns = ["{}"]
[binary]
url = "https://downloads.example.invalid/shoal"
file = "{}"
[cluster_key]
file = "{}"
[store]
nfs = "nfs.example.invalid:/export/shoal-store"
[shoal]
cluster_id = "{}"
seeds = {:?}
open_read = false
max_envs = 3
"#,
            self.hostname,
            self.address,
            self.gateway,
            self.gateway,
            self.binary.display(),
            self.key.display(),
            self.cluster_id,
            self.seeds
        )
    }
}

fn write_key(dir: &Path) -> PathBuf {
    let key = dir.join("cluster.key");
    std::fs::write(&key, shoal::keyring::Keyring::generate_line()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}

fn sha512sum(path: &Path) -> String {
    let out = std::process::Command::new("sha512sum")
        .arg(path)
        .output()
        .expect("sha512sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn the_hash_is_the_real_files_and_an_inline_key_is_written_0600() {
    let dir = tempfile::tempdir().unwrap();
    let b = Box_::first(dir.path());
    let conf = dir.path().join("box.toml");
    std::fs::write(&conf, b.toml()).unwrap();
    let out = dir.path().join("box.ign");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["bootstrap", "render", "--format", "ignition", "-o"])
        .arg(&out)
        .arg(&conf)
        .status()
        .unwrap();
    assert!(st.success());
    // It carries the key: a secret, written for root alone.
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let ign: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let files = ign_files(&ign);
    assert_eq!(
        files["/opt/bin/shoal"].1,
        Body::Remote(
            "https://downloads.example.invalid/shoal".into(),
            Some(format!("sha512-{}", sha512sum(&b.binary)))
        )
    );
    assert_eq!(
        text(&files["/etc/shoal/cluster.key"].1),
        std::fs::read_to_string(&b.key).unwrap()
    );
    // The first node: no seeds.
    let t: toml::Table = text(&files["/etc/shoal/shoal.toml"].1).parse().unwrap();
    assert_eq!(t["seeds"].as_array().map(Vec::len), Some(0));
}

#[test]
fn bad_configs_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = Box_::first(dir.path()).toml();
    let cases: &[(&str, &str, &str)] = &[
        ("hostname = \"box-1\"", "hostname = \"-box\"", "hostname"),
        (
            "address = \"192.0.2.20/24\"",
            "address = \"192.0.2.20\"",
            "network.address",
        ),
        (
            "cluster_id = \"c\"",
            "cluster_id = \"c\"\nlisten = \"0.0.0.0:1\"",
            "shoal.listen",
        ),
        ("max_envs = 3", "max_envs = \"many\"", "shoal"),
        (
            "[cluster_key]\n",
            "[cluster_key]\nsource = \"https://k.invalid/k\"\n",
            "cluster_key",
        ),
        ("url = \"https://", "url = \"ftp://", "binary.url"),
        (
            "url = \"https://",
            "url = \"https://x/$(reboot)",
            "binary.url",
        ),
        (
            "nfs = \"nfs.example.invalid:/export/shoal-store\"",
            "nfs = \"nfs\"",
            "store.nfs",
        ),
    ];
    for (from, to, field) in cases {
        assert!(good.contains(from), "{from}");
        let conf = dir.path().join("bad.toml");
        std::fs::write(&conf, good.replacen(from, to, 1)).unwrap();
        let err = Inputs::load(&conf).and_then(|i| render(&i, Format::Ignition));
        match err {
            Err(BootstrapError::Field { field: f, .. }) => assert_eq!(&f, field, "{to}"),
            other => panic!("{to}: {other:?}"),
        }
    }
}

// --- first boot on a harness host -------------------------------------------

/// Writes what the Ignition config holds into `root`: data URLs decoded,
/// the binary "downloaded" (copied from `binary`, as a box fetches it from
/// the URL) and checked against `verification.hash` with `sha512sum`;
/// units and drop-ins under /etc/systemd/system.
fn apply(ign: &Value, root: &Path, binary: &Path) -> Result<()> {
    let put = |path: &str, bytes: &[u8], mode: u32| -> Result<PathBuf> {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, bytes)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(p)
    };
    for (path, (mode, body)) in ign_files(ign) {
        match body {
            Body::Data(d) => {
                put(&path, &d, mode)?;
            }
            Body::Remote(url, hash) => {
                ensure!(
                    path == "/opt/bin/shoal",
                    "unexpected remote {path} from {url}"
                );
                let p = put(&path, &std::fs::read(binary)?, mode)?;
                let want = hash.context("the binary has no hash")?;
                ensure!(
                    want == format!("sha512-{}", sha512sum(&p)),
                    "{path}: hash mismatch"
                );
            }
        }
    }
    for (name, u) in units(ign) {
        let dir = "etc/systemd/system";
        if let Some(c) = u["contents"].as_str() {
            put(&format!("{dir}/{name}"), c.as_bytes(), 0o644)?;
        }
        for d in u["dropins"].as_array().into_iter().flatten() {
            let dn = d["name"].as_str().unwrap();
            put(
                &format!("{dir}/{name}.d/{dn}"),
                d["contents"].as_str().unwrap().as_bytes(),
                0o644,
            )?;
        }
    }
    Ok(())
}

/// `ExecStart=` of the unit as written in `root`.
fn exec_start(root: &Path) -> Result<Vec<String>> {
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/shoal.service"))?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("no ExecStart=")?;
    Ok(line.split_whitespace().map(str::to_string).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_joins_the_cluster() -> Result<()> {
    const NEW: usize = 1;
    let mut plan = Plan::new(2)?;
    plan.defer = vec![NEW];
    let hdir = plan.host_dir(NEW)?;
    let hosts = plan.up().await?;
    let (seed, new) = (hosts.host(0), hosts.host(NEW));
    let gateway = new
        .ip
        .rsplit_once('.')
        .map(|(n, _)| format!("{n}.1"))
        .unwrap();

    // Render for this host: its name and address, the cluster's key, host 0
    // as its seed; the Ignition config a Flatcar box would boot with.
    let b = Box_ {
        hostname: new.name.clone(),
        address: format!("{}/24", new.ip),
        gateway,
        key: new.key.clone().context("the cluster has a key")?,
        binary: env!("CARGO_BIN_EXE_shoal").into(),
        cluster_id: hosts.prefix.clone(),
        seeds: vec![seed.gossip.clone()],
    };
    let conf = hdir.join("bootstrap.toml");
    std::fs::write(&conf, b.toml())?;
    let ign: Value = serde_json::from_str(&render(&Inputs::load(&conf)?, Format::Ignition)?)?;
    let root = hdir.join("root");
    apply(&ign, &root, &b.binary)?;
    // What systemd does on the box: StateDirectory= and the store mount
    // (here the harness's shared store, bound in below).
    for d in [
        "var/lib/shoal",
        "mnt/shoal-store",
        "proc",
        "sys",
        "dev",
        "usr",
        "run",
        "tmp",
        "var",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    // The machine's programs and libraries: /usr, and /bin, /lib, ... as
    // the same symlinks (merged /usr) or bound in too.
    let mut binds = vec!["usr", "proc", "sys", "dev"];
    for l in ["bin", "lib", "lib64", "sbin"] {
        let host = Path::new("/").join(l);
        if let Ok(t) = std::fs::read_link(&host) {
            std::os::unix::fs::symlink(t, root.join(l))?;
        } else if host.is_dir() {
            std::fs::create_dir_all(root.join(l))?;
            binds.push(l);
        }
    }
    std::os::unix::fs::symlink("../run", root.join("var/run"))?;
    std::fs::write(root.join("run/docker.sock"), b"")?;
    let sock = new.docker.trim_start_matches("unix://");
    let cmd = exec_start(&root)?;
    ensure!(cmd[0] == "/opt/bin/shoal", "ExecStart {cmd:?}");
    // A private mount namespace in the host's network namespace: the
    // machine's /usr and kernel file systems, the host's engine socket as
    // /run/docker.sock, then chroot into the box's root and exec ExecStart.
    let r = root.display();
    let script = format!(
        "set -e; for d in {dirs}; do mount --rbind /$d {r}/$d; done; \
         mount --bind {sock} {r}/run/docker.sock; mount --bind {store} {r}/mnt/shoal-store; \
         exec chroot {r} \"$@\"",
        store = hosts.store.display(),
        dirs = binds.join(" ")
    );
    let log = std::fs::File::create(hdir.join("shoal.log"))?;
    let mut child = tokio::process::Command::new(common::hosts::SCRIPT)
        .args([
            "exec",
            &new.name,
            "unshare",
            "--mount",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script, "sh"])
        .args(&cmd)
        .env("SHOAL_CLUSTER_DIR", &hosts.dir)
        .env_remove("DOCKER_HOST")
        .env("RUST_LOG", "shoal=debug,warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    // `down` stops it even if this test fails (every exec replaces the
    // process: this pid is the daemon).
    std::fs::write(hdir.join("shoal.pid"), child.id().unwrap().to_string())?;

    let joined = async {
        // Both see both alive with facts: host 0 lists the new node, and the
        // new node answers API calls with the cluster's operator token.
        hosts.wait_view(&[0, NEW], Duration::from_secs(90)).await?;
        let node: Value = new.client.get("/v1/node").await?;
        // Settings only its written shoal.toml has: max_envs 3 (the harness
        // gives none), gossip sealed with the cluster key it wrote.
        ensure!(node["name"] == new.name.as_str(), "{node}");
        ensure!(node["max_envs"] == 3, "{node}");
        ensure!(node["gossip"]["mode"] == "required", "{node}");
        let seen: Value = seed.client.get("/v1/cluster").await?;
        let me = seen["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == new.name.as_str())
            .context("host 0 does not list the new node")?;
        ensure!(me["alive"] == true, "{me}");
        // It runs from the box's files: its data dir is the root's.
        wait_for(Duration::from_secs(10), || async {
            Ok(std::fs::read_dir(root.join("var/lib/shoal"))?
                .next()
                .is_some())
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Some(st) = child.try_wait()? {
        bail!(
            "the bootstrapped shoal exited ({st}): {}",
            std::fs::read_to_string(hdir.join("shoal.log")).unwrap_or_default()
        );
    }
    let pid = child.id().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    joined.with_context(|| std::fs::read_to_string(hdir.join("shoal.log")).unwrap_or_default())
}
